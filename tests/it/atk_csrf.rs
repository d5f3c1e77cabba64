//! Checklist §3 ATK-43 and ATK-44: forged state-changing posts with the victim's cookie, and
//! session fixation at login. Every refusal is checked for what it did not change.

use crate::harness::{client, input_value, set_cookie, Gateway};
use crate::upstream::Upstream;

const ROOT_PW: &str = "root-password-1234";
const ALICE_PW: &str = "alice-password-1234";

/// A form login: the session cookie pair `portcullis=…`.
async fn form_login(gw: &Gateway, user: &str, pw: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut req = client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", gw.base.clone());
    if let Some(c) = cookie {
        req = req.header("Cookie", c);
    }
    req.form(&[("username", user), ("password", pw), ("rd", "/")])
        .send()
        .await
        .unwrap()
}

async fn cookie_of(gw: &Gateway, user: &str, pw: &str) -> String {
    let resp = form_login(gw, user, pw, None).await;
    assert_eq!(resp.status(), 303, "form login of {user}");
    set_cookie(&resp, "portcullis").expect("a session cookie")
}

/// The CSRF token a page shows to the holder of `cookie`.
async fn csrf_of(gw: &Gateway, cookie: &str, page: &str) -> String {
    let html = gw.page_with_cookie(page, cookie).await;
    input_value(&html, "csrf").unwrap_or_else(|| panic!("no csrf on {page}:\n{html}"))
}

/// A state-changing route, its form fields other than `csrf`, and its answer to a `text/plain`
/// body (415 where a form is required; the logout reads no required field, so 403).
type Target<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);

/// How a forged post is sent: which browser headers, and whether the body is a form.
#[derive(Clone, Copy, Debug)]
enum Forgery {
    /// Same origin (a sibling page, or an injected form), the `csrf` field left out.
    NoTokenSameOrigin,
    /// No browser headers at all, the `csrf` field left out.
    NoTokenNoHeaders,
    /// Same origin, the CSRF token of another live session of the same user.
    OtherSessionsToken,
    /// The right token, from another site.
    ForeignOrigin,
    /// The right token, from a same-site sibling origin (where `SameSite=Lax` cookies are sent).
    SameSiteSibling,
    /// The right token in a `text/plain` JSON body (a post that needs no preflight).
    TextPlainJson,
}

