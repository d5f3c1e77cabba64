//! Admission of downstream connections: a deadline for each request head and a cap on the
//! connections one client address may hold (slowloris).
//!
//! Pingora reads a request head before any `ProxyHttp` hook runs, with only a per-read timeout,
//! so a client that trickles a byte every few seconds would keep its connection for ever, and
//! a few thousand such clients would hold every descriptor. The gateway therefore watches its
//! listening sockets from outside: the proxy marks a connection busy when a complete head has
//! arrived (`head_arrived`) and waiting again when its response has ended (`response_ended`),
//! and a watchman thread lists the process's sockets on the public port every `tick`.
//! A connection that has been waiting for a head longer than `head_timeout` — a slow head, a
//! TLS handshake never finished, or an idle keep-alive — is shut down, as are the newest
//! waiting connections of an address that holds more than `max_per_ip`. A busy connection (a
//! stream, a WebSocket) is never cut by either rule.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why the watchman closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// No complete request head within the deadline.
    HeadTimeout,
    /// The client address held more connections than allowed.
    PerIpCap,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::HeadTimeout => "head_timeout",
            Closed::PerIpCap => "per_ip_cap",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum State {
    /// Waiting for a request head since then.
    Waiting(Instant),
    /// Requests are being served: one on HTTP/1.1, any number of streams on HTTP/2.
    Busy(u32),
}

/// A downstream socket as the watchman lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub fd: i32,
    pub peer: SocketAddr,
}

const SHARDS: usize = 16;
/// The capacity a shard's table keeps however few connections are left.
const MIN_CAPACITY: usize = 64;

/// The state of every downstream connection, keyed by its peer address (unique among open TCP
/// connections to one listening port).
#[derive(Debug)]
pub struct Admission {
    shards: [Mutex<HashMap<SocketAddr, State>>; SHARDS],
    pub head_timeout: Duration,
    pub max_per_ip: usize,
}

fn shard_of(peer: &SocketAddr) -> usize {
    // The port spreads one client's connections; the low bits suffice.
    (peer.port() as usize ^ usize::from(peer.ip().is_ipv6())) % SHARDS
}

impl Admission {
    pub fn new(head_timeout: Duration, max_per_ip: usize) -> Self {
        Admission {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            head_timeout,
            max_per_ip,
        }
    }

    fn set(&self, peer: SocketAddr, state: State) {
        self.update(peer, |_| state);
    }

    /// Replaces the state of the connection from `peer` with `next(its state now)`.
    /// Hashes `peer` once (the map keeps SipHash: clients choose their addresses and ports).
    fn update(&self, peer: SocketAddr, next: impl FnOnce(Option<State>) -> State) {
        use std::collections::hash_map::Entry;
        if let Ok(mut map) = self.shards[shard_of(&peer)].lock() {
            let entry = map.entry(peer);
            let state = match &entry {
                Entry::Occupied(e) => Some(*e.get()),
                Entry::Vacant(_) => None,
            };
            entry.insert_entry(next(state));
        }
    }

    /// A complete request head arrived on the connection from `peer` (another stream, on
    /// HTTP/2).
    pub fn head_arrived(&self, peer: SocketAddr) {
        self.update(peer, |state| match state {
            Some(State::Busy(n)) => State::Busy(n.saturating_add(1)),
            _ => State::Busy(1),
        });
    }

    /// A response on the connection from `peer` ended; once none is left, the connection waits
    /// for the next head (a long stream on one HTTP/2 stream is not cut because another
    /// stream of the connection ended).
    pub fn response_ended(&self, peer: SocketAddr, now: Instant) {
        self.update(peer, |state| match state {
            Some(State::Busy(n)) if n > 1 => State::Busy(n - 1),
            _ => State::Waiting(now),
        });
    }

