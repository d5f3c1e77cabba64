//! Session tokens: HS256 JWTs with a pinned algorithm, an explicit `typ`, a `kid` that is only
//! ever a key into the in-memory keyring, and checks in a fixed order: parse, type, key,
//! algorithm, signature, issuer and audience, then expiry and not-before with the time passed in.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::SessionConfig;

/// The `typ` header of a session token; other token kinds use other types, so a pending-login
/// or enrolment token can never act as a session.
pub const SESSION_TYP: &str = "portcullis-session+jwt";
/// A login that passed the password but still owes a step (second factor, new password,
/// 2FA enrolment). Short-lived; never accepted as a session.
pub const PENDING_TYP: &str = "portcullis-pending+jwt";
/// Carries a sealed TOTP seed between showing the QR code and confirming it.
pub const ENROLL_TYP: &str = "portcullis-enroll+jwt";
/// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// Minimum length of an HMAC key, in bytes (256 bits).
pub const MIN_KEY_BYTES: usize = 32;

/// Claims of a session token. Every field is required and typed: a claim of the wrong JSON type
/// fails to parse instead of being skipped.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionClaims {
    pub iss: String,
    pub aud: String,
    /// The user's id, as a decimal string.
    pub sub: String,
    /// The user's name at login time.
    pub name: String,
    /// The session id: 32 hex digits.
    pub sid: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Issued-at in milliseconds, compared against revocation cutoffs.
    pub ims: i64,
    pub amr: Vec<String>,
}

/// Claims of a pending-login token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub name: String,
    /// What the login still owes: `totp`, `password`, `enroll` or `passkey`.
    pub stage: String,
    /// A random id, for counting wrong codes per pending login.
    pub jti: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Set when the login came through a single sign-on provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sso: Option<SsoPending>,
    /// The factors the login passed so far (`pwd`, `otp`, `hwk`, `uv`, `sso`, `mfa`), for the
    /// session it ends in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
}

/// The provider login behind a pending login (single sign-on): carried to the session so that
/// a back-channel logout finds it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SsoPending {
    pub provider: String,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

/// Claims of an enrolment token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    /// The TOTP seed, sealed with the secrets key.
    pub seed: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// Claims with the time fields every token kind carries.
pub trait TimedClaims: serde::de::DeserializeOwned + Serialize {
    fn times(&self) -> (i64, i64, i64);
}

impl TimedClaims for SessionClaims {
    fn times(&self) -> (i64, i64, i64) {
        (self.iat, self.nbf, self.exp)
    }
}
impl TimedClaims for PendingClaims {
    fn times(&self) -> (i64, i64, i64) {
        (self.iat, self.nbf, self.exp)
    }
}
impl TimedClaims for EnrollClaims {
    fn times(&self) -> (i64, i64, i64) {
        (self.iat, self.nbf, self.exp)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token is not a session token")]
    WrongType,
    #[error("the token names an unknown key")]
    UnknownKey,
    #[error("the token uses another algorithm")]
    WrongAlgorithm,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has another issuer")]
    WrongIssuer,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token could not be signed")]
    Signing,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("session key file {path}: {problem}")]
    File { path: String, problem: String },
    #[error("PORTCULLIS_SESSION_KEY: {0}")]
    Env(String),
}

struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The keys that sign and verify session tokens. The first key signs; all verify.
pub struct Keyring {
    keys: Vec<SigningKey>,
    by_kid: HashMap<String, usize>,
    issuer: String,
    audience: String,
    validation: Validation,
    /// Session tokens this keyring verified, by their exact text: a token seen again skips
    /// parsing and the signature check, not its time checks (nor, in the caller, the
    /// revocation view). Dies with the keyring, so a key change empties it. Hashed with
    /// foldhash, not SipHash: only tokens whose signature checked are put in, so nobody can
    /// fill it with keys chosen to collide, and the token is hashed on every request.
    verified: moka::sync::Cache<Box<str>, (Arc<SessionClaims>, usize), foldhash::fast::RandomState>,
}

