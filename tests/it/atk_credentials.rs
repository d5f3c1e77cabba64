//! Credential parsing and confusion, and headers a client may not set (checklist §3: ATK-15,
//! ATK-16, ATK-18, ATK-34, ATK-35). Each case states the expected status and what the upstream
//! may see: nothing, or the request without the listed headers.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::harness::{client, Gateway};
use crate::jellyfin::{mb, setup as jellyfin_setup, token_of};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";
const BOB_PW: &str = "bob-password-12345";

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .route_keys("public_paths = [\"/pub\"]")
        .start()
        .await;
    (up, gw)
}

/// A named case: extra headers and the request path.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, String);

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

async fn get(gw: &Gateway, path: &str, h: HeaderMap) -> u16 {
    client()
        .get(gw.url(path))
        .headers(h)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn atk15_malformed_authorization_headers_are_refused_and_never_forwarded() {
    let (up, gw) = setup().await;
    let s = gw.login("alice", ALICE_PW).await.token;
    let s2 = gw.login("bob", BOB_PW).await.token;
    let cookie = format!("portcullis={s}");
    let refused: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("empty Bearer", vec![("authorization", "Bearer".into())]),
        (
            "two spaces",
            vec![("authorization", format!("Bearer  {s}"))],
        ),
        (
            "trailing junk",
            vec![("authorization", format!("Bearer {s} extra"))],
        ),
        ("quoted", vec![("authorization", format!("Bearer \"{s}\""))]),
        (
            "comma list",
            vec![("authorization", format!("Bearer {s},Bearer {s2}"))],
        ),
        (
            "valid then invalid line",
            vec![
                ("authorization", format!("Bearer {s}")),
                ("authorization", "Bearer junk".into()),
            ],
        ),
        (
            "invalid then valid line",
            vec![
                ("authorization", "Bearer junk".into()),
                ("authorization", format!("Bearer {s}")),
            ],
        ),
        (
            "Basic beside a Bearer",
            vec![
                ("authorization", format!("Bearer {s}")),
                ("authorization", "Basic YWxpY2U6c2VjcmV0".into()),
            ],
        ),
        (
            "Basic alone",
            vec![("authorization", "Basic YWxpY2U6c2VjcmV0".into())],
        ),
        ("empty value", vec![("authorization", String::new())]),
    ];
    for (name, pairs) in &refused {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(get(&gw, "/private", headers(&pairs)).await, 401, "{name}");
    }
    assert_eq!(up.count(), 0, "{:?}", up.requests());

    // A lower-case scheme is the same scheme (RFC 9110 §11.1).
    let auth = format!("bearer {s}");
    assert_eq!(
        get(&gw, "/ok", headers(&[("authorization", &auth)])).await,
        200
    );
    // With a valid cookie, a foreign scheme or an empty header is not forwarded either.
    for value in ["Basic YWxpY2U6c2VjcmV0", ""] {
        let h = headers(&[("cookie", &cookie), ("authorization", value)]);
        assert_eq!(get(&gw, "/ok", h).await, 200, "{value:?}");
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert_eq!(r.header("authorization"), None, "{r:?}");
        assert!(r.header("cookie").is_none_or(|c| !c.contains(&s)), "{r:?}");
    }
    gw.metrics_with(&["reason=\"ambiguous_credentials\""]).await;
}

#[tokio::test]
async fn atk16_two_principals_in_one_request_are_refused() {
    let (up, gw) = setup().await;
    let alice = gw.login("alice", ALICE_PW).await.token;
    let bob = gw.login("bob", BOB_PW).await.token;
    let alice_cookie = format!("portcullis={alice}");
    let bearer_bob = format!("Bearer {bob}");
    // (a) alice's cookie with bob's Bearer: neither is picked.
    let h = headers(&[("cookie", &alice_cookie), ("authorization", &bearer_bob)]);
    assert_eq!(get(&gw, "/a", h).await, 401);
    // (b) a valid cookie with an invalid Bearer: no fallback to the cookie.
    let h = headers(&[("cookie", &alice_cookie), ("authorization", "Bearer x.y.z")]);
    assert_eq!(get(&gw, "/b", h).await, 401);
    assert_eq!(up.count(), 0, "{:?}", up.requests());
    // The same token in both places is one credential.
    let h = headers(&[
        ("cookie", &alice_cookie),
        ("authorization", &format!("Bearer {alice}")),
    ]);
    assert_eq!(get(&gw, "/same", h).await, 200);
}

