//! The data-directory lock: `data_dir/portcullis.lock`, held with `flock` for as long as a
//! process uses the directory. `serve` holds it shared (a second gateway process taking over
//! during a zero-downtime upgrade holds it too); `restore` holds it exclusive, so it refuses
//! while any gateway runs on the directory, and a gateway started during a restore refuses to
//! start. The kernel drops the lock when the process ends, however it ends (kill -9 included),
//! so a stale lock file never blocks anyone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "portcullis.lock";
/// The pid file's name inside the data directory (written by `serve`).
pub const PID_FILE: &str = "portcullis.pid";

/// How the lock is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// A running gateway: any number of them at once.
    Shared,
    /// A restore: nobody else.
    Exclusive,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot open the data-directory lock {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", busy_message(*mode, path, pid.as_deref()))]
    Busy {
        mode: LockMode,
        path: String,
        pid: Option<String>,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn busy_message(mode: LockMode, dir: &str, pid: Option<&str>) -> String {
    match mode {
        LockMode::Exclusive => format!(
            "a gateway is running on the data directory {dir}{}: stop it first (restore never \
             replaces a store under a running gateway)",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
        LockMode::Shared => format!(
            "a restore is in progress on the data directory {dir} (`portcullis restore` holds \
             its lock): start the gateway when it has finished"
        ),
    }
}

/// A held data-directory lock; dropping it releases the lock.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `dir` (created if absent) without waiting: `Busy` when another
    /// process holds it in a conflicting mode.
    pub fn acquire(dir: &Path, mode: LockMode) -> Result<DataDirLock, DataDirError> {
        let path = dir.join(LOCK_FILE);
        let open_err = |source| DataDirError::Open {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(open_err)?;
        let op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        } | libc::LOCK_NB;
        loop {
            // SAFETY: flock takes a file descriptor we own (kept open by `file`) and flags.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(DataDirLock {
                    _file: file,
                    dir: dir.to_path_buf(),
                });
            }
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => {
                    return Err(DataDirError::Busy {
                        mode,
                        path: dir.display().to_string(),
                        pid: read_pid(dir),
                    })
                }
                _ => {
                    return Err(DataDirError::Lock {
                        path: path.display().to_string(),
                        source: err,
                    })
                }
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The pid a gateway wrote into the data directory, if it reads as one.
fn read_pid(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let pid = text.trim();
    (!pid.is_empty() && pid.len() <= 10 && pid.bytes().all(|b| b.is_ascii_digit()))
        .then(|| pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_holders_coexist_and_exclude_an_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = DataDirLock::acquire(dir.path(), LockMode::Shared).unwrap();
        let b = DataDirLock::acquire(dir.path(), LockMode::Shared).unwrap();
        std::fs::write(dir.path().join(PID_FILE), "4242\n").unwrap();
        let e = DataDirLock::acquire(dir.path(), LockMode::Exclusive).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("a gateway is running"), "{text}");
        assert!(text.contains("pid 4242"), "{text}");
        drop(a);
        assert!(DataDirLock::acquire(dir.path(), LockMode::Exclusive).is_err());
        drop(b);
        let x = DataDirLock::acquire(dir.path(), LockMode::Exclusive).unwrap();
        let e = DataDirLock::acquire(dir.path(), LockMode::Shared).unwrap_err();
        assert!(e.to_string().contains("a restore is in progress"), "{e}");
        drop(x);
        DataDirLock::acquire(dir.path(), LockMode::Shared).unwrap();
    }
}
