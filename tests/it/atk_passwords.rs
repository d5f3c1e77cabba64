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

#[tokio::test]
async fn atk64_a_bearer_client_changes_its_password_under_the_same_rules() {
    use crate::harness::input_value;
    let up = Upstream::start().await;
    let old = "alice-old-password-1234";
    let gw = Gateway::locking_after_three(&up.url(), old).await;
    let api = gw.login("alice", old).await;
    // An API client reads its session's CSRF token from the account page, with its Bearer.
    let page = client()
        .get(gw.url("/_portcullis/account"))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csrf = input_value(&page.text().await.unwrap(), "csrf").unwrap();
    let post = |fields: Vec<(&'static str, String)>| {
        let (url, token) = (gw.url("/_portcullis/account/password"), api.token.clone());
        async move {
            let resp = client()
                .post(url)
                .bearer_auth(token)
                .form(&fields)
                .send()
                .await
                .unwrap();
            let location = resp
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_string());
            (resp.status().as_u16(), location)
        }
    };
    let change = |current: &str, new: &str| {
        vec![
            ("current", current.to_string()),
            ("new_password", new.to_string()),
            ("confirm", new.to_string()),
            ("csrf", csrf.clone()),
        ]
    };
    let refused = Some("/_portcullis/account?error=password".to_string());
    // (a) no `current` field → 400; no or another CSRF token → 403.
    let mut no_current = change(old, "NewPassw0rd-long");
    no_current.remove(0);
    assert_eq!(post(no_current).await.0, 400);
    let mut no_csrf = change(old, "NewPassw0rd-long");
    no_csrf.pop();
    assert_eq!(post(no_csrf).await.0, 403);
    let mut other_csrf = change(old, "NewPassw0rd-long");
    other_csrf[3].1 = "A".repeat(csrf.len());
    assert_eq!(post(other_csrf).await.0, 403);
    // (c) a common short password, (d) a short one: refused, as for a browser.
    assert_eq!(post(change(old, "password")).await, (303, refused.clone()));
    assert_eq!(post(change(old, "short7")).await, (303, refused.clone()));
    // (b) wrong current passwords count toward the account lock: after three, even the right
    // one is refused as locked, and so is a login.
    for guess in ["guess-one-xxxx", "guess-two-xxxx", "guess-three-xx"] {
        let answer = post(change(guess, "NewPassw0rd-long")).await;
        assert_eq!(answer.0, 303);
        assert!(answer.1.unwrap().contains("error="));
    }
    let locked = Some("/_portcullis/account?error=locked".to_string());
    assert_eq!(post(change(old, "NewPassw0rd-long")).await, (303, locked));
    assert_eq!(gw.try_login("alice", old, None).await.0, 403);
    // Nothing was changed by any refused request.
    gw.cli_ok(&["user", "unlock", "alice"]);
    assert_eq!(gw.try_login("alice", "NewPassw0rd-long", None).await.0, 401);
    let other = gw.login("alice", old).await;
    // (f) the right request changes it; with "sign out connected devices" the other session
    // ends, and the change is audited.
    let mut ok = change(old, "NewPassw0rd-long");
    ok.push(("signout", "1".to_string()));
    let (status, location) = post(ok).await;
    assert_eq!(status, 303);
    assert_eq!(
        location.as_deref(),
        Some("/_portcullis/account?done=password-signout")
    );
    assert!(
        gw.refused_within(&other.token, std::time::Duration::from_secs(1))
            .await
    );
    assert_eq!(gw.try_login("alice", old, None).await.0, 401);
    assert_eq!(gw.try_login("alice", "NewPassw0rd-long", None).await.0, 200);
    let audit = gw.cli_ok(&["audit", "--user", "alice"]);
    assert!(
        audit.contains("password_change") && audit.contains("signed out connected devices"),
        "{audit}"
    );
}
