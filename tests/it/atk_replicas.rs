//! Checklist §3 ATK-11, ATK-50, ATK-12 with the second replica and the outage: two gateways
//! on one PostgreSQL (a schema of the shared server, or a private cluster that is stopped).

use std::time::{Duration, Instant};

use portcullis::auth::totp;

use crate::harness::{client, input_value, poll_until, set_cookie, Gateway};
use crate::pg::{self, Cluster, Schema};
use crate::standin::StandIn;
use crate::upstream::Upstream;

const PW: &str = "correct horse battery staple";
const ROOT_PW: &str = "root-password-1234";
const ORIGIN: &str = "http://media.test";
const PUBLIC_URL: &str = "public_url = \"http://media.test\"";

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A form post with the deployment's origin and `cookie`.
async fn post_form(
    gw: &Gateway,
    path: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .header("Cookie", cookie)
        .header("Origin", ORIGIN)
        .form(form)
        .send()
        .await
        .unwrap()
}

async fn form_login(gw: &Gateway, user: &str, pw: &str) -> reqwest::Response {
    client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", ORIGIN)
        .form(&[("username", user), ("password", pw), ("rd", "/")])
        .send()
        .await
        .unwrap()
}

/// The account page's status with a Bearer session: 200 signed in, 303 to the login page.
async fn bearer_status(gw: &Gateway, token: &str) -> u16 {
    crate::atk_revocation::bearer_status(gw, token).await
}

