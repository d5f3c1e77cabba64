//! The request filter of `jellyfin` and `emby` routes. In order: the endpoint (after the base
//! URL and legacy prefixes), every token carrier (two different tokens or a malformed client
//! field → 400), blocked paths (403), the hidden user list, the login routes (performed by the
//! gateway so the minted token is bound before the client sees it), then the credential: a
//! bound media token, else a gateway session, else — for credential-less media and artwork —
//! a playback grant. Unknown and revoked tokens get 401 on every route that serves content.

use pingora::prelude::*;
use pingora::proxy::Session;

use super::{forward, respond, Gateway, Outcome, RequestCtx};
use crate::app::media::{identity_of, MediaRequest, MAX_LOGIN_BODY};
use crate::app::{now_ms, ClientInfo};
use crate::auth::{self, AuthDecision, DenyReason, Identity};
use crate::config::ImagePolicy;
use crate::mediaserver::carrier::{self, CarrierError, ClientFields};
use crate::mediaserver::endpoint::{self, Endpoint, LoginRoute};
use crate::metrics::RejectReason;
use crate::revocation::MediaCheck;

/// Per-request state of a media route.
#[derive(Default)]
pub struct MediaCtx {
    /// Record a playback grant for this item if the upstream answers 200.
    pub grant_item: Option<String>,
    /// The client is logging its own token out: end its session when the upstream agrees.
    pub logout_sid: Option<crate::store::SessionId>,
    /// A Quick Connect approval by this user: count it if the media server refuses it.
    pub approving_user: Option<i64>,
    /// A Plex transcode start: its answer is read for session ids as it passes.
    pub plex_scan: bool,
    pub plex_scanned: usize,
    /// The end of the answer's previous chunk (an id may straddle two).
    pub plex_tail: Vec<u8>,
}

/// Headers that describe the connection, not the request, dropped from requests the gateway
/// sends itself.
const NOT_FORWARDED: [&str; 6] = [
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "host",
    "expect",
];

/// Answers a request whose media credentials cannot be read (two different tokens, a malformed
/// token or client field) with 400; it never reaches the server.
pub(super) async fn refuse_carriers(
    session: &mut Session,
    ctx: &mut RequestCtx,
    e: CarrierError,
) -> Result<bool> {
    let reason = match e {
        CarrierError::TwoTokens => RejectReason::TwoTokens,
        CarrierError::BadField(_) | CarrierError::BadToken => RejectReason::BadClientField,
    };
    tracing::debug!(request_id = %ctx.request_id, error = %e, "bad media credentials");
    ctx.outcome = Outcome::Rejected(reason);
    respond::reject(session, reason).await?;
    Ok(true)
}

impl Gateway {
    /// The headers of a request the gateway sends the media server itself on the client's
    /// behalf: the client's, rewritten as when forwarding, without the connection's own.
    pub(super) fn own_request_headers(
        &self,
        session: &Session,
        ctx: &RequestCtx,
    ) -> Result<http::HeaderMap> {
        let head = session.req_header();
        let mut upstream_head = head.clone();
        let host = super::host_of(head).map(str::to_string);
        forward::rewrite(
            &mut upstream_head,
            &forward::ForwardFacts {
                client_ip: &ctx.client_ip,
                proto: self.proto,
                host: host.as_deref(),
                request_id: &ctx.request_id,
                identity: None,
                identity_header: None,
                media: true,
            },
        )?;
        let mut headers = upstream_head.headers.clone();
        for name in NOT_FORWARDED {
            headers.remove(name);
        }
        Ok(headers)
    }

