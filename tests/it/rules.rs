//! Access rules (`[[rule]]`) against the real gateway: a table of requests over route × path ×
//! method × network (the client found behind a trusted proxy, or not) × subject (user, group)
//! × factors, with gateway Bearer sessions of one and two factors, browsers, and Jellyfin app
//! tokens; a group change reaching the running gateway; and `check-config` refusing what
//! cannot be right.

use std::time::Duration;

use portcullis::auth::totp;
use serde_json::Value;

use crate::account::{enrol, Browser};
use crate::harness::{client, poll_until, Gateway};
use crate::jellyfin::{mb, token_of, PW};
use crate::standin::StandIn;
use crate::upstream::Upstream;

const RULES: &str = r#"
[[route]]
name = "app"
host = "app.test"
upstream = "{app}"

[[rule]]
name = "lan-bypass"
route = "app"
path = "^/lan/"
networks = ["192.168.0.0/16"]
policy = "bypass"

[[rule]]
name = "admin-area"
route = "app"
path = "^/admin"
subjects = ["group:admins", "user:carol"]
policy = "two_factor"

[[rule]]
name = "no-admin-area"
route = "app"
path = "^/admin"
policy = "deny"

[[rule]]
name = "monitoring"
route = "app"
path = "^/metrics$"
methods = ["GET"]
networks = ["10.9.9.9"]
policy = "bypass"

[[rule]]
name = "no-metrics"
route = "app"
path = "^/metrics$"
policy = "deny"

[[rule]]
name = "kids-read-only"
route = "media"
methods = ["POST", "DELETE"]
subjects = ["group:kids"]
policy = "deny"

