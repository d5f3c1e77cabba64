//! Zero-downtime binary upgrade with real processes: a new gateway process takes the listening
//! sockets over from the running one (`portcullis upgrade`, or `serve --upgrade` plus SIGQUIT),
//! the old one finishes its requests in flight and exits; a new process that fails leaves the
//! old one serving.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{client, poll_until, Gateway, BIN};
use crate::upstream::{pattern_byte, Upstream};

const ALICE_PW: &str = "alice-password-1234";

/// Whether `pid` runs (a zombie, exited but not yet reaped by the harness, does not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with plain integers.
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn pid_file(gw: &Gateway) -> PathBuf {
    gw.dir.path().join("portcullis.pid")
}

pub fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .strip_suffix('\n')?
        .parse()
        .ok()
}

/// Kills a process the harness does not own (a successor) when the test ends, however it ends.
pub struct Reaper(pub Mutex<Vec<u32>>);

impl Reaper {
    pub fn new() -> Self {
        Reaper(Mutex::new(Vec::new()))
    }
    pub fn watch(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            if alive(*pid) {
                signal(*pid, libc::SIGKILL);
            }
        }
    }
}

async fn wait_pid_file(gw: &Gateway, pid: u32) {
    let path = pid_file(gw);
    assert!(
        poll_until(Duration::from_secs(10), || async {
            read_pid(&path) == Some(pid)
        })
        .await,
        "the pid file never named {pid}: {:?}\n{}",
        std::fs::read_to_string(&path),
        gw.log()
    );
}

/// One request of the load: when it started and ended, and its error if it failed.
pub(crate) struct Sample {
    pub start: Instant,
    pub end: Instant,
    pub error: Option<String>,
}

/// Waits until the load has had `more` answers beyond those counted now.
pub(crate) async fn answers_grow(answered: &AtomicU64, more: u64) {
    let target = answered.load(Ordering::Relaxed) + more;
    assert!(
        poll_until(Duration::from_secs(30), || async {
            answered.load(Ordering::Relaxed) >= target
        })
        .await,
        "the load got no answers"
    );
}

