//! The account page's Plex section: the Plex accounts linked to the user (unlink) or offered
//! to them because their browser used one with their session (link, after the password and
//! second factor), and their Plex devices (approve — which needs the second factor — or sign
//! out). And the admin page's Plex section: the server's self-check and every Plex account,
//! linked or not (link, unlink, "also sign out at plex.tv").

// Handlers return early with a ready response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;

use super::account::{form_identity, not_changed};
use super::pages::{self, escape, hidden, when};
use super::{redirect, store_unavailable, PageForm, ACCOUNT_PATH};
use crate::app::account::{AccountError, Reauth};
use crate::app::plex::PlexError;
use crate::app::{App, ClientInfo};
use crate::mediaserver::plex::CheckState;
use crate::store::{StoreError, User};

/// The Plex section of the account page (empty without a plex route).
pub(crate) async fn section(app: &App, user: &User, csrf: &str) -> Result<String, StoreError> {
    if !app.config().routes.iter().any(|r| r.plex.is_some()) {
        return Ok(String::new());
    }
    let accounts = app.store.list_plex_accounts(Some(user.id)).await?;
    let devices = app.store.list_plex_devices(Some(user.id)).await?;
    let has_passkey = !app.passkeys_of(user.id).await?.is_empty();
    // The password (and code), or a passkey instead (the account page's passkey section
    // carries the script and the error line).
    let reauth = |label: &str| {
        let code = if user.totp_enabled {
            "<input type=\"text\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" placeholder=\"Code\" required>"
        } else {
            ""
        };
        format!(
            "<input type=\"password\" name=\"password\" autocomplete=\"current-password\" placeholder=\"Password\" required>{code}\
<button type=\"submit\">{}</button>{}",
            escape(label),
            pages::passkey_confirm(has_passkey, &format!("{label} with a passkey"))
        )
    };
    let account_rows: String = accounts
        .iter()
        .map(|a| {
            let (state, form) = if a.user_id == Some(user.id) {
                (
                    format!("Linked since {}", a.linked_ms.map_or("-".into(), when)),
                    format!(
                        "<form method=\"post\" action=\"/_portcullis/account/plex/unlink\">{}{}\
<button type=\"submit\" class=\"secondary\">Unlink</button></form>",
                        hidden("account", &a.account_id),
                        hidden("csrf", csrf)
                    ),
                )
            } else {
                (
                    "Used from this browser: link this Plex account?".to_string(),
                    format!(
                        "<form method=\"post\" action=\"/_portcullis/account/plex/link\">{}{}{}</form>",
                        hidden("account", &a.account_id),
                        hidden("csrf", csrf),
                        reauth("Link this Plex account")
                    ),
                )
            };
            format!(
                "<tr data-plex-account=\"{}\"><td>{} ({})</td><td>{state}</td><td>{form}</td></tr>",
                escape(&a.account_id),
                escape(&a.title),
                escape(&a.username),
            )
        })
        .collect();
    let device_rows: String = devices
        .iter()
        .map(|d| {
            let (state, form) = match d.approved_ms {
                Some(ms) => (
                    format!("Approved {}", when(ms)),
                    format!(
                        "<form method=\"post\" action=\"/_portcullis/account/plex/revoke\">{}{}{}\
<button type=\"submit\" class=\"secondary\">Sign out</button></form>",
                        hidden("account", &d.account_id),
                        hidden("client_id", &d.client_id),
                        hidden("csrf", csrf)
                    ),
                ),
                None if user.totp_enabled || has_passkey => {
                    // Both factors: the password and code, or a passkey that verifies the
                    // user (the only way for a user whose second factor is a passkey).
                    let confirm = if user.totp_enabled {
                        reauth("Approve")
                    } else {
                        pages::passkey_confirm(true, "Approve with a passkey")
                    };
                    (
                        "Waiting for your approval".to_string(),
                        format!(
                            "<form method=\"post\" action=\"/_portcullis/account/plex/approve\">{}{}{}{confirm}</form>",
                            hidden("account", &d.account_id),
                            hidden("client_id", &d.client_id),
                            hidden("csrf", csrf)
                        ),
                    )
                }
                None => (
                    "Waiting for approval: turn on two-factor authentication to approve devices"
                        .to_string(),
                    String::new(),
                ),
            };
            format!(
                "<tr data-plex-device=\"{}\"><td>{} on {} ({})</td><td>{}</td><td class=\"when\">{}</td><td>{state}</td><td>{form}</td></tr>",
                escape(&d.client_id),
                escape(&d.product),
                escape(&d.device_name),
                escape(&d.platform),
                escape(&d.ip),
                when(d.last_seen_ms),
            )
        })
        .collect();
    Ok(format!(
        "<section id=\"plex\"><h2>Plex</h2>\
<p>Plex apps reach the server through this gateway only with a Plex account linked to you.</p>\
<table><thead><tr><th>Plex account</th><th>State</th><th></th></tr></thead><tbody>{account_rows}</tbody></table>\
<h3>Plex devices</h3>\
<table><thead><tr><th>App on device</th><th>IP</th><th>Last seen</th><th>State</th><th></th></tr></thead><tbody>{device_rows}</tbody></table></section>"
    ))
}

