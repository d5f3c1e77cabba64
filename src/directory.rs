//! The LDAP directory client (`[directory]`): finds a user by name with the service account,
//! checks a password by binding as the user (never by reading or comparing hashes), reads the
//! user's groups, and lists every user allowed to sign in for the sync. Every operation opens
//! its own connection (TLS from the first byte, or StartTLS), bounded by `directory.timeout`,
//! so a directory that hangs costs one timeout and never a stuck login. Every value put into a
//! filter is escaped per RFC 4515 here, so a user name cannot widen a search.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry};

use crate::config::directory::{gateway_group_name, DirectoryConfig, Transport};
use crate::config::Secret;

/// LDAP result codes that mean "these credentials are wrong", not "the directory is broken".
const INVALID_CREDENTIALS: u32 = 49;
/// Entries asked for per page when listing every user (Active Directory caps pages at 1000).
const PAGE_SIZE: i32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Unreachable, timed out, TLS refused, or the service account's bind refused: the
    /// directory cannot answer now.
    #[error("the user directory is unavailable: {0}")]
    Unavailable(String),
    /// A name matches more than one entry: refused, never guessed.
    #[error("`{0}` matches more than one directory entry")]
    Ambiguous(String),
}

/// A user as the directory has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryUser {
    pub dn: String,
    /// The name attribute's value, as the directory spells it.
    pub name: String,
    pub email: Option<String>,
    /// Gateway group names (see [`gateway_group_name`]), sorted, without duplicates.
    pub groups: Vec<String>,
}

impl DirectoryUser {
    /// Whether the configured administrators' group holds this user (`None`: no such group
    /// is configured, and the directory says nothing about administrators).
    pub fn is_admin(&self, config: &DirectoryConfig) -> Option<bool> {
        config
            .admin_group
            .as_ref()
            .map(|g| self.groups.iter().any(|x| x == g))
    }
}

/// What a password check found.
#[derive(Debug)]
pub enum Authenticated {
    /// The password is the user's.
    Yes(DirectoryUser),
    /// The user exists (and may sign in) but the password is wrong.
    WrongPassword(DirectoryUser),
    /// No user of that name may sign in (absent, disabled, or outside the user filter).
    UnknownUser,
}

/// Which operation a counted outcome belongs to (`portcullis_directory_operations_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// The service account's bind.
    ServiceBind,
    /// A user's bind with their password.
    UserBind,
    Search,
}

impl Operation {
    pub const ALL: [Operation; 3] = [
        Operation::ServiceBind,
        Operation::UserBind,
        Operation::Search,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ServiceBind => "service_bind",
            Operation::UserBind => "user_bind",
            Operation::Search => "search",
        }
    }
}

