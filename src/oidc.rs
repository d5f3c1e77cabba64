//! Single sign-on: the OpenID Connect relying party. Owns each configured provider's discovered
//! metadata and signing keys (fetched in the background until the provider answers, refetched
//! on an unknown key id at most every [`JWKS_REFRESH_MIN`]), the authorisation request (PKCE
//! S256, `state`, `nonce`), the code exchange, and the checks of ID tokens and back-channel
//! logout tokens. Token checks are pure functions of the token, the keys and the time, in a
//! fixed order: parse, pinned algorithm, key, signature, issuer, audience, times, then the
//! token kind's own claims. What the gateway does with a validated login lives in `app::sso`.
//! Plain http to a provider is allowed as [`client::PlainHttp`] decides once from the configured
//! issuer; a discovery document cannot widen it.

pub mod client;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ClientSecretSource, OidcProviderConfig, Secret};
use client::{HttpError, PlainHttp, ProviderClient};

/// Leeway for `exp`, `nbf` and `iat` of provider tokens, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// A back-channel logout token older than this (by `iat`) is refused, so its `jti` need only be
/// remembered this long: seconds.
pub const LOGOUT_TOKEN_MAX_AGE_SECS: i64 = 600;
/// The provider's keys are refetched on an unknown key id at most this often.
pub const JWKS_REFRESH_MIN: Duration = Duration::from_secs(10);
/// Discovery is retried with a delay doubling from this…
pub const DISCOVERY_RETRY_MIN: Duration = Duration::from_millis(500);
/// …up to this.
pub const DISCOVERY_RETRY_MAX: Duration = Duration::from_secs(30);
/// The event a back-channel logout token must carry.
pub const BACKCHANNEL_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// Why a provider token (ID token or logout token) is refused. Labels are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's algorithm is not one of the pinned algorithms")]
    WrongAlgorithm,
    #[error("the token names a key the provider does not publish")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has another issuer")]
    WrongIssuer,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token's authorised party is another client")]
    WrongAuthorizedParty,
    #[error("the token has expired")]
    Expired,
    #[error("the token is issued in the future")]
    IssuedInFuture,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is too old")]
    TooOld,
    #[error("the token's nonce does not match this sign-in")]
    WrongNonce,
    #[error("the token has no subject")]
    NoSubject,
    #[error("the token is not a back-channel logout token")]
    NotLogoutToken,
    #[error("a logout token must not carry a nonce")]
    NonceInLogoutToken,
    #[error("the logout token names neither a subject nor a session")]
    NoSubjectOrSession,
    #[error("the logout token has no jti")]
    NoJti,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "malformed",
            TokenRefusal::WrongAlgorithm => "wrong_algorithm",
            TokenRefusal::UnknownKey => "unknown_key",
            TokenRefusal::BadSignature => "bad_signature",
            TokenRefusal::WrongIssuer => "wrong_issuer",
            TokenRefusal::WrongAudience => "wrong_audience",
            TokenRefusal::WrongAuthorizedParty => "wrong_azp",
            TokenRefusal::Expired => "expired",
            TokenRefusal::IssuedInFuture => "issued_in_future",
            TokenRefusal::NotYetValid => "not_yet_valid",
            TokenRefusal::TooOld => "too_old",
            TokenRefusal::WrongNonce => "wrong_nonce",
            TokenRefusal::NoSubject => "no_subject",
            TokenRefusal::NotLogoutToken => "not_logout_token",
            TokenRefusal::NonceInLogoutToken => "nonce_in_logout_token",
            TokenRefusal::NoSubjectOrSession => "no_sub_or_sid",
            TokenRefusal::NoJti => "no_jti",
        }
    }
}

/// Errors of a provider: discovery, keys, the token exchange.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the provider's discovery has not succeeded yet: {0}")]
    NotDiscovered(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the provider's discovery document is unusable: {0}")]
    Discovery(String),
    #[error("the provider's key set is unusable: {0}")]
    Keys(String),
    #[error("the provider's token answer is unusable: {0}")]
    TokenAnswer(String),
    #[error("the client secret cannot be read from {source_name}: {problem}")]
    Secret {
        source_name: String,
        problem: String,
    },
}

