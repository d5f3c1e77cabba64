//! Fidelity tests of the Jellyfin stand-in ([`crate::standin`]), talking to it directly (no
//! gateway): each checks one behaviour the protocol brief attributes to Jellyfin 10.11, so the
//! gateway tests built on the stand-in test against Jellyfin's rules and not made-up ones. The
//! last two drive the real client libraries (`jellyfin-apiclient-python`, `@jellyfin/sdk`)
//! against it; they need `tests/clients/install.sh` to have run.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::poll_until;
use crate::standin::{self, Case, StandIn};
use crate::upstream::pattern_byte;

const USER: &str = "alice";
const PASSWORD: &str = "alice-jf-pw";
const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// A `MediaBrowser` header like the TypeScript SDK's, for DeviceId `device_id`.
fn mb(device_id: &str, token: Option<&str>) -> String {
    let mut h = format!(
        "MediaBrowser Client=\"fidelity\", Device=\"test box\", DeviceId=\"{device_id}\", Version=\"1.0\""
    );
    if let Some(t) = token {
        h.push_str(&format!(", Token=\"{t}\""));
    }
    h
}

async fn start() -> (StandIn, String) {
    let si = StandIn::start().await;
    let id = si.add_user(USER, PASSWORD, false);
    (si, id)
}

/// Logs in by name from `device_id`; returns the `AuthenticationResult`.
async fn login(si: &StandIn, device_id: &str, user: &str, pw: &str) -> Value {
    let resp = client()
        .post(format!("{}/Users/AuthenticateByName", si.url()))
        .header("Authorization", mb(device_id, None))
        .json(&json!({"Username": user, "Pw": pw}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "login of {user} from {device_id}");
    resp.json().await.unwrap()
}

async fn token_of(si: &StandIn, device_id: &str) -> String {
    let r = login(si, device_id, USER, PASSWORD).await;
    r["AccessToken"].as_str().unwrap().to_owned()
}

/// Status of `GET {path}` with the given extra headers.
async fn status_with(si: &StandIn, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut rb = client().get(format!("{}{path}", si.url()));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap().status().as_u16()
}

async fn me_status(si: &StandIn, headers: &[(&str, &str)]) -> u16 {
    status_with(si, "/Users/Me", headers).await
}

fn is_token(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket at `path` with optional extra headers; `Err(status)` if refused.
async fn open_ws(si: &StandIn, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{}{path}", si.addr)
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), 101);
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket to {path}: {e}"),
    }
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Waits until the socket is closed by the server; returns the close code if a frame came.
async fn wait_closed(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => panic!("socket still open after {WAIT:?}"),
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return None,
        }
    }
}

// ---------------------------------------------------------------- header grammar

#[test]
fn standin_get_parts_matches_jellyfin_grammar() {
    let p = standin::get_parts;
    // Jellyfin's own unit-test cases (brief §1.4).
    assert_eq!(p("x=\"123,123\",y=\"123\"")["x"], "123,123");
    assert_eq!(p("x=\"123,123\",y=\"123\"")["y"], "123");
    assert_eq!(p("x=\"ab\"")["x"], "ab");
    assert_eq!(p("param=Hörbücher")["param"], "Hörbücher");
    assert_eq!(p("param=%22%Hörbücher")["param"], "\"%Hörbücher");
    // Keys trimmed, values URL-decoded with `+` as a space, quotes only trimmed.
    let d = p("Client=\"a+b\", Device=\"c%20d\",  DeviceId=e, Token=\"t\"");
    assert_eq!(d["Client"], "a b");
    assert_eq!(d["Device"], "c d");
    assert_eq!(d["DeviceId"], "e");
    assert_eq!(d["Token"], "t");
    // A space before the quote stays, and so does the dangling quote.
    assert_eq!(p("Token= \"abc\"")["Token"], " \"abc");
    // Last duplicate wins; keys are case-sensitive.
    let d = p("Token=\"one\", Token=\"two\", token=\"three\"");
    assert_eq!(d["Token"], "two");
    assert_eq!(d["token"], "three");
    // `=` inside quotes is part of the value.
    assert_eq!(p("Token=\"a=b\"")["Token"], "a=b");
    // Scheme: MediaBrowser or Emby, any case; anything else, or no space, is ignored.
    assert!(standin::parse_authorization("mediabrowser Token=\"x\"").is_some());
    assert!(standin::parse_authorization("EMBY Token=\"x\"").is_some());
    assert!(standin::parse_authorization("Bearer x").is_none());
    assert!(standin::parse_authorization("MediaBrowser").is_none());
}

