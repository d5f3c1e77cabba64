//! Plex on the application side: resolving a token the gateway has not seen (owner-side list,
//! else plex.tv; JWTs verified offline), binding it to the gateway user its Plex account is
//! linked to, links and device approvals, transient tokens, the periodic refresh of plex.tv's
//! data, the server settings self-check, and "also sign out at plex.tv".

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};

use super::media::Binding;
use super::{now_ms, App, ClientInfo};
use crate::auth::{DenyReason, Identity};
use crate::config::{Config, PlexConfig, Route};
use crate::mediaserver::carrier::ClientFields;
use crate::mediaserver::plex::tv::{PlexTv, TvError};
use crate::mediaserver::plex::{
    self, is_jwt, parse_prefs, self_check, verify_jwt, AccountInfo, CheckState, PlexRoute, Report,
    TRANSIENT_TOKEN_LIFETIME,
};
use crate::mediaserver::upstream::MediaClient;
use crate::metrics::Family;
use crate::store::{plex_media_user_id, DynStore, MediaNote, PlexAccount, PlexDevice, StoreError};

/// While the self-check has not succeeded, it is tried this often.
const CHECK_RETRY: Duration = Duration::from_secs(2);
/// Once it has, it is repeated this often (a changed setting is noticed within this).
const CHECK_EVERY: Duration = Duration::from_secs(30);

/// How resolving a token ended.
#[derive(Debug)]
pub enum Resolution {
    Bound(Identity),
    Refused(DenyReason),
    /// Nobody can say now (plex.tv unreachable for a token never seen): 503, not a pass.
    Unavailable(String),
}

