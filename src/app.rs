//! The gateway's shared state (`App`) and the login pipeline: throttles, password, second
//! factor, forced steps (new password, 2FA enrolment), then a session. Account and admin
//! operations live in `app::account`. Every revocation is committed to the store first, then
//! applied to this process's view at once; other processes pick it up through the sync loop.

pub mod account;
pub mod directory;
pub mod email;
pub mod media;
pub mod outbox;
pub mod passkey;
pub mod plex;
pub mod sso;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use moka::sync::Cache;

use crate::auth::cookie;
use crate::auth::password::{Hasher, PasswordError};
use crate::auth::throttle::{account_gate, Gate, Throttle};
use crate::auth::token::{KeyError, Keyring, PendingClaims, SessionClaims, PENDING_TYP};
use crate::auth::totp::{self, SecretsError, SecretsKey};
use crate::config::{Config, Require2fa, Secret, MAX_PASSWORD_BYTES};
use crate::metrics::Metrics;
use crate::revocation::{self, RevocationView, SWEEP_INTERVAL};
use crate::store::{
    self, AuditEntry, DynStore, NewSession, RevocationEvent, SequencedEvent, SessionId,
    SessionKind, StoreError, StoreResult, User,
};

/// Longest user name accepted at login, in bytes.
pub const MAX_USERNAME_BYTES: usize = 128;
/// Lifetime of a pending login (password accepted, a step still owed).
pub const PENDING_TTL_SECS: i64 = 300;
/// Wrong codes allowed per pending login before the password must be entered again.
pub const PENDING_MAX_TRIES: u32 = 5;
/// A session's last-seen time is written at most this often.
pub const LAST_SEEN_EVERY_MS: i64 = 60_000;
/// How often batched last-seen times are written.
pub const LAST_SEEN_FLUSH: Duration = Duration::from_secs(5);
/// How often the active-session gauges are refreshed from the store.
pub const SESSION_COUNT_EVERY: Duration = Duration::from_secs(15);
/// How often memory the allocators hold free is handed back to the operating system (see
/// `crate::release_free_memory`). mimalloc purges freed pages only a second after the free and
/// only when asked again, and proxy threads that have gone idle after a burst of connections do
/// not ask; this pass does, for every thread's pages at once. Every 10 s, a burst's memory is
/// back within seconds of the upstream pool's idle timeout (20 s), not up to 30 s later.
pub const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(10);
/// After a burst of at least `BURST_ENDS` client connections has ended, memory is released once
/// no connection has ended for `BURST_QUIET` (past mimalloc's one-second purge delay) instead of
/// at the next periodic pass: 10,000 closed keep-alives gave their 55 MiB back within 2 s, not
/// up to 10 s later. Fewer ends, a trickle, wait for the periodic pass.
pub const BURST_ENDS: u64 = 256;
pub const BURST_QUIET: Duration = Duration::from_millis(1200);
/// The proxy threads collect their heaps on each release pass from [`BURST_QUIET`] after the
/// last client connection ended until this long after the upstream pool closed the connections
/// it opened meanwhile (see [`BurstEnd::threads_due`]).
pub const TIDY_AFTER_POOL: Duration = Duration::from_secs(25);

/// When a burst of connection ends is over (see [`BURST_ENDS`]), and when the proxy threads
/// should collect their heaps (`crate::tidy_proxy_threads`).
#[derive(Debug, Default)]
pub struct BurstEnd {
    /// The count of ended connections at the last release, and when it last changed.
    released_at: u64,
    last: u64,
    changed: Option<Instant>,
}

impl BurstEnd {
    /// Given the count of connections ended so far (`crate::connections_ended`): whether a
    /// burst has ended since the last release and been quiet long enough.
    pub fn due(&mut self, ended: u64, now: Instant) -> bool {
        if ended != self.last {
            self.last = ended;
            self.changed = Some(now);
            return false;
        }
        ended.saturating_sub(self.released_at) >= BURST_ENDS
            && self
                .changed
                .is_some_and(|t| now.saturating_duration_since(t) >= BURST_QUIET)
    }

    /// A release ran (early or periodic): the ends counted so far are dealt with.
    pub fn released(&mut self) {
        self.released_at = self.last;
    }

    /// Whether the proxy threads should collect their heaps on this pass: a client connection
    /// ended less than `window` ago, and none for [`BURST_QUIET`]. Each pass in that window
    /// does it again, for what goes on being freed after a burst (its upstream connections
    /// close once idle for `server.upstream_idle_timeout`, so the window is longer); while
    /// connections keep ending, each thread collects at its own ends instead.
    pub fn threads_due(&self, now: Instant, window: Duration) -> bool {
        self.changed.is_some_and(|t| {
            let quiet = now.saturating_duration_since(t);
            quiet >= BURST_QUIET && quiet <= window
        })
    }
}

/// Milliseconds since the Unix epoch.
/// How often the store is purged of expired rows.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);
/// Expired sessions and spent reset links are kept this long for the account pages and audit.
const PURGE_KEEP_MS: i64 = 7 * 24 * 3600 * 1000;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("single sign-on: {0}")]
    Oidc(#[from] crate::oidc::OidcError),
    #[error("{0}")]
    Passkeys(String),
    /// A file a section names cannot be used (`[directory]`, `[mail]`).
    #[error("{0}")]
    Setup(String),
}

/// Why a login (or one of its steps) did not go ahead.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong user name or password")]
    InvalidCredentials,
    #[error("too many failed attempts; try again in {} s", .0.as_secs().max(1))]
    Throttled(Duration),
    #[error("too many failed attempts: this account is locked for a while; try again later or ask an administrator")]
    Locked,
    #[error("this account is disabled")]
    Disabled,
    #[error("a second factor is required")]
    SecondFactorRequired,
    #[error("the code is not valid")]
    InvalidCode,
    #[error("this sign-in has expired; enter your password again")]
    RestartLogin,
    #[error("a new password must be chosen before signing in")]
    PasswordResetRequired,
    #[error("two-factor authentication must be set up before signing in")]
    EnrollmentRequired,
    #[error("this account signs in with a passkey only: use \"Sign in with a passkey\"")]
    PasskeyRequired,
    #[error("{0}")]
    Policy(#[from] crate::auth::password::PolicyError),
    #[error("the account store is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("the user directory is unavailable; try again in a moment")]
    DirectoryUnavailable,
    #[error("the sign-in could not be completed")]
    Internal,
}

impl LoginError {
    pub fn label(&self) -> &'static str {
        match self {
            LoginError::InvalidCredentials => "invalid_credentials",
            LoginError::Throttled(_) => "throttled",
            LoginError::Locked => "locked",
            LoginError::Disabled => "disabled",
            LoginError::SecondFactorRequired => "second_factor_required",
            LoginError::InvalidCode => "invalid_code",
            LoginError::RestartLogin => "restart_login",
            LoginError::PasswordResetRequired => "password_reset_required",
            LoginError::EnrollmentRequired => "second_factor_enrollment_required",
            LoginError::PasskeyRequired => "passkey_required",
            LoginError::Policy(_) => "password_policy",
            LoginError::Unavailable(_) => "store_unavailable",
            LoginError::DirectoryUnavailable => "directory_unavailable",
            LoginError::Internal => "internal_error",
        }
    }
}

impl From<StoreError> for LoginError {
    fn from(e: StoreError) -> Self {
        LoginError::Unavailable(e)
    }
}

/// A fresh session.
#[derive(Debug)]
pub struct LoginOk {
    pub token: String,
    pub session_id: SessionId,
    pub expires_s: i64,
    pub user_name: String,
}

/// What a login still owes after the password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingStage {
    Totp,
    Password,
    Enroll,
    /// A user who must sign in with a passkey and has none registers one.
    Passkey,
}

