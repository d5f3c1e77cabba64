//! The container image and the compose example, with real tools: `portcullis healthcheck`
//! against a real gateway; the image built by Podman from the Containerfile, on a runtime base
//! made here from Debian packages (scripts/container-bases), around this build's binary; its
//! binary run from the mounted image as the image's user, on a read-only root with only /data
//! writable, in a network namespace of its own; the image run as a real container (Podman and
//! crun, read-only root, a named volume, its HEALTHCHECK); the compose file read by
//! podman-compose.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Gateway, BIN};
use crate::upstream::Upstream;

const IMAGE: &str = "localhost/portcullis:it";
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    out
}

fn healthcheck(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("healthcheck")
        .args(args)
        .output()
        .expect("run portcullis healthcheck")
}

#[tokio::test]
async fn healthcheck_is_healthy_while_the_gateway_runs_and_not_after() {
    let up = Upstream::start().await;
    let mut gw = Gateway::builder(&up.url()).start().await;
    let out = gw.cli(&["healthcheck"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let admin = gw.admin.trim_start_matches("http://").to_string();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ok: http://{admin}/healthz answered 200")
    );
    // An explicit address does the same without a config.
    let out = healthcheck(&["--config", "/nonexistent.toml", "--addr", &admin]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    gw.kill();
    let out = gw.cli(&["healthcheck"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("portcullis: unhealthy: cannot connect to") && err.lines().count() == 1,
        "{err}"
    );
}

/// A one-shot TCP server that answers every connection with `answer` (or nothing when `None`).
fn fake_admin(answer: Option<&'static [u8]>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 512];
            let _ = conn.read(&mut buf);
            match answer {
                Some(a) => {
                    let _ = conn.write_all(a);
                }
                // Hold the connection open without a word, until the client gives up.
                None => {
                    let _ = conn.read(&mut buf);
                }
            }
        }
    });
    addr
}

#[test]
fn healthcheck_reports_what_is_wrong_in_one_line_with_exit_1() {
    let cases: [(Option<&'static [u8]>, &str); 3] = [
        (
            Some(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"),
            "/healthz answered 503",
        ),
        (Some(b"SSH-2.0-OpenSSH_9.2\r\n"), "the answer is not HTTP"),
        (None, "no answer within 300ms"),
    ];
    for (answer, expected) in cases {
        let addr = fake_admin(answer);
        let started = Instant::now();
        let out = healthcheck(&["--addr", &addr, "--timeout", "300ms"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{expected}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "took too long");
    }

    // A config that cannot be read, or names no address, is a failed check too (exit 1, never 2,
    // which health checks reserve).
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\nadmin_listen = 9090\n").unwrap();
    for (args, expected) in [
        (
            vec!["--config", "/nonexistent/portcullis.toml"],
            "cannot read",
        ),
        (
            vec!["--config", bad.to_str().unwrap()],
            "server.admin_listen",
        ),
        (
            vec!["--addr", "no port here"],
            "`no port here` is not a host:port",
        ),
    ] {
        let out = healthcheck(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "{expected}: {}",
            text(&out)
        );
    }
}

/// The image, built once per test run.
struct Image {
    inspect: Value,
}

impl Image {
    /// Podman's inspect shows the HEALTHCHECK at the top level, Docker's under `Config`.
    fn healthcheck(&self) -> &Value {
        match &self.inspect["Healthcheck"] {
            Value::Null => &self.inspect["Config"]["Healthcheck"],
            found => found,
        }
    }
}

/// This sandbox may not raise resource limits, and crun sets its defaults (more open files and
/// processes than the hard limits here) unless told which to set: this process's open-file limit,
/// and 4096 processes (threads count too; the gateway needs a few dozen).
fn container_limits() -> Vec<String> {
    let hard = |resource| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        assert_eq!(unsafe { libc::getrlimit(resource, &mut lim) }, 0);
        lim.rlim_max
    };
    let nofile = hard(libc::RLIMIT_NOFILE);
    let nproc = hard(libc::RLIMIT_NPROC).min(4096);
    let limit = |name: &str, n: libc::rlim_t| {
        if n == libc::RLIM_INFINITY {
            format!("{name}=-1:-1")
        } else {
            format!("{name}={n}:{n}")
        }
    };
    vec![
        "--ulimit".into(),
        limit("nofile", nofile),
        "--ulimit".into(),
        limit("nproc", nproc),
    ]
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the image tests need root (podman image mount, unshare, chroot); run them as root"
    );
}

/// The image, built once per test run from the Containerfile's runtime stage around this
/// build's binary (`--target prebuilt`, stripped): compiling the gateway again inside the builder
/// stage takes longer than this machine's CI budget allows (the README has the full build's
/// figures).
fn image() -> &'static Image {
    static IMAGE_ONCE: OnceLock<Image> = OnceLock::new();
    IMAGE_ONCE.get_or_init(|| {
        require_root();
        let started = Instant::now();
        let bases =
            run(Command::new(format!("{ROOT}/scripts/container-bases")).arg("--runtime-only"));
        let build_args = String::from_utf8(bases.stdout).unwrap();
        let bases_done = started.elapsed();
        let prebuilt = Path::new(ROOT).join("target/container/portcullis");
        std::fs::create_dir_all(prebuilt.parent().unwrap()).unwrap();
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&prebuilt)
            .arg(BIN));
        let mut build = Command::new("podman");
        build
            .current_dir(ROOT)
            .args([
                "build",
                "--isolation=chroot",
                "--format",
                "docker",
                "--quiet",
            ])
            .args(build_args.split_whitespace())
            .args(["--target", "prebuilt", "-t", IMAGE, "."]);
        run(&mut build);
        eprintln!(
            "container: runtime base ready in {:.0?}, image built in {:.0?}",
            bases_done,
            started.elapsed() - bases_done
        );
        let out = run(Command::new("podman").args(["image", "inspect", IMAGE]));
        let inspect: Value = serde_json::from_slice(&out.stdout).unwrap();
        Image {
            inspect: inspect[0].clone(),
        }
    })
}

