//! The strict HTTP/1 front door (security checklist, design rule 2): requests whose framing or
//! head could be read two ways — by the gateway and by the upstream, or by two hops — are refused
//! with 400 and the connection closed, before any routing. Each check closes a class of request
//! smuggling or header confusion:
//!
//! - framing: `Content-Length` together with `Transfer-Encoding`; several or malformed
//!   `Content-Length` values; any `Transfer-Encoding` other than one `chunked`; any
//!   `Transfer-Encoding` on HTTP/1.0;
//! - the head as bytes: a line ending in a bare LF, obs-fold continuation lines, NUL or other
//!   control bytes;
//! - target and host: no `Host` on HTTP/1.1, several `Host` headers, an absolute-form target
//!   naming another authority than `Host`;
//! - `Upgrade: h2c` (and `HTTP2-Settings`): a cleartext HTTP/2 upgrade would tunnel past every
//!   later check;
//! - `_` in the name of a header the gateway treats as identity or routing (`Remote_User`,
//!   `X_Forwarded_For`, …): some upstreams read underscores as dashes.

use pingora::http::RequestHeader;

use super::forward;
use crate::metrics::RejectReason;

/// Why a request was refused at the front door.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Ambiguous or malformed message framing (Content-Length, Transfer-Encoding).
    Framing(&'static str),
    /// A malformed request head (line endings, folding, control bytes, Host, names).
    Head(&'static str),
    /// A protocol upgrade the gateway does not proxy (h2c).
    Upgrade,
}

impl Violation {
    pub fn reason(self) -> RejectReason {
        match self {
            Violation::Framing(_) => RejectReason::BadFraming,
            Violation::Head(_) => RejectReason::BadHead,
            Violation::Upgrade => RejectReason::UpgradeRefused,
        }
    }

    pub fn detail(self) -> &'static str {
        match self {
            Violation::Framing(d) | Violation::Head(d) => d,
            Violation::Upgrade => "h2c upgrade",
        }
    }
}

/// Checks a request head; `raw` is the head as received, when the connection is HTTP/1.
pub fn check(raw: Option<&[u8]>, req: &RequestHeader) -> Result<(), Violation> {
    let mut framing = Framing::default();
    match raw {
        Some(raw) => {
            check_raw(raw)?;
            // The head as received: the parsed form may already have dropped a
            // Content-Length that came with a Transfer-Encoding.
            // Every line after the request line; only Content-Length and Transfer-Encoding
            // are noted, so other lines are passed over by their first byte.
            for nl in memchr::memchr_iter(b'\n', raw) {
                let rest = &raw[nl + 1..];
                if !matches!(rest.first(), Some(b'c' | b'C' | b't' | b'T')) {
                    continue;
                }
                let line = memchr::memchr(b'\n', rest).map_or(rest, |end| &rest[..end]);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if let Some(colon) = line.iter().position(|b| *b == b':') {
                    framing.note(&line[..colon], line[colon + 1..].trim_ascii());
                }
            }
        }
        None => {
            for (name, value) in req.headers.iter() {
                framing.note(name.as_str().as_bytes(), value.as_bytes());
            }
        }
    }
    framing.check(req.version)?;
    check_host(req)?;
    check_upgrade(req)?;
    check_names(req)
}

/// The message-length fields of a head: how many of each, and the first value.
#[derive(Default)]
struct Framing<'a> {
    content_lengths: usize,
    content_length: Option<&'a [u8]>,
    transfer_encodings: usize,
    transfer_encoding: Option<&'a [u8]>,
}

impl<'a> Framing<'a> {
    fn note(&mut self, name: &[u8], value: &'a [u8]) {
        if name.eq_ignore_ascii_case(b"content-length") {
            self.content_lengths += 1;
            self.content_length.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encodings += 1;
            self.transfer_encoding.get_or_insert(value);
        }
    }

