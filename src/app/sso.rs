//! Single sign-on in the login pipeline: starting a provider sign-in (PKCE, `state`, `nonce`
//! bound to the browser by a short-lived signed cookie), the callback (code exchange, ID-token
//! checks, subject → user by link, auto-link or auto-create, the gateway's own second factor
//! unless the provider's `amr`/`acr` is trusted), admin by claim once the session is created,
//! linking (after the user re-enters their password) and unlinking, carrying the provider
//! session to a session that replaces it, the provider's end-session redirect, and back-channel
//! logout. A changed email or user name at the provider never moves a link: links are by
//! issuer and subject, and auto-link only reaches a non-admin user with no link to that
//! provider yet, whose name is exactly the provider's value.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use super::account::{AccountError, Reauth};
use super::{
    now_ms, truncate, App, Channel, ClientInfo, LoginError, LoginOk, LoginStep, PendingStage,
    PENDING_TTL_SECS,
};
use crate::auth::token::{SsoPending, TimedClaims};
use crate::auth::Identity;
use crate::config::{AutoLink, Secret};
use crate::oidc::{
    check_logout_claims, random_token, ExchangeError, IdClaims, LogoutClaims, OidcError, Provider,
    TokenRefusal, LEEWAY_SECS, LOGOUT_TOKEN_MAX_AGE_SECS,
};
use crate::store::{BackchannelLogout, OidcSession, SessionId, SessionKind, StoreError, User};

/// `typ` of the flow cookie's token.
pub const FLOW_TYP: &str = "portcullis-oidc-flow+jwt";
/// A provider sign-in must come back within this many seconds.
pub const FLOW_TTL_SECS: i64 = 600;
/// A provider session ended by a back-channel logout is remembered this long, in milliseconds:
/// as long as a login through it can still be waiting at gateway steps (the TOTP or enrolment
/// step, then a new password: two pending logins), plus a minute.
pub const ENDED_SID_TTL_MS: i64 = (2 * PENDING_TTL_SECS + 60) * 1000;

/// What the flow cookie carries: one sign-in attempt, bound to this browser.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowClaims {
    pub iss: String,
    pub aud: String,
    /// Always `sso-flow` (every gateway token names a subject).
    pub sub: String,
    pub provider: String,
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    /// Where to go afterwards (already a safe same-origin path).
    pub rd: String,
    /// Set when a signed-in user links the provider to their account: their session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_sid: Option<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

impl TimedClaims for FlowClaims {
    fn times(&self) -> (i64, i64, i64) {
        (self.iat, self.nbf, self.exp)
    }
}

/// A single sign-on login on its way to a session.
#[derive(Clone, Debug)]
pub struct SsoLogin {
    pub pending: SsoPending,
    /// The ID token, kept sealed with the session for the provider's logout. Not carried
    /// through a pending step (the cookie would grow too large); that logout then goes
    /// without `id_token_hint`.
    pub id_token: Option<Secret>,
    /// The provider's admin claim was present: admin is granted when the session is created,
    /// after the disabled check and every gateway step. Across a pending step it waits in
    /// this instance's memory (keyed by the pending login), so a step finished on another
    /// replica does not grant it.
    pub grant_admin: bool,
}

impl SsoLogin {
    /// A login resumed from a pending step.
    pub fn resumed(pending: SsoPending, grant_admin: bool) -> SsoLogin {
        SsoLogin {
            pending,
            id_token: None,
            grant_admin,
        }
    }
}

/// How a provider subject found its user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    /// By a link made before this login.
    Linked,
    /// By auto-link, at this login.
    AutoLinked,
    /// A user created at this login.
    Created,
}

