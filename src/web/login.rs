//! Signing in and out: the login form and its pending steps (second factor, forced new
//! password, forced 2FA enrolment), the JSON login API, logout, and password reset links.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{
    cross_site, forbidden_cross_site, no_store, pages, redirect, safe_return_path, session_cookie,
    store_unavailable, with_cookie, PageForm, LOGIN_PATH,
};
use crate::app::{now_ms, App, Channel, ClientInfo, LoginError, LoginStep, PendingStage};
use crate::auth::{self, cookie, AuthDecision, CredentialSource};
use crate::config::Secret;
use crate::store::{ResetLinkState, SessionKind};

/// The HTTP status for a login error.
pub(crate) fn login_status(e: &LoginError) -> StatusCode {
    match e {
        LoginError::InvalidCredentials
        | LoginError::InvalidCode
        | LoginError::SecondFactorRequired
        | LoginError::RestartLogin => StatusCode::UNAUTHORIZED,
        LoginError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
        LoginError::Locked
        | LoginError::Disabled
        | LoginError::PasswordResetRequired
        | LoginError::EnrollmentRequired
        | LoginError::PasskeyRequired => StatusCode::FORBIDDEN,
        LoginError::Policy(_) => StatusCode::BAD_REQUEST,
        LoginError::Unavailable(_) | LoginError::DirectoryUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        LoginError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn with_retry_after(mut resp: Response, e: &LoginError) -> Response {
    if let LoginError::Throttled(d) = e {
        if let Ok(v) = HeaderValue::from_str(&d.as_secs().max(1).to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

fn count_login(app: &App, method: &str, result: &Result<LoginStep, LoginError>) {
    let label = match result {
        Ok(LoginStep::Session(_)) => "success",
        Ok(LoginStep::Pending { .. }) => "pending",
        Err(e) => e.label(),
    };
    app.metrics
        .counter(crate::metrics::Family::Logins, &[method, label])
        .inc();
}

fn stage_path(stage: PendingStage) -> &'static str {
    match stage {
        PendingStage::Totp => "/_portcullis/login/2fa",
        PendingStage::Password => "/_portcullis/login/password",
        PendingStage::Enroll => "/_portcullis/login/enroll",
        PendingStage::Passkey => "/_portcullis/login/passkey",
    }
}

pub(crate) fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Turns a login step into the browser's next page.
pub(crate) fn step_response(app: &App, step: LoginStep, rd: &str, client: &ClientInfo) -> Response {
    let secure = app.config().server.secure;
    match step {
        LoginStep::Session(ok) => {
            tracing::info!(user = %ok.user_name, session = %ok.session_id, ip = %client.ip, "login");
            let resp = session_cookie(app, redirect(rd), &ok);
            with_cookie(resp, &cookie::clear_pending(secure))
        }
        LoginStep::Pending { token, stage } => {
            let to = format!("{}?rd={}", stage_path(stage), encode(rd));
            with_cookie(
                redirect(&to),
                &cookie::pending(&token, secure, crate::app::PENDING_TTL_SECS),
            )
        }
    }
}

/// The pending-login token; a request carrying the cookie twice never reaches here (the proxy
/// refuses it first), and is treated as having none.
pub(crate) fn pending_token<'a>(app: &App, headers: &'a HeaderMap) -> Option<&'a str> {
    cookie::find(headers, cookie::pending_name(app.config().server.secure))
        .ok()
        .flatten()
}

#[derive(Deserialize)]
pub(crate) struct RdQuery {
    rd: Option<String>,
}

impl RdQuery {
    pub(crate) fn rd(&self) -> Option<&str> {
        self.rd.as_deref()
    }
}

/// The login page with this gateway's providers and password-form setting.
pub(crate) fn login_html(app: &App, rd: &str, error: Option<&str>) -> axum::response::Html<String> {
    let sso: Vec<(String, String)> = app
        .oidc
        .all()
        .iter()
        .map(|p| (p.config.id.clone(), p.config.display_name.clone()))
        .collect();
    pages::login(
        rd,
        error,
        &sso,
        app.config().auth.password_form,
        app.mail_enabled(),
    )
}

/// What the login page says to a browser whose request carried one of the gateway's cookies
/// more than once (the response also expires them).
const AMBIGUOUS_COOKIES: &str = "Your browser sent more than one Portcullis sign-in cookie, so \
     this request was refused rather than guessed at. They have been cleared: please sign in \
     again. If this keeps happening, another site under this domain may be setting cookies.";

/// The login page for a request refused for ambiguous cookies, returning to `rd` afterwards.
pub(crate) fn ambiguous_login_page(app: &App, rd: &str) -> String {
    login_html(app, &safe_return_path(Some(rd)), Some(AMBIGUOUS_COOKIES)).0
}

pub(crate) async fn login_page(State(app): State<Arc<App>>, Query(q): Query<RdQuery>) -> Response {
    let rd = safe_return_path(q.rd.as_deref());
    no_store(login_html(&app, &rd, None).into_response())
}

#[derive(Deserialize)]
pub(crate) struct LoginFormData {
    username: String,
    password: String,
    rd: Option<String>,
}

pub(crate) async fn login_form(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<LoginFormData>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let rd = safe_return_path(form.rd.as_deref());
    let result = app
        .login(
            &form.username,
            Secret::new(form.password),
            None,
            Channel::Form,
            SessionKind::Web,
            &client,
        )
        .await;
    count_login(&app, "password", &result);
    match result {
        Ok(step) => step_response(&app, step, &rd, &client),
        Err(e) => {
            tracing::info!(ip = %client.ip, reason = e.label(), "login refused");
            let resp = (
                login_status(&e),
                login_html(&app, &rd, Some(&e.to_string())),
            )
                .into_response();
            no_store(with_retry_after(resp, &e))
        }
    }
}

/// Renders a pending step's page, or sends the browser back to the login form.
async fn pending_page(
    app: &App,
    headers: &HeaderMap,
    stage: PendingStage,
    rd: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let Some(token) = pending_token(app, headers) else {
        return redirect(&format!("{LOGIN_PATH}?rd={}", encode(rd)));
    };
    let (claims, user) = match app.pending_user(token, stage).await {
        Ok(v) => v,
        Err(LoginError::Unavailable(e)) => return store_unavailable(&e.to_string()),
        Err(_) => return redirect(&format!("{LOGIN_PATH}?rd={}", encode(rd))),
    };
    let csrf = app.secrets.csrf_token(&claims.jti);
    let page = match stage {
        PendingStage::Totp => {
            let passkey = match app.passkeys_of(user.id).await {
                Ok(p) => !p.is_empty(),
                Err(e) => return store_unavailable(&e.to_string()),
            };
            pages::totp_step(rd, &csrf, error, user.totp_enabled, passkey)
        }
        PendingStage::Password => pages::password_step(&user.name, rd, &csrf, error),
        PendingStage::Enroll => match app.start_enrollment(user.id).await {
            Ok(en) => pages::enroll(
                &en,
                "/_portcullis/login/enroll",
                rd,
                &csrf,
                error,
                "Set up two-factor authentication to finish signing in.",
            ),
            Err(e) => return store_unavailable(&e.to_string()),
        },
        PendingStage::Passkey => pages::passkey_step(&user.name, rd, &csrf, error),
    };
    no_store((status, page).into_response())
}

/// The pending-login token of a step's form post, once the origin and the form's CSRF token
/// are checked; otherwise the 403 to send.
pub(crate) async fn pending_form<'a>(
    app: &App,
    headers: &'a HeaderMap,
    stage: PendingStage,
    csrf: &str,
) -> Result<&'a str, Response> {
    if cross_site(app, headers) {
        return Err(forbidden_cross_site());
    }
    let token = pending_token(app, headers).ok_or_else(forbidden_cross_site)?;
    match app.pending_user(token, stage).await {
        Ok((claims, _)) if !app.secrets.csrf_ok(&claims.jti, csrf) => Err(forbidden_cross_site()),
        // A stale or wrong-stage token: the step itself sends the browser back to log in.
        _ => Ok(token),
    }
}

