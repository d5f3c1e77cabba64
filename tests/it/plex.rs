//! Plex behind the gateway: the real gateway in front of the Plex Media Server stand-in, with
//! plex.tv's stand-in resolving tokens ([`crate::plex_standin`]). The real `plexapi` client works
//! through the gateway as the owner, a friend and a Plex Home user, and "sign out of all
//! devices" ends its access, its open notification socket and its transcode session within a
//! second; so do disabling the user and unlinking the account (CLI and pages), on a second
//! replica on PostgreSQL too, where a link made on the first lets the token in at once. Tokens
//! of unlinked accounts, expired and forged JWTs (and bound ones past their `exp`), unapproved
//! devices, disabled users, other users' transcode sessions and owner-only paths are refused
//! with nothing reaching the server, and counted by reason; the client's `X-Forwarded-For`
//! never reaches it; a server whose `allowedNetworks` covers the gateway is refused at start.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::account::Browser;
use crate::harness::{client, client_from, input_value, poll_until, Gateway, GatewayBuilder};
use crate::pg::{self, Schema};
use crate::plex_standin::{PlexAccount, PlexTv, Pms, BIG_PART_KEY, BIG_PART_LEN, PART_KEY};
use crate::standin_fidelity::run_client_args;

const PW: &str = "a passphrase for the plex tests";

struct World {
    tv: PlexTv,
    pms: Pms,
    owner: PlexAccount,
    /// Holds the server token file.
    _files: tempfile::TempDir,
    plex_table: String,
}

async fn world() -> World {
    let tv = PlexTv::start().await;
    let owner = tv.add_account("ownerplex");
    let pms = Pms::start(&tv, &owner).await;
    let files = tempfile::tempdir().unwrap();
    let token_file = files.path().join("plex-token");
    std::fs::write(&token_file, format!("{}\n", pms.server_token())).unwrap();
    let plex_table = format!(
        "[route.plex]\nplex_tv_url = \"{}\"\nserver_token_file = \"{}\"\n",
        tv.url(),
        token_file.display()
    );
    World {
        tv,
        pms,
        owner,
        _files: files,
        plex_table,
    }
}

impl World {
    fn gateway(&self, extra: &str) -> GatewayBuilder {
        Gateway::builder(&self.pms.url())
            .user("alice", PW)
            .user("bob", PW)
            .user("carol", PW)
            .route_keys("kind = \"plex\"")
            .extra_toml(&format!("{}{extra}", self.plex_table))
    }

    /// A friend the server is shared with at plex.tv: the account and its token.
    fn friend(&self) -> (PlexAccount, String) {
        let friend = self.tv.add_account("friendplex");
        let share = self.tv.share(&self.pms.machine_id(), &friend);
        (friend, share)
    }

    /// Starts the gateway (`extra` in its plex table) with alice linked to the owner's account
    /// and each `(user, account)` of `more` linked after it.
    async fn linked(&self, extra: &str, more: &[(&str, &PlexAccount)]) -> Gateway {
        let gw = self.gateway(extra).start().await;
        link(&gw, "alice", &self.owner.username).await;
        for (user, account) in more {
            link(&gw, user, &account.username).await;
        }
        gw
    }

    /// Requests the PMS stand-in received carrying `token` (header or query).
    fn reached(&self, token: &str) -> usize {
        self.pms
            .requests()
            .iter()
            .filter(|r| r.header("x-plex-token") == Some(token) || r.path_and_query.contains(token))
            .count()
    }
}

/// Links a Plex account to a gateway user with the CLI, once the gateway has met it.
async fn link(gw: &Gateway, user: &str, plex_user: &str) {
    assert!(
        poll_until(Duration::from_secs(10), || async {
            gw.cli_ok(&["plex", "accounts"]).contains(plex_user)
        })
        .await,
        "the gateway never met {plex_user}:\n{}",
        gw.cli_ok(&["plex", "accounts"])
    );
    let out = gw.cli_ok(&["plex", "link", user, plex_user]);
    assert!(out.contains("linked to"), "{out}");
}

/// Status and JSON body of a GET through the gateway with `X-Plex-Token` (if any).
async fn plex_get(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, Value) {
    plex_get_with(&client(), gw, path, token).await
}

