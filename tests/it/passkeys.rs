//! Passkeys over HTTP, with the software authenticator ([`crate::soft_authenticator`]) in the
//! browser's place: registration from the account page after the password, sign-in without a
//! user name and with one, a passkey as the second step after a password, one without user
//! verification counting as one factor, and every refusal — wrong origin, another relying
//! party, a replayed or foreign answer, a counter that went backwards, a credential id
//! registered already, malformed answers — with its reason and nothing changed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::Response;
use serde_json::{json, Value};

use crate::account::{enrol, Browser};
use crate::harness::{client, input_value, poll_until, set_cookie, Gateway};
use crate::soft_authenticator::{Options, SoftAuthenticator};
use crate::upstream::Upstream;
use std::time::Duration;

const PW: &str = "a passphrase for passkeys";
/// 1Password's AAGUID: the account page names the authenticator.
const ONE_PASSWORD: [u8; 16] = [
    0xba, 0xda, 0x55, 0x66, 0xa7, 0xaa, 0x40, 0x1f, 0xbd, 0x96, 0x45, 0x61, 0x9a, 0x55, 0x12, 0x0d,
];

async fn setup(auth: &str) -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .user("bob", PW)
        .auth_keys(auth)
        .start()
        .await;
    (up, gw)
}

/// A JSON post from the gateway's own page (its origin), with `cookie` if any.
pub(crate) async fn post_json(
    gw: &Gateway,
    path: &str,
    cookie: Option<&str>,
    body: &Value,
) -> Response {
    let mut rb = client()
        .post(gw.url(path))
        .header("Origin", gw.base.clone())
        .json(body);
    if let Some(c) = cookie {
        rb = rb.header("Cookie", c);
    }
    rb.send().await.unwrap()
}

