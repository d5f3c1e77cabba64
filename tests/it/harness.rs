//! Test harness: starts the real `portcullis` binary on ephemeral loopback ports with a config
//! and a real SQLite file in a temporary directory, creates users through the real CLI, and
//! waits for readiness by polling `/healthz` (no fixed sleeps).

use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write as _;
use std::net::TcpListener;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Polls `cond` every 10 ms until it returns true or `within` passes; returns whether it did.
pub async fn poll_until<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// A free loopback port: bound, read, released for the gateway to take (the gateway is started
/// again with new ports if another process takes it in between).
/// Two different free ports (a port released can be handed out again at once).
fn two_free_ports() -> (u16, u16) {
    let port = free_port();
    let other = std::iter::repeat_with(free_port)
        .find(|p| *p != port)
        .expect("another free port");
    (port, other)
}

/// A free loopback port: bound, read, released for a server to take.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// [`client`] whose connections come from the loopback address `from` (127.x.y.z), so that a
/// test can be several clients on one machine.
pub fn client_from(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .local_address(std::net::IpAddr::from(from))
        .build()
        .expect("http client")
}

/// A user the harness creates before the gateway starts.
#[derive(Clone)]
pub struct UserSpec {
    pub name: String,
    pub password: String,
    pub admin: bool,
}

pub struct GatewayBuilder {
    store_url: Option<String>,
    keys_from: Option<PathBuf>,
    store_extra: String,
    upstream: String,
    users: Vec<UserSpec>,
    route_extra: String,
    log: String,
    server_extra: String,
    auth_extra: String,
    session_extra: String,
    tables: String,
}