/// [`plex_get`] sent with `client` (e.g. from another address).
async fn plex_get_with(
    client: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut rb = client
        .get(gw.url(path))
        .header("X-Plex-Client-Identifier", "test-device-1")
        .header("X-Plex-Product", "Plex for Tests")
        .header("X-Plex-Device-Name", "Test Box")
        .header("X-Plex-Platform", "Linux")
        .header("Accept", "application/json");
    if let Some(t) = token {
        rb = rb.header("X-Plex-Token", t);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    // A stream the gateway cuts (its session ended mid-body) still has the status it began with.
    let body = resp
        .text()
        .await
        .unwrap_or_else(|e| format!("body cut short: {e}"));
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Polls a GET of `/library/sections` through `gw` with `token` for up to `wait` until it
/// answers `status` (a refusal: the gateway's own, with its reason): that answer's body and how
/// many answers before it came from the server, or `None`.
async fn answers_within(
    gw: &Gateway,
    token: &str,
    status: u16,
    wait: Duration,
) -> Option<(Value, usize)> {
    let passed = std::sync::atomic::AtomicUsize::new(0);
    let last = std::sync::Mutex::new(Value::Null);
    let answered = poll_until(wait, || async {
        let (got, body) = plex_get(gw, "/library/sections", Some(token)).await;
        // The gateway's refusals carry a reason; any other answer came from the server. At the
        // edge of a token's `exp` the gateway may pass a request that the server, a moment
        // later, refuses itself: that request passed, it is not the refusal waited for.
        let refused_by_gateway = body.get("error").is_some();
        if status != 200 && !refused_by_gateway {
            passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        *last.lock().unwrap() = body;
        got == status && (status == 200 || refused_by_gateway)
    })
    .await;
    answered.then(|| (last.into_inner().unwrap(), passed.into_inner()))
}

/// Status of a GET of `/library/sections` through `gw` with `cookie` and Plex token `token`.
async fn sections_with_cookie(gw: &Gateway, cookie: &str, token: &str) -> u16 {
    client()
        .get(gw.url("/library/sections"))
        .header("Cookie", cookie)
        .header("X-Plex-Token", token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Posts the account page's "link this Plex account" of Plex account `account` with
/// `cookie`, the page's `csrf` and `password`.
async fn link_from_page(
    gw: &Gateway,
    cookie: &str,
    account: &str,
    csrf: &str,
    password: &str,
) -> reqwest::Response {
    client()
        .post(gw.url("/_portcullis/account/plex/link"))
        .header("Cookie", cookie)
        .header("Origin", gw.base.as_str())
        .form(&[("account", account), ("csrf", csrf), ("password", password)])
        .send()
        .await
        .unwrap()
}

/// Runs plexapi through the gateway with `token`; `revoke` runs between its two phases.
async fn run_plexapi<F, Fut>(gw: &Gateway, token: &str, revoke: F) -> (Value, Value)
where
    F: FnOnce(Value) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    run_client_args("python3", "plex_python.py", &[&gw.base, token], revoke).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plexapi_works_through_the_gateway_as_owner_friend_and_home_user_until_signed_out() {
    let w = world().await;
    let (friend, share) = w.friend();
    let (home, home_token) = w.tv.add_home_user(&w.owner, "kidplex");
    let gw = w.linked("", &[("bob", &friend), ("carol", &home)]).await;

    for (who, token, owner) in [
        ("alice", w.owner.token.clone(), true),
        ("bob", share.clone(), false),
        ("carol", home_token.clone(), false),
    ] {
        let seen_before = std::sync::Arc::new(std::sync::Mutex::new(0usize));
        let seen = seen_before.clone();
        let (p1, p2) = run_plexapi(&gw, &token, |p1| {
            let (gw, w, token) = (&gw, &w, token.clone());
            async move {
                assert_eq!(p1["range_ok"], true, "{who}: {p1}");
                assert_eq!(p1["segment_ok"], true, "{who}: {p1}");
                assert_eq!(p1["alert_connected"], true, "{who}: {p1}");
                assert_eq!(
                    w.pms.open_sockets(),
                    1,
                    "{who}: the notification socket is open"
                );
                let list = gw.cli_ok(&["session", "list", "--user", who]);
                assert!(list.contains(" media "), "{who}: no media session:\n{list}");
                let start = Instant::now();
                gw.cli_ok(&["signout", "--user", who]);
                // One second from the sign-out for both: the refusal and the closed socket.
                let deadline = start + Duration::from_secs(1);
                assert!(
                    answers_within(gw, &token, 401, left(deadline))
                        .await
                        .is_some(),
                    "{who}: the token still passes a second after the sign-out"
                );
                assert!(
                    poll_until(left(deadline), || async { w.pms.open_sockets() == 0 }).await,
                    "{who}: the notification socket is still open a second after the sign-out"
                );
                eprintln!(
                    "{who}: refused and socket closed {:?} after the sign-out",
                    start.elapsed()
                );
                *seen.lock().unwrap() = w.reached(&token);
            }
        })
        .await;
        assert_eq!(p1["sections"], serde_json::json!(["Movies"]), "{who}: {p1}");
        // Only the server's owner may mint transient tokens through the gateway.
        assert_eq!(
            p1["transient_status"],
            if owner { 200 } else { 403 },
            "{who}: {p1}"
        );
        assert_eq!(p2["root_status"], 401, "{who}: {p2}");
        assert_eq!(
            p2["segment_status"], 403,
            "{who}: the transcode session ended: {p2}"
        );
        assert_eq!(p2["socket_closed"], true, "{who}: {p2}");
        assert_eq!(
            w.reached(&token),
            *seen_before.lock().unwrap(),
            "{who}: a request reached the server after the sign-out"
        );
    }
    // The sign-ins were audited with the account they came from; tokens never reach the log.
    let audit = gw.cli_ok(&["audit", "--limit", "100"]);
    assert!(audit.contains("plex_token_bound"), "{audit}");
    let log = gw.log();
    for t in [&w.owner.token, &share, &home_token] {
        assert!(!log.contains(t.as_str()), "a Plex token reached the log");
    }
    gw.metrics_with(&[
        "portcullis_media_resolutions_total{kind=\"plex\",result=\"bound\",source=\"plex_tv\"} 1",
        "portcullis_media_resolutions_total{kind=\"plex\",result=\"bound\",source=\"access_list\"} 2",
        "portcullis_media_links_total{action=\"admin_link\",kind=\"plex\"} 0",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_the_gateway_cannot_vouch_for_are_refused_before_the_server() {
    let w = world().await;
    let stranger = w.tv.add_account("strangerplex");
    let stranger_share = w.tv.share(&w.pms.machine_id(), &stranger);
    let gw = w.linked("", &[]).await;
    let expired = w.tv.issue_jwt(&w.owner, "phone-1", -60);
    let forged = w.tv.forged_jwt(&w.owner, "phone-1");
    let fresh = w.tv.issue_jwt(&w.owner, "phone-1", 3600);

    // The owner shared the server with a stranger at plex.tv: the gateway does not let them in.
    let (status, body) = plex_get(&gw, "/library/sections", Some(&stranger_share)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unlinked_account"))
    );
    let (status, body) = plex_get(&gw, "/library/sections", Some(&expired)).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("expired")));
    let (status, body) = plex_get(&gw, "/library/sections", Some(&forged)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("bad_signature"))
    );
    let (status, body) = plex_get(&gw, "/library/sections", Some("not-a-token-of-anyone")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unknown_media_token"))
    );
    let (status, _) = plex_get(&gw, "/library/sections", None).await;
    assert_eq!(status, 401);
    for t in [&stranger_share, &expired, &forged] {
        assert_eq!(w.reached(t), 0, "a refused token reached the server");
    }

    // Header, query (any case of the key) or both with the same token: one token.
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&fresh)).await.0,
        200
    );
    let q = |t: &str, key: &str| format!("/library/sections?{key}={t}");
    assert_eq!(plex_get(&gw, &q(&fresh, "x-plex-token"), None).await.0, 200);
    assert_eq!(
        plex_get(&gw, &q(&fresh, "X-Plex-Token"), Some(&fresh))
            .await
            .0,
        200
    );
    // Two different tokens: 400, never guessed.
    let before = w.pms.requests().len();
    assert_eq!(
        plex_get(&gw, &q(&forged, "X-PLEX-TOKEN"), Some(&fresh))
            .await
            .0,
        400
    );
    assert_eq!(
        w.pms.requests().len(),
        before,
        "an ambiguous request reached the server"
    );
    // The token in a query string is redacted in the access log.
    assert!(
        !gw.log().contains(fresh.as_str()),
        "a token reached the log"
    );

    // Owner-only paths: the owner's Plex account is alice's; bob's friend account is not.
    let (friend, share) = w.friend();
    // Shared at plex.tv after the gateway started: linked at once all the same.
    let out = gw.cli_ok(&["plex", "link", "bob", &friend.username]);
    assert!(out.contains("linked to bob"), "{out}");
    // The running gateway learns of the link through the store's event log.
    assert!(
        answers_within(&gw, &share, 200, Duration::from_secs(3))
            .await
            .is_some(),
        "the friend linked from the CLI is still refused"
    );
    let before = w.pms.requests().len();
    for path in [
        "/myplex/account",
        "/security/token?type=delegation&scope=all",
    ] {
        let (status, body) = plex_get(&gw, path, Some(&share)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("owner_only")),
            "{path}"
        );
    }
    let put = client()
        .put(gw.url("/:/prefs?allowedNetworks=0.0.0.0/0"))
        .header("X-Plex-Token", &share)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 403);
    // Claiming the server for another Plex account (plexapi's `claim`: POST with a claim token).
    for path in [
        "/myplex/claim?token=claim-1234",
        "/MyPlex/Claim/?token=claim-1234",
    ] {
        let resp = client()
            .post(gw.url(path))
            .header("X-Plex-Token", &share)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "owner_only", "{path}");
    }
    assert_eq!(
        w.pms.requests().len(),
        before,
        "an owner-only path reached the server"
    );
    assert_eq!(w.pms.pref("allowedNetworks"), "");

    // The owner mints a transient token through the gateway; it is bound to alice and ends
    // with her access.
    let (status, body) = plex_get(
        &gw,
        "/security/token?type=delegation&scope=all",
        Some(&fresh),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let transient = body["MediaContainer"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&transient)).await.0,
        200
    );
    let reached = w.reached(&transient);
    gw.cli_ok(&["user", "disable", "alice"]);
    let (_, passed) = answers_within(&gw, &transient, 401, Duration::from_secs(1))
        .await
        .expect("the transient token outlived its user");
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&transient)).await.0,
        401
    );
    // Only what passed before the gateway heard of it reached the server.
    assert_eq!(
        w.reached(&transient),
        reached + passed,
        "a refused request with the transient token reached the server"
    );
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&fresh)).await.0,
        401
    );
    // A fresh token of a disabled user's account is refused too.
    let another = w.tv.issue_jwt(&w.owner, "tablet-1", 3600);
    let (status, body) = plex_get(&gw, "/library/sections", Some(&another)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("user_disabled"))
    );
    assert_eq!(w.reached(&another), 0);

    // Unlinking ends the friend's access at once.
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&share)).await.0,
        200
    );
    gw.cli_ok(&["plex", "unlink", &friend.username]);
    assert!(answers_within(&gw, &share, 401, Duration::from_secs(1))
        .await
        .is_some());

    // Every refusal above is counted by its reason, kind="plex".
    for reason in [
        "unlinked_account",
        "expired",
        "bad_signature",
        "unknown_media_token",
        "no_credentials",
        "two_tokens",
        "owner_only",
        "user_disabled",
    ] {
        assert!(refusals_counted(&gw, reason).await, "{reason} not counted");
    }
    // A reason that did not happen stays at zero.
    let text = gw.metrics_text().await;
    assert!(
        text.contains(
            "portcullis_media_refusals_total{kind=\"plex\",reason=\"foreign_session\"} 0"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transcode_urls_pass_only_for_the_user_who_started_the_session() {
    let w = world().await;
    let (friend, share) = w.friend();
    let gw = w.linked("", &[("bob", &friend)]).await;
    let alice = w.tv.issue_jwt(&w.owner, "tv-1", 3600);
    // The start carries the token; the session id is only in the answer.
    let start = format!(
        "/video/:/transcode/universal/start.m3u8?path=%2Flibrary%2Fmetadata%2F101&X-Plex-Token={alice}"
    );
    let resp = client().get(gw.url(&start)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let playlist = resp.text().await.unwrap();
    let variant = playlist
        .lines()
        .find(|l| l.contains("session/"))
        .expect("a variant")
        .to_string();
    let segment = format!(
        "/video/:/transcode/universal/{}",
        variant.replace("index.m3u8", "00000.ts")
    );
    let variant = format!("/video/:/transcode/universal/{variant}");
    assert_eq!(plex_get(&gw, &variant, None).await.0, 200);
    assert_eq!(plex_get(&gw, &segment, None).await.0, 200);
    // Another user's token on alice's session, and an unknown session: refused.
    let before = w.pms.requests().len();
    let (status, body) = plex_get(&gw, &segment, Some(&share)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("foreign_session"))
    );
    let unknown = "/video/:/transcode/universal/session/guessed-id/base/index.m3u8";
    assert_eq!(plex_get(&gw, unknown, None).await.0, 403);
    assert_eq!(w.pms.requests().len(), before);
    // The session ends with alice's access.
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            plex_get(&gw, &segment, None).await.0 == 403
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_waits_for_approval_and_a_running_stream_ends_on_signout() {
    let w = world().await;
    let gw = w.linked("device_approval = true\n", &[]).await;
    let token = w.tv.issue_jwt(&w.owner, "test-device-1", 3600);
    let (status, body) = plex_get(&gw, "/library/sections", Some(&token)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("device_not_approved"))
    );
    assert_eq!(w.reached(&token), 0);
    let devices: Value =
        serde_json::from_str(&gw.cli_ok(&["plex", "devices", "--user", "alice", "--json"]))
            .unwrap();
    let d = &devices[0];
    assert_eq!(
        (
            d["client_id"].as_str(),
            d["product"].as_str(),
            d["device_name"].as_str(),
            d["platform"].as_str(),
            d["approved"].as_bool()
        ),
        (
            Some("test-device-1"),
            Some("Plex for Tests"),
            Some("Test Box"),
            Some("Linux"),
            Some(false)
        ),
        "{devices}"
    );
    gw.cli_ok(&["plex", "approve", &w.owner.username, "test-device-1"]);
    assert!(
        answers_within(&gw, &token, 200, Duration::from_secs(2))
            .await
            .is_some(),
        "the approved device is still refused"
    );

    // A running stream of the big part ends when alice signs out of all devices.
    let mut body = big_stream(&gw, &token).await;
    assert!(
        poll_until(Duration::from_secs(2), || async {
            w.pms.open_streams() == 1
        })
        .await
    );
    let start = Instant::now();
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(
        ends_within_a_second(&mut body).await,
        "the stream still runs a second after the sign-out"
    );
    eprintln!("stream ended {:?} after the sign-out", start.elapsed());

    // Revoking a device ends its tokens and needs a new approval.
    let next = w.tv.issue_jwt(&w.owner, "test-device-1", 3600);
    assert_eq!(plex_get(&gw, "/library/sections", Some(&next)).await.0, 200);
    gw.cli_ok(&["plex", "revoke", &w.owner.username, "test-device-1"]);
    assert!(answers_within(&gw, &next, 401, Duration::from_secs(1))
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plex_web_needs_a_gateway_session_and_a_browser_can_offer_the_link() {
    let w = world().await;
    let gw = w.gateway("").start().await;
    // A browser navigating to Plex Web is sent to the login page, and back afterwards.
    let resp = client()
        .get(gw.url("/web/index.html"))
        .header("Sec-Fetch-Mode", "navigate")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let to = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        to.starts_with("/_portcullis/login?rd=%2Fweb%2Findex%2Ehtml"),
        "{to}"
    );
    let login = gw.login("alice", PW).await;
    let cookie = format!("portcullis={}", login.token);
    assert_eq!(gw.status_with_cookie("/web/index.html", &cookie).await, 200);
    // /identity needs nothing.
    assert_eq!(plex_get(&gw, "/identity", None).await.0, 200);

    // Plex Web in alice's browser uses the owner's token: not linked yet, so refused, and the
    // account page offers the link.
    let token = w.tv.issue_jwt(&w.owner, "browser-1", 3600);
    assert_eq!(sections_with_cookie(&gw, &cookie, &token).await, 401);
    let page = gw.page_with_cookie("/_portcullis/account", &cookie).await;
    assert!(page.contains("link this Plex account?"), "{page}");
    let csrf = input_value(&page, "csrf").unwrap();
    let account_id = w.owner.id.to_string();
    // Offered to alice, not to bob: his page does not offer it, and his password cannot take it.
    let bob = gw.login("bob", PW).await;
    let bob_cookie = format!("portcullis={}", bob.token);
    let bob_page = gw
        .page_with_cookie("/_portcullis/account", &bob_cookie)
        .await;
    assert!(!bob_page.contains("link this Plex account?"), "{bob_page}");
    let taken = link_from_page(
        &gw,
        &bob_cookie,
        &account_id,
        &input_value(&bob_page, "csrf").unwrap(),
        PW,
    )
    .await;
    assert_eq!(taken.status().as_u16(), 403);
    assert!(
        taken
            .text()
            .await
            .unwrap()
            .contains("was not used from your browser"),
        "the refusal says why"
    );
    assert!(
        gw.cli_ok(&["plex", "accounts"]).contains("ownerplex"),
        "the gateway knows the account"
    );
    assert!(
        !gw.cli_ok(&["plex", "accounts"]).contains("bob"),
        "the account was linked to bob"
    );
    let wrong = link_from_page(&gw, &cookie, &account_id, &csrf, "wrong").await;
    assert_eq!(wrong.status().as_u16(), 403);
    let ok = link_from_page(&gw, &cookie, &account_id, &csrf, PW).await;
    assert_eq!(ok.status().as_u16(), 303, "{}", ok.text().await.unwrap());
    assert_eq!(sections_with_cookie(&gw, &cookie, &token).await, 200);
    // bob's session with alice's Plex token names two people: refused.
    assert_eq!(sections_with_cookie(&gw, &bob_cookie, &token).await, 401);
    let audit = gw.cli_ok(&["audit", "--limit", "50"]);
    assert!(
        audit.contains("plex_link_offered") && audit.contains("plex_linked"),
        "{audit}"
    );
    gw.metrics_with(&["portcullis_media_links_total{action=\"user_link\",kind=\"plex\"} 1"])
        .await;
    for reason in ["unlinked_account", "ambiguous_credentials"] {
        assert!(refusals_counted(&gw, reason).await, "{reason} not counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plex_tv_down_keeps_known_users_and_answers_new_tokens_with_503() {
    let w = world().await;
    let gw = w.linked("", &[]).await;
    let known = w.tv.issue_jwt(&w.owner, "phone-1", 3600);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&known)).await.0,
        200
    );
    w.tv.set_down(true);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&known)).await.0,
        200
    );
    let new =
        w.tv.device_token(&w.owner, "tablet-9", "Plex for iOS", "iPad");
    let (status, body) = plex_get(&gw, "/library/sections", Some(&new)).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("cannot be checked now"),
        "{body}"
    );
    assert_eq!(w.reached(&new), 0);
    w.tv.set_down(false);
    assert_eq!(plex_get(&gw, "/library/sections", Some(&new)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lets_the_gateway_in_without_a_token_is_refused() {
    let w = world().await;
    w.pms
        .set_pref("allowedNetworks", "192.168.1.0/24,127.0.0.0/8");
    let mut gw = w.gateway("").configure();
    let out = gw.cli(&["serve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("route `media`") && err.contains("127.0.0.0/8"),
        "{err}"
    );
    // `portcullis plex check` says the same, and the warnings.
    let check = gw.cli(&["plex", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success());
    assert!(
        text.contains("FATAL") && text.contains("Relay is on"),
        "{text}"
    );

    // Fixed: the gateway serves; changed back while it runs: every request is refused and
    // /readyz says why.
    w.pms.set_pref("allowedNetworks", "");
    gw.launch().await;
    let check = gw.cli_ok(&["plex", "check"]);
    assert!(
        check.contains("warning: local network discovery (GDM) is on"),
        "{check}"
    );
    w.pms.set_pref("allowedNetworks", "127.0.0.1");
    let readyz = format!("{}/readyz", gw.admin);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            let r = client().get(&readyz).send().await.unwrap();
            r.status().as_u16() == 503
                && r.text().await.unwrap().contains("\"self_check\":\"fatal\"")
        })
        .await
    );
    let before = w.pms.requests().len();
    let (status, _) = plex_get(&gw, "/library/sections", Some(&w.owner.token)).await;
    assert_eq!(status, 503);
    assert_eq!(w.pms.requests().len() - before, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn also_signing_out_at_plex_tv_removes_the_owners_device_or_unshares_a_friend() {
    let w = world().await;
    let (friend, share) = w.friend();
    let gw = w.linked("", &[("bob", &friend)]).await;
    let phone =
        w.tv.device_token(&w.owner, "test-device-1", "Plex for Tests", "Test Box");
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&phone)).await.0,
        200
    );
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&share)).await.0,
        200
    );
    // The device of the gateway's own server token, seen by the gateway too (a request that
    // names the server's client identifier): it stays, or the gateway would lose its access.
    let server_token = w.pms.server_token();
    let resp = client()
        .get(gw.url("/library/sections"))
        .header("X-Plex-Client-Identifier", w.pms.machine_id())
        .header("X-Plex-Token", &server_token)
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let devices = gw.cli_ok(&["plex", "devices"]);
    assert!(
        devices.contains(&w.pms.machine_id()) && devices.contains("test-device-1"),
        "{devices}"
    );
    let out = gw.cli_ok(&["plex", "revoke-upstream", &w.owner.username]);
    assert!(out.contains("removed the owner's device"), "{out}");
    let device = w.tv.device_id(&w.owner, "test-device-1");
    assert!(device.is_none(), "the device is still at plex.tv");
    assert_eq!(w.tv.deleted_devices().len(), 1);
    assert!(!w.tv.token_is_live(&phone));
    assert!(
        w.tv.device_id(&w.owner, &w.pms.machine_id()).is_some(),
        "the server token's device was removed at plex.tv"
    );
    assert!(w.tv.token_is_live(&server_token));
    assert!(gw.cli_ok(&["plex", "check"]).contains("ok"));
    // Again: nothing left to remove, and it says so.
    let out = gw.cli_ok(&["plex", "revoke-upstream", &w.owner.username]);
    assert!(out.contains("nothing to do at plex.tv"), "{out}");
    assert_eq!(w.tv.deleted_devices().len(), 1);
    let out = gw.cli_ok(&["plex", "revoke-upstream", &friend.username]);
    assert!(out.contains("stopped sharing"), "{out}");
    assert_eq!(w.tv.removed_shares(), vec![friend.id]);
    assert!(!w.tv.token_is_live(&share));
}

