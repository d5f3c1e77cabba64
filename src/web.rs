//! Portcullis's own pages and JSON API under `/_portcullis/` (an axum router the proxy calls
//! in-process), and the private admin listener (`/healthz`, `/readyz`, `/metrics`).
//! Pages are server-rendered HTML with no external assets and work without JavaScript.
//! Every state-changing form is POST only and checks both the `Origin`/`Sec-Fetch-Site`
//! headers and a per-session CSRF token.

mod account;
mod admin;
mod email;
mod login;
mod passkey;
mod plex;
pub(crate) use login::ambiguous_login_page;
pub(crate) mod pages;
mod sso;

use std::sync::Arc;

use axum::extract::{FromRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::app::{now_ms, App, LoginOk, PendingStage};
use crate::auth::{self, cookie, AuthDecision, CredentialSource, Identity};
use crate::paths::{ACCOUNT_PATH, LOGIN_PATH};
use crate::probe;

/// The router for `/_portcullis/…`, served in-process by the proxy.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/_portcullis/login",
            get(login::login_page).post(login::login_form),
        )
        .route(
            "/_portcullis/login/2fa",
            get(login::step_page(PendingStage::Totp)).post(login::totp_form),
        )
        .route(
            "/_portcullis/login/password",
            get(login::step_page(PendingStage::Password)).post(login::password_form),
        )
        .route(
            "/_portcullis/login/enroll",
            get(login::step_page(PendingStage::Enroll)).post(login::enroll_form),
        )
        .route(
            "/_portcullis/login/passkey",
            get(login::step_page(PendingStage::Passkey)),
        )
        .route(
            "/_portcullis/login/passkey/start",
            post(passkey::enrol_start),
        )
        .route(
            "/_portcullis/login/passkey/finish",
            post(passkey::enrol_finish),
        )
        .route("/_portcullis/api/login", post(login::api_login))
        .route("/_portcullis/logout", post(login::logout))
        .route(
            "/_portcullis/api/signout-all",
            post(account::api_signout_all),
        )
        .route(
            "/_portcullis/reset/{token}",
            get(login::reset_page).post(login::reset_form),
        )
        .route(
            "/_portcullis/forgot",
            get(email::forgot_form).post(email::forgot),
        )
        .route(
            "/_portcullis/email/confirm/{token}",
            get(email::confirm_page).post(email::confirm),
        )
        .route(
            "/_portcullis/not-me/{token}",
            get(email::not_me_page).post(email::not_me),
        )
        .route("/_portcullis/account/email", post(email::change))
        .route("/_portcullis/", get(home))
        .route("/_portcullis/account", get(account::page))
        .route(crate::paths::STEP_UP_PATH, get(account::step_up_page))
        .route(
            "/_portcullis/account/sessions/revoke",
            post(account::revoke_device),
        )
        .route(
            "/_portcullis/account/signout-others",
            post(account::signout_others),
        )
        .route(
            "/_portcullis/account/signout-all",
            post(account::signout_all),
        )
        .route(
            "/_portcullis/account/password",
            post(account::change_password),
        )
        .route(
            "/_portcullis/account/2fa",
            get(account::twofa_page).post(account::twofa_enable),
        )
        .route(
            "/_portcullis/account/2fa/disable",
            post(account::twofa_disable),
        )
        .route("/_portcullis/oidc/{provider}/start", get(sso::start))
        .route("/_portcullis/oidc/{provider}/callback", get(sso::callback))
        .route(
            "/_portcullis/oidc/{provider}/backchannel-logout",
            post(sso::backchannel_logout),
        )
        .route("/_portcullis/account/oidc/link", post(sso::link))
        .route("/_portcullis/account/oidc/unlink", post(sso::unlink))
        .route("/_portcullis/account/plex/link", post(plex::link))
        .route("/_portcullis/account/plex/unlink", post(plex::unlink))
        .route("/_portcullis/account/plex/approve", post(plex::approve))
        .route(
            "/_portcullis/account/passkeys/confirm/start",
            post(passkey::confirm_start),
        )
        .route(
            "/_portcullis/account/passkeys/confirm/finish",
            post(passkey::confirm_finish),
        )
        .route("/_portcullis/account/plex/revoke", post(plex::revoke))
        .route("/_portcullis/passkey.js", get(passkey::script))
        .route(
            "/_portcullis/passkey/login/start",
            post(passkey::login_start),
        )
        .route(
            "/_portcullis/passkey/login/finish",
            post(passkey::login_finish),
        )
        .route(
            "/_portcullis/passkey/second-factor/start",
            post(passkey::second_start),
        )
        .route(
            "/_portcullis/passkey/second-factor/finish",
            post(passkey::second_finish),
        )
        .route("/_portcullis/passkey-link/{token}", get(passkey::link_page))
        .route(
            "/_portcullis/passkey-link/{token}/start",
            post(passkey::link_start),
        )
        .route(
            "/_portcullis/passkey-link/{token}/finish",
            post(passkey::link_finish),
        )
        .route(
            "/_portcullis/account/passkeys/start",
            post(passkey::add_start),
        )
        .route(
            "/_portcullis/account/passkeys/finish",
            post(passkey::add_finish),
        )
        .route(
            "/_portcullis/account/passkeys/rename",
            post(passkey::rename),
        )
        .route(
            "/_portcullis/account/passkeys/remove",
            post(passkey::remove),
        )
        .route("/_portcullis/admin", get(admin::page))
        .route("/_portcullis/admin/users", post(admin::add_user))
        .route("/_portcullis/admin/users/action", post(admin::user_action))
        .route(
            "/_portcullis/admin/sessions/revoke",
            post(admin::revoke_session),
        )
        .route("/_portcullis/admin/breach", post(admin::breach))
        .route("/_portcullis/admin/plex/link", post(admin::plex_link))
        .route("/_portcullis/admin/plex/unlink", post(admin::plex_unlink))
        .route(
            "/_portcullis/admin/plex/revoke-upstream",
            post(admin::plex_revoke_upstream),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            refuse_cross_site,
        ))
        .with_state(app)
}

