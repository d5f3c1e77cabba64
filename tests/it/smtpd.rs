//! A real SMTP server for the tests: PyPI `aiosmtpd` (installed under `target/tools/aiosmtpd` by
//! `tests/mail/install.sh`, which `scripts/test` runs), started by this harness from
//! `tests/mail/smtpd.py` on an ephemeral loopback port, with a test CA made by rcgen.
//!
//! The server writes every message it accepts to a directory as one JSON file (envelope and raw
//! message); [`Smtpd::messages`] reads them back and parses the MIME enough for the tests (the
//! subject with its RFC 2047 words decoded, the text/plain and text/html parts of a
//! multipart/alternative message or a single text part, quoted-printable or base64), which is
//! what the gateway's `lettre` produces. Options: STARTTLS (optionally required), implicit TLS,
//! AUTH PLAIN/LOGIN with one user, a sender refused with 550, and the first N DATA commands
//! answered 451. Readiness is polled: the server's `READY` line, then its `220` greeting (no
//! fixed sleeps).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::harness::{free_port, poll_until, write_certificates};

/// The repository, where the server script and its installed packages are.
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// How long the server may take to listen and greet after it is started.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long one client (smtplib) may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The exit status of `smtpd.py` when it cannot listen (e.g. the port was taken meanwhile).
const CANNOT_LISTEN: i32 = 3;

/// What the server offers and demands. The default is plain SMTP without AUTH.
#[derive(Default, Clone, Debug)]
pub struct SmtpdOptions {
    /// Offer STARTTLS (with the certificate signed by [`Smtpd::ca_file`]'s CA).
    pub starttls: bool,
    /// Refuse mail (530) until the client has done STARTTLS. Implies `starttls`.
    pub require_starttls: bool,
    /// Implicit TLS (SMTPS) from the first byte instead of plain SMTP. Excludes `starttls`.
    pub implicit_tls: bool,
    /// Require AUTH (PLAIN or LOGIN) with this user and password. Where STARTTLS is offered,
    /// AUTH is refused before it (538); otherwise (plain or implicit TLS) it is allowed as is.
    pub auth: Option<(String, String)>,
    /// Answer `550` to `MAIL FROM:<this address>` (compared case-insensitively).
    pub reject_from: Option<String>,
    /// Answer `451` to the first N DATA commands (counted across restarts).
    pub tempfail: u32,
}

/// A running aiosmtpd on `127.0.0.1:port` with its certificates, log and received messages in a
/// temporary directory. Dropping it kills the server; the directory goes with it.
pub struct Smtpd {
    /// The port on 127.0.0.1 (SMTP, or SMTPS with `implicit_tls`).
    pub port: u16,
    /// The test CA (PEM) that signed the server's certificate (SANs `localhost` and
    /// `127.0.0.1`); generated whatever the options.
    pub ca_file: PathBuf,
    dir: tempfile::TempDir,
    options: SmtpdOptions,
    child: Option<Child>,
}

/// One received message, parsed enough for the tests.
#[derive(Debug, Clone)]
pub struct Mail {
    /// The envelope sender (`MAIL FROM`).
    pub from: String,
    /// The envelope recipients (`RCPT TO`), in order.
    pub to: Vec<String>,
    /// The Subject header, its RFC 2047 encoded words decoded (empty if there is none).
    pub subject: String,
    /// Every header of the message (unfolded, values with leading whitespace trimmed), in order.
    pub headers: Vec<(String, String)>,
    /// The text/plain part (or the whole body of a message that is not multipart),
    /// transfer-decoded, as UTF-8, with CRLF line breaks turned into LF.
    pub text: String,
    /// The text/html part, decoded the same way, if there is one.
    pub html: Option<String>,
    /// The message as received (CRLF line breaks, dot-unstuffed).
    pub raw: String,
}

impl Smtpd {
    /// Plain SMTP without AUTH; it greets on `port` when this returns.
    pub async fn start() -> Smtpd {
        Smtpd::start_with(SmtpdOptions::default()).await
    }

