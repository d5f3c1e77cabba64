//! Backup and restore of a SQLite deployment.
//!
//! A backup is one tar file (mode 0600) holding, in this order: `manifest.json` (format,
//! creation time, Portcullis version, backend, schema version, user count, and the size and
//! SHA-256 of every other entry), `portcullis.db` (a consistent copy of the store taken online
//! with SQLite's `VACUUM INTO`: the database as of one commit, while the gateway keeps serving),
//! and the key files the store depends on: `session.key` (signing keys; absent when the key
//! comes from `PORTCULLIS_SESSION_KEY`) and `secrets.key` (it encrypts the TOTP secrets and
//! keys the media-token hashes, so without it 2FA and bound media tokens cannot be restored).
//! The file is as sensitive as the keys themselves.
//!
//! A restore refuses while any gateway holds the data-directory lock (`datadir`), refuses a
//! backup from a newer schema or format, and refuses to write over an existing store or key
//! file unless `--force`, which moves the current files aside (`*.before-restore-TIME`, the
//! store with its `-wal`/`-shm` kept as a pair). Everything is checked and written to
//! `*.restore-partial` files first; only then are they renamed into place, so a bad backup
//! changes nothing. **A restore never brings a revoked session or token back to life:** by
//! default it commits a global cutoff at restore time into the restored store (every gateway
//! token and every bound media token issued before it is dead, and the media tokens are logged
//! out upstream by the gateway's media loop); `keep_sessions` skips that, for recovering a lost
//! disk right after the backup, and the CLI warns that sessions signed out since the backup
//! work again.
//!
//! PostgreSQL stores are backed up with `pg_dump` (see the README); both commands refuse them
//! with a message that says so.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::datadir::{DataDirError, DataDirLock, LockMode};
use crate::store::sqlite::{self, SqliteStore};
use crate::store::{AuditEntry, Store, StoreError};

/// The `format` every manifest names.
pub const FORMAT: &str = "portcullis-backup";
/// The newest backup format this binary writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const DATABASE: &str = "portcullis.db";
const SESSION_KEY: &str = "session.key";
const SECRETS_KEY: &str = "secrets.key";
/// A manifest or key file larger than this (bytes) is not one.
const MAX_SMALL_FILE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the store is PostgreSQL: back it up with pg_dump (`pg_dump --format=custom --file=portcullis.dump DATABASE`) and copy {session_key} and {secrets_key} with it; see the README, \"Backup and restore\"")]
    PostgresBackup {
        session_key: String,
        secrets_key: String,
    },
    #[error("the store is PostgreSQL: restore it with pg_restore, then end every session from before the dump with `portcullis signout --everyone`; see the README, \"Backup and restore\"")]
    PostgresRestore,
    #[error("there is no store at {0} to back up")]
    NoStore(String),
    #[error("{0} already exists: a backup never overwrites a file; choose another name")]
    OutputExists(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("{path} is not a Portcullis backup: {problem}")]
    NotABackup { path: String, problem: String },
    #[error("{path} is damaged: {problem}")]
    Damaged { path: String, problem: String },
    #[error("this backup was written by a newer Portcullis (schema {found}, this binary knows up to {known}): restore it with that version or a newer one")]
    NewerSchema { found: i64, known: i64 },
    #[error("this backup was written by a newer Portcullis (backup format {found}, this binary reads up to {FORMAT_VERSION}): restore it with that version or a newer one")]
    NewerFormat { found: u32 },
    #[error("{0} already exists: restore writes only where nothing is, so that no store is lost; move it away, or pass --force to have it moved aside (renamed to *.before-restore-TIME)")]
    TargetExists(String),
}

type Result<T> = std::result::Result<T, BackupError>;

/// What `manifest.json` says.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub created_ms: i64,
    pub portcullis_version: String,
    pub backend: String,
    pub schema_version: i64,
    pub users: i64,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    fn has(&self, name: &str) -> bool {
        self.files.iter().any(|f| f.name == name)
    }
}

