//! The durable store: users, sessions and the append-only revocation event log, behind the
//! `Store` trait, implemented once (`store::sql`) over the two SQL backends, whose differences
//! are one small `Dialect` each. SQLite (`store::sqlite`) is the embedded default; PostgreSQL
//! (`store::postgres`) is the store when several gateway replicas share one database, and adds
//! push announcements of committed events (LISTEN/NOTIFY). Event sequence numbers are gap-free and in commit order
//! in both, so a reader that has seen sequence N has seen every event before it. Every
//! revocation is committed as an event before the call returns, and the event is returned so the
//! caller can apply it to its in-memory view at once.

/// `sqlx::query(sql)` with `args` bound, in order, to `$1`, `$2`…
macro_rules! query {
    ($sql:expr; $($arg:expr),* $(,)?) => { sqlx::query($sql)$(.bind($arg))* };
}

/// `sqlx::query_as(sql)` with `args` bound, in order, to `$1`, `$2`…
macro_rules! query_as {
    ($sql:expr; $($arg:expr),* $(,)?) => { sqlx::query_as($sql)$(.bind($arg))* };
}

/// `sqlx::query_scalar(sql)` with `args` bound, in order, to `$1`, `$2`…
macro_rules! query_scalar {
    ($sql:expr; $($arg:expr),* $(,)?) => { sqlx::query_scalar($sql)$(.bind($arg))* };
}

mod dialect;
pub mod postgres;
mod sql;
pub mod sqlite;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

/// A 128-bit random session id, written as 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

impl SessionId {
    pub fn random() -> SessionId {
        SessionId(rand::random::<u128>())
    }

    /// Parses exactly 32 hex digits; anything else is `None`.
    pub fn parse(s: &str) -> Option<SessionId> {
        if s.len() != 32 {
            return None;
        }
        // By hand: `u128::from_str_radix` checks for overflow at every digit, and this runs on
        // every request.
        let mut n = 0u128;
        for b in s.bytes() {
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return None,
            };
            n = n << 4 | u128::from(digit);
        }
        Some(SessionId(n))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

#[derive(Clone, Debug, Default, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub password_hash: String,
    pub is_admin: bool,
    pub disabled: bool,
    pub created_ms: i64,
    /// The next login must choose a new password first.
    pub must_reset: bool,
    /// Consecutive failed logins.
    pub failed_logins: i64,
    pub locked_until_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    /// The TOTP secret, encrypted with the secrets key.
    pub totp_secret: Option<String>,
    pub totp_enabled: bool,
    pub totp_last_step: i64,
    /// Must sign in with a passkey (set by an administrator or a breach response).
    pub passkey_required: bool,
    /// The directory entry of a user from the LDAP directory (`None`: a local account).
    pub directory_dn: Option<String>,
    /// That entry's stable id (entryUUID, objectGUID), when the directory has one.
    pub directory_id: Option<String>,
    /// When the directory sync disabled the user (not an administrator).
    pub directory_disabled_ms: Option<i64>,
    /// The user's verified email address.
    pub email: Option<String>,
    pub email_verified_ms: Option<i64>,
    /// Has a password of their own (an account made by single sign-on has none until one is set).
    pub password_set: bool,
}

/// A message waiting in the outbox (mail, or a webhook's request).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct OutboxMessage {
    pub id: i64,
    pub created_ms: i64,
    /// `mail` or `webhook`.
    pub channel: String,
    /// What it tells of (a notice's kind, `password_reset`, `confirm_email`, `test` …).
    pub kind: String,
    pub user_id: Option<i64>,
    /// The recipient, when it is not the user's verified address (or a webhook's URL).
    pub address: Option<String>,
    /// JSON: what the message says. Never a secret.
    pub params: String,
    /// Attempts made so far.
    pub attempts: i64,
}

/// A message to put in the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewOutbox {
    pub channel: String,
    pub kind: String,
    pub user_id: Option<i64>,
    pub address: Option<String>,
    pub params: String,
}

/// How an attempt to send an outbox message ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboxOutcome {
    Sent,
    /// Failed for now: try again at `at_ms`.
    Retry {
        at_ms: i64,
        error: String,
    },
    /// Failed for good (refused by the server, or too old to retry).
    Failed {
        error: String,
    },
}

/// The outbox's backlog: messages not sent yet (nor given up), and when the oldest was queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    pub queued: i64,
    pub oldest_created_ms: Option<i64>,
}

/// What a sign-in's device and network were to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSeen {
    /// The user's first sign-in on record: nothing to compare with.
    First,
    Known,
    /// Not seen before for this user.
    New,
}

/// What following an email confirmation link did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmailConfirmation {
    /// The address is the user's now; `previous` was theirs before.
    Confirmed {
        user_id: i64,
        address: String,
        previous: Option<String>,
    },
    Used,
    Expired,
    Unknown,
}

/// A security event for the audit log. Never holds a secret.
#[derive(Clone, Debug, Default, serde::Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub event: String,
    pub outcome: String,
    pub user_id: Option<i64>,
    pub user_name: String,
    pub ip: String,
    pub user_agent: String,
    pub session_id: String,
    pub detail: String,
}

/// A certificate from an ACME certificate authority, as every replica reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCertificate {
    /// The names it is for, lowercase, comma-separated, in configuration order.
    pub names: String,
    /// The leaf and its intermediates, PEM.
    pub chain_pem: String,
    /// The private key (PEM), sealed with the secrets key.
    pub key_sealed: String,
    pub not_after_ms: i64,
    pub issued_ms: i64,
}