    /// Starts the server with `options`; it serves on `port` when this returns.
    pub async fn start_with(options: SmtpdOptions) -> Smtpd {
        assert!(
            !(options.implicit_tls && (options.starttls || options.require_starttls)),
            "implicit TLS and STARTTLS exclude each other"
        );
        let tools = Path::new(ROOT).join("target/tools/aiosmtpd/aiosmtpd");
        assert!(
            tools.is_dir(),
            "aiosmtpd is not installed under target/tools: run tests/mail/install.sh \
             (scripts/test does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("smtpd-")
            .tempdir()
            .expect("a temporary directory for smtpd");
        let ca_file = write_certificates(dir.path(), "Portcullis test SMTP CA");
        std::fs::create_dir(dir.path().join("messages")).expect("create the message directory");
        let mut smtpd = Smtpd {
            port: 0,
            ca_file,
            dir,
            options,
            child: None,
        };
        // The port is picked free, released, and taken by the server: another process may take
        // it in between, in which case the server exits at once and is tried on a new port.
        for _ in 0..5 {
            smtpd.port = free_port();
            if smtpd.spawn().await {
                return smtpd;
            }
            if !smtpd.log().contains("cannot listen") {
                panic!("smtpd did not start:\n{}", smtpd.log());
            }
        }
        panic!("no free port for smtpd:\n{}", smtpd.log());
    }

    /// Every message received so far, in arrival order (across restarts).
    pub fn messages(&self) -> Vec<Mail> {
        let dir = self.dir.path().join("messages");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("read the message directory")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".json") && !name.starts_with('.'))
            .collect();
        names.sort();
        names
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(dir.join(name))
                    .unwrap_or_else(|e| panic!("read message {name}: {e}"));
                let record: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("message {name} is not JSON ({e}): {text}"));
                let field = |key: &str| record[key].as_str().unwrap_or_default().to_string();
                let to = record["rcpt_tos"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                Mail::parse(field("mail_from"), to, field("data"))
            })
            .collect()
    }

    /// Waits until at least `n` messages have arrived and returns them all; panics with what
    /// has arrived (and the server's log) if they do not within `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Mail> {
        let arrived = poll_until(within, || {
            let count = self.message_count();
            async move { count >= n }
        })
        .await;
        let messages = self.messages();
        if !arrived {
            let got: Vec<String> = messages
                .iter()
                .map(|m| format!("from {} to {:?}:\n{}", m.from, m.to, m.raw))
                .collect();
            panic!(
                "{n} message(s) expected within {within:?}, {} arrived:\n{}\nsmtpd's log:\n{}",
                messages.len(),
                got.join("\n----\n"),
                self.log()
            );
        }
        messages
    }

    /// Stops the server at once (SIGKILL) and waits for it to exit. The messages stay.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same options and message directory
    /// (killing it first if it still runs); it serves when this returns.
    pub async fn restart(&mut self) {
        self.kill();
        if !self.spawn().await {
            panic!("smtpd did not restart:\n{}", self.log());
        }
    }

    /// The server's own output (aiosmtpd's log of every command), for diagnostics.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
    }

    /// How many messages have arrived (without reading them).
    fn message_count(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("messages"))
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                    .filter(|name| name.ends_with(".json") && !name.starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Starts the server on `self.port` and waits until it has said `READY` and (unless it
    /// speaks TLS from the first byte) greets a connection with `220`. Returns false if it
    /// exited first (its log says why).
    async fn spawn(&mut self) -> bool {
        let dir = self.dir.path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("smtpd.log"))
            .expect("smtpd's log file");
        let ready_file = dir.join("ready");
        let ready = std::fs::File::create(&ready_file).expect("smtpd's stdout file");
        let mut cmd = Command::new(python());
        cmd.arg(Path::new(ROOT).join("tests/mail/smtpd.py"))
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(dir.join("messages"));
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        let o = &self.options;
        if o.starttls || o.require_starttls {
            cmd.arg("--starttls").arg(&cert).arg(&key);
        }
        if o.require_starttls {
            cmd.arg("--require-starttls");
        }
        if o.implicit_tls {
            cmd.arg("--tls").arg(&cert).arg(&key);
        }
        if let Some((user, password)) = &o.auth {
            cmd.args(["--auth", user, password]);
        }
        if let Some(address) = &o.reject_from {
            cmd.args(["--reject-from", address]);
        }
        if o.tempfail > 0 {
            cmd.args(["--tempfail", &o.tempfail.to_string()]);
        }
        let child = cmd
            .env("PYTHONPATH", Path::new(ROOT).join("target/tools/aiosmtpd"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(ready)
            .stderr(log)
            .spawn()
            .expect("start tests/mail/smtpd.py (is python3 installed?)");
        self.child = Some(child);

        let greets = !self.options.implicit_tls;
        let port = self.port;
        let mut exited = false;
        let up = poll_until(READY_WITHIN, || {
            let exited_now = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            exited |= exited_now;
            let said_ready = std::fs::read_to_string(&ready_file)
                .is_ok_and(|out| out.lines().any(|line| line == "READY"));
            async move {
                if exited_now {
                    return true;
                }
                // READY is printed once the socket listens; the greeting shows that the
                // event loop serves it.
                said_ready
                    && (!greets || greeting(port).await.is_some_and(|g| g.starts_with("220 ")))
            }
        })
        .await;
        if exited {
            let status = self.child.take().and_then(|mut c| c.wait().ok());
            if status.and_then(|s| s.code()) != Some(CANNOT_LISTEN) {
                panic!("smtpd exited at start ({status:?}):\n{}", self.log());
            }
            return false;
        }
        if !up {
            self.kill();
            panic!(
                "smtpd did not serve within {READY_WITHIN:?}:\n{}",
                self.log()
            );
        }
        true
    }
}

impl Drop for Smtpd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The first line a connection to `127.0.0.1:port` is sent (the SMTP greeting), if any within a
/// second. The connection is then closed with QUIT.
async fn greeting(port: u16) -> Option<String> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut stream = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        stream.read_line(&mut line).await.ok()?;
        let _ = stream.get_mut().write_all(b"QUIT\r\n").await;
        Some(line)
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
}

/// The interpreter that `tests/mail/install.sh` installed for (`PYTHON`, default `python3`).
fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

// MIME, as much as the tests need.

impl Mail {
    /// Parses the raw message `raw` received from `from` for `to`.
    pub fn parse(from: String, to: Vec<String>, raw: String) -> Mail {
        let (headers, body) = split_entity(&raw);
        let subject = headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("Subject"))
            .map(|(_, value)| decode_words(value))
            .unwrap_or_default();
        let (mut text, mut html) = (None, None);
        collect_parts(&headers, &body, &mut text, &mut html);
        Mail {
            from,
            to,
            subject,
            headers,
            text: text.unwrap_or_default(),
            html,
            raw,
        }
    }

    /// The value of the first header called `name` (case-insensitive), as received (unfolded,
    /// not decoded).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every distinct http(s) URL, in order of first appearance: those in the text part, then
    /// the `href`s of the HTML part (entities decoded) not already seen.
    pub fn links(&self) -> Vec<String> {
        let mut links: Vec<String> = Vec::new();
        let html_links = self.html.as_deref().map(hrefs).unwrap_or_default();
        for url in urls_in_text(&self.text).into_iter().chain(html_links) {
            if !links.contains(&url) {
                links.push(url);
            }
        }
        links
    }
}

