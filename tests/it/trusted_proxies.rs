//! The client's address behind trusted proxies (`server.trusted_proxies`): the forwarding
//! header is believed only from a trusted peer, read right to left, and the address found is
//! the one audit, throttling, the access log and the upstream see. Anyone else's forwarding
//! headers are ignored; a reload changes the list for the next request.

use serde_json::Value;

use crate::harness::{poll_until, Gateway};
use crate::upstream::Upstream;

const PW: &str = "a passphrase behind a proxy";

/// A JSON login of `user` from `from` (a loopback address of its own) with `xff`, if any: its
/// status.
async fn login_as(
    gw: &Gateway,
    user: &str,
    from: [u8; 4],
    xff: Option<&str>,
    password: &str,
) -> u16 {
    let client = crate::harness::client_from(from);
    let mut req = client
        .post(gw.url("/_portcullis/api/login"))
        .header("Origin", gw.base.clone())
        .json(&serde_json::json!({ "username": user, "password": password }));
    if let Some(x) = xff {
        req = req.header("X-Forwarded-For", x);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn login_from(gw: &Gateway, from: [u8; 4], xff: Option<&str>, password: &str) -> u16 {
    login_as(gw, "alice", from, xff, password).await
}

/// The addresses of the audit log's login entries, newest first.
fn audit_ips(gw: &Gateway) -> Vec<String> {
    let audit: Value = serde_json::from_str(&gw.cli_ok(&["audit", "--json"])).unwrap();
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "login")
        .map(|e| e["ip"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn forwarding_headers_count_only_from_trusted_proxies_for_audit_throttling_and_upstream() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .user("bob", PW)
        .server_keys("trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]")
        .auth_keys("ip_max_failures = 2\nmax_failures = 100")
        .start()
        .await;

    // From the trusted proxy, the first untrusted address from the right is the client.
    assert_eq!(
        login_from(
            &gw,
            [127, 0, 0, 1],
            Some("6.6.6.6, 203.0.113.7, 10.1.2.3"),
            PW
        )
        .await,
        200
    );
    // From anyone else, the header is theirs to invent and is ignored.
    assert_eq!(
        login_from(&gw, [127, 0, 0, 2], Some("203.0.113.99"), PW).await,
        200
    );
    assert_eq!(audit_ips(&gw)[..2], ["127.0.0.2", "203.0.113.7"]);

    // Throttling is per client behind the proxy: 203.0.113.7 runs out of tries, 203.0.113.8
    // (the same proxy connection's other client) does not.
    for _ in 0..3 {
        login_from(&gw, [127, 0, 0, 1], Some("203.0.113.7"), "wrong").await;
    }
    assert_eq!(
        login_from(&gw, [127, 0, 0, 1], Some("203.0.113.7"), "wrong").await,
        429
    );
    assert_eq!(
        login_from(&gw, [127, 0, 0, 1], Some("203.0.113.8"), "wrong").await,
        401
    );

    // The upstream sees the client found, never the client's own claim.
    // (bob: alice's wrong passwords have her account waiting a moment.)
    let token = gw.login("bob", PW).await.token;
    let client = crate::harness::client_from([127, 0, 0, 1]);
    let resp = client
        .get(gw.url("/probe"))
        .bearer_auth(&token)
        .header("X-Forwarded-For", "6.6.6.6, 198.51.100.4")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last().unwrap();
    assert_eq!(seen.header("x-forwarded-for"), Some("198.51.100.4"));
    let line = gw.log_containing("client=198.51.100.4").await;
    assert!(line.contains("path=/probe"), "{line}");

    // A reload that trusts nobody applies to the next request.
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        text.replace("trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]", ""),
    )
    .unwrap();
    gw.cli_ok(&["reload"]);
    assert_eq!(
        login_as(&gw, "bob", [127, 0, 0, 1], Some("203.0.113.50"), PW).await,
        200
    );
    assert!(
        poll_until(std::time::Duration::from_secs(2), || async {
            audit_ips(&gw).first().map(String::as_str) == Some("127.0.0.1")
        })
        .await,
        "{:?}",
        audit_ips(&gw)
    );
}
