//! The store suite. Every test is written once against the `Store` trait and run against each
//! backend through `store::open`: SQLite in a fresh file, PostgreSQL in a fresh schema of the
//! database at `PORTCULLIS_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! reached with `options=-c search_path=<schema>` in the URL and dropped (CASCADE) when the test
//! ends, so tests run in parallel without seeing each other. The `suite!` invocation at the
//! bottom lists them; they appear as `store::tests::sqlite::<name>` and
//! `store::tests::postgres::<name>`.

use std::collections::BTreeSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::Connection;

use super::*;

const BUSY: Duration = Duration::from_secs(10);
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One test's store, and how to open another instance on the same data.
struct Fixture {
    backend: Backend,
    store: DynStore,
    url: String,
    /// The PostgreSQL schema (also the connections' `application_name`).
    schema: Option<String>,
}

impl Fixture {
    /// Another store on the same data, as a second gateway instance would open it.
    async fn reopen(&self) -> DynStore {
        open(&self.url, BUSY).await.unwrap()
    }
}

fn pg_base_url() -> String {
    std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string())
}

/// The URL of one schema of the test database.
fn pg_schema_url(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}&application_name={schema}")
}

async fn pg_admin() -> sqlx::PgConnection {
    let base = pg_base_url();
    sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {base} (PORTCULLIS_TEST_PG_URL): {e}"))
}

