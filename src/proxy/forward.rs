//! What the upstream sees: the gateway's own credentials removed, client-sent identity headers
//! and headers that would tell the upstream another path or method than the one judged
//! removed (in their dash, underscore and dot spellings), hop-by-hop headers removed, any
//! `Authorization` other than the media server's own scheme removed, and the forwarded headers
//! and optional identity header set by the gateway alone.

use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::{ErrorType, OrErr};

use crate::auth::{cookie, Identity};

/// Identity headers that only the gateway may set, compared after lower-casing and turning `_`
/// and `.` into `-`.
const IDENTITY_HEADERS: &[&str] = &[
    "remote-user",
    "remote-email",
    "remote-groups",
    "remote-name",
    "x-authenticated-user",
    "x-authenticated-groups",
    "x-remote-email",
    "x-remote-groups",
    "x-webauth-email",
    "x-webauth-groups",
    "x-webauth-name",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-remote-user",
    "x-webauth-user",
];
const IDENTITY_PREFIXES: &[&str] = &["x-auth-request-"];

/// Headers a client must not set because the gateway sets (or removes) them.
const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-real-ip",
    "x-request-id",
    "x-forwarded-server",
    // The gateway judged this method and path; nothing may tell the upstream another one.
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-forwarded-method",
    "x-original-url",
    "x-original-uri",
    "x-original-method",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Hop-by-hop headers that never travel further (Connection and Upgrade are left to Pingora,
/// which needs them for WebSocket upgrades).
const HOP_BY_HOP: &[&str] = &[
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
];

// Names the gateway sets, sent upstream in lower case as before.
const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_REAL_IP: &str = "x-real-ip";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const X_REQUEST_ID: &str = "x-request-id";

/// Per-request facts the forwarding rewrite needs.
pub struct ForwardFacts<'a> {
    pub client_ip: &'a str,
    pub proto: &'static str,
    pub host: Option<&'a str>,
    pub request_id: &'a str,
    pub identity: Option<&'a Identity>,
    pub identity_header: Option<&'a str>,
    /// A media route (kept for the caller's clarity; on every route an `Authorization` header
    /// of any scheme other than `MediaBrowser`/`Emby` is removed: the gateway's Bearer must not
    /// leak, `Basic` credentials are not the upstream's to see, and Jellyfin ignores
    /// `X-Emby-Authorization` when another `Authorization` is present).
    pub media: bool,
}

