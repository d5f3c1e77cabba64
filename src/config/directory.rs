//! `[directory]`: users from an LDAP directory (OpenLDAP, lldap, Active Directory), in file
//! form and validated form. Validation needs no network and reads no file: the bind password
//! and the CA file are read when the gateway starts (see `crate::directory`), so `check-config`
//! passes on a machine without them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{group_name, ConfigError, Validator};

/// How often the directory is read again for removed, disabled and regrouped users.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// How long one connection, bind or search may take before the directory counts as down.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDirectory {
    url: String,
    starttls: Option<bool>,
    ca_file: Option<PathBuf>,
    allow_insecure: Option<bool>,
    preset: Option<String>,
    base_dn: String,
    bind_dn: String,
    bind_password_file: PathBuf,
    user_base: Option<String>,
    user_object_filter: Option<String>,
    user_filter: Option<String>,
    name_attribute: Option<String>,
    email_attribute: Option<String>,
    id_attribute: Option<String>,
    group_base: Option<String>,
    group_filter: Option<String>,
    group_name_attribute: Option<String>,
    member_of_attribute: Option<String>,
    admin_group: Option<String>,
    #[serde(default, with = "humantime_serde")]
    sync_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

/// The kind of directory, which picks the defaults of every attribute and filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// lldap: `uid` under `ou=people`, `groupOfUniqueNames` under `ou=groups`.
    Lldap,
    /// OpenLDAP: `inetOrgPerson`, `memberOf` (the memberof overlay), ppolicy's
    /// `pwdAccountLockedTime` for locked accounts.
    OpenLdap,
    /// Active Directory (and Samba AD): `sAMAccountName`, the `userAccountControl` disabled
    /// bit, nested groups through `LDAP_MATCHING_RULE_IN_CHAIN`.
    ActiveDirectory,
}

impl Preset {
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Lldap => "lldap",
            Preset::OpenLdap => "openldap",
            Preset::ActiveDirectory => "active_directory",
        }
    }
}

/// How the directory is reached: TLS from the first byte (`ldaps://`), StartTLS on `ldap://`,
/// or (only when allowed) in the clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ldaps,
    StartTls,
    Plain,
}

/// The validated `[directory]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryConfig {
    pub url: String,
    pub transport: Transport,
    /// PEM certificates the directory's certificate must chain to (else the system's).
    pub ca_file: Option<PathBuf>,
    pub preset: Preset,
    pub bind_dn: String,
    pub bind_password_file: PathBuf,
    pub user_base: String,
    /// Which entries are users, e.g. `(objectClass=inetOrgPerson)`.
    pub user_object_filter: String,
    /// What a user must also match to sign in: by default the preset's "not disabled" test.
    pub user_filter: Option<String>,
    pub name_attribute: String,
    pub email_attribute: String,
    /// The entry's stable id (`entryUUID`, AD's binary `objectGUID`): a record made for one
    /// entry is never taken by another that gets the same name later.
    pub id_attribute: String,
    pub group_base: String,
    /// A search for a user's groups, `{dn}` standing for the user's DN (escaped); `None`: the
    /// user's `member_of_attribute` names them.
    pub group_filter: Option<String>,
    pub group_name_attribute: String,
    pub member_of_attribute: String,
    /// Members of this directory group (its name exactly, ignoring ASCII case, and under
    /// `group_base`) are administrators (the `admins` group); unset, the directory grants no
    /// administrator and leaves that flag to the gateway.
    pub admin_group: Option<String>,
    pub sync_interval: Duration,
    pub timeout: Duration,
}

impl DirectoryConfig {
    /// The search filter for one user by name (`name` escaped per RFC 4515 here).
    pub fn user_search_filter(&self, name: &str) -> String {
        format!(
            "(&{}{}({}={}))",
            self.user_object_filter,
            self.user_filter.as_deref().unwrap_or(""),
            self.name_attribute,
            ldap3::ldap_escape(name)
        )
    }

    /// The search filter for every user allowed to sign in.
    pub fn all_users_filter(&self) -> String {
        format!(
            "(&{}{}({}=*))",
            self.user_object_filter,
            self.user_filter.as_deref().unwrap_or(""),
            self.name_attribute
        )
    }
}

