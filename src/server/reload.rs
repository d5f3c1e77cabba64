//! Live reload: on SIGHUP (sent by `portcullis reload`, `systemctl reload` or by hand) the
//! config file is read and validated again, exactly as at start. A file that fails is refused
//! with the same message `check-config` prints, and the configuration in force keeps serving.
//! A valid one is compared with the running one (`config::live`): keys that need a restart keep
//! their running value and are named; everything else (routes, upstreams, public paths, media
//! options, throttling limits, log level and format, the certificate files) applies to the next
//! request. Listeners and open connections are never touched: a download, a WebSocket or a
//! keep-alive connection in progress carries on.
//!
//! The outcome is logged, counted (`portcullis_config_reloads_total{result}`), audited, and
//! written to `data_dir/portcullis.reload` so that the `reload` command can tell its caller.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::app::{now_ms, App, ClientInfo};
use crate::config::{live, Config};
use crate::metrics::ReloadResult;
use crate::tls::{self, CertResolver};

/// The file, in `data_dir`, that holds the outcome of the last reload.
pub const STATUS_FILE: &str = "portcullis.reload";

/// The outcome of one reload, as written to [`STATUS_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadStatus {
    /// Counts the reloads of this process, from 1.
    pub seq: u64,
    pub pid: u32,
    pub at_ms: i64,
    /// `applied`, `needs_restart` or `refused`.
    pub result: String,
    /// Why a reload was refused (the validation message), else empty.
    pub error: String,
    pub needs_restart: Vec<String>,
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
}

/// Re-reads the config file on request. One reload runs at a time.
pub struct Reloader {
    app: Arc<App>,
    /// The public listener's certificate, when it speaks TLS.
    certs: Option<Arc<CertResolver>>,
    seq: tokio::sync::Mutex<u64>,
}

impl Reloader {
    pub fn new(app: Arc<App>, certs: Option<Arc<CertResolver>>) -> Reloader {
        Reloader {
            app,
            certs,
            seq: tokio::sync::Mutex::new(0),
        }
    }

    /// Reloads on every SIGHUP until the process ends.
    pub async fn run_on_sighup(self: Arc<Self>) {
        let mut hangups =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP: live reload is off");
                    return;
                }
            };
        while hangups.recv().await.is_some() {
            self.reload().await;
        }
    }

    /// Reads, validates and applies the config file once.
    pub async fn reload(&self) -> ReloadStatus {
        let mut seq = self.seq.lock().await;
        *seq += 1;
        crate::systemd::reloading();
        let running = self.app.config();
        let path = running.source.clone();
        let mut status = ReloadStatus {
            seq: *seq,
            pid: std::process::id(),
            at_ms: now_ms(),
            result: String::new(),
            error: String::new(),
            needs_restart: Vec::new(),
            routes_added: Vec::new(),
            routes_removed: Vec::new(),
        };
        let mut prepared = self.prepare(&running, &path);
        if let Ok((p, _)) = &prepared {
            let rp_id = &p.config.webauthn.rp_id;
            if *rp_id != running.webauthn.rp_id {
                match crate::app::passkey::rp_id_conflict(&self.app.store, rp_id).await {
                    Ok(None) => {}
                    Ok(Some(problem)) => {
                        prepared = Err(format!(
                            "{}: key `webauthn.rp_id`: {problem}",
                            path.display()
                        ))
                    }
                    Err(e) => {
                        prepared = Err(format!(
                            "{}: key `webauthn.rp_id`: the passkeys cannot be checked: {e}",
                            path.display()
                        ))
                    }
                }
            }
        }
        let result = match prepared {
            Err(message) => {
                tracing::error!(file = %path.display(), error = %message, "configuration reload refused: the running configuration stays in force");
                status.error = message;
                ReloadResult::Refused
            }
            Ok((prepared, cert)) => {
                if let Err(e) = crate::telemetry::reconfigure(&prepared.config.log) {
                    tracing::warn!(error = %e, "log settings not changed");
                }
                if let (Some(resolver), Some(certificates)) = (&self.certs, cert) {
                    resolver.install(certificates);
                }
                crate::config::rules::warn_shadowed(&prepared.config.rules);
                crate::proxy::set_hsts(prepared.config.server.hsts.clone());
                self.app.apply_config(prepared.config);
                for key in &prepared.needs_restart {
                    tracing::warn!(key = %key, "`{key}` changed in the config file but needs a restart: the running value stays until then");
                }
                tracing::info!(
                    file = %path.display(),
                    routes_added = ?prepared.routes_added,
                    routes_removed = ?prepared.routes_removed,
                    needs_restart = ?prepared.needs_restart,
                    "configuration reloaded"
                );
                status.needs_restart = prepared
                    .needs_restart
                    .iter()
                    .map(|k| k.to_string())
                    .collect();
                status.routes_added = prepared.routes_added;
                status.routes_removed = prepared.routes_removed;
                if status.needs_restart.is_empty() {
                    ReloadResult::Applied
                } else {
                    ReloadResult::NeedsRestart
                }
            }
        };
        status.result = result.as_str().to_string();
        let metrics = &self.app.metrics;
        metrics
            .config_last_reload_ok
            .set(i64::from(result != ReloadResult::Refused));
        if result != ReloadResult::Refused {
            metrics
                .config_restart_pending
                .set(i64::from(result == ReloadResult::NeedsRestart));
        }
        self.app
            .metrics
            .counter(crate::metrics::Family::ConfigReloads, &[result.as_str()])
            .inc();
        let mut entry = self.app.audit_entry(
            "config_reload",
            result.as_str(),
            None,
            &ClientInfo::default(),
        );
        entry.detail = if status.error.is_empty() {
            format!(
                "added {:?} removed {:?} needs restart {:?}",
                status.routes_added, status.routes_removed, status.needs_restart
            )
        } else {
            crate::app::truncate(&status.error, 512)
        };
        self.app.audit(entry).await;
        crate::systemd::ready(None);
        let dir = running.server.data_dir.clone();
        if let Err(e) = write_status(&dir, &status) {
            tracing::warn!(error = %e, "cannot write the reload status file");
        }
        status
    }

    /// Loads and validates the file, compares it with `running`, and reads the certificate
    /// files it names. Nothing is applied here.
    fn prepare(
        &self,
        running: &Config,
        path: &Path,
    ) -> Result<(live::Prepared, Option<tls::Certificates>), String> {
        let new = Config::load(path).map_err(|e| e.to_string())?;
        let prepared = live::prepare(running, new);
        let certs = match &self.certs {
            Some(_) => Some(
                tls::load_all(
                    prepared.config.server.tls.as_ref(),
                    &prepared.config.certificates,
                )
                .map_err(|e| format!("{}: {e}", path.display()))?,
            ),
            None => None,
        };
        Ok((prepared, certs))
    }
}