/// Errors of the Plex operations an admin or user asks for.
#[derive(Debug, thiserror::Error)]
pub enum PlexError {
    #[error("no Plex account `{0}` has been seen (it appears once plex.tv lists it for the server or one of its tokens is used)")]
    UnknownAccount(String),
    #[error("no gateway user `{0}`")]
    UnknownUser(String),
    #[error("{0}")]
    Refused(String),
    #[error("no plex route is configured")]
    NoRoute,
    #[error("plex.tv: {0}")]
    PlexTv(#[from] TvError),
    #[error("the account store is unavailable")]
    Unavailable(#[from] StoreError),
}

/// The address the server sees the gateway's requests come from: the local address the
/// kernel picks to reach it.
fn source_address(upstream: std::net::SocketAddr) -> Option<IpAddr> {
    let bind = if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(upstream).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

fn plex_route(config: &Config, index: usize) -> Option<&Route> {
    config.routes.get(index).filter(|r| r.plex.is_some())
}

impl App {
    fn count_resolution(&self, source: &str, result: &str) {
        self.metrics
            .counter(Family::MediaResolutions, &["plex", source, result])
            .inc();
    }

    fn count_link(&self, action: &str) {
        self.metrics
            .counter(Family::MediaLinks, &["plex", action])
            .inc();
    }

    /// Resolves a Plex token the view does not know, and binds it when its account is linked
    /// to a live gateway user (and, with device approval, its device is approved).
    pub async fn resolve_plex_token(
        self: &Arc<Self>,
        route_index: usize,
        token: &str,
        fields: &ClientFields,
        platform: &str,
        client: &ClientInfo,
        gateway: Option<&Identity>,
    ) -> Resolution {
        let config = self.config();
        let Some(route) = plex_route(&config, route_index) else {
            return Resolution::Refused(DenyReason::UnknownMediaToken);
        };
        let Some(pc) = route.plex.as_ref() else {
            return Resolution::Refused(DenyReason::UnknownMediaToken);
        };
        let state = self.plex.route(&route.name);
        let hash = self.secrets.media_token_hash(token);
        if let Some(reason) = self.plex.refused(&hash) {
            return Resolution::Refused(reason);
        }
        let refuse = |source: &str, result: &str, reason: DenyReason| {
            self.count_resolution(source, result);
            self.plex.remember_refusal(hash, reason);
            Resolution::Refused(reason)
        };

        // A JWT is checked offline against plex.tv's keys before anything else.
        let mut not_after_ms = None;
        let mut thumbprint = None;
        if is_jwt(token) {
            if state.keys.load().is_none() {
                self.refresh_plex_keys(&route.name, &pc.plex_tv).await;
            }
            let keys = state.keys.load_full();
            let Some(keys) = keys.as_ref() else {
                self.count_resolution("jwt", "unavailable");
                return Resolution::Unavailable(
                    "plex.tv's token keys could not be fetched".to_string(),
                );
            };
            match verify_jwt(token, keys, now_ms() / 1000) {
                Ok(jwt) => {
                    not_after_ms = Some(jwt.exp.saturating_mul(1000));
                    thumbprint = jwt.thumbprint;
                }
                Err(DenyReason::Expired) => return refuse("jwt", "expired", DenyReason::Expired),
                Err(reason) => return refuse("jwt", "forged", reason),
            }
        }

        // Which Plex account: the owner-side list, else plex.tv.
        let listed = state.access.load().get(&hash).cloned();
        let (source, account) = match (listed, self.plex.account_of(&hash)) {
            (Some(a), _) => ("access_list", a),
            (None, Some(a)) => ("plex_tv", a),
            // Only here is a request answered by a call out: random tokens must not turn the
            // gateway into a plex.tv amplifier.
            (None, None) if !self.media.adoption_allowed(&client.ip) => {
                self.count_resolution("none", "rate_limited");
                return Resolution::Refused(DenyReason::UnknownMediaToken);
            }
            (None, None) => match self.plex_tv_user(&pc.plex_tv, token).await {
                Ok(a) => {
                    state.plex_tv_error.store(Arc::new(None));
                    self.plex.remember_account(hash, a.clone());
                    ("plex_tv", a)
                }
                Err(TvError::Refused(_)) => {
                    // Perhaps a share made since the list was fetched: fetch it again (not
                    // more than twice a minute) before refusing.
                    if state.claim_refresh(plex::LIST_REFETCH_MIN) {
                        self.refresh_plex(route).await;
                    }
                    match state.access.load().get(&hash).cloned() {
                        Some(a) => ("access_list", a),
                        None => return refuse("plex_tv", "unknown", DenyReason::UnknownMediaToken),
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    state.plex_tv_error.store(Arc::new(Some(message.clone())));
                    self.count_resolution("plex_tv", "unavailable");
                    return Resolution::Unavailable(message);
                }
            },
        };
        let now = now_ms();
        let stored = match self
            .store
            .note_plex_account(&account.id, &account.username, &account.title, now)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                self.store_error("plex", e);
                self.count_resolution(source, "unavailable");
                return Resolution::Unavailable("the account store is unavailable".to_string());
            }
        };
        let Some(user_id) = stored.user_id else {
            if let Some(g) = gateway {
                if stored.offered_user_id != Some(g.user_id) {
                    if let Err(e) = self
                        .store
                        .offer_plex_link(&account.id, g.user_id, now)
                        .await
                    {
                        self.store_error("plex", e);
                    }
                    let mut e = self.audit_entry(
                        "plex_link_offered",
                        "pending",
                        Some((g.user_id, &g.name)),
                        client,
                    );
                    e.detail = format!("plex account {} ({})", account.username, account.id);
                    self.audit(e).await;
                }
            }
            return refuse(source, "unlinked", DenyReason::UnlinkedAccount);
        };
        let owner = match self.store.find_user_by_id(user_id).await {
            Ok(Some(u)) if !u.disabled => u,
            Ok(_) => return refuse(source, "disabled", DenyReason::UserDisabled),
            Err(e) => {
                self.store_error("find_user", e);
                return Resolution::Unavailable("the account store is unavailable".to_string());
            }
        };
        if gateway.is_some_and(|g| g.user_id != owner.id) {
            self.count_resolution(source, "ambiguous");
            return Resolution::Refused(DenyReason::AmbiguousCredentials);
        }
        let device_id = if fields.device_id.is_empty() {
            thumbprint.unwrap_or_default()
        } else {
            fields.device_id.clone()
        };
        if !device_id.is_empty() {
            let device = PlexDevice {
                account_id: account.id.clone(),
                client_id: device_id.clone(),
                product: crate::app::truncate(&fields.client, 64),
                device_name: crate::app::truncate(&fields.device, 64),
                platform: crate::app::truncate(platform, 64),
                ip: client.ip.clone(),
                first_seen_ms: now,
                last_seen_ms: now,
                approved_ms: None,
            };
            let seen = match self.store.note_plex_device(&device).await {
                Ok(d) => d,
                Err(e) => {
                    self.store_error("plex", e);
                    return Resolution::Unavailable("the account store is unavailable".to_string());
                }
            };
            if pc.device_approval && seen.approved_ms.is_none() {
                if seen.first_seen_ms == seen.last_seen_ms {
                    let mut e = self.audit_entry(
                        "plex_device_pending",
                        "pending",
                        Some((owner.id, &owner.name)),
                        client,
                    );
                    e.detail = format!(
                        "{} on {} ({})",
                        device.product, device.device_name, device.platform
                    );
                    self.audit(e).await;
                }
                return refuse(source, "device_pending", DenyReason::DeviceNotApproved);
            }
        } else if pc.device_approval {
            return refuse(source, "device_pending", DenyReason::DeviceNotApproved);
        }
        let bound = self
            .bind_token(
                &route.name,
                &owner,
                Binding {
                    token,
                    media_user_id: plex_media_user_id(&account.id),
                    media_user: account.username.clone(),
                    device_id,
                    lifetime: pc.token_lifetime,
                    not_after_ms,
                    seal: false,
                },
                fields,
                client,
            )
            .await;
        match bound {
            Ok(identity) => {
                self.count_resolution(source, "bound");
                self.metrics
                    .counter(Family::MediaTokensBound, &["plex"])
                    .inc();
                let mut e = self.audit_entry(
                    "plex_token_bound",
                    "success",
                    Some((owner.id, &owner.name)),
                    client,
                );
                e.session_id = identity.sid.to_string();
                e.detail = format!(
                    "route {}, plex account {} ({}), {} via {source}",
                    route.name, account.username, account.id, fields.client
                );
                self.audit(e).await;
                Resolution::Bound(identity)
            }
            Err(()) => {
                self.count_resolution(source, "unavailable");
                Resolution::Unavailable("the token could not be bound".to_string())
            }
        }
    }

    async fn plex_tv_user(&self, base: &str, token: &str) -> Result<AccountInfo, TvError> {
        match &self.plex_tv {
            Some(tv) => tv.user(base, token).await,
            None => Err(TvError::Unavailable("no HTTPS client".to_string())),
        }
    }

    async fn refresh_plex_keys(&self, route_name: &str, base: &str) {
        let Some(tv) = &self.plex_tv else { return };
        let state = self.plex.route(route_name);
        match tv.keys(base).await {
            Ok(keys) => state.keys.store(Arc::new(Some(keys))),
            Err(e) => {
                tracing::warn!(route = route_name, error = %e, "plex.tv's token keys could not be fetched");
                state.plex_tv_error.store(Arc::new(Some(e.to_string())));
            }
        }
    }

    /// Binds a transient token the server minted for `identity` (`/security/token`): it lives
    /// as long as the server keeps it, and ends with that user's access.
    pub async fn bind_plex_transient(
        self: &Arc<Self>,
        route_index: usize,
        token: &str,
        identity: &Identity,
        fields: &ClientFields,
        client: &ClientInfo,
    ) {
        let config = self.config();
        let Some(route) = plex_route(&config, route_index) else {
            return;
        };
        let owner = match self.store.find_user_by_id(identity.user_id).await {
            Ok(Some(u)) => u,
            _ => return,
        };
        let account = self.plex.route(&route.name).owner.load_full();
        let account_id = account.as_ref().as_ref().map_or("owner", |a| a.id.as_str());
        let hash = hex::encode(self.secrets.media_token_hash(token));
        let bound = self
            .bind_token(
                &route.name,
                &owner,
                Binding {
                    token,
                    media_user_id: plex_media_user_id(account_id),
                    media_user: "transient".to_string(),
                    device_id: format!("transient-{}", &hash[..16]),
                    lifetime: TRANSIENT_TOKEN_LIFETIME,
                    not_after_ms: None,
                    seal: false,
                },
                fields,
                client,
            )
            .await;
        if bound.is_ok() {
            self.count_resolution("transient", "bound");
            let mut e = self.audit_entry(
                "plex_transient_token",
                "success",
                Some((owner.id, &owner.name)),
                client,
            );
            e.session_id = identity.sid.to_string();
            e.detail = format!("route {}", route.name);
            self.audit(e).await;
        }
    }

    /// Whether an identity is the server owner's gateway user (the user the owner's Plex
    /// account is linked to).
    pub async fn is_plex_owner(&self, route_name: &str, identity: &Identity) -> bool {
        let owner = self.plex.route(route_name).owner.load_full();
        let Some(owner) = owner.as_ref() else {
            return false;
        };
        matches!(
            self.store.find_plex_account(&owner.id).await,
            Ok(Some(PlexAccount { user_id: Some(u), .. })) if u == identity.user_id
        )
    }

    /// Fetches the owner-side token list, the owner's account and plex.tv's keys for a route.
    pub async fn refresh_plex(&self, route: &Route) {
        let (Some(pc), Some(tv)) = (route.plex.as_ref(), &self.plex_tv) else {
            return;
        };
        let state = self.plex.route(&route.name);
        let token = pc.server_token.expose();
        let mut error = None;
        match tv.user(&pc.plex_tv, token).await {
            Ok(owner) => {
                if let Err(e) = self
                    .store
                    .note_plex_account(&owner.id, &owner.username, &owner.title, now_ms())
                    .await
                {
                    self.store_error("plex", e);
                }
                state.owner.store(Arc::new(Some(owner)));
            }
            Err(e) => error = Some(format!("the server token: {e}")),
        }
        match tv.access_tokens(&pc.plex_tv, token).await {
            Ok(list) => {
                let now = now_ms();
                let mut map = std::collections::HashMap::new();
                for entry in list {
                    map.insert(
                        self.secrets.media_token_hash(&entry.token),
                        entry.account.clone(),
                    );
                    let a = &entry.account;
                    if let Err(e) = self
                        .store
                        .note_plex_account(&a.id, &a.username, &a.title, now)
                        .await
                    {
                        self.store_error("plex", e);
                    }
                }
                state.access.store(Arc::new(map));
            }
            Err(e) => error = Some(format!("the server's token list: {e}")),
        }
        self.refresh_plex_keys(&route.name, &pc.plex_tv).await;
        if let Some(e) = &error {
            tracing::warn!(route = %route.name, error = %e, "plex.tv could not be read");
        }
        if error.is_some() || state.keys.load().is_none() {
            state.plex_tv_error.store(Arc::new(
                error.or(Some("plex.tv's token keys are unknown".to_string())),
            ));
        } else {
            state.plex_tv_error.store(Arc::new(None));
        }
    }

    /// Runs the self-check of a route and records the outcome; returns the state.
    pub async fn check_plex_route(&self, route: &Route) -> CheckState {
        let state = self.plex.route(&route.name);
        let public_url = self.config().server.public_url.clone();
        let next = match self_check_route(&self.media_client, route, &public_url).await {
            Ok(report) => CheckState::Done(report),
            Err(e) => match state.check.load().as_ref() {
                // A server that answered once and fails now keeps its last verdict; the
                // proxy's own errors say the server is down.
                CheckState::Done(r) => CheckState::Done(r.clone()),
                CheckState::Pending(_) => {
                    CheckState::Pending(format!("the Plex server's settings cannot be read: {e}"))
                }
            },
        };
        let previous = state.check.swap(Arc::new(next.clone()));
        if *previous != next {
            match &next {
                CheckState::Done(r) => {
                    if let Some(f) = &r.fatal {
                        tracing::error!(route = %route.name, problem = %f, "the Plex server is misconfigured: the route refuses every request");
                    }
                    for w in &r.warnings {
                        tracing::warn!(route = %route.name, warning = %w, "the Plex server can be reached around the gateway");
                    }
                    if r.fatal.is_none() {
                        tracing::info!(route = %route.name, warnings = r.warnings.len(), "Plex server settings checked");
                    }
                }
                CheckState::Pending(why) => {
                    tracing::warn!(route = %route.name, problem = %why, "Plex self-check pending")
                }
            }
        }
        next
    }

    /// The Plex loop: plex.tv refreshed every `refresh`, the server's settings checked every
    /// 30 s (every 2 s until the first check succeeds), for every plex route.
    pub async fn run_plex_loop(self: Arc<Self>) {
        loop {
            let config = self.config();
            let mut pending = false;
            for route in config
                .routes
                .iter()
                .filter(|r| r.plex.is_some() && !r.retired)
            {
                let Some(pc) = route.plex.as_ref() else {
                    continue;
                };
                if self.plex.route(&route.name).claim_refresh(pc.refresh) {
                    self.refresh_plex(route).await;
                }
                if matches!(self.check_plex_route(route).await, CheckState::Pending(_)) {
                    pending = true;
                }
            }
            tokio::time::sleep(if pending { CHECK_RETRY } else { CHECK_EVERY }).await;
        }
    }

    /// Every plex route's self-check, run once now (start-up and `portcullis plex check`).
    pub async fn check_plex_routes(&self) -> Vec<(String, CheckState)> {
        let config = self.config();
        let mut out = Vec::new();
        for route in config
            .routes
            .iter()
            .filter(|r| r.plex.is_some() && !r.retired)
        {
            out.push((route.name.clone(), self.check_plex_route(route).await));
        }
        out
    }

    /// The state of a plex route (for `/readyz` and the admin page).
    pub fn plex_state(&self, route_name: &str) -> Arc<PlexRoute> {
        self.plex.route(route_name)
    }

    /// Links a Plex account (id or user name) to a gateway user.
    pub async fn plex_link(
        &self,
        account_key: &str,
        user_name: &str,
        by: &str,
        client: &ClientInfo,
    ) -> Result<PlexAccount, PlexError> {
        let account = known_account(&self.store, account_key).await?;
        let user = self
            .store
            .find_user(user_name)
            .await?
            .ok_or_else(|| PlexError::UnknownUser(user_name.to_string()))?;
        match self
            .store
            .link_plex_account(&account.account_id, user.id, now_ms())
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict(m)) => return Err(PlexError::Refused(m)),
            Err(e) => return Err(e.into()),
        }
        // Every replica forgets the refusals it remembers for this account's tokens, as an
        // unlink is announced to them all.
        self.plex_changed(&account.account_id).await;
        self.count_link(if by == "admin" {
            "admin_link"
        } else {
            "user_link"
        });
        let mut e = self.audit_entry(
            "plex_linked",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = format!(
            "plex account {} ({}) by {by}",
            account.username, account.account_id
        );
        self.audit(e).await;
        Ok(account)
    }

    /// Unlinks a Plex account: every token of it bound at the gateway ends at once.
    pub async fn plex_unlink(
        &self,
        account_key: &str,
        by: &str,
        client: &ClientInfo,
    ) -> Result<bool, PlexError> {
        let account = known_account(&self.store, account_key).await?;
        let Some(events) = self
            .store
            .unlink_plex_account(&account.account_id, now_ms())
            .await?
        else {
            return Ok(false);
        };
        self.apply(&events);
        self.count_link("unlink");
        let user = account.user_id.zip(account.user_name.as_deref());
        let mut e = self.audit_entry("plex_unlinked", "success", user, client);
        e.detail = format!(
            "plex account {} ({}) by {by}; {} token(s) ended",
            account.username,
            account.account_id,
            events.len()
        );
        self.audit(e).await;
        Ok(true)
    }

    /// "Also sign out at plex.tv", on an admin's request ([`revoke_upstream`]): audited with
    /// the account's linked user and what was done (also when plex.tv failed part-way, or
    /// nothing was to be done), counted when something was done.
    pub async fn plex_revoke_upstream(
        &self,
        account_key: &str,
        by: &str,
        client: &ClientInfo,
    ) -> Result<UpstreamRevocation, PlexError> {
        let config = self.config();
        let revocation = revoke_upstream(&config, &self.store, account_key).await?;
        if !revocation.done.is_empty() {
            self.count_link("revoke_upstream");
        }
        let account = &revocation.account;
        let user = account.user_id.zip(account.user_name.as_deref());
        let mut e = self.audit_entry("plex_revoked_upstream", revocation.outcome(), user, client);
        e.detail = revocation.detail(by);
        self.audit(e).await;
        Ok(revocation)
    }

    /// Approves a device of one of the user's Plex accounts.
    pub async fn plex_approve(
        &self,
        user_id: i64,
        account_id: &str,
        client_id: &str,
        client: &ClientInfo,
    ) -> Result<(), PlexError> {
        self.own_plex_account(user_id, account_id).await?;
        if !self
            .store
            .approve_plex_device(account_id, client_id, user_id, now_ms())
            .await?
        {
            return Err(PlexError::Refused("no such device".to_string()));
        }
        self.plex_changed(account_id).await;
        self.count_link("approve");
        self.audit_device(
            "plex_device_approved",
            user_id,
            account_id,
            client_id,
            client,
        )
        .await
    }

    /// Revokes a device: its approval is withdrawn and its tokens end at once.
    pub async fn plex_revoke_device(
        &self,
        user_id: i64,
        account_id: &str,
        client_id: &str,
        client: &ClientInfo,
    ) -> Result<(), PlexError> {
        self.own_plex_account(user_id, account_id).await?;
        let events = self
            .store
            .revoke_plex_device(account_id, client_id, now_ms())
            .await?
            .ok_or_else(|| PlexError::Refused("no such device".to_string()))?;
        self.apply(&events);
        self.count_link("revoke_device");
        self.audit_device(
            "plex_device_revoked",
            user_id,
            account_id,
            client_id,
            client,
        )
        .await
    }

    /// Audits a change to one of a user's Plex devices.
    async fn audit_device(
        &self,
        event: &str,
        user_id: i64,
        account_id: &str,
        client_id: &str,
        client: &ClientInfo,
    ) -> Result<(), PlexError> {
        let user = self.store.find_user_by_id(user_id).await?;
        let name = user.as_ref().map_or("", |u| u.name.as_str());
        let mut e = self.audit_entry(event, "success", Some((user_id, name)), client);
        e.detail = format!("plex account {account_id}, device {client_id}");
        self.audit(e).await;
        Ok(())
    }

    /// Tells every replica (and this one) that a Plex account was linked or a device approved.
    async fn plex_changed(&self, account_id: &str) {
        self.plex.forget_refusals();
        self.share_note(
            MediaNote::PlexChanged {
                account_id: account_id.to_string(),
            },
            now_ms() + plex::CHANGE_NOTE_TTL.as_millis() as i64,
        )
        .await;
    }

    async fn own_plex_account(&self, user_id: i64, account_id: &str) -> Result<(), PlexError> {
        match self.store.find_plex_account(account_id).await? {
            Some(a) if a.user_id == Some(user_id) => Ok(()),
            _ => Err(PlexError::UnknownAccount(account_id.to_string())),
        }
    }
}

/// Reads a plex route's server settings with the server token and judges them.
pub async fn self_check_route(
    client: &MediaClient,
    route: &Route,
    public_url: &str,
) -> Result<Report, String> {
    let pc = route.plex.as_ref().ok_or("not a plex route")?;
    let mut headers = HeaderMap::new();
    let token = HeaderValue::from_str(pc.server_token.expose())
        .map_err(|_| "the server token cannot be sent".to_string())?;
    headers.insert("x-plex-token", token);
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    let reply = client
        .call(
            route.upstream,
            Method::GET,
            "/:/prefs",
            headers,
            Bytes::new(),
        )
        .await
        .map_err(|e| format!("GET /:/prefs: {e}"))?;
    if reply.status != 200 {
        return Err(format!(
            "GET /:/prefs answered {} (is server_token_file the server's own token?)",
            reply.status
        ));
    }
    let body = reply
        .decoded()
        .ok_or("GET /:/prefs: unreadable answer".to_string())?;
    let prefs = parse_prefs(&body).ok_or("GET /:/prefs: unreadable settings".to_string())?;
    let source = source_address(route.upstream)
        .ok_or("the gateway's own address towards the server is unknown".to_string())?;
    Ok(self_check(&prefs, source, public_url))
}

/// The Plex account with this id or user name, which the gateway must have met.
async fn known_account(store: &DynStore, account_key: &str) -> Result<PlexAccount, PlexError> {
    store
        .find_plex_account(account_key)
        .await?
        .ok_or_else(|| PlexError::UnknownAccount(account_key.to_string()))
}

/// What "also sign out at plex.tv" did for one account ([`revoke_upstream`]).
#[derive(Debug)]
pub struct UpstreamRevocation {
    /// The account, as the gateway knows it (with its linked user, if any).
    pub account: PlexAccount,
    /// What was done at plex.tv, one line each.
    pub done: Vec<String>,
    /// The error that stopped it, after what is in `done`: nothing more was tried.
    pub failed: Option<PlexError>,
}

impl UpstreamRevocation {
    /// The audit outcome: `success`, `nothing_to_do`, `partial` (something done, then plex.tv
    /// failed) or `failure`.
    pub fn outcome(&self) -> &'static str {
        match (self.done.is_empty(), self.failed.is_some()) {
            (false, false) => "success",
            (true, false) => "nothing_to_do",
            (false, true) => "partial",
            (true, true) => "failure",
        }
    }