/// The admin page's Plex section (empty without a plex route): each route's self-check of the
/// server's settings, and every Plex account the gateway has met with its link.
pub(crate) async fn admin_section(
    app: &App,
    users: &[User],
    csrf: &str,
) -> Result<String, StoreError> {
    let config = app.config();
    let routes: Vec<_> = config
        .routes
        .iter()
        .filter(|r| r.plex.is_some() && !r.retired)
        .collect();
    if routes.is_empty() {
        return Ok(String::new());
    }
    let checks: String = routes
        .iter()
        .map(|r| {
            let state = app.plex_state(&r.name);
            let check = state.check.load();
            let (class, verdict, warnings) = match check.as_ref() {
                CheckState::Pending(why) => (
                    "danger",
                    format!("Refusing every request until the check passes: {why}"),
                    &[][..],
                ),
                CheckState::Done(report) => match &report.fatal {
                    Some(fatal) => (
                        "danger",
                        format!("Refusing every request: {fatal}"),
                        &report.warnings[..],
                    ),
                    None => (
                        "ok",
                        "Serving: the server's settings let nobody in without a token.".to_string(),
                        &report.warnings[..],
                    ),
                },
            };
            let warnings: String = warnings
                .iter()
                .map(|w| format!("<li>{}</li>", escape(w)))
                .collect();
            let warnings = if warnings.is_empty() {
                String::new()
            } else {
                format!("<ul class=\"warnings\">{warnings}</ul>")
            };
            let plex_tv = state
                .plex_tv_error
                .load()
                .as_ref()
                .as_ref()
                .map(|e| format!("<p class=\"danger\">plex.tv unreachable: {}</p>", escape(e)))
                .unwrap_or_default();
            format!(
                "<div data-plex-route=\"{}\"><h3>Route {}</h3><p class=\"{class}\">{}</p>{warnings}{plex_tv}</div>",
                escape(&r.name),
                escape(&r.name),
                escape(&verdict)
            )
        })
        .collect();
    let options: String = users
        .iter()
        .filter(|u| !u.disabled)
        .map(|u| {
            format!(
                "<option value=\"{}\">{}</option>",
                escape(&u.name),
                escape(&u.name)
            )
        })
        .collect();
    let rows: String = app
        .store
        .list_plex_accounts(None)
        .await?
        .iter()
        .map(|a| {
            let (state, form) = match &a.user_name {
                Some(name) => (
                    format!(
                        "Linked to {} since {}",
                        escape(name),
                        a.linked_ms.map_or("-".into(), when)
                    ),
                    format!(
                        "<form method=\"post\" action=\"/_portcullis/admin/plex/unlink\">{}{}\
<button type=\"submit\" class=\"secondary\">Unlink</button></form>",
                        hidden("account", &a.account_id),
                        hidden("csrf", csrf)
                    ),
                ),
                None => (
                    "Not linked: its tokens get 401".to_string(),
                    format!(
                        "<form method=\"post\" action=\"/_portcullis/admin/plex/link\">{}{}\
<select name=\"user\" aria-label=\"Gateway user\" required><option value=\"\"></option>{options}</select>\
<button type=\"submit\">Link</button></form>",
                        hidden("account", &a.account_id),
                        hidden("csrf", csrf)
                    ),
                ),
            };
            // Never the enforcement (the gateway refuses unlinked accounts already): the
            // owner's devices seen here are removed at plex.tv, a friend is un-shared.
            let upstream = format!(
                "<form method=\"post\" action=\"/_portcullis/admin/plex/revoke-upstream\">{}{}\
<button type=\"submit\" class=\"secondary\">Also sign out at plex.tv</button></form>",
                hidden("account", &a.account_id),
                hidden("csrf", csrf)
            );
            format!(
                "<tr data-plex-account=\"{}\"><td>{} ({})</td><td>{state}</td><td class=\"when\">{}</td><td>{form}{upstream}</td></tr>",
                escape(&a.account_id),
                escape(&a.title),
                escape(&a.username),
                when(a.last_seen_ms)
            )
        })
        .collect();
    Ok(format!(
        "<section id=\"plex\"><h2>Plex</h2>{checks}\
<h3>Plex accounts</h3><table><thead><tr><th>Plex account</th><th>Link</th><th>Last seen</th><th></th></tr></thead>\
<tbody>{rows}</tbody></table></section>"
    ))
}