/// An audit entry and the messages that tell of it, written by a recording store
/// (`Store::recording`) in the transaction of the change they describe.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub entry: AuditEntry,
    pub outbox: Vec<NewOutbox>,
}

/// What a reset link's hash names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetLinkState {
    Valid { user_id: i64 },
    Used,
    Expired,
    Unknown,
}

/// How a session was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// A browser login through the form; the token lives in a cookie.
    Web,
    /// A login through the JSON API; the token is sent as a Bearer token.
    Api,
    /// A media-server (Jellyfin, Emby) token minted through the gateway and bound to a user.
    Media,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Web => "web",
            SessionKind::Api => "api",
            SessionKind::Media => "media",
        }
    }
    pub fn parse(s: &str) -> SessionKind {
        match s {
            "api" => SessionKind::Api,
            "media" => SessionKind::Media,
            _ => SessionKind::Web,
        }
    }
}

#[derive(Clone, Debug)]
pub struct NewSession {
    pub id: SessionId,
    pub user_id: i64,
    pub kind: SessionKind,
    pub user_agent: String,
    pub ip: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// A media-server token to bind: its session row and what is kept of the token.
#[derive(Clone, Debug)]
pub struct NewMediaBinding {
    pub session: NewSession,
    /// Hex of the token's keyed hash.
    pub token_hash: String,
    /// The token sealed under the secrets key, for the upstream logout only; empty when none
    /// is ever owed (Plex tokens: the gateway keeps nothing of them but the hash).
    pub token_sealed: String,
    pub route: String,
    pub media_user_id: String,
    pub media_user: String,
    pub device_id: String,
    pub client: String,
    pub device_name: String,
    pub version: String,
}

/// A media token whose session has ended and which is still owed an upstream logout.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct OwedLogout {
    pub sid: SessionId,
    pub route: String,
    pub token_sealed: String,
    pub client: String,
    pub device_name: String,
    pub device_id: String,
    pub version: String,
    pub attempts: i64,
}

/// A provider subject linked to a gateway user (single sign-on).
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct OidcLink {
    pub provider: String,
    /// The provider's issuer when the link was made; a login under another issuer (the same
    /// provider id reconfigured) does not find the link.
    pub issuer: String,
    pub subject: String,
    pub user_id: i64,
    pub created_ms: i64,
}

/// The provider session behind a gateway session created by an SSO login.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcSession {
    pub session_id: SessionId,
    pub provider: String,
    pub subject: String,
    /// The provider's session id (`sid` claim), when it sent one.
    pub oidc_sid: Option<String>,
    /// The ID token sealed under the secrets key (for `id_token_hint` at the provider's logout).
    pub id_token_sealed: String,
    /// The session's authentication methods (as in its token), carried to a session that
    /// replaces it on this device.
    pub amr: Vec<String>,
}

/// A validated back-channel logout token, as the store applies it.
#[derive(Clone, Debug)]
pub struct BackchannelLogout {
    pub provider: String,
    pub jti: String,
    /// The `jti` is remembered until then (after that, the token's `iat` is too old anyway).
    pub jti_expires_ms: i64,
    pub subject: Option<String>,
    pub oidc_sid: Option<String>,
    /// The provider's configured issuer: a subject-only logout finds only links made under it.
    pub issuer: String,
    /// With `oidc_sid`, the provider session is remembered as ended until then, so that a login
    /// through it still waiting at a gateway step cannot create a session afterwards.
    pub ended_until_ms: i64,
}

/// A Plex account the gateway has met (plex.tv's numeric id) and the gateway user it is linked
/// to, if any. No token is kept with it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct PlexAccount {
    pub account_id: String,
    pub username: String,
    pub title: String,
    pub user_id: Option<i64>,
    /// The linked gateway user's name.
    pub user_name: Option<String>,
    pub linked_ms: Option<i64>,
    /// A gateway user whose browser presented a token of this account with their session: the
    /// account page offers them the link.
    pub offered_user_id: Option<i64>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// A registered passkey (WebAuthn credential) of a user.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct PasskeyRecord {
    pub id: i64,
    pub user_id: i64,
    /// The credential id, base64url without padding.
    pub cred_id: String,
    /// The relying-party id it was registered for.
    pub rp_id: String,
    pub label: String,
    /// The authenticator model's AAGUID (empty when unknown).
    pub aaguid: String,
    /// webauthn-rs's credential (public key, counter, flags) as JSON.
    pub credential: String,
    pub counter: i64,
    pub created_ms: i64,
    pub last_used_ms: Option<i64>,
    /// When a signature counter that did not move forward was seen: a possibly copied credential.
    pub clone_warning_ms: Option<i64>,
}

/// A passkey to register.
#[derive(Clone, Debug)]
pub struct NewPasskey {
    pub user_id: i64,
    pub cred_id: String,
    pub rp_id: String,
    pub label: String,
    pub aaguid: String,
    pub credential: String,
    pub counter: i64,
    pub created_ms: i64,
    /// Whether the authenticator verified its user at registration (for the audit).
    pub user_verified: bool,
}

/// A WebAuthn ceremony in flight: webauthn-rs's state for one registration or sign-in, kept
/// server-side and taken back once.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Ceremony {
    pub id: String,
    /// `register`, `login` or `second_factor`.
    pub purpose: String,
    pub user_id: Option<i64>,
    pub state: String,
    pub expires_ms: i64,
}