fn status_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE)
}

/// Writes the status whole (a temporary file renamed over the old one).
fn write_status(data_dir: &Path, status: &ReloadStatus) -> std::io::Result<()> {
    let path = status_path(data_dir);
    let tmp = data_dir.join(format!("{STATUS_FILE}.{}.tmp", std::process::id()));
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The status of the last reload of any process on `data_dir`, if one was written.
pub fn read_status(data_dir: &Path) -> Option<ReloadStatus> {
    let text = std::fs::read(status_path(data_dir)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Why `portcullis reload` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no gateway is running on {dir}: {reason}")]
    NotRunning { dir: String, reason: String },
    #[error("cannot signal the gateway (pid {pid}): {source}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway (pid {pid}) did not report the reload within {secs} s: see its log")]
    NoAnswer { pid: u32, secs: u64 },
}

/// The pid in `data_dir`'s pid file, if that process is alive.
pub fn running_pid(data_dir: &Path) -> Result<u32, RequestError> {
    let not_running = |reason: String| RequestError::NotRunning {
        dir: data_dir.display().to_string(),
        reason,
    };
    let path = super::pidfile::path(data_dir);
    let pid = super::pidfile::read(&path).map_err(|e| not_running(e.to_string()))?;
    if !super::upgrade::alive(pid) {
        return Err(not_running(format!(
            "process {pid} (from {}) is not running",
            path.display()
        )));
    }
    Ok(pid)
}

/// Sends SIGHUP to the gateway serving on `data_dir` and waits up to `wait` for the outcome it
/// reports.
pub fn request(data_dir: &Path, wait: std::time::Duration) -> Result<ReloadStatus, RequestError> {
    let pid = running_pid(data_dir)?;
    let before = read_status(data_dir);
    super::upgrade::send_to(pid, libc::SIGHUP)
        .map_err(|source| RequestError::Signal { pid, source })?;
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Some(now) = read_status(data_dir) {
            if now.pid == pid && Some(&now) != before.as_ref() {
                return Ok(now);
            }
        }
    }
    Err(RequestError::NoAnswer {
        pid,
        secs: wait.as_secs(),
    })
}
