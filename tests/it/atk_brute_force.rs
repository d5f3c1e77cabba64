//! Checklist §3 ATK-48: refused logins look alike for every kind of account.

use crate::harness::Gateway;
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";
const BOB_PW: &str = "bob-password-123456";
const CAROL_PW: &str = "carol-password-1234";

/// Everything a client can compare about an answer, but the date.
async fn observable(resp: reqwest::Response) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| k.as_str() != "date")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    headers.sort();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn atk48_wrong_passwords_look_the_same_for_unknown_disabled_2fa_and_plain_accounts() {
    use crate::account::{enrol, Browser};
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .user("bob", BOB_PW)
        .user("carol", CAROL_PW)
        .start()
        .await;
    enrol(&Browser::login(&gw, "alice", ALICE_PW).await).await;
    gw.cli_ok(&["user", "disable", "carol"]);
    // alice: two-factor; bob: password only; carol: disabled; nouser: no such account. Each is
    // tried once from its own address, so no account's or address's delay colours an answer.
    let cases = [(20u8, "nouser"), (21, "alice"), (22, "bob"), (23, "carol")];
    let mut form = vec![];
    let mut api = vec![];
    for (host, user) in cases {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(std::net::IpAddr::from([127, 0, 0, host]))
            .build()
            .unwrap();
        let resp = http
            .post(gw.url("/_portcullis/login"))
            .header("Origin", gw.base.clone())
            .form(&[
                ("username", user),
                ("password", "wrong-password-x"),
                ("rd", "/"),
            ])
            .send()
            .await
            .unwrap();
        form.push((user, observable(resp).await));
        let resp = http
            .post(gw.url("/_portcullis/api/login"))
            .json(&serde_json::json!({"username": user, "password": "wrong-password-x"}))
            .send()
            .await
            .unwrap();
        api.push((user, observable(resp).await));
    }
    for answers in [&form, &api] {
        let (first_user, first) = &answers[0];
        assert_eq!(first.0, 401, "{first_user}");
        assert!(!first.1.iter().any(|(k, _)| k == "set-cookie"), "{first:?}");
        for (user, answer) in &answers[1..] {
            assert_eq!(
                answer, first,
                "{user}'s refusal differs from {first_user}'s"
            );
        }
    }
    assert!(
        String::from_utf8_lossy(&api[0].1 .2).contains("invalid_credentials"),
        "{:?}",
        api[0]
    );
}
