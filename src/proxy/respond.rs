//! The one place where the proxy's outcomes become HTTP responses: rejections of malformed
//! requests, denials (302 to the login page for browser navigations, 401 otherwise), upstream
//! failures (the styled page, or JSON for API clients; route and address for admins only), and
//! the gateway's own pages. Small hand-built responses keep the connection alive
//! unless the request body was left unread.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use crate::auth::DenyReason;
use crate::config::RouteKind;
use crate::metrics::RejectReason;
use crate::web;
use crate::web::pages::{self, FailedUpstream};

/// What happened to a request, for metrics and the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Unfinished,
    Allowed,
    Public,
    GatewayPage,
    Denied(DenyReason),
    Rejected(RejectReason),
    Failed(u16),
    /// A credential-less media request let through by a playback grant (or artwork by a
    /// live session seen at the same address).
    Granted,
    /// Answered or performed by the gateway for the media server (hidden user list, logins).
    MediaHandled,
}

impl Outcome {
    pub fn decision(self) -> &'static str {
        match self {
            Outcome::Unfinished => "unfinished",
            Outcome::Allowed | Outcome::Public | Outcome::Granted => "allow",
            Outcome::GatewayPage | Outcome::MediaHandled => "gateway",
            Outcome::Denied(_) => "deny",
            Outcome::Rejected(_) => "reject",
            Outcome::Failed(_) => "error",
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Unfinished => "-",
            Outcome::Allowed => "valid_session",
            Outcome::Public => "public_path",
            Outcome::GatewayPage => "own_page",
            Outcome::Granted => "playback_grant",
            Outcome::MediaHandled => "media_handled",
            Outcome::Denied(r) => r.as_str(),
            Outcome::Rejected(r) => r.as_str(),
            Outcome::Failed(502) => "upstream_unavailable",
            Outcome::Failed(_) => "proxy_error",
        }
    }
}

/// Whether the request announced a body that nobody has read.
fn has_unread_body(session: &mut Session) -> bool {
    let h = &session.req_header().headers;
    let announced = h.contains_key(http::header::TRANSFER_ENCODING)
        || h.get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    announced && !session.is_body_done()
}

/// The `Strict-Transport-Security` value of `server.hsts_max_age`, set at start and by each
/// reload (every response the gateway writes or relays carries it).
static HSTS: arc_swap::ArcSwapOption<String> = arc_swap::ArcSwapOption::const_empty();

/// Puts `server.hsts_max_age` in force for the responses from now on.
pub fn set_hsts(value: Option<String>) {
    HSTS.store(value.map(std::sync::Arc::new));
}

/// Adds the HSTS header when it is configured.
pub fn add_hsts(resp: &mut ResponseHeader) -> Result<()> {
    if let Some(v) = HSTS.load().as_deref() {
        resp.insert_header("strict-transport-security", v.as_str())?;
    }
    Ok(())
}

