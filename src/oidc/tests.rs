//! Token checks with keys made here (ES256), time passed in.

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const ISS: &str = "https://idp.example";
const CLIENT: &str = "portcullis";
const NOW: i64 = 1_800_000_000;

struct TestKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

fn test_key(kid: &str) -> TestKey {
    let pair = rcgen::KeyPair::generate().unwrap();
    let raw = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    TestKey {
        kid: kid.to_string(),
        encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
        jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
                    "kid": kid, "use": "sig", "alg": "ES256"}),
    }
}

fn keys(list: &[&TestKey]) -> Vec<VerifyKey> {
    let set: JwkSet = serde_json::from_value(
        json!({"keys": list.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}),
    )
    .unwrap();
    keys_from_jwks(&set)
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, claims, &key.encoding).unwrap()
}

fn id_claims() -> Value {
    json!({"iss": ISS, "sub": "s-1", "aud": CLIENT, "exp": NOW + 300, "iat": NOW, "nonce": "n-1",
           "email": "a@example.com", "email_verified": true, "groups": ["media", "admins"]})
}

fn check(token: &str, keys: &[VerifyKey]) -> Result<IdClaims, TokenRefusal> {
    let (_, c) = verify_signed::<IdClaims>(
        token,
        keys,
        &[Algorithm::ES256, Algorithm::RS256],
        ISS,
        CLIENT,
    )?;
    check_id_claims(&c, CLIENT, "n-1", NOW)?;
    Ok(c)
}

fn with(mut v: Value, k: &str, x: Value) -> Value {
    v[k] = x;
    v
}

#[test]
fn a_good_id_token_passes_and_its_claims_are_read() {
    let k = test_key("k1");
    let c = check(&sign(&k, &id_claims()), &keys(&[&k])).unwrap();
    assert_eq!(c.sub, "s-1");
    assert!(c.email_verified());
    assert!(c.claim_has("groups", "admins") && !c.claim_has("groups", "root"));
}

#[test]
fn id_tokens_are_refused_for_each_reason() {
    let k = test_key("k1");
    let other = test_key("k2");
    let ks = keys(&[&k]);
    let cases = [
        (
            sign(&k, &with(id_claims(), "aud", json!("someone-else"))),
            TokenRefusal::WrongAudience,
        ),
        (
            sign(&k, &with(id_claims(), "iss", json!("https://evil.example"))),
            TokenRefusal::WrongIssuer,
        ),
        (
            sign(&k, &with(id_claims(), "exp", json!(NOW - 31))),
            TokenRefusal::Expired,
        ),
        (
            sign(&k, &with(id_claims(), "iat", json!(NOW + 31))),
            TokenRefusal::IssuedInFuture,
        ),
        (
            sign(&k, &with(id_claims(), "nonce", json!("n-2"))),
            TokenRefusal::WrongNonce,
        ),
        (
            sign(&k, &with(id_claims(), "nonce", Value::Null)),
            TokenRefusal::WrongNonce,
        ),
        (
            sign(&k, &with(id_claims(), "sub", json!(""))),
            TokenRefusal::NoSubject,
        ),
        (sign(&other, &id_claims()), TokenRefusal::UnknownKey),
        (
            sign(&k, &with(id_claims(), "aud", json!([CLIENT, "other"]))),
            TokenRefusal::WrongAuthorizedParty,
        ),
        (
            sign(&k, &with(id_claims(), "azp", json!("other"))),
            TokenRefusal::WrongAuthorizedParty,
        ),
        ("not.a.jwt".to_string(), TokenRefusal::Malformed),
    ];
    for (token, want) in cases {
        assert_eq!(check(&token, &ks).err(), Some(want), "{token}");
    }
    // Within the 30 s leeway.
    assert!(check(&sign(&k, &with(id_claims(), "exp", json!(NOW - 29))), &ks).is_ok());
    // Several audiences with azp = this client pass.
    let c = with(
        with(id_claims(), "aud", json!([CLIENT, "other"])),
        "azp",
        json!(CLIENT),
    );
    assert!(check(&sign(&k, &c), &ks).is_ok());
}

#[test]
fn a_signature_by_another_key_with_the_same_kid_is_refused() {
    let k = test_key("k1");
    let impostor = test_key("k1");
    assert_eq!(
        check(&sign(&impostor, &id_claims()), &keys(&[&k])).err(),
        Some(TokenRefusal::BadSignature)
    );
}

