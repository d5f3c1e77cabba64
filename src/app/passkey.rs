//! Passkeys (WebAuthn, checked by webauthn-rs's core): registration from the account page after
//! a fresh re-authentication; sign-in with a discoverable credential (no user name: the browser
//! offers the passkeys it holds for this site, also as autofill) or with the user's own
//! credentials (user name first); and a passkey as the second factor after a password.
//!
//! A passkey that verified its user (PIN or biometric: the UV flag) counts as two factors
//! (`amr` = `hwk`, `uv`). One that did not is something the user has, not who they are: after a
//! passkey alone the TOTP step follows, or the sign-in is refused when the user has no TOTP.
//! Ceremony state stays in the store, single use (taken and deleted in one statement) and for
//! five minutes at most. The signature counter is compared with the stored one in the write
//! that records the use: a counter that did not move forward means a copied credential; the
//! sign-in is refused, the credential flagged on the account page and the event audited.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use webauthn_rs_core::error::WebauthnError;
use webauthn_rs_core::proto::{
    AttestationConveyancePreference, AuthenticationState, Credential, PublicKeyCredential,
    RegisterPublicKeyCredential, RegistrationState, UserVerificationPolicy,
};
use webauthn_rs_core::WebauthnCore;

use super::account::{token_hash, AccountError, Reauth};
use super::{now_ms, App, Channel, ClientInfo, LoginError, LoginStep, PendingStage};
use crate::auth::throttle::Gate;
use crate::auth::Identity;
use crate::metrics::Family;
use crate::store::{
    AuditEntry, Ceremony, NewPasskey, PasskeyRecord, SessionKind, StoreError, User,
};
use subtle::ConstantTimeEq;

/// How long a ceremony (the browser's passkey prompt) may take.
pub const CEREMONY_TTL: Duration = Duration::from_secs(300);
/// The longest label a passkey may have.
pub const MAX_LABEL_CHARS: usize = 64;
/// Ceremonies one client address may start without a session per [`CEREMONY_TTL`].
pub const MAX_STARTS_PER_IP: u32 = 60;
/// The largest credential JSON a browser is allowed to send.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What a ceremony is for; its state is only ever taken back for the same purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Register,
    Login,
    SecondFactor,
    /// The signed-in user confirms a sensitive change with a passkey.
    Confirm,
    /// What a confirmation buys: a single-use grant for the next sensitive change of the same
    /// session (the row's id is the grant's hash, its state the session id).
    Grant,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Register => "register",
            Purpose::Login => "login",
            Purpose::SecondFactor => "second_factor",
            Purpose::Confirm => "confirm",
            Purpose::Grant => "confirm_grant",
        }
    }
}

/// Why a passkey ceremony did not go ahead. Each has a reason label (metrics, audit, and the
/// `error` of the JSON answer).
#[derive(Debug, thiserror::Error)]
pub enum PasskeyError {
    #[error("this passkey prompt has expired or was already answered; start again")]
    Expired,
    #[error("the browser's answer could not be read: {0}")]
    Malformed(String),
    #[error("the request was not sent as JSON (Content-Type: application/json)")]
    NotJson,
    #[error("the request body is too large")]
    TooLarge,
    #[error("the passkey answered for another site (origin)")]
    WrongOrigin,
    #[error("the passkey belongs to another site (relying-party id)")]
    WrongRpId,
    #[error("the passkey did not verify you (no PIN or biometric), and this account has no other second factor; sign in with your password")]
    NotVerified,
    #[error("this passkey is not registered here")]
    UnknownCredential,
    #[error("this passkey is already registered")]
    Duplicate,
    #[error("this passkey's signature counter went backwards, so it may have been copied: it was refused and is flagged on the account page")]
    PossibleClone,
    #[error("the passkey's signature is not valid")]
    BadSignature,
    #[error("the passkey could not be verified: {0}")]
    Refused(String),
    #[error("the label must be 1 to {MAX_LABEL_CHARS} characters without control characters")]
    BadLabel,
    #[error("this is your last way to sign in: add another passkey first")]
    LastMethod,
    #[error("no such passkey")]
    NoSuchPasskey,
    #[error("this link is not valid any more (used, expired or replaced by a newer one): ask an administrator for a new one")]
    LinkNotValid,
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error(transparent)]
    Account(#[from] AccountError),
}

impl PasskeyError {
    pub fn label(&self) -> &'static str {
        match self {
            PasskeyError::Expired => "expired_ceremony",
            PasskeyError::Malformed(_) => "malformed_response",
            PasskeyError::NotJson => "not_json",
            PasskeyError::TooLarge => "body_too_large",
            PasskeyError::WrongOrigin => "wrong_origin",
            PasskeyError::WrongRpId => "wrong_rp_id",
            PasskeyError::NotVerified => "user_not_verified",
            PasskeyError::UnknownCredential => "unknown_credential",
            PasskeyError::Duplicate => "duplicate_credential",
            PasskeyError::PossibleClone => "possible_clone",
            PasskeyError::BadSignature => "bad_signature",
            PasskeyError::Refused(_) => "refused",
            PasskeyError::BadLabel => "bad_label",
            PasskeyError::LastMethod => "last_method",
            PasskeyError::NoSuchPasskey => "no_such_passkey",
            PasskeyError::LinkNotValid => "link_not_valid",
            PasskeyError::Login(e) => e.label(),
            PasskeyError::Account(AccountError::Unavailable(_)) => "store_unavailable",
            PasskeyError::Account(_) => "reauthentication_failed",
        }
    }

    /// Whether the failure counts against the client like a wrong password.
    fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            PasskeyError::WrongOrigin
                | PasskeyError::WrongRpId
                | PasskeyError::UnknownCredential
                | PasskeyError::PossibleClone
                | PasskeyError::BadSignature
                | PasskeyError::Refused(_)
        )
    }
}

