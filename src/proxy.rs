//! The Pingora proxy. Each phase only dispatches: `request_filter` runs the checks in order
//! (header size, canonical path, the gateway's own pages, route, public path, authentication),
//! each of which either answers the request or lets it continue; `upstream_request_filter`
//! rewrites what the upstream sees; `logging` writes the access log line and counts the outcome.
//! No store I/O happens on this path.

pub mod admission;
pub mod forward;
mod media;
pub mod path;
mod plex;
mod respond;
pub mod rules;
pub mod strict;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use tower::ServiceExt;

use crate::app::{now_ms, App, ClientInfo};
use crate::auth::{self, AuthDecision, Identity};
use crate::config::{Config, Route};
use crate::metrics::RejectReason;
use crate::paths;
use crate::telemetry;
use crate::web;

pub use respond::{set_hsts, Outcome};

/// How long the 502 page waits for the store to say whether the user is an admin.
const ADMIN_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Per-request state shared by the phases.
pub struct RequestCtx {
    /// The configuration this request is decided under, taken when it arrived: a reload
    /// applies to the next request, never halfway through this one.
    config: Arc<Config>,
    start: Instant,
    request_id: String,
    route: Option<usize>,
    outcome: Outcome,
    identity: Option<Identity>,
    client_ip: String,
    /// The client's socket address, as the admission watchman keys the connection.
    peer: Option<SocketAddr>,
    upstream_start: Option<Instant>,
    websocket: bool,
    /// A long-lived exchange (WebSocket, media stream) to close if its session ends.
    track: bool,
    /// Its handle in the connection registry, once connected upstream.
    conn: Option<u64>,
    media: media::MediaCtx,
    /// The access rules have judged this request's identity.
    rules_checked: bool,
}

pub struct Gateway {
    app: Arc<App>,
    router: axum::Router,
    /// The runtime that owns the store's connections; the gateway's pages run there.
    control: tokio::runtime::Handle,
    admission: Arc<admission::Admission>,
    /// The routes' upstream peers, built for one configuration and rebuilt after a reload.
    peers: ArcSwap<Peers>,
    proto: &'static str,
}

/// Upstream peers indexed like the routes of `config`.
struct Peers {
    config: Arc<Config>,
    list: Vec<HttpPeer>,
}

impl Peers {
    fn of(config: Arc<Config>) -> Peers {
        let list = config
            .routes
            .iter()
            .map(|r| {
                let mut peer = HttpPeer::new(r.upstream, false, String::new());
                peer.options.idle_timeout = Some(config.server.upstream_idle_timeout);
                peer
            })
            .collect();
        Peers { config, list }
    }
}

/// The route for a host and canonical path: the longest matching prefix, routes that name the
/// host before routes for any host. Routes a reload removed are kept (so indices stay stable)
/// but never match.
fn find_route(routes: &[Route], host: Option<&str>, canonical: &str) -> Option<usize> {
    let mut best: Option<(usize, (bool, usize))> = None;
    for (i, r) in routes.iter().enumerate() {
        if r.retired {
            continue;
        }
        let host_match = match (&r.host, host) {
            (None, _) => Some(false),
            (Some(want), Some(h)) if want.eq_ignore_ascii_case(h) => Some(true),
            _ => None,
        };
        let Some(specific) = host_match else { continue };
        if !path::under(canonical, &r.path_prefix) {
            continue;
        }
        let rank = (specific, r.path_prefix.len());
        if best.is_none_or(|(_, b)| rank > b) {
            best = Some((i, rank));
        }
    }
    best.map(|(i, _)| i)
}

impl Gateway {
    pub fn new(
        app: Arc<App>,
        control: tokio::runtime::Handle,
        admission: Arc<admission::Admission>,
    ) -> Gateway {
        let peers = ArcSwap::from_pointee(Peers::of(app.config()));
        let proto = if app.config().server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Gateway {
            router: web::router(app.clone()),
            app,
            control,
            admission,
            peers,
            proto,
        }
    }

    /// The upstream peer of route `index` under `config`.
    fn peer(&self, config: &Arc<Config>, index: usize) -> Option<HttpPeer> {
        let peers = self.peers.load();
        if Arc::ptr_eq(&peers.config, config) {
            return peers.list.get(index).cloned();
        }
        // The first request after a reload builds the peers of the new configuration.
        let fresh = Arc::new(Peers::of(config.clone()));
        let peer = fresh.list.get(index).cloned();
        self.peers.store(fresh);
        peer
    }

