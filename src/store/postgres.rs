//! The PostgreSQL store, for several gateway instances sharing one database. Same tables and
//! the same semantics as `store::sqlite`; what differs is how the two properties that SQLite gets
//! from its single writer lock are kept here.
//!
//! **Sequence numbers in commit order, without gaps.** A reader that has seen event `seq` N
//! must have seen every event before it, or it would skip a revocation for good. A PostgreSQL
//! sequence (or `BIGSERIAL`) hands numbers out when a row is inserted, not when its transaction
//! commits: transaction A takes 7, transaction B takes 8 and commits first, a reader sees 8 and
//! moves its cursor past 7 before A commits. So every write transaction here starts with
//! `pg_advisory_xact_lock(WRITER_LOCK)`, held until it commits or rolls back, and only then
//! numbers its events from the one-row counter `revocation_seq` (the newest number handed out;
//! a separate row rather than `MAX(seq) + 1` because purging may delete the newest event, and a
//! number must never be handed out twice, which SQLite's AUTOINCREMENT promises too). Numbers
//! are therefore handed out in commit order with no holes, except those `purge_expired` makes on
//! purpose (the view rebuilds from a snapshot when it finds one).
//!
//! Taking the lock first, before any row is touched, also makes every write transaction run as
//! if it were alone, exactly like SQLite's `BEGIN IMMEDIATE`: no two bulk `UPDATE`s of
//! `sessions` can deadlock on row locks taken in different orders, and check-then-insert steps
//! (a media token bound twice) cannot race. Waiting for the lock is bounded by the busy timeout
//! (`SET LOCAL lock_timeout`), after which the call fails as unavailable, as SQLite's does.
//! Single-statement writes (a new session, a failed login) need no lock and do not take it.
//! The lock is per database: deployments in different schemas of one database (as the tests
//! are) serialise their writes with each other, which costs throughput, never correctness.
//!
//! **Push.** A transaction that appends events also calls
//! `pg_notify('portcullis_events', '<schema>:<seq>')` with its highest number; PostgreSQL
//! delivers the notification only when (and if) the transaction commits. A task started by
//! `open` LISTENs on a connection of its own and publishes the highest number seen, per
//! [`Announcement`], on a `watch` channel. The payload names the schema because notifications
//! are database-wide, and gateways (or tests) in different schemas of one database must not
//! hear each other.
//!
//! Reads that must agree with each other (`snapshot`) run in one `REPEATABLE READ READ ONLY`
//! transaction. Booleans are `BOOLEAN`; times, ids and counters are `BIGINT` (`i64`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow, Postgres,
};
use sqlx::{Executor, Row};
use tokio::sync::watch;

use super::{
    Announcement, AuditEntry, BackchannelLogout, MediaNote, MediaTokenRow, NewMediaBinding,
    NewSession, OidcLink, OidcSession, OwedLogout, ResetLinkState, RevocationEvent, SequencedEvent,
    SessionId, SessionKind, SessionRecord, Snapshot, Store, StoreError, StoreResult, User,
};

/// Migrations for this backend. `Migrator::run` holds a session-level
/// `pg_advisory_lock` (keyed by the database name; sqlx-postgres `Migrate::lock`) while it
/// applies them, so replicas that start together apply each migration once, one after another.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The newest schema version (migration) this binary knows.
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The advisory lock every event-appending (and every other multi-statement write) transaction
/// takes first. Fixed for all Portcullis databases: "portcull" in ASCII. It is not a multiple
/// of 0x3d32ad9e, so it can never equal the key of sqlx's migration lock (0x3d32ad9e times the
/// CRC-32 of the database name).
const WRITER_LOCK: i64 = 0x706f_7274_6375_6c6c;

/// The NOTIFY channel on which committed events are announced.
const CHANNEL: &str = "portcullis_events";

const POOL_SIZE: u32 = 8;
/// How long the announcement task waits before reconnecting, at first and at most.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one attempt to open the announcement connection may take.
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const KIND_SESSION: &str = "session_revoked";
const KIND_USER_CUTOFF: &str = "user_cutoff";
const KIND_GLOBAL_CUTOFF: &str = "global_cutoff";
const KIND_USER_DISABLED: &str = "user_disabled";
const KIND_USER_ENABLED: &str = "user_enabled";
const KIND_KEY_RETIRED: &str = "key_retired";
const KIND_MEDIA_BOUND: &str = "media_bound";
const KIND_MEDIA_NOTE: &str = "media_note";

const USER_COLUMNS: &str = "id, name, password_hash, is_admin, disabled, created_ms, must_reset,
     failed_logins, locked_until_ms, last_failure_ms, totp_secret, totp_enabled, totp_last_step";

const SESSION_COLUMNS: &str = "s.id, s.user_id, u.name AS user_name, s.kind, s.user_agent, s.ip,
     s.created_ms, s.last_seen_ms, s.expires_ms, s.revoked_ms";

type Tx = sqlx::Transaction<'static, Postgres>;

pub struct PgStore {
    pool: PgPool,
    /// `SET LOCAL lock_timeout …; SELECT pg_advisory_xact_lock(…)`, sent as one round trip at
    /// the start of every write transaction.
    lock_sql: String,
    announcements: watch::Receiver<Announcement>,
    /// Ends the announcement task when the store is dropped.
    _listener: AbortOnDrop,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A negative limit means "no limit", as in SQLite; PostgreSQL spells that `LIMIT NULL`.
fn limit_of(limit: i64) -> Option<i64> {
    (limit >= 0).then_some(limit)
}

/// Where the database is, for error messages: never the password.
fn describe(options: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    )
}

