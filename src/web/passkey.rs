//! Passkey endpoints: the JSON halves of the WebAuthn ceremonies the page script
//! (`passkey.js`) drives — sign-in (usernameless or user name first), a passkey as the second
//! step of a password login, registration from the account page — and the account page's
//! rename and remove forms. Every refusal is a 4xx with the reason's label (`error`) and a
//! sentence (`message`); nothing changes on a refusal.

// Handlers return early with a ready response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::account::form_identity;
use super::login::{login_status, pending_form, step_response, with_retry_after};
use super::pages::{self, escape, hidden, when, PASSKEY_ERROR, PASSKEY_SCRIPT};
use super::{
    cross_site, forbidden_cross_site, no_store, redirect, safe_return_path, store_unavailable,
    to_login, BodyRefusal, PageForm, ACCOUNT_PATH, LOGIN_PATH,
};
use crate::app::account::{AccountError, Reauth};
use crate::app::passkey::authenticator_name;
use crate::app::passkey::{PasskeyError, Started};
use crate::app::{App, ClientInfo, LoginStep, PendingStage};
use crate::metrics::Family;
use crate::store::{PasskeyRecord, ResetLinkState, SessionKind, User};

/// The account page's passkey section: each passkey (label, authenticator, created and last
/// used, a warning when it may have been copied) with rename and remove, and the form that adds
/// one after the password (and code).
pub(crate) fn section(user: &User, passkeys: &[PasskeyRecord], csrf: &str) -> String {
    let rows: String = passkeys
        .iter()
        .map(|p| {
            let authenticator = authenticator_name(&p.aaguid).unwrap_or("Passkey");
            let warning = p.clone_warning_ms.map_or(String::new(), |ms| {
                format!(
                    "<p class=\"error\" role=\"alert\">Possibly copied: on {} it signed with a \
counter that did not move forward, and was refused. Remove it unless you know why.</p>",
                    when(ms)
                )
            });
            format!(
                "<tr data-passkey=\"{}\"><td><strong>{}</strong>{warning}</td><td>{}</td>\
<td class=\"when\">{}</td><td class=\"when\">{}</td><td>\
<form method=\"post\" action=\"/_portcullis/account/passkeys/rename\">{}{}\
<input type=\"text\" name=\"label\" aria-label=\"New name\" maxlength=\"64\" required>\
<button type=\"submit\" class=\"secondary\">Rename</button></form>\
<form method=\"post\" action=\"/_portcullis/account/passkeys/remove\">{}{}\
<label class=\"check\"><input type=\"checkbox\" name=\"signout\" value=\"1\"> Also sign out every device</label>\
<button type=\"submit\" class=\"secondary\">Remove</button></form></td></tr>",
                p.id,
                escape(&p.label),
                escape(authenticator),
                when(p.created_ms),
                p.last_used_ms.map_or("never".to_string(), when),
                hidden("id", &p.id.to_string()),
                hidden("csrf", csrf),
                hidden("id", &p.id.to_string()),
                hidden("csrf", csrf),
            )
        })
        .collect();
    let code = if user.totp_enabled {
        "<label for=\"passkey-code\">Code from your authenticator app</label>\
<input type=\"text\" id=\"passkey-code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>"
    } else {
        ""
    };
    format!(
        "<section id=\"passkeys\"><h2>Passkeys</h2>\
<p>A passkey signs you in without a password, and cannot be phished by a look-alike page. One \
that checks your fingerprint, face or PIN counts as two factors.</p>\
<table><thead><tr><th>Passkey</th><th>Authenticator</th><th>Added</th><th>Last used</th><th></th></tr></thead>\
<tbody>{rows}</tbody></table>\
{}{PASSKEY_ERROR}{PASSKEY_SCRIPT}</section>",
        pages::passkey_add_form(
            "/_portcullis/account/passkeys",
            &format!(
                "{}<label for=\"passkey-password\">Current password</label>\
<input type=\"password\" id=\"passkey-password\" name=\"password\" autocomplete=\"current-password\" required>\
{code}<button type=\"submit\">Add a passkey</button>{}",
                hidden("csrf", csrf),
                pages::passkey_confirm(!passkeys.is_empty(), "Add, confirming with a passkey"),
            )
        ),
    )
}