    /// Takes the sockets open on the public port now and returns those to close, with why.
    /// Connections no longer open are forgotten; new ones start waiting at `now`.
    pub fn review(&self, sockets: &[Socket], now: Instant) -> Vec<(Socket, Closed)> {
        let live: HashSet<SocketAddr> = sockets.iter().map(|s| s.peer).collect();
        for shard in &self.shards {
            if let Ok(mut map) = shard.lock() {
                map.retain(|peer, _| live.contains(peer));
                crate::shrink_after_burst(&mut map, MIN_CAPACITY);
            }
        }
        let mut per_ip: HashMap<IpAddr, Vec<(Socket, Option<Instant>)>> = HashMap::new();
        for s in sockets {
            let known = self.shards[shard_of(&s.peer)]
                .lock()
                .map(|map| map.get(&s.peer).copied())
                .unwrap_or(None);
            let since = match known {
                Some(State::Busy(_)) => None,
                Some(State::Waiting(t)) => Some(t),
                None => {
                    self.set(s.peer, State::Waiting(now));
                    Some(now)
                }
            };
            per_ip.entry(s.peer.ip()).or_default().push((*s, since));
        }
        let mut close = Vec::new();
        for (_, mut conns) in per_ip {
            let mut excess = conns.len().saturating_sub(self.max_per_ip);
            // Newest waiting first: an address at its cap keeps its established connections.
            conns.sort_by_key(|(_, since)| std::cmp::Reverse(*since));
            for (s, since) in conns {
                let Some(since) = since else { continue };
                if excess > 0 {
                    excess -= 1;
                    close.push((s, Closed::PerIpCap));
                } else if now.saturating_duration_since(since) >= self.head_timeout {
                    close.push((s, Closed::HeadTimeout));
                }
            }
        }
        for (s, _) in &close {
            if let Ok(mut map) = self.shards[shard_of(&s.peer)].lock() {
                map.remove(&s.peer);
            }
        }
        close
    }

    /// Connections the watchman currently knows of (open, busy or waiting).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }
}

/// The process's TCP sockets whose local port is `port` and that have a peer: the accepted
/// connections of the listener on that port.
pub fn sockets_on_port(port: u16) -> Vec<Socket> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if crate::mediaserver::local_addr_of(fd).map(|a| a.port()) != Some(port) {
            continue;
        }
        if let Some(peer) = crate::mediaserver::peer_addr_of(fd) {
            out.push(Socket { fd, peer });
        }
    }
    out
}

