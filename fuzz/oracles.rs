//! What each fuzz target checks, shared by the libFuzzer targets (`fuzz/fuzz_targets/`, run with
//! `cargo +nightly fuzz run <target>`) and by the stable replay of the committed seed corpora
//! (`tests/it/fuzz_corpus.rs`). Every function takes arbitrary bytes; it panics only when the
//! code under test panics or breaks one of the properties written here, each of which is checked
//! by a simpler, independent reading of the input.

use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use portcullis::{auth, config, mediaserver::carrier, proxy};

/// The canonical path: never panics; what it accepts is absolute, has no dot or empty
/// segments, no control bytes and no backslash; an input without `%` is accepted unchanged; and
/// route matching never panics on it.
pub fn path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(canonical) = proxy::path::canonicalize(raw) else {
        return;
    };
    assert!(canonical.starts_with('/'), "{raw:?} -> {canonical:?}");
    assert!(!canonical.contains('\\'), "{raw:?} -> {canonical:?}");
    assert!(
        !canonical
            .chars()
            .any(|c| (c as u32) < 0x20 || c == '\u{7f}'),
        "{raw:?} -> {canonical:?}"
    );
    let segments: Vec<&str> = canonical[1..].split('/').collect();
    for (n, s) in segments.iter().enumerate() {
        assert!(*s != "." && *s != "..", "{raw:?} -> {canonical:?}");
        assert!(
            !s.is_empty() || n == segments.len() - 1,
            "{raw:?} -> {canonical:?}"
        );
    }
    if !raw.contains('%') {
        assert_eq!(canonical, raw);
    }
    for prefix in ["/", "/web", "/web/", "/jellyfin", segments[0]] {
        let _ = proxy::path::under(&canonical, prefix);
    }
}

/// Headers from `name: value` lines (invalid names or values are skipped, as a client library
/// could not send them); the last line without a colon is the query string.
fn headers_and_query(data: &[u8]) -> (HeaderMap, Option<String>) {
    let mut headers = HeaderMap::new();
    let mut query = None;
    for line in data.split(|b| *b == b'\n') {
        match line.iter().position(|b| *b == b':') {
            Some(colon) => {
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(&line[..colon]),
                    HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
                ) else {
                    continue;
                };
                headers.append(name, value);
            }
            None => query = Some(String::from_utf8_lossy(line).into_owned()),
        }
    }
    (headers, query)
}

/// Jellyfin's credential carriers: never panics; an accepted token is non-blank, within the
/// length cap and free of control characters; accepted client fields are short and hold no
/// path separators, `..` or control characters; the parameter parser never invents a key that
/// the text does not hold.
pub fn carrier(data: &[u8]) {
    let (headers, query) = headers_and_query(data);
    if let Ok(carried) = carrier::extract(&headers, query.as_deref()) {
        if let Some(token) = &carried.token {
            assert!(!token.trim().is_empty());
            assert!(token.len() <= carrier::MAX_TOKEN_BYTES);
            assert!(!token.chars().any(char::is_control));
        }
        let f = &carried.fields;
        for v in [&f.client, &f.device, &f.device_id, &f.version] {
            assert!(v.chars().count() <= 128, "{v:?}");
            assert!(
                !v.contains('/') && !v.contains('\\') && !v.contains(".."),
                "{v:?}"
            );
            assert!(!v.chars().any(char::is_control), "{v:?}");
        }
    }
    let text = String::from_utf8_lossy(data);
    if let Some(params) = carrier::parse_params(&text) {
        for (k, _) in &params {
            assert!(text.contains(k.as_str()), "{k:?} not in {text:?}");
        }
    }
    let _ = carrier::query_pairs(&text);
    let _ = carrier::url_decode(&text);
}