/// The page script, served by the gateway itself (the pages allow no other script).
pub(crate) async fn script() -> Response {
    let mut resp = include_str!("passkey.js").into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn status(e: &PasskeyError) -> StatusCode {
    match e {
        PasskeyError::Expired
        | PasskeyError::Malformed(_)
        | PasskeyError::WrongOrigin
        | PasskeyError::WrongRpId
        | PasskeyError::NotVerified
        | PasskeyError::Refused(_)
        | PasskeyError::BadLabel => StatusCode::BAD_REQUEST,
        PasskeyError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        PasskeyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        PasskeyError::UnknownCredential
        | PasskeyError::BadSignature
        | PasskeyError::PossibleClone => StatusCode::UNAUTHORIZED,
        PasskeyError::Duplicate | PasskeyError::LastMethod => StatusCode::CONFLICT,
        PasskeyError::NoSuchPasskey => StatusCode::NOT_FOUND,
        PasskeyError::LinkNotValid => StatusCode::GONE,
        PasskeyError::Login(e) => login_status(e),
        PasskeyError::Account(AccountError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
        PasskeyError::Account(_) => StatusCode::FORBIDDEN,
    }
}

/// A refusal as JSON: `{"error": <reason>, "message": <sentence>}`.
pub(crate) fn refusal(e: &PasskeyError) -> Response {
    let body = serde_json::json!({ "error": e.label(), "message": e.to_string() });
    let resp = (status(e), Json(body)).into_response();
    match e {
        PasskeyError::Login(login) => no_store(with_retry_after(resp, login)),
        _ => no_store(resp),
    }
}

/// A JSON body whose refusal is this module's own ([`NotPasskeyJson`]): 415 `not_json` for
/// another content type, 413 `body_too_large` over the body limit, 400 `malformed_response` for
/// a body that is not JSON or lacks a field (axum's own answers are plain text: 415, 413, 400,
/// 422). No value of the body is echoed. A post from another site never gets here: the
/// router's `refuse_cross_site` layer answers it 403 before any handler reads its body.
pub(crate) struct PasskeyJson<T>(pub T);

/// Why [`PasskeyJson`] refused a body; answered with [`refusal`]. A handler that counts its
/// refusals takes `Result<PasskeyJson<T>, NotPasskeyJson>`.
pub(crate) struct NotPasskeyJson(pub PasskeyError);

impl IntoResponse for NotPasskeyJson {
    fn into_response(self) -> Response {
        refusal(&self.0)
    }
}

impl<T, S> FromRequest<S> for PasskeyJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = NotPasskeyJson;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, NotPasskeyJson> {
        let rejection = match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => return Ok(PasskeyJson(value)),
            Err(r) => r,
        };
        let e = match (BodyRefusal::of(rejection.status()), rejection) {
            (BodyRefusal::WrongType, _) => PasskeyError::NotJson,
            (BodyRefusal::TooLarge, _) => PasskeyError::TooLarge,
            (_, JsonRejection::JsonSyntaxError(_)) => {
                PasskeyError::Malformed("the body is not valid JSON".into())
            }
            (_, JsonRejection::JsonDataError(e)) => {
                let text = e.body_text();
                PasskeyError::Malformed(
                    match text
                        .split("missing field `")
                        .nth(1)
                        .and_then(|rest| rest.split('`').next())
                    {
                        Some(field) => format!("the field `{field}` is missing"),
                        None => "a field has the wrong type".into(),
                    },
                )
            }
            _ => PasskeyError::Malformed("the body could not be read".into()),
        };
        tracing::info!(reason = e.label(), "passkey request refused");
        Err(NotPasskeyJson(e))
    }
}

