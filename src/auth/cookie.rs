//! The gateway's cookies: their names, their one constructor, and the helpers that find them in
//! a request or strip them before forwarding. With an https public URL the session cookie is
//! `__Host-portcullis` (Secure, Path=/, no Domain); over plain http it is `portcullis` without
//! Secure, and the gateway warns at start.
//!
//! A request that carries one of these names twice is ambiguous and is refused, never guessed
//! at: browsers send duplicates when a cookie was set for two paths or domains, and a sibling
//! subdomain that can set cookies for the parent domain uses exactly that to plant or shadow a
//! session (cookie tossing). Names are matched exactly: a look-alike (other letter case,
//! another prefix) is not the gateway's cookie.

use http::HeaderMap;

pub const SECURE_NAME: &str = "__Host-portcullis";
pub const PLAIN_NAME: &str = "portcullis";
/// The short-lived cookie of a login that still owes a step (second factor, new password).
pub const SECURE_PENDING_NAME: &str = "__Host-portcullis-pending";
pub const PLAIN_PENDING_NAME: &str = "portcullis-pending";
/// The cookie that binds a single sign-on attempt (state, nonce, PKCE verifier) to the browser
/// that started it. SameSite=Lax: the provider sends the browser back with a top-level GET.
pub const SECURE_FLOW_NAME: &str = "__Host-portcullis-oidc";
pub const PLAIN_FLOW_NAME: &str = "portcullis-oidc";

/// Every name the gateway's cookies may have, in either kind of deployment.
pub const ALL_NAMES: [&str; 6] = [
    SECURE_NAME,
    PLAIN_NAME,
    SECURE_PENDING_NAME,
    PLAIN_PENDING_NAME,
    SECURE_FLOW_NAME,
    PLAIN_FLOW_NAME,
];

/// The cookie name for a deployment.
pub fn name(secure: bool) -> &'static str {
    if secure {
        SECURE_NAME
    } else {
        PLAIN_NAME
    }
}

/// The single sign-on flow cookie name for a deployment.
pub fn flow_name(secure: bool) -> &'static str {
    if secure {
        SECURE_FLOW_NAME
    } else {
        PLAIN_FLOW_NAME
    }
}

/// The pending-login cookie name for a deployment.
pub fn pending_name(secure: bool) -> &'static str {
    if secure {
        SECURE_PENDING_NAME
    } else {
        PLAIN_PENDING_NAME
    }
}

/// The names of the gateway's cookies in a deployment: session, pending login, sign-on flow.
pub fn names(secure: bool) -> [&'static str; 3] {
    [name(secure), pending_name(secure), flow_name(secure)]
}

/// The one constructor of every `Set-Cookie` value the gateway sends. `domain` and a `path`
/// other than `/` appear only in the expiring variants that clear a planted cookie.
fn build(
    name: &str,
    value: &str,
    same_site: &str,
    max_age_s: i64,
    secure: bool,
    path: &str,
    domain: Option<&str>,
) -> String {
    let mut c =
        format!("{name}={value}; Path={path}; HttpOnly; SameSite={same_site}; Max-Age={max_age_s}");
    if let Some(d) = domain {
        c.push_str("; Domain=");
        c.push_str(d);
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// `Set-Cookie` value for a single sign-on attempt, valid `max_age_s` seconds.
pub fn flow(token: &str, secure: bool, max_age_s: i64) -> String {
    build(
        flow_name(secure),
        token,
        "Lax",
        max_age_s,
        secure,
        "/",
        None,
    )
}

/// `Set-Cookie` value that removes the single sign-on flow cookie.
pub fn clear_flow(secure: bool) -> String {
    flow("", secure, 0)
}

/// `Set-Cookie` value for a pending login (Strict: it is only ever used on our own forms).
pub fn pending(token: &str, secure: bool, max_age_s: i64) -> String {
    build(
        pending_name(secure),
        token,
        "Strict",
        max_age_s,
        secure,
        "/",
        None,
    )
}

/// `Set-Cookie` value that removes the pending-login cookie.
pub fn clear_pending(secure: bool) -> String {
    pending("", secure, 0)
}

/// `Set-Cookie` value that stores a session token for `max_age_s` seconds.
pub fn session(token: &str, secure: bool, max_age_s: i64) -> String {
    build(name(secure), token, "Lax", max_age_s, secure, "/", None)
}

/// `Set-Cookie` value that removes the session cookie.
pub fn clear(secure: bool) -> String {
    session("", secure, 0)
}

/// Two or more cookies with one of the gateway's names in one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ambiguous;

/// The `name=value` pairs of the request's `Cookie` headers, as a browser sends them.
fn pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
}

/// The value of the named cookie in the request's `Cookie` headers (`None` when it is absent or
/// empty); `Ambiguous` when the name appears more than once, whatever the values.
pub fn find<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Ambiguous> {
    let mut found = None;
    for (k, v) in pairs(headers) {
        if k == name {
            if found.is_some() {
                return Err(Ambiguous);
            }
            found = Some(v);
        }
    }
    Ok(found.filter(|v| !v.is_empty()))
}

/// The gateway's cookie names (of this deployment) that the request carries more than once.
/// One pass over the header (this runs on every request).
pub fn ambiguous_names(headers: &HeaderMap, secure: bool) -> Vec<&'static str> {
    let names = names(secure);
    let mut seen = [0u8; 3];
    for (k, _) in pairs(headers) {
        if let Some(i) = names.iter().position(|n| *n == k) {
            seen[i] = seen[i].saturating_add(1);
        }
    }
    names
        .into_iter()
        .zip(seen)
        .filter(|(_, count)| *count > 1)
        .map(|(n, _)| n)
        .collect()
}

