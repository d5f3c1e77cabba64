//! Building and running the gateway: a control runtime that owns the store, the sync loop and
//! the private admin listener, and the Pingora server with the proxy service on the public
//! listener. `serve` blocks until the process is told to stop (SIGINT fast, SIGTERM graceful)
//! or has handed its listeners to a new process and finished its requests in flight
//! (`upgrade`). Along the way it keeps the pid file (`pidfile`), tells systemd (`READY=1` once
//! the public listener accepts, `STOPPING=1`, watchdog pings) and sets the readiness that
//! `/readyz` reports.

pub mod handover;
pub mod pidfile;
pub mod upgrade;

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server};
use pingora::services::listening::Service;
use tokio::sync::broadcast;

use crate::app::{now_ms, App, StartError};
use crate::auth::password::generate_password;
use crate::config::{Config, Secret};
use crate::proxy::admission::{self, Admission};
use crate::proxy::Gateway;
use crate::readiness::Phase;
use crate::systemd;
use crate::web;
use handover::HandOver;
use upgrade::{Exit, Relaunch, SignalContext, SignalWatch, Signals};

pub mod reload;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Start(#[from] StartError),
    /// The cause is part of the message (not a source), so it is printed once, before the hint.
    #[error("cannot listen on {addr} ({what}): {cause}{hint}")]
    Listen {
        addr: String,
        what: &'static str,
        cause: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot start the control runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot create the first admin account: {0}")]
    Bootstrap(String),
    #[error("cannot set up the proxy listener: {0}")]
    Proxy(String),
    #[error("the upgrade socket path {0} is longer than a unix socket path may be ({max} bytes); choose a shorter server.data_dir", max = upgrade::MAX_SOCKET_PATH)]
    UpgradeSocketPath(String),
    #[error("cannot start the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] crate::datadir::DataDirError),
    #[error("route `{route}`: {problem}")]
    PlexMisconfigured { route: String, problem: String },
}

impl ServeError {
    /// A listener that could not be bound, named by its config key.
    fn listen(addr: std::net::SocketAddr, what: &'static str, source: std::io::Error) -> Self {
        let hint = match source.kind() {
            std::io::ErrorKind::AddrInUse => {
                "; is another Portcullis, or another program, already listening there?"
            }
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need CAP_NET_BIND_SERVICE (the systemd unit grants it)"
            }
            _ => "",
        };
        ServeError::Listen {
            addr: addr.to_string(),
            what,
            cause: source,
            hint,
        }
    }
}

/// How `serve` starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// Take the listening sockets from the running gateway (`serve --upgrade`) instead of
    /// binding them.
    pub upgrade: bool,
}

/// Creates an `admin` account with a generated password when the store has no user yet, and
/// prints how to log in (on stdout, once; never to the log).
async fn bootstrap_admin(app: &App) -> Result<(), ServeError> {
    let count = app
        .store
        .user_count()
        .await
        .map_err(|e| ServeError::Bootstrap(e.to_string()))?;
    if count > 0 {
        return Ok(());
    }
    let password = generate_password();
    let hash = app
        .hasher
        .hash(Secret::new(password.clone()))
        .await
        .map_err(|e| ServeError::Bootstrap(e.to_string()))?;
    match app.store.create_user("admin", &hash, true, now_ms()).await {
        Ok(_) => {}
        // Another replica starting at the same moment created it first.
        Err(crate::store::StoreError::Conflict(_)) => return Ok(()),
        Err(e) => return Err(ServeError::Bootstrap(e.to_string())),
    }
    println!(
        "\nPortcullis created the first admin account (this password is shown only once):\n\
         \x20 user name: admin\n\
         \x20 password:  {password}\n\
         \x20 sign in at {}{}\n\
         \x20 change it with: portcullis --config {} user passwd admin\n",
        app.config().server.public_url,
        crate::paths::LOGIN_PATH,
        app.config().source.display()
    );
    Ok(())
}