pub(crate) fn started(s: Started) -> Response {
    let mut body = s.options;
    if let Some(map) = body.as_object_mut() {
        map.insert("ceremony".into(), serde_json::Value::String(s.ceremony));
    }
    no_store(Json(body).into_response())
}

/// A login step as JSON for the script: where to go next (the session or the pending step's
/// page), with the cookies the form login would set.
fn step_json(app: &App, step: LoginStep, rd: &str, client: &ClientInfo) -> Response {
    let page = step_response(app, step, rd, client);
    let to = page
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("/")
        .to_string();
    let mut resp = Json(serde_json::json!({ "redirect": to })).into_response();
    for cookie in page.headers().get_all(header::SET_COOKIE) {
        resp.headers_mut()
            .append(header::SET_COOKIE, cookie.clone());
    }
    no_store(resp)
}

fn count_login(app: &App, result: Result<&LoginStep, &PasskeyError>) {
    let label = match result {
        Ok(LoginStep::Session(_)) => "success",
        Ok(LoginStep::Pending { .. }) => "pending",
        Err(e) => e.label(),
    };
    app.metrics
        .counter(Family::Logins, &["passkey", label])
        .inc();
}

/// A JSON post that only carries the page's CSRF token (the start of a ceremony).
#[derive(Deserialize)]
pub(crate) struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