async fn send(
    session: &mut Session,
    status: u16,
    headers: &[(&'static str, String)],
    content_type: &'static str,
    body: Bytes,
) -> Result<()> {
    let close = has_unread_body(session);
    let mut resp = ResponseHeader::build(status, Some(headers.len() + 4))?;
    for (name, value) in headers {
        resp.append_header(*name, value.as_str())?;
    }
    resp.insert_header("content-type", content_type)?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    add_hsts(&mut resp)?;
    if close {
        resp.insert_header("connection", "close")?;
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A malformed or unroutable request.
pub async fn reject(session: &mut Session, reason: RejectReason) -> Result<()> {
    let (status, text) = match reason {
        RejectReason::BadPath => (400, "The request path is malformed or ambiguous."),
        RejectReason::HeadersTooLarge => (431, "The request headers are too large."),
        RejectReason::NoRoute => (404, "No route serves this host and path."),
        RejectReason::BodyTooLarge => (413, "The request body is too large."),
        RejectReason::TwoTokens => (400, "The request carries more than one media-server token."),
        RejectReason::BadClientField => (
            400,
            "A Client, Device, DeviceId, Version or token value is too long or holds control \
             characters or path separators.",
        ),
        RejectReason::BlockedPath => (403, "This path is not available through the gateway."),
        RejectReason::BadFraming => (
            400,
            "The request's length is ambiguous or malformed (Content-Length, Transfer-Encoding).",
        ),
        RejectReason::BadHead => (400, "The request head is malformed."),
        RejectReason::UpgradeRefused => (400, "This protocol upgrade is not supported."),
        RejectReason::RateLimited => (429, "Too many attempts; try again in a few minutes."),
        RejectReason::SlowBody => (408, "The request body did not arrive in time."),
        RejectReason::CrossSiteUpgrade => (
            403,
            "A WebSocket opened from another site cannot use this browser's session.",
        ),
        RejectReason::UpstreamMisconfigured => (
            503,
            "The media server behind this route is not safe to serve: see the gateway's log.",
        ),
        RejectReason::IdentityUnavailable => (
            503,
            "This token cannot be checked right now; try again shortly.",
        ),
        RejectReason::ViewStale => (
            503,
            "The gateway cannot confirm sessions right now: it has lost contact with its \
             store. Try again shortly.",
        ),
    };
    let body = Bytes::from(format!("{text}\n"));
    // After a request whose framing or head could be read two ways, nothing more is read from
    // the connection: whatever follows may be a smuggled request.
    // The same after a body that was not read to its end (too large, too slow).
    let front_door = matches!(
        reason,
        RejectReason::BadFraming
            | RejectReason::BadHead
            | RejectReason::UpgradeRefused
            | RejectReason::BodyTooLarge
            | RejectReason::SlowBody
    );
    if front_door {
        session.set_keepalive(None);
        let headers = [("connection", "close".to_string())];
        return send(session, status, &headers, "text/plain; charset=utf-8", body).await;
    }
    send(session, status, &[], "text/plain; charset=utf-8", body).await
}

/// A request without a live session.
pub async fn deny(session: &mut Session, navigation: bool, return_to: &str) -> Result<()> {
    if navigation {
        return to_page(session, crate::paths::LOGIN_PATH, return_to).await;
    }
    send(
        session,
        401,
        &[(
            "www-authenticate",
            "Bearer realm=\"portcullis\"".to_string(),
        )],
        "application/json",
        Bytes::from_static(b"{\"error\":\"unauthorized\"}\n"),
    )
    .await
}

/// A request refused for carrying one of the gateway's cookies more than once: the login page
/// (400) for a browser navigating, else a 401 naming the reason; with `clears`, the expiring
/// `Set-Cookie` values for every variant of those cookies.
pub async fn ambiguous(
    session: &mut Session,
    page: Option<String>,
    clears: &[String],
) -> Result<()> {
    let mut headers: Vec<(&'static str, String)> =
        clears.iter().map(|c| ("set-cookie", c.clone())).collect();
    match page {
        Some(html) => {
            headers.extend(page_headers());
            send(
                session,
                400,
                &headers,
                "text/html; charset=utf-8",
                Bytes::from(html),
            )
            .await
        }
        None => {
            headers.push((
                "www-authenticate",
                "Bearer realm=\"portcullis\"".to_string(),
            ));
            send(
                session,
                401,
                &headers,
                "application/json",
                Bytes::from_static(
                    b"{\"error\":\"unauthorized\",\"reason\":\"ambiguous_credentials\"}\n",
                ),
            )
            .await
        }
    }
}

/// A forward-auth answer for a live session, with the identity headers proxies copy upstream.
pub async fn verified(session: &mut Session, user: &str, groups: &[String]) -> Result<()> {
    send(
        session,
        200,
        &[
            ("remote-user", user.to_string()),
            ("remote-groups", groups.join(",")),
        ],
        "text/plain; charset=utf-8",
        Bytes::new(),
    )
    .await
}

/// The content-security policy of the gateway's pages: inline styles, nothing else loaded.
const PAGE_CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The headers of a gateway page the proxy builds itself (the router's pages get the same in
/// [`page`]).
fn page_headers() -> [(&'static str, String); 3] {
    [
        ("x-frame-options", "DENY".to_string()),
        ("referrer-policy", "same-origin".to_string()),
        ("content-security-policy", PAGE_CSP.to_string()),
    ]
}

/// What went wrong upstream, in a few words, and what to check next: for admins only.
pub fn upstream_problem(etype: &ErrorType, kind: RouteKind) -> (String, String) {
    use crate::probe::{hint, ProbeError};
    let (problem, like) = match etype {
        ErrorType::ConnectRefused => (
            "nothing answers (connection refused)".to_string(),
            ProbeError::NothingAnswers,
        ),
        ErrorType::ConnectTimedout => (
            "nothing answers (the connection timed out)".to_string(),
            ProbeError::NoReply(crate::probe::PROBE_TIMEOUT),
        ),
        ErrorType::ConnectNoRoute | ErrorType::ConnectError | ErrorType::BindError => (
            format!("cannot connect ({})", etype.as_str()),
            ProbeError::Connect(String::new()),
        ),
        _ => (
            format!("the exchange failed ({})", etype.as_str()),
            ProbeError::NoHttpAnswer(String::new()),
        ),
    };
    (problem, hint(kind, &like))
}

/// The upstream could not be reached, or proxying failed: the gateway's styled page for a
/// browser navigation (`html`), JSON otherwise. `detail` (route, address, cause) is given
/// only for a signed-in admin.
pub async fn failure(
    session: &mut Session,
    status: u16,
    html: bool,
    detail: Option<&FailedUpstream>,
) -> Result<()> {
    session.set_keepalive(None);
    if html {
        let body = Bytes::from(pages::upstream_failed(status, detail).0);
        return send(
            session,
            status,
            &page_headers(),
            "text/html; charset=utf-8",
            body,
        )
        .await;
    }
    let (title, text) = pages::upstream_failure_text(status);
    let mut body = serde_json::json!({
        "error": title.to_ascii_lowercase().replace(' ', "_"),
        "message": text,
    });
    if let Some(d) = detail {
        body["route"] = d.route.clone().into();
        body["upstream"] = d.upstream.clone().into();
        body["problem"] = d.problem.clone().into();
        body["hint"] = d.hint.clone().into();
    }
    let body = Bytes::from(format!("{body}\n"));
    send(session, status, &[], "application/json", body).await
}

/// A response produced by the gateway's own router.
pub async fn page(session: &mut Session, parts: http::response::Parts, body: Bytes) -> Result<()> {
    let close = has_unread_body(session);
    let mut resp = ResponseHeader::build(parts.status, Some(parts.headers.len() + 4))?;
    for (name, value) in parts.headers.iter() {
        resp.append_header(name.clone(), value.clone())?;
    }
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-frame-options", "DENY")?;
    // Links that carry a secret in the path (reset links) never leave in a Referer; `same-origin`
    // rather than `no-referrer`, which would make the browser send `Origin: null` on the
    // gateway's own form posts.
    resp.insert_header("referrer-policy", "same-origin")?;
    resp.insert_header("content-security-policy", PAGE_CSP)?;
    add_hsts(&mut resp)?;
    if close {
        resp.insert_header("connection", "close")?;
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD || body.is_empty();
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A small JSON answer given for the media server (e.g. the hidden user list).
pub async fn json(session: &mut Session, status: u16, body: &'static str) -> Result<()> {
    send(
        session,
        status,
        &[],
        "application/json",
        Bytes::from_static(body.as_bytes()),
    )
    .await
}

/// An answer the gateway obtained from (or made for) the media server on the client's behalf.
pub async fn relay(session: &mut Session, answer: crate::app::media::MediaAnswer) -> Result<()> {
    let close = has_unread_body(session);
    let mut resp = ResponseHeader::build(answer.status, Some(answer.headers.len() + 2))?;
    for (name, value) in answer.headers.iter() {
        let hop = matches!(
            name.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "upgrade"
        );
        if !hop {
            resp.append_header(name.clone(), value.clone())?;
        }
    }
    resp.insert_header("content-length", answer.body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    add_hsts(&mut resp)?;
    if close {
        resp.insert_header("connection", "close")?;
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD || answer.body.is_empty();
    session
        .write_response_header(Box::new(resp), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(answer.body), true).await?;
    }
    Ok(())
}

/// A media route's refusal for lack of a live credential: 401, which makes the apps drop their
/// token and show their login screen.
pub async fn media_deny(session: &mut Session) -> Result<()> {
    send(
        session,
        401,
        &[],
        "application/json",
        Bytes::from_static(b"{\"error\":\"unauthorized\"}\n"),
    )
    .await
}

/// Sends a browser to one of the gateway's pages (`page`), which brings it back to
/// `return_to` (made a same-origin path) when done.
async fn to_page(session: &mut Session, page: &str, return_to: &str) -> Result<()> {
    let rd = percent_encoding::utf8_percent_encode(
        &web::safe_return_path(Some(return_to)),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .to_string();
    send(
        session,
        302,
        &[("location", format!("{page}?rd={rd}"))],
        "text/plain; charset=utf-8",
        Bytes::new(),
    )
    .await
}

/// A browser refused by an access rule: for a session with one factor where two are needed,
/// the step-up page (which says how to get the second); else a 403 page.
pub async fn rule_page(session: &mut Session, reason: DenyReason, return_to: &str) -> Result<()> {
    if reason == DenyReason::TwoFactorRequired {
        return to_page(session, crate::paths::STEP_UP_PATH, return_to).await;
    }
    let page = web::pages::message(
        "Not allowed",
        "An access rule of this gateway refuses this page to you (from here, or at all). Ask \
         its administrator if you think you should reach it.",
    )
    .0;
    send(
        session,
        403,
        &[],
        "text/html; charset=utf-8",
        Bytes::from(page),
    )
    .await
}

/// An app refused by an access rule: the reason as JSON.
pub async fn rule_json(session: &mut Session, status: u16, body: &serde_json::Value) -> Result<()> {
    send(
        session,
        status,
        &[],
        "application/json",
        Bytes::from(format!("{body}\n")),
    )
    .await
}

/// A media route's refusal with a reason the user can act on.
pub async fn media_refuse(session: &mut Session, status: u16, message: &str) -> Result<()> {
    let body = serde_json::json!({ "error": message }).to_string();
    send(session, status, &[], "application/json", Bytes::from(body)).await
}
