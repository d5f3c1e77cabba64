//! A real HTTP/1.1 upstream for integration tests that records every request it receives.
//!
//! Endpoints (matched on the path, ignoring the query string):
//! - `GET|HEAD …/bytes/{n}`: `n` streamed bytes, byte `i` being [`pattern_byte`]`(i)`, with
//!   single-range support (`bytes=a-b`, `bytes=a-`, `bytes=-n`).
//! - `GET …/ws` with a WebSocket upgrade: echoes text and binary messages until close.
//! - `…/status/{code}`: responds with that status and a short body.
//! - anything else, any method: `200 text/plain` `upstream ok: {METHOD} {path_and_query}`.
//!
//! The `…` means any prefix is accepted, so the endpoints still work behind a path prefix.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub(crate) type RespBody = BoxBody<Bytes, Infallible>;
type Log = Arc<Mutex<Vec<Recorded>>>;

/// Size of each chunk produced by the `/bytes` endpoint.
const CHUNK: usize = 64 * 1024;
/// The pattern repeats with this period (31 * 251 ≡ 0 mod 251).
const PERIOD: u64 = 251;

/// Deterministic content of the `/bytes` endpoint.
pub fn pattern_byte(i: u64) -> u8 {
    // ((i * 31 + 7) % 251), computed without overflow for any i.
    (((i % PERIOD) * 31 + 7) % PERIOD) as u8
}

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path_and_query: String,
    /// Lower-case names, duplicates kept. Order is hyper's `HeaderMap` order: names in order
    /// of first appearance, repeated values of one name grouped together in received order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// First value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of the header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A running upstream server. Dropping it stops accepting and closes its connections.
pub struct Upstream {
    pub addr: SocketAddr,
    log: Log,
    accept_task: JoinHandle<()>,
    // Dropping the sender tells every connection (and WebSocket) task to stop.
    _shutdown: watch::Sender<()>,
}

impl Upstream {
    /// Binds 127.0.0.1 on an ephemeral port and serves in a spawned task.
    pub async fn start() -> Upstream {
        let listener = match TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(l) => l,
            Err(e) => panic!("upstream: cannot bind 127.0.0.1:0: {e}"),
        };
        Upstream::start_on(listener)
    }

    /// Serves on a listener the test already holds (e.g. a port reserved before anything
    /// listened on it).
    pub fn start_on(listener: TcpListener) -> Upstream {
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("upstream: no local address: {e}"),
        };
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let accept_task = tokio::spawn(accept_loop(listener, log.clone(), shutdown_rx));
        Upstream {
            addr,
            log,
            accept_task,
            _shutdown: shutdown_tx,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.log).clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.log).len()
    }

    pub fn last(&self) -> Option<Recorded> {
        lock(&self.log).last().cloned()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Dropping the listener (owned by the task) stops accepting; the watch sender is
        // dropped right after, which closes open connections and WebSockets.
        self.accept_task.abort();
    }
}

fn lock(log: &Log) -> MutexGuard<'_, Vec<Recorded>> {
    // A panicking test thread must not hide the log from the others.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(listener: TcpListener, log: Log, shutdown: watch::Receiver<()>) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(conn) => conn,
            // Transient errors (e.g. too many open files): keep serving.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let log = log.clone();
        let mut conn_shutdown = shutdown.clone();
        let ws_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let log = log.clone();
                let ws_shutdown = ws_shutdown.clone();
                async move { Ok::<_, Infallible>(handle(req, log, ws_shutdown).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                // Connection errors (client hung up mid-body, …) are of no interest here.
                _ = conn => {}
                // Upstream dropped: drop the connection, closing the socket.
                _ = conn_shutdown.changed() => {}
            }
        });
    }
}

async fn handle(
    mut req: Request<Incoming>,
    log: Log,
    shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    let last2 = match segments.as_slice() {
        [.., a, b] => Some((*a, *b)),
        _ => None,
    };
    let is_ws = segments.last() == Some(&"ws");
    let on_upgrade = is_ws.then(|| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let recorded = Recorded {
        method: parts.method.as_str().to_owned(),
        path_and_query: path_and_query.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    };
    lock(&log).push(recorded);

    if let Some(on_upgrade) = on_upgrade {
        return websocket(&parts, on_upgrade, shutdown);
    }
    match last2 {
        Some(("bytes", n)) if parts.method == Method::GET || parts.method == Method::HEAD => {
            if let Ok(n) = n.parse::<u64>() {
                return bytes_endpoint(&parts, n);
            }
        }
        Some(("status", code)) => {
            return status_endpoint(code);
        }
        _ => {}
    }
    let text = format!("upstream ok: {} {}", parts.method, path_and_query);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(text))
        .unwrap_or_else(|_| internal_error())
}

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed()
}

