//! `[mail]`: the SMTP server the gateway sends its mail through, in file form and validated
//! form. The password file is read when the gateway starts (see `crate::mail`); the templates
//! directory is checked here (an oversized or unreadable template is refused by check-config).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Validator};

/// How long one SMTP conversation may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The wait before the first retry of a message that could not be sent.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(30);
/// The largest template file accepted.
pub const MAX_TEMPLATE_BYTES: u64 = 64 * 1024;
/// Every kind of message, by its template's name.
pub const KINDS: &[&str] = &[
    "test",
    "password_reset",
    "confirm_email",
    "email_changed",
    "new_sign_in",
    "password_changed",
    "two_factor_enabled",
    "two_factor_disabled",
    "passkey_added",
    "passkey_removed",
    "signed_out_everywhere",
    "account_changed_by_admin",
    "breach_response",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileMail {
    host: String,
    port: Option<u16>,
    tls: Option<String>,
    allow_insecure: Option<bool>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    from: String,
    ca_file: Option<PathBuf>,
    templates_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_initial: Option<Duration>,
    new_sign_in_alerts: Option<bool>,
}

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailTls {
    /// STARTTLS, required (never falls back to plain text).
    StartTls,
    /// TLS from the first byte (SMTPS, port 465).
    Implicit,
    /// None: only to this host, or when insisted on.
    None,
}

/// The validated `[mail]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct MailConfig {
    pub host: String,
    pub port: u16,
    pub tls: MailTls,
    /// Username, and the file holding the password (read at start).
    pub credentials: Option<(String, PathBuf)>,
    /// The From header: an address, with a display name or without.
    pub from: String,
    pub ca_file: Option<PathBuf>,
    /// Files named `KIND.subject`, `KIND.txt` and `KIND.html` that replace the built-in
    /// templates of that kind.
    pub templates_dir: Option<PathBuf>,
    pub timeout: Duration,
    /// The wait before the first retry of a message that could not be sent (doubling after
    /// each further failure, up to an hour).
    pub retry_initial: Duration,
    /// Mail a user when their account signs in from a device or network not seen before.
    pub new_sign_in_alerts: bool,
}

/// Whether `text` is one email address as the gateway accepts them: `local@domain`, printable
/// ASCII without spaces, angle brackets, quotes, commas or line breaks, at most 254 bytes.
pub fn valid_address(text: &str) -> bool {
    let ok_chars = text.bytes().all(|b| {
        b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'"' | b',' | b';' | b'(' | b')' | b'\\')
    });
    let Some((local, domain)) = text.rsplit_once('@') else {
        return false;
    };
    ok_chars
        && text.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && !domain.is_empty()
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain.contains('.')
        && !domain.contains('@')
        && text.parse::<lettre::Address>().is_ok()
}

