//! Configuration: the TOML file form (`FileConfig`, unknown keys rejected) and the validated
//! internal form (`Config`) that the rest of the gateway uses. Validation happens once, here;
//! every error names the file, the key and the problem.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub mod acme;
pub mod directory;
pub mod live;
pub mod mail;
mod oidc;
mod plex;
pub mod rules;
pub mod webhook;
pub use oidc::{
    is_loopback_url as oidc_is_loopback, AutoLink, ClientSecretSource, OidcProviderConfig,
};
pub use plex::PlexConfig;
pub use rules::{DefaultPolicy, Policy, Rule, Subject};

/// Default public listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default private listener for `/metrics`, `/healthz`, `/readyz`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// Default session lifetime: 7 days.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default interval of the revocation delta poll: 250 ms, so that a revocation written by the
/// CLI (or another process) to SQLite ends every socket it concerns within a second (about
/// 70 µs a poll when nothing is new).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Default staleness after which `/readyz` reports the view as stale: 30 seconds.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(30);
/// Default time a store operation waits for a locked SQLite database: 5 seconds.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default graceful-shutdown grace period (SIGTERM): 5 seconds.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);
/// Time for a request head to arrive, from connect or from the previous response: 30 s.
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upstream connection waits in the keep-alive pool by default. Without a limit a
/// pooled connection lives until the upstream closes it (Jellyfin's Kestrel after 130 s, nginx
/// after 75 s), and after a burst the pool (up to 256 connections) holds their memory, about
/// 40 KiB each, that long: 8 MiB of resident memory 30 s after 10,000 client connections closed
/// (bench/idle.sh). Reconnecting after 20 idle seconds costs one TCP handshake on the LAN.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Time for a body the gateway reads itself (forms, media-server logins) to arrive: 30 s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections per client address: 256 (a household behind one NAT stays far below).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// Default cap on the total size of request headers, in bytes (larger → 431).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Default cap on request bodies sent to the gateway's own pages, in bytes (larger → 413).
pub const DEFAULT_MAX_FORM_BYTES: usize = 64 * 1024;
/// OWASP minimum argon2id memory cost, in KiB.
pub const ARGON2_MIN_MEMORY_KIB: u32 = 19_456;
/// OWASP minimum argon2id iterations at the minimum memory cost.
pub const ARGON2_MIN_ITERATIONS: u32 = 2;
/// Default number of password hashes computed at once (the rest wait their turn): one less
/// than the machine's cores, at least one, so a storm of logins always leaves a core to the
/// proxy.
pub fn default_hash_concurrency() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}
/// Default issuer (`iss`) of session tokens.
pub const DEFAULT_ISSUER: &str = "portcullis";
/// Default shortest new password, in characters (NIST SP 800-63B allows 8; we ask for more).
pub const DEFAULT_MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted, in bytes; NIST asks that at least 64 characters be allowed.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Default consecutive failed logins after which an account locks.
pub const DEFAULT_MAX_FAILURES: u32 = 10;
/// NIST SP 800-63B: at most 100 consecutive failures before locking.
pub const MAX_MAX_FAILURES: u32 = 100;
/// Default lockout length: 15 minutes.
pub const DEFAULT_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Default lifetime of a password reset link: 1 hour.
pub const DEFAULT_RESET_LINK_TTL: Duration = Duration::from_secs(3600);
/// Default failed attempts from one IP address within `ip_window` before it is throttled.
pub const DEFAULT_IP_MAX_FAILURES: u32 = 30;
/// Default window over which failures from one IP address are counted: 15 minutes.
pub const DEFAULT_IP_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Errors met while loading or validating a config file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: key `{key}`: {problem}")]
    Invalid {
        file: String,
        key: String,
        problem: String,
    },
}

/// A secret value whose `Debug` and `Display` print nothing of it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

// ---------------------------------------------------------------------------------------------
// File form
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    session: FileSession,
    #[serde(default)]
    password: FilePassword,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    route: Vec<FileRoute>,
    #[serde(default)]
    oidc: Vec<oidc::FileOidc>,
    #[serde(default)]
    webauthn: FileWebauthn,
    #[serde(default)]
    rule: Vec<rules::FileRule>,
    directory: Option<directory::FileDirectory>,
    mail: Option<mail::FileMail>,
    #[serde(default)]
    webhook: Vec<webhook::FileWebhook>,
    #[serde(default)]
    tls: acme::FileTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebauthn {
    rp_id: Option<String>,
    rp_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    require_2fa: Option<String>,
    require_passkey: Option<String>,
    max_failures: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    lockout: Option<Duration>,
    ip_max_failures: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    ip_window: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reset_link_ttl: Option<Duration>,
    secrets_key_file: Option<PathBuf>,
    password_form: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    public_url: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    threads: Option<usize>,
    work_stealing: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    grace_period: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    head_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    upstream_idle_timeout: Option<Duration>,
    max_connections_per_ip: Option<usize>,
    max_header_bytes: Option<usize>,
    max_form_bytes: Option<usize>,
    data_dir: Option<PathBuf>,
    trusted_proxies: Option<Vec<String>>,
    client_ip_header: Option<String>,
    #[serde(default, with = "humantime_serde")]
    hsts_max_age: Option<Duration>,
    hsts_include_subdomains: Option<bool>,
    redirect_listen: Option<String>,
    redirect_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    url: Option<Secret>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_staleness: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    busy_timeout: Option<Duration>,
    on_stale: Option<String>,
    #[serde(default, with = "humantime_serde")]
    audit_retention: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSession {
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    key_file: Option<PathBuf>,
    issuer: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePassword {
    memory_kib: Option<u32>,
    iterations: Option<u32>,
    parallelism: Option<u32>,
    max_concurrent: Option<usize>,
    min_length: Option<usize>,
    blocklist_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: String,
    host: Option<String>,
    path_prefix: Option<String>,
    upstream: String,
    kind: Option<String>,
    #[serde(default)]
    public_paths: Vec<String>,
    identity_header: Option<String>,
    media: Option<FileMedia>,
    plex: Option<plex::FilePlex>,
    default_policy: Option<String>,
}

/// `[route.media]`: how a `jellyfin` or `emby` route treats the media server's own tokens.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMedia {
    #[serde(default)]
    user_map: std::collections::BTreeMap<String, String>,
    password_login: Option<String>,
    users_public: Option<String>,
    blocked_paths: Option<Vec<String>>,
    adopt_unknown_tokens: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    token_idle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    token_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    grant_lifetime: Option<Duration>,
    images: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated form
// ---------------------------------------------------------------------------------------------

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub session: SessionConfig,
    pub password: PasswordConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub routes: Vec<Route>,
    /// Single sign-on providers (`[[oidc]]`).
    pub oidc: Vec<OidcProviderConfig>,
    /// Passkeys' relying party (`[webauthn]`).
    pub webauthn: WebauthnConfig,
    /// Access rules (`[[rule]]`), in order: the first that matches a request decides.
    pub rules: Vec<Rule>,
    /// Users from an LDAP directory (`[directory]`).
    pub directory: Option<directory::DirectoryConfig>,
    /// The SMTP server mail goes through (`[mail]`).
    pub mail: Option<mail::MailConfig>,
    /// Endpoints told of security events (`[[webhook]]`).
    pub webhooks: Vec<webhook::WebhookConfig>,
    /// Certificates from an ACME certificate authority (`[tls.acme]`).
    pub acme: Option<acme::AcmeConfig>,
    /// Further certificates (`[[tls.certificate]]`), each handed out for the names it is for
    /// (SNI); `server.tls_cert` (or the ACME certificate) answers every other name.
    pub certificates: Vec<TlsFiles>,
}

/// The WebAuthn relying party: its id (the public URL's host, or a domain it is under, for
/// several hostnames under one domain), its display name and the one origin passkeys answer
/// for (the public URL's).
#[derive(Debug, Clone)]
pub struct WebauthnConfig {
    pub rp_id: String,
    pub rp_name: String,
    pub origin: url::Url,
}

/// Who must sign in with a passkey (password login refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequirePasskey {
    Off,
    Admins,
    All,
}

