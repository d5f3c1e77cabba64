//! Users from an LDAP directory against a real OpenLDAP `slapd` (Debian's, configured by
//! `crate::slapd` with memberOf, ppolicy and TLS from a test CA): sign-in by binding as the user
//! over ldaps and StartTLS, groups from the directory feeding the access rules, administrators
//! by a directory group, a name held by a local account refused to the directory, filter
//! injection in user names, TOTP for directory users, and the sync: a user removed, locked or
//! taken out of a group loses their sessions and media tokens at the next sync (on a second
//! replica too), a passkey stops signing in a user the directory locked, and a directory that is
//! down keeps existing sessions (and passkey sign-ins) while new password sign-ins get 503.

use std::time::{Duration, Instant};

use portcullis::auth::totp;
use serde_json::Value;

use crate::account::{enrol, Browser};
use crate::harness::{client, poll_until, Gateway};
use crate::jellyfin::{jf_login, mb};
use crate::passkeys::{login_finish, login_start, passkey_session, register_as};
use crate::slapd::Slapd;
use crate::standin::StandIn;
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice's directory passphrase";
const BOB_PW: &str = "bob's directory passphrase";
/// The sync interval of these tests: a change must reach sessions within it plus a second.
const SYNC: Duration = Duration::from_secs(1);

/// `[directory]` for `slapd` at `url` (ldaps://, or ldap:// with StartTLS), and two rules:
/// `/family` only for the directory group `family`.
fn directory_toml(slapd: &Slapd, url: &str, sync: &str) -> String {
    format!(
        r#"
[directory]
url = "{url}"
ca_file = "{ca}"
preset = "openldap"
base_dn = "{base}"
bind_dn = "{service}"
bind_password_file = "{pw}"
user_base = "ou=people,{base}"
group_base = "ou=groups,{base}"
admin_group = "gateway-admins"
sync_interval = "{sync}"
timeout = "2s"

[[rule]]
name = "family-only"
path = "^/family"
subjects = ["group:family"]
policy = "one_factor"

[[rule]]
name = "no-family"
path = "^/family"
policy = "deny"
"#,
        ca = slapd.ca_file.display(),
        base = slapd.base_dn,
        service = slapd.service_dn,
        pw = slapd.service_password_file.display(),
    )
}

/// A directory with alice (in `family` and `gateway-admins`) and bob (in no group).
async fn directory() -> Slapd {
    let slapd = Slapd::start().await;
    slapd.add_user("alice", ALICE_PW).await;
    slapd.add_user("bob", BOB_PW).await;
    slapd.add_group("family", &["alice"]).await;
    slapd.add_group("gateway-admins", &["alice"]).await;
    slapd
}