[[rule]]
name = "no-server-config"
route = "media"
path = "^/System/Configuration"
policy = "deny"
"#;

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Who sends a request.
#[derive(Clone, Copy, Debug)]
enum Who<'a> {
    Nobody,
    /// A gateway Bearer token.
    Bearer(&'a str),
    /// A browser's session cookie, navigating.
    Browser(&'a str),
}

/// A row of the table: what it is, who sends it, method, path, from which loopback address,
/// the `X-Forwarded-For` it carries, and the status and `error` (or `Location`) expected.
type Case<'a> = (
    &'a str,
    Who<'a>,
    &'a str,
    &'a str,
    [u8; 4],
    Option<&'a str>,
    (u16, &'a str),
);

/// One request to the `app` route: status, and the JSON `error` if any.
async fn app(
    gw: &Gateway,
    who: Who<'_>,
    method: &str,
    path: &str,
    from: [u8; 4],
    xff: Option<&str>,
) -> (u16, String) {
    let c = crate::harness::client_from(from);
    let mut req = c
        .request(method.parse().unwrap(), gw.url(path))
        .header("Host", format!("app.test:{}", gw.port));
    if let Some(x) = xff {
        req = req.header("X-Forwarded-For", x);
    }
    req = match who {
        Who::Nobody => req,
        Who::Bearer(t) => req.bearer_auth(t),
        Who::Browser(cookie) => req
            .header("Cookie", cookie)
            .header("Accept", "text/html")
            .header("Sec-Fetch-Mode", "navigate"),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    let error = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .or(location)
        .unwrap_or_default();
    (status, error)
}

/// A Jellyfin app's request with its token: the status.
async fn media(gw: &Gateway, token: &str, method: &str, path: &str) -> u16 {
    client()
        .request(method.parse().unwrap(), gw.url(path))
        .header("Authorization", mb("phone", Some(token)))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn rules_decide_by_route_path_method_network_subject_and_factors_for_every_credential() {
    let up = Upstream::start().await;
    let jf = StandIn::start().await;
    for name in ["alice", "bob", "carol", "root"] {
        jf.add_user(name, PW, false);
    }
    let gw = Gateway::builder(&jf.url())
        .user("bob", PW)
        .user("carol", PW)
        .admin("alice", PW)
        .admin("root", PW)
        .route_keys("kind = \"jellyfin\"")
        .server_keys("trusted_proxies = [\"127.0.0.1\"]")
        .extra_toml(&RULES.replace("{app}", up.url().trim_start_matches("http://")))
        .start()
        .await;
    gw.cli_ok(&["group", "add", "bob", "kids"]);
    // alice: an administrator with TOTP (two factors); root: an administrator with a password
    // only; bob: in `kids`; carol: named by a rule.
    let (seed, _) = enrol(&Browser::login(&gw, "alice", PW).await).await;
    let code = totp::code_at(&seed, totp::step_of(now_s()) + 1);
    let (status, body) = gw.try_login("alice", PW, Some(&code)).await;
    assert_eq!(status, 200, "{body}");
    let alice = body["token"].as_str().unwrap().to_string();
    let root = gw.login("root", PW).await.token;
    let bob = gw.login("bob", PW).await.token;
    let carol = gw.login("carol", PW).await.token;
    let root_browser = Browser::login(&gw, "root", PW).await;

    let local = [127, 0, 0, 1];
    let other = [127, 0, 0, 2];
    let table: Vec<Case> = vec![
        // The LAN passes without a session — when a trusted proxy says so.
        (
            "lan, trusted proxy",
            Who::Nobody,
            "GET",
            "/lan/x",
            local,
            Some("192.168.1.5"),
            (200, ""),
        ),
        (
            "lan claimed by an untrusted peer",
            Who::Nobody,
            "GET",
            "/lan/x",
            other,
            Some("192.168.1.5"),
            (401, "unauthorized"),
        ),
        (
            "lan, the proxy's own client list",
            Who::Nobody,
            "GET",
            "/lan/x",
            local,
            Some("192.168.1.5, 203.0.113.9"),
            (401, "unauthorized"),
        ),
        // The admin area: admins with two factors, carol by name; anyone else is refused.
        (
            "admin, two factors",
            Who::Bearer(&alice),
            "GET",
            "/admin/x",
            local,
            None,
            (200, ""),
        ),
        (
            "admin, one factor",
            Who::Bearer(&root),
            "GET",
            "/admin/x",
            local,
            None,
            (401, "two_factor_required"),
        ),
        (
            "admin, one factor, browser",
            Who::Browser(&root_browser.cookie),
            "GET",
            "/admin/x",
            local,
            None,
            (302, "/_portcullis/step-up?rd=%2Fadmin%2Fx"),
        ),
        (
            "carol by name, one factor",
            Who::Bearer(&carol),
            "GET",
            "/admin/",
            local,
            None,
            (401, "two_factor_required"),
        ),
        (
            "kids",
            Who::Bearer(&bob),
            "GET",
            "/admin/x",
            local,
            None,
            (403, "rule_denied"),
        ),
        (
            "nobody must sign in first",
            Who::Nobody,
            "GET",
            "/admin/x",
            local,
            None,
            (401, "unauthorized"),
        ),
        // Metrics: GET from the monitoring host only, with or without a session.
        (
            "monitoring host",
            Who::Nobody,
            "GET",
            "/metrics",
            local,
            Some("10.9.9.9"),
            (200, ""),
        ),
        (
            "monitoring host, POST",
            Who::Nobody,
            "POST",
            "/metrics",
            local,
            Some("10.9.9.9"),
            (403, "rule_denied"),
        ),
        (
            "another host, signed in",
            Who::Bearer(&alice),
            "GET",
            "/metrics",
            local,
            Some("10.9.9.8"),
            (403, "rule_denied"),
        ),
        // No rule: the route's default, a session.
        (
            "elsewhere, signed in",
            Who::Bearer(&bob),
            "GET",
            "/home",
            local,
            None,
            (200, ""),
        ),
        (
            "elsewhere, nobody",
            Who::Nobody,
            "GET",
            "/home",
            local,
            None,
            (401, "unauthorized"),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, who, method, path, from, xff, want) in &table {
        let got = app(&gw, *who, method, path, *from, *xff).await;
        if (got.0, got.1.as_str()) != *want {
            wrong.push(format!("{what}: {method} {path} → {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // The step-up page tells root how to get a second factor.
    let resp = root_browser
        .get("/_portcullis/step-up?rd=%2Fadmin%2Fx")
        .await;
    assert_eq!(resp.status(), 401);
    let page = resp.text().await.unwrap();
    assert!(page.contains("only a password"), "{page}");
    // Only what the rules let through reached the upstream.
    let reached: Vec<String> = up
        .requests()
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert_eq!(
        reached,
        ["/lan/x", "/admin/x", "/metrics", "/home"],
        "{reached:?}"
    );

    // Jellyfin app tokens answer to the same rules: a kid's app reads but does not write.
    let bob_app = token_of(&gw, "bob", "phone-bob").await;
    let carol_app = token_of(&gw, "carol", "phone-carol").await;
    // A media route's rules see the path as the media server does: any case, legacy prefixes.
    for path in [
        "/System/Configuration",
        "/system/configuration",
        "/emby/SYSTEM/Configuration",
    ] {
        assert_eq!(media(&gw, &carol_app, "GET", path).await, 403, "{path}");
    }
    assert_eq!(media(&gw, &bob_app, "GET", "/Users/Me").await, 200);
    let post = "/Items/0123456789abcdef0123456789abcdef/PlaybackInfo";
    assert_eq!(media(&gw, &bob_app, "POST", post).await, 403);
    assert_eq!(media(&gw, &carol_app, "POST", post).await, 200);
    // Every refusal so far, by reason and by rule (counted before the group change below,
    // whose propagation takes a poll or so of bob's app).
    gw.metrics_with(&[
        "portcullis_requests_total{decision=\"deny\",reason=\"rule_denied\",route=\"app\"} 3",
        "portcullis_requests_total{decision=\"deny\",reason=\"two_factor_required\",route=\"app\"} 3",
        "portcullis_requests_total{decision=\"deny\",reason=\"rule_denied\",route=\"media\"} 4",
        "portcullis_rule_decisions_total{rule=\"no-server-config\",verdict=\"deny\"} 3",
        "portcullis_rule_decisions_total{rule=\"admin-area\",verdict=\"step_up\"} 3",
        "portcullis_rule_decisions_total{rule=\"no-admin-area\",verdict=\"deny\"} 1",
        "portcullis_rule_decisions_total{rule=\"lan-bypass\",verdict=\"bypass\"} 1",
        "portcullis_rule_decisions_total{rule=\"kids-read-only\",verdict=\"deny\"} 1",
        "portcullis_rule_decisions_total{rule=\"monitoring\",verdict=\"step_up\"} 0",
    ])
    .await;
    // Taken out of `kids`, bob's app writes again, on the running gateway.
    gw.cli_ok(&["group", "remove", "bob", "kids"]);
    assert!(
        poll_until(Duration::from_secs(3), || async {
            media(&gw, &bob_app, "POST", post).await == 200
        })
        .await,
        "the group change did not reach the gateway"
    );
    // The admin page shows the groups and changes them, audited with the group's name.
    let page = root_browser.text("/_portcullis/admin").await;
    let row = page
        .split("data-user=\"alice\"")
        .nth(1)
        .expect("alice's row");
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("<td class=\"groups\">admins</td>"), "{row}");
    let csrf = crate::harness::input_value(&page, "csrf").unwrap();
    let resp = root_browser
        .post(
            "/_portcullis/admin/users/action",
            &[
                ("name", "carol"),
                ("action", "group_add"),
                ("group", "Family"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(
        gw.cli_ok(&["group", "list", "--user", "carol"]).trim(),
        "family"
    );
    let resp = root_browser
        .post(
            "/_portcullis/admin/users/action",
            &[
                ("name", "carol"),
                ("action", "group_add"),
                ("group", "no spaces"),
                ("csrf", &csrf),
            ],
        )
        .await;
    assert_eq!(resp.status(), 400);
    gw.assert_audit(
        &["--user", "carol"],
        &["admin_group_add", "group family by root"],
    );
    let list = gw.cli_ok(&["group", "list", "--json"]);
    let groups: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(groups[0]["group"], "admins");
    assert_eq!(groups[0]["members"], 2);
    gw.assert_audit(&["--user", "bob"], &["group_add", "group_remove"]);
}

#[tokio::test]
async fn check_config_refuses_bad_rules_by_key_and_warns_of_shadowed_ones() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).user("alice", PW).start().await;
    let base = std::fs::read_to_string(gw.config_path()).unwrap();
    let check = |rules: &str| {
        std::fs::write(gw.config_path(), format!("{base}\n{rules}")).unwrap();
        let out = gw.cli(&["check-config"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (rules, key, says) in [
        (
            "[[rule]]\nnetworks = [\"10.0.0.0/33\"]\npolicy = \"deny\"",
            "rule[0].networks",
            "10.0.0.0/33",
        ),
        (
            "[[rule]]\npath = \"^/(admin\"\npolicy = \"deny\"",
            "rule[0].path",
            "regular expression",
        ),
        (
            "[[rule]]\nroute = \"nope\"\npolicy = \"deny\"",
            "rule[0].route",
            "no route is named `nope`",
        ),
        ("[[rule]]\npolicy = \"maybe\"", "rule[0].policy", "`maybe`"),
        (
            "[[rule]]\nmethods = [\"FETCH\"]\npolicy = \"deny\"",
            "rule[0].methods",
            "`FETCH`",
        ),
        (
            "[[rule]]\nsubjects = [\"team:x\"]\npolicy = \"deny\"",
            "rule[0].subjects",
            "`team:x`",
        ),
        (
            "[[rule]]\nsubjects = [\"user:alice\"]\npolicy = \"bypass\"",
            "rule[0].subjects",
            "bypass",
        ),
        (
            "[[rule]]\nsubjects = [\"group:nobody-here\"]\npolicy = \"deny\"",
            "rule[0].subjects",
            "nobody is in group `nobody-here`",
        ),
    ] {
        let (code, err) = check(rules);
        assert_eq!(code, Some(2), "{rules}: {err}");
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(says),
            "{rules}: {err}"
        );
    }
    let (code, err) = check(
        "[[rule]]\nname = \"wide\"\nnetworks = [\"10.0.0.0/8\"]\npolicy = \"deny\"\n\
         [[rule]]\nname = \"narrow\"\nnetworks = [\"10.1.0.0/16\"]\nmethods = [\"GET\"]\npolicy = \"bypass\"\n\
         [[rule]]\nname = \"admins\"\nsubjects = [\"group:admins\"]\npolicy = \"two_factor\"",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("rule `narrow` never applies: rule `wide`") && !err.contains("`admins` never"),
        "{err}"
    );
}

#[tokio::test]
async fn the_forward_auth_endpoint_applies_the_rules_to_the_request_it_is_asked_about() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .admin("root", PW)
        .user("bob", PW)
        .server_keys("trusted_proxies = [\"127.0.0.1\"]")
        .extra_toml(
            r#"
[[rule]]
name = "admin-host"
host = "admin.example"
subjects = ["group:admins"]
policy = "two_factor"

[[rule]]
name = "no-admin-host"
host = "admin.example"
policy = "deny"

[[rule]]
name = "lan-public"
path = "^/public/"
networks = ["192.168.0.0/16"]
policy = "bypass"
"#,
        )
        .start()
        .await;
    gw.cli_ok(&["group", "add", "bob", "family"]);
    let root = gw.login("root", PW).await.token;
    let bob = gw.login("bob", PW).await.token;
    // nginx's auth_request: the original request in X-Original-* (Traefik and Caddy send
    // X-Forwarded-*), the client in X-Forwarded-For from the proxy on 127.0.0.1.
    let ask = |token: Option<&str>, host: &str, uri: &str, client: &str, query: &str| {
        let mut req = client_from_proxy()
            .get(gw.url(&format!("/_portcullis/verify{query}")))
            .header("X-Forwarded-Host", host)
            .header("X-Original-Uri", uri)
            .header("X-Forwarded-Method", "GET")
            .header("X-Forwarded-For", client)
            .header("Accept", "text/html");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let header = |n: &str| {
                resp.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            let (user, groups, location) = (
                header("remote-user"),
                header("remote-groups"),
                header("location"),
            );
            let text = resp.text().await.unwrap();
            (status, user, groups, location, text)
        }
    };
    let wan = "203.0.113.4";
    // An administrator with one factor: 401 for the proxy to map, the step-up page when the
    // proxy asks for redirects.
    let (status, _, _, _, text) = ask(Some(&root), "admin.example", "/x", wan, "").await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("two_factor_required"), "{text}");
    let (status, _, _, location, _) =
        ask(Some(&root), "admin.example", "/x", wan, "?redirect=1").await;
    assert_eq!(
        (status, location.as_str()),
        (302, "/_portcullis/step-up?rd=%2Fx")
    );
    // Anyone else is refused that host; elsewhere bob passes, with his groups.
    assert_eq!(
        ask(Some(&bob), "admin.example:443", "/x", wan, "").await.0,
        403
    );
    let (status, user, _, _, _) = ask(Some(&bob), "media.example", "/x", wan, "").await;
    assert_eq!((status, user.as_str()), (200, "bob"));
    // (His group reaches the running gateway within a poll of the store.)
    assert!(
        poll_until(Duration::from_secs(3), || async {
            ask(Some(&bob), "media.example", "/x", wan, "").await.2 == "family"
        })
        .await,
        "bob's groups are not told to the proxy"
    );
    let (_, _, groups, _, _) = ask(Some(&root), "media.example", "/x", wan, "").await;
    assert_eq!(groups, "admins");
    // The LAN's public pages without a session; not from the internet.
    let (status, user, _, _, _) =
        ask(None, "media.example", "/public/a?b=c", "192.168.4.4", "").await;
    assert_eq!((status, user.as_str()), (200, ""));
    assert_eq!(
        ask(None, "media.example", "/public/a", wan, "").await.0,
        401
    );
    gw.metrics_with(&[
        "portcullis_rule_decisions_total{rule=\"admin-host\",verdict=\"step_up\"} 2",
        "portcullis_rule_decisions_total{rule=\"no-admin-host\",verdict=\"deny\"} 1",
        "portcullis_rule_decisions_total{rule=\"lan-public\",verdict=\"bypass\"} 1",
    ])
    .await;
    assert_eq!(
        up.count(),
        0,
        "the verify endpoint never reaches the upstream"
    );
}

/// A client on the proxy's address (127.0.0.1, trusted in these gateways).
fn client_from_proxy() -> reqwest::Client {
    crate::harness::client_from([127, 0, 0, 1])
}
