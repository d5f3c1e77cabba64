//! Authentication: finding the gateway credential in a request (cookie or Bearer token),
//! verifying it, and checking it against the revocation view. `authenticate` is a pure decision:
//! it takes the time as an argument and returns an `AuthDecision`, never an error.

pub mod cookie;
pub mod password;
pub mod throttle;
pub mod token;
pub mod totp;

use http::HeaderMap;
use unicode_normalization::UnicodeNormalization;

use crate::revocation::{RevocationView, Revoked};
use crate::store::SessionId;
use token::{Keyring, SessionClaims, TokenError};

/// Who a request belongs to, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user_id: i64,
    pub name: String,
    pub sid: SessionId,
    pub issued_ms: i64,
    pub expires_s: i64,
    /// How many kinds of factor the session's sign-in passed (see [`factors_of`]); a media
    /// server's or Plex token counts as one.
    pub factors: u8,
}

/// How many kinds of factor a sign-in's `amr` shows: something known (`pwd`, a provider's
/// `sso`, a passkey's `uv`) and something held (`otp`, a passkey's `hwk`); a provider's `mfa`
/// stands for both.
pub fn factors_of(amr: &[String]) -> u8 {
    let has = |m: &str| amr.iter().any(|a| a == m);
    if has("mfa") {
        return 2;
    }
    let known = has("pwd") || has("sso") || has("uv");
    let held = has("otp") || has("hwk");
    u8::from(known) + u8::from(held)
}

/// Why a request was refused. Every variant has a stable label for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    NoCredentials,
    Malformed,
    WrongType,
    UnknownKey,
    WrongAlgorithm,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    SessionRevoked,
    UserSignedOut,
    EveryoneSignedOut,
    UserDisabled,
    KeyRetired,
    /// A media-server token the gateway never bound (or that expired long ago).
    UnknownMediaToken,
    /// The action (approving a Quick Connect code for a user with a second factor) needs a
    /// gateway session, which proves the second factor, not only a media token.
    GatewaySessionRequired,
    /// Two different credentials in one request (a cookie and another Bearer token, several
    /// `Authorization` headers, or a gateway session and another user's media token): none is
    /// picked, so no request can run as one principal while looking like another.
    AmbiguousCredentials,
    /// A Plex token of a Plex account that is linked to no gateway user.
    UnlinkedAccount,
    /// A Plex token from an app install (device) its gateway user has not approved.
    DeviceNotApproved,
    /// A Plex path only the server's owner may use (it hands out the owner's tokens or
    /// changes the server).
    OwnerOnly,
    /// A transcode URL of a session another user started, or of no known session.
    ForeignSession,
    /// An access rule (`[[rule]]` with `policy = "deny"`, or a route's `default_policy`)
    /// refuses the request.
    RuleDenied,
    /// An access rule asks for two factors and the session passed one.
    TwoFactorRequired,
}

impl DenyReason {
    pub const ALL: [DenyReason; 24] = [
        DenyReason::NoCredentials,
        DenyReason::Malformed,
        DenyReason::WrongType,
        DenyReason::UnknownKey,
        DenyReason::WrongAlgorithm,
        DenyReason::BadSignature,
        DenyReason::Expired,
        DenyReason::NotYetValid,
        DenyReason::WrongIssuer,
        DenyReason::WrongAudience,
        DenyReason::SessionRevoked,
        DenyReason::UserSignedOut,
        DenyReason::EveryoneSignedOut,
        DenyReason::UserDisabled,
        DenyReason::KeyRetired,
        DenyReason::UnknownMediaToken,
        DenyReason::GatewaySessionRequired,
        DenyReason::AmbiguousCredentials,
        DenyReason::UnlinkedAccount,
        DenyReason::DeviceNotApproved,
        DenyReason::OwnerOnly,
        DenyReason::ForeignSession,
        DenyReason::RuleDenied,
        DenyReason::TwoFactorRequired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoCredentials => "no_credentials",
            DenyReason::Malformed => "malformed_token",
            DenyReason::WrongType => "wrong_token_type",
            DenyReason::UnknownKey => "unknown_key",
            DenyReason::WrongAlgorithm => "wrong_algorithm",
            DenyReason::BadSignature => "bad_signature",
            DenyReason::Expired => "expired",
            DenyReason::NotYetValid => "not_yet_valid",
            DenyReason::WrongIssuer => "wrong_issuer",
            DenyReason::WrongAudience => "wrong_audience",
            DenyReason::SessionRevoked => "session_revoked",
            DenyReason::UserSignedOut => "user_signed_out",
            DenyReason::EveryoneSignedOut => "everyone_signed_out",
            DenyReason::UserDisabled => "user_disabled",
            DenyReason::KeyRetired => "key_retired",
            DenyReason::UnknownMediaToken => "unknown_media_token",
            DenyReason::GatewaySessionRequired => "gateway_session_required",
            DenyReason::AmbiguousCredentials => "ambiguous_credentials",
            DenyReason::UnlinkedAccount => "unlinked_account",
            DenyReason::DeviceNotApproved => "device_not_approved",
            DenyReason::OwnerOnly => "owner_only",
            DenyReason::ForeignSession => "foreign_session",
            DenyReason::RuleDenied => "rule_denied",
            DenyReason::TwoFactorRequired => "two_factor_required",
        }
    }
}

