//! Where a Jellyfin or Emby client puts its token, parsed exactly as the media server parses it
//! (research brief §1.4–1.5): the `MediaBrowser`/`Emby` parameter grammar of `Authorization`
//! and `X-Emby-Authorization`, the `X-Emby-Token` and `X-MediaBrowser-Token` headers, and the
//! `ApiKey` / `api_key` query keys in any case (keys percent-decoded first, and a query string
//! that arrives fully percent-encoded as one key decoded the way Jellyfin's middleware does).
//! Emby apps also send `X-Emby-Token` and their client fields as query parameters.
//!
//! Unlike the media server, which takes the first carrier in a version-dependent order, the
//! gateway collects every carrier and refuses a request whose tokens differ.

use http::HeaderMap;

/// Longest Client, Device, DeviceId or Version value accepted, in characters.
pub const MAX_FIELD_CHARS: usize = 128;
/// Longest token accepted; longer values are refused rather than looked up.
pub const MAX_TOKEN_BYTES: usize = 256;

/// The client's description of itself, from the parameter header (or Emby's query keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientFields {
    pub client: String,
    pub device: String,
    pub device_id: String,
    pub version: String,
}

/// What a request carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// The one token the request carries, if any (empty and blank values count as absent).
    pub token: Option<String>,
    pub fields: ClientFields,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CarrierError {
    #[error("the request carries more than one media-server token")]
    TwoTokens,
    #[error("the {0} value is too long or holds control characters or path separators")]
    BadField(&'static str),
    #[error("the media-server token is too long or holds control characters")]
    BadToken,
}

/// Parses the parameters of a `MediaBrowser` or `Emby` scheme header value; `None` for any
/// other scheme (e.g. the gateway's own `Bearer`) or a value without a space.
///
/// Jellyfin's `AuthorizationContext.GetParts`: one left-to-right scan; `"` toggles quoting;
/// outside quotes `=` ends a key and `,` ends a pair; keys are whitespace-trimmed and
/// case-sensitive; values lose only their `"` characters at both ends, then are URL-decoded
/// (`+` is a space); the last duplicate wins.
pub fn parse_params(value: &str) -> Option<Vec<(String, String)>> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("mediabrowser") && !scheme.eq_ignore_ascii_case("emby") {
        return None;
    }
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |key: &str, raw: &str| {
        let value = url_decode(raw.trim_matches('"'));
        match out.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => out.push((key.to_string(), value)),
        }
    };
    let mut quoted = false;
    let mut start = 0;
    let mut key = "";
    for (i, c) in rest.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                if start < i {
                    put(key, &rest[start..i]);
                    key = "";
                }
                start = i + 1;
            }
            '=' if !quoted => {
                key = rest[start..i].trim();
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < rest.len() {
        put(key, &rest[start..]);
    }
    Some(out)
}

/// .NET's `WebUtility.UrlDecode`: `+` is a space, `%XX` a byte, anything else literal.
pub fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-decoding of a query component (`+` is a space, as ASP.NET's query parser does).
fn query_decode(s: &str) -> String {
    url_decode(s)
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// The query's key/value pairs, keys and values decoded. A query string that arrives fully
/// percent-encoded as one key (`?ApiKey%3Dabc%26deviceId%3Dx`) is decoded and parsed again,
/// as Jellyfin's `UrlDecodeQueryFeature` does for WebSocket requests.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    let split = |q: &str| -> Vec<(String, String)> {
        q.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (query_decode(k), query_decode(v)),
                None => (query_decode(p), String::new()),
            })
            .collect()
    };
    let mut pairs = split(query);
    if !query.contains('=') && !query.contains('&') {
        let decoded = query_decode(query);
        if decoded.contains('=') {
            pairs.extend(split(&decoded));
        }
    }
    pairs
}

fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> impl Iterator<Item = String> + 'a {
    headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

