//! Paths on a Jellyfin route (checklist §3: ATK-25, ATK-27, ATK-29, ATK-30), sent as raw bytes
//! because client libraries resolve dot segments before sending. The gateway judges one
//! canonical path; what it cannot read one way only is refused, and a refused request never
//! reaches Jellyfin.

use crate::harness::{client, raw_request, status_of, Gateway};
use crate::jellyfin::{mb, PW};
use crate::standin::StandIn;

/// Sends one request as raw bytes and returns the status of the answer.
async fn raw(gw: &Gateway, method: &str, path: &str, headers: &str) -> u16 {
    let body = if method == "POST" {
        "{\"Username\":\"alice\",\"Pw\":\"wrong\"}"
    } else {
        ""
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: media.test\r\nConnection: close\r\n{headers}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    status_of(&raw_request(&format!("127.0.0.1:{}", gw.port), req.as_bytes()).await)
}

async fn setup(media: &str) -> (StandIn, Gateway) {
    let jf = StandIn::start().await;
    jf.add_user("alice", PW, false);
    let gw = Gateway::builder(&jf.url())
        .user("alice", PW)
        .route_keys(&format!("kind = \"jellyfin\"\nmedia = {{ {media} }}"))
        .start()
        .await;
    (jf, gw)
}

/// Asserts each `(method, path, status)` and that none of them reached Jellyfin.
async fn refused(gw: &Gateway, jf: &StandIn, cases: &[(&str, &str, u16)]) {
    let before = jf.requests().len();
    for (method, path, want) in cases {
        assert_eq!(raw(gw, method, path, "").await, *want, "{method} {path}");
    }
    let reached: Vec<String> = jf.requests()[before..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path_and_query))
        .collect();
    assert!(reached.is_empty(), "reached Jellyfin: {reached:?}");
}

#[tokio::test]
async fn atk25_dot_segments_through_a_public_prefix_are_refused() {
    let (jf, gw) = setup("").await;
    refused(
        &gw,
        &jf,
        &[
            ("GET", "/web/../Users/Me", 400),
            ("GET", "/web/%2e%2e/Users/Me", 400),
            ("GET", "/web/%2E%2E/Users/Me", 400),
            ("GET", "/web/.%2e/Users/Me", 400),
            ("GET", "/web/%2e./Users/Me", 400),
            ("GET", "/web/./../Users/Me", 400),
            ("GET", "/System/Info/Public/../../Users/Me", 400),
            ("GET", "/web/%252e%252e/Users/Me", 400),
            ("GET", "/web/..%2fUsers/Me", 400),
            ("GET", "/web/..%5cUsers/Me", 400),
            ("GET", "/web/..\\Users/Me", 400),
            ("GET", "/web;/../Users/Me", 400),
        ],
    )
    .await;
    gw.metrics_with(&["reason=\"bad_path\""]).await;
}

#[tokio::test]
async fn atk27_empty_segments_are_refused_never_public() {
    let (jf, gw) = setup("").await;
    refused(
        &gw,
        &jf,
        &[
            ("GET", "//Users/Me", 400),
            ("GET", "/web//../Users/Me", 400),
            ("GET", "/Users//Me", 400),
            ("GET", "/./Users/Me", 400),
            ("GET", "///System/Info/Public", 400),
        ],
    )
    .await;
    // The canonical spelling of the public route still answers.
    assert_eq!(raw(&gw, "GET", "/System/Info/Public", "").await, 200);
}

#[tokio::test]
async fn atk29_case_variants_meet_the_same_rules() {
    // With password logins turned off, every spelling of the login route is answered by the
    // gateway's own handler (403) and none reaches Jellyfin.
    let (jf, gw) = setup("password_login = \"deny\"").await;
    refused(
        &gw,
        &jf,
        &[
            ("POST", "/USERS/AUTHENTICATEBYNAME", 403),
            ("POST", "/users/authenticatebyname", 403),
            ("POST", "/Users/AuthenticateByName", 403),
            ("GET", "/uSeRs/mE", 401),
            ("GET", "/STARTUP/CONFIGURATION", 403),
            ("GET", "/startup/user", 403),
            ("GET", "/API-DOCS/openapi.json", 403),
            ("GET", "/api-docs/swagger/index.html", 403),
        ],
    )
    .await;
    assert_eq!(raw(&gw, "GET", "/SYSTEM/INFO/PUBLIC", "").await, 200);
}

#[tokio::test]
async fn atk29_every_spelling_of_the_login_counts_toward_one_throttle() {
    let (_jf, gw) = setup("password_login = \"allow\"").await;
    let mut statuses = Vec::new();
    for path in [
        "/USERS/AUTHENTICATEBYNAME",
        "/users/authenticatebyname",
        "/Users/AuthenticateByName",
        "/uSeRs/AuThEnTiCaTeByNaMe",
        "/emby/Users/AuthenticateByName",
    ] {
        let auth = format!("Authorization: {}\r\n", mb("brute", None));
        statuses.push(raw(&gw, "POST", path, &auth).await);
    }
    // Three free failures, then alice's account makes the next attempt wait, whatever the
    // spelling (auth::throttle::FREE_FAILURES).
    assert_eq!(statuses[..3], [401, 401, 401], "{statuses:?}");
    assert_eq!(statuses[3..], [429, 429], "{statuses:?}");
}

#[tokio::test]
async fn atk30_emby_and_mediabrowser_prefixes_get_the_unprefixed_decisions() {
    let (jf, gw) = setup("password_login = \"deny\"").await;
    refused(
        &gw,
        &jf,
        &[
            ("POST", "/emby/Users/AuthenticateByName", 403),
            ("POST", "/MediaBrowser/Users/AuthenticateByName", 403),
            ("GET", "/EMBY/Users/Me", 401),
            ("GET", "/emby/Sessions", 401),
            ("GET", "/mediabrowser/Items?Limit=1", 401),
            ("GET", "/emby/Startup/Configuration", 403),
        ],
    )
    .await;
    assert_eq!(raw(&gw, "GET", "/emby/System/Info/Public", "").await, 200);
    let r = client()
        .get(gw.url("/EMBY/system/info/PUBLIC"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