/// Who must use a second factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Require2fa {
    Off,
    Admins,
    All,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub require_2fa: Require2fa,
    pub require_passkey: RequirePasskey,
    /// Consecutive failed logins (password or code) after which an account locks.
    pub max_failures: u32,
    pub lockout: Duration,
    pub ip_max_failures: u32,
    pub ip_window: Duration,
    pub reset_link_ttl: Duration,
    /// Key that encrypts TOTP secrets at rest; generated 0600 on first start if absent.
    pub secrets_key_file: PathBuf,
    /// Whether the login page shows the password form (`password_form = "shown"`, the
    /// default) or only the single sign-on buttons (`"hidden"`; the JSON login API stays).
    pub password_form: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Origin users reach the gateway at, without a trailing slash, e.g. `https://media.example`.
    pub public_url: String,
    pub secure: bool,
    pub tls: Option<TlsFiles>,
    pub threads: usize,
    /// Whether idle proxy threads take work from busy ones (Pingora's `work_stealing`).
    pub work_stealing: bool,
    pub grace_period: Duration,
    /// How long a connection may take to deliver a complete request head, counted from when
    /// it opened or its previous response ended; a slow or idle one is closed after it.
    pub head_timeout: Duration,
    /// How long the gateway's own pages and the media-server logins may take to receive a
    /// request body.
    pub body_timeout: Duration,
    /// How long an upstream connection waits in the keep-alive pool for its next request
    /// before the gateway closes it (see `DEFAULT_UPSTREAM_IDLE_TIMEOUT`).
    pub upstream_idle_timeout: Duration,
    /// Open connections one client address may hold; past it, its newest waiting ones close.
    pub max_connections_per_ip: usize,
    pub max_header_bytes: usize,
    pub max_form_bytes: usize,
    /// Where the pid file and upgrade socket live.
    pub data_dir: PathBuf,
    /// Peers whose forwarding header is believed (see [`crate::netaddr`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The forwarding header that names the client behind a trusted proxy.
    pub client_ip_header: crate::netaddr::ClientIpHeader,
    /// The `Strict-Transport-Security` value every response carries (`None`: no HSTS).
    pub hsts: Option<String>,
    /// A plain-http listener (port 80) that sends every request to the https public URL.
    pub redirect_listen: Option<SocketAddr>,
    /// Whether that listener redirects (`false`: it answers ACME challenges only, 404 else).
    pub redirect_http: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: Secret,
    pub poll_interval: Duration,
    pub max_staleness: Duration,
    pub busy_timeout: Duration,
    /// What the proxy does once the view has not synced for `max_staleness`.
    pub on_stale: OnStale,
    /// Audit entries older than this are purged.
    pub audit_retention: Duration,
}

/// Audit entries are kept this long unless configured otherwise.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The policy for a revocation view that has not synced for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    /// Keep deciding from the view as it stands (revocations made elsewhere meanwhile are not
    /// seen; the instance says so in metrics and `/readyz`).
    Serve,
    /// Refuse requests that need a session with 503 until the view syncs again.
    Deny,
}

/// Which kind of store a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreConfig {
    pub fn kind(&self) -> StoreKind {
        if self.url.expose().starts_with("sqlite://") {
            StoreKind::Sqlite
        } else {
            StoreKind::Postgres
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub ttl: Duration,
    pub key_file: PathBuf,
    /// A key given through `PORTCULLIS_SESSION_KEY` (base64url, ≥ 32 bytes), used instead of the file.
    pub key_override: Option<Secret>,
    pub issuer: String,
}

#[derive(Debug, Clone)]
pub struct PasswordConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
    pub max_concurrent: usize,
    pub min_length: usize,
    /// Lower-cased passwords that may not be chosen (from `blocklist_file`).
    pub blocklist: std::sync::Arc<HashSet<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Generic,
    Jellyfin,
    Emby,
    Plex,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Generic => "generic",
            RouteKind::Jellyfin => "jellyfin",
            RouteKind::Emby => "emby",
            RouteKind::Plex => "plex",
        }
    }
}

/// One upstream route: requests whose host and path prefix match go to `upstream`.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Lower-case host name without port; `None` matches any host.
    pub host: Option<String>,
    /// Always starts with `/`; never ends with `/` unless it is exactly `/`.
    pub path_prefix: String,
    pub upstream: SocketAddr,
    /// The upstream as written in the config, for the `Host` header sent upstream when needed.
    pub upstream_authority: String,
    pub kind: RouteKind,
    pub public_paths: Vec<String>,
    /// Header in which the authenticated user's name is sent upstream, if any (lower-case).
    pub identity_header: Option<String>,
    /// For `jellyfin` and `emby` routes: how the media server's tokens are handled.
    pub media: Option<MediaConfig>,
    /// For `plex` routes: how Plex tokens are resolved and bound.
    pub plex: Option<PlexConfig>,
    /// What a request no `[[rule]]` matched needs here.
    pub default_policy: DefaultPolicy,
    /// Removed from the file by a reload: kept so that route indices stay stable (for metrics,
    /// playback grants and owed upstream logouts), but never matched by a request.
    pub retired: bool,
}

