//! The embedded SQLite store. WAL journal with `synchronous = FULL` (a committed revocation
//! survives a power cut), `BEGIN IMMEDIATE` for writes so concurrent writers (a running gateway
//! and the CLI) queue on the busy timeout instead of failing, and versioned migrations.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;

use super::{
    AuditEntry, BackchannelLogout, MediaNote, MediaTokenRow, NewMediaBinding, NewSession, OidcLink,
    OidcSession, OwedLogout, ResetLinkState, RevocationEvent, SequencedEvent, SessionId,
    SessionKind, SessionRecord, Snapshot, Store, StoreError, StoreResult, User,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The newest schema version (migration) this binary knows.
pub fn schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The newest migration applied to the database, if its migration table can be read.
pub async fn applied_schema_version<'c, E>(db: E) -> Option<i64>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(db)
        .await
        .ok()
        .flatten()
}

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

pub struct SqliteStore {
    pool: SqlitePool,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e)
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl SqliteStore {
    /// Opens (creating if absent) the database file and runs pending migrations.
    pub async fn open(path: &str, busy_timeout: Duration) -> StoreResult<SqliteStore> {
        let open_err = |message: String| StoreError::Open {
            path: path.to_string(),
            message,
        };
        if let Some(parent) = Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| open_err(format!("cannot create {}: {e}", parent.display())))?;
            }
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| open_err(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(busy_timeout + Duration::from_secs(1))
            .connect_with(options)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        if let Err(e) = MIGRATOR.run(&pool).await {
            return Err(super::migrate_error(
                e,
                applied_schema_version(&pool).await,
                schema_version(),
            ));
        }
        Ok(SqliteStore { pool })
    }

    /// Writes a consistent copy of the whole database to `path` (which must not exist) with
    /// `VACUUM INTO`: one read transaction, so writers carry on meanwhile (WAL) and the copy is
    /// the database as of one commit.
    pub async fn copy_into(&self, path: &Path) -> StoreResult<()> {
        let target = path.to_str().ok_or_else(|| StoreError::Open {
            path: path.display().to_string(),
            message: "the path is not valid UTF-8".to_string(),
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Closes every connection, so that SQLite checkpoints and removes the WAL file.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A write transaction that takes SQLite's write lock at once, so concurrent writers queue
    /// on the busy timeout instead of failing to upgrade a read lock.
    async fn write_tx(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(unavailable)
    }

    /// Ends every session issued at or before `at_ms` and records the global cutoff.
    async fn cutoff_everyone(
        tx: &mut sqlx::SqliteConnection,
        at_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        sqlx::query(
            "UPDATE sessions SET revoked_ms = ? WHERE revoked_ms IS NULL AND created_ms <= ?",
        )
        .bind(at_ms)
        .bind(at_ms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let seq = Self::insert_event(tx, KIND_GLOBAL_CUTOFF, None, None, at_ms, None).await?;
        Ok(SequencedEvent {
            seq,
            event: RevocationEvent::GlobalCutoff { at_ms },
        })
    }

    async fn insert_event(
        tx: &mut sqlx::SqliteConnection,
        kind: &str,
        session_id: Option<SessionId>,
        user_id: Option<i64>,
        at_ms: i64,
        expires_ms: Option<i64>,
    ) -> StoreResult<i64> {
        Self::insert_event_with_key(tx, kind, session_id, user_id, at_ms, expires_ms, None).await
    }

    async fn insert_event_with_key(
        tx: &mut sqlx::SqliteConnection,
        kind: &str,
        session_id: Option<SessionId>,
        user_id: Option<i64>,
        at_ms: i64,
        expires_ms: Option<i64>,
        key_id: Option<&str>,
    ) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO revocation_events (kind, session_id, user_id, at_ms, expires_ms, key_id)
             VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(kind)
        .bind(session_id.map(|s| s.to_string()))
        .bind(user_id)
        .bind(at_ms)
        .bind(expires_ms)
        .bind(key_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        row.try_get::<i64, _>(0).map_err(unavailable)
    }

    /// Records that one session ended, for the view: remembered until `expires_ms`.
    async fn session_revoked(
        tx: &mut sqlx::SqliteConnection,
        sid: SessionId,
        user_id: i64,
        at_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        let seq = Self::insert_event(
            tx,
            KIND_SESSION,
            Some(sid),
            Some(user_id),
            at_ms,
            Some(expires_ms),
        )
        .await?;
        Ok(SequencedEvent {
            seq,
            event: RevocationEvent::SessionRevoked {
                sid,
                user_id,
                expires_ms,
            },
        })
    }

    /// Ends the user's sessions issued at or before `at_ms` and records the cutoff.
    async fn cutoff_user(
        tx: &mut sqlx::SqliteConnection,
        user_id: i64,
        at_ms: i64,
    ) -> StoreResult<SequencedEvent> {
        sqlx::query(
            "UPDATE sessions SET revoked_ms = ?
             WHERE user_id = ? AND revoked_ms IS NULL AND created_ms <= ?",
        )
        .bind(at_ms)
        .bind(user_id)
        .bind(at_ms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let seq =
            Self::insert_event(tx, KIND_USER_CUTOFF, None, Some(user_id), at_ms, None).await?;
        Ok(SequencedEvent {
            seq,
            event: RevocationEvent::UserCutoff { user_id, at_ms },
        })
    }
}

/// Revoked sessions with `low < seq <= high` whose tokens are unexpired at `now_ms`, read
/// window by window (see `REVOKED_WINDOW`) on a connection of their own.
async fn revoked_between(
    pool: SqlitePool,
    mut low: i64,
    high: i64,
    now_ms: i64,
) -> StoreResult<Vec<super::RevokedEntry>> {
    let mut conn = pool.acquire().await.map_err(unavailable)?;
    let mut out = Vec::new();
    while low < high {
        let end = (low + super::REVOKED_WINDOW).min(high);
        let batch: Option<String> = sqlx::query_scalar(
            "SELECT group_concat(session_id || expires_ms, ',') FROM revocation_events
             WHERE kind = ? AND expires_ms > ? AND seq > ? AND seq <= ?",
        )
        .bind(KIND_SESSION)
        .bind(now_ms)
        .bind(low)
        .bind(end)
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

/// Inserts a new session row, last seen at its creation.
async fn insert_session(conn: &mut sqlx::SqliteConnection, s: &NewSession) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO sessions (id, user_id, kind, user_agent, ip, created_ms, last_seen_ms, expires_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(s.id.to_string())
    .bind(s.user_id)
    .bind(s.kind.as_str())
    .bind(&s.user_agent)
    .bind(&s.ip)
    .bind(s.created_ms)
    .bind(s.created_ms)
    .bind(s.expires_ms)
    .execute(&mut *conn)
    .await
    .map_err(unavailable)?;
    Ok(())
}

fn user_from_row(row: &SqliteRow) -> StoreResult<User> {
    Ok(User {
        id: row.try_get("id").map_err(unavailable)?,
        name: row.try_get("name").map_err(unavailable)?,
        password_hash: row.try_get("password_hash").map_err(unavailable)?,
        is_admin: row.try_get::<i64, _>("is_admin").map_err(unavailable)? != 0,
        disabled: row.try_get::<i64, _>("disabled").map_err(unavailable)? != 0,
        created_ms: row.try_get("created_ms").map_err(unavailable)?,
        must_reset: row.try_get::<i64, _>("must_reset").map_err(unavailable)? != 0,
        failed_logins: row.try_get("failed_logins").map_err(unavailable)?,
        locked_until_ms: row.try_get("locked_until_ms").map_err(unavailable)?,
        last_failure_ms: row.try_get("last_failure_ms").map_err(unavailable)?,
        totp_secret: row.try_get("totp_secret").map_err(unavailable)?,
        totp_enabled: row.try_get::<i64, _>("totp_enabled").map_err(unavailable)? != 0,
        totp_last_step: row.try_get("totp_last_step").map_err(unavailable)?,
    })
}

fn audit_from_row(row: &SqliteRow) -> StoreResult<AuditEntry> {
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

fn session_from_row(row: &SqliteRow) -> StoreResult<SessionRecord> {
    let id: String = row.try_get("id").map_err(unavailable)?;
    let kind: String = row.try_get("kind").map_err(unavailable)?;
    Ok(SessionRecord {
        id: sid_from_text(&id)?,
        user_id: row.try_get("user_id").map_err(unavailable)?,
        user_name: row.try_get("user_name").map_err(unavailable)?,
        kind: SessionKind::parse(&kind),
        user_agent: row.try_get("user_agent").map_err(unavailable)?,
        ip: row.try_get("ip").map_err(unavailable)?,
        created_ms: row.try_get("created_ms").map_err(unavailable)?,
        last_seen_ms: row.try_get("last_seen_ms").map_err(unavailable)?,
        expires_ms: row.try_get("expires_ms").map_err(unavailable)?,
        revoked_ms: row.try_get("revoked_ms").map_err(unavailable)?,
    })
}

fn event_from_row(row: &SqliteRow) -> StoreResult<SequencedEvent> {
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

const SESSION_COLUMNS: &str = "s.id, s.user_id, u.name AS user_name, s.kind, s.user_agent, s.ip,
     s.created_ms, s.last_seen_ms, s.expires_ms, s.revoked_ms";

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn user_count(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        row.try_get::<i64, _>(0).map_err(unavailable)
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
             VALUES (?, ?, ?, 0, ?) RETURNING {USER_COLUMNS}"
        ))
        .bind(name)
        .bind(password_hash)
        .bind(is_admin as i64)
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
            "SELECT {USER_COLUMNS} FROM users WHERE name = ? COLLATE NOCASE"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users ORDER BY name COLLATE NOCASE"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(user_from_row).collect()
    }

    async fn find_user_by_id(&self, id: i64) -> StoreResult<Option<User>> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET password_hash = ? WHERE id = ?")
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
        let done = sqlx::query("UPDATE users SET disabled = ? WHERE id = ?")
            .bind(disabled as i64)
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
                "UPDATE sessions SET revoked_ms = ?
                 WHERE user_id = ? AND revoked_ms IS NULL AND created_ms <= ?",
            )
            .bind(now_ms)
            .bind(user_id)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            let seq = Self::insert_event(
                &mut tx,
                KIND_USER_DISABLED,
                None,
                Some(user_id),
                now_ms,
                None,
            )
            .await?;
            events.push(SequencedEvent {
                seq,
                event: RevocationEvent::UserDisabled { user_id },
            });
            let seq =
                Self::insert_event(&mut tx, KIND_USER_CUTOFF, None, Some(user_id), now_ms, None)
                    .await?;
            events.push(SequencedEvent {
                seq,
                event: RevocationEvent::UserCutoff {
                    user_id,
                    at_ms: now_ms,
                },
            });
        } else {
            let seq = Self::insert_event(
                &mut tx,
                KIND_USER_ENABLED,
                None,
                Some(user_id),
                now_ms,
                None,
            )
            .await?;
            events.push(SequencedEvent {
                seq,
                event: RevocationEvent::UserEnabled { user_id },
            });
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(events)
    }

    async fn create_session(&self, s: &NewSession) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        insert_session(&mut conn, s).await
    }

    async fn get_session(&self, id: SessionId) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.id = ?"
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
             WHERE s.revoked_ms IS NULL AND s.expires_ms > ? AND (? IS NULL OR s.user_id = ?)
             ORDER BY s.created_ms"
        ))
        .bind(now_ms)
        .bind(user_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(session_from_row).collect()
    }

    async fn count_live_sessions(&self, now_ms: i64) -> StoreResult<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT kind, COUNT(*) FROM sessions
             WHERE revoked_ms IS NULL AND expires_ms > ? GROUP BY kind",
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
            "UPDATE sessions SET revoked_ms = COALESCE(revoked_ms, ?) WHERE id = ?
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
        let event = Self::session_revoked(&mut tx, id, user_id, now_ms, expires_ms).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(event))
    }

    async fn signout_user(&self, user_id: i64, now_ms: i64) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let event = Self::cutoff_user(&mut tx, user_id, now_ms).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(event)
    }

    async fn signout_everyone(&self, now_ms: i64) -> StoreResult<SequencedEvent> {
        let mut tx = self.write_tx().await?;
        let event = Self::cutoff_everyone(&mut tx, now_ms).await?;
        tx.commit().await.map_err(unavailable)?;
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
            "UPDATE users SET failed_logins = failed_logins + 1, last_failure_ms = ?,
                 locked_until_ms = CASE WHEN failed_logins + 1 >= ? THEN ? ELSE locked_until_ms END
             WHERE id = ? RETURNING {USER_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(max_failures as i64)
        .bind(now_ms + lockout_ms)
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
             WHERE id = ? AND (failed_logins != 0 OR locked_until_ms IS NOT NULL)",
        )
        .bind(user_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn set_must_reset(&self, user_id: Option<i64>, must: bool) -> StoreResult<u64> {
        let done = sqlx::query("UPDATE users SET must_reset = ? WHERE ? IS NULL OR id = ?")
            .bind(must as i64)
            .bind(user_id)
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
        let done = sqlx::query("UPDATE users SET password_hash = ?, must_reset = 0 WHERE id = ?")
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
        tx.commit().await.map_err(unavailable)?;
        Ok(event)
    }

    async fn set_totp(&self, user_id: i64, secret: Option<&str>, enabled: bool) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE users SET totp_secret = ?, totp_enabled = ? WHERE id = ?")
            .bind(secret)
            .bind(enabled as i64)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if !enabled {
            sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?")
                .bind(user_id)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn accept_totp_step(&self, user_id: i64, step: i64) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE users SET totp_last_step = ? WHERE id = ? AND totp_last_step < ?")
                .bind(step)
                .bind(user_id)
                .bind(step)
                .execute(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(done.rows_affected() == 1)
    }

    async fn replace_recovery_codes(&self, user_id: i64, hashes: &[String]) -> StoreResult<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?")
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        for h in hashes {
            sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)")
                .bind(user_id)
                .bind(h)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn use_recovery_code(&self, user_id: i64, hash: &str, now_ms: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE recovery_codes SET used_ms = ?
             WHERE user_id = ? AND code_hash = ? AND used_ms IS NULL",
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
        sqlx::query("SELECT COUNT(*) FROM recovery_codes WHERE user_id = ? AND used_ms IS NULL")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get(0))
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
        sqlx::query("UPDATE reset_links SET used_ms = ? WHERE user_id = ? AND used_ms IS NULL")
            .bind(now_ms)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO reset_links (token_hash, user_id, created_ms, expires_ms)
             VALUES (?, ?, ?, ?)",
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
            "SELECT user_id, expires_ms, used_ms FROM reset_links WHERE token_hash = ?",
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
        let row = sqlx::query(
            "UPDATE reset_links SET used_ms = ?
             WHERE token_hash = ? AND used_ms IS NULL AND expires_ms > ? RETURNING user_id",
        )
        .bind(now_ms)
        .bind(token_hash)
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let user_id: i64 = row.try_get(0).map_err(unavailable)?;
        sqlx::query(
            "UPDATE users SET password_hash = ?, must_reset = 0, failed_logins = 0,
                 locked_until_ms = NULL WHERE id = ?",
        )
        .bind(password_hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        let event = Self::cutoff_user(&mut tx, user_id, now_ms).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some((user_id, event)))
    }

    async fn touch_sessions(&self, seen: &[(SessionId, i64)]) -> StoreResult<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        for (sid, at) in seen {
            sqlx::query("UPDATE sessions SET last_seen_ms = MAX(last_seen_ms, ?) WHERE id = ?")
                .bind(at)
                .bind(sid.to_string())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }

    async fn breach_response(
        &self,
        now_ms: i64,
        retired_keys: &[String],
    ) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE users SET must_reset = 1")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut events = vec![Self::cutoff_everyone(&mut tx, now_ms).await?];
        for kid in retired_keys {
            let seq = Self::insert_event_with_key(
                &mut tx,
                KIND_KEY_RETIRED,
                None,
                None,
                now_ms,
                None,
                Some(kid),
            )
            .await?;
            events.push(SequencedEvent {
                seq,
                event: RevocationEvent::KeyRetired { kid: kid.clone() },
            });
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(events)
    }

    async fn append_audit(&self, e: &AuditEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (at_ms, event, outcome, user_id, user_name, ip, user_agent,
                 session_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
             FROM audit_log WHERE at_ms >= ? AND (? IS NULL OR user_id = ?)
             ORDER BY id DESC LIMIT ?",
        )
        .bind(since_ms)
        .bind(user_id)
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(audit_from_row).collect()
    }

    async fn events_since(&self, after: i64, limit: i64) -> StoreResult<Vec<SequencedEvent>> {
        let rows = sqlx::query(
            "SELECT e.seq, e.kind, e.session_id, e.user_id, e.at_ms, e.expires_ms, e.key_id,
                    e.token_hash, e.detail, u.name AS user_name
             FROM revocation_events e LEFT JOIN users u ON u.id = e.user_id
             WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(event_from_row).collect()
    }

    async fn snapshot(&self, now_ms: i64) -> StoreResult<Snapshot> {
        // One read transaction: every query sees the same committed state.
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // The AUTOINCREMENT counter, not MAX(seq): a purge may have deleted the newest events,
        // and the next event will still be numbered after the counter.
        let seq: i64 = sqlx::query(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'revocation_events'), 0),
                        COALESCE((SELECT MAX(seq) FROM revocation_events), 0))",
        )
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(unavailable)?;
        // One string per window of sequence numbers (see `REVOKED_WINDOW`): a range scan of
        // the primary key per window, no sort, no million decoded rows. The two halves of the
        // log are read on two more connections at once: events up to `seq` never change once
        // committed (a purge only deletes expired ones, which the view drops anyway), so their
        // own read transactions see the same rows as this one.
        let started = std::time::Instant::now();
        let middle = seq / 2;
        let lower = tokio::spawn(revoked_between(self.pool.clone(), 0, middle, now_ms));
        let upper = tokio::spawn(revoked_between(self.pool.clone(), middle, seq, now_ms));
        // The latest cutoff per user, as one string (a hundred thousand users are one row).
        let cutoffs: Option<String> = sqlx::query_scalar(
            "SELECT group_concat(user_id || ':' || at_ms, ',') FROM (
                 SELECT user_id, MAX(at_ms) AS at_ms FROM revocation_events
                 WHERE kind = ? AND seq <= ? GROUP BY user_id)",
        )
        .bind(KIND_USER_CUTOFF)
        .bind(seq)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let user_cutoffs = super::parse_pairs(cutoffs.as_deref().unwrap_or(""))?;
        let cutoffs_done = started.elapsed();
        let global_cutoff: Option<i64> =
            sqlx::query("SELECT MAX(at_ms) FROM revocation_events WHERE kind = ? AND seq <= ?")
                .bind(KIND_GLOBAL_CUTOFF)
                .bind(seq)
                .fetch_one(&mut *tx)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(unavailable)?;
        let disabled_rows = sqlx::query("SELECT id FROM users WHERE disabled = 1")
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut disabled_users = Vec::with_capacity(disabled_rows.len());
        for row in &disabled_rows {
            disabled_users.push(row.try_get(0).map_err(unavailable)?);
        }
        let retired_keys: Vec<String> = sqlx::query(
            "SELECT DISTINCT key_id FROM revocation_events WHERE kind = ? AND seq <= ?",
        )
        .bind(KIND_KEY_RETIRED)
        .bind(seq)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?
        .iter()
        .filter_map(|r| r.try_get::<Option<String>, _>(0).ok().flatten())
        .collect();
        let mut media_tokens = Vec::new();
        {
            let mut rows = sqlx::query(
                "SELECT m.token_hash, s.id, s.user_id, u.name, s.created_ms, s.expires_ms
                 FROM media_tokens m JOIN sessions s ON s.id = m.session_id
                 JOIN users u ON u.id = s.user_id
                 WHERE s.expires_ms > ?",
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
        let mut revoked = Vec::new();
        for half in [lower, upper] {
            match half.await {
                Ok(part) => revoked.extend(part?),
                Err(e) => {
                    return Err(StoreError::Corrupt(format!(
                        "reading revoked sessions: {e}"
                    )))
                }
            }
        }
        tracing::debug!(?cutoffs_done, revoked_done = ?started.elapsed(), "snapshot read");
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
            "DELETE FROM sessions WHERE expires_ms <= ? AND id NOT IN (
                 SELECT session_id FROM media_tokens WHERE logged_out_ms IS NULL)",
        )
        .bind(now_ms - keep_ms)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?
        .rows_affected();
        // Revoked sessions whose tokens would have expired anyway: the view drops them too.
        deleted += sqlx::query("DELETE FROM revocation_events WHERE kind = ? AND expires_ms <= ?")
            .bind(KIND_SESSION)
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted +=
            sqlx::query("DELETE FROM revocation_events WHERE kind IN (?, ?) AND expires_ms <= ?")
                .bind(KIND_MEDIA_BOUND)
                .bind(KIND_MEDIA_NOTE)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?
                .rows_affected();
        deleted += sqlx::query("DELETE FROM oidc_logout_jtis WHERE expires_ms <= ?")
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted += sqlx::query("DELETE FROM oidc_ended_sids WHERE expires_ms <= ?")
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted += sqlx::query("DELETE FROM reset_links WHERE expires_ms <= ?")
            .bind(now_ms - keep_ms)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        deleted += sqlx::query("DELETE FROM audit_log WHERE at_ms <= ?")
            .bind(now_ms - audit_keep_ms)
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
        let detail = serde_json::to_string(note)
            .map_err(|e| StoreError::Corrupt(format!("a media note: {e}")))?;
        let mut tx = self.write_tx().await?;
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO revocation_events (kind, at_ms, expires_ms, detail)
             VALUES (?, ?, ?, ?) RETURNING seq",
        )
        .bind(KIND_MEDIA_NOTE)
        .bind(now_ms)
        .bind(until_ms)
        .bind(detail)
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(SequencedEvent {
            seq,
            event: RevocationEvent::MediaNote {
                note: note.clone(),
                until_ms,
            },
        })
    }

    async fn bind_media_token(&self, b: &NewMediaBinding) -> StoreResult<Vec<SequencedEvent>> {
        let mut tx = self.write_tx().await?;
        let s = &b.session;
        let existing = sqlx::query("SELECT 1 FROM media_tokens WHERE token_hash = ?")
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id.to_string())
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
        let seq = sqlx::query(
            "INSERT INTO revocation_events (kind, session_id, user_id, at_ms, expires_ms, token_hash)
             VALUES (?, ?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(KIND_MEDIA_BOUND)
        .bind(s.id.to_string())
        .bind(s.user_id)
        .bind(s.created_ms)
        .bind(s.expires_ms)
        .bind(&b.token_hash)
        .fetch_one(&mut *tx)
        .await
        .and_then(|r| r.try_get::<i64, _>(0))
        .map_err(unavailable)?;
        let user_name: String = sqlx::query("SELECT name FROM users WHERE id = ?")
            .bind(s.user_id)
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(unavailable)?;
        let mut events = vec![SequencedEvent {
            seq,
            event: RevocationEvent::MediaBound {
                sid: s.id,
                user_id: s.user_id,
                user_name,
                token_hash: b.token_hash.clone(),
                issued_ms: s.created_ms,
                expires_ms: s.expires_ms,
            },
        }];
        // The media server deleted the older tokens of this device and user when it minted
        // the new one: end their sessions here, with no upstream logout owed.
        let older = sqlx::query(
            "UPDATE sessions SET revoked_ms = ?
             WHERE revoked_ms IS NULL AND id IN (
                 SELECT session_id FROM media_tokens
                 WHERE route = ? AND media_user_id = ? AND device_id = ? AND session_id != ?)
             RETURNING id, user_id, expires_ms",
        )
        .bind(s.created_ms)
        .bind(&b.route)
        .bind(&b.media_user_id)
        .bind(&b.device_id)
        .bind(s.id.to_string())
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        for row in &older {
            let sid = sid_from_text(row.try_get::<&str, _>(0).map_err(unavailable)?)?;
            let user_id: i64 = row.try_get(1).map_err(unavailable)?;
            let expires_ms: i64 = row.try_get(2).map_err(unavailable)?;
            sqlx::query(
                "UPDATE media_tokens SET logged_out_ms = ?, token_sealed = '' WHERE session_id = ?",
            )
            .bind(s.created_ms)
            .bind(sid.to_string())
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
            events.push(
                Self::session_revoked(&mut tx, sid, user_id, s.created_ms, expires_ms).await?,
            );
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(events)
    }

    async fn owed_media_logouts(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<OwedLogout>> {
        let rows = sqlx::query(
            "SELECT m.session_id, m.route, m.token_sealed, m.client, m.device_name, m.device_id,
                    m.version, m.logout_attempts
             FROM media_tokens m JOIN sessions s ON s.id = m.session_id
             WHERE m.logged_out_ms IS NULL AND m.next_attempt_ms <= ?
               AND (s.revoked_ms IS NOT NULL OR s.expires_ms <= ?)
             ORDER BY m.next_attempt_ms LIMIT ?",
        )
        .bind(now_ms)
        .bind(now_ms)
        .bind(limit)
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
            "UPDATE media_tokens SET logged_out_ms = ?, token_sealed = '' WHERE session_id = ?",
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
            "UPDATE media_tokens SET logout_attempts = logout_attempts + 1, next_attempt_ms = ?
             WHERE session_id = ?",
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
            "UPDATE sessions SET revoked_ms = ?
             WHERE revoked_ms IS NULL AND kind = 'media' AND last_seen_ms < ? AND id IN (
                 SELECT session_id FROM media_tokens WHERE route = ?)
             RETURNING id, user_id, expires_ms",
        )
        .bind(now_ms)
        .bind(idle_before_ms)
        .bind(route)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let sid = sid_from_text(row.try_get::<&str, _>(0).map_err(unavailable)?)?;
            let user_id: i64 = row.try_get(1).map_err(unavailable)?;
            let expires_ms: i64 = row.try_get(2).map_err(unavailable)?;
            events.push(Self::session_revoked(&mut tx, sid, user_id, now_ms, expires_ms).await?);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(events)
    }

    async fn set_admin(&self, user_id: i64, is_admin: bool) -> StoreResult<()> {
        let done = sqlx::query("UPDATE users SET is_admin = ? WHERE id = ?")
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
             VALUES (?, ?, ?, ?, ?)",
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
            "SELECT user_id FROM oidc_links WHERE provider = ? AND subject = ? AND issuer = ?",
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
             WHERE user_id = ? ORDER BY provider",
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
        let done = sqlx::query("DELETE FROM oidc_links WHERE provider = ? AND user_id = ?")
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
        let mut tx = self.write_tx().await?;
        if let Some(oidc_sid) = &o.oidc_sid {
            let ended: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM oidc_ended_sids
                 WHERE provider = ? AND oidc_sid = ? AND expires_ms > ?",
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
             VALUES (?, ?, ?, ?, ?, ?)",
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
             WHERE session_id = ?",
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
            "INSERT INTO oidc_logout_jtis (provider, jti, expires_ms) VALUES (?, ?, ?)
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
                    "INSERT INTO oidc_ended_sids (provider, oidc_sid, expires_ms) VALUES (?, ?, ?)
                     ON CONFLICT (provider, oidc_sid)
                     DO UPDATE SET expires_ms = MAX(expires_ms, excluded.expires_ms)",
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
                    "UPDATE sessions SET revoked_ms = ?
                     WHERE revoked_ms IS NULL AND expires_ms > ? AND id IN (
                         SELECT session_id FROM oidc_sessions
                         WHERE provider = ? AND oidc_sid = ? AND (? IS NULL OR subject = ?))
                     RETURNING id, user_id, expires_ms",
                )
                .bind(now_ms)
                .bind(now_ms)
                .bind(&l.provider)
                .bind(oidc_sid)
                .bind(subject.as_deref())
                .bind(subject.as_deref())
                .fetch_all(&mut *tx)
                .await
                .map_err(unavailable)?;
                let mut users = Vec::new();
                for row in &rows {
                    let sid = sid_from_text(row.try_get::<&str, _>(0).map_err(unavailable)?)?;
                    let user_id: i64 = row.try_get(1).map_err(unavailable)?;
                    let expires_ms: i64 = row.try_get(2).map_err(unavailable)?;
                    if !users.contains(&user_id) {
                        users.push(user_id);
                    }
                    events.push(
                        Self::session_revoked(&mut tx, sid, user_id, now_ms, expires_ms).await?,
                    );
                }
                for user_id in users {
                    let rows = sqlx::query(
                        "UPDATE sessions SET revoked_ms = ?
                         WHERE revoked_ms IS NULL AND expires_ms > ? AND user_id = ?
                           AND kind = 'media'
                         RETURNING id, user_id, expires_ms",
                    )
                    .bind(now_ms)
                    .bind(now_ms)
                    .bind(user_id)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                    for row in &rows {
                        let sid = sid_from_text(row.try_get::<&str, _>(0).map_err(unavailable)?)?;
                        let expires_ms: i64 = row.try_get(2).map_err(unavailable)?;
                        events.push(
                            Self::session_revoked(&mut tx, sid, user_id, now_ms, expires_ms)
                                .await?,
                        );
                    }
                }
            }
            (None, Some(subject)) => {
                let user: Option<i64> = sqlx::query_scalar(
                    "SELECT user_id FROM oidc_links
                     WHERE provider = ? AND subject = ? AND issuer = ?",
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
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(events))
    }
}

// The tests run against every backend: see `store::tests`.
