//! Checklist §3 ATK-09, ATK-61, ATK-62, ATK-65, ATK-66: what each way of ending a session does
//! to the media tokens, open sockets and streams of that user, through the Jellyfin stand-in.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{client, input_value, poll_until, set_cookie, Gateway};
use crate::jellyfin::{drain, mb, setup, token_of, PW};
use crate::standin::StandIn;

/// A form login: the session cookie pair.
async fn browser(gw: &Gateway) -> String {
    let resp = client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", gw.base.clone())
        .form(&[("username", "alice"), ("password", PW), ("rd", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    set_cookie(&resp, "portcullis").expect("a session cookie")
}

async fn media_status(gw: &Gateway, path: &str, token: &str) -> u16 {
    client()
        .get(gw.url(path))
        .header("Authorization", mb("probe-device", Some(token)))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The account page's status for a Bearer session (a gateway decision on a Jellyfin route,
/// where the stand-in itself would refuse a request without its own token).
pub(crate) async fn bearer_status(gw: &Gateway, token: &str) -> u16 {
    client()
        .get(gw.url("/_portcullis/account"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn logged_out_upstream(jf: &StandIn, tokens: &[&str]) -> bool {
    poll_until(Duration::from_secs(5), || async {
        let out = jf.logged_out_tokens();
        tokens.iter().all(|t| out.iter().any(|o| o == t))
    })
    .await
}

/// The account page's password change with "Sign out connected devices" ticked: the rotated
/// cookie.
async fn change_password_signing_out(gw: &Gateway, cookie: &str, new_pw: &str) -> String {
    let html = gw.page_with_cookie("/_portcullis/account", cookie).await;
    let csrf = input_value(&html, "csrf").unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/account/password"))
        .header("Cookie", cookie)
        .header("Origin", gw.base.clone())
        .form(&[
            ("current", PW),
            ("new_password", new_pw),
            ("confirm", new_pw),
            ("signout", "1"),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let location = resp.headers()["location"].to_str().unwrap();
    assert!(location.ends_with("done=password-signout"), "{location}");
    set_cookie(&resp, "portcullis").expect("a rotated cookie")
}

#[tokio::test]
async fn atk09_signing_out_the_browser_leaves_the_apps_own_media_session() {
    let (jf, gw) = setup("").await;
    let cookie = browser(&gw).await;
    // jellyfin-web signs in to the media server with the gateway cookie present.
    let resp = client()
        .post(gw.url("/Users/AuthenticateByName"))
        .header("Cookie", cookie.clone())
        .header("Authorization", mb("web-1", None))
        .json(&serde_json::json!({"Username": "alice", "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let jf_a = body["AccessToken"].as_str().unwrap().to_string();
    assert_eq!(
        gw.status_with_cookie("/_portcullis/account", &cookie).await,
        200
    );
    let html = gw.page_with_cookie("/_portcullis/", &cookie).await;
    let csrf = input_value(&html, "csrf").unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/logout"))
        .header("Cookie", cookie.clone())
        .header("Origin", gw.base.clone())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        gw.status_with_cookie("/_portcullis/account", &cookie).await,
        303
    );
    // By design (DESIGN.md: a media token is its own media session) the app's token lives on
    // until the app signs out, the user signs out everywhere, or an admin ends it.
    let resp = client()
        .get(gw.url("/Users/Me"))
        .header("X-Emby-Token", &jf_a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!jf.logged_out_tokens().contains(&jf_a));
    // Signing out of all devices ends it, and logs it out upstream.
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(gw.refused_media(&jf_a).await);
    assert!(logged_out_upstream(&jf, &[&jf_a]).await);
}

#[tokio::test]
async fn atk65_a_password_change_with_sign_out_ends_every_other_device_and_rotates_this_one() {
    let (jf, gw) = setup("").await;
    let a = browser(&gw).await;
    // B: an Android app with a gateway Bearer session and its own media token; C: a TV that
    // has only its media token.
    let b_api = gw.login("alice", PW).await;
    let jf_b = token_of(&gw, "alice", "android-b").await;
    let jf_c = token_of(&gw, "alice", "tv-c").await;
    let bobs = token_of(&gw, "bob", "tv-bob").await;
    assert_eq!(bearer_status(&gw, &b_api.token).await, 200);
    for t in [&jf_b, &jf_c] {
        assert_eq!(media_status(&gw, "/Users/Me", t).await, 200);
    }
    let rotated = change_password_signing_out(&gw, &a, "a brand new passphrase").await;
    // At once, not after a poll: the change is applied in this process.
    assert_eq!(bearer_status(&gw, &b_api.token).await, 303);
    assert_eq!(media_status(&gw, "/Users/Me", &jf_b).await, 401);
    assert_eq!(media_status(&gw, "/Users/Me", &jf_c).await, 401);
    let resp = client()
        .get(gw.url("/Users/Me"))
        .header("X-Emby-Token", &jf_c)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(logged_out_upstream(&jf, &[&jf_b, &jf_c]).await);
    // A's old cookie is dead; A goes on with the rotated one. Bob is untouched.
    assert_ne!(rotated, a);
    assert_eq!(gw.status_with_cookie("/_portcullis/account", &a).await, 303);
    assert_eq!(
        gw.status_with_cookie("/_portcullis/account", &rotated)
            .await,
        200
    );
    assert_eq!(media_status(&gw, "/Users/Me", &bobs).await, 200);
    assert!(!jf.logged_out_tokens().contains(&bobs));
}

/// The path of a fresh reset link for `user`, from the CLI.
fn reset_link(gw: &Gateway, user: &str) -> String {
    let out = gw.cli_ok(&["user", "reset-link", user]);
    out.lines()
        .find_map(|l| {
            l.find("/_portcullis/reset/")
                .map(|i| l[i..].trim().to_string())
        })
        .expect("a reset link")
}

async fn post_reset(gw: &Gateway, path: &str, pw: &str) -> (u16, String) {
    let resp = client()
        .post(gw.url(path))
        .header("Origin", gw.base.clone())
        .form(&[("new_password", pw), ("confirm", pw), ("signout", "1")])
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn atk66_a_reset_ends_media_tokens_and_only_the_newest_unexpired_link_works_once() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let cookie = browser(&gw).await;
    assert_eq!(
        gw.status_with_cookie("/_portcullis/account", &cookie).await,
        200
    );
    // (d) A newer link retires the older one.
    let older = reset_link(&gw, "alice");
    let newer = reset_link(&gw, "alice");
    let new_pw = "reset passphrase 2026";
    let (status, page) = post_reset(&gw, &older, new_pw).await;
    assert!(status == 404 || status == 410, "{status}: {page}");
    gw.login("alice", PW).await;
    // ATK-69: the reset form applies the password cap (1,024 bytes) like every other form; the
    // link stays usable after a refused password.
    let (status, page) = post_reset(&gw, &newer, &"x".repeat(1025)).await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("1024"), "{page}");
    // (a) The reset signs out every session and ends the media tokens, upstream too.
    let (status, page) = post_reset(&gw, &newer, new_pw).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        gw.status_with_cookie("/_portcullis/account", &cookie).await,
        303
    );
    assert!(gw.refused_media(&tv).await);
    assert!(logged_out_upstream(&jf, &[&tv]).await);
    // (b) Used once.
    let (status, _) = post_reset(&gw, &newer, "another passphrase 2026").await;
    assert_eq!(status, 410);
    gw.login("alice", new_pw).await;

    // (c) A POST with an expired link changes nothing.
    let expired = reset_link(&gw, "bob");
    use sqlx::{Connection, Executor};
    let opts = sqlx::sqlite::SqliteConnectOptions::new().filename(gw.db_path());
    let mut conn = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
    conn.execute("UPDATE reset_links SET expires_ms = 1")
        .await
        .unwrap();
    let (status, page) = post_reset(&gw, &expired, "bob's stolen-link password").await;
    assert_eq!(status, 410);
    assert!(page.contains("expired"), "{page}");
    gw.login("bob", PW).await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A Jellyfin socket through the gateway, or the status of the refused upgrade.
async fn socket(gw: &Gateway, token: &str, device: &str) -> Result<Socket, u16> {
    let url = format!(
        "ws://127.0.0.1:{}/socket?ApiKey={token}&deviceId={device}",
        gw.port
    );
    match tokio_tungstenite::connect_async(url.into_client_request().unwrap()).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket: {e}"),
    }
}

/// Waits for the gateway to close `ws` (close frame, end, or error); whether it did in time.
async fn closed_within(ws: &mut Socket, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn atk61_sockets_close_on_disable_and_password_change_upstream_too_and_cannot_reconnect() {
    let (jf, gw) = setup("").await;
    // The upstream logout is held back, so only the gateway can close these sockets.
    jf.set_failing_logouts(1_000);

    // After a password change that signs out the connected devices.
    let tv = token_of(&gw, "alice", "tv-1").await;
    let mut ws = socket(&gw, &tv, "tv-1").await.expect("a socket");
    assert!(poll_until(Duration::from_secs(5), || async { jf.open_sockets() == 1 }).await);
    let cookie = browser(&gw).await;
    change_password_signing_out(&gw, &cookie, "a brand new passphrase").await;
    assert!(
        closed_within(&mut ws, Duration::from_secs(1)).await,
        "socket kept open"
    );
    assert!(
        poll_until(Duration::from_secs(2), || async { jf.open_sockets() == 0 }).await,
        "the upstream socket stayed open"
    );
    assert_eq!(socket(&gw, &tv, "tv-1").await.err(), Some(401));

    // After an admin disables the user.
    let tv = token_of(&gw, "alice", "tv-1").await;
    let mut ws = socket(&gw, &tv, "tv-1").await.expect("a socket");
    assert!(poll_until(Duration::from_secs(5), || async { jf.open_sockets() == 1 }).await);
    gw.cli_ok(&["user", "disable", "alice"]);
    assert!(
        closed_within(&mut ws, Duration::from_secs(1)).await,
        "socket kept open"
    );
    assert!(
        poll_until(Duration::from_secs(2), || async { jf.open_sockets() == 0 }).await,
        "the upstream socket stayed open"
    );
    assert_eq!(socket(&gw, &tv, "tv-1").await.err(), Some(401));
    gw.cli_ok(&["user", "enable", "alice"]);
    assert_eq!(socket(&gw, &tv, "tv-1").await.err(), Some(401));
}

#[tokio::test]
async fn atk62_a_stream_keyed_in_its_url_is_cut_and_its_next_segment_and_range_refused() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    jf.set_failing_logouts(1_000);
    // The player's HLS session: playlist and a first segment, all keyed by `ApiKey`.
    let master = client()
        .get(gw.url(&format!(
            "/videos/abc/master.m3u8?MediaSourceId=abc&ApiKey={tv}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(master.status(), 200);
    let segment = |n: u32| format!("/videos/abc/hls1/main/{n}.ts?MediaSourceId=abc&ApiKey={tv}");
    let seg = client().get(gw.url(&segment(6))).send().await.unwrap();
    assert_eq!(seg.status(), 200);
    // A static stream keyed only by `ApiKey` in the URL, read and then stalled.
    let stream_url = format!("/Videos/big/stream?static=true&ApiKey={tv}");
    let mut stream = client().get(gw.url(&stream_url)).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let mut received = 0usize;
    while received < 1 << 20 {
        received += stream.chunk().await.unwrap().unwrap().len();
    }
    assert!(poll_until(Duration::from_secs(2), || async { jf.open_streams() >= 1 }).await);
    let before = jf.requests().len();
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(gw.refused_media(&tv).await);
    // The in-flight stream ends short, and the stand-in stops sending it.
    let drained = drain(&mut stream, Duration::from_secs(5)).await;
    assert!(drained.is_some(), "the stream was not cut");
    received += drained.unwrap();
    assert!(received < 512 << 20, "the whole stream went through");
    assert!(
        poll_until(Duration::from_secs(2), || async { jf.open_streams() == 0 }).await,
        "the upstream stream stayed open"
    );
    // The next segment and a resumed range are refused, and reach nothing.
    let seg = client().get(gw.url(&segment(7))).send().await.unwrap();
    assert_eq!(seg.status(), 401);
    let resumed = client()
        .get(gw.url(&stream_url))
        .header("Range", "bytes=1000000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 401);
    assert!(
        jf.requests()[before..]
            .iter()
            .all(|r| !r.path_and_query.contains(&tv) && !r.path_and_query.contains("hls1")),
        "a refused request reached the media server"
    );
}
