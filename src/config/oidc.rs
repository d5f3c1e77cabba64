//! `[[oidc]]`: single sign-on providers (OpenID Connect), in file form and validated form.
//! Validation needs no network: the provider's discovery document is fetched when the gateway
//! runs (see `crate::oidc`), so `check-config` passes offline.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};

/// Scopes asked for unless configured otherwise.
pub const DEFAULT_SCOPES: [&str; 3] = ["openid", "profile", "email"];
/// Signature algorithms accepted unless configured otherwise (intersected with what the
/// provider's discovery document lists). Never `none`, never HMAC with the client secret.
pub const DEFAULT_ALGORITHMS: [&str; 4] = ["RS256", "PS256", "ES256", "EdDSA"];
/// Every algorithm that may be configured.
pub const SUPPORTED_ALGORITHMS: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileOidc {
    id: String,
    display_name: Option<String>,
    issuer: String,
    client_id: String,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    scopes: Option<Vec<String>>,
    auto_link: Option<String>,
    auto_create: Option<bool>,
    admin_claim: Option<String>,
    admin_value: Option<String>,
    #[serde(default)]
    trust_amr: Vec<String>,
    #[serde(default)]
    trust_acr: Vec<String>,
    end_session: Option<bool>,
    algorithms: Option<Vec<String>>,
    allow_insecure_http: Option<bool>,
}

/// How a provider login finds a gateway user that has no link to its subject yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoLink {
    /// Only explicit links (made by the user on the account page, or by an admin).
    Off,
    /// The gateway user whose name is the provider's verified email (`email_verified` true).
    Email,
    /// The gateway user whose name is the provider's `preferred_username`.
    PreferredUsername,
}

impl AutoLink {
    pub fn as_str(self) -> &'static str {
        match self {
            AutoLink::Off => "off",
            AutoLink::Email => "email",
            AutoLink::PreferredUsername => "preferred_username",
        }
    }
}

/// Where the client secret comes from; read when the gateway starts, never logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSecretSource {
    /// A public client: PKCE only, no secret.
    None,
    File(PathBuf),
    Env(String),
}

/// One validated `[[oidc]]` provider.
#[derive(Debug, Clone, PartialEq)]
pub struct OidcProviderConfig {
    /// Used in URLs (`/_portcullis/oidc/{id}/…`), links and metrics.
    pub id: String,
    pub display_name: String,
    /// Exactly as the provider states it in its discovery document (no trailing slash added).
    /// Links are made under it: another issuer under the same `id` finds none of them.
    pub issuer: String,
    pub client_id: String,
    pub client_secret: ClientSecretSource,
    pub scopes: Vec<String>,
    pub auto_link: AutoLink,
    pub auto_create: bool,
    /// A claim (e.g. `groups`) whose value (or one of whose values) `admin_value` grants admin.
    pub admin: Option<(String, String)>,
    /// `amr` values that say the provider used two factors (`mfa`, `mca`, or a provider's own
    /// value; never one of [`SINGLE_FACTOR_AMR`]).
    pub trust_amr: Vec<String>,
    /// `acr` values that count as a second factor at the provider.
    pub trust_acr: Vec<String>,
    /// After the gateway's logout, send the browser to the provider's end-session endpoint.
    pub end_session: bool,
    /// Signature algorithms accepted for ID and logout tokens (before intersecting with the
    /// provider's list).
    pub algorithms: Vec<String>,
    /// Plain-http issuer and endpoints allowed anywhere. Without it, plain http is allowed only
    /// when the issuer itself is plain http on loopback, and then only for loopback endpoints.
    pub allow_insecure_http: bool,
}

/// The `amr` values of RFC 8176 §2 that name one authentication method: a provider login whose
/// `amr` holds one of them may have used nothing else, so none of them counts as two factors.
/// Only `mfa` and `mca` (several factors, several channels) may be trusted.
pub const SINGLE_FACTOR_AMR: [&str; 19] = [
    "face", "fpt", "geo", "hwk", "iris", "kba", "otp", "pin", "pop", "pwd", "rba", "retina", "sc",
    "sms", "swk", "tel", "user", "vbm", "wia",
];

/// Whether an http(s) URL's host is a loopback address or `localhost`.
pub fn is_loopback_url(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(a)) => IpAddr::V4(a).is_loopback(),
        Some(url::Host::Ipv6(a)) => IpAddr::V6(a).is_loopback(),
        None => false,
    }
}

