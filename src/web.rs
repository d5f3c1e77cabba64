//! Portcullis's own pages and JSON API under `/_portcullis/` (an axum router the proxy calls
//! in-process), and the private admin listener (`/healthz`, `/readyz`, `/metrics`).
//! Pages are server-rendered HTML with no external assets and work without JavaScript.

mod pages;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use serde::Deserialize;

use crate::app::{App, ClientInfo, LoginError, LoginOk};
use crate::auth::{self, cookie, AuthDecision, CredentialSource};
use crate::config::Secret;
use crate::store::SessionKind;

/// The reserved path prefix of the gateway's own pages.
pub const PREFIX: &str = "/_portcullis";
pub const LOGIN_PATH: &str = "/_portcullis/login";
/// The forward-auth endpoint, answered by the proxy itself.
pub const VERIFY_PATH: &str = "/_portcullis/verify";

/// The router for `/_portcullis/…`, served in-process by the proxy.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/_portcullis/login", get(login_page).post(login_form))
        .route("/_portcullis/api/login", post(api_login))
        .route("/_portcullis/logout", post(logout))
        .route("/_portcullis/", get(home))
        .fallback(not_found)
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

/// A same-origin relative path to return to after login; anything else becomes `/`.
pub fn safe_return_path(candidate: Option<&str>) -> String {
    let Some(p) = candidate else {
        return "/".to_string();
    };
    let decoded = percent_encoding::percent_decode_str(p).decode_utf8_lossy();
    let bad = |s: &str| {
        !s.starts_with('/')
            || s.starts_with("//")
            || s.contains('\\')
            || s.chars().any(|c| c.is_control())
    };
    if p.len() > 2048 || bad(p) || bad(&decoded) || decoded.starts_with("/%") {
        return "/".to_string();
    }
    p.to_string()
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    no_store(resp)
}

/// Refuses a state-changing request that a browser says comes from another site.
fn cross_site(app: &App, headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site == "cross-site" || site == "same-site" {
            return true;
        }
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) => origin != app.config.server.public_url,
        None => false,
    }
}

fn forbidden_cross_site() -> Response {
    no_store(
        (
            StatusCode::FORBIDDEN,
            pages::message(
                "Refused",
                "This request came from another site and was refused.",
            ),
        )
            .into_response(),
    )
}

#[derive(Deserialize)]
struct LoginQuery {
    rd: Option<String>,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    let rd = safe_return_path(q.rd.as_deref());
    no_store(pages::login(&rd, None).into_response())
}

#[derive(Deserialize)]
struct LoginFormData {
    username: String,
    password: String,
    rd: Option<String>,
}

async fn login_form(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Form(form): Form<LoginFormData>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let rd = safe_return_path(form.rd.as_deref());
    let result = app
        .login(
            &form.username,
            Secret::new(form.password),
            SessionKind::Web,
            &client,
        )
        .await;
    count_login(&app, &result);
    match result {
        Ok(ok) => {
            tracing::info!(user = %ok.user_name, session = %ok.session_id, ip = %client.ip, "login");
            let max_age = ok.expires_s - crate::app::now_ms() / 1000;
            let mut resp = redirect(&rd);
            let c = cookie::session(&ok.token, app.config.server.secure, max_age.max(0));
            if let Ok(v) = HeaderValue::from_str(&c) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => {
            tracing::info!(ip = %client.ip, reason = e.label(), "login refused");
            let status = login_status(&e);
            no_store((status, pages::login(&rd, Some(&e.to_string()))).into_response())
        }
    }
}

fn login_status(e: &LoginError) -> StatusCode {
    match e {
        LoginError::InvalidCredentials | LoginError::Disabled => StatusCode::UNAUTHORIZED,
        LoginError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        LoginError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn count_login(app: &App, result: &Result<LoginOk, LoginError>) {
    let label = match result {
        Ok(_) => "success",
        Err(e) => e.label(),
    };
    app.metrics
        .logins
        .with_label_values(&["password", label])
        .inc();
}

#[derive(Deserialize)]
struct ApiLoginData {
    username: String,
    password: String,
}

async fn api_login(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Json(data): Json<ApiLoginData>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let result = app
        .login(
            &data.username,
            Secret::new(data.password),
            SessionKind::Api,
            &client,
        )
        .await;
    count_login(&app, &result);
    match result {
        Ok(ok) => {
            tracing::info!(user = %ok.user_name, session = %ok.session_id, ip = %client.ip, "api login");
            no_store(
                Json(serde_json::json!({
                    "token": ok.token,
                    "session_id": ok.session_id.to_string(),
                    "expires_at": ok.expires_s,
                }))
                .into_response(),
            )
        }
        Err(e) => {
            tracing::info!(ip = %client.ip, reason = e.label(), "api login refused");
            let body = serde_json::json!({ "error": e.label(), "message": e.to_string() });
            no_store((login_status(&e), Json(body)).into_response())
        }
    }
}

async fn logout(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let found = auth::extract_credential(&headers, app.cookie_name);
    let source = found.map(|(_, s)| s);
    let decision = auth::authenticate(
        found.map(|(t, _)| t),
        &app.keyring,
        &app.view,
        crate::app::now_ms() / 1000,
    );
    if let AuthDecision::Allow(identity) = decision {
        if let Err(e) = app.revoke_session(identity.sid).await {
            return store_unavailable(&e.to_string());
        }
        tracing::info!(user = %identity.name, session = %identity.sid, "logout");
    }
    match source {
        Some(CredentialSource::Bearer) => no_store(StatusCode::NO_CONTENT.into_response()),
        _ => {
            let mut resp = redirect(LOGIN_PATH);
            if let Ok(v) = HeaderValue::from_str(&cookie::clear(app.config.server.secure)) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
    }
}

fn store_unavailable(detail: &str) -> Response {
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

async fn home(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let token = auth::extract_credential(&headers, app.cookie_name).map(|(t, _)| t);
    match auth::authenticate(token, &app.keyring, &app.view, crate::app::now_ms() / 1000) {
        AuthDecision::Allow(identity) => no_store(pages::home(&identity.name).into_response()),
        AuthDecision::Deny(_) => redirect(LOGIN_PATH),
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
    let body = serde_json::json!({
        "store": if store_ok { "ok" } else { "unreachable" },
        "view": if fresh { "fresh" } else { "stale" },
        "view_staleness_seconds": staleness.map(|s| s.as_secs_f64()),
        "view_sequence": app.view.seq(),
        "last_sync_error": app.view.last_error(),
    });
    let status = if store_ok && fresh {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
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