/// Runs one test against a fresh store of `backend`, cleaning up even when the test panics.
async fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("t.db").display());
            let store = open(&url, BUSY).await.unwrap();
            test(Fixture {
                backend,
                store,
                url,
                schema: None,
            })
            .await;
        }
        Backend::Postgres => {
            let schema = format!("t_{:016x}", rand::random::<u64>());
            let mut admin = pg_admin().await;
            sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut admin)
                .await
                .unwrap();
            let url = pg_schema_url(&pg_base_url(), &schema);
            let outcome = AssertUnwindSafe(async {
                let store = open(&url, BUSY).await.unwrap();
                test(Fixture {
                    backend,
                    store,
                    url: url.clone(),
                    schema: Some(schema.clone()),
                })
                .await;
            })
            .catch_unwind()
            .await;
            sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(&mut admin)
                .await
                .unwrap();
            let _ = admin.close().await;
            if let Err(panic) = outcome {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

async fn user(store: &DynStore, name: &str) -> User {
    store.create_user(name, "hash", false, 1).await.unwrap()
}

fn new_session(user_id: i64, kind: SessionKind, created_ms: i64, expires_ms: i64) -> NewSession {
    NewSession {
        id: SessionId::random(),
        user_id,
        kind,
        user_agent: "test-agent".to_string(),
        ip: "192.0.2.7".to_string(),
        created_ms,
        expires_ms,
    }
}

async fn session(
    store: &DynStore,
    user_id: i64,
    kind: SessionKind,
    created_ms: i64,
    expires_ms: i64,
) -> SessionId {
    let s = new_session(user_id, kind, created_ms, expires_ms);
    store.create_session(&s).await.unwrap();
    s.id
}

/// A binding of token `token` on route `jellyfin`, media user `mu-1`, device `device`.
fn binding(
    user_id: i64,
    token: &str,
    device: &str,
    created_ms: i64,
    expires_ms: i64,
) -> NewMediaBinding {
    NewMediaBinding {
        session: new_session(user_id, SessionKind::Media, created_ms, expires_ms),
        token_hash: format!("hash-{token}"),
        token_sealed: format!("sealed-{token}"),
        route: "jellyfin".to_string(),
        media_user_id: "mu-1".to_string(),
        media_user: "alice".to_string(),
        device_id: device.to_string(),
        client: "Jellyfin Android".to_string(),
        device_name: "Pixel".to_string(),
        version: "10.9.0".to_string(),
    }
}

/// Binds and returns the session id.
async fn bind(store: &DynStore, b: &NewMediaBinding) -> SessionId {
    let events = store.bind_media_token(b).await.unwrap();
    assert!(!events.is_empty(), "{} bound", b.token_hash);
    b.session.id
}

fn pairs(events: &[SequencedEvent]) -> Vec<(i64, RevocationEvent)> {
    events.iter().map(|e| (e.seq, e.event.clone())).collect()
}

async fn all_events(store: &DynStore) -> Vec<SequencedEvent> {
    store.events_since(0, 100_000).await.unwrap()
}

async fn owed(store: &DynStore, now_ms: i64) -> BTreeSet<SessionId> {
    store
        .owed_media_logouts(now_ms, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.sid)
        .collect()
}

fn set<const N: usize>(sids: [SessionId; N]) -> BTreeSet<SessionId> {
    sids.into_iter().collect()
}

/// The sessions that `events` revoke.
fn revoked_sessions(events: &[SequencedEvent]) -> BTreeSet<SessionId> {
    events
        .iter()
        .filter_map(|e| match e.event {
            RevocationEvent::SessionRevoked { sid, .. } => Some(sid),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Revocation events

async fn revocation_events_are_sequenced_and_in_snapshot(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let sid = session(store, alice.id, SessionKind::Web, 10, 10_000).await;
    let e1 = store.revoke_session(sid, 20).await.unwrap().unwrap();
    let e2 = store.signout_user(alice.id, 30).await.unwrap();
    let e3 = store.signout_everyone(40).await.unwrap();
    assert!(e1.seq < e2.seq && e2.seq < e3.seq);
    let events = store.events_since(0, 100).await.unwrap();
    assert_eq!(events.len(), 3);
    let snap = store.snapshot(25).await.unwrap();
    assert_eq!(snap.seq, e3.seq);
    assert_eq!(snap.revoked, vec![RevokedEntry::new(sid, 10_000)]);
    assert_eq!(snap.user_cutoffs, vec![(alice.id, 30)]);
    assert_eq!(snap.global_cutoff, Some(40));
    // Expired revocations are not carried in the snapshot.
    assert!(store.snapshot(20_000).await.unwrap().revoked.is_empty());
}

async fn revoking_unknown_session_is_none(f: Fixture) {
    let store = &f.store;
    assert!(store
        .revoke_session(SessionId::random(), 1)
        .await
        .unwrap()
        .is_none());
    assert!(store.events_since(0, 10).await.unwrap().is_empty());
    assert_eq!(store.snapshot(1).await.unwrap().seq, 0);
}

/// 8 writers revoke 20 sessions each at once while a reader polls the log: every number is
/// handed out once, and whatever the reader sees is always a prefix without holes (a reader
/// that has seen seq N has seen every event before it).
async fn concurrent_writers_get_gap_free_sequence_numbers(f: Fixture) {
    const WRITERS: usize = 8;
    const EACH: usize = 20;
    let store = &f.store;
    let alice = user(store, "alice").await;
    let mut sids = Vec::new();
    for _ in 0..WRITERS * EACH {
        sids.push(session(store, alice.id, SessionKind::Web, 10, 1_000_000).await);
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let store = store.clone();
        let done = done.clone();
        async move {
            let mut polls = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let events = store.events_since(0, 100_000).await.unwrap();
                for (i, e) in events.iter().enumerate() {
                    assert_eq!(
                        e.seq,
                        i as i64 + 1,
                        "seq {} seen without its predecessors",
                        e.seq
                    );
                }
                polls += 1;
                if finished {
                    return polls;
                }
                tokio::task::yield_now().await;
            }
        }
    });
    let writers: Vec<_> = sids
        .chunks(EACH)
        .map(|chunk| {
            let store = store.clone();
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for sid in chunk {
                    seqs.push(store.revoke_session(sid, 20).await.unwrap().unwrap().seq);
                }
                seqs
            })
        })
        .collect();
    let mut returned = Vec::new();
    for w in writers {
        returned.extend(w.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    assert!(reader.await.unwrap() >= 1);
    let n = (WRITERS * EACH) as i64;
    returned.sort_unstable();
    assert_eq!(returned, (1..=n).collect::<Vec<_>>());
    let events = all_events(store).await;
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    let revoked: BTreeSet<SessionId> = events
        .iter()
        .map(|e| match &e.event {
            RevocationEvent::SessionRevoked { sid, .. } => *sid,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(revoked, sids.iter().copied().collect());
    assert_eq!(store.snapshot(30).await.unwrap().seq, n);
}

/// Every kind of event, as returned by the call that wrote it and as read back, paged.
async fn events_since_pages_through_every_kind(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let sid = session(store, alice.id, SessionKind::Api, 10, 5_000).await;
    let mut written = Vec::new();
    written.push(store.revoke_session(sid, 20).await.unwrap().unwrap());
    written.push(store.signout_user(bob.id, 30).await.unwrap());
    written.extend(store.set_disabled(bob.id, true, 40).await.unwrap());
    written.extend(store.set_disabled(bob.id, false, 50).await.unwrap());
    let b = binding(alice.id, "t1", "dev-1", 60, 9_000);
    written.extend(store.bind_media_token(&b).await.unwrap());
    written.extend(
        store
            .breach_response(70, &["k1".to_string(), "k2".to_string()], false)
            .await
            .unwrap(),
    );
    let expected = vec![
        RevocationEvent::SessionRevoked {
            sid,
            user_id: alice.id,
            expires_ms: 5_000,
        },
        RevocationEvent::UserCutoff {
            user_id: bob.id,
            at_ms: 30,
        },
        RevocationEvent::UserDisabled { user_id: bob.id },
        RevocationEvent::UserCutoff {
            user_id: bob.id,
            at_ms: 40,
        },
        RevocationEvent::UserEnabled { user_id: bob.id },
        RevocationEvent::MediaBound {
            sid: b.session.id,
            user_id: alice.id,
            user_name: "alice".to_string(),
            token_hash: "hash-t1".to_string(),
            issued_ms: 60,
            expires_ms: 9_000,
        },
        RevocationEvent::GlobalCutoff { at_ms: 70 },
        RevocationEvent::KeyRetired {
            kid: "k1".to_string(),
        },
        RevocationEvent::KeyRetired {
            kid: "k2".to_string(),
        },
    ];
    let expected: Vec<(i64, RevocationEvent)> = (1..).zip(expected).collect();
    assert_eq!(pairs(&written), expected);
    let first = store.events_since(0, 4).await.unwrap();
    let rest = store.events_since(4, 100).await.unwrap();
    assert_eq!(pairs(&first), expected[..4].to_vec());
    assert_eq!(pairs(&rest), expected[4..].to_vec());
    assert!(store.events_since(9, 100).await.unwrap().is_empty());
    // A negative limit is no limit.
    assert_eq!(store.events_since(0, -1).await.unwrap().len(), 9);
}

/// Numbers are never handed out twice, also when the newest events were purged.
async fn sequence_numbers_are_not_reused_after_purge(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let sid = session(store, alice.id, SessionKind::Web, 10, 100).await;
    store.signout_user(alice.id, 5).await.unwrap();
    let last = store.revoke_session(sid, 20).await.unwrap().unwrap();
    assert_eq!(last.seq, 2);
    // The session's token has expired: its revocation event is purged, the newest one.
    assert!(store.purge_expired(1_000, 0, 1_000_000).await.unwrap() >= 1);
    assert_eq!(store.events_since(0, 10).await.unwrap().len(), 1);
    let next = store.signout_everyone(1_000).await.unwrap();
    assert_eq!(next.seq, 3);
}

// ---------------------------------------------------------------------------------------------
// Snapshot

/// Writes `n` session revocations of `user_id` straight into the event log (session ids
/// 1..=n as 32 hex digits, each token expiring at 10,000,000 + i ms), in one statement of the
/// backend's own SQL, advancing PostgreSQL's sequence counter as the store would.
async fn write_revoked_sessions(f: &Fixture, user_id: i64, n: i64) {
    let insert =
        "INSERT INTO revocation_events (seq, kind, session_id, user_id, at_ms, expires_ms)";
    match f.backend {
        Backend::Sqlite => {
            let sql = format!(
                "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n})
                 {insert} SELECT NULL, 'session_revoked', printf('%032x', i), {user_id}, 20,
                 10000000 + i FROM k"
            );
            let mut c = sqlx::SqliteConnection::connect(&f.url).await.unwrap();
            sqlx::raw_sql(&sql).execute(&mut c).await.unwrap();
        }
        Backend::Postgres => {
            let sql = format!(
                "{insert} SELECT (SELECT last FROM revocation_seq) + i, 'session_revoked',
                 lpad(to_hex(i), 32, '0'), {user_id}, 20, 10000000 + i
                 FROM generate_series(1, {n}) AS i;
                 UPDATE revocation_seq SET last = last + {n};"
            );
            let mut c = sqlx::PgConnection::connect(&f.url).await.unwrap();
            sqlx::raw_sql(&sql).execute(&mut c).await.unwrap();
        }
    }
}

/// An outage of the store as each backend has one: another process holding the database's
/// write lock (SQLite), or the table the log lives in (PostgreSQL). A revocation then fails as
/// `Unavailable` within the busy timeout and leaves nothing behind; once the lock is gone the
/// store works again and the log has no gap.
async fn an_outage_refuses_writes_as_unavailable_and_leaves_no_gap(f: Fixture) {
    let alice = user(&f.store, "alice").await;
    let s1 = session(&f.store, alice.id, SessionKind::Web, 10, 10_000).await;
    let s2 = session(&f.store, alice.id, SessionKind::Web, 10, 10_000).await;
    let first = f.store.revoke_session(s1, 20).await.unwrap().unwrap();
    let impatient = open(&f.url, Duration::from_millis(300)).await.unwrap();
    let hold = match f.backend {
        Backend::Sqlite => "BEGIN EXCLUSIVE",
        Backend::Postgres => "BEGIN; LOCK TABLE revocation_events IN ACCESS EXCLUSIVE MODE",
    };
    let refused = match f.backend {
        Backend::Sqlite => {
            let mut c = sqlx::SqliteConnection::connect(&f.url).await.unwrap();
            sqlx::raw_sql(hold).execute(&mut c).await.unwrap();
            let r = impatient.revoke_session(s2, 30).await;
            sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
            r
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(&f.url).await.unwrap();
            sqlx::raw_sql(hold).execute(&mut c).await.unwrap();
            let r = impatient.revoke_session(s2, 30).await;
            sqlx::raw_sql("ROLLBACK").execute(&mut c).await.unwrap();
            r
        }
    };
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    // Nothing of the refused write remains, and the next one follows without a gap.
    assert_eq!(f.store.events_since(first.seq, 10).await.unwrap().len(), 0);
    let next = impatient.revoke_session(s2, 40).await.unwrap().unwrap();
    assert_eq!(next.seq, first.seq + 1);
    assert!(f
        .store
        .get_session(s2)
        .await
        .unwrap()
        .unwrap()
        .revoked_ms
        .is_some());
}

/// The scale the revocation view is built for: a snapshot of a million revoked sessions holds
/// every one of them, exactly, and an instance opening the store sees the same.
async fn a_million_revoked_sessions_travel_whole_in_a_snapshot(f: Fixture) {
    const N: i64 = 1_000_000;
    let alice = user(&f.store, "alice").await;
    write_revoked_sessions(&f, alice.id, N).await;
    let started = std::time::Instant::now();
    let snap = f.reopen().await.snapshot(100).await.unwrap();
    let took = started.elapsed();
    assert_eq!(snap.revoked.len() as i64, N);
    let mut ids: Vec<u128> = snap.revoked.iter().map(|r| r.sid().0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as i64, N, "every id once");
    assert_eq!((ids[0], ids[ids.len() - 1]), (1, N as u128));
    for r in snap.revoked.iter().step_by(99_991) {
        let ms = 10_000_000 + r.sid().0 as i64;
        assert_eq!(r.expires_ms(), (ms + 999) / 1000 * 1000, "{:?}", r.sid());
    }
    // Expired ones are left out.
    assert_eq!(
        f.store
            .snapshot(10_000_000 + N / 2)
            .await
            .unwrap()
            .revoked
            .len() as i64,
        N / 2
    );
    eprintln!(
        "{:?}: snapshot of {N} revoked sessions in {took:?}",
        f.backend
    );
}

async fn snapshot_holds_the_whole_revocation_state(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let carol = user(store, "carol").await;
    let w1 = session(store, alice.id, SessionKind::Web, 10, 10_000).await;
    let w2 = session(store, alice.id, SessionKind::Web, 10, 50).await;
    store.revoke_session(w1, 20).await.unwrap();
    store.revoke_session(w2, 21).await.unwrap();
    store.signout_user(bob.id, 60).await.unwrap();
    store.signout_user(bob.id, 70).await.unwrap();
    store.set_disabled(carol.id, true, 80).await.unwrap();
    let t1 = bind(store, &binding(alice.id, "t1", "dev-1", 30, 10_000)).await;
    bind(store, &binding(alice.id, "t2", "dev-2", 30, 50)).await;
    let t3 = bind(store, &binding(alice.id, "t3", "dev-3", 30, 10_000)).await;
    store.revoke_session(t3, 85).await.unwrap();
    let last = store
        .breach_response(90, &["k2".to_string(), "k1".to_string()], true)
        .await
        .unwrap();

    // `require_passkey`: every user must also register a passkey, in the same write.
    for u in [&alice, &bob, &carol] {
        let u = store.find_user_by_id(u.id).await.unwrap().unwrap();
        assert!(u.must_reset && u.passkey_required, "{}", u.name);
    }

    let mut snap = store.snapshot(100).await.unwrap();
    assert_eq!(snap.seq, last.last().unwrap().seq);
    snap.revoked.sort();
    let mut want = vec![RevokedEntry::new(w1, 10_000), RevokedEntry::new(t3, 10_000)];
    want.sort();
    assert_eq!(snap.revoked, want, "revoked and unexpired at 100");
    snap.user_cutoffs.sort();
    assert_eq!(snap.user_cutoffs, vec![(bob.id, 70), (carol.id, 80)]);
    assert_eq!(snap.global_cutoff, Some(90));
    assert_eq!(snap.disabled_users, vec![carol.id]);
    snap.retired_keys.sort();
    assert_eq!(snap.retired_keys, vec!["k1".to_string(), "k2".to_string()]);
    // Unexpired media tokens, the revoked one included; the expired one left out.
    snap.media_tokens
        .sort_by(|a, b| a.token_hash.cmp(&b.token_hash));
    let media: Vec<_> = snap
        .media_tokens
        .iter()
        .map(|m| {
            (
                m.token_hash.as_str(),
                m.sid,
                m.user_id,
                m.user_name.as_str(),
                m.issued_ms,
                m.expires_ms,
            )
        })
        .collect();
    assert_eq!(
        media,
        vec![
            ("hash-t1", t1, alice.id, "alice", 30, 10_000),
            ("hash-t3", t3, alice.id, "alice", 30, 10_000),
        ]
    );
    // The breach response made everyone choose a new password.
    for u in store.list_users().await.unwrap() {
        assert!(u.must_reset, "{}", u.name);
    }
    // Enabling carol again leaves her cutoff in place.
    store.set_disabled(carol.id, false, 95).await.unwrap();
    let snap = store.snapshot(100).await.unwrap();
    assert!(snap.disabled_users.is_empty());
    assert!(snap.user_cutoffs.contains(&(carol.id, 80)));
}

// ---------------------------------------------------------------------------------------------
// Users and accounts

async fn duplicate_user_name_is_a_conflict_ignoring_case(f: Fixture) {
    let store = &f.store;
    store.create_user("Alice", "h", false, 1).await.unwrap();
    let err = store.create_user("alice", "h", false, 1).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(
        store.find_user("ALICE").await.unwrap().unwrap().name,
        "Alice"
    );
    // Only ASCII case is ignored, as SQLite's NOCASE does.
    store.create_user("Émile", "h", false, 1).await.unwrap();
    store.create_user("émile", "h", false, 1).await.unwrap();
    assert_eq!(
        store.find_user("ÉMILE").await.unwrap().unwrap().name,
        "Émile"
    );
    store.create_user("bob", "h", true, 2).await.unwrap();
    store.create_user("Carol", "h", false, 3).await.unwrap();
    let names: Vec<String> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(names, ["Alice", "bob", "Carol", "Émile", "émile"]);
    assert_eq!(store.user_count().await.unwrap(), 5);
    assert!(store.find_user("nobody").await.unwrap().is_none());
}

async fn accounts_lock_out_and_change_passwords(f: Fixture) {
    let store = &f.store;
    let alice = store.create_user("alice", "h1", true, 7).await.unwrap();
    let bob = user(store, "bob").await;
    assert!(alice.is_admin && !alice.disabled && !alice.must_reset);
    assert_eq!(
        (alice.created_ms, alice.failed_logins, alice.totp_last_step),
        (7, 0, 0)
    );
    let by_id = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!(by_id.name, "alice");
    assert!(store
        .find_user_by_id(alice.id + 1000)
        .await
        .unwrap()
        .is_none());

    let u = store.record_failure(alice.id, 100, 3, 1_000).await.unwrap();
    assert_eq!((u.failed_logins, u.locked_until_ms), (1, None));
    store.record_failure(alice.id, 101, 3, 1_000).await.unwrap();
    let u = store.record_failure(alice.id, 102, 3, 1_000).await.unwrap();
    assert_eq!(
        (u.failed_logins, u.locked_until_ms, u.last_failure_ms),
        (3, Some(1_102), Some(102))
    );
    // A failure stamped earlier that lands later counts, and leaves the latest time.
    let u = store.record_failure(alice.id, 99, 3, 1_000).await.unwrap();
    assert_eq!((u.failed_logins, u.last_failure_ms), (4, Some(102)));
    store.clear_failures(alice.id).await.unwrap();
    let u = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!(
        (u.failed_logins, u.locked_until_ms, u.last_failure_ms),
        (0, None, None)
    );

    assert_eq!(store.set_must_reset(Some(alice.id), true).await.unwrap(), 1);
    assert!(!store.find_user("bob").await.unwrap().unwrap().must_reset);
    assert_eq!(store.set_must_reset(None, true).await.unwrap(), 2);
    assert!(store.find_user("bob").await.unwrap().unwrap().must_reset);

    let required = |name: &'static str| async move {
        store
            .find_user(name)
            .await
            .unwrap()
            .unwrap()
            .passkey_required
    };
    assert!(!required("bob").await);
    assert_eq!(
        store
            .set_passkey_required(Some(alice.id), true)
            .await
            .unwrap(),
        1
    );
    assert!(required("alice").await && !required("bob").await);
    assert_eq!(store.set_passkey_required(None, false).await.unwrap(), 2);
    assert!(!required("alice").await);

    assert!(store
        .change_password(alice.id, "h2", None)
        .await
        .unwrap()
        .is_none());
    let u = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!((u.password_hash.as_str(), u.must_reset), ("h2", false));
    // No revocation (the administrator made by the fixture is a group change, not one).
    assert!(store
        .events_since(0, 10)
        .await
        .unwrap()
        .iter()
        .all(|e| !e.event.is_revocation()));

    let before = session(store, alice.id, SessionKind::Web, 400, 10_000).await;
    let after = session(store, alice.id, SessionKind::Web, 600, 10_000).await;
    let bobs = session(store, bob.id, SessionKind::Web, 400, 10_000).await;
    let e = store
        .change_password(alice.id, "h3", Some(500))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        e.event,
        RevocationEvent::UserCutoff {
            user_id: alice.id,
            at_ms: 500
        }
    );
    let s = store.get_session(before).await.unwrap().unwrap();
    assert_eq!(s.revoked_ms, Some(500));
    assert_eq!(
        store.get_session(after).await.unwrap().unwrap().revoked_ms,
        None
    );
    assert_eq!(
        store.get_session(bobs).await.unwrap().unwrap().revoked_ms,
        None
    );

    store.set_password(bob.id, "hb").await.unwrap();
    assert_eq!(
        store.find_user("bob").await.unwrap().unwrap().password_hash,
        "hb"
    );
    let missing = alice.id + bob.id + 1000;
    assert!(matches!(
        store.set_password(missing, "x").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.set_disabled(missing, true, 1).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.change_password(missing, "x", Some(1)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.record_failure(missing, 1, 3, 10).await,
        Err(StoreError::NotFound(_))
    ));
    // Nothing was written for the missing user (the two events: alice's `admins` group when
    // she was made, and her password change's sign-out).
    assert_eq!(store.events_since(0, 10).await.unwrap().len(), 2);
}

async fn totp_steps_and_recovery_codes(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    store
        .set_totp(alice.id, Some("sealed"), true)
        .await
        .unwrap();
    let u = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!(
        (u.totp_secret.as_deref(), u.totp_enabled),
        (Some("sealed"), true)
    );
    assert!(store.accept_totp_step(alice.id, 5).await.unwrap());
    assert!(!store.accept_totp_step(alice.id, 5).await.unwrap());
    assert!(!store.accept_totp_step(alice.id, 4).await.unwrap());
    assert!(store.accept_totp_step(alice.id, 6).await.unwrap());

    let codes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    store
        .replace_recovery_codes(alice.id, &codes)
        .await
        .unwrap();
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 3);
    assert!(store.use_recovery_code(alice.id, "a", 10).await.unwrap());
    assert!(!store.use_recovery_code(alice.id, "a", 11).await.unwrap());
    assert!(!store.use_recovery_code(alice.id, "zzz", 11).await.unwrap());
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 2);
    store
        .replace_recovery_codes(alice.id, &["d".to_string()])
        .await
        .unwrap();
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 1);
    store.replace_recovery_codes(alice.id, &[]).await.unwrap();
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 0);
    store
        .replace_recovery_codes(alice.id, &["e".to_string()])
        .await
        .unwrap();
    // Turning 2FA off forgets the secret and the codes.
    store.set_totp(alice.id, None, false).await.unwrap();
    let u = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!((u.totp_secret, u.totp_enabled), (None, false));
    assert_eq!(store.recovery_codes_left(alice.id).await.unwrap(), 0);
}