/// Calls `probe` until it gives a value or `within` has passed (these tests drive blocking
/// commands; the async harness has `poll_until`).
fn poll_blocking<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn image_declares_a_non_root_user_the_data_volume_and_a_health_check() {
    let img = image();
    let config = &img.inspect["Config"];
    let user = config["User"].as_str().unwrap_or_default().to_string();
    let uid: u32 = user.split(':').next().unwrap().parse().unwrap_or(0);
    assert!(uid != 0, "the image runs as root: {user:?}");
    assert!(
        config["Volumes"].get("/data").is_some(),
        "no /data volume: {config}"
    );
    assert_eq!(
        strings(&img.healthcheck()["Test"]),
        ["CMD", "/usr/local/bin/portcullis", "healthcheck"],
        "{config}"
    );
    assert_eq!(config["StopSignal"], "SIGTERM");
    assert_eq!(
        strings(&config["Entrypoint"]),
        ["/usr/local/bin/portcullis"]
    );
    assert_eq!(strings(&config["Cmd"]), ["serve"]);
    assert!(strings(&config["Env"]).contains(&"PORTCULLIS_CONFIG=/config/portcullis.toml".into()));
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    let size = img.inspect["Size"].as_u64().unwrap_or(0);
    eprintln!("container: image size {:.1} MB", size as f64 / 1e6);
    assert!(size > 0);
}

/// The mounted image root, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn new() -> Mounted {
        let out = run(Command::new("podman").args(["image", "mount", IMAGE]));
        Mounted(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["image", "unmount", IMAGE])
            .output();
    }
}

/// What a container runtime provides around the image: /etc/hosts (the compose service name
/// `jellyfin` resolves), /etc/resolv.conf, mount points for /proc and /dev.
fn runtime_extras(dir: &Path) -> PathBuf {
    let extra = dir.join("extra");
    std::fs::create_dir_all(extra.join("etc")).unwrap();
    std::fs::create_dir_all(extra.join("proc")).unwrap();
    std::fs::create_dir_all(extra.join("dev")).unwrap();
    std::fs::write(
        extra.join("etc/hosts"),
        "127.0.0.1 localhost jellyfin\n::1 localhost\n",
    )
    .unwrap();
    std::fs::write(extra.join("etc/resolv.conf"), "").unwrap();
    extra
}

/// A command that runs `args` in new mount and network namespaces, chrooted into a read-only
/// view of the image (overlay of the runtime extras over the image, both read-only) with only
/// `data` writable at /data, as the image's user and with the image's environment.
fn in_image(img: &Image, image_root: &Path, extra: &Path, root: &Path, data: &Path) -> Command {
    let config = &img.inspect["Config"];
    let user = config["User"].as_str().unwrap().to_string();
    let setup = r#"set -eu
image=$1 extra=$2 root=$3 data=$4 user=$5; shift 5
ip link set lo up
mount -t overlay overlay -o "lowerdir=$extra:$image" "$root"
mount --bind "$data" "$root/data"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
exec chroot --userspec="$user" "$root" "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--net", "--", "sh", "-c", setup, "sh"])
        .arg(image_root)
        .arg(extra)
        .arg(root)
        .arg(data)
        .arg(&user)
        .env_clear();
    for kv in strings(&config["Env"]) {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd
}