fn pending_error(app: &App, e: LoginError, rd: &str) -> Option<Response> {
    match e {
        LoginError::RestartLogin => {
            let resp = with_cookie(
                (
                    StatusCode::UNAUTHORIZED,
                    login_html(app, rd, Some(&e.to_string())),
                )
                    .into_response(),
                &cookie::clear_pending(app.config().server.secure),
            );
            Some(no_store(resp))
        }
        LoginError::Unavailable(s) => Some(store_unavailable(&s.to_string())),
        LoginError::Throttled(_) | LoginError::Locked | LoginError::Disabled => {
            let resp =
                (login_status(&e), login_html(app, rd, Some(&e.to_string()))).into_response();
            Some(no_store(with_retry_after(resp, &e)))
        }
        _ => None,
    }
}

/// A `GET` handler for the page of a pending step (`/_portcullis/login/2fa`, `/password`,
/// `/enroll`, `/passkey`): the page, or back to the login form without a live pending login at
/// that step.
pub(crate) fn step_page(
    stage: PendingStage,
) -> impl Fn(State<Arc<App>>, HeaderMap, Query<RdQuery>) -> BoxFuture<'static, Response> + Clone {
    move |State(app), headers, Query(q)| {
        Box::pin(async move {
            let rd = safe_return_path(q.rd.as_deref());
            pending_page(&app, &headers, stage, &rd, None, StatusCode::OK).await
        })
    }
}