/// An entity's headers (unfolded) and body, line breaks normalised to LF.
fn split_entity(entity: &str) -> (Vec<(String, String)>, String) {
    let entity = entity.replace("\r\n", "\n");
    let (head, body) = match entity.find("\n\n") {
        Some(at) => (&entity[..at], &entity[at + 2..]),
        None if entity.starts_with('\n') => ("", &entity[1..]),
        None => (entity.as_str(), ""),
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        if line.starts_with([' ', '\t']) {
            // A folded line: unfolding removes the line break and keeps the whitespace.
            if let Some((_, value)) = headers.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.trim_start().to_string()));
        }
    }
    for (_, value) in &mut headers {
        let trimmed = value.trim_end().len();
        value.truncate(trimmed);
    }
    (headers, body.to_string())
}

/// The value of header `name` in `headers` (case-insensitive).
fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A `Content-Type`-like value: the lower-cased first token and the parameters (names
/// lower-cased, quoted values unquoted).
fn parse_structured(value: &str) -> (String, Vec<(String, String)>) {
    let mut pieces = split_params(value).into_iter();
    let kind = pieces
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let params = pieces
        .filter_map(|p| {
            let (name, value) = p.split_once('=')?;
            let value = value.trim();
            let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(quoted) => quoted.replace("\\\"", "\"").replace("\\\\", "\\"),
                None => value.to_string(),
            };
            Some((name.trim().to_ascii_lowercase(), value))
        })
        .collect();
    (kind, params)
}

/// Splits at the semicolons that are not inside a quoted string.
fn split_params(value: &str) -> Vec<String> {
    let mut pieces = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in value.chars() {
        let last = pieces.last_mut().expect("a piece");
        match c {
            _ if escaped => {
                escaped = false;
                last.push(c);
            }
            '\\' if quoted => {
                escaped = true;
                last.push(c);
            }
            '"' => {
                quoted = !quoted;
                last.push(c);
            }
            ';' if !quoted => pieces.push(String::new()),
            _ => last.push(c),
        }
    }
    pieces
}

/// Walks the entity (recursing into multiparts) and keeps the first inline text/plain and
/// text/html parts, decoded.
fn collect_parts(
    headers: &[(String, String)],
    body: &str,
    text: &mut Option<String>,
    html: &mut Option<String>,
) {
    let (kind, params) = header_of(headers, "Content-Type")
        .map(parse_structured)
        .unwrap_or_else(|| ("text/plain".to_string(), Vec::new()));
    if kind.starts_with("multipart/") {
        let boundary = params
            .iter()
            .find(|(name, _)| name == "boundary")
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("a multipart without a boundary: {kind}"));
        for part in multipart_parts(body, boundary) {
            let (part_headers, part_body) = split_entity(&part);
            collect_parts(&part_headers, &part_body, text, html);
        }
        return;
    }
    let attachment = header_of(headers, "Content-Disposition")
        .is_some_and(|d| parse_structured(d).0 == "attachment");
    let slot = match kind.as_str() {
        "text/plain" => text,
        "text/html" => html,
        _ => return,
    };
    if attachment || slot.is_some() {
        return;
    }
    let encoding = header_of(headers, "Content-Transfer-Encoding")
        .unwrap_or("7bit")
        .trim()
        .to_ascii_lowercase();
    let bytes = match encoding.as_str() {
        "quoted-printable" => decode_quoted_printable(body),
        "base64" => {
            let compact: String = body.split_ascii_whitespace().collect();
            base64::engine::general_purpose::STANDARD
                .decode(compact)
                .unwrap_or_else(|e| panic!("a {kind} part in bad base64 ({e}):\n{body}"))
        }
        _ => body.as_bytes().to_vec(),
    };
    *slot = Some(String::from_utf8_lossy(&bytes).replace("\r\n", "\n"));
}

/// The bodies of a multipart's parts (LF line breaks): what lies between `--boundary` lines, up
/// to `--boundary--`, the line break before each delimiter belonging to the delimiter.
fn multipart_parts(body: &str, boundary: &str) -> Vec<String> {
    let delimiter = format!("--{boundary}");
    let close = format!("--{boundary}--");
    let mut parts = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in body.split('\n') {
        let bare = line.trim_end();
        if bare == close {
            parts.extend(current.take().map(|lines| lines.join("\n")));
            return parts;
        }
        if bare == delimiter {
            parts.extend(current.take().map(|lines| lines.join("\n")));
            current = Some(Vec::new());
        } else if let Some(lines) = current.as_mut() {
            lines.push(line);
        }
    }
    // No closing delimiter: the last part runs to the end.
    parts.extend(current.map(|lines| lines.join("\n")));
    parts
}

