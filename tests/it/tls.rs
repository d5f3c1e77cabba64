//! TLS on the public listener and the `__Host-` cookie of https deployments.

use std::time::Duration;

use crate::harness::{client, poll_until, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

#[tokio::test]
async fn https_public_url_gives_a_host_prefixed_secure_cookie() {
    let up = Upstream::start().await;
    // TLS terminated in front of the gateway: public_url is https, the listener plain.
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .server_keys(r#"public_url = "https://media.example""#)
        .start()
        .await;
    let resp = client()
        .post(gw.url("/_portcullis/login"))
        .form(&[("username", "alice"), ("password", ALICE_PW), ("rd", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("__Host-portcullis="), "{cookie}");
    for attr in ["Secure", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Domain"));
    let pair = cookie.split(';').next().unwrap();
    let resp = client()
        .get(gw.url("/x"))
        .header("Cookie", pair)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(up.last().unwrap().header("cookie").is_none());
    // The plain-http cookie name is not accepted for an https deployment.
    let plain = pair.replacen("__Host-portcullis", "portcullis", 1);
    let resp = client()
        .get(gw.url("/x"))
        .header("Cookie", plain)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(!gw.log().contains("public_url is plain http"));
    // A form post from another origin is refused.
    let resp = client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", gw.base.clone())
        .form(&[("username", "alice"), ("password", ALICE_PW)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test]
async fn tls_listener_serves_and_authenticates() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert_path.display(),
            key_path.display()
        ))
        .start()
        .await;
    let https = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap(),
        )
        .resolve(
            "localhost",
            format!("127.0.0.1:{}", gw.port).parse().unwrap(),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", gw.port);
    let resp = https
        .post(format!("{base}/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "alice", "password": ALICE_PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let token = resp.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = https
        .get(format!("{base}/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.last().unwrap().header("x-forwarded-proto"),
        Some("https")
    );
    let resp = https.get(format!("{base}/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

/// A certificate and key for `name` that expire `days` from now, as PEM.
fn certificate(name: &str, days: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// The certificate a TLS client is shown at `port`, as DER.
async fn served_certificate(port: u16) -> Vec<u8> {
    served_for(port, "localhost").await
}

/// The certificate a TLS client asking for `name` (SNI; none for an IP address) is shown.
async fn served_for(port: u16, name: &str) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    let connector = crate::harness::any_certificate_connector(&[]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A renewed certificate (files replaced, as certbot does) is served without a restart or
/// reload; a broken replacement is logged and the old one keeps serving; the expiry metric
/// follows the served certificate.
#[tokio::test]
async fn replaced_certificate_files_are_served_without_a_restart() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    let (first, first_key) = certificate("localhost", 10);
    std::fs::write(&cert_path, &first).unwrap();
    std::fs::write(&key_path, &first_key).unwrap();
    let gw = Gateway::builder(&up.url())
        .server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            cert_path.display(),
            key_path.display()
        ))
        .start()
        .await;
    assert_eq!(served_certificate(gw.port).await, der_of(&first));
    let expiry = "portcullis_tls_certificate_expiry_seconds{name=\"localhost\"}";
    assert!(
        poll_until(Duration::from_secs(5), || async {
            gw.metric(expiry).await > 0.0
        })
        .await
    );
    let left = gw.metric(expiry).await;
    assert!(
        (9.0 * 86400.0..=10.0 * 86400.0).contains(&left),
        "{left} s left of a 10-day certificate"
    );

    // Renewed: a new pair in place of the old files.
    let (renewed, renewed_key) = certificate("localhost", 90);
    std::fs::write(&key_path, &renewed_key).unwrap();
    std::fs::write(&cert_path, &renewed).unwrap();
    assert!(
        poll_until(Duration::from_secs(10), || async {
            served_certificate(gw.port).await == der_of(&renewed)
        })
        .await,
        "the renewed certificate was not served"
    );
    assert!(
        poll_until(Duration::from_secs(5), || async {
            gw.metric(expiry).await > 80.0 * 86400.0
        })
        .await
    );

    // A broken replacement (a key that does not belong to the certificate): the renewed one
    // keeps serving, and the log says why.
    let (other, _) = certificate("localhost", 30);
    std::fs::write(&cert_path, &other).unwrap();
    gw.log_containing("certificate files changed but cannot be used")
        .await;
    assert_eq!(served_certificate(gw.port).await, der_of(&renewed));
    // A certificate for another name: the metric follows it.
    let (named, named_key) = certificate("media.example.org", 60);
    std::fs::write(&key_path, &named_key).unwrap();
    std::fs::write(&cert_path, &named).unwrap();
    let text = gw
        .metrics_with(&["portcullis_tls_certificate_expiry_seconds{name=\"media.example.org\"}"])
        .await;
    assert!(!text.contains(expiry), "the old name's series is gone");
}

/// HSTS when the operator opts in: on the gateway's pages, its refusals and what it proxies;
/// none by default; refused in the config for a plain-http public URL.
#[tokio::test]
async fn hsts_is_sent_on_every_response_once_configured_and_never_by_default() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .server_keys(
            "public_url = \"https://media.example\"\nhsts_max_age = \"365days\"\n\
             hsts_include_subdomains = true",
        )
        .start()
        .await;
    let want = "max-age=31536000; includeSubDomains";
    let hsts = |resp: &reqwest::Response| {
        resp.headers()
            .get("strict-transport-security")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let page = client()
        .get(gw.url("/_portcullis/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(hsts(&page).as_deref(), Some(want), "a gateway page");
    let refused = client().get(gw.url("/x")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(hsts(&refused).as_deref(), Some(want), "a refusal");
    let token = gw.login("alice", ALICE_PW).await.token;
    let proxied = client()
        .get(gw.url("/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200);
    assert_eq!(hsts(&proxied).as_deref(), Some(want), "a proxied answer");

    let plain = Gateway::builder(&up.url()).start().await;
    let resp = client()
        .get(plain.url("/_portcullis/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(hsts(&resp), None, "off by default");
    let bad = Gateway::builder(&up.url())
        .server_keys("hsts_max_age = \"365days\"")
        .configure();
    let out = bad.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.hsts_max_age"));
}

/// `server.redirect_listen` (port 80): every request goes to the same path and query over
/// https with 308; the host is the public URL's or a route's, never one a client made up.
#[tokio::test]
async fn the_redirect_listener_sends_everything_to_https() {
    let up = Upstream::start().await;
    let port = crate::harness::free_port();
    let gw = Gateway::builder(&up.url())
        .server_keys(&format!(
            "public_url = \"https://media.example:8443\"\nredirect_listen = \"127.0.0.1:{port}\""
        ))
        .extra_toml(&format!(
            "[[route]]\nname = \"photos\"\nhost = \"photos.example\"\nupstream = \"{}\"\n",
            up.url().trim_start_matches("http://")
        ))
        .start()
        .await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let go = |method: reqwest::Method, host: &'static str, path: &'static str| {
        let plain = plain.clone();
        async move {
            let resp = plain
                .request(method, format!("http://127.0.0.1:{port}{path}"))
                .header("Host", host)
                .send()
                .await
                .unwrap();
            let location = resp
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_string());
            (resp.status().as_u16(), location)
        }
    };
    assert_eq!(
        go(
            reqwest::Method::GET,
            "media.example",
            "/web/index.html?x=1&y=%20"
        )
        .await,
        (
            308,
            Some("https://media.example:8443/web/index.html?x=1&y=%20".into())
        )
    );
    assert_eq!(
        go(reqwest::Method::POST, "photos.example:80", "/upload").await,
        (308, Some("https://photos.example:8443/upload".into())),
        "a route's host is kept"
    );
    assert_eq!(
        go(reqwest::Method::GET, "evil.example", "/login").await,
        (308, Some("https://media.example:8443/login".into())),
        "an unknown host is not believed"
    );
    assert_eq!(
        up.count(),
        0,
        "nothing reaches the upstream over plain http"
    );
    drop(gw);
    // Without an https public URL there is nothing to send people to.
    let bad = Gateway::builder(&up.url())
        .server_keys(&format!("redirect_listen = \"127.0.0.1:{port}\""))
        .configure();
    let out = bad.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.redirect_listen"));
    let bad = Gateway::builder(&up.url())
        .server_keys("public_url = \"https://media.example\"\nredirect_http = false")
        .configure();
    let out = bad.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.redirect_http"));

    // `redirect_http = false`: the listener answers ACME challenges only; everything else 404.
    let quiet = Gateway::builder(&up.url())
        .server_keys(&format!(
            "public_url = \"https://media.example:8443\"\nredirect_listen = \"127.0.0.1:{port}\"\n\
             redirect_http = false"
        ))
        .start()
        .await;
    assert_eq!(
        go(reqwest::Method::GET, "media.example", "/web/index.html").await,
        (404, None)
    );
    drop(quiet);
}

/// Several certificates on one listener: each `[[tls.certificate]]` for the names it is for
/// (SNI, wildcards for one label), `server.tls_cert` for every other name and for clients that
/// send none; each renewed in place without a restart; every one in the expiry metric.
#[tokio::test]
async fn several_certificates_are_chosen_by_sni_and_each_is_renewed_in_place() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pair = |stem: &str, name: &str, days: i64| {
        let (cert, key) = certificate(name, days);
        let c = dir.path().join(format!("{stem}.pem"));
        let k = dir.path().join(format!("{stem}.key"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        (c, k, cert)
    };
    let (dc, dk, default) = pair("default", "localhost", 50);
    let (mc, mk, media) = pair("media", "media.example.org", 40);
    let (wc, wk, wild) = pair("wild", "*.example.net", 30);
    let gw = Gateway::builder(&up.url())
        .server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            dc.display(),
            dk.display()
        ))
        .extra_toml(&format!(
            "[[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n\
             [[tls.certificate]]\ncert = \"{}\"\nkey = \"{}\"\n",
            mc.display(),
            mk.display(),
            wc.display(),
            wk.display()
        ))
        .start()
        .await;
    let port = gw.port;
    assert_eq!(served_for(port, "media.example.org").await, der_of(&media));
    assert_eq!(served_for(port, "MEDIA.example.org").await, der_of(&media));
    assert_eq!(served_for(port, "music.example.net").await, der_of(&wild));
    assert_eq!(served_for(port, "a.b.example.net").await, der_of(&default));
    assert_eq!(
        served_for(port, "other.example.com").await,
        der_of(&default)
    );
    assert_eq!(
        served_for(port, "127.0.0.1").await,
        der_of(&default),
        "no SNI"
    );
    gw.metrics_with(&[
        "portcullis_tls_certificate_expiry_seconds{name=\"localhost\"}",
        "portcullis_tls_certificate_expiry_seconds{name=\"media.example.org\"}",
        "portcullis_tls_certificate_expiry_seconds{name=\"*.example.net\"}",
    ])
    .await;
    let left = gw
        .metric("portcullis_tls_certificate_expiry_seconds{name=\"*.example.net\"}")
        .await;
    assert!(
        (29.0 * 86400.0..=30.0 * 86400.0).contains(&left),
        "{left} s left of a 30-day certificate"
    );

    // One of them renewed in place: served for its name, the others unchanged.
    let (renewed, renewed_key) = certificate("media.example.org", 90);
    std::fs::write(&mk, &renewed_key).unwrap();
    std::fs::write(&mc, &renewed).unwrap();
    assert!(
        poll_until(Duration::from_secs(10), || async {
            served_for(port, "media.example.org").await == der_of(&renewed)
        })
        .await,
        "the renewed certificate was not served"
    );
    assert_eq!(served_for(port, "music.example.net").await, der_of(&wild));
    assert_eq!(served_for(port, "localhost").await, der_of(&default));

    // A broken one (a key of another certificate): logged, and nothing changes.
    std::fs::write(&wk, &renewed_key).unwrap();
    gw.log_containing("certificate files changed but cannot be used")
        .await;
    assert!(gw.log().contains("tls.certificate[1]"), "{}", gw.log());
    assert_eq!(served_for(port, "music.example.net").await, der_of(&wild));
    assert_eq!(
        served_for(port, "media.example.org").await,
        der_of(&renewed)
    );
}

/// Only TLS 1.2 with AEAD suites and TLS 1.3 are spoken (rustls has nothing older or weaker),
/// checked with OpenSSL's own client, which would take anything offered.
#[tokio::test]
async fn only_tls12_with_aead_suites_and_tls13_are_spoken() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::builder(&up.url()).tls(dir.path()).start().await;
    let connect = format!("127.0.0.1:{}", gw.port);
    let s_client = |args: &'static [&'static str]| {
        let connect = connect.clone();
        async move {
            let out = tokio::process::Command::new("openssl")
                .args(["s_client", "-connect", &connect, "-servername", "localhost"])
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .expect("run openssl s_client");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success() && text.contains("Cipher is"), text)
        }
    };
    // Refused: TLS 1.0 and 1.1 (offered at OpenSSL's lowest security level), and TLS 1.2 with
    // CBC suites (no AEAD).
    for args in [
        &["-tls1", "-cipher", "ALL:@SECLEVEL=0"][..],
        &["-tls1_1", "-cipher", "ALL:@SECLEVEL=0"],
        &[
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:AES128-SHA",
        ],
    ] {
        let (ok, text) = s_client(args).await;
        assert!(!ok, "{args:?} got a session:\n{text}");
    }
    // Spoken: TLS 1.2 with AES-GCM or ChaCha20-Poly1305, TLS 1.3; ALPN h2.
    for (args, cipher) in [
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"][..],
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
        (&["-tls1_3", "-alpn", "h2,http/1.1"], "TLS_AES_"),
    ] {
        let (ok, text) = s_client(args).await;
        assert!(ok && text.contains(cipher), "{args:?}:\n{text}");
    }
    let (_, text) = s_client(&["-tls1_3", "-alpn", "h2,http/1.1"]).await;
    assert!(text.contains("ALPN protocol: h2"), "{text}");
}
