//! Single sign-on (OpenID Connect) end to end. Two kinds of provider:
//! - a real one: panva's certified `oidc-provider` (npm, `tests/oidc/provider.mjs`, installed by
//!   `tests/oidc/install.sh`), driven by headless Chromium for the full browser login and by its
//!   own end-session page for a real back-channel logout;
//! - a forged one served here (discovery document, key set, token endpoint) whose tokens the test
//!   signs itself, because a certified provider will not mint a token with a wrong audience, an
//!   expired one, a wrong nonce or an unknown key — the gateway's checks must refuse each.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::harness::{client, poll_until, set_cookie, Gateway};
use crate::standin::StandIn;
use crate::upstream::Upstream;

const CLIENT_ID: &str = "portcullis";
const CLIENT_SECRET: &str = "client-secret-that-never-reaches-a-log";
const PW: &str = "correct horse battery staple";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An ES256 signing key and its public JWK.
struct Key {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl Key {
    fn new(kid: &str) -> Key {
        let pair = rcgen::KeyPair::generate().unwrap();
        let raw = pair.public_key_raw();
        Key {
            kid: kid.to_string(),
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
                        "kid": kid, "use": "sig", "alg": "ES256"}),
        }
    }

    fn sign(&self, typ: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        h.typ = typ.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }
}

/// What the forged provider saw at its token endpoint.
#[derive(Default)]
struct FakeState {
    next_id_token: Option<String>,
    token_requests: Vec<(Option<String>, String)>,
}

/// A provider served by the test: discovery, keys (only `key`), a token endpoint that answers
/// with whatever ID token the test put there.
struct FakeOp {
    issuer: String,
    key: Key,
    state: Arc<Mutex<FakeState>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeOp {
    async fn start() -> FakeOp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let key = Key::new("k1");
        let state = Arc::new(Mutex::new(FakeState::default()));
        let discovery = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "end_session_endpoint": format!("{issuer}/logout"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        });
        let jwks = json!({"keys": [key.jwk.clone()]});
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (discovery, jwks, st) = (discovery.clone(), jwks.clone(), st.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (discovery, jwks, st) = (discovery.clone(), jwks.clone(), st.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let json_reply = |v: &Value| {
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(v.to_string())))
                                    .unwrap()
                            };
                            let resp = match path.as_str() {
                                "/.well-known/openid-configuration" => json_reply(&discovery),
                                "/jwks" => json_reply(&jwks),
                                "/token" => {
                                    let mut s = st.lock().unwrap();
                                    s.token_requests
                                        .push((auth, String::from_utf8_lossy(&body).into_owned()));
                                    match s.next_id_token.take() {
                                        Some(t) => json_reply(&json!({
                                            "access_token": "at", "token_type": "Bearer", "id_token": t
                                        })),
                                        None => hyper::Response::builder()
                                            .status(400)
                                            .body(Full::new(Bytes::from(
                                                "{\"error\":\"invalid_grant\"}",
                                            )))
                                            .unwrap(),
                                    }
                                }
                                _ => hyper::Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeOp {
            issuer,
            key,
            state,
            _task: task,
        }
    }

    /// ID-token claims for `sub` in the sign-in with `nonce`.
    fn claims(&self, sub: &str, nonce: &str) -> Value {
        json!({"iss": self.issuer, "aud": CLIENT_ID, "sub": sub, "iat": now(), "exp": now() + 300,
               "nonce": nonce, "sid": format!("sid-of-{sub}")})
    }

    fn logout_token(&self, claims: &Value) -> String {
        self.key.sign(Some("logout+jwt"), claims)
    }

    fn logout_claims(&self, sub: &str, sid: &str) -> Value {
        json!({"iss": self.issuer, "aud": CLIENT_ID, "iat": now(), "jti": uuid::Uuid::new_v4().to_string(),
               "sub": sub, "sid": sid,
               "events": {"http://schemas.openid.net/event/backchannel-logout": {}}})
    }
}

fn secret_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("oidc-client-secret");
    std::fs::write(&path, format!("{CLIENT_SECRET}\n")).unwrap();
    path
}

/// An `[[oidc]]` table.
fn provider_toml(id: &str, issuer: &str, secret: &std::path::Path, extra: &str) -> String {
    format!(
        "[[oidc]]\nid = \"{id}\"\ndisplay_name = \"Test IdP\"\nissuer = \"{issuer}\"\n\
         client_id = \"{CLIENT_ID}\"\nclient_secret_file = \"{}\"\n{extra}\n",
        secret.display()
    )
}

/// Waits until the provider is discovered (the start page redirects to it).
async fn wait_discovered(gw: &Gateway, provider: &str) {
    let url = gw.url(&format!("/_portcullis/oidc/{provider}/start"));
    assert!(
        poll_until(Duration::from_secs(15), || async {
            client()
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 303)
        })
        .await,
        "{provider} was not discovered: {}",
        gw.log()
    );
}

/// One sign-in started at the gateway: the values the gateway sent to the provider.
struct Started {
    state: String,
    nonce: String,
    challenge: String,
    flow_cookie: String,
}

