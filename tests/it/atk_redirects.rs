//! Where a login may send the browser, and who may post the login form (checklist §3:
//! ATK-38, ATK-40, ATK-42). The return path is a same-origin path or `/`; a script in it is
//! never reflected unescaped; a login posted from another site sets no cookie.

use crate::harness::{client, Gateway};
use crate::upstream::Upstream;

const ALICE_PW: &str = "alice-password-1234";

/// A named case: the headers sent with the login and the status expected.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, u16);

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start().await;
    let gw = Gateway::builder(&up.url())
        .user("alice", ALICE_PW)
        .start()
        .await;
    (up, gw)
}

/// Logs alice in through the form with return path `rd`; the `Location` of the answer.
async fn login_returning_to(gw: &Gateway, rd: &str) -> String {
    let resp = client()
        .post(gw.url("/_portcullis/login"))
        .header("Origin", gw.base.clone())
        .form(&[("username", "alice"), ("password", ALICE_PW), ("rd", rd)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "{rd}");
    assert!(
        resp.headers().get("set-cookie").is_some(),
        "{rd}: no session"
    );
    resp.headers()["location"].to_str().unwrap().to_string()
}

#[tokio::test]
async fn atk38_and_atk40_return_paths_never_leave_the_origin_or_carry_script() {
    let (_up, gw) = setup().await;
    let hostile = [
        // ATK-38: absolute, scheme-relative and authority tricks.
        "https://evil.test/",
        "//evil.test",
        "///evil.test",
        "////evil.test/",
        "https:evil.test",
        "https:/evil.test",
        "https:///evil.test",
        "HTTPS://EVIL.TEST",
        "http://gw.test.evil.test/",
        "https://gw.test@evil.test/",
        "https://evil.test#@gw.test/",
        "https://evil.test\\@gw.test/",
        "https://gw.test:443.evil.test/",
        "http://127.0.0.1/",
        "/\\evil.test",
        "/%2F%2Fevil.test",
        "/%5Cevil.test",
        // ATK-40: script schemes and reflection.
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "java%0Ascript:alert(1)",
        "%6A%61%76%61script:alert(1)",
        "%20javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "vbscript:msgbox(1)",
        "/\"><script>alert(1)</script>",
    ];
    for rd in hostile {
        assert_eq!(login_returning_to(&gw, rd).await, "/", "{rd}");
    }
    // A same-origin path with a query is kept.
    assert_eq!(
        login_returning_to(&gw, "/web/index.html?x=1").await,
        "/web/index.html?x=1"
    );
}

#[tokio::test]
async fn atk40_the_login_page_reflects_the_return_path_escaped_under_a_strict_policy() {
    let (_up, gw) = setup().await;
    let resp = client()
        .get(gw.url("/_portcullis/login?rd=%2F%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    // `default-src 'none'`, and scripts only from the gateway itself (its passkey script):
    // no inline script runs, so a reflected `<script>` could not either.
    for directive in [
        "default-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    let script_src = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("script-src"));
    assert_eq!(script_src, Some("script-src 'self'"), "{csp}");
    assert_eq!(resp.headers()["referrer-policy"], "same-origin");
    let page = resp.text().await.unwrap();
    assert!(!page.contains("<script>alert(1)"), "reflected unescaped");
}

#[tokio::test]
async fn atk42_a_login_posted_from_another_site_is_refused_without_a_cookie() {
    let (_up, gw) = setup().await;
    let evil_referer = "https://evil.test/page".to_string();
    let own_referer = format!("{}/_portcullis/login", gw.base);
    let cases: [Case; 6] = [
        (
            "foreign Origin",
            vec![("origin", "https://evil.test".into())],
            403,
        ),
        ("Origin null", vec![("origin", "null".into())], 403),
        (
            "cross-site fetch",
            vec![("sec-fetch-site", "cross-site".into())],
            403,
        ),
        (
            "no Origin, foreign Referer",
            vec![("referer", evil_referer)],
            403,
        ),
        (
            "no Origin, own Referer",
            vec![("referer", own_referer)],
            303,
        ),
        (
            "same-origin fetch",
            vec![("sec-fetch-site", "same-origin".into())],
            303,
        ),
    ];
    for (name, headers, want) in cases {
        let mut req = client()
            .post(gw.url("/_portcullis/login"))
            .form(&[("username", "alice"), ("password", ALICE_PW)]);
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), want, "{name}");
        assert_eq!(
            resp.headers().get("set-cookie").is_some(),
            want == 303,
            "{name}: cookie"
        );
    }
}
