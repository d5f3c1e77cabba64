//! Oversized heads and HTTP/2 (checklist §3: ATK-13, ATK-59). Heads past the cap are refused
//! before any token work and never reach the upstream; HTTP/2 is not spoken in cleartext. Over
//! TLS it is, and its abuse cases (rapid reset, CONTINUATION floods, `:authority` against
//! `Host`) are in `http2.rs`.

use crate::harness::{raw_request, status_of, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

#[tokio::test]
async fn atk13_oversized_heads_are_refused_before_auth_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    let head = |extra: &str, target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n").into_bytes()
    };
    // (a) a 64 KiB Cookie header ending in a valid session cookie.
    let mut cookie = String::from("Cookie: ");
    for i in 0..4000 {
        cookie.push_str(&format!("c{i}=xxxxxxxxxxx; "));
    }
    cookie.push_str(&format!("portcullis={token}\r\n"));
    // (b) one 100 KiB header.
    let big = format!("X-Pad: {}\r\n", "A".repeat(100 * 1024));
    // (c) 500 headers of 10 bytes.
    let many: String = (0..500).map(|i| format!("X-{i:03}: 1\r\n")).collect();
    // (d) a 64 KiB query string.
    let long_target = format!("/Items?x={}", "a".repeat(64 * 1024));
    // (e) a 5,000-byte cookie value (not a token the gateway could have issued).
    let fat = format!("Cookie: portcullis={}\r\n", "e".repeat(5000));
    let cases: [(&str, Vec<u8>, &[u16]); 5] = [
        ("(a) 64 KiB cookie", head(&cookie, "/x"), &[431]),
        ("(b) 100 KiB header", head(&big, "/x"), &[431]),
        // Pingora refuses more than 256 headers itself, as a malformed head.
        ("(c) 500 headers", head(&many, "/x"), &[400, 431]),
        ("(d) 64 KiB query", head("", &long_target), &[400, 414, 431]),
        ("(e) 5,000-byte cookie value", head(&fat, "/x"), &[401]),
    ];
    for (name, bytes, allowed) in cases {
        let resp = raw_request(&format!("127.0.0.1:{}", gw.port), &bytes).await;
        let status = status_of(&resp);
        assert!(allowed.contains(&status), "{name}: {status}\n{resp:.300}");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    // The gateway is still healthy and serving.
    assert_eq!(gw.get_status("/after", &token).await, 200);
}

#[tokio::test]
async fn atk59_http2_is_not_spoken_in_cleartext() {
    let up = Upstream::start().await;
    // Cleartext: the HTTP/2 connection preface is not a request (no h2c, prior knowledge or
    // upgrade; HTTP/2 is served over TLS only, tested in http2.rs).
    let gw = Gateway::builder(&up.url()).start().await;
    let resp = raw_request(
        &format!("127.0.0.1:{}", gw.port),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    )
    .await;
    assert!(
        resp.is_empty() || status_of(&resp) >= 400,
        "the h2 preface got {resp:?}"
    );
    assert!(!resp.contains("HTTP/2"), "{resp}");
    assert_eq!(up.count(), 0, "{:?}", up.requests());
}