async fn reset_links_are_single_use(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    store
        .create_reset_link("h2", alice.id, 90, 120)
        .await
        .unwrap();
    assert_eq!(
        store.reset_link_state("h2", 95).await.unwrap(),
        ResetLinkState::Valid { user_id: alice.id }
    );
    store
        .create_reset_link("h1", alice.id, 100, 200)
        .await
        .unwrap();
    assert_eq!(
        store.reset_link_state("h2", 105).await.unwrap(),
        ResetLinkState::Used,
        "a newer link retires the older one"
    );
    assert_eq!(
        store.reset_link_state("h1", 150).await.unwrap(),
        ResetLinkState::Valid { user_id: alice.id }
    );
    assert_eq!(
        store.reset_link_state("h1", 200).await.unwrap(),
        ResetLinkState::Expired
    );
    assert_eq!(
        store.reset_link_state("nope", 150).await.unwrap(),
        ResetLinkState::Unknown
    );
    let sid = session(store, alice.id, SessionKind::Web, 110, 10_000).await;
    store.record_failure(alice.id, 120, 1, 1_000).await.unwrap();
    store.set_must_reset(Some(alice.id), true).await.unwrap();

    assert!(store
        .redeem_reset_link("h2", "new", true, 150)
        .await
        .unwrap()
        .is_none());
    let (user_id, e) = store
        .redeem_reset_link("h1", "new", true, 150)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user_id, alice.id);
    assert_eq!(
        e.unwrap().event,
        RevocationEvent::UserCutoff {
            user_id: alice.id,
            at_ms: 150
        }
    );
    let u = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!(u.password_hash, "new");
    assert!(!u.must_reset);
    assert_eq!((u.failed_logins, u.locked_until_ms), (0, None));
    assert_eq!(
        store.get_session(sid).await.unwrap().unwrap().revoked_ms,
        Some(150)
    );
    assert_eq!(
        store.reset_link_state("h1", 160).await.unwrap(),
        ResetLinkState::Used
    );
    assert!(store
        .redeem_reset_link("h1", "again", true, 160)
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.events_since(0, 10).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Sessions and audit

async fn sessions_are_listed_counted_and_touched(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let a1 = session(store, alice.id, SessionKind::Web, 10, 1_000).await;
    let a2 = session(store, alice.id, SessionKind::Api, 20, 1_000).await;
    let b1 = session(store, bob.id, SessionKind::Web, 30, 1_000).await;
    session(store, alice.id, SessionKind::Web, 40, 50).await;
    let b2 = session(store, bob.id, SessionKind::Web, 45, 1_000).await;
    store.revoke_session(b2, 60).await.unwrap();

    let ids = |v: Vec<SessionRecord>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_live_sessions(None, 100).await.unwrap()),
        vec![a1, a2, b1]
    );
    assert_eq!(
        ids(store.list_live_sessions(Some(alice.id), 100).await.unwrap()),
        vec![a1, a2]
    );
    let mut counts = store.count_live_sessions(100).await.unwrap();
    counts.sort();
    assert_eq!(counts, vec![("api".to_string(), 1), ("web".to_string(), 2)]);

    let s = store.get_session(a2).await.unwrap().unwrap();
    assert_eq!(
        (
            s.user_id,
            s.user_name.as_str(),
            s.kind,
            s.user_agent.as_str(),
            s.ip.as_str()
        ),
        (
            alice.id,
            "alice",
            SessionKind::Api,
            "test-agent",
            "192.0.2.7"
        )
    );
    assert_eq!(
        (s.created_ms, s.last_seen_ms, s.expires_ms, s.revoked_ms),
        (20, 20, 1_000, None)
    );
    assert_eq!(
        store.get_session(b2).await.unwrap().unwrap().revoked_ms,
        Some(60)
    );
    assert!(store
        .get_session(SessionId::random())
        .await
        .unwrap()
        .is_none());

    // Last seen only moves forward; a session named twice keeps the later time.
    store.touch_sessions(&[]).await.unwrap();
    store
        .touch_sessions(&[(a1, 50), (a1, 70), (a2, 5), (SessionId::random(), 10)])
        .await
        .unwrap();
    assert_eq!(
        store.get_session(a1).await.unwrap().unwrap().last_seen_ms,
        70
    );
    assert_eq!(
        store.get_session(a2).await.unwrap().unwrap().last_seen_ms,
        20
    );
    // Revoking twice records the first time, and an event each time.
    store.revoke_session(b2, 80).await.unwrap().unwrap();
    assert_eq!(
        store.get_session(b2).await.unwrap().unwrap().revoked_ms,
        Some(60)
    );
}

async fn audit_log_lists_newest_first(f: Fixture) {
    let store = &f.store;
    let entry = |at_ms: i64, event: &str, user_id: Option<i64>| AuditEntry {
        at_ms,
        event: event.to_string(),
        outcome: "ok".to_string(),
        user_id,
        user_name: user_id.map(|id| format!("u{id}")).unwrap_or_default(),
        ip: "192.0.2.1".to_string(),
        user_agent: "ua".to_string(),
        session_id: "sid".to_string(),
        detail: "d".to_string(),
    };
    store
        .append_audit(&entry(10, "login", Some(1)))
        .await
        .unwrap();
    store
        .append_audit(&entry(20, "login", Some(2)))
        .await
        .unwrap();
    store
        .append_audit(&entry(30, "logout", Some(1)))
        .await
        .unwrap();
    store.append_audit(&entry(40, "boot", None)).await.unwrap();
    let events = |v: Vec<AuditEntry>| v.into_iter().map(|e| e.at_ms).collect::<Vec<_>>();
    assert_eq!(
        events(store.list_audit(None, 0, 10).await.unwrap()),
        vec![40, 30, 20, 10]
    );
    assert_eq!(
        events(store.list_audit(Some(1), 0, 10).await.unwrap()),
        vec![30, 10]
    );
    assert_eq!(
        events(store.list_audit(None, 20, 10).await.unwrap()),
        vec![40, 30, 20]
    );
    assert_eq!(
        events(store.list_audit(None, 0, 2).await.unwrap()),
        vec![40, 30]
    );
    let e = &store.list_audit(Some(2), 0, 1).await.unwrap()[0];
    assert_eq!(
        (
            e.event.as_str(),
            e.outcome.as_str(),
            e.user_id,
            e.user_name.as_str(),
            e.ip.as_str(),
            e.user_agent.as_str(),
            e.session_id.as_str(),
            e.detail.as_str()
        ),
        ("login", "ok", Some(2), "u2", "192.0.2.1", "ua", "sid", "d")
    );
}

// ---------------------------------------------------------------------------------------------
// Media tokens

async fn binding_a_media_token_retires_the_same_devices_older_token(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let first = binding(alice.id, "t1", "dev-1", 100, 10_000);
    let events = store.bind_media_token(&first).await.unwrap();
    assert_eq!(
        pairs(&events),
        vec![(
            1,
            RevocationEvent::MediaBound {
                sid: first.session.id,
                user_id: alice.id,
                user_name: "alice".to_string(),
                token_hash: "hash-t1".to_string(),
                issued_ms: 100,
                expires_ms: 10_000,
            }
        )]
    );
    // Another device, another media user on the same device, another route: left alone.
    let other_device = bind(store, &binding(alice.id, "t2", "dev-2", 110, 10_000)).await;
    let mut b = binding(alice.id, "t3", "dev-1", 120, 10_000);
    b.media_user_id = "mu-2".to_string();
    let other_media_user = bind(store, &b).await;
    let mut b = binding(alice.id, "t4", "dev-1", 125, 10_000);
    b.route = "emby".to_string();
    let other_route = bind(store, &b).await;
    assert!(store
        .get_session(first.session.id)
        .await
        .unwrap()
        .unwrap()
        .revoked_ms
        .is_none());

    // The same route, media user and device again: the first token is gone upstream.
    let second = binding(alice.id, "t5", "dev-1", 130, 10_000);
    let events = store.bind_media_token(&second).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(matches!(
        &events[0].event,
        RevocationEvent::MediaBound { sid, .. } if *sid == second.session.id
    ));
    assert_eq!(
        events[1].event,
        RevocationEvent::SessionRevoked {
            sid: first.session.id,
            user_id: alice.id,
            expires_ms: 10_000
        }
    );
    assert_eq!(events[1].seq, events[0].seq + 1);
    assert_eq!(
        store
            .get_session(first.session.id)
            .await
            .unwrap()
            .unwrap()
            .revoked_ms,
        Some(130)
    );
    // The media server deleted it itself: no upstream logout is owed.
    assert!(owed(store, 200).await.is_empty());
    let live: BTreeSet<SessionId> = store
        .list_live_sessions(Some(alice.id), 200)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            assert_eq!(s.kind, SessionKind::Media);
            s.id
        })
        .collect();
    assert_eq!(
        live,
        set([
            other_device,
            other_media_user,
            other_route,
            second.session.id
        ])
    );
    // The log holds exactly what the calls returned, user names included.
    let logged = all_events(store).await;
    assert_eq!(logged.len(), 6);
    assert_eq!(pairs(&logged[4..]), pairs(&events));
}