#[tokio::test]
async fn atk16_gateway_and_media_tokens_are_not_interchangeable_or_mixed() {
    let (jf, gw) = jellyfin_setup("").await;
    let alice_session = gw.login("alice", crate::jellyfin::PW).await.token;
    let bob_media = token_of(&gw, "bob", "bob-phone").await;
    let alice_media = token_of(&gw, "alice", "alice-phone").await;
    let before = jf.requests().len();
    let cookie = format!("portcullis={alice_session}");
    // (c) A gateway token in a media carrier is longer than any media token: malformed, 400.
    let mb_header = mb("d1", Some(&alice_session));
    assert_eq!(
        get(&gw, "/Users/Me", headers(&[("authorization", &mb_header)])).await,
        400
    );
    let path = format!("/Users/Me?ApiKey={alice_session}");
    assert_eq!(get(&gw, &path, HeaderMap::new()).await, 400);
    // (d) A media token as the gateway cookie is no session; (e) alice's cookie with bob's
    // media token names two principals.
    let as_cookie = format!("portcullis={alice_media}");
    assert_eq!(
        get(&gw, "/Users/Me", headers(&[("cookie", &as_cookie)])).await,
        401
    );
    let h = headers(&[("cookie", &cookie), ("x-emby-token", &bob_media)]);
    assert_eq!(get(&gw, "/Users/Me", h).await, 401);
    assert_eq!(
        jf.requests().len(),
        before,
        "a refused request reached Jellyfin"
    );
    // Alice's cookie with her own media token is one principal.
    let h = headers(&[("cookie", &cookie), ("x-emby-token", &alice_media)]);
    assert_eq!(get(&gw, "/Users/Me", h).await, 200);
}

#[tokio::test]
async fn atk18_two_different_media_tokens_in_two_carriers_are_refused() {
    let (jf, gw) = jellyfin_setup("").await;
    let a = token_of(&gw, "alice", "phone-a").await;
    let r = token_of(&gw, "bob", "phone-b").await;
    let before = jf.requests().len();
    let header_a = mb("phone-a", Some(&a));
    let cases: Vec<Case> = vec![
        (
            "X-Emby-Token",
            vec![("x-emby-token", r.clone())],
            "/Users/Me".into(),
        ),
        (
            "X-MediaBrowser-Token",
            vec![("x-mediabrowser-token", r.clone())],
            "/Users/Me".into(),
        ),
        ("ApiKey", vec![], format!("/Users/Me?ApiKey={r}")),
        ("api_key", vec![], format!("/Users/Me?api_key={r}")),
        (
            "X-Emby-Authorization",
            vec![("x-emby-authorization", mb("phone-b", Some(&r)))],
            "/Users/Me".into(),
        ),
    ];
    for (name, extra, path) in &cases {
        let mut pairs: Vec<(&str, &str)> = vec![("authorization", header_a.as_str())];
        pairs.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        assert_eq!(get(&gw, path, headers(&pairs)).await, 400, "{name}");
    }
    assert_eq!(
        jf.requests().len(),
        before,
        "a refused request reached Jellyfin"
    );
    // The same token repeated in two carriers is one token.
    let h = headers(&[("authorization", &header_a), ("x-emby-token", &a)]);
    assert_eq!(get(&gw, "/Users/Me", h).await, 200);
    gw.metrics_with(&["reason=\"two_tokens\""]).await;
}

