//! A Jellyfin 10.11-like stand-in server for the integration tests, written from the protocol
//! brief `shared/research/jellyfin-plex-protocol.md` (cited below as "brief §n"), which reads
//! Jellyfin's own source. It is not Jellyfin: it implements only the routes the gateway tests
//! need, but each one answers the way the brief says 10.11.x (legacy authorization on) does,
//! so that a gateway that works against it has a fair chance against the real server.
//!
//! # What it does like Jellyfin 10.11
//! - Routing (brief §1.5, §1.6): paths match case-insensitively, a trailing `/` is ignored, and
//!   a leading `/emby` or `/mediabrowser` is stripped first — a plain case-insensitive
//!   `StartsWith`, so `/embyfoo` becomes `foo`, which ASP.NET refuses as a path (400, see
//!   *Guesses*). A known path with an unmapped method is 405, an unknown one 404.
//! - Query strings (brief §1.5): keys are percent-decoded (`+` is a space) and compared
//!   case-insensitively; a repeated key yields its values joined with `,`.
//! - Credentials (brief §1.1, §1.3, §1.4): `Authorization` first, `X-Emby-Authorization` only
//!   when `Authorization` is absent or empty; only the first value is parsed; scheme
//!   `MediaBrowser` or `Emby`, case-insensitive; the parameters by [`get_parts`], a port of
//!   `AuthorizationContext.GetParts`; token precedence header `Token` → `X-Emby-Token` →
//!   `X-MediaBrowser-Token` → query `ApiKey` → query `api_key`, each later one used only when
//!   the earlier is empty; tokens compared exactly. A request whose `Device`/`Version` differ
//!   from the token's stored row rewrites that row unless `Client` contains "chromecast"
//!   ([`StandIn::devices`] shows it).
//! - Tokens (brief §2.1): 32 lowercase hex (`Guid.NewGuid().ToString("N")`), no expiry, one per
//!   (DeviceId, user): a new login from the same pair logs the older token out first.
//! - Logout (brief §2.3, §1.7): `POST /Sessions/Logout` deletes the token's row and ends the
//!   sessions on that DeviceId, which closes their WebSockets.
//! - Anonymous media (brief §3, §7): streams, legacy HLS segments, images and subtitles are
//!   served without a credential, and an invalid token there is ignored.
//! - JSON (brief §1.5): PascalCase unless content negotiation picks the camelCase profile; see
//!   [`negotiate`]. GUIDs in "N" format. Nulls are left out (`WhenWritingNull`).
//! - WebSocket (brief §1.7): any path with a WebSocket upgrade; the token may come from any
//!   carrier, and the query string is first re-parsed the way `UrlDecodeQueryFeature` does
//!   (brief §1.5) since the WebSocket handler runs after it.
//!
//! # Test affordances (not Jellyfin behaviour)
//! - Every request is recorded ([`StandIn::requests`]); failures can be injected
//!   ([`StandIn::set_failing_logouts`]); gzip is switched by [`StandIn::set_gzip`] (Jellyfin's
//!   response compression is always on and also offers Brotli and compresses other text types:
//!   here only JSON, only gzip).
//! - Every item id exists, and ids need not be GUIDs (Jellyfin's routes bind `Guid`s), so a test
//!   can name its items; item `big` (any case) streams 512 MiB, lazily.
//! - `/Startup/Configuration` answers 200 although `/System/Info/Public` says the wizard is
//!   complete: it stands for a server whose wizard is open, which the gateway must block.
//! - The WebSocket echoes text and binary messages other than `KeepAlive` (which is answered
//!   with a `KeepAlive`, as Jellyfin's session listener does).
//! - `add_user` and `set_user_password` stand for the admin dashboard.
//!
//! # Guesses (where the brief says nothing and this file picks)
//! - `/embyX` (prefix not followed by `/`): 400, inferred from ASP.NET's `PathString` refusing a
//!   path without a leading `/` inside the exception middleware.
//! - A WebSocket upgrade without a valid token gets **403**: brief §1.7 says the handler throws
//!   `SecurityException("Token is required")`, and brief §2.1 that the exception middleware maps
//!   `SecurityException` to 403. (Jellyfin's `AuthService` also throws `SecurityException` for an
//!   unknown token.)
//! - `POST /Users/AuthenticateWithQuickConnect` with an unknown or not yet authorised secret:
//!   404, since the manager throws `ResourceNotFoundException` (read in `QuickConnectManager`);
//!   a missing body or `Secret` is 400. Quick Connect secrets are upper-case hex
//!   (`Convert.ToHexString`), codes 6 digits without a leading zero, as in that file.
//!   Authorising an already authorised code: 500 (`InvalidOperationException`).
//! - Closing a socket on logout sends a close frame (1000) before dropping the connection.
//! - `SessionInfo.Id` is derived from (Client, DeviceId) like Jellyfin's session key, but with
//!   SHA-256 instead of Jellyfin's MD5-into-GUID.
//! - A user without a password accepts any password. Usernames match case-insensitively.
//! - `[FromBody]` JSON with a non-JSON `Content-Type` is 415, malformed JSON 400 (ASP.NET).
//! - Plain-text bodies of error answers are made up; Jellyfin's 401 challenge has no body.
//! - `/Branding/Css` answers 200 `text/css` with an empty body (no custom CSS set).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::upstream::{parse_range, PatternBody, RangeReq, Recorded, RespBody};

/// `Version` in `/System/Info/Public`.
pub const VERSION: &str = "10.11.11";
/// `ServerName` in `/System/Info/Public`.
pub const SERVER_NAME: &str = "Portcullis Stand-in";
/// Length of `/Videos|Audio/{id}/stream…` for ordinary items.
pub const STREAM_LEN: u64 = 1 << 20;
/// Length of the stream of item `big`.
pub const BIG_STREAM_LEN: u64 = 512 << 20;
/// Length of an HLS segment and of `/Audio/{id}/universal`.
pub const SEGMENT_LEN: u64 = 188 * 512;
/// `Data` of the `ForceKeepAlive` message sent on open.
const KEEP_ALIVE_SECONDS: u64 = 60;
/// Quick Connect `Timeout` (brief §2.2).
const QUICK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The smallest valid PNG (1×1, transparent), served for every image.
pub const PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4,
    0x89, 0x00, 0x00, 0x00, 0x0A, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0x00, 0x01, 0x00, 0x00,
    0x05, 0x00, 0x01, 0x0D, 0x0A, 0x2D, 0xB4, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE,
    0x42, 0x60, 0x82,
];

/// The subtitle served for every subtitle stream.
pub const WEBVTT: &str = "WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nStand-in subtitle\n";

/// One row of Jellyfin's device table: a token and what it was issued to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub token: String,
    pub user_id: String,
    pub device_id: String,
    pub device_name: String,
    pub client: String,
    pub version: String,
}

#[derive(Clone, Debug)]
struct User {
    id: String,
    name: String,
    password: String,
    admin: bool,
}

struct QuickConnectRequest {
    secret: String,
    code: String,
    device_id: String,
    device_name: String,
    app_name: String,
    app_version: String,
    date_added: String,
    expires: Instant,
    authenticated: bool,
}