/// Why a single sign-on step did not go ahead. Every variant has a stable label.
#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    #[error("there is no such sign-in provider")]
    UnknownProvider,
    #[error("the sign-in provider cannot be reached yet; try again in a moment")]
    NotReady(#[source] OidcError),
    #[error("this sign-in has expired or was started in another browser; please start again")]
    FlowExpired,
    #[error("this sign-in does not match the one started in this browser; please start again")]
    StateMismatch,
    #[error("the provider did not sign you in ({0})")]
    ProviderDenied(String),
    #[error("the provider could not complete the sign-in")]
    Provider(#[source] OidcError),
    #[error("the provider's identity token was refused: {0}")]
    IdToken(TokenRefusal),
    #[error("this account at the provider is not linked to a Portcullis account: sign in with your password and link it on your account page, or ask an administrator")]
    NotLinked,
    #[error("this account at the provider cannot be linked: {0}")]
    LinkConflict(&'static str),
    #[error("this account at the provider matches a Portcullis administrator, who is never linked automatically: sign in with your password and link the provider on your account page, or ask an administrator to link it")]
    AdminNotAutoLinked,
    #[error("sign in first, then link the provider from your account page")]
    NotSignedIn,
    #[error(transparent)]
    Login(#[from] LoginError),
}

impl SsoError {
    pub fn label(&self) -> &'static str {
        match self {
            SsoError::UnknownProvider => "unknown_provider",
            SsoError::NotReady(_) => "not_discovered",
            SsoError::FlowExpired => "flow_expired",
            SsoError::StateMismatch => "state_mismatch",
            SsoError::ProviderDenied(_) => "provider_denied",
            SsoError::Provider(_) => "provider_error",
            SsoError::IdToken(r) => r.as_str(),
            SsoError::NotLinked => "not_linked",
            SsoError::LinkConflict(_) => "link_conflict",
            SsoError::AdminNotAutoLinked => "admin_not_auto_linked",
            SsoError::NotSignedIn => "not_signed_in",
            SsoError::Login(e) => e.label(),
        }
    }
}

impl From<StoreError> for SsoError {
    fn from(e: StoreError) -> Self {
        SsoError::Login(LoginError::Unavailable(e))
    }
}

/// Why a back-channel logout was refused (400), or could not be applied (503).
#[derive(Debug, thiserror::Error)]
pub enum BackchannelError {
    #[error("there is no such provider")]
    UnknownProvider,
    #[error("the provider has not been discovered yet")]
    NotReady,
    #[error("no logout_token")]
    Missing,
    #[error("the logout token was refused: {0}")]
    Token(TokenRefusal),
    #[error("the logout token was used before")]
    Replayed,
    #[error("the account store is unavailable")]
    Unavailable(#[source] StoreError),
}

impl BackchannelError {
    /// Whether the refusal is worth an audit entry: only for a token the provider signed. What
    /// anyone can send unauthenticated (no token, garbage, a forged signature, a provider not
    /// discovered yet) is counted in the metrics only, so it cannot fill the audit log.
    pub fn audited(&self) -> bool {
        match self {
            BackchannelError::UnknownProvider
            | BackchannelError::NotReady
            | BackchannelError::Missing => false,
            BackchannelError::Token(r) => !matches!(
                r,
                TokenRefusal::Malformed
                    | TokenRefusal::WrongAlgorithm
                    | TokenRefusal::UnknownKey
                    | TokenRefusal::BadSignature
            ),
            BackchannelError::Replayed | BackchannelError::Unavailable(_) => true,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            BackchannelError::UnknownProvider => "unknown_provider",
            BackchannelError::NotReady => "not_discovered",
            BackchannelError::Missing => "missing_token",
            BackchannelError::Token(r) => r.as_str(),
            BackchannelError::Replayed => "replayed",
            BackchannelError::Unavailable(_) => "store_unavailable",
        }
    }
}

/// The parameters of the provider's redirect back to the callback.
#[derive(Debug, Default, Deserialize)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
}

/// What a callback achieved.
#[derive(Debug)]
pub enum SsoDone {
    Login { step: LoginStep, rd: String },
    Linked { provider: String },
}

/// A provider's error code, reduced to what may be shown and logged.
fn error_code(e: &str) -> String {
    e.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

impl App {
    fn provider(&self, id: &str) -> Result<&Arc<Provider>, SsoError> {
        self.oidc.get(id).ok_or(SsoError::UnknownProvider)
    }

    /// Starts a sign-in at the provider: the authorisation URL and the flow cookie's token.
    /// With `link`, the signed-in identity links the provider instead of signing in.
    pub fn sso_start(
        &self,
        provider_id: &str,
        rd: &str,
        link: Option<&Identity>,
    ) -> Result<(String, String), SsoError> {
        let provider = self.provider(provider_id)?;
        let meta = provider.metadata().map_err(SsoError::NotReady)?;
        let now = now_ms() / 1000;
        let ring = self.keyring();
        let claims = FlowClaims {
            iss: ring.issuer().to_string(),
            aud: ring.audience().to_string(),
            sub: "sso-flow".to_string(),
            provider: provider.config.id.clone(),
            state: random_token(),
            nonce: random_token(),
            verifier: random_token(),
            rd: rd.to_string(),
            link_sid: link.map(|id| id.sid.to_string()),
            iat: now,
            nbf: now,
            exp: now + FLOW_TTL_SECS,
        };
        let token = ring
            .issue_typed(FLOW_TYP, &claims)
            .map_err(|_| SsoError::Login(LoginError::Internal))?;
        let url = provider.authorization_url(&meta, &claims.state, &claims.nonce, &claims.verifier);
        Ok((url, token))
    }

    /// The provider's redirect back: checks the flow, exchanges the code, and signs in (or
    /// links). `flow_token` is the flow cookie; `current` the signed-in identity, if any.
    pub async fn sso_callback(
        self: &Arc<Self>,
        provider_id: &str,
        params: &CallbackParams,
        flow_token: Option<&str>,
        current: Option<&Identity>,
        client: &ClientInfo,
    ) -> Result<SsoDone, SsoError> {
        let provider = self.provider(provider_id)?;
        let ring = self.keyring();
        let (flow, _) = flow_token
            .and_then(|t| {
                ring.verify_typed::<FlowClaims>(FLOW_TYP, t, now_ms() / 1000)
                    .ok()
            })
            .ok_or(SsoError::FlowExpired)?;
        if flow.provider != provider.config.id {
            return Err(SsoError::StateMismatch);
        }
        let state_ok = params
            .state
            .as_deref()
            .is_some_and(|s| bool::from(s.as_bytes().ct_eq(flow.state.as_bytes())));
        if !state_ok {
            return Err(SsoError::StateMismatch);
        }
        if let Some(e) = &params.error {
            return Err(SsoError::ProviderDenied(error_code(e)));
        }
        let code = params
            .code
            .as_deref()
            .filter(|c| !c.is_empty() && c.len() <= 4096)
            .ok_or_else(|| SsoError::ProviderDenied("no code".into()))?;
        let exchanged = provider
            .exchange(code, &flow.verifier, &flow.nonce, now_ms() / 1000)
            .await
            .map_err(|e| match e {
                ExchangeError::Provider(p) => SsoError::Provider(p),
                ExchangeError::IdToken(r) => SsoError::IdToken(r),
            })?;
        let claims = exchanged.claims;
        let pid = provider.config.id.clone();
        if let Some(link_sid) = &flow.link_sid {
            let me = current
                .filter(|id| id.sid.to_string() == *link_sid)
                .ok_or(SsoError::NotSignedIn)?;
            self.link_subject(provider, &claims.sub, me.user_id, &me.name, "user", client)
                .await?;
            return Ok(SsoDone::Linked {
                provider: provider.config.display_name.clone(),
            });
        }
        let (user, found) = self.user_for_subject(provider, &claims, client).await?;
        if user.disabled {
            let mut e =
                self.audit_entry("sso_login", "disabled", Some((user.id, &user.name)), client);
            e.detail = format!("provider {pid}");
            self.audit(e).await;
            return Err(SsoError::Login(LoginError::Disabled));
        }
        // The provider's word on its factors counts only for a subject linked before this
        // login: the login that creates a link proves nothing about the user it lands on.
        let trusted = found == Found::Linked
            && (claims
                .amr
                .as_ref()
                .is_some_and(|amr| amr.iter().any(|m| provider.config.trust_amr.contains(m)))
                || claims
                    .acr
                    .as_ref()
                    .is_some_and(|acr| provider.config.trust_acr.contains(acr)));
        let grant_admin = !user.is_admin
            && provider
                .config
                .admin
                .as_ref()
                .is_some_and(|(claim, value)| claims.claim_has(claim, value));
        let sso = SsoLogin {
            pending: SsoPending {
                provider: pid,
                subject: claims.sub.clone(),
                sid: claims
                    .sid
                    .clone()
                    .filter(|s| !s.is_empty() && s.len() <= 255),
            },
            id_token: Some(Secret::new(exchanged.id_token)),
            grant_admin,
        };
        // A passkey is a second factor like TOTP (the step offers it); a user who must sign in
        // with a passkey and has one signs in with it, never through a provider.
        let has_passkey = !self.store.passkeys_of(user.id).await?.is_empty();
        if has_passkey && self.passkey_required(&user) {
            let mut e = self.audit_entry(
                "sso_login",
                "passkey_required",
                Some((user.id, &user.name)),
                client,
            );
            e.detail = format!("provider {}", sso.pending.provider);
            self.audit(e).await;
            return Err(LoginError::PasskeyRequired.into());
        }
        let step = if (user.totp_enabled || has_passkey) && !trusted {
            self.pending(&user, PendingStage::Totp, Some(&sso), &["sso".to_string()])?
        } else {
            let mut amr = vec!["sso".to_string()];
            if trusted {
                amr.push("mfa".into());
            }
            self.after_factors(
                &user,
                amr,
                Channel::Form,
                SessionKind::Web,
                client,
                Some(sso),
            )
            .await?
        };
        Ok(SsoDone::Login { step, rd: flow.rd })
    }

    /// The user a provider subject signs in as: by its link (made under the configured
    /// issuer), else by auto-link, else a new user with auto-create.
    async fn user_for_subject(
        &self,
        provider: &Provider,
        claims: &IdClaims,
        client: &ClientInfo,
    ) -> Result<(User, Found), SsoError> {
        let pid = provider.config.id.as_str();
        if let Some(uid) = self
            .store
            .find_oidc_link(pid, &provider.config.issuer, &claims.sub)
            .await?
        {
            let user = self
                .store
                .find_user_by_id(uid)
                .await?
                .ok_or(SsoError::NotLinked)?;
            return Ok((user, Found::Linked));
        }
        if let Some(name) = auto_link_name(provider.config.auto_link, claims) {
            // `find_user` ignores ASCII case; only the exact name counts.
            if let Some(target) = self.store.find_user(name).await?.filter(|u| u.name == name) {
                let linked = self.store.oidc_links_of(target.id).await?;
                if linked.iter().any(|l| l.provider == pid) {
                    // Never move a link: the user is linked to another subject here.
                    return Err(SsoError::LinkConflict(
                        "the matching Portcullis account is linked to another account at this provider",
                    ));
                }
                if target.is_admin {
                    let mut e = self.audit_entry(
                        "sso_link",
                        "refused_admin",
                        Some((target.id, &target.name)),
                        client,
                    );
                    e.detail = format!(
                        "provider {pid}: no auto-link to an administrator (admins link explicitly)"
                    );
                    self.audit(e).await;
                    return Err(SsoError::AdminNotAutoLinked);
                }
                self.link_subject(
                    provider,
                    &claims.sub,
                    target.id,
                    &target.name,
                    "auto",
                    client,
                )
                .await?;
                return Ok((target, Found::AutoLinked));
            }
        }
        if !provider.config.auto_create {
            return Err(SsoError::NotLinked);
        }
        let name = claims
            .string("preferred_username")
            .or_else(|| claims.string("email").filter(|_| claims.email_verified()))
            .map(crate::auth::canonical_user_name)
            .filter(|n| crate::auth::valid_user_name(n))
            .ok_or(SsoError::LinkConflict(
                "the provider sent no usable user name to create an account with",
            ))?;
        if self.store.find_user(&name).await?.is_some() {
            return Err(SsoError::LinkConflict(
                "a Portcullis account of that name exists and is not linked to it",
            ));
        }
        // A name lives in one place only: not one the user directory holds (nor one it might).
        if self.name_in_directory(&name).await != Ok(None) {
            return Err(SsoError::LinkConflict(
                "the user directory has (or may have) a user of that name: sign in as them",
            ));
        }
        // No password anyone knows: the account signs in through the provider (an admin can
        // set one, or issue a reset link). Admin by claim follows with the session.
        let unusable = self
            .hasher
            .hash(Secret::new(random_token()))
            .await
            .map_err(|_| SsoError::Login(LoginError::Internal))?;
        let user = match self
            .store
            .create_user(&name, &unusable, false, now_ms())
            .await
        {
            Ok(u) => {
                self.store.mark_password_unset(u.id).await?;
                u
            }
            Err(StoreError::Conflict(_)) => {
                return Err(SsoError::LinkConflict(
                    "a Portcullis account of that name exists and is not linked to it",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let mut e = self.audit_entry(
            "sso_user_created",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = format!("provider {pid}");
        self.audit(e).await;
        self.link_subject(
            provider,
            &claims.sub,
            user.id,
            &user.name,
            "created",
            client,
        )
        .await?;
        Ok((user, Found::Created))
    }

    /// Links a subject (under the provider's configured issuer) to a user, refusing to move an
    /// existing link either way.
    pub async fn link_subject(
        &self,
        provider: &Provider,
        subject: &str,
        user_id: i64,
        user_name: &str,
        how: &'static str,
        client: &ClientInfo,
    ) -> Result<(), SsoError> {
        let pid = provider.config.id.as_str();
        let issuer = provider.config.issuer.as_str();
        match self.store.find_oidc_link(pid, issuer, subject).await? {
            Some(uid) if uid == user_id => return Ok(()),
            Some(_) => {
                return Err(SsoError::LinkConflict(
                    "it is linked to another Portcullis account",
                ))
            }
            None => {}
        }
        match self
            .store
            .link_oidc(pid, issuer, subject, user_id, now_ms())
            .await
        {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(SsoError::LinkConflict(
                    "this Portcullis account is linked to another account at this provider (or this account at the provider to another Portcullis account); unlink it first",
                ))
            }
            Err(e) => return Err(e.into()),
        }
        self.metrics
            .counter(crate::metrics::Family::OidcLinks, &[pid, how])
            .inc();
        let mut e = self.audit_entry("sso_link", "success", Some((user_id, user_name)), client);
        e.detail = format!("provider {pid} ({how})");
        self.audit(e).await;
        Ok(())
    }

    /// Checks a signed-in user before they link a provider account to theirs: the password,
    /// and the current code when they have TOTP, under the same throttle and lock as the
    /// password change (a wrong guess counts toward the lock). A stolen session alone cannot
    /// plant a provider account as a way back in.
    pub async fn confirm_link(
        &self,
        identity: &Identity,
        proof: Reauth,
        client: &ClientInfo,
    ) -> Result<(), AccountError> {
        self.reauthenticate(identity, proof, client, "sso_link")
            .await
    }

    /// Checks that the signed-in user is at the keyboard before a sensitive change: their
    /// password and their code when they have TOTP, or a passkey confirmation (a grant of this
    /// session, used once). Failures count like failed logins and are audited under `event`.
    pub async fn reauthenticate(
        &self,
        identity: &Identity,
        proof: Reauth,
        client: &ClientInfo,
        event: &str,
    ) -> Result<(), AccountError> {
        let mark = self.failures_mark();
        let user = self
            .store
            .find_user_by_id(identity.user_id)
            .await?
            .ok_or(AccountError::NoSuchUser)?;
        let result = match proof {
            Reauth::Passkey(grant) => self.take_passkey_grant(identity, &grant).await,
            Reauth::Password { password, code } => {
                let mut result = self.password_may_confirm(&user).await;
                if result.is_ok() {
                    result = self.confirm_password(&user, mark, password, client).await;
                }
                if result.is_ok() && user.totp_enabled {
                    result = match code.as_deref() {
                        Some(c) => self
                            .check_second_factor(&user, c, client)
                            .await
                            .map_err(|e| match e {
                                LoginError::Unavailable(s) => AccountError::Unavailable(s),
                                _ => AccountError::InvalidCode,
                            }),
                        None => Err(AccountError::InvalidCode),
                    };
                }
                result
            }
        };
        if let Err(e) = &result {
            let mut entry = self.audit_entry(event, "failure", Some((user.id, &user.name)), client);
            entry.detail = e.to_string();
            self.audit(entry).await;
        }
        result
    }

    /// Refuses the password as a confirmation for a user who must sign in with a passkey and
    /// has one: for them the password alone opens nothing, a change included.
    pub(super) async fn password_may_confirm(&self, user: &User) -> Result<(), AccountError> {
        if self.passkey_required(user) && !self.store.passkeys_of(user.id).await?.is_empty() {
            return Err(AccountError::PasskeyConfirmationRequired);
        }
        Ok(())
    }

    /// Removes a user's link to a provider.
    pub async fn unlink_subject(
        &self,
        provider: &str,
        user_id: i64,
        user_name: &str,
        client: &ClientInfo,
    ) -> Result<bool, StoreError> {
        let removed = self.store.unlink_oidc(provider, user_id).await?;
        if removed {
            self.metrics
                .counter(crate::metrics::Family::OidcLinks, &[provider, "unlink"])
                .inc();
            let mut e =
                self.audit_entry("sso_unlink", "success", Some((user_id, user_name)), client);
            e.detail = format!("provider {provider}");
            self.audit(e).await;
        }
        Ok(removed)
    }

    /// Completes the session of a single sign-on login: records the provider session behind
    /// it (with its `amr`), and grants admin by the provider's claim. If a back-channel logout
    /// ended the provider session while the login was on its way, the new session is ended at
    /// once and the login must start again.
    pub(super) async fn finish_sso_session(
        &self,
        user: &User,
        ok: &LoginOk,
        sso: &SsoLogin,
        amr: &[String],
        client: &ClientInfo,
    ) -> Result<(), LoginError> {
        let sealed = sso
            .id_token
            .as_ref()
            .map(|t| {
                self.secrets
                    .seal_token(&ok.session_id.to_string(), t.expose())
            })
            .unwrap_or_default();
        let recorded = self
            .store
            .record_oidc_session(
                &OidcSession {
                    session_id: ok.session_id,
                    provider: sso.pending.provider.clone(),
                    subject: sso.pending.subject.clone(),
                    oidc_sid: sso.pending.sid.clone(),
                    id_token_sealed: sealed,
                    amr: amr.to_vec(),
                },
                now_ms(),
            )
            .await
            .map_err(|e| LoginError::Unavailable(self.store_error("record_oidc_session", e)))?;
        if !recorded {
            self.revoke_session(ok.session_id)
                .await
                .map_err(LoginError::Unavailable)?;
            let mut e = self.audit_entry(
                "sso_login",
                "provider_logged_out",
                Some((user.id, &user.name)),
                client,
            );
            e.session_id = ok.session_id.to_string();
            e.detail = format!(
                "provider {}: its session ended by back-channel logout during the login",
                sso.pending.provider
            );
            self.audit(e).await;
            return Err(LoginError::RestartLogin);
        }
        if sso.grant_admin && !user.is_admin {
            if let Some((claim, _)) = self
                .oidc
                .get(&sso.pending.provider)
                .and_then(|p| p.config.admin.as_ref())
            {
                if let Some(ev) = self
                    .store
                    .set_group(user.id, "admins", true, now_ms())
                    .await
                    .map_err(|e| LoginError::Unavailable(self.store_error("set_admin", e)))?
                {
                    self.apply(&[ev]);
                }
                let mut e = self.audit_entry(
                    "sso_admin_granted",
                    "success",
                    Some((user.id, &user.name)),
                    client,
                );
                e.session_id = ok.session_id.to_string();
                e.detail = format!("provider {} claim {claim}", sso.pending.provider);
                self.audit(e).await;
            }
        }
        Ok(())
    }

    /// The provider session behind session `sid` (read before that session is replaced).
    pub(super) async fn sso_session_of(
        &self,
        sid: SessionId,
    ) -> Result<Option<OidcSession>, StoreError> {
        self.store
            .get_oidc_session(sid)
            .await
            .map_err(|e| self.store_error("get_oidc_session", e))
    }

    /// Carries the provider session of a replaced session (signing out the other devices, a
    /// password change that does) to its replacement `to`, so that the provider's back-channel
    /// logout and its end-session redirect still find it. The ID token is sealed again with
    /// the new session id. If the provider session ended meanwhile, `to` is ended as well.
    pub(super) async fn carry_sso_session(
        &self,
        from: &OidcSession,
        to: SessionId,
    ) -> Result<(), AccountError> {
        let id_token_sealed = if from.id_token_sealed.is_empty() {
            String::new()
        } else {
            self.secrets
                .open_token(&from.session_id.to_string(), &from.id_token_sealed)
                .map(|t| self.secrets.seal_token(&to.to_string(), &t))
                .unwrap_or_default()
        };
        let carried = OidcSession {
            session_id: to,
            id_token_sealed,
            ..from.clone()
        };
        let recorded = self
            .store
            .record_oidc_session(&carried, now_ms())
            .await
            .map_err(|e| self.store_error("record_oidc_session", e))?;
        if !recorded {
            self.revoke_session(to).await?;
            return Err(AccountError::Expired);
        }
        Ok(())
    }

    /// Where to send the browser after ending session `sid`: the provider's end-session
    /// endpoint for a session that came through a provider configured for it.
    pub async fn sso_end_session_url(&self, sid: SessionId) -> Option<String> {
        let s = self.store.get_oidc_session(sid).await.ok()??;
        let provider = self.oidc.get(&s.provider)?;
        let hint = (!s.id_token_sealed.is_empty())
            .then(|| {
                self.secrets
                    .open_token(&sid.to_string(), &s.id_token_sealed)
                    .ok()
            })
            .flatten();
        let back = format!(
            "{}{}",
            self.config().server.public_url,
            crate::paths::LOGIN_PATH
        );
        provider.end_session_url(hint.as_deref(), &back)
    }

    /// A back-channel logout from the provider: validates the logout token and ends the
    /// sessions it names on every instance (the events travel through the store). Returns how
    /// many revocation events were committed.
    pub async fn sso_backchannel_logout(
        &self,
        provider_id: &str,
        logout_token: Option<&str>,
        client: &ClientInfo,
    ) -> Result<usize, BackchannelError> {
        let provider = self
            .oidc
            .get(provider_id)
            .ok_or(BackchannelError::UnknownProvider)?;
        provider
            .metadata()
            .map_err(|_| BackchannelError::NotReady)?;
        let token = logout_token
            .filter(|t| !t.is_empty())
            .ok_or(BackchannelError::Missing)?;
        let (header, claims) = provider
            .verify::<LogoutClaims>(token)
            .await
            .map_err(BackchannelError::Token)?;
        let now_s = now_ms() / 1000;
        check_logout_claims(&header, &claims, now_s).map_err(BackchannelError::Token)?;
        let logout = BackchannelLogout {
            provider: provider.config.id.clone(),
            jti: claims.jti.clone().unwrap_or_default(),
            jti_expires_ms: claims
                .iat
                .saturating_add(LOGOUT_TOKEN_MAX_AGE_SECS + LEEWAY_SECS + 60)
                .saturating_mul(1000),
            subject: claims.sub.clone().filter(|s| !s.is_empty()),
            oidc_sid: claims.sid.clone().filter(|s| !s.is_empty()),
            issuer: provider.config.issuer.clone(),
            ended_until_ms: now_ms().saturating_add(ENDED_SID_TTL_MS),
        };
        let events = self
            .store
            .oidc_backchannel_logout(&logout, now_ms())
            .await
            .map_err(|e| BackchannelError::Unavailable(self.store_error("oidc_backchannel", e)))?
            .ok_or(BackchannelError::Replayed)?;
        self.apply(&events);
        let mut e = self.audit_entry("sso_backchannel_logout", "success", None, client);
        e.detail = truncate(
            &format!(
                "provider {} ended {} (sub {}, sid {})",
                logout.provider,
                events.len(),
                if logout.subject.is_some() {
                    "given"
                } else {
                    "absent"
                },
                if logout.oidc_sid.is_some() {
                    "given"
                } else {
                    "absent"
                },
            ),
            256,
        );
        if let Some(uid) = events.iter().find_map(|e| match e.event {
            crate::store::RevocationEvent::SessionRevoked { user_id, .. }
            | crate::store::RevocationEvent::UserCutoff { user_id, .. } => Some(user_id),
            _ => None,
        }) {
            e.user_id = Some(uid);
        }
        self.audit(e).await;
        Ok(events.len())
    }
}

/// The gateway user name that auto-link looks for, taken exactly as the provider sent it: no
/// trimming, no Unicode normalisation (`Ⓐdmin`, `ａｄｍｉｎ` and ` admin` are not `admin`), and
/// only a name a user could have been created with. An email must be verified and ASCII.
fn auto_link_name(mode: AutoLink, claims: &IdClaims) -> Option<&str> {
    let raw = match mode {
        AutoLink::Off => None,
        AutoLink::Email => claims
            .string("email")
            .filter(|_| claims.email_verified())
            .filter(|e| e.is_ascii()),
        AutoLink::PreferredUsername => claims.string("preferred_username"),
    }?;
    crate::auth::valid_user_name(raw).then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(extra: serde_json::Value) -> IdClaims {
        let mut v = serde_json::json!({"iss": "https://idp.example", "sub": "s", "aud": "c",
                                       "exp": 1, "iat": 1});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn auto_link_takes_the_provider_value_exactly_or_not_at_all() {
        let by_name = |n: &str| {
            auto_link_name(
                AutoLink::PreferredUsername,
                &claims(serde_json::json!({ "preferred_username": n })),
            )
            .map(str::to_string)
        };
        assert_eq!(by_name("admin").as_deref(), Some("admin"));
        // Case is kept (the store's lookup ignores it; the caller compares exactly).
        assert_eq!(by_name("Admin").as_deref(), Some("Admin"));
        for n in [
            "Ⓐdmin",
            "ａｄｍｉｎ",
            " admin",
            "admin ",
            "аdmin",
            "ad\u{200b}min",
            "",
            "a b",
        ] {
            assert_eq!(by_name(n), None, "{n:?}");
        }
        let by_mail = |e: &str, verified: bool| {
            auto_link_name(
                AutoLink::Email,
                &claims(serde_json::json!({ "email": e, "email_verified": verified })),
            )
            .map(str::to_string)
        };
        assert_eq!(
            by_mail("bob@example.com", true).as_deref(),
            Some("bob@example.com")
        );
        assert_eq!(by_mail("bob@example.com", false), None);
        assert_eq!(by_mail("böb@example.com", true), None);
        assert_eq!(by_mail("ｂob@example.com", true), None);
        assert_eq!(
            auto_link_name(
                AutoLink::Off,
                &claims(serde_json::json!({"preferred_username": "admin"}))
            ),
            None
        );
    }

    #[test]
    fn only_signed_back_channel_refusals_are_audited() {
        for r in [
            TokenRefusal::Malformed,
            TokenRefusal::WrongAlgorithm,
            TokenRefusal::UnknownKey,
            TokenRefusal::BadSignature,
        ] {
            assert!(!BackchannelError::Token(r).audited(), "{r:?}");
        }
        assert!(!BackchannelError::Missing.audited());
        assert!(!BackchannelError::NotReady.audited());
        assert!(BackchannelError::Token(TokenRefusal::WrongAudience).audited());
        assert!(BackchannelError::Replayed.audited());
    }
}
