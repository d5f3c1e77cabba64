//! Webhooks against a real HTTP receiver (the recording test upstream): signed JSON deliveries
//! of security events (a password change, a sign-in from a new device, a breach response)
//! whose signatures the test checks with the shared secret, retries of an endpoint that
//! answers 503, a final refusal of one that answers 400, and endpoints on this host refused
//! unless the configuration opts in.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::account::{change_password, Browser};
use crate::harness::{client, poll_until, Gateway};
use crate::upstream::{Recorded, Upstream};

const PW: &str = "alice's long passphrase";
const SECRET: &str = "a webhook secret of some length";

/// Checks `X-Portcullis-Signature` (t=UNIX,v1=HEX over "t.body") with the secret, and that its
/// time is recent (a receiver's replay window).
fn verify(r: &Recorded) -> Value {
    let sig = r.header("x-portcullis-signature").expect("a signature");
    let (t, v1) = sig
        .split_once(',')
        .map(|(t, v)| (t.trim_start_matches("t="), v.trim_start_matches("v1=")))
        .expect("t=…,v1=…");
    let t: i64 = t.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - t).abs() < 300, "signed {t}, now {now}");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    mac.verify_slice(&hex::decode(v1).unwrap())
        .expect("the signature is the secret's over the timestamp and the body");
    // Changing one byte of the body breaks it.
    let mut forged = r.body.clone();
    forged[0] ^= 1;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&forged);
    assert!(mac.verify_slice(&hex::decode(v1).unwrap()).is_err());
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn security_events_are_delivered_signed_retried_and_refused_for_good_when_told() {
    let up = Upstream::start().await;
    let receiver = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let hook = |name: &str, path: &str, events: &str| {
        format!(
            "[[webhook]]\nname = \"{name}\"\nurl = \"{}{path}\"\nsecret_file = \"{}\"\n\
             allow_private = true\n{events}\n",
            receiver.url(),
            secret.display()
        )
    };
    let toml = format!(
        "{}{}{}[mail]\nhost = \"127.0.0.1\"\nport = 9\ntls = \"none\"\n\
         from = \"portcullis@example.org\"\nretry_initial = \"200ms\"\n",
        hook("ops", "/hook", ""),
        hook("flaky", "/status/503", "events = [\"password_changed\"]"),
        hook("gone", "/status/400", "events = [\"password_changed\"]"),
    );
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .extra_toml(&toml)
        .start()
        .await;

    // A password change: each webhook that asked for it gets it.
    let mut a = Browser::login(&gw, "alice", PW).await;
    let new_pw = "alice's newer passphrase";
    assert_eq!(change_password(&mut a, PW, new_pw, false).await, 303);
    let delivered = |path: &'static str| {
        let receiver = &receiver;
        move || {
            receiver
                .requests()
                .into_iter()
                .filter(|r| r.path_and_query == path)
                .collect::<Vec<_>>()
        }
    };
    assert!(
        poll_until(Duration::from_secs(10), || async {
            !delivered("/hook")().is_empty()
        })
        .await
    );
    let first = &delivered("/hook")()[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.header("x-portcullis-event"), Some("password_changed"));
    assert_eq!(first.header("content-type"), Some("application/json"));
    let body = verify(first);
    assert_eq!(body["event"], "password_changed");
    assert_eq!(body["user"], "alice");
    assert_eq!(body["ip"], "127.0.0.1");
    assert!(body["at"].as_str().unwrap().ends_with('Z'), "{body}");

    // 503 is tried again (with growing waits); 400 is final.
    assert!(
        poll_until(Duration::from_secs(10), || async {
            delivered("/status/503")().len() >= 3
        })
        .await,
        "the failing endpoint was not retried"
    );
    let flaky = delivered("/status/503")();
    let ids: Vec<_> = flaky
        .iter()
        .map(|r| r.header("x-portcullis-delivery").unwrap().to_string())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one delivery id: {ids:?}"
    );
    assert_eq!(delivered("/status/400")().len(), 1, "a 400 is not retried");
    let out = gw.cli_ok(&["mail", "outbox", "--json"]);
    let outbox: Vec<Value> = serde_json::from_str(&out).unwrap();
    let state = |kind: &str, channel: &str, n: usize| {
        outbox
            .iter()
            .filter(|m| m["kind"] == kind && m["channel"] == channel)
            .map(|m| m["state"].as_str().unwrap().to_string())
            .nth(n)
    };
    assert!(outbox
        .iter()
        .any(|m| m["channel"] == "webhook" && m["state"] == "failed"));
    assert!(state("password_changed", "webhook", 0).is_some());

    // A sign-in from a new kind of device, and a breach response, reach `ops`.
    for ua in [
        "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
        "curl/8.5.0",
    ] {
        let resp = client()
            .post(gw.url("/_portcullis/api/login"))
            .header("User-Agent", ua)
            .json(&serde_json::json!({"username": "alice", "password": new_pw}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Each of the two new kinds of device is told, once.
    let sign_ins = || {
        delivered("/hook")()
            .into_iter()
            .filter(|r| r.header("x-portcullis-event") == Some("new_sign_in"))
            .map(|r| verify(&r)["device"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(poll_until(Duration::from_secs(10), || async { sign_ins().len() >= 2 }).await);
    assert_eq!(sign_ins(), ["Firefox on Linux", "curl"]);
    gw.cli_ok(&["breach-response"]);
    assert!(
        poll_until(Duration::from_secs(10), || async {
            delivered("/hook")()
                .iter()
                .any(|r| r.header("x-portcullis-event") == Some("breach_response"))
        })
        .await,
        "the breach response was not delivered"
    );
    // An operator's action from the CLI reaches the webhooks too.
    gw.cli_ok(&["user", "require-reset", "alice"]);
    assert!(
        poll_until(Duration::from_secs(10), || async {
            delivered("/hook")().iter().any(|r| {
                r.header("x-portcullis-event") == Some("account_changed_by_admin")
                    && verify(r)["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("new password"))
            })
        })
        .await,
        "the CLI's action was not delivered"
    );
    gw.metrics_with(&[
        "portcullis_outbox_messages_total{channel=\"webhook\",result=\"retry\"}",
        "portcullis_outbox_messages_total{channel=\"webhook\",result=\"failed\"} 1",
    ])
    .await;
}

#[tokio::test]
async fn a_webhook_to_this_host_needs_an_explicit_opt_in() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook-secret");
    std::fs::write(&secret, SECRET).unwrap();
    for url in [
        "http://127.0.0.1:9/hook",
        "https://localhost/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
    ] {
        let gw = Gateway::builder(&up.url())
            .extra_toml(&format!(
                "[[webhook]]\nurl = \"{url}\"\nsecret_file = \"{}\"\n",
                secret.display()
            ))
            .configure();
        let out = gw.cli(&["check-config"]);
        assert_eq!(out.status.code(), Some(2), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("webhook[0].url") && err.contains("allow_private"),
            "{err}"
        );
    }
    // A secret too short to be one stops the start, naming the key.
    std::fs::write(&secret, "short").unwrap();
    let gw = Gateway::builder(&up.url())
        .extra_toml(&format!(
            "[[webhook]]\nurl = \"https://hooks.example.org/x\"\nsecret_file = \"{}\"\n",
            secret.display()
        ))
        .configure();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--config", gw.config_path().to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("webhook[0].secret_file"), "{err}");
}
