//! Talking to the service manager: the `sd_notify` protocol (`READY=1`, `STOPPING=1`,
//! `RELOADING=1`, `WATCHDOG=1`, `MAINPID=`, `STATUS=`) as one datagram per message to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written `@name`), and the
//! watchdog interval from `$WATCHDOG_USEC` / `$WATCHDOG_PID`.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd with `Type=notify`) every call does nothing.
//! Nothing here is secret; a message that cannot be sent is logged as a warning and otherwise
//! ignored, as a service manager that went away is no reason to stop serving.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an abstract name (@name)")]
    BadSocket(String),
    #[error("cannot use the notify socket {socket:?}: {source}")]
    Send {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("WATCHDOG_USEC={0:?} is not a positive number of microseconds")]
    BadWatchdogUsec(String),
}

/// The address a `$NOTIFY_SOCKET` value names: `@name` is an abstract socket, `/path` a file.
pub fn socket_addr(value: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = value.as_bytes();
    let bad = || NotifyError::BadSocket(value.to_string_lossy().into_owned());
    match bytes.first() {
        Some(b'@') if bytes.len() > 1 => {
            SocketAddr::from_abstract_name(&bytes[1..]).map_err(|_| bad())
        }
        Some(b'/') => SocketAddr::from_pathname(std::path::Path::new(value)).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Sends `message` (newline-separated `KEY=value` lines) to `$NOTIFY_SOCKET`. Returns whether a
/// service manager was there to tell.
pub fn notify(message: &str) -> Result<bool, NotifyError> {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = socket_addr(&value)?;
    let send_err = |source| NotifyError::Send {
        socket: value.to_string_lossy().into_owned(),
        source,
    };
    let socket = UnixDatagram::unbound().map_err(send_err)?;
    socket
        .send_to_addr(message.as_bytes(), &addr)
        .map_err(send_err)?;
    Ok(true)
}

/// Sends `message`, logging (not returning) a failure.
fn tell(message: &str) {
    if let Err(e) = notify(message) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// The listeners accept and the revocation view is loaded. A process that took over from an
/// older one (`serve --upgrade`) also names itself the service's main process.
pub fn ready(main_pid: Option<u32>) {
    match main_pid {
        Some(pid) => tell(&format!("MAINPID={pid}\nREADY=1\nSTATUS=serving")),
        None => tell("READY=1\nSTATUS=serving"),
    }
}

/// The process is shutting down (not sent when it hands over to a new process).
pub fn stopping() {
    tell("STOPPING=1\nSTATUS=stopping");
}

/// A configuration reload starts; send [`ready`] (with `None`) once it is done.
pub fn reloading() {
    tell(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
        monotonic_usec()
    ));
}

/// A free-form status line for `systemctl status`.
pub fn status(text: &str) {
    // One line: a newline would start another assignment.
    let line: String = text.chars().filter(|c| *c != '\n').collect();
    tell(&format!("STATUS={line}"));
}

/// One watchdog keep-alive.
pub fn watchdog() {
    tell("WATCHDOG=1");
}

/// CLOCK_MONOTONIC in microseconds, as `RELOADING=1` wants it next to it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1_000_000 + (ts.tv_nsec.max(0) as u64) / 1_000
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when the watchdog is meant for this
/// process (`WATCHDOG_PID` unset or equal to `own_pid`); `None` when there is no watchdog.
pub fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(
            Duration::from_micros(n / 2).max(Duration::from_millis(1)),
        )),
        _ => Err(NotifyError::BadWatchdogUsec(usec.to_string())),
    }
}

/// [`watchdog_interval`] from this process's environment.
pub fn watchdog_interval_from_env() -> Result<Option<Duration>, NotifyError> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_names_are_paths_or_abstract() {
        let p = socket_addr(OsStr::new("/run/systemd/notify")).unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = socket_addr(OsStr::new("@/org/freedesktop/systemd1/notify/1")).unwrap();
        assert_eq!(
            a.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/1"[..])
        );
        for bad in ["", "@", "relative/path"] {
            assert!(
                matches!(socket_addr(OsStr::new(bad)), Err(NotifyError::BadSocket(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn watchdog_pings_at_half_the_timeout_for_the_named_process_only() {
        assert_eq!(watchdog_interval(None, None, 7).unwrap(), None);
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7).unwrap(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7).unwrap(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("8"), 7).unwrap(),
            None
        );
        for bad in ["0", "-5", "soon"] {
            assert!(matches!(
                watchdog_interval(Some(bad), None, 7),
                Err(NotifyError::BadWatchdogUsec(_))
            ));
        }
    }

    #[test]
    fn a_message_reaches_a_bound_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let addr = socket_addr(path.as_os_str()).unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client.send_to_addr(b"READY=1", &addr).unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