async fn binding_the_same_token_twice_yields_no_events(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let first = binding(alice.id, "t1", "dev-1", 100, 10_000);
    assert_eq!(store.bind_media_token(&first).await.unwrap().len(), 1);
    // The same token again (a retried login response), under a fresh session id.
    let again = binding(alice.id, "t1", "dev-1", 110, 10_000);
    assert!(store.bind_media_token(&again).await.unwrap().is_empty());
    assert!(store.get_session(again.session.id).await.unwrap().is_none());
    assert_eq!(all_events(store).await.len(), 1);
    let live = store.list_live_sessions(None, 200).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].id, first.session.id);
    assert!(live[0].revoked_ms.is_none());
}

/// A media session that ends in any way (one device, a user's cutoff, a disabled user, expiry,
/// everyone's cutoff) is owed an upstream logout until that is done.
async fn owed_logouts_follow_every_way_a_media_session_ends(f: Fixture) {
    let store = &f.store;
    let mut ids = Vec::new();
    for name in ["alice", "bob", "carol", "dave", "erin"] {
        ids.push(user(store, name).await.id);
    }
    let a = bind(store, &binding(ids[0], "a", "dev-a", 100, 10_000)).await;
    let b = bind(store, &binding(ids[1], "b", "dev-b", 100, 10_000)).await;
    let c = bind(store, &binding(ids[2], "c", "dev-c", 100, 10_000)).await;
    let d = bind(store, &binding(ids[3], "d", "dev-d", 100, 300)).await;
    let e = bind(store, &binding(ids[4], "e", "dev-e", 100, 10_000)).await;
    assert!(owed(store, 200).await.is_empty());

    store.revoke_session(a, 210).await.unwrap().unwrap();
    assert_eq!(owed(store, 220).await, set([a]));
    let logout = &store.owed_media_logouts(220, 10).await.unwrap()[0];
    assert_eq!(
        (
            logout.sid,
            logout.route.as_str(),
            logout.token_sealed.as_str(),
            logout.client.as_str(),
            logout.device_name.as_str(),
            logout.device_id.as_str(),
            logout.version.as_str(),
            logout.attempts
        ),
        (
            a,
            "jellyfin",
            "sealed-a",
            "Jellyfin Android",
            "Pixel",
            "dev-a",
            "10.9.0",
            0
        )
    );
    store.signout_user(ids[1], 230).await.unwrap();
    assert_eq!(owed(store, 235).await, set([a, b]));
    store.set_disabled(ids[4], true, 240).await.unwrap();
    assert_eq!(owed(store, 245).await, set([a, b, e]));
    // Expired at 300 without being revoked.
    assert_eq!(owed(store, 299).await, set([a, b, e]));
    assert_eq!(owed(store, 300).await, set([a, b, d, e]));
    store.signout_everyone(410).await.unwrap();
    assert_eq!(owed(store, 415).await, set([a, b, c, d, e]));
    assert_eq!(store.owed_media_logouts(415, 2).await.unwrap().len(), 2);
    // A token bound after every cutoff is live and owes nothing.
    let late = bind(store, &binding(ids[0], "late", "dev-late", 500, 10_000)).await;
    assert!(!owed(store, 600).await.contains(&late));

    store.media_logout_done(a, 620).await.unwrap();
    store.media_logout_done(b, 620).await.unwrap();
    assert_eq!(owed(store, 630).await, set([c, d, e]));
}

async fn failed_media_logouts_back_off(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let a = bind(store, &binding(alice.id, "a", "dev-a", 100, 10_000)).await;
    let b = bind(store, &binding(alice.id, "b", "dev-b", 110, 10_000)).await;
    store.revoke_session(a, 200).await.unwrap();
    store.revoke_session(b, 200).await.unwrap();
    assert_eq!(owed(store, 300).await, set([a, b]));

    store.media_logout_failed(a, 1_000).await.unwrap();
    assert_eq!(owed(store, 999).await, set([b]));
    // Due again at 1000, behind the one that has waited longer.
    let due = store.owed_media_logouts(1_000, 10).await.unwrap();
    assert_eq!(due.iter().map(|o| o.sid).collect::<Vec<_>>(), vec![b, a]);
    assert_eq!((due[0].attempts, due[1].attempts), (0, 1));

    store.media_logout_failed(a, 2_000).await.unwrap();
    assert_eq!(owed(store, 1_500).await, set([b]));
    let due = store.owed_media_logouts(2_000, 10).await.unwrap();
    assert_eq!(due.iter().find(|o| o.sid == a).unwrap().attempts, 2);

    store.media_logout_done(a, 2_100).await.unwrap();
    assert_eq!(owed(store, 5_000).await, set([b]));
}

async fn idle_media_sessions_end_per_route(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let idle = bind(store, &binding(alice.id, "a", "dev-a", 100, 10_000)).await;
    let busy = bind(store, &binding(alice.id, "b", "dev-b", 100, 10_000)).await;
    let mut other = binding(alice.id, "c", "dev-c", 100, 10_000);
    other.route = "emby".to_string();
    let other = bind(store, &other).await;
    let ended = bind(store, &binding(alice.id, "d", "dev-d", 100, 10_000)).await;
    store.revoke_session(ended, 150).await.unwrap();
    let web = session(store, alice.id, SessionKind::Web, 100, 10_000).await;
    store.touch_sessions(&[(busy, 500)]).await.unwrap();

    let events = store
        .end_idle_media_sessions("jellyfin", 300, 600)
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        vec![RevocationEvent::SessionRevoked {
            sid: idle,
            user_id: alice.id,
            expires_ms: 10_000
        }]
    );
    let logged = all_events(store).await;
    assert_eq!(pairs(&logged[logged.len() - 1..]), pairs(&events));
    assert_eq!(
        store.get_session(idle).await.unwrap().unwrap().revoked_ms,
        Some(600)
    );
    for live in [busy, other, web] {
        assert!(store
            .get_session(live)
            .await
            .unwrap()
            .unwrap()
            .revoked_ms
            .is_none());
    }
    assert_eq!(
        store.get_session(ended).await.unwrap().unwrap().revoked_ms,
        Some(150)
    );
    assert_eq!(owed(store, 700).await, set([idle, ended]));
    assert!(store
        .end_idle_media_sessions("jellyfin", 300, 700)
        .await
        .unwrap()
        .is_empty());
}

// ---------------------------------------------------------------------------------------------
// Purge

async fn purge_deletes_what_can_no_longer_matter(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let (now, keep, audit_keep) = (1_000, 50, 500);
    let s1 = session(store, alice.id, SessionKind::Web, 10, 100).await;
    let s2 = session(store, alice.id, SessionKind::Web, 10, 2_000).await;
    let s3 = session(store, alice.id, SessionKind::Web, 10, 500).await;
    // Expired media tokens: one still owed its upstream logout, one logged out.
    let m1 = bind(store, &binding(alice.id, "m1", "dev-1", 10, 100)).await;
    let m2 = bind(store, &binding(alice.id, "m2", "dev-2", 10, 100)).await;
    store.media_logout_done(m2, 150).await.unwrap();
    let kept_event = store.revoke_session(s2, 20).await.unwrap().unwrap();
    store.revoke_session(s3, 30).await.unwrap().unwrap();
    store
        .create_reset_link("old", alice.id, 10, 100)
        .await
        .unwrap();
    store
        .create_reset_link("live", alice.id, 10, 5_000)
        .await
        .unwrap();
    for at_ms in [10, 900] {
        store
            .append_audit(&AuditEntry {
                at_ms,
                event: "login".to_string(),
                outcome: "ok".to_string(),
                ..AuditEntry::default()
            })
            .await
            .unwrap();
    }

    // Sessions s1, s3, m2; the events binding m1 and m2 and revoking s3; one link; one entry.
    assert_eq!(store.purge_expired(now, keep, audit_keep).await.unwrap(), 8);
    assert!(store.get_session(s1).await.unwrap().is_none());
    assert!(store.get_session(s2).await.unwrap().is_some());
    assert!(store.get_session(s3).await.unwrap().is_none());
    assert!(store.get_session(m1).await.unwrap().is_some());
    assert!(store.get_session(m2).await.unwrap().is_none());
    assert_eq!(owed(store, now).await, set([m1]));
    assert_eq!(pairs(&all_events(store).await), pairs(&[kept_event]));
    assert_eq!(
        store.reset_link_state("old", now).await.unwrap(),
        ResetLinkState::Unknown
    );
    assert_eq!(
        store.reset_link_state("live", now).await.unwrap(),
        ResetLinkState::Valid { user_id: alice.id }
    );
    let audit = store.list_audit(None, 0, 10).await.unwrap();
    assert_eq!(audit.iter().map(|e| e.at_ms).collect::<Vec<_>>(), vec![900]);
    assert_eq!(store.purge_expired(now, keep, audit_keep).await.unwrap(), 0);
    // Once its logout is done, the last expired session goes too.
    store.media_logout_done(m1, now).await.unwrap();
    assert_eq!(store.purge_expired(now, keep, audit_keep).await.unwrap(), 1);
    assert!(store.get_session(m1).await.unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// Backends and announcements

async fn backend_answers_and_names_itself(f: Fixture) {
    let store = &f.store;
    store.ping().await.unwrap();
    let name = match f.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(store.backend(), name);
    // Both announce (SQLite: its file is watched) from the start.
    let a = *store.announcements().unwrap().borrow();
    assert!(a.connected && a.generation == 1, "{a:?}");
    // A second instance on the same data sees the first one's writes; PostgreSQL URLs may
    // also be spelt `postgresql://`.
    let other = match f.url.strip_prefix("postgres://") {
        Some(rest) => open(&format!("postgresql://{rest}"), BUSY).await.unwrap(),
        None => f.reopen().await,
    };
    user(store, "alice").await;
    assert_eq!(other.user_count().await.unwrap(), 1);
}

/// Propagation between instances on one store, as every backend has it: each revocation and
/// cutoff committed through one instance reaches the other's delta poll, in order, at once
/// (both also announce them: `announcements_reach_other_instances`).
async fn writes_of_one_instance_reach_the_others_poll_in_order(f: Fixture) {
    let other = f.reopen().await;
    let alice = user(&f.store, "alice").await;
    let from = other
        .events_since(0, 1000)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.seq);
    let mut made = Vec::new();
    for i in 0..50 {
        let sid = session(&f.store, alice.id, SessionKind::Api, 10, 10_000).await;
        made.push(
            f.store
                .revoke_session(sid, 20 + i)
                .await
                .unwrap()
                .unwrap()
                .seq,
        );
        if i % 10 == 9 {
            made.push(f.store.signout_user(alice.id, 30 + i).await.unwrap().seq);
        }
    }
    let seen: Vec<i64> = other
        .events_since(from, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        seen, made,
        "the other instance sees every event, in commit order"
    );
}

/// An event committed through one instance is announced to another within a second (SQLite: a
/// second process on the same file, as the CLI beside a running gateway).
async fn announcements_reach_other_instances(f: Fixture) {
    let mut rx = f.store.announcements().unwrap();
    assert!(rx.borrow().connected);
    let other = f.reopen().await;
    let alice = user(&other, "alice").await;
    let sid = session(&other, alice.id, SessionKind::Web, 10, 10_000).await;
    let e = other.revoke_session(sid, 20).await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|a| a.seq >= e.seq))
        .await
        .expect("announced within 1 s")
        .unwrap();
    // One announcement per transaction, carrying its highest number.
    let events = other
        .breach_response(30, &["k".to_string()], false)
        .await
        .unwrap();
    let last = events.last().unwrap().seq;
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|a| a.seq >= last))
        .await
        .expect("announced within 1 s")
        .unwrap();
    assert_eq!(rx.borrow().seq, last);
}