/// What the gateway uses of a provider's discovery document.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub issuer: String,
    pub authorization_endpoint: url::Url,
    pub token_endpoint: url::Url,
    pub userinfo_endpoint: Option<url::Url>,
    pub jwks_uri: url::Url,
    pub end_session_endpoint: Option<url::Url>,
    /// The configured algorithms the provider also lists for ID tokens.
    pub algorithms: Vec<Algorithm>,
}

/// One verification key of a provider.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    /// The `alg` the key is published for, if the provider says.
    pub alg: Option<Algorithm>,
    pub key: DecodingKey,
}

/// The signature algorithm a published key is restricted to, or `None` when its `alg` is not
/// a (non-HMAC) signature algorithm: such a key is no verification key at all.
fn signature_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    let alg = match a {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    Some(alg)
}

/// Reads the provider's published keys: signature keys only, never symmetric ones. A key whose
/// `use` is not `sig`, whose `key_ops` lack `verify`, or whose `alg` is not a signature
/// algorithm (`RSA-OAEP`, `ECDH-ES` …) is dropped: it would otherwise verify tokens of any
/// algorithm of its family.
pub fn keys_from_jwks(set: &JwkSet) -> Vec<VerifyKey> {
    set.keys
        .iter()
        .filter(|k| {
            matches!(
                k.common.public_key_use,
                None | Some(PublicKeyUse::Signature)
            )
        })
        .filter(|k| {
            k.common
                .key_operations
                .as_ref()
                .is_none_or(|ops| ops.contains(&KeyOperations::Verify))
        })
        .filter(|k| {
            matches!(
                k.algorithm,
                AlgorithmParameters::RSA(_)
                    | AlgorithmParameters::EllipticCurve(_)
                    | AlgorithmParameters::OctetKeyPair(_)
            )
        })
        .filter_map(|k| {
            let alg = match k.common.key_algorithm {
                None => None,
                Some(a) => Some(signature_alg(a)?),
            };
            DecodingKey::from_jwk(k).ok().map(|key| VerifyKey {
                kid: k.common.key_id.clone(),
                alg,
                key,
            })
        })
        .collect()
}

/// `aud` as one string or a list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, id: &str) -> bool {
        match self {
            Audience::One(a) => a == id,
            Audience::Many(l) => l.iter().any(|a| a == id),
        }
    }
    fn len(&self) -> usize {
        match self {
            Audience::One(_) => 1,
            Audience::Many(l) => l.len(),
        }
    }
}

/// The claims of an ID token (and of userinfo, merged in) that the gateway reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IdClaims {
    pub iss: String,
    #[serde(default)]
    pub sub: String,
    pub aud: Audience,
    pub exp: i64,
    pub iat: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub azp: Option<String>,
    #[serde(default)]
    pub sid: Option<String>,
    #[serde(default)]
    pub amr: Option<Vec<String>>,
    #[serde(default)]
    pub acr: Option<String>,
    /// Every other claim (email, email_verified, preferred_username, groups …).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl IdClaims {
    /// A string claim.
    pub fn string(&self, name: &str) -> Option<&str> {
        self.other.get(name).and_then(Value::as_str)
    }
    /// `email_verified`, which some providers send as a string.
    pub fn email_verified(&self) -> bool {
        match self.other.get("email_verified") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s == "true",
            _ => false,
        }
    }
    /// Whether a claim holds `value`, or is a list that holds it.
    pub fn claim_has(&self, name: &str, value: &str) -> bool {
        match self.other.get(name) {
            Some(Value::String(s)) => s == value,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(value)),
            _ => false,
        }
    }
}

/// The claims of a back-channel logout token.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogoutClaims {
    pub iss: String,
    pub aud: Audience,
    pub iat: i64,
    #[serde(default)]
    pub exp: Option<i64>,
    #[serde(default)]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub jti: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub sid: Option<String>,
    #[serde(default)]
    pub nonce: Option<Value>,
    #[serde(default)]
    pub events: Option<serde_json::Map<String, Value>>,
}