impl GatewayBuilder {
    /// Whole extra tables appended to the config (e.g. `[password]`).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.tables.push_str(toml);
        self.tables.push('\n');
        self
    }

    /// Keys for the `[auth]` table (e.g. `max_failures = 3`).
    pub fn auth_keys(mut self, toml: &str) -> Self {
        self.auth_extra.push_str(toml);
        self.auth_extra.push('\n');
        self
    }

    /// Keys for the `[session]` table (e.g. `ttl = "1m"`).
    pub fn session_keys(mut self, toml: &str) -> Self {
        self.session_extra.push_str(toml);
        self.session_extra.push('\n');
        self
    }

    pub fn admin(mut self, name: &str, password: &str) -> Self {
        self.users.push(UserSpec {
            name: name.into(),
            password: password.into(),
            admin: true,
        });
        self
    }

    /// Extra keys for the `[server]` table (e.g. `public_url`, `tls_cert`).
    pub fn server_keys(mut self, toml: &str) -> Self {
        self.server_extra.push_str(toml);
        self.server_extra.push('\n');
        self
    }

    /// TLS on the public listener: a test CA and a certificate for `localhost` and `127.0.0.1`
    /// written into `dir` (see [`write_certificates`]; the CA is `dir/ca.pem`).
    pub fn tls(self, dir: &Path) -> Self {
        write_certificates(dir, "Portcullis test CA");
        self.server_keys(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        ))
    }

    /// Log format and level of the gateway.
    pub fn log(mut self, format: &str, level: &str) -> Self {
        self.log = format!("format = \"{format}\"\nlevel = \"{level}\"");
        self
    }

    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push(UserSpec {
            name: name.into(),
            password: password.into(),
            admin: false,
        });
        self
    }

    /// Uses this store URL instead of a SQLite file of its own (e.g. a PostgreSQL schema).
    pub fn store_url(mut self, url: &str) -> Self {
        self.store_url = Some(url.to_string());
        self
    }

    /// Extra keys for the `[store]` table.
    pub fn store_keys(mut self, toml: &str) -> Self {
        self.store_extra.push_str(toml);
        self.store_extra.push('\n');
        self
    }

    /// Shares another gateway's session and secrets keys, as replicas of one deployment do.
    pub fn keys_of(mut self, other: &Gateway) -> Self {
        self.keys_from = Some(other.keys_dir.clone());
        self
    }

    /// Extra keys for the single `[[route]]` table.
    pub fn route_keys(mut self, toml: &str) -> Self {
        self.route_extra.push_str(toml);
        self.route_extra.push('\n');
        self
    }

    pub async fn start(self) -> Gateway {
        let mut gw = self.configure();
        gw.spawn().await;
        gw
    }

    /// Writes the config and creates the users, without starting the gateway (tests that
    /// start it themselves, e.g. with `serve --upgrade`, a notify socket, or `launch`).
    pub fn configure(self) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let keys_dir = self
            .keys_from
            .clone()
            .unwrap_or_else(|| dir.path().to_path_buf());
        let mut gw = Gateway {
            store_url: self.store_url,
            keys_dir,
            store_extra: self.store_extra,
            dir,
            upstream: self.upstream,
            route_extra: self.route_extra,
            log: self.log,
            server_extra: self.server_extra,
            auth_extra: self.auth_extra,
            session_extra: self.session_extra,
            tables: self.tables,
            child: None,
            base: String::new(),
            admin: String::new(),
            port: 0,
        };
        let (port, admin) = two_free_ports();
        gw.write_config(port, admin);
        for u in &self.users {
            gw.add_user(&u.name, &u.password, u.admin);
        }
        gw
    }
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    store_url: Option<String>,
    /// Where the session and secrets keys live (this gateway's directory unless shared).
    keys_dir: PathBuf,
    store_extra: String,
    upstream: String,
    route_extra: String,
    log: String,
    server_extra: String,
    auth_extra: String,
    session_extra: String,
    tables: String,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` of the public listener.
    pub base: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    pub port: u16,
}

/// A logged-in API session.
#[derive(Clone, Debug)]
pub struct Login {
    pub token: String,
    pub session_id: String,
}

impl Gateway {
    /// Whether the public listener terminates TLS (the builder's `tls`).
    pub fn serves_tls(&self) -> bool {
        self.server_extra.contains("tls_cert")
    }

    /// A gateway in front of `upstream` with the one user alice, whose account locks for ten
    /// minutes after three failures in a row: the set-up of the lock tests.
    pub async fn locking_after_three(upstream: &str, alice_password: &str) -> Gateway {
        Gateway::builder(upstream)
            .user("alice", alice_password)
            .auth_keys("max_failures = 3\nlockout = \"10m\"")
            .start()
            .await
    }

    pub fn builder(upstream: &str) -> GatewayBuilder {
        GatewayBuilder {
            store_url: None,
            keys_from: None,
            store_extra: String::new(),
            upstream: upstream.trim_start_matches("http://").to_string(),
            users: Vec::new(),
            route_extra: String::new(),
            log: "level = \"info\"".to_string(),
            server_extra: String::new(),
            auth_extra: String::new(),
            session_extra: String::new(),
            tables: String::new(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.toml")
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("portcullis.db")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    pub fn key_path(&self) -> PathBuf {
        self.keys_dir.join("session.key")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn write_config(&mut self, port: u16, admin_port: u16) {
        let d = self.dir.path();
        let text = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
{public_url}
{threads}
{grace_period}
data_dir = "{data}"
{server_extra}

[store]
url = "{store_url}"
{store_extra}

[session]
key_file = "{key}"
{session_extra}

[log]
{log}

[auth]
secrets_key_file = "{secrets}"
{auth_extra}

[[route]]
name = "media"
upstream = "{upstream}"
{route_extra}

{tables}
"#,
            data = d.display(),
            // One proxy thread unless a test asks for more.
            threads = if self.server_extra.contains("threads =") {
                ""
            } else {
                "threads = 1"
            },
            grace_period = if self.server_extra.contains("grace_period") {
                ""
            } else {
                "grace_period = \"1s\""
            },
            store_url = self
                .store_url
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", self.db_path().display())),
            store_extra = {
                let mut t = self.store_extra.clone();
                for (key, default) in [
                    ("poll_interval", "\"200ms\""),
                    ("max_staleness", "\"5s\""),
                    ("busy_timeout", "\"1s\""),
                ] {
                    if !t.contains(key) {
                        t.push_str(&format!("{key} = {default}\n"));
                    }
                }
                t
            },
            key = self.key_path().display(),
            upstream = self.upstream,
            route_extra = self.route_extra,
            log = self.log,
            // `{port}` in the server keys is this gateway's port (e.g. in `public_url`).
            server_extra = self.server_extra.replace("{port}", &port.to_string()),
            secrets = self.keys_dir.join("secrets.key").display(),
            auth_extra = self.auth_extra,
            session_extra = self.session_extra,
            tables = self.tables,
            public_url = if self.server_extra.contains("public_url") {
                String::new()
            } else {
                format!("public_url = \"http://127.0.0.1:{port}\"")
            },
        );
        std::fs::write(self.config_path(), text).expect("write config");
        self.port = port;
        self.base = format!("http://127.0.0.1:{port}");
        self.admin = format!("http://127.0.0.1:{admin_port}");
    }

    /// Runs the CLI against this gateway's config, with `stdin` as standard input.
    pub fn cli_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the CLI");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        child.wait_with_output().expect("CLI output")
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, "")
    }

    /// Asserts that the audit log (`portcullis audit` with `args`) holds each of `needles`.
    pub fn assert_audit(&self, args: &[&str], needles: &[&str]) {
        let audit = self.cli_ok(&[&["audit"], args].concat());
        for n in needles {
            assert!(audit.contains(n), "`{n}` is not in the audit log:\n{audit}");
        }
    }

    /// Runs the CLI and insists it succeeds.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "portcullis {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn add_user(&self, name: &str, password: &str, admin: bool) {
        let mut args = vec!["user", "add", name, "--password-stdin"];
        if admin {
            args.push("--admin");
        }
        let out = self.cli_with_stdin(&args, &format!("{password}\n"));
        assert!(
            out.status.success(),
            "user add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn spawn(&mut self) {
        for attempt in 0..5 {
            if attempt > 0 {
                let (port, admin) = two_free_ports();
                self.write_config(port, admin);
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.log_path())
                .expect("log file");
            let log2 = log.try_clone().expect("log file");
            let child = Command::new(BIN)
                .arg("--config")
                .arg(self.config_path())
                .arg("serve")
                .current_dir(self.dir.path())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .expect("start the gateway");
            self.child = Some(child);
            let health = format!("{}/healthz", self.admin);
            let base = format!("127.0.0.1:{}", self.port);
            let http = client();
            let mut exited = false;
            let ready = poll_until(Duration::from_secs(30), || {
                let exited_now = self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                exited |= exited_now;
                let (http, health, base) = (http.clone(), health.clone(), base.clone());
                async move {
                    if exited_now {
                        return true;
                    }
                    let admin_up =
                        matches!(http.get(&health).send().await, Ok(r) if r.status() == 200);
                    // The public listener is up once it accepts connections.
                    admin_up && tokio::net::TcpStream::connect(&base).await.is_ok()
                }
            })
            .await;
            if ready && !exited {
                return;
            }
            let log = self.log();
            if exited && log.contains("in use") {
                continue;
            }
            panic!("the gateway did not become ready:\n{log}");
        }
        panic!("could not find free ports for the gateway");
    }

    /// Stops the gateway (SIGKILL: nothing acknowledged may depend on a clean stop).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a gateway made by `GatewayBuilder::configure`.
    pub async fn launch(&mut self) {
        self.spawn().await;
    }

    /// Kills the gateway and starts it again on the same config and database.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The log once it contains `needle` (access lines are written just after the response).
    pub async fn log_containing(&self, needle: &str) -> String {
        let found = poll_until(Duration::from_secs(5), || async {
            self.log().contains(needle)
        })
        .await;
        assert!(found, "the log never contained {needle:?}:\n{}", self.log());
        self.log()
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        client()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of one series of the admin listener's metrics (its name with its labels, as
    /// exposed); 0 when it is not there.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = match client().get(format!("{}/metrics", self.admin)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap_or(0.0))
    }

    /// The admin listener's `/metrics` text once it contains every one of `needles` (counters
    /// of a request are updated just after its response is sent).
    pub async fn metrics_with(&self, needles: &[&str]) -> String {
        let text = std::cell::RefCell::new(String::new());
        let found = poll_until(Duration::from_secs(5), || async {
            let t = match client().get(format!("{}/metrics", self.admin)).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            let all = needles.iter().all(|n| t.contains(n));
            *text.borrow_mut() = t;
            all
        })
        .await;
        let text = text.into_inner();
        assert!(found, "metrics lack one of {needles:?}:\n{text}");
        text
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The text of a gateway page fetched with `cookie` (the login steps' pending cookie).
    pub async fn page_with_cookie(&self, path: &str, cookie: &str) -> String {
        client()
            .get(self.url(path))
            .header("Cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Walks the forced new-password page with a pending login's cookie: reads the form's
    /// CSRF token, then posts the new password (twice) with the return path `rd`.
    pub async fn set_new_password(
        &self,
        pending: &str,
        new_pw: &str,
        rd: &str,
    ) -> reqwest::Response {
        let page = format!("/_portcullis/login/password?rd={}", rd.replace('/', "%2F"));
        let html = self.page_with_cookie(&page, pending).await;
        let csrf = input_value(&html, "csrf").expect("the new-password form has a CSRF token");
        client()
            .post(self.url("/_portcullis/login/password"))
            .header("Cookie", pending)
            .header("Origin", self.base.clone())
            .form(&[
                ("new_password", new_pw),
                ("confirm", new_pw),
                ("csrf", csrf.as_str()),
                ("rd", rd),
            ])
            .send()
            .await
            .unwrap()
    }

    /// Posts the login page's form (from this gateway's origin) with return path `rd`.
    pub async fn login_form(&self, user: &str, password: &str, rd: &str) -> reqwest::Response {
        client()
            .post(self.url("/_portcullis/login"))
            .header("Origin", self.base.clone())
            .form(&[("username", user), ("password", password), ("rd", rd)])
            .send()
            .await
            .unwrap()
    }

    /// Tries a login through the JSON API: the status and the JSON body.
    pub async fn try_login(&self, user: &str, password: &str, totp: Option<&str>) -> (u16, Value) {
        self.try_login_through(&client(), &self.base, user, password, totp)
            .await
    }

    /// Tries a login through the JSON API at `base` (the gateway's https origin, say) with
    /// `http`: the status and the JSON body.
    pub async fn try_login_through(
        &self,
        http: &reqwest::Client,
        base: &str,
        user: &str,
        password: &str,
        totp: Option<&str>,
    ) -> (u16, Value) {
        let mut body = serde_json::json!({"username": user, "password": password});
        if let Some(code) = totp {
            body["totp"] = Value::String(code.to_string());
        }
        let resp = http
            .post(format!("{base}/_portcullis/api/login"))
            .json(&body)
            .send()
            .await
            .expect("login request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("login json"))
    }

    /// Logs in through the JSON API.
    pub async fn login(&self, user: &str, password: &str) -> Login {
        let (status, body) = self.try_login(user, password, None).await;
        assert_eq!(status, 200, "login of {user} failed: {body}");
        Login {
            token: body["token"].as_str().expect("token").to_string(),
            session_id: body["session_id"].as_str().expect("session id").to_string(),
        }
    }

    /// Status of a GET through the gateway with a Bearer token.
    pub async fn get_status(&self, path: &str, token: &str) -> u16 {
        client()
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Status of `GET path` with `cookie` as the `Cookie` header.
    pub async fn status_with_cookie(&self, path: &str, cookie: &str) -> u16 {
        client()
            .get(self.url(path))
            .header("Cookie", cookie)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Waits until a token is refused (401), up to `within`.
    pub async fn refused_within(&self, token: &str, within: Duration) -> bool {
        poll_until(within, || async {
            self.get_status("/probe", token).await == 401
        })
        .await
    }

    /// Waits up to a second until a media-server token is refused (401) on `/Users/Me`.
    pub async fn refused_media(&self, token: &str) -> bool {
        poll_until(Duration::from_secs(1), || async {
            client()
                .get(self.url("/Users/Me"))
                .header("X-Emby-Token", token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
                == 401
        })
        .await
    }

    /// The session signing key `(kid, secret)` from the key file.
    pub fn signing_key(&self) -> (String, Vec<u8>) {
        use base64::Engine;
        let text = std::fs::read_to_string(self.key_path()).expect("key file");
        let line = text
            .lines()
            .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .expect("a key line");
        let (kid, secret) = line.split_once(' ').expect("kid and secret");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(secret.trim())
            .expect("base64url secret");
        (kid.to_string(), bytes)
    }

    /// Resident memory of the gateway process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmRSS:")
    }

    /// The CPU time (user and system, seconds) the gateway uses while the test waits `wait`:
    /// near nothing while every connection is idle, a whole core while a task spins.
    pub async fn cpu_while(&self, wait: Duration) -> f64 {
        let cpu = || {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .expect("the gateway's /proc/PID/stat");
            // Fields after the command's closing parenthesis; utime and stime are the 12th and
            // 13th of them, in clock ticks (100 a second on Linux).
            let fields: Vec<u64> = stat
                .rsplit_once(')')
                .expect("a stat line")
                .1
                .split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect();
            (fields[11] + fields[12]) as f64 / 100.0
        };
        let before = cpu();
        tokio::time::sleep(wait).await;
        cpu() - before
    }
}

fn status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
    }
}

/// The value of the first `<input name="NAME" value="…">` in a page (values are HTML-escaped
/// by the gateway; the ones tests read are plain).
pub fn input_value(html: &str, name: &str) -> Option<String> {
    let needle = format!("name=\"{name}\" value=\"");
    let start = html.find(&needle)? + needle.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].replace("&amp;", "&"))
}

/// The `name=value` pair of a `Set-Cookie` header for `name`, if the response sets it.
pub fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").to_string())
        .find(|pair| pair.starts_with(&format!("{name}=")) && pair.len() > name.len() + 1)
}

/// Sends raw bytes to an address and returns everything read until the peer closes or 5 s pass.
/// A write the peer cut short (it answered a large head before reading all of it) is not an
/// error: the answer is what counts.
pub async fn raw_request(addr: &str, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    // One response is enough once its head and declared body have arrived.
                    if response_complete(&out) {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn response_complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(head_end) = text.find("\r\n\r\n") else {
        return false;
    };
    let head = text[..head_end].to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match len {
        Some(n) => buf.len() >= head_end + 4 + n,
        None => false,
    }
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Writes a file only its owner may read (keys and passwords).
pub fn write_private(path: &Path, contents: &[u8]) {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`, written as
/// `ca.pem`, `server.pem` and `server.key` (0600) in `dir`; the CA is named `ca_name`.
/// Returns the CA's path.
pub fn write_certificates(dir: &Path, ca_name: &str) -> PathBuf {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign the CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).expect("server SANs");
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server
        .signed_by(&server_key, &issuer)
        .expect("sign the server certificate");

    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write ca.pem");
    std::fs::write(dir.join("server.pem"), server_cert.pem()).expect("write server.pem");
    write_private(
        &dir.join("server.key"),
        server_key.serialize_pem().as_bytes(),
    );
    ca_file
}

/// A TLS (HTTP/1.1) connection as `localhost` over `tcp`, whatever certificate the server shows.
pub async fn tls_over(
    tcp: tokio::net::TcpStream,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    any_certificate_connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

/// A TLS connector that accepts any server certificate and offers `alpn`: for tests that look
/// at the certificate they are shown rather than trust it.
pub fn any_certificate_connector(alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}
