//! JWT rules against hand-built tokens (security checklist ATK-01, 03, 05, 08, 51e; RFC 8725):
//! every header and claim crafted byte by byte and signed with HMAC-SHA256 directly, so that no
//! library can quietly normalise the attack. The gateway pins HS256 and `typ`, treats `kid` only
//! as a map key, never fetches or trusts `jku`/`x5u`/`jwk`/`x5c`, validates `nbf`, `iat` and
//! `exp` with at most 30 s of leeway, and refuses anything non-canonical.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const PW: &str = "alice-password-1234";

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// `header.payload.signature` with HMAC-SHA256 under `key`, whatever the header says.
fn sign(header: &Value, claims: &Value, key: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", b64(&mac.finalize().into_bytes()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn status(gw: &Gateway, token: &str) -> u16 {
    gw.get_status("/secret", token).await
}

#[tokio::test]
async fn hand_built_tokens_are_judged_exactly() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).user("alice", PW).start().await;
    let login = gw.login("alice", PW).await;
    let (kid, secret) = gw.signing_key();
    // The real token's claims, re-signed by hand: accepted, so the builder itself is right.
    let payload = login.token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let header = json!({"alg": "HS256", "typ": "portcullis-session+jwt", "kid": kid});
    let good = sign(&header, &claims, &secret);
    assert_eq!(
        status(&gw, &good).await,
        200,
        "the hand-built control token"
    );

    // A listener standing in for an attacker's key server: nothing may ever connect to it.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_url = format!("http://{}/jwks.json", trap.local_addr().unwrap());
    let attacker = [0x42u8; 32];

    let with = |changes: &[(&str, Value)]| {
        let mut c = claims.clone();
        for (k, v) in changes {
            c[*k] = v.clone();
        }
        c
    };
    let header_with = |changes: &[(&str, Value)]| {
        let mut h = header.clone();
        for (k, v) in changes {
            h[*k] = v.clone();
        }
        h
    };
    let t = now();
    let cases: Vec<(&str, String)> = vec![
        (
            "nbf an hour ahead",
            sign(&header, &with(&[("nbf", json!(t + 3600))]), &secret),
        ),
        (
            "iat an hour ahead",
            sign(&header, &with(&[("iat", json!(t + 3600))]), &secret),
        ),
        (
            "expired beyond the leeway",
            sign(&header, &with(&[("exp", json!(t - 31))]), &secret),
        ),
        ("no exp", {
            let mut c = claims.clone();
            c.as_object_mut().unwrap().remove("exp");
            sign(&header, &c, &secret)
        }),
        ("no aud", {
            let mut c = claims.clone();
            c.as_object_mut().unwrap().remove("aud");
            sign(&header, &c, &secret)
        }),
        (
            "aud as a list with another audience",
            sign(
                &header,
                &with(&[("aud", json!([claims["aud"], "other"]))]),
                &secret,
            ),
        ),
        (
            "exp as a string",
            sign(
                &header,
                &with(&[("exp", json!((t + 3600).to_string()))]),
                &secret,
            ),
        ),
        (
            "kid path traversal, empty key",
            sign(
                &header_with(&[("kid", json!("../../../../../../dev/null"))]),
                &claims,
                b"",
            ),
        ),
        (
            "kid SQL",
            sign(
                &header_with(&[("kid", json!("' UNION SELECT 'k' --"))]),
                &claims,
                b"k",
            ),
        ),
        (
            "jku to the attacker's keys",
            sign(
                &header_with(&[("jku", json!(trap_url))]),
                &claims,
                &attacker,
            ),
        ),
        (
            "x5u to the attacker's certificate",
            sign(
                &header_with(&[("x5u", json!(trap_url))]),
                &claims,
                &attacker,
            ),
        ),
        (
            "embedded jwk of the attacker",
            sign(
                &header_with(&[("jwk", json!({"kty": "oct", "k": b64(&attacker)}))]),
                &claims,
                &attacker,
            ),
        ),
        (
            "HS512 header over an HS256 signature",
            sign(&header_with(&[("alg", json!("HS512"))]), &claims, &secret),
        ),
        (
            "alg None",
            sign(&header_with(&[("alg", json!("None"))]), &claims, &secret),
        ),
        (
            "alg NONE",
            sign(&header_with(&[("alg", json!("NONE"))]), &claims, &secret),
        ),
        (
            "alg nOnE",
            sign(&header_with(&[("alg", json!("nOnE"))]), &claims, &secret),
        ),
        (
            "alg none with the real signature attached",
            sign(&header_with(&[("alg", json!("none"))]), &claims, &secret),
        ),
        ("alg none, empty signature", {
            let t = sign(&header_with(&[("alg", json!("none"))]), &claims, &secret);
            format!("{}.", t.rsplit_once('.').unwrap().0)
        }),
        ("RS256 signed with an attacker's RSA key (ATK-04)", {
            // An RSA key of nobody's, as PKCS#1 DER.
            let der = std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/attacker-rsa.der"
            ))
            .unwrap();
            let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
            h.typ = Some("portcullis-session+jwt".into());
            h.kid = Some(kid.clone());
            jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_rsa_der(&der))
                .unwrap()
        }),
        (
            "ES256 signed with an attacker's EC key, embedded as jwk (ATK-08f)",
            {
                let pair = rcgen::KeyPair::generate().unwrap();
                let point = pair.public_key_raw();
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
                h.typ = Some("portcullis-session+jwt".into());
                h.jwk = serde_json::from_value(json!({
                    "kty": "EC", "crv": "P-256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                }))
                .ok();
                jsonwebtoken::encode(
                    &h,
                    &claims,
                    &jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
                )
                .unwrap()
            },
        ),
        (
            "a spare bit of the last signature character flipped (ATK-01b)",
            {
                // 32 signature bytes are 43 base64url characters: the last one carries 4 bits and
                // 2 unused ones. A lax decoder reads the flipped form as the same signature.
                const ALPHABET: &[u8] =
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
                let last = *good.as_bytes().last().unwrap();
                let v = ALPHABET.iter().position(|c| *c == last).unwrap();
                let mut t = good[..good.len() - 1].to_string();
                t.push(ALPHABET[v ^ 1] as char);
                t
            },
        ),
        (
            "a pending-2FA typ used as a session",
            sign(
                &header_with(&[("typ", json!("portcullis-pending+jwt"))]),
                &claims,
                &secret,
            ),
        ),
        (
            "plain JWT typ",
            sign(&header_with(&[("typ", json!("JWT"))]), &claims, &secret),
        ),
        ("padding added to the signature", format!("{good}=")),
        ("a fourth segment", format!("{good}.x")),
        (
            "standard base64 alphabet",
            good.replace('-', "+").replace('_', "/"),
        ),
        ("whitespace inside", good.replacen('.', ". ", 1)),
    ];
    let before = up.count();
    for (what, token) in &cases {
        if *what == "standard base64 alphabet" && !token.contains(['+', '/']) {
            continue;
        }
        assert_eq!(status(&gw, token).await, 401, "{what}");
    }
    assert_eq!(up.count(), before, "a refused token reached the upstream");
    // Nobody fetched anything from the trap.
    let accepted = tokio::time::timeout(Duration::from_millis(200), trap.accept()).await;
    assert!(accepted.is_err(), "the gateway connected to a jku/x5u URL");
    // The attacker's kid values never reach the log, escaped or not (ATK-08).
    gw.log_containing("401").await;
    let log = gw.log();
    for kid in ["dev/null", "UNION SELECT"] {
        assert!(!log.contains(kid), "the kid {kid:?} reached the log");
    }
    // A 20 KB claim set in a header is refused on size before any verification work.
    let huge = sign(
        &header,
        &with(&[("pad", json!("A".repeat(40_000)))]),
        &secret,
    );
    let resp = client()
        .get(gw.url("/secret"))
        .bearer_auth(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    // The control token still works.
    assert_eq!(status(&gw, &good).await, 200);
}