/// Enters the namespaces of `pid` (made by `in_image`) and runs `args` in its chroot as `user`.
fn in_namespaces_of(pid: u32, img: &Image, root: &Path, args: &[String]) -> Output {
    let config = &img.inspect["Config"];
    let user = config["User"].as_str().unwrap().to_string();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--target={pid}"))
        .args(["--mount", "--net", "--", "chroot"])
        .arg(format!("--userspec={user}"))
        .arg(root)
        .args(args)
        .env_clear();
    for kv in strings(&config["Env"]) {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.output().expect("nsenter")
}

/// Collects a child's stdout lines as they come.
fn collect_stdout(child: &mut Child) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let out = child.stdout.take().unwrap();
    let sink = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            let mut b = sink.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

#[test]
fn image_binary_serves_as_its_user_on_a_read_only_root_writing_only_data() {
    let img = image();
    let mounted = Mounted::new();
    let dir = tempfile::tempdir().unwrap();
    let extra = runtime_extras(dir.path());
    let root = dir.path().join("root");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let user = img.inspect["Config"]["User"].as_str().unwrap().to_string();
    let (uid, gid) = user.split_once(':').unwrap();
    run(Command::new("chown").arg(&user).arg(&data));

    // The image as built: the binary is root's (its user cannot replace it), /data the user's.
    let meta = |p: &str| std::fs::metadata(mounted.0.join(p)).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta("usr/local/bin/portcullis").uid(), 0);
    assert_eq!(meta("data").uid().to_string(), uid);
    assert_eq!(meta("data").gid().to_string(), gid);
    assert_eq!(
        meta("data").mode() & 0o777,
        0o700,
        "/data is its user's alone"
    );
    assert!(meta("config/portcullis.toml").is_file());

    let one_shot = |args: &[&str]| {
        in_image(img, &mounted.0, &extra, &root, &data)
            .args(args)
            .output()
            .unwrap()
    };
    let out = one_shot(&["/usr/local/bin/portcullis", "--version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION")),
        "{}",
        text(&out)
    );
    let out = one_shot(&["/usr/local/bin/portcullis", "check-config"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/config/portcullis.toml: ok (1 route"),
        "{}",
        text(&out)
    );

    // The image's own command, as a container would start it.
    let config = &img.inspect["Config"];
    let command: Vec<String> = strings(&config["Entrypoint"])
        .into_iter()
        .chain(strings(&config["Cmd"]))
        .collect();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut serve = in_image(img, &mounted.0, &extra, &root, &data)
        .args(&command)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = collect_stdout(&mut serve);
    let pid = serve.id();

    // The image's HEALTHCHECK, run where a container runtime runs it, until it passes.
    let check: Vec<String> = strings(&img.healthcheck()["Test"])[1..].to_vec();
    let mut last = None;
    let healthy = poll_blocking(Duration::from_secs(60), || {
        let out = in_namespaces_of(pid, img, &root, &check);
        let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
        assert!(serve.try_wait().unwrap().is_none(), "serve exited: {log}");
        if out.status.success() {
            return Some(out);
        }
        last = Some(format!("{}\n{log}", text(&out)));
        None
    })
    .unwrap_or_else(|| panic!("never healthy: {}", last.unwrap_or_default()));
    assert!(
        String::from_utf8_lossy(&healthy.stdout).contains("127.0.0.1:9090/healthz answered 200")
    );

    // The first start printed the first admin password, as on bare metal.
    let printed = stdout.lock().unwrap().clone();
    let password = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("password:"))
        .map(|p| p.trim().to_string())
        .unwrap_or_default();
    assert!(password.len() >= 16, "no admin password printed: {printed}");
    assert!(printed.contains("portcullis --config /config/portcullis.toml user passwd admin"));

    // The process runs as the image's user.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == uid),
        "{uid_line}"
    );

    // STOPSIGNAL SIGTERM: a clean stop.
    // SAFETY: kill takes no pointers; pid is our child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = poll_blocking(Duration::from_secs(30), || serve.try_wait().unwrap())
        .expect("still running after SIGTERM");
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    assert!(status.success(), "serve ended with {status}: {log}");
    assert!(!log.contains(&password), "the password reached the log");

    // Everything it wrote is in /data, owned by its user.
    let mut written: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    for f in ["portcullis.db", "secrets.key", "session.key"] {
        assert!(
            written.contains(&f.to_string()),
            "{f} missing in {written:?}"
        );
    }
    for f in &written {
        assert_eq!(
            std::fs::metadata(data.join(f)).unwrap().uid().to_string(),
            uid,
            "{f}"
        );
    }
    let key_mode = std::fs::metadata(data.join("session.key")).unwrap().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    drop(mounted);
}

