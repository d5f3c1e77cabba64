//! Browser tests: the gateway's own pages in real headless Chromium (Debian's `chromium`, driven
//! by `playwright-core` from `tests/browser`). Each test starts an upstream and the gateway, then
//! runs one script under `tests/browser/` with `node`, passing the gateway URL and a user in the
//! environment; the script asserts with `node:assert` and exits non-zero on any failure.
//!
//! Needs `/usr/bin/chromium` (or `CHROMIUM=PATH`) and `npm ci --prefix tests/browser`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::Gateway;
use crate::upstream::Upstream;

const USER: &str = "alice";
const PASSWORD: &str = "alice-browser-pw-2024";

/// The longest a script may run before it counts as hung.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Panics with what to install when the browser or the npm package is missing.
pub(crate) fn check_prerequisites() {
    let browser = chromium();
    assert!(
        browser.exists(),
        "browser tests need Chromium at {} (`apt-get install -y chromium`, or set CHROMIUM=PATH)",
        browser.display()
    );
    let pkg = root().join("tests/browser/node_modules/playwright-core/package.json");
    assert!(
        pkg.exists(),
        "browser tests need playwright-core: run `npm ci --prefix tests/browser` ({} is missing)",
        pkg.display()
    );
}

async fn start() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user(USER, PASSWORD)
        .start()
        .await;
    (up, gw)
}

/// Runs `tests/browser/{script}` against the gateway and insists it exits 0.
async fn run_script(gw: &Gateway, script: &str, extra_env: &[(&str, &Path)]) {
    check_prerequisites();
    let root = root();
    let output = root.join("tests/output");
    std::fs::create_dir_all(&output).expect("tests/output");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(root.join("tests/browser").join(script))
        .current_dir(&root)
        .env("PORTCULLIS_URL", &gw.base)
        .env("PORTCULLIS_USER", USER)
        .env("PORTCULLIS_PASSWORD", PASSWORD)
        .env("PORTCULLIS_OUTPUT", &output)
        .env("CHROMIUM", chromium())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd
        .spawn()
        .expect("run node (Node.js 20 or newer must be on PATH)");
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {SCRIPT_TIMEOUT:?}"))
        .expect("node output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed ({}) after {:.1} s:\n{text}",
        out.status,
        started.elapsed().as_secs_f64()
    );
    println!(
        "--- {script} passed in {:.1} s ---\n{text}",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn browser_password_and_totp_login_and_device_list() {
    let (_up, gw) = start().await;
    run_script(&gw, "totp_login.mjs", &[]).await;
}

#[tokio::test]
async fn browser_sign_out_of_devices() {
    let (_up, gw) = start().await;
    run_script(&gw, "signout.mjs", &[]).await;
}

#[tokio::test]
async fn browser_password_change_with_and_without_signing_out_devices() {
    let (_up, gw) = start().await;
    run_script(&gw, "password_change.mjs", &[]).await;
}

#[tokio::test]
async fn browser_cross_site_posts_are_refused() {
    let (_up, gw) = start().await;
    run_script(&gw, "csrf.mjs", &[]).await;
}

/// Saves `tests/output/account.png`; also writes the README's `docs/account-page.png` when that
/// is missing or `UPDATE_SCREENSHOTS=1` is set (so ordinary runs leave the work tree clean).
#[tokio::test]
async fn browser_account_page_screenshot() {
    let (_up, gw) = start().await;
    let docs = root().join("docs/account-page.png");
    let update = !docs.exists() || std::env::var("UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1");
    let extra: Vec<(&str, &Path)> = if update {
        vec![("PORTCULLIS_DOCS_SCREENSHOT", docs.as_path())]
    } else {
        Vec::new()
    };
    run_script(&gw, "account_screenshot.mjs", &extra).await;
    assert!(root().join("tests/output/account.png").exists());
}

#[tokio::test]
async fn browser_passkey_registration_and_sign_in_with_the_virtual_authenticator() {
    let up = Upstream::start().await;
    // WebAuthn needs a secure context: http://localhost is one, http://127.0.0.1 is not for it.
    let gw = Gateway::builder(&up.url())
        .user(USER, PASSWORD)
        .server_keys("public_url = \"http://localhost:{port}\"")
        .start()
        .await;
    let base = format!("http://localhost:{}", gw.port);
    run_script(
        &gw,
        "passkey_login.mjs",
        &[("PORTCULLIS_URL", Path::new(&base))],
    )
    .await;
    // The last step's refusal was the gateway's own, for the authenticator without user
    // verification (counted before the page could show it).
    let refused = gw
        .metric("portcullis_logins_total{method=\"passkey\",result=\"user_not_verified\"}")
        .await;
    assert!(refused >= 1.0, "user_not_verified counted {refused} times");
}

/// "Forgot your password?" in Chromium, with the link from the mail a real SMTP server
/// received: the request from the login page, then the mailed link's page.
#[tokio::test]
async fn browser_forgot_password_with_the_link_from_the_received_mail() {
    let up = Upstream::start().await;
    let smtpd = crate::smtpd::Smtpd::start().await;
    let gw = Gateway::builder(&up.url())
        .user(USER, PASSWORD)
        .extra_toml(&format!(
            "[mail]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"portcullis@example.org\"\n",
            smtpd.port
        ))
        .start()
        .await;
    gw.cli_ok(&["user", "set-email", USER, "alice@example.org"]);
    run_script(
        &gw,
        "forgot_password.mjs",
        &[("PHASE", Path::new("request"))],
    )
    .await;
    let mail = smtpd.wait_for(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(mail.to, ["alice@example.org"]);
    let link = mail
        .links()
        .into_iter()
        .find(|l| l.contains("/_portcullis/reset/"))
        .expect("a reset link in the mail");
    assert!(link.starts_with(&gw.base), "built from public_url: {link}");
    run_script(
        &gw,
        "forgot_password.mjs",
        &[
            ("PHASE", Path::new("reset")),
            ("RESET_LINK", Path::new(&link)),
            ("NEW_PASSWORD", Path::new("alice reset in the browser 2026")),
        ],
    )
    .await;
}

/// A Jellyfin-style page load over HTTP/2 through the gateway's own TLS listener: page,
/// parallel API calls, the app's login, a Range request, the WebSocket (HTTP/1.1); then "Sign
/// out of all devices" from the gateway's pages (h2 too) closes the socket and ends the token.
#[tokio::test]
async fn browser_jellyfin_page_over_http2_and_sign_out_of_all_devices() {
    let jf = crate::standin::StandIn::start().await;
    jf.add_user(USER, PASSWORD, false);
    let dir = tempfile::tempdir().unwrap();
    crate::harness::write_certificates(dir.path(), "Portcullis browser h2 CA");
    let gw = Gateway::builder(&jf.url())
        .user(USER, PASSWORD)
        .route_keys("kind = \"jellyfin\"")
        .server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\npublic_url = \"https://localhost:{{port}}\"",
            dir.path().join("server.pem").display(),
            dir.path().join("server.key").display(),
        ))
        .start()
        .await;
    let base = format!("https://localhost:{}", gw.port);
    run_script(&gw, "http2.mjs", &[("PORTCULLIS_URL", Path::new(&base))]).await;
    assert_eq!(
        jf.open_sockets(),
        0,
        "the app's WebSocket is still open at the server"
    );
}