async fn start_sso(gw: &Gateway, provider: &str) -> Started {
    let resp = client()
        .get(gw.url(&format!("/_portcullis/oidc/{provider}/start?rd=/after")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let flow_cookie = set_cookie(&resp, "portcullis-oidc").expect("flow cookie");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let url = url::Url::parse(&location).unwrap();
    let q = |k: &str| {
        url.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    assert_eq!(q("response_type"), "code");
    assert_eq!(q("client_id"), CLIENT_ID);
    assert_eq!(q("code_challenge_method"), "S256");
    assert_eq!(
        q("redirect_uri"),
        gw.url(&format!("/_portcullis/oidc/{provider}/callback"))
    );
    Started {
        state: q("state"),
        nonce: q("nonce"),
        challenge: q("code_challenge"),
        flow_cookie,
    }
}

async fn callback(
    gw: &Gateway,
    provider: &str,
    state: &str,
    cookie: Option<&str>,
) -> reqwest::Response {
    let mut req = client().get(gw.url(&format!(
        "/_portcullis/oidc/{provider}/callback?code=the-code&state={state}"
    )));
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.unwrap()
}

/// A whole sign-in against the forged provider with the ID token `token_for(nonce)`: the
/// callback's answer.
async fn sso_with(
    gw: &Gateway,
    op: &FakeOp,
    provider: &str,
    token_for: impl FnOnce(&str) -> String,
) -> reqwest::Response {
    let s = start_sso(gw, provider).await;
    op.state.lock().unwrap().next_id_token = Some(token_for(&s.nonce));
    callback(gw, provider, &s.state, Some(&s.flow_cookie)).await
}

/// A sign-in whose ID token carries `claims`, with the flow's nonce filled in, signed by the
/// provider's key.
async fn sso_signed(gw: &Gateway, op: &FakeOp, provider: &str, claims: Value) -> reqwest::Response {
    sso_with(gw, op, provider, |nonce| {
        let mut c = claims;
        c["nonce"] = json!(nonce);
        op.key.sign(None, &c)
    })
    .await
}

/// The session token of a sign-in that must succeed.
async fn sso_session(gw: &Gateway, op: &FakeOp, provider: &str, claims: Value) -> String {
    let resp = sso_signed(gw, op, provider, claims).await;
    assert_eq!(
        resp.status(),
        303,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert_eq!(resp.headers()["location"], "/after");
    let cookie = set_cookie(&resp, "portcullis").expect("a session cookie");
    cookie.trim_start_matches("portcullis=").to_string()
}

async fn whoami(gw: &Gateway, token: &str) -> Option<String> {
    let resp = client()
        .get(gw.url("/_portcullis/account"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    if resp.status() != 200 {
        return None;
    }
    let html = resp.text().await.unwrap();
    html.split("Your account: ")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .map(str::to_string)
}

async fn fake_setup(
    extra_gw: impl FnOnce(crate::harness::GatewayBuilder) -> crate::harness::GatewayBuilder,
    oidc: &[(&str, &str)],
) -> (Upstream, FakeOp, Gateway, tempfile::TempDir) {
    let up = Upstream::start().await;
    let op = FakeOp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path());
    let mut b = Gateway::builder(&up.url());
    for (id, extra) in oidc {
        b = b.extra_toml(&provider_toml(id, &op.issuer, &secret, extra));
    }
    let gw = extra_gw(b).start().await;
    for (id, _) in oidc {
        wait_discovered(&gw, id).await;
    }
    (up, op, gw, dir)
}

#[tokio::test]
async fn id_tokens_failing_any_check_get_no_session_and_pkce_is_used() {
    let (_up, op, gw, _dir) = fake_setup(|b| b.user("alice", PW), &[("idp", "")]).await;
    gw.cli_ok(&[
        "user",
        "link-oidc",
        "alice",
        "--provider",
        "idp",
        "--subject",
        "s-alice",
    ]);

    // A good token signs alice in; the code was exchanged with the PKCE verifier and the client
    // secret (HTTP Basic).
    let s = start_sso(&gw, "idp").await;
    let mut c = op.claims("s-alice", &s.nonce);
    op.state.lock().unwrap().next_id_token = Some(op.key.sign(None, &c));
    let resp = callback(&gw, "idp", &s.state, Some(&s.flow_cookie)).await;
    assert_eq!(resp.status(), 303);
    let token = set_cookie(&resp, "portcullis").unwrap();
    assert!(resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("portcullis-oidc=;")));
    let token = token.trim_start_matches("portcullis=");
    assert_eq!(whoami(&gw, token).await.as_deref(), Some("alice"));
    let (auth, body) = op
        .state
        .lock()
        .unwrap()
        .token_requests
        .last()
        .cloned()
        .unwrap();
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let verifier = &form.iter().find(|(k, _)| k == "code_verifier").unwrap().1;
    assert_eq!(b64(&Sha256::digest(verifier.as_bytes())), s.challenge);
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    assert_eq!(auth.as_deref(), Some(format!("Basic {basic}").as_str()));

    // The same flow cannot be used twice (the state is spent with its cookie only in this
    // browser; another browser has no cookie).
    let resp = callback(&gw, "idp", &s.state, None).await;
    assert_eq!(resp.status(), 400);
    assert!(set_cookie(&resp, "portcullis").is_none());

    let stranger = Key::new("k-stranger");
    let same_kid_other_key = Key::new("k1");
    type Forge = Box<dyn Fn(&FakeOp, &str) -> String>;
    let cases: Vec<(&str, Forge)> = vec![
        (
            "wrong audience",
            Box::new(|op, n| {
                let mut c = op.claims("s-alice", n);
                c["aud"] = json!("another-client");
                op.key.sign(None, &c)
            }),
        ),
        (
            "expired",
            Box::new(|op, n| {
                let mut c = op.claims("s-alice", n);
                c["exp"] = json!(now() - 120);
                c["iat"] = json!(now() - 600);
                op.key.sign(None, &c)
            }),
        ),
        (
            "wrong nonce",
            Box::new(|op, _| op.key.sign(None, &op.claims("s-alice", "not-this-sign-in"))),
        ),
        (
            "unknown key",
            Box::new(move |op, n| stranger.sign(None, &op.claims("s-alice", n))),
        ),
        (
            "forged with a published kid",
            Box::new(move |op, n| same_kid_other_key.sign(None, &op.claims("s-alice", n))),
        ),
        (
            "wrong issuer",
            Box::new(|op, n| {
                let mut c = op.claims("s-alice", n);
                c["iss"] = json!("http://127.0.0.1:1");
                op.key.sign(None, &c)
            }),
        ),
        (
            "alg none",
            Box::new(|op, n| {
                let head = b64(br#"{"alg":"none","kid":"k1"}"#);
                format!(
                    "{head}.{}.",
                    b64(op.claims("s-alice", n).to_string().as_bytes())
                )
            }),
        ),
        (
            "HS256 with the client secret",
            Box::new(|op, n| {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("k1".into());
                jsonwebtoken::encode(
                    &h,
                    &op.claims("s-alice", n),
                    &EncodingKey::from_secret(CLIENT_SECRET.as_bytes()).unwrap(),
                )
                .unwrap()
            }),
        ),
    ];
    for (what, forge) in &cases {
        let resp = sso_with(&gw, &op, "idp", |n| forge(&op, n)).await;
        assert_eq!(resp.status(), 400, "{what}");
        assert!(
            set_cookie(&resp, "portcullis").is_none(),
            "{what}: a session was set"
        );
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("identity token was refused"),
            "{what}: {text}"
        );
    }
    // A state that is not this browser's.
    let s = start_sso(&gw, "idp").await;
    c["nonce"] = json!(s.nonce);
    op.state.lock().unwrap().next_id_token = Some(op.key.sign(None, &c));
    let resp = callback(&gw, "idp", "someone-elses-state", Some(&s.flow_cookie)).await;
    assert_eq!(resp.status(), 400);
    assert!(set_cookie(&resp, "portcullis").is_none());
    // Anyone can send a callback with a wrong state: counted in the metrics, not audited.
    let audit = audit_entries(&gw);
    assert!(
        !audit.iter().any(|(_, o)| o == "state_mismatch"),
        "{audit:?}"
    );
    assert!(audit.contains(&("sso_login".into(), "wrong_audience".into())));

    let m = gw
        .metrics_with(&[
            r#"portcullis_oidc_logins_total{provider="idp",result="success"} 1"#,
            r#"portcullis_oidc_logins_total{provider="idp",result="wrong_audience"} 1"#,
            r#"portcullis_oidc_logins_total{provider="idp",result="expired"} 1"#,
            r#"portcullis_oidc_logins_total{provider="idp",result="wrong_nonce"} 1"#,
            r#"portcullis_oidc_logins_total{provider="idp",result="unknown_key"} 1"#,
            r#"portcullis_oidc_logins_total{provider="idp",result="state_mismatch"} 1"#,
        ])
        .await;
    assert!(m.contains("bad_signature"), "{m}");
    let log = gw.log();
    assert!(
        !log.contains(CLIENT_SECRET),
        "the client secret reached the log"
    );
    assert!(
        !log.contains(verifier.as_str()),
        "the PKCE verifier reached the log"
    );
}

#[tokio::test]
async fn linking_is_by_subject_and_a_changed_email_never_takes_over_an_account() {
    let (_up, op, gw, _dir) = fake_setup(
        |b| {
            b.user("bob@example.com", PW)
                .user("carol@example.com", PW)
                .user("dave", PW)
        },
        &[
            ("strict", ""),
            (
                "mail",
                "auto_link = \"email\"\nadmin_claim = \"groups\"\nadmin_value = \"media-admins\"",
            ),
        ],
    )
    .await;
    let with = |mut c: Value, extra: Value| {
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    // auto_link = off: a provider account with no link gets no session, whatever its email.
    let resp = sso_with(&gw, &op, "strict", |n| {
        op.key.sign(
            None,
            &with(
                op.claims("s-bob", n),
                json!({"email": "bob@example.com", "email_verified": true}),
            ),
        )
    })
    .await;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("not linked"));

    // auto_link = email: an unverified email links nothing.
    let resp = sso_with(&gw, &op, "mail", |n| {
        op.key.sign(
            None,
            &with(
                op.claims("s-bob", n),
                json!({"email": "bob@example.com", "email_verified": false}),
            ),
        )
    })
    .await;
    assert_eq!(resp.status(), 403);
    // A verified one links bob's subject to bob; the groups claim grants admin.
    let token = sso_session(
        &gw,
        &op,
        "mail",
        with(
            op.claims("s-bob", ""),
            json!({"email": "bob@example.com", "email_verified": true, "groups": ["media-admins"]}),
        ),
    )
    .await;
    assert_eq!(
        whoami(&gw, &token).await.as_deref(),
        Some("bob@example.com")
    );
    let list = gw.cli_ok(&["user", "list", "--json"]);
    let users: Value = serde_json::from_str(&list).unwrap();
    let bob = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "bob@example.com")
        .unwrap();
    assert_eq!(bob["admin"], json!(true), "{list}");

    // Bob's email changes at the provider to carol's: he still signs in as bob (the link is by
    // subject), never as carol.
    let token = sso_session(
        &gw,
        &op,
        "mail",
        with(
            op.claims("s-bob", ""),
            json!({"email": "carol@example.com", "email_verified": true}),
        ),
    )
    .await;
    assert_eq!(
        whoami(&gw, &token).await.as_deref(),
        Some("bob@example.com")
    );

    // Another provider account claiming bob's verified email cannot take bob over: bob is
    // linked to another subject at this provider.
    let resp = sso_with(&gw, &op, "mail", |n| {
        op.key.sign(
            None,
            &with(
                op.claims("s-mallory", n),
                json!({"email": "bob@example.com", "email_verified": true}),
            ),
        )
    })
    .await;
    assert_eq!(resp.status(), 403);
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("linked to another account"));

    // An admin links dave explicitly; dave unlinks on the account page; dave's next provider
    // sign-in finds no link.
    gw.cli_ok(&[
        "user",
        "link-oidc",
        "dave",
        "--provider",
        "strict",
        "--subject",
        "s-dave",
    ]);
    let out = gw.cli(&[
        "user",
        "link-oidc",
        "carol@example.com",
        "--provider",
        "strict",
        "--subject",
        "s-dave",
    ]);
    assert!(
        !out.status.success(),
        "a linked subject cannot be linked to a second user"
    );
    let token = sso_session(&gw, &op, "strict", op.claims("s-dave", "")).await;
    assert_eq!(whoami(&gw, &token).await.as_deref(), Some("dave"));
    let page = client()
        .get(gw.url("/_portcullis/account"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("data-provider=\"strict\"") && page.contains("Linked"),
        "{page}"
    );
    let csrf = crate::harness::input_value(&page, "csrf").unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/account/oidc/unlink"))
        .bearer_auth(&token)
        .form(&[("provider", "strict"), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let resp = sso_with(&gw, &op, "strict", |n| {
        op.key.sign(None, &op.claims("s-dave", n))
    })
    .await;
    assert_eq!(resp.status(), 403);

    let audit = gw.cli_ok(&["audit", "--json"]);
    for event in ["sso_link", "sso_unlink", "sso_login", "sso_admin_granted"] {
        assert!(
            audit.contains(event),
            "{event} missing from the audit log: {audit}"
        );
    }
    gw.metrics_with(&[
        r#"portcullis_oidc_links_total{how="auto",provider="mail"} 1"#,
        r#"portcullis_oidc_links_total{how="unlink",provider="strict"} 1"#,
        r#"portcullis_oidc_logins_total{provider="mail",result="link_conflict"} 1"#,
        r#"portcullis_oidc_logins_total{provider="strict",result="not_linked"} 2"#,
    ])
    .await;
}

#[tokio::test]
async fn back_channel_logout_tokens_are_checked_and_replays_change_nothing() {
    let (_up, op, gw, _dir) = fake_setup(|b| b.user("alice", PW), &[("idp", "")]).await;
    gw.cli_ok(&[
        "user",
        "link-oidc",
        "alice",
        "--provider",
        "idp",
        "--subject",
        "s-alice",
    ]);
    let mut c1 = op.claims("s-alice", "");
    c1["sid"] = json!("op-session-1");
    let mut c2 = op.claims("s-alice", "");
    c2["sid"] = json!("op-session-2");
    let one = sso_session(&gw, &op, "idp", c1).await;
    let two = sso_session(&gw, &op, "idp", c2).await;
    let password = gw.login("alice", PW).await.token;
    let post = |token: String| {
        let url = gw.url("/_portcullis/oidc/idp/backchannel-logout");
        async move {
            client()
                .post(url)
                .form(&[("logout_token", token)])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let all_live = || async {
        gw.get_status("/", &one).await == 200
            && gw.get_status("/", &two).await == 200
            && gw.get_status("/", &password).await == 200
    };
    assert!(all_live().await);

    // Refused with 400, and nothing ends: forged (a key the provider does not publish), a
    // nonce, no event, an ID token, no sub or sid, wrong audience, too old, garbage.
    let stranger = Key::new("k-stranger");
    let mut with_nonce = op.logout_claims("s-alice", "op-session-1");
    with_nonce["nonce"] = json!("n");
    let mut no_event = op.logout_claims("s-alice", "op-session-1");
    no_event["events"] = json!({});
    let mut neither = op.logout_claims("s-alice", "op-session-1");
    neither.as_object_mut().unwrap().remove("sub");
    neither.as_object_mut().unwrap().remove("sid");
    let mut wrong_aud = op.logout_claims("s-alice", "op-session-1");
    wrong_aud["aud"] = json!("another-client");
    let mut old = op.logout_claims("s-alice", "op-session-1");
    old["iat"] = json!(now() - 3600);
    for (what, token) in [
        (
            "forged",
            stranger.sign(
                Some("logout+jwt"),
                &op.logout_claims("s-alice", "op-session-1"),
            ),
        ),
        ("nonce", op.logout_token(&with_nonce)),
        ("no event", op.logout_token(&no_event)),
        ("id token", op.key.sign(None, &op.claims("s-alice", "n"))),
        ("no sub or sid", op.logout_token(&neither)),
        ("wrong audience", op.logout_token(&wrong_aud)),
        ("too old", op.logout_token(&old)),
        ("garbage", "not-a-token".to_string()),
        ("empty", String::new()),
    ] {
        assert_eq!(post(token).await, 400, "{what}");
    }
    assert!(all_live().await, "a refused logout token ended a session");

    // A good one for provider session 1 ends exactly that gateway session, at once.
    let good = op.logout_token(&op.logout_claims("s-alice", "op-session-1"));
    let sent = Instant::now();
    assert_eq!(post(good.clone()).await, 200);
    assert!(gw.refused_within(&one, Duration::from_secs(1)).await);
    assert!(sent.elapsed() < Duration::from_secs(1));
    assert_eq!(gw.get_status("/", &two).await, 200);
    assert_eq!(gw.get_status("/", &password).await, 200);

    // Replayed: 400 and nothing more ends.
    assert_eq!(post(good).await, 400);
    assert_eq!(gw.get_status("/", &two).await, 200);
    assert_eq!(gw.get_status("/", &password).await, 200);

    // A logout of the whole subject (no sid) signs alice out everywhere.
    let mut by_sub = op.logout_claims("s-alice", "");
    by_sub.as_object_mut().unwrap().remove("sid");
    assert_eq!(post(op.logout_token(&by_sub)).await, 200);
    assert!(gw.refused_within(&two, Duration::from_secs(1)).await);
    assert!(gw.refused_within(&password, Duration::from_secs(1)).await);

    gw.metrics_with(&[
        r#"portcullis_oidc_backchannel_logouts_total{provider="idp",result="success"} 2"#,
        r#"portcullis_oidc_backchannel_logouts_total{provider="idp",result="replayed"} 1"#,
        r#"portcullis_oidc_backchannel_logouts_total{provider="idp",result="unknown_key"} 1"#,
        r#"portcullis_oidc_backchannel_logouts_total{provider="idp",result="nonce_in_logout_token"} 1"#,
    ])
    .await;
    // Only tokens the provider signed leave an audit entry: no token, garbage and forged
    // signatures are anyone's requests, counted in the metrics only.
    let audit = audit_entries(&gw);
    let outcomes: Vec<&str> = audit
        .iter()
        .filter(|(e, _)| e == "sso_backchannel_logout")
        .map(|(_, o)| o.as_str())
        .collect();
    for o in ["success", "replayed", "wrong_audience", "too_old"] {
        assert!(outcomes.contains(&o), "{o} not audited: {outcomes:?}");
    }
    for o in ["missing_token", "malformed", "unknown_key", "bad_signature"] {
        assert!(!outcomes.contains(&o), "{o} audited: {outcomes:?}");
    }
    gw.metrics_with(&[
        r#"portcullis_oidc_backchannel_logouts_total{provider="idp",result="missing_token"} 1"#,
        r#"portcullis_oidc_backchannel_logouts_total{provider="idp",result="malformed"} 1"#,
    ])
    .await;

    // The provider path segment reaches no log line decoded: it cannot forge fields there.
    // (Control characters never get this far: the path check refuses them.)
    let forged = "x%20ip%3D10.6.6.6%20reason%3D%22forged%22";
    for path in [
        format!("/_portcullis/oidc/{forged}/start"),
        format!("/_portcullis/oidc/{forged}/callback?state=s"),
    ] {
        let resp = client().get(gw.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    assert_eq!(post_logout_token(&gw, forged, "t").await, 404);
    let log = gw.log();
    assert!(!log.contains("ip=10.6.6.6"), "a forged log field: {log}");
    assert!(log.contains("provider=\"-\""), "{log}");
}

#[tokio::test]
async fn sso_users_sign_out_of_all_devices_and_their_media_tokens_end_too() {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    let op = FakeOp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path());
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"")
        .extra_toml(&provider_toml("idp", &op.issuer, &secret, ""))
        .start()
        .await;
    wait_discovered(&gw, "idp").await;
    gw.cli_ok(&[
        "user",
        "link-oidc",
        "alice",
        "--provider",
        "idp",
        "--subject",
        "s-alice",
    ]);
    let phone = sso_session(&gw, &op, "idp", op.claims("s-alice", "")).await;
    let laptop = sso_session(&gw, &op, "idp", op.claims("s-alice", "")).await;
    let media = jf_token(&gw, "alice", "tv-1").await;
    assert_eq!(jf_get(&gw, &media).await, 200);

    // "Sign out of all devices" from the laptop: every session and the TV's token end, and the
    // browser goes on to the provider's end-session endpoint with its ID token.
    let page = client()
        .get(gw.url("/_portcullis/account"))
        .header("cookie", format!("portcullis={laptop}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = crate::harness::input_value(&page, "csrf").unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/account/signout-all"))
        .header("cookie", format!("portcullis={laptop}"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let end = url::Url::parse(&location).unwrap();
    assert_eq!(
        format!("{}{}", end.origin().ascii_serialization(), end.path()),
        format!("{}/logout", op.issuer)
    );
    let q: Vec<(String, String)> = end.query_pairs().into_owned().collect();
    assert!(
        q.iter()
            .any(|(k, v)| k == "id_token_hint" && v.split('.').count() == 3),
        "{location}"
    );
    assert!(
        q.iter()
            .any(|(k, v)| k == "post_logout_redirect_uri" && *v == gw.url("/_portcullis/login")),
        "{location}"
    );
    for token in [&phone, &laptop] {
        assert!(gw.refused_within(token, Duration::from_secs(1)).await);
    }
    assert!(
        poll_until(Duration::from_secs(1), || async {
            jf_get(&gw, &media).await == 401
        })
        .await,
        "the media token still works"
    );
}

/// The `Authorization` header value a Jellyfin client sends.
fn mb(device_id: &str, token: Option<&str>) -> String {
    let mut v = format!(
        "MediaBrowser Client=\"Jellyfin Android TV\", Device=\"TV\", DeviceId=\"{device_id}\", Version=\"0.17.0\""
    );
    if let Some(t) = token {
        v.push_str(&format!(", Token=\"{t}\""));
    }
    v
}

/// A Jellyfin token minted through the gateway (and so bound to the gateway user).
async fn jf_token(gw: &Gateway, user: &str, device: &str) -> String {
    let resp = client()
        .post(gw.url("/Users/AuthenticateByName"))
        .header("Authorization", mb(device, None))
        .json(&json!({"Username": user, "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    v["AccessToken"].as_str().unwrap().to_string()
}

async fn jf_get(gw: &Gateway, token: &str) -> u16 {
    client()
        .get(gw.url("/Users/Me"))
        .header("Authorization", mb("probe", Some(token)))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// The real provider, as a child process.
struct RealOp {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    issuer: String,
}

impl RealOp {
    async fn start() -> RealOp {
        let dir = root().join("tests/oidc");
        // Node makes inherited descriptors non-blocking, which would break the test runner's
        // own output: its stderr goes to a file.
        let log = tempfile::NamedTempFile::new().unwrap();
        let (log_file, _) = log.keep().unwrap();
        assert!(
            dir.join("node_modules/oidc-provider/package.json").exists(),
            "the single sign-on tests need oidc-provider: run tests/oidc/install.sh"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(dir.join("provider.mjs"))
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("run node (Node.js 20 or newer)");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the provider starts")
            .unwrap()
            .expect("the provider prints its issuer");
        let v: Value = serde_json::from_str(&first).unwrap();
        RealOp {
            child,
            stdin,
            lines,
            issuer: v["issuer"].as_str().unwrap().to_string(),
        }
    }

    async fn configure(&mut self, gw: &Gateway, accounts: Value) {
        let cfg = json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uri": gw.url("/_portcullis/oidc/testidp/callback"),
            "post_logout_redirect_uri": gw.url("/_portcullis/login"),
            "backchannel_logout_uri": gw.url("/_portcullis/oidc/testidp/backchannel-logout"),
            "accounts": accounts,
        });
        self.stdin
            .write_all(format!("{cfg}\n").as_bytes())
            .await
            .unwrap();
        let ready = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(ready.contains("ready"), "{ready}");
    }
}

#[tokio::test]
async fn browser_signs_in_through_a_real_provider_whose_logout_ends_the_session_and_media_token() {
    crate::browser::check_prerequisites();
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    let mut op = RealOp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path());
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"")
        .extra_toml(&provider_toml(
            "testidp",
            &op.issuer,
            &secret,
            "scopes = [\"openid\", \"profile\", \"email\", \"groups\"]",
        ))
        .start()
        .await;
    // The provider is down (it answers 503 until configured): the gateway runs, and the
    // provider's button leads to an error page until discovery succeeds in the background.
    let resp = client()
        .get(gw.url("/_portcullis/oidc/testidp/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("cannot be reached yet"));
    op.configure(
        &gw,
        json!({"op-alice": {"email": "alice@example.com", "email_verified": true}}),
    )
    .await;
    wait_discovered(&gw, "testidp").await;
    gw.cli_ok(&[
        "user",
        "link-oidc",
        "alice",
        "--provider",
        "testidp",
        "--subject",
        "op-alice",
    ]);
    let media = jf_token(&gw, "alice", "tv-1").await;
    assert_eq!(jf_get(&gw, &media).await, 200);
    // A second replica on the same store.
    let replica = Gateway::builder(&jf.url())
        .server_keys(&format!("public_url = \"{}\"", gw.base))
        .keys_of(&gw)
        .store_url(&format!("sqlite://{}", gw.db_path().display()))
        .route_keys("kind = \"jellyfin\"")
        .start()
        .await;

    let output = root().join("tests/output");
    std::fs::create_dir_all(&output).unwrap();
    let mut script = tokio::process::Command::new("node")
        .arg(root().join("tests/browser/sso_login.mjs"))
        .current_dir(root())
        .env("PORTCULLIS_URL", &gw.base)
        .env("PORTCULLIS_USER", "alice")
        .env("PORTCULLIS_OIDC_ISSUER", &op.issuer)
        .env("PORTCULLIS_OIDC_LOGIN", "op-alice")
        .env("PORTCULLIS_OUTPUT", &output)
        .env("CHROMIUM", crate::browser::chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut stdin = script.stdin.take().unwrap();
    let mut out = BufReader::new(script.stdout.take().unwrap()).lines();
    let errors = Arc::new(Mutex::new(String::new()));
    let mut stderr = script.stderr.take().unwrap();
    let sink = errors.clone();
    let mut err_task = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut buf = String::new();
        let _ = stderr.read_to_string(&mut buf).await;
        sink.lock().unwrap().push_str(&buf);
    });
    let mut seen = Vec::new();
    let mut next_json = async |key: &str| -> Value {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(120), out.next_line())
                .await
                .unwrap_or_else(|_| panic!("no {key} from the script; so far: {seen:?}"))
                .unwrap();
            let Some(line) = line else {
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut err_task).await;
                panic!(
                    "the script ended before {key}: {seen:?}\n{}",
                    errors.lock().unwrap()
                );
            };
            seen.push(line.clone());
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v.get(key).is_some() {
                    return v;
                }
            }
        }
    };
    let session = next_json("session").await["session"]
        .as_str()
        .unwrap()
        .to_string();
    // The browser's session works on both replicas, and so does the TV's token.
    assert_eq!(gw.get_status("/_portcullis/account", &session).await, 200);
    assert_eq!(
        replica.get_status("/_portcullis/account", &session).await,
        200
    );
    assert_eq!(jf_get(&replica, &media).await, 200);
    stdin.write_all(b"go\n").await.unwrap();
    next_json("provider_logout").await;
    let ended = Instant::now();
    // The provider's back-channel logout (sent during its end-session page) ended the
    // browser's session and the TV's token on every replica.
    for g in [&gw, &replica] {
        assert!(g.refused_within(&session, Duration::from_secs(1)).await);
        assert!(
            poll_until(Duration::from_secs(1), || async {
                jf_get(g, &media).await == 401
            })
            .await,
            "the media token still works"
        );
    }
    assert!(ended.elapsed() < Duration::from_secs(2));
    let status = tokio::time::timeout(Duration::from_secs(120), script.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), err_task).await;
    assert!(
        status.success(),
        "sso_login.mjs failed:\n{}\n{}",
        seen.join("\n"),
        errors.lock().unwrap()
    );
    gw.metrics_with(&[
        r#"portcullis_oidc_logins_total{provider="testidp",result="success"} 1"#,
        r#"portcullis_oidc_backchannel_logouts_total{provider="testidp",result="success"} 1"#,
    ])
    .await;
    let log = gw.log();
    assert!(
        !log.contains(CLIENT_SECRET),
        "the client secret reached the log"
    );
    assert!(!log.contains(&session), "the session token reached the log");
    let _ = op.child.start_kill();
}

// ---------------------------------------------------------------------------------------------
// Security review fixes: auto-link, linking, sessions that replace others, provider sessions
// ended mid-login, issuers, and what unauthenticated requests may write.

/// `(event, outcome)` of every audit entry.
fn audit_entries(gw: &Gateway) -> Vec<(String, String)> {
    let audit: Value = serde_json::from_str(&gw.cli_ok(&["audit", "--json"])).unwrap();
    audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The `amr` claim of a session token.
fn amr_of(token: &str) -> Vec<String> {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    serde_json::from_value(claims["amr"].clone()).unwrap()
}

fn is_admin(gw: &Gateway, name: &str) -> bool {
    let users: Value = serde_json::from_str(&gw.cli_ok(&["user", "list", "--json"])).unwrap();
    users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no user {name}"))["admin"]
        == json!(true)
}

fn link(gw: &Gateway, user: &str, provider: &str, subject: &str) {
    gw.cli_ok(&[
        "user",
        "link-oidc",
        user,
        "--provider",
        provider,
        "--subject",
        subject,
    ]);
}

/// Enrols `user` in TOTP through the account page; returns its recovery codes (each works
/// once as the gateway's code).
async fn enrol_totp(gw: &Gateway, user: &str) -> Vec<String> {
    let b = crate::account::Browser::login(gw, user, PW).await;
    crate::account::enrol(&b).await.1
}

/// The CSRF token of the account page, for a session `cookie` (`portcullis=…`).
async fn account_csrf(gw: &Gateway, cookie: &str) -> String {
    let page = client()
        .get(gw.url("/_portcullis/account"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    crate::harness::input_value(&page, "csrf").unwrap_or_else(|| panic!("no csrf: {page}"))
}

/// Completes a pending TOTP step of a login with `code`: the response.
async fn complete_totp(gw: &Gateway, pending: &str, code: &str) -> reqwest::Response {
    let html = client()
        .get(gw.url("/_portcullis/login/2fa?rd=%2Fafter"))
        .header("cookie", pending)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = crate::harness::input_value(&html, "csrf").unwrap();
    client()
        .post(gw.url("/_portcullis/login/2fa"))
        .header("cookie", pending)
        .header("origin", gw.base.clone())
        .form(&[("code", code), ("csrf", &csrf), ("rd", "/after")])
        .send()
        .await
        .unwrap()
}

/// A sign-in with `claims` (its nonce filled in) that must stop at a pending step: the pending
/// cookie, after checking where the browser was sent.
async fn sso_pending(gw: &Gateway, op: &FakeOp, provider: &str, claims: Value, to: &str) -> String {
    let resp = sso_signed(gw, op, provider, claims).await;
    assert_eq!(
        resp.status(),
        303,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    assert!(
        set_cookie(&resp, "portcullis").is_none(),
        "a session before the {to} step"
    );
    let location = resp.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(to), "{location}");
    set_cookie(&resp, "portcullis-pending").expect("a pending cookie")
}

async fn post_logout_token(gw: &Gateway, provider: &str, token: &str) -> u16 {
    client()
        .post(gw.url(&format!("/_portcullis/oidc/{provider}/backchannel-logout")))
        .form(&[("logout_token", token)])
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn auto_link_takes_only_the_exact_name_never_an_admin_and_never_skips_the_gateway_code() {
    let (_up, op, gw, _dir) = fake_setup(
        |b| b.user("alice", PW).user("carol", PW).admin("root", PW),
        &[(
            "idp",
            "auto_link = \"preferred_username\"\ntrust_amr = [\"mfa\"]",
        )],
    )
    .await;
    let named = |sub: &str, name: &str| {
        let mut c = op.claims(sub, "");
        c["preferred_username"] = json!(name);
        c["amr"] = json!(["mfa"]);
        c
    };
    // Look-alikes of alice (case, Unicode compatibility forms, spaces) link to nobody.
    for (i, name) in [
        "Alice",
        "ALICE",
        "Ⓐlice",
        "ａｌｉｃｅ",
        " alice",
        "alice ",
        "аlice",
    ]
    .iter()
    .enumerate()
    {
        let claims = named(&format!("s-lookalike-{i}"), name);
        let resp = sso_signed(&gw, &op, "idp", claims).await;
        assert_eq!(resp.status(), 403, "{name:?}");
        assert!(set_cookie(&resp, "portcullis").is_none(), "{name:?}");
    }
    // An administrator is never auto-linked, whatever the provider says.
    let resp = sso_signed(&gw, &op, "idp", named("s-root", "root")).await;
    assert_eq!(resp.status(), 403);
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert!(resp.text().await.unwrap().contains("administrator"));
    // The exact name links.
    let token = sso_session(&gw, &op, "idp", named("s-alice", "alice")).await;
    assert_eq!(whoami(&gw, &token).await.as_deref(), Some("alice"));

    // Carol has TOTP at the gateway. The login that auto-links her does not trust the
    // provider's "mfa": she enters her gateway code.
    let codes = enrol_totp(&gw, "carol").await;
    let pending = sso_pending(
        &gw,
        &op,
        "idp",
        named("s-carol", "carol"),
        "/_portcullis/login/2fa",
    )
    .await;
    let resp = complete_totp(&gw, &pending, &codes[0]).await;
    assert_eq!(resp.status(), 303);
    let token = set_cookie(&resp, "portcullis").expect("a session after the code");
    let token = token.trim_start_matches("portcullis=");
    assert_eq!(whoami(&gw, token).await.as_deref(), Some("carol"));
    assert_eq!(amr_of(token), ["sso", "otp"]);
    // Once linked, the provider's "mfa" counts.
    let token = sso_session(&gw, &op, "idp", named("s-carol", "carol")).await;
    assert_eq!(amr_of(&token), ["sso", "mfa"]);

    let links = gw.cli_ok(&["audit", "--json"]);
    assert!(links.contains("refused_admin"), "{links}");
    gw.metrics_with(&[
        r#"portcullis_oidc_links_total{how="auto",provider="idp"} 2"#,
        r#"portcullis_oidc_logins_total{provider="idp",result="not_linked"} 7"#,
        r#"portcullis_oidc_logins_total{provider="idp",result="admin_not_auto_linked"} 1"#,
    ])
    .await;
}

/// The account page's Link button, with `password` and `code` when given.
async fn link_from_account(
    gw: &Gateway,
    cookie: &str,
    password: Option<&str>,
    code: Option<&str>,
) -> reqwest::Response {
    let csrf = account_csrf(gw, cookie).await;
    let mut form = vec![("provider", "idp"), ("csrf", csrf.as_str())];
    if let Some(p) = password {
        form.push(("password", p));
    }
    if let Some(c) = code {
        form.push(("code", c));
    }
    client()
        .post(gw.url("/_portcullis/account/oidc/link"))
        .header("cookie", cookie)
        .header("origin", gw.base.clone())
        .form(&form)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn linking_from_the_account_page_needs_the_password_and_the_code() {
    let (_up, op, gw, _dir) = fake_setup(
        |b| {
            b.user("alice", PW)
                .user("carol", PW)
                .auth_keys("max_failures = 3")
        },
        &[("idp", "")],
    )
    .await;
    let alice = format!("portcullis={}", gw.login("alice", PW).await.token);

    // The button alone asks for the password; nothing goes to the provider yet.
    let resp = link_from_account(&gw, &alice, None, None).await;
    assert_eq!(resp.status(), 200);
    assert!(set_cookie(&resp, "portcullis-oidc").is_none());
    let page = resp.text().await.unwrap();
    assert!(page.contains("name=\"password\""), "{page}");
    assert!(!page.contains("name=\"code\""), "{page}");
    // A wrong password: refused, and it counts toward the lock like any wrong password.
    for _ in 0..3 {
        let resp = link_from_account(&gw, &alice, Some("not her password"), None).await;
        assert_eq!(resp.status(), 401);
        assert!(set_cookie(&resp, "portcullis-oidc").is_none());
    }
    let resp = link_from_account(&gw, &alice, Some(PW), None).await;
    assert_eq!(resp.status(), 429, "the account is locked");
    assert!(set_cookie(&resp, "portcullis-oidc").is_none());
    gw.cli_ok(&["user", "unlock", "alice"]);

    // The right password sends the browser to the provider, and the link is made.
    let resp = link_from_account(&gw, &alice, Some(PW), None).await;
    assert_eq!(resp.status(), 303);
    let flow = set_cookie(&resp, "portcullis-oidc").expect("a flow cookie");
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(&op.issuer), "{location}");
    let q = |k: &str| {
        location
            .query_pairs()
            .find(|(n, _)| n == k)
            .unwrap()
            .1
            .into_owned()
    };
    op.state.lock().unwrap().next_id_token =
        Some(op.key.sign(None, &op.claims("s-alice", &q("nonce"))));
    let resp = client()
        .get(gw.url(&format!(
            "/_portcullis/oidc/idp/callback?code=c&state={}",
            q("state")
        )))
        .header("cookie", format!("{flow}; {alice}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?done=sso-linked"
    );
    let token = sso_session(&gw, &op, "idp", op.claims("s-alice", "")).await;
    assert_eq!(whoami(&gw, &token).await.as_deref(), Some("alice"));

    // With TOTP, the code is needed too.
    let codes = enrol_totp(&gw, "carol").await;
    let carol = format!("portcullis={}", {
        let (status, body) = gw.try_login("carol", PW, Some(&codes[0])).await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_string()
    });
    let resp = link_from_account(&gw, &carol, None, None).await;
    assert!(resp.text().await.unwrap().contains("name=\"code\""));
    let resp = link_from_account(&gw, &carol, Some(PW), None).await;
    assert_eq!(resp.status(), 401);
    assert!(set_cookie(&resp, "portcullis-oidc").is_none());
    let resp = link_from_account(&gw, &carol, Some(PW), Some("000000")).await;
    assert_eq!(resp.status(), 401);
    assert!(set_cookie(&resp, "portcullis-oidc").is_none());
    let resp = link_from_account(&gw, &carol, Some(PW), Some(&codes[1])).await;
    assert_eq!(resp.status(), 303);
    assert!(set_cookie(&resp, "portcullis-oidc").is_some());
}

#[tokio::test]
async fn breach_response_unlinks_and_sso_logins_of_users_who_must_reset_choose_a_password() {
    let (_up, op, gw, _dir) = fake_setup(|b| b.user("alice", PW), &[("idp", "")]).await;
    link(&gw, "alice", "idp", "s-alice");

    // A user who must choose a new password does so after a provider login as after a
    // password login; the session then belongs to the provider session.
    gw.cli_ok(&["user", "require-reset", "alice"]);
    let mut claims = op.claims("s-alice", "");
    claims["sid"] = json!("op-reset");
    let pending = sso_pending(&gw, &op, "idp", claims, "/_portcullis/login/password").await;
    let new_pw = "a brand new password for alice";
    let resp = gw.set_new_password(&pending, new_pw, "/after").await;
    assert_eq!(resp.status(), 303);
    let token = set_cookie(&resp, "portcullis").expect("a session after the new password");
    let token = token.trim_start_matches("portcullis=").to_string();
    assert_eq!(whoami(&gw, &token).await.as_deref(), Some("alice"));
    assert_eq!(amr_of(&token), ["sso"]);
    let logout = op.logout_token(&op.logout_claims("s-alice", "op-reset"));
    assert_eq!(post_logout_token(&gw, "idp", &logout).await, 200);
    assert!(gw.refused_within(&token, Duration::from_secs(1)).await);

    // The breach response removes every link: the provider account signs in to nothing
    // until it is linked again.
    let out = gw.cli_ok(&["breach-response"]);
    assert!(out.contains("1 single sign-on links removed"), "{out}");
    // (The breach response also replaces the signing key, which the gateway picks up on its
    // own: a sign-in started just before that fails on its flow cookie and is tried again.)
    let not_linked = poll_until(Duration::from_secs(5), || async {
        let resp = sso_with(&gw, &op, "idp", |n| {
            op.key.sign(None, &op.claims("s-alice", n))
        })
        .await;
        assert!(set_cookie(&resp, "portcullis").is_none(), "a session");
        resp.status() == 403 && resp.text().await.unwrap().contains("not linked")
    })
    .await;
    assert!(not_linked, "the provider account still signs in");
}

#[tokio::test]
async fn sessions_that_replace_an_sso_session_keep_its_provider_session_and_amr() {
    let (_up, op, gw, _dir) =
        fake_setup(|b| b.user("alice", PW), &[("idp", "trust_amr = [\"mfa\"]")]).await;
    link(&gw, "alice", "idp", "s-alice");
    let with_sid = |sid: &str| {
        let mut c = op.claims("s-alice", "");
        c["sid"] = json!(sid);
        c["amr"] = json!(["mfa"]);
        c
    };
    let new_cookie = |resp: &reqwest::Response| {
        set_cookie(resp, "portcullis")
            .expect("a fresh session")
            .trim_start_matches("portcullis=")
            .to_string()
    };

    // "Sign out of all other devices": the fresh session still belongs to provider session
    // op-1, which the provider's back-channel logout then ends.
    let first = sso_session(&gw, &op, "idp", with_sid("op-1")).await;
    let cookie = format!("portcullis={first}");
    let csrf = account_csrf(&gw, &cookie).await;
    let resp = client()
        .post(gw.url("/_portcullis/account/signout-others"))
        .header("cookie", &cookie)
        .header("origin", gw.base.clone())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let fresh = new_cookie(&resp);
    assert!(gw.refused_within(&first, Duration::from_secs(1)).await);
    assert_eq!(gw.get_status("/", &fresh).await, 200);
    assert_eq!(amr_of(&fresh), ["sso", "mfa"]);
    let logout = op.logout_token(&op.logout_claims("s-alice", "op-1"));
    assert_eq!(post_logout_token(&gw, "idp", &logout).await, 200);
    assert!(gw.refused_within(&fresh, Duration::from_secs(1)).await);

    // A password change that signs out the other devices: the fresh session's own sign-out
    // still goes on to the provider's end-session endpoint with the ID token.
    let second = sso_session(&gw, &op, "idp", with_sid("op-2")).await;
    let cookie = format!("portcullis={second}");
    let csrf = account_csrf(&gw, &cookie).await;
    let new_pw = "alice changed her password here";
    let resp = client()
        .post(gw.url("/_portcullis/account/password"))
        .header("cookie", &cookie)
        .header("origin", gw.base.clone())
        .form(&[
            ("current", PW),
            ("new_password", new_pw),
            ("confirm", new_pw),
            ("signout", "on"),
            ("csrf", &csrf),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let fresh = new_cookie(&resp);
    assert_eq!(amr_of(&fresh), ["sso", "mfa"]);
    let csrf = account_csrf(&gw, &format!("portcullis={fresh}")).await;
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .header("cookie", format!("portcullis={fresh}"))
        .header("origin", gw.base.clone())
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let location = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(
        format!(
            "{}{}",
            location.origin().ascii_serialization(),
            location.path()
        ),
        format!("{}/logout", op.issuer)
    );
    assert!(
        location
            .query_pairs()
            .any(|(k, v)| k == "id_token_hint" && v.split('.').count() == 3),
        "{location}"
    );
}

#[tokio::test]
async fn admin_by_claim_waits_for_the_gateway_code_and_a_provider_logout_during_it_wins() {
    let up = Upstream::start().await;
    let op = FakeOp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(dir.path());
    // A second provider whose discovery never succeeds: nothing listens at its issuer.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_issuer = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let gw = Gateway::builder(&up.url())
        .user("carol", PW)
        .user("dave", PW)
        .extra_toml(&provider_toml(
            "idp",
            &op.issuer,
            &secret,
            "admin_claim = \"groups\"\nadmin_value = \"admins\"",
        ))
        .extra_toml(&provider_toml("down", &dead_issuer, &secret, ""))
        .start()
        .await;
    wait_discovered(&gw, "idp").await;

    // Back-channel logout for a provider not discovered yet: 503, so that it tries again.
    assert_eq!(post_logout_token(&gw, "down", "x.y.z").await, 503);

    let codes = enrol_totp(&gw, "carol").await;
    link(&gw, "carol", "idp", "s-carol");
    let admin_login = |sid: &str| {
        let mut c = op.claims("s-carol", "");
        c["sid"] = json!(sid);
        c["groups"] = json!(["admins"]);
        c
    };
    // The claim grants nothing before the gateway's code is entered.
    let pending = sso_pending(
        &gw,
        &op,
        "idp",
        admin_login("op-1"),
        "/_portcullis/login/2fa",
    )
    .await;
    assert!(!is_admin(&gw, "carol"));
    // The provider ends its session while the login waits for the code: the code then opens
    // no session (and grants nothing); the login starts again.
    let logout = op.logout_token(&op.logout_claims("s-carol", "op-1"));
    assert_eq!(post_logout_token(&gw, "idp", &logout).await, 200);
    let resp = complete_totp(&gw, &pending, &codes[0]).await;
    assert_eq!(resp.status(), 401);
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert!(!is_admin(&gw, "carol"));
    // Another provider session: the code opens the session, and only then is admin granted.
    let pending = sso_pending(
        &gw,
        &op,
        "idp",
        admin_login("op-2"),
        "/_portcullis/login/2fa",
    )
    .await;
    assert!(!is_admin(&gw, "carol"));
    let resp = complete_totp(&gw, &pending, &codes[1]).await;
    assert_eq!(resp.status(), 303);
    assert!(set_cookie(&resp, "portcullis").is_some());
    assert!(is_admin(&gw, "carol"));

    // A disabled user gets no admin from the claim.
    link(&gw, "dave", "idp", "s-dave");
    gw.cli_ok(&["user", "disable", "dave"]);
    let resp = sso_with(&gw, &op, "idp", |n| {
        let mut c = op.claims("s-dave", n);
        c["groups"] = json!(["admins"]);
        op.key.sign(None, &c)
    })
    .await;
    assert_eq!(resp.status(), 403);
    assert!(!is_admin(&gw, "dave"));

    let audit = audit_entries(&gw);
    assert!(
        audit.contains(&("sso_login".into(), "provider_logged_out".into())),
        "{audit:?}"
    );
    assert!(
        !audit.contains(&("sso_backchannel_logout".into(), "not_discovered".into())),
        "a logout refused before any signature was checked was audited: {audit:?}"
    );
}

#[tokio::test]
async fn a_changed_issuer_under_the_same_provider_id_finds_no_link() {
    let (_up, op, mut gw, _dir) = fake_setup(|b| b.user("alice", PW), &[("idp", "")]).await;
    link(&gw, "alice", "idp", "s-alice");
    let token = sso_session(&gw, &op, "idp", op.claims("s-alice", "")).await;
    assert_eq!(whoami(&gw, &token).await.as_deref(), Some("alice"));
    // The same id now names another provider, whose subjects are its own.
    let other = FakeOp::start().await;
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), config.replace(&op.issuer, &other.issuer)).unwrap();
    gw.restart().await;
    wait_discovered(&gw, "idp").await;
    let resp = sso_with(&gw, &other, "idp", |n| {
        other.key.sign(None, &other.claims("s-alice", n))
    })
    .await;
    assert_eq!(resp.status(), 403);
    assert!(set_cookie(&resp, "portcullis").is_none());
    // Its back-channel logout by subject does not reach alice either.
    let mut by_sub = other.logout_claims("s-alice", "");
    by_sub.as_object_mut().unwrap().remove("sid");
    assert_eq!(
        post_logout_token(&gw, "idp", &other.logout_token(&by_sub)).await,
        200
    );
    let password = gw.login("alice", PW).await.token;
    assert_eq!(gw.get_status("/", &password).await, 200);
}

#[tokio::test]
async fn a_passkey_is_the_gateway_factor_after_a_provider_and_passkey_only_users_skip_providers() {
    use crate::passkeys::{post_json, register_as, step_start};
    let (_up, op, gw, _dir) = fake_setup(|b| b.user("alice", PW), &[("idp", "")]).await;
    link(&gw, "alice", "idp", "s-alice");
    let b = crate::account::Browser::login(&gw, "alice", PW).await;
    let mut key = register_as(&gw, &b, PW, "Laptop", true).await;
    // Her second factor is the passkey (no TOTP): the provider's sign-in goes on to it.
    let pending = sso_pending(
        &gw,
        &op,
        "idp",
        op.claims("s-alice", ""),
        "/_portcullis/login/2fa",
    )
    .await;
    let (csrf, options) = step_start(
        &gw,
        "/_portcullis/login/2fa",
        &pending,
        "/_portcullis/passkey/second-factor/start",
    )
    .await;
    let credential = key.assert(&options, &gw.base, true);
    let resp = post_json(
        &gw,
        "/_portcullis/passkey/second-factor/finish",
        Some(&pending),
        &json!({ "ceremony": options["ceremony"], "credential": credential, "csrf": csrf, "rd": "/after" }),
    )
    .await;
    let token = set_cookie(&resp, "portcullis").expect("a session after the passkey");
    let token = token.trim_start_matches("portcullis=").to_string();
    assert_eq!(amr_of(&token), ["sso", "hwk"]);
    assert_eq!(whoami(&gw, &token).await.as_deref(), Some("alice"));

    // Once she must sign in with a passkey only, the provider opens nothing for her.
    gw.cli_ok(&["user", "require-passkey", "alice"]);
    let resp = sso_signed(&gw, &op, "idp", op.claims("s-alice", "")).await;
    assert_eq!(resp.status(), 403);
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert!(set_cookie(&resp, "portcullis-pending").is_none());
    gw.assert_audit(&["--user", "alice"], &["passkey_required"]);
}

/// An account made by single sign-on has no password of its own: "forgot my password" sends
/// it nothing (it signs in at its provider) though it has a verified address, and the answer
/// is the one everybody gets; once an administrator gives it a password, a link is mailed.
#[tokio::test]
async fn an_account_made_by_single_sign_on_is_mailed_no_reset_link_until_it_has_a_password() {
    let smtpd = crate::smtpd::Smtpd::start().await;
    let (_up, op, gw, _dir) = fake_setup(
        |b| {
            b.user("alice", PW)
                .extra_toml(&crate::mail::mail_toml(&smtpd, ""))
        },
        &[("idp", "auto_create = true")],
    )
    .await;
    let mut claims = op.claims("s-dana", "");
    claims["preferred_username"] = json!("dana");
    sso_session(&gw, &op, "idp", claims).await;
    gw.assert_audit(&["--user", "dana"], &["sso_user_created"]);
    gw.cli_ok(&["user", "set-email", "dana", "dana@example.org"]);
    gw.cli_ok(&["user", "set-email", "alice", "alice@example.org"]);

    let forgot = |id: &'static str| {
        let gw = &gw;
        async move { crate::mail::post_form(gw, "/_portcullis/forgot", &[("identifier", id)]).await }
    };
    let (dana, alice) = (forgot("dana").await, forgot("alice").await);
    assert_eq!(dana, alice, "the same answer for both");
    assert!(dana.1.contains("Check your mail"), "{}", dana.1);
    crate::mail::mail_to(&smtpd, "alice@example.org", "Reset your password").await;
    assert!(
        poll_until(Duration::from_secs(10), || async {
            gw.cli_ok(&["audit", "--user", "dana"])
                .contains("signs in by single sign-on only")
        })
        .await,
        "{}",
        gw.cli_ok(&["audit", "--user", "dana"])
    );
    let reset_to_dana = |m: &crate::smtpd::Mail| {
        m.to.iter().any(|t| t == "dana@example.org") && m.subject.contains("Reset")
    };
    assert!(
        !smtpd.messages().iter().any(reset_to_dana),
        "no reset link was mailed to dana"
    );

    // Given a password by an administrator, the account is one whose password the gateway
    // keeps: the link is mailed.
    gw.cli_ok(&["user", "passwd", "dana"]);
    forgot("dana").await;
    crate::mail::mail_to(&smtpd, "dana@example.org", "Reset your password").await;
}