/// Notifications are database-wide; an instance hears only its own schema's.
async fn announcements_stay_within_their_schema(f: Fixture) {
    let mut rx = f.store.announcements().unwrap();
    run(Backend::Postgres, |neighbour| async move {
        let n = &neighbour.store;
        let bob = user(n, "bob").await;
        for at in 0..5 {
            n.signout_user(bob.id, at).await.unwrap();
        }
    })
    .await;
    let e = f.store.signout_everyone(10).await.unwrap();
    assert_eq!(e.seq, 1);
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|a| a.seq >= 1))
        .await
        .expect("announced within 1 s")
        .unwrap();
    // The neighbour's notifications (seq 1..=5) were committed, and so delivered, earlier.
    assert_eq!(rx.borrow().seq, 1);
}

/// When the announcement connection is lost, the store reconnects, bumps the generation, and
/// announcements flow again.
async fn announcements_reconnect_after_the_connection_is_lost(f: Fixture) {
    let mut rx = f.store.announcements().unwrap();
    let before = *rx.borrow();
    assert!(before.connected);
    let schema = f.schema.clone().unwrap();
    let mut admin = pg_admin().await;
    // Every connection of this store, the listening one included.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&schema)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!killed.is_empty());
    let _ = admin.close().await;
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|a| a.connected && a.generation > before.generation),
    )
    .await
    .expect("reconnected within 5 s")
    .unwrap();
    // The query pool recovers as well, and its writes are announced on the new connection.
    let mut last = None;
    for _ in 0..3 {
        match f.store.signout_everyone(10).await {
            Ok(e) => {
                last = Some(e.seq);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let last = last.expect("the store works again");
    tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|a| a.seq >= last))
        .await
        .expect("announced within 1 s")
        .unwrap();
}

/// Dropping the store ends its announcement task: receivers see the channel close, and no
/// connection of the store is left behind.
async fn announcements_end_with_the_store(f: Fixture) {
    let Fixture {
        store,
        schema,
        backend,
        ..
    } = f;
    let mut rx = store.announcements().unwrap();
    drop(store);
    tokio::time::timeout(Duration::from_secs(1), async {
        while rx.changed().await.is_ok() {}
    })
    .await
    .expect("the announcement task ends");
    if backend == Backend::Sqlite {
        return;
    }
    let schema = schema.unwrap();
    let mut admin = pg_admin().await;
    let mut left = -1;
    for _ in 0..100 {
        left = sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&schema)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "connections of a dropped store");
    let _ = admin.close().await;
}

async fn media_notes_travel_through_the_log_and_are_purged_when_spent(f: Fixture) {
    let store = &f.store;
    let notes = [
        MediaNote::Grant {
            route: "jf".into(),
            item: "abc".into(),
            ip: "10.0.0.1".into(),
            sid: SessionId(7).to_string(),
            user_id: 3,
            user_name: "bob".into(),
            issued_ms: 100,
            token_expires_s: 9_000,
        },
        MediaNote::QuickConnectIssued {
            route: "jf".into(),
            secret_hash: "ab".repeat(32),
            code: "123456".into(),
        },
        MediaNote::QuickConnectApproved {
            route: "jf".into(),
            code: "123456".into(),
            user_id: 3,
            is_admin: false,
        },
    ];
    let mut seqs = Vec::new();
    for (i, note) in notes.iter().enumerate() {
        let until = if i == 0 { 5_000 } else { 500 };
        seqs.push(store.append_media_note(note, until, 200).await.unwrap().seq);
    }
    let read: Vec<(i64, RevocationEvent)> = store
        .events_since(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event))
        .collect();
    let want: Vec<(i64, RevocationEvent)> = seqs
        .iter()
        .zip(notes.iter().cloned())
        .enumerate()
        .map(|(i, (seq, note))| {
            let until_ms = if i == 0 { 5_000 } else { 500 };
            (*seq, RevocationEvent::MediaNote { note, until_ms })
        })
        .collect();
    assert_eq!(read, want);
    // Spent notes go with the purge; the live grant stays.
    store.purge_expired(1_000, 0, i64::MAX / 2).await.unwrap();
    let left: Vec<i64> = store
        .events_since(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, vec![seqs[0]]);
}

// ---------------------------------------------------------------------------------------------
// Single sign-on

const ISS: &str = "https://idp.example";

async fn oidc_links_are_one_per_subject_and_one_per_user_and_provider(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    store
        .link_oidc("idp", ISS, "sub-a", alice.id, 5)
        .await
        .unwrap();
    assert_eq!(
        store.find_oidc_link("idp", ISS, "sub-a").await.unwrap(),
        Some(alice.id)
    );
    assert_eq!(
        store.find_oidc_link("other", ISS, "sub-a").await.unwrap(),
        None
    );
    // The subject is taken: it cannot be linked to bob as well.
    assert!(matches!(
        store.link_oidc("idp", ISS, "sub-a", bob.id, 6).await,
        Err(StoreError::Conflict(_))
    ));
    // Alice has a link to this provider: no second subject (a changed account at the
    // provider never lands on her).
    assert!(matches!(
        store.link_oidc("idp", ISS, "sub-other", alice.id, 6).await,
        Err(StoreError::Conflict(_))
    ));
    // Another provider is fine.
    store
        .link_oidc("other", "https://other.example", "sub-a", alice.id, 7)
        .await
        .unwrap();
    let links = store.oidc_links_of(alice.id).await.unwrap();
    assert_eq!(
        links
            .iter()
            .map(|l| (
                l.provider.as_str(),
                l.issuer.as_str(),
                l.subject.as_str(),
                l.created_ms
            ))
            .collect::<Vec<_>>(),
        vec![
            ("idp", ISS, "sub-a", 5),
            ("other", "https://other.example", "sub-a", 7)
        ]
    );
    assert!(store.unlink_oidc("idp", alice.id).await.unwrap());
    assert!(!store.unlink_oidc("idp", alice.id).await.unwrap());
    assert_eq!(
        store.find_oidc_link("idp", ISS, "sub-a").await.unwrap(),
        None
    );
    store
        .link_oidc("idp", ISS, "sub-a", bob.id, 8)
        .await
        .unwrap();
    assert!(matches!(
        store.link_oidc("idp", ISS, "sub-x", 999_999, 9).await,
        Err(StoreError::NotFound(_) | StoreError::Conflict(_))
    ));
    store.set_group(bob.id, "admins", true, 10).await.unwrap();
    assert!(
        store
            .find_user_by_id(bob.id)
            .await
            .unwrap()
            .unwrap()
            .is_admin
    );
}

async fn oidc_links_count_only_under_the_issuer_they_were_made_with(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    store
        .link_oidc("idp", ISS, "sub-a", alice.id, 5)
        .await
        .unwrap();
    // The same provider id, reconfigured with another issuer: its subjects are another
    // namespace, and the old link does not answer for them.
    assert_eq!(
        store
            .find_oidc_link("idp", "https://new-idp.example", "sub-a")
            .await
            .unwrap(),
        None
    );
    session(store, alice.id, SessionKind::Web, 10, 100_000).await;
    let logout = BackchannelLogout {
        provider: "idp".into(),
        jti: "j-1".into(),
        jti_expires_ms: 50_000,
        subject: Some("sub-a".into()),
        oidc_sid: None,
        issuer: "https://new-idp.example".into(),
        ended_until_ms: 50_000,
    };
    let events = store
        .oidc_backchannel_logout(&logout, 20)
        .await
        .unwrap()
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(store.list_live_sessions(None, 30).await.unwrap().len(), 1);
    let logout = BackchannelLogout {
        jti: "j-2".into(),
        issuer: ISS.into(),
        ..logout
    };
    assert_eq!(
        store
            .oidc_backchannel_logout(&logout, 20)
            .await
            .unwrap()
            .unwrap()
            .len(),
        1
    );
    assert!(store.list_live_sessions(None, 30).await.unwrap().is_empty());
}

async fn breach_response_unlinks_every_provider_account(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    store.link_oidc("idp", ISS, "a", alice.id, 1).await.unwrap();
    store.link_oidc("idp", ISS, "b", bob.id, 1).await.unwrap();
    store
        .link_oidc("other", ISS, "a", alice.id, 1)
        .await
        .unwrap();
    assert_eq!(store.unlink_all_oidc().await.unwrap(), 3);
    assert!(store.oidc_links_of(alice.id).await.unwrap().is_empty());
    assert_eq!(store.find_oidc_link("idp", ISS, "b").await.unwrap(), None);
    assert_eq!(store.unlink_all_oidc().await.unwrap(), 0);
}

fn oidc_session(sid: SessionId, oidc_sid: &str) -> OidcSession {
    OidcSession {
        session_id: sid,
        provider: "idp".into(),
        subject: "sub-a".into(),
        oidc_sid: Some(oidc_sid.into()),
        id_token_sealed: "sealed".into(),
        amr: vec!["sso".into(), "mfa".into()],
    }
}

async fn backchannel_logout_ends_the_provider_session_once(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    store
        .link_oidc("idp", ISS, "sub-a", alice.id, 1)
        .await
        .unwrap();
    let web = session(store, alice.id, SessionKind::Web, 10, 100_000).await;
    let other_web = session(store, alice.id, SessionKind::Web, 10, 100_000).await;
    let password_web = session(store, alice.id, SessionKind::Web, 10, 100_000).await;
    let media = bind(store, &binding(alice.id, "t1", "d1", 10, 100_000)).await;
    let bobs = session(store, bob.id, SessionKind::Web, 10, 100_000).await;
    for (sid, oidc_sid) in [(web, "op-1"), (other_web, "op-2")] {
        assert!(store
            .record_oidc_session(&oidc_session(sid, oidc_sid), 10)
            .await
            .unwrap());
    }
    let got = store.get_oidc_session(web).await.unwrap().unwrap();
    assert_eq!(got, oidc_session(web, "op-1"));
    assert!(store.get_oidc_session(bobs).await.unwrap().is_none());
    let logout = BackchannelLogout {
        provider: "idp".into(),
        jti: "j-1".into(),
        jti_expires_ms: 50_000,
        subject: Some("sub-a".into()),
        oidc_sid: Some("op-1".into()),
        issuer: ISS.into(),
        ended_until_ms: 30_000,
    };
    let events = store
        .oidc_backchannel_logout(&logout, 20)
        .await
        .unwrap()
        .unwrap();
    let ended = revoked_sessions(&events);
    assert_eq!(ended, set([web, media]));
    let live: BTreeSet<SessionId> = store
        .list_live_sessions(None, 30)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(live, set([other_web, password_web, bobs]));
    // The same jti again: a replay, nothing changes.
    let before = all_events(store).await.len();
    assert!(store
        .oidc_backchannel_logout(&logout, 21)
        .await
        .unwrap()
        .is_none());
    assert_eq!(all_events(store).await.len(), before);
    // A subject-only logout signs the linked user out everywhere.
    let by_subject = BackchannelLogout {
        jti: "j-2".into(),
        oidc_sid: None,
        ..logout.clone()
    };
    let events = store
        .oidc_backchannel_logout(&by_subject, 40)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        vec![RevocationEvent::UserCutoff {
            user_id: alice.id,
            at_ms: 40
        }]
    );
    // An unknown subject: accepted, nothing to end.
    let unknown = BackchannelLogout {
        jti: "j-3".into(),
        subject: Some("nobody".into()),
        oidc_sid: None,
        ..logout.clone()
    };
    assert_eq!(
        store
            .oidc_backchannel_logout(&unknown, 41)
            .await
            .unwrap()
            .unwrap()
            .len(),
        0
    );
    // Spent jtis are purged once they could no longer be accepted.
    store
        .purge_expired(60_000, 1_000_000, 1_000_000)
        .await
        .unwrap();
    assert!(store
        .oidc_backchannel_logout(&logout, 60_001)
        .await
        .unwrap()
        .is_some());
}

