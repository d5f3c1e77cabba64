//! Account and admin operations: devices and sign-outs, password change with "sign out
//! connected devices", TOTP enrolment, reset links, unlock, and the breach response. Each one
//! commits to the store before it reports success and writes an audit entry.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{now_ms, App, ClientInfo, FailuresMark, LoginError, LoginOk, PendingStage};
use crate::auth::password::{check_policy, PolicyError};
use crate::auth::token::{rotate_key_file, EnrollClaims, KeyError, ENROLL_TYP};
use crate::auth::{totp, Identity};
use crate::config::Secret;
use crate::store::{ResetLinkState, SessionId, SessionKind, SessionRecord, StoreError, User};

/// Lifetime of an enrolment token (QR shown, code not yet confirmed).
pub const ENROLL_TTL_SECS: i64 = 600;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the current password is wrong")]
    WrongPassword,
    #[error("too many wrong passwords; try again later")]
    TooManyAttempts,
    #[error("the code is not valid")]
    InvalidCode,
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("that session is not yours")]
    NotYours,
    #[error("no such user")]
    NoSuchUser,
    #[error("two-factor authentication is already on")]
    AlreadyEnrolled,
    #[error("two-factor authentication is not on")]
    NotEnrolled,
    #[error("this page has expired; start again")]
    Expired,
    #[error("{0}")]
    Keys(#[from] KeyError),
    #[error("the account store is unavailable")]
    Unavailable(#[from] StoreError),
    #[error("the passkey confirmation has expired or was used already; confirm again")]
    PasskeyGrantNotValid,
    #[error("this account signs in with a passkey only: confirm the change with your passkey")]
    PasskeyConfirmationRequired,
    #[error("this account's password is kept by the user directory: change it there")]
    PasswordInDirectory,
    #[error("the user directory is unavailable; try again in a moment")]
    DirectoryUnavailable,
    #[error("the change could not be completed")]
    Internal,
}

/// How a signed-in user shows they are at the keyboard before a sensitive change.
pub enum Reauth {
    /// Their password, and their current code where the change asks for it.
    Password {
        password: Secret,
        code: Option<String>,
    },
    /// A single-use grant from a user-verified passkey confirmation made moments ago in this
    /// session: both factors at once.
    Passkey(String),
}

impl Reauth {
    /// From a form's fields: a passkey grant, when the form carries one, else the password.
    pub fn from_form(
        password: Option<String>,
        code: Option<String>,
        grant: Option<String>,
    ) -> Reauth {
        match grant.filter(|g| !g.is_empty()) {
            Some(g) => Reauth::Passkey(g),
            None => Reauth::Password {
                password: Secret::new(password.unwrap_or_default()),
                code: code.map(|c| c.trim().to_string()).filter(|c| !c.is_empty()),
            },
        }
    }
}

impl From<LoginError> for AccountError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Unavailable(s) => AccountError::Unavailable(s),
            LoginError::Policy(p) => AccountError::Policy(p),
            LoginError::InvalidCode => AccountError::InvalidCode,
            LoginError::DirectoryUnavailable => AccountError::DirectoryUnavailable,
            _ => AccountError::Internal,
        }
    }
}

/// A password change as submitted from the account page.
pub struct PasswordChange {
    /// The current password (no code is asked), or a passkey confirmation.
    pub current: Reauth,
    pub new: Secret,
    pub confirm: Secret,
    /// "Sign out connected devices".
    pub signout_others: bool,
}

/// A started TOTP enrolment: what to show, and the token that carries the sealed seed.
pub struct Enrollment {
    pub secret_base32: String,
    pub otpauth_uri: String,
    pub qr_svg: String,
    pub token: String,
}

/// What a breach response did.
#[derive(Debug)]
pub struct BreachReport {
    pub new_kid: String,
    pub retired_kids: Vec<String>,
    pub users_reset: u64,
    /// Single sign-on links removed (users link their provider account again).
    pub oidc_links_removed: u64,
    /// Every user must also register a passkey at their next sign-in.
    pub passkey_required: bool,
    /// Users mailed what happened and what to do (those with a verified address).
    pub users_notified: u64,
}

