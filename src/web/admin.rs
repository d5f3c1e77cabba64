//! Admin pages (admins only): users and their actions, live sessions, the audit log, and the
//! breach response behind a typed confirmation.

// Handlers return early with a ready response; boxing it would only add noise.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::extract::{FromRequest, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::{
    cross_site, forbidden_cross_site, identity, no_store, pages, redirect, store_unavailable,
    to_login, PageForm,
};
use crate::app::account::{create_link, LinkPurpose};
use crate::app::{now_ms, App, ClientInfo};
use crate::auth::password::{check_policy, generate_password};
use crate::auth::Identity;
use crate::config::Secret;
use crate::store::{SessionId, StoreError, User};

pub const ADMIN_PATH: &str = "/_portcullis/admin";
/// What an admin must type to run the breach response from the page.
pub const BREACH_CONFIRMATION: &str = "SIGN OUT EVERYONE";

fn forbidden() -> Response {
    no_store(
        (
            StatusCode::FORBIDDEN,
            pages::message("Admins only", "This page is for administrators."),
        )
            .into_response(),
    )
}

/// The signed-in admin, or the response to send instead.
async fn admin(app: &App, headers: &HeaderMap) -> Result<(Identity, User), Response> {
    let (id, _) = identity(app, headers).ok_or_else(|| to_login(ADMIN_PATH))?;
    match app.store.find_user_by_id(id.user_id).await {
        Ok(Some(u)) if u.is_admin && !u.disabled => Ok((id, u)),
        Ok(_) => Err(forbidden()),
        Err(e) => Err(store_unavailable(&e.to_string())),
    }
}