struct AuthorizedSecret {
    secret: String,
    /// The `AuthenticationResult` minted at authorisation, in PascalCase.
    result: Value,
    expires: Instant,
}

struct OpenSocket {
    id: u64,
    device_id: String,
    close: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct State {
    users: Vec<User>,
    devices: Vec<Device>,
    logged_out: Vec<String>,
    failing_logouts: usize,
    gzip: bool,
    quick_connect: Vec<QuickConnectRequest>,
    authorized: Vec<AuthorizedSecret>,
    sockets: Vec<OpenSocket>,
    next_socket: u64,
}

struct Shared {
    addr: SocketAddr,
    server_id: String,
    log: Mutex<Vec<Recorded>>,
    state: Mutex<State>,
    open_streams: AtomicUsize,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running stand-in. Dropping it stops accepting and closes its connections and WebSockets.
pub struct StandIn {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
    // Dropping the sender tells every connection (and WebSocket) task to stop.
    _shutdown: watch::Sender<()>,
}

impl StandIn {
    /// Binds 127.0.0.1 on an ephemeral port and serves in a spawned task.
    pub async fn start() -> StandIn {
        let listener = match TcpListener::bind(("127.0.0.1", 0)).await {
            Ok(l) => l,
            Err(e) => panic!("stand-in: cannot bind 127.0.0.1:0: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("stand-in: no local address: {e}"),
        };
        let shared = Arc::new(Shared {
            addr,
            server_id: new_guid(),
            log: Mutex::new(Vec::new()),
            state: Mutex::new(State::default()),
            open_streams: AtomicUsize::new(0),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        StandIn {
            addr,
            shared,
            accept_task,
            _shutdown: shutdown_tx,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server id (`/System/Info/Public` `Id`, `ServerId` everywhere else).
    pub fn server_id(&self) -> String {
        self.shared.server_id.clone()
    }

    /// Creates a user and returns its id (32 lowercase hex, GUID "N" format). An empty password
    /// makes a user without a password.
    pub fn add_user(&self, name: &str, password: &str, admin: bool) -> String {
        let id = new_guid();
        self.shared.state().users.push(User {
            id: id.clone(),
            name: name.to_owned(),
            password: password.to_owned(),
            admin,
        });
        id
    }

    /// Changes a user's password as an administrator would in the dashboard, which (brief §2.3)
    /// revokes every token of that user and so closes their WebSockets.
    pub fn set_user_password(&self, name: &str, pw: &str) {
        let mut st = self.shared.state();
        let Some(user) = st
            .users
            .iter_mut()
            .find(|u| u.name.eq_ignore_ascii_case(name))
        else {
            panic!("stand-in: no user {name:?}");
        };
        user.password = pw.to_owned();
        let user_id = user.id.clone();
        let tokens: Vec<String> = st
            .devices
            .iter()
            .filter(|d| d.user_id == user_id)
            .map(|d| d.token.clone())
            .collect();
        for token in tokens {
            st.logout(&token);
        }
    }

    /// Every request received so far, in order (WebSocket upgrades included).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log().clone()
    }

    /// Tokens that successfully called `POST /Sessions/Logout`, in order.
    pub fn logged_out_tokens(&self) -> Vec<String> {
        self.shared.state().logged_out.clone()
    }

    /// Tokens currently valid, oldest first.
    pub fn live_tokens(&self) -> Vec<String> {
        self.shared
            .state()
            .devices
            .iter()
            .map(|d| d.token.clone())
            .collect()
    }

    /// The device table (one row per live token), oldest first.
    pub fn devices(&self) -> Vec<Device> {
        self.shared.state().devices.clone()
    }

    /// When on, JSON responses are gzip-compressed if the request's `Accept-Encoding` allows it.
    pub fn set_gzip(&self, on: bool) {
        self.shared.state().gzip = on;
    }

    /// The next `n` `POST /Sessions/Logout` calls answer 503 and delete nothing.
    pub fn set_failing_logouts(&self, n: usize) {
        self.shared.state().failing_logouts = n;
    }

    /// WebSockets currently open (counted from the 101 answer until the socket task ends).
    pub fn open_sockets(&self) -> usize {
        self.shared.state().sockets.len()
    }

    /// Media bodies (streams, segments, universal audio) currently being sent.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Dropping the listener (owned by the task) stops accepting; the watch sender is
        // dropped right after, which closes open connections and WebSockets.
        self.accept_task.abort();
    }
}

impl State {
    /// Jellyfin's `SessionManager.Logout(device)`: deletes the token's row and ends the sessions
    /// on its DeviceId, closing their WebSockets. Returns whether the token existed.
    fn logout(&mut self, token: &str) -> bool {
        let Some(pos) = self.devices.iter().position(|d| d.token == token) else {
            return false;
        };
        let device = self.devices.remove(pos);
        for socket in &mut self.sockets {
            if socket.device_id.eq_ignore_ascii_case(&device.device_id) {
                if let Some(close) = socket.close.take() {
                    let _ = close.send(());
                }
            }
        }
        true
    }

    fn user_by_id(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    /// Removes Quick Connect requests and authorised secrets past their time.
    fn expire_quick_connect(&mut self) {
        let now = Instant::now();
        self.quick_connect.retain(|r| r.expires > now);
        self.authorized.retain(|a| a.expires > now);
    }
}

// ---------------------------------------------------------------- server plumbing

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<()>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            // Transient errors (e.g. too many open files): keep serving.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let mut conn_shutdown = shutdown.clone();
        let ws_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let ws_shutdown = ws_shutdown.clone();
                async move { Ok::<_, Infallible>(handle(req, shared, peer, ws_shutdown).await) }
            });
            let conn = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                // Connection errors (client hung up mid-body, …) are of no interest here.
                _ = conn => {}
                // Stand-in dropped: drop the connection, closing the socket.
                _ = conn_shutdown.changed() => {}
            }
        });
    }
}

/// What a handler gets to see of a request.
struct Rq<'a> {
    parts: &'a Parts,
    body: &'a [u8],
    query: Query,
    /// The query string as received, without `?` (empty when there is none).
    raw_query: &'a str,
    peer: SocketAddr,
    shared: &'a Arc<Shared>,
}

async fn handle(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let on_upgrade =
        is_websocket_request(req.method(), req.headers()).then(|| hyper::upgrade::on(&mut req));

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
    shared.log().push(Recorded {
        method: parts.method.as_str().to_owned(),
        path_and_query,
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
        body: body.clone(),
    });

    let raw_query = parts.uri.query().unwrap_or("");
    let rq = Rq {
        parts: &parts,
        body: &body,
        query: Query::parse(raw_query),
        raw_query,
        peer,
        shared: &shared,
    };

    // LegacyEmbyRouteRewriteMiddleware (brief §1.6): a plain case-insensitive StartsWith.
    let raw_path = parts.uri.path();
    let path = if starts_with_ignore_case(raw_path, "/emby") {
        &raw_path["/emby".len()..]
    } else if starts_with_ignore_case(raw_path, "/mediabrowser") {
        &raw_path["/mediabrowser".len()..]
    } else {
        raw_path
    };
    if !path.is_empty() && !path.starts_with('/') {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "The path in 'value' must start with '/'.",
        );
    }

    if let Some(on_upgrade) = on_upgrade {
        return websocket(&rq, on_upgrade, shared.clone(), shutdown);
    }
    route(&rq, path)
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

