//! Running under systemd: the shipped unit passes `systemd-analyze verify` and rates "OK" or
//! better in `systemd-analyze security`; the sysusers and tmpfiles snippets apply; the gateway
//! sends READY=1 to `$NOTIFY_SOCKET` only once its public listener accepts (and `/readyz`
//! answers 503 until then), WATCHDOG=1 when systemd asks for it, and STOPPING=1 on shutdown.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{client, poll_until, Gateway, BIN};
use crate::upgrade::{alive, read_pid, signal, Reaper};
use crate::upstream::Upstream;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// The shipped unit with ExecStart pointing at the binary under test (verify checks that the
/// executable exists); nothing else changed.
fn unit_under_test(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(deploy("portcullis.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/portcullis "));
    let unit = dir.join("portcullis.service");
    std::fs::write(&unit, text.replace("/usr/bin/portcullis", BIN)).unwrap();
    unit
}

#[test]
fn the_unit_verifies_and_rates_ok_or_better() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_under_test(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (package systemd; scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("portcullis.service"),
        "systemd-analyze verify complains about the unit:\n{stderr}"
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for portcullis.service:"))
        .unwrap_or_else(|| {
            panic!(
                "no overall rating:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let rating: f64 = line
        .rsplit_once(':')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the rating in {line:?}"));
    eprintln!("systemd-analyze security: {}", line.trim());
    assert!(
        rating <= 2.0,
        "exposure {rating} is worse than OK (2.0): {line}"
    );
}

#[test]
fn the_sysusers_and_tmpfiles_snippets_create_the_user_and_directories() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::create_dir_all(root.path().join("var/lib")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(deploy("portcullis.sysusers"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("portcullis:"))
        .unwrap_or_else(|| panic!("no portcullis user in {passwd}"));
    assert!(
        user.ends_with(":/var/lib/portcullis:/usr/sbin/nologin"),
        "{user}"
    );

    let out = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(deploy("portcullis.tmpfiles"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::MetadataExt;
    let state = std::fs::metadata(root.path().join("var/lib/portcullis")).unwrap();
    assert_eq!(state.mode() & 0o777, 0o750);
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(state.uid(), uid);
}

/// A notify socket the test binds: every datagram with the time it came and whether the
/// gateway's public port accepted a connection at that moment.
struct Notifications {
    path: PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String, bool)>>>,
}

impl Notifications {
    fn bind(dir: &Path, port: u16) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the test drops the other handle (its Arc count falls to one).
            while Arc::strong_count(&log) > 1 {
                if let Ok(n) = socket.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let accepts =
                        msg.contains("READY=1") && TcpStream::connect(("127.0.0.1", port)).is_ok();
                    log.lock().unwrap().push((Instant::now(), msg, accepts));
                }
            }
        });
        Notifications { path, seen }
    }

    fn messages(&self) -> Vec<(Instant, String, bool)> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.messages()
            .iter()
            .filter(|(_, m, _)| m.lines().any(|l| l == needle))
            .count()
    }
}

fn spawn(gw: &Gateway, args: &[&str], notify: &Path, watchdog_usec: Option<&str>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(gw.log_path())
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(gw.config_path())
        .args(args)
        .env("NOTIFY_SOCKET", notify)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec);
    }
    cmd.spawn().unwrap()
}