/// Media tokens idle this long are ended (logged out upstream).
pub const DEFAULT_MEDIA_TOKEN_IDLE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Media tokens are ended this long after they were minted, however active.
pub const DEFAULT_MEDIA_TOKEN_LIFETIME: Duration = Duration::from_secs(180 * 24 * 3600);
/// A playback grant lets credential-less stream requests for its item through this long.
pub const DEFAULT_GRANT_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// Paths refused on media routes unless configured otherwise (matched case-insensitively
/// after the base URL and the legacy `/emby` `/mediabrowser` prefixes).
pub const DEFAULT_BLOCKED_PATHS: [&str; 2] = ["/Startup", "/api-docs"];

/// Whether password logins through the media server's own login routes are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordLogin {
    Allow,
    /// Refused for users with a second factor at the gateway, unless the request also carries
    /// a gateway session of that user that passed the second factor.
    DenyFor2faUsers,
    Deny,
}

/// Credential-less image requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePolicy {
    /// Allowed from an address that a live session of this route was seen at recently.
    Grant,
    Open,
}

#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Media-server user name (lower-case) → gateway user name. Unlisted names map to the
    /// gateway user of the same name.
    pub user_map: std::collections::HashMap<String, String>,
    pub password_login: PasswordLogin,
    /// `GET /Users/Public` answers `[]` (true) or is passed through (false).
    pub hide_user_list: bool,
    /// Lower-case path prefixes refused with 403.
    pub blocked_paths: Vec<String>,
    /// Unknown tokens are checked once with `GET /Users/Me` and bound when valid.
    pub adopt_unknown_tokens: bool,
    pub token_idle: Duration,
    pub token_lifetime: Duration,
    pub grant_lifetime: Duration,
    pub images: ImagePolicy,
}

impl MediaConfig {
    /// The gateway user name a media-server user name maps to.
    pub fn gateway_user<'a>(&'a self, media_name: &'a str) -> &'a str {
        self.user_map
            .get(&media_name.to_lowercase())
            .map_or(media_name, String::as_str)
    }
}

/// Largest password blocklist file read, in bytes (a few million common passwords fit).
const MAX_BLOCKLIST_BYTES: u64 = 64 << 20;

/// Reads a UTF-8 text file of at most `cap` bytes: a larger file, or a path such as
/// `/dev/zero` that never ends, is an error rather than a hang.
pub(crate) fn read_capped(path: &Path, cap: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(cap + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > cap {
        return Err(std::io::Error::other(format!(
            "the file is larger than {cap} bytes"
        )));
    }
    Ok(text)
}

/// Environment variables that override values of the file.
#[derive(Debug, Default, Clone)]
pub struct EnvOverrides {
    pub store_url: Option<String>,
    pub session_key: Option<String>,
    pub session_key_file: Option<String>,
}

impl EnvOverrides {
    /// Reads `PORTCULLIS_STORE_URL`, `PORTCULLIS_SESSION_KEY` and `PORTCULLIS_SESSION_KEY_FILE`.
    pub fn from_process() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        EnvOverrides {
            store_url: get("PORTCULLIS_STORE_URL"),
            session_key: get("PORTCULLIS_SESSION_KEY"),
            session_key_file: get("PORTCULLIS_SESSION_KEY_FILE"),
        }
    }
}

impl Config {
    /// Loads and validates a config file, applying the process environment's overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, &EnvOverrides::from_process())
    }

    pub fn load_with(path: &Path, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses and validates config text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path, env: &EnvOverrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: FileConfig = parse_file_form(text).map_err(|(key, message)| match key {
            Some(key) => ConfigError::Invalid {
                file: file.clone(),
                key,
                problem: message,
            },
            None => ConfigError::Parse {
                file: file.clone(),
                message,
            },
        })?;
        Validator { file }.validate(raw, path, env)
    }
}

/// Deserialises the file form, keeping the path of the offending key (e.g. `session.ttl`).
fn parse_file_form(text: &str) -> Result<FileConfig, (Option<String>, String)> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let mut message = inner.message().trim().to_string();
        if let Some(line) = line {
            message.push_str(&format!(" (line {line})"));
        }
        let key = (!path.is_empty() && path != ".").then_some(path);
        (key, message)
    })
}

struct Validator {
    file: String,
}