/// Starts the thread that closes slow, idle and excess client connections (`proxy::admission`).
fn spawn_watchman(admission: Arc<Admission>, port: u16, app: Arc<App>) -> Result<(), ServeError> {
    // Four looks per deadline, at least one a second: a connection closes at most a quarter
    // of the deadline late.
    let tick = (admission.head_timeout / 4).min(Duration::from_secs(1));
    std::thread::Builder::new()
        .name("portcullis-watchman".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            let sockets = admission::sockets_on_port(port);
            for (socket, why) in admission.review(&sockets, Instant::now()) {
                if admission::shut(socket, port) {
                    app.metrics
                        .counter(crate::metrics::Family::ConnectionsDropped
                        , &[why.as_str()])
                        .inc();
                    tracing::info!(peer = %socket.peer, reason = why.as_str(), "client connection closed");
                }
            }
            // The round's lists are as long as the connections are many, and this thread
            // allocates nothing else: after a burst its emptied pages (10 MiB of address space
            // after 10,000 connections) stay with it unless it collects.
            drop(sockets);
            crate::collect_thread_heap(false);
        })
        .map(|_| ())
        .map_err(ServeError::Runtime)
}

/// Whether this process holds a listening TCP socket on `port` (bound and `listen`ed: the kernel
/// queues connections for Pingora's accept loop from then on).
fn listening_on(port: u16) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            return false;
        };
        if crate::mediaserver::local_addr_of(fd).map(|a| a.port()) != Some(port) {
            return false;
        }
        let mut accepting: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the valid, exclusively borrowed
        // `accepting`; a descriptor that is not a socket only makes it fail.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut accepting as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        rc == 0 && accepting != 0
    })
}