    /// Forward-auth (nginx `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`): 200 with
    /// `Remote-User` for a live session, else 401, or 302 to the login page for a browser
    /// navigation when the query asks for it (`?redirect=1`). The original request is described
    /// by `X-Original-URI` / `X-Forwarded-Uri` and `X-Forwarded-Method`.
    async fn verify(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let (decision, _) = auth::authenticate_headers(
            &session.req_header().headers,
            self.app.cookie_name,
            &self.app.keyring(),
            &self.app.view,
            now_ms() / 1000,
        );
        // The access rules, for the request the proxy in front asks about.
        let identity = match &decision {
            AuthDecision::Allow(identity) => Some(identity),
            AuthDecision::Deny(_) => None,
        };
        let Some(verdict) = self.verify_verdict(session, ctx, identity) else {
            ctx.outcome = Outcome::Rejected(RejectReason::BadPath);
            return respond::reject(session, RejectReason::BadPath).await;
        };
        let req = session.req_header();
        let header = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
        // A page (a redirect) only when the proxy asks for one (`?redirect=1`, for Traefik and
        // Caddy) and a browser navigates: nginx's auth_request takes 401 and 403 only.
        let wants_redirect = req
            .uri
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "redirect=1"));
        let method = header("x-forwarded-method")
            .or_else(|| header("x-original-method"))
            .unwrap_or("GET");
        let navigation = wants_redirect
            && (method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD"))
            && (header("sec-fetch-mode") == Some("navigate")
                || header("accept").is_some_and(|a| a.contains("text/html")));
        let original = header("x-original-uri")
            .or_else(|| header("x-forwarded-uri"))
            .unwrap_or("/")
            .to_string();
        match (&verdict, identity) {
            (rules::Verdict::Bypass, None) => {
                ctx.outcome = Outcome::Public;
                return respond::verified(session, "", &[]).await;
            }
            (rules::Verdict::Deny(_) | rules::Verdict::StepUp(_), _) => {
                ctx.identity = identity.cloned();
                let page = navigation.then(|| original.clone());
                self.refuse_by_rule_as(session, ctx, &verdict, page).await?;
                return Ok(());
            }
            _ => {}
        }
        match decision {
            AuthDecision::Allow(identity) => {
                ctx.outcome = Outcome::Allowed;
                let name = identity.name.clone();
                let groups = self.app.view.groups_of(identity.user_id);
                ctx.identity = Some(identity);
                respond::verified(session, &name, groups.as_deref().unwrap_or(&[])).await
            }
            AuthDecision::Deny(reason) => {
                ctx.outcome = Outcome::Denied(reason);
                respond::deny(session, navigation, &original).await
            }
        }
    }

    /// A request carrying one of the gateway's cookies (`names`) more than once: a browser
    /// navigating gets the login page, any other client a 401; both are told to expire every
    /// variant of those cookies. Audited (once a minute per address) and counted.
    async fn refuse_ambiguous(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        names: &[&'static str],
        canonical: &str,
    ) -> Result<()> {
        ctx.outcome = Outcome::Denied(auth::DenyReason::AmbiguousCredentials);
        let req = session.req_header();
        let secure = ctx.config.server.secure;
        let clears: Vec<String> = names
            .iter()
            .flat_map(|n| auth::cookie::clear_variants(n, secure, host_of(req), canonical))
            .collect();
        let client = ClientInfo {
            ip: ctx.client_ip.clone(),
            user_agent: req
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        };
        let (app, names_owned) = (self.app.clone(), names.to_vec());
        self.control
            .spawn(async move { app.audit_ambiguous(&client, &names_owned).await });
        let page = is_navigation(req).then(|| {
            let return_to = req
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .filter(|_| !path::under(canonical, paths::PREFIX))
                .unwrap_or("/");
            web::ambiguous_login_page(&self.app, return_to)
        });
        respond::ambiguous(session, page, &clears).await
    }

    /// A WebSocket upgrade whose `Origin` is another site's: a browser attaches the session
    /// cookie to it wherever the page came from, so the cookie must not open it.
    fn cross_site_upgrade(&self, session: &Session, ctx: &RequestCtx) -> bool {
        session.is_upgrade_req()
            && session
                .req_header()
                .headers
                .get(http::header::ORIGIN)
                .is_some_and(|o| o.as_bytes() != ctx.config.server.public_url.as_bytes())
    }

    /// Reads a request body the gateway handles itself (its pages, media-server logins). A
    /// declared or actual size over `cap` is refused before more is read, and a body still
    /// incomplete after `server.body_timeout` is refused (slow-body attacks).
    async fn read_own_body(
        &self,
        session: &mut Session,
        cap: usize,
        timeout: std::time::Duration,
    ) -> Result<std::result::Result<Bytes, RejectReason>> {
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > cap as u64) {
            return Ok(Err(RejectReason::BodyTooLarge));
        }
        let read = async {
            let mut body = BytesMut::new();
            while let Some(chunk) = session.read_request_body().await? {
                if body.len() + chunk.len() > cap {
                    return Ok(Err(RejectReason::BodyTooLarge));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Ok(body.freeze()))
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(result) => result,
            Err(_) => Ok(Err(RejectReason::SlowBody)),
        }
    }

    /// Which route and address failed, and why, when the request is a signed-in admin's (the
    /// account is looked up in the store: this runs only after the upstream failed, never on
    /// the way to it). Anyone else, or a store that does not answer at once, gets `None`.
    async fn failure_detail_for_admin(
        &self,
        ctx: &RequestCtx,
        e: &Error,
    ) -> Option<web::pages::FailedUpstream> {
        let user_id = ctx.identity.as_ref()?.user_id;
        let route = ctx.config.routes.get(ctx.route?)?;
        let app = self.app.clone();
        let lookup = self.control.spawn(async move {
            tokio::time::timeout(ADMIN_LOOKUP_TIMEOUT, app.store.find_user_by_id(user_id)).await
        });
        let user = match lookup.await {
            Ok(Ok(Ok(Some(user)))) => user,
            _ => return None,
        };
        if !user.is_admin || user.disabled {
            return None;
        }
        let (problem, hint) = respond::upstream_problem(e.etype(), route.kind);
        Some(web::pages::FailedUpstream {
            route: route.name.clone(),
            upstream: route.upstream.to_string(),
            problem,
            hint,
        })
    }

    /// Runs the gateway's own router for a request under `/_portcullis/`.
    async fn serve_own_page(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let (cap, timeout) = (
            ctx.config.server.max_form_bytes,
            ctx.config.server.body_timeout,
        );
        let body = match self.read_own_body(session, cap, timeout).await? {
            Ok(body) => body,
            Err(reason) => {
                ctx.outcome = Outcome::Rejected(reason);
                return respond::reject(session, reason).await;
            }
        };
        let head = session.req_header();
        let mut builder = http::Request::builder()
            .method(head.method.clone())
            .uri(head.uri.clone());
        for (name, value) in head.headers.iter() {
            builder = builder.header(name, value);
        }
        let user_agent = head
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let request = builder
            .extension(ClientInfo {
                ip: ctx.client_ip.clone(),
                user_agent,
            })
            .body(axum::body::Body::from(body))
            .or_err(ErrorType::InternalError, "building the page request")?;
        let router = self.router.clone();
        let response = self
            .control
            .spawn(async move {
                let response = router.oneshot(request).await.infallible();
                let (parts, body) = response.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX).await;
                (parts, bytes)
            })
            .await
            .or_err(ErrorType::InternalError, "running the page handler")?;
        let (parts, bytes) = response;
        let bytes = bytes.or_err(ErrorType::InternalError, "reading the page body")?;
        ctx.outcome = Outcome::GatewayPage;
        respond::page(session, parts, bytes).await
    }
}