/// The router of the private admin listener.
pub fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(app)
}

/// The plain-http listener of `server.redirect_listen`: every request, whatever its method, is
/// sent to the same path and query over https (308 keeps the method and body). The host is the
/// request's when it is the public URL's or a route's, else the public URL's: never one a
/// client made up.
pub fn redirect_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/.well-known/acme-challenge/{token}", get(acme_challenge))
        .fallback(to_https)
        .with_state(app)
}

/// An ACME HTTP-01 challenge's answer (the key authorization), this replica's or another's;
/// 404 for a token no order of this gateway's published.
async fn acme_challenge(
    State(app): State<Arc<App>>,
    axum::extract::Path(token): axum::extract::Path<String>,
) -> Response {
    let token_ok = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let answer = match token_ok {
        true => app.acme_answer(&format!("http-01:{token}")).await,
        false => None,
    };
    match answer {
        Some(proof) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            proof,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn to_https(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let config = app.config();
    if !config.server.redirect_http {
        return StatusCode::NOT_FOUND.into_response();
    }
    let public = url::Url::parse(&config.server.public_url).ok();
    let public_host = public
        .as_ref()
        .and_then(|u| u.host_str())
        .unwrap_or("localhost")
        .to_ascii_lowercase();
    let port = public
        .as_ref()
        .and_then(|u| u.port())
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let asked = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            h.rsplit_once(':')
                .map_or(h, |(name, _)| name)
                .to_ascii_lowercase()
        });
    let known = |h: &str| {
        h == public_host
            || config.routes.iter().any(|r| {
                r.host
                    .as_deref()
                    .is_some_and(|rh| rh.eq_ignore_ascii_case(h))
            })
    };
    let host = asked.filter(|h| known(h)).unwrap_or(public_host);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let location = format!("https://{host}{port}{path}");
    match axum::http::HeaderValue::from_str(&location) {
        Ok(v) => (
            StatusCode::PERMANENT_REDIRECT,
            [(axum::http::header::LOCATION, v)],
        )
            .into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// A same-origin relative path to return to after login; anything else becomes `/`.
pub fn safe_return_path(candidate: Option<&str>) -> String {
    let Some(p) = candidate else {
        return "/".to_string();
    };
    let decoded = percent_encoding::percent_decode_str(p).decode_utf8_lossy();
    // Only a path on this origin, before and after decoding: no scheme or authority (`//host`,
    // `/\\host`) and no control characters. Raw, it must also be written as a URL path is
    // written, without the characters a URL never holds unencoded (quotes, angle brackets,
    // blanks…), which only an injection attempt sends.
    let bad = |s: &str| {
        !s.starts_with('/')
            || s.starts_with("//")
            || s.contains('\\')
            || s.chars().any(|c| c.is_control())
    };
    let unencoded = p
        .chars()
        .any(|c| c.is_whitespace() || "\"<>`{}|^".contains(c));
    if p.len() > 2048 || bad(p) || unencoded || bad(&decoded) || decoded.starts_with("/%") {
        return "/".to_string();
    }
    p.to_string()
}

pub(crate) fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(crate) fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    no_store(resp)
}

pub(crate) fn with_cookie(mut resp: Response, cookie: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

/// The response that sets a fresh session cookie.
pub(crate) fn session_cookie(app: &App, resp: Response, ok: &LoginOk) -> Response {
    let max_age = (ok.expires_s - now_ms() / 1000).max(0);
    with_cookie(
        resp,
        &cookie::session(&ok.token, app.config().server.secure, max_age),
    )
}

/// Whether a state-changing request comes from another site, by the browser's own headers:
/// `Sec-Fetch-Site` when the browser sends it (its verdict is final: `Origin` can be `null` on
/// same-origin posts), else `Origin` against `public_url`. Clients that send neither (curl, API
/// clients) carry no ambient browser credentials to abuse and pass to the per-session checks.
pub(crate) fn cross_site(app: &App, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site != "same-origin" && site != "none";
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        return origin.to_str().ok() != Some(app.config().server.public_url.as_str());
    }
    // Without Origin (older browsers, some privacy settings), a Referer must be this origin;
    // a client that sends neither is not a browser and cannot be made to forge a request.
    match headers.get(header::REFERER) {
        Some(referer) => !referer
            .to_str()
            .is_ok_and(|r| same_origin(r, &app.config().server.public_url)),
        None => false,
    }
}

/// Whether URL `url` is on `origin` (`https://host[:port]`, no trailing slash).
fn same_origin(url: &str, origin: &str) -> bool {
    url.strip_prefix(origin)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

/// Refuses every cross-site POST under `/_portcullis/` with 403 before any form is read.
async fn refuse_cross_site(
    State(app): State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() == axum::http::Method::POST && cross_site(&app, req.headers()) {
        return forbidden_cross_site();
    }
    next.run(req).await
}

/// Why a body extractor refused a request, sorted alike for page forms ([`PageForm`]) and
/// passkey JSON (`passkey::PasskeyJson`): another content type, a body over the limit, or one
/// that cannot be read as the handler's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyRefusal {
    WrongType,
    TooLarge,
    Unreadable,
}

impl BodyRefusal {
    /// Sorts axum's refusal by its status: 415 and 413 as they are, anything else (400, 422, a
    /// failed read) unreadable.
    pub(crate) fn of(status: StatusCode) -> Self {
        match status {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::WrongType,
            StatusCode::PAYLOAD_TOO_LARGE => Self::TooLarge,
            _ => Self::Unreadable,
        }
    }

    /// The status it is answered with: 415, 413, or 400 (never axum's plain-text 422).
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::WrongType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unreadable => StatusCode::BAD_REQUEST,
        }
    }
}

