//! Media servers behind the gateway (Jellyfin, and Emby which differs only in carriers and
//! prefixes). The pure parts live in submodules: where clients carry tokens (`carrier`), which
//! endpoint a request is for (`endpoint`), and the gateway's own calls upstream (`upstream`).
//! This module holds the in-memory state that goes with them, per instance:
//!
//! - playback grants: an authenticated `PlaybackInfo` (or universal audio) call lets
//!   credential-less stream requests for that item from that address through while the
//!   session it was made with is alive (Android TV, Swiftfin and external players send none);
//! - addresses a live session was seen at, for credential-less artwork;
//! - Quick Connect codes approved through the gateway, and by whom;
//! - the registry of long-lived proxied connections (WebSockets, streams) per session, so a
//!   revocation can close them: the gateway shuts the upstream socket down, which ends the
//!   proxied exchange and closes the client's connection.

pub mod carrier;
pub mod endpoint;
pub mod plex;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use moka::sync::Cache;

use crate::auth::Identity;
use crate::revocation::RevocationView;

/// Longest a Quick Connect code stays useful (Jellyfin keeps it 10 minutes).
pub const QUICK_CONNECT_TTL: Duration = Duration::from_secs(10 * 60);
/// A credential-less image is let through from an address a live session of the route was
/// seen at within this long.
pub const SEEN_TTL: Duration = Duration::from_secs(3600);
/// How often open connections are checked against the view.
pub const CONNECTION_CHECK: Duration = Duration::from_millis(200);
/// Quick Connect codes a client address may ask for per [`QUICK_CONNECT_TTL`].
pub const MAX_INITIATES_PER_IP: u32 = 30;
/// Refused Quick Connect approvals a user may make per [`QUICK_CONNECT_TTL`] (guessing codes).
pub const MAX_FAILED_APPROVALS: u32 = 10;
/// Quick Connect secrets one client address may redeem without an approval per
/// [`QUICK_CONNECT_TTL`] (guessing secrets; each miss also costs a store sync).
pub const MAX_FAILED_REDEEMS_PER_IP: u32 = 10;
/// Unknown tokens one client address may have checked upstream per [`QUICK_CONNECT_TTL`]
/// (`adopt_unknown_tokens`): random tokens must not turn the gateway into a request amplifier.
pub const MAX_ADOPTIONS_PER_IP: u32 = 30;
/// An unknown token that `GET /Users/Me` refused is not asked about again for this long.
pub const ADOPT_NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// The form in which a Quick Connect secret is remembered and shared between replicas: its
/// SHA-256 (the secret is 256 random bits, so the hash names it without revealing it).
pub fn secret_hash(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Who approved a Quick Connect code through the gateway.
#[derive(Clone, Debug)]
pub struct Approval {
    pub user_id: i64,
    pub is_admin: bool,
}

/// A playback grant: the identity that asked, until when.
#[derive(Clone, Debug)]
struct Grant {
    identity: Identity,
    until_ms: i64,
}

/// A long-lived proxied connection: the upstream socket and whose session it serves.
struct LiveConn {
    identity: Identity,
    fd: i32,
    local_port: u16,
    peer: SocketAddr,
}

pub struct MediaState {
    grants: Cache<(usize, String, String), Grant>,
    seen: Cache<(usize, String), Identity>,
    approvals: Cache<(usize, String), Approval>,
    secrets: Cache<(usize, String), String>,
    adopt_refused: Cache<[u8; 32], ()>,
    initiates: Cache<String, u32>,
    adoptions: Cache<String, u32>,
    failed_approvals: Cache<i64, u32>,
    failed_redeems: Cache<String, u32>,
    conns: Mutex<HashMap<u64, LiveConn>>,
    next_conn: AtomicU64,
    /// Woken when a revocation may have made an upstream logout due.
    pub logout_wake: tokio::sync::Notify,
    /// Woken when a revocation has reached the view: open connections it ends are closed at
    /// once rather than at the next `CONNECTION_CHECK`.
    pub connection_wake: tokio::sync::Notify,
}

impl MediaState {
    /// `max_grant` is the longest grant lifetime of any route.
    pub fn new(max_grant: Duration) -> MediaState {
        MediaState {
            grants: Cache::builder()
                .max_capacity(200_000)
                .time_to_live(max_grant)
                .build(),
            seen: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(SEEN_TTL)
                .build(),
            approvals: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(QUICK_CONNECT_TTL)
                .build(),
            secrets: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(QUICK_CONNECT_TTL)
                .build(),
            adopt_refused: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ADOPT_NEGATIVE_TTL)
                .build(),
            initiates: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(QUICK_CONNECT_TTL)
                .build(),
            adoptions: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(QUICK_CONNECT_TTL)
                .build(),
            failed_approvals: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(QUICK_CONNECT_TTL)
                .build(),
            failed_redeems: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(QUICK_CONNECT_TTL)
                .build(),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            logout_wake: tokio::sync::Notify::new(),
            connection_wake: tokio::sync::Notify::new(),
        }
    }

    /// Records a playback grant for `item` from `ip` on route `route`.
    pub fn grant(&self, route: usize, item: &str, ip: &str, identity: &Identity, until_ms: i64) {
        self.grants.insert(
            (route, item.to_string(), ip.to_string()),
            Grant {
                // A grant lets a credential-less request through: one factor, on every
                // replica alike (the copies other replicas learn of carry no more).
                identity: Identity {
                    factors: 1,
                    ..identity.clone()
                },
                until_ms,
            },
        );
    }

    /// The identity of a live grant for `item` from `ip`, if its session is still alive.
    pub fn granted(
        &self,
        route: usize,
        item: &str,
        ip: &str,
        view: &RevocationView,
        now_ms: i64,
    ) -> Option<Identity> {
        let key = (route, item.to_string(), ip.to_string());
        let g = self.grants.get(&key)?;
        if g.until_ms <= now_ms || !alive(&g.identity, view, now_ms) {
            self.grants.invalidate(&key);
            return None;
        }
        Some(g.identity)
    }

    /// Live playback grants (approximate: expired entries leave lazily).
    pub fn grant_count(&self) -> u64 {
        self.grants.run_pending_tasks();
        self.grants.entry_count()
    }

    /// Notes that a live session of `route` was seen at `ip`.
    pub fn seen_at(&self, route: usize, ip: &str, identity: &Identity) {
        let key = (route, ip.to_string());
        if self.seen.get(&key).is_some_and(|i| i.sid == identity.sid) {
            return;
        }
        self.seen.insert(key, identity.clone());
    }

    /// A live session seen at `ip` on `route`, for credential-less artwork.
    pub fn seen_session(
        &self,
        route: usize,
        ip: &str,
        view: &RevocationView,
        now_ms: i64,
    ) -> Option<Identity> {
        let id = self.seen.get(&(route, ip.to_string()))?;
        alive(&id, view, now_ms).then_some(id)
    }

    /// Remembers that the Quick Connect secret with this hash (see [`secret_hash`]) belongs
    /// to `code` (from an `Initiate` answer).
    pub fn remember_secret(&self, route: usize, secret_hash: &str, code: &str) {
        self.secrets
            .insert((route, secret_hash.to_string()), code.to_string());
    }

    pub fn approve(&self, route: usize, code: &str, approval: Approval) {
        self.approvals.insert((route, code.to_string()), approval);
    }

    /// Who approved the code that the secret with this hash was issued with, if it was
    /// approved through the gateway.
    pub fn approval_for_secret(&self, route: usize, secret_hash: &str) -> Option<Approval> {
        let code = self.secrets.get(&(route, secret_hash.to_string()))?;
        self.approvals.get(&(route, code))
    }

    /// Counts a Quick Connect `Initiate` from `ip`; false once the address asked too often.
    /// Whether `ip` may still try to redeem a Quick Connect secret.
    pub fn redeem_allowed(&self, ip: &str) -> bool {
        self.failed_redeems.get(ip).unwrap_or(0) < MAX_FAILED_REDEEMS_PER_IP
    }

    /// Counts a secret `ip` tried to redeem that was never approved through the gateway.
    pub fn redeem_failed(&self, ip: &str) {
        let n = self.failed_redeems.get(ip).unwrap_or(0) + 1;
        self.failed_redeems.insert(ip.to_string(), n);
    }

    pub fn initiate_allowed(&self, ip: &str) -> bool {
        let n = self.initiates.get(ip).unwrap_or(0) + 1;
        self.initiates.insert(ip.to_string(), n);
        n <= MAX_INITIATES_PER_IP
    }

    /// Counts an unknown token from `ip` checked upstream; false once the address has had its
    /// share.
    pub fn adoption_allowed(&self, ip: &str) -> bool {
        let n = self.adoptions.get(ip).unwrap_or(0) + 1;
        self.adoptions.insert(ip.to_string(), n);
        n <= MAX_ADOPTIONS_PER_IP
    }

    /// Whether a user may still try to approve Quick Connect codes.
    pub fn approvals_allowed(&self, user_id: i64) -> bool {
        self.failed_approvals.get(&user_id).unwrap_or(0) < MAX_FAILED_APPROVALS
    }

    /// Counts an approval the media server refused (a wrong or stale code).
    pub fn approval_failed(&self, user_id: i64) {
        let n = self.failed_approvals.get(&user_id).unwrap_or(0) + 1;
        self.failed_approvals.insert(user_id, n);
    }

    pub fn adopt_was_refused(&self, hash: &[u8; 32]) -> bool {
        self.adopt_refused.contains_key(hash)
    }

    pub fn adopt_refused(&self, hash: [u8; 32]) {
        self.adopt_refused.insert(hash, ());
    }

    /// Registers a long-lived connection; returns its handle for `unregister`.
    pub fn register(&self, identity: &Identity, fd: i32, peer: SocketAddr) -> Option<u64> {
        let local_port = local_port(fd)?;
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(
                id,
                LiveConn {
                    identity: identity.clone(),
                    fd,
                    local_port,
                    peer,
                },
            );
        }
        Some(id)
    }

    pub fn unregister(&self, id: u64) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(&id);
            crate::shrink_after_burst(&mut conns, REGISTRY_MIN_CAPACITY);
        }
    }

    pub fn open_connections(&self) -> usize {
        self.conns.lock().map_or(0, |c| c.len())
    }

    /// Shuts down the upstream socket of every registered connection whose session is no
    /// longer alive; returns how many were closed.
    ///
    /// The connections are taken out of the registry under its lock and shut down after it is
    /// released: each shut-down connection ends its request, whose end unregisters it, and with
    /// thousands to close (a breach response) those ends would otherwise wait on the lock until
    /// the last socket was shut down.
    pub fn close_dead_connections(&self, view: &RevocationView, now_ms: i64) -> usize {
        let dead: Vec<LiveConn> = {
            let Ok(mut conns) = self.conns.lock() else {
                return 0;
            };
            let ids: Vec<u64> = conns
                .iter()
                .filter(|(_, c)| !alive(&c.identity, view, now_ms))
                .map(|(id, _)| *id)
                .collect();
            let dead = ids.iter().filter_map(|id| conns.remove(id)).collect();
            crate::shrink_after_burst(&mut conns, REGISTRY_MIN_CAPACITY);
            dead
        };
        let mut closed = 0;
        for c in dead {
            // The descriptor is still this connection's only if it still joins the same two
            // endpoints; a reused descriptor number belongs to someone else.
            if local_port(c.fd) == Some(c.local_port) && peer_of(c.fd) == Some(c.peer) {
                // SAFETY: shutdown(2) on a descriptor number has no memory effects; the check
                // above makes sure it is the proxied upstream socket.
                unsafe {
                    libc::shutdown(c.fd, libc::SHUT_RDWR);
                }
                closed += 1;
            }
        }
        closed
    }
}