/// Quoted-printable (RFC 2045) of LF-separated lines: `=XX` is a byte, a final `=` is a soft
/// line break, whitespace at line ends is dropped (transport padding).
fn decode_quoted_printable(body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let lines: Vec<&str> = body.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim_end_matches([' ', '\t', '\r']);
        let (line, soft) = match line.strip_suffix('=') {
            Some(rest) => (rest, true),
            None => (line, false),
        };
        let bytes = line.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            if bytes[at] == b'=' {
                let hex = line.get(at + 1..at + 3);
                if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    out.push(byte);
                    at += 3;
                    continue;
                }
            }
            out.push(bytes[at]);
            at += 1;
        }
        if !soft && i + 1 < lines.len() {
            out.push(b'\n');
        }
    }
    out
}

/// A header value with its RFC 2047 encoded words (`=?charset?B|Q?text?=`) decoded; whitespace
/// between two encoded words goes, and consecutive words' bytes are decoded together (a
/// character split between two words survives).
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut latin1 = false;
    let flush = |out: &mut String, pending: &mut Vec<u8>, latin1: bool| {
        if latin1 {
            out.extend(pending.iter().map(|&b| char::from(b)));
        } else {
            out.push_str(&String::from_utf8_lossy(pending));
        }
        pending.clear();
    };
    let mut rest = value;
    while !rest.is_empty() {
        if let Some((charset, bytes, len)) = encoded_word(rest) {
            let is_latin1 = matches!(charset.as_str(), "iso-8859-1" | "latin1" | "windows-1252");
            if !pending.is_empty() && is_latin1 != latin1 {
                flush(&mut out, &mut pending, latin1);
            }
            latin1 = is_latin1;
            pending.extend(bytes);
            rest = &rest[len..];
            continue;
        }
        let space = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        if space > 0 && !pending.is_empty() && encoded_word(&rest[space..]).is_some() {
            rest = &rest[space..];
            continue;
        }
        flush(&mut out, &mut pending, latin1);
        let c = rest.chars().next().expect("a character");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    flush(&mut out, &mut pending, latin1);
    out
}

/// The encoded word at the start of `s`: its charset (lower-cased, language dropped), its
/// bytes, and its length in `s`.
fn encoded_word(s: &str) -> Option<(String, Vec<u8>, usize)> {
    let inner = s.strip_prefix("=?")?;
    let (charset, inner) = inner.split_once('?')?;
    let (encoding, inner) = inner.split_once('?')?;
    let end = inner.find("?=")?;
    let text = &inner[..end];
    if charset.is_empty() || text.contains([' ', '\t', '?']) {
        return None;
    }
    let bytes = match encoding {
        "B" | "b" => base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        )
        .decode(text)
        .ok()?,
        "Q" | "q" => {
            let mut bytes = Vec::new();
            let raw = text.as_bytes();
            let mut at = 0;
            while at < raw.len() {
                match raw[at] {
                    b'_' => bytes.push(b' '),
                    b'=' => {
                        let hex = text.get(at + 1..at + 3)?;
                        bytes.push(u8::from_str_radix(hex, 16).ok()?);
                        at += 2;
                    }
                    b => bytes.push(b),
                }
                at += 1;
            }
            bytes
        }
        _ => return None,
    };
    // `inner` is a tail of `s`: the word ends 2 bytes after the text.
    let len = s.len() - inner.len() + end + 2;
    let charset = charset
        .split('*')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    Some((charset, bytes, len))
}

/// The http(s) URLs in plain text: from the scheme to whitespace or `<>"'`, without trailing
/// punctuation.
fn urls_in_text(text: &str) -> Vec<String> {
    let mut urls = Vec::new();
    let mut rest = text;
    loop {
        let at = [rest.find("https://"), rest.find("http://")]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = at else { break };
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | '"' | '\''))
            .unwrap_or(tail.len());
        let url = tail[..end].trim_end_matches(['.', ',', ';', ':', '!', '?', ')', ']', '}']);
        if url.len() > "https://".len() {
            urls.push(url.to_string());
        }
        rest = &tail[end.max(1)..];
    }
    urls
}