async fn admin_form(
    app: &App,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(Identity, User), Response> {
    if cross_site(app, headers) {
        return Err(forbidden_cross_site());
    }
    let (id, user) = admin(app, headers).await?;
    if !app.secrets.csrf_ok(&id.sid.to_string(), csrf) {
        return Err(forbidden_cross_site());
    }
    Ok((id, user))
}

#[derive(Deserialize)]
pub(crate) struct Notice {
    done: Option<String>,
}

pub(crate) async fn page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<Notice>,
) -> Response {
    let (id, _) = match admin(&app, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let users = app.store.list_users().await;
    let sessions = app.store.list_live_sessions(None, now_ms()).await;
    let audit = app.store.list_audit(None, 0, 100).await;
    match (users, sessions, audit) {
        (Ok(users), Ok(sessions), Ok(audit)) => {
            let csrf = app.secrets.csrf_token(&id.sid.to_string());
            let plex = match super::plex::admin_section(&app, &users, &csrf).await {
                Ok(p) => p,
                Err(e) => return store_unavailable(&e.to_string()),
            };
            let groups: std::collections::HashMap<i64, Vec<String>> = users
                .iter()
                .filter_map(|u| Some((u.id, app.view.groups_of(u.id)?.to_vec())))
                .collect();
            no_store(
                pages::admin(
                    &users,
                    &groups,
                    &sessions,
                    &audit,
                    &plex,
                    &csrf,
                    q.done.as_deref(),
                    now_ms(),
                )
                .into_response(),
            )
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => store_unavailable(&e.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct AddUser {
    name: String,
    password: Option<String>,
    admin: Option<String>,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn add_user(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<AddUser>,
) -> Response {
    let (_, actor) = match admin_form(&app, &headers, &form.csrf).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let name = form.name.trim().to_string();
    if !crate::auth::valid_user_name(&name) {
        return bad("That is not a valid user name (1-64 of A-Z a-z 0-9 . _ - @).");
    }
    let (password, generated) = match form.password.filter(|p| !p.is_empty()) {
        Some(p) => (p, false),
        None => (generate_password(), true),
    };
    if let Err(e) = check_policy(&app.config().password, &name, &password) {
        return bad(&e.to_string());
    }
    let hash = match app.hasher.hash(Secret::new(password.clone())).await {
        Ok(h) => h,
        Err(_) => return bad("The password could not be hashed."),
    };
    let is_admin = form.admin.is_some();
    // A name lives in one place only.
    match app.name_in_directory(&name).await {
        Ok(None) => {}
        Ok(Some(dn)) => {
            return bad(&format!(
                "Nothing was done: `{name}` is a user of the directory ({dn}); a local account of the same name is refused."
            ))
        }
        Err(e) => {
            return bad(&format!(
                "Nothing was done: cannot check that the directory has no `{name}`: {e}"
            ))
        }
    }
    match app
        .store
        .create_user(&name, &hash, is_admin, now_ms())
        .await
    {
        Ok(u) => {
            let mut e =
                app.audit_entry("admin_add_user", "success", Some((u.id, &u.name)), &client);
            e.detail = format!("by {}{}", actor.name, if is_admin { ", admin" } else { "" });
            app.audit(e).await;
            let text = if generated {
                format!("Created {name}. Their password (shown only once): {password}")
            } else {
                format!("Created {name}.")
            };
            no_store(
                pages::message_with_link("User created", &text, ADMIN_PATH, "Back to admin")
                    .into_response(),
            )
        }
        Err(crate::store::StoreError::Conflict(_)) => bad("A user with that name already exists."),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

fn bad(text: &str) -> Response {
    no_store(
        (
            StatusCode::BAD_REQUEST,
            pages::message_with_link("Not done", text, ADMIN_PATH, "Back to admin"),
        )
            .into_response(),
    )
}

#[derive(Deserialize)]
pub(crate) struct UserAction {
    name: String,
    action: String,
    /// For `group_add` and `group_remove`.
    group: Option<String>,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn user_action(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<UserAction>,
) -> Response {
    let (_, actor) = match admin_form(&app, &headers, &form.csrf).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let user = match app.store.find_user(&form.name).await {
        Ok(Some(u)) => u,
        Ok(None) => return bad("No such user."),
        Err(e) => return store_unavailable(&e.to_string()),
    };
    if user.directory_dn.is_some() && matches!(form.action.as_str(), "reset_link" | "require_reset")
    {
        return bad(
            "Nothing was done: this user's password is kept by the user directory; change it there.",
        );
    }
    let now = now_ms();
    // The change, its audit entry and the notice to the user are written together.
    let mut entry = app.audit_entry(
        &format!("admin_{}", form.action),
        "success",
        Some((user.id, &user.name)),
        &client,
    );
    entry.detail = match form
        .group
        .as_deref()
        .filter(|_| form.action.starts_with("group_"))
    {
        Some(g) => format!("group {} by {}", g.trim().to_ascii_lowercase(), actor.name),
        None => format!("by {}", actor.name),
    };
    let uid = user.id;
    let result: Result<&str, StoreError> = match form.action.as_str() {
        "disable" | "enable" => {
            let disable = form.action == "disable";
            app.audited(
                entry,
                |s| async move { s.set_disabled(uid, disable, now).await },
            )
            .await
            .map(|ev: Vec<_>| {
                app.apply(&ev);
                if disable {
                    "disabled"
                } else {
                    "enabled"
                }
            })
        }
        "unlock" => app
            .audited(entry, |s| async move { s.clear_failures(uid).await })
            .await
            .map(|()| "unlocked"),
        "require_reset" => app
            .audited(
                entry,
                |s| async move { s.set_must_reset(Some(uid), true).await },
            )
            .await
            .map(|_| "reset-required"),
        "group_add" | "group_remove" => {
            let group = match crate::config::group_name(form.group.as_deref().unwrap_or("")) {
                Ok(g) => g,
                Err(e) => return bad(&format!("Nothing was done: {e}.")),
            };
            let member = form.action == "group_add";
            app.audited(entry, |s| async move {
                s.set_group(uid, &group, member, now).await
            })
            .await
            .map(|changed| {
                if let Some(ev) = changed {
                    app.apply(&[ev]);
                }
                if member {
                    "group-added"
                } else {
                    "group-removed"
                }
            })
        }
        "require_passkey" | "passkey_optional" => {
            let required = form.action == "require_passkey";
            app.audited(entry, |s| async move {
                s.set_passkey_required(Some(uid), required).await
            })
            .await
            .map(|_| {
                if required {
                    "passkey-required"
                } else {
                    "passkey-optional"
                }
            })
        }
        "signout" => app.signout_user_id(uid, entry).await.map(|()| "signed-out"),
        "reset_link" | "passkey_link" => {
            let (purpose, title, what) = if form.action == "reset_link" {
                (
                    LinkPurpose::Password,
                    "Reset link",
                    "it sets a new password",
                )
            } else {
                (LinkPurpose::Passkey, "Passkey link", "it adds a passkey")
            };
            entry.event = match purpose {
                LinkPurpose::Password => "reset_link_issued",
                _ => "passkey_link_issued",
            }
            .into();
            let config = app.config();
            let made = app
                .audited(entry, |s| {
                    let (config, user) = (&config, &user);
                    async move { create_link(&s, config, user, purpose).await }
                })
                .await;
            match made {
                Ok(link) => {
                    return no_store(
                        pages::message_with_link(
                            title,
                            &format!(
                                "Give this one-time link to {} (valid for {}); {what} and signs \
                                 out every device of theirs: {link}",
                                user.name,
                                humantime::format_duration(config.auth.reset_link_ttl)
                            ),
                            ADMIN_PATH,
                            "Back to admin",
                        )
                        .into_response(),
                    )
                }
                Err(e) => Err(e),
            }
        }
        _ => return bad("Unknown action."),
    };
    match result {
        Ok(done) => redirect(&format!("{ADMIN_PATH}?done={done}")),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct RevokeForm {
    session: String,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn revoke_session(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<RevokeForm>,
) -> Response {
    let (_, actor) = match admin_form(&app, &headers, &form.csrf).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(sid) = SessionId::parse(&form.session) else {
        return bad("Not a session id.");
    };
    match app.revoke_session(sid).await {
        Ok(true) => {
            let mut e = app.audit_entry("admin_revoke_session", "success", None, &client);
            e.session_id = sid.to_string();
            e.detail = format!("by {}", actor.name);
            app.audit(e).await;
            redirect(&format!("{ADMIN_PATH}?done=session-ended"))
        }
        Ok(false) => bad("No such session."),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct BreachForm {
    confirm: String,
    /// Present (any value) when every user must also register a passkey.
    require_passkey: Option<String>,
    /// Present (any value) when every user with an address is mailed what happened.
    notify: Option<String>,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn breach(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    headers: HeaderMap,
    PageForm(form): PageForm<BreachForm>,
) -> Response {
    let (_, actor) = match admin_form(&app, &headers, &form.csrf).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if form.confirm.trim() != BREACH_CONFIRMATION {
        return bad(&format!(
            "Nothing was done: type {BREACH_CONFIRMATION} exactly to confirm."
        ));
    }
    tracing::warn!(by = %actor.name, "breach response started from the admin page");
    match app
        .breach_response(
            form.require_passkey.is_some(),
            form.notify.is_some(),
            &client,
        )
        .await
    {
        Ok(r) => no_store(
            pages::message_with_link(
                "Breach response done",
                &format!(
                    "Everyone is signed out (you too), every user must choose a new password{} at \
                     next login, and the session signing key was replaced (new key {}, retired {}).",
                    if r.passkey_required {
                        " and register a passkey"
                    } else {
                        ""
                    },
                    r.new_kid,
                    r.retired_kids.join(", ")
                ),
                super::LOGIN_PATH,
                "Sign in again",
            )
            .into_response(),
        ),
        Err(e) => store_unavailable(&e.to_string()),
    }
}

#[derive(Deserialize)]
pub(crate) struct PlexLinkForm {
    account: String,
    user: Option<String>,
    #[serde(default)]
    csrf: String,
}

/// A [`PlexLinkForm`] posted from the admin page: read as every page form is ([`PageForm`]),
/// then refused as every admin form is ([`admin_form`]) unless a signed-in admin sent it with
/// the page's CSRF token.
pub(crate) struct AdminPlexForm(PlexLinkForm);

impl FromRequest<Arc<App>> for AdminPlexForm {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, app: &Arc<App>) -> Result<Self, Response> {
        let headers = req.headers().clone();
        let PageForm(form) = PageForm::<PlexLinkForm>::from_request(req, app).await?;
        admin_form(app, &headers, &form.csrf).await?;
        Ok(Self(form))
    }
}

/// `POST /_portcullis/admin/plex/link`: links a Plex account to a gateway user.
pub(crate) async fn plex_link(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    AdminPlexForm(form): AdminPlexForm,
) -> Response {
    let user = form.user.as_deref().map(str::trim).unwrap_or_default();
    if user.is_empty() {
        return bad("Choose the gateway user to link the Plex account to.");
    }
    match app.plex_link(&form.account, user, "admin", &client).await {
        Ok(_) => redirect(&format!("{ADMIN_PATH}?done=plex-linked")),
        Err(e) => super::plex::plex_error(e, bad),
    }
}

/// `POST /_portcullis/admin/plex/unlink`: unlinks a Plex account; its tokens end at once.
pub(crate) async fn plex_unlink(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    AdminPlexForm(form): AdminPlexForm,
) -> Response {
    match app.plex_unlink(&form.account, "admin", &client).await {
        Ok(true) => redirect(&format!("{ADMIN_PATH}?done=plex-unlinked")),
        Ok(false) => bad("That Plex account is not linked."),
        Err(e) => super::plex::plex_error(e, bad),
    }
}

/// `POST /_portcullis/admin/plex/revoke-upstream`: "also sign out at plex.tv" (the owner's
/// devices the gateway has seen are removed, a friend is un-shared).
pub(crate) async fn plex_revoke_upstream(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientInfo>,
    AdminPlexForm(form): AdminPlexForm,
) -> Response {
    let revocation = match app
        .plex_revoke_upstream(&form.account, "admin", &client)
        .await
    {
        Ok(r) => r,
        Err(e) => return super::plex::plex_error(e, bad),
    };
    let (status, title) = match (&revocation.failed, revocation.done.is_empty()) {
        (None, false) => return redirect(&format!("{ADMIN_PATH}?done=plex-revoked-upstream")),
        (None, true) => (StatusCode::OK, "Nothing done"),
        (Some(_), true) => (StatusCode::BAD_GATEWAY, "Not done"),
        (Some(_), false) => (StatusCode::BAD_GATEWAY, "Partly done"),
    };
    let text = revocation.detail("admin");
    no_store(
        (
            status,
            pages::message_with_link(title, &text, ADMIN_PATH, "Back to admin"),
        )
            .into_response(),
    )
}
