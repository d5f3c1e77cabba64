//! The media-server side of the application: logins performed on a client's behalf so that the
//! minted token is bound to a gateway user before the client sees it, Quick Connect approvals,
//! adoption of unknown tokens, upstream logouts of every token the gateway ends (durable,
//! retried with backoff), and the lifetimes the gateway gives tokens that never expire upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde_json::Value;

use super::{now_ms, App, ClientInfo};
use crate::auth::throttle::Gate;
use crate::auth::Identity;
use crate::config::{PasswordLogin, Route};
use crate::mediaserver::carrier::ClientFields;
use crate::mediaserver::endpoint::LoginRoute;
use crate::mediaserver::upstream::{field_str, login_result, LoginResult};
use crate::mediaserver::{self, Approval};
use crate::revocation::{MediaCheck, MediaEntry};
use crate::store::{MediaNote, NewMediaBinding, NewSession, SessionId, SessionKind, User};

/// How often ended media tokens are looked for when nothing wakes the worker.
const LOGOUT_POLL: Duration = Duration::from_secs(1);
/// How often idle media tokens are ended.
const IDLE_CHECK: Duration = Duration::from_secs(5);
/// Longest wait between two upstream logout attempts of one token.
const MAX_LOGOUT_BACKOFF_MS: i64 = 5 * 60 * 1000;
/// Upstream logouts tried per round.
const LOGOUT_BATCH: i64 = 50;
/// Largest login request body read (user name and password, or a Quick Connect secret).
pub const MAX_LOGIN_BODY: usize = 64 * 1024;

/// A request the gateway sends to the media server on the client's behalf: the client's own
/// request, already stripped of gateway credentials and given forwarded headers.
pub struct MediaRequest {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub fields: ClientFields,
    pub client: ClientInfo,
    /// A live gateway session the request also carried (cookie or Bearer), if any.
    pub gateway: Option<Identity>,
}

/// What goes back to the client.
pub struct MediaAnswer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl MediaAnswer {
    /// A small JSON error the apps show or log.
    pub fn error(status: u16, message: &str) -> MediaAnswer {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let body = serde_json::json!({ "error": message }).to_string();
        MediaAnswer {
            status,
            headers,
            body: Bytes::from(body),
        }
    }
}

/// A media token to bind: whose it is upstream, which device, how long it may live, and
/// whether a sealed copy is kept for an upstream logout.
pub(crate) struct Binding<'a> {
    pub token: &'a str,
    pub media_user_id: String,
    pub media_user: String,
    pub device_id: String,
    pub lifetime: Duration,
    /// The token's own end (a JWT's `exp`), if sooner.
    pub not_after_ms: Option<i64>,
    pub seal: bool,
}

/// The identity of a bound media token.
pub fn identity_of(entry: &MediaEntry) -> Identity {
    Identity {
        user_id: entry.user_id,
        name: entry.user_name.to_string(),
        sid: entry.sid,
        issued_ms: entry.issued_ms,
        expires_s: entry.expires_ms / 1000,
        factors: 1,
    }
}

/// A path under the route's prefix (the media server's BaseUrl).
pub fn upstream_path(route: &Route, path: &str) -> String {
    if route.path_prefix == "/" {
        path.to_string()
    } else {
        format!("{}{path}", route.path_prefix)
    }
}

/// The `Authorization` header the gateway sends with a token: the client's own fields (so the
/// media server does not rename the device), URL-encoded as the official SDKs do.
fn mediabrowser_header(fields: &ClientFields, token: &str) -> Option<HeaderValue> {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let or = |s: &str, d: &'static str| if s.is_empty() { d.to_string() } else { enc(s) };
    HeaderValue::from_str(&format!(
        "MediaBrowser Client=\"{}\", Device=\"{}\", DeviceId=\"{}\", Version=\"{}\", Token=\"{}\"",
        or(&fields.client, "Portcullis"),
        or(&fields.device, "Portcullis"),
        or(&fields.device_id, "portcullis"),
        or(&fields.version, env!("CARGO_PKG_VERSION")),
        enc(token)
    ))
    .ok()
}

fn backoff_ms(attempts: i64) -> i64 {
    let exp = attempts.clamp(0, 20) as u32;
    (1000i64.saturating_mul(1 << exp)).min(MAX_LOGOUT_BACKOFF_MS)
}