/// How an operation ended: `ok`, `rejected` (wrong credentials, nothing found) or `error`.
pub type Counter = dyn Fn(Operation, &'static str) + Send + Sync;

pub struct Directory {
    pub config: DirectoryConfig,
    bind_password: Secret,
    tls: Option<Arc<rustls::ClientConfig>>,
    count: Box<Counter>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

/// A problem with the files `[directory]` names, as (key, problem).
pub type SetupError = (&'static str, String);

impl Directory {
    /// Reads the service account's password and the CA file. `count` is told the outcome of
    /// every operation (for the metrics).
    pub fn new(config: &DirectoryConfig, count: Box<Counter>) -> Result<Directory, SetupError> {
        let text = std::fs::read_to_string(&config.bind_password_file).map_err(|e| {
            (
                "directory.bind_password_file",
                format!("cannot read `{}`: {e}", config.bind_password_file.display()),
            )
        })?;
        let password = text.trim_end_matches(['\r', '\n']).to_string();
        if password.is_empty() {
            return Err((
                "directory.bind_password_file",
                format!(
                    "`{}` is empty (an empty password would bind anonymously)",
                    config.bind_password_file.display()
                ),
            ));
        }
        let tls = match &config.ca_file {
            None => None,
            Some(path) => Some(tls_with_ca(path).map_err(|e| ("directory.ca_file", e))?),
        };
        Ok(Directory {
            config: config.clone(),
            bind_password: Secret::new(password),
            tls,
            count,
        })
    }

    fn settings(&self) -> LdapConnSettings {
        let mut s = LdapConnSettings::new()
            .set_conn_timeout(self.config.timeout)
            .set_starttls(self.config.transport == Transport::StartTls);
        if let Some(tls) = &self.tls {
            s = s.set_config(Arc::clone(tls));
        }
        s
    }

    /// A connection bound as `dn` with `password`: `Ok(None)` when the directory refuses the
    /// credentials.
    async fn bind(
        &self,
        dn: &str,
        password: &str,
        op: Operation,
    ) -> Result<Option<ldap3::Ldap>, DirectoryError> {
        let unavailable = |e: String| {
            (self.count)(op, "error");
            DirectoryError::Unavailable(e)
        };
        let (conn, mut ldap) = tokio::time::timeout(
            self.config.timeout,
            LdapConnAsync::with_settings(self.settings(), &self.config.url),
        )
        .await
        .map_err(|_| unavailable(format!("no connection within {:?}", self.config.timeout)))?
        .map_err(|e| unavailable(describe(&e)))?;
        ldap3::drive!(conn);
        let result = tokio::time::timeout(self.config.timeout, ldap.simple_bind(dn, password))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "no answer to a bind within {:?}",
                    self.config.timeout
                ))
            })?
            .map_err(|e| unavailable(describe(&e)))?;
        match result.rc {
            0 => {
                (self.count)(op, "ok");
                Ok(Some(ldap))
            }
            INVALID_CREDENTIALS => {
                (self.count)(op, "rejected");
                let _ = ldap.unbind().await;
                Ok(None)
            }
            rc => Err(unavailable(format!(
                "the bind as `{dn}` failed with code {rc}: {}",
                result.text
            ))),
        }
    }

    /// A connection bound as the service account.
    async fn service(&self) -> Result<ldap3::Ldap, DirectoryError> {
        match self
            .bind(
                &self.config.bind_dn,
                self.bind_password.expose(),
                Operation::ServiceBind,
            )
            .await?
        {
            Some(ldap) => Ok(ldap),
            None => Err(DirectoryError::Unavailable(format!(
                "the directory refused the service account `{}` (directory.bind_dn, \
                 directory.bind_password_file)",
                self.config.bind_dn
            ))),
        }
    }

    /// Every entry a search finds (paged, so a directory's size limit per page does not cut
    /// the list short).
    async fn search(
        &self,
        ldap: &mut ldap3::Ldap,
        base: &str,
        filter: &str,
        attrs: Vec<String>,
    ) -> Result<Vec<SearchEntry>, DirectoryError> {
        let timeout = self.config.timeout;
        let fail = |e: String| {
            (self.count)(Operation::Search, "error");
            DirectoryError::Unavailable(e)
        };
        let adapters: Vec<Box<dyn Adapter<_, _>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(PAGE_SIZE)),
        ];
        ldap.with_timeout(timeout);
        let mut stream = ldap
            .streaming_search_with(adapters, base, Scope::Subtree, filter, attrs)
            .await
            .map_err(|e| fail(describe(&e)))?;
        let mut entries = Vec::new();
        loop {
            let next = tokio::time::timeout(timeout, stream.next())
                .await
                .map_err(|_| fail(format!("no answer to a search within {timeout:?}")))?
                .map_err(|e| fail(describe(&e)))?;
            let Some(raw) = next else { break };
            // The library panics on an entry it cannot parse: a broken answer is an error.
            let entry = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                SearchEntry::construct(raw)
            }))
            .map_err(|_| fail("the directory sent an entry that cannot be read".into()))?;
            entries.push(entry);
        }
        let done = stream.finish().await;
        // 32: no such object (the base does not exist) reads as "nothing found".
        if done.rc != 0 && done.rc != 32 {
            return Err(fail(format!(
                "a search under `{base}` failed with code {}: {}",
                done.rc, done.text
            )));
        }
        (self.count)(
            Operation::Search,
            if entries.is_empty() { "rejected" } else { "ok" },
        );
        Ok(entries)
    }

    fn user_attributes(&self) -> Vec<String> {
        let c = &self.config;
        let mut attrs = vec![c.name_attribute.clone(), c.email_attribute.clone()];
        if c.group_filter.is_none() {
            attrs.push(c.member_of_attribute.clone());
        }
        attrs
    }

    /// A user and their groups, read with the service account's connection.
    async fn user_of(
        &self,
        ldap: &mut ldap3::Ldap,
        entry: SearchEntry,
    ) -> Result<Option<DirectoryUser>, DirectoryError> {
        let c = &self.config;
        let Some(name) = first(&entry, &c.name_attribute) else {
            return Ok(None);
        };
        let names: Vec<String> = match &c.group_filter {
            None => values(&entry, &c.member_of_attribute)
                .iter()
                .filter_map(|dn| first_rdn_value(dn, &c.group_name_attribute))
                .collect(),
            Some(template) => {
                let filter = template.replace("{dn}", &ldap3::ldap_escape(entry.dn.as_str()));
                self.search(
                    ldap,
                    &c.group_base,
                    &filter,
                    vec![c.group_name_attribute.clone()],
                )
                .await?
                .iter()
                .filter_map(|g| first(g, &c.group_name_attribute))
                .collect()
            }
        };
        let mut groups: Vec<String> = names
            .iter()
            .filter_map(|g| gateway_group_name(g))
            // `admins` is the administrator flag, given only through `admin_group`.
            .filter(|g| g != "admins")
            .collect();
        groups.sort();
        groups.dedup();
        Ok(Some(DirectoryUser {
            dn: entry.dn.clone(),
            email: first(&entry, &c.email_attribute),
            name,
            groups,
        }))
    }

    /// Finds the one user of this name allowed to sign in. `conn` is the service account's
    /// connection.
    async fn find_on(
        &self,
        ldap: &mut ldap3::Ldap,
        name: &str,
    ) -> Result<Option<DirectoryUser>, DirectoryError> {
        let filter = self.config.user_search_filter(name);
        let mut entries = self
            .search(
                ldap,
                &self.config.user_base,
                &filter,
                self.user_attributes(),
            )
            .await?;
        if entries.len() > 1 {
            return Err(DirectoryError::Ambiguous(name.to_string()));
        }
        match entries.pop() {
            Some(entry) => self.user_of(ldap, entry).await,
            None => Ok(None),
        }
    }

    /// Finds a user by name (with their groups), or `None` when no such user may sign in.
    pub async fn find(&self, name: &str) -> Result<Option<DirectoryUser>, DirectoryError> {
        let mut ldap = self.service().await?;
        let found = self.find_on(&mut ldap, name).await;
        let _ = ldap.unbind().await;
        found
    }

    /// Checks a password by binding as the user it names. An empty password is refused here:
    /// LDAP reads a bind without one as an anonymous bind, which succeeds.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &Secret,
    ) -> Result<Authenticated, DirectoryError> {
        let Some(user) = self.find(name).await? else {
            return Ok(Authenticated::UnknownUser);
        };
        if password.expose().is_empty() {
            return Ok(Authenticated::WrongPassword(user));
        }
        match self
            .bind(&user.dn, password.expose(), Operation::UserBind)
            .await?
        {
            Some(mut ldap) => {
                let _ = ldap.unbind().await;
                Ok(Authenticated::Yes(user))
            }
            None => Ok(Authenticated::WrongPassword(user)),
        }
    }

    /// Every user allowed to sign in, by lower-case name (for the sync). A name that more
    /// than one entry holds is left out (and logged): it cannot be told apart.
    pub async fn all_users(&self) -> Result<HashMap<String, DirectoryUser>, DirectoryError> {
        let mut ldap = self.service().await?;
        let result = async {
            let entries = self
                .search(
                    &mut ldap,
                    &self.config.user_base,
                    &self.config.all_users_filter(),
                    self.user_attributes(),
                )
                .await?;
            let mut users: HashMap<String, DirectoryUser> = HashMap::new();
            let mut twice = Vec::new();
            for entry in entries {
                if let Some(user) = self.user_of(&mut ldap, entry).await? {
                    let key = user.name.to_lowercase();
                    if users.insert(key.clone(), user).is_some() {
                        twice.push(key);
                    }
                }
            }
            for name in twice {
                tracing::warn!(name = %name, "directory: more than one entry has this name; left out");
                users.remove(&name);
            }
            Ok(users)
        }
        .await;
        let _ = ldap.unbind().await;
        result
    }
}

