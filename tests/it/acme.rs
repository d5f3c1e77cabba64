//! Automatic HTTPS against a real ACME certificate authority (Debian's `pebble`, started by
//! [`crate::pebble`], its DNS server answering every name with 127.0.0.1): a first certificate
//! over HTTP-01 (port-80 listener) and over TLS-ALPN-01 (the public listener, with ordinary TLS
//! still served on the same port), a restart served from the store without a new order, a
//! renewal two thirds into a short-lived certificate swapped in under an open download, a CA
//! that then refuses (the certificate keeps serving, the CA's reason on `/readyz`, in the log
//! and in the metrics), and two replicas on PostgreSQL where one orders and both serve.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

use crate::harness::{client, free_port, poll_until, Gateway};
use crate::pebble::{Pebble, PebbleOptions};
use crate::upstream::Upstream;

/// The name the certificates are for (pebble's DNS server says 127.0.0.1).
const NAME: &str = "gw.portcullis.test";
const PW: &str = "alice's long passphrase";
/// How long an order may take end to end here.
const WAIT: Duration = Duration::from_secs(60);

/// `[server]` keys: the https public URL on the gateway's port, and a port-80 listener.
fn server_keys(port80: Option<u16>) -> String {
    let mut keys = format!("public_url = \"https://{NAME}:{{port}}\"\n");
    if let Some(p) = port80 {
        keys.push_str(&format!("redirect_listen = \"127.0.0.1:{p}\"\n"));
    }
    keys
}

/// The leaf certificate (DER) a handshake for [`NAME`] on `port` is shown, trusting `root`
/// alone; `None` when there is no such handshake.
async fn served(port: u16, root: &str) -> Option<Vec<u8>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(root.as_bytes()) {
        roots.add(c.ok()?).ok()?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .ok()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(NAME).ok()?.to_owned(), tcp)
        .await
        .ok()?;
    tls.get_ref()
        .1
        .peer_certificates()?
        .first()
        .map(|c| c.to_vec())
}

