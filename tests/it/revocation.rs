//! Revocation reaches the running gateway: from the CLI (another process writing the same
//! SQLite file, which the gateway watches) at once, from the gateway's own logout at once, and across a
//! restart.

use std::time::Duration;

use crate::harness::{client, input_value, Gateway};
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

#[tokio::test]
async fn signout_user_ends_all_of_that_users_sessions_within_one_second_and_no_others() {
    let (_up, gw) = setup().await;
    let a1 = gw.login("alice", ALICE_PW).await;
    let a2 = gw.login("alice", ALICE_PW).await;
    let b = gw.login("bob", BOB_PW).await;
    for t in [&a1.token, &a2.token, &b.token] {
        assert_eq!(gw.get_status("/probe", t).await, 200);
    }
    let out = gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(out.contains("alice"), "{out}");
    assert!(
        gw.refused_within(&a1.token, Duration::from_secs(1)).await,
        "a1 still accepted after 1 s"
    );
    assert!(
        gw.refused_within(&a2.token, Duration::from_secs(1)).await,
        "a2 still accepted after 1 s"
    );
    assert_eq!(
        gw.get_status("/probe", &b.token).await,
        200,
        "bob was signed out too"
    );
    // Alice can sign in again afterwards.
    let a3 = gw.login("alice", ALICE_PW).await;
    assert_eq!(gw.get_status("/probe", &a3.token).await, 200);
}

/// The CLI's revocation is announced by the SQLite file itself (the gateway watches it), not
/// found at the next poll: with a poll a minute apart the session still ends within 300 ms.
#[tokio::test]
async fn a_cli_signout_reaches_the_gateway_without_waiting_for_a_poll() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .store_keys("poll_interval = \"60s\"\nmax_staleness = \"5m\"")
        .start()
        .await;
    let a = gw.login("alice", ALICE_PW).await;
    assert_eq!(gw.get_status("/probe", &a.token).await, 200);
    let started = std::time::Instant::now();
    gw.cli_ok(&["signout", "--user", "alice"]);
    let cli = started.elapsed();
    assert!(
        gw.refused_within(&a.token, Duration::from_millis(300))
            .await,
        "still accepted 300 ms after the CLI's signout (which took {cli:?})"
    );
    eprintln!("refused {:?} after the CLI started", started.elapsed());
}

#[tokio::test]
async fn signout_everyone_ends_all_sessions() {
    let (_up, gw) = setup().await;
    let a = gw.login("alice", ALICE_PW).await;
    let b = gw.login("bob", BOB_PW).await;
    gw.cli_ok(&["signout", "--everyone"]);
    assert!(gw.refused_within(&a.token, Duration::from_secs(1)).await);
    assert!(gw.refused_within(&b.token, Duration::from_secs(1)).await);
    let fresh = gw.login("bob", BOB_PW).await;
    assert_eq!(gw.get_status("/probe", &fresh.token).await, 200);
}

#[tokio::test]
async fn logout_ends_only_that_session_at_once() {
    let (_up, gw) = setup().await;
    let a1 = gw.login("alice", ALICE_PW).await;
    let a2 = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .bearer_auth(&a1.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    // Applied in-process: refused on the very next request, no poll needed.
    assert_eq!(gw.get_status("/probe", &a1.token).await, 401);
    assert_eq!(gw.get_status("/probe", &a2.token).await, 200);
}

/// A cookie sign-out from the home page's form: the session's own CSRF token is needed.
async fn cookie_logout(gw: &Gateway, origin: &str, cookie: &str) -> reqwest::Response {
    let html = gw.page_with_cookie("/_portcullis/", cookie).await;
    let csrf = input_value(&html, "csrf").unwrap_or_else(|| panic!("no csrf:\n{html}"));
    client()
        .post(gw.url("/_portcullis/logout"))
        .header("Cookie", cookie)
        .header("Origin", origin)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap()
}

/// The attributes of a `Set-Cookie` value, after its `name=value` pair.
fn attributes(set_cookie: &str) -> Vec<String> {
    set_cookie
        .split(';')
        .skip(1)
        .map(|a| a.trim().to_string())
        .collect()
}

#[tokio::test]
async fn cookie_logout_clears_cookie_and_ends_session() {
    let (up, gw) = setup().await;
    let a = gw.login("alice", ALICE_PW).await;
    let cookie = format!("portcullis={}", a.token);
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let resp = cookie_logout(&gw, &gw.base, &cookie).await;
    assert_eq!(resp.status(), 303);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(set_cookie.starts_with("portcullis=;"), "{set_cookie}");
    let attrs = attributes(set_cookie);
    for want in ["Max-Age=0", "Path=/", "HttpOnly"] {
        assert!(attrs.iter().any(|a| a == want), "{set_cookie} lacks {want}");
    }
    // The old value is dead in either carrier, and never reaches the upstream.
    let before = up.count();
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 401);
    assert_eq!(gw.get_status("/probe", &a.token).await, 401);
    assert_eq!(up.count(), before);
}