impl Validator {
    pub(super) fn mail(&self, m: Option<FileMail>) -> Result<Option<MailConfig>, ConfigError> {
        let Some(m) = m else { return Ok(None) };
        let key = |k: &str| format!("mail.{k}");
        let host = m.host.trim().to_string();
        if host.is_empty()
            || host.bytes().any(|b| {
                !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
            })
        {
            return Err(self.err(&key("host"), format!("`{}` is not a host name", m.host)));
        }
        let tls = match m.tls.as_deref().unwrap_or("starttls") {
            "starttls" => MailTls::StartTls,
            "tls" | "implicit" => MailTls::Implicit,
            "none" => MailTls::None,
            other => {
                return Err(self.err(
                    &key("tls"),
                    format!("`{other}` is not starttls, tls or none"),
                ))
            }
        };
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback());
        if tls == MailTls::None && !loopback && !m.allow_insecure.unwrap_or(false) {
            return Err(self.err(
                &key("tls"),
                "without TLS, reset links and the SMTP password would cross the network in the \
                 clear: use starttls or tls (allow_insecure = true to insist)",
            ));
        }
        let port = m.port.unwrap_or(match tls {
            MailTls::StartTls => 587,
            MailTls::Implicit => 465,
            MailTls::None => 25,
        });
        if port == 0 {
            return Err(self.err(&key("port"), "must be 1 to 65535"));
        }
        let credentials = match (m.username, m.password_file) {
            (None, None) => None,
            (Some(u), Some(p)) if !u.is_empty() && !u.contains(['\r', '\n']) => Some((u, p)),
            (Some(_), Some(_)) => {
                return Err(self.err(&key("username"), "must not be empty or hold a line break"))
            }
            (Some(_), None) => {
                return Err(self.err(&key("password_file"), "required with username"))
            }
            (None, Some(_)) => {
                return Err(self.err(&key("username"), "required with password_file"))
            }
        };
        let from = m.from.trim().to_string();
        if from.contains(['\r', '\n']) || from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(self.err(
                &key("from"),
                format!(
                    "`{}` is not an address such as portcullis@example.org or \
                     \"Portcullis\" <portcullis@example.org>",
                    m.from.escape_debug()
                ),
            ));
        }
        if let Some(dir) = &m.templates_dir {
            self.templates(dir)?;
        }
        let timeout = self.positive(&key("timeout"), m.timeout, DEFAULT_TIMEOUT)?;
        let retry_initial = self.positive(
            &key("retry_initial"),
            m.retry_initial,
            DEFAULT_RETRY_INITIAL,
        )?;
        Ok(Some(MailConfig {
            host,
            port,
            tls,
            credentials,
            from,
            ca_file: m.ca_file,
            templates_dir: m.templates_dir,
            timeout,
            retry_initial,
            new_sign_in_alerts: m.new_sign_in_alerts.unwrap_or(true),
        }))
    }

    /// Every template file in `dir` must be one of the known kinds, readable UTF-8 and no
    /// larger than [`MAX_TEMPLATE_BYTES`]; a subject must be one line.
    fn templates(&self, dir: &std::path::Path) -> Result<(), ConfigError> {
        let key = "mail.templates_dir";
        let entries = std::fs::read_dir(dir)
            .map_err(|e| self.err(key, format!("cannot read `{}`: {e}", dir.display())))?;
        for entry in entries {
            let path = entry
                .map_err(|e| self.err(key, format!("cannot read `{}`: {e}", dir.display())))?
                .path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some((kind, ext)) = name.rsplit_once('.') else {
                continue;
            };
            if !matches!(ext, "subject" | "txt" | "html") {
                continue;
            }
            if !KINDS.contains(&kind) {
                return Err(self.err(
                    key,
                    format!(
                        "`{name}`: `{kind}` is not a kind of message ({})",
                        KINDS.join(", ")
                    ),
                ));
            }
            let size = std::fs::metadata(&path)
                .map(|m| m.len())
                .unwrap_or(u64::MAX);
            if size > MAX_TEMPLATE_BYTES {
                return Err(self.err(
                    key,
                    format!("`{name}` is larger than {MAX_TEMPLATE_BYTES} bytes"),
                ));
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|e| self.err(key, format!("`{name}`: {e}")))?;
            if ext == "subject" && text.trim_end_matches(['\r', '\n']).contains(['\r', '\n']) {
                return Err(self.err(key, format!("`{name}`: a subject is one line")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EnvOverrides};
    use std::path::Path;

    fn parse(section: &str) -> Result<Config, ConfigError> {
        let text =
            format!("[[route]]\nname = \"app\"\nupstream = \"127.0.0.1:1\"\n\n[mail]\n{section}");
        Config::parse(&text, Path::new("t.toml"), &EnvOverrides::default())
    }

    fn refused_key(section: &str) -> String {
        match parse(section) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_starttls_on_587_and_alerts_on() {
        let c = parse("host = \"smtp.example.org\"\nfrom = \"gw@example.org\"\n")
            .unwrap()
            .mail
            .unwrap();
        assert_eq!((c.tls, c.port), (MailTls::StartTls, 587));
        assert!(c.new_sign_in_alerts);
        let c = parse("host = \"smtp.example.org\"\ntls = \"tls\"\nfrom = \"\\\"Gate\\\" <gw@example.org>\"\n")
            .unwrap()
            .mail
            .unwrap();
        assert_eq!((c.tls, c.port), (MailTls::Implicit, 465));
    }

    #[test]
    fn bad_values_name_their_key() {
        let base = "host = \"smtp.example.org\"\nfrom = \"gw@example.org\"\n";
        assert_eq!(refused_key(&format!("{base}tls = \"none\"\n")), "mail.tls");
        assert_eq!(refused_key(&format!("{base}tls = \"ssl3\"\n")), "mail.tls");
        assert_eq!(
            refused_key(&format!("{base}username = \"u\"\n")),
            "mail.password_file"
        );
        assert_eq!(
            refused_key(
                "host = \"smtp.example.org\"\nfrom = \"gw@example.org\\r\\nBcc: x@evil.org\"\n"
            ),
            "mail.from"
        );
        assert_eq!(
            refused_key("host = \"smtp.example.org\"\nfrom = \"not an address\"\n"),
            "mail.from"
        );
        assert_eq!(
            refused_key("host = \"smtp\\r\\nx\"\nfrom = \"gw@example.org\"\n"),
            "mail.host"
        );
        assert!(parse("host = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"gw@example.org\"\n").is_ok());
    }

    #[test]
    fn templates_are_checked_for_kind_size_and_one_line_subjects() {
        let dir = tempfile::tempdir().unwrap();
        let section = format!(
            "host = \"smtp.example.org\"\nfrom = \"gw@example.org\"\ntemplates_dir = \"{}\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("password_reset.txt"), "Hello {{user}}").unwrap();
        std::fs::write(dir.path().join("README"), "ignored").unwrap();
        assert!(parse(&section).is_ok());
        std::fs::write(dir.path().join("password_reset.subject"), "one\ntwo\n").unwrap();
        assert_eq!(refused_key(&section), "mail.templates_dir");
        std::fs::write(dir.path().join("password_reset.subject"), "one line\n").unwrap();
        std::fs::write(dir.path().join("no_such_kind.html"), "x").unwrap();
        assert_eq!(refused_key(&section), "mail.templates_dir");
        std::fs::remove_file(dir.path().join("no_such_kind.html")).unwrap();
        std::fs::write(
            dir.path().join("test.html"),
            "x".repeat(MAX_TEMPLATE_BYTES as usize + 1),
        )
        .unwrap();
        assert_eq!(refused_key(&section), "mail.templates_dir");
    }

    #[test]
    fn addresses_are_one_plain_address() {
        for ok in ["alice@example.org", "a.b+c@mail.example.co.uk"] {
            assert!(valid_address(ok), "{ok}");
        }
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.org",
            "alice@localhost",
            "alice@example.org\r\nBcc: x@evil.org",
            "Alice <alice@example.org>",
            "alice@example.org,bob@example.org",
            "al ice@example.org",
            "alice@example..org.",
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
    }
}
