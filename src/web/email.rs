//! Pages of email: "forgot your password" (the same answer whoever asks), following a link
//! that confirms a new address, "this wasn't me" from a new sign-in alert (a page that asks
//! before anything changes, then signs out every device and sets a new password), and the
//! account page's address section.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::account::form_identity;
use super::pages::{self, escape, hidden};
use super::{cross_site, forbidden_cross_site, no_store, redirect, store_unavailable, PageForm};
use crate::app::account::{AccountError, Reauth};
use crate::app::email::{EmailError, Forgot};
use crate::app::{App, ClientInfo};
use crate::config::Secret;
use crate::store::{EmailConfirmation, ResetLinkState, User};

const ACCOUNT_PATH: &str = "/_portcullis/account";
const LOGIN_PATH: &str = "/_portcullis/login";

/// The account page's section: the verified address, and the form that changes it.
pub(crate) fn section(app: &App, user: &User, csrf: &str, has_passkey: bool) -> String {
    if !app.mail_enabled() {
        return String::new();
    }
    let current = match &user.email {
        Some(a) => format!(
            "<p>Mail about your account goes to <strong id=\"email-address\">{}</strong>.</p>",
            escape(a)
        ),
        None => "<p id=\"email-address\">No address yet: add one to get security notices \
                 and to reset a forgotten password yourself.</p>"
            .to_string(),
    };
    let password = if user.directory_dn.is_some() {
        "Your directory password"
    } else {
        "Current password"
    };
    format!(
        "<section id=\"email\"><h2>Email address</h2>{current}\
<form class=\"narrow\" method=\"post\" action=\"/_portcullis/account/email\">{}\
<label for=\"email\">New address</label>\
<input type=\"email\" id=\"email\" name=\"email\" autocomplete=\"email\" maxlength=\"254\" required>\
<label for=\"email-current\">{password}</label>\
<input type=\"password\" id=\"email-current\" name=\"current\" autocomplete=\"current-password\">\
<label for=\"email-code\">Code from your authenticator app (if two-factor authentication is on)</label>\
<input type=\"text\" id=\"email-code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\">\
<button type=\"submit\">Send a confirmation link</button>{}</form>\
<p class=\"muted\">The address is used once you open the link mailed to it.</p></section>",
        hidden("csrf", csrf),
        pages::passkey_confirm(has_passkey, "Confirm with a passkey instead"),
    )
}

#[derive(Deserialize)]
pub(crate) struct EmailForm {
    email: String,
    #[serde(default)]
    current: String,
    code: Option<String>,
    passkey_grant: Option<String>,
    #[serde(default)]
    csrf: String,
}

/// `POST /_portcullis/account/email`: mails a confirmation link to a new address.
pub(crate) async fn change(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<EmailForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let reauth = Reauth::from_form(Some(form.current), form.code, form.passkey_grant);
    match app
        .request_email_change(&id, &form.email, reauth, &client)
        .await
    {
        Ok(()) => redirect(&format!("{ACCOUNT_PATH}?done=email-sent")),
        Err(EmailError::Account(AccountError::Unavailable(e))) => store_unavailable(&e.to_string()),
        Err(e) => {
            let code = match e {
                EmailError::BadAddress => "email-address",
                EmailError::Same => "email-same",
                EmailError::TooMany => "email-many",
                EmailError::NoMail => "email-off",
                EmailError::Account(AccountError::TooManyAttempts) => "locked",
                EmailError::Account(AccountError::PasskeyGrantNotValid) => "passkey",
                EmailError::Account(AccountError::PasskeyConfirmationRequired) => "passkey-only",
                EmailError::Account(AccountError::DirectoryUnavailable) => "directory-down",
                EmailError::Account(_) => "email-confirm",
            };
            redirect(&format!("{ACCOUNT_PATH}?error={code}"))
        }
    }
}

/// The account page's words for the address section's outcomes.
pub(crate) fn notice(done: &str) -> Option<&'static str> {
    match done {
        "email-sent" => {
            Some("A confirmation link is on its way to the new address: open it to start using it.")
        }
        _ => None,
    }
}