    fn check(&self, version: http::Version) -> Result<(), Violation> {
        if self.content_lengths > 1 {
            return Err(Violation::Framing("several Content-Length headers"));
        }
        if let Some(v) = self.content_length {
            let v = v.trim_ascii();
            if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
                return Err(Violation::Framing("malformed Content-Length"));
            }
        }
        let Some(te) = self.transfer_encoding else {
            return Ok(());
        };
        if self.content_lengths > 0 {
            return Err(Violation::Framing("Content-Length with Transfer-Encoding"));
        }
        if version == http::Version::HTTP_10 || version == http::Version::HTTP_09 {
            return Err(Violation::Framing("Transfer-Encoding on HTTP/1.0"));
        }
        if self.transfer_encodings > 1 || !te.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return Err(Violation::Framing("Transfer-Encoding other than chunked"));
        }
        Ok(())
    }
}

/// Bytes looked at together when searching for control bytes.
const BLOCK: usize = 16;

fn check_raw(raw: &[u8]) -> Result<(), Violation> {
    // Nearly every byte of a head is printable: a block without a control byte is passed over
    // with one branch-free test (which the compiler turns into vector compares), and only the
    // bytes of blocks that have one (line ends, tabs, anything worse) are looked at one by one.
    let mut blocks = raw.chunks_exact(BLOCK);
    let mut at = 0;
    for block in blocks.by_ref() {
        let block: &[u8; BLOCK] = block.try_into().unwrap_or(&[0; BLOCK]);
        let control = block
            .iter()
            .fold(false, |any, &b| any | (b < 0x20) | (b == 0x7f));
        if control {
            for i in at..at + BLOCK {
                check_byte(raw, i)?;
            }
        }
        at += BLOCK;
    }
    for i in at..at + blocks.remainder().len() {
        check_byte(raw, i)?;
    }
    Ok(())
}

/// The byte at `i` of a head, with what follows and precedes it.
fn check_byte(raw: &[u8], i: usize) -> Result<(), Violation> {
    match raw[i] {
        b'\n' => {
            if i == 0 || raw[i - 1] != b'\r' {
                return Err(Violation::Head("bare LF line ending"));
            }
            // A line that starts with a space or tab continues the previous one (obs-fold);
            // the head's own end (CR LF CR LF) is followed by the body, not looked at here.
            if matches!(raw.get(i + 1), Some(b' ' | b'\t')) {
                return Err(Violation::Head("obs-fold"));
            }
        }
        b'\r' if raw.get(i + 1) != Some(&b'\n') => {
            return Err(Violation::Head("bare CR"));
        }
        b'\r' | b'\t' => {}
        0x00..=0x1f | 0x7f => return Err(Violation::Head("control byte")),
        _ => {}
    }
    Ok(())
}

fn check_host(req: &RequestHeader) -> Result<(), Violation> {
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Violation::Head("several Host headers"));
    }
    if first.is_none() && req.version == http::Version::HTTP_11 {
        return Err(Violation::Head("no Host header"));
    }
    if let (Some(authority), Some(host)) = (req.uri.authority(), first) {
        let same = host
            .to_str()
            .is_ok_and(|h| h.eq_ignore_ascii_case(authority.as_str()));
        if !same {
            return Err(Violation::Head(
                "absolute-form target names another authority",
            ));
        }
    }
    Ok(())
}

fn check_upgrade(req: &RequestHeader) -> Result<(), Violation> {
    let h2c = req.headers.get_all(http::header::UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
    });
    if h2c || req.headers.contains_key("http2-settings") {
        return Err(Violation::Upgrade);
    }
    Ok(())
}