#[tokio::test]
async fn https_cookie_logout_clears_the_host_prefixed_secure_cookie() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .server_keys(r#"public_url = "https://media.example""#)
        .start()
        .await;
    let a = gw.login("alice", ALICE_PW).await;
    let cookie = format!("__Host-portcullis={}", a.token);
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 200);
    let resp = cookie_logout(&gw, "https://media.example", &cookie).await;
    assert_eq!(resp.status(), 303);
    let set_cookie = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set_cookie.starts_with("__Host-portcullis=;"),
        "{set_cookie}"
    );
    let attrs = attributes(set_cookie);
    for want in ["Max-Age=0", "Path=/", "HttpOnly", "Secure"] {
        assert!(attrs.iter().any(|a| a == want), "{set_cookie} lacks {want}");
    }
    assert!(
        !attrs.iter().any(|a| a.starts_with("Domain")),
        "{set_cookie}"
    );
    assert_eq!(gw.status_with_cookie("/probe", &cookie).await, 401);
    assert_eq!(gw.get_status("/probe", &a.token).await, 401);
}

#[tokio::test]
async fn logout_is_post_only() {
    let (_up, gw) = setup().await;
    let a = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .get(gw.url("/_portcullis/logout"))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(gw.get_status("/probe", &a.token).await, 200);
}

#[tokio::test]
async fn session_revoke_ends_only_that_session() {
    let (_up, gw) = setup().await;
    let a1 = gw.login("alice", ALICE_PW).await;
    let a2 = gw.login("alice", ALICE_PW).await;
    let listed = gw.cli_ok(&["session", "list", "--user", "alice", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&a1.session_id.as_str()) && ids.contains(&a2.session_id.as_str()));
    gw.cli_ok(&["session", "revoke", &a1.session_id]);
    assert!(gw.refused_within(&a1.token, Duration::from_secs(1)).await);
    assert_eq!(gw.get_status("/probe", &a2.token).await, 200);
    let listed = gw.cli_ok(&["session", "list", "--json"]);
    assert!(!listed.contains(&a1.session_id) && listed.contains(&a2.session_id));
}

#[tokio::test]
async fn revocations_survive_a_restart() {
    let (_up, mut gw) = setup().await;
    let a1 = gw.login("alice", ALICE_PW).await;
    let a2 = gw.login("alice", ALICE_PW).await;
    let b = gw.login("bob", BOB_PW).await;
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .bearer_auth(&a1.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    gw.cli_ok(&["signout", "--user", "bob"]);
    assert!(gw.refused_within(&b.token, Duration::from_secs(1)).await);
    gw.restart().await; // SIGKILL, then a fresh process on the same database
    assert_eq!(gw.get_status("/probe", &a1.token).await, 401);
    assert_eq!(gw.get_status("/probe", &b.token).await, 401);
    assert_eq!(gw.get_status("/probe", &a2.token).await, 200);
}

#[tokio::test]
async fn disabled_user_is_refused_and_stays_signed_out_when_enabled() {
    let (_up, gw) = setup().await;
    let a = gw.login("alice", ALICE_PW).await;
    gw.cli_ok(&["user", "disable", "alice"]);
    assert!(gw.refused_within(&a.token, Duration::from_secs(1)).await);
    let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "disabled");
    gw.cli_ok(&["user", "enable", "alice"]);
    let fresh = gw.login("alice", ALICE_PW).await;
    let accepted = crate::harness::poll_until(Duration::from_secs(1), || async {
        gw.get_status("/probe", &fresh.token).await == 200
    })
    .await;
    assert!(
        accepted,
        "a session made after enabling was not accepted within 1 s"
    );
    assert_eq!(
        gw.get_status("/probe", &a.token).await,
        401,
        "enabling revived an old session"
    );
}