impl From<TokenError> for DenyReason {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Malformed | TokenError::Signing => DenyReason::Malformed,
            TokenError::WrongType => DenyReason::WrongType,
            TokenError::UnknownKey => DenyReason::UnknownKey,
            TokenError::WrongAlgorithm => DenyReason::WrongAlgorithm,
            TokenError::BadSignature => DenyReason::BadSignature,
            TokenError::Expired => DenyReason::Expired,
            TokenError::NotYetValid => DenyReason::NotYetValid,
            TokenError::WrongIssuer => DenyReason::WrongIssuer,
            TokenError::WrongAudience => DenyReason::WrongAudience,
        }
    }
}

impl From<Revoked> for DenyReason {
    fn from(r: Revoked) -> Self {
        match r {
            Revoked::Session => DenyReason::SessionRevoked,
            Revoked::UserSignedOut => DenyReason::UserSignedOut,
            Revoked::EveryoneSignedOut => DenyReason::EveryoneSignedOut,
            Revoked::UserDisabled => DenyReason::UserDisabled,
            Revoked::KeyRetired => DenyReason::KeyRetired,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    Allow(Identity),
    Deny(DenyReason),
}

/// Where the credential came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    Bearer,
    Cookie,
}

/// The one form of a typed user name, used for every lookup (login, media logins, mappings):
/// surrounding blanks removed, then Unicode NFKC, so that compatibility look-alikes
/// (full-width `ａｌｉｃｅ`, ligatures) name the same account as their plain form. Stored names
/// are plain ASCII (`valid_user_name`) and compared ignoring ASCII case, so `ALICE` and
/// `ａｌｉｃｅ` both reach `alice` — for signing in and for her failure counter — and no
/// look-alike can be created as a twin.
pub fn canonical_user_name(typed: &str) -> String {
    typed.trim().nfkc().collect()
}

/// Whether `name` may name an account: 1 to 64 ASCII letters, digits and `. _ - @`.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// Finds the gateway credential: a `Bearer` token in the one `Authorization` header, or the
/// session cookie. The session cookie sent twice, several `Authorization` headers when one is a
/// Bearer, or a cookie together with a different Bearer token are `AmbiguousCredentials`: the
/// gateway never picks one.
pub fn extract_credential<'a>(
    headers: &'a HeaderMap,
    cookie_name: &str,
) -> Result<Option<(&'a str, CredentialSource)>, DenyReason> {
    let cookie =
        cookie::find(headers, cookie_name).map_err(|_| DenyReason::AmbiguousCredentials)?;
    let Some(token) = bearer_token(headers) else {
        return Ok(cookie.map(|t| (t, CredentialSource::Cookie)));
    };
    if headers.get_all(http::header::AUTHORIZATION).iter().count() > 1
        || cookie.is_some_and(|c| c != token)
    {
        return Err(DenyReason::AmbiguousCredentials);
    }
    Ok(Some((token, CredentialSource::Bearer)))
}

/// The token of an `Authorization: Bearer …` header, if that is its scheme (matched ignoring
/// case). The rest is taken as it stands, one space after the scheme: a token with blanks,
/// quotes or commas (`Bearer  t`, `Bearer "t"`, `Bearer a,Bearer b`) is then malformed.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(token)
}

/// Authenticates the gateway credential of a request's headers; also says where the credential
/// came from, when there was exactly one.
pub fn authenticate_headers(
    headers: &HeaderMap,
    cookie_name: &str,
    keyring: &Keyring,
    view: &RevocationView,
    now_s: i64,
) -> (AuthDecision, Option<CredentialSource>) {
    match extract_credential(headers, cookie_name) {
        Ok(found) => (
            authenticate(found.map(|(t, _)| t), keyring, view, now_s),
            found.map(|(_, source)| source),
        ),
        Err(reason) => (AuthDecision::Deny(reason), None),
    }
}