// ---------------------------------------------------------------- routing

/// Answers 405 unless the method is one of `allowed`.
fn allow(rq: &Rq<'_>, allowed: &[Method]) -> Option<Response<RespBody>> {
    if allowed.contains(&rq.parts.method) {
        None
    } else {
        let mut resp = empty_status(StatusCode::METHOD_NOT_ALLOWED);
        let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        Some(resp)
    }
}

macro_rules! methods {
    ($rq:expr, $($m:ident),+) => {
        if let Some(resp) = allow($rq, &[$(Method::$m),+]) {
            return resp;
        }
    };
}

/// `name.ext` → `Some(ext)` when `seg` (lower case) is `name` followed by `.` and a non-empty
/// extension.
fn ext_of<'a>(seg: &'a str, name: &str) -> Option<&'a str> {
    seg.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('.'))
        .filter(|ext| !ext.is_empty())
}

fn route(rq: &Rq<'_>, path: &str) -> Response<RespBody> {
    // Route values are percent-decoded; matching is case-insensitive; a trailing slash is
    // ignored by ASP.NET routing (but not by the static files under /web, handled first).
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let lower_raw = trimmed.to_ascii_lowercase();
    match lower_raw.as_str() {
        "" => {
            methods!(rq, GET, HEAD);
            return redirect(StatusCode::FOUND, "web/");
        }
        "web" => {
            methods!(rq, GET, HEAD);
            return redirect(StatusCode::MOVED_PERMANENTLY, "/web/");
        }
        "web/" | "web/index.html" => {
            methods!(rq, GET, HEAD);
            return web_index(rq);
        }
        _ => {}
    }
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let orig: Vec<String> = trimmed.split('/').map(percent_decode).collect();
    let lower: Vec<String> = orig.iter().map(|s| s.to_lowercase()).collect();
    let seg: Vec<&str> = lower.iter().map(String::as_str).collect();
    let o = |i: usize| orig[i].as_str();

    match seg.as_slice() {
        ["system", "info", "public"] => {
            methods!(rq, GET);
            public_system_info(rq)
        }
        ["system", "ping"] => {
            methods!(rq, GET, POST);
            json_ok(rq, json!("Jellyfin Server"))
        }
        ["users", "public"] => {
            methods!(rq, GET);
            let st = rq.shared.state();
            let users: Vec<Value> = st.users.iter().map(|u| user_dto(rq.shared, u)).collect();
            drop(st);
            json_ok(rq, Value::Array(users))
        }
        ["branding", "configuration"] => {
            methods!(rq, GET);
            json_ok(
                rq,
                json!({"LoginDisclaimer": "", "CustomCss": "", "SplashscreenEnabled": false}),
            )
        }
        ["branding", "css"] | ["branding", "css.css"] => {
            methods!(rq, GET);
            text(StatusCode::OK, "text/css", "")
        }
        ["quickconnect", "enabled"] => {
            methods!(rq, GET);
            json_ok(rq, json!(true))
        }
        ["quickconnect", "initiate"] => {
            methods!(rq, GET, POST);
            quick_connect_initiate(rq)
        }
        ["quickconnect", "connect"] => {
            methods!(rq, GET);
            quick_connect_connect(rq)
        }
        ["quickconnect", "authorize"] => {
            methods!(rq, POST);
            quick_connect_authorize(rq)
        }
        ["users", "authenticatebyname"] => {
            methods!(rq, POST);
            authenticate_by_name(rq)
        }
        ["users", "authenticatewithquickconnect"] => {
            methods!(rq, POST);
            authenticate_with_quick_connect(rq)
        }
        ["users", _, "authenticate"] => {
            methods!(rq, POST);
            authenticate_obsolete(rq, o(1))
        }
        ["users", "me"] => {
            methods!(rq, GET);
            match require_auth(rq) {
                Ok(a) => {
                    let dto = user_dto(rq.shared, &a.user);
                    json_ok(rq, dto)
                }
                Err(resp) => *resp,
            }
        }
        ["sessions", "logout"] => {
            methods!(rq, POST);
            logout(rq)
        }
        ["items", _, "playbackinfo"] => {
            methods!(rq, GET, POST);
            playback_info(rq, o(1))
        }
        ["videos", _, s] | ["audio", _, s] if *s == "stream" || ext_of(s, "stream").is_some() => {
            methods!(rq, GET, HEAD);
            let is_video = seg[0] == "videos";
            let container = ext_of(s, "stream");
            let len = if o(1).eq_ignore_ascii_case("big") {
                BIG_STREAM_LEN
            } else {
                STREAM_LEN
            };
            media(rq, len, media_type(is_video, container))
        }
        ["videos", _, "master.m3u8"] => {
            methods!(rq, GET, HEAD);
            match require_auth(rq) {
                Ok(_) => master_playlist(rq),
                Err(resp) => *resp,
            }
        }
        ["videos", _, "main.m3u8"] => {
            methods!(rq, GET);
            match require_auth(rq) {
                Ok(_) => main_playlist(rq),
                Err(resp) => *resp,
            }
        }
        ["videos", _, "hls1", _, s] if s.contains('.') => {
            methods!(rq, GET);
            match require_auth(rq) {
                Ok(_) => media(rq, SEGMENT_LEN, "video/mp2t"),
                Err(resp) => *resp,
            }
        }
        // Legacy HLS segments: anonymous (brief §3, HlsSegmentController).
        ["videos", _, "hls", _, s] if s.contains('.') => {
            methods!(rq, GET);
            media(rq, SEGMENT_LEN, "video/mp2t")
        }
        ["audio", _, "hls", _, s] if *s == "stream.mp3" || *s == "stream.aac" => {
            methods!(rq, GET);
            let mime = if *s == "stream.mp3" {
                "audio/mpeg"
            } else {
                "audio/aac"
            };
            media(rq, SEGMENT_LEN, mime)
        }
        ["audio", _, "universal"] => {
            methods!(rq, GET, HEAD);
            match require_auth(rq) {
                Ok(_) => media(rq, SEGMENT_LEN, "audio/mpeg"),
                Err(resp) => *resp,
            }
        }
        ["items", _, "images", _] | ["items", _, "images", _, _] => {
            methods!(rq, GET, HEAD);
            bytes_response(rq, StatusCode::OK, "image/png", Bytes::from_static(PNG))
        }
        ["videos", _, _, "subtitles", _, s] | ["videos", _, _, "subtitles", _, _, s]
            if ext_of(s, "stream").is_some() =>
        {
            methods!(rq, GET);
            bytes_response(
                rq,
                StatusCode::OK,
                "text/vtt",
                Bytes::from_static(WEBVTT.as_bytes()),
            )
        }
        ["health"] => {
            methods!(rq, GET, HEAD);
            text(StatusCode::OK, "text/plain", "Healthy")
        }
        ["startup", "configuration"] => {
            methods!(rq, GET);
            json_ok(
                rq,
                json!({"UICulture": "en-US", "MetadataCountryCode": "US", "PreferredMetadataLanguage": "en"}),
            )
        }
        ["api-docs", "openapi.json"] => {
            methods!(rq, GET);
            json_ok(
                rq,
                json!({"openapi": "3.0.4", "info": {"title": "Jellyfin API", "version": VERSION}, "paths": {}}),
            )
        }
        _ => empty_status(StatusCode::NOT_FOUND),
    }
}