/// Replicas A (built from `a`) and B of one gateway on a fresh PostgreSQL schema, each polling
/// the store only every 30 s: what B learns within a second comes from the store's push
/// announcements.
async fn two_replicas(w: &World, a: GatewayBuilder) -> (Schema, Gateway, Gateway) {
    let schema = Schema::on(&pg::server_url());
    let url = schema.url();
    let store = "poll_interval = \"30s\"\nmax_staleness = \"60s\"";
    let a = a.store_url(&url).store_keys(store).start().await;
    let b = Gateway::builder(&w.pms.url())
        .keys_of(&a)
        .store_url(&url)
        .store_keys(store)
        .route_keys("kind = \"plex\"")
        .extra_toml(&w.plex_table)
        .start()
        .await;
    (schema, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_on_postgresql_obeys_plex_revocations() {
    let w = world().await;
    let (_schema, a, b) = two_replicas(&w, w.gateway("")).await;
    link(&a, "alice", &w.owner.username).await;
    let token = w.tv.issue_jwt(&w.owner, "phone-1", 3600);
    // Bound through A, known to B at once; and an open socket through B.
    assert_eq!(plex_get(&a, "/library/sections", Some(&token)).await.0, 200);
    assert_eq!(plex_get(&b, "/library/sections", Some(&token)).await.0, 200);
    let mut ws = notification_socket(&b, &token).await;
    let start = Instant::now();
    a.cli_ok(&["signout", "--user", "alice"]);
    // One second from the sign-out for both: the refusal and the closed socket.
    let deadline = start + Duration::from_secs(1);
    assert!(
        answers_within(&b, &token, 401, left(deadline))
            .await
            .is_some(),
        "replica B still lets the token through"
    );
    assert!(
        socket_closes_by(&mut ws, deadline).await,
        "the socket through replica B is still open a second after the sign-out"
    );
    eprintln!(
        "replica B refused and closed {:?} after the sign-out on A",
        start.elapsed()
    );
    // The plain part key keeps working for nobody.
    assert_eq!(plex_get(&b, PART_KEY, Some(&token)).await.0, 401);
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The row of Plex device `test-device-1` on an account page.
fn device_row(page: &str) -> &str {
    let row = page
        .split("<tr data-plex-device=\"test-device-1\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no row of the device:\n{page}"));
    &row[..row.find("</tr>").unwrap()]
}

/// Posts the account page's "Sign out" of Plex device `test-device-1` of `account`: the status.
async fn sign_out_device(browser: &crate::account::Browser<'_>, account: &str) -> u16 {
    let csrf = browser.csrf().await;
    let fields = [
        ("account", account),
        ("client_id", "test-device-1"),
        ("csrf", csrf.as_str()),
    ];
    let resp = browser
        .post("/_portcullis/account/plex/revoke", &fields)
        .await;
    resp.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_page_approves_a_device_only_with_the_password_and_a_fresh_code() {
    use crate::account::{enrol, Browser};
    use portcullis::auth::totp;

    let w = world().await;
    let (friend, share) = w.friend();
    let gw = w.linked("device_approval = true\n", &[]).await;
    let a = Browser::login(&gw, "alice", PW).await;
    let (seed, _) = enrol(&a).await;
    let token = w.tv.issue_jwt(&w.owner, "test-device-1", 3600);
    // The app asks from 127.0.0.7.
    let from = client_from([127, 0, 0, 7]);
    assert_eq!(
        plex_get_with(&from, &gw, "/library/sections", Some(&token))
            .await
            .0,
        401
    );

    // The pending device is on alice's page with what the app said about itself.
    let page = a.text("/_portcullis/account").await;
    let row = device_row(&page);
    for text in [
        "Plex for Tests",
        "Test Box",
        "Linux",
        "<td>127.0.0.7</td>",
        "Waiting for your approval",
    ] {
        assert!(row.contains(text), "{text} missing from {row}");
    }
    assert!(row.contains("name=\"code\""), "no code field: {row}");
    let account = w.owner.id.to_string();
    let approve = |password: &'static str, code: String| {
        let (a, account) = (&a, account.clone());
        async move {
            let csrf = a.csrf().await;
            a.post(
                "/_portcullis/account/plex/approve",
                &[
                    ("account", account.as_str()),
                    ("client_id", "test-device-1"),
                    ("csrf", csrf.as_str()),
                    ("password", password),
                    ("code", code.as_str()),
                ],
            )
            .await
        }
    };
    // Without the code, with a wrong code, with a wrong password: refused, still pending.
    let step = totp::step_of(now_s());
    let next = totp::code_at(&seed, step + 1);
    for (password, code) in [
        (PW, String::new()),
        (PW, "000000".into()),
        ("wrong", next.clone()),
    ] {
        let resp = approve(password, code.clone()).await;
        assert_eq!(resp.status().as_u16(), 403, "{password:?} {code:?}");
    }
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&token)).await.0,
        401
    );
    assert_eq!(w.reached(&token), 0);
    // The password and a fresh code approve it; the app plays at once.
    let resp = approve(PW, next).await;
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?done=plex-approved"
    );
    assert!(
        answers_within(&gw, &token, 200, Duration::from_secs(1))
            .await
            .is_some(),
        "the approved device is still refused"
    );
    let page = a.text("/_portcullis/account").await;
    assert!(device_row(&page).contains("Approved "), "{page}");

    // bob has no second factor: his page says to turn it on, and a forged approval is refused.
    link(&gw, "bob", &friend.username).await;
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&share)).await.0,
        401
    );
    let b = Browser::login(&gw, "bob", PW).await;
    let page = b.text("/_portcullis/account").await;
    assert!(
        page.contains("turn on two-factor authentication to approve devices"),
        "{page}"
    );
    let csrf = b.csrf().await;
    let friend_id = friend.id.to_string();
    let resp = b
        .post(
            "/_portcullis/account/plex/approve",
            &[
                ("account", friend_id.as_str()),
                ("client_id", "test-device-1"),
                ("csrf", csrf.as_str()),
                ("password", PW),
            ],
        )
        .await;
    assert_eq!(resp.status().as_u16(), 403);
    // Nor can bob sign out alice's device.
    assert_eq!(sign_out_device(&b, &account).await, 400);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&token)).await.0,
        200
    );

    // alice signs the device out from her page: refused again, and pending once more.
    assert_eq!(sign_out_device(&a, &account).await, 303);
    assert!(answers_within(&gw, &token, 401, Duration::from_secs(1))
        .await
        .is_some());
    let audit = gw.cli_ok(&["audit", "--limit", "100"]);
    for event in [
        "plex_device_approve",
        "plex_device_approved",
        "plex_device_revoked",
    ] {
        assert!(audit.contains(event), "{event} not audited:\n{audit}");
    }
    gw.metrics_with(&[
        "portcullis_media_links_total{action=\"approve\",kind=\"plex\"} 1",
        "portcullis_media_links_total{action=\"revoke_device\",kind=\"plex\"} 1",
    ])
    .await;
    assert!(refusals_counted(&gw, "device_not_approved").await);
}