#[derive(Deserialize)]
pub(crate) struct PlexForm {
    account: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    csrf: String,
    password: Option<String>,
    code: Option<String>,
    /// From a passkey confirmation, in place of the password and code.
    passkey_grant: Option<String>,
}

impl PlexForm {
    /// What the form confirms the user with: the password (and code), or a passkey grant.
    fn proof(&self) -> Reauth {
        Reauth::from_form(
            self.password.clone(),
            self.code.clone(),
            self.passkey_grant.clone(),
        )
    }
}

/// A Plex action that failed: 503 when the store is down, else `refuse` with the reason (a 400
/// page that leads back to where the form was).
pub(super) fn plex_error(e: PlexError, refuse: impl FnOnce(&str) -> Response) -> Response {
    match e {
        PlexError::Unavailable(s) => store_unavailable(&s.to_string()),
        other => refuse(&other.to_string()),
    }
}

fn not_changed_400(text: &str) -> Response {
    not_changed(StatusCode::BAD_REQUEST, text)
}

/// The password (and the code, with TOTP) of the signed-in user, or a passkey confirmation.
async fn confirmed(
    app: &App,
    identity: &crate::auth::Identity,
    proof: Reauth,
    client: &ClientInfo,
    event: &str,
) -> Result<(), Response> {
    match app.reauthenticate(identity, proof, client, event).await {
        Ok(()) => Ok(()),
        Err(AccountError::Unavailable(e)) => Err(store_unavailable(&e.to_string())),
        Err(e) => Err(not_changed(StatusCode::FORBIDDEN, &e.to_string())),
    }
}

/// `POST /_portcullis/account/plex/link`: links a Plex account offered to this user.
pub(crate) async fn link(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PlexForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let offered = match app.store.find_plex_account(&form.account).await {
        Ok(Some(a)) => a.account_id == form.account && a.offered_user_id == Some(id.user_id),
        Ok(None) => false,
        Err(e) => return store_unavailable(&e.to_string()),
    };
    if !offered {
        return not_changed(
            StatusCode::FORBIDDEN,
            "This Plex account was not used from your browser; ask an administrator to link it.",
        );
    }
    if let Err(r) = confirmed(&app, &id, form.proof(), &client, "plex_link").await {
        return r;
    }
    match app
        .plex_link(&form.account, &id.name, "user", &client)
        .await
    {
        Ok(_) => redirect(&format!("{ACCOUNT_PATH}?done=plex-linked")),
        Err(e) => plex_error(e, not_changed_400),
    }
}

/// `POST /_portcullis/account/plex/unlink`: unlinks one of the user's Plex accounts.
pub(crate) async fn unlink(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PlexForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app.store.find_plex_account(&form.account).await {
        Ok(Some(a)) if a.account_id == form.account && a.user_id == Some(id.user_id) => {}
        Ok(_) => {
            return not_changed(
                StatusCode::FORBIDDEN,
                "That Plex account is not linked to you.",
            )
        }
        Err(e) => return store_unavailable(&e.to_string()),
    }
    match app.plex_unlink(&form.account, "user", &client).await {
        Ok(_) => redirect(&format!("{ACCOUNT_PATH}?done=plex-unlinked")),
        Err(e) => plex_error(e, not_changed_400),
    }
}

/// `POST /_portcullis/account/plex/approve`: approves a device, after the password and the
/// code or a passkey that verified the user (a stolen Plex token on a new device must not be
/// enough).
pub(crate) async fn approve(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PlexForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // The password alone is one factor: without TOTP, only a passkey approves.
    let proof = form.proof();
    let with_passkey = matches!(proof, Reauth::Passkey(_));
    match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) if u.totp_enabled || with_passkey => {}
        Ok(_) => {
            return not_changed(
                StatusCode::FORBIDDEN,
                "Approving a Plex device needs two factors: a passkey, or the password and a \
                 code (turn on two-factor authentication).",
            )
        }
        Err(e) => return store_unavailable(&e.to_string()),
    }
    if let Err(r) = confirmed(&app, &id, proof, &client, "plex_device_approve").await {
        return r;
    }
    match app
        .plex_approve(id.user_id, &form.account, &form.client_id, &client)
        .await
    {
        Ok(()) => redirect(&format!("{ACCOUNT_PATH}?done=plex-approved")),
        Err(e) => plex_error(e, not_changed_400),
    }
}

/// `POST /_portcullis/account/plex/revoke`: signs a device out (it must be approved again).
pub(crate) async fn revoke(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<PlexForm>,
) -> Response {
    let (id, _) = match form_identity(&app, &headers, &form.csrf) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match app
        .plex_revoke_device(id.user_id, &form.account, &form.client_id, &client)
        .await
    {
        Ok(()) => redirect(&format!("{ACCOUNT_PATH}?done=plex-revoked")),
        Err(e) => plex_error(e, not_changed_400),
    }
}