pub(crate) fn error(code: &str) -> Option<&'static str> {
    Some(match code {
        "email-address" => "The address was not changed: that is not an email address.",
        "email-same" => "The address was not changed: that is your address already.",
        "email-many" => "The address was not changed: too many changes. Try again later.",
        "email-off" => "The address was not changed: this gateway cannot send mail.",
        "email-confirm" => {
            "The address was not changed: check your password (and code, if two-factor \
             authentication is on)."
        }
        _ => return None,
    })
}

fn forgot_page(status: StatusCode, body: &str) -> Response {
    no_store(
        (
            status,
            pages::page_of(
                "Forgot your password",
                &format!(
                    "<h1>Forgot your password</h1>{body}\
<form method=\"post\" action=\"/_portcullis/forgot\">\
<label for=\"identifier\">User name or email address</label>\
<input type=\"text\" id=\"identifier\" name=\"identifier\" autocomplete=\"username\" maxlength=\"254\" required autofocus>\
<button type=\"submit\">Mail me a reset link</button></form>\
<p><a href=\"{LOGIN_PATH}\">Back to sign-in</a></p>"
                ),
            ),
        )
            .into_response(),
    )
}

/// `GET /_portcullis/forgot`.
pub(crate) async fn forgot_form(State(app): State<Arc<App>>) -> Response {
    if !app.mail_enabled() {
        return no_store(
            (
                StatusCode::NOT_FOUND,
                pages::message_with_link(
                    "Not available",
                    "This gateway cannot send mail: ask your administrator for a reset link.",
                    LOGIN_PATH,
                    "Back to sign-in",
                ),
            )
                .into_response(),
        );
    }
    forgot_page(
        StatusCode::OK,
        "<p>Give your user name or the address your account has confirmed: a link to choose a \
         new password is mailed to that address.</p>",
    )
}

#[derive(Deserialize)]
pub(crate) struct ForgotForm {
    #[serde(default)]
    identifier: String,
}

/// `POST /_portcullis/forgot`: the same answer whether or not the account or address exists
/// (the lookup and the mail happen after it).
pub(crate) async fn forgot(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<ForgotForm>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    match app.forgot_password(&form.identifier, &client) {
        Forgot::Accepted => no_store(
            pages::message_with_link(
                "Check your mail",
                "If an account with a confirmed address matches, a link to choose a new \
                 password is on its way to that address. It works once, for a limited time.",
                LOGIN_PATH,
                "Back to sign-in",
            )
            .into_response(),
        ),
        Forgot::Throttled => forgot_page(
            StatusCode::TOO_MANY_REQUESTS,
            "<p class=\"error\" role=\"alert\">Too many requests from here: try again in a few \
             minutes.</p>",
        ),
    }
}

/// `GET /_portcullis/email/confirm/{token}`: a page that asks before anything changes (mail
/// scanners open links too).
pub(crate) async fn confirm_page(Path(token): Path<String>) -> Response {
    no_store(
        pages::page_of(
            "Confirm your address",
            &format!(
                "<h1>Confirm your address</h1><p>Use this address for mail about your account?</p>\
<form method=\"post\" action=\"/_portcullis/email/confirm/{}\">\
<button type=\"submit\">Confirm the address</button></form>",
                escape(&token)
            ),
        )
        .into_response(),
    )
}

