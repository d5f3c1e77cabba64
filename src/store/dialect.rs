//! What really differs between the SQL backends, and nothing else: the `Dialect` trait, which
//! `sqlx::Sqlite` (`store::sqlite`) and `sqlx::Postgres` (`store::postgres`) implement. The
//! store's logic and almost all of its SQL are written once, in `store::sql`; both backends bind
//! `$1`, `$2`… by number (sqlx-sqlite reads `$N` as the N-th argument), and SQLite ≥ 3.44 has
//! `RETURNING`, `ON CONFLICT … DO UPDATE`, `string_agg … ORDER BY` and `TRUE`/`FALSE`, so the same
//! text runs on both. What is left here is how sequence numbers are handed out, how a writing
//! transaction starts, the push announcement, case-insensitive names, and the two bulk paths
//! whose fastest form is the backend's own (a batch of last-seen times, the revoked sessions of
//! a snapshot).

use std::future::Future;

use sqlx::migrate::Migrator;
use sqlx::{Database, Pool};

use super::{RevokedEntry, SessionId, StoreResult};

pub trait Dialect: Database {
    /// Short name of the backend (`Store::backend`).
    const BACKEND: &'static str;
    /// Opens a writing transaction. SQLite takes its write lock at once (`BEGIN IMMEDIATE`);
    /// PostgreSQL begins plainly and then takes the writer lock (see `store::postgres`).
    const BEGIN_WRITE: &'static str;
    /// Opens the snapshot's read transaction: every query in it sees one committed state.
    const BEGIN_READ: &'static str;
    /// Appends one event under the writer lock and returns its number. Binds, in order: kind,
    /// session id, user id, at, expires, key id, token hash, detail.
    const INSERT_EVENT: &'static str;
    /// The newest sequence number handed out (not `MAX(seq)`: purging may have deleted the
    /// newest events, and their numbers are never handed out again).
    const LAST_SEQ: &'static str;
    /// A condition on `users`: its name is `$1`, ignoring ASCII case only.
    const NAME_IS: &'static str;
    /// Orders `users` by name, ignoring ASCII case only, in byte order.
    const NAME_ORDER: &'static str;
    /// Announces `$1`, the highest event number a transaction appended, when (and if) it
    /// commits; `None` where there are no push announcements.
    const ANNOUNCE: Option<&'static str>;

    fn migrator() -> &'static Migrator;

    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// Writes a batch of last-seen times (a session named twice keeps the later time) in the
    /// writing transaction open on `conn`.
    fn touch_sessions<'a>(
        conn: &'a mut Self::Connection,
        seen: &'a [(SessionId, i64)],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + 'a;

    /// The revoked sessions with `seq <= high` whose tokens are unexpired at `now_ms`, read on
    /// connections of their own while the snapshot's transaction reads the rest (events up to
    /// `high` never change once committed, so any later read sees the same rows).
    fn revoked_sessions(
        pool: Pool<Self>,
        high: i64,
        now_ms: i64,
    ) -> impl Future<Output = StoreResult<Vec<RevokedEntry>>> + Send + 'static;
}