/// A Plex app install (`X-Plex-Client-Identifier`) of one Plex account.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct PlexDevice {
    pub account_id: String,
    pub client_id: String,
    pub product: String,
    pub device_name: String,
    pub platform: String,
    pub ip: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// When its gateway user approved it (device approval); `None` while pending.
    pub approved_ms: Option<i64>,
}

/// The `media_user_id` under which the tokens of a Plex account are bound.
pub fn plex_media_user_id(account_id: &str) -> String {
    format!("plex:{account_id}")
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct SessionRecord {
    pub id: SessionId,
    pub user_id: i64,
    pub user_name: String,
    pub kind: SessionKind,
    pub user_agent: String,
    pub ip: String,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub expires_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// One revocation event, as applied to the in-memory view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevocationEvent {
    /// One session ended; remembered until the token would have expired anyway.
    SessionRevoked {
        sid: SessionId,
        user_id: i64,
        expires_ms: i64,
    },
    /// Every token of the user issued at or before `at_ms` is dead.
    UserCutoff {
        user_id: i64,
        at_ms: i64,
    },
    /// Every token issued at or before `at_ms` is dead.
    GlobalCutoff {
        at_ms: i64,
    },
    UserDisabled {
        user_id: i64,
    },
    UserEnabled {
        user_id: i64,
    },
    /// Every token signed with this key is dead (a breach response retired it).
    KeyRetired {
        kid: String,
    },
    /// A fact about a media route that every replica should know until `until_ms` (not a
    /// revocation): a playback grant, a Quick Connect code, an approval.
    MediaNote {
        note: MediaNote,
        until_ms: i64,
    },
    /// A user's groups as they now are (`admins` for an administrator), for the access rules
    /// of every replica (not a revocation).
    GroupsChanged {
        user_id: i64,
        groups: Vec<String>,
    },
    /// A media-server token was bound to a user (not a revocation: it teaches every
    /// instance's view the token's keyed hash).
    MediaBound {
        sid: SessionId,
        user_id: i64,
        user_name: String,
        token_hash: String,
        issued_ms: i64,
        expires_ms: i64,
    },
}

impl RevocationEvent {
    /// The scope label used in metrics.
    pub fn scope(&self) -> &'static str {
        match self {
            RevocationEvent::SessionRevoked { .. } => "session",
            RevocationEvent::UserCutoff { .. } => "user",
            RevocationEvent::GlobalCutoff { .. } => "everyone",
            RevocationEvent::UserDisabled { .. } => "user_disabled",
            RevocationEvent::UserEnabled { .. } => "user_enabled",
            RevocationEvent::KeyRetired { .. } => "key_retired",
            RevocationEvent::MediaBound { .. } => "media_bound",
            RevocationEvent::MediaNote { .. } => "media_note",
            RevocationEvent::GroupsChanged { .. } => "groups_changed",
        }
    }

    /// Whether the event ends anything (a binding, a note or a group change does not).
    pub fn is_revocation(&self) -> bool {
        !matches!(
            self,
            RevocationEvent::MediaBound { .. }
                | RevocationEvent::MediaNote { .. }
                | RevocationEvent::GroupsChanged { .. }
        )
    }
}

/// Facts about media routes that one replica learns and every replica needs: a player on one
/// replica may fetch its stream through another, a TV may redeem its Quick Connect code on a
/// third. Routes are named, not numbered, so replicas agree. No secret is carried: a Quick
/// Connect secret travels as its SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub enum MediaNote {
    /// Credential-less requests for `item` from `ip` pass while this session lives.
    Grant {
        route: String,
        item: String,
        ip: String,
        sid: String,
        user_id: i64,
        user_name: String,
        issued_ms: i64,
        token_expires_s: i64,
    },
    /// A Quick Connect code was issued for the secret with this hash.
    QuickConnectIssued {
        route: String,
        secret_hash: String,
        code: String,
    },
    /// A Plex account was linked or a Plex device approved (by a page, the CLI or another
    /// replica): refusals of its tokens remembered a moment ago are forgotten.
    PlexChanged { account_id: String },
    /// A Quick Connect code was approved through the gateway by this user.
    QuickConnectApproved {
        route: String,
        code: String,
        user_id: i64,
        is_admin: bool,
    },
}

#[derive(Clone, Debug)]
pub struct SequencedEvent {
    pub seq: i64,
    pub event: RevocationEvent,
}

/// A revoked session in a snapshot: its id and when its token expires anyway (whole seconds,
/// rounded up). 20 bytes, so that a million of them fit in 20 MB.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevokedEntry {
    /// The session id's 128 bits, most significant first, so that arrays compare as numbers.
    id: [u32; 4],
    expires_s: u32,
}

impl RevokedEntry {
    pub fn new(sid: SessionId, expires_ms: i64) -> RevokedEntry {
        let x = sid.0;
        let expires_s = (expires_ms.max(0) as u64)
            .div_ceil(1000)
            .min(u64::from(u32::MAX)) as u32;
        RevokedEntry {
            id: [
                (x >> 96) as u32,
                (x >> 64) as u32,
                (x >> 32) as u32,
                x as u32,
            ],
            expires_s,
        }
    }

    /// The key under which a session id is looked up.
    pub fn key(sid: SessionId) -> [u32; 4] {
        RevokedEntry::new(sid, 0).id
    }