impl PendingStage {
    pub fn as_str(self) -> &'static str {
        match self {
            PendingStage::Totp => "totp",
            PendingStage::Password => "password",
            PendingStage::Enroll => "enroll",
            PendingStage::Passkey => "passkey",
        }
    }
    fn parse(s: &str) -> Option<PendingStage> {
        match s {
            "totp" => Some(PendingStage::Totp),
            "password" => Some(PendingStage::Password),
            "enroll" => Some(PendingStage::Enroll),
            "passkey" => Some(PendingStage::Passkey),
            _ => None,
        }
    }
}

/// The names of the configuration's access rules, for their metrics.
fn rule_names(config: &Config) -> Vec<String> {
    config.rules.iter().map(|r| r.name.clone()).collect()
}

/// The factors a sign-in passed before a pending step that comes after all of them (a new
/// password, a passkey to register), as the pending login recorded them. A token without them
/// (made by an older instance) claims only what is known for sure: a single sign-on may have
/// skipped the gateway's code (trusted provider factors).
fn factors_before_step(claims: &PendingClaims, user: &User) -> Vec<String> {
    if !claims.amr.is_empty() {
        return claims.amr.clone();
    }
    match (&claims.sso, user.totp_enabled) {
        (Some(_), _) => vec!["sso".to_string()],
        (None, true) => vec!["pwd".to_string(), "otp".to_string()],
        (None, false) => vec!["pwd".to_string()],
    }
}

/// The outcome of a login step.
#[derive(Debug)]
pub enum LoginStep {
    Session(LoginOk),
    /// The password was right; `token` (a pending-login JWT) carries the login to `stage`.
    Pending {
        token: String,
        stage: PendingStage,
    },
}

/// Request details recorded with sessions and audit entries.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub ip: String,
    pub user_agent: String,
}

impl ClientInfo {
    pub fn ip_addr(&self) -> Option<IpAddr> {
        self.ip.parse().ok()
    }
}

/// How the login was asked for: a browser form can be walked through pending steps; the JSON
/// API must give everything at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Form,
    Api,
}