fn empty() -> RespBody {
    Empty::new().boxed()
}

fn simple(status: StatusCode, text: &str) -> Response<RespBody> {
    let mut resp = Response::new(full(text.to_owned()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn internal_error() -> Response<RespBody> {
    simple(
        StatusCode::INTERNAL_SERVER_ERROR,
        "upstream: cannot build response",
    )
}

// ---------------------------------------------------------------- /status/{code}

fn status_endpoint(code: &str) -> Response<RespBody> {
    let status = match code.parse::<u16>().ok().map(StatusCode::from_u16) {
        // 1xx cannot be a final HTTP/1.1 response.
        Some(Ok(s)) if !s.is_informational() => s,
        _ => return simple(StatusCode::BAD_REQUEST, "upstream: bad status code"),
    };
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        return resp;
    }
    simple(status, &format!("status {}", status.as_u16()))
}

// ---------------------------------------------------------------- /bytes/{n}

/// Bytes of the pattern starting at phase 0, long enough that any chunk can be sliced from it.
fn pattern_table() -> &'static Bytes {
    static TABLE: OnceLock<Bytes> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..(PERIOD as usize + CHUNK) as u64)
            .map(pattern_byte)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// Streams pattern bytes `[pos, end)` in chunks of at most [`CHUNK`], without copying.
pub(crate) struct PatternBody {
    pos: u64,
    end: u64,
}

impl PatternBody {
    /// Pattern bytes `[pos, end)`.
    pub(crate) fn new(pos: u64, end: u64) -> PatternBody {
        PatternBody { pos, end }
    }
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.pos >= this.end {
            return Poll::Ready(None);
        }
        let len = (this.end - this.pos).min(CHUNK as u64) as usize;
        let phase = (this.pos % PERIOD) as usize;
        let chunk = pattern_table().slice(phase..phase + len);
        this.pos += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end.saturating_sub(self.pos))
    }
}

pub(crate) enum RangeReq {
    /// No usable Range header: send everything.
    Full,
    /// Inclusive byte range.
    Partial(u64, u64),
    Unsatisfiable,
}

/// Single `bytes=` ranges only; anything malformed or multi-range is ignored (→ `Full`).
pub(crate) fn parse_range(value: Option<&HeaderValue>, len: u64) -> RangeReq {
    let Some(spec) = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return RangeReq::Full;
    };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeReq::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match (first.is_empty(), last.is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => {
            let Some(n) = last.parse::<u64>().ok().filter(|_| digits(last)) else {
                return RangeReq::Full;
            };
            if n == 0 || len == 0 {
                RangeReq::Unsatisfiable
            } else {
                RangeReq::Partial(len - n.min(len), len - 1)
            }
        }
        // bytes=a- or bytes=a-b
        (false, _) => {
            let Some(a) = first.parse::<u64>().ok().filter(|_| digits(first)) else {
                return RangeReq::Full;
            };
            let b = if last.is_empty() {
                None
            } else {
                match last.parse::<u64>().ok().filter(|_| digits(last)) {
                    Some(b) if b >= a => Some(b),
                    _ => return RangeReq::Full,
                }
            };
            if a >= len {
                RangeReq::Unsatisfiable
            } else {
                let end = b.map_or(len - 1, |b| b.min(len - 1));
                RangeReq::Partial(a, end)
            }
        }
        (true, true) => RangeReq::Full,
    }
}

fn bytes_endpoint(parts: &http::request::Parts, len: u64) -> Response<RespBody> {
    let (status, start, end_inclusive) = match parse_range(parts.headers.get(header::RANGE), len) {
        RangeReq::Full => (StatusCode::OK, 0, None),
        RangeReq::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, Some(b)),
        RangeReq::Unsatisfiable => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .header(header::ACCEPT_RANGES, "bytes")
                .body(empty())
                .unwrap_or_else(|_| internal_error());
        }
    };
    let end = end_inclusive.map_or(len, |b| b + 1);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start);
    if let Some(b) = end_inclusive {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{b}/{len}"));
    }
    let body = if parts.method == Method::HEAD {
        empty()
    } else {
        PatternBody { pos: start, end }.boxed()
    };
    builder.body(body).unwrap_or_else(|_| internal_error())
}