async fn a_provider_session_ended_by_back_channel_logout_records_no_new_session(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let logout = BackchannelLogout {
        provider: "idp".into(),
        jti: "j-1".into(),
        jti_expires_ms: 50_000,
        subject: Some("sub-a".into()),
        oidc_sid: Some("op-1".into()),
        issuer: ISS.into(),
        ended_until_ms: 30_000,
    };
    // The logout arrives while a login through op-1 waits at its TOTP step: no session yet.
    store
        .oidc_backchannel_logout(&logout, 20)
        .await
        .unwrap()
        .unwrap();
    // The login finishes on another instance: the provider session is over there too.
    let other = f.reopen().await;
    let late = session(&other, alice.id, SessionKind::Web, 25, 100_000).await;
    assert!(!other
        .record_oidc_session(&oidc_session(late, "op-1"), 25)
        .await
        .unwrap());
    assert!(other.get_oidc_session(late).await.unwrap().is_none());
    // Another provider session, and another provider's op-1, are unaffected.
    let fine = session(store, alice.id, SessionKind::Web, 25, 100_000).await;
    assert!(store
        .record_oidc_session(&oidc_session(fine, "op-2"), 25)
        .await
        .unwrap());
    let elsewhere = session(store, alice.id, SessionKind::Web, 25, 100_000).await;
    let mut o = oidc_session(elsewhere, "op-1");
    o.provider = "other".into();
    assert!(store.record_oidc_session(&o, 25).await.unwrap());
    // Once no pending login can be waiting any more, the memory expires and is purged.
    let after = session(store, alice.id, SessionKind::Web, 30_001, 100_000).await;
    assert!(store
        .record_oidc_session(&oidc_session(after, "op-1"), 30_001)
        .await
        .unwrap());
    assert_eq!(
        store
            .purge_expired(30_001, 1_000_000, 1_000_000)
            .await
            .unwrap(),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Plex accounts and devices

fn plex_device(account_id: &str, client_id: &str, at_ms: i64) -> PlexDevice {
    PlexDevice {
        account_id: account_id.to_string(),
        client_id: client_id.to_string(),
        product: "Plex for Android".to_string(),
        device_name: "Pixel".to_string(),
        platform: "Android".to_string(),
        ip: "192.0.2.7".to_string(),
        first_seen_ms: at_ms,
        last_seen_ms: at_ms,
        approved_ms: None,
    }
}

/// A Plex token of `account_id` on `client_id` bound to `user_id`, as the gateway binds them.
fn plex_binding(user_id: i64, token: &str, account_id: &str, client_id: &str) -> NewMediaBinding {
    NewMediaBinding {
        route: "plex".to_string(),
        media_user_id: crate::store::plex_media_user_id(account_id),
        media_user: "plexuser".to_string(),
        device_id: client_id.to_string(),
        token_sealed: String::new(),
        ..binding(user_id, token, client_id, 10, 100_000)
    }
}

fn new_passkey(user_id: i64, cred_id: &str, counter: i64) -> NewPasskey {
    NewPasskey {
        user_id,
        cred_id: cred_id.to_string(),
        rp_id: "media.example".into(),
        label: "Phone".into(),
        aaguid: String::new(),
        credential: format!("{{\"counter\":{counter}}}"),
        counter,
        created_ms: 5,
        user_verified: true,
    }
}

async fn groups_change_in_one_write_with_their_event_and_travel_in_the_snapshot(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let root = store.create_user("root", "hash", true, 2).await.unwrap();
    assert_eq!(store.groups_of(root.id).await.unwrap(), ["admins"]);
    assert!(store.groups_of(alice.id).await.unwrap().is_empty());
    // Each change is one event with the user's groups as they now are; no change, no event.
    let ev = store
        .set_group(alice.id, "family", true, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev.event,
        RevocationEvent::GroupsChanged {
            user_id: alice.id,
            groups: vec!["family".to_string()],
        }
    );
    assert!(store
        .set_group(alice.id, "family", true, 11)
        .await
        .unwrap()
        .is_none());
    store
        .set_group(alice.id, "kids", true, 12)
        .await
        .unwrap()
        .unwrap();
    let ev = store
        .set_group(alice.id, "admins", true, 13)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev.event,
        RevocationEvent::GroupsChanged {
            user_id: alice.id,
            groups: vec!["admins".into(), "family".into(), "kids".into()],
        }
    );
    assert!(
        store
            .find_user_by_id(alice.id)
            .await
            .unwrap()
            .unwrap()
            .is_admin
    );
    store
        .set_group(bob.id, "kids", true, 14)
        .await
        .unwrap()
        .unwrap();
    let ev = store
        .set_group(alice.id, "kids", false, 15)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ev.event,
        RevocationEvent::GroupsChanged {
            user_id: alice.id,
            groups: vec!["admins".into(), "family".into()],
        }
    );
    assert!(store
        .set_group(bob.id, "family", false, 16)
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        store.set_group(999_999, "kids", true, 17).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.list_groups().await.unwrap(),
        vec![
            ("admins".to_string(), 2),
            ("family".to_string(), 1),
            ("kids".to_string(), 1)
        ]
    );
    // The log carries every change (the new administrator's first), read back as written.
    let kinds: Vec<RevocationEvent> = store
        .events_since(0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    assert_eq!(
        kinds[0],
        RevocationEvent::GroupsChanged {
            user_id: root.id,
            groups: vec!["admins".into()],
        }
    );
    let mut snap = store.snapshot(100).await.unwrap();
    snap.groups.sort();
    let mut want = vec![
        (alice.id, "admins".to_string()),
        (alice.id, "family".to_string()),
        (bob.id, "kids".to_string()),
        (root.id, "admins".to_string()),
    ];
    want.sort();
    assert_eq!(snap.groups, want);
}

async fn passkeys_are_unique_per_credential_and_a_use_needs_a_counter_that_moved_forward(
    f: Fixture,
) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    // The user handle is made once and found again.
    let h = store.passkey_handle(alice.id, "handle-a").await.unwrap();
    assert_eq!(h, "handle-a");
    assert_eq!(
        store.passkey_handle(alice.id, "other").await.unwrap(),
        "handle-a"
    );
    assert_eq!(
        store.passkey_user("handle-a").await.unwrap(),
        Some(alice.id)
    );
    assert_eq!(store.passkey_user("other").await.unwrap(), None);
    let id = store
        .add_passkey(&new_passkey(alice.id, "cred-1", 0))
        .await
        .unwrap();
    // One credential id, one account.
    assert!(matches!(
        store.add_passkey(&new_passkey(bob.id, "cred-1", 0)).await,
        Err(StoreError::Conflict(_))
    ));
    let found = store.find_passkey("cred-1").await.unwrap().unwrap();
    assert_eq!((found.id, found.user_id, found.counter), (id, alice.id, 0));
    assert_eq!(store.passkey_rp_ids().await.unwrap(), vec!["media.example"]);
    // A use is recorded only when the counter moves forward from what was read (0 stays 0 for
    // authenticators without a counter).
    assert!(store.record_passkey_use(id, 0, "{}", 0, 10).await.unwrap());
    assert!(store
        .record_passkey_use(id, 0, "{\"c\":3}", 3, 20)
        .await
        .unwrap());
    assert!(!store.record_passkey_use(id, 3, "{}", 3, 30).await.unwrap());
    assert!(!store.record_passkey_use(id, 3, "{}", 2, 30).await.unwrap());
    // A stale read (another sign-in moved it meanwhile) records nothing.
    assert!(!store.record_passkey_use(id, 0, "{}", 4, 30).await.unwrap());
    let now = store.find_passkey("cred-1").await.unwrap().unwrap();
    assert_eq!(
        (now.counter, now.credential.as_str(), now.last_used_ms),
        (3, "{\"c\":3}", Some(20))
    );
    store.flag_passkey_clone(id, 40).await.unwrap();
    assert_eq!(
        store.passkeys_of(alice.id).await.unwrap()[0].clone_warning_ms,
        Some(40)
    );
    // Renamed and removed only by their owner.
    assert!(!store.rename_passkey(bob.id, id, "Mine").await.unwrap());
    assert!(store.rename_passkey(alice.id, id, "Laptop").await.unwrap());
    assert!(!store.remove_passkey(bob.id, id, false).await.unwrap());
    assert_eq!(
        store.passkeys_of(alice.id).await.unwrap()[0].label,
        "Laptop"
    );
    assert!(store.remove_passkey(alice.id, id, false).await.unwrap());
    assert!(store.passkeys_of(alice.id).await.unwrap().is_empty());
    assert!(store.passkey_rp_ids().await.unwrap().is_empty());
}

/// A user who must sign in with a passkey keeps their last one: the store counts and deletes in
/// one write, so two removals at once leave one passkey, not none.
async fn the_last_passkey_is_kept_when_asked_even_with_two_removals_at_once(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let only = store
        .add_passkey(&new_passkey(bob.id, "bob-1", 0))
        .await
        .unwrap();
    assert!(matches!(
        store.remove_passkey(bob.id, only, true).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.passkeys_of(bob.id).await.unwrap().len(), 1);
    // Not theirs, or no such passkey: `false`, not the conflict.
    assert!(!store.remove_passkey(alice.id, only, true).await.unwrap());
    assert!(!store.remove_passkey(bob.id, 999_999, true).await.unwrap());
    // Without `keep_last` the last one goes.
    assert!(store.remove_passkey(bob.id, only, false).await.unwrap());
    assert!(store.passkeys_of(bob.id).await.unwrap().is_empty());

    // Two passkeys removed at once, each call seeing the other: exactly one is removed.
    for round in 0..10 {
        let a = store
            .add_passkey(&new_passkey(alice.id, &format!("a-{round}"), 0))
            .await
            .unwrap();
        let b = store
            .add_passkey(&new_passkey(alice.id, &format!("b-{round}"), 0))
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(
            store.remove_passkey(alice.id, a, true),
            store.remove_passkey(alice.id, b, true)
        );
        let removed = [&ra, &rb].iter().filter(|r| matches!(r, Ok(true))).count();
        let kept = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Err(StoreError::Conflict(_))))
            .count();
        assert_eq!((removed, kept), (1, 1), "round {round}: {ra:?} {rb:?}");
        let left = store.passkeys_of(alice.id).await.unwrap();
        assert_eq!(left.len(), 1, "round {round}");
        assert!(store
            .remove_passkey(alice.id, left[0].id, false)
            .await
            .unwrap());
    }
}

