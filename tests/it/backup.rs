//! Backup and restore through the real CLI: a backup taken while a real gateway serves logins
//! and sign-outs, restored into a fresh directory where a new gateway starts; the refusals
//! (a running gateway, a newer schema in a backup or in a store, a damaged backup) leave
//! everything as it was.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis::auth::totp;
use sha2::Digest;

use crate::account::{enrol, Browser};
use crate::harness::{client, poll_until, Gateway, GatewayBuilder, BIN};
use crate::jellyfin::{token_of, PW};
use crate::standin::StandIn;

/// The route: Jellyfin, so that media tokens are bound.
const JELLYFIN: &str = "kind = \"jellyfin\"\nmedia = { }";
/// Users inserted straight into the store, so the backup has some size to it.
const BULK_USERS: i64 = 10_000;

fn builder(jf: &StandIn) -> GatewayBuilder {
    Gateway::builder(&jf.url()).route_keys(JELLYFIN)
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Status of a gateway-session request on the Jellyfin route: 401 when the gateway refuses
/// it, the stand-in's 404 (an unknown path) when it lets it through.
async fn session_status(gw: &Gateway, token: &str) -> u16 {
    gw.get_status("/probe", token).await
}

/// Status of `GET /Users/Me` with a media-server token.
async fn media_status(gw: &Gateway, token: &str) -> u16 {
    client()
        .get(gw.url("/Users/Me"))
        .header("X-Emby-Token", token)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn sqlite_pool(db: &Path) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite:")
        .unwrap()
        .filename(db)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap()
}

/// Adds `BULK_USERS` users (alice's password hash) and a session for each, in one transaction
/// of their own while the gateway runs.
async fn add_bulk_users(db: &Path) {
    let pool = sqlite_pool(db).await;
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE name = 'alice'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let now = now_s() * 1000;
    let mut tx = pool.begin().await.unwrap();
    for i in 0..BULK_USERS {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO users (name, password_hash, created_ms) VALUES (?, ?, ?) RETURNING id",
        )
        .bind(format!("bulk{i:05}"))
        .bind(&hash)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO sessions (id, user_id, kind, user_agent, ip, created_ms, last_seen_ms, expires_ms)
             VALUES (?, ?, 'api', 'bulk', '127.0.0.1', ?, ?, ?)",
        )
        .bind(format!("{:032x}", rand::random::<u128>()))
        .bind(id)
        .bind(now)
        .bind(now)
        .bind(now + 3_600_000)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    pool.close().await;
}

