//! WebSocket upgrades (checklist §3: ATK-60): no 101 without a live credential, on any path,
//! and none for a cookie sent from another site's page (cross-site WebSocket hijacking).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{status_of, Gateway};
use crate::jellyfin::{mb, setup as jellyfin_setup, token_of};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

/// Sends an upgrade request with `headers`; the status of the answer.
async fn upgrade(gw: &Gateway, path: &str, headers: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n",
        gw.port
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer within 5 s");
    status_of(&String::from_utf8_lossy(&out))
}

#[tokio::test]
async fn atk60_upgrades_need_a_live_session_and_a_same_site_page() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    let cookie = format!("Cookie: portcullis={token}\r\n");
    // (a) and (b): no credential, on the WebSocket path and on any other.
    assert_eq!(upgrade(&gw, "/ws", "").await, 401);
    assert_eq!(upgrade(&gw, "/foo/bar", "").await, 401);
    // (e) the browser's cookie, from another site's page.
    let evil = format!("{cookie}Origin: https://evil.test\r\n");
    assert_eq!(upgrade(&gw, "/ws", &evil).await, 403);
    let null = format!("{cookie}Origin: null\r\n");
    assert_eq!(upgrade(&gw, "/ws", &null).await, 403);
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    // The same cookie from the gateway's own origin, or a Bearer token (which no page can make
    // a browser attach), opens it.
    let own = format!("{cookie}Origin: {}\r\n", gw.base);
    assert_eq!(upgrade(&gw, "/ws", &own).await, 101);
    let bearer = format!("Authorization: Bearer {token}\r\nOrigin: https://evil.test\r\n");
    assert_eq!(upgrade(&gw, "/ws", &bearer).await, 101);
    gw.metrics_with(&["reason=\"cross_site_upgrade\",route=\"media\"} 2"])
        .await;
}

#[tokio::test]
async fn atk60_jellyfin_sockets_refuse_revoked_tokens_and_foreign_pages() {
    let (jf, gw) = jellyfin_setup("").await;
    let revoked = crate::atk_carriers::revoked_token(&gw, &jf).await;
    let live = token_of(&gw, "alice", "phone").await;
    let session = gw.login("alice", crate::jellyfin::PW).await.token;
    let before = jf.requests().len();
    // (c), (d): a revoked token in the query or the header.
    assert_eq!(
        upgrade(&gw, &format!("/socket?ApiKey={revoked}"), "").await,
        401
    );
    let header = format!("Authorization: {}\r\n", mb("old-tablet", Some(&revoked)));
    assert_eq!(upgrade(&gw, "/socket", &header).await, 401);
    // Jellyfin answers a socket on any path: none opens without a credential.
    assert_eq!(upgrade(&gw, "/anything/at/all", "").await, 401);
    // (e) the gateway cookie from another site's page.
    let evil = format!("Cookie: portcullis={session}\r\nOrigin: https://evil.test\r\n");
    assert_eq!(upgrade(&gw, "/socket", &evil).await, 403);
    assert_eq!(
        jf.requests().len(),
        before,
        "a refused upgrade reached Jellyfin"
    );
    // (f) a live token opens the socket.
    assert_eq!(
        upgrade(&gw, &format!("/socket?api_key={live}"), "").await,
        101
    );
}