async fn media_status(gw: &Gateway, token: &str) -> u16 {
    client()
        .get(gw.url("/Users/Me"))
        .header("X-Emby-Token", token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn media_token(gw: &Gateway, user: &str, device: &str) -> String {
    let resp = client()
        .post(gw.url("/Users/AuthenticateByName"))
        .header("Authorization", crate::jellyfin::mb(device, None))
        .json(&serde_json::json!({"Username": user, "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "media login of {user}");
    let v: serde_json::Value = resp.json().await.unwrap();
    v["AccessToken"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn atk11_a_breach_response_on_one_replica_ends_everything_on_the_other_within_a_second() {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    jf.add_user("bob", PW, false);
    let schema = Schema::on(&pg::server_url());
    // A 30 s poll: only the push can make the second.
    let store = "poll_interval = \"30s\"\nmax_staleness = \"60s\"";
    let r1 = Gateway::builder(&jf.url())
        .server_keys(PUBLIC_URL)
        .store_url(&schema.url())
        .store_keys(store)
        .route_keys("kind = \"jellyfin\"")
        .admin("root", ROOT_PW)
        .user("alice", PW)
        .user("bob", PW)
        .start()
        .await;
    let r2 = Gateway::builder(&jf.url())
        .server_keys(PUBLIC_URL)
        .store_url(&schema.url())
        .store_keys(store)
        .route_keys("kind = \"jellyfin\"")
        .keys_of(&r1)
        .start()
        .await;
    let s_a = r1.login("alice", PW).await;
    let s_b = r1.login("bob", PW).await;
    let jf_a = media_token(&r1, "alice", "tv-a").await;
    let jf_b = media_token(&r2, "bob", "tv-b").await;
    // Replica 2 has seen every credential, ten times each.
    for _ in 0..10 {
        for t in [&s_a.token, &s_b.token] {
            assert_eq!(bearer_status(&r2, t).await, 200);
        }
        for t in [&jf_a, &jf_b] {
            assert_eq!(media_status(&r2, t).await, 200);
        }
    }

    // The admin's breach response, from replica 1's admin page.
    let root = set_cookie(&form_login(&r1, "root", ROOT_PW).await, "portcullis").unwrap();
    let html = r1.page_with_cookie("/_portcullis/admin", &root).await;
    let csrf = input_value(&html, "csrf").unwrap();
    let started = Instant::now();
    let resp = post_form(
        &r1,
        "/_portcullis/admin/breach",
        &root,
        &[("confirm", "SIGN OUT EVERYONE"), ("csrf", &csrf)],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            bearer_status(&r2, &s_a.token).await == 303
                && bearer_status(&r2, &s_b.token).await == 303
                && media_status(&r2, &jf_a).await == 401
                && media_status(&r2, &jf_b).await == 401
        })
        .await,
        "replica 2 still accepts a credential {:?} after the breach response",
        started.elapsed()
    );
    assert_eq!(bearer_status(&r2, &root_token(&root)).await, 303);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            let out = jf.logged_out_tokens();
            out.contains(&jf_a) && out.contains(&jf_b)
        })
        .await,
        "not logged out upstream: {:?}",
        jf.logged_out_tokens()
    );

    // A login after the cutoff works on either replica: the breach response makes everyone
    // choose a new password first, and the session is signed with the new key.
    let resp = form_login(&r2, "alice", PW).await;
    assert_eq!(resp.status(), 303);
    let pending = set_cookie(&resp, "portcullis-pending").expect("the new-password step");
    let page = "/_portcullis/login/password?rd=%2F";
    let html = r2.page_with_cookie(page, &pending).await;
    let csrf = input_value(&html, "csrf").unwrap();
    let new_pw = "alice after the breach 2026";
    let resp = post_form(
        &r2,
        "/_portcullis/login/password",
        &pending,
        &[
            ("new_password", new_pw),
            ("confirm", new_pw),
            ("csrf", &csrf),
            ("rd", "/"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 303);
    let fresh = set_cookie(&resp, "portcullis").expect("a session after the new password");
    let token = root_token(&fresh);
    for r in [&r1, &r2] {
        assert!(
            poll_until(Duration::from_secs(2), || async {
                bearer_status(r, &token).await == 200
            })
            .await,
            "the post-breach session is refused on a replica"
        );
    }
}

/// The token of a cookie pair `name=token`.
fn root_token(pair: &str) -> String {
    pair.split_once('=').unwrap().1.to_string()
}

/// A form login that stops at the code step: the pending cookie and the code page's token.
async fn pending(gw: &Gateway) -> (String, String) {
    let resp = form_login(gw, "alice", PW).await;
    assert_eq!(resp.status(), 303);
    let pending = set_cookie(&resp, "portcullis-pending").expect("the code step");
    let html = gw
        .page_with_cookie("/_portcullis/login/2fa?rd=%2F", &pending)
        .await;
    (pending, input_value(&html, "csrf").unwrap())
}

/// Posts a code: whether it gave a session.
async fn code_gives_session(gw: &Gateway, pending: &str, csrf: &str, code: &str) -> bool {
    let resp = post_form(
        gw,
        "/_portcullis/login/2fa",
        pending,
        &[("code", code), ("csrf", csrf), ("rd", "/")],
    )
    .await;
    let session = set_cookie(&resp, "portcullis").is_some();
    assert_eq!(resp.status(), if session { 303 } else { 401 });
    session
}

#[tokio::test]
async fn atk50_a_totp_code_is_accepted_once_across_replicas_even_in_a_race() {
    let up = Upstream::start().await;
    let schema = Schema::on(&pg::server_url());
    let r1 = Gateway::builder(&up.url())
        .server_keys(PUBLIC_URL)
        .store_url(&schema.url())
        .user("alice", PW)
        .start()
        .await;
    let r2 = Gateway::builder(&up.url())
        .server_keys(PUBLIC_URL)
        .store_url(&schema.url())
        .keys_of(&r1)
        .start()
        .await;
    // Enrolment through replica 1's account page.
    let cookie = set_cookie(&form_login(&r1, "alice", PW).await, "portcullis").unwrap();
    let html = r1
        .page_with_cookie("/_portcullis/account/2fa", &cookie)
        .await;
    let key_start = html.find("id=\"totp-secret\">").unwrap() + "id=\"totp-secret\">".len();
    let key = &html[key_start..key_start + html[key_start..].find('<').unwrap()];
    let seed = data_encoding::BASE32_NOPAD.decode(key.as_bytes()).unwrap();
    let step = totp::step_of(now_s());
    let enrolled = post_form(
        &r1,
        "/_portcullis/account/2fa",
        &cookie,
        &[
            ("enroll", &input_value(&html, "enroll").unwrap()),
            ("code", &totp::code_at(&seed, step)),
            ("csrf", &input_value(&html, "csrf").unwrap()),
        ],
    )
    .await;
    assert_eq!(enrolled.status(), 200);

    // The race: one code, submitted on both replicas at once, opens exactly one session.
    let code = totp::code_at(&seed, step + 1);
    let (p1, c1) = pending(&r1).await;
    let (p2, c2) = pending(&r2).await;
    let (a, b) = tokio::join!(
        code_gives_session(&r1, &p1, &c1, &code),
        code_gives_session(&r2, &p2, &c2, &code)
    );
    assert!(
        a ^ b,
        "sessions from one code: replica 1 {a}, replica 2 {b}"
    );
    // And a later replay on either replica is refused.
    for r in [&r1, &r2] {
        let (p, c) = pending(r).await;
        assert!(
            !code_gives_session(r, &p, &c, &code).await,
            "a replayed code worked"
        );
    }
}

#[tokio::test]
async fn atk12_during_an_outage_unseen_sessions_follow_on_stale_and_the_sign_out_form_says_nothing_changed(
) {
    let up = Upstream::start().await;
    let cluster = Cluster::start();
    let serve = Gateway::builder(&up.url())
        .server_keys(PUBLIC_URL)
        .store_url(&cluster.url())
        .store_keys("max_staleness = \"2s\"\nbusy_timeout = \"1s\"")
        .user("alice", PW)
        .user("bob", PW)
        .start()
        .await;
    let deny = Gateway::builder(&up.url())
        .server_keys(PUBLIC_URL)
        .store_url(&cluster.url())
        .store_keys("max_staleness = \"1s\"\non_stale = \"deny\"\nbusy_timeout = \"1s\"")
        .keys_of(&serve)
        .start()
        .await;
    let alice = set_cookie(&form_login(&serve, "alice", PW).await, "portcullis").unwrap();
    let html = serve.page_with_cookie("/_portcullis/account", &alice).await;
    let csrf = input_value(&html, "csrf").unwrap();
    // Bob's session was made by `serve` and never shown to `deny`, nor `serve` after login.
    let bob = serve.login("bob", PW).await;

    cluster.stop();
    // (d) The form sign-out answers 503 and says nothing was saved; alice stays signed in.
    let resp = post_form(
        &serve,
        "/_portcullis/account/signout-all",
        &alice,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("set-cookie").is_none());
    let page = resp.text().await.unwrap();
    assert!(page.contains("could not be saved"), "{page}");
    let still_in = client()
        .get(serve.url("/probe"))
        .header("Cookie", alice.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        still_in.status(),
        200,
        "alice was signed out by a failed sign-out"
    );
    // (c) Under `on_stale = "deny"` a session this instance has never seen gets 503 once the
    // view is older than max_staleness …
    assert!(
        poll_until(Duration::from_secs(10), || async {
            deny.get_status("/probe", &bob.token).await == 503
        })
        .await,
        "a never-seen session was served from a stale view under on_stale = deny"
    );
    // … and under the default `serve` it is judged from the view (DESIGN.md: media keeps
    // playing through a database outage), even past max_staleness.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            client()
                .get(format!("{}/readyz", serve.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        })
        .await
    );
    assert_eq!(serve.get_status("/probe", &bob.token).await, 200);
}
