//! A real ACME certificate authority for the tests: Debian's `pebble` (Let's Encrypt's test CA)
//! with `pebble-challtestsrv` as its DNS server, which answers every name with 127.0.0.1, both
//! on ephemeral loopback ports. Pebble's validation connects to the ports the test names: the
//! gateway's port-80 listener for HTTP-01 and its public listener for TLS-ALPN-01. Its own API
//! is served with a certificate from a test CA made by rcgen ([`Pebble::api_ca`]); the roots it
//! issues from are fetched from its management interface ([`Pebble::root_pem`]). Readiness is
//! polled (the directory answers), never slept for.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{free_port, poll_until, write_certificates};

/// How long pebble may take to answer after it is started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// What the CA is told.
#[derive(Clone, Debug, Default)]
pub struct PebbleOptions {
    /// The port its HTTP-01 validation connects to (the gateway's port-80 listener).
    pub http_port: u16,
    /// The port its TLS-ALPN-01 validation connects to (the gateway's public listener).
    pub tls_port: u16,
    /// Names it refuses to issue for (`rejectedIdentifier`).
    pub blocklist: Vec<String>,
    /// How long its certificates are valid, in seconds (pebble's default: five years).
    pub validity_seconds: Option<u64>,
}

/// A running pebble and its DNS server. Dropping it kills both.
pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// The test CA the API's certificate chains to (`tls.acme.directory_ca`).
    pub api_ca: PathBuf,
    listen: u16,
    management: u16,
    dns: u16,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Pebble {
    /// Picks the CA's ports (so that its directory URL can go into a gateway's configuration
    /// first) without starting it.
    pub fn new() -> Pebble {
        let dir = tempfile::tempdir().expect("temp dir");
        let api_ca = write_certificates(dir.path(), "pebble API test CA");
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        Pebble {
            directory: format!("https://127.0.0.1:{}/dir", ports[0]),
            api_ca,
            listen: ports[0],
            management: ports[1],
            dns: ports[2],
            dir,
            children: Vec::new(),
        }
    }

    /// `[tls.acme]` keys for a gateway that orders from this CA.
    pub fn acme_toml(&self, extra: &str) -> String {
        format!(
            "[tls.acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\ncontact = [\"ops@portcullis.test\"]\n{extra}\n",
            self.directory,
            self.api_ca.display()
        )
    }

    /// Starts the CA with `options`; a CA started before is stopped first (its state goes:
    /// accounts, orders, roots), as when a CA changes its mind.
    pub async fn start(&mut self, options: &PebbleOptions) {
        self.stop();
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
                .expect("log file")
        };
        let dns_server = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{}", self.dns)])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.log"))
            .spawn()
            .expect("start pebble-challtestsrv (scripts/test installs the pebble package)");
        self.children.push(dns_server);
        let config = self.dir.path().join("pebble.json");
        let mut settings = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{}", self.listen),
            "managementListenAddress": format!("127.0.0.1:{}", self.management),
            "certificate": self.dir.path().join("server.pem"),
            "privateKey": self.dir.path().join("server.key"),
            "httpPort": options.http_port,
            "tlsPort": options.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "domainBlocklist": options.blocklist,
        });
        if let Some(v) = options.validity_seconds {
            settings["certificateValidityPeriod"] = v.into();
        }
        std::fs::write(
            &config,
            serde_json::json!({ "pebble": settings }).to_string(),
        )
        .expect("write pebble.json");
        let ca = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns)])
            // No random validation delays, no nonces refused at random: the tests wait for what
            // they check, not for pebble's dice.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log"))
            .stderr(log("pebble.log"))
            .spawn()
            .expect("start pebble (scripts/test installs the pebble package)");
        self.children.push(ca);
        let client = self.api_client();
        let url = self.directory.clone();
        let up = poll_until(READY_WITHIN, || {
            let (client, url) = (client.clone(), url.clone());
            async move { matches!(client.get(&url).send().await, Ok(r) if r.status() == 200) }
        })
        .await;
        assert!(up, "pebble did not start:\n{}", self.logs());
    }

    fn stop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A client that trusts the API's test CA.
    fn api_client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.api_ca).expect("read the API CA");
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("API CA"))
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// The root the CA issues from now (PEM): what a client must trust to talk to the gateway.
    pub async fn root_pem(&self) -> String {
        let resp = self
            .api_client()
            .get(format!("https://127.0.0.1:{}/roots/0", self.management))
            .send()
            .await
            .expect("pebble's management interface");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("the root")
    }

    /// Pebble's and its DNS server's logs.
    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}\n--- challtestsrv ---\n{}",
            read(&self.dir.path().join("pebble.log")),
            read(&self.dir.path().join("challtestsrv.log"))
        )
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}
