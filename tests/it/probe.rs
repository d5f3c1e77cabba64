//! A first run that explains itself: the start-up probe's plain log line for a route whose
//! upstream does not answer, `/readyz`'s `upstreams` detail before and after the upstream starts
//! listening, and the 502 answer (styled page or JSON) that names the route and address to a
//! signed-in admin and to nobody else.

use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpSocket;

use crate::harness::{client, poll_until, Gateway};
use crate::upstream::Upstream;

const PW: &str = "probe-password-1234";

/// A loopback port that is bound (so no other process takes it) but not listening, so a
/// connection to it is refused until the test calls `listen`.
fn reserved_port() -> (TcpSocket, std::net::SocketAddr) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    let resp = client()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn a_route_nobody_answers_is_named_at_start_and_on_readyz_until_it_listens() {
    let (socket, addr) = reserved_port();
    let gw = Gateway::builder(&addr.to_string())
        .user("alice", PW)
        .route_keys("kind = \"jellyfin\"")
        .start()
        .await;
    let sentence = format!(
        "route `media`: nothing answers at {addr} — is Jellyfin running, and bound to that address?"
    );
    let log = gw.log_containing(&sentence).await;
    let line = log.lines().find(|l| l.contains(&sentence)).unwrap();
    assert!(line.contains("WARN"), "not a warning: {line}");

    // The gateway stays ready (its own pages still work); the detail says what is wrong. (A
    // test's connection can succeed a moment before the gateway notices its listener serving.)
    let last = std::sync::Mutex::new(Value::Null);
    let ready = poll_until(Duration::from_secs(2), || async {
        let (status, body) = readyz(&gw).await;
        *last.lock().unwrap() = body;
        status == 200
    })
    .await;
    let body = last.into_inner().unwrap();
    assert!(ready, "{body}");
    let upstreams = body["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 1, "{body}");
    assert_eq!(upstreams[0]["route"], "media");
    assert_eq!(upstreams[0]["upstream"], addr.to_string());
    assert_eq!(upstreams[0]["kind"], "jellyfin");
    assert_eq!(upstreams[0]["state"], "nothing answers");
    assert_eq!(upstreams[0]["message"], sentence.as_str());
    gw.metrics_with(&[r#"portcullis_upstream_up{route="media"} 0"#])
        .await;
    let login = client()
        .get(gw.url("/_portcullis/login"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);

    // The upstream starts listening on that address: the next /readyz finds it, and for a
    // Jellyfin route asks it who it is.
    let up = Upstream::start_on(socket.listen(64).unwrap());
    let (status, body) = readyz(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["upstreams"][0]["state"], "ok", "{body}");
    assert!(body["upstreams"][0]["message"].is_null(), "{body}");
    assert!(
        up.requests()
            .iter()
            .any(|r| r.method == "GET" && r.path_and_query == "/System/Info/Public"),
        "the probe did not ask the server who it is: {:?}",
        up.requests()
    );
    gw.metrics_with(&[r#"portcullis_upstream_up{route="media"} 1"#])
        .await;
}

#[tokio::test]
async fn a_route_that_answers_at_start_is_logged_as_answering() {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url()).user("alice", PW).start().await;
    let addr = up.url().trim_start_matches("http://").to_string();
    gw.log_containing(&format!("route `media`: the upstream answers at {addr}"))
        .await;
    assert!(!gw.log().contains("nothing answers"), "{}", gw.log());
    // The start probe only connects: the upstream received no request from it.
    assert_eq!(up.count(), 0, "{:?}", up.requests());
}

/// The `<style>` block of a page.
fn style_of(html: &str) -> &str {
    let start = html.find("<style>").expect("a style block");
    let end = html[start..]
        .find("</style>")
        .expect("a closed style block");
    &html[start..start + end]
}

/// Everything a response shows a client: status line, headers and body.
async fn seen(resp: reqwest::Response) -> (u16, String, String) {
    let status = resp.status().as_u16();
    let headers = format!("{:?}", resp.headers());
    (status, headers, resp.text().await.unwrap())
}

#[tokio::test]
async fn upstream_failure_names_route_and_address_to_admins_only() {
    // Held, not listening: every connection is refused, and no other process takes the port.
    let (_socket, addr) = reserved_port();
    let port = addr.port().to_string();
    let gw = Gateway::builder(&addr.to_string())
        .admin("root", PW)
        .user("alice", PW)
        .route_keys("public_paths = [\"/pub\"]")
        .start()
        .await;
    let admin = gw.login("root", PW).await.token;
    let alice = gw.login("alice", PW).await.token;
    let login_page = client()
        .get(gw.url("/_portcullis/login"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let html = |token: &str| {
        client()
            .get(gw.url("/library"))
            .header("Accept", "text/html,application/xhtml+xml")
            .bearer_auth(token)
    };

    // An admin's browser: the gateway's own styled page, with route, address and the cause.
    let resp = html(&admin).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["content-type"],
        "text/html; charset=utf-8",
        "{resp:?}"
    );
    assert!(resp.headers().contains_key("content-security-policy"));
    let page = resp.text().await.unwrap();
    assert_eq!(
        style_of(&page),
        style_of(&login_page),
        "not the gateway's style"
    );
    assert!(page.contains("Bad gateway"), "{page}");
    assert!(page.contains("For administrators"), "{page}");
    assert!(
        page.contains(&format!(
            "Route <code>media</code>: nothing answers (connection refused) at <code>{addr}</code>."
        )),
        "{page}"
    );
    assert!(
        page.contains("Is the upstream running, and bound to that address?"),
        "{page}"
    );

    // A plain user's browser: the same styled page, the friendly message, nothing about where.
    let (status, headers, user_page) = seen(html(&alice).send().await.unwrap()).await;
    assert_eq!(status, 502);
    assert_eq!(style_of(&user_page), style_of(&login_page));
    assert!(
        user_page.contains("The media server behind this gateway is not answering."),
        "{user_page}"
    );
    for secret in [
        port.as_str(),
        "For administrators",
        "<code>media</code>",
        "refused",
    ] {
        assert!(
            !user_page.contains(secret),
            "{secret:?} shown to a user: {user_page}"
        );
        assert!(
            !headers.contains(secret),
            "{secret:?} in a header: {headers}"
        );
    }
    // The admin's page is the user's page plus the admin section, nothing else differs.
    let section = page.find("<section class=\"detail\">").unwrap();
    let section_end = page[section..].find("</section>").unwrap() + "</section>".len();
    let without = format!("{}{}", &page[..section], &page[section + section_end..]);
    assert_eq!(without, user_page);

    // Anonymous on a public path: also reaches the upstream, also the page without detail.
    let (status, headers, anon_page) = seen(
        client()
            .get(gw.url("/pub/x"))
            .header("Accept", "text/html")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(anon_page, user_page);
    assert!(!headers.contains(&port), "{headers}");
    // Anonymous elsewhere: refused before any upstream, so its state is not revealed.
    let (status, headers, body) =
        seen(client().get(gw.url("/library")).send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert!(!body.contains(&port) && !headers.contains(&port), "{body}");

    // API clients (no HTML in Accept, as the media apps send): JSON, detail for admins only.
    let api = |token: &str| {
        client()
            .get(gw.url("/Items"))
            .header("Accept", "application/json")
            .bearer_auth(token)
    };
    let resp = api(&alice).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let headers = format!("{:?}", resp.headers());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "error": "bad_gateway",
            "message": "The media server behind this gateway is not answering. Try again shortly.",
        })
    );
    assert!(!headers.contains(&port), "{headers}");
    let body: Value = api(&admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway");
    assert_eq!(body["route"], "media");
    assert_eq!(body["upstream"], addr.to_string());
    assert_eq!(body["problem"], "nothing answers (connection refused)");

    // Every one of these was a request the upstream could not serve.
    gw.metrics_with(&[
        r#"portcullis_requests_total{decision="error",reason="upstream_unavailable",route="media"} 5"#,
    ])
    .await;
}

#[tokio::test]
async fn readyz_probes_every_route_at_once_each_within_the_timeout() {
    // Three Jellyfin routes whose "server" accepts connections but never answers (the kernel
    // completes the handshake; nobody reads), and one route whose upstream refuses. Probed one
    // after another the silent ones alone would take three probe timeouts (6 s).
    let up = Upstream::start().await;
    let silent: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let (_down, down) = reserved_port();
    let mut extra = String::new();
    for (i, l) in silent.iter().enumerate() {
        extra.push_str(&format!(
            "[[route]]\nname = \"silent{i}\"\npath_prefix = \"/silent{i}\"\nkind = \"jellyfin\"\n\
             upstream = \"{}\"\n\n",
            l.local_addr().unwrap()
        ));
    }
    extra.push_str(&format!(
        "[[route]]\nname = \"down\"\npath_prefix = \"/down\"\nupstream = \"{down}\"\n\n"
    ));
    let gw = Gateway::builder(&up.url())
        .user("alice", PW)
        .extra_toml(&extra)
        .start()
        .await;
    gw.log_containing(&format!(
        "route `down`: nothing answers at {down} — is the upstream running, and bound to that \
         address?"
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, body) = readyz(&gw).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    assert_eq!(status, 200, "{body}");
    let states: Vec<(String, String)> = body["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["route"].as_str().unwrap().to_string(),
                u["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want = vec![("media".to_string(), "ok".to_string())];
    for i in 0..3 {
        want.push((
            format!("silent{i}"),
            format!(
                "accepts connections but gives no HTTP answer to GET /silent{i}/System/Info/Public"
            ),
        ));
    }
    want.push(("down".to_string(), "nothing answers".to_string()));
    assert_eq!(states, want);
    assert!(
        body["upstreams"][1]["message"]
            .as_str()
            .unwrap()
            .contains("is that Jellyfin's HTTP port"),
        "{body}"
    );
    assert!(
        poll_until(Duration::from_secs(5), || async {
            let m = client()
                .get(format!("{}/metrics", gw.admin))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            m.contains(r#"portcullis_upstream_up{route="media"} 1"#)
                && m.contains(r#"portcullis_upstream_up{route="silent0"} 0"#)
                && m.contains(r#"portcullis_upstream_up{route="down"} 0"#)
        })
        .await
    );
}
