//! The store's logic, written once for every SQL backend: `SqlStore<D>` implements `Store` over
//! any sqlx database `D` that has a [`Dialect`]. Every write that appends events runs in a
//! writing transaction (`write_tx`), numbers its events through the dialect's `INSERT_EVENT`
//! and commits through `commit`, which first announces the highest number where the backend
//! pushes announcements. The sqlx bounds the queries need are gathered on the two `impl` blocks
//! below and nowhere else.

use sqlx::migrate::Migrate;
use sqlx::{
    ColumnIndex, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Row, Transaction, Type,
};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

use super::dialect::Dialect;
use super::{
    Announcement, AuditEntry, BackchannelLogout, Ceremony, DeviceSeen, EmailConfirmation,
    MediaNote, MediaTokenRow, NewMediaBinding, NewOutbox, NewPasskey, NewSession, OidcLink,
    OidcSession, OutboxMessage, OutboxOutcome, OutboxStats, OwedLogout, PasskeyRecord, PlexAccount,
    PlexDevice, Record, ResetLinkState, RevocationEvent, SequencedEvent, SessionId, SessionKind,
    SessionRecord, Snapshot, Store, StoreError, StoreResult, StoredCertificate, User,
};

pub(super) const KIND_SESSION: &str = "session_revoked";
const KIND_USER_CUTOFF: &str = "user_cutoff";
const KIND_GLOBAL_CUTOFF: &str = "global_cutoff";
const KIND_USER_DISABLED: &str = "user_disabled";
const KIND_USER_ENABLED: &str = "user_enabled";
const KIND_KEY_RETIRED: &str = "key_retired";
const KIND_MEDIA_BOUND: &str = "media_bound";
const KIND_MEDIA_NOTE: &str = "media_note";
const KIND_GROUPS: &str = "groups_changed";

const USER_COLUMNS: &str = "id, name, password_hash, is_admin, disabled, created_ms, must_reset,
     failed_logins, locked_until_ms, last_failure_ms, totp_secret, totp_enabled, totp_last_step,
     passkey_required, directory_dn, directory_id, directory_disabled_ms, email, email_verified_ms,
     password_set";
const OUTBOX_COLUMNS: &str = "id, created_ms, channel, kind, user_id, address, params, attempts";

const PLEX_ACCOUNT_SELECT: &str = "SELECT p.account_id, p.username, p.title, p.user_id,
     u.name AS user_name, p.linked_ms, p.offered_user_id, p.first_seen_ms, p.last_seen_ms
     FROM plex_accounts p LEFT JOIN users u ON u.id = p.user_id";
const PASSKEY_SELECT: &str = "SELECT id, user_id, cred_id, rp_id, label, aaguid, credential,
     counter, created_ms, last_used_ms, clone_warning_ms FROM passkeys";
const PLEX_DEVICE_SELECT: &str = "SELECT account_id, client_id, product, device_name, platform, ip,
     first_seen_ms, last_seen_ms, approved_ms FROM plex_devices";

/// A store on one SQL backend. Opened by the backend's own `open` (`store::sqlite`,
/// `store::postgres`).
pub struct SqlStore<D: Dialect> {
    pub(super) pool: Pool<D>,
    /// Run at the start of every writing transaction, after `D::BEGIN_WRITE` (PostgreSQL's
    /// writer lock).
    pub(super) write_lock: Option<String>,
    pub(super) announcements: Option<watch::Receiver<Announcement>>,
    /// Ends the announcement task, if any, when the store is dropped.
    pub(super) _listener: Option<AbortOnDrop>,
    /// A recording store's audit entry and notices, taken by the first transaction it commits.
    pub(super) record: Option<Arc<Mutex<Option<Record>>>>,
}

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(super) fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A passkey insert's failure: a credential id registered already is a `Conflict`.
fn passkey_conflict(e: sqlx::Error) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict("the credential is registered already".into())
    } else {
        unavailable(e)
    }
}

/// What a one-time link (`reset_links.purpose`) does when used.
const LINK_PASSWORD: &str = "password";
const LINK_PASSKEY: &str = "passkey";
const LINK_NOT_ME: &str = "not_me";

fn sid_from_text(text: &str) -> StoreResult<SessionId> {
    SessionId::parse(text).ok_or_else(|| StoreError::Corrupt(format!("session id `{text}`")))
}

/// Implements `Type` and `Decode` for a type stored as text: `parse` reads it (an error fails
/// the row as `StoreError::Corrupt`). Rows then read straight into their types (`sqlx::FromRow`).
macro_rules! decode_from_text {
    ($ty:ty, $parse:expr) => {
        impl<DB: sqlx::Database> Type<DB> for $ty
        where
            str: Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as Type<DB>>::compatible(ty)
            }
        }

        impl<'r, DB: sqlx::Database> Decode<'r, DB> for $ty
        where
            &'r str: Decode<'r, DB>,
        {
            fn decode(value: DB::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                Ok($parse(<&str as Decode<DB>>::decode(value)?)?)
            }
        }
    };
}

decode_from_text!(SessionId, sid_from_text);
decode_from_text!(SessionKind, |text| StoreResult::Ok(SessionKind::parse(
    text
)));

/// Live sessions by kind: a range of the `sessions_live` index (migration 7), which holds only
/// sessions not signed out, so the week of expired sessions kept for the account pages is never
/// read.
pub(super) const COUNT_LIVE_SESSIONS: &str = "SELECT kind, COUNT(*) FROM sessions
     WHERE revoked_ms IS NULL AND expires_ms > $1 GROUP BY kind ORDER BY kind";

/// A negative limit means "no limit"; both backends take the largest number for that.
fn limit_of(limit: i64) -> i64 {
    if limit < 0 {
        i64::MAX
    } else {
        limit
    }
}