    /// Handles a request on a media route; `Ok(true)` when it was answered here.
    pub(super) async fn media_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        index: usize,
        canonical: &str,
    ) -> Result<bool> {
        let config = ctx.config.clone();
        let Some(route) = config.routes.get(index) else {
            return Ok(false);
        };
        let Some(media) = route.media.as_ref() else {
            return Ok(false);
        };
        let req = session.req_header();
        let server_path = endpoint::server_path(canonical, &route.path_prefix);
        let ep = endpoint::classify(&req.method, server_path, &media.blocked_paths);
        let carried = match carrier::extract(&req.headers, req.uri.query()) {
            Ok(c) => c,
            Err(e) => return refuse_carriers(session, ctx, e).await,
        };
        // A rule that refuses this request whoever sends it (a network, a path) refuses the
        // media server's own sign-in routes too; rules about users apply once the token is
        // known.
        if self
            .refuse_if_denied_to_all(session, ctx, route, canonical)
            .await?
        {
            return Ok(true);
        }

        match ep {
            Endpoint::Blocked => {
                ctx.outcome = Outcome::Rejected(RejectReason::BlockedPath);
                respond::reject(session, RejectReason::BlockedPath).await?;
                return Ok(true);
            }
            Endpoint::UsersPublic if media.hide_user_list => {
                ctx.outcome = Outcome::MediaHandled;
                respond::json(session, 200, "[]").await?;
                return Ok(true);
            }
            Endpoint::Login(login) => {
                self.perform_media_request(session, ctx, index, Some(login), carried.fields)
                    .await?;
                return Ok(true);
            }
            Endpoint::QuickConnectInitiate => {
                if !self.app.media.initiate_allowed(&ctx.client_ip) {
                    ctx.outcome = Outcome::Rejected(RejectReason::RateLimited);
                    respond::reject(session, RejectReason::RateLimited).await?;
                    return Ok(true);
                }
                self.perform_media_request(session, ctx, index, None, carried.fields)
                    .await?;
                return Ok(true);
            }
            _ => {}
        }

        let now = now_ms();
        let gateway = self.gateway_identity(session, now);
        let decision: Result<(Identity, bool), DenyReason> = match carried.token.as_deref() {
            Some(token) => match self.app.check_media_token(token, now) {
                MediaCheck::Alive(entry) => Ok((identity_of(&entry), true)),
                MediaCheck::Expired => Err(DenyReason::Expired),
                MediaCheck::Revoked(r) => Err(r.into()),
                MediaCheck::Unknown if media.adopt_unknown_tokens => {
                    match self
                        .adopt(index, token, &carried.fields, &ctx.client_ip, session)
                        .await
                    {
                        Some(identity) => Ok((identity, true)),
                        None => Err(DenyReason::UnknownMediaToken),
                    }
                }
                MediaCheck::Unknown => Err(DenyReason::UnknownMediaToken),
            },
            None => Err(DenyReason::NoCredentials),
        };
        let decision = with_gateway(decision, carried.token.is_some(), &gateway);
        if matches!(decision, Ok((_, false))) && self.cross_site_upgrade(session, ctx) {
            ctx.outcome = Outcome::Rejected(RejectReason::CrossSiteUpgrade);
            respond::reject(session, RejectReason::CrossSiteUpgrade).await?;
            return Ok(true);
        }
        let (identity, by_media_token) = match decision {
            Ok(found) => found,
            Err(reason) => {
                let credential_less = carried.token.is_none();
                match &ep {
                    // Nothing a token protects: apps with a stale token must still reach
                    // their login screen.
                    Endpoint::PreLogin => {
                        ctx.outcome = Outcome::Public;
                        return Ok(false);
                    }
                    Endpoint::UsersPublic => {
                        ctx.outcome = Outcome::Public;
                        return Ok(false);
                    }
                    Endpoint::Media { item } if credential_less => {
                        if let Some(identity) =
                            self.app
                                .media
                                .granted(index, item, &ctx.client_ip, &self.app.view, now)
                        {
                            return self
                                .let_through(session, ctx, identity, Outcome::Granted)
                                .await;
                        }
                    }
                    Endpoint::Image if credential_less => match media.images {
                        ImagePolicy::Open => {
                            ctx.outcome = Outcome::Public;
                            return Ok(false);
                        }
                        ImagePolicy::Grant => {
                            if let Some(identity) = self.app.media.seen_session(
                                index,
                                &ctx.client_ip,
                                &self.app.view,
                                now,
                            ) {
                                return self
                                    .let_through(session, ctx, identity, Outcome::Granted)
                                    .await;
                            }
                        }
                    },
                    _ => {}
                }
                ctx.outcome = Outcome::Denied(reason);
                respond::media_deny(session).await?;
                return Ok(true);
            }
        };

        // The rules first: nothing is done for an identity they refuse.
        if self.check_rules(session, ctx, &identity).await? {
            return Ok(true);
        }
        self.app.touch(identity.sid, now);
        self.app.media.seen_at(index, &ctx.client_ip, &identity);
        match ep {
            Endpoint::QuickConnectAuthorize => {
                if !self.app.media.approvals_allowed(identity.user_id) {
                    ctx.outcome = Outcome::Rejected(RejectReason::RateLimited);
                    ctx.identity = Some(identity);
                    respond::reject(session, RejectReason::RateLimited).await?;
                    return Ok(true);
                }
                ctx.media.approving_user = Some(identity.user_id);
                let code = query_value(session.req_header().uri.query(), "code");
                if let Some(code) = code {
                    let via_gateway =
                        matches!(&gateway, Some(Ok(g)) if g.user_id == identity.user_id);
                    let app = self.app.clone();
                    let who = identity.clone();
                    let approved = self
                        .control
                        .spawn(async move {
                            app.approve_quick_connect(index, &code, &who, via_gateway)
                                .await
                        })
                        .await
                        .or_err(ErrorType::InternalError, "approving a quick connect code")?;
                    if let Err(message) = approved {
                        ctx.outcome = Outcome::Denied(DenyReason::GatewaySessionRequired);
                        ctx.identity = Some(identity);
                        respond::media_refuse(session, 403, message).await?;
                        return Ok(true);
                    }
                }
            }
            Endpoint::Playback { item } => {
                ctx.media.grant_item = Some(item);
            }
            Endpoint::Logout if by_media_token => {
                ctx.media.logout_sid = Some(identity.sid);
            }
            Endpoint::Media { .. } => ctx.track = true,
            _ => {}
        }
        self.let_through(session, ctx, identity, Outcome::Allowed)
            .await
    }

    /// Forwards with this identity unless an access rule refuses it; `Ok(true)` when answered
    /// here (refused).
    pub(super) async fn let_through(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        identity: Identity,
        outcome: Outcome,
    ) -> Result<bool> {
        if self.check_rules(session, ctx, &identity).await? {
            return Ok(true);
        }
        if outcome == Outcome::Granted {
            ctx.track = true;
        }
        if session.is_upgrade_req() {
            ctx.websocket = true;
            ctx.track = true;
            self.app.metrics.websockets_open.inc();
        }
        ctx.identity = Some(identity);
        ctx.outcome = outcome;
        Ok(false)
    }

    /// The gateway session (cookie or Bearer) the request carries: `None` if it carries none.
    pub(super) fn gateway_identity(
        &self,
        session: &Session,
        now_ms: i64,
    ) -> Option<std::result::Result<Identity, DenyReason>> {
        let token =
            match auth::extract_credential(&session.req_header().headers, self.app.cookie_name) {
                Ok(found) => found?.0,
                Err(reason) => return Some(Err(reason)),
            };
        Some(
            match auth::authenticate(
                Some(token),
                &self.app.keyring(),
                &self.app.view,
                now_ms / 1000,
            ) {
                AuthDecision::Allow(identity) => Ok(identity),
                AuthDecision::Deny(reason) => Err(reason),
            },
        )
    }

    async fn adopt(
        &self,
        index: usize,
        token: &str,
        fields: &ClientFields,
        ip: &str,
        session: &Session,
    ) -> Option<Identity> {
        let app = self.app.clone();
        let token = token.to_string();
        let fields = fields.clone();
        let client = ClientInfo {
            ip: ip.to_string(),
            user_agent: user_agent(session),
        };
        self.control
            .spawn(async move { app.adopt_media_token(index, &token, &fields, &client).await })
            .await
            .ok()
            .flatten()
    }

    /// Performs a login route (`Some`) or Quick Connect's `Initiate` (`None`) on the client's
    /// behalf and relays the answer.
    async fn perform_media_request(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        index: usize,
        login: Option<LoginRoute>,
        fields: ClientFields,
    ) -> Result<()> {
        let body = match self
            .read_own_body(session, MAX_LOGIN_BODY, ctx.config.server.body_timeout)
            .await?
        {
            Ok(body) => body,
            Err(reason) => {
                ctx.outcome = Outcome::Rejected(reason);
                return respond::reject(session, reason).await;
            }
        };
        let now = now_ms();
        let gateway = self.gateway_identity(session, now).and_then(|r| r.ok());
        let head = session.req_header();
        let mut headers = self.own_request_headers(session, ctx)?;
        // Only encodings the gateway can read, so that the minted token can be found.
        let gzip_ok = headers
            .get_all(http::header::ACCEPT_ENCODING)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.to_ascii_lowercase().contains("gzip"))
            });
        headers.remove(http::header::ACCEPT_ENCODING);
        if gzip_ok {
            headers.insert(
                http::header::ACCEPT_ENCODING,
                http::HeaderValue::from_static("gzip"),
            );
        }
        let request = MediaRequest {
            method: head.method.clone(),
            path_and_query: super::return_to(head),
            headers,
            body,
            fields,
            client: ClientInfo {
                ip: ctx.client_ip.clone(),
                user_agent: user_agent(session),
            },
            gateway,
        };
        let app = self.app.clone();
        let answer = self
            .control
            .spawn(async move {
                match login {
                    Some(login) => app.media_login(index, login, request).await,
                    None => app.quick_connect_initiate(index, request).await,
                }
            })
            .await
            .or_err(ErrorType::InternalError, "performing a media request")?;
        ctx.outcome = Outcome::MediaHandled;
        respond::relay(session, answer).await
    }
}

fn user_agent(session: &Session) -> String {
    session
        .req_header()
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The credential a media request is judged by: the media token's identity (`true`: by token)
/// when it carries one, else the gateway session's (`false`). A gateway session and a media
/// token of another user in one request (or two gateway credentials) name two principals:
/// neither is picked.
pub(super) fn with_gateway(
    by_token: Result<(Identity, bool), DenyReason>,
    has_token: bool,
    gateway: &Option<Result<Identity, DenyReason>>,
) -> Result<(Identity, bool), DenyReason> {
    let decision = match (has_token, gateway) {
        (true, _) => by_token,
        (false, Some(Ok(identity))) => Ok((identity.clone(), false)),
        (false, Some(Err(reason))) => Err(*reason),
        (false, None) => Err(DenyReason::NoCredentials),
    };
    match (decision, gateway) {
        (_, Some(Err(DenyReason::AmbiguousCredentials))) => Err(DenyReason::AmbiguousCredentials),
        (Ok((identity, true)), Some(Ok(g))) if g.user_id != identity.user_id => {
            Err(DenyReason::AmbiguousCredentials)
        }
        (decision, _) => decision,
    }
}

/// The decoded value of a query key, matched case-insensitively as ASP.NET does.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    carrier::query_pairs(query?)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}