    pub fn id_key(&self) -> [u32; 4] {
        self.id
    }

    pub fn sid(&self) -> SessionId {
        let [a, b, c, d] = self.id.map(u128::from);
        SessionId(a << 96 | b << 64 | c << 32 | d)
    }

    pub fn expires_ms(&self) -> i64 {
        i64::from(self.expires_s) * 1000
    }

    /// Keeps the later expiry.
    pub fn extend_to(&mut self, expires_ms: i64) {
        let other = RevokedEntry::new(self.sid(), expires_ms);
        self.expires_s = self.expires_s.max(other.expires_s);
    }
}

impl fmt::Debug for RevokedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({:?}, {})", self.sid(), self.expires_ms())
    }
}

/// Revoked sessions travel from the store in text, not as a million decoded rows: SQLite
/// concatenates each window of this many sequence numbers into one string, PostgreSQL streams
/// them with `COPY … TO STDOUT`. Each record is 32 hex digits of session id followed by the
/// expiry in milliseconds (decimal, after an optional tab).
pub const REVOKED_WINDOW: i64 = 16 * 1024;

/// Parses revoked-session records separated by `sep` (see [`REVOKED_WINDOW`]) into `out`.
pub fn parse_revoked_records(text: &[u8], sep: u8, out: &mut Vec<RevokedEntry>) -> StoreResult<()> {
    let bad = || StoreError::Corrupt("a revoked-session record is malformed".to_string());
    for record in text.split(|b| *b == sep).filter(|r| !r.is_empty()) {
        if record.len() < 33 {
            return Err(bad());
        }
        let (id, exp) = record.split_at(32);
        let exp = exp.strip_prefix(b"\t").unwrap_or(exp);
        let id = std::str::from_utf8(id)
            .ok()
            .and_then(SessionId::parse)
            .ok_or_else(bad)?;
        let exp = std::str::from_utf8(exp)
            .ok()
            .and_then(|e| e.parse::<i64>().ok())
            .ok_or_else(bad)?;
        out.push(RevokedEntry::new(id, exp));
    }
    Ok(())
}

/// Reads a media note's JSON from the event log.
pub fn parse_note(detail: Option<&str>, seq: i64) -> StoreResult<MediaNote> {
    let detail = detail
        .ok_or_else(|| StoreError::Corrupt(format!("event {seq} (media_note) lacks detail")))?;
    serde_json::from_str(detail)
        .map_err(|e| StoreError::Corrupt(format!("event {seq} (media_note): {e}")))
}

/// Parses `a:b,c:d` pairs of integers (user cutoffs sent as one string).
pub fn parse_pairs(text: &str) -> StoreResult<Vec<(i64, i64)>> {
    let bad = || {
        StoreError::Corrupt(format!(
            "malformed pair list near `{}`",
            text.chars().take(40).collect::<String>()
        ))
    };
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p.split_once(':').ok_or_else(bad)?;
            Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
        })
        .collect()
}

/// Everything the revocation view needs, read in one consistent transaction.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The highest event sequence number the snapshot includes.
    pub seq: i64,
    pub revoked: Vec<RevokedEntry>,
    pub user_cutoffs: Vec<(i64, i64)>,
    pub global_cutoff: Option<i64>,
    pub disabled_users: Vec<i64>,
    pub retired_keys: Vec<String>,
    /// Bound media tokens whose sessions have not expired (revoked ones included, so that
    /// the view can say why they are refused).
    pub media_tokens: Vec<MediaTokenRow>,
    /// Every user's groups (`admins` for administrators), as (user id, group) pairs.
    pub groups: Vec<(i64, String)>,
}

/// A bound media token as the view holds it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct MediaTokenRow {
    pub token_hash: String,
    pub sid: SessionId,
    pub user_id: i64,
    pub user_name: String,
    pub issued_ms: i64,
    pub expires_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("the store could not be opened at {path}: {message}")]
    Open { path: String, message: String },
    #[error("schema migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    #[error("this store was written by a newer Portcullis (schema {found}, this binary knows up to {known}): upgrade the binary or restore a backup")]
    NewerSchema { found: i64, known: i64 },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} was not found")]
    NotFound(String),
    #[error("the store holds an invalid value: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A value that cannot be read as its type (a malformed session id) is `Corrupt`; every other
/// database error means the store is unavailable.
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        match e {
            sqlx::Error::ColumnDecode { .. } => StoreError::Corrupt(e.to_string()),
            e => StoreError::Unavailable(e),
        }
    }
}

/// Names a failed migration: a store whose applied migrations go past the newest this binary
/// knows (sqlx reports one it does not know as `VersionMissing`) was written by a newer
/// Portcullis, and the binary refuses it rather than run on a schema it does not understand.
pub fn migrate_error(
    e: sqlx::migrate::MigrateError,
    applied: Option<i64>,
    known: i64,
) -> StoreError {
    match (&e, applied) {
        (sqlx::migrate::MigrateError::VersionMissing(_), Some(found)) if found > known => {
            StoreError::NewerSchema { found, known }
        }
        _ => StoreError::Migrate(e),
    }
}

