//! The request filter of `plex` routes. In order: the self-check (a server that lets the
//! gateway in without a token, or whose settings were never read, serves nobody: 503), the
//! token (`X-Plex-Token` header or query; two different → 400), `/identity` (open), Plex Web
//! (a gateway session, else the login page), then the credential: a bound token, else a token
//! resolved now (off the request path's runtime) and bound, else a gateway session; token-less
//! transcode URLs pass only for the session their user started. Owner-only paths need the
//! linked server owner; `/security/token` is performed by the gateway so that the minted
//! transient token is bound before the client has it.

use pingora::prelude::*;
use pingora::proxy::Session;

use super::{respond, Gateway, Outcome, RequestCtx};
use crate::app::media::MediaAnswer;
use crate::app::plex::Resolution;
use crate::app::{now_ms, ClientInfo};
use crate::auth::{DenyReason, Identity};
use crate::mediaserver::carrier;
use crate::mediaserver::endpoint;
use crate::mediaserver::plex::{self, PlexEndpoint};
use crate::metrics::RejectReason;
use crate::revocation::MediaCheck;

/// How much of a transcode start's answer is read for session ids (a playlist is small).
pub const SCAN_LIMIT: usize = 256 * 1024;

impl Gateway {
    /// Handles a request on a plex route; `Ok(true)` when it was answered here.
    pub(super) async fn plex_filter(
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
        let state = self.app.plex_state(&route.name);
        if let Some(why) = state.check.load().refusal() {
            ctx.outcome = Outcome::Rejected(RejectReason::UpstreamMisconfigured);
            respond::media_refuse(session, 503, why).await?;
            return Ok(true);
        }
        // A rule that refuses this request whoever sends it refuses it here already.
        if self
            .refuse_if_denied_to_all(session, ctx, route, canonical)
            .await?
        {
            return Ok(true);
        }
        let req = session.req_header();
        let query = req.uri.query();
        let server_path = endpoint::server_path(canonical, &route.path_prefix);
        let ep = plex::classify(&req.method, server_path, query);
        let carried = match carrier::extract_plex(&req.headers, query) {
            Ok(c) => c,
            Err(e) => return super::media::refuse_carriers(session, ctx, e).await,
        };
        if ep == PlexEndpoint::Identity {
            ctx.outcome = Outcome::Public;
            return Ok(false);
        }

        let now = now_ms();
        let gateway = self.gateway_identity(session, now);
        if ep == PlexEndpoint::Web {
            // Plex Web is a browser's: a gateway session, whatever token it also sends.
            return match gateway {
                Some(Ok(identity)) if !self.cross_site_upgrade(session, ctx) => {
                    self.app.touch(identity.sid, now);
                    self.let_through(session, ctx, identity, Outcome::Allowed)
                        .await
                }
                other => {
                    let reason = match other {
                        Some(Err(r)) => r,
                        Some(Ok(_)) => DenyReason::AmbiguousCredentials,
                        None => DenyReason::NoCredentials,
                    };
                    ctx.outcome = Outcome::Denied(reason);
                    let navigation = super::is_navigation(session.req_header());
                    let return_to = super::return_to(session.req_header());
                    respond::deny(session, navigation, &return_to).await?;
                    Ok(true)
                }
            };
        }

        let decision: Result<(Identity, bool), DenyReason> = match carried.token.as_deref() {
            Some(token) => match self.app.check_media_token(token, now) {
                MediaCheck::Alive(entry) => Ok((crate::app::media::identity_of(&entry), true)),
                MediaCheck::Expired => Err(DenyReason::Expired),
                MediaCheck::Revoked(r) => Err(r.into()),
                MediaCheck::Unknown => {
                    let platform = carrier::plex_value(
                        &session.req_header().headers,
                        &query.map(carrier::query_pairs).unwrap_or_default(),
                        "x-plex-platform",
                    );
                    let app = self.app.clone();
                    let (token, fields) = (token.to_string(), carried.fields.clone());
                    let client = self.client_info(session, ctx);
                    let cookie_user = gateway.clone().and_then(|g| g.ok());
                    let resolved = self
                        .control
                        .spawn(async move {
                            app.resolve_plex_token(
                                index,
                                &token,
                                &fields,
                                &platform,
                                &client,
                                cookie_user.as_ref(),
                            )
                            .await
                        })
                        .await
                        .or_err(ErrorType::InternalError, "resolving a plex token")?;
                    match resolved {
                        Resolution::Bound(identity) => Ok((identity, true)),
                        Resolution::Refused(reason) => Err(reason),
                        Resolution::Unavailable(why) => {
                            ctx.outcome = Outcome::Rejected(RejectReason::IdentityUnavailable);
                            let message = format!("this Plex token cannot be checked now: {why}");
                            respond::media_refuse(session, 503, &message).await?;
                            return Ok(true);
                        }
                    }
                }
            },
            None => Err(DenyReason::NoCredentials),
        };
        let decision = super::media::with_gateway(decision, carried.token.is_some(), &gateway);
        if matches!(decision, Ok((_, false))) && self.cross_site_upgrade(session, ctx) {
            ctx.outcome = Outcome::Rejected(RejectReason::CrossSiteUpgrade);
            respond::reject(session, RejectReason::CrossSiteUpgrade).await?;
            return Ok(true);
        }

        // Token-less transcode URLs belong to the user who started the session.
        if let PlexEndpoint::TranscodeSession { session: id } = &ep {
            let started = self.app.media.granted(
                index,
                &plex::session_grant_key(id),
                "",
                &self.app.view,
                now,
            );
            return match (started, decision) {
                (Some(owner), Ok((identity, _))) if identity.user_id != owner.user_id => {
                    self.refuse(session, ctx, DenyReason::ForeignSession).await
                }
                (Some(owner), _) => {
                    self.let_through(session, ctx, owner, Outcome::Granted)
                        .await
                }
                (None, Err(reason)) if carried.token.is_some() => {
                    self.refuse(session, ctx, reason).await
                }
                (None, _) => self.refuse(session, ctx, DenyReason::ForeignSession).await,
            };
        }

        let identity = match decision {
            Ok((identity, _)) => identity,
            Err(reason) => return self.refuse(session, ctx, reason).await,
        };
        // The rules first: nothing is done for an identity they refuse.
        if self.check_rules(session, ctx, &identity).await? {
            return Ok(true);
        }
        self.app.touch(identity.sid, now);
        match &ep {
            PlexEndpoint::OwnerOnly | PlexEndpoint::SecurityToken => {
                let (app, name, who) = (self.app.clone(), route.name.clone(), identity.clone());
                let owner = self
                    .control
                    .spawn(async move { app.is_plex_owner(&name, &who).await })
                    .await
                    .unwrap_or(false);
                if !owner {
                    ctx.identity = Some(identity);
                    return self.refuse(session, ctx, DenyReason::OwnerOnly).await;
                }
                if ep == PlexEndpoint::SecurityToken {
                    self.mint_transient(session, ctx, index, identity, carried.fields)
                        .await?;
                    return Ok(true);
                }
            }
            PlexEndpoint::TranscodeStart { session: id } => {
                if let Some(id) = id {
                    self.plex_session_started(ctx, index, id, &identity);
                }
                ctx.media.plex_scan = true;
                // A progressive (`protocol=http`) transcode is one long response.
                ctx.track = true;
            }
            _ => ctx.track = plex::long_lived(server_path),
        }
        self.let_through(session, ctx, identity, Outcome::Allowed)
            .await
    }

