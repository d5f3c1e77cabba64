//! The embedded SQLite store. WAL journal with `synchronous = FULL` (a committed revocation
//! survives a power cut), `BEGIN IMMEDIATE` for writes so concurrent writers (a running gateway
//! and the CLI) queue on the busy timeout instead of failing, and versioned migrations. Event
//! sequence numbers come from `AUTOINCREMENT` under SQLite's single writer lock, so they are
//! handed out in commit order with no holes. The logic is `store::sql`'s; this is SQLite's
//! [`Dialect`] and what only SQLite has (`copy_into`).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteQueryResult, SqliteSynchronous,
};
use sqlx::Sqlite;

use super::dialect::Dialect;
use super::sql::{unavailable, SqlStore, KIND_SESSION};
use super::{RevokedEntry, SessionId, StoreError, StoreResult};

pub use super::sql::applied_schema_version;

pub type SqliteStore = SqlStore<Sqlite>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// Connections in the pool (each holds its own page cache, see `CACHE_KIB`).
const MAX_CONNECTIONS: u32 = 4;
/// The page cache of each connection, in KiB (SQLite's default is 2000). The hot pages — the
/// live-session index, the newest events, the users — fit many times over; what a larger cache
/// would add is old pages of tables that only grow, held until the connection closes.
pub const CACHE_KIB: i64 = 1024;
/// Above this many bytes of SQLite's own heap (process-wide: every connection, statement and
/// page cache), SQLite reuses page-cache pages instead of allocating more. Soft: no statement
/// fails for it. Leaves room for `MAX_CONNECTIONS` full caches and the prepared statements.
pub const SOFT_HEAP_LIMIT_BYTES: i64 = 16 * 1024 * 1024;

/// The newest schema version (migration) this binary knows.
pub fn schema_version() -> i64 {
    super::sql::schema_version(&MIGRATOR)
}

