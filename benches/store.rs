//! Benchmarks of the store's hot paths, through the public `store::open` and `Store` trait, on
//! each backend:
//!
//! - `events_since/none`: the revocation delta poll when nothing is new (every instance runs it
//!   each poll interval), and `events_since/100` when 100 events are new.
//! - `get_session`: a session looked up by id (with its user's name).
//! - `touch_sessions/256`: a batch of 256 last-seen times written in one call.
//!
//! SQLite runs in a fresh file in a temporary directory; PostgreSQL in a fresh schema of the
//! database at `PORTCULLIS_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`),
//! dropped at the end. `PORTCULLIS_BENCH_BACKENDS=sqlite` (or `postgres`) runs one backend only.
//!
//! Run with `cargo bench --bench store`; each benchmark measures for 3 s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::store::{self, DynStore, NewSession, SessionId, SessionKind};
use sqlx::Connection;
use tokio::runtime::Runtime;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const BUSY: Duration = Duration::from_secs(10);
const SESSIONS: usize = 2_000;
const TOUCH_BATCH: usize = 256;
const NEW_EVENTS: i64 = 100;
const NOW_MS: i64 = 1_700_000_000_000;
const DAY_MS: i64 = 86_400_000;

/// A store with users, `SESSIONS` live sessions and a log of a few hundred events (session
/// revocations and user cutoffs). Returns the sessions' ids and the newest event's number.
async fn populate(store: &DynStore) -> (Vec<SessionId>, i64) {
    let mut users = Vec::new();
    for i in 0..20 {
        let user = store
            .create_user(&format!("user{i}"), "hash", false, NOW_MS)
            .await
            .unwrap();
        users.push(user.id);
    }
    let mut sids = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let s = NewSession {
            id: SessionId::random(),
            user_id: users[i % users.len()],
            kind: SessionKind::Web,
            user_agent: "bench/1.0".to_string(),
            ip: "192.0.2.1".to_string(),
            created_ms: NOW_MS,
            expires_ms: NOW_MS + DAY_MS,
        };
        store.create_session(&s).await.unwrap();
        sids.push(s.id);
    }
    let mut last = 0;
    for (i, sid) in sids.iter().take(300).enumerate() {
        let event = store
            .revoke_session(*sid, NOW_MS + i as i64)
            .await
            .unwrap()
            .unwrap();
        last = event.seq;
        if i % 10 == 0 {
            last = store
                .signout_user(users[i % users.len()], NOW_MS - 1)
                .await
                .unwrap()
                .seq;
        }
    }
    (sids[300..].to_vec(), last)
}

fn bench_backend(c: &mut Criterion, rt: &Runtime, name: &str, store: &DynStore) {
    let (sids, last) = rt.block_on(populate(store));
    assert_eq!(
        rt.block_on(store.events_since(last - NEW_EVENTS, 1000))
            .unwrap()
            .len(),
        NEW_EVENTS as usize
    );
    let mut group = c.benchmark_group(name);
    group.bench_function("events_since/none", |b| {
        b.iter(|| {
            let events = rt
                .block_on(store.events_since(black_box(last), 1000))
                .unwrap();
            assert!(events.is_empty());
        })
    });
    group.bench_function("events_since/100", |b| {
        b.iter(|| {
            let events = rt
                .block_on(store.events_since(black_box(last - NEW_EVENTS), 1000))
                .unwrap();
            assert_eq!(events.len(), NEW_EVENTS as usize);
        })
    });
    let mut i = 0;
    group.bench_function("get_session", |b| {
        b.iter(|| {
            i = (i + 1) % sids.len();
            let s = rt.block_on(store.get_session(black_box(sids[i]))).unwrap();
            assert!(s.is_some());
        })
    });
    let mut at = NOW_MS;
    let mut start = 0;
    group.bench_function("touch_sessions/256", |b| {
        b.iter(|| {
            at += 1;
            start = (start + TOUCH_BATCH) % (sids.len() - TOUCH_BATCH);
            let seen: Vec<(SessionId, i64)> = sids[start..start + TOUCH_BATCH]
                .iter()
                .map(|sid| (*sid, at))
                .collect();
            rt.block_on(store.touch_sessions(&seen)).unwrap();
        })
    });
    group.finish();
}

fn wanted(backend: &str) -> bool {
    std::env::var("PORTCULLIS_BENCH_BACKENDS")
        .map(|v| v.split(',').any(|b| b == backend))
        .unwrap_or(true)
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if wanted("sqlite") {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = rt.block_on(store::open(&url, BUSY)).unwrap();
        bench_backend(c, &rt, "sqlite", &store);
        drop(store);
    }
    if wanted("postgres") {
        let base =
            std::env::var("PORTCULLIS_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_string());
        let schema = format!("bench_{:016x}", rand::random::<u64>());
        let mut admin = rt.block_on(sqlx::PgConnection::connect(&base)).unwrap();
        rt.block_on(sqlx::raw_sql(&format!("CREATE SCHEMA {schema}")).execute(&mut admin))
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        let store = rt.block_on(store::open(&url, BUSY)).unwrap();
        bench_backend(c, &rt, "postgres", &store);
        drop(store);
        rt.block_on(sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE")).execute(&mut admin))
            .unwrap();
    }
}

criterion_group! {
    name = store_benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(store_benches);