fn media_type(is_video: bool, container: Option<&str>) -> &'static str {
    match (is_video, container) {
        (true, Some("mkv")) => "video/x-matroska",
        (true, Some("webm")) => "video/webm",
        (true, Some("ts")) => "video/mp2t",
        (true, _) => "video/mp4",
        (false, Some("flac")) => "audio/flac",
        (false, Some("ogg")) => "audio/ogg",
        (false, Some("aac")) => "audio/aac",
        (false, _) => "audio/mpeg",
    }
}

// ---------------------------------------------------------------- query strings

/// A parsed query string, as ASP.NET's `QueryCollection` sees it (brief §1.5).
struct Query {
    /// Decoded keys (first spelling kept) with every value, in order.
    pairs: Vec<(String, Vec<String>)>,
    /// Keys compare case-insensitively, except in a collection rebuilt by
    /// [`Query::url_decode_feature`] (a plain `Dictionary`).
    case_sensitive: bool,
}

impl Query {
    fn parse(raw: &str) -> Query {
        let mut q = Query {
            pairs: Vec::new(),
            case_sensitive: false,
        };
        for part in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            q.push(query_decode(k), query_decode(v));
        }
        q
    }

    fn push(&mut self, key: String, value: String) {
        let cs = self.case_sensitive;
        match self.pairs.iter_mut().find(|(k, _)| key_eq(cs, k, &key)) {
            Some((_, values)) => values.push(value),
            None => self.pairs.push((key, vec![value])),
        }
    }

    fn values(&self, key: &str) -> Option<&[String]> {
        self.pairs
            .iter()
            .find(|(k, _)| key_eq(self.case_sensitive, k, key))
            .map(|(_, v)| v.as_slice())
    }

    /// `Query[key].ToString()`: every value joined with `,`.
    fn get(&self, key: &str) -> Option<String> {
        self.values(key).map(|v| v.join(","))
    }

    /// What `[FromQuery] string key` binds: the first value.
    fn first(&self, key: &str) -> Option<String> {
        self.values(key).and_then(|v| v.first().cloned())
    }

    /// `UrlDecodeQueryFeature` (brief §1.5): a query string that arrived fully percent-encoded
    /// shows up as one key with no value; it is split again on `&` and `=` (no further
    /// decoding, case-sensitive keys, duplicate keys concatenated).
    fn url_decode_feature(self) -> Query {
        let [(key, values)] = self.pairs.as_slice() else {
            return self;
        };
        if !values.join(",").is_empty() || !key.contains('=') {
            return self;
        }
        let mut q = Query {
            pairs: Vec::new(),
            case_sensitive: true,
        };
        for pair in key.split('&') {
            match pair.split_once('=') {
                Some((k, v)) => q.push(k.to_owned(), v.to_owned()),
                // An encoded pair without `=`: TryAdd, so later duplicates are ignored.
                None => {
                    if q.values(pair).is_none() {
                        q.pairs.push((pair.to_owned(), Vec::new()));
                    }
                }
            }
        }
        q
    }
}

fn key_eq(case_sensitive: bool, a: &str, b: &str) -> bool {
    if case_sensitive {
        a == b
    } else {
        a.to_lowercase() == b.to_lowercase()
    }
}

/// Percent-decoding of `%XX` into UTF-8 bytes; anything malformed is kept as it is.
fn decode_bytes(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' && plus_is_space {
            out.push(b' ');
        } else if b == b'%' && i + 2 < bytes.len() {
            match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b),
            }
        } else {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Query keys and values: `+` is a space, then percent-decoding (`QueryHelpers`).
fn query_decode(s: &str) -> String {
    decode_bytes(s, true)
}

/// Path segments: percent-decoding only.
fn percent_decode(s: &str) -> String {
    decode_bytes(s, false)
}

/// `WebUtility.UrlDecode`, used on `MediaBrowser` header values: `+` is a space too.
pub fn url_decode(s: &str) -> String {
    decode_bytes(s, true)
}

// ---------------------------------------------------------------- credentials

/// A port of `AuthorizationContext.GetParts` (brief §1.4): the parameters of a `MediaBrowser`
/// header, everything after the first space. One left-to-right scan; `"` toggles "inside
/// quotes"; outside quotes `,` ends a pair and `=` ends a key; keys are whitespace-trimmed and
/// case-sensitive; values have only `"` trimmed from both ends and are then URL-decoded; the last
/// duplicate wins. Quirks are kept: an empty value (`Token=,`) stores nothing, and a pair without
/// `=` is stored under the key `""`.
pub fn get_parts(params: &str) -> HashMap<String, String> {
    let chars: Vec<char> = params.chars().collect();
    let mut result = HashMap::new();
    let mut escaped = false;
    let mut start = 0;
    let mut key = String::new();
    let value = |from: usize, to: usize| -> String {
        let raw: String = chars[from..to].iter().collect();
        url_decode(raw.trim_matches('"'))
    };
    for (i, &c) in chars.iter().enumerate() {
        if c == '"' || c == ',' {
            // Jellyfin's `escaped = (!escaped) == (token == '"')`: a quote toggles the state,
            // a comma keeps it.
            if c == '"' {
                escaped = !escaped;
            }
            if c == ',' && !escaped {
                if start < i {
                    result.insert(std::mem::take(&mut key), value(start, i));
                }
                start = i + 1;
            }
        } else if !escaped && c == '=' {
            key = chars[start..i].iter().collect::<String>().trim().to_owned();
            start = i + 1;
        }
    }
    if start < chars.len() {
        result.insert(key, value(start, chars.len()));
    }
    result
}

/// `AuthorizationContext.GetAuthorization`: `None` unless the header is `<scheme> <params>`
/// with scheme `MediaBrowser` or (legacy) `Emby`, case-insensitive.
pub fn parse_authorization(value: &str) -> Option<HashMap<String, String>> {
    let (scheme, params) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("MediaBrowser") || scheme.eq_ignore_ascii_case("Emby") {
        Some(get_parts(params))
    } else {
        None
    }
}

/// What `AuthorizationContext` extracts from a request (brief §1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthInfo {
    pub client: Option<String>,
    pub device: Option<String>,
    pub device_id: Option<String>,
    pub version: Option<String>,
    pub token: Option<String>,
}

fn header_joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

fn auth_info(headers: &HeaderMap, query: &Query) -> AuthInfo {
    // `Authorization`, or `X-Emby-Authorization` when that is absent or empty; first value only.
    let first = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let header = if header_joined(headers, "authorization").is_some_and(|v| !v.is_empty()) {
        first("authorization")
    } else {
        first("x-emby-authorization")
    };
    let dict = header
        .as_deref()
        .and_then(parse_authorization)
        .unwrap_or_default();
    let empty = |t: &Option<String>| t.as_deref().is_none_or(str::is_empty);
    let mut token = dict.get("Token").cloned();
    if empty(&token) {
        token = header_joined(headers, "x-emby-token");
    }
    if empty(&token) {
        token = header_joined(headers, "x-mediabrowser-token");
    }
    if empty(&token) {
        token = query.get("ApiKey");
    }
    if empty(&token) {
        token = query.get("api_key");
    }
    AuthInfo {
        client: dict.get("Client").cloned(),
        device: dict.get("Device").cloned(),
        device_id: dict.get("DeviceId").cloned(),
        version: dict.get("Version").cloned(),
        token,
    }
}

