//! `[[webhook]]`: HTTP endpoints told of the same security events as users are mailed about,
//! signed with a shared secret. The secret file is read when the gateway starts.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};

/// Every event a webhook can be sent: the security notices, new sign-ins and breach responses.
pub const EVENTS: &[&str] = &[
    "new_sign_in",
    "password_changed",
    "two_factor_enabled",
    "two_factor_disabled",
    "passkey_added",
    "passkey_removed",
    "email_changed",
    "signed_out_everywhere",
    "account_changed_by_admin",
    "breach_response",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileWebhook {
    name: Option<String>,
    url: String,
    events: Option<Vec<String>>,
    secret_file: PathBuf,
    allow_private: Option<bool>,
}

/// A validated `[[webhook]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    pub name: String,
    pub url: url::Url,
    /// The events it is sent (every one of [`EVENTS`] unless the file names some).
    pub events: Vec<String>,
    /// The HMAC-SHA256 key of `X-Portcullis-Signature`, alone in the file.
    pub secret_file: PathBuf,
    /// Whether the URL may lead to this host, a link-local or a private network (refused
    /// otherwise, when the URL is checked and again for every address its name resolves to).
    pub allow_private: bool,
}

/// Whether an address is one a webhook must not reach without `allow_private`: loopback,
/// link-local, private, unique-local, unspecified, multicast or broadcast.
pub fn is_private(addr: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast()
                || o[0] == 0
                || o[0] == 100 && (o[1] & 0xc0) == 64
                || o[0] == 198 && (o[1] & 0xfe) == 18
                || o[0] >= 240
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let s = a.segments();
            // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an
            // IPv4 address: judged by it.
            let embedded = |hi: u16, lo: u16| {
                IpAddr::V4(std::net::Ipv4Addr::new(
                    (hi >> 8) as u8,
                    hi as u8,
                    (lo >> 8) as u8,
                    lo as u8,
                ))
            };
            if s[..6] == [0, 0, 0, 0, 0, 0] && !a.is_loopback() && !a.is_unspecified() {
                return is_private(embedded(s[6], s[7]));
            }
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                return is_private(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_private(embedded(s[1], s[2]));
            }
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] & 0xfe00) == 0xfc00
        }
    }
}

impl Validator {
    pub(super) fn webhooks(
        &self,
        list: Vec<FileWebhook>,
    ) -> Result<Vec<WebhookConfig>, ConfigError> {
        let mut out: Vec<WebhookConfig> = Vec::new();
        for (i, w) in list.into_iter().enumerate() {
            let key = |k: &str| format!("webhook[{i}].{k}");
            let name = w.name.unwrap_or_else(|| format!("webhook{i}"));
            let ok_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
            if !ok_name {
                return Err(self.err(
                    &key("name"),
                    format!("`{name}` must be 1-64 of a-z 0-9 - _"),
                ));
            }
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(&key("name"), format!("`{name}` is used by another webhook")));
            }
            let url = url::Url::parse(&w.url)
                .map_err(|e| self.err(&key("url"), format!("`{}`: {e}", w.url)))?;
            let allow_private = w.allow_private.unwrap_or(false);
            let private_host = match url.host() {
                Some(url::Host::Ipv4(a)) => is_private(a.into()),
                Some(url::Host::Ipv6(a)) => is_private(a.into()),
                Some(url::Host::Domain(d)) => {
                    let d = d.to_ascii_lowercase();
                    d == "localhost" || d.ends_with(".localhost")
                }
                None => {
                    return Err(self.err(&key("url"), format!("`{}` has no host", w.url)));
                }
            };
            match url.scheme() {
                "https" => {}
                "http" if allow_private => {}
                "http" => {
                    return Err(self.err(
                        &key("url"),
                        "plain http would carry account events unencrypted: use https (or \
                         allow_private = true for an endpoint on this host or network)",
                    ))
                }
                other => {
                    return Err(self.err(&key("url"), format!("scheme `{other}` is not https")))
                }
            }
            if private_host && !allow_private {
                return Err(self.err(
                    &key("url"),
                    format!(
                        "`{}` leads to this host or a private network: set allow_private = true \
                         if that is meant",
                        w.url
                    ),
                ));
            }
            if url.username() != "" || url.password().is_some() {
                return Err(self.err(
                    &key("url"),
                    "must not carry credentials (the signature authenticates the gateway)",
                ));
            }
            let events = match w.events {
                None => EVENTS.iter().map(|e| e.to_string()).collect(),
                Some(list) if list.is_empty() => {
                    return Err(self.err(&key("events"), "must name at least one event"))
                }
                Some(list) => {
                    if let Some(bad) = list.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                        return Err(self.err(
                            &key("events"),
                            format!("`{bad}` is not one of {}", EVENTS.join(", ")),
                        ));
                    }
                    list
                }
            };
            if w.secret_file.as_os_str().is_empty() {
                return Err(self.err(&key("secret_file"), "must name a file"));
            }
            out.push(WebhookConfig {
                name,
                url,
                events,
                secret_file: w.secret_file,
                allow_private,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EnvOverrides};
    use std::path::Path;

    fn parse(section: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[[route]]\nname = \"app\"\nupstream = \"127.0.0.1:1\"\n\n[[webhook]]\n{section}"
        );
        Config::parse(&text, Path::new("t.toml"), &EnvOverrides::default())
    }

    fn refused(section: &str) -> (String, String) {
        match parse(section) {
            Err(ConfigError::Invalid { key, problem, .. }) => (key, problem),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn private_and_plain_endpoints_need_an_opt_in() {
        let ok = parse("url = \"https://hooks.example.org/x\"\nsecret_file = \"/s\"\n").unwrap();
        assert_eq!(ok.webhooks[0].events.len(), EVENTS.len());
        for url in [
            "https://127.0.0.1/x",
            "https://localhost/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest",
            "https://10.0.0.5/x",
            "https://[fd00::1]/x",
            "http://hooks.example.org/x",
        ] {
            let (key, why) = refused(&format!("url = \"{url}\"\nsecret_file = \"/s\"\n"));
            assert_eq!(key, "webhook[0].url", "{url}");
            assert!(why.contains("allow_private"), "{url}: {why}");
        }
        assert!(parse(
            "url = \"http://127.0.0.1:9/x\"\nsecret_file = \"/s\"\nallow_private = true\n"
        )
        .is_ok());
        let (key, _) = refused("url = \"https://u:p@hooks.example.org/x\"\nsecret_file = \"/s\"\n");
        assert_eq!(key, "webhook[0].url");
        let (key, _) = refused(
            "url = \"https://hooks.example.org/x\"\nsecret_file = \"/s\"\nevents = [\"login\"]\n",
        );
        assert_eq!(key, "webhook[0].events");
    }

    #[test]
    fn private_addresses_are_recognised() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "169.254.1.1",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd12::1",
            "::ffff:127.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_private(a.parse().unwrap()), "{a}");
        }
        for a in [
            "93.184.216.34",
            "2606:2800:220:1::1",
            "100.128.0.1",
            "2002:5db8:d822::1",
        ] {
            assert!(!is_private(a.parse().unwrap()), "{a}");
        }
    }
}
