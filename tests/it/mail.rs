//! Mail against a real SMTP server (PyPI `aiosmtpd`, started by `crate::smtpd`): `mail test`,
//! security notices, "forgot your password" end to end with the link from the received mail
//! (and the same answer for accounts that do not exist), address changes confirmed by a link
//! with the old address told, new sign-in alerts and their "this wasn't me" link, header
//! injection refused, STARTTLS with authentication, the outbox surviving an SMTP outage and a
//! gateway killed with SIGKILL (each message delivered once), and two replicas on PostgreSQL
//! sending each message once.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::account::{change_password, Browser};
use crate::harness::{client, client_from, poll_until, Gateway};
use crate::smtpd::{Mail, Smtpd, SmtpdOptions};
use crate::upstream::Upstream;

const PW: &str = "alice's long passphrase";
const WAIT: Duration = Duration::from_secs(10);

/// `[mail]` for a plain SMTP server on loopback; quick retries.
pub(crate) fn mail_toml(smtpd: &Smtpd, extra: &str) -> String {
    format!(
        "[mail]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         from = \"\\\"Portcullis\\\" <portcullis@example.org>\"\nretry_initial = \"200ms\"\n{extra}",
        smtpd.port
    )
}

async fn gateway(up: &Upstream, smtpd: &Smtpd) -> Gateway {
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .user("bob", "bob's long passphrase")
        .extra_toml(&mail_toml(smtpd, ""))
        .start()
        .await;
    gw.cli_ok(&["user", "set-email", "alice", "alice@example.org"]);
    gw
}

/// The mails to `to` among `mails`.
fn to<'a>(mails: &'a [Mail], address: &str) -> Vec<&'a Mail> {
    mails
        .iter()
        .filter(|m| m.to.iter().any(|t| t == address))
        .collect()
}

/// Waits until a mail to `address` whose subject contains `subject` arrived; returns it.
pub(crate) async fn mail_to(smtpd: &Smtpd, address: &str, subject: &str) -> Mail {
    let found = poll_until(WAIT, || async {
        smtpd
            .messages()
            .iter()
            .any(|m| m.to.iter().any(|t| t == address) && m.subject.contains(subject))
    })
    .await;
    let all = smtpd.messages();
    assert!(
        found,
        "no mail to {address} about {subject:?}; received: {:?}",
        all.iter().map(|m| (&m.to, &m.subject)).collect::<Vec<_>>()
    );
    all.into_iter()
        .rev()
        .find(|m| m.to.iter().any(|t| t == address) && m.subject.contains(subject))
        .unwrap()
}

/// The gateway link in a mail that contains `part`, as a path.
fn link_path(mail: &Mail, part: &str) -> String {
    let link = mail
        .links()
        .into_iter()
        .find(|l| l.contains(part))
        .unwrap_or_else(|| panic!("no {part} link in: {}", mail.text));
    let start = link.find("/_portcullis/").unwrap();
    link[start..].to_string()
}

