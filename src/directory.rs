//! The LDAP directory client (`[directory]`): finds a user by name with the service account,
//! checks a password by binding as the user (never by reading or comparing hashes), reads the
//! user's groups, and lists every user allowed to sign in for the sync. Every operation opens
//! its own connection (TLS from the first byte, or StartTLS), each step bounded by
//! `directory.timeout` and the whole by a few of them, so a directory that hangs or drips its
//! answers costs a bounded wait and never a stuck sign-in. Every value put into a filter is
//! escaped per RFC 4515 here, so a user name cannot widen a search.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry, SearchOptions};

use crate::config::directory::{gateway_group_name, DirectoryConfig, Transport};
use crate::config::Secret;

/// The LDAP result code of wrong credentials.
const INVALID_CREDENTIALS: u32 = 49;
/// The LDAP result code of a search that found more entries than its size limit allows.
const SIZE_LIMIT_EXCEEDED: u32 = 4;
/// The LDAP result code of a search whose base does not exist (read as "nothing found").
const NO_SUCH_OBJECT: u32 = 32;
/// Entries asked for per page when listing every user (Active Directory caps pages at 1000).
const PAGE_SIZE: i32 = 500;
/// A whole sign-in (search, groups, bind) may take this many `directory.timeout`s.
const SIGN_IN_TIMEOUTS: u32 = 3;
/// A whole reading of the directory for the sync may take this many `directory.timeout`s.
const SYNC_TIMEOUTS: u32 = 20;

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
    /// The entry's stable id (`directory.id_attribute`; a binary one in hex), if it has one.
    pub id: Option<String>,
    /// The name attribute's value, as the directory spells it.
    pub name: String,
    pub email: Option<String>,
    /// Gateway group names (see [`gateway_group_name`]), sorted, without duplicates.
    pub groups: Vec<String>,
    /// The groups' own names in the directory (under `group_base` only).
    pub directory_groups: Vec<String>,
}

impl DirectoryUser {
    /// Whether the configured administrators' group holds this user: its name exactly
    /// (ignoring ASCII case), never a look-alike that maps to the same gateway group. `None`:
    /// no such group is configured, and the directory says nothing about administrators.
    pub fn is_admin(&self, config: &DirectoryConfig) -> Option<bool> {
        config.admin_group.as_ref().map(|g| {
            self.directory_groups
                .iter()
                .any(|x| x.eq_ignore_ascii_case(g))
        })
    }

    /// Whether this entry is the one a record was made for: the same stable id where both have
    /// one, else the same DN.
    pub fn is_entry(&self, dn: Option<&str>, id: Option<&str>) -> bool {
        match (id, self.id.as_deref()) {
            (Some(a), Some(b)) => a == b,
            _ => dn.is_some_and(|d| same_dn(d, &self.dn)),
        }
    }
}

/// Every user allowed to sign in, by [`listing_key`], and the names whose entry could not be
/// read whole this time (their state is kept as it is, not taken for gone).
#[derive(Debug, Default)]
pub struct Listing {
    pub users: HashMap<String, DirectoryUser>,
    pub unsure: HashSet<String>,
}

/// The key of a name in a [`Listing`]: its canonical form, in lower case.
pub fn listing_key(name: &str) -> String {
    crate::auth::canonical_user_name(name).to_lowercase()
}

/// What a password check found.
#[derive(Debug)]
pub enum Authenticated {
    /// The password is the user's.
    Yes(DirectoryUser),
    /// The user exists (and may sign in) but the bind was refused.
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
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ServiceBind => "service_bind",
            Operation::UserBind => "user_bind",
            Operation::Search => "search",
        }
    }
}