/// What a backup wrote.
#[derive(Debug)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// How long the online database copy took.
    pub copy_time: Duration,
    pub total_time: Duration,
    pub manifest: Manifest,
    /// Things the operator should know (a key that is not in the backup, and why).
    pub notes: Vec<String>,
}

/// How a restore treats the sessions in the backup.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Do not end the sessions and media tokens from before the backup.
    pub keep_sessions: bool,
    /// Move existing files aside instead of refusing.
    pub force: bool,
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreReport {
    pub manifest: Manifest,
    /// Whether every session and media token from before the restore was ended.
    pub sessions_ended: bool,
    pub written: Vec<PathBuf>,
    /// `(old place, new place)` of files moved aside by `force`.
    pub moved_aside: Vec<(PathBuf, PathBuf)>,
    pub notes: Vec<String>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
    let path = path.display().to_string();
    move |source| BackupError::Io { what, path, source }
}

fn sqlite_path(config: &Config) -> Option<PathBuf> {
    config
        .store
        .url
        .expose()
        .strip_prefix("sqlite://")
        .map(PathBuf::from)
}

fn now_ms() -> i64 {
    crate::app::now_ms()
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The time as RFC 3339, or the milliseconds when it cannot be written so.
pub fn time_text(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// A directory removed (with what is in it) when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Files removed when dropped, unless disarmed.
struct Cleanup {
    files: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            for f in &self.files {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

fn sync_dir(dir: &Path) {
    // Best effort: makes a rename durable; some filesystems refuse to fsync a directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Hex SHA-256 and length of a file.
fn digest_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(io("cannot read", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let got = f.read(&mut buf).map_err(io("cannot read", path))?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
        n += got as u64;
    }
    Ok((hex::encode(hasher.finalize()), n))
}

/// Reads a key file for the backup: `None` (with a note) when there is none yet.
fn read_key(path: &Path, name: &str, notes: &mut Vec<String>) -> Result<Option<Vec<u8>>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            notes.push(format!(
                "no {name} at {} (a gateway creates it at first start); the backup holds none",
                path.display()
            ));
            return Ok(None);
        }
        Err(e) => return Err(io("cannot read", path)(e)),
        Ok(m) if m.len() > MAX_SMALL_FILE => {
            return Err(BackupError::Io {
                what: "cannot back up",
                path: path.display().to_string(),
                source: std::io::Error::other("too large for a key file"),
            })
        }
        Ok(_) => {}
    }
    std::fs::read(path)
        .map(Some)
        .map_err(io("cannot read", path))
}

fn tar_header(name: &str, bytes: u64, mtime_s: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name)
        .map_err(io("cannot name", Path::new(name)))?;
    h.set_size(bytes);
    h.set_mode(0o600);
    h.set_mtime(mtime_s);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

/// Takes a consistent copy of the store while the gateway serves and writes it, with the key
/// files and a manifest, to `out` (mode 0600; never overwriting a file).
pub async fn backup(config: &Config, out: &Path) -> Result<BackupReport> {
    let started = Instant::now();
    let Some(db) = sqlite_path(config) else {
        return Err(BackupError::PostgresBackup {
            session_key: config.session.key_file.display().to_string(),
            secrets_key: config.auth.secrets_key_file.display().to_string(),
        });
    };
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(BackupError::OutputExists(out.display().to_string()));
    }
    if !db.exists() {
        return Err(BackupError::NoStore(db.display().to_string()));
    }
    let out_dir = parent_of(out);
    let tmp = out_dir.join(format!(".portcullis-backup-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io("cannot create", &tmp))?;
    let tmp = TempDir(tmp);
    let copy = tmp.0.join(DATABASE);

    let db_text = db
        .to_str()
        .ok_or_else(|| BackupError::NoStore(db.display().to_string()))?;
    let store = SqliteStore::open(db_text, config.store.busy_timeout).await?;
    let copy_started = Instant::now();
    let copied = store.copy_into(&copy).await;
    let copy_time = copy_started.elapsed();
    store.close().await;
    copied?;
    let created_ms = now_ms();

    let (schema_version, users) = inspect_copy(&copy).await?;
    let mut notes = Vec::new();
    let session_key = if config.session.key_override.is_some() {
        notes.push(
            "the session signing key comes from PORTCULLIS_SESSION_KEY and is not in the backup; keep it with the backup"
                .to_string(),
        );
        None
    } else {
        read_key(&config.session.key_file, SESSION_KEY, &mut notes)?
    };
    let secrets_key = read_key(&config.auth.secrets_key_file, SECRETS_KEY, &mut notes)?;

    let (db_sha, db_bytes) = digest_file(&copy)?;
    let mut files = vec![FileEntry {
        name: DATABASE.to_string(),
        bytes: db_bytes,
        sha256: db_sha,
    }];
    for (name, data) in [(SESSION_KEY, &session_key), (SECRETS_KEY, &secrets_key)] {
        if let Some(d) = data {
            files.push(FileEntry {
                name: name.to_string(),
                bytes: d.len() as u64,
                sha256: hex::encode(Sha256::digest(d)),
            });
        }
    }
    let manifest = Manifest {
        format: FORMAT.to_string(),
        format_version: FORMAT_VERSION,
        created_ms,
        portcullis_version: env!("CARGO_PKG_VERSION").to_string(),
        backend: "sqlite".to_string(),
        schema_version,
        users,
        files,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Io {
        what: "cannot write the manifest for",
        path: out.display().to_string(),
        source: std::io::Error::other(e),
    })?;

    let archive = tmp.0.join("backup.tar");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&archive)
        .map_err(io("cannot create", &archive))?;
    let mtime = u64::try_from(created_ms / 1000).unwrap_or(0);
    let mut builder = tar::Builder::new(file);
    let w = io("cannot write", &archive);
    builder
        .append(
            &tar_header(MANIFEST, manifest_json.len() as u64, mtime)?,
            manifest_json.as_slice(),
        )
        .map_err(io("cannot write", &archive))?;
    let db_file = File::open(&copy).map_err(io("cannot read", &copy))?;
    builder
        .append(&tar_header(DATABASE, db_bytes, mtime)?, db_file)
        .map_err(io("cannot write", &archive))?;
    for (name, data) in [(SESSION_KEY, &session_key), (SECRETS_KEY, &secrets_key)] {
        if let Some(d) = data {
            builder
                .append(&tar_header(name, d.len() as u64, mtime)?, d.as_slice())
                .map_err(io("cannot write", &archive))?;
        }
    }
    let file = builder.into_inner().map_err(io("cannot write", &archive))?;
    file.sync_all().map_err(w)?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    // A hard link, not a rename: it fails if `out` appeared meanwhile instead of replacing it.
    std::fs::hard_link(&archive, out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            BackupError::OutputExists(out.display().to_string())
        } else {
            io("cannot write", out)(e)
        }
    })?;
    sync_dir(&out_dir);
    drop(tmp);
    Ok(BackupReport {
        path: out.to_path_buf(),
        bytes,
        copy_time,
        total_time: started.elapsed(),
        manifest,
        notes,
    })
}