/// Shuts the socket down if descriptor `fd` is still the connection from `peer` on `port`.
pub fn shut(socket: Socket, port: u16) -> bool {
    let fd = socket.fd;
    if crate::mediaserver::local_addr_of(fd).map(|a| a.port()) != Some(port)
        || crate::mediaserver::peer_addr_of(fd) != Some(socket.peer)
    {
        return false;
    }
    // SAFETY: shutdown(2) on a descriptor number has no memory effects; the check above makes
    // sure it is still the downstream connection the watchman judged.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(fd: i32, ip: [u8; 4], port: u16) -> Socket {
        Socket {
            fd,
            peer: SocketAddr::from((ip, port)),
        }
    }

    #[test]
    fn a_waiting_connection_closes_at_the_deadline_and_a_busy_one_never() {
        let a = Admission::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        let slow = sock(5, [10, 0, 0, 1], 1000);
        let stream = sock(6, [10, 0, 0, 1], 1001);
        assert!(a.review(&[slow, stream], t0).is_empty());
        a.head_arrived(stream.peer);
        assert!(a
            .review(&[slow, stream], t0 + Duration::from_secs(9))
            .is_empty());
        assert_eq!(
            a.review(&[slow, stream], t0 + Duration::from_secs(10)),
            vec![(slow, Closed::HeadTimeout)]
        );
        assert!(a
            .review(&[stream], t0 + Duration::from_secs(3600))
            .is_empty());
        a.response_ended(stream.peer, t0 + Duration::from_secs(3600));
        assert_eq!(
            a.review(&[stream], t0 + Duration::from_secs(3610)),
            vec![(stream, Closed::HeadTimeout)]
        );
    }

    #[test]
    fn an_http2_connection_waits_only_once_its_last_stream_ended() {
        let a = Admission::new(Duration::from_secs(30), 10);
        let t0 = Instant::now();
        let conn = sock(5, [10, 0, 0, 1], 1000);
        a.review(&[conn], t0);
        // A long download and a short request on one connection; the short one ends.
        a.head_arrived(conn.peer);
        a.head_arrived(conn.peer);
        a.response_ended(conn.peer, t0 + Duration::from_secs(1));
        assert!(a.review(&[conn], t0 + Duration::from_secs(3600)).is_empty());
        // The download ends too: from then on the connection waits, and is cut in time.
        a.response_ended(conn.peer, t0 + Duration::from_secs(3600));
        assert_eq!(
            a.review(&[conn], t0 + Duration::from_secs(3630)),
            vec![(conn, Closed::HeadTimeout)]
        );
    }

    #[test]
    fn an_address_over_its_cap_loses_its_newest_waiting_connections() {
        let a = Admission::new(Duration::from_secs(30), 2);
        let t0 = Instant::now();
        let old = sock(5, [10, 0, 0, 1], 1000);
        a.review(&[old], t0);
        let busy = sock(6, [10, 0, 0, 1], 1001);
        a.review(&[old, busy], t0);
        a.head_arrived(busy.peer);
        let new1 = sock(7, [10, 0, 0, 1], 1002);
        let new2 = sock(8, [10, 0, 0, 1], 1003);
        let other = sock(9, [10, 0, 0, 2], 1000);
        let t1 = t0 + Duration::from_secs(1);
        let mut closed = a.review(&[old, busy, new1, new2, other], t1);
        closed.sort_by_key(|(s, _)| s.fd);
        assert_eq!(
            closed,
            vec![(new1, Closed::PerIpCap), (new2, Closed::PerIpCap)]
        );
        assert_eq!(a.tracked(), 3, "closed connections are forgotten");
    }

    #[test]
    fn the_tables_shrink_once_a_burst_of_connections_has_gone() {
        let a = Admission::new(Duration::from_secs(30), 100_000);
        let t0 = Instant::now();
        let capacity = |a: &Admission| {
            a.shards
                .iter()
                .map(|s| s.lock().unwrap().capacity())
                .sum::<usize>()
        };
        let burst: Vec<Socket> = (0..10_000)
            .map(|i| sock(i, [10, 0, (i / 250) as u8, 1], (1000 + i % 250) as u16))
            .collect();
        a.review(&burst, t0);
        assert_eq!(a.tracked(), 10_000);
        assert!(capacity(&a) >= 10_000);
        // Ten stay: each shard is back to its floor.
        a.review(&burst[..10], t0);
        assert_eq!(a.tracked(), 10);
        assert!(
            capacity(&a) <= SHARDS * 2 * MIN_CAPACITY,
            "{}",
            capacity(&a)
        );
        a.review(&burst[..10], t0);
        assert_eq!(a.tracked(), 10);
    }

    #[test]
    fn closed_connections_are_forgotten() {
        let a = Admission::new(Duration::from_secs(30), 2);
        let t0 = Instant::now();
        a.review(&[sock(5, [10, 0, 0, 1], 1000)], t0);
        a.response_ended(SocketAddr::from(([10, 0, 0, 1], 1001)), t0);
        assert_eq!(a.tracked(), 2);
        a.review(&[], t0);
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn the_listener_sockets_are_found_and_shut() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let found = sockets_on_port(port);
        assert_eq!(
            found,
            vec![Socket {
                fd: accepted.as_raw_fd(),
                peer
            }]
        );
        assert!(shut(found[0], port));
        let mut buf = [0u8; 1];
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the client sees the close"
        );
        assert!(!shut(
            Socket {
                fd: accepted.as_raw_fd(),
                peer: SocketAddr::from(([10, 9, 9, 9], 1))
            },
            port
        ));
    }
}