/// Told how every operation ended: `ok`, `rejected` (wrong credentials, nothing found) or
/// `error`.
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

    /// `work`, given `n` times `directory.timeout` in all: a directory that answers slowly,
    /// one entry at a time, cannot hold a sign-in or the sync for longer.
    async fn within<T>(
        &self,
        n: u32,
        work: impl std::future::Future<Output = Result<T, DirectoryError>>,
    ) -> Result<T, DirectoryError> {
        let all = self.config.timeout * n;
        tokio::time::timeout(all, work).await.unwrap_or_else(|_| {
            Err(DirectoryError::Unavailable(format!(
                "the directory did not finish within {all:?}"
            )))
        })
    }

    /// A connection bound as `dn` with `password`: `Ok(None)` when the directory refuses the
    /// credentials (a user's bind refused for any reason is that user's refusal).
    async fn bind(
        &self,
        dn: &str,
        password: &str,
        op: Operation,
    ) -> Result<Option<ldap3::Ldap>, DirectoryError> {
        let timeout = self.config.timeout;
        let unavailable = |e: String| {
            (self.count)(op, "error");
            DirectoryError::Unavailable(e)
        };
        let (conn, mut ldap) = tokio::time::timeout(
            timeout,
            LdapConnAsync::with_settings(self.settings(), &self.config.url),
        )
        .await
        .map_err(|_| unavailable(format!("no connection within {timeout:?}")))?
        .map_err(|e| unavailable(describe(&e)))?;
        ldap3::drive!(conn);
        let result = tokio::time::timeout(timeout, ldap.simple_bind(dn, password))
            .await
            .map_err(|_| unavailable(format!("no answer to a bind within {timeout:?}")))?
            .map_err(|e| unavailable(describe(&e)))?;
        match result.rc {
            0 => {
                (self.count)(op, "ok");
                Ok(Some(ldap))
            }
            // A user's bind refused for any reason (wrong password 49, a lock 19 or 53 …) is
            // that user's refusal, not the directory being down.
            rc if rc == INVALID_CREDENTIALS || op == Operation::UserBind => {
                if rc != INVALID_CREDENTIALS {
                    tracing::info!(code = rc, dn, "directory: a user's bind was refused");
                }
                (self.count)(op, "rejected");
                self.close(ldap).await;
                Ok(None)
            }
            rc => Err(unavailable(format!(
                "the bind as `{dn}` failed with code {rc}: {}",
                result.text
            ))),
        }
    }

    /// Ends a connection, without waiting on a directory that does not answer.
    async fn close(&self, mut ldap: ldap3::Ldap) {
        let _ = tokio::time::timeout(self.config.timeout, ldap.unbind()).await;
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

    /// Every entry a search finds: paged (so a directory's size limit per page does not cut
    /// the list short), or with `limit`, one page of at most that many entries (more is
    /// [`DirectoryError::Ambiguous`]).
    async fn search(
        &self,
        ldap: &mut ldap3::Ldap,
        base: &str,
        filter: &str,
        attrs: Vec<String>,
        limit: Option<i32>,
    ) -> Result<Vec<SearchEntry>, DirectoryError> {
        let timeout = self.config.timeout;
        let fail = |e: String| {
            (self.count)(Operation::Search, "error");
            DirectoryError::Unavailable(e)
        };
        let mut adapters: Vec<Box<dyn Adapter<_, _>>> = vec![Box::new(EntriesOnly::new())];
        match limit {
            Some(n) => {
                ldap.with_search_options(SearchOptions::new().sizelimit(n));
            }
            None => adapters.push(Box::new(PagedResults::new(PAGE_SIZE))),
        }
        ldap.with_timeout(timeout);
        let mut stream = ldap
            .streaming_search_with(adapters, base, Scope::Subtree, filter, attrs)
            .await
            .map_err(|e| fail(describe(&e)))?;
        let mut entries = Vec::new();
        let mut size_limited = false;
        loop {
            let next = tokio::time::timeout(timeout, stream.next())
                .await
                .map_err(|_| fail(format!("no answer to a search within {timeout:?}")))?;
            let next = match next {
                Ok(n) => n,
                // The size limit ends the stream with an error of its own.
                Err(LdapError::LdapResult { result }) if result.rc == SIZE_LIMIT_EXCEEDED => {
                    size_limited = true;
                    break;
                }
                Err(e) => return Err(fail(describe(&e))),
            };
            let Some(raw) = next else { break };
            // The library panics on an entry it cannot parse: a broken answer is an error.
            let entry = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                SearchEntry::construct(raw)
            }))
            .map_err(|_| fail("the directory sent an entry that cannot be read".into()))?;
            entries.push(entry);
        }
        let done = stream.finish().await;
        let too_many = size_limited || done.rc == SIZE_LIMIT_EXCEEDED;
        if limit.is_some_and(|n| too_many || entries.len() > n as usize) {
            (self.count)(Operation::Search, "rejected");
            return Err(DirectoryError::Ambiguous(filter.to_string()));
        }
        if done.rc != 0 && done.rc != NO_SUCH_OBJECT {
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
        let mut attrs = vec![
            c.name_attribute.clone(),
            c.email_attribute.clone(),
            c.id_attribute.clone(),
        ];
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
        let mut names: Vec<String> = match &c.group_filter {
            // memberOf names groups anywhere in the tree: only those under group_base count.
            None => values(&entry, &c.member_of_attribute)
                .iter()
                .filter(|dn| under(dn, &c.group_base))
                .filter_map(|dn| first_rdn_value(dn, &c.group_name_attribute))
                .collect(),
            Some(template) => {
                let filter = template.replace("{dn}", &ldap3::ldap_escape(entry.dn.as_str()));
                let attrs = vec![c.group_name_attribute.clone()];
                self.search(ldap, &c.group_base, &filter, attrs, None)
                    .await?
                    .iter()
                    .filter_map(|g| first(g, &c.group_name_attribute))
                    .collect()
            }
        };
        names.sort();
        names.dedup();
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
            id: entry_id(&entry, &c.id_attribute),
            email: first(&entry, &c.email_attribute),
            name,
            groups,
            directory_groups: names,
        }))
    }

    /// Finds the one user of this name allowed to sign in, on the service account's
    /// connection. Two entries are [`DirectoryError::Ambiguous`] (at most two are read).
    async fn find_on(
        &self,
        ldap: &mut ldap3::Ldap,
        name: &str,
    ) -> Result<Option<DirectoryUser>, DirectoryError> {
        let filter = self.config.user_search_filter(name);
        let attrs = self.user_attributes();
        let mut entries = self
            .search(ldap, &self.config.user_base, &filter, attrs, Some(1))
            .await
            .map_err(|e| match e {
                DirectoryError::Ambiguous(_) => DirectoryError::Ambiguous(name.to_string()),
                other => other,
            })?;
        match entries.pop() {
            Some(entry) => self.user_of(ldap, entry).await,
            None => Ok(None),
        }
    }

    /// Finds a user by name (with their groups), or `None` when no such user may sign in.
    pub async fn find(&self, name: &str) -> Result<Option<DirectoryUser>, DirectoryError> {
        self.within(SIGN_IN_TIMEOUTS, async {
            let mut ldap = self.service().await?;
            let found = self.find_on(&mut ldap, name).await;
            self.close(ldap).await;
            found
        })
        .await
    }

    /// Checks a password by binding as the user it names. An empty password is refused here:
    /// LDAP reads a bind without one as an anonymous bind, which succeeds.
    pub async fn authenticate(
        &self,
        name: &str,
        password: &Secret,
    ) -> Result<Authenticated, DirectoryError> {
        self.within(SIGN_IN_TIMEOUTS, async {
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
                Some(ldap) => {
                    self.close(ldap).await;
                    Ok(Authenticated::Yes(user))
                }
                None => Ok(Authenticated::WrongPassword(user)),
            }
        })
        .await
    }

    /// Every user allowed to sign in (for the sync). A name more than one entry holds is left
    /// out (and logged): it cannot be told apart. A user whose groups could not be read this
    /// time is listed as unsure.
    pub async fn all_users(&self) -> Result<Listing, DirectoryError> {
        self.within(SYNC_TIMEOUTS, async {
            let mut ldap = self.service().await?;
            let listing = self.list_on(&mut ldap).await;
            self.close(ldap).await;
            listing
        })
        .await
    }

    async fn list_on(&self, ldap: &mut ldap3::Ldap) -> Result<Listing, DirectoryError> {
        let c = &self.config;
        let filter = c.all_users_filter();
        let entries = self
            .search(ldap, &c.user_base, &filter, self.user_attributes(), None)
            .await?;
        let mut listing = Listing::default();
        let mut twice = Vec::new();
        for entry in entries {
            let key = first(&entry, &c.name_attribute).map(|n| listing_key(&n));
            match self.user_of(ldap, entry).await {
                Ok(Some(user)) => {
                    let key = listing_key(&user.name);
                    if listing.users.insert(key.clone(), user).is_some() {
                        twice.push(key);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "directory: a user's groups could not be read");
                    listing.unsure.extend(key);
                }
            }
        }
        for name in twice {
            tracing::warn!(name = %name, "directory: more than one entry has this name; left out");
            listing.users.remove(&name);
            listing.unsure.insert(name);
        }
        Ok(listing)
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

/// An entry's stable id: a text value as it is, a binary one (AD's objectGUID) in hex.
fn entry_id(entry: &SearchEntry, attribute: &str) -> Option<String> {
    first(entry, attribute).or_else(|| {
        entry
            .bin_attrs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(attribute))
            .and_then(|(_, v)| v.first())
            .filter(|v| !v.is_empty())
            .map(hex::encode)
    })
}

