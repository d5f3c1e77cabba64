//! `[tls.acme]`: certificates from an ACME certificate authority (Let's Encrypt by default, any
//! RFC 8555 server by its directory URL), in file form and validated form. The client itself is
//! `crate::acme`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};

/// Let's Encrypt's production directory, the default.
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`directory = "letsencrypt-staging"`): untrusted
/// certificates, generous rate limits, for trying a set-up out.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTls {
    acme: Option<FileAcme>,
    #[serde(default)]
    pub(super) certificate: Vec<FileCertificate>,
}

/// One `[[tls.certificate]]`: a further certificate, handed out by SNI for the names it is for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCertificate {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAcme {
    directory: Option<String>,
    contact: Option<Vec<String>>,
    names: Option<Vec<String>>,
    challenges: Option<Vec<String>>,
    directory_ca: Option<PathBuf>,
}

/// A challenge type the gateway can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// HTTP-01: a token served at `/.well-known/acme-challenge/` on the port-80 listener.
    Http01,
    /// TLS-ALPN-01: a self-signed certificate for the name, on the public listener, to a client
    /// that offers only the `acme-tls/1` protocol.
    TlsAlpn01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

/// The validated `[tls.acme]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// `mailto:` contacts for the account (the CA's expiry and incident mail).
    pub contact: Vec<String>,
    /// The names the certificate is for (lowercase; the first is its name in files and
    /// metrics).
    pub names: Vec<String>,
    /// The challenge types tried, in order of preference.
    pub challenges: Vec<Challenge>,
    /// A PEM file with the root that the directory's own HTTPS certificate chains to, for a
    /// private CA (or a test CA); the system's roots otherwise.
    pub directory_ca: Option<PathBuf>,
}

/// Whether `name` is a DNS name a public CA could issue for: letters, digits and hyphens in
/// dot-separated labels of at most 63, no leading or trailing hyphen, at least two labels, no
/// wildcard (which needs a DNS-01 challenge the gateway does not answer) and not an address.
pub fn valid_dns_name(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && name.parse::<std::net::IpAddr>().is_err()
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

impl Validator {
    /// `[tls.acme]`, given the public URL's host, the route hosts, and whether a port-80
    /// listener (`server.redirect_listen`) exists.
    pub(super) fn acme(
        &self,
        t: FileTls,
        public_host: &str,
        route_hosts: &[String],
        port_80: bool,
    ) -> Result<Option<AcmeConfig>, ConfigError> {
        let Some(a) = t.acme else { return Ok(None) };
        let key = |k: &str| format!("tls.acme.{k}");
        let directory = match a.directory.as_deref().map(str::trim) {
            None | Some("letsencrypt") => LETSENCRYPT.to_string(),
            Some("letsencrypt-staging") => LETSENCRYPT_STAGING.to_string(),
            Some(url) => match url::Url::parse(url) {
                Ok(u) if u.scheme() == "https" && u.host_str().is_some() => url.to_string(),
                _ => {
                    return Err(self.err(
                        &key("directory"),
                        format!(
                            "`{url}` is not an https URL (nor letsencrypt or letsencrypt-staging)"
                        ),
                    ))
                }
            },
        };
        let mut contact = Vec::new();
        for c in a.contact.unwrap_or_default() {
            let address = c.trim().trim_start_matches("mailto:");
            if !super::mail::valid_address(address) {
                return Err(self.err(&key("contact"), format!("`{c}` is not an email address")));
            }
            contact.push(format!("mailto:{address}"));
        }
        let names = match a.names {
            Some(n) if n.is_empty() => {
                return Err(self.err(&key("names"), "name at least one host"));
            }
            Some(n) => n,
            // Every host the gateway answers for: the public URL's and the routes'.
            None => std::iter::once(public_host.to_string())
                .chain(route_hosts.iter().cloned())
                .collect(),
        };
        let mut checked: Vec<String> = Vec::new();
        for n in names {
            let name = n.trim().trim_end_matches('.').to_ascii_lowercase();
            if !valid_dns_name(&name) {
                return Err(self.err(
                    &key("names"),
                    format!(
                        "`{n}` is not a DNS name a certificate authority issues for (no \
                         addresses, no wildcards, at least two labels); name the hosts in \
                         tls.acme.names"
                    ),
                ));
            }
            if !checked.contains(&name) {
                checked.push(name);
            }
        }
        if checked.len() > 100 {
            return Err(self.err(&key("names"), "at most 100 names in one certificate"));
        }
        let challenges = match a.challenges {
            None if port_80 => vec![Challenge::Http01, Challenge::TlsAlpn01],
            None => vec![Challenge::TlsAlpn01],
            Some(list) => {
                let mut out = Vec::new();
                for c in &list {
                    let challenge = match c.trim() {
                        "http-01" => Challenge::Http01,
                        "tls-alpn-01" => Challenge::TlsAlpn01,
                        other => {
                            return Err(self.err(
                                &key("challenges"),
                                format!("`{other}` is not http-01 or tls-alpn-01"),
                            ))
                        }
                    };
                    if challenge == Challenge::Http01 && !port_80 {
                        return Err(self.err(
                            &key("challenges"),
                            "http-01 is answered on the port-80 listener: set \
                             server.redirect_listen (such as \"0.0.0.0:80\")",
                        ));
                    }
                    if !out.contains(&challenge) {
                        out.push(challenge);
                    }
                }
                if out.is_empty() {
                    return Err(self.err(&key("challenges"), "name at least one challenge"));
                }
                out
            }
        };
        if let Some(ca) = &a.directory_ca {
            if let Err(e) = std::fs::metadata(ca) {
                return Err(self.err(
                    &key("directory_ca"),
                    format!("`{}` cannot be read: {e}", ca.display()),
                ));
            }
        }
        Ok(Some(AcmeConfig {
            directory,
            contact,
            names: checked,
            challenges,
            directory_ca: a.directory_ca,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::valid_dns_name;

    #[test]
    fn dns_names_are_what_a_public_ca_issues_for() {
        for ok in [
            "media.example.org",
            "a-b.example.org",
            "x.y.z.example",
            "gw.portcullis.test",
        ] {
            assert!(valid_dns_name(ok), "{ok}");
        }
        for bad in [
            "localhost",
            "*.example.org",
            "127.0.0.1",
            "example.123",
            "-a.example.org",
            "a-.example.org",
            "a..example.org",
            "a_b.example.org",
            "",
            &format!("{}.org", "a".repeat(64)),
        ] {
            assert!(!valid_dns_name(bad), "{bad}");
        }
    }
}