#[tokio::test]
async fn standin_header_grammar_on_the_wire() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-grammar").await;
    let cases: Vec<(String, u16)> = vec![
        (format!("MediaBrowser Token=\"{t}\""), 200),
        (format!("MediaBrowser Token={t}"), 200),
        (format!("MediaBrowser Client=\"a,b\", Token=\"{t}\""), 200),
        (
            format!("MediaBrowser Client=a b, Device=x+y, Token={t}"),
            200,
        ),
        (format!("mediabrowser Token=\"{t}\""), 200),
        (format!("Emby Token=\"{t}\""), 200),
        (format!("emby Token=\"{t}\""), 200),
        // Keys are case-sensitive: `token` is no token.
        (format!("MediaBrowser token=\"{t}\""), 401),
        // Last duplicate wins.
        (format!("MediaBrowser Token=\"bad\", Token=\"{t}\""), 200),
        (format!("MediaBrowser Token=\"{t}\", Token=\"bad\""), 401),
        // A space before the quote spoils the value.
        (format!("MediaBrowser Token= \"{t}\""), 401),
        // Not a MediaBrowser scheme.
        (format!("Bearer {t}"), 401),
        (format!("MediaBrowser{t}"), 401),
    ];
    for (header, want) in &cases {
        assert_eq!(
            me_status(&si, &[("Authorization", header)]).await,
            *want,
            "{header}"
        );
    }

    // X-Emby-Authorization counts only when Authorization is absent or empty.
    let good = format!("MediaBrowser Token=\"{t}\"");
    assert_eq!(
        me_status(&si, &[("X-Emby-Authorization", &good)]).await,
        200
    );
    assert_eq!(
        me_status(
            &si,
            &[("Authorization", ""), ("X-Emby-Authorization", &good)]
        )
        .await,
        200
    );
    assert_eq!(
        me_status(
            &si,
            &[
                ("Authorization", "MediaBrowser Token=\"bad\""),
                ("X-Emby-Authorization", &good)
            ]
        )
        .await,
        401
    );
    // A foreign scheme in Authorization hides X-Emby-Authorization entirely.
    assert_eq!(
        me_status(
            &si,
            &[
                ("Authorization", "Basic Zm9vOmJhcg=="),
                ("X-Emby-Authorization", &good)
            ]
        )
        .await,
        401
    );

    // Precedence: header Token → X-Emby-Token → X-MediaBrowser-Token → ApiKey → api_key,
    // an empty one falling through.
    assert_eq!(me_status(&si, &[("X-Emby-Token", &t)]).await, 200);
    assert_eq!(me_status(&si, &[("X-MediaBrowser-Token", &t)]).await, 200);
    let empty_token = "MediaBrowser Client=\"x\", Token=\"\"";
    assert_eq!(
        status_with(
            &si,
            &format!("/Users/Me?ApiKey={t}"),
            &[("Authorization", empty_token)]
        )
        .await,
        200
    );
    assert_eq!(
        status_with(
            &si,
            &format!("/Users/Me?ApiKey={t}"),
            &[("Authorization", "MediaBrowser Token=\"bad\"")]
        )
        .await,
        401
    );
    assert_eq!(
        status_with(
            &si,
            &format!("/Users/Me?ApiKey={t}"),
            &[("X-Emby-Token", "bad")]
        )
        .await,
        401
    );
    assert_eq!(
        status_with(&si, "/Users/Me?ApiKey=bad", &[("X-Emby-Token", &t)]).await,
        200
    );
    // Whitespace is a token that stops the precedence, then counts as none.
    assert_eq!(
        status_with(
            &si,
            &format!("/Users/Me?ApiKey={t}"),
            &[("Authorization", "MediaBrowser Token=\" \"")]
        )
        .await,
        401
    );
    // No credential at all.
    assert_eq!(me_status(&si, &[]).await, 401);

    // `+` in a login header becomes a space in the stored device name.
    let resp = client()
        .post(format!("{}/Users/AuthenticateByName", si.url()))
        .header(
            "Authorization",
            "MediaBrowser Client=\"c\", Device=\"living+room%2Dtv\", DeviceId=\"dev-plus\", Version=\"1\"",
        )
        .json(&json!({"Username": USER, "Pw": PASSWORD}))
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["SessionInfo"]["DeviceName"], "living room-tv");
}

#[tokio::test]
async fn standin_query_keys_are_case_insensitive_and_decoded() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-query").await;
    // `%4B` is `K` and `%5f` is `_`: keys are decoded before they are compared.
    for key in [
        "ApiKey",
        "apikey",
        "APIKEY",
        "Api%4Bey",
        "api_key",
        "API_KEY",
        "Api%5fKey",
    ] {
        assert_eq!(
            status_with(&si, &format!("/Users/Me?{key}={t}"), &[]).await,
            200,
            "{key}"
        );
    }
    assert_eq!(
        status_with(&si, &format!("/Users/Me?Api+Key={t}"), &[]).await,
        401,
        "`+` is a space in a key"
    );
    // Repeated key: the values are joined with `,`, which is no token.
    assert_eq!(
        status_with(&si, &format!("/Users/Me?ApiKey={t}&apikey={t}"), &[]).await,
        401
    );
    // Paths are case-insensitive too, and a trailing slash is ignored.
    assert_eq!(
        status_with(&si, &format!("/users/ME/?apikey={t}"), &[]).await,
        200
    );
}

// ---------------------------------------------------------------- tokens and sessions

