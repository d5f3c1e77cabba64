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

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::proxy::Gateway;

/// The longest a connection accepted just before the shutdown may take to send its head and
/// still be answered (capped by `server.head_timeout`).
pub const FIRST_HEAD_ALLOWANCE: Duration = Duration::from_secs(2);

pub struct HandOver {
    proxy: Arc<HttpProxy<Gateway>>,
    allowance: Duration,
}

impl HandOver {
    pub fn new(proxy: HttpProxy<Gateway>, head_timeout: Duration) -> Self {
        HandOver {
            proxy: Arc::new(proxy),
            allowance: FIRST_HEAD_ALLOWANCE.min(head_timeout),
        }
    }
}

#[async_trait]
impl HttpServerApp for HandOver {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let reused = self.proxy.process_new_http(session, shutdown).await;
        if reused.is_none() {
            crate::tidy_thread_heap();
        }
        reused
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
        self.proxy.http_cleanup().await;
    }
}
