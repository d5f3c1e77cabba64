//! Brute-force limits. Per account: growing delays after a few consecutive failures and a lock
//! after `max_failures` (kept in the store, so every instance sees them). Per IP address: a cap
//! on failures within a window (in memory). Unknown user names get the same treatment in memory,
//! so a lock or a delay never tells whether an account exists.

use std::net::IpAddr;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use moka::sync::Cache;

use crate::config::AuthConfig;

/// Consecutive failures allowed before delays start.
pub const FREE_FAILURES: i64 = 3;
/// Longest delay between attempts on one account.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Whether an attempt may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Too many recent failures: try again after this long.
    Wait(Duration),
    /// The account is locked until this long from now.
    Locked(Duration),
}

/// The delay owed after `failures` consecutive failures: none for the first few, then doubling.
pub fn delay_after(failures: i64) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let exp = (failures - FREE_FAILURES).min(16) as u32;
    Duration::from_secs(1u64 << exp).min(MAX_DELAY)
}

/// Decides the gate from an account's failure state at `now_ms`.
pub fn account_gate(
    failures: i64,
    last_failure_ms: Option<i64>,
    locked_until_ms: Option<i64>,
    now_ms: i64,
) -> Gate {
    if let Some(until) = locked_until_ms {
        if until > now_ms {
            return Gate::Locked(Duration::from_millis((until - now_ms) as u64));
        }
        // A lock that ran out starts the account afresh.
        return Gate::Open;
    }
    let Some(last) = last_failure_ms else {
        return Gate::Open;
    };
    let ready_at = last + delay_after(failures).as_millis() as i64;
    if ready_at > now_ms {
        Gate::Wait(Duration::from_millis((ready_at - now_ms) as u64))
    } else {
        Gate::Open
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counter {
    failures: i64,
    first_ms: i64,
    last_ms: i64,
    locked_until_ms: Option<i64>,
}

pub struct Throttle {
    ips: Cache<IpAddr, Counter>,
    unknown_names: Cache<String, Counter>,
    /// The limits, replaced by a reload ([`Throttle::set_limits`]); counters already kept stay.
    ip_max: AtomicI64,
    window_ms: AtomicI64,
    max_failures: AtomicI64,
    lockout_ms: AtomicI64,
}

impl Throttle {
    pub fn new(cfg: &AuthConfig) -> Throttle {
        let longest = cfg.ip_window.max(cfg.lockout) + MAX_DELAY;
        Throttle {
            ips: Cache::builder()
                .max_capacity(200_000)
                .time_to_idle(longest)
                .build(),
            unknown_names: Cache::builder()
                .max_capacity(200_000)
                .time_to_idle(longest)
                .build(),
            ip_max: AtomicI64::new(cfg.ip_max_failures as i64),
            window_ms: AtomicI64::new(cfg.ip_window.as_millis() as i64),
            max_failures: AtomicI64::new(cfg.max_failures as i64),
            lockout_ms: AtomicI64::new(cfg.lockout.as_millis() as i64),
        }
    }

    /// Takes the limits of a reloaded config. The caches' idle time stays as built at start
    /// (a longer window than before is honoured for counters touched within the old one).
    pub fn set_limits(&self, cfg: &AuthConfig) {
        self.ip_max.store(cfg.ip_max_failures as i64, Relaxed);
        self.window_ms
            .store(cfg.ip_window.as_millis() as i64, Relaxed);
        self.max_failures.store(cfg.max_failures as i64, Relaxed);
        self.lockout_ms
            .store(cfg.lockout.as_millis() as i64, Relaxed);
    }

    /// The gate for an IP address.
    pub fn ip_gate(&self, ip: Option<IpAddr>, now_ms: i64) -> Gate {
        let Some(c) = ip.and_then(|ip| self.ips.get(&ip)) else {
            return Gate::Open;
        };
        if now_ms - c.first_ms > self.window_ms.load(Relaxed)
            || c.failures < self.ip_max.load(Relaxed)
        {
            return Gate::Open;
        }
        Gate::Wait(Duration::from_millis(
            (c.first_ms + self.window_ms.load(Relaxed) - now_ms).max(0) as u64,
        ))
    }

    pub fn ip_failed(&self, ip: Option<IpAddr>, now_ms: i64) {
        let Some(ip) = ip else { return };
        let mut c = self.ips.get(&ip).unwrap_or_default();
        if c.failures == 0 || now_ms - c.first_ms > self.window_ms.load(Relaxed) {
            c = Counter {
                first_ms: now_ms,
                ..Counter::default()
            };
        }
        c.failures += 1;
        c.last_ms = now_ms;
        self.ips.insert(ip, c);
    }

    /// The gate for a user name that names no account (mirrors `account_gate`).
    pub fn unknown_gate(&self, name: &str, now_ms: i64) -> Gate {
        let c = self
            .unknown_names
            .get(&name.to_lowercase())
            .unwrap_or_default();
        account_gate(
            c.failures,
            (c.failures > 0).then_some(c.last_ms),
            c.locked_until_ms,
            now_ms,
        )
    }

    pub fn unknown_failed(&self, name: &str, now_ms: i64) {
        let key = name.to_lowercase();
        let mut c = self.unknown_names.get(&key).unwrap_or_default();
        if c.locked_until_ms.is_some_and(|u| u <= now_ms) {
            c = Counter::default();
        }
        c.failures += 1;
        c.last_ms = now_ms;
        if c.failures >= self.max_failures.load(Relaxed) {
            c.locked_until_ms = Some(now_ms + self.lockout_ms.load(Relaxed));
        }
        self.unknown_names.insert(key, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap() {
        assert_eq!(delay_after(0), Duration::ZERO);
        assert_eq!(delay_after(2), Duration::ZERO);
        assert_eq!(delay_after(3), Duration::from_secs(1));
        assert_eq!(delay_after(5), Duration::from_secs(4));
        assert_eq!(delay_after(40), MAX_DELAY);
    }

    #[test]
    fn account_gate_waits_locks_and_reopens() {
        assert_eq!(account_gate(0, None, None, 1000), Gate::Open);
        assert_eq!(
            account_gate(4, Some(1000), None, 1500),
            Gate::Wait(Duration::from_millis(1500))
        );
        assert_eq!(account_gate(4, Some(1000), None, 3000), Gate::Open);
        assert_eq!(
            account_gate(10, Some(1000), Some(5000), 2000),
            Gate::Locked(Duration::from_millis(3000))
        );
        assert_eq!(account_gate(10, Some(1000), Some(5000), 5000), Gate::Open);
    }
}