/// Whether an `ldap://` URL names this machine (its host is opaque to the URL parser, which
/// knows IP addresses only in the schemes it knows).
fn is_loopback(url: &url::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Wraps a filter in parentheses when it is given without them (`objectClass=person`).
fn parenthesised(filter: &str) -> String {
    let f = filter.trim();
    if f.starts_with('(') {
        f.to_string()
    } else {
        format!("({f})")
    }
}

/// A directory group's name as a gateway group: lower case, spaces as `-`, other characters
/// that a gateway group name cannot hold dropped (`Domain Admins` is `domain-admins`). `None`
/// when nothing usable is left.
pub fn gateway_group_name(directory_name: &str) -> Option<String> {
    let mapped: String = directory_name
        .trim()
        .chars()
        .filter_map(|c| match c {
            c if c.is_whitespace() => Some('-'),
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') => Some(c),
            _ => None,
        })
        .collect();
    group_name(&mapped).ok()
}

impl Validator {
    pub(super) fn directory(
        &self,
        d: Option<FileDirectory>,
    ) -> Result<Option<DirectoryConfig>, ConfigError> {
        let Some(d) = d else { return Ok(None) };
        let key = |k: &str| format!("directory.{k}");
        let preset = match d.preset.as_deref().unwrap_or("openldap") {
            "lldap" => Preset::Lldap,
            "openldap" => Preset::OpenLdap,
            "active_directory" | "ad" => Preset::ActiveDirectory,
            other => {
                return Err(self.err(
                    &key("preset"),
                    format!("`{other}` is not lldap, openldap or active_directory"),
                ))
            }
        };
        let url = url::Url::parse(&d.url)
            .map_err(|e| self.err(&key("url"), format!("`{}`: {e}", d.url)))?;
        if url.host_str().is_none_or(str::is_empty)
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(self.err(
                &key("url"),
                format!(
                    "`{}` must be ldap://HOST[:PORT] or ldaps://HOST[:PORT]",
                    d.url
                ),
            ));
        }
        let starttls = d.starttls.unwrap_or(url.scheme() == "ldap");
        let transport = match (url.scheme(), starttls) {
            ("ldaps", false) => Transport::Ldaps,
            ("ldaps", true) => {
                return Err(self.err(
                    &key("starttls"),
                    "ldaps:// is TLS already: StartTLS is for ldap:// URLs",
                ))
            }
            ("ldap", true) => Transport::StartTls,
            ("ldap", false) if d.allow_insecure.unwrap_or(false) || is_loopback(&url) => {
                Transport::Plain
            }
            ("ldap", false) => {
                return Err(self.err(
                    &key("starttls"),
                    "without StartTLS, passwords would cross the network in the clear: use \
                     starttls = true or an ldaps:// URL (allow_insecure = true to insist)",
                ))
            }
            (other, _) => {
                return Err(self.err(
                    &key("url"),
                    format!("scheme `{other}` is not ldap or ldaps"),
                ))
            }
        };
        let dn = |k: &str, v: &str| -> Result<String, ConfigError> {
            let v = v.trim();
            if v.is_empty() || !v.contains('=') {
                return Err(self.err(
                    &key(k),
                    format!("`{v}` is not a DN such as dc=example,dc=org"),
                ));
            }
            Ok(v.to_string())
        };
        let base_dn = dn("base_dn", &d.base_dn)?;
        let bind_dn = dn("bind_dn", &d.bind_dn)?;
        if d.bind_password_file.as_os_str().is_empty() {
            return Err(self.err(&key("bind_password_file"), "must name a file"));
        }
        let under_base = |k: &str, v: Option<String>, ou: &str| -> Result<String, ConfigError> {
            match v {
                Some(v) => dn(k, &v),
                None if ou.is_empty() => Ok(base_dn.clone()),
                None => Ok(format!("{ou},{base_dn}")),
            }
        };
        let (people, groups) = match preset {
            Preset::Lldap => ("ou=people", "ou=groups"),
            Preset::OpenLdap | Preset::ActiveDirectory => ("", ""),
        };
        let user_base = under_base("user_base", d.user_base, people)?;
        let group_base = under_base("group_base", d.group_base, groups)?;
        let filter = |k: &str, v: &str| -> Result<String, ConfigError> {
            let f = parenthesised(v);
            ldap3::parse_filter(&f).map_err(|()| {
                self.err(&key(k), format!("`{v}` is not an LDAP filter (RFC 4515)"))
            })?;
            Ok(f)
        };
        let user_object_filter = filter(
            "user_object_filter",
            d.user_object_filter.as_deref().unwrap_or(match preset {
                Preset::Lldap => "(objectClass=person)",
                Preset::OpenLdap => "(objectClass=inetOrgPerson)",
                Preset::ActiveDirectory => "(&(objectCategory=person)(objectClass=user))",
            }),
        )?;
        let user_filter = match d.user_filter.as_deref().map(str::trim) {
            Some("") => None,
            Some(f) => Some(filter("user_filter", f)?),
            None => match preset {
                Preset::Lldap => None,
                // ppolicy's permanent (administrative) lock only: a temporary lock after failed
                // binds is the bind's to refuse, and must not disable anyone here.
                Preset::OpenLdap => Some("(!(pwdAccountLockedTime=000001010000Z))".to_string()),
                Preset::ActiveDirectory => {
                    Some("(!(userAccountControl:1.2.840.113556.1.4.803:=2))".to_string())
                }
            },
        };
        let attribute =
            |k: &str, v: Option<String>, default: &str| -> Result<String, ConfigError> {
                let v = v.unwrap_or_else(|| default.to_string());
                let ok = !v.is_empty()
                    && v.as_bytes()[0].is_ascii_alphabetic()
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !ok {
                    return Err(self.err(&key(k), format!("`{v}` is not an attribute name")));
                }
                Ok(v)
            };
        let name_attribute = attribute(
            "name_attribute",
            d.name_attribute,
            if preset == Preset::ActiveDirectory {
                "sAMAccountName"
            } else {
                "uid"
            },
        )?;
        let email_attribute = attribute("email_attribute", d.email_attribute, "mail")?;
        let id_attribute = attribute(
            "id_attribute",
            d.id_attribute,
            if preset == Preset::ActiveDirectory {
                "objectGUID"
            } else {
                "entryUUID"
            },
        )?;
        let group_name_attribute = attribute("group_name_attribute", d.group_name_attribute, "cn")?;
        let member_of_attribute =
            attribute("member_of_attribute", d.member_of_attribute, "memberOf")?;
        let group_filter = match d.group_filter.as_deref().map(str::trim) {
            Some("") => None,
            Some(f) => Some(f.to_string()),
            None => match preset {
                Preset::Lldap => {
                    Some("(&(objectClass=groupOfUniqueNames)(member={dn}))".to_string())
                }
                Preset::OpenLdap => None,
                Preset::ActiveDirectory => {
                    Some("(&(objectClass=group)(member:1.2.840.113556.1.4.1941:={dn}))".to_string())
                }
            },
        };
        if let Some(f) = &group_filter {
            if !f.contains("{dn}") {
                return Err(self.err(
                    &key("group_filter"),
                    format!("`{f}` must contain {{dn}}, the user's DN"),
                ));
            }
            filter("group_filter", &f.replace("{dn}", "uid=x"))?;
        }
        let admin_group = match d.admin_group.as_deref().map(str::trim) {
            None => None,
            Some(g) if g.is_empty() || g.contains(['=', ',']) => {
                return Err(self.err(
                    &key("admin_group"),
                    format!("`{g}` must be a group's name (its cn), not empty and not a DN"),
                ))
            }
            Some(g) => Some(g.to_string()),
        };
        let sync_interval = self.positive(
            &key("sync_interval"),
            d.sync_interval,
            DEFAULT_SYNC_INTERVAL,
        )?;
        let timeout = self.positive(&key("timeout"), d.timeout, DEFAULT_TIMEOUT)?;
        Ok(Some(DirectoryConfig {
            url: d.url.trim_end_matches('/').to_string(),
            transport,
            ca_file: d.ca_file,
            preset,
            bind_dn,
            bind_password_file: d.bind_password_file,
            user_base,
            user_object_filter,
            user_filter,
            name_attribute,
            email_attribute,
            id_attribute,
            group_base,
            group_filter,
            group_name_attribute,
            member_of_attribute,
            admin_group,
            sync_interval,
            timeout,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, EnvOverrides};
    use std::path::Path;

    fn parse(section: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[[route]]\nname = \"app\"\nupstream = \"127.0.0.1:1\"\n\n[directory]\n{section}"
        );
        Config::parse(&text, Path::new("t.toml"), &EnvOverrides::default())
    }

    const MINIMAL: &str = "url = \"ldaps://ldap.example.org\"\nbase_dn = \"dc=example,dc=org\"\n\
                           bind_dn = \"cn=gw,dc=example,dc=org\"\nbind_password_file = \"/p\"\n";

    fn problem(section: &str) -> (String, String) {
        match parse(section) {
            Err(ConfigError::Invalid { key, problem, .. }) => (key, problem),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn presets_fill_in_attributes_and_the_disabled_test() {
        let c = parse(MINIMAL).unwrap().directory.unwrap();
        assert_eq!(c.preset, Preset::OpenLdap);
        assert_eq!(c.transport, Transport::Ldaps);
        assert_eq!(
            c.user_filter.as_deref(),
            Some("(!(pwdAccountLockedTime=000001010000Z))")
        );
        assert_eq!(c.id_attribute, "entryUUID");
        assert_eq!(c.group_filter, None, "OpenLDAP reads memberOf");
        let ad = parse(&format!("{MINIMAL}preset = \"active_directory\"\n"))
            .unwrap()
            .directory
            .unwrap();
        assert_eq!(ad.name_attribute, "sAMAccountName");
        assert_eq!(ad.id_attribute, "objectGUID");
        assert!(ad
            .user_filter
            .unwrap()
            .contains("1.2.840.113556.1.4.803:=2"));
        assert!(ad.group_filter.unwrap().contains("1.2.840.113556.1.4.1941"));
        let l = parse(&format!("{MINIMAL}preset = \"lldap\"\n"))
            .unwrap()
            .directory
            .unwrap();
        assert_eq!(l.user_base, "ou=people,dc=example,dc=org");
        assert_eq!(l.group_base, "ou=groups,dc=example,dc=org");
        assert_eq!(l.user_filter, None);
    }

    #[test]
    fn a_user_name_cannot_widen_the_search() {
        let c = parse(MINIMAL).unwrap().directory.unwrap();
        let f = c.user_search_filter("*)(uid=*))(|(uid=*");
        assert_eq!(
            f,
            "(&(objectClass=inetOrgPerson)(!(pwdAccountLockedTime=000001010000Z))\
             (uid=\\2a\\29\\28uid=\\2a\\29\\29\\28|\\28uid=\\2a))"
        );
        assert!(ldap3::parse_filter(&f).is_ok());
    }

    #[test]
    fn plain_ldap_needs_starttls_unless_loopback_or_insisted() {
        let plain = MINIMAL.replace("ldaps://ldap.example.org", "ldap://ldap.example.org");
        assert_eq!(
            parse(&plain).unwrap().directory.unwrap().transport,
            Transport::StartTls
        );
        let (key, why) = problem(&format!("{plain}starttls = false\n"));
        assert_eq!(key, "directory.starttls");
        assert!(why.contains("in the clear"), "{why}");
        let ok = parse(&format!("{plain}starttls = false\nallow_insecure = true\n")).unwrap();
        assert_eq!(ok.directory.unwrap().transport, Transport::Plain);
        let local = MINIMAL.replace("ldaps://ldap.example.org", "ldap://127.0.0.1:3890");
        let ok = parse(&format!("{local}starttls = false\n")).unwrap();
        assert_eq!(ok.directory.unwrap().transport, Transport::Plain);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("preset = \"novell\"\n", "directory.preset"),
            ("user_filter = \"(uid=a\"\n", "directory.user_filter"),
            ("group_filter = \"(member=x)\"\n", "directory.group_filter"),
            ("name_attribute = \"u id\"\n", "directory.name_attribute"),
            ("sync_interval = \"0s\"\n", "directory.sync_interval"),
            (
                "admin_group = \"cn=admins,ou=groups\"\n",
                "directory.admin_group",
            ),
            ("user_base = \"people\"\n", "directory.user_base"),
        ];
        for (extra, want) in cases {
            assert_eq!(problem(&format!("{MINIMAL}{extra}")).0, want, "{extra}");
        }
        let (key, _) = problem(&MINIMAL.replace("ldaps://ldap.example.org", "http://x"));
        assert_eq!(key, "directory.url");
    }

    #[test]
    fn directory_group_names_become_gateway_group_names() {
        assert_eq!(
            gateway_group_name("Domain Admins").as_deref(),
            Some("domain-admins")
        );
        assert_eq!(gateway_group_name("media").as_deref(), Some("media"));
        assert_eq!(gateway_group_name("***"), None);
    }
}
