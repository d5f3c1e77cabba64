//! Fidelity tests of the Plex stand-ins ([`crate::plex_standin`]), talking to them directly (no
//! gateway): each checks one behaviour the research briefs or python-plexapi attribute to the real
//! Plex Media Server or plex.tv. The `plex_python_*` tests drive the real `plexapi` package
//! (`tests/clients/plex_python.py`) against them; they need `tests/clients/install.sh` to have run.

use std::process::Stdio;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::poll_until;
use crate::plex_standin::{
    self, PlexAccount, PlexTv, Pms, BIG_PART_KEY, BIG_PART_LEN, MOVIE_ID, PART_KEY, PART_LEN,
    SEGMENT_LEN,
};
use crate::standin_fidelity::{clients_dir, run_client_args};
use crate::upstream::pattern_byte;

const WAIT: Duration = Duration::from_secs(10);
/// The client identifier plex_python.py sends.
const PY_CLIENT_ID: &str = "portcullis-plexapi-1";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

struct World {
    tv: PlexTv,
    owner: PlexAccount,
    pms: Pms,
}

async fn world() -> World {
    let tv = PlexTv::start().await;
    let owner = tv.add_account("owner");
    let pms = Pms::start(&tv, &owner).await;
    World { tv, owner, pms }
}

/// Status and body of `GET {base}{path}` with `X-Plex-Token: token` (if any) and extra headers.
async fn get(
    base: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut rb = client().get(format!("{base}{path}"));
    if let Some(t) = token {
        rb = rb.header("X-Plex-Token", t);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn root_status(pms: &Pms, token: &str) -> u16 {
    get(&pms.url(), "/", Some(token), &[]).await.0
}

async fn user_status(tv: &PlexTv, token: &str) -> u16 {
    get(&tv.url(), "/api/v2/user", Some(token), &[]).await.0
}

/// An attribute of the first element that has it (after the XML declaration).
fn xml_attr(xml: &str, name: &str) -> Option<String> {
    let xml = xml.split_once("?>").map_or(xml, |(_, rest)| rest);
    let needle = format!(" {name}=\"");
    let start = xml.find(&needle)? + needle.len();
    let end = xml[start..].find('"')?;
    Some(xml[start..start + end].to_owned())
}

fn require_plexapi() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import plexapi, websocket, jwt"])
        .output()
        .expect("python3 must be on PATH");
    assert!(
        probe.status.success(),
        "plexapi is not installed: run tests/clients/install.sh"
    );
}

/// Runs a single-line mode of plex_python.py; returns its JSON line.
async fn run_plex_script(args: &[&str]) -> Value {
    let dir = clients_dir();
    let out = tokio::process::Command::new("python3")
        .arg(dir.join("plex_python.py"))
        .args(args)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("plex_python.py timed out")
        .expect("cannot run plex_python.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "plex_python.py {args:?} exited with {}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Phase-1 facts that hold for every identity with access.
fn check_phase1(w: &World, p1: &Value) {
    assert_eq!(p1["phase"], 1);
    assert_eq!(p1["machine_id"], w.pms.machine_id());
    assert_eq!(p1["friendly_name"], plex_standin::PMS_NAME);
    assert_eq!(p1["sections"], serde_json::json!(["Movies"]));
    assert_eq!(p1["movies"].as_array().unwrap().len(), 2);
    assert_eq!(p1["metadata_title"], "Stand-in Movie");
    assert_eq!(p1["part_key"], PART_KEY);
    assert_eq!(p1["range_status"], 206);
    assert_eq!(p1["range_len"], 100);
    assert_eq!(p1["range_ok"], true);
    assert_eq!(p1["segment_status"], 206);
    assert_eq!(p1["segment_ok"], true);
    assert!(!p1["segment_url"].as_str().unwrap().contains("X-Plex-Token"));
    assert!(p1["transient_token"]
        .as_str()
        .unwrap()
        .starts_with("transient-"));
    assert_eq!(p1["alert_connected"], true);
    assert_eq!(p1["alert_type"], "activity");
}

/// What plexapi sent, as the stand-in recorded it.
fn check_wire(pms: &Pms, token: &str, p1: &Value) {
    let reqs = pms.requests();
    let root = reqs.iter().find(|r| r.path_and_query == "/").unwrap();
    assert_eq!(root.header("x-plex-token"), Some(token));
    assert_eq!(root.header("x-plex-client-identifier"), Some(PY_CLIENT_ID));
    assert_eq!(root.header("x-plex-product"), Some("PlexAPI"));
    // Paging in headers, not the query (Corrections).
    let all = reqs
        .iter()
        .find(|r| r.path_and_query.starts_with("/library/sections/1/all"))
        .unwrap();
    assert_eq!(all.header("x-plex-container-start"), Some("0"));
    // The part with the token in the query and a Range header.
    let part = reqs
        .iter()
        .find(|r| r.path_and_query.starts_with(PART_KEY))
        .unwrap();
    assert_eq!(
        part.path_and_query,
        format!("{PART_KEY}?X-Plex-Token={token}")
    );
    assert_eq!(part.header("range"), Some("bytes=0-99"));
    // The notification socket: token in the query, an Origin, no cookie (Corrections).
    let ws = reqs
        .iter()
        .find(|r| r.header("upgrade") == Some("websocket"))
        .unwrap();
    assert_eq!(
        ws.path_and_query,
        format!("/:/websockets/notifications?X-Plex-Token={token}")
    );
    assert!(ws.header("origin").is_some());
    assert!(ws.header("cookie").is_none());
    // Segments and variant playlists went out without any token.
    let session = p1["transcode_session"].as_str().unwrap();
    let tokenless: Vec<_> = reqs
        .iter()
        .filter(|r| r.path_and_query.contains(&format!("/session/{session}/")))
        .collect();
    assert!(tokenless.len() >= 2, "{tokenless:?}");
    for r in tokenless {
        assert!(r.header("x-plex-token").is_none());
        assert!(!r.path_and_query.contains("X-Plex-Token"));
    }
    let start = reqs
        .iter()
        .find(|r| {
            r.path_and_query
                .starts_with("/video/:/transcode/universal/start.m3u8")
        })
        .unwrap();
    assert!(start
        .path_and_query
        .contains(&format!("X-Plex-Token={token}")));
    assert!(!start.path_and_query.contains("session="));
}

// ---------------------------------------------------------------- the real client, end to end

#[tokio::test]
async fn plex_python_client_works_with_the_owner_token_until_it_is_revoked() {
    require_plexapi();
    let w = world().await;
    let token =
        w.tv.device_token(&w.owner, "owner-laptop", "Plex Web", "laptop");
    let tv = w.tv.clone();
    let revoked = token.clone();
    let (p1, p2) = run_client_args(
        "python3",
        "plex_python.py",
        &[&w.pms.url(), &token],
        |_| async move {
            tv.revoke_token(&revoked);
        },
    )
    .await;
    check_phase1(&w, &p1);
    check_wire(&w.pms, &token, &p1);
    // The owner reads /library directly: no fallback.
    let reqs = w.pms.requests();
    assert!(reqs.iter().any(|r| r.path_and_query == "/library"));
    assert!(!reqs
        .iter()
        .any(|r| r.path_and_query == "/library/sections/"));

    // Revoked at plex.tv: the PMS refuses the token at once; the token-less segment still works
    // (the session is the credential) and the PMS leaves the open notification socket alone.
    assert_eq!(p2["phase"], 2);
    assert_eq!(p2["root_status"], 401);
    assert_eq!(p2["segment_status"], 206);
    assert_eq!(p2["socket_closed"], false);
}

#[tokio::test]
async fn plex_python_client_works_with_a_friend_share_token_until_unshared() {
    require_plexapi();
    let w = world().await;
    let friend = w.tv.add_account("friend");
    let share = w.tv.share(&w.pms.machine_id(), &friend);
    let (tv_url, owner_token, friend_id) = (w.tv.url(), w.owner.token.clone(), friend.id);
    let (p1, p2) = run_client_args(
        "python3",
        "plex_python.py",
        &[&w.pms.url(), &share],
        |_| async move {
            // Un-share on plex.tv with the owner's token (MyPlexAccount.removeFriend).
            let resp = client()
                .delete(format!("{tv_url}/api/v2/sharings/{friend_id}"))
                .header("X-Plex-Token", owner_token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 204);
        },
    )
    .await;
    check_phase1(&w, &p1);
    check_wire(&w.pms, &share, &p1);
    // A friend is refused /library and plexapi falls back to /library/sections/ by itself.
    let reqs = w.pms.requests();
    let library = reqs
        .iter()
        .position(|r| r.path_and_query == "/library")
        .unwrap();
    let fallback = reqs
        .iter()
        .position(|r| r.path_and_query == "/library/sections/")
        .unwrap();
    assert!(library < fallback);
    assert_eq!(w.tv.removed_shares(), vec![friend.id]);
    assert_eq!(p2["root_status"], 401);
    assert_eq!(p2["socket_closed"], false);
}

#[tokio::test]
async fn plex_python_client_works_with_a_home_user_token() {
    require_plexapi();
    let w = world().await;
    let (_kid, token) = w.tv.add_home_user(&w.owner, "kid");
    let (p1, p2) = run_client_args(
        "python3",
        "plex_python.py",
        &[&w.pms.url(), &token],
        |_| async {},
    )
    .await;
    check_phase1(&w, &p1);
    check_wire(&w.pms, &token, &p1);
    assert_eq!(p2["root_status"], 200);
    assert_eq!(p2["segment_status"], 206);
    assert_eq!(p2["socket_closed"], false);
}

#[tokio::test]
async fn plex_python_client_works_with_a_fresh_jwt_until_its_device_is_removed() {
    require_plexapi();
    let w = world().await;
    let jwt = w.tv.issue_jwt(&w.owner, PY_CLIENT_ID, 3600);
    let device_id = w.tv.device_id(&w.owner, PY_CLIENT_ID).unwrap();
    let (tv_url, owner_token) = (w.tv.url(), w.owner.token.clone());
    let removed = device_id.clone();
    let (p1, p2) = run_client_args(
        "python3",
        "plex_python.py",
        &[&w.pms.url(), &jwt],
        |_| async move {
            // Remove the device on plex.tv (MyPlexDevice.delete): its JWTs die with it.
            let resp = client()
                .delete(format!("{tv_url}/devices/{removed}.xml"))
                .header("X-Plex-Token", owner_token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        },
    )
    .await;
    check_phase1(&w, &p1);
    check_wire(&w.pms, &jwt, &p1);
    assert_eq!(w.tv.deleted_devices(), vec![device_id]);
    assert_eq!(p2["root_status"], 401);
}

#[tokio::test]
async fn plex_python_myplexaccount_lists_and_deletes_devices_on_the_plextv_standin() {
    require_plexapi();
    let w = world().await;
    let phone =
        w.tv.device_token(&w.owner, "owner-phone", "Plex for Android", "phone");
    let laptop =
        w.tv.device_token(&w.owner, "owner-laptop", "Plex Web", "laptop");
    let out = run_plex_script(&["--plextv", &w.tv.url(), &laptop, "owner-phone"]).await;
    assert_eq!(out["id"], w.owner.id);
    assert_eq!(out["uuid"], w.owner.uuid);
    assert_eq!(out["username"], "owner");
    assert_eq!(out["email"], "owner@example.com");
    assert_eq!(out["auth_token"], laptop.as_str());
    let devices = out["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 3, "{devices:?}");
    let server = devices
        .iter()
        .find(|d| d["clientIdentifier"] == w.pms.machine_id().as_str())
        .unwrap();
    assert_eq!(server["product"], "Plex Media Server");
    assert_eq!(server["token"], w.pms.server_token().as_str());
    let phone_dev = devices
        .iter()
        .find(|d| d["clientIdentifier"] == "owner-phone")
        .unwrap();
    assert_eq!(phone_dev["token"], phone.as_str());
    assert_eq!(out["deleted"], phone_dev["id"]);
    assert_eq!(out["devices_after"].as_array().unwrap().len(), 2);
    assert_eq!(
        w.tv.deleted_devices(),
        vec![phone_dev["id"].as_str().unwrap().to_owned()]
    );
    // The removed device's token is dead at plex.tv and at the PMS; the other one lives.
    assert_eq!(user_status(&w.tv, &phone).await, 401);
    assert_eq!(root_status(&w.pms, &phone).await, 401);
    assert_eq!(root_status(&w.pms, &laptop).await, 200);

    // MyPlexAccount with an unknown token: plexapi's Unauthorized.
    let out = run_plex_script(&["--plextv", &w.tv.url(), "nottherighttoken0000"]).await;
    assert_eq!(out["error"], "Unauthorized");
}

#[tokio::test]
async fn plex_python_verifies_standin_jwts_against_the_published_keys() {
    require_plexapi();
    let w = world().await;
    let jwt = w.tv.issue_jwt(&w.owner, "jwt-device", 3600);
    let out = run_plex_script(&["--verify-jwt", &w.tv.url(), &jwt, "jwt-device"]).await;
    let claims = &out["claims"];
    assert_eq!(claims["iss"], "plex.tv");
    assert_eq!(claims["aud"], serde_json::json!(["plex.tv", "jwt-device"]));
    assert_eq!(
        claims["thumbprint"],
        w.tv.thumbprint(&w.owner, "jwt-device")
    );
    assert_eq!(claims["user_id"], w.owner.id);
    assert_eq!(claims["user_uuid"], w.owner.uuid);
    let header = jsonwebtoken::decode_header(&jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    assert_eq!(header.kid, Some(w.tv.jwt_kid()));

    let forged = w.tv.forged_jwt(&w.owner, "jwt-device");
    let out = run_plex_script(&["--verify-jwt", &w.tv.url(), &forged, "jwt-device"]).await;
    assert_eq!(out["error"], "InvalidSignatureError");
    let expired = w.tv.issue_jwt(&w.owner, "jwt-device", -60);
    let out = run_plex_script(&["--verify-jwt", &w.tv.url(), &expired, "jwt-device"]).await;
    assert_eq!(out["error"], "ExpiredSignatureError");
}

// ---------------------------------------------------------------- PMS token rules

#[tokio::test]
async fn plex_pms_refuses_expired_forged_revoked_and_unshared_tokens() {
    let w = world().await;
    let friend = w.tv.add_account("friend");
    let share = w.tv.share(&w.pms.machine_id(), &friend);
    let friend_jwt = w.tv.issue_jwt(&friend, "friend-tv", 3600);
    let stranger = w.tv.add_account("stranger");
    let device = w.tv.device_token(&w.owner, "owner-tv", "Plex for LG", "tv");

    // Valid: owner account, owner device, server token, owner JWT, share token, friend JWT.
    for token in [
        w.owner.token.clone(),
        device.clone(),
        w.pms.server_token(),
        w.tv.issue_jwt(&w.owner, "owner-web", 3600),
        share.clone(),
        friend_jwt.clone(),
    ] {
        assert_eq!(root_status(&w.pms, &token).await, 200, "{token}");
    }
    // Invalid: no token, garbage, an expired JWT, a forgery, a stranger, a friend's own token,
    // a stranger's JWT.
    assert_eq!(get(&w.pms.url(), "/", None, &[]).await.0, 401);
    for token in [
        "abcdefghij0123456789".to_owned(),
        w.tv.issue_jwt(&w.owner, "owner-web", -60),
        w.tv.forged_jwt(&w.owner, "owner-web"),
        stranger.token.clone(),
        friend.token.clone(),
        w.tv.issue_jwt(&stranger, "stranger-web", 3600),
    ] {
        assert_eq!(root_status(&w.pms, &token).await, 401, "{token}");
    }
    // The 401 is Plex's HTML page.
    let (status, body) = get(&w.pms.url(), "/", Some("abcdefghij0123456789"), &[]).await;
    assert_eq!(status, 401);
    assert!(body.contains("401 Unauthorized"));

    // Revoked at plex.tv.
    w.tv.revoke_token(&device);
    assert_eq!(root_status(&w.pms, &device).await, 401);
    // Rotation: a new token for the same (account, client id) kills the previous one.
    let first =
        w.tv.device_token(&w.owner, "owner-phone", "Plex for iOS", "phone");
    let second =
        w.tv.device_token(&w.owner, "owner-phone", "Plex for iOS", "phone");
    assert_eq!(root_status(&w.pms, &first).await, 401);
    assert_eq!(root_status(&w.pms, &second).await, 200);
    assert_eq!(first.len(), 20);

    // Un-shared: the share token and the friend's JWT stop working here.
    let resp = client()
        .delete(format!("{}/api/v2/sharings/{}", w.tv.url(), friend.id))
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(root_status(&w.pms, &share).await, 401);
    assert_eq!(root_status(&w.pms, &friend_jwt).await, 401);
    // The token may come in the query too, with any case of the key.
    let (status, _) = get(
        &w.pms.url(),
        &format!("/?x-plex-token={}", w.owner.token),
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn plex_identity_and_web_need_no_token_and_unknown_paths_need_one() {
    let w = world().await;
    let base = w.pms.url();
    let (status, body) = get(&base, "/identity", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        xml_attr(&body, "machineIdentifier"),
        Some(w.pms.machine_id())
    );
    assert_eq!(xml_attr(&body, "claimed").as_deref(), Some("1"));
    assert_eq!(
        xml_attr(&body, "version").as_deref(),
        Some(plex_standin::PMS_VERSION)
    );
    let (status, body) = get(&base, "/web/index.html", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, plex_standin::WEB_INDEX);
    let resp = client().get(format!("{base}/web")).send().await.unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "/web/index.html");
    assert_eq!(get(&base, "/no/such/path", None, &[]).await.0, 401);
    assert_eq!(
        get(&base, "/no/such/path", Some(&w.owner.token), &[])
            .await
            .0,
        404
    );
    assert_eq!(get(&base, PART_KEY, None, &[]).await.0, 401);
}

#[tokio::test]
async fn plex_pms_answers_json_when_asked() {
    let w = world().await;
    let accept = [("Accept", "application/json")];
    let (status, body) = get(
        &w.pms.url(),
        "/library/sections",
        Some(&w.owner.token),
        &accept,
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["MediaContainer"]["Directory"][0]["title"], "Movies");
    let (_, body) = get(
        &w.pms.url(),
        &format!("/library/metadata/{MOVIE_ID}"),
        Some(&w.owner.token),
        &accept,
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["MediaContainer"]["Metadata"][0]["Media"][0]["Part"][0]["key"],
        PART_KEY
    );
    let (_, body) = get(&w.pms.url(), "/identity", None, &[]).await;
    assert!(body.starts_with("<?xml"));
}

#[tokio::test]
async fn plex_transient_token_carries_the_callers_access_level() {
    let w = world().await;
    let base = w.pms.url();
    let path = "/security/token?type=delegation&scope=all";
    let (status, body) = get(&base, path, Some(&w.owner.token), &[]).await;
    assert_eq!(status, 200);
    let transient = xml_attr(&body, "token").unwrap();
    assert!(transient.starts_with("transient-"));
    assert_eq!(w.pms.transient_tokens(), vec![transient.clone()]);
    assert_eq!(root_status(&w.pms, &transient).await, 200);
    // The CVE-2025-69414 class: a transient token reads the owner's permanent plex.tv token.
    let (status, body) = get(&base, "/myplex/account", Some(&transient), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(xml_attr(&body, "authToken"), Some(w.owner.token.clone()));
    // Unknown to plex.tv.
    assert_eq!(user_status(&w.tv, &transient).await, 401);

    // A friend's transient token is a friend's: no prefs, no /myplex/account.
    let friend = w.tv.add_account("friend");
    let share = w.tv.share(&w.pms.machine_id(), &friend);
    let (status, body) = get(&base, path, Some(&share), &[]).await;
    assert_eq!(status, 200);
    let friend_transient = xml_attr(&body, "token").unwrap();
    assert_eq!(root_status(&w.pms, &friend_transient).await, 200);
    assert_eq!(
        get(&base, "/:/prefs", Some(&friend_transient), &[]).await.0,
        401
    );
    assert_eq!(
        get(&base, "/myplex/account", Some(&friend_transient), &[])
            .await
            .0,
        401
    );
    assert_eq!(
        get(&base, "/security/token", Some(&w.owner.token), &[])
            .await
            .0,
        400
    );
    assert_eq!(get(&base, path, None, &[]).await.0, 401);
}

#[tokio::test]
async fn plex_transcode_segments_need_only_a_live_session() {
    let w = world().await;
    let base = w.pms.url();
    let start =
        "/video/:/transcode/universal/start.m3u8?path=%2Flibrary%2Fmetadata%2F101&protocol=hls";
    assert_eq!(get(&base, start, None, &[]).await.0, 401);
    let (status, body) = get(
        &base,
        &format!("{start}&session=sess-1"),
        Some(&w.owner.token),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.starts_with("#EXTM3U"));
    assert!(
        body.contains("\nsession/sess-1/base/index.m3u8\n"),
        "{body}"
    );
    let session = "/video/:/transcode/universal/session";
    let (status, body) = get(
        &base,
        &format!("{session}/sess-1/base/index.m3u8"),
        None,
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("\n00000.ts\n"));
    let resp = client()
        .get(format!("{base}{session}/sess-1/base/00000.ts"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len() as u64, SEGMENT_LEN);
    assert_eq!(
        get(
            &base,
            &format!("{session}/other/base/index.m3u8"),
            None,
            &[]
        )
        .await
        .0,
        404
    );
    assert_eq!(
        get(&base, &format!("{session}/other/base/00000.ts"), None, &[])
            .await
            .0,
        404
    );
    // Without a session parameter the id is made up by the PMS and seen only in the playlist.
    let (_, body) = get(&base, start, Some(&w.owner.token), &[]).await;
    let variant = body.lines().find(|l| l.starts_with("session/")).unwrap();
    let id = variant.split('/').nth(1).unwrap();
    assert_eq!(w.pms.transcode_sessions().len(), 2);
    assert!(w.pms.transcode_sessions().contains(&id.to_owned()));
    // Stopped: its segments are gone.
    let stop = format!("/video/:/transcode/universal/stop?session={id}");
    assert_eq!(get(&base, &stop, Some(&w.owner.token), &[]).await.0, 200);
    assert_eq!(
        get(&base, &format!("{session}/{id}/base/index.m3u8"), None, &[])
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn plex_prefs_are_owner_only_and_allowed_networks_grants_owner_access() {
    let w = world().await;
    let base = w.pms.url();
    let (status, body) = get(&base, "/:/prefs", Some(&w.owner.token), &[]).await;
    assert_eq!(status, 200);
    for id in [
        "allowedNetworks",
        "customConnections",
        "secureConnections",
        "GdmEnabled",
        "RelayEnabled",
        "PublishServerOnPlexOnlineKey",
        "LanNetworksBandwidth",
        "FriendlyName",
    ] {
        assert!(body.contains(&format!("<Setting id=\"{id}\"")), "{id}");
    }
    assert!(body.contains("id=\"allowedNetworks\" label=\"allowedNetworks\" summary=\"\" type=\"text\" default=\"\" value=\"\""));
    let friend = w.tv.add_account("friend");
    let share = w.tv.share(&w.pms.machine_id(), &friend);
    let (_, home) = w.tv.add_home_user(&w.owner, "kid");
    for token in [&share, &home] {
        assert_eq!(get(&base, "/:/prefs", Some(token), &[]).await.0, 401);
        assert_eq!(get(&base, "/myplex/account", Some(token), &[]).await.0, 401);
        assert_eq!(get(&base, "/library", Some(token), &[]).await.0, 403);
        assert_eq!(
            get(&base, "/library/sections/", Some(token), &[]).await.0,
            200
        );
        let resp = client()
            .put(format!("{base}/:/prefs?allowedNetworks=0.0.0.0/0"))
            .header("X-Plex-Token", token.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(w.pms.pref("allowedNetworks"), "");

    // The owner opens the server to the loopback network: token-less requests become owner.
    let resp = client()
        .put(format!(
            "{base}/:/prefs?allowedNetworks=127.0.0.0/255.0.0.0"
        ))
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(w.pms.pref("allowedNetworks"), "127.0.0.0/255.0.0.0");
    assert_eq!(get(&base, "/", None, &[]).await.0, 200);
    assert_eq!(get(&base, "/:/prefs", None, &[]).await.0, 200);
    w.pms.set_pref("allowedNetworks", "192.168.0.0/16");
    assert_eq!(get(&base, "/", None, &[]).await.0, 401);
    let resp = client()
        .put(format!("{base}/:/prefs?NoSuchPref=1"))
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn plex_big_part_streams_lazily_with_ranges_and_is_counted() {
    let w = world().await;
    let url = format!("{}{BIG_PART_KEY}", w.pms.url());
    let resp = client()
        .head(&url)
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-length"],
        BIG_PART_LEN.to_string().as_str()
    );
    assert!(resp.bytes().await.unwrap().is_empty());
    let resp = client()
        .get(&url)
        .header("X-Plex-Token", &w.owner.token)
        .header("Range", "bytes=1000-1099")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1099/{BIG_PART_LEN}").as_str()
    );
    let want: Vec<u8> = (1000..1100).map(pattern_byte).collect();
    assert_eq!(resp.bytes().await.unwrap().as_ref(), want.as_slice());
    let resp = client()
        .get(format!("{}{PART_KEY}", w.pms.url()))
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.bytes().await.unwrap().len() as u64, PART_LEN);

    let resp = client()
        .get(&url)
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    assert_eq!(w.pms.open_streams(), 1);
    drop(body);
    assert!(poll_until(WAIT, || async { w.pms.open_streams() == 0 }).await);
}

#[tokio::test]
async fn plex_notifications_open_with_a_token_and_are_counted() {
    let w = world().await;
    let ws_url = format!(
        "ws://{}/:/websockets/notifications?X-Plex-Token={}",
        w.pms.addr, w.owner.token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let msg = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Text(text) = msg else {
        panic!("not text: {msg:?}")
    };
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["NotificationContainer"]["type"], "activity");
    assert_eq!(w.pms.open_sockets(), 1);
    // Periodic messages follow.
    let msg = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(msg, Message::Text(_)));
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(poll_until(WAIT, || async { w.pms.open_sockets() == 0 }).await);

    let refused = format!("ws://{}/:/websockets/notifications", w.pms.addr);
    match tokio_tungstenite::connect_async(refused).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }

    let resp = client()
        .get(format!("{}/:/eventsource/notifications", w.pms.url()))
        .header("X-Plex-Token", &w.owner.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(WAIT, body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first)
        .starts_with("event: activity\ndata: {\"NotificationContainer\""));
    assert_eq!(w.pms.open_sockets(), 1);
    drop(body);
    assert!(poll_until(WAIT, || async { w.pms.open_sockets() == 0 }).await);
}

// ---------------------------------------------------------------- plex.tv

#[tokio::test]
async fn plex_access_tokens_list_friends_and_home_users_and_need_the_server_token() {
    let w = world().await;
    let friend = w.tv.add_account("friend");
    let share = w.tv.share(&w.pms.machine_id(), &friend);
    assert_eq!(w.tv.share(&w.pms.machine_id(), &friend), share);
    let (kid, home) = w.tv.add_home_user(&w.owner, "kid");
    let url = |t: &str| format!("{}/api/v2/server/access_tokens?auth_token={t}", w.tv.url());
    let resp = client()
        .get(url(&w.pms.server_token()))
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let list: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let f = list.iter().find(|e| e["token"] == share.as_str()).unwrap();
    assert_eq!(f["type"], "server");
    assert_eq!(f["owned"], false);
    assert_eq!(f["invited"]["id"], friend.id);
    assert_eq!(f["invited"]["uuid"], friend.uuid);
    assert_eq!(f["invited"]["username"], "friend");
    assert_eq!(f["invited"]["title"], "friend");
    assert!(f["createdAt"].as_str().unwrap().ends_with('Z'));
    assert!(f["settings"].is_object());
    assert_eq!(f["sections"][0]["key"], 1);
    let h = list.iter().find(|e| e["token"] == home.as_str()).unwrap();
    assert_eq!(h["invited"]["id"], kid.id);
    assert_eq!(h["invited"]["home"], true);

    // Only the server token may ask.
    for t in [
        w.owner.token.clone(),
        share.clone(),
        home.clone(),
        "x".repeat(20),
    ] {
        let resp = client().get(url(&t)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{t}");
    }
    let resp = client()
        .get(format!("{}/api/v2/server/access_tokens", w.tv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Un-shared: gone from the list.
    w.tv.revoke_token(&share);
    let list: Vec<Value> = client()
        .get(url(&w.pms.server_token()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["token"], home.as_str());
}

#[tokio::test]
async fn plex_tv_user_resolves_account_tokens_and_jwts_and_refuses_the_rest() {
    let w = world().await;
    let friend = w.tv.add_account("friend");
    let share = w.tv.share(&w.pms.machine_id(), &friend);
    let (status, body) = get(
        &w.tv.url(),
        "/api/v2/user",
        Some(&w.owner.token),
        &[("Accept", "application/json")],
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], w.owner.id);
    assert_eq!(v["uuid"], w.owner.uuid);
    assert_eq!(v["authToken"], w.owner.token.as_str());
    assert!(v["subscription"].is_object() && v["profile"].is_object());
    let (_, xml) = get(
        &w.tv.url(),
        "/api/v2/user",
        Some(&w.pms.server_token()),
        &[],
    )
    .await;
    assert!(
        xml.contains("<subscription ")
            && xml.contains("<profile ")
            && xml.contains(" scrobbleTypes=\"")
    );
    assert_eq!(xml_attr(&xml, "id"), Some(w.owner.id.to_string()));
    let jwt = w.tv.issue_jwt(&friend, "friend-tv", 3600);
    let (status, xml) = get(&w.tv.url(), "/api/v2/user", Some(&jwt), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(xml_attr(&xml, "username").as_deref(), Some("friend"));
    assert_eq!(
        user_status(&w.tv, &w.tv.issue_jwt(&friend, "friend-tv", -1)).await,
        401
    );
    assert_eq!(
        user_status(&w.tv, &w.tv.forged_jwt(&friend, "friend-tv")).await,
        401
    );
    assert_eq!(user_status(&w.tv, &share).await, 401);
    assert_eq!(user_status(&w.tv, "nope").await, 401);
    let (status, body) = get(&w.tv.url(), "/api/v2/auth/keys", None, &[]).await;
    assert_eq!(status, 200);
    let keys: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(keys["keys"][0]["kty"], "OKP");
    assert_eq!(keys["keys"][0]["crv"], "Ed25519");
    assert_eq!(keys["keys"][0]["kid"], w.tv.jwt_kid());
    assert_eq!(
        get(&w.tv.url(), "/api/v2/unknown", Some(&w.owner.token), &[])
            .await
            .0,
        404
    );

    // Sign-out kills only the calling token; a JWT can sign itself out too.
    let phone =
        w.tv.device_token(&w.owner, "owner-phone", "Plex for iOS", "phone");
    let resp = client()
        .delete(format!("{}/api/v2/users/signout", w.tv.url()))
        .header("X-Plex-Token", &phone)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(user_status(&w.tv, &phone).await, 401);
    assert_eq!(user_status(&w.tv, &w.owner.token).await, 200);
    let resp = client()
        .delete(format!("{}/api/v2/users/signout", w.tv.url()))
        .header("X-Plex-Token", &jwt)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(user_status(&w.tv, &jwt).await, 401);
    assert!(!w.tv.token_is_live(&jwt));
}

#[tokio::test]
async fn plex_tv_outage_answers_503_while_the_pms_keeps_serving() {
    let w = world().await;
    w.tv.set_down(true);
    assert_eq!(user_status(&w.tv, &w.owner.token).await, 503);
    let resp = client()
        .get(format!(
            "{}/api/v2/server/access_tokens?auth_token={}",
            w.tv.url(),
            w.pms.server_token()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(root_status(&w.pms, &w.owner.token).await, 200);
    w.tv.set_down(false);
    assert_eq!(user_status(&w.tv, &w.owner.token).await, 200);
    assert!(
        w.tv.requests()
            .iter()
            .filter(|r| r.path_and_query == "/api/v2/user")
            .count()
            == 2
    );
}

#[tokio::test]
async fn plex_devices_xml_lists_device_tokens_and_delete_needs_the_owner() {
    let w = world().await;
    let phone =
        w.tv.device_token(&w.owner, "owner-phone", "Plex for iOS", "phone");
    let (status, xml) = get(&w.tv.url(), "/devices.xml", Some(&w.owner.token), &[]).await;
    assert_eq!(status, 200);
    assert!(xml.contains("clientIdentifier=\"owner-phone\""));
    assert!(xml.contains(&format!("token=\"{phone}\"")));
    assert!(xml.contains(&format!("<Connection uri=\"{}\" />", w.pms.url())));
    let id = w.tv.device_id(&w.owner, "owner-phone").unwrap();
    // Someone else's token cannot remove the owner's device.
    let other = w.tv.add_account("other");
    let resp = client()
        .delete(format!("{}/devices/{id}.xml", w.tv.url()))
        .header("X-Plex-Token", &other.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(root_status(&w.pms, &phone).await, 200);
    assert!(w.tv.deleted_devices().is_empty());
}