/// `Infallible` results, unwrapped without a panic path.
trait Infallible<T> {
    fn infallible(self) -> T;
}

impl<T> Infallible<T> for std::result::Result<T, std::convert::Infallible> {
    fn infallible(self) -> T {
        match self {
            Ok(v) => v,
            Err(never) => match never {},
        }
    }
}

fn host_of(req: &RequestHeader) -> Option<&str> {
    let raw = req
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(http::header::HOST)?.to_str().ok())?;
    // Strip a port, keeping IPv6 brackets intact.
    Some(match raw.rfind(':') {
        Some(i) if !raw[i..].contains(']') => &raw[..i],
        _ => raw,
    })
}

fn header_bytes(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + target
}

fn request_id(req: &RequestHeader) -> String {
    let given = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    match given {
        Some(v) => v.to_string(),
        None => hex_u64(rand::random::<u64>()),
    }
}

/// `n` as 16 lowercase hex digits, as `hex::encode` of its big-endian bytes writes it, without
/// collecting characters one by one (this runs for every request).
fn hex_u64(n: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(16);
    for shift in (0..16).rev() {
        out.push(char::from(DIGITS[((n >> (4 * shift)) & 0xf) as usize]));
    }
    out
}

/// An address as `Display` writes it; IPv4 without the formatter's padding machinery, since
/// this runs for every request.
fn ip_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// Whether a refused request looks like a browser navigating, which gets sent to the login page.
/// This request's path and query (`/` without one): where a browser sent to one of the
/// gateway's pages comes back to, and what a request performed for the client asks for.
fn return_to(req: &RequestHeader) -> String {
    req.uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string())
}

