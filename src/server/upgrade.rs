//! Zero-downtime binary upgrade: a new process takes over the listening sockets of the running
//! one through Pingora's upgrade socket (`data_dir/portcullis.upgrade.sock`); the old process
//! stops accepting, finishes the requests in flight (up to `grace_period`) and exits.
//!
//! Two ways in. `portcullis upgrade` (or SIGUSR2 to the pid in the pid file): the running
//! gateway starts its own executable path again — the file that path names now, so a replaced
//! binary — with its arguments plus `--upgrade`, as its own child (under systemd it stays in the
//! service's cgroup), waits until the child listens on the upgrade socket, and then hands over.
//! If the child exits or does not get there in time, the old process keeps serving and says so.
//! By hand: start `portcullis serve --upgrade`, then send SIGQUIT to the old process.
//!
//! This module also owns the process's signals: SIGQUIT hand over, SIGUSR2 start a successor
//! and hand over, SIGTERM graceful stop, SIGINT fast stop (a second SIGINT while draining ends
//! the process at once).

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

use super::pidfile::{self, PidFileError};
use crate::app::App;
use crate::readiness::Phase;
use crate::systemd;

/// File name of Pingora's upgrade socket inside `data_dir`.
pub const SOCKET_NAME: &str = "portcullis.upgrade.sock";
/// The flag that makes `serve` take the listeners from a running process.
pub const UPGRADE_FLAG: &str = "--upgrade";
/// How long a successor may take to load its config, store and view before the old process
/// gives up on it: 2 minutes.
pub const SUCCESSOR_DEADLINE: Duration = Duration::from_secs(120);
/// Longest path of a unix socket (sun_path holds 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot tell which executable this process runs: {0}")]
    NoExecutable(#[source] std::io::Error),
    #[error("cannot start the new process {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the new process (pid {pid}) exited before taking over ({status})")]
    SuccessorExited { pid: u32, status: ExitStatus },
    #[error("the new process (pid {pid}) did not listen on the upgrade socket within {secs} s; it was stopped")]
    SuccessorTimeout { pid: u32, secs: u64 },
    #[error("already handed over to a new process")]
    AlreadyHandedOver,
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    #[error("no process {pid} (named by the pid file {path}) is running")]
    NotRunning { pid: u32, path: PathBuf },
    #[error("cannot signal process {pid}: {source}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no new process took over within {secs} s; pid {pid} keeps serving (its log says why)"
    )]
    NoTakeOver { pid: u32, secs: u64 },
}

