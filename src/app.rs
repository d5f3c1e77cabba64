//! The gateway's shared state (`App`) and the operations that change it: login, logout and
//! revocations. Every revocation is committed to the store first, then applied to this
//! process's view at once; other processes pick it up through the sync loop.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::password::{Hasher, PasswordError};
use crate::auth::token::{KeyError, Keyring, SessionClaims};
use crate::auth::{cookie, Identity};
use crate::config::{Config, Secret};
use crate::metrics::Metrics;
use crate::revocation::{self, RevocationView, SWEEP_INTERVAL};
use crate::store::{
    self, DynStore, NewSession, SequencedEvent, SessionId, SessionKind, StoreError,
};

/// Longest user name accepted at login, in bytes.
pub const MAX_USERNAME_BYTES: usize = 128;
/// Longest password accepted at login, in bytes (NIST asks for at least 64 characters).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Milliseconds since the Unix epoch.
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
    Password(#[from] PasswordError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Why a login did not produce a session.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong user name or password")]
    InvalidCredentials,
    #[error("this account is disabled")]
    Disabled,
    #[error("the account store is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("the session could not be signed")]
    Internal,
}

impl LoginError {
    pub fn label(&self) -> &'static str {
        match self {
            LoginError::InvalidCredentials => "invalid_credentials",
            LoginError::Disabled => "disabled",
            LoginError::Unavailable(_) => "store_unavailable",
            LoginError::Internal => "internal_error",
        }
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

/// Request details recorded with a new session.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub ip: String,
    pub user_agent: String,
}

pub struct App {
    pub config: Config,
    pub store: DynStore,
    pub view: RevocationView,
    pub keyring: Keyring,
    pub hasher: Hasher,
    pub metrics: Metrics,
    pub cookie_name: &'static str,
}

impl App {
    /// Opens the store, loads (or creates) the signing keys and builds the view from the store.
    pub async fn open(config: Config) -> Result<Arc<App>, StartError> {
        let store = store::open(config.store.url.expose(), config.store.busy_timeout).await?;
        let keyring = Keyring::load(&config.session, &config.server.public_url, true)?;
        let hasher = Hasher::new(&config.password)?;
        let names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
        let metrics = Metrics::new(&names, store.backend())?;
        let view = RevocationView::new();
        view.load(store.snapshot(now_ms()).await?, Instant::now());
        let cookie_name = cookie::name(config.server.secure);
        let app = App {
            config,
            store,
            view,
            keyring,
            hasher,
            metrics,
            cookie_name,
        };
        app.refresh_view_metrics();
        Ok(Arc::new(app))
    }

    fn store_error(&self, operation: &str, e: StoreError) -> StoreError {
        self.metrics
            .store_errors
            .with_label_values(&[operation])
            .inc();
        tracing::warn!(operation, error = %e, "store operation failed");
        e
    }

    /// Checks a user name and password and, if they are right, creates a session.
    pub async fn login(
        &self,
        name: &str,
        password: Secret,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginOk, LoginError> {
        let name = name.trim();
        if name.is_empty()
            || name.len() > MAX_USERNAME_BYTES
            || password.expose().len() > MAX_PASSWORD_BYTES
        {
            // Same cost as any wrong password.
            self.hasher.verify(None, password).await;
            return Err(LoginError::InvalidCredentials);
        }
        let user = self
            .store
            .find_user(name)
            .await
            .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))?;
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        if !self.hasher.verify(stored, password).await {
            return Err(LoginError::InvalidCredentials);
        }
        let Some(user) = user else {
            return Err(LoginError::InvalidCredentials);
        };
        if user.disabled {
            return Err(LoginError::Disabled);
        }
        let now = now_ms();
        // A token issued at a cutoff is dead; a new session is always issued after it.
        let issued_ms = now.max(self.view.min_issue_ms(user.id));
        let ttl_ms = self.config.session.ttl.as_millis() as i64;
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
        let iat = issued_ms / 1000;
        let exp = (issued_ms + ttl_ms) / 1000;
        let claims = SessionClaims {
            iss: self.keyring.issuer().to_string(),
            aud: self.keyring.audience().to_string(),
            sub: user.id.to_string(),
            name: user.name.clone(),
            sid: sid.to_string(),
            iat,
            nbf: iat,
            exp,
            ims: issued_ms,
            amr: vec!["pwd".to_string()],
        };
        let token = self
            .keyring
            .issue(&claims)
            .map_err(|_| LoginError::Internal)?;
        Ok(LoginOk {
            token,
            session_id: sid,
            expires_s: exp,
            user_name: user.name,
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

    /// Signs out every device of the identity's user.
    pub async fn signout_user(&self, identity: &Identity) -> Result<(), StoreError> {
        let event = self
            .store
            .signout_user(identity.user_id, now_ms())
            .await
            .map_err(|e| self.store_error("signout_user", e))?;
        self.apply(&[event]);
        Ok(())
    }

    /// Applies events this process committed to its own view at once.
    pub fn apply(&self, events: &[SequencedEvent]) {
        for e in events {
            self.view.apply_local(&e.event);
            self.metrics
                .revocations
                .with_label_values(&[e.event.scope()])
                .inc();
        }
        self.refresh_view_metrics();
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
    }

    /// Brings the view up to date with the store's event log once.
    pub async fn sync(&self) -> Result<usize, StoreError> {
        match revocation::sync_once(&self.store, &self.view).await {
            Ok(n) => {
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                self.metrics.sync_last_success.set(unix);
                self.refresh_view_metrics();
                Ok(n)
            }
            Err(e) => {
                self.metrics.sync_errors.inc();
                self.view.record_sync_error(e.to_string());
                Err(self.store_error("sync", e))
            }
        }
    }

    /// The sync loop: a delta poll every `poll_interval`, and a sweep of expired revocations.
    pub async fn run_sync_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.store.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep = Instant::now();
        loop {
            tick.tick().await;
            let _ = self.sync().await;
            if last_sweep.elapsed() >= SWEEP_INTERVAL {
                let swept = self.view.sweep(now_ms());
                if swept > 0 {
                    tracing::debug!(swept, "swept expired revocations");
                }
                last_sweep = Instant::now();
                self.refresh_view_metrics();
            }
        }
    }

    /// Whether the view is fresh enough to call the instance ready.
    pub fn view_is_fresh(&self) -> (bool, Option<Duration>) {
        let staleness = self.view.staleness(Instant::now());
        let fresh = staleness.is_some_and(|s| s <= self.config.store.max_staleness);
        (fresh, staleness)
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