/// Identity, routing and method-override headers a client might send.
const SPOOFED: &[(&str, &str)] = &[
    ("Remote-User", "admin"),
    ("Remote-Groups", "admins"),
    ("Remote-Email", "a@x"),
    ("X-Forwarded-User", "admin"),
    ("X-Auth-Request-User", "admin"),
    ("X-Authenticated-User", "admin"),
    ("X-WEBAUTH-USER", "admin"),
    ("X-Forwarded-Prefix", "/public"),
    ("X-Forwarded-Uri", "/System/Info/Public"),
    ("X-Original-URL", "/System/Info/Public"),
    ("X-Rewrite-URL", "/System/Info/Public"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("Remote.User", "admin"),
    ("REMOTE-USER", "admin"),
];

#[tokio::test]
async fn atk34_client_identity_and_routing_headers_never_reach_the_upstream() {
    let (up, gw) = setup().await;
    let s = gw.login("alice", ALICE_PW).await.token;
    let cookie = format!("portcullis={s}");
    for path in ["/private", "/pub/page"] {
        let mut pairs: Vec<(&str, &str)> = SPOOFED.to_vec();
        if path == "/private" {
            pairs.push(("cookie", &cookie));
        }
        assert_eq!(get(&gw, path, headers(&pairs)).await, 200, "{path}");
    }
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        for (name, _) in SPOOFED {
            assert_eq!(
                r.header(&name.to_ascii_lowercase()),
                None,
                "{name} reached the upstream on {}",
                r.path_and_query
            );
        }
        assert_eq!(r.method, "GET");
    }
    // Underscore spellings, which some servers read as dashes, are refused at the front door.
    for alias in ["Remote_User", "X_Forwarded_User"] {
        let h = headers(&[(alias, "admin"), ("cookie", &cookie)]);
        assert_eq!(get(&gw, "/private", h).await, 400, "{alias}");
    }
    assert_eq!(up.count(), 2, "an underscore alias reached the upstream");
}

#[tokio::test]
async fn atk35_forwarded_for_headers_neither_dodge_the_limit_nor_reach_the_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .auth_keys("ip_max_failures = 5")
        .start()
        .await;
    let spoof = [
        "x-forwarded-for",
        "x-real-ip",
        "forwarded",
        "true-client-ip",
        "cf-connecting-ip",
    ];
    // Five failures from one TCP peer, each claiming another address, and for other names
    // (password spraying, ATK-46): the sixth attempt is throttled, even with the right password.
    for (i, header) in spoof.iter().enumerate() {
        let value = if *header == "forwarded" {
            format!("for=203.0.113.{i}")
        } else {
            format!("203.0.113.{i}")
        };
        let user = ["bob", "carol", "dave", "bob", "erin"][i];
        let resp = client()
            .post(gw.url("/_portcullis/api/login"))
            .header(*header, value)
            .json(&serde_json::json!({"username": user, "password": "Winter2025!"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "attempt {i}");
    }
    let resp = client()
        .post(gw.url("/_portcullis/api/login"))
        .header("x-forwarded-for", "198.51.100.7")
        .json(&serde_json::json!({"username": "alice", "password": ALICE_PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429, "the address limit was dodged");
    // Spraying on (ATK-46): one password against 200 names, existing and not, from this peer.
    for i in 0..200 {
        let user = if i % 50 == 0 {
            "bob".to_string()
        } else {
            format!("user{i}")
        };
        let resp = client()
            .post(gw.url("/_portcullis/api/login"))
            .header("x-forwarded-for", format!("198.51.100.{}", i % 250))
            .json(&serde_json::json!({"username": user, "password": "Winter2025!"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429, "spray attempt {i} for {user}");
    }

    // Spraying locked no account: bob and alice sign in from another address.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 6]))
        .build()
        .unwrap();
    let resp = other
        .post(gw.url("/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "bob", "password": BOB_PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let token: serde_json::Value = resp.json().await.unwrap();
    let token = token["token"].as_str().unwrap();
    let resp = other
        .post(gw.url("/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "alice", "password": ALICE_PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "alice was locked by someone else's spraying"
    );

    // What the upstream sees is the real peer, overwritten, not appended to.
    let resp = other
        .get(gw.url("/x"))
        .bearer_auth(token)
        .header("x-forwarded-for", "127.0.0.1")
        .header("x-real-ip", "10.0.0.1")
        .header("forwarded", "for=10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = up.last().unwrap();
    assert_eq!(r.header_all("x-forwarded-for"), vec!["127.0.0.6"]);
    assert_eq!(r.header_all("x-real-ip"), vec!["127.0.0.6"]);
    assert_eq!(r.header("forwarded"), None);
    assert_eq!(r.header("x-forwarded-proto"), Some("http"));
}
