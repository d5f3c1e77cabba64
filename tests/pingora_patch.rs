//! The Pingora patch (vendor/pingora-core/PORTCULLIS.md), tested on Pingora's own HTTP/1.1
//! sessions over loopback sockets.
//!
//! The seventh change: the head of an upgrade — the request that asks for one, and the 101 that
//! grants it — is copied into a buffer of its own size, so the header kept for the upgraded
//! connection's whole life (a WebSocket: hours) does not keep the 4 KiB read buffer with it;
//! and the bytes that came with the head are read as before.
//!
//! The eighth: a client's upgrade request is read by a server session and sent upstream by a
//! client session, the upstream's 101 goes back the same way, and then both streams are taken
//! out of the sessions and handed to `relay`, which must carry every byte each way (those that
//! came with the two heads first), end both sides when either ends, and hold no buffer while
//! the connection is idle.
//!
//! A test binary of its own, because it counts the live heap with its own global allocator: the
//! checks of a test run one after the other on its thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession as ClientSession;
use pingora::protocols::http::v1::server::HttpSession as ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::relay::{relay, Relayed, Side};
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The system allocator, counting the bytes live by the thread that allocated or freed them.
/// Each test runs its runtime on its own thread (a current-thread runtime), so what the test
/// harness does on other threads is not counted.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

/// The bytes this thread has allocated and not freed (freed minus allocated, if negative).
fn live() -> isize {
    LIVE.with(Cell::get)
}

fn count(change: isize) {
    // No destructor and a constant initializer: there is no moment the key is unusable.
    let _ = LIVE.try_with(|live| live.set(live.get() + change));
}

/// Counts `change` bytes when the allocator's answer `p` is not null, and gives `p` back.
fn counted(p: *mut u8, change: isize) -> *mut u8 {
    if !p.is_null() {
        count(change);
    }
    p
}

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(unsafe { System.alloc(layout) }, layout.size() as isize)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(
            unsafe { System.alloc_zeroed(layout) },
            layout.size() as isize,
        )
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let change = new_size as isize - layout.size() as isize;
        counted(unsafe { System.realloc(p, layout, new_size) }, change)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What parsing a head of Pingora's 4 KiB initial read buffer leaves live at most, with the
/// header it builds: without the change the buffer alone is 4,096 bytes.
const KEPT_AT_MOST: isize = 3072;

const UPGRADE_REQUEST: &[u8] = b"GET /socket HTTP/1.1\r\nHost: media.test\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

const SWITCHING: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// A connected loopback pair: (the accepted side, the connecting side).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connecting = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    (accepted, connecting)
}

/// The upgrade request's head, read by the server side, keeps no read buffer; the bytes the
/// client sent after the head are the upgraded connection's first bytes.
async fn an_upgrade_request_keeps_a_head_of_its_own_size() {
    let (accepted, mut client) = pair().await;
    let mut sent = UPGRADE_REQUEST.to_vec();
    sent.extend_from_slice(b"early");
    client.write_all(&sent).await.unwrap();
    let mut session = ServerSession::new(Box::new(L4Stream::from(accepted)));

    let before = live();
    session.read_request().await.unwrap().expect("a request");
    let kept = live() - before;
    assert!(
        kept < KEPT_AT_MOST,
        "reading an upgrade request left {kept} bytes live"
    );

    let header = session.req_header();
    assert_eq!(header.uri.path(), "/socket");
    assert_eq!(header.headers["upgrade"], "websocket");
    assert_eq!(
        header.headers["sec-websocket-key"],
        "dGhlIHNhbXBsZSBub25jZQ=="
    );

    let mut answer = pingora::http::ResponseHeader::build(101, None).unwrap();
    answer.insert_header("Upgrade", "websocket").unwrap();
    answer.insert_header("Connection", "Upgrade").unwrap();
    session
        .write_response_header(Box::new(answer))
        .await
        .unwrap();
    assert!(session.was_upgraded());
    let body = session.read_body_bytes().await.unwrap().expect("bytes");
    assert_eq!(&body[..], b"early");
}

