//! Malformed requests get a precise 4xx before routing and never reach the upstream. Raw
//! sockets are used where a client library would normalise the attack away.

use crate::harness::{client, raw_request, status_of, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

#[tokio::test]
async fn path_tricks_get_400_before_routing_and_never_reach_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .route_keys(r#"public_paths = ["/public/"]"#)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    let addr = format!("127.0.0.1:{}", gw.port);
    let paths = [
        "/public/../secret",
        "/public/./x",
        "/public/%2e%2e/secret",
        "/public/%2E%2E/secret",
        "/public/.%2e/secret",
        "/public%2fsecret",
        "/public%2F..%2Fsecret",
        "/public/%5c../secret",
        "/public/%5C",
        "/public\\..\\secret",
        "/public/%00",
        "/public/%zz",
        "/public/%4",
        "/public/%ff%fe",
        "/public//secret",
    ];
    for path in paths {
        for auth in [None, Some(&token)] {
            let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
            if let Some(t) = auth {
                req.push_str(&format!("Authorization: Bearer {t}\r\n"));
            }
            req.push_str("Connection: close\r\n\r\n");
            let resp = raw_request(&addr, req.as_bytes()).await;
            assert_eq!(
                status_of(&resp),
                400,
                "{path} (auth: {}) got: {resp}",
                auth.is_some()
            );
        }
    }
    assert_eq!(
        up.count(),
        0,
        "a malformed path reached the upstream: {:?}",
        up.requests()
    );
    // The gateway is still serving.
    assert_eq!(gw.get_status("/public/ok", &token).await, 200);
}

#[tokio::test]
async fn raw_nul_in_the_request_line_is_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).start().await;
    let addr = format!("127.0.0.1:{}", gw.port);
    let resp = raw_request(
        &addr,
        b"GET /a\x00b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let status = status_of(&resp);
    assert!(status == 400 || resp.is_empty(), "got {resp:?}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn oversize_headers_get_431() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    let resp = client()
        .get(gw.url("/x"))
        .bearer_auth(&token)
        .header("X-Filler", "a".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn oversize_login_body_gets_413() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).start().await;
    let resp = client()
        .post(gw.url("/_portcullis/api/login"))
        .header("Content-Type", "application/json")
        .body(format!(
            r#"{{"username":"a","password":"{}"}}"#,
            "x".repeat(100 * 1024)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn malformed_login_json_gets_a_4xx_not_a_crash() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).start().await;
    for (ctype, body) in [
        ("application/json", "{not json"),
        ("application/json", r#"{"username": 5}"#),
        ("text/plain", r#"{"username":"a","password":"b"}"#),
    ] {
        let resp = client()
            .post(gw.url("/_portcullis/api/login"))
            .header("Content-Type", ctype)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        assert!((400..500).contains(&status), "{ctype} {body}: {status}");
    }
    // Still alive.
    let health = client()
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn unknown_gateway_page_is_404_and_not_proxied() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).start().await;
    let resp = client()
        .get(gw.url("/_portcullis/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(up.count(), 0);
}