/// An authenticated caller.
struct Authed {
    token: String,
    user: User,
}

enum Auth {
    /// `HasToken` is false (no token, or only whitespace).
    NoToken,
    /// A token that matches no device row.
    Invalid,
    Valid(Authed),
}

/// Looks the token up; on success applies Jellyfin's device-row rewrite (brief §1.1).
fn authenticate(shared: &Shared, info: &AuthInfo) -> Auth {
    let Some(token) = info.token.as_deref().filter(|t| !t.trim().is_empty()) else {
        return Auth::NoToken;
    };
    let mut st = shared.state();
    let Some(pos) = st.devices.iter().position(|d| d.token == token) else {
        return Auth::Invalid;
    };
    let client = info.client.clone().unwrap_or_default();
    let may_update = !client.to_lowercase().contains("chromecast");
    let device = &mut st.devices[pos];
    if may_update {
        if let Some(name) = info.device.as_deref().filter(|d| !d.trim().is_empty()) {
            if name != device.device_name {
                device.device_name = name.to_owned();
            }
        }
        if let Some(version) = info.version.as_deref().filter(|v| !v.trim().is_empty()) {
            if version != device.version {
                device.version = version.to_owned();
            }
        }
    }
    let user_id = device.user_id.clone();
    match st.user_by_id(&user_id) {
        Some(user) => Auth::Valid(Authed {
            token: token.to_owned(),
            user: user.clone(),
        }),
        None => Auth::Invalid,
    }
}

/// `[Authorize]`: 401 (empty body, as the challenge is) without a valid token.
fn require_auth(rq: &Rq<'_>) -> Result<Authed, Box<Response<RespBody>>> {
    match authenticate(rq.shared, &auth_info(&rq.parts.headers, &rq.query)) {
        Auth::Valid(a) => Ok(a),
        Auth::NoToken | Auth::Invalid => Err(Box::new(empty_status(StatusCode::UNAUTHORIZED))),
    }
}

/// Parses a GUID in "N" or "D" form (optionally in braces) into lowercase "N" form.
fn parse_guid(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s
        .strip_prefix('{')
        .and_then(|x| x.strip_suffix('}'))
        .unwrap_or(s);
    let hex: String = if s.len() == 36 {
        let b = s.as_bytes();
        if [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        s.chars().filter(|&c| c != '-').collect()
    } else {
        s.to_owned()
    };
    (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_lowercase())
}

fn new_guid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

// ---------------------------------------------------------------- DTOs

fn now_wall() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.0000000Z".to_owned())
}

fn user_dto(shared: &Shared, u: &User) -> Value {
    let has_password = !u.password.is_empty();
    json!({
        "Name": u.name,
        "ServerId": shared.server_id,
        "Id": u.id,
        "HasPassword": has_password,
        "HasConfiguredPassword": has_password,
        "HasConfiguredEasyPassword": false,
        "EnableAutoLogin": false,
        "Policy": {
            "IsAdministrator": u.admin,
            "IsHidden": false,
            "IsDisabled": false,
            "EnableRemoteAccess": true,
            "AuthenticationProviderId": "Jellyfin.Server.Implementations.Users.DefaultAuthenticationProvider",
            "PasswordResetProviderId": "Jellyfin.Server.Implementations.Users.DefaultPasswordResetProvider",
        },
    })
}

fn session_id(client: &str, device_id: &str) -> String {
    let digest = Sha256::digest(format!("{client}{device_id}").as_bytes());
    hex::encode(&digest[..16])
}

/// `SessionManager.GetAuthorizationToken` + the `AuthenticationResult` (brief §2.1): logs out
/// every token of the same (DeviceId, user), mints a new one and describes the session.
fn new_session(
    shared: &Shared,
    st: &mut State,
    user: &User,
    device: Device,
    remote: SocketAddr,
) -> Value {
    let old: Vec<String> = st
        .devices
        .iter()
        .filter(|d| d.device_id == device.device_id && d.user_id == user.id)
        .map(|d| d.token.clone())
        .collect();
    for token in old {
        st.logout(&token);
    }
    let result = json!({
        "User": user_dto(shared, user),
        "SessionInfo": {
            "Id": session_id(&device.client, &device.device_id),
            "ServerId": shared.server_id,
            "UserId": user.id,
            "UserName": user.name,
            "Client": device.client,
            "DeviceId": device.device_id,
            "DeviceName": device.device_name,
            "ApplicationVersion": device.version,
            "RemoteEndPoint": remote.ip().to_string(),
            "LastActivityDate": now_wall(),
            "IsActive": true,
        },
        "AccessToken": device.token,
        "ServerId": shared.server_id,
    });
    st.devices.push(device);
    result
}

// ---------------------------------------------------------------- handlers

fn public_system_info(rq: &Rq<'_>) -> Response<RespBody> {
    json_ok(
        rq,
        json!({
            "LocalAddress": format!("http://{}", rq.shared.addr),
            "ServerName": SERVER_NAME,
            "Version": VERSION,
            "ProductName": "Jellyfin Server",
            "OperatingSystem": "",
            "Id": rq.shared.server_id,
            "StartupWizardCompleted": true,
        }),
    )
}

fn web_index(rq: &Rq<'_>) -> Response<RespBody> {
    let html =
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Jellyfin</title></head>\
                <body><div id=\"reactRoot\">Jellyfin stand-in web client</div></body></html>\n";
    let mut resp = bytes_response(
        rq,
        StatusCode::OK,
        "text/html",
        Bytes::from_static(html.as_bytes()),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A `[FromBody]` JSON object with its keys lower-cased (MVC binds case-insensitively).
fn json_body(rq: &Rq<'_>) -> Result<HashMap<String, Value>, Box<Response<RespBody>>> {
    let content_type = rq
        .parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let is_json = mime == "application/json" || mime == "text/json" || mime.ends_with("+json");
    if !is_json {
        return Err(Box::new(empty_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)));
    }
    match serde_json::from_slice::<Value>(rq.body) {
        Ok(Value::Object(map)) => Ok(map
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect()),
        _ => Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "A non-empty request body is required.",
        ))),
    }
}