/// The 101's head, read by the client side, keeps no read buffer; the bytes the server sent
/// after it are the upgraded connection's first bytes.
async fn a_switching_response_keeps_a_head_of_its_own_size() {
    let (mut server, connecting) = pair().await;
    let mut session = ClientSession::new(Box::new(L4Stream::from(connecting)));
    let mut request = RequestHeader::build("GET", b"/socket", None).unwrap();
    for (name, value) in [
        ("Host", "media.test"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ] {
        request.insert_header(name, value).unwrap();
    }
    session
        .write_request_header(Box::new(request))
        .await
        .unwrap();
    // The request waits unread in the server's socket: only the answer matters here.
    let mut answer = SWITCHING.to_vec();
    answer.extend_from_slice(b"first frame");
    server.write_all(&answer).await.unwrap();

    let before = live();
    session.read_response().await.unwrap();
    let header = session.resp_header().expect("a response");
    assert_eq!(header.status, 101);
    assert_eq!(
        header.headers["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert!(session.was_upgraded());
    let body = session.read_body_bytes().await.unwrap().expect("bytes");
    assert_eq!(&body[..], b"first frame");
    drop(body);
    // The upgraded body's 64 KiB read buffer, which the 101 starts, is given back while the
    // connection waits for more (change 1): wait a moment, so that what is counted is the head.
    let waiting = tokio::time::timeout(Duration::from_millis(50), session.read_body_bytes());
    assert!(waiting.await.is_err(), "no more bytes were sent");
    let kept = live() - before;
    assert!(kept < KEPT_AT_MOST, "reading a 101 left {kept} bytes live");
}

/// A response that is not a 101 is read as before (the change costs it nothing): its header
/// values are zero-copy slices of the head.
async fn an_ordinary_response_is_read_as_before() {
    let (mut server, connecting) = pair().await;
    let mut session = ClientSession::new(Box::new(L4Stream::from(connecting)));
    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    request.insert_header("Host", "media.test").unwrap();
    session
        .write_request_header(Box::new(request))
        .await
        .unwrap();
    server
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    session.read_response().await.unwrap();
    // Zero-copy: the header's values are slices of the head as it was read.
    let raw = session.get_headers_raw_bytes();
    let value = session.resp_header().unwrap().headers["content-length"].as_bytes();
    let start = raw.as_ptr() as usize;
    let at = value.as_ptr() as usize;
    assert!(
        (start..start + raw.len()).contains(&at),
        "a 200's header value was copied out of its head"
    );
    let body = session.read_body_bytes().await.unwrap().expect("bytes");
    assert_eq!(&body[..], b"ok");
}

/// Reads from `socket` until `len` bytes have come (or the end), within 10 s.
async fn read_len(socket: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0; 64 * 1024];
    let reading = async {
        while got.len() < len {
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reading)
        .await
        .expect("the bytes came within 10 s");
    got
}

/// Reads from `socket` until it ends; panics if it has not ended within 5 s or sends bytes.
async fn expect_end(socket: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
        .await
        .expect("the relay ended this side within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "bytes instead of the end: {:?}", &buf[..n]);
}

/// A deterministic byte pattern, different for each `seed`.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An upgraded connection through Pingora's two sessions, up to the relay: the client and the
/// upstream sockets, and the two streams taken out of the sessions with their unread bytes.
struct Upgraded {
    client: TcpStream,
    upstream: TcpStream,
    down: (Stream, Bytes),
    up: (Stream, Bytes),
}

/// The client sends its upgrade request followed by `early`; the upstream answers 101
/// followed by `first`. Both heads pass through the sessions as the proxy passes them.
async fn upgrade(early: &[u8], first: &[u8]) -> Upgraded {
    let (accepted, mut client) = pair().await;
    let (mut upstream, connecting) = pair().await;
    client
        .write_all(&[UPGRADE_REQUEST, early].concat())
        .await
        .unwrap();
    let mut server = ServerSession::new(Box::new(L4Stream::from(accepted)));
    server.read_request().await.unwrap().expect("a request");
    let mut to_upstream = ClientSession::new(Box::new(L4Stream::from(connecting)));
    to_upstream
        .write_request_header(Box::new(server.req_header().clone()))
        .await
        .unwrap();
    let head = read_len(&mut upstream, UPGRADE_REQUEST.len()).await;
    assert!(head.starts_with(b"GET /socket HTTP/1.1\r\n"));
    assert!(head.ends_with(b"\r\n\r\n"));
    upstream
        .write_all(&[SWITCHING, first].concat())
        .await
        .unwrap();
    to_upstream.read_response().await.unwrap();
    assert!(to_upstream.was_upgraded());
    server
        .write_response_header(Box::new(to_upstream.resp_header().unwrap().clone()))
        .await
        .unwrap();
    assert!(server.was_upgraded());
    let down = server.take_upgraded_io().await.unwrap().expect("upgraded");
    let up = to_upstream
        .take_upgraded_io()
        .await
        .unwrap()
        .expect("upgraded");
    // What the sessions keep are stand-ins: the end of the stream, and writes that fail.
    assert_eq!(server.read_body_bytes().await.unwrap(), None);
    assert!(server.write_body(b"x").await.is_err());
    assert_eq!(to_upstream.read_body_bytes().await.unwrap(), None);
    let mut answer = read_len(&mut client, SWITCHING.len()).await;
    answer.truncate(12);
    assert_eq!(answer, b"HTTP/1.1 101");
    Upgraded {
        client,
        upstream,
        down,
        up,
    }
}

/// Relays the two streams in a task of their own, as the proxy does.
fn spawn_relay(down: (Stream, Bytes), up: (Stream, Bytes)) -> tokio::task::JoinHandle<Relayed> {
    tokio::spawn(async move {
        let ((mut a, a_unread), (mut b, b_unread)) = (down, up);
        relay(&mut a, a_unread, &mut b, b_unread, None).await
    })
}

async fn relayed(task: tokio::task::JoinHandle<Relayed>) -> Relayed {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the relay ended within 5 s")
        .unwrap()
}

/// Every byte passes each way — the ones that came with the heads first, then 4 MiB each way
/// at once, more than the sockets buffer, so neither direction may wait on the other — and
/// when the upstream leaves, the client's side is ended too.
async fn a_relay_carries_every_byte_both_ways_and_ends_with_the_upstream() {
    let u = upgrade(b"early", b"first frame").await;
    let (mut client, mut upstream, down, up) = (u.client, u.upstream, u.down, u.up);
    assert_eq!(&down.1[..], b"early");
    assert_eq!(&up.1[..], b"first frame");
    let task = spawn_relay(down, up);

    assert_eq!(read_len(&mut client, 11).await, b"first frame");
    assert_eq!(read_len(&mut upstream, 5).await, b"early");

    const LEN: usize = 4 * 1024 * 1024;
    let (to_up, to_client) = (pattern(LEN, 1), pattern(LEN, 2));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut up_read, mut up_write) = upstream.into_split();
    let sending = async {
        tokio::join!(
            client_write.write_all(&to_up),
            up_write.write_all(&to_client)
        )
    };
    let receiving = async {
        let mut at_up = vec![0; LEN];
        let mut at_client = vec![0; LEN];
        tokio::join!(
            up_read.read_exact(&mut at_up),
            client_read.read_exact(&mut at_client)
        )
        .0
        .unwrap();
        (at_up, at_client)
    };
    let ((sent_up, sent_client), (at_up, at_client)) =
        tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(sending, receiving)
        })
        .await
        .expect("4 MiB each way within 20 s");
    sent_up.unwrap();
    sent_client.unwrap();
    assert!(
        at_up == to_up,
        "the upstream got other bytes than were sent"
    );
    assert!(
        at_client == to_client,
        "the client got other bytes than were sent"
    );

    drop((up_read, up_write));
    let mut client = client_read.reunite(client_write).unwrap();
    expect_end(&mut client).await;
    let relayed = relayed(task).await;
    assert_eq!(relayed.ended_by, Side::B);
    assert!(relayed.error.is_none(), "{:?}", relayed.error);
    assert_eq!(relayed.a_to_b, 5 + LEN as u64);
    assert_eq!(relayed.b_to_a, 11 + LEN as u64);
}

/// A client that leaves ends the upstream's side; nothing came with the heads here.
async fn a_client_that_leaves_ends_the_upstream_side() {
    let u = upgrade(b"", b"").await;
    let (mut client, mut upstream, down, up) = (u.client, u.upstream, u.down, u.up);
    assert!(down.1.is_empty() && up.1.is_empty());
    let task = spawn_relay(down, up);
    // A byte through first: the relay is running, and does not end while both sides are open.
    client.write_all(b"x").await.unwrap();
    assert_eq!(read_len(&mut upstream, 1).await, b"x");
    assert!(
        !task.is_finished(),
        "the relay ended while both sides were open"
    );
    drop(client);
    expect_end(&mut upstream).await;
    let relayed = relayed(task).await;
    assert_eq!(relayed.ended_by, Side::A);
    assert_eq!((relayed.a_to_b, relayed.b_to_a), (1, 0));
}

/// The connection watch ends a revoked session's socket by `shutdown(2)` on the upstream side
/// the relay holds; the relay ends and the client's side is closed.
async fn shutting_down_the_upstream_socket_ends_the_relay() {
    let u = upgrade(b"", b"").await;
    let (mut client, mut upstream, down, up) = (u.client, u.upstream, u.down, u.up);
    let fd = up.0.id();
    let task = spawn_relay(down, up);
    // A byte through first: the relay is running and waiting on both sockets.
    client.write_all(b"x").await.unwrap();
    assert_eq!(read_len(&mut upstream, 1).await, b"x");
    // SAFETY: shutdown(2) on the relay's own upstream socket, which is open until the relay
    // ends (it has not: the upstream is still connected).
    assert_eq!(unsafe { libc::shutdown(fd, libc::SHUT_RDWR) }, 0);
    expect_end(&mut client).await;
    assert_eq!(relayed(task).await.ended_by, Side::B);
}

/// While the connection is idle the relay holds no buffer: bytes came with both heads, then
/// passed both ways, 20 KiB each, more than a direction's 16 KiB buffer, and then the relay
/// waits with what it held for them given back. Counted from before the upgrade, so that a
/// buffer the heads' bytes were read into and still kept would show.
async fn an_idle_relay_holds_no_buffer() {
    let before = live();
    let u = upgrade(b"early", b"first frame").await;
    let (mut client, mut upstream, down, up) = (u.client, u.upstream, u.down, u.up);
    let at_upgrade = live() - before;
    const LEN: usize = 20 * 1024;
    let (to_up, to_client) = (pattern(LEN, 3), pattern(LEN, 4));
    let task = spawn_relay(down, up);
    assert_eq!(read_len(&mut client, 11).await, b"first frame");
    assert_eq!(read_len(&mut upstream, 5).await, b"early");
    client.write_all(&to_up).await.unwrap();
    upstream.write_all(&to_client).await.unwrap();
    assert!(read_len(&mut upstream, LEN).await == to_up);
    assert!(read_len(&mut client, LEN).await == to_client);
    drop((to_up, to_client));
    // The two sockets with their streams, the relay's task and state; a buffer alone would be
    // 16,384 bytes, the body buffer the 101's follower was once read into 65,536. The relay
    // gives its buffers back when its next read would wait: once it has run again.
    let mut kept = live() - before;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while kept >= 8192 && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
        kept = live() - before;
    }
    assert!(
        kept < 8192,
        "an idle relay keeps {kept} bytes live ({at_upgrade} at the upgrade)"
    );
    drop(client);
    expect_end(&mut upstream).await;
    relayed(task).await;
}