async fn a_passkey_link_is_used_once_for_its_user_and_is_not_a_reset_link(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    store
        .create_passkey_link("pk", alice.id, 10, 100)
        .await
        .unwrap();
    store
        .create_reset_link("pw", alice.id, 10, 100)
        .await
        .unwrap();
    // Each purpose reads only its own links.
    assert_eq!(
        store.passkey_link_state("pk", 20).await.unwrap(),
        ResetLinkState::Valid { user_id: alice.id }
    );
    assert_eq!(
        store.passkey_link_state("pw", 20).await.unwrap(),
        ResetLinkState::Unknown
    );
    assert_eq!(
        store.reset_link_state("pk", 20).await.unwrap(),
        ResetLinkState::Unknown
    );
    assert!(store
        .redeem_reset_link("pk", "hash", true, 20)
        .await
        .unwrap()
        .is_none());
    // Not for another user's passkey; then once, ending alice's sessions.
    assert!(store
        .redeem_passkey_link("pk", &new_passkey(bob.id, "c-bob", 0), 20)
        .await
        .unwrap()
        .is_none());
    let event = store
        .redeem_passkey_link("pk", &new_passkey(alice.id, "c-alice", 0), 30)
        .await
        .unwrap()
        .expect("used once");
    assert!(
        matches!(event.event, RevocationEvent::UserCutoff { user_id, .. } if user_id == alice.id)
    );
    assert_eq!(store.passkeys_of(alice.id).await.unwrap().len(), 1);
    assert_eq!(
        store.passkey_link_state("pk", 40).await.unwrap(),
        ResetLinkState::Used
    );
    assert!(store
        .redeem_passkey_link("pk", &new_passkey(alice.id, "c-again", 0), 40)
        .await
        .unwrap()
        .is_none());
    // A taken credential id uses nothing.
    store
        .create_passkey_link("pk2", alice.id, 50, 100)
        .await
        .unwrap();
    assert!(matches!(
        store
            .redeem_passkey_link("pk2", &new_passkey(alice.id, "c-alice", 0), 60)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.passkey_link_state("pk2", 60).await.unwrap(),
        ResetLinkState::Valid { user_id: alice.id }
    );
    // A newer link replaces the older one; the password link is untouched.
    store
        .create_passkey_link("pk3", alice.id, 70, 200)
        .await
        .unwrap();
    assert_eq!(
        store.passkey_link_state("pk2", 70).await.unwrap(),
        ResetLinkState::Used
    );
    assert!(matches!(
        store.reset_link_state("pw", 70).await.unwrap(),
        ResetLinkState::Valid { .. }
    ));
}

async fn a_ceremony_is_taken_back_once_for_its_purpose_and_not_after_it_expired(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let ceremony = |id: &str, expires_ms| Ceremony {
        id: id.into(),
        purpose: "login".into(),
        user_id: Some(alice.id),
        state: "{}".into(),
        expires_ms,
    };
    store.put_ceremony(&ceremony("c1", 100), 10).await.unwrap();
    store.put_ceremony(&ceremony("c2", 100), 10).await.unwrap();
    // Another purpose takes nothing (and leaves it).
    assert_eq!(
        store.take_ceremony("c1", "register", 20).await.unwrap(),
        None
    );
    assert_eq!(
        store.take_ceremony("c1", "login", 20).await.unwrap(),
        Some(ceremony("c1", 100))
    );
    assert_eq!(store.take_ceremony("c1", "login", 20).await.unwrap(), None);
    // Expired: gone, and not returned.
    assert_eq!(store.take_ceremony("c2", "login", 100).await.unwrap(), None);
    assert_eq!(store.take_ceremony("c2", "login", 50).await.unwrap(), None);
    // Keeping a new one drops the expired ones.
    store.put_ceremony(&ceremony("c3", 100), 10).await.unwrap();
    store.put_ceremony(&ceremony("c4", 300), 200).await.unwrap();
    assert_eq!(store.take_ceremony("c3", "login", 50).await.unwrap(), None);
}

async fn plex_accounts_are_met_offered_linked_once_and_found_by_id_or_name(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let a = store
        .note_plex_account("1001", "OwnerPlex", "Owner", 10)
        .await
        .unwrap();
    assert_eq!((a.user_id, a.first_seen_ms, a.last_seen_ms), (None, 10, 10));
    // Met again: the name follows plex.tv, the first sighting stays.
    let a = store
        .note_plex_account("1001", "ownerplex2", "Owner Two", 20)
        .await
        .unwrap();
    assert_eq!(
        (a.username.as_str(), a.first_seen_ms, a.last_seen_ms),
        ("ownerplex2", 10, 20)
    );
    // Found by id, or by name in any case; an unknown key is none.
    assert_eq!(
        store.find_plex_account("1001").await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        store
            .find_plex_account("OWNERPLEX2")
            .await
            .unwrap()
            .map(|a| a.account_id),
        Some("1001".to_string())
    );
    assert_eq!(store.find_plex_account("9999").await.unwrap(), None);

    // Offered to alice: her list shows it, bob's does not.
    store.offer_plex_link("1001", alice.id, 30).await.unwrap();
    let offered = store.list_plex_accounts(Some(alice.id)).await.unwrap();
    assert_eq!(offered.len(), 1);
    assert_eq!(
        (offered[0].user_id, offered[0].offered_user_id),
        (None, Some(alice.id))
    );
    assert!(store
        .list_plex_accounts(Some(bob.id))
        .await
        .unwrap()
        .is_empty());

    // Linked to alice (twice is fine); bob cannot take it; unknown accounts and users fail.
    store.link_plex_account("1001", alice.id, 40).await.unwrap();
    store.link_plex_account("1001", alice.id, 41).await.unwrap();
    let linked = store.find_plex_account("1001").await.unwrap().unwrap();
    assert_eq!(
        (
            linked.user_id,
            linked.user_name.as_deref(),
            linked.linked_ms,
            linked.offered_user_id
        ),
        (Some(alice.id), Some("alice"), Some(40), None)
    );
    assert!(matches!(
        store.link_plex_account("1001", bob.id, 50).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.link_plex_account("9999", bob.id, 50).await,
        Err(StoreError::NotFound(_))
    ));
    store
        .note_plex_account("1002", "friend", "Friend", 50)
        .await
        .unwrap();
    assert!(matches!(
        store.link_plex_account("1002", 987_654, 50).await,
        Err(StoreError::NotFound(_))
    ));
    // An offer no longer applies to a linked account.
    store.offer_plex_link("1001", bob.id, 60).await.unwrap();
    assert_eq!(
        store
            .find_plex_account("1001")
            .await
            .unwrap()
            .unwrap()
            .offered_user_id,
        None
    );
    let all = store.list_plex_accounts(None).await.unwrap();
    assert_eq!(all.len(), 2);
}

async fn unlinking_a_plex_account_or_revoking_a_device_ends_exactly_its_tokens(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    store
        .note_plex_account("1001", "owner", "Owner", 10)
        .await
        .unwrap();
    store
        .note_plex_account("1002", "other", "Other", 10)
        .await
        .unwrap();
    store.link_plex_account("1001", alice.id, 10).await.unwrap();
    store.link_plex_account("1002", alice.id, 10).await.unwrap();
    let phone = bind(store, &plex_binding(alice.id, "t-phone", "1001", "phone")).await;
    let tv = bind(store, &plex_binding(alice.id, "t-tv", "1001", "tv")).await;
    let other = bind(store, &plex_binding(alice.id, "t-other", "1002", "phone")).await;
    // No upstream logout is owed for a Plex token (the gateway holds none to log out with).
    assert!(owed(store, 20).await.is_empty());

    // Devices: noted, listed under their user, approved, revoked.
    let d = store
        .note_plex_device(&plex_device("1001", "phone", 20))
        .await
        .unwrap();
    assert_eq!(d.approved_ms, None);
    store
        .note_plex_device(&plex_device("1001", "tv", 25))
        .await
        .unwrap();
    let listed = store.list_plex_devices(Some(alice.id)).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|d| d.client_id.as_str())
            .collect::<Vec<_>>(),
        ["tv", "phone"],
        "newest first"
    );
    assert!(store
        .approve_plex_device("1001", "phone", alice.id, 30)
        .await
        .unwrap());
    assert!(!store
        .approve_plex_device("1001", "nope", alice.id, 30)
        .await
        .unwrap());
    let approved = store.list_plex_devices(None).await.unwrap();
    assert_eq!(
        approved
            .iter()
            .find(|d| d.client_id == "phone")
            .unwrap()
            .approved_ms,
        Some(30)
    );
    // Seen again: still approved.
    let again = store
        .note_plex_device(&plex_device("1001", "phone", 35))
        .await
        .unwrap();
    assert_eq!((again.approved_ms, again.last_seen_ms), (Some(30), 35));

    // Revoking the phone ends the phone's token only, and withdraws the approval.
    let events = store
        .revoke_plex_device("1001", "phone", 40)
        .await
        .unwrap()
        .unwrap();
    let ended = revoked_sessions(&events);
    assert_eq!(ended, set([phone]));
    assert!(store
        .revoke_plex_device("1001", "nope", 40)
        .await
        .unwrap()
        .is_none());
    let phone_now = store.list_plex_devices(None).await.unwrap();
    assert_eq!(
        phone_now
            .iter()
            .find(|d| d.client_id == "phone")
            .unwrap()
            .approved_ms,
        None
    );

    // Unlinking 1001 ends its remaining token (the tv), not the other account's.
    let events = store
        .unlink_plex_account("1001", 50)
        .await
        .unwrap()
        .unwrap();
    let ended = revoked_sessions(&events);
    assert_eq!(ended, set([tv]));
    assert!(store
        .unlink_plex_account("1001", 60)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store
            .find_plex_account("1001")
            .await
            .unwrap()
            .unwrap()
            .user_id,
        None
    );
    let other = store.get_session(other).await.unwrap().unwrap();
    assert_eq!(other.revoked_ms, None, "the other account's token lives");
    assert!(store
        .list_plex_devices(Some(alice.id))
        .await
        .unwrap()
        .is_empty());
}

/// A directory user: the entry is kept, and the sync's disabling ends every token like an
/// administrator's, but its enabling undoes only its own disabling, never an administrator's
/// (not even one made after the sync's), and only by a reading of the directory that began
/// after the disabling.
async fn the_directory_disables_and_enables_only_what_it_disabled(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    assert_eq!(
        (alice.directory_dn.as_deref(), alice.directory_id.as_deref()),
        (None, None)
    );
    let dn = "uid=alice,ou=people,dc=example,dc=org";
    store
        .set_directory_entry(alice.id, dn, Some("0b1c-uuid"))
        .await
        .unwrap();
    store
        .set_directory_entry(bob.id, "uid=bob,ou=people,dc=example,dc=org", None)
        .await
        .unwrap();
    let a = store.find_user("ALICE").await.unwrap().unwrap();
    assert_eq!(a.directory_dn.as_deref(), Some(dn));
    assert_eq!(a.directory_id.as_deref(), Some("0b1c-uuid"));
    assert!(matches!(
        store.set_directory_entry(i64::MAX, dn, None).await,
        Err(StoreError::NotFound(_))
    ));

    let events = store
        .set_directory_disabled(alice.id, true, 10, 10)
        .await
        .unwrap();
    let kinds: Vec<_> = events.iter().map(|e| e.event.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            RevocationEvent::UserDisabled { user_id: alice.id },
            RevocationEvent::UserCutoff {
                user_id: alice.id,
                at_ms: 10
            },
        ]
    );
    let a = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert!(a.disabled);
    assert_eq!(a.directory_disabled_ms, Some(10));
    // Disabled already: nothing more is written.
    assert!(store
        .set_directory_disabled(alice.id, true, 11, 11)
        .await
        .unwrap()
        .is_empty());
    // A reading of the directory begun before the disabling does not undo it.
    assert!(store
        .set_directory_disabled(alice.id, false, 12, 9)
        .await
        .unwrap()
        .is_empty());
    assert!(
        store
            .find_user_by_id(alice.id)
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    // An administrator disabled bob: the directory's enabling leaves him disabled.
    store.set_disabled(bob.id, true, 12).await.unwrap();
    assert!(store
        .set_directory_disabled(bob.id, false, 13, 13)
        .await
        .unwrap()
        .is_empty());
    assert!(
        store
            .find_user_by_id(bob.id)
            .await
            .unwrap()
            .unwrap()
            .disabled
    );
    // The directory's own disabling is undone by a later reading.
    let events = store
        .set_directory_disabled(alice.id, false, 14, 14)
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
        vec![RevocationEvent::UserEnabled { user_id: alice.id }]
    );
    let a = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert!(!a.disabled);
    assert_eq!(a.directory_disabled_ms, None);
    // Disabled by the sync, then by an administrator: the administrator's stands when the
    // directory lets the user in again.
    store
        .set_directory_disabled(alice.id, true, 15, 15)
        .await
        .unwrap();
    store.set_disabled(alice.id, true, 16).await.unwrap();
    assert!(store
        .set_directory_disabled(alice.id, false, 17, 17)
        .await
        .unwrap()
        .is_empty());
    let a = store.find_user_by_id(alice.id).await.unwrap().unwrap();
    assert!(a.disabled && a.directory_disabled_ms.is_none());
    let snap = store.snapshot(20).await.unwrap();
    assert_eq!(snap.disabled_users, vec![alice.id, bob.id]);
}