/// Plex's carriers (`X-Plex-Token` in headers or the query, any case of the key; the client
/// fields): never panics, and the verdict matches a plain reading of every carried token. An
/// accepted token is the one value every non-blank carrier holds, within the cap, with no
/// control character or space; no token is accepted exactly when none is carried; two tokens
/// are reported only when two different ones are carried, a bad token only when one is; a bad
/// field only when that field's first non-blank value breaks the field rule. A query without
/// `%` or `+` carries only tokens written in it literally.
pub fn plex_carrier(data: &[u8]) {
    let (headers, query) = headers_and_query(data);
    let pairs = query
        .as_deref()
        .map(carrier::query_pairs)
        .unwrap_or_default();
    let from_query: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-plex-token"))
        .map(|(_, v)| v.clone())
        .collect();
    if let Some(q) = query.as_deref().filter(|q| !q.contains(['%', '+'])) {
        for t in &from_query {
            assert!(q.contains(t.as_str()), "{t:?} is not written in {q:?}");
        }
        if !q.to_ascii_lowercase().contains("x-plex-token") {
            assert!(from_query.is_empty(), "{q:?} -> {from_query:?}");
        }
    }
    let carried: Vec<String> = headers
        .get_all("x-plex-token")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .chain(from_query)
        .filter(|t| !t.trim().is_empty())
        .collect();
    let bad = |t: &String| {
        t.len() > carrier::MAX_PLEX_TOKEN_BYTES || t.chars().any(|c| c.is_control() || c == ' ')
    };
    let distinct: std::collections::BTreeSet<&String> = carried.iter().collect();
    match carrier::extract_plex(&headers, query.as_deref()) {
        Ok(c) => {
            assert!(!carried.iter().any(bad), "{carried:?} accepted");
            match &c.token {
                Some(t) => {
                    assert!(carried.iter().all(|x| x == t), "{t:?} of {carried:?}");
                    assert!(!bad(t));
                }
                None => assert!(carried.is_empty(), "{carried:?} not seen"),
            }
            let f = &c.fields;
            for v in [&f.client, &f.device, &f.device_id, &f.version] {
                assert!(v.chars().count() <= 128, "{v:?}");
                assert!(!v.contains(['/', '\\']) && !v.contains(".."), "{v:?}");
                assert!(!v.chars().any(char::is_control), "{v:?}");
            }
        }
        Err(carrier::CarrierError::TwoTokens) => {
            assert!(distinct.len() >= 2, "two tokens in {carried:?}");
        }
        Err(carrier::CarrierError::BadToken) => {
            assert!(carried.iter().any(bad), "a bad token in {carried:?}");
        }
        Err(carrier::CarrierError::BadField(label)) => {
            let name = label.to_ascii_lowercase();
            let first = headers
                .get_all(name.as_str())
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .chain(
                    pairs
                        .iter()
                        .filter(|(k, _)| k.eq_ignore_ascii_case(&name))
                        .map(|(_, v)| v.clone()),
                )
                .find(|v| !v.trim().is_empty())
                .unwrap_or_else(|| panic!("{label} reported bad but not carried"));
            assert!(
                first.chars().count() > 128
                    || first.contains(['/', '\\'])
                    || first.contains("..")
                    || first.chars().any(char::is_control),
                "{label}: {first:?} reported bad"
            );
        }
    }
}

/// The gateway's own credentials: a cookie value found is non-empty and has no `;`; a Bearer
/// token is used only when it is the one `Authorization` header and no different cookie came
/// with it; the token is the header's value after `Bearer ` exactly; and the `Cookie` header
/// forwarded upstream never names one of the gateway's cookies.
pub fn credentials(data: &[u8]) {
    let (headers, _) = headers_and_query(data);
    for name in [auth::cookie::name(true), auth::cookie::name(false)] {
        let Ok(cookie) = auth::cookie::find(&headers, name) else {
            assert_eq!(
                auth::extract_credential(&headers, name),
                Err(auth::DenyReason::AmbiguousCredentials)
            );
            continue;
        };
        if let Some(c) = cookie {
            assert!(!c.is_empty() && !c.contains(';'), "{c:?}");
        }
        if let Ok(Some((token, source))) = auth::extract_credential(&headers, name) {
            if source == auth::CredentialSource::Bearer {
                assert_eq!(
                    headers.get_all(http::header::AUTHORIZATION).iter().count(),
                    1
                );
                assert!(
                    cookie.is_none_or(|c| c == token),
                    "{cookie:?} with {token:?}"
                );
            } else {
                assert_eq!(Some(token), cookie);
            }
        }
    }
    if let Some(token) = auth::bearer_token(&headers) {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        assert_eq!(value.map(<[u8]>::len), Some("Bearer ".len() + token.len()));
    }
    let _ = auth::canonical_user_name(&String::from_utf8_lossy(data));
}

