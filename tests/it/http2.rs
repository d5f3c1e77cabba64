//! HTTP/2 to clients over TLS (ALPN `h2`, then `http/1.1`): a real client (`curl --http2`;
//! Chromium in `browser.rs`) for pages, logins, proxied requests and a large download sharing one
//! connection; the same front-door checks as on HTTP/1.1 (head size, `:authority` against
//! `Host`, header names, paths) through the `h2` crate; what HTTP/2 adds for an attacker (rapid
//! reset, CONTINUATION floods) with hand-made frames; and WebSockets, which stay on HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;

use crate::harness::Gateway;
use crate::upstream::{pattern_byte, Upstream};

const PW: &str = "alice-h2-password-2026";
/// The head limit of these gateways (`server.max_header_bytes`).
const MAX_HEAD: usize = 8192;

struct Tls {
    dir: tempfile::TempDir,
    ca: PathBuf,
    gw: Gateway,
}

/// A gateway with TLS on its public listener (a certificate for `localhost` from a test CA).
async fn start(up: &Upstream) -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .tls(dir.path())
        .server_keys(&format!(
            "public_url = \"https://localhost:{{port}}\"\nmax_header_bytes = {MAX_HEAD}"
        ))
        .start()
        .await;
    let ca = dir.path().join("ca.pem");
    Tls { dir, ca, gw }
}

impl Tls {
    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.gw.port)
    }

    /// A reqwest client over TLS (HTTP/1.1: the crate is built without HTTP/2 here).
    fn https(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap(),
            )
            .resolve(
                "localhost",
                format!("127.0.0.1:{}", self.gw.port).parse().unwrap(),
            )
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// Alice's bearer token, from a login over TLS.
    async fn token(&self) -> String {
        let resp = self
            .https()
            .post(self.url("/_portcullis/api/login"))
            .json(&serde_json::json!({"username": "alice", "password": PW}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<serde_json::Value>().await.unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A TLS connection to the public listener offering `alpn`, and the protocol chosen.
    async fn connect(&self, alpn: &[&[u8]]) -> (TlsStream<tokio::net::TcpStream>, Option<Vec<u8>>) {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(&self.ca).unwrap();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.gw.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        (tls, alpn)
    }

    /// An `h2` client connection (ALPN `h2`, `http/1.1` offered; `h2` must be chosen).
    async fn h2(&self) -> h2::client::SendRequest<bytes::Bytes> {
        let (tls, alpn) = self.connect(&[b"h2", b"http/1.1"]).await;
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN did not choose h2");
        let (send, conn) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send
    }

    /// Runs curl with HTTP/2 against this gateway; `args` after the common ones. (Async: the
    /// upstream runs on this test's runtime.)
    async fn curl(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--http2", "--cacert"])
            .arg(&self.ca)
            .args([
                "--resolve",
                &format!("localhost:{}:127.0.0.1", self.gw.port),
            ])
            .args(args)
            .output()
            .await
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// Sends a request on an `h2` connection and returns the response status (or the stream error).
async fn h2_status(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> Result<u16, h2::Error> {
    let mut ready = send.clone().ready().await?;
    let (resp, _) = ready.send_request(req, true)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(status)
}

fn file_matches_pattern(path: &Path, len: u64) -> bool {
    let data = std::fs::read(path).unwrap();
    data.len() as u64 == len
        && data
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64))
}

#[tokio::test]
async fn curl_speaks_http2_for_logins_pages_proxied_requests_and_a_large_download_on_one_connection(
) {
    let up = Upstream::start().await;
    let tls = start(&up).await;
    let dir = tls.dir.path();

    // A login over HTTP/2 (the JSON API).
    let body = dir.join("login.json");
    let out = tls
        .curl(&[
            "-o",
            body.to_str().unwrap(),
            "-w",
            "%{http_version} %{http_code}",
            "-H",
            "Content-Type: application/json",
            "--data",
            &format!(r#"{{"username":"alice","password":"{PW}"}}"#),
            &tls.url("/_portcullis/api/login"),
        ])
        .await;
    assert_eq!(out, "2 200");
    let login: serde_json::Value = serde_json::from_slice(&std::fs::read(&body).unwrap()).unwrap();
    let token = login["token"].as_str().unwrap().to_string();

    // The login page, a proxied request and a 64 MiB download, in parallel on one connection.
    const BIG: u64 = 64 << 20;
    let (page, small, big) = (dir.join("page"), dir.join("small"), dir.join("big"));
    let out = tls
        .curl(&[
            "-Z",
            "-w",
            "%{http_version} %{http_code} %{num_connects} %{size_download} %{url}\n",
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-o",
            big.to_str().unwrap(),
            &tls.url(&format!("/bytes/{BIG}")),
            "-o",
            small.to_str().unwrap(),
            &tls.url("/h2/proxied?q=1"),
            "-o",
            page.to_str().unwrap(),
            &tls.url("/_portcullis/login"),
        ])
        .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let mut connects = 0;
    for line in &lines {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!((f[0], f[1]), ("2", "200"), "{line}");
        connects += f[2].parse::<u32>().unwrap();
    }
    assert_eq!(connects, 1, "three transfers on one connection: {out}");
    assert!(file_matches_pattern(&big, BIG), "the download differs");
    assert_eq!(
        std::fs::read_to_string(&small).unwrap(),
        "upstream ok: GET /h2/proxied?q=1"
    );
    assert!(std::fs::read_to_string(&page).unwrap().contains("Sign in"));

    // The upstream got HTTP/1.1 with Host from :authority and without the credential.
    let seen = up
        .requests()
        .into_iter()
        .find(|r| r.path_and_query == "/h2/proxied?q=1")
        .expect("the proxied request");
    assert_eq!(
        seen.header("host"),
        Some(format!("localhost:{}", tls.gw.port).as_str())
    );
    assert!(seen.header("authorization").is_none());
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));

    // No credential: 401 for an API client, the login page for a browser navigation.
    let out = tls
        .curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            &tls.url("/x"),
        ])
        .await;
    assert_eq!(out, "2 401");
    let out = tls
        .curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %{redirect_url}",
            "-H",
            "Accept: text/html",
            "-H",
            "Sec-Fetch-Mode: navigate",
            &tls.url("/x"),
        ])
        .await;
    assert!(out.starts_with("2 302 "), "{out}");
    assert!(out.contains("/_portcullis/login"), "{out}");
    // The requests are counted like HTTP/1.1 ones.
    let allowed =
        r#"portcullis_requests_total{decision="allow",reason="valid_session",route="media"}"#;
    assert_eq!(tls.gw.metric(allowed).await, 2.0);
    let denied =
        r#"portcullis_requests_total{decision="deny",reason="no_credentials",route="media"}"#;
    assert_eq!(tls.gw.metric(denied).await, 2.0);
}