/// Why a new password could not be set.
#[derive(Debug)]
pub enum NewPasswordError {
    Policy(PolicyError),
    Hash,
}

impl From<NewPasswordError> for AccountError {
    fn from(e: NewPasswordError) -> Self {
        match e {
            NewPasswordError::Policy(p) => AccountError::Policy(p),
            NewPasswordError::Hash => AccountError::Internal,
        }
    }
}

impl From<NewPasswordError> for LoginError {
    fn from(e: NewPasswordError) -> Self {
        match e {
            NewPasswordError::Policy(p) => LoginError::Policy(p),
            NewPasswordError::Hash => LoginError::Internal,
        }
    }
}

pub(super) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// What a one-time link does when used (both sign out every device of the user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPurpose {
    /// Sets a new password (`/_portcullis/reset/TOKEN`).
    Password,
    /// Registers a passkey, for a user who lost theirs (`/_portcullis/passkey-link/TOKEN`).
    Passkey,
    /// "This wasn't me", from a new sign-in alert (`/_portcullis/not-me/TOKEN`): signs out
    /// every device and requires a new password, after a confirmation on its page.
    NotMe,
}

/// Stores a new one-time link for `user` (its hash only; valid for `auth.reset_link_ttl`; the
/// user's older unused link of the same purpose stops working) and returns its URL.
pub async fn create_link(
    store: &crate::store::DynStore,
    config: &crate::config::Config,
    user: &User,
    purpose: LinkPurpose,
) -> Result<String, StoreError> {
    let token = data_encoding::BASE64URL_NOPAD.encode(&rand::random::<[u8; 32]>());
    let hash = token_hash(&token);
    let now = now_ms();
    let expires = now + config.auth.reset_link_ttl.as_millis() as i64;
    let path = match purpose {
        LinkPurpose::Password => {
            store
                .create_reset_link(&hash, user.id, now, expires)
                .await?;
            "reset"
        }
        LinkPurpose::Passkey => {
            store
                .create_passkey_link(&hash, user.id, now, expires)
                .await?;
            "passkey-link"
        }
        LinkPurpose::NotMe => {
            store
                .create_not_me_link(&hash, user.id, now, expires)
                .await?;
            "not-me"
        }
    };
    Ok(format!(
        "{}/_portcullis/{path}/{token}",
        config.server.public_url
    ))
}

/// The state of a passkey link, by its token.
pub(crate) async fn passkey_link_state(
    store: &crate::store::DynStore,
    token: &str,
) -> Result<ResetLinkState, StoreError> {
    store.passkey_link_state(&token_hash(token), now_ms()).await
}

pub(crate) fn link_hash(token: &str) -> String {
    token_hash(token)
}

impl App {
    /// Checks a new password (typed twice) against the policy and hashes it.
    pub(super) async fn new_password_hash(
        &self,
        user_name: &str,
        new: Secret,
        confirm: Secret,
    ) -> Result<String, NewPasswordError> {
        if new.expose() != confirm.expose() {
            return Err(NewPasswordError::Policy(PolicyError::Mismatch));
        }
        check_policy(&self.config().password, user_name, new.expose())
            .map_err(NewPasswordError::Policy)?;
        self.hasher
            .hash(new)
            .await
            .map_err(|_| NewPasswordError::Hash)
    }

    async fn user(&self, id: i64) -> Result<User, AccountError> {
        self.store
            .find_user_by_id(id)
            .await?
            .ok_or(AccountError::NoSuchUser)
    }

    /// The user's live sessions, newest last.
    pub async fn sessions_of(&self, user_id: i64) -> Result<Vec<SessionRecord>, AccountError> {
        Ok(self
            .store
            .list_live_sessions(Some(user_id), now_ms())
            .await?)
    }