/// The authenticator's answer to a ceremony, with what the page sends along: the new passkey's
/// name (registrations), the page's CSRF token and where to go next (sign-ins).
#[derive(Deserialize)]
pub(crate) struct Answer {
    ceremony: String,
    credential: serde_json::Value,
    #[serde(default)]
    label: String,
    #[serde(default)]
    csrf: String,
    rd: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct LoginStart {
    username: Option<String>,
}

/// `POST /_portcullis/passkey/login/start`: a sign-in ceremony, for the user's own passkeys
/// when a known name with passkeys is given, else for any passkey of this site.
pub(crate) async fn login_start(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<LoginStart>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let name = body
        .username
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    match app.passkey_login_start(name, &client).await {
        Ok(s) => started(s),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/passkey/login/finish`: the authenticator's answer; a session (or the
/// TOTP step, for a passkey that did not verify its user).
pub(crate) async fn login_finish(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    body: Result<PasskeyJson<Answer>, NotPasskeyJson>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let body = match body {
        Ok(PasskeyJson(body)) => body,
        Err(NotPasskeyJson(e)) => {
            count_login(&app, Err(&e));
            return refusal(&e);
        }
    };
    let rd = safe_return_path(body.rd.as_deref());
    let result = app
        .passkey_login_finish(
            &body.ceremony,
            &body.credential.to_string(),
            SessionKind::Web,
            &client,
        )
        .await;
    count_login(&app, result.as_ref());
    match result {
        Ok(step) => step_json(&app, step, &rd, &client),
        Err(e) => {
            tracing::info!(ip = %client.ip, reason = e.label(), "passkey login refused");
            refusal(&e)
        }
    }
}

/// `POST /_portcullis/passkey/second-factor/start`: a ceremony for the user's passkeys, as the
/// second step of a password login.
pub(crate) async fn second_start(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<CsrfOnly>,
) -> Response {
    let token = match pending_form(&app, &headers, PendingStage::Totp, &body.csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match app.passkey_second_factor_start(token).await {
        Ok(s) => started(s),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/passkey/second-factor/finish`.
pub(crate) async fn second_finish(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<Answer>,
) -> Response {
    let token = match pending_form(&app, &headers, PendingStage::Totp, &body.csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let rd = safe_return_path(body.rd.as_deref());
    let result = app
        .passkey_second_factor_finish(
            token,
            &body.ceremony,
            &body.credential.to_string(),
            SessionKind::Web,
            &client,
        )
        .await;
    let label = match &result {
        Ok(_) => "success",
        Err(_) => "failure",
    };
    app.metrics
        .counter(Family::SecondFactor, &["passkey", label])
        .inc();
    match result {
        Ok(step) => step_json(&app, step, &rd, &client),
        Err(e) => refusal(&e),
    }
}

#[derive(Deserialize)]
pub(crate) struct AddStart {
    password: Option<String>,
    code: Option<String>,
    /// From a passkey confirmation, in place of the password and code.
    passkey_grant: Option<String>,
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/account/passkeys/start`: a registration ceremony, after the password
/// (and the code, with TOTP on).
pub(crate) async fn add_start(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<AddStart>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &body.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let proof = Reauth::from_form(body.password, body.code, body.passkey_grant);
    match app.passkey_register_start(&id, proof, &client).await {
        Ok(s) => started(s),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/login/passkey/start`: the registration a sign-in owes (the user must sign
/// in with a passkey and has none).
pub(crate) async fn enrol_start(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<CsrfOnly>,
) -> Response {
    let token = match pending_form(&app, &headers, PendingStage::Passkey, &body.csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    match app.passkey_enrol_start(token, &client).await {
        Ok(s) => started(s),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/login/passkey/finish`: stores the passkey, and the sign-in goes on.
pub(crate) async fn enrol_finish(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<Answer>,
) -> Response {
    let token = match pending_form(&app, &headers, PendingStage::Passkey, &body.csrf).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let rd = safe_return_path(body.rd.as_deref());
    let result = app
        .passkey_enrol_finish(
            token,
            &body.ceremony,
            &body.credential.to_string(),
            &body.label,
            SessionKind::Web,
            &client,
        )
        .await;
    match result {
        Ok(step) => step_json(&app, step, &rd, &client),
        Err(e) => refusal(&e),
    }
}

/// The signed-in user of a JSON post from the account pages (origin and CSRF token checked).
async fn json_user(
    app: &App,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(crate::auth::Identity, User), Response> {
    let (id, _) = form_identity(app, headers, csrf)?;
    match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) => Ok((id, u)),
        Ok(None) => Err(forbidden_cross_site()),
        Err(e) => Err(store_unavailable(&e.to_string())),
    }
}

/// `POST /_portcullis/account/passkeys/confirm/start`: a ceremony for the signed-in user's own
/// passkeys, to confirm a sensitive change with one instead of the password (and code).
pub(crate) async fn confirm_start(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<CsrfOnly>,
) -> Response {
    let (_, user) = match json_user(&app, &headers, &body.csrf).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.passkey_confirm_start(&user).await {
        Ok(s) => started(s),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/account/passkeys/confirm/finish`: once the passkey verified its user,
/// `{"grant": …}` — single use, for this session, five minutes — which the form of the change
/// carries as `passkey_grant`.
pub(crate) async fn confirm_finish(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<Answer>,
) -> Response {
    let (id, user) = match json_user(&app, &headers, &body.csrf).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app
        .passkey_grant(
            &id,
            &user,
            &body.ceremony,
            &body.credential.to_string(),
            &client,
        )
        .await
    {
        Ok(grant) => no_store(Json(serde_json::json!({ "grant": grant })).into_response()),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/account/passkeys/finish`: stores the new passkey.
pub(crate) async fn add_finish(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PasskeyJson(body): PasskeyJson<Answer>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &body.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app
        .passkey_register_finish(
            &id,
            &body.ceremony,
            &body.credential.to_string(),
            &body.label,
            &client,
        )
        .await
    {
        Ok(p) => no_store(
            Json(serde_json::json!({
                "id": p.id,
                "redirect": format!("{ACCOUNT_PATH}?done=passkey-added"),
            }))
            .into_response(),
        ),
        Err(e) => refusal(&e),
    }
}

#[derive(Deserialize)]
pub(crate) struct PasskeyForm {
    id: i64,
    label: Option<String>,
    signout: Option<String>,
    #[serde(default)]
    csrf: String,
}

fn passkey_not_changed(e: &PasskeyError) -> Response {
    match e {
        PasskeyError::Login(crate::app::LoginError::Unavailable(s)) => {
            store_unavailable(&s.to_string())
        }
        other => super::account::not_changed(status(other), &other.to_string()),
    }
}

async fn form_user(
    app: &App,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<crate::store::User, Response> {
    let (id, _) = form_identity(app, headers, csrf)?;
    match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(forbidden_cross_site()),
        Err(e) => Err(store_unavailable(&e.to_string())),
    }
}

/// `POST /_portcullis/account/passkeys/rename`.
pub(crate) async fn rename(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PasskeyForm>,
) -> Response {
    let user = match form_user(&app, &headers, &form.csrf).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let label = form.label.unwrap_or_default();
    match app.passkey_rename(&user, form.id, &label, &client).await {
        Ok(()) => redirect(&format!("{ACCOUNT_PATH}?done=passkey-renamed")),
        Err(e) => passkey_not_changed(&e),
    }
}

/// `POST /_portcullis/account/passkeys/remove`: removes a passkey; with `signout`, also signs
/// out every device of the user.
pub(crate) async fn remove(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PasskeyForm>,
) -> Response {
    let user = match form_user(&app, &headers, &form.csrf).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let signout = form.signout.is_some();
    match app.passkey_remove(&user, form.id, signout, &client).await {
        Ok(()) if signout => to_login(ACCOUNT_PATH),
        Ok(()) => redirect(&format!("{ACCOUNT_PATH}?done=passkey-removed")),
        Err(e) => passkey_not_changed(&e),
    }
}

/// `GET /_portcullis/passkey-link/{token}`: the page of an administrator's one-time link, which
/// adds a passkey for its user without a password.
pub(crate) async fn link_page(State(app): State<Arc<App>>, Path(token): Path<String>) -> Response {
    match crate::app::account::passkey_link_state(&app.store, &token).await {
        Ok(ResetLinkState::Valid { user_id }) => match app.store.find_user_by_id(user_id).await {
            Ok(Some(user)) if !user.disabled => {
                no_store(pages::passkey_link(&user.name, &token).into_response())
            }
            Ok(_) => link_gone(),
            Err(e) => store_unavailable(&e.to_string()),
        },
        Ok(ResetLinkState::Unknown) => no_store(
            (
                StatusCode::NOT_FOUND,
                pages::message("Unknown link", "This link is not valid."),
            )
                .into_response(),
        ),
        Ok(_) => link_gone(),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

fn link_gone() -> Response {
    no_store(
        (
            StatusCode::GONE,
            pages::message(
                "Link used or expired",
                &PasskeyError::LinkNotValid.to_string(),
            ),
        )
            .into_response(),
    )
}

/// `POST /_portcullis/passkey-link/{token}/start`.
pub(crate) async fn link_start(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    match app.passkey_link_start(&token, &client).await {
        Ok(s) => started(s),
        Err(e) => refusal(&e),
    }
}

/// `POST /_portcullis/passkey-link/{token}/finish`: stores the passkey, uses the link and signs
/// out every device of the user; the browser then signs in with the new passkey.
pub(crate) async fn link_finish(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Path(token): Path<String>,
    PasskeyJson(body): PasskeyJson<Answer>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    match app
        .passkey_link_finish(
            &token,
            &body.ceremony,
            &body.credential.to_string(),
            &body.label,
            &client,
        )
        .await
    {
        Ok(()) => no_store(
            Json(serde_json::json!({
                "redirect": format!("{LOGIN_PATH}?rd={}", super::login::encode(ACCOUNT_PATH)),
            }))
            .into_response(),
        ),
        Err(e) => refusal(&e),
    }
}