/// Verified session tokens remembered per keyring (a few KiB each at most: ≈ 10 MiB).
const VERIFIED_CACHE_ENTRIES: u64 = 20_000;
/// How long a verified token is remembered before it is checked in full again.
const VERIFIED_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// The time claims of a token that verified, at `now_s`: expiry, not-before and issued-at with
/// the leeway.
fn check_times(iat: i64, nbf: i64, exp: i64, now_s: i64) -> Result<(), TokenError> {
    if exp.saturating_add(LEEWAY_SECS) < now_s {
        return Err(TokenError::Expired);
    }
    if nbf > now_s.saturating_add(LEEWAY_SECS) || iat > now_s.saturating_add(LEEWAY_SECS) {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "kids",
                &self.keys.iter().map(|k| &k.kid).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn kid_for(secret: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(secret)[..4])
}

impl Keyring {
    /// Builds a keyring from `(kid, secret)` pairs; the first signs.
    pub fn new(
        keys: Vec<(String, Vec<u8>)>,
        issuer: &str,
        audience: &str,
    ) -> Result<Keyring, KeyError> {
        let mut out = Vec::new();
        let mut by_kid = HashMap::new();
        for (kid, secret) in keys {
            let bad = |p: &str| KeyError::File {
                path: "<keyring>".into(),
                problem: format!("key `{kid}`: {p}"),
            };
            if secret.len() < MIN_KEY_BYTES {
                return Err(bad("shorter than 32 bytes"));
            }
            let encoding = EncodingKey::from_secret(&secret).map_err(|e| bad(&e.to_string()))?;
            let decoding = DecodingKey::from_secret(&secret).map_err(|e| bad(&e.to_string()))?;
            by_kid.insert(kid.clone(), out.len());
            out.push(SigningKey {
                kid,
                encoding,
                decoding,
            });
        }
        if out.is_empty() {
            return Err(KeyError::File {
                path: "<keyring>".into(),
                problem: "holds no key".into(),
            });
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        // Expiry and not-before are checked by `verify` with the time passed in.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        Ok(Keyring {
            keys: out,
            by_kid,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            validation,
            verified: moka::sync::Cache::builder()
                .max_capacity(VERIFIED_CACHE_ENTRIES)
                .time_to_live(VERIFIED_CACHE_TTL)
                .build_with_hasher(foldhash::fast::RandomState::default()),
        })
    }

    /// Loads the key file named in the config (or the key from `PORTCULLIS_SESSION_KEY`),
    /// creating the file with a fresh random key and mode 0600 if it is absent and `create`.
    pub fn load(cfg: &SessionConfig, audience: &str, create: bool) -> Result<Keyring, KeyError> {
        if let Some(secret) = &cfg.key_override {
            let bytes = URL_SAFE_NO_PAD
                .decode(secret.expose().trim().trim_end_matches('='))
                .map_err(|_| KeyError::Env("is not base64url".into()))?;
            if bytes.len() < MIN_KEY_BYTES {
                return Err(KeyError::Env("must decode to at least 32 bytes".into()));
            }
            return Keyring::new(vec![(kid_for(&bytes), bytes)], &cfg.issuer, audience);
        }
        let path = &cfg.key_file;
        if !path.exists() && create {
            create_key_file(path)?;
        }
        let keys = read_key_file(path)?;
        Keyring::new(keys, &cfg.issuer, audience).map_err(|e| match e {
            KeyError::File { problem, .. } => KeyError::File {
                path: path.display().to_string(),
                problem,
            },
            other => other,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Signs session claims with the active key.
    pub fn issue(&self, claims: &SessionClaims) -> Result<String, TokenError> {
        self.issue_typed(SESSION_TYP, claims)
    }

    /// Signs claims of any kind with the active key and the given `typ`.
    pub fn issue_typed<T: TimedClaims>(&self, typ: &str, claims: &T) -> Result<String, TokenError> {
        let key = &self.keys[0];
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(typ.to_string());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|_| TokenError::Signing)
    }

    /// The id of the key that signs new tokens.
    pub fn active_kid(&self) -> &str {
        &self.keys[0].kid
    }

    /// Ids of every key this keyring verifies with.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }

    /// Verifies a token at time `now_s` (seconds since the epoch).
    pub fn verify(&self, token: &str, now_s: i64) -> Result<SessionClaims, TokenError> {
        self.verify_with_kid(token, now_s)
            .map(|(c, _)| SessionClaims::clone(&c))
    }

    /// Verifies a token and also says which key signed it. The claims are shared with the
    /// cache of verified tokens, not copied.
    pub fn verify_with_kid(
        &self,
        token: &str,
        now_s: i64,
    ) -> Result<(Arc<SessionClaims>, &str), TokenError> {
        if let Some((claims, key)) = self.verified.get(token) {
            check_times(claims.iat, claims.nbf, claims.exp, now_s)?;
            return Ok((claims, self.keys[key].kid.as_str()));
        }
        let (claims, kid) = self.verify_typed::<SessionClaims>(SESSION_TYP, token, now_s)?;
        let claims = Arc::new(claims);
        if let Some(&key) = self.by_kid.get(kid) {
            self.verified.insert(token.into(), (claims.clone(), key));
        }
        Ok((claims, kid))
    }

    /// Verifies a token of the given `typ` with the fixed order of checks.
    pub fn verify_typed<T: TimedClaims>(
        &self,
        typ: &str,
        token: &str,
        now_s: i64,
    ) -> Result<(T, &str), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::UnsupportedAlgorithm => {
                TokenError::WrongAlgorithm
            }
            _ => TokenError::Malformed,
        })?;
        if header.typ.as_deref() != Some(typ) || header.cty.is_some() {
            return Err(TokenError::WrongType);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.by_kid.get(kid))
            .map(|&i| &self.keys[i])
            .ok_or(TokenError::UnknownKey)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<T>(token, &key.decoding, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                _ => TokenError::Malformed,
            },
        )?;
        let c = data.claims;
        let (iat, nbf, exp) = c.times();
        check_times(iat, nbf, exp, now_s)?;
        Ok((c, key.kid.as_str()))
    }
}