    /// The audit detail: the account, who asked, what was done and what failed.
    pub fn detail(&self, by: &str) -> String {
        let mut detail = format!(
            "plex account {} ({}) by {by}: ",
            self.account.username, self.account.account_id
        );
        if self.done.is_empty() && self.failed.is_none() {
            detail.push_str(NOTHING_UPSTREAM);
        }
        detail.push_str(&self.done.join("; "));
        if let Some(e) = &self.failed {
            if !self.done.is_empty() {
                detail.push_str("; then ");
            }
            detail.push_str(&format!("failed: {e}"));
        }
        detail
    }
}

/// What "also sign out at plex.tv" says when it had nothing to do.
pub const NOTHING_UPSTREAM: &str =
    "nothing to do at plex.tv (the gateway has seen no device of the owner's but the server's own)";

/// "Also sign out at plex.tv", on an admin's request: the owner's own devices that the gateway
/// has seen for this account are removed at plex.tv — never the device whose token is the
/// route's `server_token`, the gateway's own access; a friend's or Home user's access to the
/// server is withdrawn (un-shared). Never the enforcement: the gateway refuses those tokens
/// already. No plex route or an unknown account is an `Err`; once the account is known, an
/// error (plex.tv's, the store's) is kept in [`UpstreamRevocation::failed`] with what was done
/// before it.
pub async fn revoke_upstream(
    config: &Config,
    store: &DynStore,
    account_key: &str,
) -> Result<UpstreamRevocation, PlexError> {
    let route = config
        .routes
        .iter()
        .find(|r| r.plex.is_some() && !r.retired)
        .ok_or(PlexError::NoRoute)?;
    let pc = route.plex.as_ref().ok_or(PlexError::NoRoute)?;
    let tv = PlexTv::new()?;
    let account = known_account(store, account_key).await?;
    let mut done = Vec::new();
    let failed = sign_out_upstream(&tv, pc, store, &account, &mut done)
        .await
        .err();
    Ok(UpstreamRevocation {
        account,
        done,
        failed,
    })
}