#[test]
fn hmac_and_none_are_never_accepted() {
    let k = test_key("k1");
    let ks = keys(&[&k]);
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(
        &h,
        &id_claims(),
        &EncodingKey::from_secret(b"client-secret").unwrap(),
    )
    .unwrap();
    assert_eq!(check(&hs, &ks).err(), Some(TokenRefusal::WrongAlgorithm));
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "k1"})),
        b64(&id_claims())
    );
    assert!(matches!(
        check(&none, &ks).err(),
        Some(TokenRefusal::WrongAlgorithm | TokenRefusal::Malformed)
    ));
    // An algorithm not pinned (ES256 left out) is refused before any key is tried.
    let token = sign(&k, &id_claims());
    assert_eq!(
        verify_signed::<IdClaims>(&token, &ks, &[Algorithm::RS256], ISS, CLIENT).err(),
        Some(TokenRefusal::WrongAlgorithm)
    );
}

fn logout_claims() -> Value {
    json!({"iss": ISS, "aud": CLIENT, "iat": NOW, "jti": "j-1", "sub": "s-1", "sid": "op-1",
           "events": {BACKCHANNEL_EVENT: {}}})
}

fn check_logout(token: &str, keys: &[VerifyKey]) -> Result<LogoutClaims, TokenRefusal> {
    let (h, c) = verify_signed::<LogoutClaims>(token, keys, &[Algorithm::ES256], ISS, CLIENT)?;
    check_logout_claims(&h, &c, NOW)?;
    Ok(c)
}

#[test]
fn logout_tokens_are_checked_per_the_back_channel_spec() {
    let k = test_key("k1");
    let ks = keys(&[&k]);
    let c = check_logout(&sign(&k, &logout_claims()), &ks).unwrap();
    assert_eq!(c.sid.as_deref(), Some("op-1"));
    let mut no_sub_no_sid = logout_claims();
    no_sub_no_sid.as_object_mut().unwrap().remove("sub");
    no_sub_no_sid.as_object_mut().unwrap().remove("sid");
    let mut no_jti = logout_claims();
    no_jti.as_object_mut().unwrap().remove("jti");
    let cases = [
        (
            with(logout_claims(), "nonce", json!("n")),
            TokenRefusal::NonceInLogoutToken,
        ),
        (
            with(logout_claims(), "events", json!({"other": {}})),
            TokenRefusal::NotLogoutToken,
        ),
        (
            with(logout_claims(), "events", json!({BACKCHANNEL_EVENT: "x"})),
            TokenRefusal::NotLogoutToken,
        ),
        (
            with(logout_claims(), "iat", json!(NOW - 601)),
            TokenRefusal::TooOld,
        ),
        (
            with(logout_claims(), "iat", json!(NOW + 31)),
            TokenRefusal::IssuedInFuture,
        ),
        (
            with(logout_claims(), "exp", json!(NOW - 31)),
            TokenRefusal::Expired,
        ),
        (
            with(logout_claims(), "aud", json!("other")),
            TokenRefusal::WrongAudience,
        ),
        (no_sub_no_sid, TokenRefusal::NoSubjectOrSession),
        (no_jti, TokenRefusal::NoJti),
    ];
    for (claims, want) in cases {
        assert_eq!(
            check_logout(&sign(&k, &claims), &ks).err(),
            Some(want),
            "{claims}"
        );
    }
    // An ID token is not a logout token.
    assert_eq!(
        check_logout(&sign(&k, &id_claims()), &ks).err(),
        Some(TokenRefusal::NotLogoutToken)
    );
}