/// Puts a fresh signing key first in the key file. With `retire_old`, the old keys are dropped
/// (a breach response); otherwise they stay for verifying tokens they signed. Returns the new
/// key id and the ids of the keys that were in the file.
pub fn rotate_key_file(path: &Path, retire_old: bool) -> Result<(String, Vec<String>), KeyError> {
    let bad = |problem: String| KeyError::File {
        path: path.display().to_string(),
        problem,
    };
    let old = read_key_file(path)?;
    let secret: [u8; 32] = rand::random();
    let kid = kid_for(&secret);
    let mut text = String::from(
        "# Portcullis session signing keys: KID BASE64URL-SECRET, the first line signs.\n",
    );
    text.push_str(&format!("{kid} {}\n", URL_SAFE_NO_PAD.encode(secret)));
    if !retire_old {
        for (k, s) in &old {
            text.push_str(&format!("{k} {}\n", URL_SAFE_NO_PAD.encode(s)));
        }
    }
    let tmp = path.with_extension("key.new");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .map_err(|e| bad(format!("cannot write {}: {e}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| bad(format!("cannot write: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| bad(format!("cannot replace: {e}")))?;
    Ok((kid, old.into_iter().map(|(k, _)| k).collect()))
}

fn read_key_file(path: &Path) -> Result<Vec<(String, Vec<u8>)>, KeyError> {
    let bad = |problem: String| KeyError::File {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kid, secret) = line
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad(format!("line {}: expected `KID BASE64URL-SECRET`", n + 1)))?;
        if kid.is_empty() || !kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad(format!("line {}: bad key id", n + 1)));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(secret.trim().trim_end_matches('='))
            .map_err(|_| bad(format!("line {}: secret is not base64url", n + 1)))?;
        if bytes.len() < MIN_KEY_BYTES {
            return Err(bad(format!(
                "line {}: secret is shorter than 32 bytes",
                n + 1
            )));
        }
        keys.push((kid.to_string(), bytes));
    }
    if keys.is_empty() {
        return Err(bad("holds no key".into()));
    }
    Ok(keys)
}

