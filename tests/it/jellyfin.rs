//! Jellyfin routes end to end: the real gateway in front of the Jellyfin stand-in, with the
//! requests Jellyfin's clients really send (research brief §1–4, §6).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::account::{enrol, Browser};
use crate::harness::{client, poll_until, Gateway};
use crate::standin::StandIn;

pub(crate) const PW: &str = "correct horse battery staple";

/// A stand-in with alice and bob, and a gateway route of kind `jellyfin` in front of it.
pub(crate) async fn setup(media: &str) -> (StandIn, Gateway) {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    jf.add_user("bob", PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .user("bob", PW)
        .route_keys(&format!("kind = \"jellyfin\"\nmedia = {{ {media} }}"))
        .start()
        .await;
    (jf, gw)
}

/// The `Authorization` header value a Jellyfin client sends.
pub(crate) fn mb(device_id: &str, token: Option<&str>) -> String {
    let mut v = format!(
        "MediaBrowser Client=\"Jellyfin Android\", Device=\"Pixel 7\", DeviceId=\"{device_id}\", Version=\"2.6.1\""
    );
    if let Some(t) = token {
        v.push_str(&format!(", Token=\"{t}\""));
    }
    v
}

/// A password login through the gateway's Jellyfin route: status and JSON answer.
pub(crate) async fn jf_login(gw: &Gateway, user: &str, pw: &str, device: &str) -> (u16, Value) {
    let resp = client()
        .post(gw.url("/Users/AuthenticateByName"))
        .header("Authorization", mb(device, None))
        .json(&serde_json::json!({"Username": user, "Pw": pw}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body)
}

pub(crate) async fn token_of(gw: &Gateway, user: &str, device: &str) -> String {
    let (status, body) = jf_login(gw, user, PW, device).await;
    assert_eq!(status, 200, "login of {user}: {body}");
    body["AccessToken"].as_str().unwrap().to_string()
}

/// Status of `GET path` with the token in the `Authorization` header.
async fn get_with(gw: &Gateway, path: &str, token: &str) -> u16 {
    client()
        .get(gw.url(path))
        .header("Authorization", mb("probe-device", Some(token)))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A token alice gets from the stand-in directly, never seen by the gateway.
async fn minted_behind_the_gateway(jf: &StandIn, device: &str) -> String {
    let v: Value = client()
        .post(format!("{}/Users/AuthenticateByName", jf.url()))
        .header("Authorization", mb(device, None))
        .json(&serde_json::json!({"Username": "alice", "Pw": PW}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["AccessToken"].as_str().unwrap().to_string()
}

/// Reads a response body until it ends (or breaks off): the bytes read, or `None` if it was
/// still going after `within`.
pub(crate) async fn drain(stream: &mut reqwest::Response, within: Duration) -> Option<usize> {
    tokio::time::timeout(within, async {
        let mut n = 0;
        while let Ok(Some(c)) = stream.chunk().await {
            n += c.len();
        }
        n
    })
    .await
    .ok()
}

/// Opens `/socket?{query}` through the gateway and waits for the stand-in's greeting.
async fn open_socket(
    gw: &Gateway,
    query: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("ws://127.0.0.1:{}/socket?{query}", gw.port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.into_client_request().unwrap())
        .await
        .expect("a websocket through the gateway");
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.to_text().unwrap().contains("ForceKeepAlive"));
    ws
}

fn upstream_saw(jf: &StandIn, path_fragment: &str) -> bool {
    jf.requests()
        .iter()
        .any(|r| r.path_and_query.contains(path_fragment))
}

#[tokio::test]
async fn pre_login_routes_pass_without_a_token_in_any_case_and_prefix() {
    let (jf, gw) = setup("").await;
    for path in [
        "/System/Info/Public",
        "/system/info/public",
        "/System/Ping",
        "/Branding/Configuration",
        "/Branding/Css",
        "/QuickConnect/Enabled",
        "/health",
        "/web/index.html",
        "/emby/System/Info/Public",
        "/MediaBrowser/System/Ping",
    ] {
        let resp = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    assert!(upstream_saw(&jf, "/system/info/public"));
    assert!(upstream_saw(&jf, "/MediaBrowser/System/Ping"));
    // Everything else needs a credential.
    for path in [
        "/Users/Me",
        "/System/Info",
        "/Items",
        "/web/ConfigurationPage?name=x",
    ] {
        let resp = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
}

#[tokio::test]
async fn user_list_is_hidden_and_wizard_and_api_docs_are_blocked_by_default() {
    let (jf, gw) = setup("").await;
    let resp = client().get(gw.url("/Users/Public")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "[]");
    for path in [
        "/Startup/Configuration",
        "/startup/user",
        "/api-docs/openapi.json",
        "/emby/API-DOCS/swagger/index.html",
    ] {
        let resp = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{path}");
    }
    assert!(!upstream_saw(&jf, "Public"));
    assert!(!upstream_saw(&jf, "tartup"));
    assert!(!upstream_saw(&jf, "api-docs") && !upstream_saw(&jf, "API-DOCS"));
}

#[tokio::test]
async fn user_list_and_blocked_paths_are_configurable() {
    let (jf, gw) = setup("users_public = \"pass\", blocked_paths = []").await;
    let resp = client().get(gw.url("/Users/Public")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let users: Value = resp.json().await.unwrap();
    assert_eq!(users.as_array().map(Vec::len), Some(2));
    let resp = client()
        .get(gw.url("/Startup/Configuration"))
        .send()
        .await
        .unwrap();
    // Not blocked any more, but still not anonymous.
    assert_eq!(resp.status(), 401);
    assert!(!upstream_saw(&jf, "Startup"));
}

#[tokio::test]
async fn a_login_binds_the_token_and_every_carrier_then_works() {
    let (jf, gw) = setup("").await;
    let token = token_of(&gw, "alice", "dev-1").await;
    assert!(jf.live_tokens().contains(&token));
    let h = |name: &'static str, value: String| (name, value);
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("/Users/Me", vec![h("Authorization", mb("d", Some(&token)))]),
        (
            "/Users/Me",
            vec![h(
                "Authorization",
                format!("mediabrowser Token=\"{token}\""),
            )],
        ),
        (
            "/Users/Me",
            vec![h("X-Emby-Authorization", format!("Emby Token=\"{token}\""))],
        ),
        ("/Users/Me", vec![h("X-Emby-Token", token.clone())]),
        ("/Users/Me", vec![h("X-MediaBrowser-Token", token.clone())]),
        (
            &*Box::leak(format!("/Users/Me?ApiKey={token}").into_boxed_str()),
            vec![],
        ),
        (
            &*Box::leak(format!("/Users/Me?api_key={token}").into_boxed_str()),
            vec![],
        ),
        (
            &*Box::leak(format!("/Users/Me?APIKEY={token}").into_boxed_str()),
            vec![],
        ),
        (
            &*Box::leak(format!("/Users/Me?Api%4Bey={token}").into_boxed_str()),
            vec![],
        ),
        (
            &*Box::leak(format!("/emby/users/me?x=1&Api_Key={token}").into_boxed_str()),
            vec![],
        ),
    ];
    for (path, headers) in cases {
        let mut req = client().get(gw.url(path));
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path} {headers:?}");
        let me: Value = resp.json().await.unwrap();
        assert_eq!(me["Name"], "alice", "{path}");
    }
}

#[tokio::test]
async fn header_grammar_edge_cases() {
    let (_jf, gw) = setup("").await;
    let token = token_of(&gw, "alice", "dev-1").await;
    let status = |v: String| {
        let gw = &gw;
        async move {
            client()
                .get(gw.url("/Users/Me"))
                .header("Authorization", v)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Keys are case-sensitive: `token=` is not a token, so this is a request without one.
    assert_eq!(status(format!("MediaBrowser token=\"{token}\"")).await, 401);
    // The last duplicate wins.
    assert_eq!(
        status(format!("MediaBrowser Token=\"nope\", Token=\"{token}\"")).await,
        200
    );
    // Unquoted values and quoted commas.
    assert_eq!(
        status(format!("MediaBrowser Client=\"a,b\", Token={token}")).await,
        200
    );
    // A space before the quote keeps the space: not this token.
    assert_eq!(
        status(format!("MediaBrowser Token= \"{token}\"")).await,
        401
    );
    // An empty Token counts as absent and the query key is used.
    let resp = client()
        .get(gw.url(&format!("/Users/Me?ApiKey={token}")))
        .header("Authorization", mb("d", Some("")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A fully percent-encoded query, which Jellyfin's WebSocket handler decodes: the
    // gateway reads the token in it too, so a dead one is refused before the upstream.
    let dead = "0123456789abcdef0123456789abcdef";
    let resp = client()
        .get(gw.url(&format!("/socket?ApiKey%3D{dead}%26deviceId%3Dx")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    open_socket(&gw, &format!("ApiKey%3D{token}%26deviceId%3Dx")).await;
}

#[tokio::test]
async fn two_different_tokens_and_bad_client_fields_are_400_and_never_forwarded() {
    let (jf, gw) = setup("").await;
    let a = token_of(&gw, "alice", "dev-1").await;
    let b = token_of(&gw, "bob", "dev-2").await;
    let before = jf.requests().len();
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        (
            format!("/Users/Me?ApiKey={b}"),
            vec![("Authorization", mb("d", Some(&a)))],
        ),
        (
            "/Users/Me".into(),
            vec![
                ("X-Emby-Token", a.clone()),
                ("X-MediaBrowser-Token", b.clone()),
            ],
        ),
        (format!("/Users/Me?ApiKey={a}&api_key={b}"), vec![]),
        (
            "/Users/Me".into(),
            vec![(
                "Authorization",
                format!("MediaBrowser Client=\"../../x\", Token=\"{a}\""),
            )],
        ),
        (
            "/Users/Me".into(),
            vec![(
                "Authorization",
                format!("MediaBrowser DeviceId=\"a%2Fb\", Token=\"{a}\""),
            )],
        ),
        (
            "/Users/Me".into(),
            vec![(
                "Authorization",
                format!("MediaBrowser Version=\"1%0D%0A2\", Token=\"{a}\""),
            )],
        ),
        (
            "/Users/Me".into(),
            vec![(
                "Authorization",
                format!("MediaBrowser Device=\"{}\", Token=\"{a}\"", "x".repeat(200)),
            )],
        ),
        // Also on the login route: the device's fields are checked before anything else.
        (
            "/Users/AuthenticateByName".into(),
            vec![(
                "Authorization",
                "MediaBrowser Client=\"c\\\\d\", Device=\"d\", DeviceId=\"i\", Version=\"1\""
                    .to_string(),
            )],
        ),
    ];
    for (path, headers) in cases {
        let mut req = client().post(gw.url(&path)).body("{}");
        if !path.contains("Authenticate") {
            req = client().get(gw.url(&path));
        }
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 400, "{path} {headers:?}");
    }
    assert_eq!(
        jf.requests().len(),
        before,
        "a refused request reached the upstream"
    );
    // The same token twice is one token.
    let resp = client()
        .get(gw.url(&format!("/Users/Me?ApiKey={a}")))
        .header("X-Emby-Token", &a)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn unknown_tokens_get_401_even_on_routes_jellyfin_leaves_open() {
    let (jf, gw) = setup("").await;
    // Minted by the stand-in directly, never through the gateway: unknown here.
    let direct = minted_behind_the_gateway(&jf, "dev-x").await;
    let before = jf.requests().len();
    for path in [
        "/Users/Me".to_string(),
        "/Videos/abc/stream?Static=true".into(),
        "/Videos/abc/stream.mkv".into(),
        "/Audio/abc/stream.mp3".into(),
        "/Items/abc/Images/Primary".into(),
        "/Videos/abc/hls/playlist/1.ts".into(),
        "/Videos/abc/ms1/Subtitles/0/Stream.vtt".into(),
        "/Videos/abc/master.m3u8".into(),
    ] {
        assert_eq!(get_with(&gw, &path, &direct).await, 401, "{path}");
        let resp = client()
            .get(gw.url(&format!(
                "{path}{}ApiKey={direct}",
                if path.contains('?') { "&" } else { "?" }
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{path} with ApiKey");
    }
    // And without any credential, the media routes are closed too.
    for path in ["/Videos/abc/stream", "/Items/abc/Images/Primary"] {
        let resp = client().get(gw.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }
    assert_eq!(jf.requests().len(), before);
    gw.metrics_with(&["reason=\"unknown_media_token\""]).await;
}

#[tokio::test]
async fn a_new_login_from_the_same_device_retires_the_older_token() {
    let (jf, gw) = setup("").await;
    let first = token_of(&gw, "alice", "tv-1").await;
    let other_device = token_of(&gw, "alice", "phone-1").await;
    let second = token_of(&gw, "alice", "tv-1").await;
    assert_ne!(first, second);
    assert!(
        !jf.live_tokens().contains(&first),
        "the stand-in kept the old token"
    );
    assert_eq!(get_with(&gw, "/Users/Me", &first).await, 401);
    assert_eq!(get_with(&gw, "/Users/Me", &second).await, 200);
    assert_eq!(get_with(&gw, "/Users/Me", &other_device).await, 200);
}

#[tokio::test]
async fn sign_out_of_all_devices_ends_media_tokens_and_logs_them_out_upstream() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let phone = token_of(&gw, "alice", "phone-1").await;
    let bobs = token_of(&gw, "bob", "tv-2").await;
    gw.cli_ok(&["signout", "--user", "alice"]);
    let start = Instant::now();
    assert!(
        poll_until(Duration::from_secs(1), || async {
            get_with(&gw, "/Users/Me", &tv).await == 401
                && get_with(&gw, "/Users/Me", &phone).await == 401
        })
        .await,
        "alice's media tokens still work"
    );
    eprintln!("media tokens refused after {:?}", start.elapsed());
    assert_eq!(get_with(&gw, "/Users/Me", &bobs).await, 200);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            let out = jf.logged_out_tokens();
            out.contains(&tv) && out.contains(&phone)
        })
        .await,
        "not logged out upstream: {:?}",
        jf.logged_out_tokens()
    );
    assert!(!jf.logged_out_tokens().contains(&bobs));
    gw.metrics_with(&[
        "portcullis_media_logouts_total{result=\"done\"} 2",
        "portcullis_revocations_total{scope=\"media\"} 2",
    ])
    .await;
}

#[tokio::test]
async fn sign_out_everyone_ends_every_media_token() {
    let (jf, gw) = setup("").await;
    let a = token_of(&gw, "alice", "tv-1").await;
    let b = token_of(&gw, "bob", "tv-2").await;
    gw.cli_ok(&["signout", "--everyone"]);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            get_with(&gw, "/Users/Me", &a).await == 401
                && get_with(&gw, "/Users/Me", &b).await == 401
        })
        .await
    );
    assert!(
        poll_until(Duration::from_secs(5), || async {
            jf.logged_out_tokens().len() == 2
        })
        .await
    );
    // New logins work at once.
    let fresh = token_of(&gw, "alice", "tv-1").await;
    assert_eq!(get_with(&gw, "/Users/Me", &fresh).await, 200);
}

#[tokio::test]
async fn upstream_logout_is_retried_until_the_media_server_takes_it() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    jf.set_failing_logouts(2);
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(gw.refused_media(&tv).await);
    // First try, then after 1 s and 2 s of backoff.
    assert!(
        poll_until(Duration::from_secs(15), || async {
            jf.logged_out_tokens().contains(&tv)
        })
        .await,
        "never logged out upstream"
    );
    gw.metrics_with(&["portcullis_media_logouts_total{result=\"retry\"} 2"])
        .await;
}

#[tokio::test]
async fn an_owed_logout_survives_a_restart() {
    let (jf, mut gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    jf.set_failing_logouts(1_000);
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(gw.refused_media(&tv).await);
    gw.kill();
    jf.set_failing_logouts(0);
    gw.restart().await;
    assert_eq!(get_with(&gw, "/Users/Me", &tv).await, 401);
    assert!(
        poll_until(Duration::from_secs(15), || async {
            jf.logged_out_tokens().contains(&tv)
        })
        .await,
        "the owed logout was lost"
    );
}

#[tokio::test]
async fn ending_one_device_from_the_cli_lists_and_ends_the_media_session() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let phone = token_of(&gw, "alice", "phone-1").await;
    let list = gw.cli_ok(&["session", "list", "--user", "alice"]);
    assert!(list.contains("media"), "{list}");
    assert!(list.contains("Jellyfin Android 2.6.1 on Pixel 7"), "{list}");
    // Find the session of the TV token: the newest media session is the phone's.
    let sids: Vec<String> = list
        .lines()
        .filter(|l| l.contains("media"))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.len() == 32)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(sids.len(), 2, "{list}");
    gw.cli_ok(&["session", "revoke", &sids[0]]);
    assert!(gw.refused_media(&tv).await);
    assert_eq!(get_with(&gw, "/Users/Me", &phone).await, 200);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            jf.logged_out_tokens() == vec![tv.clone()]
        })
        .await,
        "{:?}",
        jf.logged_out_tokens()
    );
}

#[tokio::test]
async fn the_account_page_lists_media_devices_and_signs_them_out() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let browser = Browser::login(&gw, "alice", PW).await;
    let resp = client()
        .get(gw.url("/_portcullis/account"))
        .header("Cookie", &browser.cookie)
        .send()
        .await
        .unwrap();
    let html = resp.text().await.unwrap();
    assert!(html.contains("Jellyfin Android 2.6.1 on Pixel 7"), "{html}");
    let csrf = crate::harness::input_value(&html, "csrf").unwrap();
    let resp = client()
        .post(gw.url("/_portcullis/account/signout-all"))
        .header("Cookie", &browser.cookie)
        .header("Origin", gw.base.clone())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_redirection() || resp.status().is_success());
    assert!(gw.refused_media(&tv).await);
    assert!(
        poll_until(Duration::from_secs(5), || async {
            jf.logged_out_tokens().contains(&tv)
        })
        .await
    );
}