/// A urlencoded form body whose refusal is the gateway's own page with a precise status: 415
/// for another content type (e.g. `text/plain` with a JSON body), 413 over the body limit, and
/// 400 for a form that lacks a field or cannot be read (axum's own answer would be a plain-text
/// 422). CSRF fields default to empty, so a form without one is refused by the CSRF check (403).
pub(crate) struct PageForm<T>(pub T);

impl<T, S> FromRequest<S> for PageForm<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(value)) => Ok(PageForm(value)),
            Err(rejection) => {
                let status = BodyRefusal::of(rejection.status()).status();
                tracing::info!(status = status.as_u16(), "form refused");
                Err(no_store(
                    (
                        status,
                        pages::message(
                            "Not processed",
                            "The form was incomplete or not sent as a form, so nothing was changed.",
                        ),
                    )
                        .into_response(),
                ))
            }
        }
    }
}

pub(crate) fn forbidden_cross_site() -> Response {
    no_store(
        (
            StatusCode::FORBIDDEN,
            pages::message(
                "Refused",
                "This request came from another site (or its form expired) and was refused.",
            ),
        )
            .into_response(),
    )
}

pub(crate) fn store_unavailable(detail: &str) -> Response {
    tracing::warn!(error = detail, "store unavailable");
    no_store(
        (
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message(
                "Temporarily unavailable",
                "The account store is unavailable, so this change could not be saved. \
                 Sessions that are already signed in keep working. Try again shortly.",
            ),
        )
            .into_response(),
    )
}

/// The signed-in identity of a request, and where its credential came from.
pub(crate) fn identity(app: &App, headers: &HeaderMap) -> Option<(Identity, CredentialSource)> {
    match auth::authenticate_headers(
        headers,
        app.cookie_name,
        &app.keyring(),
        &app.view,
        now_ms() / 1000,
    ) {
        (AuthDecision::Allow(id), Some(source)) => Some((id, source)),
        _ => None,
    }
}

/// The login page, returning to `path` afterwards.
pub(crate) fn to_login(path: &str) -> Response {
    let rd = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
    redirect(&format!("{LOGIN_PATH}?rd={rd}"))
}

