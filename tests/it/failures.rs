//! Failure answers and the admin listener: upstream down → 502 page, `/healthz`, `/readyz`,
//! `/metrics`, and the first-start admin account.

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

#[tokio::test]
async fn upstream_down_gives_a_short_502_page() {
    // A port with nothing listening: bind, read the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gateway::builder(&format!("127.0.0.1:{}", dead.port()))
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    let resp = client()
        .get(gw.url("/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    // An API client gets a short JSON answer (browsers get the styled page: see `probe.rs`).
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("\"bad_gateway\"") && body.len() < 1024,
        "{body}"
    );
    // Without a session it is still a 401: the upstream's state is not revealed.
    let resp = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    gw.metrics_with(&[
        r#"portcullis_requests_total{decision="error",reason="upstream_unavailable",route="media"} 1"#,
    ])
    .await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served_on_the_admin_listener() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    assert_eq!(gw.get_status("/x", &token).await, 200);
    let http = client();
    let health = http
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready = http
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["store"], "ok");
    assert_eq!(body["view"], "fresh");
    gw.metrics_with(&[
        r#"portcullis_requests_total{decision="allow",reason="valid_session",route="media"} 1"#,
        r#"portcullis_logins_total{method="api",result="success"} 1"#,
        "portcullis_sync_last_success_timestamp_seconds",
    ])
    .await;
    // The admin endpoints are not on the public listener.
    let public = http.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 401);
}

#[tokio::test]
async fn first_start_creates_an_admin_whose_printed_password_logs_in() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).start().await;
    let log = gw.log();
    let password = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("password:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no password printed:\n{log}"))
        .to_string();
    assert!(log.contains("user name: admin"));
    let login = gw.login("admin", &password).await;
    assert_eq!(gw.get_status("/x", &login.token).await, 200);
    let users: serde_json::Value =
        serde_json::from_str(&gw.cli_ok(&["user", "list", "--json"])).unwrap();
    assert_eq!(users[0]["name"], "admin");
    assert_eq!(users[0]["admin"], true);
}
