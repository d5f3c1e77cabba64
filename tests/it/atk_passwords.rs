//! Long passwords (checklist §3: ATK-69): up to the 1,024-byte cap a password is used exactly as
//! typed — never truncated, never trimmed — and past it, it can be neither set nor used.

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

#[tokio::test]
async fn atk69_passwords_up_to_the_cap_are_exact_and_longer_ones_are_refused() {
    let up = Upstream::start().await;
    // 1,024 bytes exactly, ending in blanks a trimming store would lose.
    let at_cap = format!("{}z  ", "p".repeat(1021));
    assert_eq!(at_cap.len(), 1024);
    let g128 = "g".repeat(128);
    let gw = Gateway::builder(&up.url())
        .user("alice", &at_cap)
        .user("grace", &g128)
        .start()
        .await;
    assert_eq!(gw.try_login("alice", &at_cap, None).await.0, 200);
    assert_eq!(gw.try_login("grace", &g128, None).await.0, 200);
    // One byte less, a trimmed form, or the first 72 bytes (bcrypt's cut) are other passwords.
    for (user, wrong) in [
        ("alice", &at_cap[..1023]),
        ("alice", at_cap.trim_end()),
        ("grace", &g128[..127]),
        ("grace", &g128[..72]),
    ] {
        let (status, _) = gw.try_login(user, wrong, None).await;
        assert_eq!(status, 401, "{user}: {} bytes", wrong.len());
    }
    // Past the cap: refused at login (as a wrong password), and refused when set.
    let over = format!("{at_cap}!");
    assert_eq!(gw.try_login("alice", &over, None).await.0, 401);
    // 300 four-byte characters: 1,200 bytes.
    assert_eq!(gw.try_login("alice", &over, None).await.0, 401);
    let emoji = "😀".repeat(300);
    assert_eq!(emoji.len(), 1200);
    let out = gw.cli_with_stdin(
        &["user", "add", "mallory", "--password-stdin"],
        &format!("{emoji}\n"),
    );
    assert!(!out.status.success(), "a 1,200-byte password was set");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1024"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A 1 MiB login body is refused before any hashing.
    let huge = "a".repeat(1 << 20);
    let start = std::time::Instant::now();
    let resp = client()
        .post(gw.url("/_portcullis/api/login"))
        .json(&serde_json::json!({"username": "alice", "password": huge}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert!(start.elapsed() < std::time::Duration::from_millis(900));
}