/// Opens a database copy (never creating one) on a connection of its own.
async fn connect(path: &Path) -> Result<sqlx::SqliteConnection> {
    use sqlx::ConnectOptions;
    sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .connect()
        .await
        .map_err(|e| BackupError::Damaged {
            path: path.display().to_string(),
            problem: format!("the database cannot be opened: {e}"),
        })
}

/// The schema version and user count of a database copy.
async fn inspect_copy(path: &Path) -> Result<(i64, i64)> {
    use sqlx::Connection;
    let mut conn = connect(path).await?;
    let version = sqlite::applied_schema_version(&mut conn).await.unwrap_or(0);
    let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
    let _ = conn.close().await;
    Ok((version, users))
}

/// Checks a manifest against what this binary can restore.
fn check_manifest(m: &Manifest, path: &Path) -> Result<()> {
    let not = |problem: String| BackupError::NotABackup {
        path: path.display().to_string(),
        problem,
    };
    if m.format != FORMAT {
        return Err(not(format!("its manifest names the format `{}`", m.format)));
    }
    if m.format_version > FORMAT_VERSION {
        return Err(BackupError::NewerFormat {
            found: m.format_version,
        });
    }
    if m.schema_version > sqlite::schema_version() {
        return Err(BackupError::NewerSchema {
            found: m.schema_version,
            known: sqlite::schema_version(),
        });
    }
    if m.backend != "sqlite" {
        return Err(not(format!("it holds a `{}` store", m.backend)));
    }
    let mut seen = Vec::new();
    for f in &m.files {
        if ![DATABASE, SESSION_KEY, SECRETS_KEY].contains(&f.name.as_str()) {
            return Err(not(format!(
                "its manifest lists an unknown file `{}`",
                f.name
            )));
        }
        if seen.contains(&f.name) {
            return Err(not(format!("its manifest lists `{}` twice", f.name)));
        }
        if f.name != DATABASE && f.bytes > MAX_SMALL_FILE {
            return Err(not(format!("`{}` is too large for a key file", f.name)));
        }
        seen.push(f.name.clone());
    }
    if !m.has(DATABASE) {
        return Err(not("it holds no database".to_string()));
    }
    Ok(())
}