impl App {
    /// What the view says about a media token.
    pub fn check_media_token(&self, token: &str, now_ms: i64) -> MediaCheck {
        self.view
            .check_media(&self.secrets.media_token_hash(token), now_ms)
    }

    /// Performs a login route of a media server for the client and binds the minted token.
    pub async fn media_login(
        self: &Arc<Self>,
        route_index: usize,
        login: LoginRoute,
        req: MediaRequest,
    ) -> MediaAnswer {
        let config = self.config();
        let Some(route) = config.routes.get(route_index) else {
            return MediaAnswer::error(500, "no such route");
        };
        let Some(media) = route.media.as_ref() else {
            return MediaAnswer::error(500, "not a media route");
        };
        let now = now_ms();
        let method_label = login.method_label();
        let count = |result: &str| {
            self.metrics
                .counter(crate::metrics::Family::Logins, &[method_label, result])
                .inc();
        };
        let store_unavailable = || {
            count("store_unavailable");
            MediaAnswer::error(503, "The account store is unavailable.")
        };
        if let Gate::Wait(d) | Gate::Locked(d) = self.throttle.ip_gate(req.client.ip_addr(), now) {
            count("throttled");
            return throttled(d);
        }
        let password_login = login == LoginRoute::ByName;
        if password_login && media.password_login == PasswordLogin::Deny {
            count("refused_by_policy");
            return MediaAnswer::error(
                403,
                "Password sign-in is turned off on this server; sign in with Quick Connect.",
            );
        }

        // Who is asking, before anything reaches the media server.
        let mut expected: Option<User> = None;
        let mut approval: Option<Approval> = None;
        match login {
            LoginRoute::ByName => {
                let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                let Some(name) = field_str(&body, "Username").map(crate::auth::canonical_user_name)
                else {
                    count("invalid_request");
                    return MediaAnswer::error(400, "The request names no user.");
                };
                let gateway_name = media.gateway_user(&name).to_string();
                let mark = self.failures_mark();
                let user = match self.store.find_user(&gateway_name).await {
                    Ok(u) => u,
                    Err(e) => {
                        self.store_error("find_user", e);
                        return store_unavailable();
                    }
                };
                // A directory user who never signed in at the gateway has no record yet: the
                // directory is asked (their password is the media server's to check).
                let user = match user {
                    None if self.directory().is_some() => {
                        match self.directory_lookup(&gateway_name, &req.client).await {
                            Ok(u) => u,
                            Err(_) => {
                                count("directory_unavailable");
                                return MediaAnswer::error(
                                    503,
                                    "The user directory is unavailable; try again in a moment.",
                                );
                            }
                        }
                    }
                    other => other,
                };
                let Some(user) = user else {
                    // An unknown name is delayed and locked like a known one (as at the
                    // gateway's own login), so the answers after many tries match too.
                    if let Some(refusal) =
                        gate_refusal(self.throttle.unknown_gate(&gateway_name, now))
                    {
                        count(refusal.0);
                        return refusal.1;
                    }
                    self.record_failure(None, &gateway_name, &req.client).await;
                    count("invalid_credentials");
                    return wrong_credentials();
                };
                let gate = match self.account_gate(&user, mark, now).await {
                    Ok(gate) => gate,
                    Err(e) => {
                        self.store_error("find_user", e);
                        return store_unavailable();
                    }
                };
                if let Some(refusal) = gate_refusal(gate) {
                    count(refusal.0);
                    return refusal.1;
                }
                let second_factor = match self.has_second_factor(&user).await {
                    Ok(b) => b,
                    Err(e) => {
                        self.store_error("find_user", e);
                        return store_unavailable();
                    }
                };
                if let Some(refusal) =
                    self.refuse_user(&user, second_factor, media.password_login, &req)
                {
                    // Why this account may not sign in here is told only to a client that
                    // proves its password (checked by the gateway, so that the password never
                    // reaches the media server); anyone else gets the answer of a wrong
                    // password, and the failure counts (ATK-48).
                    let pw = crate::config::Secret::new(
                        field_str(&body, "Pw").unwrap_or("").to_string(),
                    );
                    if !self.password_is_right(&user, pw).await.unwrap_or(false) {
                        self.record_failure(Some(&user), &user.name, &req.client)
                            .await;
                        count("invalid_credentials");
                        return wrong_credentials();
                    }
                    count(refusal.0);
                    return refusal.1;
                }
                expected = Some(user);
            }
            LoginRoute::QuickConnect => {
                if !self.media.redeem_allowed(&req.client.ip) {
                    count("throttled");
                    return MediaAnswer::error(
                        429,
                        "Too many Quick Connect attempts; try again in a few minutes.",
                    );
                }
                let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                let secret = mediaserver::secret_hash(field_str(&body, "Secret").unwrap_or(""));
                approval = self.media.approval_for_secret(route_index, &secret);
                if approval.is_none() {
                    // Approved through another replica a moment ago, perhaps: catch up once.
                    let _ = self.sync().await;
                    approval = self.media.approval_for_secret(route_index, &secret);
                }
                if approval.is_none() {
                    self.media.redeem_failed(&req.client.ip);
                    count("not_approved");
                    return MediaAnswer::error(
                        401,
                        "This Quick Connect code was not approved through the gateway.",
                    );
                }
            }
        }

        let reply = match self
            .media_client
            .call(
                route.upstream,
                req.method.clone(),
                &req.path_and_query,
                req.headers.clone(),
                req.body.clone(),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(route = %route.name, error = %e, "media login: upstream failed");
                count("upstream_unavailable");
                return MediaAnswer::error(502, "The media server is not answering.");
            }
        };
        let pass_through = MediaAnswer {
            status: reply.status,
            headers: reply.headers.clone(),
            body: reply.body.clone(),
        };
        if reply.status != 200 {
            if password_login && reply.status == 401 {
                // Recorded before answering, so that the next attempt sees it.
                let name = expected
                    .as_ref()
                    .map(|u| u.name.clone())
                    .unwrap_or_default();
                self.record_failure(expected.as_ref(), &name, &req.client)
                    .await;
                count("invalid_credentials");
                // The gateway's own answer, not the media server's: the same bytes as for an
                // unknown name (ATK-48).
                return wrong_credentials();
            } else {
                count("upstream_refused");
            }
            return pass_through;
        }
        let Some(result) = reply.json().as_ref().and_then(login_result) else {
            count("unreadable_answer");
            return MediaAnswer::error(
                502,
                "The media server's sign-in answer was not understood.",
            );
        };