#[tokio::test]
async fn the_clients_own_logout_ends_the_binding() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let resp = client()
        .post(gw.url("/Sessions/Logout"))
        .header("Authorization", mb("tv-1", Some(&tv)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert!(gw.refused_media(&tv).await);
    let list = gw.cli_ok(&["session", "list", "--user", "alice"]);
    assert!(!list.contains("media"), "{list}");
    // Logged out once, by the client itself; the gateway owes nothing more.
    assert_eq!(jf.logged_out_tokens(), vec![tv]);
}

#[tokio::test]
async fn websockets_and_streams_of_a_revoked_token_are_closed_within_a_second() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let mut ws = open_socket(&gw, &format!("ApiKey={tv}&deviceId=tv-1")).await;

    let mut stream = client()
        .get(gw.url("/Videos/big/stream?Static=true"))
        .header("Authorization", mb("tv-1", Some(&tv)))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut received = 0usize;
    while received < 1 << 20 {
        received += stream.chunk().await.unwrap().unwrap().len();
    }
    // Hold the stand-in's Logout back, so only the gateway can close these.
    jf.set_failing_logouts(1_000);
    // Signed out through the gateway's own API (the account page does the same).
    let web = gw.login("alice", PW).await;
    let revoked_at = Instant::now();
    let resp = client()
        .post(gw.url("/_portcullis/api/signout-all"))
        .bearer_auth(&web.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let ws_closed = async {
        loop {
            match ws.next().await {
                None
                | Some(Err(_))
                | Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => {
                    return revoked_at.elapsed();
                }
                Some(Ok(_)) => {}
            }
        }
    };
    // The player has stopped reading (its buffers are full), as a paused or slow player does;
    // the gateway must close the stream anyway. Both closures show in the metrics.
    let closed_count = || async {
        let text = client()
            .get(format!("{}/metrics", gw.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with("portcullis_connections_closed_total "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let stream_cut = async {
        poll_until(Duration::from_secs(10), || async {
            closed_count().await >= 2.0
        })
        .await;
        revoked_at.elapsed()
    };
    let (ws_after, stream_after) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(ws_closed, stream_cut)
    })
    .await
    .expect("the socket or the stream stayed open");
    eprintln!("websocket closed after {ws_after:?}, stream cut after {stream_after:?}");
    assert!(
        ws_after < Duration::from_secs(1),
        "websocket took {ws_after:?}"
    );
    assert!(
        stream_after < Duration::from_secs(1),
        "stream took {stream_after:?}"
    );
    // What was already buffered still arrives; then the stream ends, short of its length.
    let drained = drain(&mut stream, Duration::from_secs(10)).await;
    assert!(drained.is_some(), "the stream never ended");
    received += drained.unwrap();
    assert!(received < 512 << 20, "the whole stream went through");
}

#[tokio::test]
async fn playback_grants_let_credential_less_streams_through_until_the_token_dies() {
    let (_jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let item = "0123456789abcdef0123456789abcdef";
    let stream = format!("/Videos/{item}/stream?Static=true&mediaSourceId={item}");
    let plain = || client().get(gw.url(&stream)).header("Range", "bytes=0-99");
    assert_eq!(plain().send().await.unwrap().status(), 401);
    // The app asks for playback info with its token …
    let resp = client()
        .post(gw.url(&format!("/Items/{item}/PlaybackInfo")))
        .header("Authorization", mb("tv-1", Some(&tv)))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // … and its player fetches the stream without one (dashed, upper-case id too).
    let resp = plain().send().await.unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.bytes().await.unwrap().len(), 100);
    let dashed = "01234567-89AB-CDEF-0123-456789ABCDEF";
    let resp = client()
        .get(gw.url(&format!("/videos/{dashed}/stream.mkv")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Another item is not granted.
    let resp = client()
        .get(gw.url("/Videos/ffffffffffffffffffffffffffffffff/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    gw.metrics_with(&["reason=\"playback_grant\""]).await;
    // The grant dies with its token.
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            plain().send().await.unwrap().status() == 401
        })
        .await,
        "the grant outlived its token"
    );
}

#[tokio::test]
async fn hls_playlists_keep_their_api_key_so_variants_and_segments_work() {
    let (_jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let master = client()
        .get(gw.url(&format!(
            "/videos/abc/master.m3u8?MediaSourceId=abc&ApiKey={tv}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(master.status(), 200);
    let text = master.text().await.unwrap();
    let variant = text
        .lines()
        .find(|l| l.contains("main.m3u8"))
        .expect("a variant line")
        .to_string();
    assert!(variant.contains(&format!("ApiKey={tv}")), "{text}");
    let main = client()
        .get(gw.url(&format!("/videos/abc/{variant}")))
        .send()
        .await
        .unwrap();
    assert_eq!(main.status(), 200);
    let text = main.text().await.unwrap();
    let segment = text
        .lines()
        .find(|l| l.contains(".ts"))
        .unwrap()
        .to_string();
    let seg = client()
        .get(gw.url(&format!("/videos/abc/{segment}")))
        .send()
        .await
        .unwrap();
    assert_eq!(seg.status(), 200);
}

#[tokio::test]
async fn artwork_without_a_credential_needs_a_live_session_seen_at_that_address() {
    let (_jf, gw) = setup("").await;
    let image = "/Items/abc/Images/Primary?fillHeight=300";
    assert_eq!(
        client().get(gw.url(image)).send().await.unwrap().status(),
        401
    );
    let tv = token_of(&gw, "alice", "tv-1").await;
    assert_eq!(get_with(&gw, "/Users/Me", &tv).await, 200);
    assert_eq!(
        client().get(gw.url(image)).send().await.unwrap().status(),
        200
    );
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(
        poll_until(Duration::from_secs(1), || async {
            client().get(gw.url(image)).send().await.unwrap().status() == 401
        })
        .await
    );
}

#[tokio::test]
async fn open_artwork_is_a_policy_choice() {
    let (_jf, gw) = setup("images = \"open\"").await;
    let resp = client()
        .get(gw.url("/Items/abc/Images/Primary"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A dead token is still refused there.
    assert_eq!(
        get_with(
            &gw,
            "/Items/abc/Images/Primary",
            "00000000000000000000000000000000"
        )
        .await,
        401
    );
}

#[tokio::test]
async fn compressed_and_camel_case_login_answers_bind_too() {
    let (jf, gw) = setup("").await;
    jf.set_gzip(true);
    let resp = client()
        .post(gw.url("/users/authenticatebyname"))
        .header("Authorization", mb("dev-gz", None))
        .header("Accept", "application/json; profile=\"CamelCase\"")
        .header("Accept-Encoding", "gzip")
        .json(&serde_json::json!({"username": "alice", "pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip"),
        "the client gets the answer as the media server sent it"
    );
    let raw = resp.bytes().await.unwrap();
    let mut text = String::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_string(&mut text)
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let token = v["accessToken"].as_str().unwrap();
    assert_eq!(get_with(&gw, "/Users/Me", token).await, 200);
}

#[tokio::test]
async fn the_obsolete_login_route_is_closed_before_the_media_server() {
    // `POST /Users/{id}/Authenticate?pw=` names the account by id, so the gateway could not
    // throttle or lock it before the media server had tried the password (ATK-31a).
    let jf = StandIn::start().await;
    let id = jf.add_user("alice", PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"\nmedia = { password_login = \"allow\" }")
        .start()
        .await;
    for path in [
        format!("/Users/{id}/Authenticate?pw={}", PW.replace(' ', "%20")),
        format!("/USERS/{id}/AUTHENTICATE?pw=wrong"),
        format!("/emby/Users/{id}/Authenticate?pw=wrong"),
    ] {
        let resp = client()
            .post(gw.url(&path))
            .header("Authorization", mb("dev-old", None))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}");
    }
    assert!(
        jf.requests().iter().all(|r| !r
            .path_and_query
            .to_ascii_lowercase()
            .contains("/authenticate")),
        "the obsolete route reached the media server"
    );
    gw.metrics_with(&["reason=\"blocked_path\""]).await;
}

#[tokio::test]
async fn media_users_map_to_gateway_users_and_unmapped_users_get_no_token() {
    let jf = StandIn::start().await;
    jf.add_user("Alice Smith", PW, false);
    jf.add_user("mallory", PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"\nmedia = { user_map = { \"Alice Smith\" = \"alice\" } }")
        .start()
        .await;
    let (status, body) = jf_login(&gw, "Alice Smith", PW, "dev-1").await;
    assert_eq!(status, 200, "{body}");
    let token = body["AccessToken"].as_str().unwrap();
    let resp = client()
        .get(gw.url("/Users/Me"))
        .header("Authorization", mb("dev-1", Some(token)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let list = gw.cli_ok(&["session", "list", "--user", "alice"]);
    assert!(list.contains("media"), "{list}");
    // mallory exists at the media server but not at the gateway: never forwarded.
    let before = jf.requests().len();
    let (status, _) = jf_login(&gw, "mallory", PW, "dev-2").await;
    assert_eq!(status, 401);
    assert_eq!(jf.requests().len(), before);
}

#[tokio::test]
async fn password_login_policies() {
    // deny: nothing reaches the media server.
    let (jf, gw) = setup("password_login = \"deny\"").await;
    let (status, body) = jf_login(&gw, "alice", PW, "dev-1").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Quick Connect"));
    assert!(!upstream_saw(&jf, "Authenticate"));
    drop(gw);

    // deny_for_2fa_users (the default): alice enrols a second factor and is refused; with
    // a gateway session (which passed the second factor) she is let through.
    let (jf, gw) = setup("").await;
    let browser = Browser::login(&gw, "alice", PW).await;
    enrol(&browser).await;
    let (status, body) = jf_login(&gw, "alice", PW, "dev-1").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("two-factor"));
    assert!(!upstream_saw(&jf, "Authenticate"));
    let resp = client()
        .post(gw.url("/Users/AuthenticateByName"))
        .header("Authorization", mb("dev-1", None))
        .header("Cookie", &browser.cookie)
        .json(&serde_json::json!({"Username": "alice", "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // bob has no second factor: a password login works.
    assert_eq!(jf_login(&gw, "bob", PW, "dev-2").await.0, 200);
}

#[tokio::test]
async fn wrong_media_passwords_are_throttled_like_gateway_logins() {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"")
        .auth_keys("max_failures = 3\nip_max_failures = 100")
        .start()
        .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(jf_login(&gw, "alice", "wrong password!", "dev-1").await.0);
    }
    assert_eq!(statuses[0], 401, "{statuses:?}");
    assert!(
        statuses.iter().any(|s| *s == 429 || *s == 403),
        "never throttled: {statuses:?}\n{}",
        gw.log()
    );
    let upstream_attempts = jf
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("AuthenticateByName"))
        .count();
    assert!(
        upstream_attempts < 6,
        "every attempt reached the media server"
    );
    gw.metrics_with(&[
        "portcullis_logins_total{method=\"media_password\",result=\"invalid_credentials\"}",
    ])
    .await;
}

/// Quick Connect initiated by a new device through the gateway: its secret and code.
pub(crate) async fn initiate(gw: &Gateway, device: &str) -> (String, String) {
    let init: Value = client()
        .post(gw.url("/QuickConnect/Initiate"))
        .header("Authorization", mb(device, None))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        init["Secret"].as_str().unwrap().to_string(),
        init["Code"].as_str().unwrap().to_string(),
    )
}

pub(crate) async fn redeem(gw: &Gateway, device: &str, secret: &str) -> reqwest::Response {
    client()
        .post(gw.url("/Users/AuthenticateWithQuickConnect"))
        .header("Authorization", mb(device, None))
        .json(&serde_json::json!({"Secret": secret}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn quick_connect_brings_two_factor_to_the_tv_and_binds_its_token_to_the_approver() {
    let (jf, gw) = setup("").await;
    // alice has a second factor: her TV cannot sign in with a password.
    let browser = Browser::login(&gw, "alice", PW).await;
    enrol(&browser).await;
    assert_eq!(jf_login(&gw, "alice", PW, "tv-qc").await.0, 403);

    // Her browser (gateway session, second factor passed) gets a Jellyfin token as
    // jellyfin-web does.
    let resp = client()
        .post(gw.url("/Users/AuthenticateByName"))
        .header("Authorization", mb("browser-1", None))
        .header("Cookie", &browser.cookie)
        .json(&serde_json::json!({"Username": "alice", "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let web_token = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_string();

    // The TV asks for a code; redeeming it before approval binds nothing.
    let (secret, code) = initiate(&gw, "tv-qc").await;
    assert_eq!(redeem(&gw, "tv-qc", &secret).await.status(), 401);

    // A media token alone cannot approve for a user with a second factor …
    let approve = |with_cookie: bool| {
        let mut req = client()
            .post(gw.url(&format!("/QuickConnect/Authorize?code={code}")))
            .header("Authorization", mb("browser-1", Some(&web_token)));
        if with_cookie {
            req = req.header("Cookie", &browser.cookie);
        }
        req.send()
    };
    assert_eq!(approve(false).await.unwrap().status(), 403);
    // … her browser's gateway session can.
    assert_eq!(approve(true).await.unwrap().status(), 200);

    // The TV sees the approval and redeems its secret.
    let state: Value = client()
        .get(gw.url(&format!("/QuickConnect/Connect?secret={secret}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["Authenticated"], true);
    let resp = redeem(&gw, "tv-qc", &secret).await;
    assert_eq!(resp.status(), 200);
    let tv_token = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get_with(&gw, "/Users/Me", &tv_token).await, 200);
    let list = gw.cli_ok(&["session", "list", "--user", "alice"]);
    assert_eq!(list.matches(" media ").count(), 2, "{list}");
    gw.metrics_with(&["portcullis_media_tokens_bound_total{source=\"quick_connect\"} 1"])
        .await;

    // bob cannot approve a code for alice's account (the media server refuses bob's
    // userId=alice as a non-admin; a code bob approves binds to bob, not alice).
    // A code approved behind the gateway's back yields a token the gateway will not bind:
    // refused, and logged out upstream at once.
    let (rogue_secret, rogue_code) = initiate(&gw, "tv-rogue").await;
    let resp = client()
        .post(format!(
            "{}/QuickConnect/Authorize?code={rogue_code}",
            jf.url()
        ))
        .header("Authorization", mb("browser-1", Some(&web_token)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(redeem(&gw, "tv-rogue", &rogue_secret).await.status(), 401);

    // Signing alice out of all devices ends the TV too.
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(gw.refused_media(&tv_token).await);
}

#[tokio::test]
async fn quick_connect_for_users_without_a_second_factor_needs_only_their_app() {
    let (_jf, gw) = setup("").await;
    let phone = token_of(&gw, "bob", "phone-1").await;
    let (secret, code) = initiate(&gw, "tv-bob").await;
    let resp = client()
        .post(gw.url(&format!("/QuickConnect/Authorize?code={code}")))
        .header("Authorization", mb("phone-1", Some(&phone)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = redeem(&gw, "tv-bob", &secret).await;
    assert_eq!(resp.status(), 200);
    let token = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(get_with(&gw, "/Users/Me", &token).await, 200);
    // Without any credential, approving is refused by the gateway.
    let (_, code) = initiate(&gw, "tv-2").await;
    let resp = client()
        .post(gw.url(&format!("/QuickConnect/Authorize?code={code}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn media_token_lifetimes_end_tokens_and_log_them_out() {
    for (policy, user, within) in [
        ("token_idle = \"1s\"", "alice", 20),
        ("token_lifetime = \"2s\"", "bob", 10),
    ] {
        let (jf, gw) = setup(policy).await;
        let tv = token_of(&gw, user, "tv-1").await;
        assert_eq!(get_with(&gw, "/Users/Me", &tv).await, 200);
        assert!(
            poll_until(Duration::from_secs(within), || async {
                get_with(&gw, "/Users/Me", &tv).await == 401
            })
            .await,
            "with {policy} the media token lived on"
        );
        assert!(
            poll_until(Duration::from_secs(5), || async {
                jf.logged_out_tokens().contains(&tv)
            })
            .await,
            "with {policy} the token was not logged out upstream"
        );
    }
}

#[tokio::test]
async fn unknown_tokens_can_be_adopted_when_migrating() {
    let (jf, gw) = setup("adopt_unknown_tokens = true").await;
    let direct = minted_behind_the_gateway(&jf, "old-tv").await;
    assert_eq!(get_with(&gw, "/Users/Me", &direct).await, 200);
    let list = gw.cli_ok(&["session", "list", "--user", "alice"]);
    assert!(list.contains("media"), "{list}");
    // Adopted tokens are revocable like any other.
    gw.cli_ok(&["signout", "--user", "alice"]);
    assert!(gw.refused_media(&direct).await);
    // A token the media server does not know stays unknown.
    assert_eq!(
        get_with(&gw, "/Users/Me", "ffffffffffffffffffffffffffffffff").await,
        401
    );
    // Random tokens cannot make the gateway ask the media server without end.
    let before = jf
        .requests()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/Users/Me"))
        .count();
    for i in 0..(portcullis::mediaserver::MAX_ADOPTIONS_PER_IP + 10) {
        let token = format!("{:032x}", 0xabc000 + u128::from(i));
        assert_eq!(get_with(&gw, "/Users/Me", &token).await, 401);
    }
    let asked = jf
        .requests()
        .iter()
        .filter(|r| r.path_and_query.starts_with("/Users/Me"))
        .count()
        - before;
    assert!(
        asked <= portcullis::mediaserver::MAX_ADOPTIONS_PER_IP as usize,
        "{asked} unknown tokens were checked upstream"
    );
    gw.metrics_with(&["portcullis_media_tokens_bound_total{source=\"adopted\"} 1"])
        .await;
}

#[tokio::test]
async fn emby_routes_take_emby_query_carriers_and_prefix() {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys("kind = \"emby\"")
        .start()
        .await;
    let resp = client()
        .post(gw.url(
            "/emby/Users/AuthenticateByName?X-Emby-Client=Emby+Web&X-Emby-Device-Name=Firefox\
             &X-Emby-Device-Id=emby-1&X-Emby-Client-Version=4.8",
        ))
        .header(
            "X-Emby-Authorization",
            "Emby Client=\"Emby Web\", Device=\"Firefox\", DeviceId=\"emby-1\", Version=\"4.8\"",
        )
        .json(&serde_json::json!({"Username": "alice", "Pw": PW}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let token = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_string();
    // Emby apps carry the token as an `X-Emby-Token` query key, which the gateway reads:
    // a dead one is refused here, a bound one goes through (the stand-in is Jellyfin, which
    // does not read that key itself, so only the gateway's decision is checked).
    let dead = "0123456789abcdef0123456789abcdef";
    let resp = client()
        .get(gw.url(&format!(
            "/emby/Users/Me?X-Emby-Token={dead}&X-Emby-Client=Emby+Web"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(!upstream_saw(&jf, dead));
    let _ = client()
        .get(gw.url(&format!(
            "/emby/Users/Me?X-Emby-Token={token}&X-Emby-Client=Emby+Web"
        )))
        .send()
        .await
        .unwrap();
    assert!(upstream_saw(&jf, &format!("X-Emby-Token={token}")));
}

#[tokio::test]
async fn secrets_of_media_logins_never_reach_the_logs_or_the_store_in_clear() {
    let (_jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    assert_eq!(
        get_with(&gw, &format!("/Users/Me?ApiKey={tv}"), &tv).await,
        200
    );
    let _ = client()
        .get(gw.url(&format!("/Videos/abc/stream?api_key={tv}")))
        .send()
        .await;
    let _ = client()
        .get(gw.url(&format!("/socket?ApiKey%3D{tv}%26deviceId%3Dx")))
        .send()
        .await;
    let _ = client()
        .get(gw.url(&format!("/emby/Users/Me?X-Emby-Token={tv}")))
        .send()
        .await;
    let (secret, _code) = initiate(&gw, "tv-log").await;
    let _ = client()
        .get(gw.url(&format!("/QuickConnect/Connect?secret={secret}")))
        .send()
        .await;
    let _ = client()
        .post(gw.url(&format!(
            "/Users/0123/Authenticate?pw={}",
            PW.replace(' ', "+")
        )))
        .header("Authorization", mb("dev-old", None))
        .send()
        .await;
    gw.log_containing("/Videos/abc/stream").await;
    gw.log_containing("/QuickConnect/Connect").await;
    gw.log_containing("/Users/0123/Authenticate").await;
    let log = gw.log();
    assert!(!log.contains(&tv), "a media token reached the log");
    assert!(
        !log.contains(&secret),
        "a Quick Connect secret reached the log"
    );
    assert!(
        !log.contains(PW) && !log.contains(&PW.replace(' ', "+")),
        "a password reached the log"
    );
    let db = std::fs::read(gw.db_path()).unwrap();
    let wal = std::fs::read(format!("{}-wal", gw.db_path().display())).unwrap_or_default();
    for bytes in [db, wal] {
        assert!(
            !bytes.windows(tv.len()).any(|w| w == tv.as_bytes()),
            "the media token is stored in clear"
        );
    }
}

#[tokio::test]
async fn quick_connect_code_guessing_and_initiate_floods_are_rate_limited() {
    let (jf, gw) = setup("").await;
    let phone = token_of(&gw, "bob", "phone-1").await;
    let mut statuses = Vec::new();
    for i in 0..12 {
        let resp = client()
            .post(gw.url(&format!("/QuickConnect/Authorize?code={:06}", 100_000 + i)))
            .header("Authorization", mb("phone-1", Some(&phone)))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert!(
        statuses[..10].iter().all(|s| *s != 200 && *s != 429),
        "{statuses:?}"
    );
    assert_eq!(&statuses[10..], &[429, 429], "{statuses:?}");
    let tried = jf
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("Authorize"))
        .count();
    assert_eq!(tried, 10, "guesses past the limit reached the media server");

    let mut last = 0;
    for _ in 0..=initiate_limit() {
        last = client()
            .post(gw.url("/QuickConnect/Initiate"))
            .header("Authorization", mb("tv-flood", None))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
    }
    assert_eq!(last, 429);
    gw.metrics_with(&["reason=\"rate_limited\""]).await;

    // Guessed secrets (ATK-31d): refused, then throttled; none reaches the media server.
    let limit = portcullis::mediaserver::MAX_FAILED_REDEEMS_PER_IP as usize;
    let mut statuses = Vec::new();
    for i in 0..limit + 2 {
        let resp = client()
            .post(gw.url("/Users/AuthenticateWithQuickConnect"))
            .header("Authorization", mb("tv-guess", None))
            .json(&serde_json::json!({"Secret": format!("{i:064x}")}))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert!(statuses[..limit].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(&statuses[limit..], &[429, 429], "{statuses:?}");
    assert!(
        jf.requests()
            .iter()
            .all(|r| !r.path_and_query.contains("AuthenticateWithQuickConnect")),
        "a guessed secret reached the media server"
    );
}

/// Quick Connect codes one address may ask for in ten minutes (`MAX_INITIATES_PER_IP`).
fn initiate_limit() -> u32 {
    portcullis::mediaserver::MAX_INITIATES_PER_IP
}
