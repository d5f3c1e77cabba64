//! Live reload (SIGHUP): a new config applies to new requests while a throttled download, an
//! open WebSocket and keep-alive clients carry on untouched; a broken file is refused and the
//! running config keeps serving; keys that need a restart are named; certificates are swapped.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{client, poll_until, Gateway};
use crate::upgrade::answers_grow;
use crate::upstream::{pattern_byte, Upstream};

const ALICE_PW: &str = "alice-password-1234";

/// The outcome of reload number `seq` of the gateway, as it wrote it to its data directory.
async fn reload_status(dir: &Path, seq: u64) -> Value {
    let path = dir.join("portcullis.reload");
    let mut last = Value::Null;
    let found = poll_until(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        last = serde_json::from_str(&text).unwrap_or(Value::Null);
        let seen = last["seq"].as_u64() == Some(seq);
        async move { seen }
    })
    .await;
    assert!(found, "reload {seq} never reported; last status: {last}");
    last
}

/// Sends SIGHUP to the gateway.
fn hangup(gw: &Gateway) {
    // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
    let rc = unsafe { libc::kill(gw.pid() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0, "SIGHUP not delivered");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The WebSocket still echoes.
async fn check_ws(ws: &mut Ws, n: u32) {
    let text = format!("still open after reload {n}");
    ws.send(Message::Text(text.clone())).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), text);
}

fn edit_config(gw: &Gateway, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), edit(text)).unwrap();
}