/// Opens Plex's notification EventSource with `token`; the stream once its first event came.
async fn event_source(
    gw: &Gateway,
    token: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> {
    let resp = client()
        .get(gw.url(&format!(
            "/:/eventsource/notifications?filters=activity&X-Plex-Token={token}"
        )))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&first).starts_with("event: activity\ndata: "),
        "{first:?}"
    );
    body
}

/// Whether `body` ends (the gateway closed it) within a second.
async fn ends_within_a_second(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
) -> bool {
    read_until_end_by(body, Instant::now() + Duration::from_secs(1))
        .await
        .is_some()
}

/// How many bytes `body` gave before it ended (its end or an error), if it ended by `deadline`.
async fn read_until_end_by(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    deadline: Instant,
) -> Option<u64> {
    tokio::time::timeout_at(deadline.into(), async {
        let mut read = 0u64;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len() as u64;
        }
        read
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_with_sign_out_and_a_breach_response_end_plex_apps_and_their_streams() {
    use crate::account::Browser;

    let w = world().await;
    let gw = w.linked("", &[]).await;
    let phone = w.tv.issue_jwt(&w.owner, "phone-1", 3600);
    let mut events = Box::pin(event_source(&gw, &phone).await);
    assert_eq!(w.pms.open_sockets(), 1, "the EventSource is open upstream");

    // alice changes her password and ticks "sign out connected devices".
    let a = Browser::login(&gw, "alice", PW).await;
    let csrf = a.csrf().await;
    let new_pw = "another passphrase for plex";
    let resp = a
        .post(
            "/_portcullis/account/password",
            &[
                ("current", PW),
                ("new_password", new_pw),
                ("confirm", new_pw),
                ("signout", "1"),
                ("csrf", csrf.as_str()),
            ],
        )
        .await;
    assert_eq!(resp.status().as_u16(), 303);
    assert!(
        ends_within_a_second(&mut events).await,
        "the EventSource still runs a second after the password change"
    );
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&phone)).await.0,
        401
    );
    assert!(
        poll_until(Duration::from_secs(1), || async {
            w.pms.open_sockets() == 0
        })
        .await
    );

    // The app signs in at plex.tv again: a new token, bound afresh, plays.
    let tv = w.tv.issue_jwt(&w.owner, "tv-1", 3600);
    let mut events = Box::pin(event_source(&gw, &tv).await);
    let reached = w.reached(&tv);

    // The operator runs the breach response: every app ends, the stream with it.
    let out = gw.cli_ok(&["breach-response"]);
    assert!(!out.is_empty());
    assert!(
        ends_within_a_second(&mut events).await,
        "the EventSource still runs a second after the breach response"
    );
    for token in [&tv, &phone] {
        assert_eq!(plex_get(&gw, "/library/sections", Some(token)).await.0, 401);
    }
    assert_eq!(
        w.reached(&tv),
        reached,
        "a request reached Plex after the breach response"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_reports_the_self_check_and_links_and_unlinks_plex_accounts() {
    let w = world().await;
    let (friend, share) = w.friend();
    let gw = w.gateway("").admin("root", PW).start().await;
    let root = Browser::login(&gw, "root", PW).await;
    let bob = Browser::login(&gw, "bob", PW).await;
    // The friend's token: the gateway meets the account, which is not linked yet.
    let (status, body) = plex_get(&gw, "/library/sections", Some(&share)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unlinked_account"))
    );
    let html = root.text("/_portcullis/admin").await;
    let section = html
        .split("<section id=\"plex\">")
        .nth(1)
        .expect("a Plex section");
    assert!(
        section.contains("Route media")
            && section.contains("Serving: the server&#39;s settings let nobody in")
            && section.contains("local network discovery (GDM) is on")
            && section.contains("friendplex")
            && section.contains("Not linked"),
        "{section}"
    );
    let csrf = input_value(&html, "csrf").unwrap();
    let account = friend.id.to_string();
    let link = |user: &'static str, account: String, csrf: String| {
        let root = &root;
        async move {
            root.post(
                "/_portcullis/admin/plex/link",
                &[("account", &account), ("user", user), ("csrf", &csrf)],
            )
            .await
            .status()
            .as_u16()
        }
    };
    // Only an admin, only with the page's token, only a real user and account.
    let bob_csrf = bob.csrf().await;
    let resp = bob
        .post(
            "/_portcullis/admin/plex/link",
            &[("account", &account), ("user", "bob"), ("csrf", &bob_csrf)],
        )
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(link("bob", account.clone(), String::new()).await, 403);
    assert_eq!(link("", account.clone(), csrf.clone()).await, 400);
    assert_eq!(link("nobody", account.clone(), csrf.clone()).await, 400);
    assert_eq!(link("bob", "999999".into(), csrf.clone()).await, 400);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&share)).await.0,
        401
    );
    // Linked by the admin: the friend's token passes at once.
    assert_eq!(link("bob", account.clone(), csrf.clone()).await, 303);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&share)).await.0,
        200
    );
    let html = root.text("/_portcullis/admin").await;
    assert!(html.contains("Linked to bob"), "{html}");
    // Unlinked: it ends within a second; unlinking again is refused.
    let unlink = [("account", account.as_str()), ("csrf", csrf.as_str())];
    let resp = root.post("/_portcullis/admin/plex/unlink", &unlink).await;
    assert_eq!(resp.status(), 303);
    assert!(answers_within(&gw, &share, 401, Duration::from_secs(1))
        .await
        .is_some());
    let resp = root.post("/_portcullis/admin/plex/unlink", &unlink).await;
    assert_eq!(resp.status(), 400);
    // "Also sign out at plex.tv": only the admin; the friend is un-shared at plex.tv.
    let html = root.text("/_portcullis/admin").await;
    assert!(html.contains("Also sign out at plex.tv"), "{html}");
    let resp = bob
        .post(
            "/_portcullis/admin/plex/revoke-upstream",
            &[("account", &account), ("csrf", &bob_csrf)],
        )
        .await;
    assert_eq!(resp.status(), 403);
    assert!(w.tv.removed_shares().is_empty());
    let resp = root
        .post("/_portcullis/admin/plex/revoke-upstream", &unlink)
        .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(w.tv.removed_shares(), vec![friend.id]);
    assert!(!w.tv.token_is_live(&share));
    gw.metrics_with(&[
        "portcullis_media_links_total{action=\"admin_link\",kind=\"plex\"} 1",
        "portcullis_media_links_total{action=\"unlink\",kind=\"plex\"} 1",
        "portcullis_media_links_total{action=\"revoke_upstream\",kind=\"plex\"} 1",
    ])
    .await;
    assert!(refusals_counted(&gw, "unlinked_account").await);
    let audit = root.text("/_portcullis/admin").await;
    assert!(
        audit.contains("plex_linked")
            && audit.contains("plex_unlinked")
            && audit.contains(&format!(
                "<td>plex_revoked_upstream</td><td>success</td><td></td><td>127.0.0.1</td>\
<td>plex account friendplex ({account}) by admin: stopped sharing"
            )),
        "{audit}"
    );
    // The owner's account, linked to alice, with no device of it seen: nothing is done at
    // plex.tv, the admin is told so, nothing counted; audited with alice.
    self::link(&gw, "alice", &w.owner.username).await;
    let owner = w.owner.id.to_string();
    let revoke_owner = [("account", owner.as_str()), ("csrf", csrf.as_str())];
    let resp = root
        .post("/_portcullis/admin/plex/revoke-upstream", &revoke_owner)
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("Nothing done") && text.contains("nothing to do at plex.tv"),
        "{text}"
    );
    // plex.tv down: not done, the admin is told why, audited as a failure.
    w.tv.set_down(true);
    let resp = root
        .post("/_portcullis/admin/plex/revoke-upstream", &revoke_owner)
        .await;
    w.tv.set_down(false);
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(text.contains("Not done") && text.contains("503"), "{text}");
    assert!(w.tv.deleted_devices().is_empty());
    gw.metrics_with(&["portcullis_media_links_total{action=\"revoke_upstream\",kind=\"plex\"} 1"])
        .await;
    let audit = root.text("/_portcullis/admin").await;
    for outcome in ["nothing_to_do", "failure"] {
        let row = format!(
            "<td>plex_revoked_upstream</td><td>{outcome}</td><td>alice</td><td>127.0.0.1</td>\
<td>plex account ownerplex ({owner}) by admin: "
        );
        assert!(audit.contains(&row), "{row} missing:\n{audit}");
    }

    // The server now lets the gateway in without a token: the page says why it refuses.
    w.pms.set_pref("allowedNetworks", "127.0.0.1");
    let readyz = format!("{}/readyz", gw.admin);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            client().get(&readyz).send().await.unwrap().status() == 503
        })
        .await
    );
    let html = root.text("/_portcullis/admin").await;
    assert!(
        html.contains("Refusing every request") && html.contains("127.0.0.1"),
        "{html}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_a_passkey_and_no_code_approves_a_new_device_with_the_passkey() {
    use crate::passkeys::{confirm_grant, register_as};

    let w = world().await;
    let gw = w.linked("device_approval = true\n", &[]).await;
    let alice = Browser::login(&gw, "alice", PW).await;
    let mut key = register_as(&gw, &alice, PW, "Phone", true).await;
    let token = w.tv.issue_jwt(&w.owner, "test-device-1", 3600);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&token)).await.0,
        401
    );
    // No TOTP: the pending device offers the passkey, not the code.
    let page = alice.text("/_portcullis/account").await;
    let row = device_row(&page);
    assert!(
        row.contains("Approve with a passkey") && !row.contains("name=\"code\""),
        "{row}"
    );
    assert!(
        row.contains("data-passkey-grant") && !row.contains("name=\"password\""),
        "{row}"
    );
    let account = w.owner.id.to_string();
    let approve = |grant: String| {
        let (account, alice) = (
            account.clone(),
            Browser::with_cookie(&gw, alice.cookie.clone()),
        );
        async move {
            let csrf = alice.csrf().await;
            alice
                .post(
                    "/_portcullis/account/plex/approve",
                    &[
                        ("account", account.as_str()),
                        ("client_id", "test-device-1"),
                        ("password", PW),
                        ("passkey_grant", grant.as_str()),
                        ("csrf", &csrf),
                    ],
                )
                .await
        }
    };
    // The password alone is one factor: refused. A passkey that did not verify alice buys no
    // grant.
    let resp = approve(String::new()).await;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("two factors"));
    let (status, body) = confirm_grant(&gw, &alice, &mut key, false).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("user_not_verified")),
        "{body}"
    );
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&token)).await.0,
        401
    );
    // Verified: approved, and the device plays.
    let (status, body) = confirm_grant(&gw, &alice, &mut key, true).await;
    assert_eq!(status, 200, "{body}");
    let resp = approve(body["grant"].as_str().unwrap().to_string()).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(
        resp.headers()["location"],
        "/_portcullis/account?done=plex-approved"
    );
    assert!(
        answers_within(&gw, &token, 200, Duration::from_secs(2))
            .await
            .is_some(),
        "the approved device is still refused"
    );
    assert_eq!(w.reached(&token), 1);
}