    /// Ends one of the identity's own sessions.
    pub async fn revoke_own_session(
        &self,
        identity: &Identity,
        sid: SessionId,
        client: &ClientInfo,
    ) -> Result<(), AccountError> {
        let session = self.store.get_session(sid).await?;
        if session.is_none_or(|s| s.user_id != identity.user_id) {
            return Err(AccountError::NotYours);
        }
        self.revoke_session(sid).await?;
        let mut e = self.audit_entry(
            "signout_device",
            "success",
            Some((identity.user_id, &identity.name)),
            client,
        );
        e.session_id = sid.to_string();
        self.audit(e).await;
        Ok(())
    }

    /// "Sign out of all devices": every session of the user ends, this one included.
    pub async fn signout_all_devices(
        &self,
        identity: &Identity,
        client: &ClientInfo,
    ) -> Result<(), AccountError> {
        let mut e = self.audit_entry(
            "signout_all_devices",
            "success",
            Some((identity.user_id, &identity.name)),
            client,
        );
        e.session_id = identity.sid.to_string();
        self.signout_user_id(identity.user_id, e).await?;
        Ok(())
    }

    /// "Sign out of all other devices": every session ends, and this device gets a fresh one
    /// (carrying this session's provider session, if it came through single sign-on).
    pub async fn signout_other_devices(
        &self,
        identity: &Identity,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginOk, AccountError> {
        let sso = self.sso_session_of(identity.sid).await?;
        let event = self.store.signout_user(identity.user_id, now_ms()).await?;
        self.apply(&[event]);
        let user = self.user(identity.user_id).await?;
        let ok = self.replacement_session(&user, sso, kind, client).await?;
        let mut e = self.audit_entry(
            "signout_other_devices",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.session_id = ok.session_id.to_string();
        self.audit(e).await;
        Ok(ok)
    }

    /// The session that replaces a signed-out one on this device. One that came through single
    /// sign-on keeps its authentication methods and its provider session (so that the
    /// provider's back-channel logout and end-session redirect still reach it); otherwise a
    /// password session.
    async fn replacement_session(
        &self,
        user: &User,
        sso: Option<crate::store::OidcSession>,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginOk, AccountError> {
        let amr = sso
            .as_ref()
            .map(|s| s.amr.clone())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| vec!["pwd".into()]);
        let ok = self.create_session(user, amr, kind, client).await?;
        if let Some(from) = &sso {
            self.carry_sso_session(from, ok.session_id).await?;
        }
        Ok(ok)
    }

    /// Checks a signed-in user's password (re-entered to change it, to turn 2FA off or to link
    /// a provider account) under the same throttle and lock as a login: a stolen session cannot
    /// guess it freely, and a wrong guess counts toward the account's lock. `user` was read
    /// after `mark` was taken (see [`App::account_gate`]).
    pub(super) async fn confirm_password(
        &self,
        user: &User,
        mark: FailuresMark,
        password: Secret,
        client: &ClientInfo,
    ) -> Result<(), AccountError> {
        let now = now_ms();
        let gate = self.account_gate(user, mark, now).await?;
        if gate != crate::auth::throttle::Gate::Open {
            return Err(AccountError::TooManyAttempts);
        }
        let right = self
            .password_is_right(user, password)
            .await
            .map_err(|_| AccountError::DirectoryUnavailable)?;
        if !right {
            self.record_failure(Some(user), &user.name, client).await;
            return Err(AccountError::WrongPassword);
        }
        Ok(())
    }

    /// Changes the password after checking the current one. With `signout_others` every other
    /// session ends and this device gets a fresh session (returned).
    pub async fn change_own_password(
        &self,
        identity: &Identity,
        change: PasswordChange,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<Option<LoginOk>, AccountError> {
        let PasswordChange {
            current,
            new,
            confirm,
            signout_others,
        } = change;
        let mark = self.failures_mark();
        let user = self.user(identity.user_id).await?;
        if user.directory_dn.is_some() {
            return Err(AccountError::PasswordInDirectory);
        }
        let confirmed = match current {
            Reauth::Password { password, .. } => match self.password_may_confirm(&user).await {
                Ok(()) => self
                    .confirm_password(&user, mark, password, client)
                    .await
                    .map(|()| None),
                Err(e) => Err(e),
            },
            Reauth::Passkey(grant) => {
                // The new password is checked first, so that a refused one keeps the grant.
                let hash = self
                    .new_password_hash(&user.name, new.clone(), confirm.clone())
                    .await?;
                self.take_passkey_grant(identity, &grant)
                    .await
                    .map(|()| Some(hash))
            }
        };
        let checked = match confirmed {
            Ok(h) => h,
            Err(e) => {
                let mut entry = self.audit_entry(
                    "password_change",
                    "failure",
                    Some((user.id, &user.name)),
                    client,
                );
                entry.detail = e.to_string();
                self.audit(entry).await;
                return Err(e);
            }
        };
        let hash = match checked {
            Some(h) => h,
            None => self.new_password_hash(&user.name, new, confirm).await?,
        };
        let at = signout_others.then(now_ms);
        let sso = if signout_others {
            self.sso_session_of(identity.sid).await?
        } else {
            None
        };
        let mut e = self.audit_entry(
            "password_change",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = if signout_others {
            "signed out connected devices".into()
        } else {
            "kept other devices signed in".into()
        };
        let uid = user.id;
        let event = self
            .audited(
                e,
                |s| async move { s.change_password(uid, &hash, at).await },
            )
            .await?;
        let fresh = match event {
            Some(ev) => {
                self.apply(&[ev]);
                Some(self.replacement_session(&user, sso, kind, client).await?)
            }
            None => None,
        };
        Ok(fresh)
    }

    /// The forced new-password step of a login (after `require-reset` or a breach response),
    /// a password login's or a single sign-on's.
    pub async fn complete_password_step(
        &self,
        pending_token: &str,
        new: Secret,
        confirm: Secret,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<super::LoginStep, LoginError> {
        let (claims, user) = self
            .pending_user(pending_token, PendingStage::Password)
            .await?;
        let hash = self.new_password_hash(&user.name, new, confirm).await?;
        let mut e = self.audit_entry(
            "password_change",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = "required at login; signed out connected devices".into();
        let uid = user.id;
        let changed = self
            .audited(e, |s| async move {
                s.change_password(uid, &hash, Some(now_ms())).await
            })
            .await?;
        if let Some(ev) = changed {
            self.apply(&[ev]);
        }
        self.spend_pending(&claims.jti);
        let sso = self.resumed_sso(&claims);
        let amr = super::factors_before_step(&claims, &user);
        // What is still owed (a passkey to register) comes next.
        let user = self.user(user.id).await.map_err(|_| LoginError::Internal)?;
        self.after_factors(&user, amr, super::Channel::Form, kind, client, sso)
            .await
    }

    /// Starts TOTP enrolment for a user: a fresh seed, sealed into a short-lived token.
    pub async fn start_enrollment(&self, user_id: i64) -> Result<Enrollment, AccountError> {
        let user = self.user(user_id).await?;
        if user.totp_enabled {
            return Err(AccountError::AlreadyEnrolled);
        }
        let seed = totp::new_seed();
        let now = now_ms() / 1000;
        let ring = self.keyring();
        let claims = EnrollClaims {
            iss: ring.issuer().to_string(),
            aud: ring.audience().to_string(),
            sub: user.id.to_string(),
            seed: self.secrets.seal(user.id, &seed),
            iat: now,
            nbf: now,
            exp: now + ENROLL_TTL_SECS,
        };
        let token = ring
            .issue_typed(ENROLL_TYP, &claims)
            .map_err(|_| AccountError::Internal)?;
        let uri = totp::otpauth_uri("Portcullis", &user.name, &seed);
        Ok(Enrollment {
            secret_base32: totp::base32(&seed),
            qr_svg: totp::qr_svg(&uri),
            otpauth_uri: uri,
            token,
        })
    }

    /// Confirms enrolment with a valid code; turns 2FA on and returns the recovery codes
    /// (shown once, stored hashed).
    pub async fn confirm_enrollment(
        &self,
        user_id: i64,
        enroll_token: &str,
        code: &str,
        client: &ClientInfo,
    ) -> Result<Vec<String>, AccountError> {
        let user = self.user(user_id).await?;
        if user.totp_enabled {
            return Err(AccountError::AlreadyEnrolled);
        }
        let ring = self.keyring();
        let (claims, _) = ring
            .verify_typed::<EnrollClaims>(ENROLL_TYP, enroll_token, now_ms() / 1000)
            .map_err(|_| AccountError::Expired)?;
        if claims.sub != user.id.to_string() {
            return Err(AccountError::Expired);
        }
        let seed = self
            .secrets
            .open(user.id, &claims.seed)
            .map_err(|_| AccountError::Expired)?;
        let Some(step) = totp::matching_step(&seed, code, now_ms() / 1000) else {
            let e = self.audit_entry("2fa_enroll", "failure", Some((user.id, &user.name)), client);
            self.audit(e).await;
            return Err(AccountError::InvalidCode);
        };
        let e = self.audit_entry("2fa_enroll", "success", Some((user.id, &user.name)), client);
        let (uid, seed) = (user.id, &claims.seed);
        self.audited(
            e,
            |s| async move { s.set_totp(uid, Some(seed), true).await },
        )
        .await?;
        // The confirming code is spent: it cannot also be used to log in.
        self.store.accept_totp_step(user.id, step).await?;
        let (codes, hashes) = totp::new_recovery_codes();
        self.store.replace_recovery_codes(user.id, &hashes).await?;
        Ok(codes)
    }

    /// Enrolment as the forced step of a login; returns the session and the recovery codes.
    pub async fn complete_enroll_step(
        &self,
        pending_token: &str,
        enroll_token: &str,
        code: &str,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<(super::LoginStep, Vec<String>), LoginError> {
        let (claims, user) = self
            .pending_user(pending_token, PendingStage::Enroll)
            .await?;
        let codes = self
            .confirm_enrollment(user.id, enroll_token, code, client)
            .await
            .map_err(|e| match e {
                AccountError::InvalidCode => LoginError::InvalidCode,
                AccountError::Unavailable(s) => LoginError::Unavailable(s),
                _ => LoginError::RestartLogin,
            })?;
        self.spend_pending(&claims.jti);
        let user = self.user(user.id).await.map_err(|_| LoginError::Internal)?;
        let first = if claims.sso.is_some() { "sso" } else { "pwd" };
        let step = self
            .after_factors(
                &user,
                vec![first.into(), "otp".into()],
                super::Channel::Form,
                kind,
                client,
                self.resumed_sso(&claims),
            )
            .await?;
        Ok((step, codes))
    }

    /// Turns 2FA off; needs the password and a current code, or a passkey confirmation.
    pub async fn disable_2fa(
        &self,
        identity: &Identity,
        proof: Reauth,
        client: &ClientInfo,
    ) -> Result<(), AccountError> {
        let user = self.user(identity.user_id).await?;
        if !user.totp_enabled {
            return Err(AccountError::NotEnrolled);
        }
        self.reauthenticate(identity, proof, client, "2fa_disable")
            .await?;
        let e = self.audit_entry(
            "2fa_disable",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        let uid = user.id;
        self.audited(e, |s| async move { s.set_totp(uid, None, false).await })
            .await?;
        Ok(())
    }

    pub async fn reset_link_state(&self, token: &str) -> Result<ResetLinkState, AccountError> {
        Ok(self
            .store
            .reset_link_state(&token_hash(token), now_ms())
            .await?)
    }

    /// Uses a reset link: a new password and, with `signout` ("sign out connected devices",
    /// ticked unless the user unticks it), every device signed out.
    pub async fn redeem_reset_link(
        &self,
        token: &str,
        new: Secret,
        confirm: Secret,
        signout: bool,
        client: &ClientInfo,
    ) -> Result<ResetLinkState, AccountError> {
        let state = self.reset_link_state(token).await?;
        let ResetLinkState::Valid { user_id } = state else {
            return Ok(state);
        };
        let user = self.user(user_id).await?;
        let hash = self.new_password_hash(&user.name, new, confirm).await?;
        let mut e = self.audit_entry(
            "reset_link_used",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = if signout {
            "every device signed out".into()
        } else {
            "other devices kept".into()
        };
        let link = token_hash(token);
        let redeemed = self
            .audited(e, |s| async move {
                s.redeem_reset_link(&link, &hash, signout, now_ms()).await
            })
            .await?;
        match redeemed {
            Some((_, event)) => {
                self.apply(event.as_slice());
                Ok(ResetLinkState::Valid { user_id })
            }
            // Used or expired between the check and the write.
            None => Ok(self.reset_link_state(token).await?),
        }
    }

    /// Breach response: a new signing key with the old ones retired, everyone signed out, and
    /// a new password required of every user at next login.
    pub async fn breach_response(
        self: &Arc<Self>,
        require_passkey: bool,
        notify: bool,
        client: &ClientInfo,
    ) -> Result<BreachReport, AccountError> {
        let e = self.audit_entry("breach_response", "success", None, client);
        let report =
            breach_response(&self.config(), &self.store, require_passkey, notify, e).await?;
        self.outbox_wake.notify_one();
        self.reload_keys_if_changed();
        // The events were committed by the store call; make them count here at once.
        let _ = self.sync().await;
        Ok(report)
    }
}

/// The breach response against a store (shared by the CLI and the admin page): rotate the key
/// file dropping every old key, remove every single sign-on link (a link made with a stolen
/// session would otherwise be a way back in; users link again), then — in one store
/// transaction — sign out everyone, require a new password of every user (and, with
/// `require_passkey`, a passkey: phished passwords and codes then open nothing) and retire the
/// old key ids so no instance accepts them again. The same transaction appends `entry` (its
/// detail filled in), the mail to every user with an address (`notify`) and the webhooks.
pub async fn breach_response(
    config: &crate::config::Config,
    store: &crate::store::DynStore,
    require_passkey: bool,
    notify: bool,
    mut entry: crate::store::AuditEntry,
) -> Result<BreachReport, AccountError> {
    if config.session.key_override.is_some() {
        return Err(AccountError::Keys(KeyError::Env(
            "the signing key comes from the environment; replace it there, then run \
             `portcullis signout --everyone`"
                .into(),
        )));
    }
    let (new_kid, retired_kids) = rotate_key_file(&config.session.key_file, true)?;
    // Before everyone is signed out: no provider login can open a session after the cutoff
    // through a link made before it.
    let oidc_links_removed = store.unlink_all_oidc().await?;
    let now = now_ms();
    let users = store.list_users().await?;
    let users_reset = users.len() as u64;
    // Everyone with an address is told what happened and what to do (`--notify`).
    let mut outbox: Vec<crate::store::NewOutbox> = users
        .iter()
        .filter(|u| notify && config.mail.is_some() && u.email.is_some())
        .map(|u| crate::store::NewOutbox {
            channel: super::outbox::MAIL.to_string(),
            kind: "breach_response".to_string(),
            user_id: Some(u.id),
            address: None,
            params: serde_json::json!({ "at_ms": now }).to_string(),
        })
        .collect();
    let users_notified = outbox.len() as u64;
    entry.detail = format!(
        "new key {new_kid}, retired {retired_kids:?}, {users_reset} users must reset{}, \
         {oidc_links_removed} single sign-on links removed",
        if require_passkey {
            ", passkeys required"
        } else {
            ""
        },
    );
    if notify {
        entry
            .detail
            .push_str(&format!(", {users_notified} users mailed"));
    }
    outbox.extend(super::outbox::webhook_messages(
        &config.webhooks,
        "breach_response",
        None,
        &entry,
    ));
    let record = crate::store::Record {
        entry: entry.clone(),
        outbox,
    };
    store
        .recording(record)
        .breach_response(now, &retired_kids, require_passkey)
        .await?;
    super::log_audit(&entry);
    Ok(BreachReport {
        new_kid,
        retired_kids,
        users_reset,
        oidc_links_removed,
        passkey_required: require_passkey,
        users_notified,
    })
}