#[derive(Deserialize)]
pub(crate) struct CodeForm {
    code: String,
    #[serde(default)]
    csrf: String,
    rd: Option<String>,
}

pub(crate) async fn totp_form(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<CodeForm>,
) -> Response {
    let rd = safe_return_path(form.rd.as_deref());
    let token = match pending_form(&app, &headers, PendingStage::Totp, &form.csrf).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let result = app
        .complete_second_factor(token, &form.code, SessionKind::Web, &client)
        .await;
    count_login(&app, "password", &result);
    match result {
        Ok(step) => step_response(&app, step, &rd, &client),
        Err(e) => match pending_error(&app, e, &rd) {
            Some(resp) => resp,
            None => {
                pending_page(
                    &app,
                    &headers,
                    PendingStage::Totp,
                    &rd,
                    Some("The code is not valid. Try the current code from your app, or a recovery code."),
                    StatusCode::UNAUTHORIZED,
                )
                .await
            }
        },
    }
}

#[derive(Deserialize)]
pub(crate) struct NewPasswordForm {
    new_password: String,
    confirm: String,
    #[serde(default)]
    csrf: String,
    rd: Option<String>,
}

pub(crate) async fn password_form(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<NewPasswordForm>,
) -> Response {
    let rd = safe_return_path(form.rd.as_deref());
    let token = match pending_form(&app, &headers, PendingStage::Password, &form.csrf).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let result = app
        .complete_password_step(
            token,
            Secret::new(form.new_password),
            Secret::new(form.confirm),
            SessionKind::Web,
            &client,
        )
        .await;
    match result {
        Ok(step) => step_response(&app, step, &rd, &client),
        Err(e) => match pending_error(&app, e, &rd) {
            Some(resp) => resp,
            None => {
                pending_page(
                    &app,
                    &headers,
                    PendingStage::Password,
                    &rd,
                    Some("That password cannot be used: it must be long enough, differ from your user name and not be a common or breached password."),
                    StatusCode::BAD_REQUEST,
                )
                .await
            }
        },
    }
}

#[derive(Deserialize)]
pub(crate) struct EnrollForm {
    enroll: String,
    code: String,
    #[serde(default)]
    csrf: String,
    rd: Option<String>,
}