/// Verifies a token and checks it against the revocation view, at time `now_s`.
pub fn authenticate(
    token: Option<&str>,
    keyring: &Keyring,
    view: &RevocationView,
    now_s: i64,
) -> AuthDecision {
    let Some(token) = token else {
        return AuthDecision::Deny(DenyReason::NoCredentials);
    };
    let (claims, kid) = match keyring.verify_with_kid(token, now_s) {
        Ok(v) => v,
        Err(e) => return AuthDecision::Deny(e.into()),
    };
    match identity_of(&claims) {
        Some(identity) => match view.check(identity.sid, identity.user_id, identity.issued_ms, kid)
        {
            Ok(()) => AuthDecision::Allow(identity),
            Err(r) => AuthDecision::Deny(r.into()),
        },
        None => AuthDecision::Deny(DenyReason::Malformed),
    }
}

fn identity_of(c: &SessionClaims) -> Option<Identity> {
    Some(Identity {
        user_id: c.sub.parse().ok()?,
        name: c.name.clone(),
        sid: SessionId::parse(&c.sid)?,
        issued_ms: c.ims,
        expires_s: c.exp,
        factors: factors_of(&c.amr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RevocationEvent;

    fn setup() -> (Keyring, RevocationView, String) {
        let ring = Keyring::new(vec![("k".into(), vec![9; 32])], "portcullis", "aud").unwrap();
        let claims = SessionClaims {
            iss: "portcullis".into(),
            aud: "aud".into(),
            sub: "4".into(),
            name: "alice".into(),
            sid: format!("{:032x}", 77u128),
            iat: 1000,
            nbf: 1000,
            exp: 5000,
            ims: 1_000_123,
            amr: vec!["pwd".into()],
        };
        let t = ring.issue(&claims).unwrap();
        (ring, RevocationView::new(), t)
    }

    #[test]
    fn valid_token_allows_with_identity() {
        let (ring, view, t) = setup();
        match authenticate(Some(&t), &ring, &view, 1000) {
            AuthDecision::Allow(id) => {
                assert_eq!((id.user_id, id.name.as_str()), (4, "alice"));
                assert_eq!(id.sid, SessionId(77));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn revoked_session_and_cutoffs_deny_with_reason() {
        let (ring, view, t) = setup();
        view.apply_local(&RevocationEvent::UserCutoff {
            user_id: 4,
            at_ms: 1_000_123,
        });
        assert_eq!(
            authenticate(Some(&t), &ring, &view, 1000),
            AuthDecision::Deny(DenyReason::UserSignedOut)
        );
        assert_eq!(
            authenticate(None, &ring, &view, 1000),
            AuthDecision::Deny(DenyReason::NoCredentials)
        );
    }

    #[test]
    fn look_alike_user_names_take_one_form() {
        assert_eq!(canonical_user_name(" ａｌｉｃｅ "), "alice");
        assert_eq!(canonical_user_name("ＡＬＩＣＥ"), "ALICE");
        assert_eq!(canonical_user_name("ﬁona"), "fiona");
        assert_eq!(canonical_user_name("bob"), "bob");
        // Letters that only look alike (Cyrillic а) stay different, and are refused at creation.
        assert_ne!(canonical_user_name("аlice"), "alice");
        assert!(!valid_user_name("аlice"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_ignored() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "bEaReR abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Some("abc"));
        h.insert("authorization", "Bearer  abc".parse().unwrap());
        assert_eq!(
            bearer_token(&h),
            Some(" abc"),
            "kept as sent, so it fails to verify"
        );
        h.insert("authorization", "MediaBrowser Token=\"x\"".parse().unwrap());
        assert_eq!(bearer_token(&h), None);
    }

    #[test]
    fn two_different_credentials_are_ambiguous() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "portcullis=a".parse().unwrap());
        assert_eq!(
            extract_credential(&h, "portcullis"),
            Ok(Some(("a", CredentialSource::Cookie)))
        );
        h.insert("authorization", "Bearer a".parse().unwrap());
        assert_eq!(
            extract_credential(&h, "portcullis"),
            Ok(Some(("a", CredentialSource::Bearer))),
            "the same token twice is one credential"
        );
        h.insert("authorization", "Bearer b".parse().unwrap());
        assert_eq!(
            extract_credential(&h, "portcullis"),
            Err(DenyReason::AmbiguousCredentials)
        );
        h.remove("cookie");
        h.append("authorization", "Basic YTpi".parse().unwrap());
        assert_eq!(
            extract_credential(&h, "portcullis"),
            Err(DenyReason::AmbiguousCredentials)
        );
    }
}