#[tokio::test]
async fn atk43_forged_posts_with_the_victims_cookie_change_nothing() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .admin("root", ROOT_PW)
        .user("alice", ALICE_PW)
        .start()
        .await;
    let victim = cookie_of(&gw, "root", ROOT_PW).await;
    let other = cookie_of(&gw, "root", ROOT_PW).await;
    let alice = cookie_of(&gw, "alice", ALICE_PW).await;
    let token = csrf_of(&gw, &victim, "/_portcullis/account").await;
    assert_eq!(token, csrf_of(&gw, &victim, "/_portcullis/admin").await);
    assert_eq!(token, csrf_of(&gw, &victim, "/_portcullis/").await);
    let others_token = csrf_of(&gw, &other, "/_portcullis/account").await;
    assert_ne!(token, others_token);

    let new_pw = "a forged new passphrase";
    let targets: [Target; 9] = [
        ("/_portcullis/logout", vec![], 403),
        ("/_portcullis/account/signout-all", vec![], 415),
        ("/_portcullis/account/signout-others", vec![], 415),
        (
            "/_portcullis/account/password",
            vec![
                ("current", ROOT_PW),
                ("new_password", new_pw),
                ("confirm", new_pw),
                ("signout", "1"),
            ],
            415,
        ),
        (
            "/_portcullis/admin/breach",
            vec![("confirm", "SIGN OUT EVERYONE")],
            415,
        ),
        (
            "/_portcullis/admin/users/action",
            vec![("name", "alice"), ("action", "disable")],
            415,
        ),
        (
            "/_portcullis/admin/plex/link",
            vec![("account", "1"), ("user", "alice")],
            415,
        ),
        (
            "/_portcullis/admin/plex/unlink",
            vec![("account", "1")],
            415,
        ),
        (
            "/_portcullis/admin/plex/revoke-upstream",
            vec![("account", "1")],
            415,
        ),
    ];
    for (path, fields, text_plain_status) in &targets {
        for forgery in [
            Forgery::NoTokenSameOrigin,
            Forgery::NoTokenNoHeaders,
            Forgery::OtherSessionsToken,
            Forgery::ForeignOrigin,
            Forgery::SameSiteSibling,
            Forgery::TextPlainJson,
        ] {
            let mut form = fields.clone();
            match forgery {
                Forgery::NoTokenSameOrigin | Forgery::NoTokenNoHeaders => {}
                Forgery::OtherSessionsToken => form.push(("csrf", others_token.as_str())),
                _ => form.push(("csrf", token.as_str())),
            }
            let mut req = client().post(gw.url(path)).header("Cookie", victim.clone());
            req = match forgery {
                Forgery::NoTokenSameOrigin | Forgery::OtherSessionsToken => {
                    req.header("Origin", gw.base.clone())
                }
                Forgery::NoTokenNoHeaders => req,
                Forgery::ForeignOrigin => req.header("Origin", "https://evil.example"),
                Forgery::SameSiteSibling => req
                    .header("Origin", "http://127.0.0.1:1")
                    .header("Sec-Fetch-Site", "same-site"),
                Forgery::TextPlainJson => req,
            };
            let resp = match forgery {
                Forgery::TextPlainJson => {
                    let json: serde_json::Map<String, serde_json::Value> = form
                        .iter()
                        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                        .collect();
                    req.header("Content-Type", "text/plain")
                        .body(serde_json::Value::Object(json).to_string())
                        .send()
                        .await
                        .unwrap()
                }
                _ => req.form(&form).send().await.unwrap(),
            };
            let want = match forgery {
                Forgery::TextPlainJson => *text_plain_status,
                _ => 403,
            };
            assert_eq!(resp.status(), want, "{path} {forgery:?}");
            assert!(
                set_cookie(&resp, "portcullis").is_none()
                    && resp.headers().get("set-cookie").is_none(),
                "{path} {forgery:?} set a cookie"
            );
        }
        // (e) GET is not a way in either.
        let get = client()
            .get(gw.url(path))
            .header("Cookie", victim.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), 405, "GET {path}");
    }

    // Nothing was revoked or changed: both of root's sessions and alice's still work, alice is
    // not disabled, the password is the old one, no breach response ran, nothing was proxied.
    for c in [&victim, &other, &alice] {
        assert_eq!(gw.status_with_cookie("/probe", c).await, 200);
    }
    assert!(up.requests().iter().all(|r| r.method == "GET"));
    gw.login("root", ROOT_PW).await;
    gw.login("alice", ALICE_PW).await;
    assert!(!gw.log().contains("breach response started"));

    // With its own token the victim's sign-out works: only that session ends.
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .header("Cookie", victim.clone())
        .header("Origin", gw.base.clone())
        .form(&[("csrf", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(gw.status_with_cookie("/probe", &victim).await, 401);
    assert_eq!(gw.status_with_cookie("/probe", &other).await, 200);
}

#[tokio::test]
async fn atk43_a_form_without_its_fields_is_a_400_and_changes_nothing() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let alice = cookie_of(&gw, "alice", ALICE_PW).await;
    let token = csrf_of(&gw, &alice, "/_portcullis/account").await;
    // The right token, but no current password: refused as a malformed form, not axum's 422.
    let resp = client()
        .post(gw.url("/_portcullis/account/password"))
        .header("Cookie", alice.clone())
        .header("Origin", gw.base.clone())
        .form(&[
            ("new_password", "NewPassw0rd-long"),
            ("confirm", "NewPassw0rd-long"),
            ("csrf", token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("nothing was changed"));
    gw.login("alice", ALICE_PW).await;
    assert_eq!(gw.status_with_cookie("/probe", &alice).await, 200);
}

#[tokio::test]
async fn atk44_a_login_never_keeps_the_cookie_it_was_sent() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("mallory", "mallory-password-1234")
        .start()
        .await;
    // (a) The attacker's own valid session planted in alice's browser.
    let planted = cookie_of(&gw, "mallory", "mallory-password-1234").await;
    let resp = form_login(&gw, "alice", ALICE_PW, Some(&planted)).await;
    assert_eq!(resp.status(), 303);
    let fresh = set_cookie(&resp, "portcullis").expect("a new session cookie");
    assert_ne!(fresh, planted);
    let home = gw.page_with_cookie("/_portcullis/", &fresh).await;
    assert!(home.contains("<strong>alice</strong>"), "{home}");
    // The planted value is still mallory's own session, never alice's.
    let planted_home = gw.page_with_cookie("/_portcullis/", &planted).await;
    assert!(
        planted_home.contains("<strong>mallory</strong>"),
        "{planted_home}"
    );

    // A made-up value that looks like a cookie is replaced too, and stays worthless.
    let made_up = "portcullis=attacker-chosen-value";
    let resp = form_login(&gw, "alice", ALICE_PW, Some(made_up)).await;
    let fresh2 = set_cookie(&resp, "portcullis").expect("a new session cookie");
    assert_ne!(fresh2, made_up);
    assert_eq!(gw.status_with_cookie("/probe", made_up).await, 401);
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn atk44_a_pending_login_is_replaced_used_once_and_a_password_change_rotates_the_cookie() {
    use portcullis::auth::totp;

    use crate::account::{enrol, pending_login, Browser};
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let (seed, recovery) = enrol(&Browser::login(&gw, "alice", ALICE_PW).await).await;
    // (a) A login sent with a pending cookie already set gets a new pending cookie.
    let (planted, _) = pending_login(&gw, "alice", ALICE_PW, "/").await;
    let resp = form_login(&gw, "alice", ALICE_PW, Some(&planted)).await;
    assert_eq!(resp.status(), 303);
    assert!(set_cookie(&resp, "portcullis").is_none());
    let pending = set_cookie(&resp, "portcullis-pending").expect("a new pending cookie");
    assert_ne!(pending, planted);
    let html = gw
        .page_with_cookie("/_portcullis/login/2fa?rd=%2F", &pending)
        .await;
    let csrf = input_value(&html, "csrf").unwrap();
    let post_code = |pending: String, csrf: String, code: String| {
        let gw = &gw;
        async move {
            client()
                .post(gw.url("/_portcullis/login/2fa"))
                .header("Cookie", pending)
                .header("Origin", gw.base.clone())
                .form(&[
                    ("code", code.as_str()),
                    ("csrf", csrf.as_str()),
                    ("rd", "/"),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    // The enrolment used this step's code; the next step's is the first one left.
    let step = totp::step_of(now_s());
    let resp = post_code(
        pending.clone(),
        csrf.clone(),
        totp::code_at(&seed, step + 1),
    )
    .await;
    assert_eq!(resp.status(), 303);
    let session = set_cookie(&resp, "portcullis").expect("a session after the code");
    assert_eq!(gw.status_with_cookie("/probe", &session).await, 200);
    // The used pending value is worth nothing now, even with an unused recovery code.
    let resp = post_code(pending, csrf, recovery[0].clone()).await;
    assert_eq!(resp.status(), 401);
    assert!(
        set_cookie(&resp, "portcullis").is_none(),
        "a used pending login gave a session"
    );

    // (c) A password change that signs out the other devices rotates this device's cookie: the
    // old value is dead, the new one works.
    let token = csrf_of(&gw, &session, "/_portcullis/account").await;
    let new_pw = "a brand new passphrase";
    let resp = client()
        .post(gw.url("/_portcullis/account/password"))
        .header("Cookie", session.clone())
        .header("Origin", gw.base.clone())
        .form(&[
            ("current", ALICE_PW),
            ("new_password", new_pw),
            ("confirm", new_pw),
            ("signout", "1"),
            ("csrf", token.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .ends_with("done=password-signout"));
    let rotated = set_cookie(&resp, "portcullis").expect("a rotated cookie");
    assert_ne!(rotated, session);
    assert_eq!(gw.status_with_cookie("/probe", &session).await, 401);
    assert_eq!(gw.status_with_cookie("/probe", &rotated).await, 200);
}
