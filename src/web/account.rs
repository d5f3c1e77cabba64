//! The account page: devices with "Sign out" per device, "Sign out of all other devices",
//! "Sign out of all devices", password change with "Sign out connected devices" (ticked by
//! default), and two-factor authentication.

// Handlers return early with a ready response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::{
    cross_site, forbidden_cross_site, identity, no_store, pages, redirect, session_cookie,
    store_unavailable, to_login, with_cookie, PageForm, ACCOUNT_PATH, LOGIN_PATH,
};
use crate::app::account::{AccountError, PasswordChange, Reauth};
use crate::app::{App, ClientInfo};
use crate::auth::{cookie, CredentialSource, Identity};
use crate::config::Secret;
use crate::store::{SessionId, SessionKind};

/// The signed-in identity, or the response that sends the browser to log in.
fn signed_in(app: &App, headers: &HeaderMap, back_to: &str) -> Result<Identity, Response> {
    identity(app, headers)
        .map(|(id, _)| id)
        .ok_or_else(|| to_login(back_to))
}

/// `GET /_portcullis/step-up?rd=`: where an access rule that needs two factors sends a
/// session that passed one. It says how to get the second: sign in again (with the code or a
/// passkey) for a user who has one, else set one up first.
pub(crate) async fn step_up_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<super::login::RdQuery>,
) -> Response {
    let rd = super::safe_return_path(q.rd());
    let id = match signed_in(&app, &headers, &rd) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let user = match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) => u,
        Ok(None) => return to_login(&rd),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let second = match app.has_second_factor(&user).await {
        Ok(b) => b,
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let (text, link) = if second {
        (
            "This page needs a sign-in with two factors, and this one used one. Sign out of \
             this device and sign in again: with your code or your passkey, the new sign-in \
             counts both.",
            "Go to your account (Sign out of this device is at the bottom)",
        )
    } else {
        (
            "This page needs a sign-in with two factors. Your account has only a password: \
             turn on two-factor authentication or add a passkey on your account page, then \
             sign in again.",
            "Go to your account",
        )
    };
    no_store(
        (
            StatusCode::UNAUTHORIZED,
            pages::message_with_link("Two factors needed", text, ACCOUNT_PATH, link),
        )
            .into_response(),
    )
}

