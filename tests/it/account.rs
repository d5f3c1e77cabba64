//! The breach-response flows: devices and sign-outs, password change that signs out connected
//! devices, TOTP, reset links, forced resets, brute-force limits, CSRF, audit log, breach
//! response and key rotation — through the real gateway, its pages and its CLI.

use std::time::Duration;

use portcullis::auth::totp;

use crate::harness::{client, input_value, poll_until, set_cookie, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";
const BOB_PW: &str = "bob-password-123456";

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .start()
        .await;
    (up, gw)
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A browser-like client session: the session cookie it holds.
pub(crate) struct Browser<'a> {
    gw: &'a Gateway,
    pub(crate) cookie: String,
}

impl<'a> Browser<'a> {
    pub(crate) async fn login(gw: &'a Gateway, user: &str, pw: &str) -> Browser<'a> {
        let resp = gw.login_form(user, pw, "/").await;
        assert_eq!(resp.status(), 303, "form login of {user}");
        let cookie = set_cookie(&resp, "portcullis").expect("a session cookie");
        Browser { gw, cookie }
    }

    /// A browser holding a session cookie got another way (a passkey sign-in).
    pub(crate) fn with_cookie(gw: &'a Gateway, cookie: String) -> Browser<'a> {
        Browser { gw, cookie }
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        client()
            .get(self.gw.url(path))
            .header("Cookie", &self.cookie)
            .header("Accept", "text/html")
            .send()
            .await
            .unwrap()
    }

    /// The text of the page at `path`.
    pub(crate) async fn text(&self, path: &str) -> String {
        self.get(path).await.text().await.unwrap()
    }

    /// Whether this browser still reaches the upstream.
    async fn alive(&self) -> bool {
        self.get("/probe").await.status() == 200
    }

    pub(crate) async fn csrf(&self) -> String {
        let html = self.get("/_portcullis/account").await.text().await.unwrap();
        input_value(&html, "csrf").unwrap_or_else(|| panic!("no csrf on account page:\n{html}"))
    }

    pub(crate) async fn post(&self, path: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        client()
            .post(self.gw.url(path))
            .header("Cookie", &self.cookie)
            .header("Origin", self.gw.base.clone())
            .form(fields)
            .send()
            .await
            .unwrap()
    }

    /// Takes a fresh session cookie from a response, if it sets one.
    fn take_cookie(&mut self, resp: &reqwest::Response) -> bool {
        match set_cookie(resp, "portcullis") {
            Some(c) => {
                self.cookie = c;
                true
            }
            None => false,
        }
    }
}

#[tokio::test]
async fn account_page_lists_devices_and_marks_this_one() {
    let (_up, gw) = setup().await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let api = gw.login("alice", ALICE_PW).await;
    let html = a.get("/_portcullis/account").await.text().await.unwrap();
    assert_eq!(html.matches("data-current=\"1\"").count(), 1);
    assert!(html.contains("This device"));
    assert!(html.contains(&api.session_id), "the API session is listed");
    assert!(html.contains("Sign out of all other devices"));
    assert!(html.contains("Sign out of all devices"));
    assert!(
        html.contains("name=\"signout\" value=\"1\" checked"),
        "box not ticked by default"
    );
    // Not signed in: sent to log in, returning to the account page.
    let resp = client()
        .get(gw.url("/_portcullis/account"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/_portcullis/login?rd="));
}

#[tokio::test]
async fn sign_out_one_device_from_the_account_page() {
    let (_up, gw) = setup().await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let other = gw.login("alice", ALICE_PW).await;
    let bobs = gw.login("bob", BOB_PW).await;
    let csrf = a.csrf().await;
    let resp = a
        .post(
            "/_portcullis/account/sessions/revoke",
            &[("session", &other.session_id), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(gw.get_status("/probe", &other.token).await, 401);
    assert!(a.alive().await);
    // Someone else's session cannot be ended from here.
    let resp = a
        .post(
            "/_portcullis/account/sessions/revoke",
            &[("session", &bobs.session_id), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(gw.get_status("/probe", &bobs.token).await, 200);
}

#[tokio::test]
async fn sign_out_of_all_other_devices_keeps_this_one_with_a_fresh_session() {
    let (_up, gw) = setup().await;
    let mut a = Browser::login(&gw, "alice", ALICE_PW).await;
    let b = Browser::login(&gw, "alice", ALICE_PW).await;
    let api = gw.login("alice", ALICE_PW).await;
    let bob = gw.login("bob", BOB_PW).await;
    let old_a = a.cookie.clone();
    let csrf = a.csrf().await;
    let resp = a
        .post("/_portcullis/account/signout-others", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), 303);
    assert!(a.take_cookie(&resp), "this device got no fresh session");
    assert!(a.alive().await);
    assert!(!b.alive().await);
    assert_eq!(gw.get_status("/probe", &api.token).await, 401);
    assert_eq!(gw.get_status("/probe", &bob.token).await, 200);
    let stale = Browser {
        gw: &gw,
        cookie: old_a,
    };
    assert!(
        !stale.alive().await,
        "the old cookie of this device still works"
    );
}

#[tokio::test]
async fn sign_out_of_all_devices_includes_this_one() {
    let (_up, gw) = setup().await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let b = Browser::login(&gw, "alice", ALICE_PW).await;
    let csrf = a.csrf().await;
    let resp = a
        .post("/_portcullis/account/signout-all", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/_portcullis/login");
    assert!(!a.alive().await && !b.alive().await);
    // b's next navigation goes to the login page.
    let resp = b.get("/web/index.html").await;
    assert_eq!(resp.status(), 302);
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/_portcullis/login"));
}

#[tokio::test]
async fn cross_site_or_tokenless_sign_out_posts_are_refused() {
    let (_up, gw) = setup().await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let csrf = a.csrf().await;
    let evil = client()
        .post(gw.url("/_portcullis/account/signout-all"))
        .header("Cookie", &a.cookie)
        .header("Origin", "https://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 403);
    let no_token = a
        .post("/_portcullis/account/signout-all", &[("csrf", "0000")])
        .await;
    assert_eq!(no_token.status(), 403);
    let get = a.get("/_portcullis/account/signout-all").await;
    assert_eq!(get.status(), 405);
    assert!(a.alive().await, "a refused request signed the user out");
}

/// Changes the password on the account page: 303 when it was changed, 400 when refused.
pub(crate) async fn change_password(
    a: &mut Browser<'_>,
    current: &str,
    new: &str,
    signout: bool,
) -> u16 {
    let csrf = a.csrf().await;
    let mut fields = vec![
        ("current", current),
        ("new_password", new),
        ("confirm", new),
        ("csrf", csrf.as_str()),
    ];
    if signout {
        fields.push(("signout", "1"));
    }
    let resp = a.post("/_portcullis/account/password", &fields).await;
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    a.take_cookie(&resp);
    if location.contains("error=") {
        400
    } else {
        resp.status().as_u16()
    }
}

#[tokio::test]
async fn password_change_with_the_box_ticked_signs_out_connected_devices() {
    let (_up, gw) = setup().await;
    let mut a = Browser::login(&gw, "alice", ALICE_PW).await;
    let b = Browser::login(&gw, "alice", ALICE_PW).await;
    let api = gw.login("alice", ALICE_PW).await;
    let new_pw = "a brand new passphrase";
    assert_eq!(change_password(&mut a, ALICE_PW, new_pw, true).await, 303);
    assert!(
        a.alive().await,
        "the device that changed the password was signed out"
    );
    assert!(!b.alive().await);
    assert_eq!(gw.get_status("/probe", &api.token).await, 401);
    // The old password no longer works; the new one does.
    let (status, _) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 401);
    gw.login("alice", new_pw).await;
}

#[tokio::test]
async fn password_change_without_the_box_keeps_other_devices() {
    let (_up, gw) = setup().await;
    let mut a = Browser::login(&gw, "alice", ALICE_PW).await;
    let b = Browser::login(&gw, "alice", ALICE_PW).await;
    assert_eq!(
        change_password(&mut a, ALICE_PW, "another long passphrase", false).await,
        303
    );
    assert!(a.alive().await && b.alive().await);
}

#[tokio::test]
async fn password_policy_and_current_password_are_enforced() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let blocklist = dir.path().join("blocklist.txt");
    std::fs::write(
        &blocklist,
        "# common passwords\npassword1234\nCorrectHorseBattery\n",
    )
    .unwrap();
    // The blocklist is read from the [password] table.
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .extra_toml(&format!(
            "[password]\nblocklist_file = \"{}\"",
            blocklist.display()
        ))
        .start()
        .await;
    let mut a = Browser::login(&gw, "alice", ALICE_PW).await;
    for (current, new, why) in [
        (
            "wrong-current-password",
            "a fine new password",
            "wrong current password",
        ),
        (ALICE_PW, "short", "too short"),
        (ALICE_PW, "ALICE", "same as user name (and short)"),
        (ALICE_PW, "correcthorsebattery", "blocklisted"),
    ] {
        assert_eq!(
            change_password(&mut a, current, new, true).await,
            400,
            "{why}"
        );
    }
    // 64 characters and more are allowed, with no composition rules.
    // Past the 1,024-byte cap a new password is refused, as at login (ATK-69).
    let over_cap = "x".repeat(1025);
    assert_eq!(
        change_password(&mut a, ALICE_PW, &over_cap, false).await,
        400
    );
    let long = "x".repeat(80);
    assert_eq!(change_password(&mut a, ALICE_PW, &long, false).await, 303);
    gw.login("alice", &long).await;
}

#[tokio::test]
async fn a_wrong_current_password_counts_toward_the_account_lock() {
    // ATK-64(b): a stolen session must not let its holder guess the password freely.
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .auth_keys("max_failures = 3")
        .start()
        .await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let mut errors = Vec::new();
    for current in [
        "guess-one-xxxx",
        "guess-two-xxxx",
        "guess-three-xx",
        ALICE_PW,
    ] {
        let csrf = a.csrf().await;
        let fields = [
            ("current", current),
            ("new_password", "a brand new passphrase"),
            ("confirm", "a brand new passphrase"),
            ("csrf", csrf.as_str()),
        ];
        let resp = a.post("/_portcullis/account/password", &fields).await;
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        errors.push(location);
    }
    assert_eq!(
        errors,
        [
            "/_portcullis/account?error=password",
            "/_portcullis/account?error=password",
            "/_portcullis/account?error=password",
            "/_portcullis/account?error=locked",
        ],
        "the right password was tried while locked"
    );
    // The same lock holds for signing in, and the password was not changed.
    let (status, _) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 403, "alice is locked");
    gw.cli_ok(&["user", "unlock", "alice"]);
    gw.login("alice", ALICE_PW).await;
}

/// A form login with return path `rd` that stops at the code step: no session yet, sent to the
/// code page; returns the pending cookie and the code page's CSRF token.
pub(crate) async fn pending_login(
    gw: &Gateway,
    user: &str,
    pw: &str,
    rd: &str,
) -> (String, String) {
    let resp = gw.login_form(user, pw, rd).await;
    assert_eq!(resp.status(), 303);
    assert!(
        set_cookie(&resp, "portcullis").is_none(),
        "a session before the code"
    );
    let code_page = format!(
        "/_portcullis/login/2fa?rd={}",
        percent_encoding::utf8_percent_encode(rd, percent_encoding::NON_ALPHANUMERIC)
    );
    assert_eq!(resp.headers()["location"], code_page.as_str());
    let pending = set_cookie(&resp, "portcullis-pending").expect("pending cookie");
    let html = gw.page_with_cookie(&code_page, &pending).await;
    let csrf = input_value(&html, "csrf").expect("csrf on the code page");
    (pending, csrf)
}

/// Enrols alice in TOTP through the account page; returns the seed and the recovery codes.
pub(crate) async fn enrol(a: &Browser<'_>) -> (Vec<u8>, Vec<String>) {
    let (seed, codes, _) = enrol_step(a).await;
    (seed, codes)
}

/// [`enrol`], also returning the time step whose code confirmed the enrolment.
async fn enrol_step(a: &Browser<'_>) -> (Vec<u8>, Vec<String>, i64) {
    let html = a
        .get("/_portcullis/account/2fa")
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("<svg"), "no QR code");
    let key_start = html.find("id=\"totp-secret\">").unwrap() + "id=\"totp-secret\">".len();
    let key = &html[key_start..key_start + html[key_start..].find('<').unwrap()];
    let seed = data_encoding::BASE32_NOPAD.decode(key.as_bytes()).unwrap();
    let enroll = input_value(&html, "enroll").unwrap();
    let csrf = input_value(&html, "csrf").unwrap();
    // A wrong code is refused and 2FA stays off.
    let resp = a
        .post(
            "/_portcullis/account/2fa",
            &[("enroll", &enroll), ("code", "000000"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 401);
    let step = totp::step_of(now_s());
    let code = totp::code_at(&seed, step);
    let resp = a
        .post(
            "/_portcullis/account/2fa",
            &[("enroll", &enroll), ("code", &code), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let page = resp.text().await.unwrap();
    let list = &page[page.find("id=\"recovery-codes\">").unwrap()..];
    let codes: Vec<String> = list
        .split("<li>")
        .skip(1)
        .map(|s| s[..s.find("</li>").unwrap()].to_string())
        .collect();
    assert_eq!(codes.len(), 10, "{page}");
    (seed, codes, step)
}

#[tokio::test]
async fn totp_login_with_replay_protection_and_recovery_codes() {
    let (_up, gw) = setup().await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let (seed, recovery, enrolled) = enrol_step(&a).await;

    // The JSON API asks for the second factor.
    let api = |code: Option<String>| {
        let url = gw.url("/_portcullis/api/login");
        async move {
            let mut body = serde_json::json!({"username": "alice", "password": ALICE_PW});
            if let Some(c) = code {
                body["totp"] = serde_json::Value::String(c);
            }
            let resp = client().post(url).json(&body).send().await.unwrap();
            let status = resp.status().as_u16();
            let json: serde_json::Value = resp.json().await.unwrap();
            (status, json)
        }
    };
    let (status, body) = api(None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("second_factor_required"))
    );
    // The code that confirmed enrolment is spent (its own step, whatever the clock says now:
    // a 30-second step may have ended since).
    let (status, _) = api(Some(totp::code_at(&seed, enrolled))).await;
    assert_eq!(status, 401, "the enrolment code was accepted again");
    // The next step's code works once, and never twice.
    let next = totp::code_at(&seed, enrolled + 1);
    let (status, body) = api(Some(next.clone())).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api(Some(next)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_code"))
    );
    // A recovery code works once.
    let (status, _) = api(Some(recovery[0].clone())).await;
    assert_eq!(status, 200);
    let (status, _) = api(Some(recovery[0].to_uppercase())).await;
    assert_eq!(status, 401, "a recovery code was accepted twice");

    // The form login walks through the code page.
    let (pending, csrf) = pending_login(&gw, "alice", ALICE_PW, "/web/").await;
    // The pending cookie is not a session.
    let pending_token = pending.split_once('=').unwrap().1;
    assert_eq!(gw.get_status("/probe", pending_token).await, 401);
    let resp = client()
        .post(gw.url("/_portcullis/login/2fa"))
        .header("Cookie", &pending)
        .header("Origin", gw.base.clone())
        .form(&[
            ("code", recovery[1].as_str()),
            ("csrf", &csrf),
            ("rd", "/web/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/web/");
    let session = set_cookie(&resp, "portcullis").expect("session after the code");
    let b = Browser {
        gw: &gw,
        cookie: session,
    };
    assert!(b.alive().await);

    // Turning 2FA off needs the password and a code.
    let csrf = a.csrf().await;
    let resp = a
        .post(
            "/_portcullis/account/2fa/disable",
            &[
                ("password", "wrong-password-xyz"),
                ("code", &recovery[2]),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(resp.status(), 400);
    let resp = a
        .post(
            "/_portcullis/account/2fa/disable",
            &[
                ("password", ALICE_PW),
                ("code", &recovery[2]),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(resp.status(), 303);
    let (status, _) = api(None).await;
    assert_eq!(status, 200, "2FA still required after turning it off");
    gw.metrics_with(&[
        r#"portcullis_second_factor_total{method="totp",result="success"}"#,
        r#"portcullis_second_factor_total{method="recovery_code",result="failure"}"#,
    ])
    .await;
}

#[tokio::test]
async fn require_2fa_sends_users_without_it_to_enrolment() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .auth_keys("require_2fa = \"all\"")
        .start()
        .await;
    let (status, _) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 403);
    let resp = gw.login_form("alice", ALICE_PW, "/").await;
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/login/enroll?rd=%2F"
    );
    let pending = set_cookie(&resp, "portcullis-pending").unwrap();
    let html = gw
        .page_with_cookie("/_portcullis/login/enroll?rd=%2F", &pending)
        .await;
    let key_start = html.find("id=\"totp-secret\">").unwrap() + "id=\"totp-secret\">".len();
    let key = &html[key_start..key_start + html[key_start..].find('<').unwrap()];
    let seed = data_encoding::BASE32_NOPAD.decode(key.as_bytes()).unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/login/enroll"))
        .header("Cookie", &pending)
        .header("Origin", gw.base.clone())
        .form(&[
            ("enroll", input_value(&html, "enroll").unwrap().as_str()),
            ("code", &totp::code_at(&seed, totp::step_of(now_s()))),
            ("csrf", &input_value(&html, "csrf").unwrap()),
            ("rd", "/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let session = set_cookie(&resp, "portcullis").expect("a session after enrolment");
    assert!(resp.text().await.unwrap().contains("recovery-codes"));
    assert!(
        Browser {
            gw: &gw,
            cookie: session
        }
        .alive()
        .await
    );
}

#[tokio::test]
async fn reset_link_sets_a_password_signs_out_everywhere_and_works_once() {
    let (_up, gw) = setup().await;
    let a = Browser::login(&gw, "alice", ALICE_PW).await;
    let out = gw.cli_ok(&["user", "reset-link", "alice"]);
    let link = out
        .lines()
        .find(|l| l.contains("/_portcullis/reset/"))
        .expect("a link")
        .trim()
        .to_string();
    let path = &link[link.find("/_portcullis/reset/").unwrap()..];
    let token = path.rsplit('/').next().unwrap();
    // Only a hash of the token is stored.
    let db = std::fs::read(gw.db_path()).unwrap_or_default();
    let wal = std::fs::read(gw.db_path().with_extension("db-wal")).unwrap_or_default();
    let hay = [db, wal].concat();
    assert!(
        !hay.windows(token.len()).any(|w| w == token.as_bytes()),
        "token stored in clear"
    );

    let resp = client().get(gw.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let new_pw = "reset passphrase 2026";
    // The page's "sign out connected devices" is ticked: a browser sends it.
    let page = client()
        .get(gw.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("name=\"signout\" value=\"1\" checked"),
        "{page}"
    );
    let form = [
        ("new_password", new_pw),
        ("confirm", new_pw),
        ("signout", "1"),
    ];
    let resp = client()
        .post(gw.url(path))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("every device has been signed out"));
    assert!(!a.alive().await);
    gw.login("alice", new_pw).await;
    // Used once: a clear page the second time.
    let resp = client().get(gw.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 410);
    assert!(resp.text().await.unwrap().contains("already been used"));
    let resp = client()
        .post(gw.url(path))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 410);
    // An unknown link.
    let resp = client()
        .get(gw.url("/_portcullis/reset/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn expired_reset_link_gets_a_clear_page() {
    let (_up, gw) = setup().await;
    let out = gw.cli_ok(&["user", "reset-link", "bob"]);
    let path = out
        .lines()
        .find_map(|l| {
            l.find("/_portcullis/reset/")
                .map(|i| l[i..].trim().to_string())
        })
        .unwrap();
    // Age the link in the store, as an hour passing would.
    use sqlx::{Connection, Executor};
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(gw.db_path());
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    conn.execute("UPDATE reset_links SET expires_ms = 1")
        .await
        .unwrap();
    let resp = client().get(gw.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 410);
    assert!(resp.text().await.unwrap().contains("expired"));
}

#[tokio::test]
async fn require_reset_forces_a_new_password_at_next_login() {
    let (_up, gw) = setup().await;
    let old = gw.login("alice", ALICE_PW).await;
    gw.cli_ok(&["user", "require-reset", "alice"]);
    let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "password_reset_required");
    let resp = gw.login_form("alice", ALICE_PW, "/x").await;
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/login/password?rd=%2Fx"
    );
    let pending = set_cookie(&resp, "portcullis-pending").unwrap();
    let new_pw = "forced new passphrase";
    let resp = gw.set_new_password(&pending, new_pw, "/x").await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/x");
    assert!(set_cookie(&resp, "portcullis").is_some());
    assert_eq!(gw.get_status("/probe", &old.token).await, 401);
    gw.login("alice", new_pw).await;
    gw.cli_ok(&["user", "require-reset", "--all"]);
    let (status, _) = gw.try_login("bob", BOB_PW, None).await;
    assert_eq!(status, 403);
}

/// The lock counts consecutive failures: the right password, sent as soon as the wrong ones
/// are answered (their count still on its way to the store), clears them, and each failure
/// counts once however quickly the next attempt follows.
#[tokio::test]
async fn a_success_right_after_failures_clears_them_and_each_failure_counts_once() {
    let up = Upstream::start().await;
    let gw = Gateway::locking_after_three(&up.url(), ALICE_PW).await;
    for round in 0..6 {
        for _ in 0..2 {
            let (status, body) = gw.try_login("alice", "wrong-password-x", None).await;
            assert_eq!(status, 401, "round {round}: {body}");
        }
        let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
        assert_eq!(status, 200, "round {round}: {body}");
    }
    // The third failure in a row still locks, at once.
    for _ in 0..3 {
        assert_eq!(gw.try_login("alice", "wrong-password-x", None).await.0, 401);
    }
    assert_eq!(gw.try_login("alice", ALICE_PW, None).await.0, 403);
}

#[tokio::test]
async fn lockout_after_consecutive_failures_unlock_and_same_answer_for_unknown_users() {
    let up = Upstream::start().await;
    let gw = Gateway::locking_after_three(&up.url(), ALICE_PW).await;
    let attempt = |user: &'static str, pw: &'static str| {
        let url = gw.url("/_portcullis/api/login");
        async move {
            let resp = client()
                .post(url)
                .json(&serde_json::json!({"username": user, "password": pw}))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap();
            (status, body["error"].as_str().unwrap_or("").to_string())
        }
    };
    for user in ["alice", "ghost"] {
        for _ in 0..3 {
            // Wait out any growing delay, then fail once more.
            let last = std::cell::RefCell::new((0, String::new()));
            let failed = poll_until(Duration::from_secs(10), || async {
                let got = attempt(user, "wrong-password-x").await;
                let done = got.0 == 401 || got.1 == "locked";
                *last.borrow_mut() = got;
                done
            })
            .await;
            assert!(failed, "{user}: {:?}", last.borrow());
        }
    }
    // Both are now locked, and the message does not reveal whether the password was right.
    let locked_known = poll_until(Duration::from_secs(5), || async {
        attempt("alice", ALICE_PW).await == (403, "locked".to_string())
    })
    .await;
    assert!(locked_known, "alice was not locked");
    assert_eq!(
        attempt("alice", "wrong-password-x").await,
        (403, "locked".into())
    );
    assert_eq!(
        attempt("ghost", "wrong-password-x").await,
        (403, "locked".into())
    );
    let out = gw.cli_ok(&["user", "unlock", "alice"]);
    assert!(out.contains("unlocked"));
    assert_eq!(attempt("alice", ALICE_PW).await.0, 200);
    gw.metrics_with(&["portcullis_lockouts_total 1"]).await;
    let audit = gw.cli_ok(&["audit", "--user", "alice", "--json"]);
    assert!(
        audit.contains("\"lockout\"") && audit.contains("\"unlock\""),
        "{audit}"
    );
}

#[tokio::test]
async fn growing_delays_answer_429_with_retry_after() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let mut saw_throttle = None;
    for _ in 0..6 {
        let resp = client()
            .post(gw.url("/_portcullis/api/login"))
            .json(&serde_json::json!({"username": "alice", "password": "wrong-password-y"}))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            saw_throttle = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            break;
        }
    }
    let retry = saw_throttle.expect("no 429 after repeated failures");
    assert!(retry.parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn unknown_user_and_wrong_password_take_the_same_time() {
    let up = Upstream::start().await;
    let mut builder = Gateway::builder(&up.url()).auth_keys("ip_max_failures = 100000");
    const TRIALS: usize = 25;
    const ROUNDS: usize = 4;
    // Each account takes two wrong passwords in all, below the free failures before delays.
    const USERS: usize = TRIALS * ROUNDS / 2;
    for i in 0..USERS {
        builder = builder.user(&format!("user{i}"), "the-right-password-1");
    }
    let gw = builder.start().await;
    let time = |user: String| {
        let url = gw.url("/_portcullis/api/login");
        async move {
            let started = std::time::Instant::now();
            let resp = client()
                .post(url)
                .json(&serde_json::json!({"username": user, "password": "a-wrong-password-2"}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401);
            started.elapsed()
        }
    };
    // The leak this guards against is systematic (e.g. skipping the hash for unknown names,
    // which halves the time); machine noise is not, so a round may be repeated, but every
    // round must show the same answer time for both.
    let mut diffs = Vec::new();
    for round in 0..ROUNDS {
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        // Interleaved, alternating which goes first, one try per account so no delay or lock
        // comes into play.
        for i in 0..TRIALS {
            let n = round * TRIALS + i;
            let u = n % USERS;
            if i % 2 == 0 {
                known.push(time(format!("user{u}")).await);
                unknown.push(time(format!("nobody{n}")).await);
            } else {
                unknown.push(time(format!("nobody{n}")).await);
                known.push(time(format!("user{u}")).await);
            }
        }
        known.sort();
        unknown.sort();
        let (k, u) = (known[TRIALS / 2], unknown[TRIALS / 2]);
        let diff =
            k.as_secs_f64().max(u.as_secs_f64()) / k.as_secs_f64().min(u.as_secs_f64()) - 1.0;
        eprintln!(
            "round {round}: median wrong password {k:?}, unknown user {u:?}, difference {:.1}%",
            diff * 100.0
        );
        diffs.push(diff);
        if diff <= 0.10 {
            return;
        }
    }
    panic!("median timings differed by more than 10% in every round: {diffs:?}");
}

#[tokio::test]
async fn breach_response_signs_out_everyone_requires_reset_and_retires_the_key() {
    let (_up, gw) = setup().await;
    let a = gw.login("alice", ALICE_PW).await;
    let b = gw.login("bob", BOB_PW).await;
    let (old_kid, old_secret) = gw.signing_key();
    let out = gw.cli_ok(&["breach-response"]);
    assert!(
        out.contains("signed out") && out.contains(&old_kid),
        "{out}"
    );
    assert!(gw.refused_within(&a.token, Duration::from_secs(1)).await);
    assert!(gw.refused_within(&b.token, Duration::from_secs(1)).await);
    let (new_kid, _) = gw.signing_key();
    assert_ne!(new_kid, old_kid);
    // Even a freshly minted token under the copied old key no longer works.
    let claims = portcullis::auth::token::SessionClaims {
        iss: "portcullis".into(),
        aud: gw.base.clone(),
        sub: "1".into(),
        name: "alice".into(),
        sid: format!("{:032x}", 99u128),
        iat: now_s() + 5,
        nbf: now_s(),
        exp: now_s() + 3600,
        ims: (now_s() + 5) * 1000,
        amr: vec!["pwd".into()],
    };
    let forged = portcullis::auth::token::Keyring::new(
        vec![(old_kid.clone(), old_secret)],
        "portcullis",
        &gw.base,
    )
    .unwrap()
    .issue(&claims)
    .unwrap();
    assert_eq!(gw.get_status("/probe", &forged).await, 401);
    // Everyone must choose a new password.
    let (status, _) = gw.try_login("bob", BOB_PW, None).await;
    assert_eq!(status, 403);
    let audit = gw.cli_ok(&["audit", "--since", "1h"]);
    assert!(audit.contains("breach_response"), "{audit}");
}

#[tokio::test]
async fn key_rotation_keeps_sessions_and_signs_new_ones_with_the_new_key() {
    let (_up, gw) = setup().await;
    let before = gw.login("alice", ALICE_PW).await;
    let (old_kid, _) = gw.signing_key();
    let out = gw.cli_ok(&["keys", "rotate"]);
    assert!(out.contains("nobody is signed out"), "{out}");
    let (new_kid, _) = gw.signing_key();
    assert_ne!(new_kid, old_kid);
    assert_eq!(gw.get_status("/probe", &before.token).await, 200);
    // Within a poll interval the gateway signs with the new key.
    let kid = std::cell::RefCell::new(String::new());
    let rotated = poll_until(Duration::from_secs(2), || async {
        let t = gw.login("alice", ALICE_PW).await.token;
        let k = jsonwebtoken::decode_header(&t).unwrap().kid.unwrap();
        let same = k == new_kid;
        *kid.borrow_mut() = k;
        same
    })
    .await;
    assert!(rotated, "still signing with {}", kid.borrow());
    assert_eq!(gw.get_status("/probe", &before.token).await, 200);
}

#[tokio::test]
async fn audit_log_records_security_events_without_secrets() {
    let (_up, gw) = setup().await;
    let mut a = Browser::login(&gw, "alice", ALICE_PW).await;
    let _ = client()
        .post(gw.url("/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "alice", "password": "wrong-secret-pw-1"}))
        .send()
        .await
        .unwrap();
    let new_pw = "audited new passphrase";
    assert_eq!(change_password(&mut a, ALICE_PW, new_pw, true).await, 303);
    gw.cli_ok(&["signout", "--user", "bob"]);
    let out = std::cell::RefCell::new(String::new());
    let complete = poll_until(Duration::from_secs(5), || async {
        let j = gw.cli_ok(&["audit", "--json"]);
        let done = j.contains("wrong password");
        *out.borrow_mut() = j;
        done
    })
    .await;
    let json = out.into_inner();
    assert!(complete, "{json}");
    let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
    let events: Vec<(String, String)> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().into(),
                e["outcome"].as_str().unwrap().into(),
            )
        })
        .collect();
    for want in [
        ("login", "success"),
        ("login", "failure"),
        ("password_change", "success"),
        ("signout_all_devices", "success"),
    ] {
        assert!(
            events.iter().any(|(e, o)| (e.as_str(), o.as_str()) == want),
            "{want:?} missing from {events:?}"
        );
    }
    let login = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "login" && e["outcome"] == "success")
        .unwrap();
    assert_eq!(login["ip"], "127.0.0.1");
    assert_eq!(login["session_id"].as_str().unwrap().len(), 32);
    for secret in [ALICE_PW, new_pw, "wrong-secret-pw-1"] {
        assert!(!json.contains(secret));
        assert!(!gw.log().contains(secret));
    }
    let alice_only = gw.cli_ok(&["audit", "--user", "alice"]);
    assert!(alice_only.contains("password_change") && !alice_only.contains("bob"));
}

#[tokio::test]
async fn last_seen_is_written_in_the_background() {
    let (_up, gw) = setup().await;
    let s = gw.login("alice", ALICE_PW).await;
    let listed = |gw: &Gateway| {
        let v: serde_json::Value =
            serde_json::from_str(&gw.cli_ok(&["session", "list", "--json"])).unwrap();
        let row = v
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == s.session_id.as_str())
            .cloned()
            .unwrap();
        (
            row["created"].as_str().unwrap().to_string(),
            row["last_seen"].as_str().unwrap().to_string(),
        )
    };
    let (created, seen) = listed(&gw);
    assert_eq!(created, seen);
    // Make sure at least a second separates the use from the login, for the timestamp text.
    let later = poll_until(Duration::from_secs(3), || async {
        let (c, _) = listed(&gw);
        let now = time_text_now();
        now != c
    })
    .await;
    assert!(later);
    assert_eq!(gw.get_status("/probe", &s.token).await, 200);
    let updated = poll_until(Duration::from_secs(10), || async {
        listed(&gw).1 != created
    })
    .await;
    assert!(updated, "last seen was never written");
}

fn time_text_now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test]
async fn admin_pages_are_for_admins_and_act() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .admin("root", "root-password-12345")
        .user("alice", ALICE_PW)
        .start()
        .await;
    let alice = Browser::login(&gw, "alice", ALICE_PW).await;
    assert_eq!(alice.get("/_portcullis/admin").await.status(), 403);
    let root = Browser::login(&gw, "root", "root-password-12345").await;
    let html = root.get("/_portcullis/admin").await.text().await.unwrap();
    assert!(html.contains("alice") && html.contains("Breach response"));
    let csrf = input_value(&html, "csrf").unwrap();
    // A non-admin cannot act even with a valid form.
    let resp = alice
        .post(
            "/_portcullis/admin/users/action",
            &[
                ("name", "root"),
                ("action", "disable"),
                ("csrf", &alice.csrf().await),
            ],
        )
        .await;
    assert_eq!(resp.status(), 403);
    let resp = root
        .post(
            "/_portcullis/admin/users/action",
            &[("name", "alice"), ("action", "signout"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 303);
    assert!(!alice.alive().await);
    let resp = root
        .post(
            "/_portcullis/admin/users/action",
            &[("name", "alice"), ("action", "reset_link"), ("csrf", &csrf)],
        )
        .await;
    assert!(resp.text().await.unwrap().contains("/_portcullis/reset/"));
    let resp = root
        .post(
            "/_portcullis/admin/users/action",
            &[
                ("name", "alice"),
                ("action", "passkey_link"),
                ("csrf", &csrf),
            ],
        )
        .await;
    let page = resp.text().await.unwrap();
    let path = page
        .split("/_portcullis/passkey-link/")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("a passkey link");
    let link = client()
        .get(gw.url(&format!("/_portcullis/passkey-link/{path}")))
        .send()
        .await
        .unwrap();
    assert_eq!(link.status(), 200);
    let resp = root
        .post(
            "/_portcullis/admin/users",
            &[("name", "carol"), ("password", ""), ("csrf", &csrf)],
        )
        .await;
    let page = resp.text().await.unwrap();
    let pw = page
        .split("(shown only once): ")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("generated password");
    gw.login("carol", pw).await;
    // The breach response needs the typed confirmation.
    let resp = root
        .post(
            "/_portcullis/admin/breach",
            &[("confirm", "yes"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 400);
    assert!(root.alive().await);
    let resp = root
        .post(
            "/_portcullis/admin/breach",
            &[("confirm", "SIGN OUT EVERYONE"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(
        !root.alive().await,
        "the breach response left the admin signed in"
    );
}