#[tokio::test]
async fn standin_login_replaces_the_token_of_the_same_device_and_user() {
    let (si, alice_id) = start().await;
    let bob_id = si.add_user("bob", "bob-pw", false);

    let r1 = login(&si, "dev-1", USER, PASSWORD).await;
    let t1 = r1["AccessToken"].as_str().unwrap().to_owned();
    assert!(is_token(&t1), "{t1}");
    assert_eq!(r1["User"]["Id"], alice_id);
    assert_eq!(r1["User"]["Name"], USER);
    assert_eq!(r1["ServerId"], si.server_id());
    assert_eq!(r1["User"]["ServerId"], si.server_id());
    assert_eq!(r1["User"]["Policy"]["IsAdministrator"], false);
    assert_eq!(r1["User"]["Policy"]["IsDisabled"], false);
    assert_eq!(r1["SessionInfo"]["UserId"], alice_id);
    assert_eq!(r1["SessionInfo"]["UserName"], USER);
    assert_eq!(r1["SessionInfo"]["DeviceId"], "dev-1");
    assert_eq!(r1["SessionInfo"]["DeviceName"], "test box");
    assert_eq!(r1["SessionInfo"]["Client"], "fidelity");
    assert_eq!(r1["SessionInfo"]["ApplicationVersion"], "1.0");
    assert_eq!(r1["SessionInfo"]["RemoteEndPoint"], "127.0.0.1");

    // A WebSocket of the first token.
    let mut ws = open_ws(&si, &format!("/socket?ApiKey={t1}"), &[])
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["MessageType"], "ForceKeepAlive");

    // Same device, same user: the old token is logged out (and its session's socket closed).
    let t2 = token_of(&si, "dev-1").await;
    assert_ne!(t1, t2);
    assert_eq!(si.live_tokens(), vec![t2.clone()]);
    assert_eq!(wait_closed(&mut ws).await, Some(1000));
    assert_eq!(me_status(&si, &[("X-Emby-Token", &t1)]).await, 401);
    assert_eq!(me_status(&si, &[("X-Emby-Token", &t2)]).await, 200);
    // A replaced token is not a token that called Logout.
    assert!(si.logged_out_tokens().is_empty());

    // Another device, or another user on the same device: both stay.
    let t3 = token_of(&si, "dev-2").await;
    let rb = login(&si, "dev-1", "BOB", "bob-pw").await;
    assert_eq!(
        rb["User"]["Id"], bob_id,
        "user names match case-insensitively"
    );
    let tb = rb["AccessToken"].as_str().unwrap().to_owned();
    assert_eq!(si.live_tokens(), vec![t2.clone(), t3, tb]);

    // Wrong password, unknown user: 401; missing client fields: 400.
    let send = |auth: String, body: Value| {
        let url = format!("{}/Users/AuthenticateByName", si.url());
        async move {
            client()
                .post(url)
                .header("Authorization", auth)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let body = |u: &str, p: &str| json!({"Username": u, "Pw": p});
    assert_eq!(send(mb("d", None), body(USER, "wrong")).await, 401);
    assert_eq!(send(mb("d", None), body("nobody", "x")).await, 401);
    assert_eq!(
        send(
            "MediaBrowser Client=\"c\", Device=\"d\", DeviceId=\"i\"".into(),
            body(USER, PASSWORD)
        )
        .await,
        400
    );
    assert_eq!(
        send(
            "MediaBrowser Client=\"c\", Device=\"\", DeviceId=\"i\", Version=\"1\"".into(),
            body(USER, PASSWORD)
        )
        .await,
        400
    );
    assert_eq!(send(String::new(), body(USER, PASSWORD)).await, 400);
    // Body keys are case-insensitive (the Python client sends `username`).
    assert_eq!(
        send(mb("d", None), json!({"username": USER, "pw": PASSWORD})).await,
        200
    );
    // Not JSON: 415.
    let resp = client()
        .post(format!("{}/Users/AuthenticateByName", si.url()))
        .header("Authorization", mb("d", None))
        .header("Content-Type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
}

#[tokio::test]
async fn standin_obsolete_authenticate_with_pw_in_query() {
    let (si, alice_id) = start().await;
    let post = |path: String| {
        let url = format!("{}{path}", si.url());
        async move {
            client()
                .post(url)
                .header("Authorization", mb("dev-old", None))
                .send()
                .await
                .unwrap()
        }
    };
    let resp = post(format!("/Users/{alice_id}/Authenticate?pw={PASSWORD}")).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(is_token(body["AccessToken"].as_str().unwrap()));
    assert_eq!(body["User"]["Id"], alice_id);
    // Dashed GUIDs are accepted in routes.
    let dashed = format!(
        "{}-{}-{}-{}-{}",
        &alice_id[..8],
        &alice_id[8..12],
        &alice_id[12..16],
        &alice_id[16..20],
        &alice_id[20..]
    );
    assert_eq!(
        post(format!("/users/{dashed}/authenticate?PW={PASSWORD}"))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(format!("/Users/{alice_id}/Authenticate?pw=wrong"))
            .await
            .status(),
        401
    );
    assert_eq!(
        post(format!("/Users/{alice_id}/Authenticate"))
            .await
            .status(),
        400
    );
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        post(format!("/Users/{unknown}/Authenticate?pw=x"))
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn standin_logout_deletes_the_token_and_closes_its_websockets() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-logout").await;
    let other = token_of(&si, "dev-other").await;

    // Sockets over every kind of carrier, on any path.
    let mut by_query = open_ws(&si, &format!("/socket?ApiKey={t}"), &[])
        .await
        .unwrap();
    let header = mb("dev-logout", Some(&t));
    let mut by_header = open_ws(&si, "/socket", &[("Authorization", &header)])
        .await
        .unwrap();
    let mut legacy = open_ws(&si, &format!("/any/path?api_key={t}&deviceId=x"), &[])
        .await
        .unwrap();
    let mut survivor = open_ws(&si, "/socket", &[("X-Emby-Token", &other)])
        .await
        .unwrap();
    for ws in [&mut by_query, &mut by_header, &mut legacy, &mut survivor] {
        let first = next_json(ws).await;
        assert_eq!(first["MessageType"], "ForceKeepAlive");
        assert_eq!(first["Data"], 60);
        assert!(is_token(first["MessageId"].as_str().unwrap()));
    }
    assert_eq!(si.open_sockets(), 4);

    // Echo, and the KeepAlive answer.
    by_query.send(Message::Text("hello".into())).await.unwrap();
    match tokio::time::timeout(WAIT, by_query.next()).await.unwrap() {
        Some(Ok(Message::Text(s))) => assert_eq!(s, "hello"),
        other => panic!("expected the echo, got {other:?}"),
    }
    by_header
        .send(Message::Text(r#"{"MessageType":"KeepAlive"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut by_header).await["MessageType"], "KeepAlive");

    // Without a valid token, no upgrade (403, see the stand-in's docs).
    assert_eq!(open_ws(&si, "/socket", &[]).await.err(), Some(403));
    assert_eq!(
        open_ws(&si, "/socket?ApiKey=nope", &[]).await.err(),
        Some(403)
    );

    // An injected failure: 503, the token survives.
    si.set_failing_logouts(1);
    let logout = |tok: String| {
        let url = format!("{}/Sessions/Logout", si.url());
        async move {
            client()
                .post(url)
                .header("Authorization", format!("MediaBrowser Token=\"{tok}\""))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(logout(t.clone()).await, 503);
    assert!(si.live_tokens().contains(&t));
    assert!(si.logged_out_tokens().is_empty());

    assert_eq!(logout(t.clone()).await, 204);
    assert_eq!(si.logged_out_tokens(), vec![t.clone()]);
    assert_eq!(si.live_tokens(), vec![other.clone()]);
    for ws in [&mut by_query, &mut by_header, &mut legacy] {
        assert_eq!(wait_closed(ws).await, Some(1000));
    }
    assert!(
        poll_until(WAIT, || async { si.open_sockets() == 1 }).await,
        "sockets left: {}",
        si.open_sockets()
    );
    // The other device's socket is untouched.
    survivor.send(Message::Text("still".into())).await.unwrap();
    match tokio::time::timeout(WAIT, survivor.next()).await.unwrap() {
        Some(Ok(Message::Text(s))) => assert_eq!(s, "still"),
        other => panic!("expected the echo, got {other:?}"),
    }
    assert_eq!(me_status(&si, &[("X-Emby-Token", &t)]).await, 401);
    assert_eq!(logout(t.clone()).await, 401);
    assert_eq!(logout(String::new()).await, 401);
    assert_eq!(si.logged_out_tokens(), vec![t]);

    // A password change revokes every token of the user (brief §2.3).
    si.set_user_password(USER, "new-pw");
    assert_eq!(wait_closed(&mut survivor).await, Some(1000));
    assert!(si.live_tokens().is_empty());
    let resp = client()
        .post(format!("{}/Users/AuthenticateByName", si.url()))
        .header("Authorization", mb("d", None))
        .json(&json!({"Username": USER, "Pw": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    login(&si, "d", USER, "new-pw").await;
}

#[tokio::test]
async fn standin_websocket_accepts_a_fully_encoded_query() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-enc").await;
    // `UrlDecodeQueryFeature` runs before the WebSocket handler, not before HTTP auth.
    let path = format!("/socket?ApiKey%3D{t}%26deviceId%3Dx");
    let mut ws = open_ws(&si, &path, &[]).await.unwrap();
    assert_eq!(next_json(&mut ws).await["MessageType"], "ForceKeepAlive");
    assert_eq!(
        status_with(&si, &format!("/Users/Me?ApiKey%3D{t}%26deviceId%3Dx"), &[]).await,
        401
    );
    // The re-parsed keys are case-sensitive.
    let path = format!("/socket?apikey%3D{t}");
    assert_eq!(open_ws(&si, &path, &[]).await.err(), Some(403));
}

#[tokio::test]
async fn standin_requests_rewrite_the_device_row_except_for_chromecast() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-row").await;
    let row = |si: &StandIn| si.devices().into_iter().next().unwrap();
    assert_eq!(row(&si).device_name, "test box");
    let cast = format!(
        "MediaBrowser Client=\"Chromecast\", Device=\"tv\", DeviceId=\"x\", Version=\"9\", Token=\"{t}\""
    );
    assert_eq!(me_status(&si, &[("Authorization", &cast)]).await, 200);
    assert_eq!(row(&si).device_name, "test box");
    assert_eq!(row(&si).version, "1.0");
    let renamed = format!(
        "MediaBrowser Client=\"other\", Device=\"renamed\", DeviceId=\"x\", Version=\"2.0\", Token=\"{t}\""
    );
    assert_eq!(me_status(&si, &[("Authorization", &renamed)]).await, 200);
    assert_eq!(row(&si).device_name, "renamed");
    assert_eq!(row(&si).version, "2.0");
    assert_eq!(
        row(&si).device_id,
        "dev-row",
        "the DeviceId is never rewritten"
    );
}

// ---------------------------------------------------------------- JSON

#[test]
fn standin_negotiates_json_naming_like_aspnet() {
    use standin::negotiate;
    assert_eq!(negotiate(None).0, Case::Pascal);
    assert_eq!(negotiate(Some("application/json")).0, Case::Pascal);
    assert_eq!(negotiate(Some("*/*")).0, Case::Pascal);
    assert_eq!(
        negotiate(Some("application/json; profile=\"CamelCase\"")),
        (Case::Camel, "application/json; profile=\"CamelCase\"")
    );
    assert_eq!(
        negotiate(Some("application/json;profile=CamelCase")).0,
        Case::Camel
    );
    // The TypeScript SDK's Accept: plain application/json comes first and wins.
    assert_eq!(
        negotiate(Some(
            "application/json,application/json; profile=CamelCase,application/json; profile=PascalCase,text/html"
        ))
        .0,
        Case::Pascal
    );
    // Quality decides before order.
    assert_eq!(
        negotiate(Some(
            "application/json;q=0.5, application/json; profile=\"CamelCase\""
        ))
        .0,
        Case::Camel
    );
    assert_eq!(negotiate(Some("text/html")).0, Case::Pascal);
    assert_eq!(standin::camel_name("AccessToken"), "accessToken");
    assert_eq!(standin::camel_name("Id"), "id");
    assert_eq!(standin::camel_name("IsHDR"), "isHDR");
    assert_eq!(standin::camel_name("URLPath"), "urlPath");
    assert_eq!(standin::camel_name("UICulture"), "uiCulture");
}

#[tokio::test]
async fn standin_answers_camel_case_only_when_negotiated() {
    let (si, _) = start().await;
    let post = |accept: Option<&'static str>| {
        let url = format!("{}/Users/AuthenticateByName", si.url());
        async move {
            let mut rb = client()
                .post(url)
                .header("Authorization", mb("dev-case", None))
                .json(&json!({"Username": USER, "Pw": PASSWORD}));
            if let Some(a) = accept {
                rb = rb.header("Accept", a);
            }
            let resp = rb.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
            (ct, resp.json::<Value>().await.unwrap())
        }
    };
    let (ct, pascal) = post(None).await;
    assert_eq!(ct, "application/json; charset=utf-8");
    assert!(pascal["AccessToken"].is_string());
    assert!(pascal["User"]["Policy"]["IsAdministrator"].is_boolean());
    assert!(pascal.get("accessToken").is_none());

    let (ct, camel) = post(Some("application/json; profile=\"CamelCase\"")).await;
    assert_eq!(ct, "application/json; profile=\"CamelCase\"; charset=utf-8");
    assert!(camel["accessToken"].is_string());
    assert!(camel["user"]["policy"]["isAdministrator"].is_boolean());
    assert_eq!(camel["sessionInfo"]["deviceId"], "dev-case");
    assert!(camel.get("AccessToken").is_none());

    let (_, sdk) = post(Some(
        "application/json,application/json; profile=CamelCase,application/json; profile=PascalCase",
    ))
    .await;
    assert!(sdk["AccessToken"].is_string());
}

#[tokio::test]
async fn standin_gzips_json_when_asked_and_allowed() {
    let (si, _) = start().await;
    let get = |ae: Option<&'static str>| {
        let url = format!("{}/System/Info/Public", si.url());
        async move {
            let mut rb = client().get(url);
            if let Some(ae) = ae {
                rb = rb.header("Accept-Encoding", ae);
            }
            let resp = rb.send().await.unwrap();
            let headers: HeaderMap = resp.headers().clone();
            (headers, resp.bytes().await.unwrap().to_vec())
        }
    };
    // Off by default.
    let (h, body) = get(Some("gzip")).await;
    assert!(h.get("content-encoding").is_none());
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["Version"],
        "10.11.11"
    );

    si.set_gzip(true);
    let (h, body) = get(Some("gzip, deflate, br")).await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(h["vary"], "Accept-Encoding");
    let mut plain = String::new();
    flate2::read::GzDecoder::new(body.as_slice())
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&plain).unwrap()["Version"],
        "10.11.11"
    );
    for ae in [None, Some("identity"), Some("gzip;q=0"), Some("br")] {
        let (h, body) = get(ae).await;
        assert!(h.get("content-encoding").is_none(), "{ae:?}");
        assert!(serde_json::from_slice::<Value>(&body).is_ok(), "{ae:?}");
    }
    let (h, _) = get(Some("*")).await;
    assert_eq!(h["content-encoding"], "gzip");

    // Login results too (the gateway must read them).
    let resp = client()
        .post(format!("{}/Users/AuthenticateByName", si.url()))
        .header("Authorization", mb("dev-gz", None))
        .header("Accept-Encoding", "gzip")
        .json(&json!({"Username": USER, "Pw": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    si.set_gzip(false);
    let (h, _) = get(Some("gzip")).await;
    assert!(h.get("content-encoding").is_none());
}

// ---------------------------------------------------------------- Quick Connect

#[tokio::test]
async fn standin_quick_connect_flow() {
    let (si, alice_id) = start().await;
    let bob_id = si.add_user("bob", "bob-pw", false);
    si.add_user("root", "root-pw", true);
    let c = client();
    let url = |p: &str| format!("{}{p}", si.url());

    let enabled: Value = c
        .get(url("/QuickConnect/Enabled"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(enabled, json!(true));

    // Initiate needs every client field.
    let resp = c
        .post(url("/QuickConnect/Initiate"))
        .header(
            "Authorization",
            "MediaBrowser Client=\"tv\", Device=\"TV\", DeviceId=\"dev-qc\"",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let tv = "MediaBrowser Client=\"tv-app\", Device=\"Living Room\", DeviceId=\"dev-qc\", Version=\"3.1\"";
    let init: Value = c
        .post(url("/QuickConnect/Initiate"))
        .header("Authorization", tv)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(init["Authenticated"], false);
    let secret = init["Secret"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    let code = init["Code"].as_str().unwrap().to_owned();
    assert!(
        code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()),
        "{code}"
    );
    assert_eq!(init["DeviceId"], "dev-qc");
    assert_eq!(init["DeviceName"], "Living Room");
    assert_eq!(init["AppName"], "tv-app");
    assert_eq!(init["AppVersion"], "3.1");
    assert!(init["DateAdded"].as_str().unwrap().ends_with('Z'));

    let connect = |s: String| {
        let c = c.clone();
        let u = url("/QuickConnect/Connect");
        async move { c.get(u).query(&[("secret", s)]).send().await.unwrap() }
    };
    let state: Value = connect(secret.clone()).await.json().await.unwrap();
    assert_eq!(state["Authenticated"], false);
    assert_eq!(connect("0".repeat(64)).await.status(), 404);

    let redeem = |s: &str| {
        let c = c.clone();
        let u = url("/Users/AuthenticateWithQuickConnect");
        let body = json!({"Secret": s});
        async move { c.post(u).json(&body).send().await.unwrap() }
    };
    assert_eq!(redeem(&secret).await.status(), 404, "not authorised yet");

    let alice = token_of(&si, "dev-phone").await;
    let bob = login(&si, "dev-bob", "bob", "bob-pw").await["AccessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let authorize = |token: Option<&str>, query: String| {
        let c = c.clone();
        let u = url(&format!("/QuickConnect/Authorize?{query}"));
        let h = token.map(|t| format!("MediaBrowser Token=\"{t}\""));
        async move {
            let mut rb = c.post(u);
            if let Some(h) = h {
                rb = rb.header("Authorization", h);
            }
            rb.send().await.unwrap()
        }
    };
    assert_eq!(authorize(None, format!("code={code}")).await.status(), 401);
    assert_eq!(
        authorize(Some("bad"), format!("code={code}"))
            .await
            .status(),
        401
    );
    assert_eq!(
        authorize(Some(&bob), format!("code={code}&userId={alice_id}"))
            .await
            .status(),
        403,
        "a non-admin cannot authorise for someone else"
    );
    assert_eq!(
        authorize(Some(&alice), "code=000000".into()).await.status(),
        404
    );
    assert_eq!(authorize(Some(&alice), String::new()).await.status(), 400);
    let resp = authorize(Some(&alice), format!("Code={code}")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!(true));
    assert_eq!(
        authorize(Some(&alice), format!("code={code}"))
            .await
            .status(),
        500,
        "already authorised"
    );

    // The token was minted at Authorize, for the initiating device.
    let devices = si.devices();
    let minted = devices.iter().find(|d| d.device_id == "dev-qc").unwrap();
    assert_eq!(minted.user_id, alice_id);
    assert_eq!(minted.client, "tv-app");
    assert_eq!(minted.device_name, "Living Room");
    let state: Value = connect(secret.clone()).await.json().await.unwrap();
    assert_eq!(state["Authenticated"], true);

    let r1: Value = redeem(&secret).await.json().await.unwrap();
    let r2: Value = redeem(&secret).await.json().await.unwrap();
    assert_eq!(r1["AccessToken"], minted.token);
    assert_eq!(
        r1["AccessToken"], r2["AccessToken"],
        "redeemable repeatedly"
    );
    assert_eq!(r1["User"]["Id"], alice_id);
    assert_eq!(r1["SessionInfo"]["DeviceId"], "dev-qc");
    assert_eq!(
        me_status(
            &si,
            &[("X-Emby-Token", r1["AccessToken"].as_str().unwrap())]
        )
        .await,
        200
    );
    assert_eq!(redeem("nope").await.status(), 404);
    let resp = c
        .post(url("/Users/AuthenticateWithQuickConnect"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // An admin may authorise for another user; the legacy GET Initiate still works on 10.11.
    let root = login(&si, "dev-root", "root", "root-pw").await["AccessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let init2: Value = c
        .get(url("/QuickConnect/Initiate"))
        .header(
            "Authorization",
            "MediaBrowser Client=\"tv-app\", Device=\"Den\", DeviceId=\"dev-qc2\", Version=\"3.1\"",
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let code2 = init2["Code"].as_str().unwrap();
    assert_eq!(
        authorize(Some(&root), format!("code={code2}&userId={bob_id}"))
            .await
            .status(),
        200
    );
    let r3: Value = redeem(init2["Secret"].as_str().unwrap())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r3["User"]["Id"], bob_id);
    assert_eq!(r3["User"]["Name"], "bob");
}

// ---------------------------------------------------------------- media

#[tokio::test]
async fn standin_playback_info_and_hls_playlists_carry_the_query() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-hls").await;
    let c = client();
    let item = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let info: Value = c
        .get(format!("{}/Items/{item}/PlaybackInfo", si.url()))
        .header("X-Emby-Token", &t)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let source = &info["MediaSources"][0];
    assert_eq!(source["Id"], item);
    assert_eq!(source["SupportsDirectPlay"], true);
    assert_eq!(source["SupportsTranscoding"], true);
    let psid = info["PlaySessionId"].as_str().unwrap();
    assert!(is_token(psid));
    let transcoding = source["TranscodingUrl"].as_str().unwrap();
    assert_eq!(
        transcoding,
        format!("/videos/{item}/master.m3u8?MediaSourceId={item}&PlaySessionId={psid}&ApiKey={t}")
    );
    let resp = c
        .post(format!("{}/Items/{item}/PlaybackInfo", si.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // master.m3u8 copies its query string verbatim, whichever carrier is in it.
    let resp = c
        .get(format!("{}{transcoding}", si.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.apple.mpegurl"
    );
    let master = resp.text().await.unwrap();
    let query = transcoding.split_once('?').unwrap().1;
    assert!(master.starts_with("#EXTM3U\n"), "{master}");
    assert!(
        master.contains(&format!("\nmain.m3u8?{query}\n")),
        "{master}"
    );
    let odd = format!("x=1&api_key={t}&Y=%41");
    let master = c
        .get(format!("{}/Videos/{item}/master.m3u8?{odd}", si.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(master.contains(&format!("\nmain.m3u8?{odd}\n")), "{master}");
    // Header credential, no query: the variant URL has none.
    let master = c
        .get(format!("{}/Videos/{item}/master.m3u8", si.url()))
        .header("X-Emby-Token", &t)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(master.contains("\nmain.m3u8\n"), "{master}");
    assert_eq!(
        status_with(&si, &format!("/Videos/{item}/master.m3u8"), &[]).await,
        401
    );
    assert_eq!(
        status_with(&si, &format!("/Videos/{item}/master.m3u8?ApiKey=bad"), &[]).await,
        401
    );

    let main = c
        .get(format!("{}/videos/{item}/main.m3u8?{query}", si.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        main.contains(&format!("\nhls1/main/0.ts?{query}\n")),
        "{main}"
    );
    assert!(
        main.contains(&format!("\nhls1/main/1.ts?{query}\n")),
        "{main}"
    );
    assert!(main.ends_with("#EXT-X-ENDLIST\n"));
    assert_eq!(
        status_with(&si, &format!("/videos/{item}/main.m3u8"), &[]).await,
        401
    );

    let seg = c
        .get(format!("{}/videos/{item}/hls1/main/0.ts?{query}", si.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(seg.status(), 200);
    assert_eq!(seg.headers()["content-type"], "video/mp2t");
    assert_eq!(
        seg.bytes().await.unwrap().len() as u64,
        standin::SEGMENT_LEN
    );
    assert_eq!(
        status_with(&si, &format!("/videos/{item}/hls1/main/0.ts"), &[]).await,
        401
    );
    // The legacy segment routes are anonymous.
    assert_eq!(
        status_with(&si, &format!("/Videos/{item}/hls/playlist/3.ts"), &[]).await,
        200
    );
    assert_eq!(
        status_with(&si, &format!("/Audio/{item}/hls/7/stream.mp3"), &[]).await,
        200
    );
    // Universal audio needs a token.
    assert_eq!(
        status_with(&si, &format!("/Audio/{item}/universal"), &[]).await,
        401
    );
    assert_eq!(
        status_with(&si, &format!("/Audio/{item}/universal?ApiKey={t}"), &[]).await,
        200
    );
}

#[tokio::test]
async fn standin_anonymous_media_ignores_an_invalid_token() {
    let (si, _) = start().await;
    let c = client();
    let item = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    for query in ["", "?ApiKey=invalid", "?Static=true&api_key=nope"] {
        let resp = c
            .get(format!("{}/Videos/{item}/stream{query}", si.url()))
            .header("X-Emby-Token", "also-invalid")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        assert_eq!(resp.headers()["accept-ranges"], "bytes");
        assert_eq!(resp.headers()["content-type"], "video/mp4");
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len() as u64, standin::STREAM_LEN);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern_byte(i as u64)));
    }
    let resp = c
        .get(format!("{}/Videos/{item}/stream.mkv?Static=true", si.url()))
        .header("Range", "bytes=1000-1099")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-type"], "video/x-matroska");
    assert_eq!(
        resp.headers()["content-range"],
        format!("bytes 1000-1099/{}", standin::STREAM_LEN).as_str()
    );
    let body = resp.bytes().await.unwrap();
    assert_eq!(
        body.to_vec(),
        (1000..1100).map(pattern_byte).collect::<Vec<_>>()
    );
    let resp = c
        .head(format!("{}/Audio/{item}/stream.flac", si.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/flac");
    assert_eq!(
        resp.headers()["content-length"],
        standin::STREAM_LEN.to_string().as_str()
    );
    let resp = c
        .get(format!("{}/Audio/{item}/stream", si.url()))
        .header("Range", "bytes=99999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);

    // Images and subtitles: anonymous too.
    for path in [
        format!("/Items/{item}/Images/Primary"),
        format!("/Items/{item}/Images/Backdrop/0?ApiKey=bad"),
    ] {
        let resp = c.get(format!("{}{path}", si.url())).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], "image/png");
        assert!(resp.bytes().await.unwrap().starts_with(b"\x89PNG"));
    }
    for path in [
        format!("/Videos/{item}/{item}/Subtitles/0/Stream.vtt"),
        format!("/Videos/{item}/{item}/Subtitles/2/0/Stream.srt?api_key=bad"),
    ] {
        let resp = c.get(format!("{}{path}", si.url())).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.text().await.unwrap().starts_with("WEBVTT"));
    }
}

#[tokio::test]
async fn standin_big_stream_is_lazy_and_counted() {
    let (si, _) = start().await;
    let resp = client()
        .get(format!("{}/Videos/BIG/stream?Static=true", si.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(standin::BIG_STREAM_LEN));
    assert_eq!(si.open_streams(), 1);
    let mut stream = resp.bytes_stream();
    let mut got = 0usize;
    while got < 1 << 20 {
        got += stream.next().await.unwrap().unwrap().len();
    }
    drop(stream);
    assert!(
        poll_until(WAIT, || async { si.open_streams() == 0 }).await,
        "the stream body outlived its client"
    );
}

// ---------------------------------------------------------------- routing and public routes

#[tokio::test]
async fn standin_public_routes_and_legacy_prefixes() {
    let (si, alice_id) = start().await;
    let c = client();
    let get = |path: &str| c.get(format!("{}{path}", si.url())).send();

    let info: Value = get("/System/Info/Public")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["Version"], "10.11.11");
    assert_eq!(info["ProductName"], "Jellyfin Server");
    assert_eq!(info["Id"], si.server_id());
    assert_eq!(info["StartupWizardCompleted"], true);
    assert_eq!(info["LocalAddress"], si.url());
    assert!(info["ServerName"].is_string());
    assert!(info["OperatingSystem"].is_string());
    // Python's client asks in lower case; the legacy prefixes are stripped, any case.
    for path in [
        "/system/info/public",
        "/emby/System/Info/Public",
        "/EMBY/system/info/public",
        "/mediabrowser/System/Info/Public",
        "/MediaBrowser/System/Info/Public/",
    ] {
        let v: Value = get(path).await.unwrap().json().await.unwrap();
        assert_eq!(v["Id"], si.server_id(), "{path}");
    }
    assert_eq!(
        get("/embyx/System/Info/Public").await.unwrap().status(),
        400
    );

    let ping = get("/System/Ping").await.unwrap();
    assert_eq!(
        ping.json::<Value>().await.unwrap(),
        json!("Jellyfin Server")
    );
    let ping = c
        .post(format!("{}/System/Ping", si.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 200);

    let users: Value = get("/Users/Public").await.unwrap().json().await.unwrap();
    assert_eq!(users[0]["Name"], USER);
    assert_eq!(users[0]["Id"], alice_id);
    assert_eq!(users[0]["HasPassword"], true);

    let branding: Value = get("/Branding/Configuration")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(branding.is_object());
    let css = get("/Branding/Css").await.unwrap();
    assert_eq!(css.status(), 200);
    assert_eq!(css.headers()["content-type"], "text/css");
    assert_eq!(get("/Branding/Css.css").await.unwrap().status(), 200);
    let health = get("/health").await.unwrap();
    assert_eq!(health.text().await.unwrap(), "Healthy");
    for path in ["/web/", "/web/index.html", "/emby/web/index.html"] {
        let page = get(path).await.unwrap();
        assert_eq!(page.status(), 200, "{path}");
        assert!(page.text().await.unwrap().contains("<html>"));
    }
    let root = get("/").await.unwrap();
    assert_eq!(root.status(), 302);
    assert_eq!(root.headers()["location"], "web/");
    assert_eq!(get("/Startup/Configuration").await.unwrap().status(), 200);
    let docs: Value = get("/api-docs/openapi.json")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(docs["openapi"].is_string());

    // Login through the prefix.
    let resp = c
        .post(format!("{}/emby/Users/AuthenticateByName", si.url()))
        .header("Authorization", mb("dev-emby", None))
        .json(&json!({"Username": USER, "Pw": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let t = resp.json::<Value>().await.unwrap()["AccessToken"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        status_with(&si, &format!("/mediabrowser/users/me?api_key={t}"), &[]).await,
        200
    );
    let resp = c
        .post(format!("{}/Emby/Sessions/Logout", si.url()))
        .header("X-Emby-Token", &t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(si.logged_out_tokens(), vec![t]);

    // Unknown paths 404; known paths with another method 405.
    assert_eq!(get("/Nope").await.unwrap().status(), 404);
    assert_eq!(
        get("/Users/AuthenticateByName").await.unwrap().status(),
        405
    );
    assert_eq!(get("/Sessions/Logout").await.unwrap().status(), 405);

    // Every request was recorded.
    let recorded = si.requests();
    assert!(recorded
        .iter()
        .any(|r| r.path_and_query == "/EMBY/system/info/public"));
    let login = recorded
        .iter()
        .find(|r| r.path_and_query == "/emby/Users/AuthenticateByName")
        .unwrap();
    assert_eq!(login.method, "POST");
    assert!(login.header("authorization").unwrap().contains("dev-emby"));
    assert!(String::from_utf8_lossy(&login.body).contains(PASSWORD));
}

#[tokio::test]
async fn standin_drop_closes_websockets_and_stops_accepting() {
    let (si, _) = start().await;
    let t = token_of(&si, "dev-drop").await;
    let addr = si.addr;
    let mut ws = open_ws(&si, &format!("/socket?ApiKey={t}"), &[])
        .await
        .unwrap();
    next_json(&mut ws).await;
    drop(si);
    // No close frame here: the connection just ends.
    let _ = wait_closed(&mut ws).await;
    let refused = poll_until(Duration::from_secs(2), || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(refused, "stand-in still accepting after drop");
}

// ---------------------------------------------------------------- real clients

pub(crate) fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs a client script through its two phases against `si`, logging the phase-1 token out
/// upstream in between (as a gateway's revocation would); returns both JSON lines.
async fn run_two_phase_client(si: &StandIn, program: &str, script: &str) -> (Value, Value) {
    let url = si.url();
    let logout_url = format!("{url}/Sessions/Logout");
    run_client_phases(&url, USER, PASSWORD, program, script, |phase1| async move {
        // Revocation upstream: the token logs itself out.
        let token = phase1["token"].as_str().unwrap_or_default().to_owned();
        let resp = client()
            .post(logout_url)
            .header("Authorization", format!("MediaBrowser Token=\"{token}\""))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "logout of {token}");
    })
    .await
}

/// Runs a client script's phase 1 against `base`, then `between` (which gets the phase-1
/// JSON), then phase 2; returns both JSON lines.
pub(crate) async fn run_client_phases<F, Fut>(
    base: &str,
    user: &str,
    password: &str,
    program: &str,
    script: &str,
    between: F,
) -> (Value, Value)
where
    F: FnOnce(Value) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    run_client_args(program, script, &[base, user, password], between).await
}

/// Runs `program tests/clients/<script> <args…>`: reads the phase-1 JSON line, runs `between`
/// (which gets it), writes one line to the script's stdin, reads the phase-2 JSON line and
/// expects the script to exit 0; returns both JSON lines.
pub(crate) async fn run_client_args<F, Fut>(
    program: &str,
    script: &str,
    args: &[&str],
    between: F,
) -> (Value, Value)
where
    F: FnOnce(Value) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = clients_dir();
    let mut child = tokio::process::Command::new(program)
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await;
        s
    });
    let timeout = Duration::from_secs(120);

    let first = tokio::time::timeout(timeout, lines.next_line()).await;
    let first = match first {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = child.kill().await;
            let err = stderr_task.await.unwrap_or_default();
            panic!("{script}: no phase-1 line ({other:?}); stderr:\n{err}");
        }
    };
    let phase1: Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("{script}: phase 1 is not JSON ({e}): {first}"));

    between(phase1.clone()).await;

    stdin.write_all(b"go\n").await.unwrap();
    stdin.flush().await.unwrap();
    drop(stdin);
    let second = match tokio::time::timeout(timeout, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = child.kill().await;
            let err = stderr_task.await.unwrap_or_default();
            panic!("{script}: no phase-2 line ({other:?}); stderr:\n{err}");
        }
    };
    let phase2: Value = serde_json::from_str(&second)
        .unwrap_or_else(|e| panic!("{script}: phase 2 is not JSON ({e}): {second}"));
    let status = tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap()
        .unwrap();
    let err = stderr_task.await.unwrap_or_default();
    assert!(
        status.success(),
        "{script} exited with {status}; stderr:\n{err}"
    );
    (phase1, phase2)
}

fn check_phases(si: &StandIn, user_id: &str, phase1: &Value, phase2: &Value) {
    assert_eq!(phase1["phase"], 1);
    let token = phase1["token"].as_str().unwrap();
    assert!(is_token(token), "{token}");
    assert_eq!(phase1["user_id"], user_id);
    assert_eq!(phase1["server_id"], si.server_id());
    assert_eq!(phase1["me"]["Id"], user_id);
    assert_eq!(phase1["me"]["Name"], USER);
    assert_eq!(phase1["socket_open"], true);
    assert_eq!(phase1["socket_echo"], true);
    assert_eq!(phase1["range_status"], 206);
    assert_eq!(phase1["range_len"], 100);
    assert_eq!(phase1["range_ok"], true);

    assert_eq!(phase2["phase"], 2);
    assert_eq!(phase2["me_status"], 401);
    assert_eq!(phase2["socket_closed"], true);
    assert_eq!(si.logged_out_tokens(), vec![token.to_owned()]);
    assert!(si.live_tokens().is_empty());
}

#[tokio::test]
async fn standin_python_client_two_phases() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import jellyfin_apiclient_python, websocket"])
        .output()
        .expect("python3 must be on PATH");
    assert!(
        probe.status.success(),
        "jellyfin-apiclient-python is not installed: run tests/clients/install.sh"
    );
    let (si, user_id) = start().await;
    let (p1, p2) = run_two_phase_client(&si, "python3", "jf_python.py").await;
    check_phases(&si, &user_id, &p1, &p2);

    // What the client really sent.
    let reqs = si.requests();
    assert!(reqs
        .iter()
        .any(|r| r.path_and_query == "/system/info/public"));
    let login = reqs
        .iter()
        .find(|r| r.path_and_query == "/Users/AuthenticateByName")
        .unwrap();
    assert_eq!(
        login.header("authorization"),
        Some("MediaBrowser Client=\"portcullis-test\", Device=\"ci-box\", DeviceId=\"dev-py-1\", Version=\"0.1.0\"")
    );
    let body: Value = serde_json::from_slice(&login.body).unwrap();
    assert_eq!(body["username"], USER);
    let socket = reqs
        .iter()
        .find(|r| r.header("upgrade") == Some("websocket"))
        .unwrap();
    assert_eq!(socket.path_and_query, "/socket");
    assert!(socket
        .header("authorization")
        .unwrap()
        .ends_with(&format!("Token=\"{}\"", p1["token"].as_str().unwrap())));
}

#[tokio::test]
async fn standin_typescript_sdk_two_phases() {
    let sdk = clients_dir().join("node_modules/@jellyfin/sdk/package.json");
    let mut version = String::new();
    std::fs::File::open(&sdk)
        .unwrap_or_else(|_| panic!("@jellyfin/sdk is not installed: run tests/clients/install.sh"))
        .read_to_string(&mut version)
        .unwrap();
    let (si, user_id) = start().await;
    let (p1, p2) = run_two_phase_client(&si, "node", "jf_sdk.mjs").await;
    check_phases(&si, &user_id, &p1, &p2);

    let reqs = si.requests();
    let login = reqs
        .iter()
        .find(|r| r.path_and_query == "/Users/AuthenticateByName")
        .unwrap();
    assert_eq!(
        login.header("authorization"),
        Some("MediaBrowser Client=\"portcullis-test\", Device=\"ci%20box\", DeviceId=\"dev-sdk-1\", Version=\"0.1.0\", Token=\"\"")
    );
    let socket = reqs
        .iter()
        .find(|r| r.header("upgrade") == Some("websocket"))
        .unwrap();
    assert_eq!(
        socket.path_and_query,
        format!("/socket?ApiKey={}", p1["token"].as_str().unwrap())
    );
}