fn create_key_file(path: &Path) -> Result<(), KeyError> {
    let bad = |problem: String| KeyError::File {
        path: path.display().to_string(),
        problem,
    };
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(|e| bad(format!("cannot create {}: {e}", parent.display())))?;
        }
    }
    let secret: [u8; 32] = rand::random();
    let kid = kid_for(&secret);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| bad(format!("cannot create: {e}")))?;
    writeln!(
        f,
        "# Portcullis session signing keys: KID BASE64URL-SECRET, the first line signs.\n{kid} {}",
        URL_SAFE_NO_PAD.encode(secret)
    )
    .and_then(|_| f.sync_all())
    .map_err(|e| bad(format!("cannot write: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(secret: u8) -> Keyring {
        Keyring::new(
            vec![("k1".into(), vec![secret; 32])],
            "portcullis",
            "http://gw",
        )
        .unwrap()
    }

    fn claims(now: i64) -> SessionClaims {
        SessionClaims {
            iss: "portcullis".into(),
            aud: "http://gw".into(),
            sub: "1".into(),
            name: "alice".into(),
            sid: format!("{:032x}", 5u128),
            iat: now,
            nbf: now,
            exp: now + 3600,
            ims: now * 1000,
            amr: vec!["pwd".into()],
        }
    }

    #[test]
    fn crypto_backend_is_present_and_round_trips() {
        // Without a crypto backend feature jsonwebtoken panics at the first encode.
        let r = ring(1);
        let t = r.issue(&claims(1_000_000)).unwrap();
        assert_eq!(r.verify(&t, 1_000_000).unwrap(), claims(1_000_000));
    }

    #[test]
    fn expiry_and_not_before_use_the_given_time_with_leeway() {
        let r = ring(1);
        let t = r.issue(&claims(1_000_000)).unwrap();
        assert!(r.verify(&t, 1_000_000 + 3600 + LEEWAY_SECS).is_ok());
        assert_eq!(
            r.verify(&t, 1_000_000 + 3600 + LEEWAY_SECS + 1),
            Err(TokenError::Expired)
        );
        assert_eq!(
            r.verify(&t, 1_000_000 - LEEWAY_SECS - 1),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn a_remembered_token_still_meets_its_times_and_only_the_exact_text_is_remembered() {
        let r = ring(1);
        let t = r.issue(&claims(1_000_000)).unwrap();
        let first = r.verify_with_kid(&t, 1_000_000).unwrap();
        assert_eq!(r.verify_with_kid(&t, 1_000_001).unwrap(), first);
        assert_eq!(r.verified.get(t.as_str()).map(|h| h.1), Some(0));
        // Remembering it does not lengthen its life.
        assert_eq!(
            r.verify(&t, 1_000_000 + 3600 + LEEWAY_SECS + 1),
            Err(TokenError::Expired)
        );
        // A token that differs in one character is checked in full.
        let mut tampered = t.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(r.verify(&tampered, 1_000_000).is_err());
        // Another keyring (a key change) remembers nothing.
        assert_eq!(ring(2).verify(&t, 1_000_000), Err(TokenError::BadSignature));
    }

    #[test]
    fn other_key_fails_signature() {
        let t = ring(1).issue(&claims(100)).unwrap();
        assert_eq!(ring(2).verify(&t, 100), Err(TokenError::BadSignature));
    }

    #[test]
    fn alg_none_and_wrong_types_are_refused() {
        let r = ring(1);
        let good = r.issue(&claims(100)).unwrap();
        let payload = good.split('.').nth(1).unwrap();
        let none_header =
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"portcullis-session+jwt","kid":"k1"}"#);
        assert!(r.verify(&format!("{none_header}.{payload}."), 100).is_err());
        let mut wrong_typ = Header::new(Algorithm::HS256);
        wrong_typ.kid = Some("k1".into());
        wrong_typ.typ = Some("JWT".into());
        let t = jsonwebtoken::encode(
            &wrong_typ,
            &claims(100),
            &EncodingKey::from_secret(&[1; 32]).unwrap(),
        )
        .unwrap();
        assert_eq!(r.verify(&t, 100), Err(TokenError::WrongType));
    }

    #[test]
    fn string_typed_exp_is_malformed_not_skipped() {
        let r = ring(1);
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        h.typ = Some(SESSION_TYP.into());
        let mut v = serde_json::to_value(claims(100)).unwrap();
        v["exp"] = serde_json::json!("never");
        let t = jsonwebtoken::encode(&h, &v, &EncodingKey::from_secret(&[1; 32]).unwrap()).unwrap();
        assert_eq!(r.verify(&t, 100), Err(TokenError::Malformed));
    }

    #[test]
    fn created_key_file_is_private_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/session.key");
        create_key_file(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(read_key_file(&path).unwrap()[0].1.len(), 32);
    }
}