/// Collects every carrier of the request. Two different tokens, an oversized token, or a
/// malformed client field are errors; the caller answers them with 400.
pub fn extract(headers: &HeaderMap, query: Option<&str>) -> Result<Carried, CarrierError> {
    let mut tokens: Vec<String> = Vec::new();
    let mut fields = ClientFields::default();
    let mut add = |t: String| {
        if !is_blank(&t) {
            tokens.push(t);
        }
    };
    for name in ["authorization", "x-emby-authorization"] {
        for value in header_values(headers, name) {
            let Some(params) = parse_params(&value) else {
                continue;
            };
            for (k, v) in params {
                match k.as_str() {
                    "Token" => add(v),
                    "Client" => fields.client = v,
                    "Device" => fields.device = v,
                    "DeviceId" => fields.device_id = v,
                    "Version" => fields.version = v,
                    _ => {}
                }
            }
        }
    }
    for name in ["x-emby-token", "x-mediabrowser-token"] {
        for value in header_values(headers, name) {
            add(value);
        }
    }
    if let Some(q) = query {
        for (k, v) in query_pairs(q) {
            let k = k.to_ascii_lowercase();
            match k.as_str() {
                "apikey" | "api_key" | "x-emby-token" => add(v),
                "x-emby-client" if fields.client.is_empty() => fields.client = v,
                "x-emby-device-name" if fields.device.is_empty() => fields.device = v,
                "x-emby-device-id" if fields.device_id.is_empty() => fields.device_id = v,
                "x-emby-client-version" if fields.version.is_empty() => fields.version = v,
                _ => {}
            }
        }
    }
    let mut token: Option<String> = None;
    for t in tokens {
        if t.len() > MAX_TOKEN_BYTES || t.chars().any(char::is_control) {
            return Err(CarrierError::BadToken);
        }
        match &token {
            Some(first) if *first != t => return Err(CarrierError::TwoTokens),
            Some(_) => {}
            None => token = Some(t),
        }
    }
    for (label, value) in [
        ("Client", &fields.client),
        ("Device", &fields.device),
        ("DeviceId", &fields.device_id),
        ("Version", &fields.version),
    ] {
        if !field_ok(value) {
            return Err(CarrierError::BadField(label));
        }
    }
    Ok(Carried { token, fields })
}

/// Longest Plex token accepted, in bytes (plex.tv's JWTs run to several hundred).
pub const MAX_PLEX_TOKEN_BYTES: usize = 4096;