/// Checks a JWT's header, algorithm, key and signature, issuer and audience, and returns its
/// claims. `keys` are the provider's current keys; `UnknownKey` tells the caller to refetch.
pub fn verify_signed<T: serde::de::DeserializeOwned>(
    token: &str,
    keys: &[VerifyKey],
    algorithms: &[Algorithm],
    issuer: &str,
    audience: &str,
) -> Result<(jsonwebtoken::Header, T), TokenRefusal> {
    if token.len() > 16 * 1024 || token.split('.').count() != 3 {
        return Err(TokenRefusal::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName
        | jsonwebtoken::errors::ErrorKind::UnsupportedAlgorithm => TokenRefusal::WrongAlgorithm,
        _ => TokenRefusal::Malformed,
    })?;
    if !algorithms.contains(&header.alg)
        || header.alg.family() == jsonwebtoken::AlgorithmFamily::Hmac
    {
        return Err(TokenRefusal::WrongAlgorithm);
    }
    let candidates: Vec<&VerifyKey> = keys
        .iter()
        .filter(|k| match (&header.kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
            (None, _) => true,
        })
        .filter(|k| k.key.family() == header.alg.family())
        .filter(|k| k.alg.is_none_or(|a| a == header.alg))
        .collect();
    if candidates.is_empty() {
        return Err(TokenRefusal::UnknownKey);
    }
    let mut validation = Validation::new(header.alg);
    validation.algorithms = vec![header.alg];
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = LEEWAY_SECS as u64;
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["iss", "aud"]);
    let mut last = TokenRefusal::BadSignature;
    for k in candidates {
        match jsonwebtoken::decode::<T>(token, &k.key, &validation) {
            Ok(data) => return Ok((header, data.claims)),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature => TokenRefusal::BadSignature,
                    K::InvalidAlgorithm => TokenRefusal::WrongAlgorithm,
                    K::InvalidIssuer => return Err(TokenRefusal::WrongIssuer),
                    K::InvalidAudience => return Err(TokenRefusal::WrongAudience),
                    K::MissingRequiredClaim(c) if c == "aud" => {
                        return Err(TokenRefusal::WrongAudience)
                    }
                    K::MissingRequiredClaim(c) if c == "iss" => {
                        return Err(TokenRefusal::WrongIssuer)
                    }
                    _ => return Err(TokenRefusal::Malformed),
                };
            }
        }
    }
    Err(last)
}

/// The ID-token checks after the signature (OpenID Connect Core §3.1.3.7): subject, `azp`
/// when there are several audiences, `exp`, `nbf` and `iat` with [`LEEWAY_SECS`] (saturating:
/// no claim value overflows), and the nonce of this sign-in, compared in constant time.
pub fn check_id_claims(
    c: &IdClaims,
    client_id: &str,
    nonce: &str,
    now_s: i64,
) -> Result<(), TokenRefusal> {
    if c.sub.is_empty() || c.sub.len() > 255 {
        return Err(TokenRefusal::NoSubject);
    }
    if c.aud.len() > 1 && c.azp.as_deref() != Some(client_id) {
        return Err(TokenRefusal::WrongAuthorizedParty);
    }
    if let Some(azp) = &c.azp {
        if azp != client_id {
            return Err(TokenRefusal::WrongAuthorizedParty);
        }
    }
    if c.exp.saturating_add(LEEWAY_SECS) < now_s {
        return Err(TokenRefusal::Expired);
    }
    if c.nbf
        .is_some_and(|nbf| nbf > now_s.saturating_add(LEEWAY_SECS))
    {
        return Err(TokenRefusal::NotYetValid);
    }
    if c.iat > now_s.saturating_add(LEEWAY_SECS) {
        return Err(TokenRefusal::IssuedInFuture);
    }
    let same = c
        .nonce
        .as_deref()
        .is_some_and(|n| bool::from(n.as_bytes().ct_eq(nonce.as_bytes())));
    if !same {
        return Err(TokenRefusal::WrongNonce);
    }
    Ok(())
}

