//! Bare Pingora with no authentication, for benchmarks only: the same `ServerConf` choices as
//! `src/server.rs` (threads, work stealing, upstream keep-alive pool) and a `ProxyHttp` whose
//! `upstream_peer` hands out a clone of one pre-built `HttpPeer`. Nothing else runs per request,
//! so comparing it with the gateway separates Pingora's cost from Portcullis's.
//!
//! Usage: `bare_proxy LISTEN UPSTREAM THREADS`, e.g. `bare_proxy 127.0.0.1:9000 127.0.0.1:8096 2`.
//! Stops on SIGINT (at once) or SIGTERM (after a one-second grace period).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::RunArgs;

struct Bare {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    /// As the gateway: without Pingora's default (disabled) compression module.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

fn usage() -> ! {
    eprintln!("usage: bare_proxy LISTEN UPSTREAM THREADS   (addresses as IP:PORT)");
    std::process::exit(2);
}

// The same allocator as the gateway binary, so the comparison separates auth from Pingora.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, threads] = args.as_slice() else {
        usage()
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        usage()
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        usage()
    };
    let Ok(threads) = threads.parse::<usize>() else {
        usage()
    };

    // Pid file and upgrade socket of this process only, as the gateway keeps them in data_dir.
    let run_dir = std::env::temp_dir().join(format!("bare_proxy.{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).expect("create the run directory");
    let conf = ServerConf {
        threads,
        work_stealing: true,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir.join("bare_proxy.pid").display().to_string(),
        upgrade_sock: run_dir
            .join("bare_proxy.upgrade.sock")
            .display()
            .to_string(),
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(
        &server.configuration,
        Bare {
            peer: HttpPeer::new(upstream, false, String::new()),
        },
    );
    service.add_tcp(&listen.to_string());
    server.add_service(service);
    eprintln!("bare_proxy: {listen} -> {upstream}, {threads} threads");
    server.run(RunArgs::default());
    let _ = std::fs::remove_dir_all(&run_dir);
}