/// `POST /_portcullis/email/confirm/{token}`.
pub(crate) async fn confirm(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let (status, title, text) = match app.confirm_email(&token, &client).await {
        Ok(EmailConfirmation::Confirmed { address, .. }) => (
            StatusCode::OK,
            "Address confirmed",
            format!("Mail about your account goes to {address} from now on."),
        ),
        Ok(EmailConfirmation::Used) => (
            StatusCode::GONE,
            "Link used",
            "This link has been used already.".to_string(),
        ),
        Ok(EmailConfirmation::Expired) => (
            StatusCode::GONE,
            "Link expired",
            "This link has expired: ask for a new one on your account page.".to_string(),
        ),
        Ok(EmailConfirmation::Unknown) => (
            StatusCode::NOT_FOUND,
            "Link not valid",
            "This link is not valid, or a newer one replaced it.".to_string(),
        ),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    no_store(
        (
            status,
            pages::message_with_link(title, &text, ACCOUNT_PATH, "Go to your account"),
        )
            .into_response(),
    )
}

/// The "this wasn't me" page: what will happen, and (for an account whose password the gateway
/// keeps) the new password.
fn not_me_form(token: &str, directory: bool, error: Option<&str>) -> Response {
    let fields = if directory {
        "<p>Your password is kept by your organisation's directory: change it there too.</p>"
            .to_string()
    } else {
        "<label for=\"new_password\">New password</label>\
<input type=\"password\" id=\"new_password\" name=\"new_password\" autocomplete=\"new-password\" required autofocus>\
<label for=\"confirm\">New password again</label>\
<input type=\"password\" id=\"confirm\" name=\"confirm\" autocomplete=\"new-password\" required>"
            .to_string()
    };
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(e)))
        .unwrap_or_default();
    no_store(
        (
            if error.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            },
            pages::page_of(
                "That wasn't me",
                &format!(
                    "<h1>That wasn't me</h1>{error}<p>Every device signed in to your account — \
phones, TVs, browsers, including the one that was not you — will be signed out, and your \
password replaced.</p><form method=\"post\" action=\"/_portcullis/not-me/{}\">{fields}\
<button type=\"submit\" class=\"danger\">Sign out every device{}</button></form>",
                    escape(token),
                    if directory {
                        ""
                    } else {
                        " and set the new password"
                    },
                ),
            ),
        )
            .into_response(),
    )
}

fn link_state_page(state: &ResetLinkState) -> Response {
    let (status, title, text) = match state {
        ResetLinkState::Used => (
            StatusCode::GONE,
            "Link used",
            "This link has been used already: every device was signed out then.",
        ),
        ResetLinkState::Expired => (
            StatusCode::GONE,
            "Link expired",
            "This link has expired. Sign in and choose \"Sign out of all devices\" on your \
             account page, or use \"Forgot your password?\".",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "Link not valid",
            "This link is not valid, or a newer one replaced it.",
        ),
    };
    no_store(
        (
            status,
            pages::message_with_link(title, text, LOGIN_PATH, "Sign in"),
        )
            .into_response(),
    )
}

/// `GET /_portcullis/not-me/{token}`: asks first; a link alone changes nothing.
pub(crate) async fn not_me_page(
    State(app): State<Arc<App>>,
    Path(token): Path<String>,
) -> Response {
    match app.not_me_link_user(&token).await {
        Ok(Ok(user)) => not_me_form(&token, user.directory_dn.is_some(), None),
        Ok(Err(state)) => link_state_page(&state),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct NotMeForm {
    new_password: Option<String>,
    confirm: Option<String>,
}

/// `POST /_portcullis/not-me/{token}`.
pub(crate) async fn not_me(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    Path(token): Path<String>,
    PageForm(form): PageForm<NotMeForm>,
) -> Response {
    if cross_site(&app, &headers) {
        return forbidden_cross_site();
    }
    let password = form.new_password.map(|p| {
        (
            Secret::new(p),
            Secret::new(form.confirm.unwrap_or_default()),
        )
    });
    match app.redeem_not_me_link(&token, password, &client).await {
        Ok(Ok(())) => no_store(
            pages::message_with_link(
                "Every device signed out",
                "Every device signed in to your account has been signed out. Sign in again \
                 with your new password, and sign your apps and TVs in again.",
                LOGIN_PATH,
                "Sign in",
            )
            .into_response(),
        ),
        Ok(Err(state)) => link_state_page(&state),
        Err(AccountError::Unavailable(e)) => store_unavailable(&e.to_string()),
        Err(e) => {
            let directory =
                matches!(app.not_me_link_user(&token).await, Ok(Ok(u)) if u.directory_dn.is_some());
            not_me_form(&token, directory, Some(&e.to_string()))
        }
    }
}