/// A request with a gateway Bearer token: to the `app` route (host `app.test`) when the
/// gateway has one, else to the default route.
async fn app(gw: &Gateway, path: &str, token: &str) -> u16 {
    client()
        .get(gw.url(path))
        .header("Host", format!("app.test:{}", gw.port))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn user_list(gw: &Gateway) -> Vec<Value> {
    serde_json::from_str::<Value>(&gw.cli_ok(&["user", "list", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn listed<'a>(users: &'a [Value], name: &str) -> Option<&'a Value> {
    users.iter().find(|u| u["name"] == name)
}

#[tokio::test]
async fn directory_users_sign_in_by_binding_as_themselves_and_their_groups_feed_the_rules() {
    let slapd = directory().await;
    let up = Upstream::start().await;
    // carol is a local account made before the directory had a carol.
    let gw = Gateway::builder(&up.url())
        .user("carol", "carol's local passphrase")
        .extra_toml(&directory_toml(&slapd, &slapd.ldaps_url, "1h"))
        .start()
        .await;

    // A right password binds; the record is made at the first sign-in, from the directory.
    let alice = gw.login("alice", ALICE_PW).await.token;
    let bob = gw.login("bob", BOB_PW).await.token;
    let users = user_list(&gw);
    let a = listed(&users, "alice").expect("alice has a record");
    assert_eq!(a["directory_dn"], slapd.user_dn("alice"));
    assert_eq!(a["admin"], true, "gateway-admins makes an administrator");
    assert_eq!(listed(&users, "bob").unwrap()["admin"], false);
    assert_eq!(
        listed(&users, "carol").unwrap()["directory_dn"],
        Value::Null
    );
    let groups = gw.cli_ok(&["group", "list", "--user", "alice"]);
    let groups: Vec<&str> = groups.lines().collect();
    assert_eq!(groups, ["admins", "family", "gateway-admins"]);
    assert!(gw
        .cli_ok(&["group", "list", "--user", "bob"])
        .trim()
        .is_empty());
    // The rules read the directory's groups.
    assert_eq!(gw.get_status("/family/photos", &alice).await, 200);
    assert_eq!(gw.get_status("/family/photos", &bob).await, 403);
    assert_eq!(app(&gw, "/elsewhere", &bob).await, 200);

    // Wrong, empty and unknown: the same refusal; the empty password never becomes an
    // anonymous bind.
    for (name, pw) in [
        ("alice", "not alice's password"),
        ("alice", ""),
        ("nobody", ALICE_PW),
    ] {
        let (status, body) = gw.try_login(name, pw, None).await;
        assert_eq!(status, 401, "{name}/{pw:?}: {body}");
        assert_eq!(body["error"], "invalid_credentials", "{name}");
    }
    // A user name cannot widen the search (RFC 4515 escaping): with alice's password, none of
    // these reaches alice's entry.
    for name in [
        "*",
        "a*",
        "*)(uid=*))(|(uid=*",
        "alice)(|(uid=*",
        "alice)(objectClass=*",
        "alice\\2a",
        "alice\u{0}",
    ] {
        let (status, body) = gw.try_login(name, ALICE_PW, None).await;
        assert_eq!(status, 401, "{name:?}: {body}");
    }
    assert_eq!(
        user_list(&gw).len(),
        3,
        "no record was made for an injected name"
    );

    // A name lives in one place only. The directory's carol is refused (the local account
    // keeps the name, and its own password); a local account cannot take a directory name.
    slapd.add_user("carol", "the directory's carol").await;
    let (status, _) = gw.try_login("carol", "the directory's carol", None).await;
    assert_eq!(status, 401);
    gw.login("carol", "carol's local passphrase").await;
    let out = gw.cli(&["user", "add", "bob"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is a user of the directory") && err.contains("uid=bob"),
        "{err}"
    );
    // The directory's password is changed there, not here.
    let out = gw.cli(&["user", "passwd", "alice"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("change the password there"));
    let b = Browser::login(&gw, "bob", BOB_PW).await;
    let csrf = b.csrf().await;
    let resp = b
        .post(
            "/_portcullis/account/password",
            &[
                ("current", BOB_PW),
                ("new_password", "a new one for bob here"),
                ("confirm", "a new one for bob here"),
                ("csrf", &csrf),
            ],
        )
        .await;
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(location.ends_with("error=directory"), "{location}");
    let (status, _) = gw.try_login("bob", BOB_PW, None).await;
    assert_eq!(status, 200, "bob's directory password still works");

    // TOTP for a directory user: enrolment confirms the directory password by a bind, and the
    // code is then asked of every sign-in.
    let (seed, _) = enrol(&b).await;
    let (status, body) = gw.try_login("bob", BOB_PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("second_factor_required"))
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let code = totp::code_at(&seed, totp::step_of(now) + 1);
    let (status, body) = gw.try_login("bob", BOB_PW, Some(&code)).await;
    assert_eq!(status, 200, "{body}");

    // The admin page (alice is an administrator through the directory) marks directory users
    // and offers no password reset for them.
    let admin = Browser::login(&gw, "alice", ALICE_PW).await;
    let page = admin.text("/_portcullis/admin").await;
    let row = |name: &str| {
        let start = page.find(&format!("<tr data-user=\"{name}\">")).unwrap();
        page[start..start + page[start..].find("</tr>").unwrap()].to_string()
    };
    assert!(row("bob").contains("directory"), "{}", row("bob"));
    assert!(!row("bob").contains("Reset link"));
    assert!(!row("carol").contains("directory") && row("carol").contains("Reset link"));

    // What the directory check shows an operator.
    let check = gw.cli_ok(&["directory", "check", "--user", "alice"]);
    assert!(check.contains("3 users may sign in"), "{check}");
    assert!(check.contains("groups: family, gateway-admins"), "{check}");
    assert!(check.contains("administrator: yes"), "{check}");
    gw.assert_audit(&["--user", "alice"], &["directory_user", "created"]);
    gw.metrics_with(&[
        "portcullis_directory_operations_total{operation=\"user_bind\",outcome=\"ok\"}",
        "portcullis_directory_operations_total{operation=\"user_bind\",outcome=\"rejected\"}",
        "portcullis_directory_up 1",
    ])
    .await;
}

#[tokio::test]
async fn directory_changes_end_sessions_and_media_tokens_at_the_next_sync_on_every_replica() {
    let slapd = directory().await;
    let jf = StandIn::start().await;
    jf.add_user("alice", "alice's media password", false);
    jf.add_user("bob", "bob's media password", false);
    let up = Upstream::start().await;
    let toml = format!(
        "[[route]]\nname = \"app\"\nhost = \"app.test\"\nupstream = \"{}\"\n{}",
        up.url().trim_start_matches("http://"),
        directory_toml(&slapd, &slapd.ldaps_url, "1s")
    );
    // Replicas of one deployment share the public URL (the tokens' audience) and the keys.
    let public_url = "public_url = \"http://media.test\"";
    let gw = Gateway::builder(&jf.url())
        .server_keys(public_url)
        .route_keys("kind = \"jellyfin\"")
        .extra_toml(&toml)
        .start()
        .await;
    // A second replica on the same store whose own sync waits an hour: what it learns, it
    // learns from the first replica through the store.
    let replica = Gateway::builder(&jf.url())
        .store_url(&format!("sqlite://{}", gw.db_path().display()))
        .keys_of(&gw)
        .server_keys(public_url)
        .route_keys("kind = \"jellyfin\"")
        .extra_toml(&toml.replace("sync_interval = \"1s\"", "sync_interval = \"1h\""))
        .start()
        .await;

    let alice = gw.login("alice", ALICE_PW).await.token;
    let bob = gw.login("bob", BOB_PW).await.token;
    // bob's phone signs in to the media server through the gateway: his first sign-in there
    // finds him in the directory (the media server checks its own password).
    let (status, body) = jf_login(&gw, "bob", "bob's media password", "bobs-phone").await;
    assert_eq!(status, 200, "{body}");
    let bob_media = body["AccessToken"].as_str().unwrap().to_string();
    let media_status = |gw: &Gateway, token: String| {
        let url = gw.url("/Users/Me");
        async move {
            client()
                .get(url)
                .header("Authorization", mb("bobs-phone", Some(&token)))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(media_status(&gw, bob_media.clone()).await, 200);
    assert_eq!(app(&gw, "/family/x", &alice).await, 200);
    assert_eq!(app(&replica, "/family/x", &alice).await, 200);

    // Taken out of `family`: the rule refuses alice at the next sync, everywhere; her other
    // requests still pass.
    slapd.remove_from_group("family", "alice").await;
    let started = Instant::now();
    assert!(
        poll_until(SYNC + Duration::from_secs(1), || async {
            app(&gw, "/family/x", &alice).await == 403
        })
        .await,
        "a group removal did not reach the rules within the sync interval + 1 s"
    );
    let group_lag = started.elapsed();
    assert!(
        poll_until(Duration::from_secs(2), || async {
            app(&replica, "/family/x", &alice).await == 403
        })
        .await,
        "the replica kept the old group"
    );
    assert_eq!(app(&gw, "/elsewhere", &alice).await, 200);

    // Removed from the directory: every session and media token of bob's ends, on both.
    slapd.delete_user("bob").await;
    let started = Instant::now();
    assert!(
        poll_until(SYNC + Duration::from_secs(1), || async {
            app(&gw, "/elsewhere", &bob).await == 401
        })
        .await,
        "a removed user's session outlived the sync interval + 1 s"
    );
    let removal_lag = started.elapsed();
    assert!(
        poll_until(Duration::from_secs(2), || async {
            media_status(&gw, bob_media.clone()).await == 401
                && app(&replica, "/elsewhere", &bob).await == 401
        })
        .await,
        "bob's media token or his session at the replica survived"
    );
    let (status, _) = gw.try_login("bob", BOB_PW, None).await;
    assert_eq!(status, 401);

    // Locked in the directory (ppolicy's pwdAccountLockedTime): the same, and unlocked, alice
    // signs in again (her old session stays ended).
    slapd.lock_user("alice").await;
    assert!(
        poll_until(SYNC + Duration::from_secs(1), || async {
            app(&gw, "/elsewhere", &alice).await == 401
        })
        .await,
        "a locked user's session outlived the sync interval + 1 s"
    );
    let (status, _) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 401, "a locked user cannot sign in");
    slapd.unlock_user("alice").await;
    let again = poll_until(SYNC + Duration::from_secs(2), || async {
        gw.try_login("alice", ALICE_PW, None).await.0 == 200
    })
    .await;
    assert!(again, "an unlocked user could not sign in again");
    assert_eq!(app(&gw, "/elsewhere", &alice).await, 401);

    // A temporary ppolicy lock (after failed binds, say) refuses the bind but disables nobody:
    // alice's new session lives through the syncs that follow.
    let alice = gw.login("alice", ALICE_PW).await.token;
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: pwdAccountLockedTime\npwdAccountLockedTime: 20260101000000Z\n",
        slapd.user_dn("alice")
    ));
    let (status, _) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 401, "the directory refuses the locked bind");
    next_sync(&gw).await;
    next_sync(&gw).await;
    assert_eq!(
        app(&gw, "/elsewhere", &alice).await,
        200,
        "a temporary lock ended sessions"
    );
    slapd.unlock_user("alice").await;

    // bob is made again in the directory: another entry with his name does not inherit his
    // record (passkeys, TOTP, links) until an operator says it is him.
    slapd.add_user("bob", "the new bob's passphrase").await;
    let (status, _) = gw.try_login("bob", "the new bob's passphrase", None).await;
    assert_eq!(status, 401);
    gw.metrics_with(&["portcullis_directory_sync_changes_total{change=\"conflict\"} 1"])
        .await;
    let out = gw.cli_ok(&["directory", "relink", "bob"]);
    assert!(out.contains("now belongs to uid=bob"), "{out}");
    assert!(
        poll_until(SYNC + Duration::from_secs(1), || async {
            gw.try_login("bob", "the new bob's passphrase", None)
                .await
                .0
                == 200
        })
        .await,
        "the relinked record did not let the new entry in"
    );

    // An administrator's disabling stands whatever the directory says.
    gw.cli_ok(&["user", "disable", "alice"]);
    next_sync(&gw).await;
    next_sync(&gw).await;
    let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("disabled")),
        "{body}"
    );
    println!(
        "directory sync: group removal reached the rules in {:.0} ms, a removal ended sessions in {:.0} ms",
        group_lag.as_secs_f64() * 1000.0,
        removal_lag.as_secs_f64() * 1000.0
    );
    gw.assert_audit(&["--user", "bob"], &["directory_sync", "disabled"]);
    gw.metrics_with(&[
        "portcullis_directory_sync_changes_total{change=\"disabled\"} 2",
        "portcullis_directory_sync_changes_total{change=\"enabled\"} 2",
    ])
    .await;
}

/// Waits for the gateway's next complete reading of the directory.
async fn next_sync(gw: &Gateway) {
    let last = || gw.metric("portcullis_directory_last_sync_timestamp_seconds");
    let before = last().await;
    assert!(
        poll_until(SYNC * 3, || async { last().await > before }).await,
        "no directory sync within three intervals"
    );
}

#[tokio::test]
async fn a_directory_that_is_down_keeps_sessions_and_refuses_new_sign_ins_with_503() {
    let mut slapd = directory().await;
    let up = Upstream::start().await;
    // StartTLS on ldap:// this time, and groups found by a search for the groups naming the
    // user (as lldap and Active Directory are read) rather than from memberOf.
    let toml = directory_toml(&slapd, &slapd.ldap_url, "1s").replace(
        "admin_group",
        "group_filter = \"(&(objectClass=groupOfNames)(member={dn}))\"\nadmin_group",
    );
    let gw = Gateway::builder(&up.url()).extra_toml(&toml).start().await;
    let alice = gw.login("alice", ALICE_PW).await.token;
    let browser = Browser::login(&gw, "bob", BOB_PW).await;
    // bob adds a passkey, confirming with his directory password (a bind).
    let mut bobs_key = register_as(&gw, &browser, BOB_PW, "Laptop", true).await;

    slapd.kill();
    let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "directory_unavailable");
    // Existing sessions keep working, through syncs that fail (each one a refused connection
    // of the service account, counted).
    let failed_syncs = || {
        gw.metric(
            "portcullis_directory_operations_total{operation=\"service_bind\",outcome=\"error\"}",
        )
    };
    let before = failed_syncs().await;
    assert!(
        poll_until(SYNC * 4, || async {
            assert_eq!(app(&gw, "/family/x", &alice).await, 200);
            failed_syncs().await >= before + 2.0
        })
        .await,
        "the sync did not try the directory again"
    );
    assert_eq!(browser.get("/_portcullis/account").await.status(), 200);
    // A passkey sign-in needs no directory: it relies on the last sync meanwhile.
    passkey_session(&gw, &mut bobs_key, None).await;
    let ready = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "the gateway stays ready");
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["directory"]["state"], "degraded", "{ready}");
    assert!(
        ready["directory"]["error"]
            .as_str()
            .is_some_and(|e| !e.contains(&slapd.service_password)),
        "{ready}"
    );
    gw.metrics_with(&["portcullis_directory_up 0"]).await;
    assert!(!gw.log().contains(ALICE_PW) && !gw.log().contains(&slapd.service_password));

    slapd.restart().await;
    assert!(
        poll_until(Duration::from_secs(5), || async {
            gw.try_login("alice", ALICE_PW, None).await.0 == 200
        })
        .await,
        "sign-ins did not come back with the directory"
    );
    // Once the directory locks bob, the sync disables him: his passkey no longer signs in.
    slapd.lock_user("bob").await;
    assert!(
        poll_until(SYNC + Duration::from_secs(1), || async {
            gw.metric("portcullis_directory_sync_changes_total{change=\"disabled\"}")
                .await
                >= 1.0
        })
        .await,
        "the sync did not disable the locked user within the interval + 1 s"
    );
    let options = login_start(&gw, None).await;
    let credential = bobs_key.assert(&options, &gw.base, true);
    assert_ne!(
        login_finish(&gw, &options, &credential).await.status(),
        200,
        "a passkey signed a user in whom the directory locked"
    );
    assert!(
        poll_until(SYNC + Duration::from_secs(1), || async {
            let r: Value = client()
                .get(format!("{}/readyz", gw.admin))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["directory"]["state"] == "ok"
        })
        .await
    );
}

