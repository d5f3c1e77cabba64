//! Upstream probes: whether anything answers at each route's upstream address, said in plain
//! words an operator can act on ("route `jellyfin`: nothing answers at 127.0.0.1:8096 — is
//! Jellyfin running, and bound to that address?"). The gateway probes every route once at start
//! (a TCP connect) and afresh for each `/readyz` (a connect, plus for Jellyfin, Emby and Plex
//! one unauthenticated identity request). Probes run concurrently, each bounded by
//! [`PROBE_TIMEOUT`], and never on the request path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus::IntGaugeVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Route, RouteKind};

/// Longest one route's probe may take, connect and identity request together.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes of an identity answer read while looking for its status line.
const MAX_STATUS_LINE_BYTES: usize = 1024;

/// How far a probe goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// A TCP connect only: nothing is sent, so the upstream logs nothing.
    Connect,
    /// A connect, then for Jellyfin and Emby `GET {prefix}/System/Info/Public` and for Plex
    /// `GET /identity` (both answer without credentials), which must answer 200.
    Identify,
}

/// Why a route's upstream did not pass its probe.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The connection was refused: nothing listens at that address.
    #[error("nothing answers")]
    NothingAnswers,
    /// The connection attempt got no reply at all (a filtered port, a host that is down).
    #[error("nothing answers within {}s", .0.as_secs_f32())]
    NoReply(Duration),
    /// Another network error (unreachable network, address not available…).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// Something accepted the connection but sent no HTTP answer in time.
    #[error("accepts connections but gives no HTTP answer to GET {0}")]
    NoHttpAnswer(String),
    /// Something answered, but not with an HTTP status line.
    #[error("accepts connections but does not speak plain HTTP")]
    NotHttp,
    /// The identity request got an unexpected status.
    #[error("answers GET {path} with {status}")]
    WrongStatus { path: String, status: u16 },
}

/// The result of probing one route.
#[derive(Clone, Debug)]
pub struct RouteProbe {
    pub route: String,
    pub upstream: SocketAddr,
    pub kind: RouteKind,
    pub result: Result<(), ProbeError>,
    pub took: Duration,
}

/// How the operator would name the software behind a route of this kind.
pub fn server_name(kind: RouteKind) -> &'static str {
    match kind {
        RouteKind::Generic => "the upstream",
        RouteKind::Jellyfin => "Jellyfin",
        RouteKind::Emby => "Emby",
        RouteKind::Plex => "Plex Media Server",
    }
}

/// The question to ask when a route's upstream does not answer.
pub fn hint(kind: RouteKind, error: &ProbeError) -> String {
    let server = server_name(kind);
    match error {
        ProbeError::NothingAnswers => {
            format!("is {server} running, and bound to that address?")
        }
        ProbeError::NoReply(_) | ProbeError::Connect(_) => format!(
            "is {server} running there, and is that address reachable from this machine (a \
             firewall, a container network)?"
        ),
        ProbeError::NoHttpAnswer(_) | ProbeError::NotHttp => {
            format!("is that {server}'s HTTP port, and not another service or an HTTPS-only port?")
        }
        ProbeError::WrongStatus { .. } => {
            format!("is that {server}, and is the route's path_prefix its base URL?")
        }
    }
}

impl RouteProbe {
    /// `ok`, or what went wrong in a few words.
    pub fn state(&self) -> String {
        match &self.result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// One plain sentence for the log and `/readyz`.
    pub fn sentence(&self) -> String {
        let (route, at) = (&self.route, self.upstream);
        match &self.result {
            Ok(()) => format!(
                "route `{route}`: {} answers at {at}",
                server_name(self.kind)
            ),
            Err(e) => format!("route `{route}`: {e} at {at} — {}", hint(self.kind, e)),
        }
    }

    /// The entry of `/readyz`'s `upstreams` array.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "route": self.route,
            "upstream": self.upstream.to_string(),
            "kind": self.kind.as_str(),
            "state": self.state(),
            "message": self.result.is_err().then(|| self.sentence()),
            "probe_seconds": self.took.as_secs_f64(),
        })
    }
}

/// The path that identifies the media server behind a route, if its kind has one.
fn identity_path(route: &Route) -> Option<String> {
    let path = match route.kind {
        RouteKind::Generic => return None,
        RouteKind::Jellyfin | RouteKind::Emby => "/System/Info/Public",
        // Plex answers only at its root; a path prefix is not part of its URLs.
        RouteKind::Plex => return Some("/identity".to_string()),
    };
    Some(if route.path_prefix == "/" {
        path.to_string()
    } else {
        format!("{}{path}", route.path_prefix)
    })
}

/// The status code of an HTTP/1.x status line at the start of `head`, once it has arrived.
fn status_of(head: &[u8]) -> Option<Result<u16, ProbeError>> {
    let end = head.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(&head[..end]);
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let code = parts.next().and_then(|c| c.parse::<u16>().ok());
    Some(match code {
        Some(code) if version.starts_with("HTTP/1.") && (100..600).contains(&code) => Ok(code),
        _ => Err(ProbeError::NotHttp),
    })
}