#[test]
fn image_runs_as_a_real_container() {
    let img = image();
    let user = img.inspect["Config"]["User"].as_str().unwrap().to_string();
    let probe = Command::new("podman")
        .arg("run")
        .args(container_limits())
        .args(["--rm", "--network", "none", IMAGE, "--version"])
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "a container cannot start here (scripts/test prepares cgroups for crun): {}",
        text(&probe)
    );
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
    let name = format!("portcullis-it-{}", std::process::id());
    let volume = format!("{name}-data");
    let out = run(Command::new("podman")
        .arg("run")
        .args(container_limits())
        .args([
            "-d",
            "--name",
            &name,
            "--read-only",
            "--add-host",
            "jellyfin:127.0.0.1",
            "-v",
            &format!("{volume}:/data"),
            IMAGE,
        ]));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let cleanup = || {
        let _ = Command::new("podman").args(["rm", "-f", &id]).output();
        let _ = Command::new("podman")
            .args(["volume", "rm", "-f", &volume])
            .output();
    };
    let mut last = String::new();
    let healthy = poll_blocking(Duration::from_secs(60), || {
        let hc = Command::new("podman")
            .args(["healthcheck", "run", &id])
            .output()
            .unwrap();
        last = text(&hc);
        hc.status.success().then_some(())
    });
    if healthy.is_none() {
        cleanup();
        panic!("container never healthy: {last}");
    }
    let top = run(Command::new("podman").args(["top", &id, "user"]));
    let logs = run(Command::new("podman").args(["logs", &id]));
    let stopped = Command::new("podman")
        .args(["stop", "-t", "20", &id])
        .output()
        .unwrap();
    cleanup();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(
        !top.lines().skip(1).any(|l| l.trim() == "root"),
        "{top} ({user})"
    );
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("created the first admin account"),
        "{}",
        text(&logs)
    );
    assert!(stopped.status.success(), "{}", text(&stopped));
}

#[test]
fn compose_example_parses_and_keeps_jellyfin_behind_the_gateway() {
    // podman-compose from PyPI, installed by scripts/test (Debian's 1.0.3 has no `config` and
    // turns exec-form health checks into shell commands).
    let compose = format!("{ROOT}/target/tools/podman-compose/podman_compose.py");
    assert!(
        Path::new(&compose).exists(),
        "{compose} is missing: scripts/test installs it"
    );
    let out = run(Command::new("python3")
        .arg(&compose)
        .args(["-f", "deploy/compose.yaml", "config"])
        .current_dir(ROOT));
    // Its normalised YAML, read back with the YAML library it uses itself.
    let mut to_json = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    to_json
        .stdin
        .take()
        .unwrap()
        .write_all(&out.stdout)
        .unwrap();
    let json = to_json.wait_with_output().unwrap();
    assert!(json.status.success());
    let c: Value = serde_json::from_slice(&json.stdout).unwrap();
    let jf = &c["services"]["jellyfin"];
    let pc = &c["services"]["portcullis"];

    assert!(jf.get("ports").is_none(), "Jellyfin publishes a port: {jf}");
    let jf_nets = strings(&jf["networks"]);
    assert!(!jf_nets.is_empty());
    for n in &jf_nets {
        assert_eq!(
            c["networks"][n]["internal"], true,
            "network {n} is not internal"
        );
    }
    let pc_nets = strings(&pc["networks"]);
    assert!(
        jf_nets.iter().all(|n| pc_nets.contains(n)),
        "the gateway cannot reach Jellyfin"
    );
    assert!(
        pc_nets.iter().any(|n| c["networks"][n]["internal"] != true),
        "the gateway is only on internal networks"
    );
    assert_eq!(strings(&pc["ports"]), ["8080:8080"]);
    assert_eq!(
        strings(&pc["healthcheck"]["test"]),
        ["CMD", "/usr/local/bin/portcullis", "healthcheck"]
    );
    assert!(jf["healthcheck"]["test"].is_array());
    assert_eq!(pc["depends_on"]["jellyfin"]["condition"], "service_healthy");
    for s in [jf, pc] {
        assert_eq!(s["restart"], "unless-stopped");
    }
    assert_eq!(pc["read_only"], true);
    assert!(strings(&pc["volumes"]).contains(&"portcullis-data:/data".into()));
    assert!(strings(&jf["volumes"]).contains(&"jellyfin-config:/config".into()));
    // The config it mounts is the one the image ships (checked in the image test).
    assert!(strings(&pc["volumes"])
        .contains(&"./portcullis.container.toml:/config/portcullis.toml:ro".into()));
    assert_eq!(
        pc["image"], "localhost/portcullis:latest",
        "compose builds the image under this name"
    );
}
