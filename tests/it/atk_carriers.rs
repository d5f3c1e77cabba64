//! Jellyfin's token carriers under attack (checklist §3: ATK-19, ATK-20, ATK-22, ATK-23,
//! ATK-24): empty tokens that fall through to another carrier, a revoked token hidden in
//! another spelling, unknown tokens on the routes Jellyfin itself leaves open, grants that do
//! not travel to another address, and client fields used as an injection vector. Nothing
//! refused reaches Jellyfin.

use std::net::IpAddr;
use std::time::Duration;

use crate::harness::{client, poll_until, Gateway};
use crate::jellyfin::{mb, setup, token_of};
use crate::standin::StandIn;

/// Bob's token, then bob signed out: a token the gateway knows as revoked. Returns once the
/// gateway's own logout of it has reached Jellyfin, so that nothing later is mistaken for it.
pub(crate) async fn revoked_token(gw: &Gateway, jf: &StandIn) -> String {
    let t = token_of(gw, "bob", "bob-old-phone").await;
    gw.cli_ok(&["signout", "--user", "bob"]);
    assert!(gw.refused_media(&t).await);
    let logged_out = poll_until(Duration::from_secs(5), || async {
        jf.logged_out_tokens().contains(&t)
    })
    .await;
    assert!(
        logged_out,
        "the gateway never logged the revoked token out of Jellyfin"
    );
    t
}

async fn status(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = client().get(gw.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap().status().as_u16()
}

/// Asserts that nothing after `before` reached the stand-in.
fn nothing_reached(jf: &StandIn, before: usize) {
    let reached: Vec<String> = jf.requests()[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert!(reached.is_empty(), "reached Jellyfin: {reached:?}");
}

/// `MediaBrowser` parameters with an explicit `Token` value, written as given.
fn mb_raw(token_part: &str) -> String {
    format!(
        "MediaBrowser Client=\"Jellyfin Android\", Device=\"Pixel 7\", DeviceId=\"d-raw\", \
         Version=\"2.6.1\", {token_part}"
    )
}

#[tokio::test]
async fn atk19_an_empty_token_falls_through_exactly_as_jellyfin_reads_it() {
    let (jf, gw) = setup("").await;
    let r = revoked_token(&gw, &jf).await;
    let before = jf.requests().len();
    let empty = mb_raw("Token=\"\"");
    // (a) the empty header token falls through to the query's revoked one; (b) alone it is no
    // credential at all.
    let with_query = format!("/Users/Me?ApiKey={r}");
    assert_eq!(
        status(&gw, &with_query, &[("authorization", &empty)]).await,
        401
    );
    assert_eq!(
        status(&gw, "/Users/Me", &[("authorization", &empty)]).await,
        401
    );
    nothing_reached(&jf, before);
    // (c) the logged-out shape of the TypeScript SDK still reaches the public routes.
    assert_eq!(
        status(&gw, "/System/Info/Public", &[("authorization", &empty)]).await,
        200
    );
}

#[tokio::test]
async fn atk20_a_revoked_token_cannot_hide_in_another_spelling() {
    let (jf, gw) = setup("").await;
    let r = revoked_token(&gw, &jf).await;
    let before = jf.requests().len();
    let percent: String = r.bytes().map(|b| format!("%{b:02x}")).collect();
    let spellings = [
        ("percent-encoded", mb_raw(&format!("Token=\"{percent}\""))),
        ("unquoted", mb_raw(&format!("Token={r}"))),
        (
            "upper-case scheme",
            mb_raw(&format!("Token=\"{r}\"")).replacen("MediaBrowser", "MEDIABROWSER", 1),
        ),
        (
            "lower-case scheme",
            mb_raw(&format!("Token=\"{r}\"")).replacen("MediaBrowser", "mediabrowser", 1),
        ),
        ("Emby scheme", format!("Emby Token=\"{r}\"")),
        // Another token: unknown, so refused too.
        (
            "upper-cased token",
            mb_raw(&format!("Token=\"{}\"", r.to_uppercase())),
        ),
        ("space before the quote", mb_raw(&format!("Token= \"{r}\""))),
    ];
    for (name, value) in &spellings {
        assert_eq!(
            status(&gw, "/Users/Me", &[("authorization", value)]).await,
            401,
            "{name}"
        );
        assert_eq!(
            status(&gw, "/Users/Me", &[("x-emby-authorization", value)]).await,
            401,
            "{name} in X-Emby-Authorization"
        );
    }
    nothing_reached(&jf, before);
}

#[tokio::test]
async fn atk22_unknown_and_revoked_tokens_are_refused_on_the_routes_jellyfin_leaves_open() {
    let (jf, gw) = setup("").await;
    let r = revoked_token(&gw, &jf).await;
    let u = "00112233445566778899aabbccddeeff";
    let item = "0123456789abcdef0123456789abcdef";
    let before = jf.requests().len();
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            format!("/Videos/{item}/stream?static=true&mediaSourceId={item}&ApiKey={u}"),
            vec![],
        ),
        (
            format!("/Items/{item}/Images/Primary?maxWidth=300"),
            vec![("x-emby-token", u)],
        ),
        (format!("/Audio/{item}/stream.mp3?api_key={u}"), vec![]),
        (
            format!("/Videos/{item}/{item}/Subtitles/0/Stream.vtt?ApiKey={r}"),
            vec![],
        ),
        (
            format!("/Items/{item}/Images/Backdrop/0"),
            vec![("x-emby-token", &r)],
        ),
        (format!("/videos/{item}/hls1/main/7.ts?ApiKey={r}"), vec![]),
    ];
    for (path, headers) in &cases {
        assert_eq!(status(&gw, path, headers).await, 401, "{path}");
    }
    nothing_reached(&jf, before);
}

