// Portcullis patch, change 8 (see PORTCULLIS.md): relaying an upgraded connection.

//! Copying the bytes of an upgraded HTTP/1.1 connection (a WebSocket) between its two streams,
//! outside the request that upgraded it.
//!
//! A proxied WebSocket lives for hours, mostly idle. Relayed by the request that upgraded it,
//! it keeps that request's whole state (its future, both sessions and headers, the task pipes
//! between its two halves) for as long as it is open. [`relay`] needs only the two streams: it
//! holds no buffer while both sides are idle, takes one per direction while bytes are moving,
//! and ends both streams as soon as either side ends, as the request did.

use super::{
    raw_connect, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest,
    Ssl, Stream, TimingDigest, UniqueID, UniqueIDType,
};
use async_trait::async_trait;
use bytes::{Buf, Bytes};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The buffer a direction takes while bytes are moving through it.
const RELAY_BUFFER_SIZE: usize = 16 * 1024;

/// How long ending a stream (a TLS `close_notify`) may wait on a peer that does not read.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Which of the two streams given to [`relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// How a [`relay`] ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes written to `b` that came from `a` (the unread bytes given included).
    pub a_to_b: u64,
    /// Bytes written to `a` that came from `b`.
    pub b_to_a: u64,
    /// The side whose read ended the relay (its end, or an error on that direction; `A` when
    /// the relay was idle for too long).
    pub ended_by: Side,
    /// The error that ended it, if it was not a clean end of stream.
    pub error: Option<io::Error>,
}

/// Copies bytes both ways between `a` and `b` until either side's stream ends or fails, or
/// (with `idle`) no byte has moved either way for that long, then shuts both down. `a_unread`
/// (bytes already read from `a`, such as those that arrived with an upgrade request's head) is
/// written to `b` first, `b_unread` to `a`. The streams are closed when the caller drops them,
/// so that it can first undo what refers to them.
///
/// `idle` is what Pingora's proxy applied to an upgraded connection: the downstream session's
/// read timeout, restarted by every event either way. It also ends a relay stuck writing to a
/// peer that stopped reading, which no read would end.
///
/// While a direction waits for bytes it holds no buffer: it waits with a zero-length read,
/// which on Pingora's streams waits for readiness (TCP, and TLS with nothing decrypted
/// pending). It takes a buffer when bytes are there and keeps it while they keep coming.
pub async fn relay(
    a: &mut Stream,
    a_unread: Bytes,
    b: &mut Stream,
    b_unread: Bytes,
    idle: Option<Duration>,
) -> Relayed {
    let mut a_to_b = Direction::new(a_unread);
    let mut b_to_a = Direction::new(b_unread);
    // One timer, moved on lazily: when it fires, it is set again from the last time bytes
    // moved, if that was later than it was set from.
    let mut deadline = idle.map(|idle| (idle, Box::pin(tokio::time::sleep(idle))));
    let mut moved = 0;
    let mut last_moved = Instant::now();
    let (ended_by, result) = poll_fn(|cx| {
        if let Poll::Ready(r) = a_to_b.poll_copy(cx, a, b) {
            return Poll::Ready((Side::A, r));
        }
        if let Poll::Ready(r) = b_to_a.poll_copy(cx, b, a) {
            return Poll::Ready((Side::B, r));
        }
        if let Some((idle, sleep)) = deadline.as_mut() {
            let now_moved = a_to_b.moved + b_to_a.moved;
            if now_moved != moved {
                moved = now_moved;
                last_moved = Instant::now();
            }
            while sleep.as_mut().poll(cx).is_ready() {
                let until = last_moved + *idle;
                if until <= Instant::now() {
                    let idle_error = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no bytes either way for {idle:?}"),
                    );
                    return Poll::Ready((Side::A, Err(idle_error)));
                }
                sleep.as_mut().reset(until);
            }
        }
        Poll::Pending
    })
    .await;
    // Either side's end ends both, as Pingora ends an upgraded request when either is done.
    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, a.shutdown()).await;
    let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, b.shutdown()).await;
    Relayed {
        a_to_b: a_to_b.moved,
        b_to_a: b_to_a.moved,
        ended_by,
        error: result.err(),
    }
}

/// One direction of a relay: bytes read from one stream, written to the other.
struct Direction {
    /// Bytes read before the relay began, written first.
    unread: Bytes,
    /// Held only while bytes are moving.
    buf: Option<Box<[u8]>>,
    /// The part of `buf` read and not yet written.
    start: usize,
    end: usize,
    /// Written bytes wait in the writer's buffer until flushed.
    unflushed: bool,
    moved: u64,
}

impl Direction {
    fn new(unread: Bytes) -> Self {
        Direction {
            unread,
            buf: None,
            start: 0,
            end: 0,
            unflushed: false,
            moved: 0,
        }
    }

    /// `Ready(Ok(()))` at the reader's end of stream, `Ready(Err)` on an error either way,
    /// `Pending` while waiting on either stream.
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut Stream,
        writer: &mut Stream,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.unread.is_empty() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.unread))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.unread.advance(n);
                self.moved += n as u64;
                self.unflushed = true;
                if self.unread.is_empty() {
                    // Let the allocation go now, not when the relay ends.
                    self.unread = Bytes::new();
                }
            }
            if let Some(buf) = &self.buf {
                while self.start < self.end {
                    let n =
                        ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.start..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += n;
                    self.moved += n as u64;
                }
            }
            if self.unflushed {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                self.unflushed = false;
            }
            // The next bytes: read into the buffer in hand while bytes keep coming; without
            // one, wait for readiness first and take a buffer only then.
            if self.buf.is_none() {
                ready!(Pin::new(&mut *reader).poll_read(cx, &mut ReadBuf::new(&mut [])))?;
            }
            let buf = self
                .buf
                .get_or_insert_with(|| vec![0; RELAY_BUFFER_SIZE].into_boxed_slice());
            let mut read = ReadBuf::new(buf);
            let polled = Pin::new(&mut *reader).poll_read(cx, &mut read);
            let n = read.filled().len();
            match polled {
                Poll::Ready(Ok(())) if n == 0 => {
                    self.buf = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    self.start = 0;
                    self.end = n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing there after all (readiness can be stale): give the buffer back
                    // while waiting; the read has registered for the next readiness.
                    self.buf = None;
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Takes a session's stream out to hand it to [`relay`], flushed first, leaving a [`Detached`]
/// stand-in: what both HTTP/1.1 sessions' `take_upgraded_io` do with their stream.
pub async fn detach(stream: &mut Stream) -> io::Result<Stream> {
    use tokio::io::AsyncWriteExt;
    stream.flush().await?;
    Ok(std::mem::replace(stream, Box::new(Detached)))
}

/// What a session keeps in place of a stream handed to [`relay`]: reads find the end of the
/// stream, writes fail, and nothing can reuse it.
#[derive(Debug, Default)]
pub struct Detached;

impl AsyncRead for Detached {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Detached {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the stream was handed to a relay",
        )))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for Detached {
    async fn shutdown(&mut self) -> () {}
}

impl UniqueID for Detached {
    fn id(&self) -> UniqueIDType {
        #[cfg(unix)]
        return -1;
        #[cfg(windows)]
        return UniqueIDType::MAX;
    }
}

impl Ssl for Detached {}

impl GetTimingDigest for Detached {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![]
    }
}

impl GetProxyDigest for Detached {
    fn get_proxy_digest(&self) -> Option<Arc<raw_connect::ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for Detached {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}

impl Peek for Detached {}