/// The calls to plex.tv of [`revoke_upstream`]; each change made is pushed to `done` as it
/// is made, so an error leaves there what was done before it.
async fn sign_out_upstream(
    tv: &PlexTv,
    pc: &PlexConfig,
    store: &DynStore,
    account: &PlexAccount,
    done: &mut Vec<String>,
) -> Result<(), PlexError> {
    let token = pc.server_token.expose();
    let owner = tv.user(&pc.plex_tv, token).await?;
    if owner.id != account.account_id {
        tv.unshare(&pc.plex_tv, token, &account.account_id).await?;
        done.push(format!(
            "stopped sharing the server with {} ({}) at plex.tv",
            account.username, account.account_id
        ));
        return Ok(());
    }
    let seen: Vec<String> = store
        .list_plex_devices(None)
        .await?
        .into_iter()
        .filter(|d| d.account_id == account.account_id)
        .map(|d| d.client_id)
        .collect();
    for device in tv.devices(&pc.plex_tv, token).await? {
        // The server token's own device: removing it would end the gateway's access.
        if seen.contains(&device.client_id) && !device.holds(token) {
            tv.delete_device(&pc.plex_tv, token, &device.id).await?;
            done.push(format!(
                "removed the owner's device {} ({}, {}) at plex.tv",
                device.name, device.product, device.client_id
            ));
        }
    }
    Ok(())
}

