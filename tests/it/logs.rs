//! Logs: one structured access-log line per request, and no secret ever in them.

use std::time::Duration;

use crate::harness::{client, poll_until, Gateway};
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

/// ATK-63: the secrets of a media request whose upstream is down, and of logins with a user
/// name that tries to forge a log line, reach no log line, metric or error page; the forged
/// line stays inside one escaped line, in both log formats; every auth event names its UTC
/// time, address, canonical user, outcome and reason.
#[tokio::test]
async fn atk63_upstream_errors_and_forged_user_names_leave_no_secret_and_no_extra_line() {
    use crate::jellyfin::{mb, token_of, PW};
    use crate::standin::StandIn;
    const PW_CANARY: &str = "P@ss-Log-Canary-123";
    const PLEX_CANARY: &str = "plexcanary7731";
    const FORGED: &str = "alice\r\n2026-01-01T00:00:00Z INFO login ok user=admin";
    for format in ["text", "json"] {
        let jf = StandIn::start().await;
        jf.add_user("alice", PW, false);
        let gw = Gateway::builder(&jf.url())
            .user("alice", PW)
            .route_keys("kind = \"jellyfin\"")
            .log(format, "debug")
            .start()
            .await;
        let token = token_of(&gw, "alice", "tv-canary").await;
        let session = gw.login("alice", PW).await;
        // A device name is a client's own text that reaches the audit log of a media login
        // (and Jellyfin's header grammar percent-decodes it): with a line break in it the
        // request is refused as malformed, before the media server or the log sees it.
        let resp = client()
            .post(gw.url("/Users/AuthenticateByName"))
            .header(
                "Authorization",
                "MediaBrowser Client=\"Jellyfin Android\", \
                 Device=\"TV%0D%0A2026-01-01T00:00:00Z INFO login ok user=admin\", \
                 DeviceId=\"tv-forged\", Version=\"2.6.1\"",
            )
            .json(&serde_json::json!({"Username": "alice", "Pw": PW}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{format}");
        assert!(!jf
            .requests()
            .iter()
            .any(|r| r.headers.iter().any(|(_, v)| v.contains("tv-forged"))));
        // The upstream error path: the media server is gone.
        drop(jf);
        let http = client();
        let mut pages = Vec::new();
        let resp = http
            .get(gw.url(&format!(
                "/Videos/abc/stream?ApiKey={token}&api_key={token}&X-Emby-Token={token}\
                 &X-Plex-Token={PLEX_CANARY}"
            )))
            .header("Authorization", mb("tv-canary", Some(&token)))
            .header("X-Emby-Token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "{format}");
        pages.push(resp.text().await.unwrap());
        let resp = http
            .get(gw.url("/Items"))
            .header("Cookie", format!("portcullis={}", session.token))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "{format}");
        pages.push(resp.text().await.unwrap());
        let resp = http
            .post(gw.url("/Users/AuthenticateByName"))
            .header("Authorization", mb("tv-2", None))
            .json(&serde_json::json!({"Username": "alice", "Pw": PW_CANARY}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "{format}");
        pages.push(resp.text().await.unwrap());
        // The password canary and the forged name at the form, the JSON API and the media
        // login route.
        for user in ["alice", FORGED] {
            let resp = http
                .post(gw.url("/_portcullis/login"))
                .header("Origin", gw.base.clone())
                .form(&[("username", user), ("password", PW_CANARY), ("rd", "/")])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 401, "{format} {user:?}");
            pages.push(resp.text().await.unwrap());
            let (status, body) = gw.try_login(user, PW_CANARY, None).await;
            assert_eq!(status, 401, "{format} {user:?}");
            pages.push(body.to_string());
        }
        let resp = http
            .post(gw.url("/Users/AuthenticateByName"))
            .header("Authorization", mb("tv-3", None))
            .json(&serde_json::json!({"Username": FORGED, "Pw": PW_CANARY}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{format}");
        pages.push(resp.text().await.unwrap());

        // Wait for the last lines: three media-login access lines, four audited failures.
        let written = poll_until(Duration::from_secs(5), || async {
            let log = gw.log();
            let access = log
                .lines()
                .filter(|l| l.contains("portcullis::access") && l.contains("AuthenticateByName"))
                .count();
            access >= 3
                && log.matches("wrong password").count() >= 2
                && log.matches("unknown user").count() >= 2
        })
        .await;
        assert!(written, "{format}: lines missing:\n{}", gw.log());
        let metrics = gw.metrics_with(&["portcullis_logins_total"]).await;
        let log = gw.log();
        for (what, text) in [("log", &log), ("metrics", &metrics)]
            .into_iter()
            .chain(pages.iter().map(|p| ("an error page", p)))
        {
            for secret in [token.as_str(), &session.token, PW_CANARY, PLEX_CANARY] {
                assert!(
                    !text.contains(secret),
                    "{format}: {secret} in {what}:\n{text}"
                );
            }
        }
        // The forged line never starts a line of its own, nor is it written unescaped.
        assert!(!log.contains("login ok user=admin"), "{format}:\n{log}");
        for line in log.lines() {
            assert!(
                !line.starts_with("2026-01-01T00:00:00Z") && !line.contains("\r"),
                "{format}: a forged log line:\n{log}"
            );
            if format == "json" && !line.trim().is_empty() {
                assert!(
                    serde_json::from_str::<serde_json::Value>(line).is_ok(),
                    "not one JSON object a line: {line}"
                );
            }
        }
        // Each auth event: UTC time, address, canonical user, outcome, reason.
        let audit = log.clone();
        let failures: Vec<&str> = audit
            .lines()
            .filter(|l| l.contains("portcullis::audit") && l.contains("failure"))
            .collect();
        assert!(failures.len() >= 4, "{format}:\n{audit}");
        for line in &failures {
            let (time, user, ip, outcome, detail) = if format == "json" {
                // The JSON format puts the fields beside the time, flattened.
                let f: serde_json::Value = serde_json::from_str(line).unwrap();
                let v = &f;
                (
                    v["timestamp"].as_str().unwrap_or("").to_string(),
                    f["user"].as_str().unwrap_or("").to_string(),
                    f["ip"].as_str().unwrap_or("").to_string(),
                    f["outcome"].as_str().unwrap_or("").to_string(),
                    f["detail"].as_str().unwrap_or("").to_string(),
                )
            } else {
                let field = |name: &str| {
                    line.split(&format!(" {name}="))
                        .nth(1)
                        .map(|rest| rest.split(' ').next().unwrap_or("").to_string())
                        .unwrap_or_default()
                };
                (
                    line.split(' ').next().unwrap_or("").to_string(),
                    field("user"),
                    field("ip"),
                    field("outcome"),
                    line.split(" detail=").nth(1).unwrap_or("").to_string(),
                )
            };
            assert!(
                time.ends_with('Z') && time.as_bytes().get(10) == Some(&b'T'),
                "{line}"
            );
            assert_eq!(ip.trim_matches('"'), "127.0.0.1", "{line}");
            assert_eq!(outcome.trim_matches('"'), "failure", "{line}");
            assert!(!detail.is_empty(), "{line}");
            if detail.contains("wrong password") {
                assert_eq!(user.trim_matches('"'), "alice", "{line}");
            }
        }
    }
}