pub(crate) async fn enroll_form(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<EnrollForm>,
) -> Response {
    let rd = safe_return_path(form.rd.as_deref());
    let token = match pending_form(&app, &headers, PendingStage::Enroll, &form.csrf).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let result = app
        .complete_enroll_step(token, &form.enroll, &form.code, SessionKind::Web, &client)
        .await;
    match result {
        Ok((LoginStep::Session(ok), codes)) => {
            let page = pages::recovery_codes(&codes, &rd);
            let resp = session_cookie(&app, no_store(page.into_response()), &ok);
            with_cookie(resp, &cookie::clear_pending(app.config().server.secure))
        }
        Ok((step @ LoginStep::Pending { .. }, _)) => step_response(&app, step, &rd, &client),
        Err(e) => {
            match pending_error(&app, e, &rd) {
                Some(resp) => resp,
                None => pending_page(
                    &app,
                    &headers,
                    PendingStage::Enroll,
                    &rd,
                    Some(
                        "The code is not valid. Scan the new QR code and enter the code it shows.",
                    ),
                    StatusCode::UNAUTHORIZED,
                )
                .await,
            }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ApiLoginData {
    username: String,
    password: String,
    totp: Option<String>,
}

pub(crate) async fn api_login(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Json(data): Json<ApiLoginData>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let code = data.totp.as_deref().filter(|c| !c.trim().is_empty());
    let result = app
        .login(
            &data.username,
            Secret::new(data.password),
            code,
            Channel::Api,
            SessionKind::Api,
            &client,
        )
        .await;
    count_login(&app, "api", &result);
    match result {
        Ok(LoginStep::Session(ok)) => {
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
        Ok(LoginStep::Pending { .. }) => {
            // The API never yields a pending step; treat it as an internal error.
            no_store(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Err(e) => {
            tracing::info!(ip = %client.ip, reason = e.label(), "api login refused");
            let body = serde_json::json!({ "error": e.label(), "message": e.to_string() });
            let resp = (login_status(&e), Json(body)).into_response();
            no_store(with_retry_after(resp, &e))
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/logout`: a Bearer session ends with 204; a cookie session only with the
/// CSRF token of the page's sign-out form (the cookie is ambient, so without the token a forged
/// post could sign the victim out), else 403 and nothing ends. A request without a live session
/// just gets the cookie cleared.
pub(crate) async fn logout(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    form: Result<axum::Form<LogoutForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let (decision, source) = auth::authenticate_headers(
        &headers,
        app.cookie_name,
        &app.keyring(),
        &app.view,
        now_ms() / 1000,
    );
    let mut end_session = None;
    if let AuthDecision::Allow(identity) = decision {
        if source == Some(CredentialSource::Cookie) {
            let csrf = form.as_ref().map(|f| f.csrf.as_str()).unwrap_or("");
            if !app.secrets.csrf_ok(&identity.sid.to_string(), csrf) {
                tracing::info!(ip = %client.ip, "cookie logout without its CSRF token refused");
                return forbidden_cross_site();
            }
            end_session = app.sso_end_session_url(identity.sid).await;
        }
        if let Err(e) = app.revoke_session(identity.sid).await {
            return store_unavailable(&e.to_string());
        }
        let mut e = app.audit_entry(
            "logout",
            "success",
            Some((identity.user_id, &identity.name)),
            &client,
        );
        e.session_id = identity.sid.to_string();
        app.audit(e).await;
    }
    match source {
        Some(CredentialSource::Bearer) => no_store(StatusCode::NO_CONTENT.into_response()),
        _ => with_cookie(
            redirect(end_session.as_deref().unwrap_or(LOGIN_PATH)),
            &cookie::clear(app.config().server.secure),
        ),
    }
}

fn reset_state_page(state: &ResetLinkState) -> Response {
    let (status, title, text) = match state {
        ResetLinkState::Used => (
            StatusCode::GONE,
            "Link already used",
            "This reset link has already been used. Ask your administrator for a new one.",
        ),
        ResetLinkState::Expired => (
            StatusCode::GONE,
            "Link expired",
            "This reset link has expired. Ask your administrator for a new one.",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "Link not valid",
            "This reset link is not valid. Check that you copied all of it.",
        ),
    };
    no_store((status, pages::message(title, text)).into_response())
}

pub(crate) async fn reset_page(State(app): State<Arc<App>>, Path(token): Path<String>) -> Response {
    match app.reset_link_state(&token).await {
        Ok(ResetLinkState::Valid { .. }) => {
            no_store(pages::reset_form(&token, None).into_response())
        }
        Ok(state) => reset_state_page(&state),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct ResetForm {
    new_password: String,
    confirm: String,
    /// "Sign out connected devices" (ticked on the page).
    signout: Option<String>,
}

pub(crate) async fn reset_form(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Path(token): Path<String>,
    PageForm(form): PageForm<ResetForm>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let signout = form.signout.is_some();
    match app
        .redeem_reset_link(
            &token,
            Secret::new(form.new_password),
            Secret::new(form.confirm),
            signout,
            &client,
        )
        .await
    {
        Ok(ResetLinkState::Valid { .. }) => no_store(
            pages::message_with_link(
                "Password changed",
                if signout {
                    "Your password has been changed and every device has been signed out."
                } else {
                    "Your password has been changed. Devices signed in before keep their sessions."
                },
                LOGIN_PATH,
                "Sign in",
            )
            .into_response(),
        ),
        Ok(state) => reset_state_page(&state),
        Err(crate::app::account::AccountError::Unavailable(e)) => store_unavailable(&e.to_string()),
        Err(e) => no_store(
            (
                StatusCode::BAD_REQUEST,
                pages::reset_form(&token, Some(&e.to_string())),
            )
                .into_response(),
        ),
    }
}