fn is_navigation(req: &RequestHeader) -> bool {
    if req.method != http::Method::GET && req.method != http::Method::HEAD {
        return false;
    }
    let header = |n: &str| req.headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(mode) = header("sec-fetch-mode") {
        return mode == "navigate";
    }
    header("accept").is_some_and(|a| a.contains("text/html"))
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a compression module at level 0, which does
    /// nothing here but still runs on every request and response.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            config: self.app.config(),
            start: Instant::now(),
            request_id: String::new(),
            route: None,
            outcome: Outcome::Unfinished,
            identity: None,
            client_ip: String::new(),
            peer: None,
            upstream_start: None,
            websocket: false,
            track: false,
            conn: None,
            media: media::MediaCtx::default(),
            rules_checked: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.start = Instant::now();
        ctx.request_id = request_id(session.req_header());
        ctx.peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        // The client: the peer, or whom a trusted proxy in front of the gateway names.
        ctx.client_ip = ctx
            .peer
            .map(|a| {
                ip_text(crate::netaddr::client_address(
                    a.ip(),
                    &session.req_header().headers,
                    &ctx.config.server.trusted_proxies,
                    ctx.config.server.client_ip_header,
                ))
            })
            .unwrap_or_default();
        if let Some(peer) = ctx.peer {
            self.admission.head_arrived(peer);
        }

        // 1. Size of the request head.
        if header_bytes(session.req_header()) > ctx.config.server.max_header_bytes {
            ctx.outcome = Outcome::Rejected(RejectReason::HeadersTooLarge);
            respond::reject(session, RejectReason::HeadersTooLarge).await?;
            return Ok(true);
        }

        // 2. The strict front door: framing and head that cannot be read two ways.
        let raw = session
            .as_downstream()
            .as_http1()
            .map(|h1| h1.get_headers_raw_bytes());
        if let Err(v) = strict::check(raw.as_deref(), session.req_header()) {
            tracing::debug!(request_id = %ctx.request_id, problem = v.detail(), "refused at the front door");
            ctx.outcome = Outcome::Rejected(v.reason());
            respond::reject(session, v.reason()).await?;
            return Ok(true);
        }

        // 3. One canonical path, before any routing.
        let canonical = match path::canonicalize(session.req_header().uri.path()) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(request_id = %ctx.request_id, error = %e, "bad path");
                ctx.outcome = Outcome::Rejected(RejectReason::BadPath);
                respond::reject(session, RejectReason::BadPath).await?;
                return Ok(true);
            }
        };

        // 4. The forward-auth endpoint, answered here on the fast path.
        if canonical == paths::VERIFY_PATH {
            if self.app.refuses_when_stale() {
                ctx.outcome = Outcome::Rejected(RejectReason::ViewStale);
                respond::reject(session, RejectReason::ViewStale).await?;
                return Ok(true);
            }
            self.verify(session, ctx).await?;
            return Ok(true);
        }

        // 5. One of the gateway's cookies sent twice: refused everywhere, never guessed at.
        let ambiguous =
            auth::cookie::ambiguous_names(&session.req_header().headers, ctx.config.server.secure);
        if !ambiguous.is_empty() {
            self.refuse_ambiguous(session, ctx, &ambiguous, &canonical)
                .await?;
            return Ok(true);
        }

        // 5. The gateway's own pages.
        if path::under(&canonical, paths::PREFIX) {
            self.serve_own_page(session, ctx).await?;
            return Ok(true);
        }

        // 6. Route.
        let config = ctx.config.clone();
        let Some(index) = find_route(&config.routes, host_of(session.req_header()), &canonical)
        else {
            ctx.outcome = Outcome::Rejected(RejectReason::NoRoute);
            respond::reject(session, RejectReason::NoRoute).await?;
            return Ok(true);
        };
        ctx.route = Some(index);
        let route = &config.routes[index];

        // 7. Public paths pass without a session.
        if route
            .public_paths
            .iter()
            .any(|p| path::under(&canonical, p))
        {
            ctx.outcome = Outcome::Public;
            return Ok(false);
        }

        // 8. A view too stale to trust, when the operator chose to deny then.
        if self.app.refuses_when_stale() {
            ctx.outcome = Outcome::Rejected(RejectReason::ViewStale);
            respond::reject(session, RejectReason::ViewStale).await?;
            return Ok(true);
        }

        // 9. Media routes: their own carriers, login routes, grants.
        if route.media.is_some() {
            return self.media_filter(session, ctx, index, &canonical).await;
        }
        if route.plex.is_some() {
            return self.plex_filter(session, ctx, index, &canonical).await;
        }

        // 10. Authenticate against the revocation view.
        let now = now_ms();
        let (decision, source) = auth::authenticate_headers(
            &session.req_header().headers,
            self.app.cookie_name,
            &self.app.keyring(),
            &self.app.view,
            now / 1000,
        );

        // 11. The access rules, for whoever this is (or nobody).
        let identity = match &decision {
            AuthDecision::Allow(identity) => Some(identity),
            AuthDecision::Deny(_) => None,
        };
        let verdict = self.verdict(session, ctx, route, &canonical, identity, true);
        match verdict {
            rules::Verdict::Bypass if identity.is_none() => {
                ctx.outcome = Outcome::Public;
                return Ok(false);
            }
            rules::Verdict::Deny(_) | rules::Verdict::StepUp(_) => {
                ctx.identity = identity.cloned();
                return self.refuse_by_rule(session, ctx, &verdict).await;
            }
            _ => {}
        }
        match decision {
            AuthDecision::Allow(_)
                if source == Some(auth::CredentialSource::Cookie)
                    && self.cross_site_upgrade(session, ctx) =>
            {
                ctx.outcome = Outcome::Rejected(RejectReason::CrossSiteUpgrade);
                respond::reject(session, RejectReason::CrossSiteUpgrade).await?;
                Ok(true)
            }
            AuthDecision::Allow(identity) => {
                self.app.touch(identity.sid, now);
                ctx.identity = Some(identity);
                ctx.outcome = Outcome::Allowed;
                if session.is_upgrade_req() {
                    ctx.websocket = true;
                    ctx.track = true;
                    self.app.metrics.websockets_open.inc();
                }
                Ok(false)
            }
            AuthDecision::Deny(reason) => {
                ctx.outcome = Outcome::Denied(reason);
                let navigation = is_navigation(session.req_header());
                let return_to = return_to(session.req_header());
                respond::deny(session, navigation, &return_to).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let index = ctx
            .route
            .or_err(ErrorType::InternalError, "no route chosen")?;
        let peer = self
            .peer(&ctx.config, index)
            .or_err(ErrorType::InternalError, "route without peer")?;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_start = Some(Instant::now());
        let host = host_of(session.req_header());
        let route = ctx.route.and_then(|i| ctx.config.routes.get(i));
        if ctx.media.plex_scan {
            // The answer is read for transcode session ids: it must arrive uncompressed.
            upstream_request.remove_header(&http::header::ACCEPT_ENCODING);
        }
        forward::rewrite(
            upstream_request,
            &forward::ForwardFacts {
                client_ip: &ctx.client_ip,
                proto: self.proto,
                host,
                request_id: &ctx.request_id,
                identity: ctx.identity.as_ref(),
                identity_header: route.and_then(|r| r.identity_header.as_deref()),
                media: route.is_some_and(|r| r.media.is_some() || r.plex.is_some()),
            },
        )
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !ctx.track {
            return Ok(());
        }
        // A retry connects again: the entry must name the socket this request now uses, or a
        // revocation could not find it (the first socket is closed).
        if let Some(stale) = ctx.conn.take() {
            self.app.media.unregister(stale);
        }
        let upstream = ctx
            .route
            .and_then(|i| ctx.config.routes.get(i))
            .map(|r| r.upstream);
        if let (Some(identity), Some(upstream)) = (ctx.identity.as_ref(), upstream) {
            ctx.conn = self.app.media.register(identity, fd, upstream);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        respond::add_hsts(upstream_response)?;
        let status = upstream_response.status.as_u16();
        if let (Some(item), Some(identity), Some(index)) = (
            ctx.media.grant_item.take(),
            ctx.identity.as_ref(),
            ctx.route,
        ) {
            let lifetime = ctx
                .config
                .routes
                .get(index)
                .and_then(|r| r.media.as_ref())
                .map_or(0, |m| m.grant_lifetime.as_millis() as i64);
            if status == 200 {
                let until = now_ms() + lifetime;
                self.app
                    .media
                    .grant(index, &item, &ctx.client_ip, identity, until);
                // Other replicas learn of it through the event log.
                let (app, ip, identity) =
                    (self.app.clone(), ctx.client_ip.clone(), identity.clone());
                self.control.spawn(async move {
                    app.share_grant(index, &item, &ip, &identity, until).await;
                });
            }
        }
        if let Some(user_id) = ctx.media.approving_user.take() {
            if !(200..300).contains(&status) {
                self.app.media.approval_failed(user_id);
            }
        }
        if let Some(sid) = ctx.media.logout_sid.take() {
            if (200..300).contains(&status) {
                let app = self.app.clone();
                self.control
                    .spawn(async move { app.media_logged_out(sid).await });
            }
        }
        Ok(())
    }

    /// An upgraded connection (a WebSocket) is relayed by a task of its own once its 101 is
    /// written (vendor/pingora-proxy/PORTCULLIS.md): an open Jellyfin or Plex socket holds its
    /// two connections, not the request's whole state, for the hours it stays open. The
    /// relayed bytes pass no body filter: a request whose body the gateway reads (a Plex
    /// transcode's answer) is not relayed.
    fn relay_upgrades(&self, _session: &Session, ctx: &RequestCtx) -> bool {
        !ctx.media.plex_scan
    }

    /// The request's access line is written at the upgrade; what must last as long as the
    /// connection moves into the relay: its place in the connection registry, where a
    /// revocation finds it, the open-WebSocket gauge, and its standing with the admission
    /// watchman, for which the connection stays busy (never cut as an idle keep-alive) until
    /// it closes.
    fn upgraded_relay_started(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send>> {
        let open = OpenUpgrade {
            app: self.app.clone(),
            websocket: std::mem::take(&mut ctx.websocket),
            conn: ctx.conn.take(),
            busy: ctx.peer.take().map(|peer| (self.admission.clone(), peer)),
            request_id: ctx.request_id.clone(),
            start: ctx.start,
        };
        Some(Box::new(open))
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.media.plex_scan {
            self.scan_plex_body(ctx, body);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => match e.etype() {
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                _ => 400,
            },
            _ => match e.etype() {
                ErrorType::HTTPStatus(code) => *code,
                _ => 500,
            },
        };
        ctx.outcome = Outcome::Failed(code);
        if code > 0 && session.response_written().is_none() {
            let detail = match code {
                502 | 504 => self.failure_detail_for_admin(ctx, e).await,
                _ => None,
            };
            let html = is_navigation(session.req_header());
            if let Err(err) = respond::failure(session, code, html, detail.as_ref()).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Pingora's own error lines describe the request with this; keep secrets out of it.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!(
            "{} {} request_id={}",
            req.method,
            telemetry::redact_target(req.uri.path_and_query().map_or("/", |p| p.as_str())),
            ctx.request_id
        )
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        if let Some(peer) = ctx.peer {
            self.admission.response_ended(peer, Instant::now());
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        let counters = match ctx.outcome {
            Outcome::GatewayPage => self.app.metrics.route(None),
            _ => self.app.metrics.route(ctx.route),
        };
        match ctx.outcome {
            Outcome::Allowed => counters.allowed.inc(),
            Outcome::Granted => counters.granted.inc(),
            Outcome::MediaHandled => counters.media_handled.inc(),
            Outcome::Public => counters.public.inc(),
            Outcome::GatewayPage => counters.gateway_page.inc(),
            Outcome::Denied(r) => counters.refused.denied(r).inc(),
            Outcome::Rejected(r) => counters.refused.rejected(r).inc(),
            Outcome::Failed(502) => counters.upstream_unavailable.inc(),
            Outcome::Failed(_) => counters.proxy_error.inc(),
            Outcome::Unfinished => {}
        }
        // Plex routes' refusals once more by reason alone, `kind="plex"`.
        let plex = ctx
            .route
            .and_then(|i| ctx.config.routes.get(i))
            .is_some_and(|r| r.plex.is_some());
        match ctx.outcome {
            Outcome::Denied(r) if plex => self.app.metrics.plex_refused().denied(r).inc(),
            Outcome::Rejected(r) if plex => self.app.metrics.plex_refused().rejected(r).inc(),
            _ => {}
        }
        counters.duration.observe(elapsed.as_secs_f64());
        if let Some(t) = ctx.upstream_start {
            counters
                .upstream_duration
                .observe(t.elapsed().as_secs_f64());
        }
        if ctx.websocket {
            self.app.metrics.websockets_open.dec();
        }
        if let Some(conn) = ctx.conn.take() {
            self.app.media.unregister(conn);
        }
        let req = session.req_header();
        let route = ctx
            .route
            .and_then(|i| ctx.config.routes.get(i))
            .map_or("-", |r| r.name.as_str());
        let path = telemetry::redact_target(req.uri.path_and_query().map_or("/", |p| p.as_str()));
        telemetry::access(&telemetry::AccessLine {
            request_id: &ctx.request_id,
            client: &ctx.client_ip,
            method: req.method.as_str(),
            path: &path,
            route,
            decision: ctx.outcome.decision(),
            reason: ctx.outcome.reason(),
            user: ctx.identity.as_ref().map_or("-", |i| i.name.as_str()),
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
        });
    }
}

/// What an upgraded connection relayed on its own keeps until it closes.
struct OpenUpgrade {
    app: Arc<App>,
    /// Counted in the open-WebSocket gauge.
    websocket: bool,
    /// Its handle in the connection registry.
    conn: Option<u64>,
    /// The client's connection, busy with the admission watchman until it closes.
    busy: Option<(Arc<admission::Admission>, SocketAddr)>,
    request_id: String,
    start: Instant,
}

impl Drop for OpenUpgrade {
    fn drop(&mut self) {
        if self.websocket {
            self.app.metrics.websockets_open.dec();
        }
        if let Some(conn) = self.conn.take() {
            self.app.media.unregister(conn);
        }
        if let Some((admission, peer)) = self.busy.take() {
            admission.response_ended(peer, Instant::now());
        }
        // A relayed socket's end is a client connection's end, where each proxy thread takes
        // back what other threads freed into its heap (see `tidy_thread_heap`): the relay runs
        // on a proxy thread, and its connection task, where the others do it, ended long ago.
        crate::tidy_thread_heap();
        tracing::debug!(
            request_id = %self.request_id,
            open_s = self.start.elapsed().as_secs_f64(),
            "upgraded connection closed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{hex_u64, ip_text};
    use pingora::prelude::HttpPeer;

    /// The Pingora patch's sixth change (vendor/pingora-core/PORTCULLIS.md): asking for an
    /// upstream connection does not carry, in the future every request holds for its whole life
    /// (an open WebSocket: hours), the state of making a new connection, which is boxed and
    /// made only when the pool has none. Without the change the future is over 8 KiB.
    #[test]
    fn the_future_of_an_upstream_connection_does_not_carry_the_connect() {
        let connector = pingora::connectors::http::Connector::new(None);
        let peer = HttpPeer::new("127.0.0.1:1", false, String::new());
        let asking = connector.get_http_session(&peer);
        let size = std::mem::size_of_val(&asking);
        assert!(size < 1024, "{size} bytes");
    }

    #[test]
    fn request_ids_read_as_hex_encode_writes_them() {
        for n in [0, 1, 0xf, 0x0123_4567_89ab_cdef, u64::MAX - 1, u64::MAX] {
            assert_eq!(hex_u64(n), hex::encode(n.to_be_bytes()));
        }
        for _ in 0..10_000 {
            let n = rand::random::<u64>();
            assert_eq!(hex_u64(n), hex::encode(n.to_be_bytes()));
        }
    }

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "255.255.255.255",
            "1.0.100.99",
            "::1",
            "fe80::1",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for n in (0..=u32::MAX).step_by(65_521) {
            let ip = std::net::IpAddr::V4(n.into());
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