/// A DN in a form in which two spellings of it compare equal: lower case, no spaces around
/// `,`, `=` and `+` (escapes are kept as they are).
fn normalised_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut chars = dn.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push(c);
                if let Some(n) = chars.next() {
                    out.extend(n.to_lowercase());
                }
            }
            ',' | '=' | '+' => {
                while out.ends_with(' ') {
                    out.pop();
                }
                out.push(c);
                while chars.peek() == Some(&' ') {
                    chars.next();
                }
            }
            c => out.extend(c.to_lowercase()),
        }
    }
    out
}

fn same_dn(a: &str, b: &str) -> bool {
    normalised_dn(a) == normalised_dn(b)
}

/// Whether `dn` is an entry below `base` (not `base` itself).
fn under(dn: &str, base: &str) -> bool {
    let (dn, base) = (normalised_dn(dn), normalised_dn(base));
    dn.len() > base.len() + 1 && dn.ends_with(&base) && dn[..dn.len() - base.len()].ends_with(',')
}

/// The value of a DN's first RDN when its attribute is `attribute` (`cn=media,ou=groups,…`
/// gives `media` for `cn`), with RFC 4514 escapes undone (`\,`, and `\C3\A9` for `é`).
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
    let mut bytes = Vec::new();
    let mut it = value.trim().chars().peekable();
    let mut buf = [0u8; 4];
    while let Some(c) = it.next() {
        if c != '\\' {
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let a = it.next()?;
        match (a.to_digit(16), it.peek().and_then(|b| b.to_digit(16))) {
            (Some(hi), Some(lo)) => {
                it.next();
                bytes.push((hi * 16 + lo) as u8);
            }
            _ => bytes.extend_from_slice(a.encode_utf8(&mut buf).as_bytes()),
        }
    }
    let out = String::from_utf8(bytes).ok()?;
    (!out.is_empty()).then_some(out)
}