fn connect_error(e: &std::io::Error) -> ProbeError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ProbeError::NothingAnswers,
        std::io::ErrorKind::TimedOut => ProbeError::NoReply(PROBE_TIMEOUT),
        _ => ProbeError::Connect(e.to_string()),
    }
}

/// Sends the identity request on `stream` and reads the status line of the answer.
async fn identify(mut stream: TcpStream, addr: SocketAddr, path: &str) -> Result<(), ProbeError> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portcullis-probe\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    let no_answer = || ProbeError::NoHttpAnswer(path.to_string());
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|_| no_answer())?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.map_err(|_| no_answer())?;
        if n == 0 {
            return Err(match status_of(&head) {
                Some(Err(e)) => e,
                _ if head.is_empty() => no_answer(),
                _ => ProbeError::NotHttp,
            });
        }
        head.extend_from_slice(&buf[..n]);
        match status_of(&head) {
            Some(Ok(200)) => return Ok(()),
            Some(Ok(status)) => {
                return Err(ProbeError::WrongStatus {
                    path: path.to_string(),
                    status,
                })
            }
            Some(Err(e)) => return Err(e),
            None if head.len() > MAX_STATUS_LINE_BYTES => return Err(ProbeError::NotHttp),
            None => {}
        }
    }
}

/// Probes one route, within [`PROBE_TIMEOUT`].
pub async fn probe(route: &Route, depth: Depth) -> RouteProbe {
    let start = Instant::now();
    let connected = std::sync::atomic::AtomicBool::new(false);
    let work = async {
        let addr = route.upstream;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| connect_error(&e))?;
        connected.store(true, std::sync::atomic::Ordering::Relaxed);
        match (depth, identity_path(route)) {
            (Depth::Identify, Some(path)) => identify(stream, addr, &path).await,
            _ => Ok(()),
        }
    };
    let result = match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) if connected.load(std::sync::atomic::Ordering::Relaxed) => Err(
            ProbeError::NoHttpAnswer(identity_path(route).unwrap_or_default()),
        ),
        Err(_) => Err(ProbeError::NoReply(PROBE_TIMEOUT)),
    };
    RouteProbe {
        route: route.name.clone(),
        upstream: route.upstream,
        kind: route.kind,
        result,
        took: start.elapsed(),
    }
}

/// Probes every route at once; the whole takes at most about [`PROBE_TIMEOUT`].
pub async fn probe_all(routes: &[Route], depth: Depth) -> Vec<RouteProbe> {
    futures_util::future::join_all(
        routes
            .iter()
            .filter(|r| !r.retired)
            .map(|r| probe(r, depth)),
    )
    .await
}

/// Sets `portcullis_upstream_up{route}` from the probes.
pub fn record(probes: &[RouteProbe], up: &IntGaugeVec) {
    for p in probes {
        up.with_label_values(&[p.route.as_str()])
            .set(i64::from(p.result.is_ok()));
    }
}

/// The start-up probe: one line per route, a warning for each that does not answer.
pub async fn at_start(routes: Vec<Route>, up: IntGaugeVec) {
    let probes = probe_all(&routes, Depth::Connect).await;
    record(&probes, &up);
    for p in &probes {
        match &p.result {
            Ok(()) => tracing::info!(
                route = %p.route,
                upstream = %p.upstream,
                "{}",
                p.sentence()
            ),
            Err(_) => tracing::warn!(
                route = %p.route,
                upstream = %p.upstream,
                "{}",
                p.sentence()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_once_complete() {
        assert_eq!(status_of(b"HTTP/1.1 20"), None);
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(Ok(200)));
        assert_eq!(status_of(b"HTTP/1.0 404 Not Found\r\nX: y"), Some(Ok(404)));
        assert_eq!(
            status_of(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Some(Err(ProbeError::NotHttp))
        );
        assert_eq!(
            status_of(b"\x16\x03\x01\x00\n"),
            Some(Err(ProbeError::NotHttp))
        );
        assert_eq!(
            status_of(b"HTTP/1.1 999 Nope\n"),
            Some(Err(ProbeError::NotHttp))
        );
    }

    #[test]
    fn sentences_name_the_route_the_address_and_the_server() {
        let p = RouteProbe {
            route: "jellyfin".into(),
            upstream: "127.0.0.1:8096".parse().unwrap(),
            kind: RouteKind::Jellyfin,
            result: Err(ProbeError::NothingAnswers),
            took: Duration::ZERO,
        };
        assert_eq!(
            p.sentence(),
            "route `jellyfin`: nothing answers at 127.0.0.1:8096 — is Jellyfin running, and \
             bound to that address?"
        );
        assert_eq!(p.state(), "nothing answers");
        let ok = RouteProbe {
            result: Ok(()),
            ..p.clone()
        };
        assert_eq!(ok.state(), "ok");
        assert!(ok.json()["message"].is_null());
        let wrong = RouteProbe {
            result: Err(ProbeError::WrongStatus {
                path: "/System/Info/Public".into(),
                status: 404,
            }),
            ..p
        };
        assert_eq!(wrong.state(), "answers GET /System/Info/Public with 404");
    }
}