impl From<StoreError> for PasskeyError {
    fn from(e: StoreError) -> Self {
        PasskeyError::Login(LoginError::Unavailable(e))
    }
}

impl From<WebauthnError> for PasskeyError {
    fn from(e: WebauthnError) -> Self {
        match e {
            WebauthnError::InvalidRPOrigin => PasskeyError::WrongOrigin,
            WebauthnError::InvalidRPIDHash => PasskeyError::WrongRpId,
            WebauthnError::UserNotVerified => PasskeyError::NotVerified,
            WebauthnError::CredentialNotFound => PasskeyError::UnknownCredential,
            WebauthnError::CredentialExcludedFromRequest
            | WebauthnError::CredentialAlreadyExists => PasskeyError::Duplicate,
            WebauthnError::CredentialPossibleCompromise => PasskeyError::PossibleClone,
            WebauthnError::AuthenticationFailure => PasskeyError::BadSignature,
            // A challenge of another ceremony: an answer replayed from elsewhere.
            WebauthnError::MismatchedChallenge => PasskeyError::Expired,
            WebauthnError::InvalidClientDataType
            | WebauthnError::ParseBase64Failure(_)
            | WebauthnError::ParseCBORFailure(_)
            | WebauthnError::ParseJSONFailure(_)
            | WebauthnError::ParseNOMFailure
            | WebauthnError::ParseInsufficientBytesAvailable
            | WebauthnError::MissingAttestationCredentialData
            | WebauthnError::COSEKeyInvalidCBORValue
            | WebauthnError::COSEKeyInvalidType
            | WebauthnError::COSEKeyECDSAXYInvalid
            | WebauthnError::COSEKeyInvalidAlgorithm => PasskeyError::Malformed(e.to_string()),
            other => PasskeyError::Refused(other.to_string()),
        }
    }
}

/// A started ceremony: its id (the browser sends it back) and the options for
/// `navigator.credentials` (`{"publicKey": …}`, as webauthn-rs writes them).
#[derive(Debug)]
pub struct Started {
    pub ceremony: String,
    pub options: serde_json::Value,
}

/// Authenticator names by AAGUID (the ones self-hosters meet most; others show as "Passkey").
const AUTHENTICATORS: &[(&str, &str)] = &[
    (
        "ea9b8d66-4d01-1d21-3ce4-b6b48cb575d4",
        "Google Password Manager",
    ),
    ("fbfc3007-154e-4ecc-8c0b-6e020557d7bd", "iCloud Keychain"),
    (
        "dd4ec289-e01d-41c9-bb89-70fa845d4bf2",
        "iCloud Keychain (managed)",
    ),
    ("08987058-cadc-4b81-b6e1-30de50dcbe96", "Windows Hello"),
    ("9ddd1817-af5a-4672-a2b9-3e3dd95000a9", "Windows Hello"),
    ("6028b017-b1d4-4c02-b4b3-afcdafc96bb2", "Windows Hello"),
    ("bada5566-a7aa-401f-bd96-45619a55120d", "1Password"),
    ("d548826e-79b4-db40-a3d8-11116f7e8349", "Bitwarden"),
    ("cb69481e-8ff7-4039-93ec-0a2729a154a8", "YubiKey 5 Series"),
    ("ee882879-721c-4913-9775-3dfcce97072a", "YubiKey 5 Series"),
    (
        "fa2b99dc-9e39-4257-8f92-4a30d23c4118",
        "YubiKey 5 Series with NFC",
    ),
    (
        "2fc0579f-8113-47ea-b116-bb5a8db9202a",
        "YubiKey 5 Series with NFC",
    ),
];

/// The authenticator's name for an AAGUID, where known.
pub fn authenticator_name(aaguid: &str) -> Option<&'static str> {
    AUTHENTICATORS
        .iter()
        .find(|(id, _)| id.eq_ignore_ascii_case(aaguid))
        .map(|(_, name)| *name)
}