/// The logout-token checks after the signature (Back-Channel Logout 1.0 §2.6): `typ` if given,
/// `iat` recent, `exp` and `nbf` if given, the back-channel event, no nonce, a `jti`, a `sub`
/// or `sid`.
pub fn check_logout_claims(
    header: &jsonwebtoken::Header,
    c: &LogoutClaims,
    now_s: i64,
) -> Result<(), TokenRefusal> {
    if let Some(typ) = header.typ.as_deref() {
        if !typ.eq_ignore_ascii_case("logout+jwt") && !typ.eq_ignore_ascii_case("JWT") {
            return Err(TokenRefusal::NotLogoutToken);
        }
    }
    if c.iat > now_s.saturating_add(LEEWAY_SECS) {
        return Err(TokenRefusal::IssuedInFuture);
    }
    if c.iat.saturating_add(LOGOUT_TOKEN_MAX_AGE_SECS) < now_s {
        return Err(TokenRefusal::TooOld);
    }
    if c.exp
        .is_some_and(|exp| exp.saturating_add(LEEWAY_SECS) < now_s)
    {
        return Err(TokenRefusal::Expired);
    }
    if c.nbf
        .is_some_and(|nbf| nbf > now_s.saturating_add(LEEWAY_SECS))
    {
        return Err(TokenRefusal::NotYetValid);
    }
    let event_ok = c
        .events
        .as_ref()
        .and_then(|e| e.get(BACKCHANNEL_EVENT))
        .is_some_and(Value::is_object);
    if !event_ok {
        return Err(TokenRefusal::NotLogoutToken);
    }
    if c.nonce.is_some() {
        return Err(TokenRefusal::NonceInLogoutToken);
    }
    if c.jti
        .as_deref()
        .is_none_or(|j| j.is_empty() || j.len() > 255)
    {
        return Err(TokenRefusal::NoJti);
    }
    let sub = c.sub.as_deref().is_some_and(|s| !s.is_empty());
    let sid = c.sid.as_deref().is_some_and(|s| !s.is_empty());
    if !sub && !sid {
        return Err(TokenRefusal::NoSubjectOrSession);
    }
    Ok(())
}

/// 32 random bytes, base64url without padding (43 characters).
pub fn random_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// The PKCE S256 challenge of a verifier (RFC 7636 §4.2).
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Reads the discovery document of `issuer` (OpenID Connect Discovery 1.0 §4). Every endpoint
/// must be https, or plain http where `plain` (from the configuration) allows it.
pub fn parse_metadata(
    doc: &Value,
    cfg: &OidcProviderConfig,
    plain: PlainHttp,
) -> Result<Metadata, OidcError> {
    let text = |k: &str| doc.get(k).and_then(Value::as_str);
    let issuer = text("issuer").ok_or_else(|| OidcError::Discovery("no issuer".into()))?;
    if issuer != cfg.issuer {
        return Err(OidcError::Discovery(format!(
            "it names issuer `{issuer}`, not the configured `{}`",
            cfg.issuer
        )));
    }
    let endpoint = |k: &str| -> Result<Option<url::Url>, OidcError> {
        match text(k) {
            None => Ok(None),
            Some(u) => client::allowed(u, plain)
                .map(Some)
                .map_err(|e| OidcError::Discovery(format!("{k}: {e}"))),
        }
    };
    let required = |k: &str| -> Result<url::Url, OidcError> {
        endpoint(k)?.ok_or_else(|| OidcError::Discovery(format!("no {k}")))
    };
    let offered: Option<Vec<&str>> = doc
        .get("id_token_signing_alg_values_supported")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect());
    let algorithms: Vec<Algorithm> = cfg
        .algorithms
        .iter()
        .filter(|a| offered.as_ref().is_none_or(|o| o.contains(&a.as_str())))
        .filter_map(|a| a.parse::<Algorithm>().ok())
        .filter(|a| a.family() != jsonwebtoken::AlgorithmFamily::Hmac)
        .collect();
    if algorithms.is_empty() {
        return Err(OidcError::Discovery(format!(
            "it offers none of the configured algorithms ({})",
            cfg.algorithms.join(", ")
        )));
    }
    Ok(Metadata {
        issuer: issuer.to_string(),
        authorization_endpoint: required("authorization_endpoint")?,
        token_endpoint: required("token_endpoint")?,
        userinfo_endpoint: endpoint("userinfo_endpoint")?,
        jwks_uri: required("jwks_uri")?,
        end_session_endpoint: endpoint("end_session_endpoint")?,
        algorithms,
    })
}

