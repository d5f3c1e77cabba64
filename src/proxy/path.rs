//! The one canonical path of a request, computed once before routing. Ambiguous forms are
//! refused rather than normalised: dot segments (raw or encoded), encoded slashes and
//! backslashes, raw backslashes, control bytes, empty segments, invalid percent-encoding,
//! double encoding (`%25` followed by two hex digits, which a second decoder would turn into
//! anything above), `;` path parameters, a raw `#`, and paths that are not UTF-8 once decoded. Because none of those can pass, the raw path that is
//! forwarded names exactly the resource the canonical path was judged by.

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with /")]
    NotAbsolute,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a control character")]
    ControlCharacter,
    #[error("the path has an invalid percent-encoding")]
    BadPercentEncoding,
    #[error("the path has an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the path has an encoded backslash (%5C)")]
    EncodedBackslash,
    #[error("the path has an encoded dot (%2E)")]
    EncodedDot,
    #[error("the path has a . or .. segment")]
    DotSegment,
    #[error("the path has an empty segment (//)")]
    EmptySegment,
    #[error("the path is percent-encoded twice (%25 followed by hex digits)")]
    DoubleEncoding,
    #[error("the path holds a ; (path parameter) or a raw #")]
    Delimiter,
    #[error("the path is not UTF-8 once decoded")]
    NotUtf8,
    #[error("the path is too long")]
    TooLong,
}

/// Longest accepted path, in bytes.
pub const MAX_PATH_BYTES: usize = 8192;

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes and checks a raw request path (without the query).
pub fn canonicalize(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err(PathError::Backslash),
            b';' | b'#' => return Err(PathError::Delimiter),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadPercentEncoding);
                };
                let d = h * 16 + l;
                match d {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::EncodedBackslash),
                    b'.' => return Err(PathError::EncodedDot),
                    b'%' if bytes.get(i + 3).copied().and_then(hex).is_some()
                        && bytes.get(i + 4).copied().and_then(hex).is_some() =>
                    {
                        return Err(PathError::DoubleEncoding)
                    }
                    0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                    _ => out.push(d),
                }
                i += 3;
                continue;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    let path = String::from_utf8(out).map_err(|_| PathError::NotUtf8)?;
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, s) in segments.iter().enumerate() {
        if *s == "." || *s == ".." {
            return Err(PathError::DotSegment);
        }
        if s.is_empty() && n != last {
            return Err(PathError::EmptySegment);
        }
    }
    Ok(path)
}

/// Whether `path` is `prefix` or lies below it on a segment boundary. A prefix ending in `/`
/// matches anything that starts with it.
pub fn under(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_decode() {
        assert_eq!(canonicalize("/").unwrap(), "/");
        assert_eq!(canonicalize("/a%20b/c.txt").unwrap(), "/a b/c.txt");
        assert_eq!(canonicalize("/web/").unwrap(), "/web/");
        assert_eq!(canonicalize("/caf%C3%A9").unwrap(), "/café");
        assert_eq!(
            canonicalize("/100%25").unwrap(),
            "/100%",
            "a lone encoded % is fine"
        );
        assert_eq!(
            canonicalize("/a%3Bb").unwrap(),
            "/a;b",
            "an encoded ; is data"
        );
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let cases = [
            ("/a/../b", PathError::DotSegment),
            ("/a/./b", PathError::DotSegment),
            ("/..", PathError::DotSegment),
            ("/a/%2e%2e/b", PathError::EncodedDot),
            ("/a/%2E/b", PathError::EncodedDot),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%5cb", PathError::EncodedBackslash),
            ("/a\\b", PathError::Backslash),
            ("/a%00b", PathError::ControlCharacter),
            ("/a\0b", PathError::ControlCharacter),
            ("/a%zz", PathError::BadPercentEncoding),
            ("/a%4", PathError::BadPercentEncoding),
            ("/a%ff", PathError::NotUtf8),
            ("/a//b", PathError::EmptySegment),
            ("a", PathError::NotAbsolute),
            ("/web/%252e%252e/Users/Me", PathError::DoubleEncoding),
            ("/a%252Fb", PathError::DoubleEncoding),
            ("/a;jsessionid=1/b", PathError::Delimiter),
            ("/a#b", PathError::Delimiter),
        ];
        for (raw, want) in cases {
            assert_eq!(canonicalize(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn under_respects_segment_boundaries() {
        assert!(under("/health", "/health"));
        assert!(under("/health/x", "/health"));
        assert!(!under("/healthz", "/health"));
        assert!(under("/static/a.js", "/static/"));
        assert!(under("/anything", "/"));
    }
}