/// The AAGUID in a registration's attestation object (CBOR map with `authData`: rp id hash
/// (32), flags (1), counter (4), then the attested credential data, which starts with the
/// AAGUID (16)), as a UUID string; `None` when it cannot be read.
pub fn aaguid_of(attestation_object: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"\x68authData";
    let at = attestation_object
        .windows(KEY.len())
        .position(|w| w == KEY)?
        + KEY.len();
    let rest = attestation_object.get(at..)?;
    let (len, start) = match *rest.first()? {
        b @ 0x40..=0x57 => (usize::from(b - 0x40), 1),
        0x58 => (usize::from(*rest.get(1)?), 2),
        0x59 => (
            usize::from(u16::from_be_bytes([*rest.get(1)?, *rest.get(2)?])),
            3,
        ),
        _ => return None,
    };
    let auth_data = rest.get(start..start + len)?;
    // Attested credential data is present only with the AT flag.
    if auth_data.get(32)? & 0x40 == 0 {
        return None;
    }
    let aaguid = uuid::Uuid::from_slice(auth_data.get(37..53)?).ok()?;
    Some(aaguid.to_string())
}

fn parse<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, PasskeyError> {
    if json.len() > MAX_RESPONSE_BYTES {
        return Err(PasskeyError::Malformed("the answer is too large".into()));
    }
    serde_json::from_str(json).map_err(|e| PasskeyError::Malformed(e.to_string()))
}

fn label_ok(label: &str) -> bool {
    let n = label.chars().count();
    (1..=MAX_LABEL_CHARS).contains(&n) && !label.chars().any(char::is_control)
}

impl App {
    /// The relying party for this configuration (its id and the one origin of `public_url`).
    fn relying_party(&self) -> WebauthnCore {
        let config = self.config();
        let w = &config.webauthn;
        WebauthnCore::new_unsafe_experts_only(
            &w.rp_name,
            &w.rp_id,
            vec![w.origin.clone()],
            CEREMONY_TTL,
            None,
            None,
        )
    }

    /// Keeps a ceremony's state in the store and returns its id.
    async fn keep_ceremony<S: serde::Serialize>(
        &self,
        purpose: Purpose,
        user_id: Option<i64>,
        state: &S,
    ) -> Result<String, PasskeyError> {
        let id = hex::encode(rand::random::<[u8; 16]>());
        let now = now_ms();
        let ceremony = Ceremony {
            id: id.clone(),
            purpose: purpose.as_str().to_string(),
            user_id,
            state: serde_json::to_string(state).map_err(|_| LoginError::Internal)?,
            expires_ms: now + CEREMONY_TTL.as_millis() as i64,
        };
        self.store.put_ceremony(&ceremony, now).await?;
        Ok(id)
    }

    /// Takes a ceremony's state back (once: it is deleted in the same statement).
    async fn take_ceremony<S: serde::de::DeserializeOwned>(
        &self,
        id: &str,
        purpose: Purpose,
    ) -> Result<(Option<i64>, S), PasskeyError> {
        let c = self
            .store
            .take_ceremony(id, purpose.as_str(), now_ms())
            .await?
            .ok_or(PasskeyError::Expired)?;
        let state = serde_json::from_str(&c.state).map_err(|_| PasskeyError::Expired)?;
        Ok((c.user_id, state))
    }

    /// Counts a ceremony started without a session; 429 once the address has had its share.
    fn count_start(&self, client: &ClientInfo) -> Result<(), PasskeyError> {
        let n = self.passkey_starts.get(&client.ip).unwrap_or(0) + 1;
        self.passkey_starts.insert(client.ip.clone(), n);
        if n > MAX_STARTS_PER_IP {
            return Err(LoginError::Throttled(CEREMONY_TTL).into());
        }
        Ok(())
    }

    fn count_passkey(&self, event: &str) {
        self.metrics.counter(Family::Passkeys, &[event]).inc();
    }

    async fn audit_passkey(
        &self,
        event: &str,
        outcome: &str,
        user: Option<&User>,
        client: &ClientInfo,
        detail: String,
    ) {
        let mut e = self.audit_entry(
            event,
            outcome,
            user.map(|u| (u.id, u.name.as_str())),
            client,
        );
        e.detail = detail;
        self.audit(e).await;
    }

    /// The user's passkeys.
    pub async fn passkeys_of(&self, user_id: i64) -> Result<Vec<PasskeyRecord>, StoreError> {
        self.store.passkeys_of(user_id).await
    }

    /// Starts registering a passkey for the signed-in user, after their password (and code) or
    /// a passkey confirmation.
    pub async fn passkey_register_start(
        &self,
        identity: &Identity,
        proof: Reauth,
        client: &ClientInfo,
    ) -> Result<Started, PasskeyError> {
        self.reauthenticate(identity, proof, client, "passkey_add")
            .await?;
        let user = self
            .store
            .find_user_by_id(identity.user_id)
            .await?
            .ok_or(PasskeyError::Expired)?;
        self.start_registration(&user).await
    }

