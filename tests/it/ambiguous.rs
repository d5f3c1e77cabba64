//! Ambiguous credentials: one of the gateway's cookies (session, pending login, sign-on flow)
//! sent more than once is refused everywhere with the reason `ambiguous_credentials` — a 401
//! for programs, the login page (400) for a browser navigating — and the client is told to
//! expire every variant; nothing reaches the upstream; the refusal is counted and audited. A
//! look-alike name is not the gateway's cookie and changes nothing.

use reqwest::header::{ACCEPT, COOKIE, HOST};
use serde_json::Value;

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";
const BOB_PW: &str = "bob-password-12345";

fn expiring(resp: &reqwest::Response) -> Vec<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_session_cookie_sent_twice_is_refused_and_cleared_and_never_forwarded() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .route_keys("public_paths = [\"/pub\"]")
        .start()
        .await;
    let a = gw.login("alice", ALICE_PW).await.token;
    let b = gw.login("bob", BOB_PW).await.token;
    // Each alone passes.
    assert_eq!(gw.get_status("/probe", &a).await, 200);
    let before = up.count();

    let cases = [
        (
            "two sessions",
            vec![format!("portcullis={a}; portcullis={b}")],
        ),
        (
            "the same twice",
            vec![format!("portcullis={a}; portcullis={a}")],
        ),
        (
            "malformed then valid",
            vec![format!("portcullis=junk; portcullis={a}")],
        ),
        (
            "empty then valid",
            vec![format!("portcullis=; portcullis={a}")],
        ),
        (
            "one in each Cookie header",
            vec![format!("x=1; portcullis={b}"), format!("portcullis={a}")],
        ),
    ];
    for (what, cookies) in &cases {
        for path in ["/probe", "/pub/x", "/_portcullis/account"] {
            let mut req = client().get(gw.url(path));
            for c in cookies {
                req = req.header(COOKIE, c);
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{what} on {path}");
            let clears = expiring(&resp);
            assert!(
                clears.contains(
                    &"portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0".to_string()
                ),
                "{what} on {path}: {clears:?}"
            );
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["reason"], "ambiguous_credentials", "{what} on {path}");
        }
    }
    assert_eq!(
        up.count(),
        before,
        "an ambiguous request reached the upstream"
    );

    // A browser navigating gets the login page, saying why, and every variant expired: the
    // path's directories and the host's parent domains, where a sibling could have set one.
    let resp = client()
        .get(gw.url("/web/index.html"))
        .header(HOST, "media.home.example.org")
        .header(ACCEPT, "text/html")
        .header(COOKIE, format!("portcullis={a}; portcullis={b}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let clears = expiring(&resp);
    for want in [
        "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0",
        "portcullis=; Path=/web; HttpOnly; SameSite=Lax; Max-Age=0",
        "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Domain=media.home.example.org",
        "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Domain=home.example.org",
        "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Domain=example.org",
    ] {
        assert!(
            clears.contains(&want.to_string()),
            "{want} missing in {clears:?}"
        );
    }
    assert!(resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'none'"));
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("more than one Portcullis sign-in cookie"),
        "{page}"
    );
    assert!(page.contains("action=\"/_portcullis/login\""), "{page}");
    assert!(
        page.contains("name=\"rd\" value=\"/web/index.html\""),
        "the page returns where the browser was going"
    );

    // Forward auth answers 401 (what nginx and Caddy understand), never 200.
    let resp = client()
        .get(gw.url("/_portcullis/verify"))
        .header(COOKIE, format!("portcullis={a}; portcullis={b}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Look-alikes are not the gateway's cookie: alice's one cookie decides.
    let resp = client()
        .get(gw.url("/probe"))
        .header(
            COOKIE,
            format!("Portcullis={b}; __Secure-portcullis={b}; portcullis={a}; PORTCULLIS=x"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count(), before + 1);
    let forwarded = up.last().unwrap();
    let cookie = forwarded.header("cookie").unwrap_or_default().to_string();
    assert!(
        !cookie.contains(&a),
        "the gateway's own cookie went upstream: {cookie}"
    );

    // Counted with its reason, and audited once a minute per address (not once per request).
    gw.metrics_with(&["reason=\"ambiguous_credentials\""]).await;
    let audit = gw.cli_ok(&["audit", "--json"]);
    let all: Vec<Value> = serde_json::from_str(&audit).unwrap();
    let entries: Vec<&Value> = all
        .iter()
        .filter(|e| e["outcome"] == "ambiguous_credentials")
        .collect();
    assert_eq!(entries.len(), 1, "{audit}");
    assert_eq!(entries[0]["event"], "credentials");
    assert!(entries[0]["detail"]
        .as_str()
        .unwrap()
        .contains("portcullis"));
    assert!(
        !audit.contains(&a) && !audit.contains(&b),
        "a token reached the audit log"
    );
}

#[tokio::test]
async fn pending_and_sign_on_cookies_sent_twice_are_refused_before_any_page() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    for (name, path) in [
        ("portcullis-pending", "/_portcullis/login/2fa"),
        ("portcullis-pending", "/_portcullis/login/password"),
        (
            "portcullis-oidc",
            "/_portcullis/oidc/home/callback?state=s&code=c",
        ),
    ] {
        let resp = client()
            .post(gw.url(path))
            .header(COOKIE, format!("{name}=one; {name}=two"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("code=123456")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{name} on {path}");
        let clears = expiring(&resp);
        assert!(
            clears
                .iter()
                .any(|c| c.starts_with(&format!("{name}=; Path=/;")) && c.contains("Max-Age=0")),
            "{name}: {clears:?}"
        );
        assert!(
            !clears.iter().any(|c| !c.contains("Max-Age=0")),
            "no cookie may be set, only expired: {clears:?}"
        );
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn under_https_only_the_host_cookie_counts_and_it_has_one_variant() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .server_keys("public_url = \"https://media.example.org\"")
        .start()
        .await;
    let a = gw.login("alice", ALICE_PW).await.token;
    let resp = client()
        .get(gw.url("/probe"))
        .header(
            COOKIE,
            format!("__Host-portcullis={a}; __Host-portcullis={a}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        expiring(&resp),
        ["__Host-portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Secure"]
    );
    // The plain name is a look-alike here: sent twice, it is ignored, and alice's cookie counts.
    let resp = client()
        .get(gw.url("/probe"))
        .header(
            COOKIE,
            format!("portcullis=x; portcullis=y; __Host-portcullis={a}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count(), 1);
}
