//! Building and running the gateway: a control runtime that owns the store, the sync loop and
//! the private admin listener, and the Pingora server with the proxy service on the public
//! listener. `serve` blocks until the process is told to stop (SIGINT fast, SIGTERM graceful).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};

use crate::app::{now_ms, App, StartError};
use crate::auth::password::generate_password;
use crate::config::{Config, Secret};
use crate::proxy::admission::{self, Admission};
use crate::proxy::Gateway;
use crate::web;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        addr: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the control runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot create the first admin account: {0}")]
    Bootstrap(String),
    #[error("cannot set up the proxy listener: {0}")]
    Proxy(String),
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
        app.config.server.public_url,
        web::LOGIN_PATH,
        app.config.source.display()
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
                        .connections_dropped
                        .with_label_values(&[why.as_str()])
                        .inc();
                    tracing::info!(peer = %socket.peer, reason = why.as_str(), "client connection closed");
                }
            }
        })
        .map(|_| ())
        .map_err(ServeError::Runtime)
}

/// Runs the gateway until it is told to stop.
pub fn serve(config: Config) -> Result<(), ServeError> {
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("portcullis-control")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;

    // Fail with a clear message while the address is taken, before Pingora tries.
    let listen = config.server.listen;
    std::net::TcpListener::bind(listen).map_err(|source| ServeError::Listen {
        addr: listen.to_string(),
        what: "server.listen",
        source,
    })?;

    let app = control.block_on(App::open(config))?;
    control.block_on(bootstrap_admin(&app))?;
    if !app.config.server.secure {
        tracing::warn!(
            public_url = %app.config.server.public_url,
            "public_url is plain http: the session cookie is sent without Secure and without the __Host- prefix; put TLS in front for anything but a trial"
        );
    }

    let admin_addr = app.config.server.admin_listen;
    let admin_listener = control
        .block_on(tokio::net::TcpListener::bind(admin_addr))
        .map_err(|source| ServeError::Listen {
            addr: admin_addr.to_string(),
            what: "server.admin_listen",
            source,
        })?;
    let admin = web::admin_router(app.clone());
    control.spawn(async move {
        if let Err(e) = axum::serve(admin_listener, admin).await {
            tracing::error!(error = %e, "admin listener stopped");
        }
    });
    control.spawn(app.clone().run_sync_loop());
    if app.config.routes.iter().any(|r| r.media.is_some()) {
        control.spawn(app.clone().run_media_loop());
    }
    control.spawn(app.clone().run_connection_watch());
    // Says plainly, once, which routes' upstreams answer; does not hold up the start.
    control.spawn(crate::probe::at_start(
        app.config.routes.clone(),
        app.metrics.upstream_up.clone(),
    ));

    let data_dir = app.config.server.data_dir.clone();
    let _ = std::fs::create_dir_all(&data_dir);
    let conf = ServerConf {
        threads: app.config.server.threads,
        work_stealing: app.config.server.work_stealing,
        grace_period_seconds: Some(app.config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(app.config.server.grace_period.as_secs().max(1)),
        pid_file: data_dir.join("portcullis.pid").display().to_string(),
        upgrade_sock: data_dir
            .join("portcullis.upgrade.sock")
            .display()
            .to_string(),
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let admission = Arc::new(Admission::new(
        app.config.server.head_timeout,
        app.config.server.max_connections_per_ip,
    ));
    spawn_watchman(admission.clone(), listen.port(), app.clone())?;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(
        &server.configuration,
        Gateway::new(app.clone(), control.handle().clone(), admission),
    );
    let addr = listen.to_string();
    match &app.config.server.tls {
        Some(tls) => service
            .add_tls(
                &addr,
                &tls.cert.display().to_string(),
                &tls.key.display().to_string(),
            )
            .map_err(|e| ServeError::Proxy(e.to_string()))?,
        None => service.add_tcp(&addr),
    }
    server.add_service(service);
    tracing::info!(
        listen = %listen,
        admin = %admin_addr,
        store = app.store.backend(),
        routes = app.config.routes.len(),
        "portcullis is serving"
    );
    server.run(RunArgs::default());
    drop(app);
    control.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}