impl Validator {
    /// A `[server]` timeout: `value`, or `default` when it is not set; between 1 s and 10 min.
    fn server_timeout(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let timeout = value.unwrap_or(default);
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&timeout) {
            return Err(self.err(key, "must be between 1s and 10m"));
        }
        Ok(timeout)
    }

    fn err(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// A duration that must be longer than zero; `default` when not set.
    fn positive(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value.unwrap_or(default) {
            d if d.is_zero() => Err(self.err(key, "must be longer than zero")),
            d => Ok(d),
        }
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        let mut addrs = value.to_socket_addrs().map_err(|e| {
            self.err(
                key,
                format!("`{value}` is not a host:port address that resolves ({e})"),
            )
        })?;
        addrs
            .next()
            .ok_or_else(|| self.err(key, format!("`{value}` resolves to no address")))
    }

    fn validate(
        &self,
        raw: FileConfig,
        path: &Path,
        env: &EnvOverrides,
    ) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let store = self.store(raw.store, env)?;
        let session = self.session(raw.session, env)?;
        let password = self.password(raw.password)?;
        let log = self.log(raw.log)?;
        let auth = self.auth(raw.auth)?;
        let oidc = self.oidc(raw.oidc)?;
        let webauthn = self.webauthn(raw.webauthn, &server.public_url)?;
        let directory = self.directory(raw.directory)?;
        let mail = self.mail(raw.mail)?;
        let webhooks = self.webhooks(raw.webhook)?;
        if !auth.password_form && oidc.is_empty() {
            return Err(self.err(
                "auth.password_form",
                "`hidden` needs at least one [[oidc]] provider, or nobody could sign in",
            ));
        }
        if raw.route.is_empty() {
            return Err(self.err("route", "at least one [[route]] is required"));
        }
        let mut names = HashSet::new();
        let mut routes = Vec::new();
        for (i, r) in raw.route.into_iter().enumerate() {
            let route = self.route(i, r)?;
            if !names.insert(route.name.clone()) {
                return Err(self.err(
                    &format!("route[{i}].name"),
                    format!("`{}` is used by another route", route.name),
                ));
            }
            routes.push(route);
        }
        let mut seen = HashSet::new();
        for (i, r) in routes.iter().enumerate() {
            if !seen.insert((r.host.clone(), r.path_prefix.clone())) {
                return Err(self.err(
                    &format!("route[{i}].path_prefix"),
                    format!(
                        "another route already serves host {:?} and prefix `{}`",
                        r.host, r.path_prefix
                    ),
                ));
            }
        }
        let rules = self.rules(raw.rule, &routes)?;
        let certificates = self.certificates(&raw.tls.certificate)?;
        let acme = self.acme_for(raw.tls, &server, &routes)?;
        if !certificates.is_empty() && server.tls.is_none() && acme.is_none() {
            return Err(self.err(
                "tls.certificate",
                "further certificates need a default one: server.tls_cert/tls_key or [tls.acme]",
            ));
        }
        Ok(Config {
            acme,
            certificates,
            rules,
            source: path.to_path_buf(),
            server,
            store,
            session,
            password,
            log,
            auth,
            routes,
            oidc,
            webauthn,
            directory,
            mail,
            webhooks,
        })
    }

    /// A certificate and key file that exist, or an error naming the key of the one missing.
    fn pem_pair(
        &self,
        cert_key: &str,
        cert: &Path,
        key_key: &str,
        key: &Path,
    ) -> Result<(), ConfigError> {
        for (k, p) in [(cert_key, cert), (key_key, key)] {
            if !p.is_file() {
                return Err(self.err(k, format!("{} is not a readable file", p.display())));
            }
        }
        Ok(())
    }

    /// `[[tls.certificate]]`: files that exist.
    fn certificates(&self, list: &[acme::FileCertificate]) -> Result<Vec<TlsFiles>, ConfigError> {
        let mut out = Vec::new();
        for (i, c) in list.iter().enumerate() {
            self.pem_pair(
                &format!("tls.certificate[{i}].cert"),
                &c.cert,
                &format!("tls.certificate[{i}].key"),
                &c.key,
            )?;
            out.push(TlsFiles {
                cert: c.cert.clone(),
                key: c.key.clone(),
            });
        }
        Ok(out)
    }

    /// `[tls.acme]` for this server and its routes: the certificate is for the https public
    /// URL's host and the routes' hosts unless named.
    fn acme_for(
        &self,
        t: acme::FileTls,
        server: &ServerConfig,
        routes: &[Route],
    ) -> Result<Option<acme::AcmeConfig>, ConfigError> {
        let host = url::Url::parse(&server.public_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let route_hosts: Vec<String> = routes.iter().filter_map(|r| r.host.clone()).collect();
        let acme = self.acme(t, &host, &route_hosts, server.redirect_listen.is_some())?;
        if acme.is_some() && !server.secure {
            return Err(self.err(
                "tls.acme",
                "certificates are for an https public_url (server.public_url = \"https://…\")",
            ));
        }
        Ok(acme)
    }

    fn webauthn(&self, w: FileWebauthn, public_url: &str) -> Result<WebauthnConfig, ConfigError> {
        let origin = url::Url::parse(public_url)
            .map_err(|e| self.err("server.public_url", format!("`{public_url}`: {e}")))?;
        let host = origin.host_str().unwrap_or_default().to_ascii_lowercase();
        let rp_id = match w.rp_id {
            Some(id) => id.trim().trim_end_matches('.').to_ascii_lowercase(),
            None => host.clone(),
        };
        let is_ip = host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
        // A parent domain, never a bare top-level one (`localhost` is a domain of its own).
        let under = !is_ip
            && (rp_id.contains('.') || rp_id == "localhost")
            && host.ends_with(&format!(".{rp_id}"));
        if rp_id != host && !under {
            return Err(self.err(
                "webauthn.rp_id",
                format!(
                    "`{rp_id}` must be the public URL's host `{host}` or a domain it is under \
                     (such as example.com for media.example.com)"
                ),
            ));
        }
        let rp_name = w.rp_name.unwrap_or_else(|| "Portcullis".to_string());
        if rp_name.trim().is_empty() || rp_name.chars().count() > 64 {
            return Err(self.err("webauthn.rp_name", "must be 1 to 64 characters"));
        }
        Ok(WebauthnConfig {
            rp_id,
            rp_name,
            origin,
        })
    }

    fn auth(&self, a: FileAuth) -> Result<AuthConfig, ConfigError> {
        let require_passkey = match a.require_passkey.as_deref().unwrap_or("off") {
            "off" => RequirePasskey::Off,
            "admins" => RequirePasskey::Admins,
            "all" => RequirePasskey::All,
            other => {
                return Err(self.err(
                    "auth.require_passkey",
                    format!("`{other}` is not off, admins or all"),
                ))
            }
        };
        let require_2fa = match a.require_2fa.as_deref().unwrap_or("off") {
            "off" => Require2fa::Off,
            "admins" => Require2fa::Admins,
            "all" => Require2fa::All,
            other => {
                return Err(self.err(
                    "auth.require_2fa",
                    format!("`{other}` is not off, admins or all"),
                ))
            }
        };
        let max_failures = a.max_failures.unwrap_or(DEFAULT_MAX_FAILURES);
        if !(1..=MAX_MAX_FAILURES).contains(&max_failures) {
            return Err(self.err(
                "auth.max_failures",
                format!("must be between 1 and {MAX_MAX_FAILURES} (NIST SP 800-63B)"),
            ));
        }
        let lockout = a.lockout.unwrap_or(DEFAULT_LOCKOUT);
        if lockout < Duration::from_secs(1) || lockout > Duration::from_secs(7 * 24 * 3600) {
            return Err(self.err("auth.lockout", "must be between 1s and 7 days"));
        }
        let ip_max_failures = a.ip_max_failures.unwrap_or(DEFAULT_IP_MAX_FAILURES);
        if ip_max_failures == 0 {
            return Err(self.err("auth.ip_max_failures", "must be at least 1"));
        }
        let ip_window = a.ip_window.unwrap_or(DEFAULT_IP_WINDOW);
        if ip_window < Duration::from_secs(1) || ip_window > Duration::from_secs(24 * 3600) {
            return Err(self.err("auth.ip_window", "must be between 1s and 24h"));
        }
        let reset_link_ttl = a.reset_link_ttl.unwrap_or(DEFAULT_RESET_LINK_TTL);
        if reset_link_ttl < Duration::from_secs(60)
            || reset_link_ttl > Duration::from_secs(30 * 24 * 3600)
        {
            return Err(self.err("auth.reset_link_ttl", "must be between 1m and 30 days"));
        }
        let password_form = match a.password_form.as_deref().unwrap_or("shown") {
            "shown" => true,
            "hidden" => false,
            other => {
                return Err(self.err(
                    "auth.password_form",
                    format!("`{other}` is not shown or hidden"),
                ))
            }
        };
        Ok(AuthConfig {
            password_form,
            require_2fa,
            require_passkey,
            max_failures,
            lockout,
            ip_max_failures,
            ip_window,
            reset_link_ttl,
            secrets_key_file: a
                .secrets_key_file
                .unwrap_or_else(|| PathBuf::from("data/secrets.key")),
        })
    }

    fn server(&self, s: FileServer) -> Result<ServerConfig, ConfigError> {
        let listen = self.addr(
            "server.listen",
            s.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        )?;
        let admin_listen = self.addr(
            "server.admin_listen",
            s.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        if admin_listen == listen {
            return Err(self.err(
                "server.admin_listen",
                "must differ from server.listen (the admin listener is private)",
            ));
        }
        let tls = match (s.tls_cert, s.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                self.pem_pair("server.tls_cert", &cert, "server.tls_key", &key)?;
                Some(TlsFiles { cert, key })
            }
            (Some(_), None) => return Err(self.err("server.tls_key", "required with tls_cert")),
            (None, Some(_)) => return Err(self.err("server.tls_cert", "required with tls_key")),
        };
        let default_url = format!(
            "{}://{}",
            if tls.is_some() { "https" } else { "http" },
            listen
        );
        let public_url = s.public_url.unwrap_or(default_url);
        let parsed = url::Url::parse(&public_url)
            .map_err(|e| self.err("server.public_url", format!("`{public_url}`: {e}")))?;
        let secure = match parsed.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(self.err(
                    "server.public_url",
                    format!("scheme `{other}` is not http or https"),
                ))
            }
        };
        if parsed.host_str().is_none() || parsed.path() != "/" || parsed.query().is_some() {
            return Err(self.err(
                "server.public_url",
                format!("`{public_url}` must be an origin such as https://media.example (no path)"),
            ));
        }
        let public_url = parsed.origin().ascii_serialization();
        let threads = s.threads.unwrap_or(2);
        if threads == 0 || threads > 256 {
            return Err(self.err("server.threads", "must be between 1 and 256"));
        }
        let max_header_bytes = s.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if !(1024..=1_000_000).contains(&max_header_bytes) {
            return Err(self.err(
                "server.max_header_bytes",
                "must be between 1024 and 1000000",
            ));
        }
        let max_form_bytes = s.max_form_bytes.unwrap_or(DEFAULT_MAX_FORM_BYTES);
        if !(1024..=10_000_000).contains(&max_form_bytes) {
            return Err(self.err("server.max_form_bytes", "must be between 1024 and 10000000"));
        }
        let head_timeout =
            self.server_timeout("server.head_timeout", s.head_timeout, DEFAULT_HEAD_TIMEOUT)?;
        let body_timeout =
            self.server_timeout("server.body_timeout", s.body_timeout, DEFAULT_BODY_TIMEOUT)?;
        let upstream_idle_timeout = self.server_timeout(
            "server.upstream_idle_timeout",
            s.upstream_idle_timeout,
            DEFAULT_UPSTREAM_IDLE_TIMEOUT,
        )?;
        let max_connections_per_ip = s
            .max_connections_per_ip
            .unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP);
        if !(1..=1_000_000).contains(&max_connections_per_ip) {
            return Err(self.err(
                "server.max_connections_per_ip",
                "must be between 1 and 1000000",
            ));
        }
        let trusted_proxies = s
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .map(|n| {
                parse_net(n).ok_or_else(|| {
                    self.err(
                        "server.trusted_proxies",
                        format!(
                            "`{n}` is not an address or a network (CIDR such as 10.0.0.0/8 or fd00::/8)"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client_ip_header = match s.client_ip_header.as_deref() {
            None => crate::netaddr::ClientIpHeader::XForwardedFor,
            Some(h) => crate::netaddr::ClientIpHeader::parse(h).ok_or_else(|| {
                self.err(
                    "server.client_ip_header",
                    format!("`{h}` is neither X-Forwarded-For nor Forwarded"),
                )
            })?,
        };
        let hsts = match s.hsts_max_age {
            None => None,
            Some(_) if !secure => {
                return Err(self.err(
                    "server.hsts_max_age",
                    "HSTS is for an https public_url only (browsers ignore it over http)",
                ))
            }
            Some(d) if d.is_zero() || d.as_secs() > 2 * 365 * 24 * 3600 => {
                return Err(self.err(
                    "server.hsts_max_age",
                    "must be longer than zero and at most two years",
                ))
            }
            Some(d) => Some(format!(
                "max-age={}{}",
                d.as_secs(),
                if s.hsts_include_subdomains.unwrap_or(false) {
                    "; includeSubDomains"
                } else {
                    ""
                }
            )),
        };
        let redirect_listen = match s.redirect_listen.as_deref() {
            None => None,
            Some(_) if !secure => {
                return Err(self.err(
                    "server.redirect_listen",
                    "redirects to https need an https public_url",
                ))
            }
            Some(a) => {
                let addr = self.addr("server.redirect_listen", a)?;
                if addr == listen || addr == admin_listen {
                    return Err(self.err(
                        "server.redirect_listen",
                        "must differ from server.listen and server.admin_listen",
                    ));
                }
                Some(addr)
            }
        };
        if s.redirect_http.is_some() && redirect_listen.is_none() {
            return Err(self.err(
                "server.redirect_http",
                "is about the port-80 listener: set server.redirect_listen too",
            ));
        }
        Ok(ServerConfig {
            hsts,
            redirect_listen,
            redirect_http: s.redirect_http.unwrap_or(true),
            trusted_proxies,
            client_ip_header,
            listen,
            admin_listen,
            public_url,
            secure,
            tls,
            threads,
            work_stealing: s.work_stealing.unwrap_or(true),
            grace_period: s.grace_period.unwrap_or(DEFAULT_GRACE_PERIOD),
            head_timeout,
            body_timeout,
            upstream_idle_timeout,
            max_connections_per_ip,
            max_header_bytes,
            max_form_bytes,
            data_dir: s.data_dir.unwrap_or_else(|| PathBuf::from("data")),
        })
    }

    fn store(&self, s: FileStore, env: &EnvOverrides) -> Result<StoreConfig, ConfigError> {
        let url = match (&env.store_url, s.url) {
            (Some(u), _) => Secret::new(u.clone()),
            (None, Some(u)) => u,
            (None, None) => Secret::new("sqlite://data/portcullis.db".to_string()),
        };
        if let Some(path) = url.expose().strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(self.err("store.url", "sqlite:// needs a file path"));
            }
        } else if url.expose().starts_with("postgres://")
            || url.expose().starts_with("postgresql://")
        {
            if url::Url::parse(url.expose()).is_err() {
                return Err(self.err(
                    "store.url",
                    "is not a valid postgres://user@host:port/database URL",
                ));
            }
        } else {
            return Err(self.err(
                "store.url",
                "must start with sqlite:// (a file) or postgres:// (a server)",
            ));
        }
        let on_stale = match s.on_stale.as_deref().unwrap_or("serve") {
            "serve" => OnStale::Serve,
            "deny" => OnStale::Deny,
            other => {
                return Err(self.err("store.on_stale", format!("`{other}` is not serve or deny")))
            }
        };
        let poll_interval = s.poll_interval.unwrap_or(DEFAULT_POLL_INTERVAL);
        if poll_interval < Duration::from_millis(10) || poll_interval > Duration::from_secs(60) {
            return Err(self.err("store.poll_interval", "must be between 10ms and 60s"));
        }
        let max_staleness = s.max_staleness.unwrap_or(DEFAULT_MAX_STALENESS);
        if max_staleness <= poll_interval {
            return Err(self.err(
                "store.max_staleness",
                "must be longer than store.poll_interval",
            ));
        }
        let busy_timeout = s.busy_timeout.unwrap_or(DEFAULT_BUSY_TIMEOUT);
        if busy_timeout > Duration::from_secs(60) {
            return Err(self.err("store.busy_timeout", "must be at most 60s"));
        }
        Ok(StoreConfig {
            url,
            poll_interval,
            max_staleness,
            busy_timeout,
            on_stale,
            audit_retention: s.audit_retention.unwrap_or(DEFAULT_AUDIT_RETENTION),
        })
    }

    fn session(&self, s: FileSession, env: &EnvOverrides) -> Result<SessionConfig, ConfigError> {
        let ttl = s.ttl.unwrap_or(DEFAULT_SESSION_TTL);
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(400 * 24 * 3600) {
            return Err(self.err("session.ttl", "must be between 1m and 400 days"));
        }
        let key_file = env
            .session_key_file
            .as_ref()
            .map(PathBuf::from)
            .or(s.key_file)
            .unwrap_or_else(|| PathBuf::from("data/session.key"));
        let issuer = s.issuer.unwrap_or_else(|| DEFAULT_ISSUER.to_string());
        if issuer.is_empty() {
            return Err(self.err("session.issuer", "must not be empty"));
        }
        Ok(SessionConfig {
            ttl,
            key_file,
            key_override: env.session_key.clone().map(Secret::new),
            issuer,
        })
    }

    fn password(&self, p: FilePassword) -> Result<PasswordConfig, ConfigError> {
        let memory_kib = p.memory_kib.unwrap_or(ARGON2_MIN_MEMORY_KIB);
        if memory_kib < ARGON2_MIN_MEMORY_KIB {
            return Err(self.err(
                "password.memory_kib",
                format!("{memory_kib} is below the OWASP minimum of {ARGON2_MIN_MEMORY_KIB} KiB"),
            ));
        }
        if memory_kib > 4 * 1024 * 1024 {
            return Err(self.err("password.memory_kib", "must be at most 4 GiB (4194304)"));
        }
        let iterations = p.iterations.unwrap_or(ARGON2_MIN_ITERATIONS);
        if !(ARGON2_MIN_ITERATIONS..=100).contains(&iterations) {
            return Err(self.err(
                "password.iterations",
                format!("must be between {ARGON2_MIN_ITERATIONS} and 100"),
            ));
        }
        let parallelism = p.parallelism.unwrap_or(1);
        if parallelism == 0 || parallelism > 16 {
            return Err(self.err("password.parallelism", "must be between 1 and 16"));
        }
        let max_concurrent = p.max_concurrent.unwrap_or_else(default_hash_concurrency);
        if max_concurrent == 0 || max_concurrent > 64 {
            return Err(self.err("password.max_concurrent", "must be between 1 and 64"));
        }
        let min_length = p.min_length.unwrap_or(DEFAULT_MIN_PASSWORD_CHARS);
        if !(8..=64).contains(&min_length) {
            return Err(self.err(
                "password.min_length",
                "must be between 8 and 64 (NIST SP 800-63B)",
            ));
        }
        let mut blocklist = HashSet::new();
        if let Some(path) = &p.blocklist_file {
            let text = read_capped(path, MAX_BLOCKLIST_BYTES).map_err(|e| {
                self.err(
                    "password.blocklist_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            blocklist = text
                .lines()
                .map(|l| l.trim().to_lowercase())
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect();
        }
        Ok(PasswordConfig {
            memory_kib,
            iterations,
            parallelism,
            max_concurrent,
            min_length,
            blocklist: std::sync::Arc::new(blocklist),
        })
    }

    fn log(&self, l: FileLog) -> Result<LogConfig, ConfigError> {
        let format = match l.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(self.err("log.format", format!("`{other}` is not `text` or `json`")))
            }
        };
        let level = l.level.unwrap_or_else(|| "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(self.err(
                "log.level",
                format!("`{level}` is not a level or filter (e.g. info, debug, portcullis=debug)"),
            ));
        }
        Ok(LogConfig { format, level })
    }

    fn route(&self, i: usize, r: FileRoute) -> Result<Route, ConfigError> {
        let key = |k: &str| format!("route[{i}].{k}");
        if r.name.is_empty()
            || !r
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.err(
                &key("name"),
                format!(
                    "`{}` must be non-empty and use only A-Z a-z 0-9 - _",
                    r.name
                ),
            ));
        }
        let host = match r.host {
            Some(h) if h.is_empty() || h.contains(['/', ' ', ':']) => {
                return Err(self.err(
                    &key("host"),
                    format!("`{h}` must be a bare host name without port"),
                ))
            }
            Some(h) => Some(h.to_ascii_lowercase()),
            None => None,
        };
        let path_prefix = normalise_prefix(r.path_prefix.as_deref().unwrap_or("/"))
            .map_err(|p| self.err(&key("path_prefix"), p))?;
        let upstream_text = r
            .upstream
            .strip_prefix("http://")
            .unwrap_or(&r.upstream)
            .trim_end_matches('/')
            .to_string();
        if r.upstream.starts_with("https://") {
            return Err(self.err(
                &key("upstream"),
                "https upstreams are not supported yet; give host:port of a plain-HTTP upstream",
            ));
        }
        let upstream = self.addr(&key("upstream"), &upstream_text)?;
        let kind = match r.kind.as_deref().unwrap_or("generic") {
            "generic" => RouteKind::Generic,
            "jellyfin" => RouteKind::Jellyfin,
            "emby" => RouteKind::Emby,
            "plex" => RouteKind::Plex,
            other => {
                return Err(self.err(
                    &key("kind"),
                    format!("`{other}` is not generic, jellyfin, emby or plex"),
                ))
            }
        };
        let media = match (kind, r.media) {
            (RouteKind::Jellyfin | RouteKind::Emby, m) => {
                Some(self.media(i, m.unwrap_or_default())?)
            }
            (_, Some(_)) => {
                return Err(self.err(
                    &key("media"),
                    "only routes of kind jellyfin or emby take a [route.media] table",
                ))
            }
            (_, None) => None,
        };
        let plex = match (kind, r.plex) {
            (RouteKind::Plex, Some(p)) => Some(self.plex(i, p)?),
            (RouteKind::Plex, None) => {
                return Err(self.err(
                    &key("plex"),
                    "a plex route needs a [route.plex] table with server_token_file",
                ))
            }
            (_, Some(_)) => {
                return Err(self.err(
                    &key("plex"),
                    "only routes of kind plex take a [route.plex] table",
                ))
            }
            (_, None) => None,
        };
        let mut public_paths = Vec::new();
        for (j, p) in r.public_paths.iter().enumerate() {
            if !p.starts_with('/') || p.contains(['\\', '?', '#', '%']) || p.contains("/../") {
                return Err(self.err(
                    &format!("route[{i}].public_paths[{j}]"),
                    format!("`{p}` must be a plain absolute path such as /health or /static/"),
                ));
            }
            public_paths.push(p.clone());
        }
        let identity_header = match r.identity_header {
            Some(h) => {
                let valid = !h.is_empty()
                    && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && http::HeaderName::from_bytes(h.as_bytes()).is_ok();
                if !valid {
                    return Err(self.err(
                        &key("identity_header"),
                        format!("`{h}` is not a header name (letters, digits and - only)"),
                    ));
                }
                Some(h.to_ascii_lowercase())
            }
            None => None,
        };
        let default_policy = match r.default_policy.as_deref() {
            None | Some("session") => DefaultPolicy::Session,
            Some("deny") => DefaultPolicy::Deny,
            Some(other) => {
                return Err(self.err(
                    &key("default_policy"),
                    format!("`{other}` is neither session nor deny"),
                ))
            }
        };
        Ok(Route {
            default_policy,
            name: r.name,
            host,
            path_prefix,
            upstream,
            upstream_authority: upstream_text,
            kind,
            public_paths,
            identity_header,
            media,
            plex,
            retired: false,
        })
    }

    fn media(&self, i: usize, m: FileMedia) -> Result<MediaConfig, ConfigError> {
        let key = |k: &str| format!("route[{i}].media.{k}");
        let password_login = match m.password_login.as_deref().unwrap_or("deny_for_2fa_users") {
            "allow" => PasswordLogin::Allow,
            "deny_for_2fa_users" => PasswordLogin::DenyFor2faUsers,
            "deny" => PasswordLogin::Deny,
            other => {
                return Err(self.err(
                    &key("password_login"),
                    format!("`{other}` is not allow, deny_for_2fa_users or deny"),
                ))
            }
        };
        let hide_user_list = match m.users_public.as_deref().unwrap_or("empty") {
            "empty" => true,
            "pass" => false,
            other => {
                return Err(self.err(
                    &key("users_public"),
                    format!("`{other}` is not empty or pass"),
                ))
            }
        };
        let images = match m.images.as_deref().unwrap_or("grant") {
            "grant" => ImagePolicy::Grant,
            "open" => ImagePolicy::Open,
            other => {
                return Err(self.err(&key("images"), format!("`{other}` is not grant or open")))
            }
        };
        let blocked = m.blocked_paths.unwrap_or_else(|| {
            DEFAULT_BLOCKED_PATHS
                .iter()
                .map(|p| p.to_string())
                .collect()
        });
        let mut blocked_paths = Vec::new();
        for (j, p) in blocked.iter().enumerate() {
            let p = normalise_prefix(p)
                .map_err(|e| self.err(&format!("{}[{j}]", key("blocked_paths")), e))?;
            blocked_paths.push(p.to_lowercase());
        }
        let mut user_map = std::collections::HashMap::new();
        for (from, to) in m.user_map {
            if from.is_empty() || to.is_empty() {
                return Err(self.err(&key("user_map"), "names must not be empty"));
            }
            user_map.insert(from.to_lowercase(), to);
        }
        let positive =
            |k: &str, d: Option<Duration>, default: Duration| self.positive(&key(k), d, default);
        Ok(MediaConfig {
            user_map,
            password_login,
            hide_user_list,
            blocked_paths,
            adopt_unknown_tokens: m.adopt_unknown_tokens.unwrap_or(false),
            token_idle: positive("token_idle", m.token_idle, DEFAULT_MEDIA_TOKEN_IDLE)?,
            token_lifetime: positive(
                "token_lifetime",
                m.token_lifetime,
                DEFAULT_MEDIA_TOKEN_LIFETIME,
            )?,
            grant_lifetime: positive("grant_lifetime", m.grant_lifetime, DEFAULT_GRANT_LIFETIME)?,
            images,
        })
    }
}