/// The http(s) `href` values of an HTML document, HTML entities decoded.
fn hrefs(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut urls = Vec::new();
    let mut from = 0;
    while let Some(found) = lower[from..].find("href") {
        let mut at = from + found + 4;
        from = at;
        let after = html[at..].trim_start();
        let Some(after) = after.strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        at = html.len() - after.len();
        let (value, len) = match after.chars().next() {
            Some(q @ ('"' | '\'')) => match after[1..].find(q) {
                Some(end) => (&after[1..1 + end], end + 2),
                None => continue,
            },
            _ => {
                let end = after
                    .find(|c: char| c.is_whitespace() || c == '>')
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        from = at + len;
        let url = decode_entities(value.trim());
        if url.starts_with("https://") || url.starts_with("http://") {
            urls.push(url);
        }
    }
    urls
}

/// `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;` and numeric character references decoded; any
/// other `&` is kept.
fn decode_entities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let decoded = rest.find(';').and_then(|end| {
            let name = &rest[1..end];
            let c = match name {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                _ => {
                    let number = name.strip_prefix('#')?;
                    let code = match number.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => number.parse().ok()?,
                    };
                    char::from_u32(code)?
                }
            };
            Some((c, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

// The harness's own test, through real clients: Python's smtplib and lettre (the gateway's).

/// An SMTP client in Python's smtplib: reads a request (JSON) on stdin, prints the outcome.
/// `mode` is `plain`, `starttls` or `tls`; the server is verified against `ca` (or the
/// system's store when `ca` is null); `auth` is `[user, password, mechanism]`.
const SMTPLIB_CLIENT: &str = r#"
import json, smtplib, ssl, sys
r = json.load(sys.stdin)
def out(**kw):
    print(json.dumps(kw))
    sys.exit(0)
try:
    ctx = ssl.create_default_context(cafile=r.get("ca"))
    if r["mode"] == "tls":
        s = smtplib.SMTP_SSL("127.0.0.1", r["port"], context=ctx, timeout=30)
    else:
        s = smtplib.SMTP("127.0.0.1", r["port"], timeout=30)
    s.ehlo("client.test")
    if r["mode"] == "starttls":
        s.starttls(context=ctx)
        s.ehlo("client.test")
    if r.get("auth"):
        user, password, mechanism = r["auth"]
        if not s.has_extn("auth"):
            raise smtplib.SMTPNotSupportedError("AUTH is not offered")
        s.user, s.password = user, password
        s.auth(mechanism, getattr(s, "auth_" + mechanism.lower()))
    s.sendmail(r["from"], r["to"], r["message"].encode("utf-8"))
    s.quit()
    out(ok=True, code=250, error="")
except smtplib.SMTPResponseException as e:
    error = e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
    out(ok=False, code=e.smtp_code, error=error)
except smtplib.SMTPRecipientsRefused as e:
    out(ok=False, code=None, error=repr(e.recipients))
except (smtplib.SMTPException, OSError) as e:
    out(ok=False, code=None, error=repr(e))
"#;

/// What the smtplib client reports.
#[derive(Debug)]
struct Reply {
    ok: bool,
    /// The server's answer to the failing command (None: the client gave up by itself).
    code: Option<u64>,
    error: String,
}

/// One message for [`smtplib`].
struct Send<'a> {
    mode: &'a str,
    ca: Option<&'a Path>,
    auth: Option<(&'a str, &'a str, &'a str)>,
    from: &'a str,
    to: &'a [&'a str],
    message: &'a str,
}

impl<'a> Send<'a> {
    fn plain(from: &'a str, to: &'a [&'a str], message: &'a str) -> Send<'a> {
        Send {
            mode: "plain",
            ca: None,
            auth: None,
            from,
            to,
            message,
        }
    }
}

/// Sends `send` to `smtpd` with Python's smtplib and returns how it went.
async fn smtplib(smtpd: &Smtpd, send: Send<'_>) -> Reply {
    use tokio::io::AsyncWriteExt as _;
    let request = serde_json::json!({
        "port": smtpd.port,
        "mode": send.mode,
        "ca": send.ca,
        "auth": send.auth.map(|(u, p, m)| [u, p, m]),
        "from": send.from,
        "to": send.to,
        "message": send.message,
    });
    let mut child = tokio::process::Command::new(python())
        .args(["-c", SMTPLIB_CLIENT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run python3");
    let mut stdin = child.stdin.take().expect("the client's stdin");
    stdin
        .write_all(request.to_string().as_bytes())
        .await
        .expect("write to the client");
    drop(stdin);
    let out: Output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the smtplib client did not finish in time")
        .expect("wait for the smtplib client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the smtplib client said no JSON ({e}): {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Reply {
        ok: reply["ok"].as_bool().expect("ok"),
        code: reply["code"].as_u64(),
        error: reply["error"].as_str().unwrap_or_default().to_string(),
    }
}

/// Sends `message` with lettre's SMTP transport, as the gateway does: STARTTLS required
/// (`implicit`: TLS from the first byte) verified against the test CA only, with `credentials`.
async fn lettre_send(
    smtpd: &Smtpd,
    implicit: bool,
    credentials: Option<(&str, &str)>,
    message: lettre::Message,
) -> Result<(), lettre::transport::smtp::Error> {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
    let pem = std::fs::read(&smtpd.ca_file).expect("read the test CA");
    let params = TlsParameters::builder("localhost".to_string())
        .certificate_store(CertificateStore::None)
        .add_root_certificate(Certificate::from_pem(&pem).expect("the test CA"))
        .build_rustls()
        .expect("TLS parameters");
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(smtpd.port)
        .timeout(Some(Duration::from_secs(30)))
        .tls(if implicit {
            Tls::Wrapper(params)
        } else {
            Tls::Required(params)
        });
    if let Some((user, password)) = credentials {
        builder = builder.credentials(Credentials::new(user.to_string(), password.to_string()));
    }
    builder.build().send(message).await.map(|_| ())
}

/// A message as the gateway builds it: multipart/alternative, a UTF-8 subject.
fn lettre_message(subject: &str, text: &str, html: &str) -> lettre::Message {
    lettre::Message::builder()
        .from("Portcullis <noreply@example.org>".parse().unwrap())
        .to("Zoë Ünal <zoe@example.org>".parse().unwrap())
        .subject(subject)
        .multipart(lettre::message::MultiPart::alternative_plain_html(
            text.to_string(),
            html.to_string(),
        ))
        .unwrap()
}

/// Asserts that `reply` is a refusal with `code` whose text contains `says`.
fn assert_refused(reply: &Reply, code: Option<u64>, says: &str, what: &str) {
    assert!(
        !reply.ok && reply.code == code && reply.error.contains(says),
        "{what}: expected a refusal {code:?} saying {says:?}, got {reply:?}"
    );
}

/// A multipart/alternative message written by hand: an RFC 2047 subject in a Q word and a B
/// word on a folded line, quoted-printable parts with soft line breaks, `=3D` and a line that
/// starts with a dot (smtplib stuffs it, aiosmtpd unstuffs it), a preamble and an epilogue.
const MULTIPART: &str = "From: Portcullis <noreply@example.org>\r\n\
To: bob@example.org\r\n\
Subject: =?UTF-8?Q?Caf=C3=A9_au_lait?=\r\n =?utf-8?B?IOKAlCDinJM=?=\r\n\
MIME-Version: 1.0\r\n\
X-Folded: one\r\n\ttwo\r\n\
Content-Type: multipart/alternative;\r\n boundary=\"b1=_x\"\r\n\
\r\n\
This is a multi-part message in MIME format.\r\n\
--b1=_x\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Caf=C3=A9 au lait: a line long enough to need a soft line break in the=\r\n \
middle, and a link https://gw.example.org/confirm?token=3Dabc&next=3D%2F.\r\n\
Trailing space=20\r\n\
.dot line\r\n\
\r\n\
--b1=_x\r\n\
Content-Type: text/html; charset=\"utf-8\"\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
<p>Caf=C3=A9 <a href=3D\"https://gw.example.org/confirm?token=3Dabc&amp;x=3D1\">con=\r\n\
firm</a></p>\r\n\
--b1=_x--\r\n\
epilogue\r\n";

/// A single text/plain part in base64 with a B-encoded subject.
const BASE64_TEXT: &str = "From: noreply@example.org\r\n\
To: bob@example.org\r\n\
Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
R3LDvMOfZSBhdXMgS8O2bG4KCkVpbiBMaW5rOiBodHRwczovL2d3LmV4YW1wbGUub3JnL3I/YT0x\r\n\
JmI9Mgo=\r\n";

#[tokio::test]
async fn smtpd_harness_receives_plain_starttls_and_authenticated_mail() {
    let within = Duration::from_secs(10);

    // Plain SMTP, no AUTH: what a client sends arrives, envelope and all.
    let began = Instant::now();
    let mut plain = Smtpd::start().await;
    eprintln!("smtpd (plain) started in {:?}", began.elapsed());
    let ca = std::fs::read_to_string(&plain.ca_file).unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    assert!(plain.messages().is_empty());
    let simple = "From: a@example.org\r\nTo: b@example.org\r\nSubject: Hello there\r\n\r\n\
                  Just text, see https://example.org/a?b=1&c=2.\r\n";
    let reply = smtplib(
        &plain,
        Send::plain("a@example.org", &["b@example.org", "c@example.org"], simple),
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    let got = plain.wait_for(1, within).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.from, "a@example.org");
    assert_eq!(m.to, ["b@example.org", "c@example.org"]);
    assert_eq!(m.subject, "Hello there");
    assert_eq!(m.header("SUBJECT"), Some("Hello there"));
    assert_eq!(m.header("to"), Some("b@example.org"));
    assert_eq!(m.header("X-Absent"), None);
    assert_eq!(m.text, "Just text, see https://example.org/a?b=1&c=2.\n");
    assert_eq!(m.html, None);
    assert_eq!(m.links(), ["https://example.org/a?b=1&c=2"]);
    assert_eq!(m.raw, simple);

    // The hand-written multipart/alternative: subject, headers, both parts, links.
    let reply = smtplib(
        &plain,
        Send::plain("noreply@example.org", &["bob@example.org"], MULTIPART),
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    let got = plain.wait_for(2, within).await;
    let m = &got[1];
    assert_eq!(m.subject, "Café au lait — ✓");
    assert_eq!(m.header("x-folded"), Some("one\ttwo"));
    assert_eq!(
        m.header("content-type"),
        Some("multipart/alternative; boundary=\"b1=_x\"")
    );
    let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "From",
            "To",
            "Subject",
            "MIME-Version",
            "X-Folded",
            "Content-Type"
        ]
    );
    assert_eq!(
        m.text,
        "Café au lait: a line long enough to need a soft line break in the middle, and a link \
         https://gw.example.org/confirm?token=abc&next=%2F.\nTrailing space \n.dot line\n"
    );
    assert_eq!(
        m.html.as_deref(),
        Some(
            "<p>Café <a href=\"https://gw.example.org/confirm?token=abc&amp;x=1\">confirm</a></p>"
        )
    );
    assert_eq!(
        m.links(),
        [
            "https://gw.example.org/confirm?token=abc&next=%2F",
            "https://gw.example.org/confirm?token=abc&x=1"
        ]
    );
    assert_eq!(m.raw, MULTIPART, "dot-stuffing is undone");

    // A base64 text part.
    let reply = smtplib(
        &plain,
        Send::plain("noreply@example.org", &["bob@example.org"], BASE64_TEXT),
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    let m = &plain.wait_for(3, within).await[2];
    assert_eq!(m.subject, "Grüße");
    assert_eq!(
        m.text,
        "Grüße aus Köln\n\nEin Link: https://gw.example.org/r?a=1&b=2\n"
    );
    assert_eq!(m.html, None);
    assert_eq!(m.links(), ["https://gw.example.org/r?a=1&b=2"]);

    // What lettre makes of a gateway-like message, sent as it is: subject, text and HTML come
    // back as they were given.
    let subject = "Grüße — a new sign-in to your account ✓ (Zoë's laptop, Köln, 127.0.0.1)";
    let text = "Hello Zoë,\n\nSomeone signed in to your account from a new device: Firefox on \
                Linux, near Köln. If this wasn't you, open this link to sign out every device \
                and choose a new password:\nhttps://gw.example.org/not-me?token=a1b2c3&user=zo%C3%AB\n\n\
                — Portcullis\n";
    let html = "<p>Hello Zoë,</p>\n<p>Someone signed in: <a href=\"https://gw.example.org/not-me?token=a1b2c3&amp;user=zo%C3%AB\">this wasn't me</a></p>\n";
    let built = lettre_message(subject, text, html);
    let formatted = String::from_utf8(built.formatted()).unwrap();
    eprintln!("lettre's message:\n{formatted}");
    let reply = smtplib(
        &plain,
        Send::plain("noreply@example.org", &["zoe@example.org"], &formatted),
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    let m = &plain.wait_for(4, within).await[3];
    assert_eq!(m.subject, subject);
    assert_eq!(m.text, text);
    assert_eq!(m.html.as_deref(), Some(html));
    assert_eq!(
        m.links(),
        ["https://gw.example.org/not-me?token=a1b2c3&user=zo%C3%AB"]
    );
    // Headers other than the subject are kept as they came, encoded words and all.
    assert_eq!(
        m.header("to"),
        Some("=?utf-8?b?Wm/DqyDDnG5hbA==?= <zoe@example.org>")
    );
    assert_eq!(
        decode_words(m.header("to").unwrap()),
        "Zoë Ünal <zoe@example.org>"
    );
    assert!(
        !formatted.contains("Grüße") && !formatted.contains("Zoë"),
        "lettre encodes non-ASCII:\n{formatted}"
    );

    // SIGTERM: the server exits cleanly; restarted, it has kept the messages.
    let mut child = plain.child.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let began = Instant::now();
    let mut exit = None;
    assert!(
        poll_until(within, || {
            exit = child.try_wait().unwrap();
            let done = exit.is_some();
            async move { done }
        })
        .await,
        "smtpd did not exit on SIGTERM:\n{}",
        plain.log()
    );
    eprintln!("smtpd exited on SIGTERM in {:?}", began.elapsed());
    assert!(exit.unwrap().success(), "{exit:?}:\n{}", plain.log());
    plain.restart().await;
    assert_eq!(plain.messages().len(), 4);
    drop(plain);

    // STARTTLS required, with AUTH.
    let options = SmtpdOptions {
        starttls: true,
        require_starttls: true,
        auth: Some(("mailer".to_string(), "s3cret pass".to_string())),
        ..SmtpdOptions::default()
    };
    let began = Instant::now();
    let tls = Smtpd::start_with(options).await;
    eprintln!("smtpd (STARTTLS, AUTH) started in {:?}", began.elapsed());
    let to = ["bob@example.org"];
    let message = "Subject: secured\r\n\r\nover STARTTLS\r\n";
    let ca = Some(tls.ca_file.as_path());
    let send = |mode, ca, auth| Send {
        mode,
        ca,
        auth,
        from: "a@example.org",
        to: &to,
        message,
    };
    let good = Some(("mailer", "s3cret pass", "PLAIN"));
    // Before STARTTLS: mail is refused, and AUTH is not even offered.
    let reply = smtplib(&tls, send("plain", None, None)).await;
    assert_refused(&reply, Some(530), "STARTTLS", "mail before STARTTLS");
    let reply = smtplib(&tls, send("plain", None, good)).await;
    assert_refused(&reply, None, "AUTH is not offered", "AUTH before STARTTLS");
    // STARTTLS is verified: a client trusting only the system's CAs refuses the certificate.
    let reply = smtplib(&tls, send("starttls", None, good)).await;
    assert_refused(&reply, None, "CERTIFICATE_VERIFY_FAILED", "an unknown CA");
    // Over STARTTLS: without AUTH, with the wrong password, with a wrong user: refused.
    let reply = smtplib(&tls, send("starttls", ca, None)).await;
    assert_refused(&reply, Some(530), "Authentication required", "no AUTH");
    let reply = smtplib(
        &tls,
        send("starttls", ca, Some(("mailer", "wrong", "PLAIN"))),
    )
    .await;
    assert_refused(&reply, Some(535), "credentials invalid", "a wrong password");
    let reply = smtplib(
        &tls,
        send("starttls", ca, Some(("other", "s3cret pass", "LOGIN"))),
    )
    .await;
    assert_refused(&reply, Some(535), "credentials invalid", "a wrong user");
    assert!(tls.messages().is_empty());
    // The right credentials, with PLAIN and with LOGIN.
    let reply = smtplib(&tls, send("starttls", ca, good)).await;
    assert!(reply.ok, "{reply:?}");
    let reply = smtplib(
        &tls,
        send("starttls", ca, Some(("mailer", "s3cret pass", "LOGIN"))),
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    // lettre as the gateway uses it: refused without or with wrong credentials, then sent.
    let lettre_refused = lettre_send(&tls, false, None, lettre_message(subject, text, html))
        .await
        .unwrap_err();
    assert!(lettre_refused.is_permanent(), "{lettre_refused}");
    let lettre_refused = lettre_send(
        &tls,
        false,
        Some(("mailer", "nope")),
        lettre_message(subject, text, html),
    )
    .await
    .unwrap_err();
    assert!(lettre_refused.is_permanent(), "{lettre_refused}");
    lettre_send(
        &tls,
        false,
        Some(("mailer", "s3cret pass")),
        lettre_message(subject, text, html),
    )
    .await
    .unwrap();
    let got = tls.wait_for(3, within).await;
    assert_eq!(got.len(), 3, "only what was accepted arrived");
    assert_eq!(got[0].subject, "secured");
    assert_eq!(got[0].text, "over STARTTLS\n");
    assert_eq!(got[2].from, "noreply@example.org");
    assert_eq!(got[2].to, ["zoe@example.org"]);
    assert_eq!(got[2].subject, subject);
    assert_eq!(got[2].text, text);
    assert_eq!(got[2].html.as_deref(), Some(html));
    drop(tls);

    // Implicit TLS with AUTH, a refused sender and one temporary failure.
    let options = SmtpdOptions {
        implicit_tls: true,
        auth: Some(("mailer".to_string(), "pw".to_string())),
        reject_from: Some("Blocked@Example.org".to_string()),
        tempfail: 1,
        ..SmtpdOptions::default()
    };
    let began = Instant::now();
    let mut smtps = Smtpd::start_with(options).await;
    eprintln!("smtpd (implicit TLS) started in {:?}", began.elapsed());
    let smtps_ca = smtps.ca_file.clone();
    let ca = Some(smtps_ca.as_path());
    let auth = Some(("mailer", "pw", "PLAIN"));
    let from = |from| Send {
        mode: "tls",
        ca,
        auth,
        from,
        to: &to,
        message: "Subject: over SMTPS\r\n\r\nbody\r\n",
    };
    let reply = smtplib(&smtps, from("blocked@example.org")).await;
    assert_refused(&reply, Some(550), "Sender refused", "the refused sender");
    let reply = smtplib(&smtps, from("a@example.org")).await;
    assert_refused(&reply, Some(451), "try again", "the temporary failure");
    assert!(smtps.messages().is_empty());
    let reply = smtplib(&smtps, from("a@example.org")).await;
    assert!(reply.ok, "the retry: {reply:?}");
    let refused = lettre_send(
        &smtps,
        true,
        Some(("mailer", "pw")),
        lettre::Message::builder()
            .from("blocked@example.org".parse().unwrap())
            .to("bob@example.org".parse().unwrap())
            .subject("refused")
            .body("x".to_string())
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        refused.is_permanent(),
        "550 is permanent for lettre: {refused}"
    );
    lettre_send(
        &smtps,
        true,
        Some(("mailer", "pw")),
        lettre_message(subject, text, html),
    )
    .await
    .unwrap();
    let got = smtps.wait_for(2, within).await;
    assert_eq!(got[0].subject, "over SMTPS");
    assert_eq!(got[1].subject, subject);

    // Killed, the server refuses connections; restarted on the same port, it keeps what it had,
    // accepts more (the temporary failure is not repeated) and adds it after.
    smtps.kill();
    let reply = smtplib(&smtps, from("a@example.org")).await;
    assert_refused(&reply, None, "ConnectionRefusedError", "a killed server");
    let began = Instant::now();
    let port = smtps.port;
    smtps.restart().await;
    eprintln!("smtpd (implicit TLS) restarted in {:?}", began.elapsed());
    assert_eq!(smtps.port, port);
    assert_eq!(smtps.messages().len(), 2);
    let reply = smtplib(
        &smtps,
        Send {
            message: "Subject: after the restart\r\n\r\nstill here\r\n",
            ..from("c@example.org")
        },
    )
    .await;
    assert!(reply.ok, "{reply:?}");
    let got = smtps.wait_for(3, within).await;
    let subjects: Vec<&str> = got.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(subjects, ["over SMTPS", subject, "after the restart"]);
    assert_eq!(got[2].from, "c@example.org");

    // Encoded words: a character split between two words, Latin-1, text around words (which
    // keeps its spaces), and things that only look like words.
    assert_eq!(
        decode_words("=?utf-8?q?caf=C3?= \t=?UTF-8?Q?=A9?= ok"),
        "café ok"
    );
    assert_eq!(
        decode_words("=?iso-8859-1?q?K=F6ln?= a =?utf-8*en?b?w7w=?="),
        "Köln a ü"
    );
    assert_eq!(
        decode_words("=?utf-8?x?abc?= =? x ?= 1+1=2"),
        "=?utf-8?x?abc?= =? x ?= 1+1=2"
    );
}