/// Binds the admin listener with SO_REUSEPORT, so that a new process can bind it while the old
/// one still serves during an upgrade (Linux lets only the same user share a port).
fn bind_admin(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// What the lifecycle tasks share.
struct Lifecycle {
    app: Arc<App>,
    port: u16,
    upgrade: bool,
    pid_file: std::path::PathBuf,
    exit: std::sync::mpsc::Sender<Exit>,
    stop_admin: Arc<tokio::sync::Notify>,
}

impl Lifecycle {
    /// Follows Pingora's execution phases: readiness once the accept loops run, the admin
    /// listener closed once the listeners went to a new process, the drain watch once the grace
    /// period starts.
    async fn follow(self: Arc<Self>, mut phases: broadcast::Receiver<ExecutionPhase>) {
        loop {
            match phases.recv().await {
                Ok(ExecutionPhase::Running) => {
                    tokio::spawn(self.clone().announce_when_listening());
                }
                Ok(ExecutionPhase::GracefulUpgradeCloseTimeout) => {
                    self.app.readiness.advance(Phase::HandedOver);
                    // The admin listener and the redirect listener, if any.
                    self.stop_admin.notify_waiters();
                }
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    tokio::spawn(self.clone().exit_when_drained());
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Marks the process ready, writes the pid file and tells systemd once the public listener
    /// accepts.
    async fn announce_when_listening(self: Arc<Self>) {
        let started = Instant::now();
        let mut warned = false;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while !listening_on(self.port) {
            tick.tick().await;
            if !warned && started.elapsed() > Duration::from_secs(10) {
                tracing::warn!(
                    port = self.port,
                    "the public listener is not accepting after 10 s"
                );
                warned = true;
            }
        }
        if !self.app.readiness.advance(Phase::Serving) {
            return;
        }
        let pid = std::process::id();
        if let Err(e) = pidfile::write(&self.pid_file, pid) {
            tracing::error!(error = %e, "cannot write the pid file; `portcullis reload` and `upgrade` will not find this process");
        }
        systemd::ready(self.upgrade.then_some(pid));
        tracing::info!(
            pid,
            listen = %self.app.config().server.listen,
            admin = %self.app.config().server.admin_listen,
            store = self.app.store.backend(),
            routes = self.app.config().routes.len(),
            upgraded = self.upgrade,
            "portcullis is serving"
        );
    }

    /// During the grace period, ends the process as soon as no client connection is left
    /// (Pingora would otherwise sit out the whole period).
    async fn exit_when_drained(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut logged = false;
        loop {
            tick.tick().await;
            let open = admission::sockets_on_port(self.port).len();
            if open == 0 {
                tracing::info!("no client connection left; exiting");
                let _ = self.exit.send(Exit::Drained);
                return;
            }
            if !logged {
                tracing::info!(open, "finishing the requests in flight");
                logged = true;
            }
        }
    }
}

/// Sends `WATCHDOG=1` at half of systemd's watchdog timeout, from the control runtime (a
/// wedged runtime stops the pings and lets systemd restart the service).
async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        systemd::watchdog();
    }
}

/// Runs the gateway until it is told to stop.
pub fn serve(config: Config, opts: ServeOptions) -> Result<(), ServeError> {
    // Held shared for the process's lifetime: `portcullis restore` refuses while it is.
    let _data_dir_lock = crate::datadir::DataDirLock::acquire(
        &config.server.data_dir,
        crate::datadir::LockMode::Shared,
    )?;
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("portcullis-control")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    // Before anything slow: a SIGQUIT or SIGUSR2 arriving during start-up must not end the
    // process (their default action).
    let signals = control
        .block_on(async { Signals::register() })
        .map_err(ServeError::Runtime)?;

    // Fail with a clear message while an address is taken, before Pingora tries. A process that
    // takes over from a running one shares both addresses with it.
    let listen = config.server.listen;
    let admin_addr = config.server.admin_listen;
    if !opts.upgrade {
        let redirect = config
            .server
            .redirect_listen
            .map(|a| (a, "server.redirect_listen"));
        for (addr, what) in [
            (listen, "server.listen"),
            (admin_addr, "server.admin_listen"),
        ]
        .into_iter()
        .chain(redirect)
        {
            std::net::TcpListener::bind(addr)
                .map_err(|source| ServeError::listen(addr, what, source))?;
        }
    }
    let data_dir = config.server.data_dir.clone();
    let upgrade_sock = data_dir.join(upgrade::SOCKET_NAME);
    if upgrade_sock.as_os_str().len() > upgrade::MAX_SOCKET_PATH {
        return Err(ServeError::UpgradeSocketPath(
            upgrade_sock.display().to_string(),
        ));
    }
    let relaunch = match Relaunch::current() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "binary upgrades through SIGUSR2 will not work");
            None
        }
    };

    let app = control.block_on(App::open(config))?;
    crate::proxy::set_hsts(app.config().server.hsts.clone());
    control.block_on(bootstrap_admin(&app))?;
    // A Plex server that lets the gateway in without a token would make every request through
    // it the owner's: refuse to start. A server not answering yet is checked again later (its
    // route serves nobody until then).
    for (route, state) in control.block_on(app.check_plex_routes()) {
        if let crate::mediaserver::plex::CheckState::Done(report) = state {
            if let Some(problem) = report.fatal {
                return Err(ServeError::PlexMisconfigured { route, problem });
            }
        }
    }
    if !app.config().server.secure {
        tracing::warn!(
            public_url = %app.config().server.public_url,
            "public_url is plain http: the session cookie is sent without Secure and without the __Host- prefix; put TLS in front for anything but a trial"
        );
    }

    let admin_listener = control
        .block_on(async { bind_admin(admin_addr) })
        .map_err(|source| ServeError::listen(admin_addr, "server.admin_listen", source))?;
    let admin = web::admin_router(app.clone());
    let stop_admin = Arc::new(tokio::sync::Notify::new());
    let stop = stop_admin.clone();
    control.spawn(async move {
        let served = axum::serve(admin_listener, admin)
            .with_graceful_shutdown(async move { stop.notified().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    if let Some(addr) = app.config().server.redirect_listen {
        let listener = control
            .block_on(async { bind_admin(addr) })
            .map_err(|source| ServeError::listen(addr, "server.redirect_listen", source))?;
        let redirect = web::redirect_router(app.clone());
        let stop = stop_admin.clone();
        control.spawn(async move {
            let served = axum::serve(listener, redirect)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "redirect listener stopped");
            }
        });
    }
    control.spawn(app.clone().run_sync_loop());
    {
        let _in_control = control.enter();
        app.start_media_loop();
    }
    control.spawn(app.clone().run_connection_watch());
    match systemd::watchdog_interval_from_env() {
        Ok(Some(every)) => {
            control.spawn(watchdog(every));
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "no watchdog pings"),
    }
    // Says plainly, once, which routes' upstreams answer; does not hold up the start.
    control.spawn(crate::probe::at_start(
        app.config().routes.clone(),
        app.metrics.upstream_up.clone(),
    ));

    let _ = std::fs::create_dir_all(&data_dir);
    let conf = ServerConf {
        threads: app.config().server.threads,
        work_stealing: app.config().server.work_stealing,
        grace_period_seconds: Some(app.config().server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(app.config().server.grace_period.as_secs().max(1)),
        pid_file: pidfile::path(&data_dir).display().to_string(),
        upgrade_sock: upgrade_sock.display().to_string(),
        // A new process started by hand waits this many seconds for the old one's SIGQUIT.
        upgrade_sock_connect_accept_max_retries: opts.upgrade.then_some(30),
        upstream_keepalive_pool_size: 256,
        fast_timeout_to_tokio_threshold_seconds: Some(FAST_TIMER_MAX_SECONDS),
        ..ServerConf::default()
    };
    let admission = Arc::new(Admission::new(
        app.config().server.head_timeout,
        app.config().server.max_connections_per_ip,
    ));
    spawn_watchman(admission.clone(), listen.port(), app.clone())?;
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    if opts.upgrade {
        tracing::info!(socket = %upgrade_sock.display(), "waiting for the running gateway's listeners (send it SIGQUIT)");
    }
    // With --upgrade this waits until the old process sends its listening sockets (or exits the
    // process when none come).
    server.bootstrap();
    let head_timeout = admission.head_timeout;
    let mut proxy = pingora::proxy::http_proxy(
        &server.configuration,
        Gateway::new(app.clone(), control.handle().clone(), admission),
    );
    // HTTP/2 to clients over TLS (ALPN h2, then http/1.1): a head up to twice the limit is
    // decoded, so that the gateway's own check refuses one over `max_header_bytes` with 431 as
    // on HTTP/1.1 (a larger one ends the connection in the h2 layer); at most 100 streams at
    // once; an idle connection closed with GOAWAY before the watchman would cut it.
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_header_list_size((app.config().server.max_header_bytes as u32).saturating_mul(2));
    h2.max_concurrent_streams(100);
    proxy.h2_options = Some(h2);
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(head_timeout / 2);
    proxy.server_options = Some(options);
    let mut service = Service::new(
        "portcullis public listener".to_string(),
        HandOver::new(proxy, head_timeout),
    );
    let addr = listen.to_string();
    // The certificates are handed out by a resolver, so a reload or the ACME manager can swap
    // them.
    let config = app.config();
    let certs = if config.server.tls.is_some() || config.acme.is_some() {
        let resolver = crate::tls::CertResolver::new(None);
        resolver.install(
            crate::tls::load_all(config.server.tls.as_ref(), &config.certificates)
                .map_err(ServeError::Proxy)?,
        );
        let mut settings = pingora::listeners::tls::TlsSettings::intermediate("", "")
            .map_err(|e| ServeError::Proxy(e.to_string()))?;
        settings.set_cert_resolver(resolver.clone());
        settings.enable_h2();
        service.add_listener(public_listener(&addr).tls(settings));
        if config.acme.as_ref().is_some_and(|a| {
            a.challenges
                .contains(&crate::config::acme::Challenge::TlsAlpn01)
        }) {
            // TLS-ALPN-01 validations are answered before the listener's own handshake.
            service
                .endpoints()
                .set_pre_tls_callback(Arc::new(crate::acme::AlpnChallenges::new(app.clone())));
        }
        Some(resolver)
    } else {
        service.add_listener(public_listener(&addr));
        None
    };
    server.add_service(service);
    if let Some(resolver) = &certs {
        control.spawn(watch_certificate(app.clone(), resolver.clone()));
        if app.acme.is_some() {
            control.spawn(crate::acme::run(app.clone(), resolver.clone()));
        }
    }
    let reloader = Arc::new(reload::Reloader::new(app.clone(), certs));
    control.spawn(reloader.run_on_sighup());

    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let lifecycle = Arc::new(Lifecycle {
        app: app.clone(),
        port: listen.port(),
        upgrade: opts.upgrade,
        pid_file: pidfile::path(&data_dir),
        exit: exit_tx.clone(),
        stop_admin,
    });
    control.spawn(lifecycle.follow(server.watch_execution_phase()));
    let (to_pingora, from_signals) = tokio::sync::mpsc::channel(4);
    control.spawn(signals.run(
        SignalContext {
            app: app.clone(),
            relaunch,
            upgrade_sock,
            exit: exit_tx.clone(),
        },
        to_pingora,
    ));
    let watch = SignalWatch::new(from_signals);
    let finished = exit_tx;
    std::thread::Builder::new()
        .name("portcullis-server".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(watch),
            });
            let _ = finished.send(Exit::Finished);
        })
        .map_err(|source| ServeError::Thread {
            what: "server",
            source,
        })?;
    // Pingora's run returns at the end of the grace period; a drained process leaves earlier
    // (the server thread ends with the process).
    let how = exit_rx.recv().unwrap_or(Exit::Finished);
    tracing::info!(how = ?how, "portcullis stopped");
    pidfile::remove_if_ours(&pidfile::path(&data_dir), std::process::id());
    drop(app);
    control.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

