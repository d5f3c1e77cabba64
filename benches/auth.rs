//! Micro-benchmarks of the authentication hot path, through the library's public API:
//!
//! - `token/verify`: HS256 session token verification (`Keyring::verify`) of a token the
//!   keyring has verified before (remembered: time checks only), and `token/verify_first_sight`
//!   of tokens it has not (parsing and the signature check; 200,000 tokens in turn, ten times
//!   what the keyring remembers).
//! - `revocation/check_*`: the revocation view with 1,000,000 revoked sessions, for a live
//!   session (miss) and a revoked one (hit).
//! - `authenticate/*`: the whole decision (`auth::authenticate`) against that view, from the
//!   token string, and from a request's headers (Bearer extraction included).
//!
//! - `jellyfin/extract_*`: Jellyfin credential extraction (every carrier collected and
//!   compared) from a real client's header, and from an `ApiKey` query.
//! - `jellyfin/check_token_1M`: a media token's keyed hash and view lookup, with 1,000,000
//!   revoked sessions and 100,000 bound media tokens in the view.
//!
//! Run with `cargo bench --bench auth`; each benchmark measures for 3 s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use portcullis::auth::token::{Keyring, SessionClaims};
use portcullis::auth::{self, AuthDecision};
use portcullis::mediaserver::carrier;
use portcullis::revocation::{MediaCheck, RevocationView};
use portcullis::store::{RevocationEvent, RevokedEntry, SessionId, Snapshot};

const REVOKED: usize = 1_000_000;
const NOW_S: i64 = 1_700_000_000;
const AUDIENCE: &str = "http://127.0.0.1:8080";

fn keyring() -> Keyring {
    Keyring::new(
        vec![("bench1".into(), vec![0x5a; 32])],
        "portcullis",
        AUDIENCE,
    )
    .expect("keyring")
}

fn claims(sid: SessionId) -> SessionClaims {
    SessionClaims {
        iss: "portcullis".into(),
        aud: AUDIENCE.into(),
        sub: "42".into(),
        name: "alice".into(),
        sid: sid.to_string(),
        iat: NOW_S,
        nbf: NOW_S,
        exp: NOW_S + 7 * 86_400,
        ims: NOW_S * 1000,
        amr: vec!["pwd".into()],
    }
}

/// A view holding `REVOKED` random revoked sessions, built the way the gateway builds it at
/// start (a store snapshot), plus one known revoked id, which is returned.
fn big_view() -> (RevocationView, SessionId) {
    let start = Instant::now();
    let far = (NOW_S + 30 * 86_400) * 1000;
    let mut revoked: Vec<RevokedEntry> = (0..REVOKED - 1)
        .map(|_| RevokedEntry::new(SessionId::random(), far))
        .collect();
    let known = SessionId::random();
    revoked.push(RevokedEntry::new(known, far));
    let view = RevocationView::new();
    view.load(
        Snapshot {
            seq: REVOKED as i64,
            revoked,
            user_cutoffs: vec![(7, NOW_S * 1000 - 5_000)],
            global_cutoff: Some(NOW_S * 1000 - 86_400_000),
            disabled_users: vec![9],
            retired_keys: Vec::new(),
            media_tokens: Vec::new(),
            groups: Vec::new(),
        },
        Instant::now(),
    );
    // One more through the event path, as a logout would add it.
    view.apply_local(&RevocationEvent::SessionRevoked {
        sid: SessionId::random(),
        user_id: 42,
        expires_ms: far,
    });
    assert_eq!(view.stats().revoked_sessions, REVOKED + 1);
    eprintln!(
        "built a revocation view of {} sessions in {:?}",
        REVOKED + 1,
        start.elapsed()
    );
    (view, known)
}

