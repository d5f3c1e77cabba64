//! The second factor under attack (checklist §3: ATK-51, ATK-44b): odd spellings of a code are
//! just wrong codes, wrong codes count against the account like wrong passwords, a code from
//! another user's authenticator is worthless, and the pending cookie is never a session.

use portcullis::auth::totp;

use crate::account::{enrol, pending_login, Browser};
use crate::harness::{client, set_cookie, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";
const BOB_PW: &str = "bob-password-123456";

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Posts a code on the pending login: status, the page, and whether a session cookie came.
async fn post_code(gw: &Gateway, pending: &str, csrf: &str, code: &str) -> (u16, String, bool) {
    let resp = client()
        .post(gw.url("/_portcullis/login/2fa"))
        .header("Cookie", pending)
        .header("Origin", gw.base.clone())
        .form(&[("code", code), ("csrf", csrf), ("rd", "/")])
        .send()
        .await
        .unwrap();
    let session = set_cookie(&resp, "portcullis").is_some();
    (resp.status().as_u16(), resp.text().await.unwrap(), session)
}

#[tokio::test]
async fn atk51_wrong_codes_in_any_spelling_count_against_the_account() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    let (seed, _) = enrol(&Browser::login(&gw, "alice", ALICE_PW).await).await;
    let (pending, csrf) = pending_login(&gw, "alice", ALICE_PW, "/").await;
    // (e) the pending cookie is not a session, as a cookie or as a Bearer token.
    let token = pending.split_once('=').unwrap().1;
    let as_cookie = client()
        .get(gw.url("/probe"))
        .header("Cookie", format!("portcullis={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(as_cookie.status(), 401);
    assert_eq!(gw.get_status("/probe", token).await, 401);
    // (d) odd spellings of a code, and (c) a code two steps away, are wrong codes; each counts
    // against alice's account like a wrong password.
    let step = totp::step_of(now_s());
    let far = totp::code_at(&seed, step + 2);
    for code in ["１２３４５６", "123 456 7", far.as_str()] {
        let (status, page, session) = post_code(&gw, &pending, &csrf, code).await;
        assert_eq!(status, 401, "{code}");
        assert!(!session, "{code} gave a session");
        assert!(
            page.contains("name=\"code\""),
            "{code}: not the code page again"
        );
    }
    // (a)/(b) after three wrong codes the account makes the next attempt wait: even the right
    // code gets no session now.
    let right = totp::code_at(&seed, step + 1);
    let (status, _, session) = post_code(&gw, &pending, &csrf, &right).await;
    assert_eq!(status, 429);
    assert!(
        !session,
        "the right code worked straight after three wrong ones"
    );
    assert_eq!(up.count(), 0, "a refused request reached the upstream");
}

#[tokio::test]
async fn atk44_a_code_from_another_users_authenticator_is_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .start()
        .await;
    enrol(&Browser::login(&gw, "alice", ALICE_PW).await).await;
    let (bob_seed, _) = enrol(&Browser::login(&gw, "bob", BOB_PW).await).await;
    let (pending, csrf) = pending_login(&gw, "alice", ALICE_PW, "/").await;
    let step = totp::step_of(now_s());
    for s in [step, step + 1] {
        let (status, _, session) =
            post_code(&gw, &pending, &csrf, &totp::code_at(&bob_seed, s)).await;
        assert_eq!(status, 401);
        assert!(!session, "bob's code signed alice in");
    }
}