/// How long the sync waits after a failed attempt before it tries again (never longer than
/// the interval).
pub fn retry_after(interval: std::time::Duration) -> std::time::Duration {
    interval.min(std::time::Duration::from_secs(10))
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
        assert_eq!(
            first_rdn_value("cn=caf\\C3\\A9,ou=groups", "cn").as_deref(),
            Some("café")
        );
        assert_eq!(first_rdn_value("cn=bad\\C3,ou=groups", "cn"), None);
        assert_eq!(first_rdn_value("ou=groups,dc=x", "cn"), None);
        assert_eq!(first_rdn_value("cn=trailing\\", "cn"), None);
        assert_eq!(first_rdn_value("garbage", "cn"), None);
    }

    #[test]
    fn groups_count_only_under_the_group_base() {
        let base = "ou=groups,dc=example,dc=org";
        assert!(under("cn=media,ou=groups,dc=example,dc=org", base));
        assert!(under("CN=Media, OU=Groups, DC=Example, DC=Org", base));
        assert!(!under("cn=media,ou=elsewhere,dc=example,dc=org", base));
        assert!(!under("ou=groups,dc=example,dc=org", base));
        assert!(!under("cn=x,fakeou=groups,dc=example,dc=org", base));
        assert!(same_dn("uid=a, ou=People,dc=x", "UID=A,ou=people, dc=x"));
        assert!(!same_dn("uid=a,ou=people,dc=x", "uid=b,ou=people,dc=x"));
    }

    #[test]
    fn administrators_come_from_the_admin_group_by_its_exact_name() {
        let text = "[[route]]\nname = \"a\"\nupstream = \"127.0.0.1:1\"\n[directory]\n\
                    url = \"ldaps://x\"\nbase_dn = \"dc=x\"\nbind_dn = \"cn=gw,dc=x\"\n\
                    bind_password_file = \"/p\"\nadmin_group = \"Gateway Admins\"\n";
        let config = crate::config::Config::parse(
            text,
            std::path::Path::new("t.toml"),
            &crate::config::EnvOverrides::default(),
        )
        .unwrap()
        .directory
        .unwrap();
        let with = |names: &[&str]| DirectoryUser {
            dn: "uid=a,dc=x".into(),
            id: None,
            name: "a".into(),
            email: None,
            groups: names.iter().filter_map(|n| gateway_group_name(n)).collect(),
            directory_groups: names.iter().map(|n| n.to_string()).collect(),
        };
        assert_eq!(with(&["gateway admins"]).is_admin(&config), Some(true));
        // The same gateway group name, but not the administrators' group.
        assert_eq!(with(&["gateway-admins"]).is_admin(&config), Some(false));
        assert_eq!(with(&["Gateway  Admins"]).is_admin(&config), Some(false));
        assert_eq!(with(&[]).is_admin(&config), Some(false));
    }

    #[test]
    fn a_record_belongs_to_its_entry_by_id_else_by_dn() {
        let user = DirectoryUser {
            dn: "uid=a,ou=people,dc=x".into(),
            id: Some("id-1".into()),
            name: "a".into(),
            email: None,
            groups: vec![],
            directory_groups: vec![],
        };
        assert!(user.is_entry(Some("uid=renamed,dc=x"), Some("id-1")));
        assert!(!user.is_entry(Some("uid=a,ou=people,dc=x"), Some("id-2")));
        assert!(user.is_entry(Some("UID=a, ou=people,dc=x"), None));
        assert!(!user.is_entry(Some("uid=b,ou=people,dc=x"), None));
        assert!(!user.is_entry(None, None));
    }
}