/// One provider's state: its configuration, client secret, and what discovery found.
pub struct Provider {
    pub config: OidcProviderConfig,
    secret: Option<Secret>,
    /// `{public_url}/_portcullis/oidc/{id}/callback`.
    pub redirect_uri: String,
    client: ProviderClient,
    /// Where plain http may be used, from the configured issuer.
    plain_http: PlainHttp,
    metadata: RwLock<Option<Arc<Metadata>>>,
    keys: RwLock<Arc<Vec<VerifyKey>>>,
    keys_fetched: RefreshGate,
    last_error: RwLock<String>,
}

/// When the provider's keys were last fetched, for the refetch limit.
#[derive(Debug, Default)]
pub struct RefreshGate {
    last: Mutex<Option<Instant>>,
}

impl RefreshGate {
    /// Records a fetch at `now` (discovery fetches whatever the limit says).
    pub fn fetched(&self, now: Instant) {
        match self.last.lock() {
            Ok(mut l) => *l = Some(now),
            Err(p) => *p.into_inner() = Some(now),
        }
    }

    /// Claims a refetch at `now`: true, and recorded in the same critical section, unless one
    /// was made less than [`JWKS_REFRESH_MIN`] before. Of many tokens with unknown key ids
    /// arriving at once, one refetches.
    pub fn claim(&self, now: Instant) -> bool {
        let mut last = match self.last.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if last.is_some_and(|t| now.saturating_duration_since(t) < JWKS_REFRESH_MIN) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// The tokens of a successful code exchange.
pub struct Exchanged {
    /// The ID token as received (kept sealed for `id_token_hint`).
    pub id_token: String,
    pub claims: IdClaims,
}

impl Provider {
    fn new(
        config: OidcProviderConfig,
        public_url: &str,
        client: ProviderClient,
    ) -> Result<Provider, OidcError> {
        let secret = match &config.client_secret {
            ClientSecretSource::None => None,
            ClientSecretSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| OidcError::Secret {
                    source_name: format!("{} (oidc client_secret_file)", path.display()),
                    problem: e.to_string(),
                })?;
                Some(Secret::new(text.trim().to_string()))
            }
            ClientSecretSource::Env(name) => {
                let value = std::env::var(name).map_err(|_| OidcError::Secret {
                    source_name: format!("${name} (oidc client_secret_env)"),
                    problem: "the variable is not set".into(),
                })?;
                Some(Secret::new(value.trim().to_string()))
            }
        };
        if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
            return Err(OidcError::Secret {
                source_name: format!("provider {}", config.id),
                problem: "the client secret is empty".into(),
            });
        }
        Ok(Provider {
            redirect_uri: format!("{public_url}/_portcullis/oidc/{}/callback", config.id),
            plain_http: PlainHttp::for_issuer(&config.issuer, config.allow_insecure_http),
            config,
            secret,
            client,
            metadata: RwLock::new(None),
            keys: RwLock::new(Arc::new(Vec::new())),
            keys_fetched: RefreshGate::default(),
            last_error: RwLock::new("discovery has not run yet".into()),
        })
    }

    /// The discovered metadata, or why there is none yet.
    pub fn metadata(&self) -> Result<Arc<Metadata>, OidcError> {
        let m = match self.metadata.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        m.ok_or_else(|| {
            let e = match self.last_error.read() {
                Ok(e) => e.clone(),
                Err(p) => p.into_inner().clone(),
            };
            OidcError::NotDiscovered(e)
        })
    }

    fn keys(&self) -> Arc<Vec<VerifyKey>> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Fetches the discovery document and the keys once.
    pub async fn discover(&self) -> Result<(), OidcError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer.trim_end_matches('/')
        );
        let url = client::allowed(&url, self.plain_http)?;
        let doc = self.client.get_json(&url, None, "discovery").await?;
        let meta = Arc::new(parse_metadata(&doc, &self.config, self.plain_http)?);
        self.keys_fetched.fetched(Instant::now());
        self.fetch_keys(&meta).await?;
        match self.metadata.write() {
            Ok(mut m) => *m = Some(meta),
            Err(p) => *p.into_inner() = Some(meta),
        }
        Ok(())
    }

    async fn fetch_keys(&self, meta: &Metadata) -> Result<(), OidcError> {
        let doc = self.client.get_json(&meta.jwks_uri, None, "jwks").await?;
        let set: JwkSet =
            serde_json::from_value(doc).map_err(|e| OidcError::Keys(e.to_string()))?;
        let keys = keys_from_jwks(&set);
        if keys.is_empty() {
            return Err(OidcError::Keys("it holds no usable signature key".into()));
        }
        match self.keys.write() {
            Ok(mut k) => *k = Arc::new(keys),
            Err(p) => *p.into_inner() = Arc::new(keys),
        }
        Ok(())
    }

    /// Refetches the keys after an unknown key id, unless that was done very recently.
    async fn refresh_keys(&self, meta: &Metadata) -> bool {
        if !self.keys_fetched.claim(Instant::now()) {
            return false;
        }
        match self.fetch_keys(meta).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(provider = %self.config.id, error = %e, "refetching the provider's keys failed");
                false
            }
        }
    }

    /// Verifies a provider-signed token, refetching the keys once on an unknown key id.
    pub async fn verify<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<(jsonwebtoken::Header, T), TokenRefusal> {
        let meta = self.metadata().map_err(|_| TokenRefusal::UnknownKey)?;
        let check = |keys: &[VerifyKey]| {
            verify_signed::<T>(
                token,
                keys,
                &meta.algorithms,
                &meta.issuer,
                &self.config.client_id,
            )
        };
        match check(&self.keys()) {
            Err(TokenRefusal::UnknownKey) if self.refresh_keys(&meta).await => check(&self.keys()),
            other => other,
        }
    }

    /// Retries discovery with backoff until it succeeds.
    pub async fn discover_until_done(self: Arc<Self>) {
        let mut delay = DISCOVERY_RETRY_MIN;
        loop {
            match self.discover().await {
                Ok(()) => {
                    tracing::info!(provider = %self.config.id, issuer = %self.config.issuer, "single sign-on provider discovered");
                    return;
                }
                Err(e) => {
                    tracing::warn!(provider = %self.config.id, issuer = %self.config.issuer, error = %e, retry_in_ms = delay.as_millis() as u64, "single sign-on provider discovery failed");
                    match self.last_error.write() {
                        Ok(mut l) => *l = e.to_string(),
                        Err(p) => *p.into_inner() = e.to_string(),
                    }
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(DISCOVERY_RETRY_MAX);
        }
    }

    /// The authorisation request URL for one sign-in.
    pub fn authorization_url(
        &self,
        meta: &Metadata,
        state: &str,
        nonce: &str,
        verifier: &str,
    ) -> String {
        let mut url = meta.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &self.config.scopes.join(" "))
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &pkce_challenge(verifier))
            .append_pair("code_challenge_method", "S256");
        url.to_string()
    }

    /// Exchanges the code at the token endpoint and checks the ID token; merges userinfo
    /// claims the ID token lacks (same subject required).
    pub async fn exchange(
        &self,
        code: &str,
        verifier: &str,
        nonce: &str,
        now_s: i64,
    ) -> Result<Exchanged, ExchangeError> {
        let meta = self.metadata().map_err(ExchangeError::Provider)?;
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", verifier),
        ];
        let basic = match &self.secret {
            Some(s) => Some((self.config.client_id.as_str(), s.expose())),
            None => {
                form.push(("client_id", self.config.client_id.as_str()));
                None
            }
        };
        let answer = self
            .client
            .post_form(&meta.token_endpoint, &form, basic, "the token request")
            .await
            .map_err(|e| ExchangeError::Provider(e.into()))?;
        let id_token = answer
            .get("id_token")
            .and_then(Value::as_str)
            .ok_or_else(|| ExchangeError::Provider(OidcError::TokenAnswer("no id_token".into())))?
            .to_string();
        let (_, mut claims) = self
            .verify::<IdClaims>(&id_token)
            .await
            .map_err(ExchangeError::IdToken)?;
        check_id_claims(&claims, &self.config.client_id, nonce, now_s)
            .map_err(ExchangeError::IdToken)?;
        let access = answer.get("access_token").and_then(Value::as_str);
        if let (Some(access), Some(userinfo)) = (access, &meta.userinfo_endpoint) {
            let info = self
                .client
                .get_json(userinfo, Some(access), "userinfo")
                .await
                .map_err(|e| ExchangeError::Provider(e.into()))?;
            merge_userinfo(&mut claims, &info).map_err(ExchangeError::Provider)?;
        }
        Ok(Exchanged { id_token, claims })
    }

    /// The provider's end-session URL after the gateway's logout, when configured.
    pub fn end_session_url(
        &self,
        id_token_hint: Option<&str>,
        post_logout_redirect_uri: &str,
    ) -> Option<String> {
        if !self.config.end_session {
            return None;
        }
        let meta = self.metadata().ok()?;
        let mut url = meta.end_session_endpoint.clone()?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(hint) = id_token_hint {
                q.append_pair("id_token_hint", hint);
            }
            q.append_pair("client_id", &self.config.client_id)
                .append_pair("post_logout_redirect_uri", post_logout_redirect_uri);
        }
        Some(url.to_string())
    }
}

