//! The public listener's application: Pingora's HTTP proxy, with one change to how it stops.
//!
//! When Pingora shuts a service down (the end of a graceful stop, or of the close timeout after
//! an upgrade handed the listening sockets to a new process), its accept loop ends and the proxy
//! at once drops every connection still waiting for its first request head. During an upgrade
//! the old process accepts from the shared socket until that moment, so a client whose
//! connection it accepted a moment before — its request already on the way — saw the connection
//! closed without an answer. `HandOver` delays that clean-up by a short allowance (the time a
//! request head needs to arrive after the connection is accepted): such a request is answered,
//! with `Connection: close`, and only then are the connections still idle closed.
//!
//! `HandOver` also keeps an idle HTTP/1.1 connection small. Pingora starts the proxy's state
//! for the next request (its boxed future, a 4 KiB head buffer, the session) as soon as the
//! previous response has ended, and keeps it while the connection waits, possibly for minutes:
//! tens of KiB for each phone or TV that holds a keep-alive. Here a connection waits for the
//! first byte of its next request holding nothing but the socket (and over TLS, rustls's
//! state), and the proxy starts once that byte is there (`until_readable`). The wait is a
//! zero-length read: readiness from the runtime, with no system call (the Pingora patch's fifth change).
//! Over TLS the read returns at once when rustls already holds decrypted bytes (the Pingora
//! patch's fourth change, vendor/pingora-core/PORTCULLIS.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::proxy::Gateway;

/// The longest a connection accepted just before the shutdown may take to send its head and
/// still be answered (capped by `server.head_timeout`).
pub const FIRST_HEAD_ALLOWANCE: Duration = Duration::from_secs(2);

pub struct HandOver {
    proxy: Arc<HttpProxy<Gateway>>,
    allowance: Duration,
    /// Set, and the waiters told, when the connections still idle are to be closed.
    closing: AtomicBool,
    closed: Notify,
}

impl HandOver {
    pub fn new(proxy: HttpProxy<Gateway>, head_timeout: Duration) -> Self {
        HandOver {
            proxy: Arc::new(proxy),
            allowance: FIRST_HEAD_ALLOWANCE.min(head_timeout),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    /// Waits until the parked connection has bytes to read (or has ended) and gives back a
    /// session for them; `None` when the connection is to close first (its keep-alive ran out,
    /// or the service is stopping).
    async fn until_readable(&self, parked: Parked) -> Option<ServerSession> {
        let Parked {
            mut stream,
            keepalive,
            reuses,
            context,
        } = parked;
        // A busy connection's next request is often there already: then no timer and no
        // shutdown waiter are set up for a wait that does not happen.
        if stream.read(&mut []).now_or_never().is_none() {
            self.wait_readable(&mut stream, keepalive).await?;
        }
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(keepalive);
        session.set_keepalive_reuses_remaining(reuses);
        session.set_connection_user_context(context);
        Some(session)
    }

    /// Waits for the stream to be readable; `None` when the keep-alive runs out first or the
    /// service is stopping.
    async fn wait_readable(
        &self,
        stream: &mut pingora::protocols::Stream,
        keepalive: Option<u64>,
    ) -> Option<()> {
        let closed = self.closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        let readable = stream.read(&mut []);
        // An error is the proxy's to meet: it reads the same socket and closes it.
        let in_time = async {
            match keepalive.filter(|&secs| secs > 0) {
                Some(secs) => tokio::time::timeout(Duration::from_secs(secs), readable)
                    .await
                    .is_ok(),
                None => {
                    let _ = readable.await;
                    true
                }
            }
        };
        tokio::select! {
            biased;
            in_time = in_time => in_time.then_some(()),
            () = closed => None,
        }
    }
}

/// An HTTP/1.1 connection between requests: its stream and what Pingora carries from one request
/// to the next, without the session (680 bytes) or anything of the proxy.
struct Parked {
    stream: pingora::protocols::Stream,
    keepalive: Option<u64>,
    reuses: Option<u32>,
    context: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Parked {
    /// Parks the session, or gives it back when it may already hold its next bytes
    /// (pipelining) or is not HTTP/1.1 (HTTP/2 has its own idle handling).
    // The session given back is moved once per request; boxing it would allocate every time.
    #[allow(clippy::result_large_err)]
    fn park(session: ServerSession) -> Result<Parked, ServerSession> {
        match session {
            ServerSession::H1(mut h1) if !h1.pipelining_enabled() => Ok(Parked {
                keepalive: h1.get_keepalive_timeout(),
                reuses: h1.get_keepalive_reuses_remaining(),
                context: h1.take_connection_user_context(),
                stream: h1.into_inner(),
            }),
            other => Err(other),
        }
    }
}

type ProxyFuture<'a> = Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>>;

/// Lets the thread's heap take back what the connection freed, when it has ended.
fn tidied(reused: Option<ReusedHttpStream>) -> Option<ReusedHttpStream> {
    if reused.is_none() {
        crate::tidy_thread_heap();
    }
    reused
}

#[async_trait]
impl HttpServerApp for HandOver {
    // Written out instead of as an `async fn`: the session is parked before the future is
    // made, so the future a waiting connection holds has the socket in it and not the session,
    // and the proxy's future is made only once the next request's bytes are there.
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        session: ServerSession,
        shutdown: &'life1 ShutdownWatch,
    ) -> ProxyFuture<'async_trait>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match Parked::park(session) {
            Ok(parked) => Box::pin(async move {
                let Some(session) = self.until_readable(parked).await else {
                    crate::tidy_thread_heap();
                    return None;
                };
                tidied(self.proxy.process_new_http(session, shutdown).await)
            }),
            Err(session) => {
                let serving = self.proxy.process_new_http(session, shutdown);
                Box::pin(async move { tidied(serving.await) })
            }
        }
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.proxy.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }

    /// Runs once the accept loop has ended: no new connection arrives, so waiting here only
    /// gives the ones already accepted their head's worth of time.
    async fn http_cleanup(&self) {
        tokio::time::sleep(self.allowance).await;
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.proxy.http_cleanup().await;
    }
}
