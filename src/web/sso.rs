//! Single sign-on pages: the start of a provider sign-in, the provider's redirect back, the
//! back-channel logout endpoint the provider calls, and linking (after the password, and the
//! code with TOTP, is entered again) or unlinking a provider from the account page. The
//! `{provider}` path segment is anyone's input: logs and audit entries name a configured
//! provider id, or `-`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Form, Json};
use serde::Deserialize;

use super::account::form_identity;
use super::login::{login_html, step_response, RdQuery};
use super::ACCOUNT_PATH;
use super::{
    identity, no_store, pages, redirect, safe_return_path, store_unavailable, with_cookie, PageForm,
};
use crate::app::account::{AccountError, Reauth};
use crate::app::sso::{BackchannelError, CallbackParams, SsoDone, SsoError, FLOW_TTL_SECS};
use crate::app::{App, ClientInfo, LoginError, LoginStep};
use crate::auth::cookie;
use crate::oidc::Provider;

/// The provider id as logs, audit entries and metric labels may carry it: a configured id
/// (a-z 0-9 - _), or `-` for whatever else the path held.
fn known<'a>(app: &App, provider: &'a str) -> &'a str {
    if app.oidc.get(provider).is_some() {
        provider
    } else {
        "-"
    }
}

fn count(app: &App, provider: &str, result: &'static str) {
    app.metrics
        .counter(
            crate::metrics::Family::OidcLogins,
            &[known(app, provider), result],
        )
        .inc();
}

/// The page for a single sign-on step that did not go ahead.
fn sso_error_page(app: &App, e: &SsoError, rd: &str) -> Response {
    let status = match e {
        SsoError::UnknownProvider => StatusCode::NOT_FOUND,
        SsoError::NotReady(_) | SsoError::Provider(_) => StatusCode::BAD_GATEWAY,
        SsoError::Login(LoginError::Unavailable(s)) => return store_unavailable(&s.to_string()),
        SsoError::Login(l) => super::login::login_status(l),
        SsoError::NotLinked | SsoError::LinkConflict(_) | SsoError::AdminNotAutoLinked => {
            StatusCode::FORBIDDEN
        }
        SsoError::FlowExpired
        | SsoError::StateMismatch
        | SsoError::ProviderDenied(_)
        | SsoError::IdToken(_)
        | SsoError::NotSignedIn => StatusCode::BAD_REQUEST,
    };
    let resp = (status, login_html(app, rd, Some(&e.to_string()))).into_response();
    no_store(with_cookie(
        resp,
        &cookie::clear_flow(app.config().server.secure),
    ))
}

/// `GET /_portcullis/oidc/{provider}/start?rd=…`: off to the provider.
pub(crate) async fn start(
    State(app): State<Arc<App>>,
    Path(provider): Path<String>,
    Query(q): Query<RdQuery>,
) -> Response {
    let rd = safe_return_path(q.rd());
    match app.sso_start(&provider, &rd, None) {
        Ok((url, token)) => with_cookie(
            redirect(&url),
            &cookie::flow(&token, app.config().server.secure, FLOW_TTL_SECS),
        ),
        Err(e) => {
            tracing::warn!(provider = known(&app, &provider), reason = e.label(), error = %e, "single sign-on start refused");
            count(&app, &provider, e.label());
            sso_error_page(&app, &e, &rd)
        }
    }
}

