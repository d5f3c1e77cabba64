//! The PostgreSQL store, for several gateway instances sharing one database: PostgreSQL's
//! [`Dialect`] for the store's one implementation (`store::sql`). Same tables and the same
//! semantics as `store::sqlite`; what differs is how the two properties that SQLite gets from its
//! single writer lock are kept here.
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

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use futures_util::TryStreamExt;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgQueryResult, Postgres,
};
use tokio::sync::watch;

use super::dialect::Dialect;
use super::sql::{unavailable, AbortOnDrop, SqlStore, KIND_SESSION};
use super::{Announcement, RevokedEntry, SessionId, StoreError, StoreResult};

pub type PgStore = SqlStore<Postgres>;

/// Migrations for this backend. `Migrator::run` holds a session-level
/// `pg_advisory_lock` (keyed by the database name; sqlx-postgres `Migrate::lock`) while it
/// applies them, so replicas that start together apply each migration once, one after another.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The newest schema version (migration) this binary knows.
pub fn schema_version() -> i64 {
    super::sql::schema_version(&MIGRATOR)
}

/// The advisory lock every event-appending (and every other multi-statement write) transaction
/// takes first. Fixed for all Portcullis databases: "portcull" in ASCII. It is not a multiple
/// of 0x3d32ad9e, so it can never equal the key of sqlx's migration lock (0x3d32ad9e times the
/// CRC-32 of the database name).
const WRITER_LOCK: i64 = 0x706f_7274_6375_6c6c;

/// The NOTIFY channel on which committed events are announced (also named in `ANNOUNCE`).
pub(super) const CHANNEL: &str = "portcullis_events";

const POOL_SIZE: u32 = 8;
/// How long the announcement task waits before reconnecting, at first and at most.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one attempt to open the announcement connection may take.
const LISTEN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Dialect for Postgres {
    const BACKEND: &'static str = "postgres";
    /// Then the writer lock, `SqlStore::write_lock` (it carries the busy timeout).
    const BEGIN_WRITE: &'static str = "BEGIN";
    const BEGIN_READ: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    const INSERT_EVENT: &'static str =
        "WITH next AS (UPDATE revocation_seq SET last = last + 1 RETURNING last)
         INSERT INTO revocation_events
             (seq, kind, session_id, user_id, at_ms, expires_ms, key_id, token_hash, detail)
         SELECT last, $1, $2, $3, $4, $5, $6, $7, $8 FROM next
         RETURNING seq";
    const LAST_SEQ: &'static str = "SELECT last FROM revocation_seq";
    const NAME_IS: &'static str = "portcullis_name_key(name) = portcullis_name_key($1)";
    /// Byte order of the ASCII-folded name: SQLite's `ORDER BY name COLLATE NOCASE`.
    const NAME_ORDER: &'static str = "portcullis_name_key(name) COLLATE \"C\"";
    const ANNOUNCE: Option<&'static str> =
        Some("SELECT pg_notify('portcullis_events', current_schema() || ':' || $1::BIGINT::TEXT)");

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }

    /// One statement for the batch.
    fn touch_sessions<'a>(
        conn: &'a mut PgConnection,
        seen: &'a [(SessionId, i64)],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a {
        let ids: Vec<String> = seen.iter().map(|(sid, _)| sid.to_string()).collect();
        let ats: Vec<i64> = seen.iter().map(|(_, at)| *at).collect();
        async move {
            query!("UPDATE sessions s SET last_seen_ms = GREATEST(s.last_seen_ms, v.at)
                    FROM (SELECT id, MAX(at) AS at
                          FROM unnest($1::TEXT[], $2::BIGINT[]) AS t(id, at) GROUP BY id) v
                    WHERE s.id = v.id"; &ids, &ats)
            .execute(conn)
            .await?;
            Ok(())
        }
    }

    /// Streamed with COPY, parsed as it arrives. (Two COPYs of half the log each were slower
    /// on two cores: the server's work and the parsing compete.)
    fn revoked_sessions(
        pool: PgPool,
        high: i64,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<RevokedEntry>>> + Send + 'static {
        copy_revoked(pool, high, now_ms)
    }
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

impl SqlStore<Postgres> {
    /// Connects (a pool of 8), brings the schema up to date and starts listening for
    /// announcements. The URL is parsed by `PgConnectOptions`, so its query parameters are
    /// honoured, `options=-c search_path=…` included (a gateway, or a test, can live in a
    /// schema of its own). `busy_timeout` bounds the wait for a pooled connection and for the
    /// writer lock.
    pub async fn open(url: &str, busy_timeout: Duration) -> StoreResult<PgStore> {
        Self::open_with(url, busy_timeout, true).await
    }

    /// [`Self::open`]; without `migrate`, the schema is taken as it stands (a look that
    /// changes nothing).
    pub async fn open_with(
        url: &str,
        busy_timeout: Duration,
        migrate: bool,
    ) -> StoreResult<PgStore> {
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
        if migrate {
            Self::migrate(&pool).await?;
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
        Ok(SqlStore {
            pool,
            write_lock: Some(format!(
                "SET LOCAL lock_timeout = '{lock_ms}ms'; SELECT pg_advisory_xact_lock({WRITER_LOCK})"
            )),
            announcements: Some(rx),
            _listener: Some(AbortOnDrop(task)),
            record: None,
        })
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

/// Revoked sessions with `seq <= high` whose tokens are unexpired at `now_ms`, streamed
/// with `COPY … TO STDOUT` on a connection of their own. COPY takes no parameters; the values
/// inlined are numbers and a constant.
async fn copy_revoked(pool: PgPool, high: i64, now_ms: i64) -> StoreResult<Vec<RevokedEntry>> {
    let mut out = Vec::new();
    if high <= 0 {
        return Ok(out);
    }
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let statement = format!(
        "COPY (SELECT session_id, expires_ms FROM revocation_events
               WHERE kind = '{KIND_SESSION}' AND expires_ms > {now_ms}
                 AND seq <= {high})
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