    /// A registration ceremony for `user` (who has been vouched for by the caller).
    async fn start_registration(&self, user: &User) -> Result<Started, PasskeyError> {
        let handle = self
            .store
            .passkey_handle(user.id, &uuid::Uuid::new_v4().to_string())
            .await?;
        let handle = uuid::Uuid::parse_str(&handle)
            .map_err(|_| StoreError::Corrupt(format!("passkey handle of {}", user.name)))?;
        let exclude = self
            .store
            .passkeys_of(user.id)
            .await?
            .iter()
            .filter_map(|p| URL_SAFE_NO_PAD.decode(&p.cred_id).ok())
            .collect();
        let rp = self.relying_party();
        let builder = rp
            .new_challenge_register_builder(handle.as_bytes(), &user.name, &user.name)?
            .attestation(AttestationConveyancePreference::None)
            .user_verification_policy(UserVerificationPolicy::Preferred)
            .require_resident_key(true)
            .exclude_credentials(Some(exclude));
        let (options, state) = rp.generate_challenge_register(builder)?;
        let ceremony = self
            .keep_ceremony(Purpose::Register, Some(user.id), &state)
            .await?;
        Ok(Started {
            ceremony,
            options: serde_json::to_value(options).map_err(|_| LoginError::Internal)?,
        })
    }

    /// Finishes a registration: the browser's credential, checked against the ceremony, is
    /// stored under `label`. A credential id registered to any account is refused.
    pub async fn passkey_register_finish(
        &self,
        identity: &Identity,
        ceremony: &str,
        credential: &str,
        label: &str,
        client: &ClientInfo,
    ) -> Result<PasskeyRecord, PasskeyError> {
        let user = self
            .store
            .find_user_by_id(identity.user_id)
            .await?
            .ok_or(PasskeyError::Expired)?;
        let (id, cred_id) = self
            .add_registered(&user, ceremony, credential, label, "account page", client)
            .await?;
        self.store
            .find_passkey(&cred_id)
            .await?
            .filter(|p| p.id == id)
            .ok_or(PasskeyError::NoSuchPasskey)
    }

    /// Checks a registration answer for `user` and stores the passkey (a credential id
    /// registered anywhere already is refused); its id and credential id.
    async fn add_registered(
        &self,
        user: &User,
        ceremony: &str,
        credential: &str,
        label: &str,
        how: &str,
        client: &ClientInfo,
    ) -> Result<(i64, String), PasskeyError> {
        let new = self
            .check_registration(user, ceremony, credential, label, client)
            .await?;
        let e = self.registered(user, &new, how, client);
        let passkey = &new;
        let id = match self
            .audited(e, |s| async move { s.add_passkey(passkey).await })
            .await
        {
            Ok(id) => id,
            Err(StoreError::Conflict(_)) => return Err(self.duplicate(user, client).await),
            Err(e) => return Err(e.into()),
        };
        self.count_passkey("registered");
        Ok((id, new.cred_id))
    }

    /// Starts the registration that a user who must sign in with a passkey, and has none, owes
    /// at sign-in (after their other factors, before any session).
    pub async fn passkey_enrol_start(
        &self,
        pending_token: &str,
        client: &ClientInfo,
    ) -> Result<Started, PasskeyError> {
        self.count_start(client)?;
        let (_, user) = self
            .pending_user(pending_token, PendingStage::Passkey)
            .await?;
        self.start_registration(&user).await
    }