/// `GET /_portcullis/oidc/{provider}/callback`: the provider's redirect back.
pub(crate) async fn callback(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    Query(params): Query<CallbackParams>,
) -> Response {
    let secure = app.config().server.secure;
    // Sent twice, the flow cookie is refused by the proxy before this page is reached.
    let flow = cookie::find(&headers, cookie::flow_name(secure))
        .ok()
        .flatten();
    let current = identity(&app, &headers).map(|(id, _)| id);
    let result = app
        .sso_callback(&provider, &params, flow, current.as_ref(), &client)
        .await;
    match result {
        Ok(SsoDone::Login { step, rd }) => {
            let label = match &step {
                LoginStep::Session(_) => "success",
                LoginStep::Pending { .. } => "pending",
            };
            count(&app, &provider, label);
            with_cookie(
                step_response(&app, step, &rd, &client),
                &cookie::clear_flow(secure),
            )
        }
        Ok(SsoDone::Linked { .. }) => {
            count(&app, &provider, "linked");
            with_cookie(
                redirect(&format!("{ACCOUNT_PATH}?done=sso-linked")),
                &cookie::clear_flow(secure),
            )
        }
        Err(e) => {
            let provider = known(&app, &provider);
            tracing::info!(provider, ip = %client.ip, reason = e.label(), error = %e, "single sign-on refused");
            count(&app, provider, e.label());
            // A state that does not match is anyone's request (counted, not audited); the ID
            // token's refusals follow a code exchange this browser started.
            if let SsoError::IdToken(_) | SsoError::LinkConflict(_) = e {
                let mut entry = app.audit_entry("sso_login", e.label(), None, &client);
                entry.detail = format!("provider {provider}");
                app.audit(entry).await;
            }
            sso_error_page(&app, &e, "/")
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct LogoutTokenForm {
    logout_token: Option<String>,
}

/// `POST /_portcullis/oidc/{provider}/backchannel-logout` (OpenID Connect Back-Channel Logout
/// 1.0): 200 once the sessions are ended everywhere, 400 for a malformed, forged or replayed
/// token (nothing changed), 503 when the store is down or the provider not yet discovered (the
/// provider may try again).
pub(crate) async fn backchannel_logout(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    Path(provider): Path<String>,
    form: Result<Form<LogoutTokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let token = form.as_ref().ok().and_then(|f| f.logout_token.as_deref());
    let result = app.sso_backchannel_logout(&provider, token, &client).await;
    let provider = known(&app, &provider);
    let label = match &result {
        Ok(_) => "success",
        Err(e) => e.label(),
    };
    app.metrics
        .counter(crate::metrics::Family::OidcBackchannel, &[provider, label])
        .inc();
    match result {
        Ok(ended) => {
            tracing::info!(provider, ended, "back-channel logout");
            no_store(StatusCode::OK.into_response())
        }
        Err(e) => {
            tracing::warn!(provider, ip = %client.ip, reason = e.label(), error = %e, "back-channel logout refused");
            let status = match e {
                BackchannelError::Unavailable(_) | BackchannelError::NotReady => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                BackchannelError::UnknownProvider => StatusCode::NOT_FOUND,
                BackchannelError::Missing
                | BackchannelError::Token(_)
                | BackchannelError::Replayed => StatusCode::BAD_REQUEST,
            };
            if e.audited() {
                let mut entry = app.audit_entry("sso_backchannel_logout", e.label(), None, &client);
                entry.detail = format!("provider {provider}");
                app.audit(entry).await;
            }
            let body = serde_json::json!({
                "error": "invalid_request",
                "error_description": e.to_string(),
            });
            no_store((status, Json(body)).into_response())
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct ProviderForm {
    provider: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Deserialize)]
pub(crate) struct LinkForm {
    provider: String,
    #[serde(default)]
    csrf: String,
    /// Absent on the account page's button: the confirmation page asks for it.
    password: Option<String>,
    code: Option<String>,
    /// From a passkey confirmation on that page, in place of the password and code.
    passkey_grant: Option<String>,
}

/// The page that asks for the password (and the code, with TOTP) before a link. The form goes
/// into the layout of the pages module's message page.
fn link_confirm_page(
    provider: &Provider,
    csrf: &str,
    totp: bool,
    has_passkey: bool,
    error: Option<&str>,
) -> Html<String> {
    const SLOT: &str = "\u{1}link-form\u{1}";
    let esc = pages::escape;
    let title = format!("Link {}", provider.config.display_name);
    let shell = pages::message_with_link(&title, SLOT, ACCOUNT_PATH, "Back to your account").0;
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let code = if totp {
        "<label for=\"code\">Code from your authenticator app (or a recovery code)</label>\
<input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>"
    } else {
        ""
    };
    let form = format!(
        "{error}<p>Anyone who can sign in to this account at {name} will be able to sign in to \
your Portcullis account. Enter your password to confirm it is you.</p>\
<form method=\"post\" action=\"/_portcullis/account/oidc/link\">\
<input type=\"hidden\" name=\"provider\" value=\"{id}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<label for=\"password\">Password</label>\
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required autofocus>\
{code}<button type=\"submit\">Continue to {name}</button>{with_passkey}</form>{script}",
        name = esc(&provider.config.display_name),
        id = esc(&provider.config.id),
        with_passkey = pages::passkey_confirm(has_passkey, "Confirm with a passkey instead"),
        script = if has_passkey {
            format!("{}{}", pages::PASSKEY_ERROR, pages::PASSKEY_SCRIPT)
        } else {
            String::new()
        },
        csrf = esc(csrf),
    );
    Html(shell.replacen(&format!("<p>{SLOT}</p>"), &form, 1))
}

/// `POST /_portcullis/account/oidc/link`: the signed-in user links a provider account. Without
/// a password this is the account page's button, answered with the page that asks for it; with
/// one, it is checked (and the code, with TOTP) like a password change before the browser goes
/// to the provider.
pub(crate) async fn link(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<LinkForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let not_linked = |status: StatusCode, text: &str| {
        no_store(
            (
                status,
                pages::message_with_link("Not linked", text, ACCOUNT_PATH, "Back to your account"),
            )
                .into_response(),
        )
    };
    let Some(provider) = app.oidc.get(&form.provider) else {
        return not_linked(
            StatusCode::NOT_FOUND,
            &SsoError::UnknownProvider.to_string(),
        );
    };
    let user = match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) => u,
        Ok(None) => return super::to_login(ACCOUNT_PATH),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    let answered = form.password.as_deref().is_some_and(|p| !p.is_empty())
        || form.passkey_grant.as_deref().is_some_and(|g| !g.is_empty());
    let has_passkey = match app.passkeys_of(user.id).await {
        Ok(p) => !p.is_empty(),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    if !answered {
        return no_store(
            link_confirm_page(provider, &form.csrf, user.totp_enabled, has_passkey, None)
                .into_response(),
        );
    }
    let proof = Reauth::from_form(form.password, form.code, form.passkey_grant);
    match app.confirm_link(&id, proof, &client).await {
        Ok(()) => {}
        Err(AccountError::Unavailable(e)) => return store_unavailable(&e.to_string()),
        Err(e) => {
            let (status, text) = match e {
                AccountError::TooManyAttempts => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many wrong passwords were entered. Try again later.",
                ),
                AccountError::InvalidCode => (
                    StatusCode::UNAUTHORIZED,
                    "The code is not valid: enter the current code from your app, or a recovery code.",
                ),
                AccountError::PasskeyGrantNotValid => (
                    StatusCode::UNAUTHORIZED,
                    "The passkey confirmation has expired or was used already: confirm again.",
                ),
                AccountError::PasskeyConfirmationRequired => (
                    StatusCode::FORBIDDEN,
                    "This account signs in with a passkey only: confirm with your passkey.",
                ),
                _ => (
                    StatusCode::UNAUTHORIZED,
                    "The password is wrong.",
                ),
            };
            return no_store(
                (
                    status,
                    link_confirm_page(
                        provider,
                        &form.csrf,
                        user.totp_enabled,
                        has_passkey,
                        Some(text),
                    ),
                )
                    .into_response(),
            );
        }
    }
    match app.sso_start(&form.provider, ACCOUNT_PATH, Some(&id)) {
        Ok((url, token)) => with_cookie(
            redirect(&url),
            &cookie::flow(&token, app.config().server.secure, FLOW_TTL_SECS),
        ),
        Err(e) => not_linked(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

/// `POST /_portcullis/account/oidc/unlink`: the signed-in user removes a provider link.
pub(crate) async fn unlink(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<ProviderForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app
        .unlink_subject(&form.provider, id.user_id, &id.name, &client)
        .await
    {
        Ok(_) => redirect(&format!("{ACCOUNT_PATH}?done=sso-unlinked")),
        Err(e) => store_unavailable(&e.to_string()),
    }
}