#[tokio::test]
async fn a_directory_that_cannot_be_trusted_or_bound_is_refused_with_the_reason() {
    let slapd = directory().await;
    let up = Upstream::start().await;
    // Without the test CA, the directory's certificate is not trusted: sign-ins get 503 and
    // the reason names TLS.
    let untrusted = directory_toml(&slapd, &slapd.ldaps_url, "1h")
        .replace(&format!("ca_file = \"{}\"\n", slapd.ca_file.display()), "");
    let gw = Gateway::builder(&up.url())
        .extra_toml(&untrusted)
        .start()
        .await;
    let (status, body) = gw.try_login("alice", ALICE_PW, None).await;
    assert_eq!(status, 503, "{body}");
    let out = gw.cli(&["directory", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate"), "{err}");

    // A wrong service password: the check says which keys to look at.
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not the service password").unwrap();
    let bad_bind = directory_toml(&slapd, &slapd.ldaps_url, "1h").replace(
        &slapd.service_password_file.display().to_string(),
        &wrong.path().display().to_string(),
    );
    let gw2 = Gateway::builder(&up.url())
        .extra_toml(&bad_bind)
        .start()
        .await;
    let out = gw2.cli(&["directory", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("directory.bind_password_file"), "{err}");

    // A missing password file stops the start with the key named; check-config, which reads
    // no secret, passes the same file.
    let missing = directory_toml(&slapd, &slapd.ldaps_url, "1h").replace(
        &slapd.service_password_file.display().to_string(),
        "/nonexistent/ldap-password",
    );
    let mut gw3 = Gateway::builder(&up.url()).extra_toml(&missing).configure();
    let out = gw3.cli(&["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["--config", gw3.config_path().to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("directory.bind_password_file"), "{err}");
    gw3.kill();
}