/// Sends a GET every 5 ms (200 per second), each on a new connection, until `stop` is set;
/// counts every answer (good or not) in `answered`.
pub(crate) async fn load(
    url: String,
    token: String,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> Vec<Sample> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let (http, url, token, samples, answered) = (
            http.clone(),
            url.clone(),
            token.clone(),
            samples.clone(),
            answered.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let error = match http.get(&url).bearer_auth(&token).send().await {
                Ok(r) if r.status() == 200 => match r.text().await {
                    Ok(body) if body.starts_with("upstream ok") => None,
                    Ok(body) => Some(format!("unexpected body {body:?}")),
                    Err(e) => Some(format!("body: {e}")),
                },
                Ok(r) => Some(format!("status {}", r.status())),
                Err(e) => Some(format!("{e:?}")),
            };
            samples.lock().unwrap().push(Sample {
                start,
                end: Instant::now(),
                error,
            });
            answered.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(samples).ok().unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_drops_no_request_and_finishes_the_download_in_flight() {
    const SIZE: u64 = 200 * 1024 * 1024;
    /// The client reads the download at this rate, so it spans the hand-over.
    const RATE: f64 = 25.0 * 1024.0 * 1024.0;
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .server_keys("grace_period = \"60s\"")
        .start()
        .await;
    let reaper = Reaper::new();
    let token = gw.login("alice", ALICE_PW).await.token;
    let old = gw.pid();
    wait_pid_file(&gw, old).await;

    // A large download, read slowly.
    let received = Arc::new(AtomicU64::new(0));
    let download = {
        let (url, token, received) = (
            gw.url(&format!("/bytes/{SIZE}")),
            token.clone(),
            received.clone(),
        );
        tokio::spawn(async move {
            let mut resp = client().get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let started = Instant::now();
            let mut n: u64 = 0;
            let mut exact = true;
            while let Some(chunk) = resp.chunk().await.unwrap() {
                exact &= chunk
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == pattern_byte(n + i as u64));
                n += chunk.len() as u64;
                received.store(n, Ordering::Relaxed);
                let due = Duration::from_secs_f64(n as f64 / RATE);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            (n, exact, Instant::now())
        })
    };
    assert!(
        poll_until(Duration::from_secs(10), || async {
            received.load(Ordering::Relaxed) >= 16 * 1024 * 1024
        })
        .await,
        "the download did not start"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let load_task = tokio::spawn(load(
        gw.url("/probe"),
        token.clone(),
        stop.clone(),
        answered.clone(),
    ));
    answers_grow(&answered, 100).await; // load before the hand-over

    let config = gw.config_path();
    let upgrade_started = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("upgrade")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let upgraded = Instant::now();
    let new = read_pid(&pid_file(&gw)).unwrap_or(0);
    reaper.watch(new);
    assert!(
        out.status.success(),
        "portcullis upgrade failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {new} serves now")));
    assert_ne!(new, old);
    assert!(alive(new), "the new process is not running");

    // The old process finishes the download, then exits; the new one serves throughout.
    assert!(
        poll_until(Duration::from_secs(90), || async { !alive(old) }).await,
        "the old process did not exit:\n{}",
        gw.log()
    );
    let old_exited = Instant::now();
    let (bytes, exact, download_done) = download.await.unwrap();
    assert_eq!(bytes, SIZE, "the download was cut short");
    assert!(exact, "the download's bytes differ from the upstream's");
    assert!(
        download_done > upgraded + Duration::from_secs(5),
        "the download ended before the old process stopped accepting: it proves nothing"
    );
    assert!(
        old_exited + Duration::from_millis(500) >= download_done,
        "the old process exited before its download finished"
    );
    answers_grow(&answered, 200).await; // load after the old process is gone
    stop.store(true, Ordering::Relaxed);
    let samples = load_task.await.unwrap();

    let failed: Vec<&String> = samples.iter().filter_map(|s| s.error.as_ref()).collect();
    let mut ends: Vec<Instant> = samples.iter().map(|s| s.end).collect();
    ends.sort();
    let max_gap = ends
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let max_latency = samples
        .iter()
        .map(|s| s.end - s.start)
        .max()
        .unwrap_or_default();
    let span = ends.last().copied().unwrap() - ends[0];
    eprintln!(
        "upgrade: {} requests over {:.1} s, {} failed; longest gap between answers {} ms, slowest request {} ms; \
         `portcullis upgrade` took {} ms; old process exited {} ms after the hand-over ({} ms after its download ended)",
        samples.len(),
        span.as_secs_f64(),
        failed.len(),
        max_gap.as_millis(),
        max_latency.as_millis(),
        (upgraded - upgrade_started).as_millis(),
        (old_exited - upgraded).as_millis(),
        old_exited.saturating_duration_since(download_done).as_millis(),
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        samples.len() as f64 >= span.as_secs_f64() * 100.0 && span > Duration::from_secs(5),
        "the load was too thin to mean anything: {} requests over {span:?}",
        samples.len()
    );

    // The new process answers on the admin listener too, and cleans up after itself.
    let ready = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    signal(new, libc::SIGTERM);
    assert!(poll_until(Duration::from_secs(30), || async { !alive(new) }).await);
    assert!(!pid_file(&gw).exists(), "the new process left its pid file");
    drop(up);
}

#[tokio::test]
async fn serve_upgrade_started_by_hand_takes_over_on_sigquit() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let reaper = Reaper::new();
    let token = gw.login("alice", ALICE_PW).await.token;
    let old = gw.pid();
    wait_pid_file(&gw, old).await;

    let log = std::fs::File::create(gw.dir.path().join("successor.log")).unwrap();
    let mut child: Child = Command::new(BIN)
        .arg("--config")
        .arg(gw.config_path())
        .args(["serve", "--upgrade"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let new = child.id();
    reaper.watch(new);
    // It waits for the old process's sockets; the old one serves meanwhile.
    assert_eq!(gw.get_status("/probe", &token).await, 200);
    // A connection the old process accepted whose request has not arrived yet when it stops
    // accepting: the request, sent just after the shutdown began, is still answered.
    let mut waiting = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    signal(old, libc::SIGQUIT);
    wait_pid_file(&gw, new).await;
    assert!(
        poll_until(Duration::from_secs(30), || async {
            gw.log().contains("finishing the requests in flight")
        })
        .await,
        "the old process never began its shutdown:\n{}",
        gw.log()
    );
    let answer = answer_on(&mut waiting, &token).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "the old process must not keep the connection: {answer}"
    );
    assert!(answer.contains("upstream ok: GET /probe"), "{answer}");
    assert!(
        poll_until(Duration::from_secs(30), || async { !alive(old) }).await,
        "the old process did not exit:\n{}",
        gw.log()
    );
    assert_eq!(gw.get_status("/probe", &token).await, 200);
    assert!(alive(new));
    signal(new, libc::SIGINT);
    let status = child.wait().unwrap();
    assert!(status.success(), "the new process ended with {status}");
    assert!(!pid_file(&gw).exists());
}

/// Sends one `GET /probe` on `conn` and reads the answer until the server closes.
async fn answer_on(conn: &mut tokio::net::TcpStream, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head =
        format!("GET /probe HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("the old process neither answered nor closed")
        .expect("the connection was reset");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_new_process_that_fails_leaves_the_old_one_serving() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let token = gw.login("alice", ALICE_PW).await.token;
    let old = gw.pid();
    wait_pid_file(&gw, old).await;

    // The successor reads the config again and finds it broken.
    let config = gw.config_path();
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("[store]", "[store]\nno_such_key = 1")).unwrap();
    signal(old, libc::SIGUSR2);
    let log = gw.log_containing("upgrade failed").await;
    assert!(log.contains("exited before taking over"), "{log}");
    assert!(log.contains("this process keeps serving"), "{log}");

    assert!(alive(old));
    assert_eq!(read_pid(&pid_file(&gw)), Some(old));
    assert_eq!(gw.get_status("/probe", &token).await, 200);
    let ready = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // `portcullis upgrade` with a broken config refuses before signalling anything.
    let out = gw.cli(&["upgrade"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_key"));
    std::fs::write(&config, good).unwrap();
    assert!(alive(old));
}
