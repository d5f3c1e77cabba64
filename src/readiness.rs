//! Whether this process should be sent traffic: the one rule that `/readyz` and systemd's
//! `READY=1` share. A process is serving once its public listener accepts connections (the
//! revocation view is loaded before any listener exists); it stops being ready when it hands
//! its listeners over to a new process or starts shutting down. `/healthz` is liveness only and
//! does not look here.

use std::sync::atomic::{AtomicU8, Ordering};

/// Where the process is in its life, as far as traffic is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// The view is loaded; the public listener is not accepting yet (or, after an upgrade, has
    /// not been received from the old process yet).
    Starting = 0,
    /// The public listener accepts.
    Serving = 1,
    /// The listeners went to a new process; this one only finishes its requests in flight.
    HandedOver = 2,
    /// Shutting down (SIGTERM or SIGINT).
    Stopping = 3,
}

impl Phase {
    /// Why a process in this phase is not ready, or `None` when it is.
    pub fn not_ready_reason(self) -> Option<&'static str> {
        match self {
            Phase::Starting => Some("the public listener is not accepting connections yet"),
            Phase::Serving => None,
            Phase::HandedOver => Some(
                "the listeners were handed over to a new process; finishing requests in flight",
            ),
            Phase::Stopping => Some("shutting down"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::HandedOver => "handed_over",
            Phase::Stopping => "stopping",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Serving,
            2 => Phase::HandedOver,
            _ => Phase::Stopping,
        }
    }
}

/// The process's current [`Phase`], shared between the server and the admin listener.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::Acquire))
    }

    /// Moves to `phase`. Only forward: a process that handed over or is stopping never becomes
    /// ready again. Returns whether the phase changed.
    pub fn advance(&self, phase: Phase) -> bool {
        let new = phase as u8;
        let old = self.0.fetch_max(new, Ordering::AcqRel);
        old < new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving_and_never_again_after_hand_over() {
        let r = Readiness::default();
        assert_eq!(r.phase(), Phase::Starting);
        assert!(r.phase().not_ready_reason().is_some());
        assert!(r.advance(Phase::Serving));
        assert_eq!(r.phase().not_ready_reason(), None);
        assert!(r.advance(Phase::HandedOver));
        assert!(!r.advance(Phase::Serving));
        assert_eq!(r.phase(), Phase::HandedOver);
        assert!(r.advance(Phase::Stopping));
        assert!(!r.advance(Phase::HandedOver));
        assert_eq!(r.phase().as_str(), "stopping");
    }
}