/// A header name byte as compared: lower case, with `_` and `.` read as `-`.
fn fold(b: u8) -> u8 {
    match b {
        b'_' | b'.' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

/// Whether `name` starts with `prefix` (lower case, dashes) once folded.
fn folded_starts_with(name: &[u8], prefix: &str) -> bool {
    name.len() >= prefix.len()
        && name
            .iter()
            .zip(prefix.as_bytes())
            .all(|(&n, &p)| fold(n) == p)
}

/// Whether `name` is `reserved` (lower case, dashes) once folded.
fn folded_eq(name: &[u8], reserved: &str) -> bool {
    name.len() == reserved.len() && folded_starts_with(name, reserved)
}

/// Whether a header name is one a client may not send through the gateway. Every reserved
/// name starts with one of `fkprtx` (`extra`, the route's identity header, is checked apart),
/// so most names are told apart by their first byte. Nothing is allocated: this runs for
/// every header of every request.
pub fn is_reserved(name: &str, extra: Option<&str>) -> bool {
    let n = name.as_bytes();
    if extra.is_some_and(|e| folded_eq(n, e)) {
        return true;
    }
    if !matches!(
        n.first().map(|b| b.to_ascii_lowercase()),
        Some(b'f' | b'k' | b'p' | b'r' | b't' | b'x')
    ) {
        return false;
    }
    IDENTITY_HEADERS.iter().any(|r| folded_eq(n, r))
        || IDENTITY_PREFIXES.iter().any(|p| folded_starts_with(n, p))
        || FORWARDING_HEADERS.iter().any(|r| folded_eq(n, r))
        || HOP_BY_HOP.iter().any(|r| folded_eq(n, r))
}

/// Whether an `Authorization` value is in the media server's own scheme (`MediaBrowser` or
/// `Emby` followed by a space), the only one forwarded.
fn media_server_scheme(value: &[u8]) -> bool {
    let Some(space) = value.iter().position(|b| *b == b' ') else {
        return false;
    };
    let scheme = &value[..space];
    scheme.eq_ignore_ascii_case(b"mediabrowser") || scheme.eq_ignore_ascii_case(b"emby")
}

/// Rewrites the request that goes upstream.
pub fn rewrite(req: &mut RequestHeader, f: &ForwardFacts<'_>) -> pingora::Result<()> {
    // Names nominated by Connection (except the upgrade machinery) are hop-by-hop too.
    let mut remove: Vec<HeaderName> = Vec::new();
    for v in req.headers.get_all(http::header::CONNECTION) {
        for token in v.to_str().unwrap_or("").split(',') {
            let t = token.trim().to_ascii_lowercase();
            if t.is_empty() || t == "upgrade" || t == "keep-alive" || t == "close" {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                remove.push(n);
            }
        }
    }
    for name in req.headers.keys() {
        if is_reserved(name.as_str(), f.identity_header) {
            remove.push(name.clone());
        }
    }
    for name in remove {
        req.remove_header(&name);
    }

    // The gateway's cookie and Bearer token stay here.
    if req.headers.contains_key(http::header::COOKIE) {
        let cookies: Vec<String> = req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| cookie::without_gateway_cookies(v.as_bytes()))
            .collect();
        req.remove_header(&http::header::COOKIE);
        if !cookies.is_empty() {
            req.insert_header(http::header::COOKIE, cookies.join("; "))?;
        }
    }
    let foreign_scheme = req
        .headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .any(|v| !media_server_scheme(v.as_bytes()));
    if foreign_scheme {
        req.remove_header(&http::header::AUTHORIZATION);
    }

    // Every client-sent header of these names was removed above, so appending sets them.
    let client_ip = HeaderValue::from_str(f.client_ip)
        .or_err(ErrorType::InvalidHTTPHeader, "client address")?;
    req.append_header(X_FORWARDED_FOR, client_ip.clone())?;
    req.append_header(X_REAL_IP, client_ip)?;
    req.append_header(X_FORWARDED_PROTO, HeaderValue::from_static(f.proto))?;
    if let Some(host) = f.host {
        req.append_header(X_FORWARDED_HOST, host)?;
    }
    req.append_header(X_REQUEST_ID, f.request_id)?;
    if let (Some(header), Some(identity)) = (f.identity_header, f.identity) {
        req.insert_header(header.to_string(), identity.name.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SessionId;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    /// The plain reading `is_reserved` must agree with: fold the name, then look it up.
    fn reserved_by_allocation(name: &str, extra: Option<&str>) -> bool {
        let n = name.to_ascii_lowercase().replace(['_', '.'], "-");
        IDENTITY_HEADERS.contains(&n.as_str())
            || IDENTITY_PREFIXES.iter().any(|p| n.starts_with(p))
            || FORWARDING_HEADERS.contains(&n.as_str())
            || HOP_BY_HOP.contains(&n.as_str())
            || extra.is_some_and(|e| e == n)
    }

    #[test]
    fn reserved_names_are_found_in_every_spelling_without_allocating() {
        let mut names: Vec<String> = Vec::new();
        for list in [
            IDENTITY_HEADERS,
            FORWARDING_HEADERS,
            HOP_BY_HOP,
            IDENTITY_PREFIXES,
        ] {
            for n in list {
                names.push(n.to_string());
                names.push(n.to_ascii_uppercase().replace('-', "_"));
                names.push(n.replace('-', "."));
                names.push(format!("{n}x"));
                names.push(n[..n.len() - 1].to_string());
                names.push(format!("{n}-extra"));
            }
        }
        for n in [
            "host",
            "accept",
            "x",
            "",
            "_",
            "te",
            "Te",
            "tE_",
            "x-my-user",
            "X_My.User",
        ] {
            names.push(n.to_string());
        }
        for name in &names {
            for extra in [None, Some("x-my-user")] {
                assert_eq!(
                    is_reserved(name, extra),
                    reserved_by_allocation(name, extra),
                    "{name} {extra:?}"
                );
            }
        }
        assert!(is_reserved("Remote.User", None) && is_reserved("X_My.User", Some("x-my-user")));
        assert!(!is_reserved("Accept", None));
    }

    #[test]
    fn only_the_media_server_scheme_is_forwarded_as_jellyfin_parses_it() {
        for value in [
            "MediaBrowser Token=\"a\"",
            "mediabrowser x",
            "Emby Client=\"c\"",
            "EMBY ",
            "Bearer tok",
            "Basic dXNlcg==",
            "MediaBrowser",
            "MediaBrowserToken=a",
            "",
            " MediaBrowser a",
        ] {
            let by_parse = crate::mediaserver::carrier::parse_params(value).is_some();
            assert_eq!(media_server_scheme(value.as_bytes()), by_parse, "{value}");
        }
    }

    #[test]
    fn identity_and_credentials_are_stripped_and_forwarded_headers_set() {
        let mut r = request(&[
            ("Remote-User", "admin"),
            ("remote_user", "admin"),
            ("X-Auth-Request-Email", "a@b"),
            ("Remote.User", "admin"),
            ("X-Authenticated-User", "admin"),
            ("X-Original-URL", "/System/Info/Public"),
            ("X-Forwarded-Prefix", "/public"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("x-forwarded-for", "6.6.6.6"),
            ("Cookie", "portcullis=tok; theme=dark"),
            ("Authorization", "Bearer tok"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "1"),
            ("X-User", "evil"),
            ("Accept", "*/*"),
        ]);
        let id = Identity {
            user_id: 1,
            name: "alice".into(),
            sid: SessionId(1),
            issued_ms: 0,
            expires_s: 0,
            factors: 1,
        };
        rewrite(
            &mut r,
            &ForwardFacts {
                client_ip: "127.0.0.1",
                proto: "http",
                host: Some("gw.example"),
                request_id: "rid",
                identity: Some(&id),
                identity_header: Some("x-user"),
                media: false,
            },
        )
        .unwrap();
        let h = &r.headers;
        assert!(h.get("remote-user").is_none() && h.get("remote_user").is_none());
        assert!(h.get("x-auth-request-email").is_none() && h.get("x-secret").is_none());
        for stripped in [
            "remote.user",
            "x-authenticated-user",
            "x-original-url",
            "x-forwarded-prefix",
            "x-http-method-override",
            "authorization",
        ] {
            assert!(h.get(stripped).is_none(), "{stripped}");
        }
        assert_eq!(h.get("cookie").unwrap(), "theme=dark");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert_eq!(h.get_all("x-user").iter().count(), 1);
        assert_eq!(h.get("x-user").unwrap(), "alice");
        assert_eq!(h.get("accept").unwrap(), "*/*");
    }

    #[test]
    fn foreign_authorization_schemes_are_dropped() {
        for (value, kept) in [
            ("Bearer abc", false),
            ("bearer abc", false),
            ("", false),
            ("Basic YTpi", false),
            ("MediaBrowser Token=\"abc\"", true),
            ("emby Token=\"abc\"", true),
        ] {
            for media in [true, false] {
                let mut r = request(&[("Authorization", value)]);
                rewrite(
                    &mut r,
                    &ForwardFacts {
                        client_ip: "::1",
                        proto: "https",
                        host: None,
                        request_id: "r",
                        identity: None,
                        identity_header: None,
                        media,
                    },
                )
                .unwrap();
                assert_eq!(r.headers.get("authorization").is_some(), kept, "{value}");
            }
        }
    }

    #[test]
    fn media_server_authorization_is_kept() {
        let mut r = request(&[("Authorization", "MediaBrowser Token=\"abc\"")]);
        rewrite(
            &mut r,
            &ForwardFacts {
                client_ip: "::1",
                proto: "https",
                host: None,
                request_id: "r",
                identity: None,
                identity_header: None,
                media: false,
            },
        )
        .unwrap();
        assert_eq!(
            r.headers.get("authorization").unwrap(),
            "MediaBrowser Token=\"abc\""
        );
    }
}