pub(crate) async fn post_form(gw: &Gateway, path: &str, form: &[(&str, &str)]) -> (u16, String) {
    let resp = client()
        .post(gw.url(path))
        .header("Origin", gw.base.clone())
        .form(form)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn mail_test_and_security_notices_reach_a_real_smtp_server() {
    let up = Upstream::start().await;
    let smtpd = Smtpd::start().await;
    let gw = gateway(&up, &smtpd).await;

    let out = gw.cli_ok(&["mail", "test", "ops@example.org"]);
    assert!(
        out.contains("sent a test message to ops@example.org"),
        "{out}"
    );
    let test = mail_to(&smtpd, "ops@example.org", "test message").await;
    assert_eq!(test.from, "portcullis@example.org");
    assert_eq!(test.header("Auto-Submitted"), Some("auto-generated"));
    assert!(
        test.text.contains(&gw.base),
        "links come from public_url: {}",
        test.text
    );
    assert!(test.html.as_deref().unwrap_or("").contains("<p>"));

    // Header injection: an address with a line break is refused before anything is sent.
    let out = gw.cli(&["mail", "test", "ops@example.org\r\nBcc: evil@example.org"]);
    assert_eq!(out.status.code(), Some(1));
    let out = gw.cli(&[
        "user",
        "set-email",
        "bob",
        "bob@example.org\nBcc: evil@example.org",
    ]);
    assert_eq!(out.status.code(), Some(1));

    // alice changes her password: she is told, with the address it was done from.
    let mut a = Browser::login(&gw, "alice", PW).await;
    let new_pw = "alice's newer passphrase";
    assert_eq!(change_password(&mut a, PW, new_pw, false).await, 303);
    let notice = mail_to(&smtpd, "alice@example.org", "password was changed").await;
    assert!(notice.text.contains("127.0.0.1"), "{}", notice.text);
    assert!(
        notice.text.contains("Forgot your password"),
        "{}",
        notice.text
    );
    // "Sign out of all devices" is told too.
    a = Browser::login(&gw, "alice", new_pw).await;
    let csrf = a.csrf().await;
    let resp = a
        .post("/_portcullis/account/signout-all", &[("csrf", &csrf)])
        .await;
    assert_eq!(resp.status(), 303);
    mail_to(&smtpd, "alice@example.org", "Every device was signed out").await;
    // An administrator's action on the account.
    gw.cli_ok(&["user", "require-reset", "alice"]);
    let admin = mail_to(&smtpd, "alice@example.org", "administrator changed").await;
    assert!(admin.text.contains("new password"), "{}", admin.text);
    // bob has no address: nothing is queued for him.
    let out = gw.cli_ok(&["mail", "outbox", "--json"]);
    let outbox: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert!(outbox.iter().all(|m| m["user_id"] != 2), "{out}");
    assert!(outbox.iter().all(|m| m["state"] == "sent"), "{out}");
    gw.metrics_with(&[
        "portcullis_outbox_messages_total{channel=\"mail\",result=\"sent\"} 3",
        "portcullis_outbox_queued{channel=\"mail\"} 0",
    ])
    .await;
}

#[tokio::test]
async fn a_forgotten_password_is_reset_through_the_mailed_link_and_nobody_learns_who_exists() {
    let up = Upstream::start().await;
    let smtpd = Smtpd::start().await;
    let gw = gateway(&up, &smtpd).await;
    let login_page = client()
        .get(gw.url("/_portcullis/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(login_page.contains("href=\"/_portcullis/forgot\""));
    let old = gw.login("alice", PW).await;

    // Every identifier gets the same answer, as quickly: an account with an address, one
    // without (bob), nobody, an address nobody has.
    let mut answers = Vec::new();
    for id in ["nobody", "bob", "nobody@example.org", "alice"] {
        let started = Instant::now();
        let (status, body) = post_form(&gw, "/_portcullis/forgot", &[("identifier", id)]).await;
        answers.push((status, body, started.elapsed()));
    }
    for (status, body, took) in &answers {
        assert_eq!((*status, body), (answers[0].0, &answers[0].1));
        assert!(body.contains("Check your mail"));
        assert!(*took < Duration::from_millis(500), "{took:?}");
    }
    let reset = mail_to(&smtpd, "alice@example.org", "Reset your password").await;
    assert_eq!(smtpd.messages().len(), 1, "only alice was sent a link");
    let path = link_path(&reset, "/_portcullis/reset/");
    // The page offers "sign out connected devices", ticked.
    let page = client()
        .get(gw.url(&path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("name=\"signout\" value=\"1\" checked"));
    let new_pw = "alice reset by mail 2026";
    let (status, body) = post_form(
        &gw,
        &path,
        &[
            ("new_password", new_pw),
            ("confirm", new_pw),
            ("signout", "1"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.get_status("/x", &old.token).await, 401, "signed out");
    gw.login("alice", new_pw).await;
    let (status, _) = post_form(&gw, &path, &[("new_password", "x"), ("confirm", "x")]).await;
    assert_eq!(status, 410, "the link works once");
    mail_to(&smtpd, "alice@example.org", "password was changed").await;

    // A newer link makes the older one useless, and so does a password change.
    post_form(
        &gw,
        "/_portcullis/forgot",
        &[("identifier", "alice@example.org")],
    )
    .await;
    let first = mail_to(&smtpd, "alice@example.org", "Reset your password").await;
    assert!(
        poll_until(WAIT, || async {
            to(&smtpd.messages(), "alice@example.org")
                .iter()
                .filter(|m| m.subject.contains("Reset"))
                .count()
                == 2
        })
        .await
    );
    post_form(&gw, "/_portcullis/forgot", &[("identifier", "alice")]).await;
    assert!(
        poll_until(WAIT, || async {
            to(&smtpd.messages(), "alice@example.org")
                .iter()
                .filter(|m| m.subject.contains("Reset"))
                .count()
                == 3
        })
        .await
    );
    let first_path = link_path(&first, "/_portcullis/reset/");
    let resp = client().get(gw.url(&first_path)).send().await.unwrap();
    assert_eq!(resp.status(), 410, "an older link stops working");
    // A fourth request within the hour for the same account sends nothing more. It is handled
    // after the answer (so that timing reveals nothing), so its audit entry is waited for.
    post_form(&gw, "/_portcullis/forgot", &[("identifier", "alice")]).await;
    poll_until(WAIT, || async {
        gw.cli_ok(&["audit", "--user", "alice"])
            .contains("too many requests for this account")
    })
    .await;
    gw.assert_audit(
        &["--user", "alice"],
        &[
            "password_reset_requested",
            "too many requests for this account",
        ],
    );
    // The client that keeps asking is refused after ten requests.
    let mut last = 0;
    for _ in 0..10 {
        last = post_form(&gw, "/_portcullis/forgot", &[("identifier", "nobody")])
            .await
            .0;
    }
    assert_eq!(last, 429);
    let other = client_from([127, 0, 0, 2])
        .post(gw.url("/_portcullis/forgot"))
        .header("Origin", gw.base.clone())
        .form(&[("identifier", "nobody")])
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "another client is not held back");
}

#[tokio::test]
async fn an_address_is_used_once_its_link_is_followed_and_the_old_one_is_told() {
    let up = Upstream::start().await;
    let smtpd = Smtpd::start().await;
    let gw = gateway(&up, &smtpd).await;
    let a = Browser::login(&gw, "alice", PW).await;
    let page = a.text("/_portcullis/account").await;
    assert!(
        page.contains("alice@example.org"),
        "the account page shows the address"
    );

    let change = |email: &'static str, current: &'static str| {
        let a = &a;
        async move {
            let csrf = a.csrf().await;
            let resp = a
                .post(
                    "/_portcullis/account/email",
                    &[("email", email), ("current", current), ("csrf", &csrf)],
                )
                .await;
            resp.headers()["location"].to_str().unwrap().to_string()
        }
    };
    assert!(change("new@example.org", "wrong password")
        .await
        .ends_with("error=email-confirm"));
    assert!(change("new@example.org\r\nBcc: evil@example.org", PW)
        .await
        .ends_with("error=email-address"));
    assert!(change("alice@example.org", PW)
        .await
        .ends_with("error=email-same"));
    assert!(change("new@example.org", PW)
        .await
        .ends_with("done=email-sent"));
    let confirm = mail_to(&smtpd, "new@example.org", "Confirm your email address").await;
    let path = link_path(&confirm, "/_portcullis/email/confirm/");
    // Opening the link asks first; nothing changes yet.
    let resp = client().get(gw.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(a
        .text("/_portcullis/account")
        .await
        .contains("alice@example.org"));
    let (status, body) = post_form(&gw, &path, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(a
        .text("/_portcullis/account")
        .await
        .contains("new@example.org"));
    let told = mail_to(&smtpd, "alice@example.org", "email address was changed").await;
    assert!(told.text.contains("new@example.org"), "{}", told.text);
    let (status, _) = post_form(&gw, &path, &[]).await;
    assert_eq!(status, 410, "the link works once");
    // Mail goes to the new address from now on.
    gw.cli_ok(&["user", "require-reset", "alice"]);
    mail_to(&smtpd, "new@example.org", "administrator changed").await;
}

#[tokio::test]
async fn a_sign_in_from_a_new_device_is_told_and_this_wasnt_me_signs_everyone_out() {
    let up = Upstream::start().await;
    let smtpd = Smtpd::start().await;
    let gw = gateway(&up, &smtpd).await;
    let firefox = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";
    let login_as = |ua: &'static str| {
        let gw = &gw;
        async move {
            client()
                .post(gw.url("/_portcullis/api/login"))
                .header("User-Agent", ua)
                .json(&serde_json::json!({"username": "alice", "password": PW}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["token"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    // The first sign-in on record, and the same device again: no alert.
    let first = login_as(firefox).await;
    login_as(firefox).await;
    // Another kind of device: an alert with the device, the address, and the lever.
    let thief = login_as("curl/8.5.0").await;
    let alert = mail_to(&smtpd, "alice@example.org", "New sign-in").await;
    assert!(alert.text.contains("curl"), "{}", alert.text);
    assert!(alert.text.contains("127.0.0.1"), "{}", alert.text);
    assert_eq!(
        smtpd
            .messages()
            .iter()
            .filter(|m| m.subject.contains("New sign-in"))
            .count(),
        1
    );
    let path = link_path(&alert, "/_portcullis/not-me/");
    // The intruder, who has the password, starts moving the account to their own address.
    let intruder = Browser::login(&gw, "alice", PW).await;
    let csrf = intruder.csrf().await;
    let resp = intruder
        .post(
            "/_portcullis/account/email",
            &[
                ("email", "intruder@example.org"),
                ("current", PW),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert!(resp.headers()["location"]
        .to_str()
        .unwrap()
        .ends_with("done=email-sent"));
    let theirs = mail_to(&smtpd, "intruder@example.org", "Confirm your email address").await;
    let theirs = link_path(&theirs, "/_portcullis/email/confirm/");
    // Opening the link (a mail scanner does) changes nothing.
    let resp = client().get(gw.url(&path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.get_status("/x", &thief).await, 200);
    let new_pw = "alice after the thief 2026";
    let (status, _) = post_form(
        &gw,
        &path,
        &[("new_password", "short"), ("confirm", "short")],
    )
    .await;
    assert_eq!(status, 400, "the password policy holds");
    assert_eq!(
        gw.get_status("/x", &thief).await,
        200,
        "a refused form changes nothing"
    );
    let (status, body) =
        post_form(&gw, &path, &[("new_password", new_pw), ("confirm", new_pw)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.get_status("/x", &thief).await, 401);
    assert_eq!(gw.get_status("/x", &first).await, 401);
    let (status, _) = gw.try_login("alice", PW, None).await;
    assert_eq!(status, 401, "the old password is gone");
    gw.login("alice", new_pw).await;
    let (status, _) = post_form(&gw, &path, &[("new_password", new_pw), ("confirm", new_pw)]).await;
    assert_eq!(status, 410, "the link works once");
    gw.assert_audit(&["--user", "alice"], &["not_me", "every device signed out"]);
    // The intruder's address change died with their sessions.
    let (status, _) = post_form(&gw, &theirs, &[]).await;
    assert_eq!(
        status, 404,
        "a pending address change outlived the recovery"
    );
    let users: Vec<Value> = serde_json::from_str(&gw.cli_ok(&["user", "list", "--json"])).unwrap();
    assert_eq!(users[0]["email"], "alice@example.org");
}

#[tokio::test]
async fn starttls_with_authentication_is_used_and_a_wrong_password_is_reported() {
    let up = Upstream::start().await;
    let smtpd = Smtpd::start_with(SmtpdOptions {
        starttls: true,
        require_starttls: true,
        auth: Some(("gateway".into(), "smtp secret".into())),
        ..SmtpdOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("smtp-password");
    std::fs::write(&secret, "smtp secret\n").unwrap();
    let toml = format!(
        "[mail]\nhost = \"localhost\"\nport = {}\ntls = \"starttls\"\nca_file = \"{}\"\n\
         username = \"gateway\"\npassword_file = \"{}\"\nfrom = \"portcullis@example.org\"\n",
        smtpd.port,
        smtpd.ca_file.display(),
        secret.display()
    );
    let gw = Gateway::builder(&up.url()).extra_toml(&toml).start().await;
    gw.cli_ok(&["mail", "test", "ops@example.org"]);
    mail_to(&smtpd, "ops@example.org", "test message").await;
    std::fs::write(&secret, "not the secret").unwrap();
    let out = gw.cli(&["mail", "test", "ops@example.org"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not take the message"), "{err}");
    assert!(!err.contains("not the secret"));
}

#[tokio::test]
async fn the_outbox_keeps_mail_through_an_smtp_outage_and_a_killed_gateway_and_sends_it_once() {
    let up = Upstream::start().await;
    let mut smtpd = Smtpd::start().await;
    let mut gw = gateway(&up, &smtpd).await;
    smtpd.kill();
    // Notices while the SMTP server is down: the changes themselves do not wait for it.
    let started = Instant::now();
    gw.cli_ok(&["user", "require-reset", "alice"]);
    gw.cli_ok(&["user", "unlock", "alice"]);
    assert!(started.elapsed() < Duration::from_secs(5));
    gw.metrics_with(&[
        "portcullis_outbox_messages_total{channel=\"mail\",result=\"retry\"}",
        "portcullis_outbox_queued{channel=\"mail\"} 2",
    ])
    .await;
    let retries = gw
        .metrics_with(&["portcullis_outbox_messages_total{channel=\"mail\",result=\"retry\"}"])
        .await;
    assert!(
        !retries.contains("portcullis_outbox_messages_total{channel=\"mail\",result=\"retry\"} 0"),
        "{retries}"
    );
    // The gateway dies hard; its replacement finds the messages and sends them when the SMTP
    // server is back, each once.
    gw.kill();
    gw.launch().await;
    smtpd.restart().await;
    let mails = smtpd.wait_for(2, WAIT).await;
    let admin: Vec<_> = mails
        .iter()
        .filter(|m| m.subject.contains("administrator changed"))
        .collect();
    assert_eq!(
        admin.len(),
        2,
        "each notice once: {:?}",
        mails.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );
    gw.metrics_with(&["portcullis_outbox_queued{channel=\"mail\"} 0"])
        .await;
    let extra = poll_until(Duration::from_secs(2), || async {
        smtpd.messages().len() > 2
    })
    .await;
    assert!(!extra, "a notice was sent twice");
}

#[tokio::test]
async fn two_replicas_on_postgresql_send_each_message_once() {
    let up = Upstream::start().await;
    let smtpd = Smtpd::start().await;
    let schema = crate::pg::Schema::on(&crate::pg::server_url());
    let public = "public_url = \"http://media.test\"";
    let first = Gateway::builder(&up.url())
        .server_keys(public)
        .store_url(&schema.url())
        .extra_toml(&mail_toml(&smtpd, ""))
        .start()
        .await;
    let second = Gateway::builder(&up.url())
        .server_keys(public)
        .store_url(&schema.url())
        .keys_of(&first)
        .extra_toml(&mail_toml(&smtpd, ""))
        .start()
        .await;
    const USERS: usize = 12;
    for i in 0..USERS {
        let name = format!("user{i}");
        first.cli_ok(&["user", "add", &name]);
        first.cli_ok(&["user", "set-email", &name, &format!("{name}@example.org")]);
    }
    // A breach response with --notify mails every user; both replicas' workers run.
    let out = first.cli_ok(&["breach-response", "--notify"]);
    assert!(
        out.contains(&format!("{USERS} users with a verified address")),
        "{out}"
    );
    let mails = smtpd.wait_for(USERS, WAIT).await;
    let extra = poll_until(Duration::from_secs(2), || async {
        smtpd.messages().len() > USERS
    })
    .await;
    assert!(
        !extra,
        "a message was sent twice: {}",
        smtpd.messages().len()
    );
    let mut recipients: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    recipients.sort();
    recipients.dedup();
    assert_eq!(recipients.len(), USERS);
    assert!(mails[0].text.contains("new password"), "{}", mails[0].text);
    assert!(mails[0]
        .text
        .contains("http://media.test/_portcullis/login"));
    drop(second);
}

/// A Jellyfin app signed in through the gateway is a new device too: its user is told, with
/// the app and device it named.
#[tokio::test]
async fn a_new_jellyfin_app_is_told_like_a_new_browser() {
    let smtpd = Smtpd::start().await;
    let jf = crate::standin::StandIn::start().await;
    jf.add_user("alice", crate::jellyfin::PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"")
        .extra_toml(&mail_toml(&smtpd, ""))
        .start()
        .await;
    gw.cli_ok(&["user", "set-email", "alice", "alice@example.org"]);
    // The first sign-in on record (a browser) alerts nobody; the phone's app then does.
    gw.login("alice", PW).await;
    crate::jellyfin::token_of(&gw, "alice", "phone-1").await;
    let alert = mail_to(&smtpd, "alice@example.org", "New sign-in").await;
    assert!(
        alert.text.contains("Jellyfin Android on Pixel 7"),
        "{}",
        alert.text
    );
    assert!(alert.text.contains("a media app"), "{}", alert.text);
    assert!(!alert.links().is_empty());
}
