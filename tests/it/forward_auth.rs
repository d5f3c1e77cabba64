//! The forward-auth endpoint `/_portcullis/verify`, as nginx `auth_request`, Traefik
//! `forwardAuth` and Caddy `forward_auth` call it: 200 with `Remote-User` for a live session,
//! 401 otherwise, 302 to the login page for browser navigations when asked. It never touches the
//! upstream. The last test puts a real nginx (Debian's `/usr/sbin/nginx`) in front.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{client, poll_until, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";
const VERIFY: &str = "/_portcullis/verify";

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    (up, gw)
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The token with one signature character changed (in the middle, where every bit counts).
fn tamper(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let i = bytes.len() - 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

/// The decoded `rd` of a redirect to the login page, insisting it is percent-encoded whole.
fn return_path(resp: &reqwest::Response) -> String {
    let location = header(resp, "location").unwrap();
    let rd = location
        .strip_prefix("/_portcullis/login?rd=")
        .unwrap_or_else(|| panic!("not a login redirect: {location}"));
    assert!(
        !rd.contains(['/', '?', '&', '=']),
        "rd is not percent-encoded: {location}"
    );
    percent_encoding::percent_decode_str(rd)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

/// A GET of the verify endpoint with the given extra headers.
async fn verify(gw: &Gateway, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client().get(gw.url(&format!("{VERIFY}{query}")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn valid_bearer_and_valid_cookie_get_200_with_remote_user_and_never_reach_upstream() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;

    let bearer = format!("Bearer {}", login.token);
    let resp = verify(
        &gw,
        "",
        &[
            ("Authorization", bearer.as_str()),
            ("X-Original-URI", "/web/index.html"),
            ("X-Forwarded-Method", "GET"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "remote-user").as_deref(), Some("alice"));
    assert!(header(&resp, "remote-groups").is_some());

    // The session cookie (plain-http public_url: cookie name `portcullis`), among others.
    let cookie = format!("theme=dark; portcullis={}; lang=en", login.token);
    let resp = verify(
        &gw,
        "",
        &[("Cookie", cookie.as_str()), ("X-Forwarded-Uri", "/x")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "remote-user").as_deref(), Some("alice"));

    // HEAD, as some proxies send it, answers the same.
    let resp = client()
        .head(gw.url(VERIFY))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "remote-user").as_deref(), Some("alice"));

    assert_eq!(
        up.count(),
        0,
        "verify reached the upstream: {:?}",
        up.requests()
    );
}

#[tokio::test]
async fn missing_or_forged_credentials_get_401() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;

    let resp = verify(&gw, "", &[("X-Original-URI", "/web/")]).await;
    assert_eq!(resp.status(), 401);
    assert!(header(&resp, "remote-user").is_none());
    assert!(header(&resp, "www-authenticate").is_some());

    // A token whose signature was tampered with, as Bearer and as cookie.
    let forged = tamper(&login.token);
    let bearer = format!("Bearer {forged}");
    let resp = verify(&gw, "", &[("Authorization", bearer.as_str())]).await;
    assert_eq!(resp.status(), 401);
    assert!(header(&resp, "remote-user").is_none());
    let cookie = format!("portcullis={forged}");
    let resp = verify(&gw, "", &[("Cookie", cookie.as_str())]).await;
    assert_eq!(resp.status(), 401);

    // Garbage, and a client trying to claim an identity by header.
    let resp = verify(
        &gw,
        "",
        &[
            ("Authorization", "Bearer not.a.jwt"),
            ("Remote-User", "alice"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 401);
    assert!(header(&resp, "remote-user").is_none());

    // Without `?redirect=1` even a browser navigation gets 401, not a redirect.
    let resp = verify(
        &gw,
        "",
        &[("Accept", "text/html"), ("X-Original-URI", "/web/x?y=1")],
    )
    .await;
    assert_eq!(resp.status(), 401);

    assert_eq!(
        up.count(),
        0,
        "verify reached the upstream: {:?}",
        up.requests()
    );
}

#[tokio::test]
async fn browser_navigation_with_redirect_gets_302_to_login_with_encoded_return_path() {
    let (up, gw) = setup().await;

    let resp = verify(
        &gw,
        "?redirect=1",
        &[
            ("Accept", "text/html,application/xhtml+xml"),
            ("X-Original-URI", "/web/x?y=1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 302);
    assert_eq!(
        header(&resp, "location").as_deref(),
        Some("/_portcullis/login?rd=%2Fweb%2Fx%3Fy%3D1")
    );
    assert_eq!(return_path(&resp), "/web/x?y=1");

    // Traefik's spelling of the original URI.
    let resp = verify(
        &gw,
        "?redirect=1",
        &[
            ("Sec-Fetch-Mode", "navigate"),
            ("X-Forwarded-Method", "GET"),
            ("X-Forwarded-Uri", "/web/index.html"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 302);
    assert_eq!(return_path(&resp), "/web/index.html");

    // A form post is no navigation: 401 even when a redirect is asked for.
    let resp = verify(
        &gw,
        "?redirect=1",
        &[
            ("Accept", "text/html"),
            ("X-Forwarded-Method", "POST"),
            ("X-Original-URI", "/web/x"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 401);

    // An API client (no HTML wanted) gets 401.
    let resp = verify(
        &gw,
        "?redirect=1",
        &[("Accept", "application/json"), ("X-Original-URI", "/web/x")],
    )
    .await;
    assert_eq!(resp.status(), 401);

    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn signout_from_the_cli_is_obeyed_by_verify_within_one_second() {
    let (up, gw) = setup().await;
    let login = gw.login("alice", ALICE_PW).await;
    let bearer = format!("Bearer {}", login.token);
    let status = || async {
        verify(&gw, "", &[("Authorization", bearer.as_str())])
            .await
            .status()
            .as_u16()
    };
    assert_eq!(status().await, 200);

    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(
        poll_until(Duration::from_secs(1), || async { status().await == 401 }).await,
        "verify still accepted a signed-out session after 1 s"
    );
    assert_eq!(up.count(), 0);
}

// ------------------------------------------------------------------ a real nginx in front

const NGINX: &str = "/usr/sbin/nginx";

/// Debian's nginx, started in the foreground (`daemon off; master_process off;`) with a
/// generated config, pid file, logs and temp paths in a temporary directory. Killed on drop.
struct Nginx {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The nginx config of the forward-auth setup: every request first asks Portcullis through
/// `auth_request`, only then goes to the upstream, with the user name from `Remote-User`.
fn nginx_conf(dir: &Path, port: u16, gateway: &str, upstream: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;

    server {{
        listen 127.0.0.1:{port};

        location = /_portcullis/verify {{
            internal;
            proxy_pass http://{gateway};
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-Method $request_method;
        }}

        location / {{
            auth_request /_portcullis/verify;
            auth_request_set $portcullis_user $upstream_http_remote_user;
            proxy_set_header Remote-User $portcullis_user;
            proxy_pass http://{upstream};
        }}
    }}
}}
"#
    )
}

impl Nginx {
    async fn start(gateway: &str, upstream: &str) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: install Debian's nginx (apt-get install nginx-light); \
             scripts/test does this"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut nginx = Nginx {
            dir,
            child: None,
            port: 0,
        };
        for _ in 0..5 {
            nginx.port = free_port();
            let conf = nginx.dir.path().join("nginx.conf");
            std::fs::write(
                &conf,
                nginx_conf(nginx.dir.path(), nginx.port, gateway, upstream),
            )
            .unwrap();
            let child = Command::new(NGINX)
                .arg("-p")
                .arg(nginx.dir.path())
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(nginx.dir.path().join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            nginx.child = Some(child);
            let addr = format!("127.0.0.1:{}", nginx.port);
            let mut exited = false;
            let ready = poll_until(Duration::from_secs(20), || {
                exited |= nginx
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                let (addr, exited) = (addr.clone(), exited);
                async move { exited || tokio::net::TcpStream::connect(&addr).await.is_ok() }
            })
            .await;
            if ready && !exited {
                return nginx;
            }
            let log = nginx.error_log();
            nginx.kill();
            if exited && log.contains("in use") {
                continue;
            }
            panic!("nginx did not start:\n{log}");
        }
        panic!("could not find a free port for nginx");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- nginx error log ---\n{}", self.error_log());
        }
    }
}

#[tokio::test]
async fn real_nginx_auth_request_passes_live_sessions_and_stops_revoked_ones() {
    let (up, gw) = setup().await;
    let gateway = format!("127.0.0.1:{}", gw.port);
    let upstream = up.url().trim_start_matches("http://").to_string();
    let nginx = Nginx::start(&gateway, &upstream).await;
    let login = gw.login("alice", ALICE_PW).await;

    // A live session passes through nginx to the upstream, which learns the user from nginx.
    let resp = client()
        .get(nginx.url("/library/items?x=1"))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", nginx.error_log());
    assert_eq!(
        resp.text().await.unwrap(),
        "upstream ok: GET /library/items?x=1"
    );
    assert_eq!(up.count(), 1);
    let seen = up.last().unwrap();
    assert_eq!(seen.path_and_query, "/library/items?x=1");
    assert_eq!(seen.header("remote-user"), Some("alice"));

    // No credentials: 401 from nginx, and the upstream hears nothing.
    let resp = client()
        .get(nginx.url("/library/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(up.count(), 1);

    // The session ends (the gateway applies its own logout at once); nginx then refuses it.
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let resp = client()
        .get(nginx.url("/library/items?after=logout"))
        .bearer_auth(&login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        up.count(),
        1,
        "a revoked session reached the upstream: {:?}",
        up.last()
    );

    // A session revoked from the CLI (another process) is refused within a second.
    let second = gw.login("alice", ALICE_PW).await;
    let through_nginx = || async {
        client()
            .get(nginx.url("/probe"))
            .bearer_auth(&second.token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(through_nginx().await, 200);
    let before = up.count();
    gw.cli_ok(&["session", "revoke", &second.session_id]);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            through_nginx().await == 401
        })
        .await,
        "nginx still let a revoked session through after 1 s"
    );
    let after = up.count();
    assert_eq!(through_nginx().await, 401);
    assert_eq!(up.count(), after, "a revoked session reached the upstream");
    assert!(after >= before);
}