/// Status and JSON body.
pub(crate) async fn answer(resp: Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Starts a registration for the signed-in browser (with the password): status and options.
async fn registration_options(gw: &Gateway, b: &Browser<'_>, csrf: &str) -> (u16, Value) {
    registration_options_as(gw, b, PW, csrf).await
}

async fn registration_options_as(
    gw: &Gateway,
    b: &Browser<'_>,
    password: &str,
    csrf: &str,
) -> (u16, Value) {
    answer(
        post_json(
            gw,
            "/_portcullis/account/passkeys/start",
            Some(&b.cookie),
            &json!({ "password": password, "csrf": csrf }),
        )
        .await,
    )
    .await
}

/// Registers a passkey for the signed-in browser: the ceremony's options, and the answer of a
/// new software authenticator (user verified when `uv`).
async fn register(gw: &Gateway, b: &Browser<'_>, label: &str, uv: bool) -> SoftAuthenticator {
    register_as(gw, b, PW, label, uv).await
}

/// [`register`] for a user whose password is `password`.
pub(crate) async fn register_as(
    gw: &Gateway,
    b: &Browser<'_>,
    password: &str,
    label: &str,
    uv: bool,
) -> SoftAuthenticator {
    let csrf = b.csrf().await;
    let (status, options) = registration_options_as(gw, b, password, &csrf).await;
    assert_eq!(status, 200, "{options}");
    let (auth, credential) = SoftAuthenticator::register(&options, &gw.base, uv, ONE_PASSWORD);
    let (status, body) = answer(
        post_json(
            gw,
            "/_portcullis/account/passkeys/finish",
            Some(&b.cookie),
            &json!({
                "ceremony": options["ceremony"],
                "credential": credential,
                "label": label,
                "csrf": csrf,
            }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["redirect"], "/_portcullis/account?done=passkey-added");
    auth
}

/// Starts a passkey sign-in (for `user`'s passkeys, or any).
pub(crate) async fn login_start(gw: &Gateway, user: Option<&str>) -> Value {
    let body = match user {
        Some(u) => json!({ "username": u }),
        None => json!({}),
    };
    let (status, options) =
        answer(post_json(gw, "/_portcullis/passkey/login/start", None, &body).await).await;
    assert_eq!(status, 200, "{options}");
    options
}

pub(crate) async fn login_finish(gw: &Gateway, options: &Value, credential: &Value) -> Response {
    post_json(
        gw,
        "/_portcullis/passkey/login/finish",
        None,
        &json!({ "ceremony": options["ceremony"], "credential": credential, "rd": "/probe" }),
    )
    .await
}

/// Signs in with the authenticator (user verified); the session cookie.
pub(crate) async fn passkey_session(
    gw: &Gateway,
    auth: &mut SoftAuthenticator,
    user: Option<&str>,
) -> String {
    let options = login_start(gw, user).await;
    let credential = auth.assert(&options, &gw.base, true);
    let resp = login_finish(gw, &options, &credential).await;
    let cookie = set_cookie(&resp, "portcullis");
    let (status, body) = answer(resp).await;
    assert_eq!(
        (status, body["redirect"].as_str()),
        (200, Some("/probe")),
        "{body}"
    );
    cookie.expect("a session cookie")
}

/// Answers a fresh sign-in ceremony with `answer(options)`: the refusal's status and reason.
async fn refused_answer(gw: &Gateway, answer: impl FnOnce(&Value) -> Value) -> (u16, String) {
    let options = login_start(gw, None).await;
    let credential = answer(&options);
    refused(login_finish(gw, &options, &credential).await).await
}

/// The reason of a refused answer, after checking its status and that it opened no session.
async fn refused(resp: Response) -> (u16, String) {
    assert!(
        set_cookie(&resp, "portcullis").is_none(),
        "a refusal set a session"
    );
    let (status, body) = answer(resp).await;
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Asserts that the audit log holds an entry `event` with `outcome` whose detail contains
/// `detail` (one entry with all three, not each somewhere in the log).
fn assert_audited(gw: &Gateway, event: &str, outcome: &str, detail: &str) {
    let out = gw.cli_ok(&["audit", "--json", "--limit", "500"]);
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(
        entries.iter().any(|e| e["event"] == event
            && e["outcome"] == outcome
            && e["detail"].as_str().is_some_and(|d| d.contains(detail))),
        "no `{event}` `{outcome}` entry with `{detail}` in the audit log:\n{out}"
    );
}

/// Every passkey row in the store: id, owner, signature counter and last use.
async fn passkey_rows(gw: &Gateway) -> Vec<(i64, i64, i64, Option<i64>)> {
    use sqlx::Connection;
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(gw.db_path());
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    sqlx::query_as("SELECT id, user_id, counter, last_used_ms FROM passkeys ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

/// Ages every ceremony in flight past its five minutes, as the clock would.
async fn expire_ceremonies(gw: &Gateway) {
    use sqlx::{Connection, Executor};
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(gw.db_path());
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    let done = conn
        .execute("UPDATE webauthn_ceremonies SET expires_ms = 1")
        .await
        .unwrap();
    assert!(done.rows_affected() > 0, "a ceremony in flight");
}

fn allowed_ids(options: &Value) -> Vec<String> {
    options["publicKey"]["allowCredentials"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn edit_config(gw: &Gateway, from: &str, to: &str) {
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(gw.config_path(), text.replacen(from, to, 1)).unwrap();
}

/// A password login through the form: status, `Location`, the pending-login cookie.
async fn password_form(gw: &Gateway, user: &str) -> (u16, String, Option<String>) {
    let resp = gw.login_form(user, PW, "/probe").await;
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        resp.status().as_u16(),
        location,
        set_cookie(&resp, "portcullis-pending"),
    )
}

#[tokio::test]
async fn a_registered_passkey_signs_in_with_or_without_the_user_name_and_counts_as_two_factors() {
    let (_up, mut gw) = setup("").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    // Registration needs the password, freshly.
    let csrf = alice.csrf().await;
    let (status, reason) = refused(
        post_json(
            &gw,
            "/_portcullis/account/passkeys/start",
            Some(&alice.cookie),
            &json!({ "password": "wrong", "csrf": csrf }),
        )
        .await,
    )
    .await;
    assert_eq!((status, reason.as_str()), (403, "reauthentication_failed"));
    // Without the page's token, nothing starts.
    let resp = post_json(
        &gw,
        "/_portcullis/account/passkeys/start",
        Some(&alice.cookie),
        &json!({ "password": PW, "csrf": "" }),
    )
    .await;
    assert_eq!(resp.status(), 403);

    let mut laptop = register(&gw, &alice, "Laptop", true).await;
    let page = alice.text("/_portcullis/account").await;
    let section = page
        .split("id=\"passkeys\"")
        .nth(1)
        .expect("a passkey section");
    assert!(
        section.contains("data-passkey")
            && section.contains("Laptop")
            && section.contains("1Password"),
        "{section}"
    );
    // A second registration excludes the first credential.
    let (_, options) = registration_options(&gw, &alice, &csrf).await;
    let excluded: Vec<&str> = options["publicKey"]["excludeCredentials"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(excluded, vec![laptop.credential_id_b64().as_str()]);

    // Without a user name (the browser offers its passkeys), and with one.
    let options = login_start(&gw, None).await;
    assert!(allowed_ids(&options).is_empty(), "{options}");
    let cookie = passkey_session(&gw, &mut laptop, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let options = login_start(&gw, Some("alice")).await;
    assert_eq!(allowed_ids(&options), vec![laptop.credential_id_b64()]);
    let cookie = passkey_session(&gw, &mut laptop, Some("Alice")).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    // A name without passkeys (or no such user) gets the same open ceremony as none.
    assert!(allowed_ids(&login_start(&gw, Some("bob")).await).is_empty());
    assert!(allowed_ids(&login_start(&gw, Some("nobody")).await).is_empty());
    gw.metrics_with(&[
        "portcullis_logins_total{method=\"passkey\",result=\"success\"} 2",
        "portcullis_passkeys_total{event=\"registered\"} 1",
    ])
    .await;

    // With every user required to use a second factor, the passkey is enough on its own, and
    // after a password it is the second step; a user with neither must enrol.
    edit_config(&gw, "[auth]\n", "[auth]\nrequire_2fa = \"all\"\n");
    gw.restart().await;
    let cookie = passkey_session(&gw, &mut laptop, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let (status, location, pending) = password_form(&gw, "alice").await;
    assert_eq!(
        (status, location.as_str()),
        (303, "/_portcullis/login/2fa?rd=%2Fprobe")
    );
    let pending = pending.expect("a pending login");
    let step = gw.page_with_cookie(&location, &pending).await;
    assert!(
        step.contains("id=\"passkey-second-factor\"") && !step.contains("id=\"code\""),
        "{step}"
    );
    let (csrf, options) = step_start(
        &gw,
        &location,
        &pending,
        "/_portcullis/passkey/second-factor/start",
    )
    .await;
    assert_eq!(allowed_ids(&options), vec![laptop.credential_id_b64()]);
    let credential = laptop.assert(&options, &gw.base, true);
    let resp = post_json(
        &gw,
        "/_portcullis/passkey/second-factor/finish",
        Some(&pending),
        &json!({ "ceremony": options["ceremony"], "credential": credential, "csrf": csrf, "rd": "/probe" }),
    )
    .await;
    let cookie = set_cookie(&resp, "portcullis").expect("a session after the second step");
    assert_eq!(answer(resp).await.1["redirect"], "/probe");
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let (status, location, _) = password_form(&gw, "bob").await;
    assert_eq!(
        (status, location.as_str()),
        (303, "/_portcullis/login/enroll?rd=%2Fprobe")
    );
}

#[tokio::test]
async fn a_passkey_body_over_the_limit_is_413_and_one_from_another_site_403_unread() {
    // The gateway takes bodies up to 3 MB for its pages; a JSON endpoint reads at most 2 MiB.
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .server_keys("max_form_bytes = 3000000")
        .start()
        .await;
    let big = format!(
        r#"{{"ceremony": "x", "credential": {{}}, "label": "{}"}}"#,
        "x".repeat(2_200_000)
    );
    let post = |origin: String| {
        client()
            .post(gw.url("/_portcullis/passkey/login/finish"))
            .header("Origin", origin)
            .header("Content-Type", "application/json")
            .body(big.clone())
    };
    let resp = post(gw.base.clone()).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(refused(resp).await, (413, "body_too_large".into()));
    let resp = post("http://evil.example".into()).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    gw.metrics_with(&["portcullis_logins_total{method=\"passkey\",result=\"body_too_large\"} 1\n"])
        .await;
}

#[tokio::test]
async fn every_bad_answer_is_refused_with_its_reason_and_changes_nothing() {
    let (_up, gw) = setup("").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let mut laptop = register(&gw, &alice, "Laptop", true).await;
    let origin = gw.base.clone();

    // Another site's page, or an authenticator answering for another relying party.
    assert_eq!(
        refused_answer(&gw, |options| laptop
            .assert_with(options, &Options::new("http://evil.example")))
        .await,
        (400, "wrong_origin".into())
    );
    assert_eq!(
        refused_answer(&gw, |options| laptop.assert_for_rp(
            options,
            &origin,
            "evil.example",
            true
        ))
        .await,
        (400, "wrong_rp_id".into())
    );

    // An answer is good once, for its own ceremony only.
    let first = login_start(&gw, None).await;
    let second = login_start(&gw, None).await;
    let answer_to_first = laptop.assert(&first, &origin, true);
    assert_eq!(
        refused(login_finish(&gw, &second, &answer_to_first).await).await,
        (400, "expired_ceremony".into())
    );
    let resp = login_finish(&gw, &first, &answer_to_first).await;
    assert_eq!(resp.status(), 200);
    assert_audited(
        &gw,
        "passkey_login",
        "success",
        "passkey `Laptop` (user verified)",
    );
    assert_audited(
        &gw,
        "passkey_login",
        "failure",
        "passkey `Laptop`: the passkey answered for another site",
    );
    assert_eq!(
        refused(login_finish(&gw, &first, &answer_to_first).await).await,
        (400, "expired_ceremony".into())
    );
    let options = login_start(&gw, None).await;
    let resp = post_json(
        &gw,
        "/_portcullis/passkey/login/finish",
        None,
        &json!({ "ceremony": "made-up", "credential": laptop.assert(&options, &origin, true) }),
    )
    .await;
    assert_eq!(refused(resp).await, (400, "expired_ceremony".into()));

    // Malformed answers.
    let options = login_start(&gw, None).await;
    assert_eq!(
        refused(login_finish(&gw, &options, &json!({})).await).await,
        (400, "malformed_response".into())
    );
    let options = login_start(&gw, None).await;
    let mut garbled = laptop.assert(&options, &origin, true);
    garbled["response"]["authenticatorData"] = json!("!!not base64!!");
    assert_eq!(
        refused(login_finish(&gw, &options, &garbled).await).await,
        (400, "malformed_response".into())
    );
    // A body that is not the endpoint's JSON gets the same JSON refusal, not axum's text.
    let raw = |path: &'static str, content_type: &'static str, body: &'static str| {
        let (gw, origin) = (&gw, origin.clone());
        async move {
            let resp = client()
                .post(gw.url(path))
                .header("Origin", origin)
                .header("Content-Type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.headers()["content-type"],
                "application/json",
                "{path} {body}"
            );
            assert_eq!(resp.headers()["cache-control"], "no-store");
            answer(resp).await
        }
    };
    let finish = "/_portcullis/passkey/login/finish";
    for (path, content_type, body, status, reason, says) in [
        (
            finish,
            "application/json",
            "{not json",
            400,
            "malformed_response",
            "not valid JSON",
        ),
        (
            finish,
            "text/plain",
            "{}",
            415,
            "not_json",
            "not sent as JSON",
        ),
        (
            finish,
            "application/json",
            r#"{"ceremony": "x"}"#,
            400,
            "malformed_response",
            "`credential` is missing",
        ),
        (
            finish,
            "application/json",
            r#"{"ceremony": 5, "credential": {}}"#,
            400,
            "malformed_response",
            "wrong type",
        ),
        (
            "/_portcullis/passkey/login/start",
            "application/x-www-form-urlencoded",
            "username=alice",
            415,
            "not_json",
            "not sent as JSON",
        ),
    ] {
        let (got, body_json) = raw(path, content_type, body).await;
        assert_eq!(
            (got, body_json["error"].as_str()),
            (status, Some(reason)),
            "{path} {body}: {body_json}"
        );
        assert!(
            body_json["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{body_json}"
        );
    }
    // Signed in, on the account page's endpoint: a registration without its ceremony.
    let resp = post_json(
        &gw,
        "/_portcullis/account/passkeys/finish",
        Some(&alice.cookie),
        &json!({ "credential": {}, "label": "Half", "csrf": alice.csrf().await }),
    )
    .await;
    assert_eq!(refused(resp).await, (400, "malformed_response".into()));
    // From another site, nothing is looked at: a body that would be refused as not JSON (and
    // counted) gets the cross-site refusal first.
    for path in [
        "/_portcullis/passkey/login/start",
        finish,
        "/_portcullis/passkey-link/made-up/finish",
    ] {
        let resp = client()
            .post(gw.url(path))
            .header("Origin", "http://evil.example")
            .header("Content-Type", "text/plain")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}");
        let page = resp.text().await.unwrap();
        assert!(page.contains("came from another site"), "{path}: {page}");
    }

    // A passkey this gateway never registered.
    let (_, registration) = registration_options(&gw, &alice, &alice.csrf().await).await;
    let (mut stranger, _) = SoftAuthenticator::register(&registration, &origin, true, [0; 16]);
    assert_eq!(
        refused_answer(&gw, |options| stranger.assert(options, &origin, true)).await,
        (401, "unknown_credential".into())
    );

    // A counter that went backwards: a copy of the credential. Refused and flagged.
    laptop.set_counter(0);
    assert_eq!(
        refused_answer(&gw, |options| laptop.assert(options, &origin, true)).await,
        (401, "possible_clone".into())
    );
    let page = alice.text("/_portcullis/account").await;
    assert!(page.contains("Possibly copied"), "{page}");
    assert_audited(
        &gw,
        "passkey_clone_warning",
        "refused",
        "passkey `Laptop`: signature counter did not increase",
    );
    gw.metrics_with(&[
        "portcullis_passkeys_total{event=\"clone_warning\"} 1",
        // The sign-in's body that was not JSON; not the ceremony start's, nor the cross-site.
        "portcullis_logins_total{method=\"passkey\",result=\"not_json\"} 1\n",
    ])
    .await;

    // A credential id registered to alice cannot be registered to bob.
    let bob = Browser::login(&gw, "bob", PW).await;
    let bob_csrf = bob.csrf().await;
    let (_, options) = registration_options(&gw, &bob, &bob_csrf).await;
    let (_, same_id) = SoftAuthenticator::register_with(
        &options,
        &Options::new(&origin).credential_id(&laptop.credential_id()),
        [0; 16],
    );
    let resp = post_json(
        &gw,
        "/_portcullis/account/passkeys/finish",
        Some(&bob.cookie),
        &json!({ "ceremony": options["ceremony"], "credential": same_id, "label": "Copy", "csrf": bob_csrf }),
    )
    .await;
    assert_eq!(refused(resp).await, (409, "duplicate_credential".into()));
    let page = bob.get("/_portcullis/account").await.text().await.unwrap();
    assert!(!page.contains("data-passkey"), "{page}");

    // Each ceremony started without a session is a row in the store: an address gets a
    // bounded share (60 per five minutes), then 429 with Retry-After.
    let mut refused_at = None;
    for n in 1..=80 {
        let resp = post_json(&gw, "/_portcullis/passkey/login/start", None, &json!({})).await;
        if resp.status() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
            assert_eq!(answer(resp).await.1["error"], "throttled");
            refused_at = Some(n);
            break;
        }
        assert_eq!(resp.status(), 200);
    }
    let refused_at = refused_at.expect("a flood of ceremonies is throttled");
    assert!((20..=61).contains(&refused_at), "refused at {refused_at}");
}

#[tokio::test]
async fn a_passkey_without_user_verification_is_one_factor_and_the_code_follows() {
    let (_up, gw) = setup("").await;
    let bob = Browser::login(&gw, "bob", PW).await;
    let mut key = register(&gw, &bob, "Security key", false).await;
    let origin = gw.base.clone();
    // No other second factor: refused, with the reason.
    assert_eq!(
        refused_answer(&gw, |options| key.assert(options, &origin, false)).await,
        (400, "user_not_verified".into())
    );
    // With TOTP on, the code step follows the passkey.
    let (_, codes) = enrol(&bob).await;
    let options = login_start(&gw, None).await;
    let credential = key.assert(&options, &origin, false);
    let resp = login_finish(&gw, &options, &credential).await;
    assert!(
        set_cookie(&resp, "portcullis").is_none(),
        "a session before the code"
    );
    let pending = set_cookie(&resp, "portcullis-pending").expect("a pending login");
    let (status, body) = answer(resp).await;
    assert_eq!(
        (status, body["redirect"].as_str()),
        (200, Some("/_portcullis/login/2fa?rd=%2Fprobe"))
    );
    let step = gw
        .page_with_cookie("/_portcullis/login/2fa?rd=%2Fprobe", &pending)
        .await;
    let csrf = input_value(&step, "csrf").unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/login/2fa"))
        .header("Origin", origin.clone())
        .header("Cookie", &pending)
        .form(&[
            ("code", codes[0].as_str()),
            ("csrf", &csrf),
            ("rd", "/probe"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = set_cookie(&resp, "portcullis").expect("a session after the code");
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
}

#[tokio::test]
async fn removing_a_passkey_keeps_its_sessions_unless_asked_and_signing_out_ends_them() {
    let (_up, gw) = setup("").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let mut phone = register(&gw, &alice, "Phone", true).await;
    let mut laptop = register(&gw, &alice, "Laptop", true).await;
    let from_phone = passkey_session(&gw, &mut phone, None).await;
    let page = alice.text("/_portcullis/account").await;
    let id_of = |label: &str| -> String {
        let row = page
            .split("<tr data-passkey=\"")
            .skip(1)
            .find(|r| r.contains(&format!("<strong>{label}</strong>")))
            .unwrap_or_else(|| panic!("no {label} row in {page}"));
        row[..row.find('"').unwrap()].to_string()
    };
    let (phone_id, laptop_id) = (id_of("Phone"), id_of("Laptop"));
    let csrf = alice.csrf().await;
    // Renamed; an empty name is refused.
    let resp = alice
        .post(
            "/_portcullis/account/passkeys/rename",
            &[
                ("id", &laptop_id),
                ("label", "Work laptop"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(resp.status(), 303);
    let resp = alice
        .post(
            "/_portcullis/account/passkeys/rename",
            &[("id", &laptop_id), ("label", " "), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 400);
    // Another user's passkey is not theirs to remove.
    let bob = Browser::login(&gw, "bob", PW).await;
    let resp = bob
        .post(
            "/_portcullis/account/passkeys/remove",
            &[("id", &phone_id), ("csrf", &bob.csrf().await)],
        )
        .await;
    assert_eq!(resp.status(), 404);
    // Removed: the phone no longer signs in, but its session stays.
    let resp = alice
        .post(
            "/_portcullis/account/passkeys/remove",
            &[("id", &phone_id), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(gw.status_with_cookie("/probe", &from_phone).await, 200);
    assert_eq!(
        refused_answer(&gw, |options| phone.assert(options, &gw.base, true)).await,
        (401, "unknown_credential".into())
    );
    let page = alice.text("/_portcullis/account").await;
    assert!(page.contains("Work laptop") && !page.contains("<strong>Phone</strong>"));
    // "Also sign out every device": every session of alice ends, this browser's too.
    let from_laptop = passkey_session(&gw, &mut laptop, None).await;
    let resp = alice
        .post(
            "/_portcullis/account/passkeys/remove",
            &[("id", &laptop_id), ("signout", "1"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 303);
    for cookie in [&from_phone, &from_laptop, &alice.cookie] {
        assert_ne!(gw.status_with_cookie("/probe", cookie).await, 200);
    }
    gw.metrics_with(&["portcullis_passkeys_total{event=\"removed\"} 2"])
        .await;
    assert_audited(
        &gw,
        "passkey_rename",
        "success",
        &format!("passkey {laptop_id} is now `Work laptop`"),
    );
    assert_audited(&gw, "passkey_remove", "success", "passkey `Phone`");
    assert_audited(
        &gw,
        "passkey_remove",
        "success",
        "passkey `Work laptop`; signed out every device",
    );
    // The first removal, without sign-out, says nothing of one.
    let audit = gw.cli_ok(&["audit", "--json", "--user", "alice"]);
    let removals: Vec<Value> = serde_json::from_str::<Vec<Value>>(&audit)
        .unwrap()
        .into_iter()
        .filter(|e| e["event"] == "passkey_remove")
        .collect();
    assert_eq!(removals.len(), 2, "{audit}");
    assert!(
        removals.iter().any(|e| e["detail"] == "passkey `Phone`"),
        "{audit}"
    );
}

/// Starts the ceremony of a pending login's step: reads the step's page at `page` (with the
/// pending cookie) for its token, and posts it to `start`. The token and the options.
pub(crate) async fn step_start(
    gw: &Gateway,
    page: &str,
    pending: &str,
    start: &str,
) -> (String, Value) {
    let step = gw.page_with_cookie(page, pending).await;
    let csrf = input_value(&step, "csrf").unwrap_or_else(|| panic!("no token on {page}: {step}"));
    let (status, options) =
        answer(post_json(gw, start, Some(pending), &json!({ "csrf": csrf })).await).await;
    assert_eq!(status, 200, "{options}");
    (csrf, options)
}

/// Registers a passkey in the passkey step a sign-in owes (`pending`: its cookie, at `location`):
/// the authenticator, and the session cookie the step ends with.
async fn register_at_sign_in(
    gw: &Gateway,
    location: &str,
    pending: &str,
) -> (SoftAuthenticator, String) {
    let step = gw.page_with_cookie(location, pending).await;
    assert!(
        step.contains("data-start=\"/_portcullis/login/passkey/start\"")
            && step.contains("must sign in with a passkey"),
        "{step}"
    );
    let (csrf, options) =
        step_start(gw, location, pending, "/_portcullis/login/passkey/start").await;
    let (auth, credential) = SoftAuthenticator::register(&options, &gw.base, true, ONE_PASSWORD);
    let resp = post_json(
        gw,
        "/_portcullis/login/passkey/finish",
        Some(pending),
        &json!({ "ceremony": options["ceremony"], "credential": credential, "label": "Phone", "csrf": csrf, "rd": "/probe" }),
    )
    .await;
    let cookie = set_cookie(&resp, "portcullis");
    let (status, body) = answer(resp).await;
    assert_eq!(
        (status, body["redirect"].as_str()),
        (200, Some("/probe")),
        "{body}"
    );
    // The step is spent: its cookie starts nothing more.
    let again = post_json(
        gw,
        "/_portcullis/login/passkey/start",
        Some(pending),
        &json!({ "csrf": csrf }),
    )
    .await;
    assert_ne!(again.status(), 200);
    (
        auth,
        cookie.expect("a session once the passkey is registered"),
    )
}

#[tokio::test]
async fn users_who_must_use_a_passkey_register_one_at_sign_in_and_the_password_alone_then_fails() {
    let (_up, gw) = setup("require_passkey = \"all\"\n").await;
    // Before she has a passkey, alice's password leads to the step that registers one, and
    // nothing else: no session, and an API client (which cannot register one) is refused.
    let (status, body) = gw.try_login("alice", PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("passkey_required"))
    );
    let (status, location, pending) = password_form(&gw, "alice").await;
    assert_eq!(
        (status, location.as_str()),
        (303, "/_portcullis/login/passkey?rd=%2Fprobe")
    );
    let pending = pending.expect("a pending login");
    assert_ne!(gw.status_with_cookie("/probe", &pending).await, 200);
    // A passkey that cannot verify her is refused here (with no TOTP it would lock her out),
    // and the step stays open.
    let (csrf, options) =
        step_start(&gw, &location, &pending, "/_portcullis/login/passkey/start").await;
    let (_, credential) = SoftAuthenticator::register(&options, &gw.base, false, ONE_PASSWORD);
    let (status, reason) = refused(
        post_json(
            &gw,
            "/_portcullis/login/passkey/finish",
            Some(&pending),
            &json!({ "ceremony": options["ceremony"], "credential": credential, "label": "Key", "csrf": csrf }),
        )
        .await,
    )
    .await;
    assert_eq!((status, reason.as_str()), (400, "user_not_verified"));
    let (mut key, cookie) = register_at_sign_in(&gw, &location, &pending).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);

    // Now the password alone opens nothing, by the form or the API.
    let resp = gw.login_form("alice", PW, "/").await;
    assert_eq!(resp.status(), 403);
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert!(resp.text().await.unwrap().contains("passkey only"));
    let (status, body) = gw.try_login("alice", PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("passkey_required"))
    );
    // The passkey works, and her last one cannot be removed.
    let cookie = passkey_session(&gw, &mut key, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let alice = Browser::with_cookie(&gw, cookie);
    let page = alice.text("/_portcullis/account").await;
    let id = page
        .split("<tr data-passkey=\"")
        .nth(1)
        .map(|r| r[..r.find('"').unwrap()].to_string())
        .unwrap();
    let resp = alice
        .post(
            "/_portcullis/account/passkeys/remove",
            &[("id", id.as_str()), ("csrf", &alice.csrf().await)],
        )
        .await;
    assert_eq!(resp.status(), 409);
    assert_audited(
        &gw,
        "passkey_remove",
        "failure",
        "this is your last way to sign in",
    );
    // Nor does the password confirm a change: her passkey does.
    let new_pw = "another passphrase for alice";
    let resp = change_password(&alice, PW, "", new_pw).await;
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?error=passkey-only"
    );
    let (status, reason) = refused(
        post_json(
            &gw,
            "/_portcullis/account/passkeys/start",
            Some(&alice.cookie),
            &json!({ "password": PW, "csrf": alice.csrf().await }),
        )
        .await,
    )
    .await;
    assert_eq!((status, reason.as_str()), (403, "reauthentication_failed"));
    let (status, body) = confirm_grant(&gw, &alice, &mut key, true).await;
    assert_eq!(status, 200, "{body}");
    let resp = change_password(&alice, "", body["grant"].as_str().unwrap(), new_pw).await;
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?done=password"
    );
    gw.metrics_with(&["portcullis_passkeys_total{event=\"registered\"} 1"])
        .await;
}

#[tokio::test]
async fn an_administrator_or_a_breach_response_can_require_passkeys_and_everything_else_still_holds(
) {
    let (_up, gw) = setup("").await;
    // One user: carol is not there; bob is asked, alice is not.
    gw.cli_ok(&["user", "require-passkey", "bob"]);
    assert_eq!(gw.try_login("alice", PW, None).await.0, 200);
    let (status, location, _) = password_form(&gw, "bob").await;
    assert_eq!(
        (status, location.as_str()),
        (303, "/_portcullis/login/passkey?rd=%2Fprobe")
    );
    let required = |name: &str| {
        let list: Value = serde_json::from_str(&gw.cli_ok(&["user", "list", "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap()["passkey_required"]
            .as_bool()
            .unwrap()
    };
    assert!(required("bob") && !required("alice"));
    gw.cli_ok(&["user", "require-passkey", "bob", "--off"]);
    assert!(!required("bob"));
    assert_eq!(gw.try_login("bob", PW, None).await.0, 200);

    // alice has a passkey already; bob has none. The breach response asks a new password and a
    // passkey of everyone, in one write with the sign-out.
    let alice_pw = Browser::login(&gw, "alice", PW).await;
    let mut alice_key = register(&gw, &alice_pw, "Laptop", true).await;
    let out = gw.cli_ok(&["breach-response", "--require-passkey"]);
    assert!(out.contains("register a passkey"), "{out}");
    assert!(required("alice") && required("bob"));
    assert!(
        poll_until(Duration::from_secs(3), || async {
            alice_pw.get("/probe").await.status() != 200
        })
        .await,
        "signed out"
    );

    // bob: the new password first, then the passkey, then the session.
    let (status, location, pending) = password_form(&gw, "bob").await;
    assert_eq!(
        (status, location.as_str()),
        (303, "/_portcullis/login/password?rd=%2Fprobe")
    );
    let pending = pending.unwrap();
    let step = gw.page_with_cookie(&location, &pending).await;
    let csrf = input_value(&step, "csrf").unwrap();
    let new_pw = "a brand new passphrase for bob";
    let resp = client()
        .post(gw.url("/_portcullis/login/password"))
        .header("Origin", gw.base.clone())
        .header("Cookie", &pending)
        .form(&[
            ("new_password", new_pw),
            ("confirm", new_pw),
            ("csrf", &csrf),
            ("rd", "/probe"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert!(
        set_cookie(&resp, "portcullis").is_none(),
        "no session before the passkey"
    );
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, "/_portcullis/login/passkey?rd=%2Fprobe");
    let pending = set_cookie(&resp, "portcullis-pending").expect("the next step's cookie");
    let (_bob_key, cookie) = register_at_sign_in(&gw, &location, &pending).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let (status, body) = gw.try_login("bob", new_pw, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("passkey_required"))
    );

    // alice: her passkey still signs her in, and the new password is asked on the way.
    let options = login_start(&gw, None).await;
    let credential = alice_key.assert(&options, &gw.base, true);
    let resp = login_finish(&gw, &options, &credential).await;
    assert!(set_cookie(&resp, "portcullis").is_none());
    let (status, body) = answer(resp).await;
    assert_eq!(
        (status, body["redirect"].as_str()),
        (200, Some("/_portcullis/login/password?rd=%2Fprobe")),
        "{body}"
    );
    // Her password alone is refused (she has a passkey and must use it).
    let (status, body) = gw.try_login("alice", PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("passkey_required"))
    );
    gw.assert_audit(
        &["--limit", "50"],
        &["passkeys required", "required at sign-in"],
    );
}

/// The account page's password change to `new`, with the current password or a passkey grant
/// (either may be empty); not signing out other devices.
async fn change_password(
    b: &Browser<'_>,
    current: &str,
    grant: &str,
    new: &str,
) -> reqwest::Response {
    let csrf = b.csrf().await;
    b.post(
        "/_portcullis/account/password",
        &[
            ("current", current),
            ("passkey_grant", grant),
            ("new_password", new),
            ("confirm", new),
            ("csrf", &csrf),
        ],
    )
    .await
}

/// Confirms the signed-in browser with `auth` (user verified when `uv`): status and body.
pub(crate) async fn confirm_grant(
    gw: &Gateway,
    b: &Browser<'_>,
    auth: &mut SoftAuthenticator,
    uv: bool,
) -> (u16, Value) {
    let csrf = b.csrf().await;
    let (status, options) = answer(
        post_json(
            gw,
            "/_portcullis/account/passkeys/confirm/start",
            Some(&b.cookie),
            &json!({ "csrf": csrf }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{options}");
    let credential = auth.assert(&options, &gw.base, uv);
    answer(
        post_json(
            gw,
            "/_portcullis/account/passkeys/confirm/finish",
            Some(&b.cookie),
            &json!({ "ceremony": options["ceremony"], "credential": credential, "csrf": csrf }),
        )
        .await,
    )
    .await
}

#[tokio::test]
async fn a_passkey_confirms_a_sensitive_change_in_place_of_the_password_once_and_in_its_session_only(
) {
    let (_up, gw) = setup("").await;
    let first = Browser::login(&gw, "alice", PW).await;
    let mut key = register(&gw, &first, "Laptop", true).await;
    let alice = Browser::with_cookie(&gw, passkey_session(&gw, &mut key, None).await);
    let other = Browser::with_cookie(&gw, passkey_session(&gw, &mut key, None).await);
    // The account page offers the passkey on its forms that ask for the password.
    let page = alice.text("/_portcullis/account").await;
    assert_eq!(
        page.matches("data-passkey-grant").count(),
        2,
        "password change and new passkey"
    );
    let new_pw = "a fresh passphrase after a passkey";
    let change = |b: &Browser<'_>, grant: String| {
        let b = Browser::with_cookie(&gw, b.cookie.clone());
        async move { change_password(&b, "", &grant, new_pw).await }
    };

    // A passkey that did not verify its user buys nothing.
    let (status, body) = confirm_grant(&gw, &alice, &mut key, false).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("user_not_verified")),
        "{body}"
    );
    assert!(body.get("grant").is_none());
    let (status, body) = confirm_grant(&gw, &alice, &mut key, true).await;
    assert_eq!(status, 200, "{body}");
    let grant = body["grant"].as_str().unwrap().to_string();
    // Another session of the same user cannot use it (and spends it: a grant is taken once,
    // whoever sends it); a made-up grant and no grant at all change nothing either.
    for (b, g, error) in [
        (&other, grant.clone(), "passkey"),
        (&alice, grant, "passkey"),
        (&alice, "0".repeat(64), "passkey"),
        (&alice, String::new(), "password"),
    ] {
        let resp = change(b, g).await;
        assert_eq!(resp.status(), 303);
        assert_eq!(
            resp.headers()["location"].to_str().unwrap(),
            format!("/_portcullis/account?error={error}")
        );
    }
    assert_eq!(
        password_form(&gw, "alice").await.0,
        303,
        "the password is unchanged"
    );
    // A fresh grant, in its own session: changed, once.
    let (status, body) = confirm_grant(&gw, &alice, &mut key, true).await;
    assert_eq!(status, 200, "{body}");
    let grant = body["grant"].as_str().unwrap().to_string();
    let resp = change(&alice, grant.clone()).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?done=password"
    );
    assert_ne!(
        password_form(&gw, "alice").await.0,
        303,
        "the old password is gone"
    );
    let resp = change(&alice, grant).await;
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?error=passkey",
        "a grant is used once"
    );
    let page = alice
        .get("/_portcullis/account?error=passkey")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("passkey confirmation has expired or was used"),
        "{page}"
    );
    // Adding another passkey takes a grant in place of the password too.
    let (_, body) = confirm_grant(&gw, &alice, &mut key, true).await;
    let csrf = alice.csrf().await;
    let (status, options) = answer(
        post_json(
            &gw,
            "/_portcullis/account/passkeys/start",
            Some(&alice.cookie),
            &json!({ "passkey_grant": body["grant"], "csrf": csrf }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{options}");
    assert!(options["publicKey"]["challenge"].is_string(), "{options}");
    // Turning TOTP off takes one too, in place of the password and the code; the page offers it.
    enrol(&alice).await;
    let page = alice.text("/_portcullis/account/2fa").await;
    assert!(
        page.contains("data-passkey-grant") && page.contains("/_portcullis/passkey.js"),
        "{page}"
    );
    let (_, body) = confirm_grant(&gw, &alice, &mut key, true).await;
    let csrf = input_value(&page, "csrf").unwrap();
    let resp = alice
        .post(
            "/_portcullis/account/2fa/disable",
            &[
                ("password", ""),
                ("code", ""),
                ("passkey_grant", body["grant"].as_str().unwrap()),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?done=2fa-off"
    );
    gw.assert_audit(
        &["--limit", "50"],
        &["passkey_confirm", "password_change", "2fa_disable"],
    );
}

#[tokio::test]
async fn a_passkey_is_a_second_factor_that_a_password_alone_cannot_skip_through_apps_or_the_api() {
    use crate::jellyfin::{initiate, jf_login, mb, token_of};
    use crate::standin::StandIn;
    let jf = StandIn::start().await;
    let jpw = crate::jellyfin::PW;
    let alice_id = jf.add_user("alice", jpw, false);
    jf.add_user("bob", jpw, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", jpw)
        .user("bob", jpw)
        .route_keys("kind = \"jellyfin\"")
        .start()
        .await;
    // alice's phone app signed in before she added a passkey (no second factor then).
    let phone = token_of(&gw, "alice", "phone-alice").await;
    let b = Browser::login(&gw, "alice", jpw).await;
    let mut key = register_as(&gw, &b, jpw, "Laptop", true).await;

    // The API login and a media app's password login are refused without reaching the server.
    let (status, body) = gw.try_login("alice", jpw, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("second_factor_required"))
    );
    let before = jf.requests().len();
    let (status, body) = jf_login(&gw, "alice", jpw, "tv-alice").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("two-factor"), "{body}");
    assert_eq!(
        jf.requests().len(),
        before,
        "nothing reached the media server"
    );
    // bob, without a second factor, signs in both ways.
    assert_eq!(gw.try_login("bob", jpw, None).await.0, 200);
    assert_eq!(jf_login(&gw, "bob", jpw, "tv-bob").await.0, 200);
    // Once bob must sign in with a passkey (he has none yet: after a breach response, his
    // password may be the phished one), his apps' password sign-in is refused too.
    gw.cli_ok(&["user", "require-passkey", "bob"]);
    let (status, body) = jf_login(&gw, "bob", jpw, "tv-bob-2").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("passkey"), "{body}");
    // A Quick Connect code is approved only from a signed-in browser, not by the app alone.
    let (_, code) = initiate(&gw, "tv-alice").await;
    let resp = client()
        .post(gw.url(&format!(
            "/QuickConnect/Authorize?code={code}&userId={alice_id}"
        )))
        .header("Authorization", mb("phone-alice", Some(&phone)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("browser signed in"));
    // A browser she signed in to with the passkey (both factors) approves it, and the TV
    // redeems its code.
    let (secret, code) = initiate(&gw, "tv-qc").await;
    let cookie = passkey_session(&gw, &mut key, None).await;
    let resp = client()
        .post(gw.url(&format!(
            "/QuickConnect/Authorize?code={code}&userId={alice_id}"
        )))
        .header("Authorization", mb("phone-alice", Some(&phone)))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = crate::jellyfin::redeem(&gw, "tv-qc", &secret).await;
    assert_eq!(resp.status(), 200);
    gw.metrics_with(&[
        "portcullis_logins_total{method=\"media_password\",result=\"second_factor_required\"} 1",
        "portcullis_logins_total{method=\"media_password\",result=\"passkey_required\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn the_relying_party_id_cannot_change_under_registered_passkeys() {
    let up = Upstream::start().await;
    let mut gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .server_keys("public_url = \"http://media.localhost:{port}\"")
        .extra_toml("[webauthn]\nrp_id = \"localhost\"\n")
        .start()
        .await;
    let origin = format!("http://media.localhost:{}", gw.port);
    // An API session, and the account page's token for it.
    let token = gw.login("alice", PW).await.token;
    let page = client()
        .get(gw.url("/_portcullis/account"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = input_value(&page, "csrf").unwrap();
    let post = |path: &'static str, body: Value| {
        let (gw, origin, token) = (&gw, origin.clone(), token.clone());
        async move {
            client()
                .post(gw.url(path))
                .header("Origin", origin)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let (status, options) = answer(
        post(
            "/_portcullis/account/passkeys/start",
            json!({ "password": PW, "csrf": csrf }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{options}");
    assert_eq!(options["publicKey"]["rp"]["id"], "localhost");
    let (_, credential) = SoftAuthenticator::register(&options, &origin, true, [0; 16]);
    let resp = post(
        "/_portcullis/account/passkeys/finish",
        json!({ "ceremony": options["ceremony"], "credential": credential, "label": "Phone", "csrf": csrf }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // The id falls back to the host: a reload is refused (the passkey still signs in), and so
    // is a start, each naming the key.
    edit_config(&gw, "rp_id = \"localhost\"\n", "");
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
    assert_eq!(unsafe { libc::kill(gw.pid() as i32, libc::SIGHUP) }, 0);
    let log = gw.log_containing("configuration reload refused").await;
    assert!(log.contains("webauthn.rp_id"), "{log}");
    let (status, options) = answer(post("/_portcullis/passkey/login/start", json!({})).await).await;
    assert_eq!(
        (status, options["publicKey"]["rpId"].as_str()),
        (200, Some("localhost"))
    );
    // `check-config` says so before anyone tries (it only looks at the store), and passes
    // the file with the old id.
    let out = gw.cli(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("key `webauthn.rp_id`") && err.contains("`localhost`"),
        "{err}"
    );
    edit_config(&gw, "[webauthn]\n", "[webauthn]\nrp_id = \"localhost\"\n");
    let out = gw.cli_ok(&["check-config"]);
    assert!(out.contains(": ok"), "{out}");
    edit_config(&gw, "rp_id = \"localhost\"\n", "");
    gw.kill();
    let out = gw.cli(&["serve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("webauthn.rp_id")
            && err.contains("media.localhost")
            && err.contains("`localhost`"),
        "{err}"
    );
}

#[tokio::test]
async fn an_administrators_one_time_link_adds_a_passkey_and_signs_out_every_device() {
    let (_up, gw) = setup("").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let link_path = |out: String| -> String {
        let link = out
            .lines()
            .find(|l| l.contains("/_portcullis/passkey-link/"))
            .unwrap_or_else(|| panic!("no link in {out}"))
            .trim()
            .to_string();
        link.strip_prefix(&gw.base)
            .expect("a link on the public URL")
            .to_string()
    };
    let first = link_path(gw.cli_ok(&["user", "passkey-link", "alice"]));
    // A newer link replaces the older one.
    let path = link_path(gw.cli_ok(&["user", "passkey-link", "alice"]));
    let gw_ref = &gw;
    let status_of = |p: String| async move { client().get(gw_ref.url(&p)).send().await.unwrap() };
    assert_eq!(status_of(first.clone()).await.status(), 410);
    let page = status_of(path.clone()).await;
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("<strong>alice</strong>") && page.contains("data-finish"),
        "{page}"
    );
    // alice must sign in with a passkey and has no TOTP: a key that cannot verify her would
    // lock her out, so the link refuses it and stays valid.
    gw.cli_ok(&["user", "require-passkey", "alice"]);
    let (_, options) =
        answer(post_json(&gw, &format!("{path}/start"), None, &json!({})).await).await;
    let (_, credential) = SoftAuthenticator::register(&options, &gw.base, false, [0; 16]);
    let (status, reason) = refused(
        post_json(
            &gw,
            &format!("{path}/finish"),
            None,
            &json!({ "ceremony": options["ceremony"], "credential": credential, "label": "Key" }),
        )
        .await,
    )
    .await;
    assert_eq!((status, reason.as_str()), (400, "user_not_verified"));
    let (status, options) =
        answer(post_json(&gw, &format!("{path}/start"), None, &json!({})).await).await;
    assert_eq!(status, 200, "{options}");
    let (mut phone, credential) = SoftAuthenticator::register(&options, &gw.base, true, [0; 16]);
    let (status, body) = answer(
        post_json(
            &gw,
            &format!("{path}/finish"),
            None,
            &json!({ "ceremony": options["ceremony"], "credential": credential, "label": "New phone" }),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, body["redirect"].as_str()),
        (
            200,
            Some("/_portcullis/login?rd=%2F%5Fportcullis%2Faccount")
        )
    );
    // Every device of alice is signed out; the link is spent; the new passkey signs in.
    assert_ne!(gw.status_with_cookie("/probe", &alice.cookie).await, 200);
    assert_eq!(status_of(path.clone()).await.status(), 410);
    let (status, reason) =
        refused(post_json(&gw, &format!("{path}/start"), None, &json!({})).await).await;
    assert_eq!((status, reason.as_str()), (410, "link_not_valid"));
    let cookie = passkey_session(&gw, &mut phone, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    assert_eq!(
        status_of("/_portcullis/passkey-link/made-up".into())
            .await
            .status(),
        404
    );
    let audit = gw.cli_ok(&["audit", "--user", "alice"]);
    assert!(
        audit.contains("passkey_link_issued") && audit.contains("one-time link"),
        "{audit}"
    );
}

#[tokio::test]
async fn failed_passkey_answers_count_toward_the_account_lock_like_wrong_passwords() {
    let (_up, gw) = setup("max_failures = 3\nip_max_failures = 100\n").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let mut key = register(&gw, &alice, "Phone", true).await;
    for _ in 0..3 {
        let options = login_start(&gw, None).await;
        let evil = key.assert_with(&options, &Options::new("http://evil.example"));
        let (status, reason) = refused(login_finish(&gw, &options, &evil).await).await;
        assert!(
            (status, reason.as_str()) == (400, "wrong_origin")
                || (status, reason.as_str()) == (429, "throttled"),
            "{status} {reason}"
        );
    }
    // Locked: the password and the passkey itself are refused until unlocked.
    let (status, body) = gw.try_login("alice", PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("locked")),
        "{body}"
    );
    assert_eq!(
        refused_answer(&gw, |options| key.assert(options, &gw.base, true)).await,
        (403, "locked".into())
    );
    gw.cli_ok(&["user", "unlock", "alice"]);
    let cookie = passkey_session(&gw, &mut key, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
}

#[tokio::test]
async fn an_expired_ceremony_or_an_answer_that_is_not_cbor_is_refused_and_changes_nothing() {
    let (_up, gw) = setup("").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let mut laptop = register(&gw, &alice, "Laptop", true).await;
    let origin = gw.base.clone();
    // One sign-in, so that the counter and the last use have values to keep.
    passkey_session(&gw, &mut laptop, None).await;
    let before = passkey_rows(&gw).await;
    assert_eq!(before.len(), 1);
    assert!(before[0].2 >= 1 && before[0].3.is_some(), "{before:?}");

    // A sign-in answered after its five minutes: refused, no session, the passkey untouched.
    let options = login_start(&gw, None).await;
    let credential = laptop.assert(&options, &origin, true);
    expire_ceremonies(&gw).await;
    assert_eq!(
        refused(login_finish(&gw, &options, &credential).await).await,
        (400, "expired_ceremony".into())
    );
    assert_eq!(passkey_rows(&gw).await, before);

    // A registration answered after its five minutes: no passkey added.
    let csrf = alice.csrf().await;
    let finish = |options: Value, credential: Value| {
        let (gw, cookie, csrf) = (&gw, alice.cookie.clone(), csrf.clone());
        async move {
            post_json(
                gw,
                "/_portcullis/account/passkeys/finish",
                Some(&cookie),
                &json!({ "ceremony": options["ceremony"], "credential": credential, "label": "Late", "csrf": csrf }),
            )
            .await
        }
    };
    let (status, options) = registration_options(&gw, &alice, &csrf).await;
    assert_eq!(status, 200, "{options}");
    let (_, credential) = SoftAuthenticator::register(&options, &origin, true, [0; 16]);
    expire_ceremonies(&gw).await;
    assert_eq!(
        refused(finish(options, credential).await).await,
        (400, "expired_ceremony".into())
    );
    assert_eq!(passkey_rows(&gw).await, before);

    // Valid base64url that is not CBOR: an attestation object starting with a stop code, one
    // that is a CBOR text instead of a map, and one whose authenticator data is cut short.
    let not_cbor = URL_SAFE_NO_PAD.encode([0xff, 0x00, 0x13, 0x37]);
    let text = URL_SAFE_NO_PAD.encode(b"\x64none");
    let short_auth_data = URL_SAFE_NO_PAD
        .encode(b"\xa3\x63fmt\x64none\x67attStmt\xa0\x68authData\x45\x01\x02\x03\x04\x05");
    for attestation in [not_cbor, text, short_auth_data] {
        let (status, options) = registration_options(&gw, &alice, &csrf).await;
        assert_eq!(status, 200, "{options}");
        let (_, mut credential) = SoftAuthenticator::register(&options, &origin, true, [0; 16]);
        credential["response"]["attestationObject"] = json!(attestation);
        assert_eq!(
            refused(finish(options, credential).await).await,
            (400, "malformed_response".into()),
            "{attestation}"
        );
        assert_eq!(passkey_rows(&gw).await, before);
    }
    // A sign-in whose authenticator data is too short to hold the rp id hash, flags and
    // counter (37 bytes), or is empty: refused, and the counter is where it was.
    for auth_data in [URL_SAFE_NO_PAD.encode([0x49; 10]), String::new()] {
        let (status, reason) = refused_answer(&gw, |options| {
            let mut a = laptop.assert(options, &origin, true);
            a["response"]["authenticatorData"] = json!(auth_data);
            a
        })
        .await;
        assert_eq!((status, reason.as_str()), (400, "malformed_response"));
        assert_eq!(passkey_rows(&gw).await, before);
    }
    // The passkey itself still works afterwards.
    passkey_session(&gw, &mut laptop, None).await;
    assert!(passkey_rows(&gw).await[0].2 > before[0].2);
}

#[tokio::test]
async fn with_passkeys_required_of_admins_an_admins_password_is_refused_and_a_users_is_not() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .admin("root", PW)
        .user("alice", PW)
        .auth_keys("require_passkey = \"admins\"\n")
        .start()
        .await;
    // The API cannot register a passkey: the admin is refused, the user signs in.
    let (status, body) = gw.try_login("root", PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("passkey_required")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("signs in with a passkey only")),
        "{body}"
    );
    assert_eq!(gw.try_login("alice", PW, None).await.0, 200);
    // The admin's form login leads to the step that registers a passkey, and only then to a
    // session.
    let (status, location, pending) = password_form(&gw, "root").await;
    assert_eq!(
        (status, location.as_str()),
        (303, "/_portcullis/login/passkey?rd=%2Fprobe")
    );
    let (mut key, cookie) =
        register_at_sign_in(&gw, &location, &pending.expect("a pending login")).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    // From then on the admin's password alone is refused with the clear message ...
    let resp = gw.login_form("root", PW, "/probe").await;
    assert_eq!(resp.status(), 403);
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert!(set_cookie(&resp, "portcullis-pending").is_none());
    let page = resp.text().await.unwrap();
    assert!(page.contains("signs in with a passkey only"), "{page}");
    // ... and the passkey signs in; the user's password still opens a session, no step.
    let cookie = passkey_session(&gw, &mut key, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let resp = gw.login_form("alice", PW, "/probe").await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/probe");
    let cookie = set_cookie(&resp, "portcullis").expect("a session for the user");
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    gw.metrics_with(&[
        "portcullis_logins_total{method=\"password\",result=\"passkey_required\"} 1\n",
        "portcullis_logins_total{method=\"api\",result=\"passkey_required\"} 1\n",
    ])
    .await;
}

#[tokio::test]
async fn sign_out_of_all_devices_and_a_breach_response_end_passkey_sessions() {
    let (_up, gw) = setup("").await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let mut key = register(&gw, &alice, "Laptop", true).await;
    let phone = Browser::with_cookie(&gw, passkey_session(&gw, &mut key, None).await);
    let tablet = passkey_session(&gw, &mut key, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &tablet).await, 200);
    // "Sign out of all devices" from a session the passkey opened ends every one of them.
    let resp = phone
        .post(
            "/_portcullis/account/signout-all",
            &[("csrf", &phone.csrf().await)],
        )
        .await;
    assert_eq!(resp.status(), 303);
    for cookie in [&phone.cookie, &tablet, &alice.cookie] {
        assert_eq!(gw.status_with_cookie("/probe", cookie).await, 401);
    }
    // The breach response (another process, through the store) ends a passkey session too.
    let cookie = passkey_session(&gw, &mut key, None).await;
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let out = gw.cli_ok(&["breach-response"]);
    assert!(out.contains("signed out"), "{out}");
    assert!(
        poll_until(Duration::from_secs(3), || async {
            gw.status_with_cookie("/probe", &cookie).await != 200
        })
        .await,
        "the passkey session outlived the breach response"
    );
    // The passkey still signs her in, by way of the new password the response asks for.
    let options = login_start(&gw, None).await;
    let credential = key.assert(&options, &gw.base, true);
    let resp = login_finish(&gw, &options, &credential).await;
    assert!(set_cookie(&resp, "portcullis").is_none());
    assert_eq!(
        answer(resp).await.1["redirect"],
        "/_portcullis/login/password?rd=%2Fprobe"
    );
    let out = gw.cli_ok(&["audit", "--json", "--limit", "500"]);
    let entries: Vec<Value> = serde_json::from_str(&out).unwrap();
    let signouts: Vec<&Value> = entries
        .iter()
        .filter(|e| e["event"] == "signout_all_devices")
        .collect();
    assert_eq!(signouts.len(), 1, "{out}");
    assert_eq!(
        (&signouts[0]["outcome"], &signouts[0]["user"]),
        (&json!("success"), &json!("alice")),
        "{out}"
    );
}
