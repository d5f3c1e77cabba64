//! `portcullis healthcheck`: one HTTP/1.1 `GET /healthz` to the admin listener over a plain TCP
//! connection with a deadline, for container health checks (the image has no curl). Healthy is
//! a `200` answer; anything else is one line saying what went wrong.
//!
//! Only `server.admin_listen` is read from the config file, so a running gateway is not reported
//! dead because of something the full validation checks afresh (such as an upstream host name
//! that does not resolve at this moment).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::DEFAULT_ADMIN_LISTEN;

/// The most bytes read while looking for the status line.
const MAX_HEAD_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {problem}")]
    Config { file: String, problem: String },
    #[error("`{value}` is not a host:port address that resolves")]
    Address { value: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: no answer within {}", humantime::format_duration(*timeout))]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("{addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: the answer is not HTTP: {head:?}")]
    NotHttp { addr: SocketAddr, head: String },
    #[error("{addr}: /healthz answered {status}")]
    Unhealthy { addr: SocketAddr, status: u16 },
}

/// The admin listener named by a config file: `server.admin_listen`, or its default.
pub fn admin_listen_of(path: &Path) -> Result<String, HealthError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| HealthError::Read {
        file: file.clone(),
        source,
    })?;
    admin_listen_in(&text).map_err(|problem| HealthError::Config { file, problem })
}

/// `server.admin_listen` in config text, or the default when it is not set.
fn admin_listen_in(text: &str) -> Result<String, String> {
    let value: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let Some(server) = value.get("server") else {
        return Ok(DEFAULT_ADMIN_LISTEN.to_string());
    };
    let server = server
        .as_table()
        .ok_or_else(|| "`server` is not a table".to_string())?;
    match server.get("admin_listen") {
        None => Ok(DEFAULT_ADMIN_LISTEN.to_string()),
        Some(toml::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("key `server.admin_listen`: not a string".to_string()),
    }
}

/// Where to connect to reach a listener bound to `addr`: a wildcard address (`0.0.0.0`, `[::]`)
/// is reached on loopback.
pub fn probe_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// Resolves `host:port` text to the address to probe.
pub fn resolve(value: &str) -> Result<SocketAddr, HealthError> {
    value
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(probe_addr)
        .ok_or_else(|| HealthError::Address {
            value: value.to_string(),
        })
}

/// The status code of an HTTP/1.x status line at the start of `head`, once the line is whole.
fn status_of(head: &[u8]) -> Option<u16> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// Sends `GET /healthz` to `addr` and waits for the status line, all within `timeout`.
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<(), HealthError> {
    let deadline = Instant::now() + timeout;
    let timed_out = || HealthError::Timeout { addr, timeout };
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => timed_out(),
        _ => HealthError::Io { addr, source },
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|source| {
        if source.kind() == std::io::ErrorKind::TimedOut {
            timed_out()
        } else {
            HealthError::Connect { addr, source }
        }
    })?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)
    };
    stream.set_write_timeout(Some(remaining()?)).map_err(io)?;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: portcullis-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    loop {
        stream.set_read_timeout(Some(remaining()?)).map_err(io)?;
        let n = stream.read(&mut buf).map_err(io)?;
        head.extend_from_slice(&buf[..n]);
        if let Some(status) = status_of(&head) {
            return if status == 200 {
                Ok(())
            } else {
                Err(HealthError::Unhealthy { addr, status })
            };
        }
        let line_done = head.windows(2).any(|w| w == b"\r\n");
        if n == 0 || line_done || head.len() >= MAX_HEAD_BYTES {
            let shown: String = String::from_utf8_lossy(&head).chars().take(80).collect();
            return Err(HealthError::NotHttp { addr, head: shown });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_is_read_once_whole() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\nx: y"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.1 200 OK"), None, "line not finished");
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 20 OK\r\n"), None);
        assert_eq!(status_of(b"HTTP/2 200\r\n"), None);
    }

    #[test]
    fn wildcard_listeners_are_probed_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        assert_eq!(probe_addr(v4), "127.0.0.1:9090".parse().unwrap());
        let v6: SocketAddr = "[::]:9090".parse().unwrap();
        assert_eq!(probe_addr(v6), "[::1]:9090".parse().unwrap());
        let named: SocketAddr = "10.1.2.3:9090".parse().unwrap();
        assert_eq!(probe_addr(named), named);
    }

    #[test]
    fn admin_listen_comes_from_the_server_table_or_the_default() {
        assert_eq!(
            admin_listen_in("[server]\nadmin_listen = \"0.0.0.0:9191\"\n").unwrap(),
            "0.0.0.0:9191"
        );
        assert_eq!(
            admin_listen_in("[store]\nurl = \"sqlite://x\"\n").unwrap(),
            DEFAULT_ADMIN_LISTEN
        );
        let e = admin_listen_in("[server]\nadmin_listen = 9090\n").unwrap_err();
        assert!(e.contains("server.admin_listen"), "{e}");
        assert!(admin_listen_in("[server\n").is_err());
    }
}