fn normalise_prefix(p: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("`{p}` must start with /"));
    }
    if p.contains(['\\', '?', '#', '%']) || p.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("`{p}` must be a plain path"));
    }
    if p == "/" {
        return Ok(p.to_string());
    }
    Ok(p.trim_end_matches('/').to_string())
}

/// A group's name as stored and matched: lower case, 1 to 64 of `a-z 0-9 _ . -`, starting
/// with a letter or digit (`Family` and `family` are one group).
pub fn group_name(s: &str) -> Result<String, &'static str> {
    let name = s.trim().to_ascii_lowercase();
    let ok = (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err("a group name is 1 to 64 letters, digits, `_`, `.` or `-`, starting with a letter or digit")
    }
}

/// A network in CIDR form (`10.0.0.0/8`, `fd00::/8`), or one address (a /32 or /128); host
/// bits below the prefix are dropped.
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    let s = s.trim();
    let net = match s.parse::<ipnet::IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => ipnet::IpNet::from(s.parse::<std::net::IpAddr>().ok()?),
    };
    // An IPv4-mapped IPv6 network as its IPv4 network: client addresses are compared as IPv4.
    if let ipnet::IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .ok()
                .map(ipnet::IpNet::V4);
        }
    }
    Some(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), &EnvOverrides::default())
    }

    const MINIMAL: &str = r#"