/// A Plex app on a device the user has not signed in from before is told to them by mail, as a
/// new browser is, with its product and device.
#[tokio::test]
async fn a_new_plex_device_is_told_to_its_user_like_a_new_browser() {
    let w = world().await;
    let smtpd = crate::smtpd::Smtpd::start().await;
    let gw = w
        .linked(&format!("\n{}", crate::mail::mail_toml(&smtpd, "")), &[])
        .await;
    gw.cli_ok(&["user", "set-email", "alice", "alice@example.org"]);
    // The first sign-in on record (a browser) alerts nobody; the Plex app then does.
    gw.login("alice", PW).await;
    let (status, body) = plex_get(&gw, "/library/sections", Some(&w.owner.token)).await;
    assert_eq!(status, 200, "{body}");
    let alert = crate::mail::mail_to(&smtpd, "alice@example.org", "New sign-in").await;
    assert!(
        alert.text.contains("Plex for Tests on Test Box"),
        "{}",
        alert.text
    );
    assert!(!alert.links().is_empty(), "the mail carries its links");
}

/// Whether the gateway's metrics count requests refused on the plex route for `reason`
/// (polled: a request is counted just after its response).
async fn refusals_counted(gw: &Gateway, reason: &str) -> bool {
    let series = format!("portcullis_media_refusals_total{{kind=\"plex\",reason=\"{reason}\"}}");
    poll_until(Duration::from_secs(5), || async {
        gw.metric(&series).await > 0.0
    })
    .await
}

