//! Logs: one structured access-log line per request, and no secret ever in them.

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234-secret";

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .log("json", "debug")
        .start()
        .await;
    let http = client();
    let login = gw.login("alice", ALICE_PW).await;
    // A failed login with a password that must not be logged either.
    let wrong_pw = "wrong-password-zebra-42";
    let _ = http
        .post(gw.url("/_portcullis/login"))
        .form(&[("username", "alice"), ("password", wrong_pw)])
        .send()
        .await
        .unwrap();
    let query_secrets = [
        "apikeysecret111",
        "plextokensecret222",
        "apikeysecret333",
        "tokensecret444",
    ];
    let path = format!(
        "/Items?ApiKey={}&X-Plex-Token={}&api_key={}&token={}&x=visible",
        query_secrets[0], query_secrets[1], query_secrets[2], query_secrets[3]
    );
    let resp = http
        .get(gw.url(&path))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = http
        .get(gw.url("/Items"))
        .header("Cookie", format!("portcullis={}", login.token))
        .send()
        .await
        .unwrap();
    let _ = http
        .get(gw.url("/Items"))
        .bearer_auth("forged.token.value")
        .send()
        .await
        .unwrap();

    let log = gw.log_containing("malformed_token").await;
    // The requests were logged …
    let access: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "portcullis::access")
        .collect();
    assert!(access.len() >= 5, "expected access lines:\n{log}");
    let items = access
        .iter()
        .find(|v| v["path"].as_str().is_some_and(|p| p.contains("x=visible")))
        .unwrap();
    for field in [
        "request_id",
        "route",
        "decision",
        "reason",
        "status",
        "duration_ms",
    ] {
        assert!(
            !items[field].is_null(),
            "access line lacks {field}: {items}"
        );
    }
    assert_eq!(items["decision"], "allow");
    assert_eq!(items["user"], "alice");
    // … and no secret is in any line.
    let mut secrets = vec![
        ALICE_PW.to_string(),
        wrong_pw.to_string(),
        login.token.clone(),
    ];
    secrets.extend(query_secrets.iter().map(|s| s.to_string()));
    secrets.push(login.token.split('.').nth(2).unwrap().to_string());
    let (_, key) = gw.signing_key();
    use base64::Engine;
    secrets.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key));
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "secret {s} found in the log:\n{log}"
        );
    }
    assert!(!log.contains("forged.token.value"));
}

#[tokio::test]
async fn proxy_error_lines_do_not_carry_query_secrets() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = Gateway::builder(&format!("127.0.0.1:{}", dead.port()))
        .user("alice", ALICE_PW)
        .log("text", "debug")
        .start()
        .await;
    let login = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .get(gw.url("/Videos/1/stream?api_key=streamsecret999&Static=true"))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let log = gw.log_containing("upstream_unavailable").await;
    assert!(
        log.contains("upstream_unavailable"),
        "the failure was not logged:\n{log}"
    );
    // The text access line, written by the gateway's own short path, reads as the library's
    // default format: time, level, target, then the fields, strings quoted.
    let access = log
        .lines()
        .find(|l| l.contains(" portcullis::access: ") && l.contains("/Videos/1/stream"))
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    let (time, rest) = access.split_at(27);
    assert!(
        time.len() == 27
            && time.ends_with('Z')
            && time.as_bytes()[10] == b'T'
            && time.as_bytes()[19] == b'.',
        "{access}"
    );
    let rest = rest
        .strip_prefix("  INFO portcullis::access: request_id=")
        .unwrap_or_else(|| panic!("{access}"));
    let (id, rest) = rest.split_once(' ').unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{access}"
    );
    let rest = rest
        .strip_prefix(
            "client=127.0.0.1 method=GET path=/Videos/1/stream?api_key=REDACTED&Static=true \
             route=\"media\" decision=\"error\" reason=\"upstream_unavailable\" user=\"alice\" \
             status=502 duration_ms=",
        )
        .unwrap_or_else(|| panic!("{access}"));
    assert!(rest.parse::<f64>().is_ok_and(|ms| ms >= 0.0), "{access}");
    assert!(
        !log.contains("streamsecret999"),
        "query secret in the log:\n{log}"
    );
    assert!(!log.contains(&login.token));
}

#[tokio::test]
async fn request_ids_are_taken_from_clients_or_made_and_reach_upstream_and_log() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .log("json", "info")
        .start()
        .await;
    let login = gw.login("alice", ALICE_PW).await;
    let resp = client()
        .get(gw.url("/given"))
        .bearer_auth(&login.token)
        .header("X-Request-Id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.last().unwrap().header("x-request-id"),
        Some("trace-abc-123")
    );
    // A malformed id is replaced, never passed on.
    let resp = client()
        .get(gw.url("/made"))
        .bearer_auth(&login.token)
        .header("X-Request-Id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let made = up
        .last()
        .unwrap()
        .header("x-request-id")
        .unwrap()
        .to_string();
    assert_eq!(made.len(), 16);
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()));
    let log = gw.log_containing(&made).await;
    assert!(log.contains("\"request_id\":\"trace-abc-123\""), "{log}");
}