/// Where each file of the backup goes, by the config.
fn targets(
    config: &Config,
    db: &Path,
    m: &Manifest,
    notes: &mut Vec<String>,
) -> Vec<(String, PathBuf)> {
    let mut out = vec![(DATABASE.to_string(), db.to_path_buf())];
    if m.has(SESSION_KEY) {
        if config.session.key_override.is_some() {
            notes.push("the backup's session.key is not written: the signing key comes from PORTCULLIS_SESSION_KEY".to_string());
        } else {
            out.push((SESSION_KEY.to_string(), config.session.key_file.clone()));
        }
    } else if config.session.key_override.is_none() {
        notes.push(
            "the backup holds no session.key: the gateway creates a new one at start".to_string(),
        );
    }
    if m.has(SECRETS_KEY) {
        out.push((
            SECRETS_KEY.to_string(),
            config.auth.secrets_key_file.clone(),
        ));
    } else {
        notes.push(
            "the backup holds no secrets.key: 2FA secrets and media tokens in it cannot be read"
                .to_string(),
        );
    }
    out
}

/// Restores a backup into the store and key files the config names. See the module
/// documentation for what is refused and what is ended.
pub async fn restore(config: &Config, file: &Path, opts: RestoreOptions) -> Result<RestoreReport> {
    let Some(db) = sqlite_path(config) else {
        return Err(BackupError::PostgresRestore);
    };
    let backup = File::open(file).map_err(io("cannot read the backup", file))?;
    let _lock = DataDirLock::acquire(&config.server.data_dir, LockMode::Exclusive)?;

    let not = |problem: String| BackupError::NotABackup {
        path: file.display().to_string(),
        problem,
    };
    let damaged = |problem: String| BackupError::Damaged {
        path: file.display().to_string(),
        problem,
    };
    let mut archive = tar::Archive::new(backup);
    let mut entries = archive
        .entries()
        .map_err(|e| not(format!("it is not a tar file ({e})")))?;
    let manifest: Manifest = {
        let mut first = match entries.next() {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(not(format!("it is not a tar file ({e})"))),
            None => return Err(not("it is empty".to_string())),
        };
        let name = first
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name != MANIFEST {
            return Err(not(format!("its first entry is `{name}`, not {MANIFEST}")));
        }
        let mut text = Vec::new();
        (&mut first)
            .take(MAX_SMALL_FILE + 1)
            .read_to_end(&mut text)
            .map_err(|e| damaged(format!("the manifest cannot be read ({e})")))?;
        if text.len() as u64 > MAX_SMALL_FILE {
            return Err(not("its manifest is too large".to_string()));
        }
        serde_json::from_slice(&text).map_err(|e| not(format!("its manifest is invalid ({e})")))?
    };
    check_manifest(&manifest, file)?;

    let mut notes = Vec::new();
    let targets = targets(config, &db, &manifest, &mut notes);
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_else(|_| now_ms().to_string());
    // Everything that would be replaced, with where `force` moves it.
    let mut existing = Vec::new();
    for (name, target) in &targets {
        let mut group = vec![(
            target.clone(),
            with_suffix(target, &format!(".before-restore-{stamp}")),
        )];
        if name == DATABASE {
            for side in ["-wal", "-shm"] {
                group.push((
                    with_suffix(target, side),
                    with_suffix(target, &format!(".before-restore-{stamp}{side}")),
                ));
            }
        }
        for (from, to) in group {
            if std::fs::symlink_metadata(&from).is_ok() {
                if !opts.force {
                    return Err(BackupError::TargetExists(from.display().to_string()));
                }
                existing.push((from, to));
            }
        }
    }

    // Extract every file next to its target, checking size and digest.
    let mut cleanup = Cleanup {
        files: Vec::new(),
        armed: true,
    };
    let mut done: Vec<String> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(format!("it cannot be read ({e})")))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(listed) = manifest.files.iter().find(|f| f.name == name) else {
            return Err(not(format!(
                "it holds `{name}`, which its manifest does not list"
            )));
        };
        if done.contains(&name) {
            return Err(not(format!("it holds `{name}` twice")));
        }
        done.push(name.clone());
        let Some((_, target)) = targets.iter().find(|(n, _)| *n == name) else {
            // A session key that PORTCULLIS_SESSION_KEY replaces: not written.
            continue;
        };
        let partial = with_suffix(target, ".restore-partial");
        let dir = parent_of(target);
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(io("cannot create", &partial))?;
        cleanup.files.push(partial.clone());
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            let got = entry
                .read(&mut buf)
                .map_err(|e| damaged(format!("`{name}` cannot be read ({e})")))?;
            if got == 0 {
                break;
            }
            n += got as u64;
            if n > listed.bytes {
                return Err(damaged(format!(
                    "`{name}` is longer than its manifest says"
                )));
            }
            hasher.update(&buf[..got]);
            out.write_all(&buf[..got])
                .map_err(io("cannot write", &partial))?;
        }
        if n != listed.bytes || hex::encode(hasher.finalize()) != listed.sha256 {
            return Err(damaged(format!(
                "`{name}` does not match its manifest (size or SHA-256)"
            )));
        }
        out.sync_all().map_err(io("cannot write", &partial))?;
    }
    if let Some(missing) = manifest.files.iter().find(|f| !done.contains(&f.name)) {
        return Err(damaged(format!(
            "it lacks `{}`, which its manifest lists",
            missing.name
        )));
    }

    // Check the database itself, then end the old sessions in it before it goes live.
    let partial_db = with_suffix(&db, ".restore-partial");
    for side in ["-wal", "-shm", "-journal"] {
        cleanup.files.push(with_suffix(&partial_db, side));
    }
    {
        use sqlx::Connection;
        let mut conn = connect(&partial_db).await?;
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| e.to_string());
        let found = sqlite::applied_schema_version(&mut conn).await;
        let _ = conn.close().await;
        if check != "ok" {
            return Err(damaged(format!(
                "its database fails SQLite's integrity check: {check}"
            )));
        }
        match found {
            None => return Err(damaged("its database has no schema version".to_string())),
            Some(found) if found > sqlite::schema_version() => {
                return Err(BackupError::NewerSchema {
                    found,
                    known: sqlite::schema_version(),
                })
            }
            Some(_) => {}
        }
    }
    let partial_text = partial_db
        .to_str()
        .ok_or_else(|| BackupError::NoStore(partial_db.display().to_string()))?;
    let store = SqliteStore::open(partial_text, config.store.busy_timeout).await?;
    let now = now_ms();
    let result = async {
        if !opts.keep_sessions {
            store.signout_everyone(now).await?;
        }
        let detail = format!(
            "from a backup made {} by Portcullis {} (schema {}); {}",
            time_text(manifest.created_ms),
            manifest.portcullis_version,
            manifest.schema_version,
            if opts.keep_sessions {
                "sessions from before it kept (--keep-sessions)"
            } else {
                "every session and media token from before it ended"
            }
        );
        store
            .append_audit(&AuditEntry {
                at_ms: now,
                event: "restore".to_string(),
                outcome: "success".to_string(),
                ip: "cli".to_string(),
                detail,
                ..AuditEntry::default()
            })
            .await
    }
    .await;
    store.close().await;
    result?;
    {
        // Fold the write-ahead log into the file so that it can be renamed alone (the
        // gateway turns WAL on again when it opens the store).
        // Leaving WAL needs the only connection to the file, and the store's pooled connections
        // close on their own threads after `close` returns: a busy answer is waited out (for two
        // seconds at most), not taken for damage.
        use sqlx::Connection;
        let mut conn = connect(&partial_db).await?;
        let mut tries = 0;
        let folded = loop {
            let r = sqlx::query_scalar::<_, String>("PRAGMA journal_mode = DELETE")
                .fetch_one(&mut conn)
                .await;
            let busy =
                matches!(&r, Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("5"));
            if !busy || tries == 20 {
                break r;
            }
            tries += 1;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let _ = conn.close().await;
        folded.map_err(|e| damaged(format!("its database cannot be finished: {e}")))?;
    }
    let wal = with_suffix(&partial_db, "-wal");
    if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
        return Err(BackupError::Io {
            what: "cannot finish",
            path: wal.display().to_string(),
            source: std::io::Error::other("SQLite left its write-ahead log behind"),
        });
    }

    // Nothing can fail for a reason of the backup's any more: put the files in place.
    let mut moved_aside = Vec::new();
    for (from, to) in existing {
        std::fs::rename(&from, &to).map_err(io("cannot move aside", &from))?;
        moved_aside.push((from, to));
    }
    let mut written = Vec::new();
    for (_, target) in &targets {
        let partial = with_suffix(target, ".restore-partial");
        std::fs::rename(&partial, target).map_err(io("cannot put in place", target))?;
        sync_dir(&parent_of(target));
        written.push(target.clone());
    }
    // The partials are renamed; what is left to remove are the side files of the check.
    cleanup.files.retain(|f| {
        !written
            .iter()
            .any(|w| with_suffix(w, ".restore-partial") == *f)
    });
    drop(cleanup);
    Ok(RestoreReport {
        manifest,
        sessions_ended: !opts.keep_sessions,
        written,
        moved_aside,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            created_ms: 0,
            portcullis_version: "0.1.0".to_string(),
            backend: "sqlite".to_string(),
            schema_version: sqlite::schema_version(),
            users: 1,
            files: vec![FileEntry {
                name: DATABASE.to_string(),
                bytes: 1,
                sha256: String::new(),
            }],
        }
    }

    #[test]
    fn manifest_checks_name_the_problem() {
        let p = Path::new("b.tar");
        check_manifest(&manifest(), p).unwrap();
        let mut m = manifest();
        m.schema_version = sqlite::schema_version() + 1;
        let e = check_manifest(&m, p).unwrap_err().to_string();
        assert!(e.contains("newer Portcullis (schema"), "{e}");
        let mut m = manifest();
        m.format_version = FORMAT_VERSION + 1;
        assert!(matches!(
            check_manifest(&m, p),
            Err(BackupError::NewerFormat { .. })
        ));
        let mut m = manifest();
        m.files[0].name = "../../etc/passwd".to_string();
        let e = check_manifest(&m, p).unwrap_err().to_string();
        assert!(e.contains("unknown file"), "{e}");
        let mut m = manifest();
        m.files.clear();
        assert!(check_manifest(&m, p)
            .unwrap_err()
            .to_string()
            .contains("no database"));
        let mut m = manifest();
        m.backend = "postgres".to_string();
        assert!(check_manifest(&m, p).is_err());
    }
}