/// A TLS client configuration that trusts the certificates of a PEM file only.
fn tls_with_ca(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("`{}` is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("`{}` holds no certificate", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| format!("`{}`: {e}", path.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An LDAP error in words a log reader can act on (no password is ever in it).
fn describe(e: &LdapError) -> String {
    match e {
        LdapError::Io { source } => format!("connection failed: {source}"),
        other => other.to_string(),
    }
}

/// An attribute's values, whatever the letter case the server used for its name.
fn values<'a>(entry: &'a SearchEntry, attribute: &str) -> &'a [String] {
    entry
        .attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attribute))
        .map(|(_, v)| v.as_slice())
        .unwrap_or(&[])
}

fn first(entry: &SearchEntry, attribute: &str) -> Option<String> {
    values(entry, attribute)
        .first()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The value of a DN's first RDN when its attribute is `attribute` (`cn=media,ou=groups,…`
/// gives `media` for `cn`), with RFC 4514 escapes undone.
pub fn first_rdn_value(dn: &str, attribute: &str) -> Option<String> {
    let mut rdn = String::new();
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                rdn.push(c);
                rdn.push(chars.next()?);
            }
            ',' | '+' => break,
            c => rdn.push(c),
        }
    }
    let (attr, value) = rdn.split_once('=')?;
    if !attr.trim().eq_ignore_ascii_case(attribute) {
        return None;
    }
    let mut out = String::new();
    let mut it = value.trim().chars().peekable();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let a = it.next()?;
        match (a.to_digit(16), it.peek().and_then(|b| b.to_digit(16))) {
            (Some(hi), Some(lo)) => {
                it.next();
                // A hex pair is one byte of UTF-8; multi-byte characters are rare in group
                // names and a lone byte that is not ASCII is dropped.
                let byte = (hi * 16 + lo) as u8;
                if byte.is_ascii() {
                    out.push(byte as char);
                }
            }
            _ => out.push(a),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// How long the sync waits after a failed attempt before it tries again (never longer than
/// the interval).
pub fn retry_after(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_come_from_the_first_rdn() {
        assert_eq!(
            first_rdn_value("cn=media,ou=groups,dc=example,dc=org", "cn").as_deref(),
            Some("media")
        );
        assert_eq!(
            first_rdn_value("CN=Domain Admins,CN=Users,DC=corp", "cn").as_deref(),
            Some("Domain Admins")
        );
        assert_eq!(
            first_rdn_value("cn=a\\,b,ou=groups", "cn").as_deref(),
            Some("a,b")
        );
        assert_eq!(
            first_rdn_value("cn=x\\2Cy,ou=groups", "cn").as_deref(),
            Some("x,y")
        );
        assert_eq!(first_rdn_value("ou=groups,dc=x", "cn"), None);
        assert_eq!(first_rdn_value("cn=trailing\\", "cn"), None);
        assert_eq!(first_rdn_value("garbage", "cn"), None);
    }
}