/// With an idle timeout, a relay that moves no byte either way for that long ends both sides;
/// bytes that keep moving keep it open.
async fn an_idle_timeout_ends_a_silent_relay() {
    let u = upgrade(b"", b"").await;
    let (mut client, mut upstream, down, up) = (u.client, u.upstream, u.down, u.up);
    let task = tokio::spawn(async move {
        let ((mut a, a_unread), (mut b, b_unread)) = (down, up);
        let idle = Some(Duration::from_millis(300));
        relay(&mut a, a_unread, &mut b, b_unread, idle).await
    });
    // The gaps are the stimulus, not a wait for a condition: each shorter than the timeout,
    // together twice it.
    for i in 0..6u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(&[i]).await.unwrap();
        assert_eq!(read_len(&mut upstream, 1).await, [i]);
    }
    assert!(
        !task.is_finished(),
        "the relay ended while bytes were moving"
    );
    let silent = std::time::Instant::now();
    expect_end(&mut client).await;
    expect_end(&mut upstream).await;
    let waited = silent.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "ended {waited:?} after the last byte, with a 300 ms idle timeout"
    );
    let relayed = relayed(task).await;
    let error = relayed.error.expect("ended by the timeout");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert_eq!(relayed.a_to_b, 6);
}

#[test]
fn the_head_of_an_upgrade_is_kept_in_a_buffer_of_its_own_size() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        an_upgrade_request_keeps_a_head_of_its_own_size().await;
        a_switching_response_keeps_a_head_of_its_own_size().await;
        an_ordinary_response_is_read_as_before().await;
    });
}

#[test]
fn an_upgraded_connection_is_relayed_outside_its_sessions() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        a_relay_carries_every_byte_both_ways_and_ends_with_the_upstream().await;
        a_client_that_leaves_ends_the_upstream_side().await;
        shutting_down_the_upstream_socket_ends_the_relay().await;
        an_idle_relay_holds_no_buffer().await;
        an_idle_timeout_ends_a_silent_relay().await;
    });
}