/// Session signing keys, reloaded when the key file changes (rotation by the CLI).
struct Keys {
    ring: RwLock<Arc<Keyring>>,
    file: Option<PathBuf>,
    modified: Mutex<Option<SystemTime>>,
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Failed logins of known accounts on their way to the store, and how many have landed.
#[derive(Default)]
struct FailuresInFlight {
    /// By user id, each failure by its stamp.
    stamps: HashMap<i64, Vec<i64>>,
    /// Failures that reached the store (or failed to) since the start, of any account.
    landed: u64,
}

/// How many failed logins had landed before an account row was read ([`App::failures_mark`]):
/// the row's gate reads it again if one landed after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FailuresMark(u64);

/// How often an account's gate reads its row again while failed logins keep landing.
const GATE_REREADS: u32 = 3;

pub struct App {
    /// The configuration in force. A reload swaps it whole ([`App::apply_config`]); readers
    /// take a snapshot with [`App::config`] and keep it for the operation at hand.
    config: ArcSwap<Config>,
    pub store: DynStore,
    pub view: RevocationView,
    keys: Keys,
    pub secrets: SecretsKey,
    pub hasher: Hasher,
    pub metrics: Metrics,
    pub throttle: Throttle,
    pub cookie_name: &'static str,
    pending_tries: Cache<String, u32>,
    /// Pending logins (by `jti`) of single sign-on logins whose provider claim grants admin:
    /// granted when the session is created (see `sso::SsoLogin::grant_admin`).
    sso_admin_grants: Cache<String, ()>,
    /// Client addresses whose ambiguous credentials were audited in the last minute: one audit
    /// entry per address and minute, however many such requests it sends.
    ambiguous_audited: Cache<String, ()>,
    /// Passkey ceremonies started without a session, by client address, over the last
    /// ceremony lifetime: each writes a row to the store, so an address gets a bounded share.
    pub(crate) passkey_starts: Cache<String, u32>,
    /// Failed logins of known accounts on their way to the store (written off the response
    /// path): the account's gate counts those its row does not hold yet, so a quick run of
    /// wrong passwords cannot outrun its own lock.
    failures_in_flight: Mutex<FailuresInFlight>,
    /// The last failure stamp handed out ([`App::failure_stamp`]).
    last_failure_stamp: AtomicI64,
    /// Woken whenever a failure in flight has reached the store.
    failure_landed: tokio::sync::Notify,
    /// When each session's last use was last queued for the store, by session id. Looked up on
    /// every request; hashed with foldhash (the ids are the gateway's own random numbers).
    last_seen_written: Cache<u128, i64, foldhash::fast::RandomState>,
    last_seen_pending: Mutex<Vec<(SessionId, i64)>>,
    /// Playback grants, Quick Connect approvals and open connections of media routes.
    pub media: crate::mediaserver::MediaState,
    pub media_client: crate::mediaserver::upstream::MediaClient,
    /// Plex routes' resolved-token lists, keys, self-checks and remembered refusals.
    pub plex: crate::mediaserver::plex::PlexState,
    /// The plex.tv client (`None` only if TLS could not be set up, which plex routes report).
    pub plex_tv: Option<crate::mediaserver::plex::tv::PlexTv>,
    /// Single sign-on providers (`[[oidc]]`).
    pub oidc: crate::oidc::Providers,
    media_loop_started: std::sync::atomic::AtomicBool,
    /// Whether this process should be sent traffic (`/readyz`, systemd's `READY=1`).
    pub readiness: crate::readiness::Readiness,
    /// The SMTP client (`[mail]`), the webhooks (`[[webhook]]`), and the outbox worker's
    /// wake-up call.
    pub mailer: Option<Arc<crate::mail::Mailer>>,
    pub webhooks: Option<Arc<crate::webhook::Webhooks>>,
    pub outbox_wake: tokio::sync::Notify,
    mail_limits: email::MailLimits,
    /// The LDAP directory (`[directory]`), and what its sync saw last.
    directory: Option<Arc<crate::directory::Directory>>,
    pub directory_status: directory::DirectoryStatus,
    /// The ACME manager's challenge answers and status (`[tls.acme]`).
    pub acme: Option<crate::tls::AcmeShared>,
}

impl App {
    /// Opens the store, loads (or creates) the keys and builds the view from the store.
    pub async fn open(config: Config) -> Result<Arc<App>, StartError> {
        let acme = config
            .acme
            .as_ref()
            .map(|_| crate::tls::AcmeShared::default());
        crate::config::rules::warn_shadowed(&config.rules);
        let store = store::open(config.store.url.expose(), config.store.busy_timeout).await?;
        if let Some(problem) = passkey::rp_id_conflict(&store, &config.webauthn.rp_id).await? {
            return Err(StartError::Passkeys(format!(
                "{}: key `webauthn.rp_id`: {problem}",
                config.source.display()
            )));
        }
        let ring = Keyring::load(&config.session, &config.server.public_url, true)?;
        let secrets = SecretsKey::load(&config.auth.secrets_key_file, true)?;
        let hasher = Hasher::new(&config.password)?;
        let names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
        let provider_ids: Vec<String> = config.oidc.iter().map(|p| p.id.clone()).collect();
        let metrics = Metrics::new(&names, store.backend())?;
        metrics.register_oidc_providers(&provider_ids);
        metrics.register_rules(&rule_names(&config));
        let oidc = crate::oidc::Providers::new(&config.oidc, &config.server.public_url)?;
        let mailer = match &config.mail {
            None => None,
            Some(m) => Some(Arc::new(crate::mail::Mailer::new(m).map_err(
                |(key, problem)| {
                    StartError::Setup(format!(
                        "{}: key `{key}`: {problem}",
                        config.source.display()
                    ))
                },
            )?)),
        };
        let webhooks = match config.webhooks.is_empty() {
            true => None,
            false => Some(Arc::new(
                crate::webhook::Webhooks::new(&config.webhooks).map_err(|(key, problem)| {
                    StartError::Setup(format!(
                        "{}: key `{key}`: {problem}",
                        config.source.display()
                    ))
                })?,
            )),
        };
        let directory = match &config.directory {
            None => None,
            Some(d) => {
                let counter = metrics.directory_counter();
                let made = crate::directory::Directory::new(
                    d,
                    Box::new(move |op, outcome| counter(op.as_str(), outcome)),
                )
                .map_err(|(key, problem)| {
                    StartError::Setup(format!(
                        "{}: key `{key}`: {problem}",
                        config.source.display()
                    ))
                })?;
                Some(Arc::new(made))
            }
        };
        let view = RevocationView::new();
        let started = Instant::now();
        view.load(store.snapshot(now_ms()).await?, Instant::now());
        crate::release_free_memory();
        let stats = view.stats();
        tracing::info!(
            revoked_sessions = stats.revoked_sessions,
            user_cutoffs = stats.user_cutoffs,
            media_tokens = stats.media_tokens,
            seq = stats.seq,
            heap_mib = stats.heap_bytes as f64 / (1024.0 * 1024.0),
            build_ms = started.elapsed().as_secs_f64() * 1000.0,
            backend = store.backend(),
            "revocation view built"
        );
        let cookie_name = cookie::name(config.server.secure);
        let key_file = config
            .session
            .key_override
            .is_none()
            .then(|| config.session.key_file.clone());
        let keys = Keys {
            modified: Mutex::new(key_file.as_ref().and_then(modified)),
            ring: RwLock::new(Arc::new(ring)),
            file: key_file,
        };
        let max_grant = config
            .routes
            .iter()
            .filter_map(|r| {
                r.media
                    .as_ref()
                    .map(|m| m.grant_lifetime)
                    .or(r.plex.as_ref().map(|p| p.session_lifetime))
            })
            .max()
            .unwrap_or(crate::config::DEFAULT_GRANT_LIFETIME);
        let app = App {
            media: crate::mediaserver::MediaState::new(max_grant),
            media_client: crate::mediaserver::upstream::MediaClient::new(),
            plex: crate::mediaserver::plex::PlexState::default(),
            plex_tv: crate::mediaserver::plex::tv::PlexTv::new()
                .map_err(|e| tracing::error!(error = %e, "plex.tv client unavailable"))
                .ok(),
            oidc,
            throttle: Throttle::new(&config.auth),
            config: ArcSwap::from_pointee(config),
            store,
            view,
            keys,
            secrets,
            hasher,
            metrics,
            cookie_name,
            pending_tries: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(PENDING_TTL_SECS as u64 + 60))
                .build(),
            sso_admin_grants: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(PENDING_TTL_SECS as u64 + 60))
                .build(),
            ambiguous_audited: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            passkey_starts: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(passkey::CEREMONY_TTL)
                .build(),
            failures_in_flight: Mutex::new(FailuresInFlight::default()),
            last_failure_stamp: AtomicI64::new(0),
            failure_landed: tokio::sync::Notify::new(),
            last_seen_written: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_millis(LAST_SEEN_EVERY_MS as u64 * 2))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            last_seen_pending: Mutex::new(Vec::new()),
            media_loop_started: std::sync::atomic::AtomicBool::new(false),
            readiness: crate::readiness::Readiness::default(),
            directory,
            directory_status: directory::DirectoryStatus::default(),
            acme,
            mailer,
            webhooks,
            outbox_wake: tokio::sync::Notify::new(),
            mail_limits: email::MailLimits::default(),
        };
        app.metrics.config_loaded.set(now_ms() as f64 / 1000.0);
        app.refresh_view_metrics();
        Ok(Arc::new(app))
    }

    /// The configuration in force now. A request or operation takes it once and uses that
    /// snapshot throughout, so a reload never changes it halfway.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Puts a reloaded configuration (already validated and merged by
    /// `config::live::prepare`) in force for every request from now on: counters for new
    /// routes, the throttling limits, and the media loop when the first media route appears.
    pub fn apply_config(self: &Arc<Self>, config: Config) {
        let names: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        self.metrics.ensure_routes(&names);
        self.metrics.register_rules(&rule_names(&config));
        self.throttle.set_limits(&config.auth);
        self.config.store(Arc::new(config));
        self.metrics.config_loaded.set(now_ms() as f64 / 1000.0);
        self.start_media_loop();
    }

    /// Starts the media loop (owed upstream logouts, idle media tokens) once a media route is
    /// configured; at most once per process. Call from inside the control runtime.
    pub fn start_media_loop(self: &Arc<Self>) {
        let config = self.config();
        if !config
            .routes
            .iter()
            .any(|r| r.media.is_some() || r.plex.is_some())
        {
            return;
        }
        if self
            .media_loop_started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        tokio::spawn(self.clone().run_media_loop());
        tokio::spawn(self.clone().run_plex_loop());
    }

    /// The current keyring.
    pub fn keyring(&self) -> Arc<Keyring> {
        match self.keys.ring.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reloads the key file if it changed since it was last read.
    pub fn reload_keys_if_changed(&self) {
        let Some(path) = &self.keys.file else { return };
        let now = modified(path);
        let mut last = match self.keys.modified.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if now.is_none() || now == *last {
            return;
        }
        let config = self.config();
        match Keyring::load(&config.session, &config.server.public_url, false) {
            Ok(ring) => {
                tracing::info!(kids = ?ring.kids(), "session keys reloaded");
                match self.keys.ring.write() {
                    Ok(mut k) => *k = Arc::new(ring),
                    Err(p) => *p.into_inner() = Arc::new(ring),
                }
                *last = now;
            }
            Err(e) => tracing::error!(error = %e, "session key file changed but cannot be loaded"),
        }
    }

    pub(crate) fn store_error(&self, operation: &str, e: StoreError) -> StoreError {
        self.metrics
            .counter(crate::metrics::Family::StoreErrors, &[operation])
            .inc();
        tracing::warn!(operation, error = %e, "store operation failed");
        e
    }

    /// The answer to an ACME challenge (`http-01:TOKEN`, `tls-alpn-01:NAME`): this process's own,
    /// else one another replica published in the store (the CA may reach any replica).
    pub async fn acme_answer(&self, id: &str) -> Option<String> {
        let shared = self.acme.as_ref()?;
        if let Some(proof) = shared.answer(id) {
            return Some(proof);
        }
        match self.store.challenge(id, now_ms()).await {
            Ok(p) => p,
            Err(e) => {
                self.store_error("acme", e);
                None
            }
        }
    }

    /// Records a security event in the audit log and as a structured log line.
    pub async fn audit(&self, entry: AuditEntry) {
        self.audit_with(entry, Vec::new()).await
    }

    /// `audit`, with more messages (mail, webhooks) written in the same transaction.
    pub async fn audit_with(&self, entry: AuditEntry, more: Vec<store::NewOutbox>) {
        // The notice that tells the user of it goes into the outbox in the same write.
        let mut notices = self.notices_of(&entry).await;
        notices.extend(more);
        log_audit(&entry);
        match self.store.append_audit_with(&entry, &notices).await {
            Ok(()) if !notices.is_empty() => self.outbox_wake.notify_one(),
            Ok(()) => {}
            Err(e) => {
                self.store_error("append_audit", e);
            }
        }
    }

    /// Makes a change through a store that writes `entry` and the notices of it in the same
    /// transaction as the change, so that a change the user must hear of is never stored
    /// without its notice. Nothing is audited when the change fails or finds nothing to do.
    pub async fn audited<T, F, Fut>(&self, entry: AuditEntry, change: F) -> StoreResult<T>
    where
        F: FnOnce(DynStore) -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        self.audited_with(entry, Vec::new(), change).await
    }

    /// `audited`, with more messages written beside the entry's own notices.
    pub async fn audited_with<T, F, Fut>(
        &self,
        entry: AuditEntry,
        more: Vec<store::NewOutbox>,
        change: F,
    ) -> StoreResult<T>
    where
        F: FnOnce(DynStore) -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let mut outbox = self.notices_of(&entry).await;
        outbox.extend(more);
        let notify = !outbox.is_empty();
        let store = self.store.recording(store::Record {
            entry: entry.clone(),
            outbox,
        });
        let done = change(store).await?;
        log_audit(&entry);
        if notify {
            self.outbox_wake.notify_one();
        }
        Ok(done)
    }

    /// The mail notice and webhook messages that tell of an audited event.
    async fn notices_of(&self, entry: &AuditEntry) -> Vec<store::NewOutbox> {
        let mut notices = Vec::new();
        if let (Some(id), Some(kind)) = (
            entry.user_id,
            outbox::notice_kind(&entry.event, &entry.outcome),
        ) {
            if let Ok(user) = self.store.find_user_by_id(id).await {
                if self.mailer.is_some() {
                    notices.extend(outbox::notice_for(entry, user.as_ref()));
                }
                notices.extend(self.webhook_messages(kind, user.as_ref(), entry));
            }
        }
        notices
    }

    /// Audits a request refused for carrying one of the gateway's cookies (`names`) more than
    /// once: the first such request from an address in a minute (the counter of refused
    /// requests counts them all).
    pub async fn audit_ambiguous(&self, client: &ClientInfo, names: &[&str]) {
        if !self
            .ambiguous_audited
            .entry(client.ip.clone())
            .or_insert(())
            .is_fresh()
        {
            return;
        }
        let mut entry = self.audit_entry("credentials", "ambiguous_credentials", None, client);
        entry.detail = format!("cookies sent more than once: {}", names.join(", "));
        self.audit(entry).await;
    }

    /// An audit entry for a user and client, stamped now.
    pub fn audit_entry(
        &self,
        event: &str,
        outcome: &str,
        user: Option<(i64, &str)>,
        client: &ClientInfo,
    ) -> AuditEntry {
        AuditEntry {
            at_ms: now_ms(),
            event: event.to_string(),
            outcome: outcome.to_string(),
            user_id: user.map(|u| u.0),
            user_name: user.map(|u| u.1.to_string()).unwrap_or_default(),
            ip: client.ip.clone(),
            user_agent: truncate(&client.user_agent, 256),
            ..AuditEntry::default()
        }
    }

    /// Counts a failed password or code against the account and the client's address.
    pub(crate) async fn record_failure(
        &self,
        user: Option<&User>,
        name: &str,
        client: &ClientInfo,
    ) {
        self.count_failure_in_memory(user, name, client);
        self.record_account_failure(user, client).await;
    }

    /// Counts a failed login against the client address (and an unknown name) at once: the
    /// next attempt, even one already on its way, sees it.
    fn count_failure_in_memory(&self, user: Option<&User>, name: &str, client: &ClientInfo) {
        let now = now_ms();
        self.throttle.ip_failed(client.ip_addr(), now);
        if user.is_none() {
            self.throttle.unknown_failed(name, now);
        }
    }

    /// The time of a failed login as the store keeps it (`last_failure_ms`): the clock, made
    /// unique and rising, so that an account row tells which failures it already holds.
    fn failure_stamp(&self) -> i64 {
        let now = now_ms();
        let last = self
            .last_failure_stamp
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        if last < now {
            return now;
        }
        self.last_failure_stamp
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, FailuresInFlight> {
        self.failures_in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A failed login of `user_id` on its way to the store: its stamp.
    fn failure_sent(&self, user_id: i64) -> i64 {
        let stamp = self.failure_stamp();
        self.in_flight()
            .stamps
            .entry(user_id)
            .or_default()
            .push(stamp);
        stamp
    }

    /// The failure `stamp` of `user_id` has reached the store (or failed to).
    fn failure_landed(&self, user_id: i64, stamp: i64) {
        let mut in_flight = self.in_flight();
        if let Some(stamps) = in_flight.stamps.get_mut(&user_id) {
            stamps.retain(|s| *s != stamp);
            if stamps.is_empty() {
                in_flight.stamps.remove(&user_id);
            }
        }
        in_flight.landed += 1;
        drop(in_flight);
        self.failure_landed.notify_waiters();
    }

    /// Taken before an account row is read for [`App::account_gate`].
    pub(crate) fn failures_mark(&self) -> FailuresMark {
        FailuresMark(self.in_flight().landed)
    }

    /// Waits, a second at most, until no failed login of `user_id` is on its way to the store,
    /// so that a success can clear them all: true when one was.
    async fn settle_failures(&self, user_id: i64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut had = false;
        loop {
            let landed = self.failure_landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if !self.in_flight().stamps.contains_key(&user_id) {
                return had;
            }
            had = true;
            if tokio::time::timeout_at(deadline, landed).await.is_err() {
                return had;
            }
        }
    }

    /// The gate of a known account — for every way in (gateway and media logins, the second
    /// factor, the current password on the account page): its failures in the store, plus
    /// those still on their way there (each one just now). A failure counts once: the row
    /// holds every failure stamped up to its `last_failure_ms` (the store keeps the latest).
    ///
    /// `u` was read after `mark` was taken. A failure that reached the store after that read
    /// is in neither the row nor the failures on their way, so when any failure landed since
    /// `mark` the row is read again (a few times at most, while failures keep landing). Were
    /// it not, one attempt more than `max_failures` could get through before the lock.
    pub(crate) async fn account_gate(
        &self,
        u: &User,
        mark: FailuresMark,
        now: i64,
    ) -> Result<Gate, StoreError> {
        let mut mark = mark;
        let mut row = std::borrow::Cow::Borrowed(u);
        let mut rereads = 0;
        loop {
            let (gate, landed) = self.gate_with_in_flight(&row, now);
            if landed == mark || rereads == GATE_REREADS {
                return Ok(gate);
            }
            mark = landed;
            rereads += 1;
            match self.store.find_user_by_id(u.id).await? {
                Some(fresh) => row = std::borrow::Cow::Owned(fresh),
                // Deleted meanwhile: whatever signs in next finds no account.
                None => return Ok(gate),
            }
        }
    }

    /// [`App::account_gate`] on the row `u` as read, and how many failures had landed when the
    /// failures on their way were counted.
    fn gate_with_in_flight(&self, u: &User, now: i64) -> (Gate, FailuresMark) {
        let (in_flight, landed) = {
            let in_flight = self.in_flight();
            let held = in_flight.stamps.get(&u.id).map_or(0, |stamps| {
                stamps
                    .iter()
                    .filter(|s| u.last_failure_ms.is_none_or(|held| **s > held))
                    .count() as i64
            });
            (held, FailuresMark(in_flight.landed))
        };
        if in_flight == 0 {
            let gate = account_gate(u.failed_logins, u.last_failure_ms, u.locked_until_ms, now);
            return (gate, landed);
        }
        if let Some(until) = u.locked_until_ms.filter(|t| *t > now) {
            return (
                Gate::Locked(Duration::from_millis((until - now) as u64)),
                landed,
            );
        }
        // A lock that ran out starts the count afresh, as the store does.
        let stored = if u.locked_until_ms.is_some() {
            0
        } else {
            u.failed_logins
        };
        let failures = stored + in_flight;
        let auth = &self.config().auth;
        if failures >= i64::from(auth.max_failures) {
            return (Gate::Locked(auth.lockout), landed);
        }
        (account_gate(failures, Some(now), None, now), landed)
    }

    /// Counts a failed login against a known account in the store, and audits a new lockout.
    async fn record_account_failure(&self, user: Option<&User>, client: &ClientInfo) {
        let Some(u) = user else { return };
        let stamp = self.failure_sent(u.id);
        self.land_account_failure(u, client, stamp).await;
    }

    /// Writes the failed login `stamp` (sent with [`App::failure_sent`]) to the store, and
    /// audits a new lockout.
    async fn land_account_failure(&self, u: &User, client: &ClientInfo, stamp: i64) {
        let result = self
            .store
            .record_failure(
                u.id,
                stamp,
                self.config().auth.max_failures,
                self.config().auth.lockout.as_millis() as i64,
            )
            .await;
        self.failure_landed(u.id, stamp);
        match result {
            Ok(after) => {
                let newly_locked = after.locked_until_ms.is_some_and(|t| t > stamp)
                    && u.locked_until_ms.is_none_or(|t| t <= stamp);
                if newly_locked {
                    self.metrics.lockouts.inc();
                    let mut e =
                        self.audit_entry("lockout", "locked", Some((u.id, &u.name)), client);
                    e.detail = format!("{} consecutive failures", after.failed_logins);
                    self.audit(e).await;
                }
            }
            Err(e) => {
                self.store_error("record_failure", e);
            }
        }
    }

    /// Counts a wrong password (or an unknown name): the in-memory counters at once, the
    /// store's account counter and the audit off the response path, so that a known and an
    /// unknown name answer alike.
    fn password_failed(self: &Arc<Self>, user: Option<User>, name: &str, client: &ClientInfo) {
        self.count_failure_in_memory(user.as_ref(), name, client);
        let stamp = user.as_ref().map(|u| self.failure_sent(u.id));
        let this = Arc::clone(self);
        let client = client.clone();
        tokio::spawn(async move {
            if let (Some(u), Some(stamp)) = (&user, stamp) {
                this.land_account_failure(u, &client, stamp).await;
            }
            let who = user.as_ref().map(|u| (u.id, u.name.as_str()));
            let mut e = this.audit_entry("login", "failure", who, &client);
            e.detail = if user.is_some() {
                "wrong password".into()
            } else {
                "unknown user".into()
            };
            this.audit(e).await;
        });
    }

    /// Checks a user name and password, then walks the rest of the pipeline. With the JSON API
    /// `code` carries the second factor; forms get a pending step instead.
    pub async fn login(
        self: &Arc<Self>,
        name: &str,
        password: Secret,
        code: Option<&str>,
        channel: Channel,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginStep, LoginError> {
        let name = crate::auth::canonical_user_name(name);
        let name = name.as_str();
        let now = now_ms();
        if let Gate::Wait(d) | Gate::Locked(d) = self.throttle.ip_gate(client.ip_addr(), now) {
            self.audit(self.audit_entry("login", "throttled_ip", None, client))
                .await;
            return Err(LoginError::Throttled(d));
        }
        if name.is_empty()
            || name.len() > MAX_USERNAME_BYTES
            || password.expose().len() > MAX_PASSWORD_BYTES
        {
            // Same cost as any wrong password.
            self.hasher.verify(None, password).await;
            return Err(LoginError::InvalidCredentials);
        }
        let mark = self.failures_mark();
        let user = self
            .store
            .find_user(name)
            .await
            .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))?;
        let gate = match &user {
            Some(u) => self
                .account_gate(u, mark, now)
                .await
                .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))?,
            None => self.throttle.unknown_gate(name, now),
        };
        match gate {
            Gate::Open => {}
            Gate::Wait(d) => return Err(LoginError::Throttled(d)),
            Gate::Locked(_) => {
                let who = user.as_ref().map(|u| (u.id, u.name.as_str()));
                self.audit(self.audit_entry("login", "locked", who, client))
                    .await;
                return Err(LoginError::Locked);
            }
        }
        let user = if self.signs_in_through_directory(user.as_ref()) {
            match self
                .directory_password(name, user, &password, client)
                .await?
            {
                directory::PasswordCheck::Right(u) => u,
                directory::PasswordCheck::Wrong(user) => {
                    self.password_failed(user, name, client);
                    return Err(LoginError::InvalidCredentials);
                }
            }
        } else {
            let stored = user.as_ref().map(|u| u.password_hash.clone());
            if !self.hasher.verify(stored, password).await {
                self.password_failed(user, name, client);
                return Err(LoginError::InvalidCredentials);
            }
            let Some(user) = user else {
                return Err(LoginError::InvalidCredentials);
            };
            user
        };
        if user.disabled {
            self.audit(self.audit_entry("login", "disabled", Some((user.id, &user.name)), client))
                .await;
            return Err(LoginError::Disabled);
        }
        let passkeys = self.passkey_count(&user).await?;
        // Once a user who must use a passkey has one, their password alone opens nothing (until
        // then it lets them in to register one).
        if passkeys > 0 && self.passkey_required(&user) {
            self.audit(self.audit_entry(
                "login",
                "passkey_required",
                Some((user.id, &user.name)),
                client,
            ))
            .await;
            return Err(LoginError::PasskeyRequired);
        }
        let mut amr = vec!["pwd".to_string()];
        if user.totp_enabled {
            match (code, channel) {
                (Some(c), _) => {
                    self.check_second_factor(&user, c, client).await?;
                    amr.push("otp".into());
                }
                (None, Channel::Api) => return Err(LoginError::SecondFactorRequired),
                (None, Channel::Form) => {
                    return self.pending(&user, PendingStage::Totp, None, &amr);
                }
            }
        } else if passkeys > 0 {
            // A passkey is a second factor too: after the password, the step asks for it. An
            // API client cannot answer a passkey: it signs in with the passkey endpoints.
            return match channel {
                Channel::Form => self.pending(&user, PendingStage::Totp, None, &amr),
                Channel::Api => Err(LoginError::SecondFactorRequired),
            };
        }
        self.after_factors(&user, amr, channel, kind, client, None)
            .await
    }

    /// The steps after every factor was checked: 2FA enrolment if required, a new password if
    /// required (after a single sign-on too: a breach response or `require-reset` asks it of
    /// every way in), a passkey if one is required and none is registered, then the session. A single sign-on login records its provider session
    /// with the new session.
    async fn after_factors(
        &self,
        user: &User,
        amr: Vec<String>,
        channel: Channel,
        kind: SessionKind,
        client: &ClientInfo,
        sso: Option<sso::SsoLogin>,
    ) -> Result<LoginStep, LoginError> {
        let passkeys = self.passkey_count(user).await?;
        // A user who must register a passkey gets their second factor from it.
        let must_add_passkey = passkeys == 0 && self.passkey_required(user);
        let must_enroll = !user.totp_enabled
            && match self.config().auth.require_2fa {
                Require2fa::Off => false,
                Require2fa::Admins => user.is_admin,
                Require2fa::All => true,
            }
            && passkeys == 0
            && !must_add_passkey;
        if must_enroll {
            return match channel {
                Channel::Api => Err(LoginError::EnrollmentRequired),
                Channel::Form => self.pending(user, PendingStage::Enroll, sso.as_ref(), &amr),
            };
        }
        // A directory user's password is the directory's to change.
        if user.must_reset && user.directory_dn.is_none() {
            return match channel {
                Channel::Api => Err(LoginError::PasswordResetRequired),
                Channel::Form => self.pending(user, PendingStage::Password, sso.as_ref(), &amr),
            };
        }
        if must_add_passkey {
            return match channel {
                Channel::Api => Err(LoginError::PasskeyRequired),
                Channel::Form => self.pending(user, PendingStage::Passkey, sso.as_ref(), &amr),
            };
        }
        let had_failures_in_flight = self.settle_failures(user.id).await;
        if had_failures_in_flight || user.failed_logins != 0 || user.locked_until_ms.is_some() {
            self.store
                .clear_failures(user.id)
                .await
                .map_err(|e| self.store_error("clear_failures", e))?;
        }
        let ok = self
            .open_session(user, amr, kind, client, sso.as_ref())
            .await?;
        Ok(LoginStep::Session(ok))
    }

    /// Creates the session of a login that owes nothing more, completes what a single sign-on
    /// brings with it (provider session, admin by claim), and audits the login.
    async fn open_session(
        &self,
        user: &User,
        amr: Vec<String>,
        kind: SessionKind,
        client: &ClientInfo,
        sso: Option<&sso::SsoLogin>,
    ) -> Result<LoginOk, LoginError> {
        let ok = self.create_session(user, amr.clone(), kind, client).await?;
        let event = match sso {
            Some(s) => {
                self.finish_sso_session(user, &ok, s, &amr, client).await?;
                "sso_login"
            }
            None => "login",
        };
        let mut e = self.audit_entry(event, "success", Some((user.id, &user.name)), client);
        e.session_id = ok.session_id.to_string();
        if let Some(s) = sso {
            e.detail = format!("provider {}", s.pending.provider);
        }
        self.audit(e).await;
        Ok(ok)
    }

    /// Whether the user has a second factor (TOTP or a passkey): a password alone is then
    /// never enough, for a login, a media app or a Quick Connect approval.
    pub async fn has_second_factor(&self, user: &User) -> Result<bool, StoreError> {
        Ok(user.totp_enabled || !self.store.passkeys_of(user.id).await?.is_empty())
    }

    /// How many passkeys the user has (each is a second factor).
    async fn passkey_count(&self, user: &User) -> Result<usize, LoginError> {
        self.store
            .passkeys_of(user.id)
            .await
            .map(|p| p.len())
            .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))
    }

    fn pending(
        &self,
        user: &User,
        stage: PendingStage,
        sso: Option<&sso::SsoLogin>,
        amr: &[String],
    ) -> Result<LoginStep, LoginError> {
        let now = now_ms() / 1000;
        let ring = self.keyring();
        let claims = PendingClaims {
            iss: ring.issuer().to_string(),
            aud: ring.audience().to_string(),
            sub: user.id.to_string(),
            name: user.name.clone(),
            stage: stage.as_str().to_string(),
            jti: hex::encode(rand::random::<[u8; 16]>()),
            iat: now,
            nbf: now,
            exp: now + PENDING_TTL_SECS,
            sso: sso.map(|s| s.pending.clone()),
            amr: amr.to_vec(),
        };
        let token = ring
            .issue_typed(PENDING_TYP, &claims)
            .map_err(|_| LoginError::Internal)?;
        if sso.is_some_and(|s| s.grant_admin) {
            self.sso_admin_grants.insert(claims.jti.clone(), ());
        }
        Ok(LoginStep::Pending { token, stage })
    }

    /// The single sign-on login a pending login carries, if any.
    pub(crate) fn resumed_sso(&self, claims: &PendingClaims) -> Option<sso::SsoLogin> {
        let grant_admin = self.sso_admin_grants.contains_key(&claims.jti);
        claims
            .sso
            .clone()
            .map(|p| sso::SsoLogin::resumed(p, grant_admin))
    }

    /// Reads a pending-login token for `stage` and loads its user.
    pub async fn pending_user(
        &self,
        token: &str,
        stage: PendingStage,
    ) -> Result<(PendingClaims, User), LoginError> {
        let ring = self.keyring();
        let (claims, _) = ring
            .verify_typed::<PendingClaims>(PENDING_TYP, token, now_ms() / 1000)
            .map_err(|_| LoginError::RestartLogin)?;
        if PendingStage::parse(&claims.stage) != Some(stage) {
            return Err(LoginError::RestartLogin);
        }
        let id: i64 = claims.sub.parse().map_err(|_| LoginError::RestartLogin)?;
        let user = self
            .store
            .find_user_by_id(id)
            .await
            .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))?
            .ok_or(LoginError::RestartLogin)?;
        if user.disabled {
            return Err(LoginError::Disabled);
        }
        // A pending login that finished its step (or ran out of tries) is spent.
        if self.pending_tries.get(&claims.jti).unwrap_or(0) >= PENDING_MAX_TRIES {
            return Err(LoginError::RestartLogin);
        }
        Ok((claims, user))
    }

    /// Marks a pending login as used, so its cookie cannot finish a step again (ATK-44: a
    /// pending login is single use). Held in this instance's memory for the token's lifetime.
    pub(crate) fn spend_pending(&self, jti: &str) {
        self.pending_tries
            .insert(jti.to_string(), PENDING_MAX_TRIES);
    }

    /// The second step of a form login: the TOTP or recovery code.
    pub async fn complete_second_factor(
        &self,
        pending_token: &str,
        code: &str,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginStep, LoginError> {
        let mark = self.failures_mark();
        let (claims, user) = self.pending_user(pending_token, PendingStage::Totp).await?;
        let tries = self.pending_tries.get(&claims.jti).unwrap_or(0);
        let gate = self
            .account_gate(&user, mark, now_ms())
            .await
            .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))?;
        match gate {
            Gate::Open => {}
            Gate::Wait(d) => return Err(LoginError::Throttled(d)),
            Gate::Locked(_) => return Err(LoginError::Locked),
        }
        if let Err(e) = self.check_second_factor(&user, code, client).await {
            self.pending_tries.insert(claims.jti.clone(), tries + 1);
            return Err(e);
        }
        self.spend_pending(&claims.jti);
        let first = if claims.sso.is_some() { "sso" } else { "pwd" };
        self.after_factors(
            &user,
            vec![first.into(), "otp".into()],
            Channel::Form,
            kind,
            client,
            self.resumed_sso(&claims),
        )
        .await
    }

    /// Checks a TOTP code (each time step accepted once) or a single-use recovery code.
    async fn check_second_factor(
        &self,
        user: &User,
        code: &str,
        client: &ClientInfo,
    ) -> Result<(), LoginError> {
        let now = now_ms();
        let (accepted, method) = if totp::looks_like_recovery_code(code) {
            let hash = totp::hash_recovery_code(code);
            let ok = self
                .store
                .use_recovery_code(user.id, &hash, now)
                .await
                .map_err(|e| LoginError::Unavailable(self.store_error("use_recovery_code", e)))?;
            (ok, "recovery_code")
        } else {
            let seed = user
                .totp_secret
                .as_deref()
                .ok_or(LoginError::Internal)
                .and_then(|s| {
                    self.secrets
                        .open(user.id, s)
                        .map_err(|_| LoginError::Internal)
                })?;
            let ok = match totp::matching_step(&seed, code, now / 1000) {
                Some(step) => self
                    .store
                    .accept_totp_step(user.id, step)
                    .await
                    .map_err(|e| LoginError::Unavailable(self.store_error("accept_totp", e)))?,
                None => false,
            };
            (ok, "totp")
        };
        self.metrics
            .counter(
                crate::metrics::Family::SecondFactor,
                &[method, if accepted { "success" } else { "failure" }],
            )
            .inc();
        let mut e = self.audit_entry(
            "second_factor",
            if accepted { "success" } else { "failure" },
            Some((user.id, &user.name)),
            client,
        );
        e.detail = method.to_string();
        self.audit(e).await;
        if accepted {
            Ok(())
        } else {
            self.record_failure(Some(user), &user.name, client).await;
            Err(LoginError::InvalidCode)
        }
    }

    /// Creates a session row and its token. The token is issued after every cutoff that
    /// applies to the user, so a fresh session never falls under one.
    pub async fn create_session(
        &self,
        user: &User,
        amr: Vec<String>,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginOk, LoginError> {
        let now = now_ms();
        let issued_ms = now.max(self.view.min_issue_ms(user.id));
        let ttl_ms = self.config().session.ttl.as_millis() as i64;
        let sid = SessionId::random();
        let session = NewSession {
            id: sid,
            user_id: user.id,
            kind,
            user_agent: truncate(&client.user_agent, 256),
            ip: client.ip.clone(),
            created_ms: issued_ms,
            expires_ms: issued_ms + ttl_ms,
        };
        self.store
            .create_session(&session)
            .await
            .map_err(|e| LoginError::Unavailable(self.store_error("create_session", e)))?;
        self.note_sign_in(user, client, &amr).await;
        let iat = issued_ms / 1000;
        let exp = (issued_ms + ttl_ms) / 1000;
        let ring = self.keyring();
        let claims = SessionClaims {
            iss: ring.issuer().to_string(),
            aud: ring.audience().to_string(),
            sub: user.id.to_string(),
            name: user.name.clone(),
            sid: sid.to_string(),
            iat,
            nbf: iat,
            exp,
            ims: issued_ms,
            amr,
        };
        let token = ring.issue(&claims).map_err(|_| LoginError::Internal)?;
        Ok(LoginOk {
            token,
            session_id: sid,
            expires_s: exp,
            user_name: user.name.clone(),
        })
    }

    /// Ends one session (logout, or an admin's revoke).
    pub async fn revoke_session(&self, sid: SessionId) -> Result<bool, StoreError> {
        let event = self
            .store
            .revoke_session(sid, now_ms())
            .await
            .map_err(|e| self.store_error("revoke_session", e))?;
        Ok(match event {
            Some(e) => {
                self.apply(&[e]);
                true
            }
            None => false,
        })
    }

    /// Signs out every device of a user, recording `entry` with it.
    pub async fn signout_user_id(&self, user_id: i64, entry: AuditEntry) -> Result<(), StoreError> {
        let event = self
            .audited(
                entry,
                |s| async move { s.signout_user(user_id, now_ms()).await },
            )
            .await
            .map_err(|e| self.store_error("signout_user", e))?;
        self.apply(&[event]);
        Ok(())
    }

    /// Applies events this process committed to its own view at once.
    pub fn apply(&self, events: &[SequencedEvent]) {
        for e in events {
            if let RevocationEvent::MediaNote { note, until_ms } = &e.event {
                self.apply_media_note(note, *until_ms);
            }
            self.view.apply_committed(e);
            if e.event.is_revocation() {
                self.metrics
                    .counter(crate::metrics::Family::Revocations, &[e.event.scope()])
                    .inc();
            }
        }
        if events.iter().any(|e| e.event.is_revocation()) {
            self.revocations_reached_view();
        }
        self.refresh_view_metrics();
    }

    /// New revocations are in the view, whether this process committed them or the store's
    /// sync brought them: the connections they end are closed now (not at the connection
    /// watch's next check), and media tokens may be owed an upstream logout.
    fn revocations_reached_view(&self) {
        self.media.connection_wake.notify_one();
        self.media.logout_wake.notify_one();
    }

    fn refresh_view_metrics(&self) {
        let stats = self.view.stats();
        self.metrics
            .view_revoked_sessions
            .set(stats.revoked_sessions as i64);
        self.metrics
            .view_user_cutoffs
            .set(stats.user_cutoffs as i64);
        self.metrics.view_sequence.set(stats.seq);
        self.metrics
            .view_media_tokens
            .set(stats.media_tokens as i64);
        self.metrics.view_bytes.set(stats.heap_bytes as i64);
    }

    /// Notes that a session was used; written in batches by the sync loop, at most once a
    /// minute per session. Called on the request path: memory only.
    pub fn touch(&self, sid: SessionId, now_ms: i64) {
        if self
            .last_seen_written
            .get(&sid.0)
            .is_some_and(|t| now_ms - t < LAST_SEEN_EVERY_MS)
        {
            return;
        }
        self.last_seen_written.insert(sid.0, now_ms);
        if let Ok(mut pending) = self.last_seen_pending.lock() {
            pending.push((sid, now_ms));
        }
    }

    async fn refresh_session_counts(&self) {
        match self.store.count_live_sessions(now_ms()).await {
            Ok(counts) => {
                for kind in [SessionKind::Web, SessionKind::Api, SessionKind::Media] {
                    let n = counts
                        .iter()
                        .find(|(k, _)| k == kind.as_str())
                        .map_or(0, |(_, n)| *n);
                    self.metrics.active_sessions(kind.as_str()).set(n);
                }
            }
            Err(e) => {
                self.store_error("count_sessions", e);
            }
        }
    }

    async fn flush_last_seen(&self) {
        let batch: Vec<(SessionId, i64)> = match self.last_seen_pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.store.touch_sessions(&batch).await {
            self.store_error("touch_sessions", e);
        }
    }

    /// Brings the view up to date with the store's event log once.
    pub async fn sync(&self) -> Result<revocation::SyncOutcome, StoreError> {
        self.sync_with(false).await
    }

    /// Brings the view up to date; with `full`, rebuilds it from a snapshot.
    async fn sync_with(&self, full: bool) -> Result<revocation::SyncOutcome, StoreError> {
        let result = if full {
            revocation::resync(&self.store, &self.view)
                .await
                .map(|()| revocation::SyncOutcome {
                    applied: 0,
                    resynced: true,
                    notes: Vec::new(),
                })
        } else {
            revocation::sync_once(&self.store, &self.view).await
        };
        match result {
            Ok(outcome) => {
                for (note, until_ms) in &outcome.notes {
                    self.apply_media_note(note, *until_ms);
                }
                if outcome.applied > 0 || outcome.resynced {
                    self.revocations_reached_view();
                }
                if outcome.resynced {
                    self.metrics.sync_resyncs.inc();
                    crate::release_free_memory();
                }
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                self.metrics.sync_last_success.set(unix);
                self.refresh_view_metrics();
                Ok(outcome)
            }
            Err(e) => {
                self.metrics.sync_errors.inc();
                self.view.record_sync_error(e.to_string());
                Err(self.store_error("sync", e))
            }
        }
    }

    /// The sync loop: a delta poll every `poll_interval` and at once when the store announces
    /// an event (PostgreSQL's NOTIFY), a full resync whenever the announcement connection was
    /// re-established (announcements may have been missed) or after a failed sync, key file
    /// reloads, batched last-seen writes, session counts, and sweeps of expired revocations and
    /// of the store.
    pub async fn run_sync_loop(self: Arc<Self>) {
        // Serving: find the single sign-on providers (retried in the background until they
        // answer; the gateway does not wait for them).
        self.oidc.spawn_discovery();
        // The directory sync and the outbox worker run beside this loop: a slow directory or
        // mail server never holds up the view.
        if self.directory.is_some() {
            tokio::spawn(Arc::clone(&self).run_directory_sync());
        }
        if self.mailer.is_some() || self.webhooks.is_some() {
            tokio::spawn(Arc::clone(&self).run_outbox());
        }
        let mut tick = tokio::time::interval(self.config().store.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut announcements = self.store.announcements();
        let mut generation = announcements.as_ref().map(|rx| rx.borrow().generation);
        let mut last_sweep = Instant::now();
        let mut last_flush = Instant::now();
        let mut last_purge = Instant::now();
        let mut last_release = Instant::now();
        let mut burst = BurstEnd::default();
        let mut last_count: Option<Instant> = None;
        let mut failed = false;
        loop {
            let announced = match announcements.as_mut() {
                Some(rx) => {
                    let changed = tokio::select! {
                        changed = rx.changed() => Some(changed.is_ok()),
                        _ = tick.tick() => None,
                    };
                    if changed == Some(false) {
                        // The store stopped announcing: poll from now on.
                        announcements = None;
                        self.metrics.push_connected.set(0);
                    }
                    changed == Some(true)
                }
                None => {
                    tick.tick().await;
                    false
                }
            };
            let mut full = failed;
            if announced {
                if let Some(rx) = announcements.as_ref() {
                    let a = *rx.borrow();
                    self.metrics.push_connected.set(i64::from(a.connected));
                    if generation != Some(a.generation) {
                        generation = Some(a.generation);
                        full = true;
                    }
                }
            }
            failed = self.sync_with(full).await.is_err();
            self.reload_keys_if_changed();
            if last_count.is_none_or(|t| t.elapsed() >= SESSION_COUNT_EVERY) {
                self.refresh_session_counts().await;
                last_count = Some(Instant::now());
            }
            if last_flush.elapsed() >= LAST_SEEN_FLUSH {
                self.flush_last_seen().await;
                last_flush = Instant::now();
            }
            if last_sweep.elapsed() >= SWEEP_INTERVAL {
                let swept = self.view.sweep(now_ms());
                if swept > 0 {
                    tracing::debug!(swept, "swept expired revocations");
                }
                last_sweep = Instant::now();
                self.refresh_view_metrics();
            }
            if last_purge.elapsed() >= PURGE_INTERVAL {
                self.purge().await;
                last_purge = Instant::now();
            }
            // One release pass, periodic or once a burst of connection ends is over; only the
            // periodic one judges argon2's spare working memory, by whole passes.
            let after_burst = burst.due(crate::connections_ended(), Instant::now());
            let periodic = last_release.elapsed() >= RELEASE_MEMORY_EVERY;
            if periodic || after_burst {
                burst.released();
                let started = Instant::now();
                let hash_memories = if periodic {
                    self.hasher.release_idle()
                } else {
                    0
                };
                // First the proxy threads' own heaps, then the purge of what they freed.
                let window = self.config().server.upstream_idle_timeout + TIDY_AFTER_POOL;
                let proxy_threads = if burst.threads_due(Instant::now(), window) {
                    crate::tidy_proxy_threads().await
                } else {
                    0
                };
                crate::release_free_memory();
                let took = started.elapsed();
                let usage = crate::allocator_usage();
                let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
                tracing::debug!(
                    took_ms = took.as_secs_f64() * 1000.0,
                    mimalloc_committed_mib = mib(usage.mimalloc_committed),
                    libc_in_use_mib = mib(usage.libc_in_use),
                    libc_free_mib = mib(usage.libc_free),
                    sqlite_in_use_mib = mib(usage.sqlite_in_use),
                    hash_memories,
                    proxy_threads,
                    after_burst,
                    "released free memory"
                );
                if periodic {
                    last_release = Instant::now();
                }
            }
        }
    }

    /// Deletes what can no longer matter from the store.
    pub async fn purge(&self) {
        let audit_keep = self.config().store.audit_retention.as_millis() as i64;
        match self
            .store
            .purge_expired(now_ms(), PURGE_KEEP_MS, audit_keep)
            .await
        {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "purged expired rows from the store"),
            Ok(_) => {}
            Err(e) => {
                self.store_error("purge", e);
            }
        }
    }

    /// Whether requests that need a session are refused because the view is too stale
    /// (`store.on_stale = "deny"`).
    pub fn refuses_when_stale(&self) -> bool {
        self.config().store.on_stale == crate::config::OnStale::Deny && !self.view_is_fresh().0
    }

    /// Whether the view is fresh enough to call the instance ready.
    pub fn view_is_fresh(&self) -> (bool, Option<Duration>) {
        let staleness = self.view.staleness(Instant::now());
        let fresh = staleness.is_some_and(|s| s <= self.config().store.max_staleness);
        (fresh, staleness)
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The structured log line of an audited event.
pub(crate) fn log_audit(entry: &AuditEntry) {
    tracing::info!(
        target: "portcullis::audit",
        event = %entry.event,
        outcome = %entry.outcome,
        user = %entry.user_name,
        ip = %entry.ip,
        session = %entry.session_id,
        detail = %entry.detail,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An app of its own on a fresh SQLite file in `dir` that locks an account after three
    /// failures, with the account alice.
    async fn app_with_alice(dir: &std::path::Path) -> (Arc<App>, User) {
        let d = dir.display();
        let text = format!(
            "[server]\ndata_dir = '{d}'\n[store]\nurl = 'sqlite://{d}/p.db'\n\
             [session]\nkey_file = '{d}/session.key'\n\
             [auth]\nmax_failures = 3\nlockout = '10m'\nsecrets_key_file = '{d}/secrets.key'\n\
             [[route]]\nname = 'media'\nupstream = '127.0.0.1:1'\n"
        );
        let env = crate::config::EnvOverrides::default();
        let config = Config::parse(&text, &dir.join("t.toml"), &env).unwrap();
        let app = App::open(config).await.unwrap();
        let alice = app
            .store
            .create_user("alice", "not-a-hash", false, now_ms())
            .await
            .unwrap();
        (app, alice)
    }

    /// The race the mark closes: a failed login reaches the store after the account row was
    /// read, so it is in neither the row nor the failures on their way. The gate reads the row
    /// again and sees the lock that failure set; without the mark it saw two failures, open.
    #[tokio::test]
    async fn a_failure_that_lands_between_the_row_read_and_the_gate_still_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (app, alice) = app_with_alice(dir.path()).await;
        let client = ClientInfo::default();
        for _ in 0..2 {
            app.record_account_failure(Some(&alice), &client).await;
        }
        let mark = app.failures_mark();
        let row = app.store.find_user("alice").await.unwrap().unwrap();
        assert_eq!(row.failed_logins, 2);
        let now = now_ms();
        assert_eq!(app.account_gate(&row, mark, now).await.unwrap(), Gate::Open);
        // The third failure lands (stored and no longer on its way) after the read.
        app.record_account_failure(Some(&alice), &client).await;
        assert!(app.in_flight().stamps.is_empty());
        assert!(
            matches!(app.account_gate(&row, mark, now).await, Ok(Gate::Locked(_))),
            "the third failure was not counted"
        );
        // The same row, taken as read after that landing, is trusted as it is: the re-read
        // above is what saw the lock.
        let later = app.failures_mark();
        assert_ne!(later, mark);
        assert_eq!(
            app.account_gate(&row, later, now).await.unwrap(),
            Gate::Open
        );
        // Failures still on their way count at once, without a read.
        app.store.clear_failures(alice.id).await.unwrap();
        let mark = app.failures_mark();
        let cleared = app.store.find_user("alice").await.unwrap().unwrap();
        assert_eq!(
            app.account_gate(&cleared, mark, now_ms()).await.unwrap(),
            Gate::Open
        );
        for _ in 0..3 {
            app.failure_sent(alice.id);
        }
        assert!(matches!(
            app.account_gate(&cleared, mark, now_ms()).await,
            Ok(Gate::Locked(_))
        ));
    }

    /// A burst's memory goes back once its ends have been quiet for `BURST_QUIET`, once; a
    /// trickle of ends, or a burst the periodic pass already dealt with, waits.
    #[test]
    fn memory_is_released_once_a_burst_of_connection_ends_is_over() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut burst = BurstEnd::default();
        assert!(!burst.due(0, at(0)), "nothing ended");
        // 10,000 ends over 2 s of ticks: never due while they go on.
        for tick in 1..=8u64 {
            assert!(!burst.due(tick * 1250, at(tick * 250)));
        }
        assert!(
            !burst.due(10_000, at(2000 + 1199)),
            "quiet for less than BURST_QUIET"
        );
        assert!(burst.due(10_000, at(2000 + 1200)));
        burst.released();
        assert!(!burst.due(10_000, at(5000)), "released once");
        // A trickle: fewer than BURST_ENDS since the release, however quiet.
        assert!(!burst.due(10_000 + BURST_ENDS - 1, at(6000)));
        assert!(!burst.due(10_000 + BURST_ENDS - 1, at(60_000)));
        // One more end makes it a burst; the periodic pass that runs first deals with it.
        assert!(!burst.due(10_000 + BURST_ENDS, at(61_000)));
        burst.released();
        assert!(!burst.due(10_000 + BURST_ENDS, at(63_000)));
    }

    #[test]
    fn proxy_threads_collect_on_each_pass_while_connection_ends_are_quiet_and_recent() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let window = Duration::from_secs(45);
        let mut burst = BurstEnd::default();
        assert!(!burst.due(0, at(0)));
        assert!(!burst.threads_due(at(5000), window), "nothing ended");
        // A single end is enough, once quiet, and a release does not change that.
        assert!(!burst.due(1, at(6000)));
        assert!(!burst.threads_due(at(6000 + 1199), window), "not quiet yet");
        burst.released();
        assert!(burst.threads_due(at(6000 + 1200), window));
        assert!(
            burst.threads_due(at(6000 + 45_000), window),
            "again, within the window"
        );
        assert!(
            !burst.threads_due(at(6000 + 45_001), window),
            "not after it"
        );
        // Ends going on: never due while they do.
        for tick in 1..=40u64 {
            assert!(!burst.due(1 + tick, at(60_000 + tick * 250)));
            assert!(!burst.threads_due(at(60_000 + tick * 250), window));
        }
        assert!(burst.threads_due(at(70_000 + 1200), window));
    }
}
