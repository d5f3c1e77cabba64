//! TLS on the public listener and the `__Host-` cookie of https deployments.

use crate::harness::{client, Gateway};
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
    std::fs::write(&key_path, certified.key_pair.serialize_pem()).unwrap();
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