    /// Refuses a request on a plex route with a JSON reason Plex apps log.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reason: DenyReason,
    ) -> Result<bool> {
        ctx.outcome = Outcome::Denied(reason);
        let status = match reason {
            DenyReason::OwnerOnly | DenyReason::ForeignSession => 403,
            _ => 401,
        };
        respond::media_refuse(session, status, reason.as_str()).await?;
        Ok(true)
    }

    fn client_info(&self, session: &Session, ctx: &RequestCtx) -> ClientInfo {
        ClientInfo {
            ip: ctx.client_ip.clone(),
            user_agent: session
                .req_header()
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        }
    }

    /// Remembers that `identity` started transcode session `id` (for every replica).
    pub(super) fn plex_session_started(
        &self,
        ctx: &RequestCtx,
        index: usize,
        id: &str,
        identity: &Identity,
    ) {
        let lifetime = ctx
            .config
            .routes
            .get(index)
            .and_then(|r| r.plex.as_ref())
            .map_or(0, |p| p.session_lifetime.as_millis() as i64);
        let key = plex::session_grant_key(id);
        let until = now_ms() + lifetime;
        if self
            .app
            .media
            .granted(index, &key, "", &self.app.view, now_ms())
            .is_some_and(|g| g.sid == identity.sid)
        {
            return;
        }
        self.app.media.grant(index, &key, "", identity, until);
        let (app, identity) = (self.app.clone(), identity.clone());
        self.control.spawn(async move {
            app.share_grant(index, &key, "", &identity, until).await;
        });
    }

    /// Performs `/security/token` for the server's owner and binds the minted transient token
    /// to them before relaying the answer.
    async fn mint_transient(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        index: usize,
        identity: Identity,
        fields: carrier::ClientFields,
    ) -> Result<()> {
        let mut headers = self.own_request_headers(session, ctx)?;
        let head = session.req_header();
        headers.remove(http::header::ACCEPT_ENCODING);
        let method = head.method.clone();
        let path = super::return_to(head);
        let upstream = ctx
            .config
            .routes
            .get(index)
            .map(|r| r.upstream)
            .or_err(ErrorType::InternalError, "no route")?;
        let client = self.client_info(session, ctx);
        let app = self.app.clone();
        let who = identity.clone();
        let answer = self
            .control
            .spawn(async move {
                let reply = match app
                    .media_client
                    .call(upstream, method, &path, headers, bytes::Bytes::new())
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return MediaAnswer::error(502, &e.to_string()),
                };
                if reply.status == 200 {
                    let token = reply.decoded().and_then(|b| plex::transient_token_in(&b));
                    if let Some(token) = token {
                        app.bind_plex_transient(index, &token, &who, &fields, &client)
                            .await;
                    }
                }
                let body = reply.decoded().unwrap_or_default();
                let mut headers = reply.headers;
                headers.remove(http::header::CONTENT_ENCODING);
                MediaAnswer {
                    status: reply.status,
                    headers,
                    body: bytes::Bytes::from(body),
                }
            })
            .await
            .or_err(ErrorType::InternalError, "minting a transient token")?;
        ctx.identity = Some(identity);
        ctx.outcome = Outcome::MediaHandled;
        respond::relay(session, answer).await
    }

    /// Looks for transcode session ids in a transcode start's answer, as it passes.
    pub(super) fn scan_plex_body(&self, ctx: &mut RequestCtx, body: &Option<bytes::Bytes>) {
        let (Some(chunk), Some(index)) = (body.as_ref(), ctx.route) else {
            return;
        };
        if ctx.media.plex_scanned >= SCAN_LIMIT {
            return;
        }
        ctx.media.plex_scanned += chunk.len();
        // Keep the end of the previous chunk, so an id split between two chunks is found.
        let mut window = std::mem::take(&mut ctx.media.plex_tail);
        window.extend_from_slice(chunk);
        let ids = plex::session_ids_in(&window);
        let keep = window.len().saturating_sub(160);
        ctx.media.plex_tail = window.split_off(keep);
        if let Some(identity) = ctx.identity.clone() {
            for id in ids {
                self.plex_session_started(ctx, index, &id, &identity);
            }
        }
    }
}
