//! The login form and JSON API: cookies, return paths that stay on this origin, and failures
//! that say what happened.

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    (up, gw)
}

#[tokio::test]
async fn login_page_is_a_self_contained_form() {
    let (_up, gw) = setup().await;
    let resp = client()
        .get(gw.url("/_portcullis/login?rd=/web/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"));
    let html = resp.text().await.unwrap();
    assert!(html.contains("<form method=\"post\" action=\"/_portcullis/login\""));
    assert!(html.contains("name=\"rd\" value=\"/web/\""));
    assert!(!html.contains("http://") && !html.contains("https://"));
    // One script, the gateway's own passkey script; nothing inline.
    let scripts: Vec<&str> = html.split("<script").skip(1).collect();
    assert_eq!(scripts.len(), 1, "{html}");
    assert!(
        scripts[0].starts_with(" src=\"/_portcullis/passkey.js\" defer></script>"),
        "{html}"
    );
    let js = client()
        .get(gw.url("/_portcullis/passkey.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(js.headers()["x-content-type-options"], "nosniff");
    assert!(js
        .text()
        .await
        .unwrap()
        .contains("navigator.credentials.get"));
}

#[tokio::test]
async fn form_login_sets_cookie_and_redirects_to_return_path() {
    let (up, gw) = setup().await;
    let resp = gw
        .login_form("alice", ALICE_PW, "/web/index.html?x=1")
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/web/index.html?x=1");
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    // public_url is plain http in tests: no __Host- prefix, no Secure.
    assert!(cookie.starts_with("portcullis="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Domain"));
    let pair = cookie.split(';').next().unwrap();
    let resp = client()
        .get(gw.url("/web/index.html?x=1"))
        .header("Cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(up.last().unwrap().header("cookie").is_none());
    assert!(
        gw.log().contains("public_url is plain http"),
        "no startup warning for plain http"
    );
}

#[tokio::test]
async fn open_redirect_attempts_land_on_a_same_origin_path() {
    let (_up, gw) = setup().await;
    for evil in [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
        "/%2F%2Fevil.example",
        "/%5Cevil.example",
        "http:evil.example",
        "javascript:alert(1)",
        "",
    ] {
        let resp = gw.login_form("alice", ALICE_PW, evil).await;
        assert_eq!(resp.status(), 303, "{evil}");
        let location = resp.headers()["location"].to_str().unwrap();
        assert_eq!(location, "/", "{evil} redirected to {location}");
    }
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let (up, gw) = setup().await;
    let wrong = gw.login_form("alice", "not-the-password", "/").await;
    let unknown = gw.login_form("mallory", "not-the-password", "/").await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(unknown.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let (a, b) = (wrong.text().await.unwrap(), unknown.text().await.unwrap());
    assert_eq!(a, b);
    assert!(a.contains("Wrong user name or password") || a.contains("wrong user name or password"));
    let api = client()
        .post(gw.url("/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "alice", "password": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    let body: serde_json::Value = api.json().await.unwrap();
    assert_eq!(body["error"], "invalid_credentials");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn api_login_returns_token_session_and_expiry() {
    let (_up, gw) = setup().await;
    let resp = client()
        .post(gw.url("/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "ALICE", "password": ALICE_PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let body: serde_json::Value = resp.json().await.unwrap();
    let token = body["token"].as_str().unwrap();
    assert_eq!(token.split('.').count(), 3);
    assert_eq!(body["session_id"].as_str().unwrap().len(), 32);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let exp = body["expires_at"].as_i64().unwrap();
    assert!(
        exp > now + 6 * 24 * 3600 && exp <= now + 7 * 24 * 3600 + 5,
        "{exp}"
    );
    assert_eq!(gw.get_status("/x", token).await, 200);
}

#[tokio::test]
async fn cross_site_login_post_is_refused() {
    let (_up, gw) = setup().await;
    let resp = client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", "https://evil.example")
        .form(&[("username", "alice"), ("password", ALICE_PW)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn store_unavailable_at_login_gives_503_while_sessions_keep_working() {
    let (_up, gw) = setup().await;
    let existing = gw.login("alice", ALICE_PW).await;
    // Hold SQLite's write lock from another connection, as a stuck writer would.
    let mut lock = hold_write_lock(&gw.db_path()).await;
    let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "store_unavailable");
    assert!(body["message"].as_str().unwrap().contains("unavailable"));
    assert_eq!(
        gw.get_status("/x", &existing.token).await,
        200,
        "existing session stopped working"
    );
    lock.release().await;
    let again = gw.login("alice", ALICE_PW).await;
    assert_eq!(gw.get_status("/x", &again.token).await, 200);
}

/// An exclusive SQLite transaction held open on the gateway's database file.
struct Lock(sqlx::SqliteConnection);

impl Lock {
    async fn release(&mut self) {
        use sqlx::Executor;
        self.0.execute("ROLLBACK").await.unwrap();
    }
}

async fn hold_write_lock(path: &std::path::Path) -> Lock {
    use sqlx::{Connection, Executor};
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    conn.execute("BEGIN EXCLUSIVE").await.unwrap();
    Lock(conn)
}

#[tokio::test]
async fn look_alike_and_case_variants_of_a_name_reach_the_same_account_and_no_twin() {
    let (_up, gw) = setup().await;
    for typed in ["ALICE", "ａｌｉｃｅ", "ＡＬＩＣＥ", " alice "] {
        let (status, body) = gw.try_login(typed, ALICE_PW, None).await;
        assert_eq!(status, 200, "{typed}: {body}");
        // The session is alice's: the forward-auth endpoint names her.
        let verified = client()
            .get(gw.url("/_portcullis/verify"))
            .bearer_auth(body["token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(verified.status(), 200, "{typed}");
        assert_eq!(
            verified.headers().get("remote-user").unwrap(),
            "alice",
            "{typed}"
        );
    }
    // A wrong password under a look-alike counts against alice's own account.
    let (status, _) = gw
        .try_login("ａｌｉｃｅ", "wrong password here", None)
        .await;
    assert_eq!(status, 401);
    // No twin account can be made from a look-alike or a case variant.
    for twin in ["ALICE", "ａｌｉｃｅ", "аlice"] {
        let out = gw.cli_with_stdin(
            &["user", "add", twin, "--password-stdin"],
            "another long password 123\n",
        );
        assert!(!out.status.success(), "{twin} was created");
    }
}