        // Whose token it is, by the media server's own account of it.
        let gateway_name = media.gateway_user(&result.user_name).to_string();
        let owner = match self.store.find_user(&gateway_name).await {
            Ok(u) => u,
            Err(e) => {
                self.store_error("find_user", e);
                self.logout_now(route, &req.fields, &result.token).await;
                return store_unavailable();
            }
        };
        let refusal: Option<(&'static str, MediaAnswer)> = match (&owner, &expected, &approval) {
            (None, _, _) => Some((
                "no_gateway_user",
                MediaAnswer::error(403, "This media account has no gateway user."),
            )),
            (Some(o), Some(e), _) if o.id != e.id => Some((
                "user_mismatch",
                MediaAnswer::error(403, "The media server signed in a different user."),
            )),
            (Some(o), _, Some(a)) if a.user_id != o.id && !a.is_admin => Some((
                "not_approved",
                MediaAnswer::error(
                    403,
                    "The Quick Connect code was approved by a different user.",
                ),
            )),
            _ => None,
        };
        let owner = match (refusal, owner) {
            (None, Some(o)) => o,
            (refusal, _) => {
                let (label, answer) = refusal.unwrap_or((
                    "no_gateway_user",
                    MediaAnswer::error(403, "This media account has no gateway user."),
                ));
                self.logout_now(route, &req.fields, &result.token).await;
                count(label);
                let mut e = self.audit_entry("media_login", label, None, &req.client);
                e.detail = format!("route {}", route.name);
                self.audit(e).await;
                return answer;
            }
        };