/// How to start this program again: the executable path it was started from and its arguments.
#[derive(Debug, Clone)]
pub struct Relaunch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Relaunch {
    /// This process's executable path and arguments, read at start (before the file may be
    /// replaced: afterwards `/proc/self/exe` names the deleted old file).
    pub fn current() -> Result<Relaunch, UpgradeError> {
        let exe = std::env::current_exe().map_err(UpgradeError::NoExecutable)?;
        Ok(Relaunch {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// A successor's arguments: ours with `--upgrade` added once.
pub fn successor_args(args: &[OsString]) -> Vec<OsString> {
    let mut out = args.to_vec();
    if !out.iter().any(|a| a == UPGRADE_FLAG) {
        out.push(UPGRADE_FLAG.into());
    }
    out
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Starts the successor and waits until it listens on the upgrade socket (it has loaded its
/// config, store and view by then). Returns its pid; on failure no successor is left running.
pub async fn start_successor(
    relaunch: &Relaunch,
    upgrade_sock: &Path,
    deadline: Duration,
) -> Result<u32, UpgradeError> {
    // A socket left by an earlier attempt would look like the new process listening.
    let _ = std::fs::remove_file(upgrade_sock);
    let mut child = tokio::process::Command::new(&relaunch.exe)
        .args(successor_args(&relaunch.args))
        // The watchdog belongs to whichever process is the main one: the successor pings once
        // it is (without WATCHDOG_PID the variable is for the process that reads it).
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            exe: relaunch.exe.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        if let Ok(Some(status)) = child.try_wait() {
            return Err(UpgradeError::SuccessorExited { pid, status });
        }
        if is_socket(upgrade_sock) {
            break;
        }
        if started.elapsed() >= deadline {
            let _ = child.kill().await;
            return Err(UpgradeError::SuccessorTimeout {
                pid,
                secs: deadline.as_secs(),
            });
        }
    }
    // Reap it if it ends while this process still lives, and say so.
    tokio::spawn(async move {
        if let Ok(status) = child.wait().await {
            tracing::warn!(pid, %status, "the new process exited");
        }
    });
    Ok(pid)
}

/// Where the process's lifecycle reports go: the server's main thread waits on these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Pingora's run returned.
    Finished,
    /// Shutting down and no client connection is left: no need to sit out the grace period.
    Drained,
    /// A second SIGINT while shutting down.
    Now,
}

/// What the signal loop needs.
pub struct SignalContext {
    pub app: Arc<App>,
    pub relaunch: Option<Relaunch>,
    pub upgrade_sock: PathBuf,
    pub exit: std::sync::mpsc::Sender<Exit>,
}

/// The process's signal handlers, registered at once so that no signal arriving during start-up
/// takes its default action (SIGUSR2 and SIGQUIT would end the process).
pub struct Signals {
    quit: Signal,
    term: Signal,
    int: Signal,
    usr2: Signal,
}

impl Signals {
    /// Registers the handlers; call inside the runtime that will run [`Signals::run`].
    pub fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            quit: signal(SignalKind::quit())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Turns signals into Pingora shutdown requests (sent on `to_pingora`) until the process
    /// ends.
    pub async fn run(mut self, ctx: SignalContext, to_pingora: mpsc::Sender<ShutdownSignal>) {
        let readiness = &ctx.app.readiness;
        let mut decided = false;
        loop {
            let request = tokio::select! {
                _ = self.quit.recv() => {
                    if decided { continue; }
                    readiness.advance(Phase::HandedOver);
                    systemd::status("handing the listeners over to a new process");
                    tracing::info!("SIGQUIT: handing the listeners over to the new process");
                    ShutdownSignal::GracefulUpgrade
                }
                _ = self.term.recv() => {
                    if decided { tracing::info!("SIGTERM: already shutting down"); continue; }
                    readiness.advance(Phase::Stopping);
                    systemd::stopping();
                    tracing::info!("SIGTERM: finishing requests in flight, then stopping");
                    ShutdownSignal::GracefulTerminate
                }
                _ = self.int.recv() => {
                    if decided {
                        tracing::info!("SIGINT while shutting down: exiting now");
                        let _ = ctx.exit.send(Exit::Now);
                        continue;
                    }
                    readiness.advance(Phase::Stopping);
                    systemd::stopping();
                    tracing::info!("SIGINT: stopping now");
                    ShutdownSignal::FastShutdown
                }
                _ = self.usr2.recv() => {
                    match hand_over(&ctx, decided).await {
                        Ok(pid) => {
                            readiness.advance(Phase::HandedOver);
                            tracing::info!(new_pid = pid, "the new process is listening on the upgrade socket; handing the listeners over");
                            systemd::status(&format!("handing the listeners over to pid {pid}"));
                            ShutdownSignal::GracefulUpgrade
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                            systemd::status(&format!("serving; the last upgrade failed: {e}"));
                            continue;
                        }
                    }
                }
            };
            decided = true;
            if to_pingora.send(request).await.is_err() {
                return;
            }
        }
    }
}

async fn hand_over(ctx: &SignalContext, decided: bool) -> Result<u32, UpgradeError> {
    if decided {
        return Err(UpgradeError::AlreadyHandedOver);
    }
    let Some(relaunch) = &ctx.relaunch else {
        return Err(UpgradeError::NoExecutable(std::io::Error::other(
            "the executable path could not be read at start",
        )));
    };
    tracing::info!(exe = %relaunch.exe.display(), "SIGUSR2: starting the new process");
    start_successor(relaunch, &ctx.upgrade_sock, SUCCESSOR_DEADLINE).await
}

/// What Pingora waits on for its shutdown: the requests of the signal loop.
pub struct SignalWatch {
    rx: tokio::sync::Mutex<mpsc::Receiver<ShutdownSignal>>,
}

impl SignalWatch {
    pub fn new(rx: mpsc::Receiver<ShutdownSignal>) -> Self {
        SignalWatch {
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for SignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        match self.rx.lock().await.recv().await {
            Some(s) => s,
            // The signal loop is gone (its runtime stopped): stop too.
            None => ShutdownSignal::FastShutdown,
        }
    }
}

/// `portcullis upgrade`: signals the gateway named by the pid file to start its successor, and
/// waits until the successor serves (the pid file names it). Returns (old pid, new pid).
pub fn request(data_dir: &Path, within: Duration) -> Result<(u32, u32), UpgradeError> {
    let path = pidfile::path(data_dir);
    let old = pidfile::read(&path)?;
    if !alive(old) {
        return Err(UpgradeError::NotRunning { pid: old, path });
    }
    send_signal(old, libc::SIGUSR2)?;
    let started = Instant::now();
    while started.elapsed() < within {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(new) = pidfile::read(&path) {
            if new != old && alive(new) {
                return Ok((old, new));
            }
        }
    }
    Err(UpgradeError::NoTakeOver {
        pid: old,
        secs: within.as_secs(),
    })
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn send_signal(pid: u32, sig: libc::c_int) -> Result<(), UpgradeError> {
    send_to(pid, sig).map_err(|source| UpgradeError::Signal { pid, source })
}

/// Sends signal `sig` to process `pid`.
pub fn send_to(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let raw =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(raw, sig) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_gets_our_arguments_and_one_upgrade_flag() {
        let ours: Vec<OsString> = ["--config", "/etc/portcullis.toml", "serve"]
            .iter()
            .map(OsString::from)
            .collect();
        let next = successor_args(&ours);
        assert_eq!(
            next,
            ["--config", "/etc/portcullis.toml", "serve", "--upgrade"]
                .iter()
                .map(OsString::from)
                .collect::<Vec<_>>()
        );
        assert_eq!(successor_args(&next), next);
    }

    #[test]
    fn this_process_is_alive_and_a_missing_one_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX - 1));
    }
}