/// What the load did: completed login + sign-out rounds and every unexpected answer.
#[derive(Default)]
struct Load {
    rounds: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// Logs `user` in, checks the session passes, signs it out and checks it is refused, until
/// told to stop.
async fn churn(base: String, user: String, load: Arc<Load>) {
    let http = client();
    let fail = |what: String| load.failures.lock().unwrap().push(what);
    while !load.stop.load(Ordering::Relaxed) {
        let resp = http
            .post(format!("{base}/_portcullis/api/login"))
            .json(&serde_json::json!({"username": user, "password": PW}))
            .send()
            .await;
        let token = match resp {
            Ok(r) if r.status() == 200 => {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                v["token"].as_str().unwrap_or_default().to_string()
            }
            Ok(r) => {
                fail(format!("login of {user}: {}", r.status()));
                continue;
            }
            Err(e) => {
                fail(format!("login of {user}: {e}"));
                continue;
            }
        };
        let probe = |token: String| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                http.get(format!("{base}/probe"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        };
        let before = probe(token.clone()).await;
        if before != 404 {
            fail(format!("{user}'s fresh session: {before}"));
        }
        let out = http
            .post(format!("{base}/_portcullis/logout"))
            .header("Origin", base.clone())
            .bearer_auth(&token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if out != 204 {
            fail(format!("sign-out of {user}: {out}"));
        }
        let after = probe(token).await;
        if after != 401 {
            fail(format!("{user}'s signed-out session: {after}"));
        }
        load.rounds.fetch_add(1, Ordering::Relaxed);
    }
}

/// The state built before the backup, and what the tests check after a restore.
struct Before {
    jf: StandIn,
    gw: Gateway,
    backup: PathBuf,
    _backup_dir: tempfile::TempDir,
    /// bob's TOTP seed.
    seed: Vec<u8>,
    /// An API session of alice's that is live at the backup.
    live: String,
    /// An API session of alice's ended before the backup.
    revoked: String,
    /// A Jellyfin token of alice's, bound through the gateway.
    media: String,
}

/// A gateway with alice, bob (with TOTP), a live and a revoked session, a bound media token
/// and many users; a backup taken while two clients log in and out.
async fn before_backup() -> Before {
    let jf = StandIn::start().await;
    for u in ["alice", "bob", "carol", "dave"] {
        jf.add_user(u, PW, false);
    }
    let gw = builder(&jf)
        .user("alice", PW)
        .user("bob", PW)
        .user("carol", PW)
        .user("dave", PW)
        .start()
        .await;
    let b = Browser::login(&gw, "bob", PW).await;
    let (seed, _codes) = enrol(&b).await;
    let live = gw.login("alice", PW).await.token;
    let revoked = gw.login("alice", PW).await;
    gw.cli_ok(&["session", "revoke", &revoked.session_id]);
    assert_eq!(session_status(&gw, &live).await, 404);
    assert!(
        gw.refused_within(&revoked.token, Duration::from_secs(2))
            .await
    );
    let media = token_of(&gw, "alice", "phone-1").await;
    assert_eq!(media_status(&gw, &media).await, 200);
    add_bulk_users(&gw.db_path()).await;

    let load = Arc::new(Load::default());
    let tasks: Vec<_> = ["carol", "dave"]
        .into_iter()
        .map(|u| tokio::spawn(churn(gw.base.clone(), u.to_string(), load.clone())))
        .collect();
    assert!(
        poll_until(Duration::from_secs(30), || async {
            load.rounds.load(Ordering::Relaxed) >= 2
        })
        .await,
        "the load never got going: {:?}",
        load.failures.lock().unwrap()
    );
    let backup_dir = tempfile::tempdir().unwrap();
    let backup = backup_dir.path().join("portcullis-backup.tar");
    let rounds_at_start = load.rounds.load(Ordering::Relaxed);
    let started = Instant::now();
    let out = {
        let (config, backup) = (gw.config_path(), backup.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .arg("--config")
                .arg(config)
                .args(["backup", "--out"])
                .arg(backup)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let took = started.elapsed();
    let rounds_during = load.rounds.load(Ordering::Relaxed) - rounds_at_start;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "backup failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The load goes on after the backup too: the gateway keeps serving.
    let target = load.rounds.load(Ordering::Relaxed) + 2;
    assert!(
        poll_until(Duration::from_secs(30), || async {
            load.rounds.load(Ordering::Relaxed) >= target
        })
        .await
    );
    load.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = load.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "requests failed around the backup: {failures:?}"
    );
    let size = std::fs::metadata(&backup).unwrap().len();
    eprintln!(
        "backup of {} users: {size} bytes in {} ms (CLI run); {rounds_during} login/sign-out rounds completed during it, {} in all, 0 failed\n{stdout}",
        BULK_USERS + 4,
        took.as_millis(),
        load.rounds.load(Ordering::Relaxed)
    );
    assert!(
        stdout.contains("secrets.key") && stdout.contains("session.key"),
        "{stdout}"
    );
    assert!(stdout.contains("as secret as the keys"), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the backup is readable by others");

    Before {
        jf,
        gw,
        backup,
        _backup_dir: backup_dir,
        seed,
        live,
        revoked: revoked.token,
        media,
    }
}

/// A gateway's config for a fresh directory, not started.
fn fresh(jf: &StandIn) -> Gateway {
    builder(jf).configure()
}

/// A fresh directory for the same deployment: the same public URL (the tokens' audience) as
/// the gateway whose backup it receives, so that a token it refuses is refused as revoked.
fn fresh_for(jf: &StandIn, original: &Gateway) -> Gateway {
    builder(jf)
        .server_keys(&format!("public_url = \"{}\"", original.base))
        .configure()
}

fn restore(gw: &Gateway, backup: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["restore", backup.to_str().unwrap()];
    args.extend_from_slice(extra);
    gw.cli(&args)
}

/// bob's login needs his TOTP code, and the code of the next step works: the TOTP secret and
/// the key that decrypts it came back.
async fn bob_logs_in_with_totp(gw: &Gateway, seed: &[u8]) {
    let (status, body) = gw.try_login("bob", PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("second_factor_required")),
        "{body}"
    );
    // The step that confirmed enrolment is spent (replay protection came back too); the next
    // one is accepted within the ±1 step window.
    let step = totp::step_of(now_s());
    let (status, body) = gw
        .try_login("bob", PW, Some(&totp::code_at(seed, step + 1)))
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_load_restores_everything_and_ends_every_earlier_session() {
    let b = before_backup().await;

    // A restore onto the data directory of the running gateway is refused and changes nothing.
    let users_before = b.gw.cli_ok(&["user", "list", "--json"]);
    let out = restore(&b.gw, &b.backup, &["--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a gateway is running on the data directory"),
        "{err}"
    );
    assert_eq!(b.gw.cli_ok(&["user", "list", "--json"]), users_before);
    assert_eq!(session_status(&b.gw, &b.live).await, 404);

    // Restore into a fresh directory; a gateway starts there.
    let mut gw2 = fresh_for(&b.jf, &b.gw);
    let out = restore(&gw2, &b.backup, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("everyone signs in again"), "{stdout}");
    gw2.launch().await;

    // Users (the bulk ones too), passwords and TOTP came back.
    let users: serde_json::Value =
        serde_json::from_str(&gw2.cli_ok(&["user", "list", "--json"])).unwrap();
    assert_eq!(users.as_array().unwrap().len() as i64, BULK_USERS + 4);
    gw2.login("alice", PW).await;
    bob_logs_in_with_totp(&gw2, &b.seed).await;
    // Every session from before the backup is ended, revoked or not.
    assert_eq!(session_status(&gw2, &b.live).await, 401);
    assert_eq!(session_status(&gw2, &b.revoked).await, 401);
    // The bound media token came back (the stand-in is told to log it out, which needs its
    // sealed copy and the secrets key) and is refused.
    assert_eq!(media_status(&gw2, &b.media).await, 401);
    assert!(
        poll_until(Duration::from_secs(10), || async {
            b.jf.logged_out_tokens().contains(&b.media)
        })
        .await,
        "the restored gateway never logged the old media token out upstream"
    );
    // The audit log came back, with the restore in it.
    let audit = gw2.cli_ok(&["audit", "--json", "--limit", "100000"]);
    assert!(audit.contains("\"admin_revoke_session\""), "{audit}");
    assert!(audit.contains("\"restore\""), "{audit}");
    assert!(
        audit.contains("every session and media token from before it ended"),
        "{audit}"
    );

    // A second restore onto the now non-empty directory needs --force, and moves the old
    // files aside.
    gw2.kill();
    let out = restore(&gw2, &b.backup, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let out = restore(&gw2, &b.backup, &["--force"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("moved aside"), "{stdout}");
    let aside = std::fs::read_dir(gw2.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("portcullis.db.before-restore-")
        })
        .count();
    assert!(aside >= 1, "no store was moved aside");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_with_keep_sessions_warns_and_keeps_only_live_sessions() {
    let b = before_backup().await;
    let mut gw2 = fresh_for(&b.jf, &b.gw);
    let out = restore(&gw2, &b.backup, &["--keep-sessions"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: --keep-sessions"), "{err}");
    assert!(err.contains("including any signed out since"), "{err}");
    gw2.launch().await;
    assert_eq!(session_status(&gw2, &b.live).await, 404);
    assert_eq!(session_status(&gw2, &b.revoked).await, 401);
    assert_eq!(media_status(&gw2, &b.media).await, 200);
    bob_logs_in_with_totp(&gw2, &b.seed).await;
    let audit = gw2.cli_ok(&["audit", "--json"]);
    assert!(audit.contains("sessions from before it kept"), "{audit}");
}

/// Rewrites a backup: `add_migration` records a migration in its database, the manifest names
/// `schema` and the database's new size and digest; without `honest_digest` the manifest keeps
/// the old digest and a byte of the database is changed (a damaged file).
async fn rewrite_backup(
    src: &Path,
    dst: &Path,
    schema: i64,
    add_migration: Option<i64>,
    honest_digest: bool,
) {
    let work = tempfile::tempdir().unwrap();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(src).unwrap());
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        files.push((name, data));
    }
    let (_, db) = files
        .iter_mut()
        .find(|(n, _)| n == "portcullis.db")
        .unwrap();
    let db_path = work.path().join("db");
    std::fs::write(&db_path, &*db).unwrap();
    if let Some(version) = add_migration {
        add_migration_row(&db_path, version).await;
    }
    let new_db = std::fs::read(&db_path).unwrap();
    let (_, m) = files
        .iter_mut()
        .find(|(n, _)| n == "manifest.json")
        .unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(m).unwrap();
    manifest["schema_version"] = schema.into();
    for f in manifest["files"].as_array_mut().unwrap() {
        if f["name"] == "portcullis.db" && honest_digest {
            f["bytes"] = (new_db.len() as u64).into();
            f["sha256"] = hex::encode(sha2::Sha256::digest(&new_db)).into();
        }
    }
    *m = serde_json::to_vec(&manifest).unwrap();
    let (_, db) = files
        .iter_mut()
        .find(|(n, _)| n == "portcullis.db")
        .unwrap();
    *db = new_db;
    if !honest_digest {
        // Same length, one byte changed.
        let i = db.len() / 2;
        db[i] ^= 0xff;
    }
    let mut out = tar::Builder::new(std::fs::File::create(dst).unwrap());
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        out.append(&h, data.as_slice()).unwrap();
    }
    out.finish().unwrap();
}

/// Records a migration this binary does not know, as a newer Portcullis would have.
async fn add_migration_row(db: &Path, version: i64) {
    let pool = sqlite_pool(db).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (?, 'from the future', 1, X'00', 0)",
    )
    .bind(version)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

/// Nothing but the config and log in a prepared gateway's directory.
fn store_files(gw: &Gateway) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(gw.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "portcullis.toml" && n != "portcullis.lock")
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_schema_and_damaged_backups_are_refused_and_change_nothing() {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    let gw = builder(&jf).user("alice", PW).start().await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.tar");
    gw.cli_ok(&["backup", "--out", good.to_str().unwrap()]);
    // A backup never overwrites a file.
    let out = gw.cli(&["backup", "--out", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let known = portcullis::store::sqlite::schema_version();
    let newer = known + 1000;
    let expect = format!("newer Portcullis (schema {newer}, this binary knows up to {known})");
    let cases: [(&str, i64, bool, &str); 3] = [
        // The manifest says so.
        ("newer.tar", newer, true, expect.as_str()),
        // The manifest hides it; the database itself says so.
        ("hidden.tar", known, true, expect.as_str()),
        // A byte changed in the database.
        ("damaged.tar", known, false, "is damaged"),
    ];
    for (name, schema, honest, needle) in cases {
        let path = dir.path().join(name);
        rewrite_backup(&good, &path, schema, Some(newer), honest).await;
        let target = fresh(&jf);
        let out = restore(&target, &path, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {err}");
        assert!(
            store_files(&target).is_empty(),
            "{name}: {:?}",
            store_files(&target)
        );
    }
    let target = fresh(&jf);
    let junk = dir.path().join("junk.tar");
    std::fs::write(&junk, b"not a backup at all").unwrap();
    let out = restore(&target, &junk, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a Portcullis backup"), "{err}");
    assert!(store_files(&target).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_refuses_a_store_written_by_a_newer_one() {
    let jf = StandIn::start().await;
    let mut gw = builder(&jf).user("alice", PW).start().await;
    gw.kill();
    let known = portcullis::store::sqlite::schema_version();
    add_migration_row(&gw.db_path(), known + 1).await;
    let expect = format!(
        "this store was written by a newer Portcullis (schema {}, this binary knows up to {known}): upgrade the binary or restore a backup",
        known + 1
    );
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(gw.config_path())
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the gateway kept running on a newer schema");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&expect), "{err}");
    // The CLI and a backup refuse it the same way.
    let out = gw.cli(&["user", "list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expect));
    let backup = gw.dir.path().join("b.tar");
    let out = gw.cli(&["backup", "--out", backup.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expect));
    assert!(!backup.exists());
}
