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

use tokio::sync::watch;

use super::dialect::Dialect;
use super::sql::{unavailable, AbortOnDrop, SqlStore, KIND_SESSION};
use super::{Announcement, RevokedEntry, SessionId, StoreError, StoreResult};

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
        // A store that writes hears what other processes commit (the CLI above all).
        let (announcements, listener) = if migrate {
            watch_commits(pool.clone(), Path::new(path)).await.unzip()
        } else {
            (None, None)
        };
        Ok(SqlStore {
            pool,
            write_lock: None,
            announcements,
            _listener: listener,
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

/// When the commit watcher reads the newest sequence number after a change to the file: the
/// waits before each read. A commit is several writes to the WAL and becomes visible only after
/// its `fsync`, which no file event announces, so the number is read again a little later until
/// it grows (a process that exits, as the CLI does, also closes the file, another event); a
/// storm of commits without events (logins) costs at most three queries per 100 ms. Past
/// these, the next poll finds what is left.
const WATCH_READS: [Duration; 3] = [
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(75),
];

/// Announces events that any process commits to the database file at `path`: above all the
/// CLI's (`signout`, `breach-response`, `user disable`), which a running gateway otherwise
/// learned of only at its next poll (`store.poll_interval`). The file's directory is watched
/// with inotify; after a change to the file or its WAL the newest sequence number is read and,
/// when it grew, announced, as PostgreSQL's NOTIFY announces it. `None` (polling alone, as
/// before) where inotify cannot be had; the task ends with the store.
async fn watch_commits(
    pool: SqlitePool,
    path: &Path,
) -> Option<(watch::Receiver<Announcement>, AbortOnDrop)> {
    let watcher = match DirWatch::new(path) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(),
                "cannot watch the store file; other processes' changes are read at each poll");
            return None;
        }
    };
    let last_seq = |pool: SqlitePool| async move {
        sqlx::query_scalar::<_, i64>(Sqlite::LAST_SEQ)
            .fetch_one(&pool)
            .await
    };
    let mut last = last_seq(pool.clone()).await.ok()?;
    let (tx, rx) = watch::channel(Announcement {
        seq: last,
        generation: 1,
        connected: true,
    });
    let task = tokio::spawn(async move {
        loop {
            match watcher.changed().await {
                Ok(Change::Elsewhere) => continue,
                Ok(Change::Written | Change::Closed) => {}
                Err(e) => return watch_failed(&tx, &e),
            }
            for wait in WATCH_READS {
                // A writer that closes the file (the CLI exiting) is done: read at once.
                let until = tokio::time::Instant::now() + wait;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => break,
                        change = watcher.changed() => match change {
                            Ok(Change::Closed) => break,
                            Ok(_) => {}
                            Err(e) => return watch_failed(&tx, &e),
                        },
                    }
                }
                // What arrived meanwhile belongs to the read below.
                if let Err(e) = watcher.drain() {
                    return watch_failed(&tx, &e);
                }
                match last_seq(pool.clone()).await {
                    Ok(seq) if seq > last => {
                        last = seq;
                        tx.send_modify(|a| a.seq = seq);
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "store watch: cannot read the newest event");
                    }
                }
            }
        }
    });
    Some((rx, AbortOnDrop(task)))
}

/// The watch broke: says so, marks the announcements disconnected and ends (polling goes on).
fn watch_failed(tx: &watch::Sender<Announcement>, e: &std::io::Error) {
    tracing::warn!(error = %e, "watching the store file failed; polling only");
    tx.send_modify(|a| a.connected = false);
}

/// What a batch of file events says about the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    /// Only other files changed.
    Elsewhere,
    /// The database or its WAL was written.
    Written,
    /// A writer closed the database or its WAL (or the event queue overflowed).
    Closed,
}

/// An inotify watch on a database file's directory, reporting changes to the file and its WAL.
struct DirWatch {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// The database file's name and its WAL's.
    names: [std::ffi::OsString; 2],
}

impl DirWatch {
    fn new(path: &Path) -> std::io::Result<DirWatch> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let name = path.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file")
        })?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: inotify_init1 takes flags only; a negative answer is checked below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just made for this watch and owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // Writes, and a writer closing the file: a process that exits (the CLI) closes it after
        // its last commit is durable and visible, which no write event says.
        let mask = libc::IN_MODIFY | libc::IN_CLOSE_WRITE | libc::IN_CREATE | libc::IN_MOVED_TO;
        // SAFETY: `dir` is a NUL-terminated path that outlives the call; `raw` is open.
        if unsafe { libc::inotify_add_watch(raw, dir.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut wal = name.to_os_string();
        wal.push("-wal");
        // SAFETY: the OwnedFd is moved into the AsyncFd, which keeps it open, unchanged, for
        // its whole life.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)?
        };
        Ok(DirWatch {
            fd,
            names: [name.to_os_string(), wal],
        })
    }

    /// Waits for events; what they say about the database file and its WAL.
    async fn changed(&self) -> std::io::Result<Change> {
        loop {
            let mut ready = self.fd.readable().await?;
            match self.read_events()? {
                Some(change) => return Ok(change),
                None => ready.clear_ready(),
            }
        }
    }

    /// Reads and drops the events queued now.
    fn drain(&self) -> std::io::Result<()> {
        while self.read_events()?.is_some() {}
        Ok(())
    }

    /// One read of queued events: the most they say about the database, or `None` if none
    /// was queued.
    fn read_events(&self) -> std::io::Result<Option<Change>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        // Room for many events: each is a 16-byte header and its NUL-padded name.
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length and the descriptor is open while `self` is.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        let events = &buf[..n as usize];
        let mut change = Change::Elsewhere;
        let mut at = 0;
        while at + 16 <= events.len() {
            let len = u32::from_ne_bytes([
                events[at + 12],
                events[at + 13],
                events[at + 14],
                events[at + 15],
            ]) as usize;
            let mask = u32::from_ne_bytes([
                events[at + 4],
                events[at + 5],
                events[at + 6],
                events[at + 7],
            ]);
            let name = events.get(at + 16..at + 16 + len).unwrap_or(&[]);
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            let seen = if mask & libc::IN_Q_OVERFLOW != 0 {
                // An overflowed queue lost events, ours perhaps among them.
                Change::Closed
            } else if !self.names.iter().any(|n| n.as_bytes() == name) {
                Change::Elsewhere
            } else if mask & libc::IN_CLOSE_WRITE != 0 {
                Change::Closed
            } else {
                Change::Written
            };
            change = change.max(seen);
            at += 16 + len;
        }
        Ok(Some(change))
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