/// The newest schema version (migration) a migrator knows.
pub fn schema_version(migrator: &sqlx::migrate::Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The newest migration applied to the database, if its migration table can be read.
pub async fn applied_schema_version<'c, E>(db: E) -> Option<i64>
where
    E: Executor<'c>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: IntoArguments<'q, E::Database>,
    (Option<i64>,): for<'r> FromRow<'r, <E::Database as sqlx::Database>::Row>,
{
    sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(db)
        .await
        .ok()
        .flatten()
}

impl<D: Dialect> SqlStore<D> {
    /// Closes every connection (SQLite then checkpoints and removes its WAL file).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl<D: Dialect> SqlStore<D>
where
    for<'c> &'c Pool<D>: Executor<'c, Database = D>,
    for<'q> D::Arguments<'q>: IntoArguments<'q, D>,
    (Option<i64>,): for<'r> FromRow<'r, D::Row>,
{
    /// The newest migration applied to the database (0 before the first).
    pub async fn applied_version(&self) -> i64 {
        applied_schema_version(&self.pool).await.unwrap_or(0)
    }
}

type Tx<D> = Transaction<'static, D>;

impl<D> SqlStore<D>
where
    D: Dialect,
    D::Connection: Migrate,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'q> D::Arguments<'q>: IntoArguments<'q, D>,
    for<'q> i64: Encode<'q, D> + Decode<'q, D> + Type<D>,
    for<'q> String: Encode<'q, D> + Decode<'q, D> + Type<D>,
    for<'q> &'q str: Encode<'q, D> + Decode<'q, D>,
    str: Type<D>,
    for<'q> Option<i64>: Encode<'q, D>,
    for<'q> Option<String>: Encode<'q, D>,
    for<'q> Option<&'q str>: Encode<'q, D>,
    for<'n> &'n str: ColumnIndex<D::Row>,
    usize: ColumnIndex<D::Row>,
{
    /// Brings the schema up to date; a store written by a newer Portcullis is refused.
    pub(super) async fn migrate(pool: &Pool<D>) -> StoreResult<()> {
        if let Err(e) = D::migrator().run(pool).await {
            let applied = applied_schema_version(pool).await;
            return Err(super::migrate_error(
                e,
                applied,
                schema_version(D::migrator()),
            ));
        }
        Ok(())
    }

    /// Stores a one-time link; older unused links of the user with the same purpose stop
    /// working (read as used), so only the newest link sent out works.
    async fn create_link(
        &self,
        token_hash: &str,
        user_id: i64,
        purpose: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // A "this wasn't me" link stays good when another alert follows: a burst of sign-ins
        // must not leave the user with only dead links.
        if purpose != LINK_NOT_ME {
            query!("UPDATE reset_links SET used_ms = $1 WHERE user_id = $2 AND purpose = $3
                    AND used_ms IS NULL"; now_ms, user_id, purpose)
            .execute(&mut *tx)
            .await?;
        }
        query!("INSERT INTO reset_links (token_hash, user_id, created_ms, expires_ms, purpose)
                VALUES ($1, $2, $3, $4, $5)"; token_hash, user_id, now_ms, expires_ms, purpose)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await
    }

    async fn link_state(
        &self,
        token_hash: &str,
        purpose: &str,
        now_ms: i64,
    ) -> StoreResult<ResetLinkState> {
        let link: Option<(i64, i64, Option<i64>)> = query_as!(
            "SELECT user_id, expires_ms, used_ms FROM reset_links
             WHERE token_hash = $1 AND purpose = $2"; token_hash, purpose)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match link {
            None => ResetLinkState::Unknown,
            Some((_, _, Some(_))) => ResetLinkState::Used,
            Some((_, expires_ms, None)) if expires_ms <= now_ms => ResetLinkState::Expired,
            Some((user_id, _, None)) => ResetLinkState::Valid { user_id },
        })
    }

    /// A writing transaction: one writer at a time, in commit order (see `Dialect::BEGIN_WRITE`).
    async fn write_tx(&self) -> StoreResult<Tx<D>> {
        let mut tx = self.pool.begin_with(D::BEGIN_WRITE).await?;
        if let Some(lock) = &self.write_lock {
            // A plain string is sent as a simple query: several statements, one round trip.
            (&mut *tx).execute(lock.as_str()).await?;
        }
        Ok(tx)
    }

    /// Commits, first announcing the highest event number written (delivered at commit) and,
    /// on a recording store, appending its record if no earlier transaction took it.
    async fn commit(&self, mut tx: Tx<D>, events: &[SequencedEvent]) -> StoreResult<()> {
        if let (Some(announce), Some(last)) = (D::ANNOUNCE, events.iter().map(|e| e.seq).max()) {
            query!(announce; last).execute(&mut *tx).await?;
        }
        if let Some(record) = self.take_record() {
            Self::insert_record(&mut tx, &record).await?;
        }
        Ok(tx.commit().await?)
    }

    fn take_record(&self) -> Option<Record> {
        let pending = self.record.as_ref()?;
        match pending.lock() {
            Ok(mut r) => r.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// Appends an audit entry and its messages in the transaction open on `conn`.
    async fn insert_record(conn: &mut D::Connection, r: &Record) -> StoreResult<()> {
        let e = &r.entry;
        query!("INSERT INTO audit_log (at_ms, event, outcome, user_id, user_name, ip, user_agent,
                session_id, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
               e.at_ms, &e.event, &e.outcome, e.user_id, &e.user_name, &e.ip, &e.user_agent,
               &e.session_id, &e.detail)
        .execute(&mut *conn)
        .await?;
        for m in &r.outbox {
            Self::insert_outbox(&mut *conn, m, e.at_ms).await?;
        }
        Ok(())
    }

    fn get<'r, T, I>(row: &'r D::Row, column: I) -> StoreResult<T>
    where
        T: Decode<'r, D> + Type<D>,
        I: ColumnIndex<D::Row>,
    {
        row.try_get(column).map_err(unavailable)
    }

    /// Puts one message in the outbox, due at once, in the transaction open on `conn`.
    async fn insert_outbox(
        conn: &mut D::Connection,
        m: &NewOutbox,
        now_ms: i64,
    ) -> StoreResult<()> {
        query!("INSERT INTO outbox (created_ms, channel, kind, user_id, address, params,
                next_attempt_ms) VALUES ($1, $2, $3, $4, $5, $6, $1)";
               now_ms, &m.channel, &m.kind, m.user_id, &m.address, &m.params)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Uses a one-time link of `purpose` once, in `tx`: its user, or `None` when it is unknown,
    /// used or expired.
    async fn use_link(
        tx: &mut Tx<D>,
        token_hash: &str,
        purpose: &str,
        now_ms: i64,
    ) -> StoreResult<Option<i64>> {
        Ok(query_scalar!(
            "UPDATE reset_links SET used_ms = $1 WHERE token_hash = $2 AND purpose = $3
             AND used_ms IS NULL AND expires_ms > $1 RETURNING user_id";
            now_ms, token_hash, purpose,
        )
        .fetch_optional(&mut **tx)
        .await?)
    }

    /// Forgets the user's address changes not confirmed yet: a recovery (a reset, "this wasn't
    /// me", a new password, signing out everywhere) must not leave an intruder's pending address
    /// to be confirmed later.
    async fn drop_pending_addresses(tx: &mut Tx<D>, user_id: i64) -> StoreResult<()> {
        query!("DELETE FROM email_confirmations WHERE user_id = $1 AND used_ms IS NULL"; user_id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// The events of disabling a user (every token of theirs ends: sessions revoked, a
    /// cut-off for the rest) or enabling one, written in `tx`.
    async fn disabled_events(
        tx: &mut Tx<D>,
        user_id: i64,
        disabled: bool,
        now_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut events = Vec::new();
        if disabled {
            query!("UPDATE sessions SET revoked_ms = $1
                    WHERE user_id = $2 AND revoked_ms IS NULL AND created_ms <= $1";
                   now_ms, user_id)
            .execute(&mut **tx)
            .await?;
            let disabled = RevocationEvent::UserDisabled { user_id };
            events.push(Self::append(&mut **tx, now_ms, disabled).await?);
            let cutoff = RevocationEvent::UserCutoff {
                user_id,
                at_ms: now_ms,
            };
            events.push(Self::append(&mut **tx, now_ms, cutoff).await?);
        } else {
            let enabled = RevocationEvent::UserEnabled { user_id };
            events.push(Self::append(&mut **tx, now_ms, enabled).await?);
        }
        Ok(events)
    }

    /// Appends one event (under the writer lock held by `tx`) and numbers it. `at_ms` is the
    /// time recorded for events that carry none of their own.
    async fn append(
        tx: &mut D::Connection,
        at_ms: i64,
        event: RevocationEvent,
    ) -> StoreResult<SequencedEvent> {
        use RevocationEvent as E;
        let (kind, at_ms, expires_ms) = match &event {
            E::SessionRevoked { expires_ms, .. } => (KIND_SESSION, at_ms, Some(*expires_ms)),
            E::UserCutoff { at_ms, .. } => (KIND_USER_CUTOFF, *at_ms, None),
            E::GlobalCutoff { at_ms } => (KIND_GLOBAL_CUTOFF, *at_ms, None),
            E::UserDisabled { .. } => (KIND_USER_DISABLED, at_ms, None),
            E::UserEnabled { .. } => (KIND_USER_ENABLED, at_ms, None),
            E::KeyRetired { .. } => (KIND_KEY_RETIRED, at_ms, None),
            E::MediaBound {
                issued_ms,
                expires_ms,
                ..
            } => (KIND_MEDIA_BOUND, *issued_ms, Some(*expires_ms)),
            E::MediaNote { until_ms, .. } => (KIND_MEDIA_NOTE, at_ms, Some(*until_ms)),
            E::GroupsChanged { .. } => (KIND_GROUPS, at_ms, None),
        };
        let (sid, user_id) = match &event {
            E::SessionRevoked { sid, user_id, .. } | E::MediaBound { sid, user_id, .. } => {
                (Some(sid.to_string()), Some(*user_id))
            }
            E::UserCutoff { user_id, .. }
            | E::UserDisabled { user_id }
            | E::UserEnabled { user_id }
            | E::GroupsChanged { user_id, .. } => (None, Some(*user_id)),
            E::GlobalCutoff { .. } | E::KeyRetired { .. } | E::MediaNote { .. } => (None, None),
        };
        let key_id = match &event {
            E::KeyRetired { kid } => Some(kid.as_str()),
            _ => None,
        };
        let token_hash = match &event {
            E::MediaBound { token_hash, .. } => Some(token_hash.as_str()),
            _ => None,
        };
        let detail = match &event {
            E::MediaNote { note, .. } => Some(
                serde_json::to_string(note)
                    .map_err(|e| StoreError::Corrupt(format!("a media note: {e}")))?,
            ),
            E::GroupsChanged { groups, .. } => Some(
                serde_json::to_string(groups)
                    .map_err(|e| StoreError::Corrupt(format!("a group list: {e}")))?,
            ),
            _ => None,
        };
        let seq: i64 = query_scalar!(
            D::INSERT_EVENT;
            kind, sid, user_id, at_ms, expires_ms, key_id, token_hash, detail,
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok(SequencedEvent { seq, event })
    }

    /// A user's groups as they are in `tx`, `admins` first for an administrator.
    async fn groups_in(tx: &mut D::Connection, user_id: i64) -> StoreResult<Vec<String>> {
        let admin: Option<i64> = query_scalar!(
            "SELECT CAST(CASE WHEN is_admin THEN 1 ELSE 0 END AS BIGINT) FROM users WHERE id = $1";
            user_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(admin) = admin else {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        };
        let mut groups: Vec<String> = if admin == 1 {
            vec!["admins".to_string()]
        } else {
            vec![]
        };
        groups.extend(
            query_scalar!("SELECT name FROM user_groups WHERE user_id = $1 ORDER BY name"; user_id)
                .fetch_all(&mut *tx)
                .await?,
        );
        Ok(groups)
    }

    /// Records a user's groups as they now are in `tx` for every replica's view.
    async fn groups_event(
        tx: &mut D::Connection,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        let groups = Self::groups_in(tx, user_id).await?;
        Self::append(
            tx,
            now_ms,
            RevocationEvent::GroupsChanged { user_id, groups },
        )
        .await
    }

    /// Ends every session issued at or before `at_ms` and records the global cutoff.
    async fn cutoff_everyone(tx: &mut D::Connection, at_ms: i64) -> StoreResult<SequencedEvent> {
        query!("UPDATE sessions SET revoked_ms = $1 WHERE revoked_ms IS NULL AND created_ms <= $1";
               at_ms)
        .execute(&mut *tx)
        .await?;
        Self::append(tx, at_ms, RevocationEvent::GlobalCutoff { at_ms }).await
    }

    /// Ends the user's sessions issued at or before `at_ms` and records the cutoff.
    async fn cutoff_user(
        tx: &mut D::Connection,
        user_id: i64,
        at_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        query!("UPDATE sessions SET revoked_ms = $1
                WHERE user_id = $2 AND revoked_ms IS NULL AND created_ms <= $1"; at_ms, user_id)
        .execute(&mut *tx)
        .await?;
        Self::append(tx, at_ms, RevocationEvent::UserCutoff { user_id, at_ms }).await
    }

    /// Records `SessionRevoked` events for sessions just ended, as an `UPDATE … RETURNING id,
    /// user_id, expires_ms` names them.
    async fn append_revoked(
        tx: &mut D::Connection,
        at_ms: i64,
        ended: &[(SessionId, i64, i64)],
        events: &mut Vec<SequencedEvent>,
    ) -> StoreResult<()> {
        for &(sid, user_id, expires_ms) in ended {
            let event = RevocationEvent::SessionRevoked {
                sid,
                user_id,
                expires_ms,
            };
            events.push(Self::append(tx, at_ms, event).await?);
        }
        Ok(())
    }

    /// Ends the live sessions of the tokens bound for a Plex account (of one device, or all),
    /// with no upstream logout owed (the gateway never holds a Plex token to send back).
    async fn end_plex_tokens(
        tx: &mut D::Connection,
        account_id: &str,
        client_id: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Vec<(SessionId, i64, i64)>> {
        let ended: Vec<(SessionId, i64, i64)> = query_as!(
            "UPDATE sessions SET revoked_ms = $1
             WHERE revoked_ms IS NULL AND expires_ms > $1 AND id IN (
                 SELECT session_id FROM media_tokens
                 WHERE media_user_id = $2 AND (CAST($3 AS TEXT) IS NULL OR device_id = $3))
             RETURNING id, user_id, expires_ms";
            now_ms, super::plex_media_user_id(account_id), client_id,
        )
        .fetch_all(&mut *tx)
        .await?;
        Ok(ended)
    }

    /// Inserts a new session row, last seen at its creation.
    async fn insert_session(conn: &mut D::Connection, s: &NewSession) -> StoreResult<()> {
        query!("INSERT INTO sessions
                (id, user_id, kind, user_agent, ip, created_ms, last_seen_ms, expires_ms)
                VALUES ($1, $2, $3, $4, $5, $6, $6, $7)";
               s.id.to_string(), s.user_id, s.kind.as_str(), &s.user_agent, &s.ip, s.created_ms,
               s.expires_ms)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    fn event_from_row(row: &D::Row) -> StoreResult<SequencedEvent> {
        let seq: i64 = Self::get(row, "seq")?;
        let kind: &str = Self::get(row, "kind")?;
        let session_id: Option<&str> = Self::get(row, "session_id")?;
        let user_id: Option<i64> = Self::get(row, "user_id")?;
        let at_ms: i64 = Self::get(row, "at_ms")?;
        let expires_ms: Option<i64> = Self::get(row, "expires_ms")?;
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("event {seq} ({kind}) lacks {what}"));
        let sid = || sid_from_text(session_id.ok_or_else(|| corrupt("session_id"))?);
        let user_id = || user_id.ok_or_else(|| corrupt("user_id"));
        let expires_ms = || expires_ms.ok_or_else(|| corrupt("expires_ms"));
        let text = |column: &str| -> StoreResult<Option<String>> { Self::get(row, column) };
        let event = match kind {
            KIND_SESSION => RevocationEvent::SessionRevoked {
                sid: sid()?,
                user_id: user_id()?,
                expires_ms: expires_ms()?,
            },
            KIND_USER_CUTOFF => RevocationEvent::UserCutoff {
                user_id: user_id()?,
                at_ms,
            },
            KIND_GLOBAL_CUTOFF => RevocationEvent::GlobalCutoff { at_ms },
            KIND_USER_DISABLED => RevocationEvent::UserDisabled {
                user_id: user_id()?,
            },
            KIND_USER_ENABLED => RevocationEvent::UserEnabled {
                user_id: user_id()?,
            },
            KIND_MEDIA_NOTE => RevocationEvent::MediaNote {
                note: super::parse_note(text("detail")?.as_deref(), seq)?,
                until_ms: expires_ms()?,
            },
            KIND_MEDIA_BOUND => RevocationEvent::MediaBound {
                sid: sid()?,
                user_id: user_id()?,
                user_name: text("user_name")?.unwrap_or_default(),
                token_hash: text("token_hash")?.ok_or_else(|| corrupt("token_hash"))?,
                issued_ms: at_ms,
                expires_ms: expires_ms()?,
            },
            KIND_GROUPS => RevocationEvent::GroupsChanged {
                user_id: user_id()?,
                groups: serde_json::from_str(text("detail")?.as_deref().unwrap_or("[]")).map_err(
                    |e| StoreError::Corrupt(format!("event {seq} has a bad group list: {e}")),
                )?,
            },
            KIND_KEY_RETIRED => RevocationEvent::KeyRetired {
                kid: text("key_id")?.ok_or_else(|| corrupt("key_id"))?,
            },
            other => {
                return Err(StoreError::Corrupt(format!(
                    "event {seq} has kind `{other}`"
                )))
            }
        };
        Ok(SequencedEvent { seq, event })
    }
}

#[async_trait::async_trait]
impl<D> Store for SqlStore<D>
where
    D: Dialect,
    D::Connection: Migrate,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    for<'q> D::Arguments<'q>: IntoArguments<'q, D>,
    for<'q> bool: Encode<'q, D> + Decode<'q, D> + Type<D>,
    for<'q> i64: Encode<'q, D> + Decode<'q, D> + Type<D>,
    for<'q> String: Encode<'q, D> + Decode<'q, D> + Type<D>,
    for<'q> &'q str: Encode<'q, D> + Decode<'q, D>,
    str: Type<D>,
    for<'q> Option<i64>: Encode<'q, D>,
    for<'q> Option<String>: Encode<'q, D>,
    for<'q> Option<&'q str>: Encode<'q, D>,
    for<'n> &'n str: ColumnIndex<D::Row>,
    usize: ColumnIndex<D::Row>,
{
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        D::BACKEND
    }

    async fn user_count(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        is_admin: bool,
        now_ms: i64,
    ) -> StoreResult<User> {
        let sql = format!(
            "INSERT INTO users (name, password_hash, is_admin, disabled, created_ms)
             VALUES ($1, $2, $3, FALSE, $4) RETURNING {USER_COLUMNS}"
        );
        let mut tx = self.write_tx().await?;
        let user: User = query_as!(&sql; name, password_hash, is_admin, now_ms)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("user `{name}`"))
                } else {
                    unavailable(e)
                }
            })?;
        // Every replica learns that a new administrator is in `admins`.
        let mut events = Vec::new();
        if is_admin {
            events.push(Self::groups_event(&mut tx, user.id, now_ms).await?);
        }
        self.commit(tx, &events).await?;
        Ok(user)
    }

    async fn find_user(&self, name: &str) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE {}", D::NAME_IS);
        Ok(query_as!(&sql; name).fetch_optional(&self.pool).await?)
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY {}",
            D::NAME_ORDER
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    async fn find_user_by_id(&self, id: i64) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
        Ok(query_as!(&sql; id).fetch_optional(&self.pool).await?)
    }

    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()> {
        let done =
            query!("UPDATE users SET password_hash = $1, password_set = TRUE WHERE id = $2"; password_hash, user_id)
                .execute(&self.pool)
                .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(())
    }

    async fn set_disabled(
        &self,
        user_id: i64,
        disabled: bool,
        now_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        // An administrator's decision: the directory sync never undoes it.
        let done = query!("UPDATE users SET disabled = $1, directory_disabled_ms = NULL
                           WHERE id = $2"; disabled, user_id)
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        let events = Self::disabled_events(&mut tx, user_id, disabled, now_ms).await?;
        self.commit(tx, &events).await?;
        Ok(events)
    }

    async fn set_directory_entry(
        &self,
        user_id: i64,
        dn: &str,
        id: Option<&str>,
    ) -> StoreResult<()> {
        let done = query!("UPDATE users SET directory_dn = $1, directory_id = $2 WHERE id = $3";
                          dn, id, user_id)
        .execute(&self.pool)
        .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(())
    }

    async fn set_directory_disabled(
        &self,
        user_id: i64,
        disabled: bool,
        now_ms: i64,
        read_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        // Disabling: only a user not disabled yet. Enabling: only one the directory disabled,
        // and only by a reading that began after it did (a replica's older reading must not
        // undo another's newer one).
        let done = if disabled {
            query!("UPDATE users SET disabled = TRUE, directory_disabled_ms = $1
                    WHERE id = $2 AND NOT disabled"; now_ms, user_id)
            .execute(&mut *tx)
            .await?
        } else {
            query!("UPDATE users SET disabled = FALSE, directory_disabled_ms = NULL
                    WHERE id = $1 AND directory_disabled_ms IS NOT NULL
                    AND directory_disabled_ms < $2"; user_id, read_ms)
            .execute(&mut *tx)
            .await?
        };
        if D::rows_affected(&done) == 0 {
            return Ok(Vec::new());
        }
        let events = Self::disabled_events(&mut tx, user_id, disabled, now_ms).await?;
        self.commit(tx, &events).await?;
        Ok(events)
    }

    async fn create_session(&self, s: &NewSession) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        Self::insert_session(&mut conn, s).await
    }

    async fn get_session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>> {
        Ok(
            query_as!("SELECT s.id, s.user_id, u.name AS user_name, s.kind, s.user_agent, s.ip,
                      s.created_ms, s.last_seen_ms, s.expires_ms, s.revoked_ms
                      FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = $1";
                     id.to_string())
            .fetch_optional(&self.pool)
            .await?,
        )
    }

    async fn list_live_sessions(
        &self,
        user_id: Option<i64>,
        now_ms: i64,
    ) -> StoreResult<Vec<SessionRecord>> {
        Ok(
            query_as!("SELECT s.id, s.user_id, u.name AS user_name, s.kind, s.user_agent, s.ip,
                      s.created_ms, s.last_seen_ms, s.expires_ms, s.revoked_ms
                      FROM sessions s JOIN users u ON u.id = s.user_id
                      WHERE s.revoked_ms IS NULL AND s.expires_ms > $1
                      AND (CAST($2 AS BIGINT) IS NULL OR s.user_id = $2)
                      ORDER BY s.created_ms"; now_ms, user_id)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    async fn count_live_sessions(&self, now_ms: i64) -> StoreResult<Vec<(String, i64)>> {
        Ok(query_as!(COUNT_LIVE_SESSIONS; now_ms)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn revoke_session(
        &self,
        id: SessionId,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let ended: Vec<(SessionId, i64, i64)> =
            query_as!("UPDATE sessions SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2
                       RETURNING id, user_id, expires_ms"; now_ms, id.to_string())
            .fetch_all(&mut *tx)
            .await?;
        let mut events = Vec::with_capacity(1);
        Self::append_revoked(&mut tx, now_ms, &ended, &mut events).await?;
        self.commit(tx, &events).await?;
        Ok(events.pop())
    }

    async fn signout_user(&self, user_id: i64, now_ms: i64) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        Self::drop_pending_addresses(&mut tx, user_id).await?;
        let event = Self::cutoff_user(&mut tx, user_id, now_ms).await?;
        self.commit(tx, std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn signout_everyone(&self, now_ms: i64) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let event = Self::cutoff_everyone(&mut tx, now_ms).await?;
        self.commit(tx, std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn record_failure(
        &self,
        user_id: i64,
        now_ms: i64,
        max_failures: u32,
        lockout_ms: i64,
    ) -> StoreResult<User> {
        let sql = format!(
            "UPDATE users SET failed_logins = failed_logins + 1,
             last_failure_ms = CASE WHEN last_failure_ms > $1 THEN last_failure_ms ELSE $1 END,
             locked_until_ms = CASE WHEN failed_logins + 1 >= $2 THEN $3 ELSE locked_until_ms END
             WHERE id = $4 RETURNING {USER_COLUMNS}"
        );
        let locked_until = now_ms.saturating_add(lockout_ms);
        query_as!(&sql; now_ms, i64::from(max_failures), locked_until, user_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("user {user_id}")))
    }

    async fn clear_failures(&self, user_id: i64) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        query!("UPDATE users SET failed_logins = 0, locked_until_ms = NULL, last_failure_ms = NULL
                WHERE id = $1 AND (failed_logins != 0 OR locked_until_ms IS NOT NULL)"; user_id)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await
    }

    async fn set_must_reset(&self, user_id: Option<i64>, must: bool) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let done = query!(
            "UPDATE users SET must_reset = $1 WHERE CAST($2 AS BIGINT) IS NULL OR id = $2";
            must, user_id,
        )
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await?;
        Ok(D::rows_affected(&done))
    }

    async fn take_lease(
        &self,
        name: &str,
        owner: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<bool> {
        let done = query!("INSERT INTO leases (name, owner, until_ms) VALUES ($1, $2, $3)
                           ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,
                           until_ms = excluded.until_ms
                           WHERE leases.until_ms <= $4 OR leases.owner = excluded.owner";
                          name, owner, until_ms, now_ms)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn release_lease(&self, name: &str, owner: &str) -> StoreResult<()> {
        query!("DELETE FROM leases WHERE name = $1 AND owner = $2"; name, owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_certificate(&self, c: &StoredCertificate) -> StoreResult<()> {
        query!("INSERT INTO acme_certificates (names, chain_pem, key_sealed, not_after_ms,
                issued_ms) VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (names) DO UPDATE SET chain_pem = excluded.chain_pem,
                key_sealed = excluded.key_sealed, not_after_ms = excluded.not_after_ms,
                issued_ms = excluded.issued_ms
                WHERE acme_certificates.issued_ms < excluded.issued_ms";
               &c.names, &c.chain_pem, &c.key_sealed, c.not_after_ms, c.issued_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn certificate(&self, names: &str) -> StoreResult<Option<StoredCertificate>> {
        let row: Option<(String, String, String, i64, i64)> = query_as!(
            "SELECT names, chain_pem, key_sealed, not_after_ms, issued_ms
             FROM acme_certificates WHERE names = $1"; names)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(names, chain_pem, key_sealed, not_after_ms, issued_ms)| StoredCertificate {
                names,
                chain_pem,
                key_sealed,
                not_after_ms,
                issued_ms,
            },
        ))
    }

    async fn put_challenge(
        &self,
        id: &str,
        proof: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        query!("DELETE FROM acme_challenges WHERE expires_ms <= $1"; now_ms)
            .execute(&mut *tx)
            .await?;
        query!("INSERT INTO acme_challenges (id, proof, expires_ms) VALUES ($1, $2, $3)
                ON CONFLICT (id) DO UPDATE SET proof = excluded.proof,
                expires_ms = excluded.expires_ms"; id, proof, expires_ms)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await
    }

    async fn challenge(&self, id: &str, now_ms: i64) -> StoreResult<Option<String>> {
        Ok(
            query_scalar!("SELECT proof FROM acme_challenges WHERE id = $1 AND expires_ms > $2";
                         id, now_ms)
            .fetch_optional(&self.pool)
            .await?,
        )
    }

    async fn drop_challenge(&self, id: &str) -> StoreResult<()> {
        query!("DELETE FROM acme_challenges WHERE id = $1"; id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_passkey_required(&self, user_id: Option<i64>, required: bool) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let done = query!(
            "UPDATE users SET passkey_required = $1 WHERE CAST($2 AS BIGINT) IS NULL OR id = $2";
            required, user_id,
        )
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await?;
        Ok(D::rows_affected(&done))
    }

    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        signout_at: Option<i64>,
    ) -> StoreResult<Option<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let done = query!("UPDATE users SET password_hash = $1, password_set = TRUE, must_reset = FALSE WHERE id = $2";
                          password_hash, user_id)
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        // A new password makes every reset link sent out before it useless, and every address
        // change not confirmed yet (one an intruder started, say).
        Self::drop_pending_addresses(&mut tx, user_id).await?;
        let now = signout_at.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        });
        query!("UPDATE reset_links SET used_ms = $1 WHERE user_id = $2 AND purpose = $3
                AND used_ms IS NULL"; now, user_id, LINK_PASSWORD)
        .execute(&mut *tx)
        .await?;
        let event = match signout_at {
            Some(at) => Some(Self::cutoff_user(&mut tx, user_id, at).await?),
            None => None,
        };
        self.commit(tx, event.as_slice()).await?;
        Ok(event)
    }

    async fn set_totp(&self, user_id: i64, secret: Option<&str>, enabled: bool) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        query!("UPDATE users SET totp_secret = $1, totp_enabled = $2 WHERE id = $3";
               secret, enabled, user_id)
        .execute(&mut *tx)
        .await?;
        if !enabled {
            query!("DELETE FROM recovery_codes WHERE user_id = $1"; user_id)
                .execute(&mut *tx)
                .await?;
        }
        self.commit(tx, &[]).await
    }

    async fn accept_totp_step(&self, user_id: i64, step: i64) -> StoreResult<bool> {
        let done = query!(
            "UPDATE users SET totp_last_step = $1 WHERE id = $2 AND totp_last_step < $1";
            step, user_id,
        )
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn replace_recovery_codes(&self, user_id: i64, hashes: &[String]) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        query!("DELETE FROM recovery_codes WHERE user_id = $1"; user_id)
            .execute(&mut *tx)
            .await?;
        if !hashes.is_empty() {
            // One statement: `($1, $2), ($1, $3), …`.
            let rows: Vec<String> = (2..hashes.len() + 2)
                .map(|i| format!("($1, ${i})"))
                .collect();
            let sql = format!(
                "INSERT INTO recovery_codes (user_id, code_hash) VALUES {}",
                rows.join(", ")
            );
            let mut insert = query!(&sql; user_id);
            for h in hashes {
                insert = insert.bind(h);
            }
            insert.execute(&mut *tx).await?;
        }
        self.commit(tx, &[]).await
    }

    async fn use_recovery_code(&self, user_id: i64, hash: &str, now_ms: i64) -> StoreResult<bool> {
        let done = query!("UPDATE recovery_codes SET used_ms = $1
                           WHERE user_id = $2 AND code_hash = $3 AND used_ms IS NULL";
                          now_ms, user_id, hash)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn recovery_codes_left(&self, user_id: i64) -> StoreResult<i64> {
        Ok(query_scalar!(
            "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_ms IS NULL";
            user_id,
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn create_reset_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        self.create_link(token_hash, user_id, LINK_PASSWORD, now_ms, expires_ms)
            .await
    }

    async fn reset_link_state(&self, token_hash: &str, now_ms: i64) -> StoreResult<ResetLinkState> {
        self.link_state(token_hash, LINK_PASSWORD, now_ms).await
    }

    async fn create_passkey_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        self.create_link(token_hash, user_id, LINK_PASSKEY, now_ms, expires_ms)
            .await
    }

    async fn passkey_link_state(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> StoreResult<ResetLinkState> {
        self.link_state(token_hash, LINK_PASSKEY, now_ms).await
    }

    async fn redeem_passkey_link(
        &self,
        token_hash: &str,
        p: &NewPasskey,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let used = query!(
            "UPDATE reset_links SET used_ms = $1 WHERE token_hash = $2 AND purpose = $3
             AND user_id = $4 AND used_ms IS NULL AND expires_ms > $1";
            now_ms, token_hash, LINK_PASSKEY, p.user_id,
        )
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&used) == 0 {
            return Ok(None);
        }
        query!("INSERT INTO passkeys (user_id, cred_id, rp_id, label, aaguid, credential,
                counter, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
                p.user_id, &p.cred_id, &p.rp_id, &p.label, &p.aaguid, &p.credential, p.counter,
                p.created_ms)
        .execute(&mut *tx)
        .await
        .map_err(passkey_conflict)?;
        let event = Self::cutoff_user(&mut tx, p.user_id, now_ms).await?;
        self.commit(tx, std::slice::from_ref(&event)).await?;
        Ok(Some(event))
    }

    async fn redeem_reset_link(
        &self,
        token_hash: &str,
        password_hash: &str,
        signout: bool,
        now_ms: i64,
    ) -> StoreResult<Option<(i64, Option<SequencedEvent>)>> {
        let mut tx = self.write_tx().await?;
        let Some(user_id) = Self::use_link(&mut tx, token_hash, LINK_PASSWORD, now_ms).await?
        else {
            return Ok(None);
        };
        query!("UPDATE users SET password_hash = $1, password_set = TRUE, must_reset = FALSE, failed_logins = 0,
                locked_until_ms = NULL WHERE id = $2"; password_hash, user_id)
        .execute(&mut *tx)
        .await?;
        Self::drop_pending_addresses(&mut tx, user_id).await?;
        let event = match signout {
            true => Some(Self::cutoff_user(&mut tx, user_id, now_ms).await?),
            false => None,
        };
        self.commit(tx, event.as_slice()).await?;
        Ok(Some((user_id, event)))
    }

    async fn create_not_me_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        self.create_link(token_hash, user_id, LINK_NOT_ME, now_ms, expires_ms)
            .await
    }

    async fn not_me_link_state(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> StoreResult<ResetLinkState> {
        self.link_state(token_hash, LINK_NOT_ME, now_ms).await
    }

    async fn redeem_not_me_link(
        &self,
        token_hash: &str,
        password_hash: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Option<(i64, SequencedEvent)>> {
        let mut tx = self.write_tx().await?;
        let Some(user_id) = Self::use_link(&mut tx, token_hash, LINK_NOT_ME, now_ms).await? else {
            return Ok(None);
        };
        Self::drop_pending_addresses(&mut tx, user_id).await?;
        if let Some(hash) = password_hash {
            query!("UPDATE users SET password_hash = $1, password_set = TRUE, must_reset = FALSE, failed_logins = 0,
                    locked_until_ms = NULL WHERE id = $2"; hash, user_id)
            .execute(&mut *tx)
            .await?;
            query!("UPDATE reset_links SET used_ms = $1 WHERE user_id = $2 AND purpose = $3
                    AND used_ms IS NULL"; now_ms, user_id, LINK_PASSWORD)
            .execute(&mut *tx)
            .await?;
        }
        let event = Self::cutoff_user(&mut tx, user_id, now_ms).await?;
        self.commit(tx, std::slice::from_ref(&event)).await?;
        Ok(Some((user_id, event)))
    }

    async fn touch_sessions(&self, seen: &[(SessionId, i64)]) -> StoreResult<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        D::touch_sessions(&mut tx, seen).await?;
        self.commit(tx, &[]).await
    }

    async fn breach_response(
        &self,
        now_ms: i64,
        retired_keys: &[String],
        require_passkey: bool,
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE users SET must_reset = TRUE")
            .execute(&mut *tx)
            .await?;
        if require_passkey {
            sqlx::query("UPDATE users SET passkey_required = TRUE")
                .execute(&mut *tx)
                .await?;
        }
        let mut events = vec![Self::cutoff_everyone(&mut tx, now_ms).await?];
        for kid in retired_keys {
            let retired = RevocationEvent::KeyRetired { kid: kid.clone() };
            events.push(Self::append(&mut tx, now_ms, retired).await?);
        }
        self.commit(tx, &events).await?;
        Ok(events)
    }

    async fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        self.append_audit_with(e, &[]).await
    }

    async fn append_audit_with(&self, e: &AuditEntry, outbox: &[NewOutbox]) -> StoreResult<()> {
        let record = Record {
            entry: e.clone(),
            outbox: outbox.to_vec(),
        };
        let mut tx = self.pool.begin().await?;
        Self::insert_record(&mut tx, &record).await?;
        self.commit(tx, &[]).await
    }

    fn recording(&self, record: Record) -> super::DynStore {
        Arc::new(SqlStore::<D> {
            pool: self.pool.clone(),
            write_lock: self.write_lock.clone(),
            announcements: self.announcements.clone(),
            _listener: None,
            record: Some(Arc::new(Mutex::new(Some(record)))),
        })
    }

    async fn claim_outbox(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<OutboxMessage>> {
        // The lease's conditions stand in the outer WHERE too: PostgreSQL checks them again on
        // a row another claim changed meanwhile, so two replicas never both take a message.
        let sql = format!(
            "UPDATE outbox SET lease_owner = $1, lease_until_ms = $2
             WHERE id IN (SELECT id FROM outbox
                          WHERE sent_ms IS NULL AND failed_ms IS NULL AND next_attempt_ms <= $3
                            AND (lease_until_ms IS NULL OR lease_until_ms <= $3)
                          ORDER BY id LIMIT $4)
               AND sent_ms IS NULL AND failed_ms IS NULL
               AND (lease_until_ms IS NULL OR lease_until_ms <= $3)
             RETURNING {OUTBOX_COLUMNS}"
        );
        let mut tx = self.write_tx().await?;
        let mut claimed: Vec<OutboxMessage> = sqlx::query_as(&sql)
            .bind(owner)
            .bind(now_ms + lease_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        self.commit(tx, &[]).await?;
        claimed.sort_by_key(|m| m.id);
        Ok(claimed)
    }

    async fn finish_outbox(
        &self,
        id: i64,
        owner: &str,
        outcome: &OutboxOutcome,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let done = match outcome {
            OutboxOutcome::Sent => {
                query!(
                "UPDATE outbox SET sent_ms = $1, attempts = attempts + 1, lease_owner = NULL,
                 lease_until_ms = NULL, last_error = NULL WHERE id = $2 AND lease_owner = $3";
                now_ms, id, owner)
                .execute(&self.pool)
                .await?
            }
            OutboxOutcome::Retry { at_ms, error } => {
                query!(
                "UPDATE outbox SET next_attempt_ms = $1, attempts = attempts + 1,
                 lease_owner = NULL, lease_until_ms = NULL, last_error = $2
                 WHERE id = $3 AND lease_owner = $4";
                at_ms, error, id, owner)
                .execute(&self.pool)
                .await?
            }
            OutboxOutcome::Failed { error } => {
                query!(
                "UPDATE outbox SET failed_ms = $1, attempts = attempts + 1, lease_owner = NULL,
                 lease_until_ms = NULL, last_error = $2 WHERE id = $3 AND lease_owner = $4";
                now_ms, error, id, owner)
                .execute(&self.pool)
                .await?
            }
        };
        Ok(D::rows_affected(&done) == 1)
    }

    async fn count_outbox_since(
        &self,
        user_id: i64,
        kind: &str,
        since_ms: i64,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE user_id = $1 AND kind = $2 AND created_ms >= $3",
        )
        .bind(user_id)
        .bind(kind)
        .bind(since_ms)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn outbox_stats(&self, channel: &str) -> StoreResult<OutboxStats> {
        let row: (i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(*), MIN(created_ms) FROM outbox
             WHERE channel = $1 AND sent_ms IS NULL AND failed_ms IS NULL",
        )
        .bind(channel)
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxStats {
            queued: row.0,
            oldest_created_ms: row.1,
        })
    }

    async fn list_outbox(
        &self,
        limit: i64,
    ) -> StoreResult<Vec<(OutboxMessage, Option<i64>, Option<i64>)>> {
        let sql = format!(
            "SELECT {OUTBOX_COLUMNS}, sent_ms, failed_ms FROM outbox ORDER BY id DESC LIMIT $1"
        );
        let rows = sqlx::query(&sql)
            .bind(limit_of(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    OutboxMessage::from_row(r)?,
                    r.try_get("sent_ms")?,
                    r.try_get("failed_ms")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)
    }

    async fn note_device(
        &self,
        user_id: i64,
        fingerprint: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceSeen> {
        let mut tx = self.write_tx().await?;
        let known: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM known_devices WHERE user_id = $1")
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
        let updated = query!("UPDATE known_devices SET last_seen_ms = $1
                              WHERE user_id = $2 AND fingerprint = $3";
                             now_ms, user_id, fingerprint)
        .execute(&mut *tx)
        .await?;
        let seen = if D::rows_affected(&updated) > 0 {
            DeviceSeen::Known
        } else {
            query!("INSERT INTO known_devices (user_id, fingerprint, first_seen_ms, last_seen_ms)
                    VALUES ($1, $2, $3, $3) ON CONFLICT DO NOTHING";
                   user_id, fingerprint, now_ms)
            .execute(&mut *tx)
            .await?;
            if known == 0 {
                DeviceSeen::First
            } else {
                DeviceSeen::New
            }
        };
        match seen {
            DeviceSeen::New => self.commit(tx, &[]).await?,
            // Not a device to tell of: a recording store keeps its record.
            _ => tx.commit().await?,
        }
        Ok(seen)
    }

    async fn mark_password_unset(&self, user_id: i64) -> StoreResult<()> {
        query!("UPDATE users SET password_set = FALSE WHERE id = $1"; user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn find_user_by_email(&self, address: &str) -> StoreResult<Option<User>> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email IS NOT NULL
             AND LOWER(email) = LOWER($1) LIMIT 2"
        );
        let mut users: Vec<User> = sqlx::query_as(&sql)
            .bind(address)
            .fetch_all(&self.pool)
            .await?;
        Ok(match users.len() {
            1 => users.pop(),
            _ => None,
        })
    }

    async fn set_email(&self, user_id: i64, address: Option<&str>, now_ms: i64) -> StoreResult<()> {
        let verified = address.map(|_| now_ms);
        let done = query!("UPDATE users SET email = $1, email_verified_ms = $2 WHERE id = $3";
                          address, verified, user_id)
        .execute(&self.pool)
        .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(())
    }

    async fn create_email_confirmation(
        &self,
        token_hash: &str,
        user_id: i64,
        address: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        query!("DELETE FROM email_confirmations WHERE user_id = $1 AND used_ms IS NULL"; user_id)
            .execute(&mut *tx)
            .await?;
        query!("INSERT INTO email_confirmations (token_hash, user_id, address, created_ms,
                expires_ms) VALUES ($1, $2, $3, $4, $5)";
               token_hash, user_id, address, now_ms, expires_ms)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await?;
        Ok(())
    }

    async fn email_confirmation(&self, token_hash: &str) -> StoreResult<Option<(i64, String)>> {
        Ok(
            query_as!("SELECT user_id, address FROM email_confirmations WHERE token_hash = $1";
                     token_hash)
            .fetch_optional(&self.pool)
            .await?,
        )
    }

    async fn confirm_email(&self, token_hash: &str, now_ms: i64) -> StoreResult<EmailConfirmation> {
        let mut tx = self.write_tx().await?;
        let row: Option<(i64, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT user_id, address, expires_ms, used_ms FROM email_confirmations
             WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((user_id, address, expires_ms, used_ms)) = row else {
            return Ok(EmailConfirmation::Unknown);
        };
        if used_ms.is_some() {
            return Ok(EmailConfirmation::Used);
        }
        if expires_ms <= now_ms {
            return Ok(EmailConfirmation::Expired);
        }
        let previous: Option<String> = sqlx::query_scalar("SELECT email FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&mut *tx)
            .await?
            .flatten();
        let used = query!("UPDATE email_confirmations SET used_ms = $1 WHERE token_hash = $2
                           AND used_ms IS NULL AND expires_ms > $1"; now_ms, token_hash)
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&used) != 1 {
            return Ok(EmailConfirmation::Used);
        }
        query!("UPDATE users SET email = $1, email_verified_ms = $2 WHERE id = $3";
               &address, now_ms, user_id)
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await?;
        Ok(EmailConfirmation::Confirmed {
            user_id,
            address,
            previous,
        })
    }

    async fn list_audit(
        &self,
        user_id: Option<i64>,
        since_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEntry>> {
        Ok(query_as!(
            "SELECT at_ms, event, outcome, user_id, user_name, ip, user_agent, session_id, detail
             FROM audit_log WHERE at_ms >= $1 AND (CAST($2 AS BIGINT) IS NULL OR user_id = $2)
             ORDER BY id DESC LIMIT $3";
            since_ms, user_id, limit_of(limit),
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn bind_media_token(&self, b: &NewMediaBinding) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let s = &b.session;
        let sid = s.id.to_string();
        // Race-free under the writer lock: no other binding runs until this one commits.
        let existing = query!("SELECT 1 FROM media_tokens WHERE token_hash = $1"; &b.token_hash)
            .fetch_optional(&mut *tx)
            .await?;
        if existing.is_some() {
            return Ok(Vec::new());
        }
        Self::insert_session(&mut tx, s).await?;
        query!(
            "INSERT INTO media_tokens (session_id, token_hash, token_sealed, route, media_user_id,
             media_user, device_id, client, device_name, version, logged_out_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
            &sid, &b.token_hash, &b.token_sealed, &b.route, &b.media_user_id, &b.media_user,
            &b.device_id, &b.client, &b.device_name, &b.version,
            // Without a sealed copy (a Plex token) no upstream logout can ever be owed.
            b.token_sealed.is_empty().then_some(s.created_ms),
        )
        .execute(&mut *tx)
        .await?;
        let user_name: String = query_scalar!("SELECT name FROM users WHERE id = $1"; s.user_id)
            .fetch_one(&mut *tx)
            .await?;
        let bound = RevocationEvent::MediaBound {
            sid: s.id,
            user_id: s.user_id,
            user_name,
            token_hash: b.token_hash.clone(),
            issued_ms: s.created_ms,
            expires_ms: s.expires_ms,
        };
        let mut events = vec![Self::append(&mut tx, s.created_ms, bound).await?];
        // The media server deleted the older tokens of this device and user when it minted
        // the new one: end their sessions here, with no upstream logout owed.
        let older: Vec<(SessionId, i64, i64)> = query_as!(
            "UPDATE sessions SET revoked_ms = $1
             WHERE revoked_ms IS NULL AND id IN (
                 SELECT session_id FROM media_tokens
                 WHERE route = $2 AND media_user_id = $3 AND device_id = $4 AND session_id != $5)
             RETURNING id, user_id, expires_ms";
            s.created_ms, &b.route, &b.media_user_id, &b.device_id, &sid,
        )
        .fetch_all(&mut *tx)
        .await?;
        for (older_sid, _, _) in &older {
            query!("UPDATE media_tokens SET logged_out_ms = $1, token_sealed = ''
                    WHERE session_id = $2"; s.created_ms, older_sid.to_string())
            .execute(&mut *tx)
            .await?;
        }
        Self::append_revoked(&mut tx, s.created_ms, &older, &mut events).await?;
        self.commit(tx, &events).await?;
        Ok(events)
    }

    async fn owed_media_logouts(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<OwedLogout>> {
        Ok(query_as!("SELECT m.session_id AS sid, m.route, m.token_sealed, m.client, m.device_name,
                      m.device_id, m.version, m.logout_attempts AS attempts
                      FROM media_tokens m JOIN sessions s ON s.id = m.session_id
                      WHERE m.logged_out_ms IS NULL AND m.next_attempt_ms <= $1
                      AND (s.revoked_ms IS NOT NULL OR s.expires_ms <= $1)
                      ORDER BY m.next_attempt_ms, s.created_ms LIMIT $2"; now_ms, limit_of(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn media_logout_done(&self, sid: SessionId, now_ms: i64) -> StoreResult<()> {
        query!("UPDATE media_tokens SET logged_out_ms = $1, token_sealed = ''
                WHERE session_id = $2"; now_ms, sid.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn media_logout_failed(&self, sid: SessionId, next_ms: i64) -> StoreResult<()> {
        query!("UPDATE media_tokens SET logout_attempts = logout_attempts + 1, next_attempt_ms = $1
                WHERE session_id = $2"; next_ms, sid.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn end_idle_media_sessions(
        &self,
        route: &str,
        idle_before_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let rows: Vec<(SessionId, i64, i64)> = query_as!(
            "UPDATE sessions SET revoked_ms = $1
             WHERE revoked_ms IS NULL AND kind = 'media' AND last_seen_ms < $2 AND id IN (
                 SELECT session_id FROM media_tokens WHERE route = $3)
             RETURNING id, user_id, expires_ms";
            now_ms, idle_before_ms, route,
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut events = Vec::with_capacity(rows.len());
        Self::append_revoked(&mut tx, now_ms, &rows, &mut events).await?;
        self.commit(tx, &events).await?;
        Ok(events)
    }

    async fn append_media_note(
        &self,
        note: &MediaNote,
        until_ms: i64,
        now_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let note = RevocationEvent::MediaNote {
            note: note.clone(),
            until_ms,
        };
        let event = Self::append(&mut tx, now_ms, note).await?;
        self.commit(tx, std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn purge_expired(
        &self,
        now_ms: i64,
        keep_ms: i64,
        audit_keep_ms: i64,
    ) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        let kept_until = now_ms.saturating_sub(keep_ms);
        // Sessions long expired, unless their media token is still owed an upstream logout.
        // Revoked sessions whose tokens would have expired anyway, spent media bindings and
        // notes: the view drops them too.
        let deletes: [(&str, i64); 8] = [
            (
                "DELETE FROM sessions WHERE expires_ms <= $1 AND id NOT IN (
                     SELECT session_id FROM media_tokens WHERE logged_out_ms IS NULL)",
                kept_until,
            ),
            (
                "DELETE FROM revocation_events
                 WHERE kind IN ('session_revoked', 'media_bound', 'media_note')
                   AND expires_ms <= $1",
                now_ms,
            ),
            (
                "DELETE FROM oidc_logout_jtis WHERE expires_ms <= $1",
                now_ms,
            ),
            ("DELETE FROM oidc_ended_sids WHERE expires_ms <= $1", now_ms),
            ("DELETE FROM reset_links WHERE expires_ms <= $1", kept_until),
            (
                "DELETE FROM email_confirmations WHERE expires_ms <= $1",
                kept_until,
            ),
            (
                "DELETE FROM outbox WHERE (sent_ms IS NOT NULL AND sent_ms <= $1)
                    OR (failed_ms IS NOT NULL AND failed_ms <= $1)",
                kept_until,
            ),
            (
                "DELETE FROM audit_log WHERE at_ms <= $1",
                now_ms.saturating_sub(audit_keep_ms),
            ),
        ];
        let mut deleted = 0;
        for (sql, before) in deletes {
            deleted += D::rows_affected(&query!(sql; before).execute(&mut *tx).await?);
        }
        self.commit(tx, &[]).await?;
        Ok(deleted)
    }

    async fn groups_of(&self, user_id: i64) -> StoreResult<Vec<String>> {
        let mut conn = self.pool.acquire().await?;
        Self::groups_in(&mut conn, user_id).await
    }

    async fn list_groups(&self) -> StoreResult<Vec<(String, i64)>> {
        Ok(query_as!(
            "SELECT 'admins' AS name, COUNT(*) AS members FROM users WHERE is_admin
             UNION ALL
             SELECT name, COUNT(*) AS members FROM user_groups GROUP BY name
             ORDER BY name";
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn set_group(
        &self,
        user_id: i64,
        group: &str,
        member: bool,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        // No such user: `NotFound`.
        Self::groups_in(&mut tx, user_id).await?;
        let done = if group == "admins" {
            query!("UPDATE users SET is_admin = $1 WHERE id = $2 AND is_admin <> $1";
                   member, user_id)
            .execute(&mut *tx)
            .await?
        } else if member {
            query!("INSERT INTO user_groups (user_id, name) VALUES ($1, $2)
                    ON CONFLICT DO NOTHING"; user_id, group)
            .execute(&mut *tx)
            .await?
        } else {
            query!("DELETE FROM user_groups WHERE user_id = $1 AND name = $2"; user_id, group)
                .execute(&mut *tx)
                .await?
        };
        if D::rows_affected(&done) == 0 {
            return Ok(None);
        }
        let event = Self::groups_event(&mut tx, user_id, now_ms).await?;
        self.commit(tx, std::slice::from_ref(&event)).await?;
        Ok(Some(event))
    }

    async fn link_oidc(
        &self,
        provider: &str,
        issuer: &str,
        subject: &str,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        query!("INSERT INTO oidc_links (provider, issuer, subject, user_id, created_ms)
                VALUES ($1, $2, $3, $4, $5)"; provider, issuer, subject, user_id, now_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("a link to {provider} for this user or subject"))
            } else if matches!(&e, sqlx::Error::Database(d) if d.is_foreign_key_violation()) {
                StoreError::NotFound(format!("user {user_id}"))
            } else {
                unavailable(e)
            }
        })?;
        Ok(())
    }

    async fn find_oidc_link(
        &self,
        provider: &str,
        issuer: &str,
        subject: &str,
    ) -> StoreResult<Option<i64>> {
        Ok(query_scalar!(
            "SELECT user_id FROM oidc_links WHERE provider = $1 AND subject = $2 AND issuer = $3";
            provider, subject, issuer,
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn oidc_links_of(&self, user_id: i64) -> StoreResult<Vec<OidcLink>> {
        Ok(
            query_as!("SELECT provider, issuer, subject, user_id, created_ms FROM oidc_links
                       WHERE user_id = $1 ORDER BY provider"; user_id)
            .fetch_all(&self.pool)
            .await?,
        )
    }

    async fn unlink_oidc(&self, provider: &str, user_id: i64) -> StoreResult<bool> {
        let done = query!("DELETE FROM oidc_links WHERE provider = $1 AND user_id = $2";
                          provider, user_id)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) > 0)
    }

    async fn passkey_handle(&self, user_id: i64, candidate: &str) -> StoreResult<String> {
        query!("INSERT INTO passkey_users (user_id, handle) VALUES ($1, $2)
                ON CONFLICT (user_id) DO NOTHING"; user_id, candidate)
        .execute(&self.pool)
        .await?;
        Ok(
            query_scalar!("SELECT handle FROM passkey_users WHERE user_id = $1"; user_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn passkey_user(&self, handle: &str) -> StoreResult<Option<i64>> {
        Ok(
            query_scalar!("SELECT user_id FROM passkey_users WHERE handle = $1"; handle)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn add_passkey(&self, p: &NewPasskey) -> StoreResult<i64> {
        let mut tx = self.pool.begin().await?;
        let id = query_scalar!("INSERT INTO passkeys (user_id, cred_id, rp_id, label, aaguid, credential,
                counter, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id";
                p.user_id, &p.cred_id, &p.rp_id, &p.label, &p.aaguid, &p.credential, p.counter,
                p.created_ms)
        .fetch_one(&mut *tx)
        .await
        .map_err(passkey_conflict)?;
        self.commit(tx, &[]).await?;
        Ok(id)
    }

    async fn find_passkey(&self, cred_id: &str) -> StoreResult<Option<PasskeyRecord>> {
        let sql = format!("{PASSKEY_SELECT} WHERE cred_id = $1");
        Ok(query_as!(&sql; cred_id).fetch_optional(&self.pool).await?)
    }

    async fn passkeys_of(&self, user_id: i64) -> StoreResult<Vec<PasskeyRecord>> {
        let sql = format!("{PASSKEY_SELECT} WHERE user_id = $1 ORDER BY id");
        Ok(query_as!(&sql; user_id).fetch_all(&self.pool).await?)
    }

    async fn record_passkey_use(
        &self,
        id: i64,
        before: i64,
        credential: &str,
        counter: i64,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let done = query!("UPDATE passkeys SET credential = $1, counter = $2, last_used_ms = $3
                           WHERE id = $4 AND counter = $5 AND ($2 > $5 OR $2 = 0)";
                          credential, counter, now_ms, id, before)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) > 0)
    }

    async fn flag_passkey_clone(&self, id: i64, now_ms: i64) -> StoreResult<()> {
        query!("UPDATE passkeys SET clone_warning_ms = $1 WHERE id = $2"; now_ms, id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn rename_passkey(&self, user_id: i64, id: i64, label: &str) -> StoreResult<bool> {
        let done = query!("UPDATE passkeys SET label = $1 WHERE id = $2 AND user_id = $3";
                          label, id, user_id)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) > 0)
    }

    async fn remove_passkey(&self, user_id: i64, id: i64, keep_last: bool) -> StoreResult<bool> {
        let mut tx = self.write_tx().await?;
        let done = query!("DELETE FROM passkeys WHERE id = $1 AND user_id = $2 AND (NOT $3
                           OR EXISTS (SELECT 1 FROM passkeys WHERE user_id = $2 AND id <> $1))";
                          id, user_id, keep_last)
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&done) == 0 {
            let kept: i64 =
                query_scalar!("SELECT COUNT(*) FROM passkeys WHERE id = $1 AND user_id = $2";
                              id, user_id)
                .fetch_one(&mut *tx)
                .await?;
            if kept > 0 {
                return Err(StoreError::Conflict("the user's last passkey".into()));
            }
            return Ok(false);
        }
        self.commit(tx, &[]).await?;
        Ok(true)
    }

    async fn passkey_rp_ids(&self) -> StoreResult<Vec<String>> {
        Ok(
            query_scalar!("SELECT DISTINCT rp_id FROM passkeys ORDER BY rp_id";)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn put_ceremony(&self, c: &Ceremony, now_ms: i64) -> StoreResult<()> {
        query!("DELETE FROM webauthn_ceremonies WHERE expires_ms <= $1"; now_ms)
            .execute(&self.pool)
            .await?;
        query!("INSERT INTO webauthn_ceremonies (id, purpose, user_id, state, expires_ms)
                VALUES ($1, $2, $3, $4, $5)"; &c.id, &c.purpose, c.user_id, &c.state, c.expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_ceremony(
        &self,
        id: &str,
        purpose: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Ceremony>> {
        let taken: Option<Ceremony> = query_as!(
            "DELETE FROM webauthn_ceremonies WHERE id = $1 AND purpose = $2
             RETURNING id, purpose, user_id, state, expires_ms"; id, purpose)
        .fetch_optional(&self.pool)
        .await?;
        Ok(taken.filter(|c| c.expires_ms > now_ms))
    }

    async fn note_plex_account(
        &self,
        account_id: &str,
        username: &str,
        title: &str,
        now_ms: i64,
    ) -> StoreResult<PlexAccount> {
        query!("INSERT INTO plex_accounts (account_id, username, title, first_seen_ms, last_seen_ms)
                VALUES ($1, $2, $3, $4, $4)
                ON CONFLICT (account_id) DO UPDATE SET username = $2, title = $3, last_seen_ms = $4";
               account_id, username, title, now_ms)
        .execute(&self.pool)
        .await?;
        self.find_plex_account(account_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("plex account {account_id}")))
    }

    async fn find_plex_account(&self, key: &str) -> StoreResult<Option<PlexAccount>> {
        let sql = format!(
            "{PLEX_ACCOUNT_SELECT} WHERE p.account_id = $1 OR LOWER(p.username) = LOWER($1)
             ORDER BY (p.account_id = $1) DESC LIMIT 1"
        );
        Ok(query_as!(&sql; key).fetch_optional(&self.pool).await?)
    }

    async fn list_plex_accounts(&self, user_id: Option<i64>) -> StoreResult<Vec<PlexAccount>> {
        let sql = format!(
            "{PLEX_ACCOUNT_SELECT} WHERE CAST($1 AS BIGINT) IS NULL OR p.user_id = $1
             OR (p.user_id IS NULL AND p.offered_user_id = $1) ORDER BY p.username"
        );
        Ok(query_as!(&sql; user_id).fetch_all(&self.pool).await?)
    }

    async fn link_plex_account(
        &self,
        account_id: &str,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        let current: Option<(Option<i64>,)> =
            query_as!("SELECT user_id FROM plex_accounts WHERE account_id = $1"; account_id)
                .fetch_optional(&mut *tx)
                .await?;
        match current {
            None => return Err(StoreError::NotFound(format!("plex account {account_id}"))),
            Some((Some(other),)) if other != user_id => {
                return Err(StoreError::Conflict(format!(
                    "plex account {account_id} is linked to another user"
                )))
            }
            Some((Some(_),)) => return Ok(()),
            Some((None,)) => {}
        }
        query!("UPDATE plex_accounts SET user_id = $1, linked_ms = $2, offered_user_id = NULL,
                offered_ms = NULL WHERE account_id = $3"; user_id, now_ms, account_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if matches!(&e, sqlx::Error::Database(d) if d.is_foreign_key_violation()) {
                StoreError::NotFound(format!("user {user_id}"))
            } else {
                unavailable(e)
            }
        })?;
        self.commit(tx, &[]).await
    }

    async fn unlink_plex_account(
        &self,
        account_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>> {
        let mut tx = self.write_tx().await?;
        let done = query!("UPDATE plex_accounts SET user_id = NULL, linked_ms = NULL
                           WHERE account_id = $1 AND user_id IS NOT NULL"; account_id)
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&done) == 0 {
            return Ok(None);
        }
        let ended = Self::end_plex_tokens(&mut tx, account_id, None, now_ms).await?;
        let mut events = Vec::new();
        Self::append_revoked(&mut tx, now_ms, &ended, &mut events).await?;
        self.commit(tx, &events).await?;
        Ok(Some(events))
    }

    async fn offer_plex_link(
        &self,
        account_id: &str,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        query!("UPDATE plex_accounts SET offered_user_id = $1, offered_ms = $2
                WHERE account_id = $3 AND user_id IS NULL"; user_id, now_ms, account_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn note_plex_device(&self, d: &PlexDevice) -> StoreResult<PlexDevice> {
        query!("INSERT INTO plex_devices (account_id, client_id, product, device_name, platform, ip,
                first_seen_ms, last_seen_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
                ON CONFLICT (account_id, client_id) DO UPDATE SET product = $3, device_name = $4,
                platform = $5, ip = $6, last_seen_ms = $7";
               &d.account_id, &d.client_id, &d.product, &d.device_name, &d.platform, &d.ip,
               d.last_seen_ms)
        .execute(&self.pool)
        .await?;
        let sql = format!("{PLEX_DEVICE_SELECT} WHERE account_id = $1 AND client_id = $2");
        Ok(query_as!(&sql; &d.account_id, &d.client_id)
            .fetch_one(&self.pool)
            .await?)
    }

    async fn list_plex_devices(&self, user_id: Option<i64>) -> StoreResult<Vec<PlexDevice>> {
        let sql = format!(
            "{PLEX_DEVICE_SELECT} WHERE CAST($1 AS BIGINT) IS NULL OR account_id IN
             (SELECT account_id FROM plex_accounts WHERE user_id = $1)
             ORDER BY last_seen_ms DESC"
        );
        Ok(query_as!(&sql; user_id).fetch_all(&self.pool).await?)
    }

    async fn approve_plex_device(
        &self,
        account_id: &str,
        client_id: &str,
        by_user: i64,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let done = query!("UPDATE plex_devices SET approved_ms = $1, approved_by = $2
                           WHERE account_id = $3 AND client_id = $4";
                          now_ms, by_user, account_id, client_id)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) > 0)
    }

    async fn revoke_plex_device(
        &self,
        account_id: &str,
        client_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>> {
        let mut tx = self.write_tx().await?;
        let done = query!("UPDATE plex_devices SET approved_ms = NULL, approved_by = NULL
                           WHERE account_id = $1 AND client_id = $2"; account_id, client_id)
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&done) == 0 {
            return Ok(None);
        }
        let ended = Self::end_plex_tokens(&mut tx, account_id, Some(client_id), now_ms).await?;
        let mut events = Vec::new();
        Self::append_revoked(&mut tx, now_ms, &ended, &mut events).await?;
        self.commit(tx, &events).await?;
        Ok(Some(events))
    }

    async fn unlink_all_oidc(&self) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM oidc_links")
            .execute(&self.pool)
            .await?;
        Ok(D::rows_affected(&done))
    }

    async fn record_oidc_session(&self, o: &OidcSession, now_ms: i64) -> StoreResult<bool> {
        // Under the writer lock, as the back-channel logout that would end the provider
        // session: one of the two always sees the other.
        let mut tx = self.write_tx().await?;
        if let Some(oidc_sid) = &o.oidc_sid {
            let ended = query!("SELECT 1 FROM oidc_ended_sids
                                WHERE provider = $1 AND oidc_sid = $2 AND expires_ms > $3";
                               &o.provider, oidc_sid, now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            if ended.is_some() {
                return Ok(false);
            }
        }
        query!("INSERT INTO oidc_sessions
                (session_id, provider, subject, oidc_sid, id_token_sealed, amr)
                VALUES ($1, $2, $3, $4, $5, $6)";
               o.session_id.to_string(), &o.provider, &o.subject, o.oidc_sid.as_deref(),
               &o.id_token_sealed, o.amr.join(" "))
        .execute(&mut *tx)
        .await?;
        self.commit(tx, &[]).await?;
        Ok(true)
    }

    async fn get_oidc_session(&self, session_id: SessionId) -> StoreResult<Option<OidcSession>> {
        let row: Option<(String, String, Option<String>, String, String)> =
            query_as!("SELECT provider, subject, oidc_sid, id_token_sealed, amr FROM oidc_sessions
                       WHERE session_id = $1"; session_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(
            |(provider, subject, oidc_sid, id_token_sealed, amr)| OidcSession {
                session_id,
                provider,
                subject,
                oidc_sid,
                id_token_sealed,
                amr: amr.split_whitespace().map(str::to_string).collect(),
            },
        ))
    }

    async fn oidc_backchannel_logout(
        &self,
        l: &BackchannelLogout,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>> {
        let mut tx = self.write_tx().await?;
        let fresh = query!(
            "INSERT INTO oidc_logout_jtis (provider, jti, expires_ms) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING";
            &l.provider, &l.jti, l.jti_expires_ms,
        )
        .execute(&mut *tx)
        .await?;
        if D::rows_affected(&fresh) == 0 {
            return Ok(None);
        }
        let mut events = Vec::new();
        match (&l.oidc_sid, &l.subject) {
            (Some(oidc_sid), subject) => {
                // Remembered as ended, so that a login through it still waiting at a gateway
                // step cannot create a session after this.
                query!("INSERT INTO oidc_ended_sids (provider, oidc_sid, expires_ms)
                        VALUES ($1, $2, $3)
                        ON CONFLICT (provider, oidc_sid) DO UPDATE SET expires_ms =
                        CASE WHEN oidc_ended_sids.expires_ms < excluded.expires_ms
                        THEN excluded.expires_ms ELSE oidc_ended_sids.expires_ms END";
                       &l.provider, oidc_sid, l.ended_until_ms)
                .execute(&mut *tx)
                .await?;
                // The provider session's gateway sessions, then the media sessions of their
                // users (a media binding does not record the web session it came through).
                let rows: Vec<(SessionId, i64, i64)> = query_as!(
                    "UPDATE sessions SET revoked_ms = $1
                     WHERE revoked_ms IS NULL AND expires_ms > $1 AND id IN (
                         SELECT session_id FROM oidc_sessions
                         WHERE provider = $2 AND oidc_sid = $3
                           AND (CAST($4 AS TEXT) IS NULL OR subject = $4))
                     RETURNING id, user_id, expires_ms";
                    now_ms, &l.provider, oidc_sid, subject.as_deref(),
                )
                .fetch_all(&mut *tx)
                .await?;
                let mut users: Vec<i64> = Vec::new();
                for &(_, user_id, _) in &rows {
                    if !users.contains(&user_id) {
                        users.push(user_id);
                    }
                }
                Self::append_revoked(&mut tx, now_ms, &rows, &mut events).await?;
                for user_id in users {
                    let rows: Vec<(SessionId, i64, i64)> = query_as!(
                        "UPDATE sessions SET revoked_ms = $1
                         WHERE revoked_ms IS NULL AND expires_ms > $1 AND user_id = $2
                         AND kind = 'media'
                         RETURNING id, user_id, expires_ms";
                        now_ms, user_id,
                    )
                    .fetch_all(&mut *tx)
                    .await?;
                    Self::append_revoked(&mut tx, now_ms, &rows, &mut events).await?;
                }
            }
            (None, Some(subject)) => {
                let user: Option<i64> = query_scalar!(
                    "SELECT user_id FROM oidc_links
                     WHERE provider = $1 AND subject = $2 AND issuer = $3";
                    &l.provider, subject, &l.issuer,
                )
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(user_id) = user {
                    events.push(Self::cutoff_user(&mut tx, user_id, now_ms).await?);
                }
            }
            (None, None) => {}
        }
        self.commit(tx, &events).await?;
        Ok(Some(events))
    }

    fn announcements(&self) -> Option<watch::Receiver<Announcement>> {
        self.announcements.clone()
    }

    async fn events_since(&self, after: i64, limit: i64) -> StoreResult<Vec<SequencedEvent>> {
        let rows = query!(
            "SELECT e.seq, e.kind, e.session_id, e.user_id, e.at_ms, e.expires_ms, e.key_id,
                 e.token_hash, e.detail, u.name AS user_name
                 FROM revocation_events e LEFT JOIN users u ON u.id = e.user_id
                 WHERE e.seq > $1 ORDER BY e.seq LIMIT $2";
            after, limit_of(limit),
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(Self::event_from_row).collect()
    }

    async fn snapshot(&self, now_ms: i64) -> StoreResult<Snapshot> {
        // One snapshot of the database for every query below.
        let mut tx = self.pool.begin_with(D::BEGIN_READ).await?;
        let seq: i64 = sqlx::query_scalar(D::LAST_SEQ).fetch_one(&mut *tx).await?;
        let revoked = tokio::spawn(D::revoked_sessions(self.pool.clone(), seq, now_ms));
        // The latest cutoff per user, as one string (a hundred thousand users are one row).
        let cutoffs: Option<String> = query_scalar!(
            "SELECT string_agg(user_id || ':' || at_ms, ',' ORDER BY user_id) FROM (
                 SELECT user_id, MAX(at_ms) AS at_ms FROM revocation_events
                 WHERE kind = 'user_cutoff' AND seq <= $1 GROUP BY user_id) AS c";
            seq,
        )
        .fetch_one(&mut *tx)
        .await?;
        let user_cutoffs = super::parse_pairs(cutoffs.as_deref().unwrap_or(""))?;
        let global_cutoff: Option<i64> = query_scalar!(
            "SELECT MAX(at_ms) FROM revocation_events WHERE kind = 'global_cutoff' AND seq <= $1";
            seq,
        )
        .fetch_one(&mut *tx)
        .await?;
        let disabled_users: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM users WHERE disabled ORDER BY id")
                .fetch_all(&mut *tx)
                .await?;
        let retired_keys: Vec<String> = sqlx::query_scalar::<_, Option<String>>(
            "SELECT DISTINCT key_id FROM revocation_events
             WHERE kind = 'key_retired' AND seq <= $1 ORDER BY key_id",
        )
        .bind(seq)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .flatten()
        .collect();
        let media_tokens: Vec<MediaTokenRow> = query_as!(
            "SELECT m.token_hash, s.id AS sid, s.user_id, u.name AS user_name,
                    s.created_ms AS issued_ms, s.expires_ms
             FROM media_tokens m JOIN sessions s ON s.id = m.session_id
             JOIN users u ON u.id = s.user_id
             WHERE s.expires_ms > $1";
            now_ms,
        )
        .fetch_all(&mut *tx)
        .await?;
        let groups: Vec<(i64, String)> = query_as!(
            "SELECT id AS user_id, 'admins' AS name FROM users WHERE is_admin
             UNION ALL
             SELECT user_id, name FROM user_groups
             ORDER BY user_id, name";
        )
        .fetch_all(&mut *tx)
        .await?;
        self.commit(tx, &[]).await?;
        let revoked = revoked
            .await
            .map_err(|e| StoreError::Corrupt(format!("reading revoked sessions: {e}")))??;
        Ok(Snapshot {
            seq,
            revoked,
            user_cutoffs,
            global_cutoff,
            disabled_users,
            retired_keys,
            media_tokens,
            groups,
        })
    }
}