/// The store's operations. Every method that changes revocation state commits an event and
/// returns it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A cheap round trip, for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;
    /// Short name of the backend, e.g. `sqlite`.
    fn backend(&self) -> &'static str;

    async fn user_count(&self) -> StoreResult<i64>;
    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        is_admin: bool,
        now_ms: i64,
    ) -> StoreResult<User>;
    /// Looks a user up by name, ignoring ASCII case.
    async fn find_user(&self, name: &str) -> StoreResult<Option<User>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    async fn find_user_by_id(&self, id: i64) -> StoreResult<Option<User>>;
    /// Marks an account as having no password of its own (made by single sign-on); any password
    /// set later clears the mark.
    async fn mark_password_unset(&self, user_id: i64) -> StoreResult<()>;
    /// Sets a password without signing anyone out (the CLI's `user passwd`).
    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()>;
    /// Disabling also cuts off every token the user holds, so enabling never revives them.
    async fn set_disabled(
        &self,
        user_id: i64,
        disabled: bool,
        now_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>>;

    async fn create_session(&self, session: &NewSession) -> StoreResult<()>;
    async fn get_session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>>;
    /// Sessions that are neither expired nor revoked at `now_ms`, optionally of one user.
    async fn list_live_sessions(
        &self,
        user_id: Option<i64>,
        now_ms: i64,
    ) -> StoreResult<Vec<SessionRecord>>;

    /// Live (unexpired, unrevoked) sessions counted by kind.
    async fn count_live_sessions(&self, now_ms: i64) -> StoreResult<Vec<(String, i64)>>;

    /// Ends one session. `Ok(None)` if no such session exists.
    async fn revoke_session(
        &self,
        id: SessionId,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>>;
    /// Ends every session of the user issued at or before `now_ms`.
    async fn signout_user(&self, user_id: i64, now_ms: i64) -> StoreResult<SequencedEvent>;
    /// Ends every session issued at or before `now_ms`.
    async fn signout_everyone(&self, now_ms: i64) -> StoreResult<SequencedEvent>;

    /// Counts a failed login at `now_ms`; locks the account once `max_failures` consecutive
    /// failures are reached. `last_failure_ms` keeps the latest time written, whatever the order
    /// of the writes. Returns the user as it now stands.
    async fn record_failure(
        &self,
        user_id: i64,
        now_ms: i64,
        max_failures: u32,
        lockout_ms: i64,
    ) -> StoreResult<User>;
    /// Clears failures and any lock (a successful login, or an admin's unlock).
    async fn clear_failures(&self, user_id: i64) -> StoreResult<()>;
    /// Sets or clears "must choose a new password" for one user, or for all when `None`.
    async fn set_must_reset(&self, user_id: Option<i64>, must: bool) -> StoreResult<u64>;
    /// A user's groups, `admins` first for an administrator.
    async fn groups_of(&self, user_id: i64) -> StoreResult<Vec<String>>;
    /// Every group with how many users are in it (`admins`: the administrators).
    async fn list_groups(&self) -> StoreResult<Vec<(String, i64)>>;
    /// Puts a user in a group or takes them out (`admins` is the administrator flag) and, in
    /// the same write, records the user's groups as they now are for every replica's view.
    /// `None` when nothing changed.
    async fn set_group(
        &self,
        user_id: i64,
        group: &str,
        member: bool,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>>;
    /// Records the directory entry (DN and stable id) a user comes from.
    async fn set_directory_entry(
        &self,
        user_id: i64,
        dn: &str,
        id: Option<&str>,
    ) -> StoreResult<()>;
    /// Disables a user for the directory's sake (ending every token, as `set_disabled`), unless
    /// already disabled; or enables one the directory disabled before `read_ms` (when the
    /// reading of the directory that lets them in again began), never one an administrator
    /// disabled. Returns the events (none when nothing changed).
    async fn set_directory_disabled(
        &self,
        user_id: i64,
        disabled: bool,
        now_ms: i64,
        read_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>>;
    /// The one user whose verified address is `address` (ignoring ASCII case); `None` when
    /// nobody's is, or more than one user's is.
    async fn find_user_by_email(&self, address: &str) -> StoreResult<Option<User>>;
    /// Sets (verified at `now_ms`) or clears a user's email address.
    async fn set_email(&self, user_id: i64, address: Option<&str>, now_ms: i64) -> StoreResult<()>;
    /// Stores a confirmation link for a new address (its hash only); the user's older unused
    /// links stop working.
    async fn create_email_confirmation(
        &self,
        token_hash: &str,
        user_id: i64,
        address: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()>;
    /// The user and the address a confirmation link names (used or not).
    async fn email_confirmation(&self, token_hash: &str) -> StoreResult<Option<(i64, String)>>;
    /// Uses a confirmation link: the address becomes the user's, in the same write.
    async fn confirm_email(&self, token_hash: &str, now_ms: i64) -> StoreResult<EmailConfirmation>;
    /// Appends an audit entry and, in the same transaction, the messages that tell of it.
    async fn append_audit_with(&self, e: &AuditEntry, outbox: &[NewOutbox]) -> StoreResult<()>;
    /// The same store, but the next transaction it commits also appends `record` (once): a
    /// change and its audit entry and notices are written together or not at all. A change
    /// that finds nothing to do commits nothing and so records nothing.
    fn recording(&self, record: Record) -> DynStore;
    /// Takes a lease on up to `limit` due messages for `owner` until `now_ms + lease_ms` and
    /// returns them: no other owner gets them while the lease runs.
    async fn claim_outbox(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<OutboxMessage>>;
    /// Records how an attempt ended; `false` when `owner` no longer held the lease (the
    /// outcome is then not recorded).
    async fn finish_outbox(
        &self,
        id: i64,
        owner: &str,
        outcome: &OutboxOutcome,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// How many messages of `kind` for the user were queued since `since_ms` (on every
    /// replica: the throttle of mail a visitor can cause).
    async fn count_outbox_since(&self, user_id: i64, kind: &str, since_ms: i64)
        -> StoreResult<i64>;
    /// The backlog of one channel.
    async fn outbox_stats(&self, channel: &str) -> StoreResult<OutboxStats>;
    /// The newest messages of the outbox (sent or not), newest first, for the CLI and tests.
    async fn list_outbox(
        &self,
        limit: i64,
    ) -> StoreResult<Vec<(OutboxMessage, Option<i64>, Option<i64>)>>;
    /// Takes the lease `name` for `owner` until `until_ms` when it is free (never taken, or run
    /// out by `now_ms`) or `owner`'s already; whether `owner` holds it now.
    async fn take_lease(
        &self,
        name: &str,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<bool>;
    /// Gives a lease back, if `owner` holds it.
    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<()>;
    /// Stores a certificate for its names, replacing one issued before it (never a newer one).
    async fn put_certificate(&self, c: &StoredCertificate) -> StoreResult<()>;
    /// The newest certificate for `names`.
    async fn certificate(&self, names: &str) -> StoreResult<Option<StoredCertificate>>;
    /// Publishes a challenge answer until `expires_ms` (answers that ran out are dropped).
    async fn put_challenge(
        &self,
        id: &str,
        proof: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()>;
    /// The answer to a challenge, if published and not run out.
    async fn challenge(&self, id: &str, now_ms: i64) -> StoreResult<Option<String>>;
    async fn drop_challenge(&self, id: &str) -> StoreResult<()>;
    /// Sets or clears "must sign in with a passkey" for one user, or for all when `None`.
    async fn set_passkey_required(&self, user_id: Option<i64>, required: bool) -> StoreResult<u64>;
    /// Sets a new password and clears `must_reset`; with `signout_at`, also ends every session
    /// of the user issued at or before it, in the same transaction.
    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        signout_at: Option<i64>,
    ) -> StoreResult<Option<SequencedEvent>>;

    /// Stores (or clears) the encrypted TOTP secret and whether 2FA is on.
    async fn set_totp(&self, user_id: i64, secret: Option<&str>, enabled: bool) -> StoreResult<()>;
    /// Accepts a TOTP time step only if it is later than every step accepted before.
    async fn accept_totp_step(&self, user_id: i64, step: i64) -> StoreResult<bool>;
    async fn replace_recovery_codes(&self, user_id: i64, hashes: &[String]) -> StoreResult<()>;
    /// Marks a recovery code used; false if it does not exist or was used.
    async fn use_recovery_code(&self, user_id: i64, hash: &str, now_ms: i64) -> StoreResult<bool>;
    async fn recovery_codes_left(&self, user_id: i64) -> StoreResult<i64>;

    /// Stores a new reset link for the user; any older unused link of theirs stops working
    /// (reads as `Used`), so only the newest link sent out can set a password.
    async fn create_reset_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()>;
    async fn reset_link_state(&self, token_hash: &str, now_ms: i64) -> StoreResult<ResetLinkState>;
    /// Stores a new one-time passkey link for the user (a reset link whose use registers a
    /// passkey); any older unused passkey link of theirs stops working.
    async fn create_passkey_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()>;
    async fn passkey_link_state(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> StoreResult<ResetLinkState>;
    /// Uses a passkey link once: registers the passkey (for the link's user only) and ends every
    /// session of the user, in one transaction. `Ok(None)` if the link is not valid any more
    /// or names another user; a credential id registered already is a `Conflict` and uses
    /// nothing.
    async fn redeem_passkey_link(
        &self,
        token_hash: &str,
        passkey: &NewPasskey,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>>;
    /// Uses a reset link once: sets the password, clears `must_reset` and, with `signout`, ends
    /// every session of the user, all in one transaction. `Ok(None)` if the link is not valid
    /// any more.
    async fn redeem_reset_link(
        &self,
        token_hash: &str,
        password_hash: &str,
        signout: bool,
        now_ms: i64,
    ) -> StoreResult<Option<(i64, Option<SequencedEvent>)>>;
    /// Stores a new "this wasn't me" link for the user (a new sign-in alert's); older unused
    /// ones of theirs stop working.
    async fn create_not_me_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()>;
    async fn not_me_link_state(&self, token_hash: &str, now_ms: i64)
        -> StoreResult<ResetLinkState>;
    /// Uses a "this wasn't me" link once: ends every session of the user and, with
    /// `password_hash`, sets a new password, in one transaction. `Ok(None)` if the link is not
    /// valid any more.
    async fn redeem_not_me_link(
        &self,
        token_hash: &str,
        password_hash: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Option<(i64, SequencedEvent)>>;
    /// Records a sign-in's device fingerprint for the user and says whether it is new. A
    /// recording store writes its record only with a device that is `New` (the alert of it).
    async fn note_device(
        &self,
        user_id: i64,
        fingerprint: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceSeen>;

    /// Records when sessions were last seen (written in batches, off the request path).
    async fn touch_sessions(&self, seen: &[(SessionId, i64)]) -> StoreResult<()>;

    /// Breach response, in one transaction: everyone signed out, every user must choose a new
    /// password (and, with `require_passkey`, register a passkey), and the given signing keys
    /// retired.
    async fn breach_response(
        &self,
        now_ms: i64,
        retired_keys: &[String],
        require_passkey: bool,
    ) -> StoreResult<Vec<SequencedEvent>>;

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    async fn list_audit(
        &self,
        user_id: Option<i64>,
        since_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEntry>>;

    /// Binds a media token in one transaction: a `media` session, the token's keyed hash and
    /// sealed copy, and the end of earlier bindings of the same route, media user and device
    /// (the media server deletes those itself). The `MediaBound` event comes first. A token
    /// that is bound already yields no events.
    async fn bind_media_token(&self, b: &NewMediaBinding) -> StoreResult<Vec<SequencedEvent>>;
    /// Media tokens whose session ended (revoked or expired) and whose upstream logout is
    /// owed and due at `now_ms`, oldest first.
    async fn owed_media_logouts(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<OwedLogout>>;
    /// Records that a media token is logged out upstream, erasing its sealed copy.
    async fn media_logout_done(&self, sid: SessionId, now_ms: i64) -> StoreResult<()>;
    /// Records a failed upstream logout; it is tried again at `next_ms`.
    async fn media_logout_failed(&self, sid: SessionId, next_ms: i64) -> StoreResult<()>;
    /// Ends the media sessions of a route last seen before `idle_before_ms`.
    async fn end_idle_media_sessions(
        &self,
        route: &str,
        idle_before_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>>;

    /// Appends a media note (see [`MediaNote`]) to the event log, kept until `until_ms`.
    async fn append_media_note(
        &self,
        note: &MediaNote,
        until_ms: i64,
        now_ms: i64,
    ) -> StoreResult<SequencedEvent>;

    /// Deletes what can no longer matter at `now_ms`: sessions expired longer than `keep_ms`
    /// ago (with their media tokens, unless an upstream logout is still owed), `session_revoked`
    /// events whose tokens have expired, spent reset links and old audit entries beyond
    /// `audit_keep_ms`. Returns the number of rows deleted. Deleting events leaves gaps in the
    /// sequence; a reader that finds one rebuilds its view from a snapshot.
    async fn purge_expired(
        &self,
        now_ms: i64,
        keep_ms: i64,
        audit_keep_ms: i64,
    ) -> StoreResult<u64>;

    /// Links a provider subject (under `issuer`) to a user. `Conflict` if the subject is linked
    /// already, or the user already has a link to this provider.
    async fn link_oidc(
        &self,
        provider: &str,
        issuer: &str,
        subject: &str,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// The user a provider subject is linked to, if the link was made under `issuer`.
    async fn find_oidc_link(
        &self,
        provider: &str,
        issuer: &str,
        subject: &str,
    ) -> StoreResult<Option<i64>>;
    /// The user's links, by provider.
    async fn oidc_links_of(&self, user_id: i64) -> StoreResult<Vec<OidcLink>>;
    /// Removes the user's link to a provider; false if there was none.
    async fn unlink_oidc(&self, provider: &str, user_id: i64) -> StoreResult<bool>;
    /// Removes every link of every user (the breach response: users link again). Returns how
    /// many there were.
    async fn unlink_all_oidc(&self) -> StoreResult<u64>;
    /// Records the provider session behind a gateway session (the session row exists), in one
    /// transaction with the check that a back-channel logout has not ended that provider
    /// session meanwhile: `Ok(false)` (nothing recorded) when it has.
    async fn record_oidc_session(&self, s: &OidcSession, now_ms: i64) -> StoreResult<bool>;
    async fn get_oidc_session(&self, session_id: SessionId) -> StoreResult<Option<OidcSession>>;
    /// Applies a back-channel logout in one transaction: remembers its `jti` (`Ok(None)` if it
    /// was seen before: a replay, nothing changed), then ends the gateway sessions of the
    /// provider session `oidc_sid` with the media sessions of their users and remembers that
    /// provider session as ended until `ended_until_ms`, or, with only a subject, every session
    /// of the user linked under `issuer`. Returns the events committed.
    async fn oidc_backchannel_logout(
        &self,
        l: &BackchannelLogout,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>>;

    /// The user's WebAuthn user handle; `candidate` becomes it if the user has none yet.
    async fn passkey_handle(&self, user_id: i64, candidate: &str) -> StoreResult<String>;
    /// The user a WebAuthn user handle belongs to.
    async fn passkey_user(&self, handle: &str) -> StoreResult<Option<i64>>;
    /// Registers a passkey; a credential id registered to anyone already is a `Conflict`.
    async fn add_passkey(&self, p: &NewPasskey) -> StoreResult<i64>;
    /// A passkey by its credential id (base64url).
    async fn find_passkey(&self, cred_id: &str) -> StoreResult<Option<PasskeyRecord>>;
    /// A user's passkeys, oldest first.
    async fn passkeys_of(&self, user_id: i64) -> StoreResult<Vec<PasskeyRecord>>;
    /// Records a sign-in with a passkey whose counter was `before` when it was read: stores the
    /// updated credential and counter, only if the counter moved forward since (or both are 0,
    /// for authenticators without a counter). `false`: it did not (a possible clone).
    async fn record_passkey_use(
        &self,
        id: i64,
        before: i64,
        credential: &str,
        counter: i64,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Flags a passkey whose counter did not move forward.
    async fn flag_passkey_clone(&self, id: i64, now_ms: i64) -> StoreResult<()>;
    /// Renames one of the user's passkeys; `false` if they have no such passkey.
    async fn rename_passkey(&self, user_id: i64, id: i64, label: &str) -> StoreResult<bool>;
    /// Removes one of the user's passkeys; `false` if they have no such passkey. With
    /// `keep_last`, their only passkey stays and the answer is a `Conflict`: the other passkeys
    /// are counted in the statement that deletes, under the writer lock, so two removals at once
    /// cannot both pass.
    async fn remove_passkey(&self, user_id: i64, id: i64, keep_last: bool) -> StoreResult<bool>;
    /// The relying-party ids passkeys are registered for.
    async fn passkey_rp_ids(&self) -> StoreResult<Vec<String>>;
    /// Keeps a ceremony's state (and drops ceremonies expired by `now_ms`).
    async fn put_ceremony(&self, c: &Ceremony, now_ms: i64) -> StoreResult<()>;
    /// Takes a ceremony back for `purpose`, deleting it in the same statement: a second take
    /// finds nothing. An expired ceremony is deleted and not returned.
    async fn take_ceremony(
        &self,
        id: &str,
        purpose: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Ceremony>>;

    /// Records a Plex account met now (inserted, or its names and last-seen time updated) and
    /// returns it as it stands.
    async fn note_plex_account(
        &self,
        account_id: &str,
        username: &str,
        title: &str,
        now_ms: i64,
    ) -> StoreResult<PlexAccount>;
    /// A Plex account by its id or its user name (ASCII case ignored).
    async fn find_plex_account(&self, key: &str) -> StoreResult<Option<PlexAccount>>;
    /// Every Plex account met, or those linked or offered to one gateway user.
    async fn list_plex_accounts(&self, user_id: Option<i64>) -> StoreResult<Vec<PlexAccount>>;
    /// Links a Plex account to a gateway user. `NotFound` for an account never met, `Conflict`
    /// when it is linked to another user already (unlink first).
    async fn link_plex_account(
        &self,
        account_id: &str,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// Unlinks a Plex account and ends every token of it bound at the gateway, in one
    /// transaction. `Ok(None)` when it was not linked.
    async fn unlink_plex_account(
        &self,
        account_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>>;
    /// Offers the link of an unlinked Plex account to a gateway user (the account page shows it).
    async fn offer_plex_link(&self, account_id: &str, user_id: i64, now_ms: i64)
        -> StoreResult<()>;
    /// Records a Plex device met now (inserted pending, or its description and last-seen time
    /// updated) and returns it as it stands.
    async fn note_plex_device(&self, d: &PlexDevice) -> StoreResult<PlexDevice>;
    /// The devices of the Plex accounts linked to a gateway user, or every device.
    async fn list_plex_devices(&self, user_id: Option<i64>) -> StoreResult<Vec<PlexDevice>>;
    /// Approves a device; false if there is no such device.
    async fn approve_plex_device(
        &self,
        account_id: &str,
        client_id: &str,
        by_user: i64,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Withdraws a device's approval and ends its tokens bound at the gateway, in one
    /// transaction. `Ok(None)` if there is no such device.
    async fn revoke_plex_device(
        &self,
        account_id: &str,
        client_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>>;

    /// Pushed announcements of committed events: PostgreSQL's LISTEN/NOTIFY, SQLite's watch on
    /// its file (inotify); `None` where polling (and this process's own writes) is all there is.
    fn announcements(&self) -> Option<tokio::sync::watch::Receiver<Announcement>> {
        None
    }

    /// Events with `seq > after`, in sequence order, at most `limit` of them.
    async fn events_since(&self, after: i64, limit: i64) -> StoreResult<Vec<SequencedEvent>>;
    /// The whole revocation state (sessions revoked and still unexpired at `now_ms`).
    async fn snapshot(&self, now_ms: i64) -> StoreResult<Snapshot>;
}

/// The latest push announcement from the store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Announcement {
    /// Highest sequence number announced so far.
    pub seq: i64,
    /// Bumped whenever the push connection was (re)established: announcements may have been
    /// missed before it, so the reader syncs fully.
    pub generation: u64,
    /// Whether the push connection is up now.
    pub connected: bool,
}

pub type DynStore = Arc<dyn Store>;

/// Opens the store named by a validated URL and brings its schema up to date: `sqlite://<path>`
/// or `postgres://…` (also `postgresql://…`, query parameters such as `options` honoured).
pub async fn open(url: &str, busy_timeout: std::time::Duration) -> StoreResult<DynStore> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        return Ok(Arc::new(
            sqlite::SqliteStore::open(path, busy_timeout).await?,
        ));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(postgres::PgStore::open(url, busy_timeout).await?));
    }
    Err(StoreError::Open {
        path: "<url>".to_string(),
        message: "only sqlite:// and postgres:// URLs are supported".to_string(),
    })
}

/// Opens an existing store as it stands, for a look that changes nothing (`check-config`): no
/// file is made and no migration runs. `None` where no SQLite file exists yet; else the store
/// and the newest migration applied to it.
pub async fn open_as_is(
    url: &str,
    busy_timeout: std::time::Duration,
) -> StoreResult<Option<(DynStore, i64)>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if !std::path::Path::new(path).exists() {
            return Ok(None);
        }
        let store = sqlite::SqliteStore::open_with(path, busy_timeout, false).await?;
        let version = store.applied_version().await;
        return Ok(Some((Arc::new(store), version)));
    }
    let store = postgres::PgStore::open_with(url, busy_timeout, false).await?;
    let version = store.applied_version().await;
    Ok(Some((Arc::new(store), version)))
}
