//! Every proxied request is authenticated in-process; denials never reach the upstream; the
//! upstream never sees gateway credentials or client-sent identity headers.

use portcullis::auth::token::{Keyring, SessionClaims, SESSION_TYP};

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .route_keys(r#"public_paths = ["/health", "/static/"]"#)
        .route_keys(r#"identity_header = "X-Portcullis-User""#)
        .start()
        .await;
    (up, gw)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims like the gateway's, for a user id and session id that exist.
fn claims_like(gw: &Gateway, real_token: &str) -> SessionClaims {
    use base64::Engine;
    let payload = real_token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let _ = gw;
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn valid_session_passes_and_upstream_sees_no_gateway_credentials() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .get(gw.url("/library/items?x=1"))
        .bearer_auth(&login.token)
        .header("Cookie", format!("portcullis={}; theme=dark", login.token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap(),
        "upstream ok: GET /library/items?x=1"
    );
    let seen = up.last().unwrap();
    assert_eq!(seen.path_and_query, "/library/items?x=1");
    assert!(seen.header("authorization").is_none(), "{seen:?}");
    assert_eq!(seen.header("cookie"), Some("theme=dark"));
    for (name, value) in &seen.headers {
        assert!(!value.contains(&login.token), "token leaked in {name}");
    }
    assert_eq!(seen.header("x-portcullis-user"), Some("alice"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert!(seen.header("x-request-id").is_some());
}

#[tokio::test]
async fn cookie_session_passes_like_bearer() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .get(gw.url("/web/index.html"))
        .header("Cookie", format!("portcullis={}", login.token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(up.last().unwrap().header("cookie").is_none());
}

#[tokio::test]
async fn bad_tokens_are_refused_and_never_reach_upstream() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    let (kid, secret) = gw.signing_key();
    let real = Keyring::new(vec![(kid.clone(), secret.clone())], "portcullis", &gw.base).unwrap();
    let base = claims_like(&gw, &login.token);

    let mut expired = base.clone();
    expired.iat = now() - 7200;
    expired.nbf = now() - 7200;
    expired.exp = now() - 3600;
    let mut wrong_aud = base.clone();
    wrong_aud.aud = "http://other.example".into();
    let mut wrong_iss = base.clone();
    wrong_iss.iss = "someone-else".into();
    let other_key =
        Keyring::new(vec![(kid.clone(), vec![7u8; 32])], "portcullis", &gw.base).unwrap();
    let unknown_kid = Keyring::new(
        vec![("zzzz".into(), secret.clone())],
        "portcullis",
        &gw.base,
    )
    .unwrap();

    let mut tampered = login.token.clone();
    // Flip one character of the signature.
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });

    use base64::Engine;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let payload = login.token.split('.').nth(1).unwrap();
    let alg_none = format!(
        "{}.{payload}.",
        b64(format!(r#"{{"alg":"none","typ":"{SESSION_TYP}","kid":"{kid}"}}"#).as_bytes())
    );
    // A correctly signed token with HS512 instead of the pinned HS256.
    let hs512 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512);
        h.typ = Some(SESSION_TYP.into());
        h.kid = Some(kid.clone());
        jsonwebtoken::encode(
            &h,
            &base,
            &jsonwebtoken::EncodingKey::from_secret(&secret).unwrap(),
        )
        .unwrap()
    };

    let cases = [
        ("expired", real.issue(&expired).unwrap()),
        ("wrong audience", real.issue(&wrong_aud).unwrap()),
        ("wrong issuer", real.issue(&wrong_iss).unwrap()),
        ("wrong key", other_key.issue(&base).unwrap()),
        ("unknown kid", unknown_kid.issue(&base).unwrap()),
        ("tampered", tampered),
        ("alg none", alg_none),
        ("hs512", hs512),
        ("garbage", "not.a.jwt".to_string()),
    ];
    let before = up.count();
    for (what, token) in cases {
        let resp = client()
            .get(gw.url("/secret"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{what} token was not refused");
        assert!(resp.headers().get("www-authenticate").is_some(), "{what}");
    }
    let resp = client().get(gw.url("/secret")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "missing token");
    assert_eq!(up.count(), before, "a refused request reached the upstream");
    // The real token still works: the refusals were about the tokens, not the gateway.
    assert_eq!(gw.get_status("/secret", &login.token).await, 200);

    let wanted: Vec<String> = [
        "expired",
        "wrong_audience",
        "wrong_issuer",
        "bad_signature",
        "unknown_key",
        "no_credentials",
    ]
    .iter()
    .map(|reason| format!(r#"decision="deny",reason="{reason}",route="media"}}"#))
    .collect();
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    gw.metrics_with(&wanted).await;
}

#[tokio::test]
async fn browser_navigation_is_sent_to_login_and_api_gets_401() {
    let (up, gw) = setup().await;
    let resp = client()
        .get(gw.url("/web/index.html?tab=1"))
        .header("Accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let location = resp.headers()["location"].to_str().unwrap();
    assert_eq!(
        location,
        "/_portcullis/login?rd=%2Fweb%2Findex%2Ehtml%3Ftab%3D1"
    );
    let resp = client()
        .get(gw.url("/Items"))
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer realm=\"portcullis\""
    );
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn public_paths_pass_without_session_on_segment_boundaries() {
    let (up, gw) = setup().await;
    let http = client();
    assert_eq!(
        http.get(gw.url("/health")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.get(gw.url("/static/app.js"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        http.get(gw.url("/healthz")).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        http.get(gw.url("/static")).send().await.unwrap().status(),
        401
    );
    let paths: Vec<String> = up
        .requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths, vec!["/health", "/static/app.js"]);
}

#[tokio::test]
async fn client_sent_identity_headers_never_reach_upstream() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    let mut req = client().get(gw.url("/x")).bearer_auth(&login.token);
    for (name, value) in [
        ("Remote-User", "admin"),
        ("Remote-Email", "admin@example.org"),
        ("Remote-Groups", "admins"),
        ("Remote-Name", "Admin"),
        ("X-Forwarded-User", "admin"),
        ("X-Forwarded-Email", "admin@example.org"),
        ("X-Auth-Request-User", "admin"),
        ("X-Auth-Request-Email", "admin@example.org"),
        ("X-Auth-Request-Groups", "admins"),
        ("X-Portcullis-User", "admin"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6"),
    ] {
        req = req.header(name, value);
    }
    assert_eq!(req.send().await.unwrap().status(), 200);
    let seen = up.last().unwrap();
    for (name, value) in &seen.headers {
        assert!(
            !value.contains("admin") && !value.contains("6.6.6.6") && !value.contains("evil"),
            "client-sent {name}: {value} reached the upstream"
        );
    }
    assert_eq!(seen.header("x-portcullis-user"), Some("alice"));
    assert_eq!(seen.header_all("x-portcullis-user").len(), 1);
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    // Underscore spellings, which some upstreams read as dashes, are refused outright.
    let before = up.count();
    for name in ["Remote_User", "X_Forwarded_User", "X_Auth_Request_User"] {
        let resp = client()
            .get(gw.url("/x"))
            .bearer_auth(&login.token)
            .header(name, "admin")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{name}");
    }
    assert_eq!(up.count(), before);
}

#[tokio::test]
async fn upstream_status_and_body_pass_through() {
    let (_up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .post(gw.url("/status/418"))
        .bearer_auth(&login.token)
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    let resp = client()
        .post(gw.url("/echo"))
        .bearer_auth(&login.token)
        .body("hello body")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(_up.last().unwrap().body, b"hello body");
}

#[tokio::test]
async fn a_burst_of_logins_does_not_stall_proxied_traffic() {
    let (_up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    // 40 concurrent password checks (wrong passwords: each costs a full argon2id hash).
    let burst_started = std::time::Instant::now();
    let burst: Vec<_> = (0..40)
        .map(|i| {
            let url = gw.url("/_portcullis/api/login");
            tokio::spawn(async move {
                client()
                    .post(url)
                    .json(
                        &serde_json::json!({"username": "alice", "password": format!("wrong-{i}")}),
                    )
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    let mut slowest = std::time::Duration::ZERO;
    let mut proxied = 0;
    while burst.iter().any(|h| !h.is_finished()) {
        let started = std::time::Instant::now();
        assert_eq!(gw.get_status("/during-burst", &login.token).await, 200);
        slowest = slowest.max(started.elapsed());
        proxied += 1;
    }
    let burst_took = burst_started.elapsed();
    for h in burst {
        assert_eq!(h.await.unwrap().unwrap(), 401);
    }
    eprintln!("burst {burst_took:?}, {proxied} proxied requests, slowest {slowest:?}");
    assert!(
        proxied >= 3,
        "the burst ended too fast to observe ({burst_took:?})"
    );
    // Were the hashes run on the (single) proxy thread, a proxied request would wait behind
    // most of the burst. The bound is relative: an absolute one only measures machine load.
    assert!(
        slowest < burst_took / 3,
        "a proxied request waited {slowest:?} during a {burst_took:?} login burst"
    );
}

/// An upstream connection idle in the keep-alive pool is closed after
/// `server.upstream_idle_timeout` (a burst's pooled connections would otherwise hold memory
/// until the media server closes them), and not before.
#[tokio::test]
async fn an_idle_pooled_upstream_connection_is_closed_after_upstream_idle_timeout() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that answers every request on a connection and reports, when a connection
    // that served `/pooled` is closed by the gateway, how long it had been idle.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let (mut buf, mut head, mut served) = (vec![0u8; 8192], Vec::new(), None);
                while let Ok(n @ 1..) = conn.read(&mut buf).await {
                    head.extend_from_slice(&buf[..n]);
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let pooled = head.starts_with(b"GET /pooled ");
                        head.clear();
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                        served = pooled.then(Instant::now);
                    }
                }
                if let Some(at) = served {
                    let _ = closed_tx.send(at.elapsed());
                }
            });
        }
    });
    let start = |server: &'static str| {
        Gateway::builder(&addr.to_string())
            .server_keys(server)
            .route_keys("public_paths = [\"/pooled\"]")
            .start()
    };
    let pooled = |gw: &Gateway| {
        let url = gw.url("/pooled");
        async move {
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.text().await.unwrap(), "ok");
        }
    };
    // The default (20 s) keeps the connection past 3 s.
    let default = start("").await;
    pooled(&default).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), closed.recv())
            .await
            .is_err(),
        "the pooled connection was closed within 3 s under the default timeout"
    );
    let short = start("upstream_idle_timeout = \"1s\"").await;
    pooled(&short).await;
    let idle = tokio::time::timeout(Duration::from_secs(5), closed.recv())
        .await
        .expect("the pooled connection closed within 5 s")
        .unwrap();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&idle),
        "closed after {idle:?} idle (upstream_idle_timeout 1s)"
    );
}