fn benches(c: &mut Criterion) {
    let ring = keyring();
    let live_sid = SessionId::random();
    let token = ring.issue(&claims(live_sid)).expect("issue");
    assert!(ring.verify(&token, NOW_S).is_ok());

    c.bench_function("token/verify", |b| {
        b.iter(|| ring.verify(black_box(&token), black_box(NOW_S)))
    });
    let fresh: Vec<String> = (0..200_000)
        .map(|_| ring.issue(&claims(SessionId::random())).expect("issue"))
        .collect();
    let mut next = 0;
    c.bench_function("token/verify_first_sight", |b| {
        b.iter(|| {
            next = (next + 1) % fresh.len();
            ring.verify(black_box(&fresh[next]), black_box(NOW_S))
        })
    });
    // One signature character changed, in the middle where every bit counts.
    let mut forged = token.clone().into_bytes();
    let i = forged.len() - 10;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).expect("ascii");
    assert!(ring.verify(&forged, NOW_S).is_err());
    c.bench_function("token/verify_bad_signature", |b| {
        b.iter(|| ring.verify(black_box(&forged), black_box(NOW_S)))
    });

    let (view, revoked_sid) = big_view();
    let issued_ms = NOW_S * 1000;
    assert!(view.check(live_sid, 42, issued_ms, "k1").is_ok());
    assert!(view.check(revoked_sid, 42, issued_ms, "k1").is_err());
    c.bench_function("revocation/check_live_1M", |b| {
        b.iter(|| {
            view.check(
                black_box(live_sid),
                black_box(42),
                black_box(issued_ms),
                black_box("k1"),
            )
        })
    });
    c.bench_function("revocation/check_revoked_1M", |b| {
        b.iter(|| {
            view.check(
                black_box(revoked_sid),
                black_box(42),
                black_box(issued_ms),
                black_box("k1"),
            )
        })
    });

    assert!(matches!(
        auth::authenticate(Some(&token), &ring, &view, NOW_S),
        AuthDecision::Allow(_)
    ));
    c.bench_function("authenticate/allow_1M", |b| {
        b.iter(|| auth::authenticate(Some(black_box(&token)), &ring, &view, black_box(NOW_S)))
    });
    let revoked_token = ring.issue(&claims(revoked_sid)).expect("issue");
    c.bench_function("authenticate/deny_revoked_1M", |b| {
        b.iter(|| {
            auth::authenticate(
                Some(black_box(&revoked_token)),
                &ring,
                &view,
                black_box(NOW_S),
            )
        })
    });

    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("host", "media.example.org"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("cookie", "theme=dark; lang=en"),
    ] {
        headers.insert(k, v.parse().expect("header"));
    }
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    c.bench_function("authenticate/from_headers_bearer_1M", |b| {
        b.iter(|| {
            let headers = black_box(&headers);
            auth::authenticate_headers(headers, "portcullis", &ring, &view, black_box(NOW_S))
        })
    });
    jellyfin_benches(c, &view);
}

fn jellyfin_benches(c: &mut Criterion, view: &RevocationView) {
    let mut headers = HeaderMap::new();
    headers.insert("host", "media.example.org".parse().expect("header"));
    headers.insert("accept", "application/json".parse().expect("header"));
    headers.insert(
        http::header::AUTHORIZATION,
        "MediaBrowser Client=\"Jellyfin%20Android\", Device=\"Pixel%207\", \
         DeviceId=\"c1f5a3e2b7d94c0e\", Version=\"2.6.1\", \
         Token=\"0123456789abcdef0123456789abcdef\""
            .parse()
            .expect("header"),
    );
    assert!(carrier::extract(&headers, None).unwrap().token.is_some());
    c.bench_function("jellyfin/extract_header", |b| {
        b.iter(|| carrier::extract(black_box(&headers), None))
    });
    let query =
        "Static=true&mediaSourceId=abc&deviceId=xyz&ApiKey=0123456789abcdef0123456789abcdef";
    let empty = HeaderMap::new();
    c.bench_function("jellyfin/extract_query", |b| {
        b.iter(|| carrier::extract(black_box(&empty), Some(black_box(query))))
    });

    // 100,000 bound media tokens; the keyed hash is HMAC-SHA256 as the gateway computes it.
    let key = [7u8; 32];
    let hash = |token: &str| -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("key");
        mac.update(b"portcullis-media-token:");
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    };
    for i in 0..100_000u32 {
        view.apply_local(&RevocationEvent::MediaBound {
            sid: SessionId::random(),
            user_id: i64::from(i % 1000) + 100,
            user_name: "user".into(),
            token_hash: hex::encode(hash(&format!("{i:032x}"))),
            issued_ms: NOW_S * 1000,
            expires_ms: (NOW_S + 86_400) * 1000,
        });
    }
    let token = format!("{:032x}", 77u32);
    assert!(matches!(
        view.check_media(&hash(&token), NOW_S * 1000),
        MediaCheck::Alive(_)
    ));
    c.bench_function("jellyfin/check_token_1M", |b| {
        b.iter(|| view.check_media(&hash(black_box(&token)), black_box(NOW_S * 1000)))
    });
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = auth_benches;
    config = config();
    targets = benches
}
criterion_main!(auth_benches);
