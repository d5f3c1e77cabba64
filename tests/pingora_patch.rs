//! The Pingora patch's seventh change (vendor/pingora-core/PORTCULLIS.md), tested on Pingora's
//! own HTTP/1.1 sessions: the head of an upgrade — the request that asks for one, and the 101
//! that grants it — is copied into a buffer of its own size, so the header kept for the upgraded
//! connection's whole life (a WebSocket: hours) does not keep the 4 KiB read buffer with it; and
//! the bytes that came with the head are read as before.
//!
//! A test binary of its own, because it counts the live heap with its own global allocator: the
//! checks run one after the other on one thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use pingora::http::RequestHeader;
use pingora::protocols::http::v1::client::HttpSession as ClientSession;
use pingora::protocols::http::v1::server::HttpSession as ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// Counts `change` bytes when the allocator's answer `p` is not null, and gives `p` back.
fn counted(p: *mut u8, change: isize) -> *mut u8 {
    if !p.is_null() {
        LIVE.fetch_add(change, Ordering::Relaxed);
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
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
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

    let before = LIVE.load(Ordering::Relaxed);
    session.read_request().await.unwrap().expect("a request");
    let kept = LIVE.load(Ordering::Relaxed) - before;
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

    let before = LIVE.load(Ordering::Relaxed);
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
    let kept = LIVE.load(Ordering::Relaxed) - before;
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