#[test]
fn pkce_challenge_matches_rfc_7636_appendix_b() {
    assert_eq!(
        pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
    assert_eq!(random_token().len(), 43);
}

#[test]
fn userinfo_adds_missing_claims_for_the_same_subject_only() {
    let mut c: IdClaims = serde_json::from_value(id_claims()).unwrap();
    merge_userinfo(
        &mut c,
        &json!({"sub": "s-1", "preferred_username": "alice", "email": "x@evil"}),
    )
    .unwrap();
    assert_eq!(c.string("preferred_username"), Some("alice"));
    assert_eq!(c.string("email"), Some("a@example.com"));
    assert!(merge_userinfo(&mut c, &json!({"sub": "s-2"})).is_err());
}

#[test]
fn published_keys_for_encryption_or_without_verify_verify_nothing() {
    let k = test_key("k1");
    let token = sign(&k, &id_claims());
    let with_jwk = |field: &str, v: Value| {
        let mut jwk = k.jwk.clone();
        match v {
            Value::Null => {
                jwk.as_object_mut().unwrap().remove(field);
            }
            v => jwk[field] = v,
        }
        let set: JwkSet = serde_json::from_value(json!({ "keys": [jwk] })).unwrap();
        keys_from_jwks(&set)
    };
    // Each of these keys would otherwise act as a wildcard for every EC algorithm.
    for (field, v) in [
        ("alg", json!("RSA-OAEP")),
        ("alg", json!("ECDH-ES")),
        ("alg", json!("HS256")),
        ("key_ops", json!(["encrypt"])),
        ("key_ops", json!(["sign"])),
        ("use", json!("enc")),
        ("use", json!("other")),
    ] {
        let ks = with_jwk(field, v.clone());
        assert!(ks.is_empty(), "{field} = {v} was kept");
        assert_eq!(
            check(&token, &ks).err(),
            Some(TokenRefusal::UnknownKey),
            "{field} = {v}"
        );
    }
    // Signature keys are kept: with `key_ops: [verify]`, or with no `alg` or `use` at all.
    for (field, v) in [
        ("key_ops", json!(["verify"])),
        ("alg", Value::Null),
        ("use", Value::Null),
    ] {
        let ks = with_jwk(field, v.clone());
        assert_eq!(ks.len(), 1, "{field} = {v}");
        assert!(check(&token, &ks).is_ok(), "{field} = {v}");
    }
}

#[test]
fn nbf_is_checked_with_the_leeway_in_id_and_logout_tokens() {
    let k = test_key("k1");
    let ks = keys(&[&k]);
    assert_eq!(
        check(&sign(&k, &with(id_claims(), "nbf", json!(NOW + 31))), &ks).err(),
        Some(TokenRefusal::NotYetValid)
    );
    assert!(check(&sign(&k, &with(id_claims(), "nbf", json!(NOW + 29))), &ks).is_ok());
    assert!(check(&sign(&k, &with(id_claims(), "nbf", json!(NOW - 60))), &ks).is_ok());
    assert_eq!(
        check_logout(
            &sign(&k, &with(logout_claims(), "nbf", json!(NOW + 31))),
            &ks
        )
        .err(),
        Some(TokenRefusal::NotYetValid)
    );
    assert!(check_logout(
        &sign(&k, &with(logout_claims(), "nbf", json!(NOW + 29))),
        &ks
    )
    .is_ok());
}

#[test]
fn time_claims_at_the_ends_of_the_range_do_not_overflow() {
    let id = |k: &str, v: i64| -> IdClaims {
        serde_json::from_value(with(id_claims(), k, json!(v))).unwrap()
    };
    // A token that never expires is not expired (the check must not overflow and wrap).
    assert_eq!(
        check_id_claims(&id("exp", i64::MAX), CLIENT, "n-1", NOW),
        Ok(())
    );
    assert_eq!(
        check_id_claims(&id("nbf", i64::MAX), CLIENT, "n-1", NOW),
        Err(TokenRefusal::NotYetValid)
    );
    assert_eq!(
        check_id_claims(&id("exp", i64::MIN), CLIENT, "n-1", NOW),
        Err(TokenRefusal::Expired)
    );
    assert_eq!(
        check_id_claims(&id("exp", i64::MAX), CLIENT, "n-1", i64::MAX),
        Ok(())
    );
    let logout = |k: &str, v: i64| -> LogoutClaims {
        serde_json::from_value(with(logout_claims(), k, json!(v))).unwrap()
    };
    let h = jsonwebtoken::Header::new(Algorithm::ES256);
    assert_eq!(
        check_logout_claims(&h, &logout("exp", i64::MAX), NOW),
        Ok(())
    );
    assert_eq!(
        check_logout_claims(&h, &logout("iat", i64::MIN), NOW),
        Err(TokenRefusal::TooOld)
    );
    assert_eq!(
        check_logout_claims(&h, &logout("iat", i64::MAX), NOW),
        Err(TokenRefusal::IssuedInFuture)
    );
    assert_eq!(
        check_logout_claims(&h, &logout("exp", i64::MAX), i64::MAX),
        Err(TokenRefusal::TooOld)
    );
}

#[test]
fn userinfo_email_and_its_verification_come_from_one_source() {
    // The ID token has an (unverified) email: userinfo's verification does not attach to it.
    let mut idt = id_claims();
    idt.as_object_mut().unwrap().remove("email_verified");
    let mut c: IdClaims = serde_json::from_value(idt).unwrap();
    merge_userinfo(
        &mut c,
        &json!({"sub": "s-1", "email": "a@example.com", "email_verified": true}),
    )
    .unwrap();
    assert_eq!(c.string("email"), Some("a@example.com"));
    assert!(!c.email_verified());
    // The ID token has no email but says "verified": userinfo's email comes with userinfo's
    // own verification, or none.
    let mut idt = id_claims();
    idt.as_object_mut().unwrap().remove("email");
    for (info, verified) in [
        (json!({"sub": "s-1", "email": "x@example.com"}), false),
        (
            json!({"sub": "s-1", "email": "x@example.com", "email_verified": false}),
            false,
        ),
        (
            json!({"sub": "s-1", "email": "x@example.com", "email_verified": true}),
            true,
        ),
    ] {
        let mut c: IdClaims = serde_json::from_value(idt.clone()).unwrap();
        merge_userinfo(&mut c, &info).unwrap();
        assert_eq!(c.string("email"), Some("x@example.com"));
        assert_eq!(c.email_verified(), verified, "{info}");
    }
    // Both from the ID token: userinfo changes neither.
    let mut c: IdClaims = serde_json::from_value(id_claims()).unwrap();
    merge_userinfo(
        &mut c,
        &json!({"sub": "s-1", "email": "x@example.com", "email_verified": false}),
    )
    .unwrap();
    assert_eq!(c.string("email"), Some("a@example.com"));
    assert!(c.email_verified());
}

fn provider_config(issuer: &str, allow_insecure_http: bool) -> OidcProviderConfig {
    OidcProviderConfig {
        id: "idp".into(),
        display_name: "IdP".into(),
        issuer: issuer.into(),
        client_id: CLIENT.into(),
        client_secret: ClientSecretSource::None,
        scopes: vec!["openid".into()],
        auto_link: crate::config::AutoLink::Off,
        auto_create: false,
        admin: None,
        trust_amr: vec![],
        trust_acr: vec![],
        end_session: true,
        algorithms: vec!["ES256".into()],
        allow_insecure_http,
    }
}

fn discovery(issuer: &str, endpoints: &str) -> Value {
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{endpoints}/authorize"),
        "token_endpoint": format!("{endpoints}/token"),
        "jwks_uri": format!("{endpoints}/jwks"),
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}

#[test]
fn plain_http_endpoints_follow_the_configured_issuer_not_the_discovery_document() {
    let meta = |issuer: &str, endpoints: &str, insecure: bool| {
        let cfg = provider_config(issuer, insecure);
        let plain = PlainHttp::for_issuer(&cfg.issuer, cfg.allow_insecure_http);
        parse_metadata(&discovery(issuer, endpoints), &cfg, plain)
    };
    // An https issuer cannot be downgraded to plain http by its discovery document, not even
    // to loopback.
    for endpoints in [
        "http://127.0.0.1:9000",
        "http://localhost:9000",
        "http://[::1]:9000",
        "http://idp.example",
    ] {
        assert!(
            matches!(
                meta("https://idp.example", endpoints, false),
                Err(OidcError::Discovery(_))
            ),
            "{endpoints}"
        );
    }
    assert!(meta("https://idp.example", "https://login.idp.example", false).is_ok());
    // A plain-http loopback issuer (a provider on this host): loopback endpoints only.
    assert!(meta("http://127.0.0.1:9000", "http://127.0.0.1:9000", false).is_ok());
    assert!(meta("http://127.0.0.1:9000", "http://localhost:9001", false).is_ok());
    assert!(meta("http://127.0.0.1:9000", "http://idp.lan", false).is_err());
    // allow_insecure_http: anywhere.
    assert!(meta("http://idp.lan", "http://idp.lan", true).is_ok());
    assert!(meta("https://idp.example", "http://idp.lan", true).is_ok());
    assert_eq!(
        PlainHttp::for_issuer("https://127.0.0.1", false),
        PlainHttp::Never
    );
    assert_eq!(
        PlainHttp::for_issuer("http://localhost:1", false),
        PlainHttp::Loopback
    );
    assert_eq!(
        client::allowed("ftp://127.0.0.1/x", PlainHttp::Anywhere)
            .err()
            .map(|e| e.to_string()),
        Some(client::HttpError::Insecure("ftp://127.0.0.1/x".into()).to_string())
    );
}

#[test]
fn one_key_refetch_per_interval_however_many_ask_at_once() {
    let gate = std::sync::Arc::new(RefreshGate::default());
    let start = std::time::Instant::now();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (gate, barrier) = (gate.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                gate.claim(start)
            })
        })
        .collect();
    let granted = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|g| *g)
        .count();
    assert_eq!(granted, 1);
    assert!(!gate.claim(start + JWKS_REFRESH_MIN - std::time::Duration::from_millis(1)));
    assert!(gate.claim(start + JWKS_REFRESH_MIN));
    // A fetch by discovery counts too.
    let later = start + JWKS_REFRESH_MIN * 3;
    gate.fetched(later);
    assert!(!gate.claim(later));
}