/// What is left until `deadline` (zero once it passed: a poll then looks once).
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens Plex's notification WebSocket through `gw` with `token` (in the query, as browsers
/// must), once its first message came.
async fn notification_socket(gw: &Gateway, token: &str) -> Socket {
    let url = format!(
        "ws://{}/:/websockets/notifications?X-Plex-Token={token}",
        gw.base.trim_start_matches("http://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(ws.next().await.unwrap().is_ok(), "no first notification");
    ws
}

/// Whether `ws` ends (a close frame, an error or its end) by `deadline`.
async fn socket_closes_by(ws: &mut Socket, deadline: Instant) -> bool {
    tokio::time::timeout_at(deadline.into(), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => break,
            }
        }
    })
    .await
    .is_ok()
}

/// Starts streaming the big part (produced as it is read) through `gw` with `token`: the body,
/// once its first bytes came.
async fn big_stream(
    gw: &Gateway,
    token: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin {
    let resp = client()
        .get(gw.url(&format!("{BIG_PART_KEY}?X-Plex-Token={token}")))
        .header("X-Plex-Client-Identifier", "test-device-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = Box::pin(resp.bytes_stream());
    assert!(body.next().await.unwrap().is_ok());
    body
}

/// Whether a stream of the big part is cut by `deadline`: it ends short of the part's length.
async fn stream_cut_by(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    deadline: Instant,
) -> bool {
    read_until_end_by(body, deadline)
        .await
        .is_some_and(|n| n < BIG_PART_LEN)
}

/// Opens a notification socket and a stream of the big part through `gw` with `token`, then
/// runs `revoke`; both must end within a second of it, at the client and at the server, and
/// the token is refused with nothing more reaching the server.
async fn revoke_ends_socket_and_stream<F, Fut>(
    w: &World,
    gw: &Gateway,
    token: &str,
    what: &str,
    revoke: F,
) where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ws = notification_socket(gw, token).await;
    let mut body = big_stream(gw, token).await;
    assert!(
        poll_until(Duration::from_secs(2), || async {
            w.pms.open_sockets() == 1 && w.pms.open_streams() == 1
        })
        .await,
        "{what}: the socket and the stream are not open at the server"
    );
    let start = Instant::now();
    revoke().await;
    let deadline = start + Duration::from_secs(1);
    assert!(
        socket_closes_by(&mut ws, deadline).await,
        "{what}: the notification socket is still open a second later"
    );
    assert!(
        stream_cut_by(&mut body, deadline).await,
        "{what}: the stream still runs a second later"
    );
    assert!(
        poll_until(left(deadline), || async {
            w.pms.open_sockets() == 0 && w.pms.open_streams() == 0
        })
        .await,
        "{what}: the server still serves the socket or the stream a second later"
    );
    eprintln!(
        "{what}: socket and stream ended {:?} after it",
        start.elapsed()
    );
    let reached = w.reached(token);
    assert_eq!(
        plex_get(gw, "/library/sections", Some(token)).await.0,
        401,
        "{what}"
    );
    assert_eq!(
        w.reached(token),
        reached,
        "{what}: a request reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_the_user_or_unlinking_the_account_ends_its_socket_and_stream_within_a_second() {
    let w = world().await;
    let (friend, share) = w.friend();
    let (home, home_token) = w.tv.add_home_user(&w.owner, "kidplex");
    let gw = w.linked("", &[("bob", &friend), ("carol", &home)]).await;
    let phone = w.tv.issue_jwt(&w.owner, "phone-1", 3600);

    revoke_ends_socket_and_stream(&w, &gw, &phone, "user disable", || async {
        gw.cli_ok(&["user", "disable", "alice"]);
    })
    .await;
    revoke_ends_socket_and_stream(&w, &gw, &share, "plex unlink", || async {
        gw.cli_ok(&["plex", "unlink", &friend.username]);
    })
    .await;
    // carol unlinks her Plex account from her account page.
    let carol = Browser::login(&gw, "carol", PW).await;
    let csrf = carol.csrf().await;
    let account = home.id.to_string();
    revoke_ends_socket_and_stream(&w, &gw, &home_token, "account page unlink", || async {
        let fields = [("account", account.as_str()), ("csrf", csrf.as_str())];
        let resp = carol
            .post("/_portcullis/account/plex/unlink", &fields)
            .await;
        assert_eq!(resp.status().as_u16(), 303);
    })
    .await;
    // The account page's unlink is this gateway's (the CLI's are the CLI's own).
    gw.metrics_with(&["portcullis_media_links_total{action=\"unlink\",kind=\"plex\"} 1"])
        .await;
    assert!(
        poll_until(Duration::from_secs(5), || async {
            gw.metric("portcullis_connections_closed_total").await >= 6.0
        })
        .await,
        "not 3 sockets and 3 streams counted as closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_unlinks_and_disabled_users_on_one_replica_reach_the_other_at_once() {
    let w = world().await;
    let (_schema, a, b) = two_replicas(&w, w.gateway("").admin("root", PW)).await;
    // alice's Plex app meets replica B before any link: refused, and B remembers it.
    let phone = w.tv.issue_jwt(&w.owner, "phone-1", 3600);
    let (status, body) = plex_get(&b, "/library/sections", Some(&phone)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unlinked_account"))
    );
    // The admin links it on replica A's page: B lets the token in at once, long before the
    // refusal it remembers would be forgotten (10 s).
    let root = Browser::login(&a, "root", PW).await;
    let html = root.text("/_portcullis/admin").await;
    let csrf = input_value(&html, "csrf").unwrap();
    let account = w.owner.id.to_string();
    let start = Instant::now();
    let fields = [
        ("account", account.as_str()),
        ("user", "alice"),
        ("csrf", csrf.as_str()),
    ];
    let resp = root.post("/_portcullis/admin/plex/link", &fields).await;
    assert_eq!(resp.status().as_u16(), 303);
    assert!(
        answers_within(&b, &phone, 200, Duration::from_secs(2))
            .await
            .is_some(),
        "replica B still refuses the token of the account linked on A"
    );
    eprintln!(
        "replica B let the token in {:?} after the link on A",
        start.elapsed()
    );

    // Unlinked on A's page: the socket and the stream through B end within a second.
    revoke_ends_socket_and_stream(&w, &b, &phone, "unlink on A", || async {
        let fields = [("account", account.as_str()), ("csrf", csrf.as_str())];
        let resp = root.post("/_portcullis/admin/plex/unlink", &fields).await;
        assert_eq!(resp.status().as_u16(), 303);
    })
    .await;

    // Linked again; alice's app signs in afresh and plays through B until alice is disabled
    // on A.
    a.cli_ok(&["plex", "link", "alice", &w.owner.username]);
    let tablet = w.tv.issue_jwt(&w.owner, "tablet-1", 3600);
    assert!(
        answers_within(&b, &tablet, 200, Duration::from_secs(2))
            .await
            .is_some(),
        "replica B refuses the token linked again"
    );
    revoke_ends_socket_and_stream(&w, &b, &tablet, "user disable on A", || async {
        a.cli_ok(&["user", "disable", "alice"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_jwt_is_refused_once_its_exp_passes() {
    let w = world().await;
    let gw = w.linked("", &[]).await;
    let short = w.tv.issue_jwt(&w.owner, "phone-1", 2);
    assert_eq!(
        plex_get(&gw, "/library/sections", Some(&short)).await.0,
        200
    );
    let reached = w.reached(&short);
    let (last, passed) = answers_within(&gw, &short, 401, Duration::from_secs(5))
        .await
        .expect("the token passes after its exp");
    assert_eq!(last["error"], "expired", "{last}");
    assert_eq!(
        w.reached(&short),
        reached + passed,
        "a request with the expired token reached the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sees_the_gateways_forwarded_address_not_the_clients() {
    let w = world().await;
    let gw = w.linked("", &[]).await;
    let token = w.tv.issue_jwt(&w.owner, "phone-1", 3600);
    // A client that claims to be somewhere public, from 127.0.0.7.
    let resp = client_from([127, 0, 0, 7])
        .get(gw.url("/library/sections"))
        .header("X-Plex-Token", &token)
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Real-IP", "203.0.113.9")
        .header("Forwarded", "for=203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = w
        .pms
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.header("x-plex-token") == Some(token.as_str()))
        .expect("the request reached the server");
    assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.7"]);
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains("203.0.113.9")),
        "the client's address reached the server: {:?}",
        seen.headers
    );
}