        let source = match login {
            LoginRoute::QuickConnect => "quick_connect",
            _ => "media_password",
        };
        match self
            .bind_media_token(route, &owner, &result, &req.fields, &req.client)
            .await
        {
            Ok(_) => {}
            Err(()) => {
                self.logout_now(route, &req.fields, &result.token).await;
                return store_unavailable();
            }
        }
        if password_login {
            self.settle_failures(owner.id).await;
            if let Err(e) = self.store.clear_failures(owner.id).await {
                self.store_error("clear_failures", e);
            }
        }
        self.metrics
            .counter(crate::metrics::Family::MediaTokensBound, &[source])
            .inc();
        count("success");
        let mut e = self.audit_entry(
            "media_login",
            "success",
            Some((owner.id, &owner.name)),
            &req.client,
        );
        e.detail = format!(
            "route {}, {source}, {} on {}",
            route.name,
            crate::app::truncate(&req.fields.client, 64),
            crate::app::truncate(&req.fields.device, 64)
        );
        self.audit(e).await;
        pass_through
    }

    /// `POST /QuickConnect/Initiate`, performed for the new device: the gateway remembers which
    /// secret belongs to which code, so that a later redemption can be matched to whoever
    /// approved the code through the gateway.
    pub async fn quick_connect_initiate(
        &self,
        route_index: usize,
        req: MediaRequest,
    ) -> MediaAnswer {
        let config = self.config();
        let Some(route) = config.routes.get(route_index) else {
            return MediaAnswer::error(500, "no such route");
        };
        if let Gate::Wait(d) | Gate::Locked(d) =
            self.throttle.ip_gate(req.client.ip_addr(), now_ms())
        {
            return throttled(d);
        }
        let reply = match self
            .media_client
            .call(
                route.upstream,
                req.method,
                &req.path_and_query,
                req.headers,
                req.body,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(route = %route.name, error = %e, "quick connect: upstream failed");
                return MediaAnswer::error(502, "The media server is not answering.");
            }
        };
        if reply.status == 200 {
            if let Some(v) = reply.json() {
                if let (Some(secret), Some(code)) = (field_str(&v, "Secret"), field_str(&v, "Code"))
                {
                    let secret_hash = mediaserver::secret_hash(secret);
                    self.media.remember_secret(route_index, &secret_hash, code);
                    self.share_note(
                        MediaNote::QuickConnectIssued {
                            route: route.name.clone(),
                            secret_hash,
                            code: code.to_string(),
                        },
                        now_ms() + mediaserver::QUICK_CONNECT_TTL.as_millis() as i64,
                    )
                    .await;
                }
            }
        }
        MediaAnswer {
            status: reply.status,
            headers: reply.headers,
            body: reply.body,
        }
    }

    /// Why a user may not get a media token by password here, if they may not.
    fn refuse_user(
        &self,
        user: &User,
        second_factor: bool,
        policy: PasswordLogin,
        req: &MediaRequest,
    ) -> Option<(&'static str, MediaAnswer)> {
        if user.disabled {
            return Some((
                "disabled",
                MediaAnswer::error(403, "This account is disabled."),
            ));
        }
        // Whatever the route's policy: the password of a user who must sign in with a passkey
        // opens nothing (after a breach response it may be the phished one), nor does one that
        // must be replaced.
        if self.passkey_required(user) {
            return Some((
                "passkey_required",
                MediaAnswer::error(
                    403,
                    "This account signs in with a passkey: sign this app in with Quick Connect, \
                     approved from a signed-in browser.",
                ),
            ));
        }
        if user.must_reset && user.directory_dn.is_none() {
            return Some((
                "password_reset_required",
                MediaAnswer::error(
                    403,
                    "A new password must be chosen first: sign in at the gateway's page.",
                ),
            ));
        }
        let gateway_session_of_user = req.gateway.as_ref().is_some_and(|g| g.user_id == user.id);
        if policy == PasswordLogin::DenyFor2faUsers && second_factor && !gateway_session_of_user {
            return Some((
                "second_factor_required",
                MediaAnswer::error(
                    403,
                    "This account uses two-factor sign-in: sign this app in with Quick Connect, \
                     approved from a signed-in browser.",
                ),
            ));
        }
        None
    }

    /// Binds a minted media token to `owner` and applies the result to the view.
    async fn bind_media_token(
        &self,
        route: &Route,
        owner: &User,
        result: &LoginResult,
        fields: &ClientFields,
        client: &ClientInfo,
    ) -> Result<Identity, ()> {
        let Some(media) = route.media.as_ref() else {
            return Err(());
        };
        let device_id = result
            .device_id
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| fields.device_id.clone());
        self.bind_token(
            &route.name,
            owner,
            Binding {
                token: &result.token,
                media_user_id: result.user_id.clone(),
                media_user: result.user_name.clone(),
                device_id,
                lifetime: media.token_lifetime,
                not_after_ms: None,
                seal: true,
            },
            fields,
            client,
        )
        .await
    }

    /// Binds a media token to a gateway user (a `media` session keyed by the token's keyed
    /// hash, so every revocation reaches it) and returns the identity it now carries.
    pub(crate) async fn bind_token(
        &self,
        route_name: &str,
        owner: &User,
        b: Binding<'_>,
        fields: &ClientFields,
        client: &ClientInfo,
    ) -> Result<Identity, ()> {
        let now = now_ms();
        let sid = SessionId::random();
        let created = now.max(self.view.min_issue_ms(owner.id));
        let mut expires_ms = created + b.lifetime.as_millis() as i64;
        if let Some(limit) = b.not_after_ms {
            expires_ms = expires_ms.min(limit);
        }
        let describe = |s: &str, d: &str| {
            if s.is_empty() {
                d.to_string()
            } else {
                crate::app::truncate(s, 64)
            }
        };
        let user_agent = format!(
            "{} {} on {}",
            describe(&fields.client, "Media app"),
            describe(&fields.version, ""),
            describe(&fields.device, "an unnamed device")
        )
        .replace("  ", " ");
        let binding = NewMediaBinding {
            session: NewSession {
                id: sid,
                user_id: owner.id,
                kind: SessionKind::Media,
                user_agent,
                ip: client.ip.clone(),
                created_ms: created,
                expires_ms,
            },
            token_hash: hex::encode(self.secrets.media_token_hash(b.token)),
            token_sealed: if b.seal {
                self.secrets.seal_token(&sid.to_string(), b.token)
            } else {
                String::new()
            },
            route: route_name.to_string(),
            media_user_id: b.media_user_id,
            media_user: b.media_user,
            device_id: b.device_id,
            client: fields.client.clone(),
            device_name: fields.device.clone(),
            version: fields.version.clone(),
        };
        let events = match self.store.bind_media_token(&binding).await {
            Ok(events) => events,
            Err(e) => {
                self.store_error("bind_media_token", e);
                return Err(());
            }
        };
        self.apply(&events);
        // A new app on a device or network not seen before is told to the user, as a new
        // browser sign-in is.
        let app_client = ClientInfo {
            ip: client.ip.clone(),
            user_agent: format!(
                "{} on {}",
                describe(&fields.client, "a media app"),
                describe(&fields.device, "a device")
            ),
        };
        self.note_sign_in(owner, &app_client, &["media".to_string()])
            .await;
        if let MediaCheck::Alive(entry) = self.check_media_token(b.token, now) {
            return Ok(identity_of(&entry));
        }
        // The view may not have caught up with an earlier change of this user that the store
        // already holds (re-enabled from the CLI a moment ago, say): catch up once, then judge.
        if let Err(e) = self.sync().await {
            self.store_error("sync", e);
            return Err(());
        }
        match self.check_media_token(b.token, now) {
            MediaCheck::Alive(entry) => Ok(identity_of(&entry)),
            _ => Err(()),
        }
    }

    /// Checks an unknown token once with `GET /Users/Me` and binds it if it belongs to a
    /// gateway user (`adopt_unknown_tokens`, for migrating a server with existing logins).
    pub async fn adopt_media_token(
        self: &Arc<Self>,
        route_index: usize,
        token: &str,
        fields: &ClientFields,
        client: &ClientInfo,
    ) -> Option<Identity> {
        let config = self.config();
        let route = config.routes.get(route_index)?;
        let media = route.media.as_ref()?;
        let hash = self.secrets.media_token_hash(token);
        if self.media.adopt_was_refused(&hash) || !self.media.adoption_allowed(&client.ip) {
            return None;
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            mediabrowser_header(fields, token)?,
        );
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        let reply = self
            .media_client
            .call(
                route.upstream,
                Method::GET,
                &upstream_path(route, "/Users/Me"),
                headers,
                Bytes::new(),
            )
            .await
            .ok();
        let me = reply
            .filter(|r| r.status == 200)
            .and_then(|r| r.json())
            .and_then(|v| {
                Some((
                    field_str(&v, "Id")?.to_string(),
                    field_str(&v, "Name")?.to_string(),
                ))
            });
        let Some((media_user_id, media_user)) = me else {
            self.media.adopt_refused(hash);
            return None;
        };
        let owner = self
            .store
            .find_user(media.gateway_user(&media_user))
            .await
            .ok()
            .flatten()
            .filter(|u| !u.disabled);
        let Some(owner) = owner else {
            self.media.adopt_refused(hash);
            return None;
        };
        let result = LoginResult {
            token: token.to_string(),
            user_id: media_user_id,
            user_name: media_user,
            device_id: None,
        };
        let identity = self
            .bind_media_token(route, &owner, &result, fields, client)
            .await
            .ok()?;
        self.metrics
            .counter(crate::metrics::Family::MediaTokensBound, &["adopted"])
            .inc();
        let mut e = self.audit_entry(
            "media_token_adopted",
            "success",
            Some((owner.id, &owner.name)),
            client,
        );
        e.detail = format!("route {}", route.name);
        self.audit(e).await;
        Some(identity)
    }

    /// Records who approved a Quick Connect code, after checking that they may: a live
    /// session of a user without a second factor, or a gateway session (which passed the
    /// second factor: the code or a passkey) of a user with one (TOTP or a passkey).
    pub async fn approve_quick_connect(
        &self,
        route_index: usize,
        code: &str,
        identity: &Identity,
        via_gateway_session: bool,
    ) -> Result<(), &'static str> {
        let user = match self.store.find_user_by_id(identity.user_id).await {
            Ok(Some(u)) => u,
            Ok(None) => return Err("unknown user"),
            Err(e) => {
                self.store_error("find_user", e);
                return Err("the account store is unavailable");
            }
        };
        match self.has_second_factor(&user).await {
            Ok(true) if !via_gateway_session => {
                return Err("approve Quick Connect codes from a browser signed in to the gateway");
            }
            Ok(_) => {}
            Err(e) => {
                self.store_error("find_user", e);
                return Err("the account store is unavailable");
            }
        }
        self.media.approve(
            route_index,
            code,
            Approval {
                user_id: user.id,
                is_admin: user.is_admin,
            },
        );
        if let Some(route) = self.config().routes.get(route_index) {
            self.share_note(
                MediaNote::QuickConnectApproved {
                    route: route.name.clone(),
                    code: code.to_string(),
                    user_id: user.id,
                    is_admin: user.is_admin,
                },
                now_ms() + mediaserver::QUICK_CONNECT_TTL.as_millis() as i64,
            )
            .await;
        }
        Ok(())
    }

    /// Shares a media note with every replica through the event log. A failure is logged and
    /// changes nothing here: this replica already acts on the note.
    pub async fn share_note(&self, note: MediaNote, until_ms: i64) {
        match self
            .store
            .append_media_note(&note, until_ms, now_ms())
            .await
        {
            Ok(event) => self.apply(&[event]),
            Err(e) => {
                self.store_error("append_media_note", e);
            }
        }
    }

    /// Records a playback grant for every replica (this one has it already).
    pub async fn share_grant(
        &self,
        route_index: usize,
        item: &str,
        ip: &str,
        identity: &Identity,
        until_ms: i64,
    ) {
        let config = self.config();
        let Some(route) = config.routes.get(route_index) else {
            return;
        };
        self.share_note(
            MediaNote::Grant {
                route: route.name.clone(),
                item: item.to_string(),
                ip: ip.to_string(),
                sid: identity.sid.to_string(),
                user_id: identity.user_id,
                user_name: identity.name.clone(),
                issued_ms: identity.issued_ms,
                token_expires_s: identity.expires_s,
            },
            until_ms,
        )
        .await;
    }

    /// Acts on a media note from the event log (this replica's or another's).
    pub(crate) fn apply_media_note(&self, note: &MediaNote, until_ms: i64) {
        let index = |name: &str| self.config().routes.iter().position(|r| r.name == name);
        match note {
            MediaNote::PlexChanged { .. } => self.plex.forget_refusals(),
            MediaNote::Grant {
                route,
                item,
                ip,
                sid,
                user_id,
                user_name,
                issued_ms,
                token_expires_s,
            } => {
                let (Some(i), Some(sid)) = (index(route), SessionId::parse(sid)) else {
                    return;
                };
                let identity = Identity {
                    user_id: *user_id,
                    name: user_name.clone(),
                    sid,
                    issued_ms: *issued_ms,
                    expires_s: *token_expires_s,
                    factors: 1,
                };
                self.media.grant(i, item, ip, &identity, until_ms);
            }
            MediaNote::QuickConnectIssued {
                route,
                secret_hash,
                code,
            } => {
                if let Some(i) = index(route) {
                    self.media.remember_secret(i, secret_hash, code);
                }
            }
            MediaNote::QuickConnectApproved {
                route,
                code,
                user_id,
                is_admin,
            } => {
                if let Some(i) = index(route) {
                    self.media.approve(
                        i,
                        code,
                        Approval {
                            user_id: *user_id,
                            is_admin: *is_admin,
                        },
                    );
                }
            }
        }
    }

    /// The client ended its own token with `POST /Sessions/Logout`: end its session here too
    /// (the media server already deleted the token, so no upstream logout is owed).
    pub async fn media_logged_out(&self, sid: SessionId) {
        if let Err(e) = self.revoke_session(sid).await {
            tracing::warn!(error = %e, "could not record a media logout");
            return;
        }
        if let Err(e) = self.store.media_logout_done(sid, now_ms()).await {
            self.store_error("media_logout_done", e);
        }
    }

    /// Calls `POST /Sessions/Logout` once with a token that must not live (a login the gateway
    /// refused after the media server minted it). Failures are logged; the token is unbound,
    /// so the gateway refuses it anyway.
    async fn logout_now(&self, route: &Route, fields: &ClientFields, token: &str) {
        if let Err(e) = self.upstream_logout(route, fields, token).await {
            tracing::warn!(route = %route.name, error = %e, "could not log a refused token out upstream");
        }
    }

    async fn upstream_logout(
        &self,
        route: &Route,
        fields: &ClientFields,
        token: &str,
    ) -> Result<u16, String> {
        let mut headers = HeaderMap::new();
        let auth = mediabrowser_header(fields, token).ok_or("token not sendable")?;
        headers.insert(http::header::AUTHORIZATION, auth);
        let reply = self
            .media_client
            .call(
                route.upstream,
                Method::POST,
                &upstream_path(route, "/Sessions/Logout"),
                headers,
                Bytes::new(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(reply.status)
    }

    /// One round of owed upstream logouts.
    async fn run_owed_logouts(&self) {
        let now = now_ms();
        let owed = match self.store.owed_media_logouts(now, LOGOUT_BATCH).await {
            Ok(o) => o,
            Err(e) => {
                self.store_error("owed_media_logouts", e);
                return;
            }
        };
        let config = self.config();
        for o in owed {
            let route = config.routes.iter().find(|r| r.name == o.route);
            let token = self.secrets.open_token(&o.sid.to_string(), &o.token_sealed);
            let (Some(route), Ok(token)) = (route, token) else {
                // The route is gone from the config, or the token cannot be read: nothing can
                // be sent. The token is refused by the gateway regardless.
                tracing::warn!(route = %o.route, "media token cannot be logged out upstream");
                self.metrics
                    .counter(crate::metrics::Family::MediaLogouts, &["unreadable"])
                    .inc();
                if let Err(e) = self.store.media_logout_done(o.sid, now).await {
                    self.store_error("media_logout_done", e);
                }
                continue;
            };
            let fields = ClientFields {
                client: o.client.clone(),
                device: o.device_name.clone(),
                device_id: o.device_id.clone(),
                version: o.version.clone(),
            };
            let result = self.upstream_logout(route, &fields, &token).await;
            let label = match result {
                Ok(s) if (200..300).contains(&s) => "done",
                // The media server does not know the token any more: nothing left to end.
                Ok(401 | 403 | 404) => "gone",
                _ => "retry",
            };
            self.metrics
                .counter(crate::metrics::Family::MediaLogouts, &[label])
                .inc();
            if label != "retry" {
                // A media token ended at the media server too.
                self.metrics
                    .counter(crate::metrics::Family::Revocations, &["media"])
                    .inc();
            }
            let stored = if label == "retry" {
                let next = now + backoff_ms(o.attempts);
                tracing::warn!(route = %route.name, attempts = o.attempts + 1, "upstream logout failed; will retry");
                self.store.media_logout_failed(o.sid, next).await
            } else {
                self.store.media_logout_done(o.sid, now).await
            };
            if let Err(e) = stored {
                self.store_error("media_logout", e);
            }
        }
    }

    /// Ends media tokens idle longer than their route allows.
    async fn end_idle_media_tokens(&self) {
        let now = now_ms();
        for route in &self.config().routes {
            let idle = match (route.media.as_ref(), route.plex.as_ref()) {
                (Some(m), _) => m.token_idle,
                (None, Some(p)) => p.token_idle,
                (None, None) => continue,
            };
            let before = now - idle.as_millis() as i64;
            match self
                .store
                .end_idle_media_sessions(&route.name, before, now)
                .await
            {
                Ok(events) if !events.is_empty() => {
                    tracing::info!(route = %route.name, ended = events.len(), "idle media tokens ended");
                    self.apply(&events);
                }
                Ok(_) => {}
                Err(e) => {
                    self.store_error("end_idle_media_sessions", e);
                }
            }
        }
    }

    /// The media loop: owed upstream logouts (woken by revocations, else every second), idle
    /// media tokens, and the grant gauge. Runs only when a media route is configured.
    pub async fn run_media_loop(self: Arc<Self>) {
        let mut last_idle = Instant::now();
        loop {
            tokio::select! {
                _ = self.media.logout_wake.notified() => {}
                _ = tokio::time::sleep(LOGOUT_POLL) => {}
            }
            self.run_owed_logouts().await;
            if last_idle.elapsed() >= IDLE_CHECK {
                self.flush_last_seen().await;
                self.end_idle_media_tokens().await;
                self.metrics
                    .playback_grants
                    .set(self.media.grant_count() as i64);
                last_idle = Instant::now();
            }
        }
    }

    /// Closes open WebSockets and streams whose session has ended: at once when a revocation
    /// reaches the view, and several times a second for sessions that simply expire.
    pub async fn run_connection_watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(mediaserver::CONNECTION_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.media.connection_wake.notified() => {}
            }
            let closed = self.media.close_dead_connections(&self.view, now_ms());
            if closed > 0 {
                tracing::info!(closed, "closed connections of ended sessions");
                self.metrics.connections_closed.inc_by(closed as u64);
            }
        }
    }
}