/// Reads a `size`-byte download of the upstream's pattern at most `rate` bytes a second until
/// `hurry` is set, then as fast as it comes; returns the bytes received and whether they
/// matched.
async fn slow_download(
    url: String,
    token: String,
    size: u64,
    rate: u64,
    hurry: Arc<AtomicBool>,
) -> (u64, bool) {
    let mut resp = client().get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    let (mut got, mut hasher, mut expected) = (0u64, Sha256::new(), Sha256::new());
    while let Some(chunk) = resp.chunk().await.unwrap() {
        hasher.update(&chunk);
        let pattern: Vec<u8> = (got..got + chunk.len() as u64).map(pattern_byte).collect();
        expected.update(&pattern);
        got += chunk.len() as u64;
        let due = Duration::from_secs_f64(got as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            if !hurry.load(Ordering::Relaxed) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    (got, got == size && hasher.finalize() == expected.finalize())
}

#[tokio::test]
async fn reloads_apply_new_routes_without_dropping_a_download_a_websocket_or_a_request() {
    let up = Upstream::start().await;
    let second = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;

    // A 200 MiB download read at 4 MiB/s while the reloads happen (it is in the middle of its
    // body for every one of them), then as fast as it comes.
    const SIZE: u64 = 200 * 1024 * 1024;
    let hurry = Arc::new(AtomicBool::new(false));
    let download = tokio::spawn(slow_download(
        gw.url(&format!("/movie/bytes/{SIZE}")),
        token.clone(),
        SIZE,
        4 * 1024 * 1024,
        hurry.clone(),
    ));

    // An open WebSocket, checked after every reload.
    let mut req = format!("ws://127.0.0.1:{}/socket/ws", gw.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();

    // A client at 200 requests a second for as long as the reloads last.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(crate::upgrade::load(
        gw.url("/steady"),
        token.clone(),
        stop.clone(),
        answered.clone(),
    ));
    answers_grow(&answered, 50).await;

    // 1. A new route appears.
    assert_eq!(gw.get_status("/second/x", &token).await, 200);
    assert_eq!(second.count(), 0);
    let second_route = format!(
        "\n[[route]]\nname = \"second\"\npath_prefix = \"/second\"\nupstream = \"{}\"\n",
        second.url().trim_start_matches("http://")
    );
    edit_config(&gw, |t| t + &second_route);
    hangup(&gw);
    let s = reload_status(gw.dir.path(), 1).await;
    assert_eq!(s["result"], "applied", "{s}");
    assert_eq!(s["routes_added"], serde_json::json!(["second"]));
    let r = client()
        .get(gw.url("/second/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        second.count(),
        1,
        "the new route did not reach its upstream"
    );
    // Traffic keeps flowing between reloads too.
    answers_grow(&answered, 100).await;
    check_ws(&mut ws, 1).await;

    // 2. A broken file is refused with the key named; the running config keeps serving.
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    edit_config(&gw, |t| {
        t.replace("threads = 1", "threads = 1\nhead_timeout = \"soon\"")
    });
    hangup(&gw);
    let s = reload_status(gw.dir.path(), 2).await;
    assert_eq!(s["result"], "refused", "{s}");
    let error = s["error"].as_str().unwrap();
    assert!(error.contains("server.head_timeout"), "{error}");
    let check = gw.cli(&["check-config"]);
    assert!(!check.status.success());
    assert!(
        String::from_utf8_lossy(&check.stderr).contains(error),
        "check-config and the reload disagree: {error} / {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(gw.get_status("/second/y", &token).await, 200);
    assert_eq!(second.count(), 2);
    gw.log_containing("configuration reload refused").await;
    // Traffic keeps flowing between reloads too.
    answers_grow(&answered, 100).await;
    check_ws(&mut ws, 2).await;

    // 3. A key that needs a restart is named and keeps its running value.
    std::fs::write(gw.config_path(), &good).unwrap();
    edit_config(&gw, |t| {
        t.replace(
            &format!("listen = \"127.0.0.1:{}\"", gw.port),
            "listen = \"127.0.0.1:1\"",
        )
    });
    hangup(&gw);
    let s = reload_status(gw.dir.path(), 3).await;
    assert_eq!(s["result"], "needs_restart", "{s}");
    assert_eq!(s["needs_restart"], serde_json::json!(["server.listen"]));
    assert_eq!(gw.get_status("/steady", &token).await, 200);
    // Traffic keeps flowing between reloads too.
    answers_grow(&answered, 100).await;
    check_ws(&mut ws, 3).await;

    // 4. The route is removed again: its prefix falls back to the catch-all route.
    std::fs::write(gw.config_path(), &good).unwrap();
    edit_config(&gw, |t| t.replace(&second_route, ""));
    // This time through the CLI, which finds the gateway by its pid file and reports back.
    let said = gw.cli_ok(&["reload"]);
    assert!(said.contains("routes removed: second"), "{said}");
    let s = reload_status(gw.dir.path(), 4).await;
    assert_eq!(s["result"], "applied", "{s}");
    assert_eq!(s["routes_removed"], serde_json::json!(["second"]));
    let before = up.count();
    assert_eq!(gw.get_status("/second/z", &token).await, 200);
    assert_eq!(
        second.count(),
        2,
        "a removed route still reached its upstream"
    );
    assert!(up.requests()[before..]
        .iter()
        .any(|r| r.path_and_query == "/second/z"));
    // Traffic keeps flowing between reloads too.
    answers_grow(&answered, 100).await;
    check_ws(&mut ws, 4).await;

    // 5. Log format and level change live: lines are JSON from now on.
    edit_config(&gw, |t| {
        t.replace("level = \"info\"", "format = \"json\"\nlevel = \"debug\"")
    });
    hangup(&gw);
    let s = reload_status(gw.dir.path(), 5).await;
    assert_eq!(s["result"], "applied", "{s}");
    assert_eq!(gw.get_status("/after-json", &token).await, 200);
    let log = gw.log_containing("\"path\":\"/after-json\"").await;
    let line = log.lines().find(|l| l.contains("/after-json")).unwrap();
    let parsed: Value = serde_json::from_str(line).expect("a JSON access line");
    assert_eq!(parsed["status"], 200);
    // And debug lines are written now (the process-wide maximum level followed the reload).
    assert_eq!(gw.get_status("/web/..%2fafter-debug", &token).await, 400);
    let log = gw.log_containing("\"message\":\"bad path\"").await;
    let line = log.lines().find(|l| l.contains("\"bad path\"")).unwrap();
    let parsed: Value = serde_json::from_str(line).expect("a JSON debug line");
    assert_eq!(parsed["level"], "DEBUG", "{line}");
    // Traffic keeps flowing between reloads too.
    answers_grow(&answered, 100).await;
    check_ws(&mut ws, 5).await;

    stop.store(true, Ordering::Relaxed);
    let samples = load.await.unwrap();
    let still_downloading = !download.is_finished();
    hurry.store(true, Ordering::Relaxed);
    let (got, intact) = download.await.unwrap();
    assert!(
        still_downloading,
        "the download ended before the reloads did: it proved nothing"
    );
    assert_eq!(got, SIZE);
    assert!(intact, "the download's bytes differ from the upstream's");
    ws.close(None).await.unwrap();
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.error.as_ref()).collect();
    eprintln!(
        "steady client: {} requests, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(
        samples.len() >= 400,
        "the steady client hardly ran: {}",
        samples.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the reloads: {failed:?}"
    );
    gw.metrics_with(&[
        "portcullis_config_reloads_total{result=\"applied\"} 3",
        "portcullis_config_reloads_total{result=\"refused\"} 1",
        "portcullis_config_reloads_total{result=\"needs_restart\"} 1",
        "portcullis_config_loaded_timestamp_seconds",
    ])
    .await;
    // The audit log has every reload.
    let audit = gw.cli_ok(&["audit", "--json"]);
    assert_eq!(audit.matches("config_reload").count(), 5, "{audit}");
}

/// A self-signed certificate for localhost, written to `dir/{name}.pem` and `dir/{name}.key`.
fn cert(dir: &Path, name: &str) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    (c.cert.pem(), cert, key)
}

fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_reload_swaps_the_certificate_for_new_handshakes_and_refuses_a_broken_pair() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (pem_a, cert_path, key_path) = cert(dir.path(), "live");
    let gw = Gateway::builder(&up.url())
        .server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert_path.display(),
            key_path.display()
        ))
        .start()
        .await;
    let url = format!("https://localhost:{}/_portcullis/login", gw.port);
    let old_client = trusting(&pem_a);
    assert_eq!(old_client.get(&url).send().await.unwrap().status(), 200);

    // New files in place, then a reload: new handshakes get the new certificate; the
    // connection opened before keeps working.
    let (pem_b, b_cert, b_key) = cert(dir.path(), "next");
    std::fs::copy(&b_cert, &cert_path).unwrap();
    std::fs::copy(&b_key, &key_path).unwrap();
    hangup(&gw);
    assert_eq!(reload_status(gw.dir.path(), 1).await["result"], "applied");
    assert_eq!(
        trusting(&pem_b).get(&url).send().await.unwrap().status(),
        200
    );
    assert!(
        trusting(&pem_a).get(&url).send().await.is_err(),
        "a new handshake still got the old certificate"
    );
    assert_eq!(
        old_client.get(&url).send().await.unwrap().status(),
        200,
        "the keep-alive connection from before the reload was dropped"
    );

    // A key that does not belong to the certificate is refused; the current one stays.
    let (_, _, other_key) = cert(dir.path(), "other");
    std::fs::copy(&other_key, &key_path).unwrap();
    hangup(&gw);
    let s = reload_status(gw.dir.path(), 2).await;
    assert_eq!(s["result"], "refused", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("does not belong"),
        "{s}"
    );
    assert_eq!(
        trusting(&pem_b).get(&url).send().await.unwrap().status(),
        200
    );
}