/// Waits until the gateway serves a certificate that `root` vouches for, other than `not`.
async fn wait_for_certificate(
    gw: &Gateway,
    pebble: &Pebble,
    root: &str,
    not: Option<&[u8]>,
) -> Vec<u8> {
    let got: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let found = poll_until(WAIT, || {
        let got = Arc::clone(&got);
        async move {
            match served(gw.port, root).await {
                Some(c) if Some(c.as_slice()) != not => {
                    *got.lock().unwrap() = Some(c);
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    assert!(
        found,
        "no new certificate was served:\n{}\n--- pebble ---\n{}",
        gw.log(),
        pebble.logs()
    );
    let cert = got.lock().unwrap().take().unwrap();
    cert
}

/// An https client for [`NAME`] on the gateway's port that trusts `root` alone.
fn https(port: u16, root: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve(NAME, SocketAddr::from(([127, 0, 0, 1], port)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn readyz(gw: &Gateway) -> Value {
    client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Logs in over https; the API token.
async fn login(https: &reqwest::Client, port: u16) -> String {
    let resp = https
        .post(format!("https://{NAME}:{port}/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "alice", "password": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["token"].as_str().unwrap().to_string()
}

/// Signs in over TLS (trusting `root`) and sends `GET path` with the token.
async fn signed_in_get(port: u16, root: &str, path: &str) -> reqwest::Response {
    let https = https(port, root);
    let token = login(&https, port).await;
    https
        .get(format!("https://{NAME}:{port}{path}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
}

/// The test CA, validating HTTP-01 on `port80` (and no TLS-ALPN-01).
async fn http01_pebble(port80: u16) -> Pebble {
    let mut pebble = Pebble::new();
    pebble
        .start(&PebbleOptions {
            http_port: port80,
            tls_port: 1,
            ..PebbleOptions::default()
        })
        .await;
    pebble
}

#[tokio::test]
async fn a_certificate_is_obtained_over_http01_and_port_80_redirects_everything_else() {
    let up = Upstream::start().await;
    let port80 = free_port();
    let pebble = http01_pebble(port80).await;
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .server_keys(&server_keys(Some(port80)))
        .extra_toml(&pebble.acme_toml("challenges = [\"http-01\"]"))
        .start()
        .await;
    let root = pebble.root_pem().await;
    wait_for_certificate(&gw, &pebble, &root, None).await;

    // Served through it: a sign-in and a proxied request.
    let resp = signed_in_get(gw.port, &root, "/some/page").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "upstream ok: GET /some/page");

    // Port 80 sends everything else to https, and answers no challenge it did not publish.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = plain
        .get(format!("http://127.0.0.1:{port80}/web/index.html?x=1"))
        .header("host", NAME)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(
        resp.headers()["location"],
        format!("https://{NAME}:{}/web/index.html?x=1", gw.port).as_str()
    );
    for token in ["made-up-token", "..%2F..%2Fetc%2Fpasswd"] {
        let resp = plain
            .get(format!(
                "http://127.0.0.1:{port80}/.well-known/acme-challenge/{token}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{token}");
    }

    // Counted, on /readyz, kept under the data directory (0600), never logged.
    gw.metrics_with(&[
        "portcullis_acme_orders_total{result=\"issued\"} 1",
        "portcullis_acme_orders_total{result=\"failed\"} 0",
    ])
    .await;
    let expiry = gw
        .metric(&format!(
            "portcullis_tls_certificate_expiry_seconds{{name=\"{NAME}\"}}"
        ))
        .await;
    assert!(expiry > 86_400.0, "{expiry}");
    let ready = readyz(&gw).await;
    assert_eq!(ready["acme"]["state"], "ok", "{ready}");
    assert_eq!(ready["acme"]["names"], serde_json::json!([NAME]));
    use std::os::unix::fs::PermissionsExt;
    let acme_dir = gw.dir.path().join("acme");
    let mut files: Vec<String> = std::fs::read_dir(&acme_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    assert!(files[0].starts_with("account-") && files[0].ends_with(".json"));
    assert_eq!(files[1..], ["certificate.pem", "key.pem"]);
    for f in &files {
        let mode = std::fs::metadata(acme_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    assert!(!gw.log().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn tls_alpn01_is_answered_on_the_public_port_and_a_restart_serves_the_stored_certificate() {
    let up = Upstream::start().await;
    let mut pebble = Pebble::new();
    let mut gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .server_keys(&server_keys(None))
        .extra_toml(&pebble.acme_toml(""))
        .configure();
    pebble
        .start(&PebbleOptions {
            http_port: 1,
            tls_port: gw.port,
            ..PebbleOptions::default()
        })
        .await;
    gw.launch().await;
    let root = pebble.root_pem().await;
    let first = wait_for_certificate(&gw, &pebble, &root, None).await;
    gw.log_containing("a TLS-ALPN-01 validation was answered")
        .await;

    // Ordinary TLS on the same port is untouched by the ClientHello read before it: a
    // sign-in and a request.
    let resp = signed_in_get(gw.port, &root, "/x").await;
    assert_eq!(resp.status(), 200);
    // A client that offers only acme-tls/1 while no challenge is open gets no certificate.
    assert!(acme_only_handshake(gw.port).await.is_err());

    // Restarted, it serves the stored certificate at once and orders nothing.
    gw.restart().await;
    let again = wait_for_certificate(&gw, &pebble, &root, None).await;
    assert_eq!(again, first);
    gw.metrics_with(&["portcullis_acme_orders_total{result=\"issued\"} 0"])
        .await;
    let ready = readyz(&gw).await;
    assert_eq!(ready["acme"]["state"], "ok", "{ready}");
}

/// A TLS handshake that offers only `acme-tls/1` (as a TLS-ALPN-01 validation does).
async fn acme_only_handshake(port: u16) -> Result<(), String> {
    use tokio_rustls::rustls;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(NAME)
        .unwrap()
        .to_owned();
    crate::harness::any_certificate_connector(&[b"acme-tls/1"])
        .connect(name, tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_renewal_swaps_the_certificate_under_an_open_download_and_a_refusing_ca_leaves_it_serving(
) {
    const BYTES: u64 = 64 * 1024 * 1024;
    let up = Upstream::start().await;
    let port80 = free_port();
    let mut pebble = Pebble::new();
    // Short-lived certificates: renewed two thirds in, about 13 s after issuance.
    let short = PebbleOptions {
        http_port: port80,
        tls_port: 1,
        validity_seconds: Some(20),
        ..PebbleOptions::default()
    };
    pebble.start(&short).await;
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .server_keys(&server_keys(Some(port80)))
        .extra_toml(&pebble.acme_toml("challenges = [\"http-01\"]"))
        .start()
        .await;
    let root = pebble.root_pem().await;
    let first = wait_for_certificate(&gw, &pebble, &root, None).await;

    // A download begun on the first certificate's connection stays open across the renewal.
    let resp = signed_in_get(gw.port, &root, &format!("/bytes/{BYTES}")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut received = body.next().await.unwrap().unwrap().len() as u64;
    let second = wait_for_certificate(&gw, &pebble, &root, Some(&first)).await;
    while let Some(chunk) = body.next().await {
        received += chunk
            .expect("the download continues across the renewal")
            .len() as u64;
    }
    assert_eq!(received, BYTES);
    gw.metrics_with(&["portcullis_acme_orders_total{result=\"issued\"} 2"])
        .await;

    // The CA now refuses the name: the next renewal fails, the certificate keeps serving, and
    // the CA's reason is on /readyz, in the log and in the metrics.
    pebble
        .start(&PebbleOptions {
            blocklist: vec![NAME.into()],
            ..short
        })
        .await;
    let failing = poll_until(WAIT, || async {
        readyz(&gw).await["acme"]["state"] == "failing"
    })
    .await;
    let ready = readyz(&gw).await;
    assert!(failing, "{ready}\n{}", gw.log());
    let error = ready["acme"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("rejectedIdentifier") && error.contains("tls.acme.names"),
        "{error}"
    );
    assert!(ready["acme"]["retry_at_ms"].as_i64().is_some(), "{ready}");
    assert_eq!(served(gw.port, &root).await, Some(second));
    gw.log_containing("rejectedIdentifier").await;
    gw.metrics_with(&["portcullis_acme_orders_total{result=\"failed\"} 1"])
        .await;
}

#[tokio::test]
async fn two_replicas_on_postgresql_order_once_and_serve_the_same_certificate() {
    let up = Upstream::start().await;
    let schema = crate::pg::Schema::on(&crate::pg::server_url());
    let port80 = free_port();
    // The CA reaches the first replica's port 80 only: when the second orders, the first
    // answers from the store.
    let pebble = http01_pebble(port80).await;
    let acme = pebble.acme_toml("challenges = [\"http-01\"]");
    let first = Gateway::builder(&up.url())
        .server_keys(&server_keys(Some(port80)))
        .store_url(&schema.url())
        .extra_toml(&acme)
        .start()
        .await;
    let second = Gateway::builder(&up.url())
        .server_keys(&server_keys(Some(free_port())))
        .store_url(&schema.url())
        .keys_of(&first)
        .extra_toml(&acme)
        .start()
        .await;
    let root = pebble.root_pem().await;
    let a = wait_for_certificate(&first, &pebble, &root, None).await;
    let b = wait_for_certificate(&second, &pebble, &root, None).await;
    assert_eq!(a, b, "both replicas serve the one certificate");
    let issued = first
        .metric("portcullis_acme_orders_total{result=\"issued\"}")
        .await
        + second
            .metric("portcullis_acme_orders_total{result=\"issued\"}")
            .await;
    assert_eq!(issued, 1.0, "one replica ordered");
}
