//! The strict HTTP/1 front door, with raw bytes where a client library would normalise the
//! attack away: request smuggling (CL.TE, TE.CL, duplicate or malformed lengths, odd transfer
//! codings), bare LF and obs-fold, control bytes, Host confusion, h2c upgrades and underscored
//! identity headers. Each is refused with 400 and the connection closed; nothing reaches the
//! upstream, and a request hidden behind the first is never served.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{status_of, Gateway};
use crate::upstream::Upstream;

/// Sends raw bytes; returns everything read and whether the gateway closed the connection
/// (rather than the 5 s read deadline passing).
async fn exchange(addr: &str, bytes: &[u8]) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

async fn setup() -> (Upstream, Gateway, String) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .route_keys("public_paths = [\"/pub\"]")
        .start()
        .await;
    let addr = format!("127.0.0.1:{}", gw.port);
    (up, gw, addr)
}

/// Sends each case and insists on 400, `Connection: close`, a closed connection, exactly one
/// response (no smuggled second one) and nothing upstream.
async fn refused(cases: &[(&str, &[u8])]) {
    let (up, gw, addr) = setup().await;
    for (name, bytes) in cases {
        let start = Instant::now();
        let (resp, closed) = exchange(&addr, bytes).await;
        assert_eq!(status_of(&resp), 400, "{name}: {resp}");
        assert!(
            resp.to_ascii_lowercase().contains("connection: close"),
            "{name}: {resp}"
        );
        assert!(closed, "{name}: the connection stayed open");
        assert!(start.elapsed() < Duration::from_secs(4), "{name}");
        assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{name}: {resp}");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    gw.metrics_with(&["reason=\"bad_framing\""]).await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_the_connection_closed() {
    refused(&[
        (
            "CL.TE",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nContent-Length: 46\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /Users/Me HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "TE.CL",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n3f\r\nGET /Users/Me HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\nx=\r\n0\r\n\r\n",
        ),
        (
            "two Content-Length",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "Content-Length list",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nabcde",
        ),
        (
            "signed Content-Length",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde",
        ),
        (
            "Transfer-Encoding list",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding twice",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding identity",
            b"POST /pub HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /pub HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
    ])
    .await;
}

#[tokio::test]
async fn malformed_heads_are_refused_and_the_connection_closed() {
    let (up, gw, addr) = setup().await;
    let cases: [(&str, &[u8]); 9] = [
        ("bare LF", b"GET /pub HTTP/1.1\nHost: x\n\n"),
        (
            "obs-fold",
            b"GET /pub HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
        ),
        ("NUL", b"GET /pub HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
        ("no Host", b"GET /pub HTTP/1.1\r\n\r\n"),
        ("two Host", b"GET /pub HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        (
            "absolute-form, other authority",
            b"GET http://evil.example/pub HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "h2c upgrade",
            b"GET /pub HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        ),
        (
            "underscored identity header",
            b"GET /pub HTTP/1.1\r\nHost: x\r\nRemote_User: admin\r\n\r\n",
        ),
        (
            "underscored forwarding header",
            b"GET /pub HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 10.0.0.1\r\n\r\n",
        ),
    ];
    for (name, bytes) in cases {
        let (resp, closed) = exchange(&addr, bytes).await;
        assert_eq!(status_of(&resp), 400, "{name}: {resp}");
        assert!(closed, "{name}: the connection stayed open");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    gw.metrics_with(&["reason=\"bad_head\"", "reason=\"upgrade_refused\""])
        .await;
}

#[tokio::test]
async fn well_formed_requests_still_pass_on_one_connection() {
    let (up, _gw, addr) = setup().await;
    // A chunked body, then a Content-Length one, then a plain GET, one after the other on one
    // kept-alive connection.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let requests: [&[u8]; 3] = [
        b"POST /pub HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST /pub HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\ndef",
        b"GET /pub HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for (i, request) in requests.iter().enumerate() {
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Each answer is "upstream ok: …" with a Content-Length: read until it is all here.
        while !crate::harness::response_complete(&out) {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "request {i}: the connection closed");
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            status_of(&String::from_utf8_lossy(&out)),
            200,
            "request {i}"
        );
    }
    let bodies: Vec<Vec<u8>> = up.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, vec![b"abc".to_vec(), b"def".to_vec(), Vec::new()]);
}