impl PgStore {
    /// Connects (a pool of 8), brings the schema up to date and starts listening for
    /// announcements. The URL is parsed by `PgConnectOptions`, so its query parameters are
    /// honoured, `options=-c search_path=…` included (a gateway, or a test, can live in a
    /// schema of its own). `busy_timeout` bounds the wait for a pooled connection and for the
    /// writer lock.
    pub async fn open(url: &str, busy_timeout: Duration) -> StoreResult<PgStore> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::Open {
            path: "<postgres url>".to_string(),
            message: e.to_string(),
        })?;
        let where_ = describe(&options);
        let open_err = |message: String| StoreError::Open {
            path: where_.clone(),
            message,
        };
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(busy_timeout + Duration::from_secs(1))
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        if let Err(e) = MIGRATOR.run(&pool).await {
            let applied: Option<i64> =
                sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
                    .fetch_one(&pool)
                    .await
                    .ok()
                    .flatten();
            return Err(super::migrate_error(e, applied, schema_version()));
        }
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let schema =
            schema.ok_or_else(|| open_err("no schema of the search_path exists".to_string()))?;

        // The announcement connection lives in a pool of its own so that it is never counted
        // against (or starved by) the query pool, and is re-dialled by the same options.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(LISTEN_CONNECT_TIMEOUT)
            .connect_lazy_with(options);
        // Listen before returning, so that whatever commits after `open` is announced.
        let first = match subscribe(&listen_pool).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for store announcements yet; retrying");
                None
            }
        };
        let (tx, rx) = watch::channel(Announcement {
            seq: 0,
            generation: u64::from(first.is_some()),
            connected: first.is_some(),
        });
        let task = tokio::spawn(listen(listen_pool, schema, tx, first));

        let lock_ms = busy_timeout.as_millis().clamp(1, i64::MAX as u128);
        Ok(PgStore {
            pool,
            lock_sql: format!(
                "SET LOCAL lock_timeout = '{lock_ms}ms'; SELECT pg_advisory_xact_lock({WRITER_LOCK})"
            ),
            announcements: rx,
            _listener: AbortOnDrop(task),
        })
    }

    /// A write transaction holding the writer lock (see the module documentation).
    async fn write_tx(&self) -> StoreResult<Tx> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // A plain string is sent as a simple query: both statements in one round trip.
        (&mut *tx)
            .execute(self.lock_sql.as_str())
            .await
            .map_err(unavailable)?;
        Ok(tx)
    }

    /// Commits, first announcing the highest event number written (delivered at commit).
    async fn commit(mut tx: Tx, events: &[SequencedEvent]) -> StoreResult<()> {
        if let Some(last) = events.iter().map(|e| e.seq).max() {
            sqlx::query("SELECT pg_notify($1, current_schema() || ':' || $2::BIGINT::TEXT)")
                .bind(CHANNEL)
                .bind(last)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    /// Appends one event under the writer lock (held by `tx`) and numbers it. `at_ms` is the
    /// time recorded for events that carry none of their own.
    async fn append(
        tx: &mut PgConnection,
        at_ms: i64,
        event: RevocationEvent,
    ) -> StoreResult<SequencedEvent> {
        let detail = match &event {
            RevocationEvent::MediaNote { note, .. } => Some(
                serde_json::to_string(note)
                    .map_err(|e| StoreError::Corrupt(format!("a media note: {e}")))?,
            ),
            _ => None,
        };
        let (kind, session_id, user_id, at_ms, expires_ms, key_id, token_hash) = match &event {
            RevocationEvent::SessionRevoked {
                sid,
                user_id,
                expires_ms,
            } => (
                KIND_SESSION,
                Some(sid.to_string()),
                Some(*user_id),
                at_ms,
                Some(*expires_ms),
                None,
                None,
            ),
            RevocationEvent::UserCutoff { user_id, at_ms } => (
                KIND_USER_CUTOFF,
                None,
                Some(*user_id),
                *at_ms,
                None,
                None,
                None,
            ),
            RevocationEvent::GlobalCutoff { at_ms } => {
                (KIND_GLOBAL_CUTOFF, None, None, *at_ms, None, None, None)
            }
            RevocationEvent::UserDisabled { user_id } => (
                KIND_USER_DISABLED,
                None,
                Some(*user_id),
                at_ms,
                None,
                None,
                None,
            ),
            RevocationEvent::UserEnabled { user_id } => (
                KIND_USER_ENABLED,
                None,
                Some(*user_id),
                at_ms,
                None,
                None,
                None,
            ),
            RevocationEvent::KeyRetired { kid } => (
                KIND_KEY_RETIRED,
                None,
                None,
                at_ms,
                None,
                Some(kid.as_str()),
                None,
            ),
            RevocationEvent::MediaBound {
                sid,
                user_id,
                token_hash,
                issued_ms,
                expires_ms,
                ..
            } => (
                KIND_MEDIA_BOUND,
                Some(sid.to_string()),
                Some(*user_id),
                *issued_ms,
                Some(*expires_ms),
                None,
                Some(token_hash.as_str()),
            ),
            RevocationEvent::MediaNote { until_ms, .. } => (
                KIND_MEDIA_NOTE,
                None,
                None,
                at_ms,
                Some(*until_ms),
                None,
                None,
            ),
        };
        let seq: i64 = sqlx::query_scalar(
            "WITH next AS (UPDATE revocation_seq SET last = last + 1 RETURNING last)
             INSERT INTO revocation_events
                 (seq, kind, session_id, user_id, at_ms, expires_ms, key_id, token_hash, detail)
             SELECT last, $1, $2, $3, $4, $5, $6, $7, $8 FROM next
             RETURNING seq",
        )
        .bind(kind)
        .bind(session_id)
        .bind(user_id)
        .bind(at_ms)
        .bind(expires_ms)
        .bind(key_id)
        .bind(token_hash)
        .bind(detail)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        Ok(SequencedEvent { seq, event })
    }

    /// Ends every session issued at or before `at_ms` and records the global cutoff.
    async fn cutoff_everyone(tx: &mut PgConnection, at_ms: i64) -> StoreResult<SequencedEvent> {
        sqlx::query(
            "UPDATE sessions SET revoked_ms = $1 WHERE revoked_ms IS NULL AND created_ms <= $1",
        )
        .bind(at_ms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        Self::append(tx, at_ms, RevocationEvent::GlobalCutoff { at_ms }).await
    }

    /// Ends the user's sessions issued at or before `at_ms` and records the cutoff.
    async fn cutoff_user(
        tx: &mut PgConnection,
        user_id: i64,
        at_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        sqlx::query(
            "UPDATE sessions SET revoked_ms = $1
             WHERE user_id = $2 AND revoked_ms IS NULL AND created_ms <= $1",
        )
        .bind(at_ms)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        Self::append(tx, at_ms, RevocationEvent::UserCutoff { user_id, at_ms }).await
    }

    /// Records `SessionRevoked` events for sessions just ended by an `UPDATE … RETURNING id,
    /// user_id, expires_ms`.
    async fn append_revoked(
        tx: &mut PgConnection,
        at_ms: i64,
        rows: &[PgRow],
        events: &mut Vec<SequencedEvent>,
    ) -> StoreResult<()> {
        for row in rows {
            let sid = sid_from_text(row.try_get::<&str, _>(0).map_err(unavailable)?)?;
            let user_id: i64 = row.try_get(1).map_err(unavailable)?;
            let expires_ms: i64 = row.try_get(2).map_err(unavailable)?;
            events.push(
                Self::append(
                    tx,
                    at_ms,
                    RevocationEvent::SessionRevoked {
                        sid,
                        user_id,
                        expires_ms,
                    },
                )
                .await?,
            );
        }
        Ok(())
    }
}

/// Opens the announcement connection and LISTENs. Loss is reported by `try_recv` rather than
/// mended inside it, so that the task can say so and count generations.
async fn subscribe(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.eager_reconnect(false);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// The sequence number in a notification payload `<schema>:<seq>`, if it is for `schema`.
fn announced_seq(payload: &str, schema: &str) -> Option<i64> {
    let (from, seq) = payload.rsplit_once(':')?;
    if from != schema {
        return None;
    }
    seq.parse().ok()
}

/// The announcement task: publishes the highest announced sequence number; on every
/// (re)connection bumps `generation` (announcements may have been missed, so readers resync
/// fully); on loss clears `connected` and reconnects with exponential backoff. Runs until the
/// store aborts it.
async fn listen(
    pool: PgPool,
    schema: String,
    tx: watch::Sender<Announcement>,
    mut listener: Option<PgListener>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let mut current = match listener.take() {
            Some(l) => l,
            None => match subscribe(&pool).await {
                Ok(l) => {
                    tx.send_modify(|a| {
                        a.generation = a.generation.wrapping_add(1);
                        a.connected = true;
                    });
                    tracing::info!("listening for store announcements again");
                    l
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?backoff, "store announcements: cannot connect");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = BACKOFF_FIRST;
        let lost = loop {
            match current.try_recv().await {
                Ok(Some(n)) => {
                    if let Some(seq) = announced_seq(n.payload(), &schema) {
                        tx.send_if_modified(|a| {
                            let newer = seq > a.seq;
                            if newer {
                                a.seq = seq;
                            }
                            newer
                        });
                    }
                }
                Ok(None) => break "connection closed".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        tx.send_modify(|a| a.connected = false);
        tracing::warn!(error = %lost, retry_in = ?backoff, "store announcements lost; reconnecting");
        drop(current);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn user_from_row(row: &PgRow) -> StoreResult<User> {
    Ok(User {
        id: row.try_get("id").map_err(unavailable)?,
        name: row.try_get("name").map_err(unavailable)?,
        password_hash: row.try_get("password_hash").map_err(unavailable)?,
        is_admin: row.try_get("is_admin").map_err(unavailable)?,
        disabled: row.try_get("disabled").map_err(unavailable)?,
        created_ms: row.try_get("created_ms").map_err(unavailable)?,
        must_reset: row.try_get("must_reset").map_err(unavailable)?,
        failed_logins: row.try_get("failed_logins").map_err(unavailable)?,
        locked_until_ms: row.try_get("locked_until_ms").map_err(unavailable)?,
        last_failure_ms: row.try_get("last_failure_ms").map_err(unavailable)?,
        totp_secret: row.try_get("totp_secret").map_err(unavailable)?,
        totp_enabled: row.try_get("totp_enabled").map_err(unavailable)?,
        totp_last_step: row.try_get("totp_last_step").map_err(unavailable)?,
    })
}

fn audit_from_row(row: &PgRow) -> StoreResult<AuditEntry> {
    Ok(AuditEntry {
        at_ms: row.try_get("at_ms").map_err(unavailable)?,
        event: row.try_get("event").map_err(unavailable)?,
        outcome: row.try_get("outcome").map_err(unavailable)?,
        user_id: row.try_get("user_id").map_err(unavailable)?,
        user_name: row.try_get("user_name").map_err(unavailable)?,
        ip: row.try_get("ip").map_err(unavailable)?,
        user_agent: row.try_get("user_agent").map_err(unavailable)?,
        session_id: row.try_get("session_id").map_err(unavailable)?,
        detail: row.try_get("detail").map_err(unavailable)?,
    })
}

fn sid_from_text(text: &str) -> StoreResult<SessionId> {
    SessionId::parse(text).ok_or_else(|| StoreError::Corrupt(format!("session id `{text}`")))
}

fn session_from_row(row: &PgRow) -> StoreResult<SessionRecord> {
    let id: &str = row.try_get("id").map_err(unavailable)?;
    let kind: &str = row.try_get("kind").map_err(unavailable)?;
    Ok(SessionRecord {
        id: sid_from_text(id)?,
        user_id: row.try_get("user_id").map_err(unavailable)?,
        user_name: row.try_get("user_name").map_err(unavailable)?,
        kind: SessionKind::parse(kind),
        user_agent: row.try_get("user_agent").map_err(unavailable)?,
        ip: row.try_get("ip").map_err(unavailable)?,
        created_ms: row.try_get("created_ms").map_err(unavailable)?,
        last_seen_ms: row.try_get("last_seen_ms").map_err(unavailable)?,
        expires_ms: row.try_get("expires_ms").map_err(unavailable)?,
        revoked_ms: row.try_get("revoked_ms").map_err(unavailable)?,
    })
}

/// Inserts a new session row, last seen at its creation.
async fn insert_session(conn: &mut PgConnection, s: &NewSession) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, kind, user_agent, ip, created_ms, last_seen_ms, expires_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $6, $7)",
    )
    .bind(s.id.to_string())
    .bind(s.user_id)
    .bind(s.kind.as_str())
    .bind(&s.user_agent)
    .bind(&s.ip)
    .bind(s.created_ms)
    .bind(s.expires_ms)
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    Ok(())
}

fn event_from_row(row: &PgRow) -> StoreResult<SequencedEvent> {
    let seq: i64 = row.try_get("seq").map_err(unavailable)?;
    let kind: String = row.try_get("kind").map_err(unavailable)?;
    let session_id: Option<String> = row.try_get("session_id").map_err(unavailable)?;
    let user_id: Option<i64> = row.try_get("user_id").map_err(unavailable)?;
    let at_ms: i64 = row.try_get("at_ms").map_err(unavailable)?;
    let expires_ms: Option<i64> = row.try_get("expires_ms").map_err(unavailable)?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("event {seq} ({kind}) lacks {what}"));
    let event = match kind.as_str() {
        KIND_SESSION => RevocationEvent::SessionRevoked {
            sid: sid_from_text(session_id.as_deref().ok_or_else(|| corrupt("session_id"))?)?,
            user_id: user_id.ok_or_else(|| corrupt("user_id"))?,
            expires_ms: expires_ms.ok_or_else(|| corrupt("expires_ms"))?,
        },
        KIND_USER_CUTOFF => RevocationEvent::UserCutoff {
            user_id: user_id.ok_or_else(|| corrupt("user_id"))?,
            at_ms,
        },
        KIND_GLOBAL_CUTOFF => RevocationEvent::GlobalCutoff { at_ms },
        KIND_USER_DISABLED => RevocationEvent::UserDisabled {
            user_id: user_id.ok_or_else(|| corrupt("user_id"))?,
        },
        KIND_USER_ENABLED => RevocationEvent::UserEnabled {
            user_id: user_id.ok_or_else(|| corrupt("user_id"))?,
        },
        KIND_MEDIA_NOTE => RevocationEvent::MediaNote {
            note: super::parse_note(
                row.try_get::<Option<String>, _>("detail")
                    .map_err(unavailable)?
                    .as_deref(),
                seq,
            )?,
            until_ms: expires_ms.ok_or_else(|| corrupt("expires_ms"))?,
        },
        KIND_MEDIA_BOUND => RevocationEvent::MediaBound {
            sid: sid_from_text(session_id.as_deref().ok_or_else(|| corrupt("session_id"))?)?,
            user_id: user_id.ok_or_else(|| corrupt("user_id"))?,
            user_name: row
                .try_get::<Option<String>, _>("user_name")
                .map_err(unavailable)?
                .unwrap_or_default(),
            token_hash: row
                .try_get::<Option<String>, _>("token_hash")
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("token_hash"))?,
            issued_ms: at_ms,
            expires_ms: expires_ms.ok_or_else(|| corrupt("expires_ms"))?,
        },
        KIND_KEY_RETIRED => RevocationEvent::KeyRetired {
            kid: row
                .try_get::<Option<String>, _>("key_id")
                .map_err(unavailable)?
                .ok_or_else(|| corrupt("key_id"))?,
        },
        other => {
            return Err(StoreError::Corrupt(format!(
                "event {seq} has kind `{other}`"
            )))
        }
    };
    Ok(SequencedEvent { seq, event })
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn user_count(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        is_admin: bool,
        now_ms: i64,
    ) -> StoreResult<User> {
        let row = sqlx::query(&format!(
            "INSERT INTO users (name, password_hash, is_admin, disabled, created_ms)
             VALUES ($1, $2, $3, FALSE, $4) RETURNING {USER_COLUMNS}"
        ))
        .bind(name)
        .bind(password_hash)
        .bind(is_admin)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("user `{name}`"))
            } else {
                unavailable(e)
            }
        })?;
        user_from_row(&row)
    }

    async fn find_user(&self, name: &str) -> StoreResult<Option<User>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users
             WHERE portcullis_name_key(name) = portcullis_name_key($1)"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        // Byte order of the ASCII-folded name: SQLite's `ORDER BY name COLLATE NOCASE`.
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY portcullis_name_key(name) COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(user_from_row).collect()
    }

    async fn find_user_by_id(&self, id: i64) -> StoreResult<Option<User>> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(password_hash)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 {
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
        let done = sqlx::query("UPDATE users SET disabled = $1 WHERE id = $2")
            .bind(disabled)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        let mut events = Vec::new();
        if disabled {
            sqlx::query(
                "UPDATE sessions SET revoked_ms = $1
                 WHERE user_id = $2 AND revoked_ms IS NULL AND created_ms <= $1",
            )
            .bind(now_ms)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            events.push(
                Self::append(&mut tx, now_ms, RevocationEvent::UserDisabled { user_id }).await?,
            );
            events.push(
                Self::append(
                    &mut tx,
                    now_ms,
                    RevocationEvent::UserCutoff {
                        user_id,
                        at_ms: now_ms,
                    },
                )
                .await?,
            );
        } else {
            events.push(
                Self::append(&mut tx, now_ms, RevocationEvent::UserEnabled { user_id }).await?,
            );
        }
        Self::commit(tx, &events).await?;
        Ok(events)
    }

    async fn create_session(&self, s: &NewSession) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        insert_session(&mut conn, s).await
    }

    async fn get_session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(session_from_row).transpose()
    }

    async fn list_live_sessions(
        &self,
        user_id: Option<i64>,
        now_ms: i64,
    ) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.revoked_ms IS NULL AND s.expires_ms > $1
               AND ($2::BIGINT IS NULL OR s.user_id = $2)
             ORDER BY s.created_ms"
        ))
        .bind(now_ms)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(session_from_row).collect()
    }

    async fn count_live_sessions(&self, now_ms: i64) -> StoreResult<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT kind, COUNT(*) FROM sessions
             WHERE revoked_ms IS NULL AND expires_ms > $1 GROUP BY kind ORDER BY kind",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(unavailable)?,
                    r.try_get(1).map_err(unavailable)?,
                ))
            })
            .collect()
    }

    async fn revoke_session(
        &self,
        id: SessionId,
        now_ms: i64,
    ) -> StoreResult<Option<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let row = sqlx::query(
            "UPDATE sessions SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2
             RETURNING user_id, expires_ms",
        )
        .bind(now_ms)
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let user_id: i64 = row.try_get("user_id").map_err(unavailable)?;
        let expires_ms: i64 = row.try_get("expires_ms").map_err(unavailable)?;
        let event = Self::append(
            &mut tx,
            now_ms,
            RevocationEvent::SessionRevoked {
                sid: id,
                user_id,
                expires_ms,
            },
        )
        .await?;
        Self::commit(tx, std::slice::from_ref(&event)).await?;
        Ok(Some(event))
    }

    async fn signout_user(&self, user_id: i64, now_ms: i64) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let event = Self::cutoff_user(&mut tx, user_id, now_ms).await?;
        Self::commit(tx, std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn signout_everyone(&self, now_ms: i64) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let event = Self::cutoff_everyone(&mut tx, now_ms).await?;
        Self::commit(tx, std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn record_failure(
        &self,
        user_id: i64,
        now_ms: i64,
        max_failures: u32,
        lockout_ms: i64,
    ) -> StoreResult<User> {
        let row = sqlx::query(&format!(
            "UPDATE users SET failed_logins = failed_logins + 1, last_failure_ms = $1,
                 locked_until_ms = CASE WHEN failed_logins + 1 >= $2 THEN $3 ELSE locked_until_ms END
             WHERE id = $4 RETURNING {USER_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(i64::from(max_failures))
        .bind(now_ms.saturating_add(lockout_ms))
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        match row {
            Some(row) => user_from_row(&row),
            None => Err(StoreError::NotFound(format!("user {user_id}"))),
        }
    }

    async fn clear_failures(&self, user_id: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE users SET failed_logins = 0, locked_until_ms = NULL, last_failure_ms = NULL
             WHERE id = $1 AND (failed_logins != 0 OR locked_until_ms IS NOT NULL)",
        )
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn set_must_reset(&self, user_id: Option<i64>, must: bool) -> StoreResult<u64> {
        let done =
            sqlx::query("UPDATE users SET must_reset = $1 WHERE $2::BIGINT IS NULL OR id = $2")
                .bind(must)
                .bind(user_id)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn change_password(
        &self,
        user_id: i64,
        password_hash: &str,
        signout_at: Option<i64>,
    ) -> StoreResult<Option<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let done =
            sqlx::query("UPDATE users SET password_hash = $1, must_reset = FALSE WHERE id = $2")
                .bind(password_hash)
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        let event = match signout_at {
            Some(at) => Some(Self::cutoff_user(&mut tx, user_id, at).await?),
            None => None,
        };
        Self::commit(tx, event.as_slice()).await?;
        Ok(event)
    }

    async fn set_totp(&self, user_id: i64, secret: Option<&str>, enabled: bool) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE users SET totp_secret = $1, totp_enabled = $2 WHERE id = $3")
            .bind(secret)
            .bind(enabled)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if !enabled {
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn accept_totp_step(&self, user_id: i64, step: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE users SET totp_last_step = $1 WHERE id = $2 AND totp_last_step < $1",
        )
        .bind(step)
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn replace_recovery_codes(&self, user_id: i64, hashes: &[String]) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO recovery_codes (user_id, code_hash) SELECT $1, unnest($2::TEXT[])",
        )
        .bind(user_id)
        .bind(hashes)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    async fn use_recovery_code(&self, user_id: i64, hash: &str, now_ms: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_ms = $1
             WHERE user_id = $2 AND code_hash = $3 AND used_ms IS NULL",
        )
        .bind(now_ms)
        .bind(user_id)
        .bind(hash)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn recovery_codes_left(&self, user_id: i64) -> StoreResult<i64> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM recovery_codes WHERE user_id = $1 AND used_ms IS NULL",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn create_reset_link(
        &self,
        token_hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("UPDATE reset_links SET used_ms = $1 WHERE user_id = $2 AND used_ms IS NULL")
            .bind(now_ms)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO reset_links (token_hash, user_id, created_ms, expires_ms)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(now_ms)
        .bind(expires_ms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn reset_link_state(&self, token_hash: &str, now_ms: i64) -> StoreResult<ResetLinkState> {
        let row = sqlx::query(
            "SELECT user_id, expires_ms, used_ms FROM reset_links WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(ResetLinkState::Unknown);
        };
        let used: Option<i64> = row.try_get("used_ms").map_err(unavailable)?;
        let expires: i64 = row.try_get("expires_ms").map_err(unavailable)?;
        Ok(if used.is_some() {
            ResetLinkState::Used
        } else if expires <= now_ms {
            ResetLinkState::Expired
        } else {
            ResetLinkState::Valid {
                user_id: row.try_get("user_id").map_err(unavailable)?,
            }
        })
    }

    async fn redeem_reset_link(
        &self,
        token_hash: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<Option<(i64, SequencedEvent)>> {
        let mut tx = self.write_tx().await?;
        let user_id: Option<i64> = sqlx::query_scalar(
            "UPDATE reset_links SET used_ms = $1
             WHERE token_hash = $2 AND used_ms IS NULL AND expires_ms > $1 RETURNING user_id",
        )
        .bind(now_ms)
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(user_id) = user_id else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE users SET password_hash = $1, must_reset = FALSE, failed_logins = 0,
                 locked_until_ms = NULL WHERE id = $2",
        )
        .bind(password_hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let event = Self::cutoff_user(&mut tx, user_id, now_ms).await?;
        Self::commit(tx, std::slice::from_ref(&event)).await?;
        Ok(Some((user_id, event)))
    }

    async fn touch_sessions(&self, seen: &[(SessionId, i64)]) -> StoreResult<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = seen.iter().map(|(sid, _)| sid.to_string()).collect();
        let ats: Vec<i64> = seen.iter().map(|(_, at)| *at).collect();
        let mut tx = self.write_tx().await?;
        // One statement for the batch; a session named twice keeps the later time.
        sqlx::query(
            "UPDATE sessions s SET last_seen_ms = GREATEST(s.last_seen_ms, v.at)
             FROM (SELECT id, MAX(at) AS at FROM unnest($1::TEXT[], $2::BIGINT[]) AS t(id, at)
                   GROUP BY id) v
             WHERE s.id = v.id",
        )
        .bind(&ids)
        .bind(&ats)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    async fn breach_response(
        &self,
        now_ms: i64,
        retired_keys: &[String],
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE users SET must_reset = TRUE")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut events = vec![Self::cutoff_everyone(&mut tx, now_ms).await?];
        for kid in retired_keys {
            events.push(
                Self::append(
                    &mut tx,
                    now_ms,
                    RevocationEvent::KeyRetired { kid: kid.clone() },
                )
                .await?,
            );
        }
        Self::commit(tx, &events).await?;
        Ok(events)
    }

    async fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (at_ms, event, outcome, user_id, user_name, ip, user_agent,
                 session_id, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(e.at_ms)
        .bind(&e.event)
        .bind(&e.outcome)
        .bind(e.user_id)
        .bind(&e.user_name)
        .bind(&e.ip)
        .bind(&e.user_agent)
        .bind(&e.session_id)
        .bind(&e.detail)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn list_audit(
        &self,
        user_id: Option<i64>,
        since_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT at_ms, event, outcome, user_id, user_name, ip, user_agent, session_id, detail
             FROM audit_log WHERE at_ms >= $1 AND ($2::BIGINT IS NULL OR user_id = $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(since_ms)
        .bind(user_id)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(audit_from_row).collect()
    }

    fn announcements(&self) -> Option<watch::Receiver<Announcement>> {
        Some(self.announcements.clone())
    }

    async fn events_since(&self, after: i64, limit: i64) -> StoreResult<Vec<SequencedEvent>> {
        let rows = sqlx::query(
            "SELECT e.seq, e.kind, e.session_id, e.user_id, e.at_ms, e.expires_ms, e.key_id,
                    e.token_hash, e.detail, u.name AS user_name
             FROM revocation_events e LEFT JOIN users u ON u.id = e.user_id
             WHERE e.seq > $1 ORDER BY e.seq LIMIT $2",
        )
        .bind(after)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn snapshot(&self, now_ms: i64) -> StoreResult<Snapshot> {
        // One snapshot of the database for every query below.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(unavailable)?;
        // The newest number handed out (not MAX(seq): the newest events may have been purged,
        // and their numbers are never handed out again).
        let seq: i64 = sqlx::query_scalar("SELECT last FROM revocation_seq")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        // Streamed with COPY (see `REVOKED_WINDOW`): rows as text lines, parsed as they
        // arrive, on another connection while this one reads the rest. Events up to `seq` never
        // change once committed (a purge only deletes expired ones, which the view drops
        // anyway), so that connection's snapshot sees the same rows as this one. (Two COPYs of
        // half the log each were slower on two cores: the server's work and the parsing compete.)
        let all = tokio::spawn(copy_revoked(self.pool.clone(), 0, seq, now_ms));
        // The latest cutoff per user, as one string (a hundred thousand users are one row).
        let cutoffs: Option<String> = sqlx::query_scalar(
            "SELECT string_agg(user_id || ':' || at_ms, ',' ORDER BY user_id) FROM (
                 SELECT user_id, MAX(at_ms) AS at_ms FROM revocation_events
                 WHERE kind = $1 AND seq <= $2 GROUP BY user_id) AS c",
        )
        .bind(KIND_USER_CUTOFF)
        .bind(seq)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let user_cutoffs = super::parse_pairs(cutoffs.as_deref().unwrap_or(""))?;
        let global_cutoff: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(at_ms) FROM revocation_events WHERE kind = $1 AND seq <= $2",
        )
        .bind(KIND_GLOBAL_CUTOFF)
        .bind(seq)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let disabled_users: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM users WHERE disabled ORDER BY id")
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
        let retired_keys: Vec<String> = sqlx::query_scalar::<_, Option<String>>(
            "SELECT DISTINCT key_id FROM revocation_events
             WHERE kind = $1 AND seq <= $2 ORDER BY key_id",
        )
        .bind(KIND_KEY_RETIRED)
        .bind(seq)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?
        .into_iter()
        .flatten()
        .collect();
        let mut media_tokens = Vec::new();
        {
            let mut rows = sqlx::query(
                "SELECT m.token_hash, s.id, s.user_id, u.name, s.created_ms, s.expires_ms
                 FROM media_tokens m JOIN sessions s ON s.id = m.session_id
                 JOIN users u ON u.id = s.user_id
                 WHERE s.expires_ms > $1",
            )
            .bind(now_ms)
            .fetch(&mut *tx);
            while let Some(row) = rows.try_next().await.map_err(unavailable)? {
                let sid: &str = row.try_get(1).map_err(unavailable)?;
                media_tokens.push(MediaTokenRow {
                    token_hash: row.try_get(0).map_err(unavailable)?,
                    sid: sid_from_text(sid)?,
                    user_id: row.try_get(2).map_err(unavailable)?,
                    user_name: row.try_get(3).map_err(unavailable)?,
                    issued_ms: row.try_get(4).map_err(unavailable)?,
                    expires_ms: row.try_get(5).map_err(unavailable)?,
                });
            }
        }
        tx.commit().await.map_err(unavailable)?;
        let revoked = match all.await {
            Ok(revoked) => revoked?,
            Err(e) => {
                return Err(StoreError::Corrupt(format!(
                    "reading revoked sessions: {e}"
                )))
            }
        };
        Ok(Snapshot {
            seq,
            revoked,
            user_cutoffs,
            global_cutoff,
            disabled_users,
            retired_keys,
            media_tokens,
        })
    }

    async fn purge_expired(
        &self,
        now_ms: i64,
        keep_ms: i64,
        audit_keep_ms: i64,
    ) -> StoreResult<u64> {
        let mut tx = self.write_tx().await?;
        let mut deleted = 0;
        // Sessions long expired, unless their media token is still owed an upstream logout.
        deleted += sqlx::query(
            "DELETE FROM sessions WHERE expires_ms <= $1 AND id NOT IN (
                 SELECT session_id FROM media_tokens WHERE logged_out_ms IS NULL)",
        )
        .bind(now_ms.saturating_sub(keep_ms))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        // Revoked sessions whose tokens would have expired anyway, and bindings of expired
        // media tokens: the view drops them too.
        deleted += sqlx::query(
            "DELETE FROM revocation_events WHERE kind IN ($1, $2, $4) AND expires_ms <= $3",
        )
        .bind(KIND_SESSION)
        .bind(KIND_MEDIA_BOUND)
        .bind(now_ms)
        .bind(KIND_MEDIA_NOTE)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        deleted += sqlx::query("DELETE FROM oidc_logout_jtis WHERE expires_ms <= $1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted += sqlx::query("DELETE FROM oidc_ended_sids WHERE expires_ms <= $1")
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted += sqlx::query("DELETE FROM reset_links WHERE expires_ms <= $1")
            .bind(now_ms.saturating_sub(keep_ms))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted += sqlx::query("DELETE FROM audit_log WHERE at_ms <= $1")
            .bind(now_ms.saturating_sub(audit_keep_ms))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        tx.commit().await.map_err(unavailable)?;
        Ok(deleted)
    }

    async fn append_media_note(
        &self,
        note: &MediaNote,
        until_ms: i64,
        now_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let event = Self::append(
            &mut tx,
            now_ms,
            RevocationEvent::MediaNote {
                note: note.clone(),
                until_ms,
            },
        )
        .await?;
        Self::commit(tx, std::slice::from_ref(&event)).await?;
        Ok(event)
    }

    async fn bind_media_token(&self, b: &NewMediaBinding) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let s = &b.session;
        let sid = s.id.to_string();
        // Race-free under the writer lock: no other binding runs until this one commits.
        let existing = sqlx::query("SELECT 1 FROM media_tokens WHERE token_hash = $1")
            .bind(&b.token_hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
        if existing.is_some() {
            return Ok(Vec::new());
        }
        insert_session(&mut tx, s).await?;
        sqlx::query(
            "INSERT INTO media_tokens (session_id, token_hash, token_sealed, route, media_user_id,
                 media_user, device_id, client, device_name, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&sid)
        .bind(&b.token_hash)
        .bind(&b.token_sealed)
        .bind(&b.route)
        .bind(&b.media_user_id)
        .bind(&b.media_user)
        .bind(&b.device_id)
        .bind(&b.client)
        .bind(&b.device_name)
        .bind(&b.version)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let user_name: String = sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
            .bind(s.user_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut events = vec![
            Self::append(
                &mut tx,
                s.created_ms,
                RevocationEvent::MediaBound {
                    sid: s.id,
                    user_id: s.user_id,
                    user_name,
                    token_hash: b.token_hash.clone(),
                    issued_ms: s.created_ms,
                    expires_ms: s.expires_ms,
                },
            )
            .await?,
        ];
        // The media server deleted the older tokens of this device and user when it minted
        // the new one: end their sessions here, with no upstream logout owed.
        let older = sqlx::query(
            "UPDATE sessions SET revoked_ms = $1
             WHERE revoked_ms IS NULL AND id IN (
                 SELECT session_id FROM media_tokens
                 WHERE route = $2 AND media_user_id = $3 AND device_id = $4 AND session_id != $5)
             RETURNING id, user_id, expires_ms",
        )
        .bind(s.created_ms)
        .bind(&b.route)
        .bind(&b.media_user_id)
        .bind(&b.device_id)
        .bind(&sid)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        if !older.is_empty() {
            let ids = older
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            sqlx::query(
                "UPDATE media_tokens SET logged_out_ms = $1, token_sealed = ''
                 WHERE session_id = ANY($2)",
            )
            .bind(s.created_ms)
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            Self::append_revoked(&mut tx, s.created_ms, &older, &mut events).await?;
        }
        Self::commit(tx, &events).await?;
        Ok(events)
    }

    async fn owed_media_logouts(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<OwedLogout>> {
        let rows = sqlx::query(
            "SELECT m.session_id, m.route, m.token_sealed, m.client, m.device_name, m.device_id,
                    m.version, m.logout_attempts
             FROM media_tokens m JOIN sessions s ON s.id = m.session_id
             WHERE m.logged_out_ms IS NULL AND m.next_attempt_ms <= $1
               AND (s.revoked_ms IS NOT NULL OR s.expires_ms <= $1)
             ORDER BY m.next_attempt_ms, s.created_ms LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit_of(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(OwedLogout {
                    sid: sid_from_text(r.try_get::<&str, _>(0).map_err(unavailable)?)?,
                    route: r.try_get(1).map_err(unavailable)?,
                    token_sealed: r.try_get(2).map_err(unavailable)?,
                    client: r.try_get(3).map_err(unavailable)?,
                    device_name: r.try_get(4).map_err(unavailable)?,
                    device_id: r.try_get(5).map_err(unavailable)?,
                    version: r.try_get(6).map_err(unavailable)?,
                    attempts: r.try_get(7).map_err(unavailable)?,
                })
            })
            .collect()
    }

    async fn media_logout_done(&self, sid: SessionId, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE media_tokens SET logged_out_ms = $1, token_sealed = '' WHERE session_id = $2",
        )
        .bind(now_ms)
        .bind(sid.to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn media_logout_failed(&self, sid: SessionId, next_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE media_tokens SET logout_attempts = logout_attempts + 1, next_attempt_ms = $1
             WHERE session_id = $2",
        )
        .bind(next_ms)
        .bind(sid.to_string())
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn end_idle_media_sessions(
        &self,
        route: &str,
        idle_before_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let rows = sqlx::query(
            "UPDATE sessions SET revoked_ms = $1
             WHERE revoked_ms IS NULL AND kind = 'media' AND last_seen_ms < $2 AND id IN (
                 SELECT session_id FROM media_tokens WHERE route = $3)
             RETURNING id, user_id, expires_ms",
        )
        .bind(now_ms)
        .bind(idle_before_ms)
        .bind(route)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let mut events = Vec::with_capacity(rows.len());
        Self::append_revoked(&mut tx, now_ms, &rows, &mut events).await?;
        Self::commit(tx, &events).await?;
        Ok(events)
    }

    async fn set_admin(&self, user_id: i64, is_admin: bool) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET is_admin = $1 WHERE id = $2")
            .bind(is_admin)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("user {user_id}")));
        }
        Ok(())
    }

    async fn link_oidc(
        &self,
        provider: &str,
        issuer: &str,
        subject: &str,
        user_id: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO oidc_links (provider, issuer, subject, user_id, created_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(provider)
        .bind(issuer)
        .bind(subject)
        .bind(user_id)
        .bind(now_ms)
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
        sqlx::query_scalar(
            "SELECT user_id FROM oidc_links WHERE provider = $1 AND subject = $2 AND issuer = $3",
        )
        .bind(provider)
        .bind(subject)
        .bind(issuer)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)
    }

    async fn oidc_links_of(&self, user_id: i64) -> StoreResult<Vec<OidcLink>> {
        let rows = sqlx::query(
            "SELECT provider, issuer, subject, user_id, created_ms FROM oidc_links
             WHERE user_id = $1 ORDER BY provider",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                Ok(OidcLink {
                    provider: r.try_get(0).map_err(unavailable)?,
                    issuer: r.try_get(1).map_err(unavailable)?,
                    subject: r.try_get(2).map_err(unavailable)?,
                    user_id: r.try_get(3).map_err(unavailable)?,
                    created_ms: r.try_get(4).map_err(unavailable)?,
                })
            })
            .collect()
    }

    async fn unlink_oidc(&self, provider: &str, user_id: i64) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM oidc_links WHERE provider = $1 AND user_id = $2")
            .bind(provider)
            .bind(user_id)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected() > 0)
    }

    async fn unlink_all_oidc(&self) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM oidc_links")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(done.rows_affected())
    }

    async fn record_oidc_session(&self, o: &OidcSession, now_ms: i64) -> StoreResult<bool> {
        // Under the writer lock, as the back-channel logout that would end the provider
        // session: one of the two always sees the other.
        let mut tx = self.write_tx().await?;
        if let Some(oidc_sid) = &o.oidc_sid {
            let ended: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM oidc_ended_sids
                 WHERE provider = $1 AND oidc_sid = $2 AND expires_ms > $3",
            )
            .bind(&o.provider)
            .bind(oidc_sid)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await
            .map_err(unavailable)?;
            if ended.is_some() {
                return Ok(false);
            }
        }
        sqlx::query(
            "INSERT INTO oidc_sessions
                 (session_id, provider, subject, oidc_sid, id_token_sealed, amr)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(o.session_id.to_string())
        .bind(&o.provider)
        .bind(&o.subject)
        .bind(o.oidc_sid.as_deref())
        .bind(&o.id_token_sealed)
        .bind(o.amr.join(" "))
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn get_oidc_session(&self, session_id: SessionId) -> StoreResult<Option<OidcSession>> {
        let row = sqlx::query(
            "SELECT provider, subject, oidc_sid, id_token_sealed, amr FROM oidc_sessions
             WHERE session_id = $1",
        )
        .bind(session_id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| {
            let amr: String = r.try_get(4).map_err(unavailable)?;
            Ok(OidcSession {
                session_id,
                provider: r.try_get(0).map_err(unavailable)?,
                subject: r.try_get(1).map_err(unavailable)?,
                oidc_sid: r.try_get(2).map_err(unavailable)?,
                id_token_sealed: r.try_get(3).map_err(unavailable)?,
                amr: amr.split_whitespace().map(str::to_string).collect(),
            })
        })
        .transpose()
    }

    async fn oidc_backchannel_logout(
        &self,
        l: &BackchannelLogout,
        now_ms: i64,
    ) -> StoreResult<Option<Vec<SequencedEvent>>> {
        let mut tx = self.write_tx().await?;
        let fresh = sqlx::query(
            "INSERT INTO oidc_logout_jtis (provider, jti, expires_ms) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&l.provider)
        .bind(&l.jti)
        .bind(l.jti_expires_ms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        if fresh.rows_affected() == 0 {
            return Ok(None);
        }
        let mut events = Vec::new();
        match (&l.oidc_sid, &l.subject) {
            (Some(oidc_sid), subject) => {
                // Remembered as ended, so that a login through it still waiting at a gateway
                // step cannot create a session after this.
                sqlx::query(
                    "INSERT INTO oidc_ended_sids (provider, oidc_sid, expires_ms)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (provider, oidc_sid)
                     DO UPDATE SET expires_ms = GREATEST(oidc_ended_sids.expires_ms,
                                                         EXCLUDED.expires_ms)",
                )
                .bind(&l.provider)
                .bind(oidc_sid)
                .bind(l.ended_until_ms)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                // The provider session's gateway sessions, then the media sessions of their
                // users (a media binding does not record the web session it came through).
                let rows = sqlx::query(
                    "UPDATE sessions SET revoked_ms = $1
                     WHERE revoked_ms IS NULL AND expires_ms > $1 AND id IN (
                         SELECT session_id FROM oidc_sessions
                         WHERE provider = $2 AND oidc_sid = $3
                           AND ($4::TEXT IS NULL OR subject = $4))
                     RETURNING id, user_id, expires_ms",
                )
                .bind(now_ms)
                .bind(&l.provider)
                .bind(oidc_sid)
                .bind(subject.as_deref())
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
                let mut users: Vec<i64> = Vec::new();
                for row in &rows {
                    let user_id: i64 = row.try_get(1).map_err(unavailable)?;
                    if !users.contains(&user_id) {
                        users.push(user_id);
                    }
                }
                Self::append_revoked(&mut tx, now_ms, &rows, &mut events).await?;
                for user_id in users {
                    let rows = sqlx::query(
                        "UPDATE sessions SET revoked_ms = $1
                         WHERE revoked_ms IS NULL AND expires_ms > $1 AND user_id = $2
                           AND kind = 'media'
                         RETURNING id, user_id, expires_ms",
                    )
                    .bind(now_ms)
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                    Self::append_revoked(&mut tx, now_ms, &rows, &mut events).await?;
                }
            }
            (None, Some(subject)) => {
                let user: Option<i64> = sqlx::query_scalar(
                    "SELECT user_id FROM oidc_links
                     WHERE provider = $1 AND subject = $2 AND issuer = $3",
                )
                .bind(&l.provider)
                .bind(subject)
                .bind(&l.issuer)
                .fetch_optional(&mut *tx)
                .await
                .map_err(unavailable)?;
                if let Some(user_id) = user {
                    events.push(Self::cutoff_user(&mut tx, user_id, now_ms).await?);
                }
            }
            (None, None) => {}
        }
        Self::commit(tx, &events).await?;
        Ok(Some(events))
    }
}

/// Revoked sessions with `low < seq <= high` whose tokens are unexpired at `now_ms`, streamed
/// with `COPY … TO STDOUT` on a connection of their own. COPY takes no parameters; the values
/// inlined are numbers and a constant.
async fn copy_revoked(
    pool: PgPool,
    low: i64,
    high: i64,
    now_ms: i64,
) -> StoreResult<Vec<super::RevokedEntry>> {
    let mut out = Vec::new();
    if low >= high {
        return Ok(out);
    }
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let statement = format!(
        "COPY (SELECT session_id, expires_ms FROM revocation_events
               WHERE kind = '{KIND_SESSION}' AND expires_ms > {now_ms}
                 AND seq > {low} AND seq <= {high})
         TO STDOUT"
    );
    let mut chunks = conn.copy_out_raw(&statement).await.map_err(unavailable)?;
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = chunks.try_next().await.map_err(unavailable)? {
        pending.extend_from_slice(&chunk);
        if let Some(end) = pending.iter().rposition(|b| *b == b'\n') {
            super::parse_revoked_records(&pending[..end], b'\n', &mut out)?;
            pending.drain(..=end);
        }
    }
    super::parse_revoked_records(&pending, b'\n', &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod unit {
    use super::announced_seq;

    #[test]
    fn announcements_are_read_only_for_our_schema() {
        assert_eq!(announced_seq("public:42", "public"), Some(42));
        assert_eq!(announced_seq("t_1:42", "public"), None);
        assert_eq!(announced_seq("a:b:7", "a:b"), Some(7));
        assert_eq!(announced_seq("public:x", "public"), None);
        assert_eq!(announced_seq("42", "public"), None);
    }
}