fn body_string(body: &HashMap<String, Value>, key: &str) -> Option<String> {
    match body.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The 400 of `ArgumentException.ThrowIfNullOrEmpty` on the client fields.
fn missing_client_fields(info: &AuthInfo) -> Option<Response<RespBody>> {
    let fields = [
        ("DeviceId", &info.device_id),
        ("Device", &info.device),
        ("Client", &info.client),
        ("Version", &info.version),
    ];
    fields
        .iter()
        .find(|(_, v)| v.as_deref().is_none_or(str::is_empty))
        .map(|(name, _)| {
            text(
                StatusCode::BAD_REQUEST,
                "text/plain",
                &format!("Value cannot be null or empty. (Parameter '{name}')"),
            )
        })
}

/// `SessionManager.AuthenticateNewSession` with a password (brief §2.1).
fn login_with_password(rq: &Rq<'_>, username: &str, pw: &str) -> Response<RespBody> {
    let info = auth_info(&rq.parts.headers, &rq.query);
    if let Some(resp) = missing_client_fields(&info) {
        return resp;
    }
    if username.trim().is_empty() {
        return text(StatusCode::BAD_REQUEST, "text/plain", "Invalid username");
    }
    let shared = rq.shared;
    let mut st = shared.state();
    let Some(user) = st
        .users
        .iter()
        .find(|u| u.name.to_lowercase() == username.to_lowercase())
        .cloned()
    else {
        return text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "Error processing request.",
        );
    };
    if !user.password.is_empty() && user.password != pw {
        return text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "Error processing request.",
        );
    }
    let device = Device {
        token: new_guid(),
        user_id: user.id.clone(),
        device_id: info.device_id.unwrap_or_default(),
        device_name: info.device.unwrap_or_default(),
        client: info.client.unwrap_or_default(),
        version: info.version.unwrap_or_default(),
    };
    let result = new_session(shared, &mut st, &user, device, rq.peer);
    drop(st);
    json_ok(rq, result)
}

fn authenticate_by_name(rq: &Rq<'_>) -> Response<RespBody> {
    let body = match json_body(rq) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let username = body_string(&body, "username").unwrap_or_default();
    let pw = body_string(&body, "pw").unwrap_or_default();
    login_with_password(rq, &username, &pw)
}

/// Obsolete `POST /Users/{userId}/Authenticate?pw=` (brief §2.1).
fn authenticate_obsolete(rq: &Rq<'_>, user_id: &str) -> Response<RespBody> {
    let Some(user_id) = parse_guid(user_id) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "The value is not valid.",
        );
    };
    let Some(pw) = rq.query.first("pw") else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "The pw field is required.",
        );
    };
    let name = match rq.shared.state().user_by_id(&user_id) {
        Some(u) => u.name.clone(),
        None => return text(StatusCode::NOT_FOUND, "text/plain", "User not found"),
    };
    login_with_password(rq, &name, &pw)
}

fn logout(rq: &Rq<'_>) -> Response<RespBody> {
    {
        let mut st = rq.shared.state();
        if st.failing_logouts > 0 {
            st.failing_logouts -= 1;
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "stand-in: injected logout failure",
            );
        }
    }
    let authed = match require_auth(rq) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let mut st = rq.shared.state();
    if st.logout(&authed.token) {
        st.logged_out.push(authed.token);
    }
    empty_status(StatusCode::NO_CONTENT)
}

fn quick_connect_json(r: &QuickConnectRequest) -> Value {
    json!({
        "Authenticated": r.authenticated,
        "Secret": r.secret,
        "Code": r.code,
        "DeviceId": r.device_id,
        "DeviceName": r.device_name,
        "AppName": r.app_name,
        "AppVersion": r.app_version,
        "DateAdded": r.date_added,
    })
}

/// `QuickConnectManager.TryConnect` (brief §2.2).
fn quick_connect_initiate(rq: &Rq<'_>) -> Response<RespBody> {
    let info = auth_info(&rq.parts.headers, &rq.query);
    if let Some(resp) = missing_client_fields(&info) {
        return resp;
    }
    let mut rng = rand::thread_rng();
    let secret_bytes: [u8; 32] = rng.gen();
    let req = QuickConnectRequest {
        secret: hex::encode_upper(secret_bytes),
        code: rng.gen_range(100_000..1_000_000u32).to_string(),
        device_id: info.device_id.unwrap_or_default(),
        device_name: info.device.unwrap_or_default(),
        app_name: info.client.unwrap_or_default(),
        app_version: info.version.unwrap_or_default(),
        date_added: now_wall(),
        expires: Instant::now() + QUICK_CONNECT_TIMEOUT,
        authenticated: false,
    };
    let body = quick_connect_json(&req);
    let mut st = rq.shared.state();
    st.expire_quick_connect();
    // Codes are the dictionary key: a new request with the same code replaces the old one.
    st.quick_connect.retain(|r| r.code != req.code);
    st.quick_connect.push(req);
    drop(st);
    json_ok(rq, body)
}

fn quick_connect_connect(rq: &Rq<'_>) -> Response<RespBody> {
    let Some(secret) = rq.query.first("secret").filter(|s| !s.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "The secret field is required.",
        );
    };
    let mut st = rq.shared.state();
    st.expire_quick_connect();
    let body = st
        .quick_connect
        .iter()
        .find(|r| r.secret == secret)
        .map(quick_connect_json);
    drop(st);
    match body {
        Some(body) => json_ok(rq, body),
        None => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "Unable to find request with provided secret",
        ),
    }
}

/// `POST /QuickConnect/Authorize?code=[&userId=]` (brief §2.2): mints the token for the
/// initiating device right away.
fn quick_connect_authorize(rq: &Rq<'_>) -> Response<RespBody> {
    let authed = match require_auth(rq) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let Some(code) = rq.query.first("code").filter(|c| !c.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "The code field is required.",
        );
    };
    let user_id = match rq.query.first("userId").filter(|u| !u.is_empty()) {
        None => authed.user.id.clone(),
        Some(raw) => match parse_guid(&raw) {
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "The value is not valid.",
                )
            }
            // An empty GUID means "not given" (`userId.IsNullOrEmpty()`).
            Some(id) if id.bytes().all(|b| b == b'0') => authed.user.id.clone(),
            Some(id) if id != authed.user.id && !authed.user.admin => {
                return text(StatusCode::FORBIDDEN, "text/plain", "Forbidden");
            }
            Some(id) => id,
        },
    };
    let shared = rq.shared;
    let mut st = shared.state();
    st.expire_quick_connect();
    let Some(idx) = st.quick_connect.iter().position(|r| r.code == code) else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "Unable to find request",
        );
    };
    if st.quick_connect[idx].authenticated {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "Request is already authorized",
        );
    }
    let Some(user) = st.user_by_id(&user_id).cloned() else {
        // AuthenticateDirect throws AuthenticationException, which the controller turns into
        // Unauthorized("Quick connect is disabled").
        return text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "Quick connect is disabled",
        );
    };
    let now = Instant::now();
    let request = &mut st.quick_connect[idx];
    // "expires one minute into the future", then the usual 10-minute timeout applies.
    request.expires = now + Duration::from_secs(60) + QUICK_CONNECT_TIMEOUT;
    request.authenticated = true;
    let secret = request.secret.clone();
    let device = Device {
        token: new_guid(),
        user_id: user.id.clone(),
        device_id: request.device_id.clone(),
        device_name: request.device_name.clone(),
        client: request.app_name.clone(),
        version: request.app_version.clone(),
    };
    let result = new_session(shared, &mut st, &user, device, rq.peer);
    st.authorized.retain(|a| a.secret != secret);
    st.authorized.push(AuthorizedSecret {
        secret,
        result,
        expires: now + QUICK_CONNECT_TIMEOUT,
    });
    drop(st);
    json_ok(rq, json!(true))
}