/// An account made by single sign-on has no password of its own until one is set by any way.
async fn a_password_of_ones_own_is_marked_until_set(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    assert!(alice.password_set, "a local account has one");
    store.mark_password_unset(alice.id).await.unwrap();
    assert!(
        !store
            .find_user_by_id(alice.id)
            .await
            .unwrap()
            .unwrap()
            .password_set
    );
    store.change_password(alice.id, "new", None).await.unwrap();
    assert!(
        store
            .find_user_by_id(alice.id)
            .await
            .unwrap()
            .unwrap()
            .password_set
    );
    store.mark_password_unset(alice.id).await.unwrap();
    store.set_password(alice.id, "again").await.unwrap();
    assert!(
        store
            .find_user_by_id(alice.id)
            .await
            .unwrap()
            .unwrap()
            .password_set
    );
}

macro_rules! suite {
    (both: [$($both:ident),* $(,)?], postgres_only: [$($pg:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $both() {
                    super::run(super::Backend::Sqlite, super::$both).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $both() {
                    super::run(super::Backend::Postgres, super::$both).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $pg() {
                    super::run(super::Backend::Postgres, super::$pg).await;
                }
            )*
        }
    };
}

/// A recording store writes its audit entry and notices in the transaction of the first change
/// it commits, and only once; a change that finds nothing to do, or fails, records nothing.
async fn a_recorded_change_writes_its_entry_and_notices_with_it_once(f: Fixture) {
    let store = &f.store;
    let alice = user(store, "alice").await;
    let record = |event: &str, at_ms: i64| Record {
        entry: AuditEntry {
            at_ms,
            event: event.into(),
            outcome: "success".into(),
            user_id: Some(alice.id),
            user_name: "alice".into(),
            ..AuditEntry::default()
        },
        outbox: vec![NewOutbox {
            channel: "mail".into(),
            kind: event.into(),
            user_id: Some(alice.id),
            address: None,
            params: "{}".into(),
        }],
    };
    let recording = store.recording(record("password_change", 10));
    recording
        .change_password(alice.id, "new", Some(10))
        .await
        .unwrap();
    // A second change through the same store is not recorded again.
    recording.signout_user(alice.id, 11).await.unwrap();
    // Nothing to remove: nothing recorded.
    let nothing = store.recording(record("passkey_remove", 12));
    assert!(!nothing.remove_passkey(alice.id, 999, false).await.unwrap());
    // A change refused (a credential id registered already): nothing recorded.
    store
        .add_passkey(&new_passkey(alice.id, "cred-1", 0))
        .await
        .unwrap();
    let refused = store.recording(record("passkey_add", 13));
    assert!(matches!(
        refused
            .add_passkey(&new_passkey(alice.id, "cred-1", 0))
            .await,
        Err(StoreError::Conflict(_))
    ));
    // A change that did something is recorded: the passkey added through a recording store.
    store
        .recording(record("passkey_add", 14))
        .add_passkey(&new_passkey(alice.id, "cred-2", 0))
        .await
        .unwrap();
    let audit: Vec<(String, i64)> = store
        .list_audit(Some(alice.id), 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event, e.at_ms))
        .collect();
    assert_eq!(
        audit,
        [
            ("passkey_add".to_string(), 14),
            ("password_change".to_string(), 10)
        ]
    );
    let outbox: Vec<(String, i64)> = store
        .list_outbox(10)
        .await
        .unwrap()
        .into_iter()
        .map(|(m, _, _)| (m.kind, m.created_ms))
        .collect();
    assert_eq!(
        outbox,
        [
            ("passkey_add".to_string(), 14),
            ("password_change".to_string(), 10)
        ]
    );
}

/// A lease is held by one owner until it runs out; a certificate is replaced only by a newer
/// one; a challenge answer is there until it runs out or is dropped.
async fn leases_certificates_and_challenge_answers_are_shared_and_time_bound(f: Fixture) {
    let store = &f.store;
    assert!(store.take_lease("acme:a", "one", 100, 200).await.unwrap());
    assert!(!store.take_lease("acme:a", "two", 150, 250).await.unwrap());
    // Its owner renews it; once it ran out, another takes it.
    assert!(store.take_lease("acme:a", "one", 190, 300).await.unwrap());
    assert!(!store.take_lease("acme:a", "two", 299, 400).await.unwrap());
    assert!(store.take_lease("acme:a", "two", 300, 400).await.unwrap());
    // Given back by its owner only; then free at once.
    store.release_lease("acme:a", "one").await.unwrap();
    assert!(!store.take_lease("acme:a", "one", 310, 400).await.unwrap());
    store.release_lease("acme:a", "two").await.unwrap();
    assert!(store.take_lease("acme:a", "one", 310, 400).await.unwrap());
    // Another lease is another name.
    assert!(store.take_lease("acme:b", "two", 310, 400).await.unwrap());

    let cert = |issued_ms: i64| StoredCertificate {
        names: "a.example.org,b.example.org".into(),
        chain_pem: format!("chain {issued_ms}"),
        key_sealed: format!("key {issued_ms}"),
        not_after_ms: issued_ms + 1000,
        issued_ms,
    };
    assert_eq!(
        store
            .certificate("a.example.org,b.example.org")
            .await
            .unwrap(),
        None
    );
    store.put_certificate(&cert(10)).await.unwrap();
    store.put_certificate(&cert(20)).await.unwrap();
    // An older one (a slow replica's) does not replace it.
    store.put_certificate(&cert(15)).await.unwrap();
    assert_eq!(
        store
            .certificate("a.example.org,b.example.org")
            .await
            .unwrap(),
        Some(cert(20))
    );
    assert_eq!(store.certificate("a.example.org").await.unwrap(), None);

    store
        .put_challenge("http-01:tok", "tok.thumb", 100, 200)
        .await
        .unwrap();
    assert_eq!(
        store
            .challenge("http-01:tok", 150)
            .await
            .unwrap()
            .as_deref(),
        Some("tok.thumb")
    );
    assert_eq!(store.challenge("http-01:tok", 200).await.unwrap(), None);
    assert_eq!(store.challenge("http-01:other", 150).await.unwrap(), None);
    store
        .put_challenge("tls-alpn-01:a.example.org", "digest", 100, 200)
        .await
        .unwrap();
    store
        .drop_challenge("tls-alpn-01:a.example.org")
        .await
        .unwrap();
    assert_eq!(
        store
            .challenge("tls-alpn-01:a.example.org", 150)
            .await
            .unwrap(),
        None
    );
}

suite! {
    both: [
        leases_certificates_and_challenge_answers_are_shared_and_time_bound,
        a_recorded_change_writes_its_entry_and_notices_with_it_once,
        a_password_of_ones_own_is_marked_until_set,
        the_directory_disables_and_enables_only_what_it_disabled,
        groups_change_in_one_write_with_their_event_and_travel_in_the_snapshot,
        passkeys_are_unique_per_credential_and_a_use_needs_a_counter_that_moved_forward,
        the_last_passkey_is_kept_when_asked_even_with_two_removals_at_once,
        a_ceremony_is_taken_back_once_for_its_purpose_and_not_after_it_expired,
        a_passkey_link_is_used_once_for_its_user_and_is_not_a_reset_link,
        plex_accounts_are_met_offered_linked_once_and_found_by_id_or_name,
        unlinking_a_plex_account_or_revoking_a_device_ends_exactly_its_tokens,
        revocation_events_are_sequenced_and_in_snapshot,
        revoking_unknown_session_is_none,
        concurrent_writers_get_gap_free_sequence_numbers,
        events_since_pages_through_every_kind,
        sequence_numbers_are_not_reused_after_purge,
        snapshot_holds_the_whole_revocation_state,
        a_million_revoked_sessions_travel_whole_in_a_snapshot,
        an_outage_refuses_writes_as_unavailable_and_leaves_no_gap,
        writes_of_one_instance_reach_the_others_poll_in_order,
        duplicate_user_name_is_a_conflict_ignoring_case,
        accounts_lock_out_and_change_passwords,
        totp_steps_and_recovery_codes,
        reset_links_are_single_use,
        sessions_are_listed_counted_and_touched,
        audit_log_lists_newest_first,
        binding_a_media_token_retires_the_same_devices_older_token,
        binding_the_same_token_twice_yields_no_events,
        owed_logouts_follow_every_way_a_media_session_ends,
        failed_media_logouts_back_off,
        idle_media_sessions_end_per_route,
        purge_deletes_what_can_no_longer_matter,
        backend_answers_and_names_itself,
        media_notes_travel_through_the_log_and_are_purged_when_spent,
        oidc_links_are_one_per_subject_and_one_per_user_and_provider,
        oidc_links_count_only_under_the_issuer_they_were_made_with,
        breach_response_unlinks_every_provider_account,
        backchannel_logout_ends_the_provider_session_once,
        a_provider_session_ended_by_back_channel_logout_records_no_new_session,
        announcements_reach_other_instances,
        announcements_end_with_the_store,
    ],
    postgres_only: [
        announcements_stay_within_their_schema,
        announcements_reconnect_after_the_connection_is_lost,
    ],
}

#[test]
fn revoked_records_parse_exactly_and_refuse_anything_else() {
    let a = SessionId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    let mut out = Vec::new();
    parse_revoked_records(
        format!("{a}1700000000000,{}1000", SessionId(5)).as_bytes(),
        b',',
        &mut out,
    )
    .unwrap();
    parse_revoked_records(format!("{a}\t2000\n").as_bytes(), b'\n', &mut out).unwrap();
    assert_eq!(
        out,
        vec![
            RevokedEntry::new(a, 1_700_000_000_000),
            RevokedEntry::new(SessionId(5), 1000),
            RevokedEntry::new(a, 2000)
        ]
    );
    for bad in [
        format!("{a}"),
        "zz".to_string(),
        format!("{a}12x"),
        format!("{}1", &a.to_string()[..31]),
    ] {
        assert!(
            parse_revoked_records(bad.as_bytes(), b',', &mut Vec::new()).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn session_ids_parse_as_32_hex_digits_and_nothing_else() {
    for n in [
        0u128,
        1,
        0xe2c7_c72a_b3bc_fd5d_d489_f9e4_c483_4eef,
        u128::MAX,
    ] {
        let id = SessionId(n);
        assert_eq!(SessionId::parse(&id.to_string()), Some(id));
        assert_eq!(
            SessionId::parse(&id.to_string().to_ascii_uppercase()),
            Some(id)
        );
    }
    let good = "e2c7c72ab3bcfd5dd489f9e4c4834eef";
    for bad in [
        "",
        &good[1..],
        &format!("{good}0"),
        "+2c7c72ab3bcfd5dd489f9e4c4834eef",
        "g2c7c72ab3bcfd5dd489f9e4c4834eef",
        "e2c7c72ab3bcfd5dd489f9e4c4834ee ",
        "e2c7c72ab3bcfd5dd489f9e4c4834e\u{e9}",
    ] {
        assert_eq!(SessionId::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn postgres_announces_on_the_channel_it_listens_on() {
    use super::dialect::Dialect;
    let announce = <sqlx::Postgres as Dialect>::ANNOUNCE.unwrap();
    assert!(
        announce.contains(&format!("'{}'", super::postgres::CHANNEL)),
        "{announce}"
    );
}