/// Whether an identity's session is alive at `now_ms`.
pub fn alive(identity: &Identity, view: &RevocationView, now_ms: i64) -> bool {
    identity.expires_s.saturating_mul(1000) > now_ms
        && view
            .check(identity.sid, identity.user_id, identity.issued_ms, "")
            .is_ok()
}

fn sockaddr_of(fd: i32, peer: bool) -> Option<SocketAddr> {
    // SAFETY: the storage is zeroed and large enough for any address; the kernel writes at
    // most `len` bytes and the family decides how it is read.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let ptr = &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr;
        let rc = if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        };
        if rc != 0 {
            return None;
        }
        match storage.ss_family as i32 {
            libc::AF_INET => {
                let a = &*(ptr as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
            }
            libc::AF_INET6 => {
                let a = &*(ptr as *const libc::sockaddr_in6);
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                Some(SocketAddr::from((ip, u16::from_be(a.sin6_port))))
            }
            _ => None,
        }
    }
}

/// The capacity the connection registry keeps however few connections are left.
const REGISTRY_MIN_CAPACITY: usize = 64;

fn local_port(fd: i32) -> Option<u16> {
    local_addr_of(fd).map(|a| a.port())
}

fn peer_of(fd: i32) -> Option<SocketAddr> {
    peer_addr_of(fd)
}