fn check_names(req: &RequestHeader) -> Result<(), Violation> {
    for name in req.headers.keys() {
        let n = name.as_str();
        if n.contains('_') && forward::is_reserved(n, None) {
            return Err(Violation::Head(
                "underscore in an identity or routing header",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: http::Version, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", target.as_bytes(), None).unwrap();
        r.set_version(version);
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    /// The byte-at-a-time reading `check_raw` must agree with.
    fn raw_one_by_one(raw: &[u8]) -> Result<(), Violation> {
        (0..raw.len()).try_for_each(|i| check_byte(raw, i))
    }

    #[test]
    fn the_block_scan_finds_what_a_byte_scan_finds() {
        let head = b"GET /a HTTP/1.1\r\nHost: example.org\r\nAuthorization: Bearer abc.def\r\nAccept: */*\r\n\r\n";
        assert_eq!(check_raw(head), Ok(()));
        for at in 0..=head.len() {
            for b in [0u8, b'\r', b'\n', b'\t', b' ', 0x1f, 0x7f, b'x'] {
                let mut bad = head.to_vec();
                bad.insert(at, b);
                assert_eq!(check_raw(&bad), raw_one_by_one(&bad), "{b:#x} at {at}");
                let mut replaced = head.to_vec();
                if at < replaced.len() {
                    replaced[at] = b;
                    assert_eq!(
                        check_raw(&replaced),
                        raw_one_by_one(&replaced),
                        "{b:#x} for {at}"
                    );
                }
            }
        }
        for len in 0..40 {
            let short = &head[..len];
            assert_eq!(check_raw(short), raw_one_by_one(short), "first {len} bytes");
        }
    }

    fn v11(headers: &[(&str, &str)]) -> RequestHeader {
        req(http::Version::HTTP_11, "/x", headers)
    }

    #[test]
    fn framing_must_be_unambiguous() {
        let ok = [
            v11(&[("host", "a"), ("content-length", "5")]),
            v11(&[("host", "a"), ("transfer-encoding", "chunked")]),
            v11(&[("host", "a"), ("transfer-encoding", " Chunked ")]),
            v11(&[("host", "a")]),
        ];
        for r in ok {
            assert_eq!(check(None, &r), Ok(()), "{:?}", r.headers);
        }
        let bad = [
            v11(&[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked"),
            ]),
            v11(&[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5"),
            ]),
            v11(&[("host", "a"), ("content-length", "5, 5")]),
            v11(&[("host", "a"), ("content-length", "+5")]),
            v11(&[("host", "a"), ("content-length", "")]),
            v11(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]),
            v11(&[
                ("host", "a"),
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ]),
            v11(&[("host", "a"), ("transfer-encoding", "identity")]),
            req(
                http::Version::HTTP_10,
                "/x",
                &[("transfer-encoding", "chunked")],
            ),
        ];
        for r in bad {
            assert!(
                matches!(check(None, &r), Err(Violation::Framing(_))),
                "{:?}",
                r.headers
            );
        }
    }

    #[test]
    fn the_head_must_be_plain_crlf_text() {
        let r = v11(&[("host", "a")]);
        assert_eq!(
            check(Some(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), &r),
            Ok(())
        );
        assert_eq!(
            check(Some(b"GET / HTTP/1.1\r\nX: a\tb\r\n\r\n"), &r),
            Ok(())
        );
        for raw in [
            &b"GET / HTTP/1.1\nHost: a\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\x7f\r\n\r\n",
        ] {
            assert!(
                matches!(check(Some(raw), &r), Err(Violation::Head(_))),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn host_target_upgrade_and_names() {
        assert!(check(None, &v11(&[("host", "a"), ("host", "b")])).is_err());
        assert!(check(None, &v11(&[])).is_err());
        assert_eq!(
            check(None, &req(http::Version::HTTP_10, "/x", &[])),
            Ok(()),
            "HTTP/1.0 needs no Host"
        );
        let abs = |host: &str| {
            let mut r = req(http::Version::HTTP_11, "/x", &[("host", host)]);
            r.set_uri(http::Uri::from_static("http://a.example/x"));
            r
        };
        assert_eq!(check(None, &abs("A.example")), Ok(()));
        assert!(check(None, &abs("b.example")).is_err());
        assert_eq!(
            check(None, &v11(&[("host", "a"), ("upgrade", "h2c")])),
            Err(Violation::Upgrade)
        );
        assert_eq!(
            check(None, &v11(&[("host", "a"), ("upgrade", "websocket")])),
            Ok(())
        );
        for name in [
            "remote_user",
            "x_forwarded_for",
            "x_auth_request_user",
            "x_real_ip",
        ] {
            assert!(
                check(None, &v11(&[("host", "a"), (name, "admin")])).is_err(),
                "{name}"
            );
        }
        assert_eq!(
            check(None, &v11(&[("host", "a"), ("x_custom", "1")])),
            Ok(())
        );
    }
}