/// The `Cookie` header (one header per line): a gateway cookie name is found exactly when it
/// appears once, is ambiguous whenever it appears more than once (whatever the values, empty
/// ones too), and a look-alike name never counts; stripping removes every gateway cookie and
/// keeps every other pair in order; the expiring variants all expire the one name.
pub fn cookie_header(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(http::header::COOKIE, v);
        }
    }
    let pairs: Vec<(&str, &str)> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|p| p.trim().split_once('='))
        .collect();
    for name in auth::cookie::ALL_NAMES {
        let values: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .collect();
        let found = auth::cookie::find(&headers, name);
        match values.as_slice() {
            [] => assert_eq!(found, Ok(None)),
            [v] => assert_eq!(found, Ok(Some(*v).filter(|v| !v.is_empty()))),
            _ => assert_eq!(
                found,
                Err(auth::cookie::Ambiguous),
                "{name} x{}",
                values.len()
            ),
        }
        let secure = name.starts_with("__Host-");
        let host = pairs.first().map(|(_, v)| *v);
        let variants = auth::cookie::clear_variants(name, secure, host, "/a/b/c/d");
        assert!(!variants.is_empty() && variants.len() <= 16);
        for v in &variants {
            assert!(
                v.starts_with(&format!("{name}=; Path=/")) && v.contains("Max-Age=0"),
                "{v}"
            );
        }
        assert!(!secure || variants.len() == 1);
    }
    for secure in [true, false] {
        for name in auth::cookie::ambiguous_names(&headers, secure) {
            assert!(auth::cookie::names(secure).contains(&name));
            assert!(pairs.iter().filter(|(k, _)| *k == name).count() > 1);
        }
    }
    for value in headers.get_all(http::header::COOKIE) {
        let text = String::from_utf8_lossy(value.as_bytes());
        let expected: Vec<&str> = text
            .split(';')
            .map(str::trim)
            .filter(|p| {
                let n = p.split_once('=').map_or(*p, |(k, _)| k);
                !p.is_empty() && !auth::cookie::ALL_NAMES.contains(&n)
            })
            .collect();
        let kept = auth::cookie::without_gateway_cookies(value.as_bytes());
        assert_eq!(kept, (!expected.is_empty()).then(|| expected.join("; ")));
    }
}

/// The strict HTTP/1 front door, given the head exactly as Pingora parses it: never panics, and
/// whatever it lets through has CRLF line ends only, no control bytes but tab, no obs-fold, at
/// most one `Host`, at most one `Content-Length`, and not both a `Content-Length` and a
/// `Transfer-Encoding`.
pub fn front_door(data: &[u8]) {
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut parsed = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(len)) = parsed.parse(data) else {
        return;
    };
    let Ok(mut req) = RequestHeader::build(
        parsed.method.unwrap_or(""),
        parsed.path.unwrap_or("").as_bytes(),
        Some(parsed.headers.len()),
    ) else {
        return;
    };
    req.set_version(match parsed.version {
        Some(1) => http::Version::HTTP_11,
        Some(0) => http::Version::HTTP_10,
        _ => http::Version::HTTP_09,
    });
    for h in parsed.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        if req.append_header(name, value).is_err() {
            return;
        }
    }
    let head = &data[..len];
    if proxy::strict::check(Some(head), &req).is_err() {
        return;
    }
    let lines: Vec<&[u8]> = head.split(|b| *b == b'\n').collect();
    for (n, line) in lines.iter().enumerate() {
        if n + 1 < lines.len() {
            assert!(line.ends_with(b"\r"), "bare LF passed: {head:?}");
        }
        let body = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            !body
                .iter()
                .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f),
            "control byte passed: {head:?}"
        );
        if n > 0 {
            assert!(
                !body.starts_with(b" ") && !body.starts_with(b"\t"),
                "obs-fold passed: {head:?}"
            );
        }
    }
    let count = |name: &str| {
        parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    assert!(count("host") <= 1, "two Host headers passed: {head:?}");
    assert!(count("content-length") <= 1, "two Content-Lengths passed");
    assert!(
        count("content-length") == 0 || count("transfer-encoding") == 0,
        "Content-Length with Transfer-Encoding passed: {head:?}"
    );
}

/// Config loading: never panics, whatever the text; every error names the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.toml");
    if let Err(e) = config::Config::parse(text, path, &config::EnvOverrides::default()) {
        assert!(e.to_string().contains("fuzz.toml"), "{e}");
    }
}