/// Adds the userinfo answer's claims that the ID token lacks. The subjects must be equal
/// (OpenID Connect Core §5.3.2); the ID token's own claims always win. `email` and
/// `email_verified` are one claim in two parts and come together from one source: the ID
/// token's when it has an email, else userinfo's (never one's address with the other's
/// verification).
pub fn merge_userinfo(claims: &mut IdClaims, info: &Value) -> Result<(), OidcError> {
    let Some(obj) = info.as_object() else {
        return Err(OidcError::TokenAnswer("userinfo is not an object".into()));
    };
    if obj.get("sub").and_then(Value::as_str) != Some(claims.sub.as_str()) {
        return Err(OidcError::TokenAnswer(
            "userinfo names another subject".into(),
        ));
    }
    for (k, v) in obj {
        let reserved = matches!(
            k.as_str(),
            "sub"
                | "iss"
                | "aud"
                | "exp"
                | "iat"
                | "nbf"
                | "nonce"
                | "azp"
                | "sid"
                | "amr"
                | "acr"
                | "email"
                | "email_verified"
        );
        if !reserved && !claims.other.contains_key(k) {
            claims.other.insert(k.clone(), v.clone());
        }
    }
    if !claims.other.contains_key("email") {
        if let Some(email) = obj.get("email") {
            claims.other.insert("email".into(), email.clone());
            match obj.get("email_verified") {
                Some(v) => claims.other.insert("email_verified".into(), v.clone()),
                None => claims.other.remove("email_verified"),
            };
        }
    }
    Ok(())
}