/// The public listener at `addr`, without Pingora's 64 KiB read buffer per connection: a
/// request head is read straight into its own 4 KiB buffer, and bodies go through Pingora's
/// body buffers anyway, so the read buffer only held memory for every idle keep-alive
/// connection (101.7 KiB each with it, measured by `bench/idle.sh`). Writes keep their small
/// buffer (one TCP segment).
/// Pingora's fast timer takes only timeouts under a second; every longer one (a request's read
/// timeout, a pooled upstream connection's idle timeout) runs on Tokio's timer wheel. A fast
/// timer stays allocated until its deadline, however long before it its connection ended, and
/// after a burst of connections those small blocks, one to a page among the burst's freed
/// ones, kept pages of the proxy threads' heaps from going back to the system: 60 s after a
/// burst for the read timeouts, 20 s for the pool's. A Tokio timer is freed with its
/// connection, and costs fewer instructions per request (README, "After a burst").
pub(crate) const FAST_TIMER_MAX_SECONDS: u64 = 0;

fn public_listener(addr: &str) -> pingora::listeners::ListenerConfig {
    pingora::listeners::ListenerConfig::tcp(addr)
        .l4_buffer(pingora::protocols::l4::stream::L4BufferSettings::default().read(0))
}

/// How often the certificate files are looked at for a replacement (a renewal by certbot, say).
const CERTIFICATE_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves replaced certificates without a restart or reload: when the files named by
/// `server.tls` or a `[[tls.certificate]]` change (or a reload names others) and make valid
/// pairs, new handshakes get them (connections open keep theirs); a broken pair is logged and
/// the old certificates keep serving. Keeps `portcullis_tls_certificate_expiry_seconds` current.
async fn watch_certificate(app: Arc<App>, resolver: Arc<crate::tls::CertResolver>) {
    use crate::config::{Config, TlsFiles};
    // The files named, and when each pair was last modified.
    type Seen = (
        (Option<TlsFiles>, Vec<TlsFiles>),
        Vec<Option<(std::time::SystemTime, std::time::SystemTime)>>,
    );
    let look = |config: &Config| -> Seen {
        let modified = config
            .server
            .tls
            .iter()
            .chain(&config.certificates)
            .map(crate::tls::files_modified)
            .collect();
        (
            (config.server.tls.clone(), config.certificates.clone()),
            modified,
        )
    };
    let mut seen = look(&app.config());
    let mut tick = tokio::time::interval(CERTIFICATE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = look(&app.config());
        if now != seen && now.1.iter().all(Option::is_some) {
            match crate::tls::load_all(now.0 .0.as_ref(), &now.0 .1) {
                Ok(certificates) => {
                    resolver.install(certificates);
                    tracing::info!("certificate files changed: the new certificates are served");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "certificate files changed but cannot be used; the previous certificates keep serving"
                ),
            }
            seen = now;
        }
        app.metrics.set_tls_expiries(&crate::tls::expiries(
            &resolver,
            crate::app::now_ms() / 1000,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::prelude::fast_timeout::set_fast_timeout_to_tokio_threshold;

    /// Under the gateway's threshold a Pingora timeout of a second or more is a Tokio timer: it
    /// follows Tokio's clock, here paused and moved on at once, instead of the fast timer's
    /// thread, which would take the whole timeout in real time.
    #[test]
    fn timeouts_of_a_second_or_more_are_tokio_timers() {
        set_fast_timeout_to_tokio_threshold(Some(Duration::from_secs(FAST_TIMER_MAX_SECONDS)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let wall = std::time::Instant::now();
        rt.block_on(async {
            for secs in [1, 20, 60] {
                let started = tokio::time::Instant::now();
                let never = std::future::pending::<()>();
                let result = pingora::prelude::timeout(Duration::from_secs(secs), never).await;
                assert!(result.is_err(), "{secs} s");
                assert_eq!(started.elapsed(), Duration::from_secs(secs));
            }
        });
        assert!(
            wall.elapsed() < Duration::from_secs(1),
            "{:?}",
            wall.elapsed()
        );
    }
}
