//! The command line: exit codes (0 done, 1 refused, 2 bad usage or config), generated
//! passwords, listings, and config errors that name the key.

use std::process::Command;

use crate::harness::{Gateway, BIN};
use crate::upstream::Upstream;

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[tokio::test]
async fn user_add_generates_a_password_that_logs_in() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", "alice-password-1234")
        .start()
        .await;
    let out = gw.cli_ok(&["user", "add", "carol", "--admin"]);
    let password = out
        .lines()
        .find_map(|l| l.strip_prefix("password (shown only once): "))
        .expect("a generated password");
    assert!(password.len() >= 16);
    let login = gw.login("carol", password).await;
    assert_eq!(gw.get_status("/x", &login.token).await, 200);

    let list: serde_json::Value =
        serde_json::from_str(&gw.cli_ok(&["user", "list", "--json"])).unwrap();
    let carol = list
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "carol")
        .unwrap();
    assert_eq!(carol["admin"], true);
    assert!(!gw.cli_ok(&["user", "list"]).contains(password));
}

#[tokio::test]
async fn refused_actions_exit_1_with_one_line() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", "alice-password-1234")
        .start()
        .await;
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["user", "add", "alice", "--password-stdin"],
            "already exists",
        ),
        (vec!["signout", "--user", "nobody"], "no user named"),
        (
            vec!["session", "revoke", "0123456789abcdef0123456789abcdef"],
            "no session",
        ),
        (vec!["session", "revoke", "xyz"], "not a session id"),
        (
            vec!["user", "add", "bad name!", "--password-stdin"],
            "not a valid user name",
        ),
        (vec!["user", "disable", "ghost"], "no user named"),
    ];
    for (args, want) in cases {
        let out = gw.cli_with_stdin(&args, "a-long-enough-password\n");
        assert_eq!(code(&out), 1, "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    let out = gw.cli_with_stdin(&["user", "passwd", "alice", "--password-stdin"], "short\n");
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12"));
}

#[tokio::test]
async fn bad_usage_exits_2() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).start().await;
    assert_eq!(code(&gw.cli(&["user", "frobnicate"])), 2);
    assert_eq!(code(&gw.cli(&["signout"])), 2);
    assert_eq!(code(&gw.cli(&["signout", "--user", "a", "--everyone"])), 2);
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[server]\nlisten = \"nowhere\"\n[[route]]\nname=\"a\"\nupstream=\"127.0.0.1:1\"\n",
            "server.listen",
        ),
        (
            "[[route]]\nname=\"a\"\nupstream=\"127.0.0.1:1\"\nkind=\"emby9\"\n",
            "route[0].kind",
        ),
        (
            "[session]\nttl = \"forever\"\n[[route]]\nname=\"a\"\nupstream=\"127.0.0.1:1\"\n",
            "ttl",
        ),
        (
            "[store]\nurl = \"mysql://x\"\n[[route]]\nname=\"a\"\nupstream=\"127.0.0.1:1\"\n",
            "store.url",
        ),
        (
            "[server]\nsurprise = 1\n[[route]]\nname=\"a\"\nupstream=\"127.0.0.1:1\"\n",
            "surprise",
        ),
        ("", "route"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        for args in [vec!["check-config"], vec!["user", "list"], vec!["serve"]] {
            let out = Command::new(BIN)
                .arg("--config")
                .arg(&path)
                .args(&args)
                .output()
                .unwrap();
            assert_eq!(code(&out), 2, "{text} {args:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("bad.toml") && err.contains(key),
                "{key}: {err}"
            );
        }
    }
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/portcullis.toml", "check-config"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2);
}

#[test]
fn shipped_configs_pass_check_config() {
    let root = env!("CARGO_MANIFEST_DIR");
    // The Plex example names the server's token file, which check-config reads: the test
    // gives it one in a scratch directory.
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("plex-server.token");
    std::fs::write(&token, "server-token-from-preferences-xml\n").unwrap();
    let plex = std::fs::read_to_string(format!("{root}/config/plex.example.toml"))
        .unwrap()
        .replace("/etc/portcullis/plex-server.token", token.to_str().unwrap());
    std::fs::write(dir.path().join("plex.example.toml"), plex).unwrap();
    for path in [
        format!("{root}/config/portcullis.example.toml"),
        format!("{root}/config/jellyfin.example.toml"),
        dir.path().join("plex.example.toml").display().to_string(),
    ] {
        let name = &path;
        let out = Command::new(BIN)
            .args(["check-config", &path])
            .output()
            .unwrap();
        assert_eq!(
            code(&out),
            0,
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