/// `POST /Users/AuthenticateWithQuickConnect` (brief §2.2): the result minted at authorisation,
/// as often as asked within the timeout.
fn authenticate_with_quick_connect(rq: &Rq<'_>) -> Response<RespBody> {
    let body = match json_body(rq) {
        Ok(b) => b,
        Err(resp) => return *resp,
    };
    let Some(secret) = body_string(&body, "secret").filter(|s| !s.is_empty()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "The Secret field is required.",
        );
    };
    let mut st = rq.shared.state();
    st.expire_quick_connect();
    let result = st
        .authorized
        .iter()
        .find(|a| a.secret == secret)
        .map(|a| a.result.clone());
    drop(st);
    match result {
        Some(result) => json_ok(rq, result),
        None => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "Unable to find request",
        ),
    }
}

/// `GET|POST /Items/{id}/PlaybackInfo` (brief §4.1): one media source whose `TranscodingUrl`
/// ends in `&ApiKey=<the caller's token>`.
fn playback_info(rq: &Rq<'_>, item_id: &str) -> Response<RespBody> {
    let authed = match require_auth(rq) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let media_source_id = parse_guid(item_id).unwrap_or_else(|| item_id.to_lowercase());
    let play_session_id = new_guid();
    let transcoding_url = format!(
        "/videos/{item_id}/master.m3u8?MediaSourceId={media_source_id}&PlaySessionId={play_session_id}&ApiKey={}",
        authed.token
    );
    json_ok(
        rq,
        json!({
            "MediaSources": [{
                "Id": media_source_id,
                "Protocol": "File",
                "Type": "Default",
                "Container": "mp4",
                "Name": "stand-in",
                "SupportsDirectPlay": true,
                "SupportsDirectStream": true,
                "SupportsTranscoding": true,
                "TranscodingUrl": transcoding_url,
                "TranscodingSubProtocol": "hls",
                "TranscodingContainer": "ts",
            }],
            "PlaySessionId": play_session_id,
        }),
    )
}

/// `master.m3u8` (brief §4.1): the variant URL is `main.m3u8` plus the incoming query string.
fn master_playlist(rq: &Rq<'_>) -> Response<RespBody> {
    let query = if rq.raw_query.is_empty() {
        String::new()
    } else {
        format!("?{}", rq.raw_query)
    };
    let body = format!(
        "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=4000000,AVERAGE-BANDWIDTH=4000000,\
         CODECS=\"avc1.640028,mp4a.40.2\",RESOLUTION=1920x1080\nmain.m3u8{query}\n"
    );
    playlist(rq, body)
}

/// `main.m3u8` (brief §4.1): segment URLs `hls1/main/{n}.ts` plus the incoming query string.
fn main_playlist(rq: &Rq<'_>) -> Response<RespBody> {
    let query = if rq.raw_query.is_empty() {
        String::new()
    } else {
        format!("?{}", rq.raw_query)
    };
    let body = format!(
        "#EXTM3U\n#EXT-X-PLAYLIST-TYPE:VOD\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:6\n\
         #EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:6.000000, nodesc\nhls1/main/0.ts{query}\n\
         #EXTINF:4.000000, nodesc\nhls1/main/1.ts{query}\n#EXT-X-ENDLIST\n"
    );
    playlist(rq, body)
}

fn playlist(rq: &Rq<'_>, body: String) -> Response<RespBody> {
    bytes_response(
        rq,
        StatusCode::OK,
        "application/vnd.apple.mpegurl",
        Bytes::from(body),
    )
}

// ---------------------------------------------------------------- media bodies

/// Counts a media body in [`StandIn::open_streams`] while it lives.
struct CountedBody {
    inner: PatternBody,
    shared: Arc<Shared>,
}

impl CountedBody {
    fn new(inner: PatternBody, shared: Arc<Shared>) -> CountedBody {
        shared.open_streams.fetch_add(1, Ordering::SeqCst);
        CountedBody { inner, shared }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.shared.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl hyper::body::Body for CountedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `len` pattern bytes ([`crate::upstream::pattern_byte`]) with single-range support, as
/// `PhysicalFileResult { EnableRangeProcessing = true }` serves them (brief §4.1). Produced
/// lazily: hyper polls the body only as fast as the socket takes it.
fn media(rq: &Rq<'_>, len: u64, content_type: &'static str) -> Response<RespBody> {
    let (status, start, end_inclusive) = match parse_range(rq.parts.headers.get(header::RANGE), len)
    {
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
        .header(header::CONTENT_TYPE, content_type)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start);
    if let Some(b) = end_inclusive {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{b}/{len}"));
    }
    let body = if rq.parts.method == Method::HEAD {
        empty()
    } else {
        CountedBody::new(PatternBody::new(start, end), rq.shared.clone()).boxed()
    };
    builder.body(body).unwrap_or_else(|_| internal_error())
}

// ---------------------------------------------------------------- WebSocket

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// ASP.NET's `IsWebSocketRequest`: anything else falls through to routing.
fn is_websocket_request(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v.as_bytes() == b"13")
}

/// Removes its socket from the registry when the socket task ends, however it ends.
struct SocketGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.state().sockets.retain(|s| s.id != id);
    }
}

fn outbound(message_type: &str, data: Option<Value>) -> Message {
    let mut msg = json!({"MessageType": message_type, "MessageId": new_guid()});
    if let (Some(data), Some(obj)) = (data, msg.as_object_mut()) {
        obj.insert("Data".to_owned(), data);
    }
    Message::Text(msg.to_string())
}