/// Why a code exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error(transparent)]
    Provider(OidcError),
    #[error("the ID token was refused: {0}")]
    IdToken(TokenRefusal),
}

/// Every configured provider, by id.
pub struct Providers {
    list: Vec<Arc<Provider>>,
    by_id: HashMap<String, usize>,
}

impl Providers {
    /// Builds the providers of a configuration and reads their client secrets.
    pub fn new(configs: &[OidcProviderConfig], public_url: &str) -> Result<Providers, OidcError> {
        let mut list = Vec::new();
        let mut by_id = HashMap::new();
        if !configs.is_empty() {
            let client = ProviderClient::new()?;
            for (i, c) in configs.iter().enumerate() {
                by_id.insert(c.id.clone(), i);
                list.push(Arc::new(Provider::new(
                    c.clone(),
                    public_url,
                    client.clone(),
                )?));
            }
        }
        Ok(Providers { list, by_id })
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Provider>> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }

    pub fn all(&self) -> &[Arc<Provider>] {
        &self.list
    }

    /// Starts background discovery of every provider (the gateway starts without waiting).
    pub fn spawn_discovery(&self) {
        for p in &self.list {
            tokio::spawn(Arc::clone(p).discover_until_done());
        }
    }
}

#[cfg(test)]
mod tests;