[[route]]
name = "media"
upstream = "127.0.0.1:8096"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.routes[0].kind, RouteKind::Generic);
        assert_eq!(c.session.ttl, DEFAULT_SESSION_TTL);
        assert!(!c.server.secure);
    }

    #[test]
    fn further_certificates_are_checked_with_their_key_and_need_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("a.pem");
        std::fs::write(&pem, "x").unwrap();
        let p = pem.display();
        let e = parse(&format!(
            "[server]\ntls_cert = '{p}'\ntls_key = '{p}'\n\
             [[tls.certificate]]\ncert = '{p}'\nkey = '{p}'\n\
             [[tls.certificate]]\ncert = '{p}'\nkey = '/nowhere/b.key'\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tls.certificate[1].key") && e.contains("/nowhere/b.key"),
            "{e}"
        );
        let e = parse(&format!(
            "[[tls.certificate]]\ncert = '{p}'\nkey = '{p}'\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tls.certificate") && e.contains("default"),
            "{e}"
        );
        let c = parse(&format!(
            "[server]\ntls_cert = '{p}'\ntls_key = '{p}'\n\
             [[tls.certificate]]\ncert = '{p}'\nkey = '{p}'\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.certificates.len(), 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&format!("[server]\nlisten_port = 1\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml") && e.contains("listen_port"), "{e}");
    }

    #[test]
    fn upstream_idle_timeout_defaults_to_20s_and_is_bounded() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.upstream_idle_timeout, Duration::from_secs(20));
        let c = parse(&format!(
            "[server]\nupstream_idle_timeout = \"90s\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.server.upstream_idle_timeout, Duration::from_secs(90));
        for bad in ["0s", "11m"] {
            let e = parse(&format!(
                "[server]\nupstream_idle_timeout = \"{bad}\"\n{MINIMAL}"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("server.upstream_idle_timeout") && e.contains("between 1s and 10m"),
                "{e}"
            );
        }
    }

    #[test]
    fn weak_argon2_is_refused_with_key() {
        let e = parse(&format!("[password]\nmemory_kib = 4096\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("password.memory_kib"), "{e}");
    }

    #[test]
    fn endless_blocklist_file_is_an_error_not_a_hang() {
        let e = parse(&format!(
            "[password]\nblocklist_file = '/dev/zero'\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("password.blocklist_file") && e.contains("larger than"),
            "{e}"
        );
    }

    #[test]
    fn bad_route_kind_names_route_index() {
        let e = parse("[[route]]\nname='a'\nupstream='127.0.0.1:1'\nkind='emby2'\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("route[0].kind") && e.contains("emby2"), "{e}");
    }

    #[test]
    fn media_table_is_validated_with_key_names() {
        let base = "[[route]]\nname='a'\nupstream='127.0.0.1:1'\n";
        let c = parse(&format!("{base}kind='jellyfin'\n")).unwrap();
        let m = c.routes[0].media.as_ref().unwrap();
        assert_eq!(m.password_login, PasswordLogin::DenyFor2faUsers);
        assert!(m.hide_user_list);
        assert_eq!(m.blocked_paths, vec!["/startup", "/api-docs"]);
        let c = parse(&format!(
            "{base}kind='emby'\n[route.media]\nuser_map = {{ 'Alice Smith' = 'alice' }}\n"
        ))
        .unwrap();
        assert_eq!(
            c.routes[0]
                .media
                .as_ref()
                .unwrap()
                .gateway_user("alice smith"),
            "alice"
        );
        for (toml, key) in [
            (
                "kind='jellyfin'\n[route.media]\npassword_login='maybe'\n",
                "route[0].media.password_login",
            ),
            (
                "kind='jellyfin'\n[route.media]\nusers_public='all'\n",
                "route[0].media.users_public",
            ),
            (
                "kind='jellyfin'\n[route.media]\nimages='x'\n",
                "route[0].media.images",
            ),
            (
                "kind='jellyfin'\n[route.media]\ntoken_idle='0s'\n",
                "route[0].media.token_idle",
            ),
            (
                "kind='jellyfin'\n[route.media]\nblocked_paths=['x']\n",
                "route[0].media.blocked_paths[0]",
            ),
            (
                "kind='jellyfin'\n[route.media]\nbogus=1\n",
                "route[0].media",
            ),
            ("kind='generic'\n[route.media]\n", "route[0].media"),
        ] {
            let e = parse(&format!("{base}{toml}")).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn env_overrides_store_url() {
        let env = EnvOverrides {
            store_url: Some("sqlite:///tmp/x.db".into()),
            ..Default::default()
        };
        let c = Config::parse(MINIMAL, Path::new("t.toml"), &env).unwrap();
        assert_eq!(c.store.url.expose(), "sqlite:///tmp/x.db");
    }

    #[test]
    fn secret_debug_prints_nothing() {
        let s = Secret::new("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn public_url_with_path_is_refused() {
        let e = parse(&format!(
            "[server]\npublic_url = 'https://x.example/app'\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("server.public_url"), "{e}");
    }

    #[test]
    fn networks_are_cidrs_or_addresses_and_mapped_ones_are_ipv4() {
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_net(" 192.168.1.7 ").unwrap().to_string(),
            "192.168.1.7/32"
        );
        assert_eq!(parse_net("fd00::/8").unwrap().to_string(), "fd00::/8");
        assert_eq!(
            parse_net("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_net("::ffff:192.0.2.1").unwrap().to_string(),
            "192.0.2.1/32"
        );
        for bad in ["10.0.0.0/33", "10.0.0", "fd00::/129", "", "example.com"] {
            assert!(parse_net(bad).is_none(), "{bad}");
        }
    }
}