#[tokio::test]
async fn atk23_credential_less_media_needs_a_grant_from_this_address() {
    let (jf, gw) = setup("").await;
    let tv = token_of(&gw, "alice", "tv-1").await;
    let item = "0123456789abcdef0123456789abcdef";
    let segment = format!("/Videos/{item}/hls/p/0.ts");
    let stream = format!("/Videos/{item}/stream.mkv?Static=true&mediaSourceId={item}");
    let before = jf.requests().len();
    // (a) without a grant: no stream, no HLS segment.
    assert_eq!(status(&gw, &stream, &[]).await, 401);
    assert_eq!(status(&gw, &segment, &[]).await, 401);
    nothing_reached(&jf, before);
    // (b) alice's app asks for playback info from 127.0.0.1 …
    let resp = client()
        .post(gw.url(&format!("/Items/{item}/PlaybackInfo")))
        .header("Authorization", mb("tv-1", Some(&tv)))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(status(&gw, &stream, &[("range", "bytes=0-9")]).await, 206);
    // (c) … which grants nothing to another address.
    let elsewhere = reqwest::Client::builder()
        .local_address(IpAddr::from([127, 0, 0, 7]))
        .build()
        .unwrap();
    let resp = elsewhere.get(gw.url(&stream)).send().await.unwrap();
    assert_eq!(resp.status(), 401, "a grant travelled to another address");
}

#[tokio::test]
async fn atk24_client_fields_cannot_carry_paths_or_line_breaks() {
    let (jf, gw) = setup("").await;
    let a = token_of(&gw, "alice", "phone-a").await;
    let before = jf.requests().len();
    let hostile = format!(
        "MediaBrowser Client=\"../../../../config/x\", Device=\"a%0D%0Ab\", DeviceId=\"{}\", \
         Version=\"1/../../\", Token=\"{a}\"",
        "A".repeat(1000)
    );
    assert_eq!(
        status(&gw, "/Users/Me", &[("authorization", &hostile)]).await,
        400
    );
    let resp = client()
        .post(gw.url("/ClientLog/Document"))
        .header("authorization", &hostile)
        .body("log text")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Each field alone is refused as well.
    for field in [
        "Client=\"../../x\"",
        "Device=\"a%0D%0Ab\"",
        &format!("DeviceId=\"{}\"", "A".repeat(1000)),
        "Version=\"1/../../\"",
    ] {
        let value = format!("MediaBrowser {field}, Token=\"{a}\"");
        assert_eq!(
            status(&gw, "/Users/Me", &[("authorization", &value)]).await,
            400,
            "{field}"
        );
    }
    nothing_reached(&jf, before);
    gw.metrics_with(&["reason=\"bad_client_field\""]).await;
}
