//! Start-up errors a self-hoster meets first: an address that is already taken is reported
//! once, naming the config key, the address and the cause, and the process exits 1 without
//! serving anything.

use std::net::TcpListener;
use std::process::Command;

use crate::harness::{Gateway, BIN};
use crate::upstream::Upstream;

#[tokio::test]
async fn a_taken_address_is_reported_once_with_its_key() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).configure();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    for key in ["listen", "admin_listen"] {
        let text: String = config
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} = ")) {
                    format!("{key} = \"{addr}\"\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let path = gw.dir.path().join(format!("{key}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .arg("serve")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{key}: {stderr}");
        let want = format!("cannot listen on {addr} (server.{key}): Address already in use");
        assert_eq!(stderr.matches(&want).count(), 1, "{key}: {stderr}");
        assert_eq!(
            stderr.matches("Address already in use").count(),
            1,
            "{key}: {stderr}"
        );
        assert!(stderr.contains("already listening there?"), "{stderr}");
        assert!(
            !stderr.contains("created the first admin account"),
            "it got as far as creating an account: {stderr}"
        );
    }
    drop(taken);
}