/// The local address of socket descriptor `fd` (getsockname), if it is an IP socket.
pub(crate) fn local_addr_of(fd: i32) -> Option<SocketAddr> {
    sockaddr_of(fd, false)
}

/// The peer address of socket descriptor `fd` (getpeername), if it is a connected IP socket.
pub(crate) fn peer_addr_of(fd: i32) -> Option<SocketAddr> {
    sockaddr_of(fd, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{RevocationEvent, SessionId};

    #[test]
    fn the_connection_registry_gives_its_table_back_after_a_burst() {
        let state = MediaState::new(Duration::from_secs(60));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let peer = listener.local_addr().unwrap();
        let ids: Vec<u64> = (0..10_000)
            .map(|_| state.register(&identity(1), fd, peer).unwrap())
            .collect();
        let grown = state.conns.lock().unwrap().capacity();
        assert!(grown >= 10_000, "{grown}");
        for id in &ids[10..] {
            state.unregister(*id);
        }
        let conns = state.conns.lock().unwrap();
        assert_eq!(conns.len(), 10);
        assert!(
            conns.capacity() <= 128,
            "capacity {} for 10",
            conns.capacity()
        );
        assert!(ids[..10].iter().all(|id| conns.contains_key(id)));
    }

    fn identity(sid: u128) -> Identity {
        Identity {
            user_id: 1,
            name: "a".into(),
            sid: SessionId(sid),
            issued_ms: 1000,
            expires_s: 10_000,
            factors: 1,
        }
    }

    #[test]
    fn grants_die_with_their_session() {
        let state = MediaState::new(Duration::from_secs(60));
        let view = RevocationView::new();
        state.grant(0, "item", "10.0.0.1", &identity(5), 9_000_000);
        assert!(state.granted(0, "item", "10.0.0.1", &view, 2000).is_some());
        assert!(state.granted(0, "item", "10.0.0.2", &view, 2000).is_none());
        assert!(state.granted(1, "item", "10.0.0.1", &view, 2000).is_none());
        assert!(state
            .granted(0, "item", "10.0.0.1", &view, 9_000_000)
            .is_none());
        state.grant(0, "item", "10.0.0.1", &identity(5), 9_000_000);
        view.apply_local(&RevocationEvent::SessionRevoked {
            sid: SessionId(5),
            user_id: 1,
            expires_ms: 10_000_000,
        });
        assert!(state.granted(0, "item", "10.0.0.1", &view, 2000).is_none());
    }

    #[test]
    fn a_socket_of_a_revoked_session_is_shut_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server_side, _) = listener.accept().unwrap();
        use std::os::unix::io::AsRawFd;
        let state = MediaState::new(Duration::from_secs(60));
        let view = RevocationView::new();
        state
            .register(&identity(9), client.as_raw_fd(), addr)
            .unwrap();
        assert_eq!(state.close_dead_connections(&view, 2000), 0);
        view.apply_local(&RevocationEvent::UserCutoff {
            user_id: 1,
            at_ms: 1000,
        });
        assert_eq!(state.close_dead_connections(&view, 2000), 1);
        assert_eq!(state.open_connections(), 0);
        // The far end sees the connection end.
        use std::io::Read;
        let mut buf = [0u8; 1];
        assert_eq!(server_side.read(&mut buf).unwrap(), 0);
    }
}