#[tokio::test]
async fn ready_comes_only_once_the_public_listener_accepts_and_readyz_agrees() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).configure();
    let notify = Notifications::bind(gw.dir.path(), gw.port);
    let reaper = Reaper::new();

    // A process that takes its listener from another (`serve --upgrade`) has its admin
    // listener, store and view long before the public listener: the window an orchestrator
    // must not send traffic in. This test plays the old process and holds the listener.
    let listener = std::net::TcpListener::bind(("127.0.0.1", gw.port)).unwrap();
    let mut child = spawn(&gw, &["serve", "--upgrade"], &notify.path, Some("200000"));
    reaper.watch(child.id());
    let readyz = format!("{}/readyz", gw.admin);
    assert!(
        poll_until(Duration::from_secs(20), || async {
            client().get(&readyz).send().await.is_ok()
        })
        .await,
        "the admin listener never answered:\n{}",
        gw.log()
    );
    let r = client().get(&readyz).send().await.unwrap();
    let (status, body) = (r.status().as_u16(), r.text().await.unwrap_or_default());
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the public listener is not accepting connections yet"),
        "{body}"
    );
    let health = client()
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        200,
        "liveness does not wait for the listener"
    );
    assert_eq!(
        notify.count("READY=1"),
        0,
        "READY=1 before the listener was there"
    );

    // Hand the listener over the way an old gateway does.
    let sock = gw.dir.path().join("portcullis.upgrade.sock");
    // Non-blocking, as a gateway's own listening socket is.
    listener.set_nonblocking(true).unwrap();
    let fd = listener.as_raw_fd();
    let addr = format!("127.0.0.1:{}", gw.port);
    let sock_path = sock.display().to_string();
    tokio::task::spawn_blocking(move || {
        let mut fds = pingora::server::Fds::new();
        fds.add(addr, fd);
        fds.send_to_sock(sock_path.as_str()).unwrap();
        drop(listener);
    })
    .await
    .unwrap();

    assert!(
        poll_until(Duration::from_secs(20), || async {
            notify.count("READY=1") > 0
        })
        .await,
        "no READY=1:\n{}",
        gw.log()
    );
    let ready = notify
        .messages()
        .into_iter()
        .find(|(_, m, _)| m.lines().any(|l| l == "READY=1"))
        .unwrap();
    assert!(
        ready.2,
        "READY=1 came while the public listener refused connections"
    );
    assert!(
        ready.1.contains(&format!("MAINPID={}", child.id())),
        "a process that took over names itself the main process: {:?}",
        ready.1
    );
    let r = client().get(&readyz).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        read_pid(&gw.dir.path().join("portcullis.pid")),
        Some(child.id())
    );
    let through = client()
        .get(gw.url("/_portcullis/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(through.status(), 200);

    // WATCHDOG_USEC=200000: a ping every 100 ms.
    let before = notify.count("WATCHDOG=1");
    let start = Instant::now();
    assert!(
        poll_until(Duration::from_secs(5), || async {
            notify.count("WATCHDOG=1") >= before + 5
        })
        .await,
        "watchdog pings missing"
    );
    eprintln!(
        "watchdog: 5 pings in {} ms (WATCHDOG_USEC=200000)",
        start.elapsed().as_millis()
    );
    assert_eq!(notify.count("STOPPING=1"), 0);

    signal(child.id(), libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}\n{}", gw.log());
    assert_eq!(notify.count("STOPPING=1"), 1, "{:?}", notify.messages());
    assert!(!alive(child.id()));
    assert!(!gw.dir.path().join("portcullis.pid").exists());
}

#[tokio::test]
async fn a_plain_start_notifies_ready_once_listening_and_no_watchdog_unasked() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).configure();
    let notify = Notifications::bind(gw.dir.path(), gw.port);
    let reaper = Reaper::new();
    let mut child = spawn(&gw, &["serve"], &notify.path, None);
    reaper.watch(child.id());
    assert!(
        poll_until(Duration::from_secs(30), || async {
            notify.count("READY=1") > 0
        })
        .await,
        "no READY=1:\n{}",
        gw.log()
    );
    let (_, msg, accepted) = notify.messages().into_iter().next().unwrap();
    assert!(
        accepted,
        "READY=1 came while the public listener refused connections"
    );
    assert!(!msg.contains("MAINPID="), "{msg}");
    let r = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(notify.count("WATCHDOG=1"), 0);
    signal(child.id(), libc::SIGINT);
    assert!(child.wait().unwrap().success());
    assert_eq!(notify.count("STOPPING=1"), 1);
}