/// Fetches every plex route's owner-side list (and the owner) from plex.tv and records the
/// accounts in it, for the CLI: an account shared a moment ago can be linked at once.
pub async fn note_listed_accounts(config: &Config, store: &DynStore) -> Result<usize, PlexError> {
    let tv = PlexTv::new()?;
    let mut noted = 0;
    for route in config
        .routes
        .iter()
        .filter(|r| r.plex.is_some() && !r.retired)
    {
        let Some(pc) = route.plex.as_ref() else {
            continue;
        };
        let token = pc.server_token.expose();
        let mut accounts = vec![tv.user(&pc.plex_tv, token).await?];
        accounts.extend(
            tv.access_tokens(&pc.plex_tv, token)
                .await?
                .into_iter()
                .map(|e| e.account),
        );
        for a in accounts {
            store
                .note_plex_account(&a.id, &a.username, &a.title, now_ms())
                .await?;
            noted += 1;
        }
    }
    Ok(noted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(done: &[&str], failed: Option<PlexError>) -> UpstreamRevocation {
        UpstreamRevocation {
            account: PlexAccount {
                account_id: "41".into(),
                username: "ownerplex".into(),
                title: "ownerplex".into(),
                user_id: Some(1),
                user_name: Some("alice".into()),
                linked_ms: Some(1),
                offered_user_id: None,
                first_seen_ms: 1,
                last_seen_ms: 1,
            },
            done: done.iter().map(|d| d.to_string()).collect(),
            failed,
        }
    }

    #[test]
    fn a_sign_out_at_plex_tv_is_audited_with_what_was_done_before_it_failed() {
        let down = || {
            Some(PlexError::PlexTv(TvError::Unavailable(
                "it answered 503".into(),
            )))
        };
        let all = revocation(&["removed the phone"], None);
        assert_eq!(all.outcome(), "success");
        assert_eq!(
            all.detail("admin"),
            "plex account ownerplex (41) by admin: removed the phone"
        );
        let none = revocation(&[], None);
        assert_eq!(none.outcome(), "nothing_to_do");
        assert!(none.detail("cli").ends_with(NOTHING_UPSTREAM));
        let partial = revocation(&["removed the phone", "removed the tv"], down());
        assert_eq!(partial.outcome(), "partial");
        assert_eq!(
            partial.detail("admin"),
            "plex account ownerplex (41) by admin: removed the phone; removed the tv; then \
             failed: plex.tv: plex.tv is not reachable: it answered 503"
        );
        let failed = revocation(&[], down());
        assert_eq!(failed.outcome(), "failure");
        assert_eq!(
            failed.detail("admin"),
            "plex account ownerplex (41) by admin: failed: plex.tv: plex.tv is not reachable: \
             it answered 503"
        );
    }
}