/// The WebSocket middleware (brief §1.7): any path; `AuthService.Authenticate` over the
/// re-parsed query; then `ForceKeepAlive`, `KeepAlive` answers and (test affordance) echoes,
/// until the token's session ends or the stand-in is dropped.
fn websocket(
    rq: &Rq<'_>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<()>,
) -> Response<RespBody> {
    let query = Query::parse(rq.raw_query).url_decode_feature();
    let info = auth_info(&rq.parts.headers, &query);
    let authed = match authenticate(&shared, &info) {
        Auth::Valid(a) => a,
        Auth::NoToken => return text(StatusCode::FORBIDDEN, "text/plain", "Token is required"),
        Auth::Invalid => return text(StatusCode::FORBIDDEN, "text/plain", "Invalid token."),
    };
    let Some(key) = rq.parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
        return empty_status(StatusCode::BAD_REQUEST);
    };
    let accept = derive_accept_key(key.as_bytes());

    let (close_tx, mut close_rx) = oneshot::channel::<()>();
    let id = {
        let mut st = shared.state();
        // The token may have been logged out since it was checked.
        let Some(device_id) = st
            .devices
            .iter()
            .find(|d| d.token == authed.token)
            .map(|d| d.device_id.clone())
        else {
            return text(StatusCode::FORBIDDEN, "text/plain", "Invalid token.");
        };
        st.next_socket += 1;
        let id = st.next_socket;
        st.sockets.push(OpenSocket {
            id,
            device_id,
            close: Some(close_tx),
        });
        id
    };
    let guard = SocketGuard {
        shared: shared.clone(),
        id,
    };

    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = tokio::select! {
            up = on_upgrade => match up {
                Ok(up) => up,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if ws
            .send(outbound("ForceKeepAlive", Some(json!(KEEP_ALIVE_SECONDS))))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let msg = tokio::select! {
                msg = ws.next() => msg,
                _ = &mut close_rx => {
                    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                    let _ = ws.close(Some(frame)).await;
                    // Give the peer a moment to answer the close, then drop the connection.
                    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
                    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
                    return;
                }
                _ = shutdown.changed() => return,
            };
            let reply = match msg {
                Some(Ok(Message::Text(t))) => {
                    let is_keep_alive = serde_json::from_str::<Value>(&t).is_ok_and(|v| {
                        v.get("MessageType").and_then(Value::as_str) == Some("KeepAlive")
                    });
                    if is_keep_alive {
                        outbound("KeepAlive", None)
                    } else {
                        Message::Text(t)
                    }
                }
                Some(Ok(msg @ Message::Binary(_))) => msg,
                // Pings are answered and closes acknowledged by tungstenite itself.
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            };
            if ws.send(reply).await.is_err() {
                return;
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

// ---------------------------------------------------------------- JSON and responses

/// The JSON naming a response gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Pascal,
    Camel,
}

/// ASP.NET content negotiation over Jellyfin's two JSON formatters (brief §1.5): the Accept
/// media ranges are taken by quality (stable), and the first one some formatter can serve
/// decides. The PascalCase formatter comes first and serves `application/json` and
/// `application/json; profile="PascalCase"`; the camelCase one serves
/// `application/json; profile="CamelCase"`. A range matches when it is `application/json` (or
/// a wildcard) and its parameters before `q` are all among the formatter's — so a bare
/// `application/json` listed first wins over a later camelCase profile (the TypeScript SDK sends
/// exactly that and gets PascalCase). No match: PascalCase. Parameter values compare
/// case-insensitively with quotes removed (a guess at `MediaType` parsing). Returns the case
/// and the response's media type.
pub fn negotiate(accept: Option<&str>) -> (Case, &'static str) {
    const PASCAL: &str = "application/json";
    const PASCAL_PROFILE: &str = "application/json; profile=\"PascalCase\"";
    const CAMEL_PROFILE: &str = "application/json; profile=\"CamelCase\"";
    struct MediaRange {
        q: f64,
        ty: String,
        sub: String,
        params: Vec<(String, String)>,
    }
    let mut ranges: Vec<MediaRange> = Vec::new();
    for item in split_outside_quotes(accept.unwrap_or(""), ',') {
        let mut parts = split_outside_quotes(&item, ';').into_iter();
        let Some(media) = parts.next() else { continue };
        let Some((ty, sub)) = media.trim().split_once('/') else {
            continue;
        };
        let mut q = 1.0;
        let mut params = Vec::new();
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                continue;
            };
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim().trim_matches('"').to_ascii_lowercase();
            if k == "q" {
                q = v.parse().unwrap_or(0.0);
                // "q" separates the media-range parameters from the accept-params.
                break;
            }
            params.push((k, v));
        }
        ranges.push(MediaRange {
            q,
            ty: ty.trim().to_ascii_lowercase(),
            sub: sub.trim().to_ascii_lowercase(),
            params,
        });
    }
    ranges.sort_by(|a, b| b.q.partial_cmp(&a.q).unwrap_or(std::cmp::Ordering::Equal));
    for MediaRange {
        ty, sub, params, ..
    } in &ranges
    {
        if !(ty == "application" || ty == "*") || !(sub == "json" || sub == "*") {
            continue;
        }
        match params.as_slice() {
            [] => return (Case::Pascal, PASCAL),
            [(k, v)] if k == "profile" && v == "pascalcase" => {
                return (Case::Pascal, PASCAL_PROFILE)
            }
            [(k, v)] if k == "profile" && v == "camelcase" => return (Case::Camel, CAMEL_PROFILE),
            _ => {}
        }
    }
    (Case::Pascal, PASCAL)
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c == sep && !quoted {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.retain(|p| !p.trim().is_empty());
    out
}

/// `JsonNamingPolicy.CamelCase`: lower-cases the leading run of capitals, except the last
/// one when a lower-case letter follows (`Id` → `id`, `IsHDR` → `isHDR`, `URLPath` → `urlPath`).
pub fn camel_name(name: &str) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    for i in 0..chars.len() {
        if i == 1 && !chars[i].is_uppercase() {
            break;
        }
        let has_next = i + 1 < chars.len();
        if i > 0 && has_next && !chars[i + 1].is_uppercase() {
            if chars[i + 1] == ' ' {
                chars[i] = chars[i].to_lowercase().next().unwrap_or(chars[i]);
            }
            break;
        }
        chars[i] = chars[i].to_lowercase().next().unwrap_or(chars[i]);
    }
    chars.into_iter().collect()
}

fn to_camel(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (camel_name(&k), to_camel(v)))
                .collect::<Map<String, Value>>(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(to_camel).collect()),
        other => other,
    }
}

/// Whether `Accept-Encoding` allows gzip (explicitly, or through `*`, with q > 0).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let value = header_joined(headers, "accept-encoding").unwrap_or_default();
    let (mut gzip, mut any) = (None, None);
    for item in value.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f64;
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
        }
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q),
            "*" => any = Some(q),
            _ => {}
        }
    }
    gzip.or(any).is_some_and(|q| q > 0.0)
}

fn json_ok(rq: &Rq<'_>, value: Value) -> Response<RespBody> {
    json_response(rq, StatusCode::OK, value)
}

fn json_response(rq: &Rq<'_>, status: StatusCode, value: Value) -> Response<RespBody> {
    let accept = header_joined(&rq.parts.headers, "accept");
    let (case, media_type) = negotiate(accept.as_deref());
    let value = match case {
        Case::Pascal => value,
        Case::Camel => to_camel(value),
    };
    let mut body = value.to_string().into_bytes();
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, format!("{media_type}; charset=utf-8"));
    if rq.shared.state().gzip {
        builder = builder.header(header::VARY, "Accept-Encoding");
        if accepts_gzip(&rq.parts.headers) {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            if enc.write_all(&body).is_ok() {
                if let Ok(gz) = enc.finish() {
                    body = gz;
                    builder = builder.header(header::CONTENT_ENCODING, "gzip");
                }
            }
        }
    }
    builder
        .body(full(body))
        .unwrap_or_else(|_| internal_error())
}

fn bytes_response(
    rq: &Rq<'_>,
    status: StatusCode,
    content_type: &str,
    bytes: Bytes,
) -> Response<RespBody> {
    let len = bytes.len();
    let body = if rq.parts.method == Method::HEAD {
        empty()
    } else {
        full(bytes)
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .unwrap_or_else(|_| internal_error())
}

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed()
}

fn empty() -> RespBody {
    Empty::new().boxed()
}

fn empty_status(status: StatusCode) -> Response<RespBody> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = status;
    resp
}

fn text(status: StatusCode, content_type: &str, body: &str) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body.to_owned()))
        .unwrap_or_else(|_| internal_error())
}

fn redirect(status: StatusCode, location: &'static str) -> Response<RespBody> {
    let mut resp = empty_status(status);
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    resp
}

fn internal_error() -> Response<RespBody> {
    let mut resp = Response::new(full("stand-in: cannot build response"));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp
}