    /// Finishes that registration; the sign-in then goes on (to its session).
    pub async fn passkey_enrol_finish(
        &self,
        pending_token: &str,
        ceremony: &str,
        credential: &str,
        label: &str,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginStep, PasskeyError> {
        let (claims, user) = self
            .pending_user(pending_token, PendingStage::Passkey)
            .await?;
        self.add_registered(
            &user,
            ceremony,
            credential,
            label,
            "required at sign-in",
            client,
        )
        .await?;
        self.spend_pending(&claims.jti);
        // The factors this sign-in passed before the step (the new passkey proves nothing yet).
        Ok(self
            .after_factors(
                &user,
                super::factors_before_step(&claims, &user),
                Channel::Form,
                kind,
                client,
                self.resumed_sso(&claims),
            )
            .await?)
    }

    /// Starts registering a passkey through an administrator's one-time link.
    pub async fn passkey_link_start(
        &self,
        token: &str,
        client: &ClientInfo,
    ) -> Result<Started, PasskeyError> {
        self.count_start(client)?;
        let user = self.link_user(token).await?;
        self.start_registration(&user).await
    }

    /// Finishes a registration through a one-time link: the link is used, the passkey stored
    /// and every device of the user signed out, in one write.
    pub async fn passkey_link_finish(
        &self,
        token: &str,
        ceremony: &str,
        credential: &str,
        label: &str,
        client: &ClientInfo,
    ) -> Result<(), PasskeyError> {
        let user = self.link_user(token).await?;
        let new = self
            .check_registration(&user, ceremony, credential, label, client)
            .await?;
        let hash = super::account::link_hash(token);
        let e = self.registered(
            &user,
            &new,
            "one-time link; signed out every device",
            client,
        );
        let passkey = &new;
        let redeemed = self
            .audited(e, |s| async move {
                s.redeem_passkey_link(&hash, passkey, now_ms()).await
            })
            .await;
        match redeemed {
            Ok(Some(event)) => self.apply(&[event]),
            Ok(None) => return Err(PasskeyError::LinkNotValid),
            Err(StoreError::Conflict(_)) => return Err(self.duplicate(&user, client).await),
            Err(e) => return Err(e.into()),
        }
        self.count_passkey("registered");
        Ok(())
    }

    /// The user a valid passkey link names.
    async fn link_user(&self, token: &str) -> Result<User, PasskeyError> {
        match super::account::passkey_link_state(&self.store, token).await? {
            crate::store::ResetLinkState::Valid { user_id } => self
                .store
                .find_user_by_id(user_id)
                .await?
                .filter(|u| !u.disabled)
                .ok_or(PasskeyError::LinkNotValid),
            _ => Err(PasskeyError::LinkNotValid),
        }
    }

    /// Audits a refused duplicate credential id.
    async fn duplicate(&self, user: &User, client: &ClientInfo) -> PasskeyError {
        self.audit_passkey(
            "passkey_add",
            "failure",
            Some(user),
            client,
            "credential already registered".into(),
        )
        .await;
        PasskeyError::Duplicate
    }

    /// The audit entry of a passkey registered (written with it).
    fn registered(
        &self,
        user: &User,
        new: &NewPasskey,
        how: &str,
        client: &ClientInfo,
    ) -> AuditEntry {
        let verified = if new.user_verified {
            "user verified"
        } else {
            "without user verification"
        };
        let mut e = self.audit_entry(
            "passkey_add",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = format!("passkey `{}` ({verified}; {how})", new.label);
        e
    }

    /// Checks a registration answer against the ceremony kept for `user`; the passkey to
    /// store.
    async fn check_registration(
        &self,
        user: &User,
        ceremony: &str,
        credential: &str,
        label: &str,
        client: &ClientInfo,
    ) -> Result<NewPasskey, PasskeyError> {
        let label = label.trim();
        if !label_ok(label) {
            return Err(PasskeyError::BadLabel);
        }
        let (owner, state): (_, RegistrationState) =
            self.take_ceremony(ceremony, Purpose::Register).await?;
        if owner != Some(user.id) {
            return Err(PasskeyError::Expired);
        }
        let reg: RegisterPublicKeyCredential = parse(credential)?;
        let result = self.relying_party().register_credential(&reg, &state, None);
        let cred = match result {
            Ok(c) => c,
            Err(e) => {
                let e = PasskeyError::from(e);
                self.audit_passkey("passkey_add", "failure", Some(user), client, e.to_string())
                    .await;
                return Err(e);
            }
        };
        // A user who must sign in with a passkey and has no TOTP would be locked out by one
        // that cannot verify them (it is one factor, and their password opens nothing): on the
        // account page, at sign-in and through an administrator's link alike.
        if !cred.user_verified && !user.totp_enabled && self.passkey_required(user) {
            self.audit_passkey(
                "passkey_add",
                "failure",
                Some(user),
                client,
                format!("passkey `{label}`: without user verification"),
            )
            .await;
            return Err(PasskeyError::NotVerified);
        }
        let aaguid = aaguid_of(reg.response.attestation_object.as_ref()).unwrap_or_default();
        Ok(NewPasskey {
            user_id: user.id,
            cred_id: URL_SAFE_NO_PAD.encode(cred.cred_id.as_slice()),
            rp_id: self.config().webauthn.rp_id.clone(),
            label: label.to_string(),
            aaguid,
            credential: serde_json::to_string(&cred).map_err(|_| LoginError::Internal)?,
            counter: i64::from(cred.counter),
            created_ms: now_ms(),
            user_verified: cred.user_verified,
        })
    }

    /// Starts a passkey sign-in: for `user_name`'s own credentials when the name is known and
    /// has passkeys, else for any discoverable credential (so the answer does not tell whether
    /// a name exists).
    pub async fn passkey_login_start(
        &self,
        user_name: Option<&str>,
        client: &ClientInfo,
    ) -> Result<Started, PasskeyError> {
        self.count_start(client)?;
        let mut owner = None;
        let mut creds = Vec::new();
        if let Some(name) = user_name.map(crate::auth::canonical_user_name) {
            if let Some(user) = self.store.find_user(&name).await? {
                creds = self.credentials_of(user.id).await?;
                if !creds.is_empty() {
                    owner = Some(user.id);
                }
            }
        }
        self.start_assertion(Purpose::Login, owner, creds).await
    }

    /// The user's passkeys as webauthn-rs credentials (a row that cannot be read is left out).
    async fn credentials_of(&self, user_id: i64) -> Result<Vec<Credential>, StoreError> {
        Ok(self
            .store
            .passkeys_of(user_id)
            .await?
            .iter()
            .filter_map(|p| serde_json::from_str(&p.credential).ok())
            .collect())
    }

    async fn start_assertion(
        &self,
        purpose: Purpose,
        owner: Option<i64>,
        creds: Vec<Credential>,
    ) -> Result<Started, PasskeyError> {
        let rp = self.relying_party();
        let builder =
            rp.new_challenge_authenticate_builder(creds, Some(UserVerificationPolicy::Preferred))?;
        let (options, state) = rp.generate_challenge_authenticate(builder)?;
        let ceremony = self.keep_ceremony(purpose, owner, &state).await?;
        Ok(Started {
            ceremony,
            options: serde_json::to_value(options).map_err(|_| LoginError::Internal)?,
        })
    }

    /// Checks an assertion against a ceremony: the credential must be registered (to the
    /// ceremony's user, if it named one, and to the user its user handle names, if it carries
    /// one), the signature, origin, rp id and challenge valid, and the counter must move
    /// forward. Returns the user, the credential and whether the user was verified.
    async fn verify_assertion(
        &self,
        ceremony: &str,
        purpose: Purpose,
        credential: &str,
        client: &ClientInfo,
    ) -> Result<(User, PasskeyRecord, bool), PasskeyError> {
        let now = now_ms();
        if let Gate::Wait(d) | Gate::Locked(d) = self.throttle.ip_gate(client.ip_addr(), now) {
            return Err(LoginError::Throttled(d).into());
        }
        let (owner, state): (_, AuthenticationState) =
            self.take_ceremony(ceremony, purpose).await?;
        let rsp: PublicKeyCredential = parse(credential)?;
        let cred_id = URL_SAFE_NO_PAD.encode(rsp.raw_id.as_slice());
        let record = self.store.find_passkey(&cred_id).await?;
        let Some(record) = record.filter(|r| owner.is_none_or(|o| o == r.user_id)) else {
            self.throttle.ip_failed(client.ip_addr(), now);
            return Err(PasskeyError::UnknownCredential);
        };
        let mark = self.failures_mark();
        let user = self
            .store
            .find_user_by_id(record.user_id)
            .await?
            .ok_or(PasskeyError::UnknownCredential)?;
        if let Some(handle) = rsp.get_user_unique_id() {
            let known = self.store.passkey_user(&uuid_text(handle)).await?;
            if known != Some(user.id) {
                self.throttle.ip_failed(client.ip_addr(), now);
                return Err(PasskeyError::UnknownCredential);
            }
        }
        if user.disabled {
            return Err(LoginError::Disabled.into());
        }
        match self.account_gate(&user, mark, now).await? {
            Gate::Open => {}
            Gate::Wait(d) => return Err(LoginError::Throttled(d).into()),
            Gate::Locked(_) => return Err(LoginError::Locked.into()),
        }
        let mut cred: Credential = serde_json::from_str(&record.credential)
            .map_err(|_| StoreError::Corrupt(format!("passkey {}", record.id)))?;
        let result = self
            .relying_party()
            .authenticate_single_credential(&rsp, &state, &cred);
        let checked = match result {
            Ok(r) => r,
            Err(e) => {
                let e = PasskeyError::from(e);
                return Err(self.assertion_failed(e, &user, &record, client).await);
            }
        };
        let before = cred.counter;
        cred.counter = checked.counter();
        cred.backup_state = checked.backup_state();
        cred.backup_eligible = checked.backup_eligible();
        let json = serde_json::to_string(&cred).map_err(|_| LoginError::Internal)?;
        let moved = self
            .store
            .record_passkey_use(
                record.id,
                i64::from(before),
                &json,
                i64::from(cred.counter),
                now,
            )
            .await?;
        if !moved {
            let e = PasskeyError::PossibleClone;
            return Err(self.assertion_failed(e, &user, &record, client).await);
        }
        Ok((user, record, checked.user_verified()))
    }

    /// Counts, audits (and for a possible clone, flags) a failed assertion; returns the error.
    async fn assertion_failed(
        &self,
        e: PasskeyError,
        user: &User,
        record: &PasskeyRecord,
        client: &ClientInfo,
    ) -> PasskeyError {
        if matches!(e, PasskeyError::PossibleClone) {
            if let Err(s) = self.store.flag_passkey_clone(record.id, now_ms()).await {
                self.store_error("flag_passkey_clone", s);
            }
            self.count_passkey("clone_warning");
            self.audit_passkey(
                "passkey_clone_warning",
                "refused",
                Some(user),
                client,
                format!(
                    "passkey `{}`: signature counter did not increase",
                    record.label
                ),
            )
            .await;
        } else {
            self.audit_passkey(
                "passkey_login",
                "failure",
                Some(user),
                client,
                format!("passkey `{}`: {e}", record.label),
            )
            .await;
        }
        if e.counts_as_failure() {
            // Like a wrong password: the address's count, and the account's (delays, lock).
            self.throttle.ip_failed(client.ip_addr(), now_ms());
            self.record_account_failure(Some(user), client).await;
        }
        e
    }

    /// Finishes a passkey sign-in. With user verification the passkey is both factors; without,
    /// the TOTP step follows (or the sign-in is refused when the user has no TOTP).
    pub async fn passkey_login_finish(
        &self,
        ceremony: &str,
        credential: &str,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginStep, PasskeyError> {
        let (user, record, verified) = self
            .verify_assertion(ceremony, Purpose::Login, credential, client)
            .await?;
        let how = if verified {
            "user verified"
        } else {
            "not verified"
        };
        if !verified && !user.totp_enabled {
            self.audit_passkey(
                "passkey_login",
                "failure",
                Some(&user),
                client,
                format!("passkey `{}`: {how}, no other second factor", record.label),
            )
            .await;
            return Err(PasskeyError::NotVerified);
        }
        self.audit_passkey(
            "passkey_login",
            "success",
            Some(&user),
            client,
            format!("passkey `{}` ({how})", record.label),
        )
        .await;
        if !verified {
            return Ok(self.pending(&user, PendingStage::Totp, None, &["hwk".to_string()])?);
        }
        let amr = vec!["hwk".to_string(), "uv".to_string()];
        Ok(self
            .after_factors(&user, amr, Channel::Form, kind, client, None)
            .await?)
    }

    /// Starts a passkey as the second factor of a pending password login.
    pub async fn passkey_second_factor_start(
        &self,
        pending_token: &str,
    ) -> Result<Started, PasskeyError> {
        let (_, user) = self.pending_user(pending_token, PendingStage::Totp).await?;
        let creds = self.credentials_of(user.id).await?;
        if creds.is_empty() {
            return Err(PasskeyError::UnknownCredential);
        }
        self.start_assertion(Purpose::SecondFactor, Some(user.id), creds)
            .await
    }

    /// Finishes a passkey as the second factor after the password (verified or not: the
    /// password is the other factor).
    pub async fn passkey_second_factor_finish(
        &self,
        pending_token: &str,
        ceremony: &str,
        credential: &str,
        kind: SessionKind,
        client: &ClientInfo,
    ) -> Result<LoginStep, PasskeyError> {
        let (claims, pending) = self.pending_user(pending_token, PendingStage::Totp).await?;
        let (user, record, _) = self
            .verify_assertion(ceremony, Purpose::SecondFactor, credential, client)
            .await?;
        if user.id != pending.id {
            return Err(PasskeyError::UnknownCredential);
        }
        self.spend_pending(&claims.jti);
        self.audit_passkey(
            "passkey_second_factor",
            "success",
            Some(&user),
            client,
            format!("passkey `{}`", record.label),
        )
        .await;
        let first = if claims.sso.is_some() { "sso" } else { "pwd" };
        let amr = vec![first.to_string(), "hwk".to_string()];
        Ok(self
            .after_factors(
                &user,
                amr,
                Channel::Form,
                kind,
                client,
                self.resumed_sso(&claims),
            )
            .await?)
    }

    /// Starts the signed-in user's confirmation of a sensitive action with one of their
    /// passkeys (in place of the password and code).
    pub async fn passkey_confirm_start(&self, user: &User) -> Result<Started, PasskeyError> {
        let creds = self.credentials_of(user.id).await?;
        if creds.is_empty() {
            return Err(PasskeyError::UnknownCredential);
        }
        self.start_assertion(Purpose::Confirm, Some(user.id), creds)
            .await
    }

    /// Checks a confirmation: the user's own passkey, and it verified them (both factors).
    pub async fn passkey_confirm(
        &self,
        user: &User,
        ceremony: &str,
        credential: &str,
        client: &ClientInfo,
    ) -> Result<(), PasskeyError> {
        let (who, record, verified) = self
            .verify_assertion(ceremony, Purpose::Confirm, credential, client)
            .await?;
        if who.id != user.id {
            return Err(PasskeyError::UnknownCredential);
        }
        if !verified {
            return Err(PasskeyError::NotVerified);
        }
        self.audit_passkey(
            "passkey_confirm",
            "success",
            Some(user),
            client,
            format!("passkey `{}`", record.label),
        )
        .await;
        Ok(())
    }

    /// Confirms the signed-in user with one of their passkeys (user verified) and returns a
    /// grant that stands in for the password and code in the next sensitive change of this
    /// session: single use, for five minutes, kept in the store (any replica takes it) by its
    /// hash only.
    pub async fn passkey_grant(
        &self,
        identity: &Identity,
        user: &User,
        ceremony: &str,
        credential: &str,
        client: &ClientInfo,
    ) -> Result<String, PasskeyError> {
        self.passkey_confirm(user, ceremony, credential, client)
            .await?;
        let grant = hex::encode(rand::random::<[u8; 32]>());
        let now = now_ms();
        let row = Ceremony {
            id: token_hash(&grant),
            purpose: Purpose::Grant.as_str().to_string(),
            user_id: Some(user.id),
            state: identity.sid.to_string(),
            expires_ms: now + CEREMONY_TTL.as_millis() as i64,
        };
        self.store.put_ceremony(&row, now).await?;
        Ok(grant)
    }

    /// Takes a passkey grant of this session (once); refused when it is unknown, used,
    /// expired, or another session's.
    pub async fn take_passkey_grant(
        &self,
        identity: &Identity,
        grant: &str,
    ) -> Result<(), AccountError> {
        let row = self
            .store
            .take_ceremony(&token_hash(grant), Purpose::Grant.as_str(), now_ms())
            .await?;
        match row {
            Some(r)
                if r.user_id == Some(identity.user_id)
                    && r.state
                        .as_bytes()
                        .ct_eq(identity.sid.to_string().as_bytes())
                        .into() =>
            {
                Ok(())
            }
            _ => Err(AccountError::PasskeyGrantNotValid),
        }
    }

    /// Renames one of the user's passkeys.
    pub async fn passkey_rename(
        &self,
        user: &User,
        id: i64,
        label: &str,
        client: &ClientInfo,
    ) -> Result<(), PasskeyError> {
        let label = label.trim();
        if !label_ok(label) {
            return Err(PasskeyError::BadLabel);
        }
        if !self.store.rename_passkey(user.id, id, label).await? {
            return Err(PasskeyError::NoSuchPasskey);
        }
        self.audit_passkey(
            "passkey_rename",
            "success",
            Some(user),
            client,
            format!("passkey {id} is now `{label}`"),
        )
        .await;
        Ok(())
    }

    /// Removes one of the user's passkeys; with `signout`, also ends every session it signed
    /// in (all of the user's sessions: sessions do not record which passkey opened them). A
    /// user who must sign in with a passkey keeps at least one.
    pub async fn passkey_remove(
        &self,
        user: &User,
        id: i64,
        signout: bool,
        client: &ClientInfo,
    ) -> Result<(), PasskeyError> {
        let mine = self.store.passkeys_of(user.id).await?;
        let Some(record) = mine.iter().find(|p| p.id == id) else {
            return Err(PasskeyError::NoSuchPasskey);
        };
        let mut e = self.audit_entry(
            "passkey_remove",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = format!(
            "passkey `{}`{}",
            record.label,
            if signout {
                "; signed out every device"
            } else {
                ""
            }
        );
        let uid = user.id;
        // The store keeps the last passkey of a user who must use one, in the same write.
        let keep_last = self.passkey_required(user);
        match self
            .audited(
                e,
                |s| async move { s.remove_passkey(uid, id, keep_last).await },
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(PasskeyError::NoSuchPasskey),
            Err(StoreError::Conflict(_)) => {
                let e = PasskeyError::LastMethod;
                let detail = format!("passkey `{}`: {e}", record.label);
                self.audit_passkey("passkey_remove", "failure", Some(user), client, detail)
                    .await;
                return Err(e);
            }
            Err(e) => return Err(e.into()),
        }
        self.count_passkey("removed");
        if signout {
            let event = self.store.signout_user(uid, now_ms()).await?;
            self.apply(&[event]);
        }
        Ok(())
    }

    /// Whether this user must sign in with a passkey only: asked of them by an administrator or
    /// a breach response, or of everyone (or every admin) by `auth.require_passkey`.
    pub fn passkey_required(&self, user: &User) -> bool {
        user.passkey_required
            || match self.config().auth.require_passkey {
                crate::config::RequirePasskey::Off => false,
                crate::config::RequirePasskey::Admins => user.is_admin,
                crate::config::RequirePasskey::All => true,
            }
    }
}

/// Why `rp_id` cannot be the relying-party id now, if it cannot: passkeys registered for
/// another id would stop working (browsers offer a passkey only to the id it was made for).
pub async fn rp_id_conflict(
    store: &crate::store::DynStore,
    rp_id: &str,
) -> Result<Option<String>, StoreError> {
    let others: Vec<String> = store
        .passkey_rp_ids()
        .await?
        .into_iter()
        .filter(|id| id != rp_id)
        .collect();
    Ok((!others.is_empty()).then(|| {
        format!(
            "`{rp_id}` differs from `{}`, which passkeys are registered for: they would all stop \
             working. Keep the old id (set `[webauthn] rp_id`), or remove those passkeys first",
            others.join("`, `")
        )
    }))
}

/// A user handle (16 bytes) as the UUID text it is stored as; other lengths give a text no
/// handle has.
fn uuid_text(handle: &[u8]) -> String {
    uuid::Uuid::from_slice(handle)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aaguid_is_read_from_the_attestation_object() {
        let mut auth_data = vec![0u8; 32];
        auth_data.push(0x45); // UP, UV, AT
        auth_data.extend([0, 0, 0, 0]);
        let aaguid = uuid::Uuid::parse_str("bada5566-a7aa-401f-bd96-45619a55120d").unwrap();
        auth_data.extend(aaguid.as_bytes());
        auth_data.extend([0, 1, 9]);
        let mut obj = vec![0xa3, 0x63];
        obj.extend(b"fmt");
        obj.extend([0x64]);
        obj.extend(b"none");
        obj.extend([0x67]);
        obj.extend(b"attStmt");
        obj.push(0xa0);
        obj.extend(b"\x68authData");
        obj.extend([0x58, auth_data.len() as u8]);
        obj.extend(&auth_data);
        let read = aaguid_of(&obj).unwrap();
        assert_eq!(read, aaguid.to_string());
        assert_eq!(authenticator_name(&read), Some("1Password"));
        // Without the AT flag, or cut short: nothing.
        let mut no_at = obj.clone();
        let flags = obj.len() - auth_data.len() + 32;
        no_at[flags] = 0x05;
        assert_eq!(aaguid_of(&no_at), None);
        assert_eq!(aaguid_of(&obj[..obj.len() - 10]), None);
        assert_eq!(aaguid_of(b"\x68authData\x20"), None);
    }

    #[test]
    fn labels_are_short_and_printable() {
        assert!(label_ok("Phone"));
        assert!(!label_ok(""));
        assert!(!label_ok(&"x".repeat(MAX_LABEL_CHARS + 1)));
        assert!(!label_ok("a\nb"));
    }
}