#[tokio::test]
async fn http2_requests_meet_the_same_front_door_checks_as_http11() {
    let up = Upstream::start().await;
    let tls = start(&up).await;
    let token = tls.token().await;
    let authority = format!("localhost:{}", tls.gw.port);
    let mut send = tls.h2().await;
    // A GET of `path` with the token and `headers`.
    let req = |path: &str, headers: &[(&str, &str)]| {
        let mut builder = http::Request::builder()
            .uri(format!("https://{authority}{path}"))
            .header("authorization", format!("Bearer {token}"));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    };

    assert_eq!(h2_status(&mut send, req("/ok", &[])).await.unwrap(), 200);
    assert_eq!(up.count(), 1);

    // A head over max_header_bytes: 431, as on HTTP/1.1.
    let big = "b".repeat(MAX_HEAD + 100);
    let status = h2_status(&mut send, req("/big", &[("x-big", &big)])).await;
    assert_eq!(status.unwrap(), 431);
    // Host naming another authority than :authority (RFC 9113 §8.3.1).
    let status = h2_status(&mut send, req("/host", &[("host", "other.example")])).await;
    assert_eq!(status.unwrap(), 400);
    // `_` in an identity-like header name; a path that climbs out of its root.
    let status = h2_status(&mut send, req("/names", &[("x_remote_user", "admin")])).await;
    assert_eq!(status.unwrap(), 400);
    let status = h2_status(&mut send, req("/a/%2e%2e/%2e%2e/etc", &[])).await;
    assert_eq!(status.unwrap(), 400);
    assert_eq!(up.count(), 1, "{:?}", up.requests());

    // Identity headers from the client are stripped, as on HTTP/1.1; the connection still serves.
    let status = h2_status(&mut send, req("/strip", &[("remote-user", "admin")])).await;
    assert_eq!(status.unwrap(), 200);
    let last = up.last().unwrap();
    assert_eq!(last.path_and_query, "/strip");
    assert_ne!(last.header("remote-user"), Some("admin"));
    // A head far beyond the limit ends the connection in the HTTP/2 layer, not the gateway.
    let huge = "h".repeat(MAX_HEAD * 3);
    let gone = h2_status(&mut send, req("/huge", &[("x-huge", &huge)])).await;
    assert!(
        gone.is_err() || gone.as_ref().is_ok_and(|s| *s == 431),
        "{gone:?}"
    );
    assert_eq!(up.count(), 2);
    let mut again = tls.h2().await;
    assert_eq!(
        h2_status(&mut again, req("/after", &[])).await.unwrap(),
        200
    );
    // Each refusal counted with its reason, as on HTTP/1.1.
    let metrics = tls.gw.metrics_text().await;
    let count = |reason: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("portcullis_requests_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert!(count("headers_too_large") >= 1.0, "{metrics}");
    assert_eq!(count("bad_path"), 1.0);
    // The `_` name; Host against :authority is refused by pingora's HTTP/2 layer itself, before
    // the gateway sees the request (so without a reason label).
    assert_eq!(count("bad_head"), 1.0);
}

/// HTTP/2 frames by hand, for what a well-behaved client library will not send.
mod frames {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// An HPACK integer with an `n`-bit prefix whose other bits are `first`.
    fn integer(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(first | value as u8);
            return;
        }
        out.push(first | max as u8);
        value -= max;
        while value >= 128 {
            out.push((value % 128) as u8 | 0x80);
            value /= 128;
        }
        out.push(value as u8);
    }

    /// A header field as an HPACK literal without indexing, new name, no Huffman coding.
    pub fn field(name: &str, value: &str) -> Vec<u8> {
        let mut out = vec![0x00];
        integer(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        integer(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
        out
    }

    pub fn request(authority: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (n, v) in [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", authority),
            (":path", path),
        ]
        .into_iter()
        .chain(extra.iter().copied())
        {
            block.extend(field(n, v));
        }
        block
    }

    /// The connection preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        out
    }
}

/// Reads frames until the connection ends, a GOAWAY arrives, a stream ends (if asked: for
/// connections that carry one request) or `within` passes: the kinds seen,
/// in order, and the GOAWAY's error code.
async fn read_frames(
    tls: &mut TlsStream<tokio::net::TcpStream>,
    within: Duration,
    until_stream_end: bool,
) -> (Vec<u8>, Option<u32>) {
    let mut kinds = Vec::new();
    let mut code = None;
    let _ = tokio::time::timeout(within, async {
        loop {
            let mut head = [0u8; 9];
            if tls.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if tls.read_exact(&mut payload).await.is_err() {
                return;
            }
            kinds.push(head[3]);
            if head[3] == frames::GOAWAY && payload.len() >= 8 {
                code = Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
                return;
            }
            if until_stream_end
                && ((head[3] == frames::DATA && head[4] & frames::END_STREAM != 0)
                    || head[3] == frames::RST_STREAM)
            {
                return;
            }
        }
    })
    .await;
    (kinds, code)
}

#[tokio::test]
async fn rapid_resets_and_continuation_floods_end_their_connection_and_nothing_else() {
    use frames::*;
    let up = Upstream::start().await;
    let tls = start(&up).await;
    let token = tls.token().await;
    let authority = format!("localhost:{}", tls.gw.port);
    let bearer = format!("Bearer {token}");

    // The hand-made frames make a request the gateway answers (so what follows is refused for
    // what it is, not for a mistake in the frames).
    let (mut conn, alpn) = tls.connect(&[b"h2"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let mut out = preface();
    let block = request(&authority, "/by-hand", &[("authorization", &bearer)]);
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
    conn.write_all(&out).await.unwrap();
    let (kinds, code) = read_frames(&mut conn, Duration::from_secs(10), true).await;
    assert!(
        kinds.contains(&HEADERS) && kinds.contains(&DATA),
        "{kinds:?} {code:?}"
    );
    assert_eq!(up.last().unwrap().path_and_query, "/by-hand");

    // Connection-specific headers, which HTTP/2 forbids (RFC 9113 §8.2.2) and an HTTP/1.1
    // upstream would act on (a smuggled body, a kept or closed connection): the stream is
    // refused, never forwarded.
    for (i, (name, value)) in [
        ("transfer-encoding", "chunked"),
        ("connection", "keep-alive"),
        ("upgrade", "websocket"),
        ("te", "gzip"),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut conn, _) = tls.connect(&[b"h2"]).await;
        let mut out = preface();
        let path = format!("/smuggle/{i}");
        let block = request(
            &authority,
            &path,
            &[("authorization", &bearer), (name, value)],
        );
        out.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        conn.write_all(&out).await.unwrap();
        let (kinds, code) = read_frames(&mut conn, Duration::from_secs(10), true).await;
        assert!(
            kinds.contains(&RST_STREAM) || code.is_some(),
            "{name}: {value} was not refused: {kinds:?}"
        );
        assert!(
            !up.requests().iter().any(|r| r.path_and_query == path),
            "{name}: {value} reached the upstream"
        );
    }
    let before = up.count();

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once, thousands of them.
    let (mut conn, _) = tls.connect(&[b"h2"]).await;
    let mut burst = preface();
    const STREAMS: u32 = 5000;
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        let block = request(&authority, "/bytes/100000", &[("authorization", &bearer)]);
        burst.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let _ = conn.write_all(&burst).await;
    let (kinds, code) = read_frames(&mut conn, Duration::from_secs(10), false).await;
    // ENHANCE_YOUR_CALM.
    assert_eq!(
        code,
        Some(0xb),
        "the connection was not ended so: {kinds:?}"
    );
    let reached = up.count() - before;
    assert!(
        reached < STREAMS as usize / 10,
        "{reached} of {STREAMS} cancelled streams reached the upstream"
    );

    // CONTINUATION flood (CVE-2024-27316 and kin): a head that never ends, frame after frame.
    let (mut conn, _) = tls.connect(&[b"h2"]).await;
    let mut out = preface();
    out.extend(frame(
        HEADERS,
        0,
        1,
        &request(&authority, "/flood", &[("authorization", &bearer)]),
    ));
    let _ = conn.write_all(&out).await;
    let filler = field("x-filler", &"f".repeat(16_000));
    let mut sent = 0usize;
    for _ in 0..1000 {
        if conn
            .write_all(&frame(CONTINUATION, 0, 1, &filler))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let (kinds, flood_code) = read_frames(&mut conn, Duration::from_secs(10), false).await;
    assert!(
        sent < 1000 || flood_code.is_some(),
        "16 MB of CONTINUATION frames were taken in without ending the connection: {kinds:?}"
    );
    assert!(
        !up.requests().iter().any(|r| r.path_and_query == "/flood"),
        "the flooded head reached the upstream"
    );

    // The gateway serves everyone else as before, on HTTP/2 and HTTP/1.1.
    let mut send = tls.h2().await;
    let req = http::Request::builder()
        .uri(format!("https://{authority}/still"))
        .header("authorization", &bearer)
        .body(())
        .unwrap();
    assert_eq!(h2_status(&mut send, req).await.unwrap(), 200);
    let resp = tls
        .https()
        .get(tls.url("/still-http11"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);
    eprintln!(
        "rapid reset: {reached} of {STREAMS} streams reached the upstream; flood: {sent} \
         CONTINUATION frames sent, GOAWAY {flood_code:?}"
    );
}

#[tokio::test]
async fn websockets_stay_on_http11_over_the_tls_listener() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let up = Upstream::start().await;
    let tls = start(&up).await;
    let token = tls.token().await;
    // Browsers open WebSockets on a connection offering http/1.1 only (no RFC 8441).
    let (stream, alpn) = tls.connect(&[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let mut request = format!("wss://localhost:{}/ws", tls.gw.port)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("a WebSocket over the TLS listener");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over tls")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "over tls");

    // An upgrade without a credential is refused there too.
    let (stream, _) = tls.connect(&[b"http/1.1"]).await;
    let request = format!("wss://localhost:{}/ws", tls.gw.port)
        .into_client_request()
        .unwrap();
    let refused = tokio_tungstenite::client_async(request, stream).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401)
        }
        other => panic!("an upgrade without a credential got {other:?}"),
    }
}