impl Validator {
    pub(super) fn oidc(&self, list: Vec<FileOidc>) -> Result<Vec<OidcProviderConfig>, ConfigError> {
        let mut out: Vec<OidcProviderConfig> = Vec::new();
        for (i, o) in list.into_iter().enumerate() {
            let p = self.oidc_one(i, o)?;
            if out.iter().any(|q| q.id == p.id) {
                return Err(self.err(
                    &format!("oidc[{i}].id"),
                    format!("`{}` is used by another provider", p.id),
                ));
            }
            out.push(p);
        }
        Ok(out)
    }

    fn oidc_one(&self, i: usize, o: FileOidc) -> Result<OidcProviderConfig, ConfigError> {
        let key = |k: &str| format!("oidc[{i}].{k}");
        let id_ok = !o.id.is_empty()
            && o.id.len() <= 64
            && o.id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !id_ok {
            return Err(self.err(
                &key("id"),
                format!("`{}` must be 1-64 of a-z 0-9 - _", o.id),
            ));
        }
        let allow_insecure_http = o.allow_insecure_http.unwrap_or(false);
        let issuer = url::Url::parse(&o.issuer)
            .map_err(|e| self.err(&key("issuer"), format!("`{}`: {e}", o.issuer)))?;
        match issuer.scheme() {
            "https" => {}
            "http" if allow_insecure_http || is_loopback_url(&issuer) => {}
            "http" => {
                return Err(self.err(
                    &key("issuer"),
                    format!(
                        "`{}` is plain http: only loopback issuers may be, unless \
                         allow_insecure_http = true",
                        o.issuer
                    ),
                ))
            }
            other => return Err(self.err(&key("issuer"), format!("scheme `{other}` is not https"))),
        }
        if issuer.query().is_some() || issuer.fragment().is_some() || issuer.host().is_none() {
            return Err(self.err(
                &key("issuer"),
                format!("`{}` must be a URL without query or fragment", o.issuer),
            ));
        }
        if o.client_id.is_empty() {
            return Err(self.err(&key("client_id"), "must not be empty"));
        }
        let client_secret = match (o.client_secret_file, o.client_secret_env) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    &key("client_secret_env"),
                    "give client_secret_file or client_secret_env, not both",
                ))
            }
            (Some(f), None) => ClientSecretSource::File(f),
            (None, Some(e)) if e.is_empty() => {
                return Err(self.err(&key("client_secret_env"), "must name a variable"))
            }
            (None, Some(e)) => ClientSecretSource::Env(e),
            (None, None) => ClientSecretSource::None,
        };
        let scopes = o
            .scopes
            .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| s.to_string()).collect());
        if !scopes.iter().any(|s| s == "openid") {
            return Err(self.err(&key("scopes"), "must include `openid`"));
        }
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(self.err(
                &key("scopes"),
                format!("`{bad}` is not a scope (no spaces)"),
            ));
        }
        let auto_link = match o.auto_link.as_deref().unwrap_or("off") {
            "off" => AutoLink::Off,
            "email" => AutoLink::Email,
            "preferred_username" => AutoLink::PreferredUsername,
            other => {
                return Err(self.err(
                    &key("auto_link"),
                    format!("`{other}` is not off, email or preferred_username"),
                ))
            }
        };
        let admin = match (o.admin_claim, o.admin_value) {
            (None, None) => None,
            (Some(c), Some(v)) if !c.is_empty() && !v.is_empty() => Some((c, v)),
            (Some(_), Some(_)) => {
                return Err(self.err(&key("admin_claim"), "claim and value must not be empty"))
            }
            (Some(_), None) => {
                return Err(self.err(&key("admin_value"), "required with admin_claim"))
            }
            (None, Some(_)) => {
                return Err(self.err(&key("admin_claim"), "required with admin_value"))
            }
        };
        let algorithms = o
            .algorithms
            .unwrap_or_else(|| DEFAULT_ALGORITHMS.iter().map(|s| s.to_string()).collect());
        if algorithms.is_empty() {
            return Err(self.err(&key("algorithms"), "must list at least one algorithm"));
        }
        for (j, a) in algorithms.iter().enumerate() {
            if !SUPPORTED_ALGORITHMS.contains(&a.as_str()) {
                return Err(self.err(
                    &format!("oidc[{i}].algorithms[{j}]"),
                    format!(
                        "`{a}` is not one of {} (never `none` or HS*)",
                        SUPPORTED_ALGORITHMS.join(", ")
                    ),
                ));
            }
        }
        for v in &o.trust_amr {
            if v.is_empty() || SINGLE_FACTOR_AMR.iter().any(|m| m.eq_ignore_ascii_case(v)) {
                return Err(self.err(
                    &key("trust_amr"),
                    format!(
                        "`{v}` names a single authentication method (RFC 8176), not two \
                         factors: trust \"mfa\" (or \"mca\") instead"
                    ),
                ));
            }
        }
        Ok(OidcProviderConfig {
            display_name: o.display_name.unwrap_or_else(|| o.id.clone()),
            id: o.id,
            issuer: o.issuer,
            client_id: o.client_id,
            client_secret,
            scopes,
            auto_link,
            auto_create: o.auto_create.unwrap_or(false),
            admin,
            trust_amr: o.trust_amr,
            trust_acr: o.trust_acr,
            end_session: o.end_session.unwrap_or(true),
            algorithms,
            allow_insecure_http,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError, EnvOverrides};

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let text = format!("[[route]]\nname = 'media'\nupstream = '127.0.0.1:8096'\n{extra}");
        Config::parse(&text, Path::new("test.toml"), &EnvOverrides::default())
    }

    const OK: &str = "[[oidc]]\nid = 'authelia'\nissuer = 'https://auth.example.com'\n\
                      client_id = 'portcullis'\nclient_secret_env = 'OIDC_SECRET'\n";

    #[test]
    fn a_provider_gets_defaults() {
        let c = parse(OK).unwrap();
        let p = &c.oidc[0];
        assert_eq!(p.display_name, "authelia");
        assert_eq!(p.scopes, ["openid", "profile", "email"]);
        assert_eq!(p.auto_link, super::AutoLink::Off);
        assert!(!p.auto_create && p.end_session);
        assert!(!p
            .algorithms
            .iter()
            .any(|a| a.starts_with("HS") || a == "none"));
    }

    #[test]
    fn errors_name_the_key() {
        for (toml, key) in [
            (
                "[[oidc]]\nid='a'\nissuer='http://auth.example.com'\nclient_id='c'\n",
                "oidc[0].issuer",
            ),
            (
                "[[oidc]]\nid='A b'\nissuer='https://a.example'\nclient_id='c'\n",
                "oidc[0].id",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id=''\n",
                "oidc[0].client_id",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\nauto_link='name'\n",
                "oidc[0].auto_link",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\nalgorithms=['HS256']\n",
                "oidc[0].algorithms[0]",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\nalgorithms=['none']\n",
                "oidc[0].algorithms[0]",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\nscopes=['profile']\n",
                "oidc[0].scopes",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\nadmin_claim='groups'\n",
                "oidc[0].admin_value",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\n\
                 client_secret_file='/x'\nclient_secret_env='Y'\n",
                "oidc[0].client_secret_env",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\nbogus=1\n",
                "oidc[0]",
            ),
            (
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\n\
                 [[oidc]]\nid='a'\nissuer='https://b.example'\nclient_id='c'\n",
                "oidc[1].id",
            ),
            ("[auth]\npassword_form='gone'\n", "auth.password_form"),
        ] {
            let e = parse(toml).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn trust_amr_refuses_single_factor_methods() {
        for v in [
            "otp", "hwk", "pwd", "swk", "sms", "tel", "pin", "face", "fpt", "OTP", "",
        ] {
            let toml = format!(
                "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\n\
                 [[oidc]]\nid='b'\nissuer='https://b.example'\nclient_id='c'\n\
                 trust_amr=['mfa', '{v}']\n"
            );
            let e = parse(&toml).unwrap_err().to_string();
            assert!(e.contains("oidc[1].trust_amr"), "{v}: {e}");
        }
        let c = parse(
            "[[oidc]]\nid='a'\nissuer='https://a.example'\nclient_id='c'\n\
             trust_amr=['mfa', 'mca', 'urn:example:two-factor']\n",
        )
        .unwrap();
        assert_eq!(
            c.oidc[0].trust_amr,
            ["mfa", "mca", "urn:example:two-factor"]
        );
    }

    #[test]
    fn plain_http_is_allowed_on_loopback_or_when_asked() {
        let c = parse(
            "[[oidc]]\nid='a'\nissuer='http://127.0.0.1:9000'\nclient_id='c'\n\
             [[oidc]]\nid='b'\nissuer='http://idp.lan'\nclient_id='c'\nallow_insecure_http=true\n",
        )
        .unwrap();
        assert_eq!(c.oidc.len(), 2);
    }

    #[test]
    fn the_password_form_can_be_hidden_only_with_a_provider() {
        let c = parse(&format!("[auth]\npassword_form='hidden'\n{OK}")).unwrap();
        assert!(!c.auth.password_form);
        let e = parse("[auth]\npassword_form='hidden'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.password_form"), "{e}");
    }
}