impl Dialect for Sqlite {
    const BACKEND: &'static str = "sqlite";
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const BEGIN_READ: &'static str = "BEGIN";
    const INSERT_EVENT: &'static str = "INSERT INTO revocation_events
             (kind, session_id, user_id, at_ms, expires_ms, key_id, token_hash, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq";
    /// The AUTOINCREMENT counter, or the newest event if the counter row is missing.
    const LAST_SEQ: &'static str = "SELECT MAX(
         COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'revocation_events'), 0),
         COALESCE((SELECT MAX(seq) FROM revocation_events), 0))";
    const NAME_IS: &'static str = "name = $1 COLLATE NOCASE";
    const NAME_ORDER: &'static str = "name COLLATE NOCASE";
    const ANNOUNCE: Option<&'static str> = None;

    fn migrator() -> &'static sqlx::migrate::Migrator {
        &MIGRATOR
    }

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    /// One prepared statement per session: in-process, with the write lock held, that costs
    /// less than building one statement for the batch.
    async fn touch_sessions(
        conn: &mut SqliteConnection,
        seen: &[(SessionId, i64)],
    ) -> Result<(), sqlx::Error> {
        for (sid, at) in seen {
            query!("UPDATE sessions SET last_seen_ms = MAX(last_seen_ms, $1) WHERE id = $2";
                   at, sid.to_string())
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// The two halves of the log, each on a connection of its own, window by window.
    async fn revoked_sessions(
        pool: SqlitePool,
        high: i64,
        now_ms: i64,
    ) -> StoreResult<Vec<RevokedEntry>> {
        let lower = tokio::spawn(revoked_between(pool.clone(), 0, high / 2, now_ms));
        let upper = revoked_between(pool, high / 2, high, now_ms).await?;
        let mut revoked = lower
            .await
            .map_err(|e| StoreError::Corrupt(format!("reading revoked sessions: {e}")))??;
        revoked.extend(upper);
        Ok(revoked)
    }
}

/// Revoked sessions with `low < seq <= high` whose tokens are unexpired at `now_ms`, one string
/// per window of sequence numbers (see `REVOKED_WINDOW`): a range scan of the primary key per
/// window, no sort, no million decoded rows.
async fn revoked_between(
    pool: SqlitePool,
    mut low: i64,
    high: i64,
    now_ms: i64,
) -> StoreResult<Vec<RevokedEntry>> {
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let mut out = Vec::new();
    while low < high {
        let end = (low + super::REVOKED_WINDOW).min(high);
        let batch: Option<String> =
            query_scalar!("SELECT group_concat(session_id || expires_ms, ',') FROM revocation_events
                           WHERE kind = $1 AND expires_ms > $2 AND seq > $3 AND seq <= $4";
                          KIND_SESSION, now_ms, low, end)
            .fetch_one(&mut *conn)
        .await
        .map_err(unavailable)?;
        if let Some(batch) = batch {
            super::parse_revoked_records(batch.as_bytes(), b',', &mut out)?;
        }
        low = end;
    }
    Ok(out)
}

impl SqlStore<Sqlite> {
    /// Opens (creating if absent) the database file and runs pending migrations.
    pub async fn open(path: &str, busy_timeout: Duration) -> StoreResult<SqliteStore> {
        Self::open_with(path, busy_timeout, true).await
    }

    /// Opens the database file; with `migrate`, creates it if absent and runs pending
    /// migrations, else takes it as it stands (a look that changes nothing).
    pub async fn open_with(
        path: &str,
        busy_timeout: Duration,
        migrate: bool,
    ) -> StoreResult<SqliteStore> {
        let open_err = |message: String| StoreError::Open {
            path: path.to_string(),
            message,
        };
        if let Some(parent) = Path::new(path).parent().filter(|_| migrate) {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| open_err(format!("cannot create {}: {e}", parent.display())))?;
            }
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| open_err(e.to_string()))?
            .filename(path);
        // A look that changes nothing opens the file read-only, as it stands.
        let options = if migrate {
            options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
        } else {
            options.read_only(true)
        };
        let options = options
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(busy_timeout)
            .pragma("cache_size", format!("-{CACHE_KIB}"))
            .pragma("soft_heap_limit", SOFT_HEAP_LIMIT_BYTES.to_string());
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(busy_timeout + Duration::from_secs(1))
            .connect_with(options)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        if migrate {
            Self::migrate(&pool).await?;
        }
        Ok(SqlStore {
            pool,
            write_lock: None,
            announcements: None,
            _listener: None,
            record: None,
        })
    }

    /// Writes a consistent copy of the whole database to `path` (which must not exist) with
    /// `VACUUM INTO`: one read transaction, so writers carry on meanwhile (WAL) and the copy is
    /// the database as of one commit.
    pub async fn copy_into(&self, path: &Path) -> StoreResult<()> {
        let target = path.to_str().ok_or_else(|| StoreError::Open {
            path: path.display().to_string(),
            message: "the path is not valid UTF-8".to_string(),
        })?;
        query!("VACUUM INTO $1"; target)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

// The tests run against every backend: see `store::tests`.

#[cfg(test)]
mod unit {
    use super::*;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = SqliteStore::open(path.to_str().unwrap(), Duration::from_secs(5))
            .await
            .unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn every_connection_keeps_a_bounded_page_cache() {
        let (_dir, store) = store().await;
        // All connections of the pool at once, so each is a connection of its own.
        let mut conns = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for conn in &mut conns {
            let cache: i64 = sqlx::query_scalar("PRAGMA cache_size")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(cache, -CACHE_KIB, "the page cache of a pooled connection");
            let limit: i64 = sqlx::query_scalar("PRAGMA soft_heap_limit")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(limit, SOFT_HEAP_LIMIT_BYTES);
        }
    }

    #[tokio::test]
    async fn live_session_count_reads_only_the_live_index() {
        let (_dir, store) = store().await;
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!(
            "EXPLAIN QUERY PLAN {}",
            super::super::sql::COUNT_LIVE_SESSIONS
        ))
        .bind(0_i64)
        .fetch_all(&store.pool)
        .await
        .unwrap();
        let steps: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
        assert!(
            steps
                .iter()
                .any(|s| s.starts_with("SEARCH sessions USING COVERING INDEX sessions_live")),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|s| s.starts_with("SCAN sessions")),
            "{steps:?}"
        );
    }
}
