//! `[route.plex]`: how a `plex` route resolves Plex tokens to Plex accounts (plex.tv), which
//! token it uses for that and for the server self-check, and the lifetimes it gives the
//! tokens it binds. Validation reads the server token file but needs no network.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{read_capped, ConfigError, Secret, Validator};

/// plex.tv, whose account API resolves tokens (also reachable as `clients.plex.tv`).
pub const DEFAULT_PLEX_TV_URL: &str = "https://plex.tv";
/// How often the owner-side list of tokens valid for the server is fetched again.
pub const DEFAULT_PLEX_REFRESH: Duration = Duration::from_secs(5 * 60);
/// A legacy (non-expiring) Plex token bound at the gateway ends after this long, however
/// active; the app's next request resolves its (rotated or same) token afresh.
pub const DEFAULT_PLEX_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// A bound Plex token unused this long is ended.
pub const DEFAULT_PLEX_TOKEN_IDLE: Duration = Duration::from_secs(14 * 24 * 3600);
/// A transcode session started by a user lets its token-less segment URLs through this long.
pub const DEFAULT_PLEX_SESSION_LIFETIME: Duration = Duration::from_secs(6 * 3600);
/// Largest server token file read, in bytes.
const MAX_TOKEN_FILE_BYTES: u64 = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePlex {
    plex_tv_url: Option<String>,
    server_token_file: Option<PathBuf>,
    device_approval: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    refresh: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    token_lifetime: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    token_idle: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    session_lifetime: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct PlexConfig {
    /// plex.tv's base URL, without a trailing `/` (https, or http on loopback for tests).
    pub plex_tv: String,
    /// The server's own token (`PlexOnlineToken` in its Preferences.xml): the owner's access,
    /// used for the owner-side token list, the settings self-check and upstream revocation.
    pub server_token: Secret,
    pub server_token_file: PathBuf,
    /// A new (Plex account, client identifier) must be approved by its gateway user first.
    pub device_approval: bool,
    pub refresh: Duration,
    pub token_lifetime: Duration,
    pub token_idle: Duration,
    pub session_lifetime: Duration,
}

impl Validator {
    pub(super) fn plex(&self, i: usize, p: FilePlex) -> Result<PlexConfig, ConfigError> {
        let key = |k: &str| format!("route[{i}].plex.{k}");
        let raw_url = p
            .plex_tv_url
            .unwrap_or_else(|| DEFAULT_PLEX_TV_URL.to_string());
        let url = url::Url::parse(&raw_url)
            .map_err(|e| self.err(&key("plex_tv_url"), format!("`{raw_url}`: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if super::oidc_is_loopback(&url) => {}
            "http" => {
                return Err(self.err(
                    &key("plex_tv_url"),
                    format!("`{raw_url}` is plain http: only a loopback address may be"),
                ))
            }
            other => {
                return Err(self.err(
                    &key("plex_tv_url"),
                    format!("scheme `{other}` is not https"),
                ))
            }
        }
        if url.query().is_some() || url.fragment().is_some() || url.host().is_none() {
            return Err(self.err(
                &key("plex_tv_url"),
                format!("`{raw_url}` must be a URL without query or fragment"),
            ));
        }
        let Some(file) = p.server_token_file else {
            return Err(self.err(
                &key("server_token_file"),
                "required: a file holding the server's own token (PlexOnlineToken in the \
                 server's Preferences.xml)",
            ));
        };
        let text = read_capped(&file, MAX_TOKEN_FILE_BYTES).map_err(|e| {
            self.err(
                &key("server_token_file"),
                format!("cannot read {}: {e}", file.display()),
            )
        })?;
        let token = text.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.err(
                &key("server_token_file"),
                format!(
                    "{} must hold one token (visible ASCII, no spaces)",
                    file.display()
                ),
            ));
        }
        let positive =
            |k: &str, d: Option<Duration>, default: Duration| self.positive(&key(k), d, default);
        let refresh = positive("refresh", p.refresh, DEFAULT_PLEX_REFRESH)?;
        if refresh < Duration::from_secs(10) {
            return Err(self.err(
                &key("refresh"),
                "must be at least 10s (plex.tv rate-limits)",
            ));
        }
        Ok(PlexConfig {
            plex_tv: url.as_str().trim_end_matches('/').to_string(),
            server_token: Secret::new(token.to_string()),
            server_token_file: file,
            device_approval: p.device_approval.unwrap_or(false),
            refresh,
            token_lifetime: positive(
                "token_lifetime",
                p.token_lifetime,
                DEFAULT_PLEX_TOKEN_LIFETIME,
            )?,
            token_idle: positive("token_idle", p.token_idle, DEFAULT_PLEX_TOKEN_IDLE)?,
            session_lifetime: positive(
                "session_lifetime",
                p.session_lifetime,
                DEFAULT_PLEX_SESSION_LIFETIME,
            )?,
        })
    }
}
