//! The session cookie: its name, its one constructor and its one destroyer, and the helpers that
//! find it in a request or strip it before forwarding. With an https public URL the cookie is
//! `__Host-portcullis` (Secure, Path=/, no Domain); over plain http it is `portcullis` without
//! Secure, and the gateway warns at start.

use http::HeaderMap;

pub const SECURE_NAME: &str = "__Host-portcullis";
pub const PLAIN_NAME: &str = "portcullis";
/// The short-lived cookie of a login that still owes a step (second factor, new password).
pub const SECURE_PENDING_NAME: &str = "__Host-portcullis-pending";
pub const PLAIN_PENDING_NAME: &str = "portcullis-pending";

/// The cookie name for a deployment.
pub fn name(secure: bool) -> &'static str {
    if secure {
        SECURE_NAME
    } else {
        PLAIN_NAME
    }
}

/// The cookie that binds a single sign-on attempt (state, nonce, PKCE verifier) to the browser
/// that started it. SameSite=Lax: the provider sends the browser back with a top-level GET.
pub const SECURE_FLOW_NAME: &str = "__Host-portcullis-oidc";
pub const PLAIN_FLOW_NAME: &str = "portcullis-oidc";

/// The single sign-on flow cookie name for a deployment.
pub fn flow_name(secure: bool) -> &'static str {
    if secure {
        SECURE_FLOW_NAME
    } else {
        PLAIN_FLOW_NAME
    }
}

/// `Set-Cookie` value for a single sign-on attempt, valid `max_age_s` seconds.
pub fn flow(token: &str, secure: bool, max_age_s: i64) -> String {
    let mut c = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_s}",
        flow_name(secure)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// `Set-Cookie` value that removes the single sign-on flow cookie.
pub fn clear_flow(secure: bool) -> String {
    let mut c = format!(
        "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0",
        flow_name(secure)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// The pending-login cookie name for a deployment.
pub fn pending_name(secure: bool) -> &'static str {
    if secure {
        SECURE_PENDING_NAME
    } else {
        PLAIN_PENDING_NAME
    }
}

/// `Set-Cookie` value for a pending login (Strict: it is only ever used on our own forms).
pub fn pending(token: &str, secure: bool, max_age_s: i64) -> String {
    let mut c = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}",
        pending_name(secure)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// `Set-Cookie` value that removes the pending-login cookie.
pub fn clear_pending(secure: bool) -> String {
    let mut c = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        pending_name(secure)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// `Set-Cookie` value that stores a session token for `max_age_s` seconds.
pub fn session(token: &str, secure: bool, max_age_s: i64) -> String {
    let mut c = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_s}",
        name(secure)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// `Set-Cookie` value that removes the session cookie.
pub fn clear(secure: bool) -> String {
    let mut c = format!(
        "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0",
        name(secure)
    );
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// The value of the named cookie in the request's `Cookie` headers; the last one wins.
pub fn find<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = None;
    for value in headers.get_all(http::header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=') {
                if k == name && !v.is_empty() {
                    found = Some(v);
                }
            }
        }
    }
    found
}

/// The `Cookie` header value without any of the gateway's cookies; `None` if nothing remains.
pub fn without_gateway_cookies(value: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(value);
    let kept: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|pair| {
            let n = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty()
                && ![
                    SECURE_NAME,
                    PLAIN_NAME,
                    SECURE_PENDING_NAME,
                    PLAIN_PENDING_NAME,
                    SECURE_FLOW_NAME,
                    PLAIN_FLOW_NAME,
                ]
                .contains(&n)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_cookie_has_host_prefix_and_attributes() {
        let c = session("tok", true, 60);
        assert!(c.starts_with("__Host-portcullis=tok; Path=/; HttpOnly; SameSite=Lax"));
        assert!(c.contains("; Secure") && !c.contains("Domain"));
        assert!(!session("tok", false, 60).contains("Secure"));
        assert!(clear(true).contains("Max-Age=0"));
        let f = flow("t", true, 600);
        assert!(f.starts_with("__Host-portcullis-oidc=t; Path=/; HttpOnly; SameSite=Lax"));
        assert!(f.contains("; Secure") && !f.contains("Domain"));
        assert!(clear_flow(true).contains("Max-Age=0"));
    }

    #[test]
    fn stripping_keeps_other_cookies() {
        assert_eq!(
            without_gateway_cookies(
                b"a=1; portcullis=secret; __Host-portcullis=s2; __Host-portcullis-oidc=f; b=2"
            )
            .as_deref(),
            Some("a=1; b=2")
        );
        assert_eq!(without_gateway_cookies(b"portcullis=x"), None);
    }

    #[test]
    fn find_reads_across_headers() {
        let mut h = HeaderMap::new();
        h.append("cookie", "x=1; portcullis=abc".parse().unwrap());
        assert_eq!(find(&h, "portcullis"), Some("abc"));
        assert_eq!(find(&h, "__Host-portcullis"), None);
    }
}
