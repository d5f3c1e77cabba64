//! The container's health check and the compose example, with real tools: `portcullis
//! healthcheck` against a real gateway, and the compose file read by podman-compose. The tests
//! that build the image with Podman and run its binary from the mounted image are not here
//! yet: a cold image build did not finish within this machine's CI budget (see the README).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Gateway, BIN};
use crate::upstream::Upstream;

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