/// The most domain levels cleared (`a.b.example.org` has three with a parent).
const MAX_DOMAIN_LEVELS: usize = 6;

/// Expiring `Set-Cookie` values for every variant of `name` a browser may hold for this request:
/// host-only at `/` and at each directory of `path` (up to three levels), and for the host and
/// each parent domain (`Domain=`, where a sibling could have planted one; at most six levels). A `__Host-` cookie
/// can only exist host-only at `/`, so it has that one variant.
pub fn clear_variants(name: &str, secure: bool, host: Option<&str>, path: &str) -> Vec<String> {
    let same_site = if name == pending_name(secure) {
        "Strict"
    } else {
        "Lax"
    };
    let expire =
        |path: &str, domain: Option<&str>| build(name, "", same_site, 0, secure, path, domain);
    let mut out = vec![expire("/", None)];
    if name.starts_with("__Host-") {
        return out;
    }
    let mut dir = String::new();
    for segment in path.split('/').skip(1).take(3) {
        if segment.is_empty() {
            break;
        }
        dir.push('/');
        dir.push_str(segment);
        out.push(expire(&dir, None));
    }
    let host = host.map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name));
    if let Some(host) = host.filter(|h| {
        h.contains('.') && !h.starts_with('[') && h.parse::<std::net::Ipv4Addr>().is_err()
    }) {
        let mut domain = host;
        for _ in 0..MAX_DOMAIN_LEVELS {
            out.push(expire("/", Some(domain)));
            match domain.split_once('.') {
                Some((_, parent)) if parent.contains('.') => domain = parent,
                _ => break,
            }
        }
    }
    out
}

/// The `Cookie` header value without any of the gateway's cookies; `None` if nothing remains.
pub fn without_gateway_cookies(value: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(value);
    let kept: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|pair| {
            let n = pair.split_once('=').map_or(*pair, |(k, _)| k);
            !pair.is_empty() && !ALL_NAMES.contains(&n)
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
        assert_eq!(find(&h, "portcullis"), Ok(Some("abc")));
        assert_eq!(find(&h, "__Host-portcullis"), Ok(None));
        h.append(
            "cookie",
            "Portcullis=x; __Secure-portcullis=y".parse().unwrap(),
        );
        assert_eq!(
            find(&h, "portcullis"),
            Ok(Some("abc")),
            "look-alikes are not ours"
        );
        h.append("cookie", "portcullis=abc".parse().unwrap());
        assert_eq!(
            find(&h, "portcullis"),
            Err(Ambiguous),
            "twice, even with one value"
        );
        assert_eq!(ambiguous_names(&h, false), ["portcullis"]);
        assert!(ambiguous_names(&h, true).is_empty());
    }

    #[test]
    fn a_name_twice_is_ambiguous_whatever_the_values() {
        for header in [
            "portcullis=A; portcullis=B",
            "portcullis=; portcullis=B",
            "portcullis=B;portcullis=",
            "a=1; portcullis=A; b=2; portcullis=A",
        ] {
            let mut h = HeaderMap::new();
            h.append("cookie", header.parse().unwrap());
            assert_eq!(find(&h, "portcullis"), Err(Ambiguous), "{header}");
        }
        let mut h = HeaderMap::new();
        h.append("cookie", "portcullis=".parse().unwrap());
        assert_eq!(find(&h, "portcullis"), Ok(None), "empty is absent");
    }

    #[test]
    fn clearing_covers_paths_and_parent_domains_but_host_cookies_have_one_form() {
        let v = clear_variants(
            "portcullis",
            false,
            Some("media.home.example.org:8443"),
            "/web/index.html",
        );
        let expect = [
            "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0",
            "portcullis=; Path=/web; HttpOnly; SameSite=Lax; Max-Age=0",
            "portcullis=; Path=/web/index.html; HttpOnly; SameSite=Lax; Max-Age=0",
            "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Domain=media.home.example.org",
            "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Domain=home.example.org",
            "portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Domain=example.org",
        ];
        assert_eq!(v, expect);
        assert_eq!(
            clear_variants(
                "__Host-portcullis",
                true,
                Some("media.example.org"),
                "/web/x"
            ),
            ["__Host-portcullis=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0; Secure"]
        );
        assert_eq!(
            clear_variants("portcullis-pending", false, Some("127.0.0.1:8080"), "/"),
            ["portcullis-pending=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"]
        );
        assert_eq!(
            clear(false),
            clear_variants("portcullis", false, None, "/")[0]
        );
    }
}