// ---------------------------------------------------------------- …/ws

fn header_has_token(parts: &http::request::Parts, name: header::HeaderName, token: &str) -> bool {
    parts.headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn websocket(
    parts: &http::request::Parts,
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let key = parts.headers.get(header::SEC_WEBSOCKET_KEY);
    let is_upgrade = parts.method == Method::GET
        && header_has_token(parts, header::CONNECTION, "upgrade")
        && header_has_token(parts, header::UPGRADE, "websocket");
    let Some(key) = key.filter(|_| is_upgrade) else {
        return simple(
            StatusCode::BAD_REQUEST,
            "upstream: expected a WebSocket upgrade",
        );
    };
    let accept = derive_accept_key(key.as_bytes());

    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            let msg = tokio::select! {
                msg = ws.next() => msg,
                _ = shutdown.changed() => return,
            };
            match msg {
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    if ws.send(msg).await.is_err() {
                        return;
                    }
                }
                // Pings are answered and closes acknowledged by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });

    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(empty())
        .unwrap_or_else(|_| internal_error())
}

// ---------------------------------------------------------------- self-tests

mod self_tests {
    use super::*;
    use sha2::{Digest, Sha256};

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn client() -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder().no_proxy().build()
    }

    fn expected(range: std::ops::Range<u64>) -> Vec<u8> {
        range.map(pattern_byte).collect()
    }

    #[tokio::test]
    async fn plain_request_is_recorded() -> TestResult {
        let up = Upstream::start().await;
        assert_eq!(up.url(), format!("http://127.0.0.1:{}", up.addr.port()));
        assert_eq!(up.count(), 0);
        assert!(up.last().is_none());

        let resp = client()?
            .post(format!("{}/some/path?x=1&y=two", up.url()))
            .header("X-Test", "hello")
            .header("x-dup", "one")
            .header("X-Dup", "two")
            .body("request body")
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"text/plain"[..])
        );
        assert_eq!(resp.text().await?, "upstream ok: POST /some/path?x=1&y=two");

        assert_eq!(up.count(), 1);
        let rec = up.last().ok_or("nothing recorded")?;
        assert_eq!(rec.method, "POST");
        assert_eq!(rec.path_and_query, "/some/path?x=1&y=two");
        assert_eq!(rec.body, b"request body");
        assert_eq!(rec.header("x-test"), Some("hello"));
        assert_eq!(rec.header("X-TEST"), Some("hello"));
        assert_eq!(rec.header_all("x-dup"), vec!["one", "two"]);
        assert_eq!(rec.header("content-length"), Some("12"));
        assert_eq!(rec.header("absent"), None);
        assert!(rec
            .headers
            .iter()
            .all(|(n, _)| *n == n.to_ascii_lowercase()));

        // A second request over the same keep-alive client is appended in order.
        let resp = client()?
            .get(format!("{}/status/418", up.url()))
            .send()
            .await?;
        assert_eq!(resp.status(), 418);
        assert_eq!(resp.text().await?, "status 418");
        let all = up.requests();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].path_and_query, "/some/path?x=1&y=two");
        assert_eq!(all[1].method, "GET");
        assert_eq!(all[1].path_and_query, "/status/418");
        assert!(all[1].body.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn bytes_ranges() -> TestResult {
        let up = Upstream::start().await;
        let c = client()?;
        let url = format!("{}/bytes/1000", up.url());

        let resp = c.get(&url).header("Range", "bytes=10-19").send().await?;
        assert_eq!(resp.status(), 206);
        let h = |r: &reqwest::Response, n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(
            h(&resp, "content-range").as_deref(),
            Some("bytes 10-19/1000")
        );
        assert_eq!(h(&resp, "content-length").as_deref(), Some("10"));
        assert_eq!(h(&resp, "accept-ranges").as_deref(), Some("bytes"));
        assert_eq!(resp.bytes().await?.as_ref(), expected(10..20).as_slice());
        let rec = up.last().ok_or("nothing recorded")?;
        assert_eq!(rec.header("range"), Some("bytes=10-19"));
        assert!(rec.body.is_empty());

        // Suffix and open-ended ranges, and a range running past the end.
        for (range, start, end) in [
            ("bytes=-5", 995u64, 1000u64),
            ("bytes=990-", 990, 1000),
            ("bytes=998-5000", 998, 1000),
            ("bytes=-5000", 0, 1000),
        ] {
            let resp = c.get(&url).header("Range", range).send().await?;
            assert_eq!(resp.status(), 206, "{range}");
            let want = format!("bytes {}-{}/1000", start, end - 1);
            assert_eq!(h(&resp, "content-range").as_deref(), Some(want.as_str()));
            assert_eq!(
                resp.bytes().await?.as_ref(),
                expected(start..end).as_slice()
            );
        }

        // Unsatisfiable.
        for range in ["bytes=1000-", "bytes=-0"] {
            let resp = c.get(&url).header("Range", range).send().await?;
            assert_eq!(resp.status(), 416, "{range}");
            assert_eq!(h(&resp, "content-range").as_deref(), Some("bytes */1000"));
        }

        // Malformed or multi-range: full 200.
        for range in ["bytes=0-1,5-6", "bytes=5-2", "items=0-1", "bytes=x-"] {
            let resp = c.get(&url).header("Range", range).send().await?;
            assert_eq!(resp.status(), 200, "{range}");
            assert_eq!(h(&resp, "content-range"), None);
            assert_eq!(resp.bytes().await?.as_ref(), expected(0..1000).as_slice());
        }

        // HEAD: headers only.
        let resp = c.head(&url).send().await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(h(&resp, "content-length").as_deref(), Some("1000"));
        assert_eq!(
            h(&resp, "content-type").as_deref(),
            Some("application/octet-stream")
        );
        assert!(resp.bytes().await?.is_empty());
        assert_eq!(up.last().ok_or("nothing recorded")?.method, "HEAD");
        Ok(())
    }

    #[tokio::test]
    async fn bytes_large_body_streams_the_pattern() -> TestResult {
        let up = Upstream::start().await;
        let n: u64 = 5 * 1024 * 1024 + 3;
        let resp = client()?
            .get(format!("{}/bytes/{n}", up.url()))
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.content_length(), Some(n));

        let mut got = Sha256::new();
        let mut total = 0u64;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            total += chunk.len() as u64;
            got.update(&chunk);
        }
        assert_eq!(total, n);

        let mut want = Sha256::new();
        want.update(expected(0..n));
        assert_eq!(hex::encode(got.finalize()), hex::encode(want.finalize()));
        Ok(())
    }

    #[tokio::test]
    async fn websocket_echo() -> TestResult {
        let up = Upstream::start().await;
        let url = format!("ws://{}/prefix/ws?token=abc", up.addr);
        let (mut ws, resp) = tokio_tungstenite::connect_async(url).await?;
        assert_eq!(resp.status(), 101);

        let timeout = std::time::Duration::from_secs(10);
        ws.send(Message::Text("hello".into())).await?;
        match tokio::time::timeout(timeout, ws.next()).await? {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "hello"),
            other => panic!("expected text echo, got {other:?}"),
        }
        ws.send(Message::Binary(vec![0, 1, 2, 255])).await?;
        match tokio::time::timeout(timeout, ws.next()).await? {
            Some(Ok(Message::Binary(b))) => assert_eq!(b.as_slice(), &[0, 1, 2, 255]),
            other => panic!("expected binary echo, got {other:?}"),
        }
        ws.close(None).await?;
        // Server acknowledges the close; the stream then ends.
        while let Some(msg) = tokio::time::timeout(timeout, ws.next()).await? {
            match msg {
                Ok(Message::Close(_)) => {}
                Ok(other) => panic!("unexpected message after close: {other:?}"),
                Err(_) => break,
            }
        }

        let rec = up.last().ok_or("nothing recorded")?;
        assert_eq!(rec.path_and_query, "/prefix/ws?token=abc");
        assert_eq!(rec.header("upgrade"), Some("websocket"));
        assert!(rec.header("sec-websocket-key").is_some());

        // Without upgrade headers: 400.
        let resp = client()?.get(format!("{}/ws", up.url())).send().await?;
        assert_eq!(resp.status(), 400);
        assert_eq!(up.count(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn drop_stops_accepting() -> TestResult {
        let up = Upstream::start().await;
        let addr = up.addr;
        let resp = client()?.get(format!("{}/", up.url())).send().await?;
        assert_eq!(resp.text().await?, "upstream ok: GET /");
        drop(up);
        // The accept task is aborted asynchronously: poll until connections are refused.
        let refused = crate::harness::poll_until(std::time::Duration::from_secs(1), || async {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await;
        assert!(refused, "upstream still accepting after drop");
        Ok(())
    }
}