/// For a form post: signed in, same origin, and the session's CSRF token.
pub(crate) fn form_identity(
    app: &App,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(Identity, SessionKind), Response> {
    if cross_site(app, headers) {
        return Err(forbidden_cross_site());
    }
    let (id, source) = identity(app, headers).ok_or_else(|| to_login(ACCOUNT_PATH))?;
    if !app.secrets.csrf_ok(&id.sid.to_string(), csrf) {
        return Err(forbidden_cross_site());
    }
    let kind = match source {
        CredentialSource::Bearer => SessionKind::Api,
        CredentialSource::Cookie => SessionKind::Web,
    };
    Ok((id, kind))
}

/// The page for an account change that was refused: why, and the way back.
pub(crate) fn not_changed(status: StatusCode, text: &str) -> Response {
    no_store(
        (
            status,
            pages::message_with_link("Not changed", text, ACCOUNT_PATH, "Back to your account"),
        )
            .into_response(),
    )
}

fn account_error(e: AccountError) -> Response {
    match e {
        AccountError::Unavailable(s) => store_unavailable(&s.to_string()),
        AccountError::DirectoryUnavailable => {
            not_changed(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
        }
        other => not_changed(StatusCode::BAD_REQUEST, &other.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct Done {
    done: Option<String>,
    error: Option<String>,
}

pub(crate) async fn page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<Done>,
) -> Response {
    let id = match signed_in(&app, &headers, ACCOUNT_PATH) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let user = match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) => u,
        Ok(None) => return to_login(ACCOUNT_PATH),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let sessions = match app.sessions_of(id.user_id).await {
        Ok(s) => s,
        Err(e) => return account_error(e),
    };
    let csrf = app.secrets.csrf_token(&id.sid.to_string());
    let links = match app.store.oidc_links_of(id.user_id).await {
        Ok(l) => l,
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let providers: Vec<(String, String, Option<i64>)> = app
        .oidc
        .all()
        .iter()
        .map(|p| {
            let linked = links
                .iter()
                .find(|l| l.provider == p.config.id)
                .map(|l| l.created_ms);
            (p.config.id.clone(), p.config.display_name.clone(), linked)
        })
        .collect();
    let sso = pages::sso_section(&providers, &csrf);
    let plex = match super::plex::section(&app, &user, &csrf).await {
        Ok(p) => p,
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let (passkeys, has_passkey) = match app.passkeys_of(user.id).await {
        Ok(p) => (super::passkey::section(&user, &p, &csrf), !p.is_empty()),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let notice = match q.done.as_deref() {
        Some("device") => Some("That device has been signed out."),
        Some("others") => Some("Every other device has been signed out."),
        Some("password") => Some("Your password has been changed."),
        Some("password-signout") => {
            Some("Your password has been changed and every other device has been signed out.")
        }
        Some("2fa-off") => Some("Two-factor authentication is off."),
        Some("sso-linked") => Some("The sign-in provider is linked to your account."),
        Some("sso-unlinked") => Some("The sign-in provider is unlinked from your account."),
        Some("plex-linked") => {
            Some("The Plex account is linked: its apps reach the server as you.")
        }
        Some("plex-unlinked") => Some("The Plex account is unlinked: its apps are signed out."),
        Some("plex-approved") => Some("The Plex device is approved."),
        Some("plex-revoked") => Some("The Plex device is signed out and must be approved again."),
        Some("passkey-added") => Some("The passkey is added: you can sign in with it."),
        Some("passkey-renamed") => Some("The passkey is renamed."),
        Some("passkey-removed") => {
            Some("The passkey is removed; devices signed in with it stay signed in.")
        }
        Some(other) => super::email::notice(other),
        _ => None,
    };
    let error = match q.error.as_deref() {
        Some("password") => Some("The password was not changed: check the current password, and that the new one is long enough, differs from your user name and is typed the same twice."),
        Some("locked") => Some("The password was not changed: too many wrong passwords were entered. Try again later."),
        Some("passkey") => Some("The password was not changed: the passkey confirmation has expired or was used already. Confirm again."),
        Some("directory") => Some("The password was not changed: this account's password is kept by the user directory. Change it there."),
        Some("directory-down") => Some("The password could not be checked: the user directory is unavailable. Try again in a moment."),
        Some("passkey-only") => Some("The password was not changed: this account signs in with a passkey only, so confirm the change with your passkey."),
        Some(other) => super::email::error(other),
        _ => None,
    };
    let email = super::email::section(&app, &user, &csrf, has_passkey);
    no_store(
        pages::account(
            &user,
            &sessions,
            id.sid,
            &csrf,
            notice,
            error,
            app.config().password.min_length,
            &sso,
            &plex,
            &passkeys,
            has_passkey,
            &email,
        )
        .into_response(),
    )
}

#[derive(Deserialize)]
pub(crate) struct DeviceForm {
    session: String,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn revoke_device(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<DeviceForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(sid) = SessionId::parse(&form.session) else {
        return account_error(AccountError::NotYours);
    };
    if let Err(e) = app.revoke_own_session(&id, sid, &client).await {
        return account_error(e);
    }
    if sid == id.sid {
        return with_cookie(
            redirect(LOGIN_PATH),
            &cookie::clear(app.config().server.secure),
        );
    }
    redirect(&format!("{ACCOUNT_PATH}?done=device"))
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn signout_others(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<CsrfForm>,
) -> Response {
    let (id, kind) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.signout_other_devices(&id, kind, &client).await {
        Ok(ok) => session_cookie(&app, redirect(&format!("{ACCOUNT_PATH}?done=others")), &ok),
        Err(e) => account_error(e),
    }
}

/// `POST /_portcullis/api/signout-all` with a Bearer token: "sign out of all devices" for API
/// clients. 204 when done, 401 without a live Bearer session, 503 when the store is down.
pub(crate) async fn api_signout_all(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
) -> Response {
    let Some((id, CredentialSource::Bearer)) = identity(&app, &headers) else {
        return no_store(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({"error": "a live Bearer session is required"})),
            )
                .into_response(),
        );
    };
    match app.signout_all_devices(&id, &client).await {
        Ok(()) => no_store(StatusCode::NO_CONTENT.into_response()),
        Err(AccountError::Unavailable(e)) => store_unavailable(&e.to_string()),
        Err(other) => no_store(
            (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": other.to_string()})),
            )
                .into_response(),
        ),
    }
}

pub(crate) async fn signout_all(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<CsrfForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // A session that came through a provider also ends the provider's session (when that
    // provider is configured for it), so the browser is not signed straight back in.
    let end_session = app.sso_end_session_url(id.sid).await;
    match app.signout_all_devices(&id, &client).await {
        Ok(()) => with_cookie(
            redirect(end_session.as_deref().unwrap_or(LOGIN_PATH)),
            &cookie::clear(app.config().server.secure),
        ),
        Err(e) => account_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct PasswordForm {
    /// Empty when a passkey confirmation stands in for it (the field is sent all the same).
    current: String,
    /// From a passkey confirmation, in place of the current password.
    passkey_grant: Option<String>,
    new_password: String,
    confirm: String,
    /// Present (any value) when "Sign out connected devices" is ticked.
    signout: Option<String>,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn change_password(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PasswordForm>,
) -> Response {
    let (id, kind) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let signout = form.signout.is_some();
    match app
        .change_own_password(
            &id,
            PasswordChange {
                current: Reauth::from_form(Some(form.current), None, form.passkey_grant),
                new: Secret::new(form.new_password),
                confirm: Secret::new(form.confirm),
                signout_others: signout,
            },
            kind,
            &client,
        )
        .await
    {
        Ok(Some(ok)) => session_cookie(
            &app,
            redirect(&format!("{ACCOUNT_PATH}?done=password-signout")),
            &ok,
        ),
        Ok(None) => redirect(&format!("{ACCOUNT_PATH}?done=password")),
        Err(AccountError::Unavailable(s)) => store_unavailable(&s.to_string()),
        Err(e) => {
            tracing::info!(user = %id.name, reason = %e, "password change refused");
            let code = match e {
                AccountError::TooManyAttempts => "locked",
                AccountError::PasskeyGrantNotValid => "passkey",
                AccountError::PasskeyConfirmationRequired => "passkey-only",
                AccountError::PasswordInDirectory => "directory",
                AccountError::DirectoryUnavailable => "directory-down",
                _ => "password",
            };
            redirect(&format!("{ACCOUNT_PATH}?error={code}"))
        }
    }
}

pub(crate) async fn twofa_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let id = match signed_in(&app, &headers, "/_portcullis/account/2fa") {
        Ok(id) => id,
        Err(r) => return r,
    };
    let csrf = app.secrets.csrf_token(&id.sid.to_string());
    let user = match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) => u,
        Ok(None) => return to_login(ACCOUNT_PATH),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    if user.totp_enabled {
        let left = app.store.recovery_codes_left(user.id).await.unwrap_or(0);
        let has_passkey = match app.passkeys_of(user.id).await {
            Ok(p) => !p.is_empty(),
            Err(e) => return store_unavailable(&e.to_string()),
        };
        return no_store(pages::twofa_status(left, &csrf, None, has_passkey).into_response());
    }
    match app.start_enrollment(user.id).await {
        Ok(en) => no_store(
            pages::enroll(
                &en,
                "/_portcullis/account/2fa",
                ACCOUNT_PATH,
                &csrf,
                None,
                "Scan the QR code with an authenticator app, then enter the code it shows.",
            )
            .into_response(),
        ),
        Err(e) => account_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct EnableForm {
    enroll: String,
    code: String,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn twofa_enable(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<EnableForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app
        .confirm_enrollment(id.user_id, &form.enroll, &form.code, &client)
        .await
    {
        Ok(codes) => no_store(pages::recovery_codes(&codes, ACCOUNT_PATH).into_response()),
        Err(AccountError::InvalidCode) => {
            let csrf = app.secrets.csrf_token(&id.sid.to_string());
            match app.start_enrollment(id.user_id).await {
                Ok(en) => no_store(
                    (
                        StatusCode::UNAUTHORIZED,
                        pages::enroll(
                            &en,
                            "/_portcullis/account/2fa",
                            ACCOUNT_PATH,
                            &csrf,
                            Some("The code is not valid. Scan the new QR code and enter the code it shows."),
                            "Scan the QR code with an authenticator app, then enter the code it shows.",
                        ),
                    )
                        .into_response(),
                ),
                Err(e) => account_error(e),
            }
        }
        Err(e) => account_error(e),
    }
}

#[derive(Deserialize)]
pub(crate) struct DisableForm {
    password: Option<String>,
    code: Option<String>,
    /// From a passkey confirmation, in place of the password and code.
    passkey_grant: Option<String>,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn twofa_disable(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<DisableForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app
        .disable_2fa(
            &id,
            Reauth::from_form(form.password, form.code, form.passkey_grant),
            &client,
        )
        .await
    {
        Ok(()) => redirect(&format!("{ACCOUNT_PATH}?done=2fa-off")),
        Err(e) => account_error(e),
    }
}