async fn home(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    match identity(&app, &headers) {
        Some((id, _)) => {
            let csrf = app.secrets.csrf_token(&id.sid.to_string());
            no_store(pages::home(&id.name, &csrf).into_response())
        }
        None => redirect(LOGIN_PATH),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        pages::message("Not found", "There is no such Portcullis page."),
    )
        .into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let store_ok = app.store.ping().await.is_ok();
    let (fresh, staleness) = app.view_is_fresh();
    // Fresh probes; a route whose upstream is down does not make the gateway unready.
    let upstreams = probe::probe_all(&app.config().routes, probe::Depth::Identify).await;
    probe::record(&upstreams, &app.metrics.upstream_up);
    let (plex, plex_ok) = plex_readiness(&app).await;
    // The phase as the answer leaves, after the probes (which may take seconds).
    let phase = app.readiness.phase();
    let body = serde_json::json!({
        "listener": phase.as_str(),
        "not_ready_reason": phase.not_ready_reason(),
        "store": if store_ok { "ok" } else { "unreachable" },
        "view": if fresh { "fresh" } else { "stale" },
        "view_staleness_seconds": staleness.map(|s| s.as_secs_f64()),
        "view_sequence": app.view.seq(),
        "last_sync_error": app.view.last_error(),
        "store_backend": app.store.backend(),
        "push": app.store.announcements().map(|rx| if rx.borrow().connected { "connected" } else { "disconnected" }),
        "on_stale": match app.config().store.on_stale {
            crate::config::OnStale::Serve => "serve",
            crate::config::OnStale::Deny => "deny",
        },
        "upstreams": upstreams.iter().map(probe::RouteProbe::json).collect::<Vec<_>>(),
        "plex": plex,
        "directory": directory_readiness(&app),
        "acme": app.acme.as_ref().map(|a| a.status()),
    });
    // Without any certificate the public listener cannot answer (the ACME manager is still
    // waiting for its first one, and there are no certificate files).
    let certificate_ok = app.config().server.tls.is_some()
        || app
            .acme
            .as_ref()
            .is_none_or(|a| a.status().not_after_ms.is_some());
    let status =
        if store_ok && fresh && phase.not_ready_reason().is_none() && plex_ok && certificate_ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
    (status, Json(body)).into_response()
}

/// The directory's state as the last operation and sync found it: `degraded` while it cannot
/// be reached (new sign-ins of its users get 503; existing sessions keep working, so the
/// gateway stays ready).
fn directory_readiness(app: &App) -> Option<serde_json::Value> {
    let config = app.config();
    let directory = config.directory.as_ref()?;
    let error = app.directory_status.error();
    let last = app
        .directory_status
        .last_sync_ms
        .load(std::sync::atomic::Ordering::Acquire);
    Some(serde_json::json!({
        "state": if error.is_some() { "degraded" } else { "ok" },
        "url": directory.url,
        "error": error,
        "last_sync_age_seconds": (last > 0)
            .then(|| (crate::app::now_ms() - last).max(0) as f64 / 1000.0),
    }))
}

/// Each plex route's self-check, run afresh, and plex.tv's last error. A route whose server
/// settings are fatal, or were never read, makes the gateway unready.
async fn plex_readiness(app: &Arc<App>) -> (Vec<serde_json::Value>, bool) {
    use crate::mediaserver::plex::CheckState;
    let mut out = Vec::new();
    let mut ok = true;
    for (route, state) in app.check_plex_routes().await {
        let plex_tv = app.plex_state(&route).plex_tv_error.load_full();
        let (check, fatal, warnings) = match &state {
            CheckState::Pending(why) => ("pending", Some(why.clone()), Vec::new()),
            CheckState::Done(r) if r.fatal.is_some() => {
                ("fatal", r.fatal.clone(), r.warnings.clone())
            }
            CheckState::Done(r) => ("ok", None, r.warnings.clone()),
        };
        ok &= check == "ok";
        out.push(serde_json::json!({
            "route": route,
            "self_check": check,
            "problem": fatal,
            "warnings": warnings,
            "plex_tv_error": plex_tv.as_ref().clone(),
        }));
    }
    (out, ok)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let (_, staleness) = app.view_is_fresh();
    app.metrics
        .sync_lag
        .set(staleness.map_or(f64::INFINITY, |s| s.as_secs_f64()));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::safe_return_path;

    #[test]
    fn return_paths_stay_on_this_origin() {
        for evil in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "/%2F%2Fevil.example",
            "/%5Cevil.example",
            "evil.example",
            "/%09/evil.example",
            "/\"><script>alert(1)</script>",
            "/a b",
        ] {
            assert_eq!(safe_return_path(Some(evil)), "/", "{evil}");
        }
        assert_eq!(
            safe_return_path(Some("/web/index.html?x=1")),
            "/web/index.html?x=1"
        );
        assert_eq!(safe_return_path(None), "/");
    }
}