/// A refused password: one answer for an unknown name, a wrong password, and an account whose
/// state is not told without its password.
fn wrong_credentials() -> MediaAnswer {
    MediaAnswer::error(401, "Wrong user name or password.")
}

/// The answer of a closed delay or lock gate, with its metric label.
fn gate_refusal(gate: Gate) -> Option<(&'static str, MediaAnswer)> {
    match gate {
        Gate::Open => None,
        Gate::Wait(d) => Some(("throttled", throttled(d))),
        Gate::Locked(_) => Some((
            "locked",
            MediaAnswer::error(
                403,
                "Too many failed attempts: this account is locked for a while.",
            ),
        )),
    }
}

fn throttled(d: Duration) -> MediaAnswer {
    let mut a = MediaAnswer::error(
        429,
        &format!(
            "Too many failed attempts; try again in {} s.",
            d.as_secs().max(1)
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&d.as_secs().max(1).to_string()) {
        a.headers.insert(http::header::RETRY_AFTER, v);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_ms(0), 1000);
        assert_eq!(backoff_ms(3), 8000);
        assert_eq!(backoff_ms(40), MAX_LOGOUT_BACKOFF_MS);
    }

    #[test]
    fn the_logout_header_encodes_the_clients_fields() {
        let f = ClientFields {
            client: "Jellyfin Web".into(),
            device: "Fire fox".into(),
            device_id: "abc".into(),
            version: "10.11".into(),
        };
        let h = mediabrowser_header(&f, "tok").unwrap();
        let parsed = crate::mediaserver::carrier::parse_params(h.to_str().unwrap()).unwrap();
        let get = |k: &str| {
            parsed
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("Client").as_deref(), Some("Jellyfin Web"));
        assert_eq!(get("Token").as_deref(), Some("tok"));
    }
}