/// The first non-blank value of a Plex client header, else of the same key in the query (any
/// case), as Plex apps send either.
pub fn plex_value(headers: &HeaderMap, pairs: &[(String, String)], name: &str) -> String {
    header_values(headers, name)
        .find(|v| !is_blank(v))
        .or_else(|| {
            pairs
                .iter()
                .find(|(k, v)| k.eq_ignore_ascii_case(name) && !is_blank(v))
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_default()
}

/// Collects a Plex request's token (`X-Plex-Token` header, or the query key in any case) and
/// its client fields (`X-Plex-Product`, `-Device-Name`, `-Client-Identifier`, `-Version`, from
/// headers or the query). Two different tokens, a malformed token or field are errors.
pub fn extract_plex(headers: &HeaderMap, query: Option<&str>) -> Result<Carried, CarrierError> {
    let pairs = query.map(query_pairs).unwrap_or_default();
    let mut token: Option<String> = None;
    let from_query = pairs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-plex-token"))
        .map(|(_, v)| v.clone());
    for t in header_values(headers, "x-plex-token").chain(from_query) {
        if is_blank(&t) {
            continue;
        }
        if t.len() > MAX_PLEX_TOKEN_BYTES || t.chars().any(|c| c.is_control() || c == ' ') {
            return Err(CarrierError::BadToken);
        }
        match &token {
            Some(first) if *first != t => return Err(CarrierError::TwoTokens),
            Some(_) => {}
            None => token = Some(t),
        }
    }
    let fields = ClientFields {
        client: plex_value(headers, &pairs, "x-plex-product"),
        device: plex_value(headers, &pairs, "x-plex-device-name"),
        device_id: plex_value(headers, &pairs, "x-plex-client-identifier"),
        version: plex_value(headers, &pairs, "x-plex-version"),
    };
    for (label, value) in [
        ("X-Plex-Product", &fields.client),
        ("X-Plex-Device-Name", &fields.device),
        ("X-Plex-Client-Identifier", &fields.device_id),
        ("X-Plex-Version", &fields.version),
    ] {
        if !field_ok(value) {
            return Err(CarrierError::BadField(label));
        }
    }
    Ok(Carried { token, fields })
}

/// A client field is short, free of control characters and of path separators.
fn field_ok(v: &str) -> bool {
    v.chars().count() <= MAX_FIELD_CHARS
        && !v.chars().any(|c| c.is_control() || c == '/' || c == '\\')
        && !v.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &str) -> Vec<(String, String)> {
        parse_params(v).unwrap()
    }

    fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
        p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v.as_bytes()).unwrap(),
            );
        }
        h
    }

    #[test]
    fn plex_tokens_come_from_the_header_or_any_case_of_the_query_key() {
        let none = HeaderMap::new();
        let h = headers(&[
            ("X-Plex-Token", "abc"),
            ("X-Plex-Client-Identifier", "dev1"),
        ]);
        let c = extract_plex(&h, None).unwrap();
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.fields.device_id, "dev1");
        let c = extract_plex(&none, Some("x-plex-TOKEN=q1&X-Plex-Product=Plex%20Web")).unwrap();
        assert_eq!(c.token.as_deref(), Some("q1"));
        assert_eq!(c.fields.client, "Plex Web");
        // The same token twice is one token; two different ones are refused.
        assert!(extract_plex(&h, Some("X-Plex-Token=abc")).is_ok());
        assert!(matches!(
            extract_plex(&h, Some("X-Plex-Token=other")),
            Err(CarrierError::TwoTokens)
        ));
        assert!(matches!(
            extract_plex(&none, Some("X-Plex-Token=a&x-plex-token=b")),
            Err(CarrierError::TwoTokens)
        ));
        let h2 = headers(&[("X-Plex-Token", "a"), ("X-Plex-Token", "b")]);
        assert!(matches!(
            extract_plex(&h2, None),
            Err(CarrierError::TwoTokens)
        ));
        // Blank values count as absent; malformed ones are refused.
        assert_eq!(
            extract_plex(&none, Some("X-Plex-Token=")).unwrap().token,
            None
        );
        assert!(matches!(
            extract_plex(&none, Some("X-Plex-Token=a%20b")),
            Err(CarrierError::BadToken)
        ));
        let long = "x".repeat(MAX_PLEX_TOKEN_BYTES + 1);
        assert!(matches!(
            extract_plex(&none, Some(&format!("X-Plex-Token={long}"))),
            Err(CarrierError::BadToken)
        ));
        assert!(matches!(
            extract_plex(&none, Some("X-Plex-Client-Identifier=..%2Fx")),
            Err(CarrierError::BadField("X-Plex-Client-Identifier"))
        ));
    }

    #[test]
    fn grammar_matches_jellyfins_parser_tests() {
        // Cases from DefaultAuthorizationHandlerTests and the brief §1.4.
        let p = params(r#"MediaBrowser x="123,123", y="123""#);
        assert_eq!(get(&p, "x"), Some("123,123"));
        assert_eq!(get(&p, "y"), Some("123"));
        let p = params("MediaBrowser param=Hörbücher");
        assert_eq!(get(&p, "param"), Some("Hörbücher"));
        let p = params(r#"MediaBrowser Client="a%20b+c", Device="x=y""#);
        assert_eq!(get(&p, "Client"), Some("a b c"));
        assert_eq!(get(&p, "Device"), Some("x=y"));
        // A space before the opening quote is kept, with a dangling quote: wrong, as upstream.
        let p = params(r#"MediaBrowser Token= "abc""#);
        assert_eq!(get(&p, "Token"), Some(" \"abc"));
        // Last duplicate wins; keys are trimmed; scheme is case-insensitive; Emby accepted.
        let p = params(r#"mediabrowser Token="a",  Token="b""#);
        assert_eq!(get(&p, "Token"), Some("b"));
        assert!(parse_params(r#"Emby Token="a""#).is_some());
        assert!(parse_params(r#"Bearer abc"#).is_none());
        assert!(parse_params(r#"MediaBrowser"#).is_none());
    }

    #[test]
    fn keys_inside_the_header_are_case_sensitive() {
        let h = headers(&[("authorization", r#"MediaBrowser token="abc""#)]);
        assert_eq!(extract(&h, None).unwrap().token, None);
        let h = headers(&[("authorization", r#"MediaBrowser Token="abc""#)]);
        assert_eq!(extract(&h, None).unwrap().token.as_deref(), Some("abc"));
    }

    #[test]
    fn every_carrier_is_found() {
        for h in [
            headers(&[("x-emby-authorization", r#"Emby Token="t1""#)]),
            headers(&[("x-emby-token", "t1")]),
            headers(&[("x-mediabrowser-token", "t1")]),
        ] {
            assert_eq!(extract(&h, None).unwrap().token.as_deref(), Some("t1"));
        }
        for q in [
            "ApiKey=t1",
            "apikey=t1",
            "APIKEY=t1",
            "api_key=t1",
            "API_KEY=t1",
            "Api%4Bey=t1",
            "x=1&api%5Fkey=t1",
            "X-Emby-Token=t1",
            "ApiKey%3Dt1%26deviceId%3Dx",
        ] {
            let c = extract(&HeaderMap::new(), Some(q)).unwrap();
            assert_eq!(c.token.as_deref(), Some("t1"), "{q}");
        }
    }

    #[test]
    fn empty_values_count_as_absent() {
        let h = headers(&[
            ("authorization", r#"MediaBrowser Client="c", Token="""#),
            ("x-emby-token", " "),
        ]);
        let c = extract(&h, Some("ApiKey=")).unwrap();
        assert_eq!(c.token, None);
        assert_eq!(c.fields.client, "c");
    }

    #[test]
    fn two_different_tokens_are_refused_and_the_same_twice_is_not() {
        let h = headers(&[("authorization", r#"MediaBrowser Token="a""#)]);
        assert_eq!(extract(&h, Some("ApiKey=b")), Err(CarrierError::TwoTokens));
        assert_eq!(
            extract(&h, Some("ApiKey=a")).unwrap().token.as_deref(),
            Some("a")
        );
        let h = headers(&[("x-emby-token", "a"), ("x-emby-token", "b")]);
        assert_eq!(extract(&h, None), Err(CarrierError::TwoTokens));
        assert_eq!(
            extract(&HeaderMap::new(), Some("ApiKey=a&api_key=b")),
            Err(CarrierError::TwoTokens)
        );
        let h = headers(&[
            ("authorization", r#"MediaBrowser Token="a""#),
            ("x-emby-authorization", r#"MediaBrowser Token="b""#),
        ]);
        assert_eq!(extract(&h, None), Err(CarrierError::TwoTokens));
    }

    #[test]
    fn bad_client_fields_are_refused() {
        let long = format!(r#"MediaBrowser Device="{}""#, "x".repeat(129));
        for (v, field) in [
            (r#"MediaBrowser Client="../../etc""#, "Client"),
            (r#"MediaBrowser Version="1%2F2""#, "Version"),
            (r#"MediaBrowser DeviceId="a\b""#, "DeviceId"),
            (r#"MediaBrowser Device="a%0Ab""#, "Device"),
            (long.as_str(), "Device"),
        ] {
            let h = headers(&[("authorization", v)]);
            assert_eq!(extract(&h, None), Err(CarrierError::BadField(field)), "{v}");
        }
        let h = headers(&[(
            "authorization",
            r#"MediaBrowser Client="Jellyfin Web", Device="Firefox", DeviceId="TW96aWxsYQ", Version="10.11.0""#,
        )]);
        let c = extract(&h, None).unwrap();
        assert_eq!(c.fields.device, "Firefox");
        assert_eq!(c.fields.device_id, "TW96aWxsYQ");
    }

    #[test]
    fn emby_query_fields_are_read() {
        let c = extract(
            &HeaderMap::new(),
            Some("X-Emby-Client=Emby+Web&X-Emby-Device-Name=TV&X-Emby-Device-Id=d1&X-Emby-Client-Version=4.8&X-Emby-Token=t"),
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("t"));
        assert_eq!(c.fields.client, "Emby Web");
        assert_eq!(c.fields.device_id, "d1");
    }

    #[test]
    fn control_characters_in_tokens_are_refused() {
        let h = headers(&[("x-emby-token", "a\tb")]);
        assert_eq!(extract(&h, None), Err(CarrierError::BadToken));
        assert_eq!(
            extract(&HeaderMap::new(), Some("ApiKey=a%00b")),
            Err(CarrierError::BadToken)
        );
    }

    /// Every pair of carriers (the same carrier twice included): two different tokens are
    /// refused whichever carriers hold them, the same token twice is that token.
    #[test]
    fn every_carrier_pair_with_two_tokens_is_refused() {
        type Put = fn(&mut HeaderMap, &mut Vec<String>, &str);
        let carriers: [(&str, Put); 9] = [
            ("Authorization MediaBrowser", |h, _, t| {
                h.append(
                    "authorization",
                    format!("MediaBrowser Client=\"c\", Token=\"{t}\"")
                        .parse()
                        .unwrap(),
                );
            }),
            ("Authorization Emby", |h, _, t| {
                h.append(
                    "authorization",
                    format!("Emby Token=\"{t}\"").parse().unwrap(),
                );
            }),
            ("X-Emby-Authorization", |h, _, t| {
                h.append(
                    "x-emby-authorization",
                    format!("MediaBrowser Token=\"{t}\"").parse().unwrap(),
                );
            }),
            ("X-Emby-Token", |h, _, t| {
                h.append("x-emby-token", t.parse().unwrap());
            }),
            ("X-MediaBrowser-Token", |h, _, t| {
                h.append("x-mediabrowser-token", t.parse().unwrap());
            }),
            ("?ApiKey", |_, q, t| q.push(format!("ApiKey={t}"))),
            ("?api_key", |_, q, t| q.push(format!("api_key={t}"))),
            ("?APIKEY", |_, q, t| q.push(format!("APIKEY={t}"))),
            ("?X-Emby-Token", |_, q, t| {
                q.push(format!("X-Emby-Token={t}"))
            }),
        ];
        let mut pairs = 0;
        for (first, put_first) in &carriers {
            for (second, put_second) in &carriers {
                for (b, expect) in [("tokenB", Err(CarrierError::TwoTokens)), ("tokenA", Ok(()))] {
                    let (mut h, mut q) = (HeaderMap::new(), Vec::new());
                    put_first(&mut h, &mut q, "tokenA");
                    put_second(&mut h, &mut q, b);
                    let query = q.join("&");
                    let got = extract(
                        &h,
                        Some(&query).filter(|q| !q.is_empty()).map(|q| q.as_str()),
                    );
                    match expect {
                        Err(e) => assert_eq!(got.err(), Some(e), "{first} + {second}"),
                        Ok(()) => assert_eq!(
                            got.map(|c| c.token),
                            Ok(Some("tokenA".to_string())),
                            "{first} + {second}"
                        ),
                    }
                    pairs += 1;
                }
            }
        }
        assert_eq!(pairs, 9 * 9 * 2);
    }
}
