//! Plex behind the gateway: the pure parts and the per-instance state. Sign-in happens between a
//! Plex app and plex.tv, never through the server, so the gateway binds tokens as it first sees
//! them: a token is resolved to a Plex account (the server's owner-side token list, else
//! plex.tv's `api/v2/user`; JWTs verified against plex.tv's published keys), the account to the
//! gateway user it is linked to, and the token is then bound like a Jellyfin token (a media
//! session keyed by the token's HMAC), so every revocation reaches it. See
//! `shared/research/plex-gateway.md`.
//!
//! Here: which endpoint a request is for, the JWT check, the server settings self-check, the
//! parsers of plex.tv's and the server's answers, and the state kept per route (the owner-side
//! token list by keyed hash, plex.tv's keys, the self-check's result, refusals remembered
//! briefly). `tv` is the plex.tv client.

pub mod tv;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use moka::sync::Cache;
use serde_json::Value;

use crate::auth::DenyReason;

/// A refusal of a token (unlinked account, pending device, unknown at plex.tv) is remembered
/// this long, so an app retrying does not make a store or plex.tv call per request.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// plex.tv's answer about a token (its account) is reused this long, so an app retrying while
/// its device waits for approval costs one plex.tv call per this, not one per request.
pub const ACCOUNT_TTL: Duration = Duration::from_secs(10 * 60);
/// How long the note that a Plex account was linked (or a device approved) stays in the event
/// log for other replicas.
pub const CHANGE_NOTE_TTL: Duration = Duration::from_secs(60);
/// A token plex.tv does not resolve may be a share made since the owner-side list was last
/// fetched: the list is fetched again then, but not more often than this.
pub const LIST_REFETCH_MIN: Duration = Duration::from_secs(30);
/// Transient tokens minted by the server live at most this long there (48 h).
pub const TRANSIENT_TOKEN_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// The key under which a transcode session is kept among the playback grants.
pub fn session_grant_key(session: &str) -> String {
    format!("plex-session:{session}")
}

/// Which endpoint of a Plex Media Server a request is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlexEndpoint {
    /// `GET /identity`: the unauthenticated reachability probe (machine id, version).
    Identity,
    /// Plex Web, served by the server under `/web`.
    Web,
    /// Paths that hand out the owner's tokens or change the server: the owner only.
    OwnerOnly,
    /// `/security/token`: mints a transient token (the owner only; the token is bound).
    SecurityToken,
    /// A transcode start or decision; the session id, when the query names one.
    TranscodeStart {
        session: Option<String>,
    },
    /// A URL under a transcode session (playlists, segments), which apps fetch token-less.
    TranscodeSession {
        session: String,
    },
    Other,
}

/// Classifies a request by method and path (the path after the route's prefix).
pub fn classify(method: &http::Method, path: &str, query: Option<&str>) -> PlexEndpoint {
    let lower = path.to_ascii_lowercase();
    if lower == "/identity" {
        return PlexEndpoint::Identity;
    }
    if lower == "/web" || lower.starts_with("/web/") {
        return PlexEndpoint::Web;
    }
    let under = |p: &str| lower == p || lower.starts_with(&format!("{p}/"));
    if under("/myplex/account")
        || under("/myplex/claim")
        || (under("/:/prefs") && method != http::Method::GET && method != http::Method::HEAD)
    {
        return PlexEndpoint::OwnerOnly;
    }
    if under("/security/token") {
        return PlexEndpoint::SecurityToken;
    }
    for kind in ["/video", "/music", "/photo"] {
        let Some(rest) = lower.strip_prefix(kind) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix("/:/transcode/universal/") else {
            continue;
        };
        if let Some(after) = rest.strip_prefix("session/") {
            // The original case of the id: the path has the same length as `lower`.
            let start = path.len() - after.len();
            let id = &path[start..start + after.find('/').unwrap_or(after.len())];
            if valid_session_id(id) {
                return PlexEndpoint::TranscodeSession {
                    session: id.to_string(),
                };
            }
            return PlexEndpoint::Other;
        }
        if rest.starts_with("start") || rest.starts_with("decision") {
            let session = query.and_then(|q| {
                super::carrier::query_pairs(q)
                    .into_iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("session"))
                    .map(|(_, v)| v)
                    .filter(|v| valid_session_id(v))
            });
            return PlexEndpoint::TranscodeStart { session };
        }
    }
    PlexEndpoint::Other
}

/// Whether a response on this path can run for minutes (a media part, the notification
/// EventSource), so that it is watched and closed when its user's access ends. WebSockets and
/// transcodes are watched anyway.
pub fn long_lived(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.starts_with("/library/parts/") || lower.starts_with("/:/eventsource/")
}

/// A transcode session id as Plex apps make them (UUIDs, hex, words with `-` and `_`).
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Session ids named in a transcode start's answer (`…/session/<id>/…` in a playlist or XML).
pub fn session_ids_in(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let mut out: Vec<String> = Vec::new();
    for (i, _) in text.match_indices("session/") {
        let rest = &text[i + "session/".len()..];
        let id: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        if valid_session_id(&id) && rest[id.len()..].starts_with('/') && !out.contains(&id) {
            out.push(id);
        }
    }
    out
}

/// What a token's JWT form says, once verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlexJwt {
    pub exp: i64,
    /// The device key's id: stable per app install across token refreshes.
    pub thumbprint: Option<String>,
}

#[derive(serde::Deserialize)]
struct JwtClaims {
    exp: i64,
    #[serde(default)]
    thumbprint: Option<String>,
}

/// Whether a token is in JWT form (plex.tv's 7-day tokens); legacy tokens are opaque.
pub fn is_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// Verifies a Plex JWT in the fixed order: parse, algorithm (EdDSA only), signature against
/// one of plex.tv's published keys, expiry, issuer.
pub fn verify_jwt(token: &str, keys: &JwkSet, now_s: i64) -> Result<PlexJwt, DenyReason> {
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
    let header = decode_header(token).map_err(|_| DenyReason::Malformed)?;
    if header.alg != Algorithm::EdDSA {
        return Err(DenyReason::WrongAlgorithm);
    }
    let candidates: Vec<_> = keys
        .keys
        .iter()
        .filter(|k| header.kid.is_none() || k.common.key_id == header.kid)
        .collect();
    if candidates.is_empty() {
        return Err(DenyReason::UnknownKey);
    }
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.validate_aud = false;
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["exp"]);
    let mut last = DenyReason::BadSignature;
    for jwk in candidates {
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match decode::<JwtClaims>(token, &key, &validation) {
            Ok(data) => {
                if data.claims.exp <= now_s {
                    return Err(DenyReason::Expired);
                }
                return Ok(PlexJwt {
                    exp: data.claims.exp,
                    thumbprint: data.claims.thumbprint,
                });
            }
            Err(e) => {
                last = match e.kind() {
                    ErrorKind::InvalidSignature => DenyReason::BadSignature,
                    ErrorKind::InvalidAlgorithm => DenyReason::WrongAlgorithm,
                    _ => DenyReason::Malformed,
                }
            }
        }
    }
    Err(last)
}

/// A Plex account as plex.tv describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountInfo {
    /// plex.tv's numeric account id, as text.
    pub id: String,
    pub username: String,
    pub title: String,
}

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Some(s.clone())
        }
        _ => None,
    }
}

fn text(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The account in plex.tv's `api/v2/user` answer (JSON).
pub fn parse_user(v: &Value) -> Option<AccountInfo> {
    let id = id_text(v.get("id")?)?;
    let username = text(v, "username");
    let title = text(v, "title");
    Some(AccountInfo {
        username: if username.is_empty() {
            title.clone()
        } else {
            username
        },
        title,
        id,
    })
}

/// One entry of the server's owner-side token list (`api/v2/server/access_tokens`): a token
/// valid for the server and the account it belongs to (friends and Plex Home users).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    pub token: String,
    pub account: AccountInfo,
}

/// The entries of an owner-side token list that name their account.
pub fn parse_access_tokens(v: &Value) -> Option<Vec<AccessEntry>> {
    let list = v.as_array()?;
    Some(
        list.iter()
            .filter_map(|e| {
                let token = e.get("token")?.as_str()?.to_string();
                let invited = e.get("invited")?;
                let account = parse_user(invited)?;
                (!token.is_empty()).then_some(AccessEntry { token, account })
            })
            .collect(),
    )
}

/// The transient token in a `/security/token` answer (JSON or XML `MediaContainer`).
pub fn transient_token_in(body: &[u8]) -> Option<String> {
    let token = if let Ok(v) = serde_json::from_slice::<Value>(body) {
        v.get("MediaContainer")?.get("token")?.as_str()?.to_string()
    } else {
        let text = std::str::from_utf8(body).ok()?;
        let doc = roxmltree::Document::parse(text).ok()?;
        doc.root_element().attribute("token")?.to_string()
    };
    (!token.is_empty() && token.len() <= super::carrier::MAX_PLEX_TOKEN_BYTES).then_some(token)
}

/// The server's settings (`GET /:/prefs`, JSON or XML): id → value as text.
pub fn parse_prefs(body: &[u8]) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        for s in v.get("MediaContainer")?.get("Setting")?.as_array()? {
            let Some(id) = s.get("id").and_then(Value::as_str) else {
                continue;
            };
            let value = match s.get("value") {
                Some(Value::String(t)) => t.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            out.insert(id.to_string(), value);
        }
        return Some(out);
    }
    let text = std::str::from_utf8(body).ok()?;
    let doc = roxmltree::Document::parse(text).ok()?;
    for node in doc.descendants().filter(|n| n.has_tag_name("Setting")) {
        if let Some(id) = node.attribute("id") {
            out.insert(
                id.to_string(),
                node.attribute("value").unwrap_or_default().to_string(),
            );
        }
    }
    Some(out)
}

/// A Plex boolean setting, which reads `1`/`0` or `true`/`false`.
fn pref_on(prefs: &HashMap<String, String>, id: &str) -> bool {
    prefs
        .get(id)
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Whether an `allowedNetworks` entry (`a.b.c.d`, `a.b.c.d/24`, `a.b.c.d/255.255.255.0`, or the
/// IPv6 forms) covers an address. An entry that cannot be read covers nothing.
pub fn network_covers(entry: &str, ip: IpAddr) -> bool {
    let entry = entry.trim();
    let (net, mask) = match entry.split_once('/') {
        Some((n, m)) => (n.trim(), Some(m.trim())),
        None => (entry, None),
    };
    let Ok(net) = net.parse::<IpAddr>() else {
        return false;
    };
    let ip = match (net, ip) {
        (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => return false,
        },
        _ => ip,
    };
    let prefix = |bits: u32| -> Option<u32> {
        match mask {
            None => Some(bits),
            Some(m) => match m.parse::<u32>() {
                Ok(p) if p <= bits => Some(p),
                Ok(_) => None,
                Err(_) => match m.parse::<IpAddr>() {
                    Ok(IpAddr::V4(mask)) if bits == 32 => {
                        let m = u32::from(mask);
                        (m.leading_ones() + m.trailing_zeros() == 32).then_some(m.leading_ones())
                    }
                    _ => None,
                },
            },
        }
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => prefix(32).is_some_and(|p| {
            let m = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            u32::from(n) & m == u32::from(a) & m
        }),
        (IpAddr::V6(n), IpAddr::V6(a)) => prefix(128).is_some_and(|p| {
            let m = if p == 0 { 0 } else { u128::MAX << (128 - p) };
            u128::from(n) & m == u128::from(a) & m
        }),
        _ => false,
    }
}

/// The self-check of the server's settings: a fatal problem (the gateway must not serve), and
/// warnings (the gateway can be bypassed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub fatal: Option<String>,
    pub warnings: Vec<String>,
}

/// Judges the server's settings, seen from the gateway's address `source` (the address the
/// server sees the gateway's requests come from) and its public URL.
pub fn self_check(prefs: &HashMap<String, String>, source: IpAddr, public_url: &str) -> Report {
    let mut report = Report::default();
    let allowed = prefs.get("allowedNetworks").map_or("", String::as_str);
    if let Some(entry) = allowed
        .split(',')
        .find(|e| !e.trim().is_empty() && network_covers(e, source))
    {
        report.fatal = Some(format!(
            "the Plex server lets `{}` in without a token (Settings › Network › \"List of IP \
             addresses and networks that are allowed without auth\" = `{allowed}`), and that \
             covers the gateway's address {source}: every request through the gateway would \
             reach the server as its owner. Remove that entry.",
            entry.trim()
        ));
    }
    if pref_on(prefs, "PublishServerOnPlexOnlineKey") {
        report.warnings.push(
            "Remote Access is on (Settings › Remote Access): apps can reach the server without \
             the gateway; turn it off"
                .to_string(),
        );
    }
    if pref_on(prefs, "RelayEnabled") {
        report.warnings.push(
            "Relay is on (Settings › Network › Enable Relay): relayed connections never pass \
             the gateway; turn it off"
                .to_string(),
        );
    }
    if pref_on(prefs, "GdmEnabled") {
        report.warnings.push(
            "local network discovery (GDM) is on: apps on the LAN find the server directly; \
             turn it off and let only the gateway reach port 32400"
                .to_string(),
        );
    }
    let custom = prefs.get("customConnections").map_or("", String::as_str);
    let public = public_url.trim_end_matches('/');
    if !custom
        .split(',')
        .any(|c| c.trim().trim_end_matches('/').eq_ignore_ascii_case(public))
    {
        report.warnings.push(format!(
            "the custom server access URLs (Settings › Network) are `{custom}`, not the \
             gateway's public URL {public}: apps are not told to come through the gateway"
        ));
    }
    report
}

/// Where the self-check of a route stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckState {
    /// Not yet done (the server has not answered yet): the route serves nobody.
    Pending(String),
    /// Done; the route serves unless the report is fatal.
    Done(Report),
}

impl CheckState {
    /// Why the route must not serve now, if it must not.
    pub fn refusal(&self) -> Option<&str> {
        match self {
            CheckState::Pending(why) => Some(why),
            CheckState::Done(r) => r.fatal.as_deref(),
        }
    }
}

/// The per-instance state of one `plex` route.
pub struct PlexRoute {
    /// The owner-side token list, by the tokens' keyed hashes (no token is kept).
    pub access: ArcSwap<HashMap<[u8; 32], AccountInfo>>,
    /// plex.tv's published JWT keys, once fetched.
    pub keys: ArcSwap<Option<JwkSet>>,
    /// The server owner's account, once known.
    pub owner: ArcSwap<Option<AccountInfo>>,
    pub check: ArcSwap<CheckState>,
    /// The last failure to reach plex.tv, if the last attempt failed.
    pub plex_tv_error: ArcSwap<Option<String>>,
    /// When the owner-side list was last fetched (or tried).
    pub refreshed: std::sync::Mutex<Option<std::time::Instant>>,
}

impl PlexRoute {
    /// Claims the right to fetch the owner-side list now, if it was last fetched longer than
    /// `min` ago (or never); one caller at a time gets it.
    pub fn claim_refresh(&self, min: Duration) -> bool {
        let mut last = self
            .refreshed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < min) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }
}

impl Default for PlexRoute {
    fn default() -> Self {
        PlexRoute {
            access: ArcSwap::from_pointee(HashMap::new()),
            keys: ArcSwap::from_pointee(None),
            owner: ArcSwap::from_pointee(None),
            check: ArcSwap::from_pointee(CheckState::Pending(
                "the Plex server's settings have not been checked yet".to_string(),
            )),
            plex_tv_error: ArcSwap::from_pointee(None),
            refreshed: std::sync::Mutex::new(None),
        }
    }
}

/// Every `plex` route's state, by route name, and refusals remembered briefly.
pub struct PlexState {
    routes: RwLock<HashMap<String, Arc<PlexRoute>>>,
    refused: Cache<[u8; 32], DenyReason>,
    /// Tokens plex.tv resolved, by keyed hash: the account.
    accounts: Cache<[u8; 32], AccountInfo>,
}

impl Default for PlexState {
    fn default() -> Self {
        PlexState {
            routes: RwLock::new(HashMap::new()),
            refused: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(REFUSAL_TTL)
                .build(),
            accounts: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ACCOUNT_TTL)
                .build(),
        }
    }
}

impl PlexState {
    /// The state of a route, made on first use.
    pub fn route(&self, name: &str) -> Arc<PlexRoute> {
        if let Some(r) = self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
        {
            return r.clone();
        }
        self.routes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// A refusal of this token remembered from a moment ago.
    pub fn refused(&self, hash: &[u8; 32]) -> Option<DenyReason> {
        self.refused.get(hash)
    }

    pub fn remember_refusal(&self, hash: [u8; 32], reason: DenyReason) {
        self.refused.insert(hash, reason);
    }

    /// The account plex.tv said a token belongs to, a moment ago.
    pub fn account_of(&self, hash: &[u8; 32]) -> Option<AccountInfo> {
        self.accounts.get(hash)
    }

    pub fn remember_account(&self, hash: [u8; 32], account: AccountInfo) {
        self.accounts.insert(hash, account);
    }

    /// Forgets every remembered refusal (an account was linked or a device approved), and lets
    /// the next unknown token fetch the owner-side lists again (the account may have been
    /// shared at plex.tv just before it was linked).
    pub fn forget_refusals(&self) {
        self.refused.invalidate_all();
        for route in self
            .routes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
        {
            *route
                .refreshed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn parts_and_the_event_source_are_long_lived_and_the_library_is_not() {
        assert!(long_lived("/library/parts/2001/1700000000/file.mkv"));
        assert!(long_lived("/Library/Parts/2001/file.mkv"));
        assert!(long_lived("/:/eventsource/notifications"));
        assert!(!long_lived("/library/sections"));
        assert!(!long_lived("/:/websockets/notifications"));
        assert!(!long_lived("/library/partsx"));
    }

    #[test]
    fn endpoints_are_told_apart() {
        let g = Method::GET;
        assert_eq!(classify(&g, "/identity", None), PlexEndpoint::Identity);
        assert_eq!(classify(&g, "/web/index.html", None), PlexEndpoint::Web);
        assert_eq!(classify(&g, "/webhooks", None), PlexEndpoint::Other);
        assert_eq!(
            classify(&g, "/myplex/account", None),
            PlexEndpoint::OwnerOnly
        );
        assert_eq!(classify(&g, "/MyPlex/Claim", None), PlexEndpoint::OwnerOnly);
        assert_eq!(classify(&g, "/:/prefs", None), PlexEndpoint::Other);
        assert_eq!(
            classify(&Method::PUT, "/:/prefs", Some("allowedNetworks=0.0.0.0/0")),
            PlexEndpoint::OwnerOnly
        );
        assert_eq!(
            classify(&g, "/security/token", Some("type=delegation")),
            PlexEndpoint::SecurityToken
        );
        assert_eq!(
            classify(
                &g,
                "/video/:/transcode/universal/start.m3u8",
                Some("path=%2Flibrary%2Fmetadata%2F1&session=AbC-1")
            ),
            PlexEndpoint::TranscodeStart {
                session: Some("AbC-1".into())
            }
        );
        assert_eq!(
            classify(&g, "/music/:/transcode/universal/decision", None),
            PlexEndpoint::TranscodeStart { session: None }
        );
        assert_eq!(
            classify(
                &g,
                "/video/:/transcode/universal/session/AbC-1/base/00001.ts",
                None
            ),
            PlexEndpoint::TranscodeSession {
                session: "AbC-1".into()
            }
        );
        assert_eq!(
            classify(&g, "/video/:/transcode/universal/session/a.b/x", None),
            PlexEndpoint::Other
        );
    }

    #[test]
    fn session_ids_are_found_in_playlists() {
        let body = b"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\nsession/5f3a-Z_9/base/index.m3u8\n";
        assert_eq!(session_ids_in(body), vec!["5f3a-Z_9".to_string()]);
        assert!(session_ids_in(b"session/no-slash").is_empty());
    }

    #[test]
    fn allowed_networks_are_read_in_every_form() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(network_covers("127.0.0.1", ip("127.0.0.1")));
        assert!(network_covers("127.0.0.0/8", ip("127.0.0.1")));
        assert!(network_covers("127.0.0.0/255.0.0.0", ip("127.9.0.1")));
        assert!(network_covers("0.0.0.0/0", ip("10.1.2.3")));
        assert!(network_covers("192.168.1.0/24", ip("::ffff:192.168.1.7")));
        assert!(!network_covers("192.168.1.0/24", ip("192.168.2.1")));
        assert!(!network_covers("10.0.0.0/255.0.255.0", ip("10.0.0.1")));
        assert!(!network_covers("10.0.0.0/33", ip("10.0.0.1")));
        assert!(!network_covers("nonsense", ip("10.0.0.1")));
        assert!(network_covers("fd00::/8", ip("fd12::1")));
        assert!(!network_covers("fd00::/8", ip("fe80::1")));
    }

    #[test]
    fn the_self_check_refuses_networks_that_cover_the_gateway_and_warns_of_bypasses() {
        let prefs = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let me: IpAddr = "172.18.0.2".parse().unwrap();
        let good = prefs(&[
            ("allowedNetworks", ""),
            ("customConnections", "https://plex.example.org"),
            ("GdmEnabled", "0"),
            ("RelayEnabled", "false"),
            ("PublishServerOnPlexOnlineKey", "0"),
        ]);
        let r = self_check(&good, me, "https://plex.example.org/");
        assert_eq!(r, Report::default());
        let bad = prefs(&[
            ("allowedNetworks", "192.168.1.0/24,172.16.0.0/12"),
            ("customConnections", "https://other.example.org"),
            ("GdmEnabled", "1"),
            ("RelayEnabled", "true"),
            ("PublishServerOnPlexOnlineKey", "1"),
        ]);
        let r = self_check(&bad, me, "https://plex.example.org");
        assert!(r.fatal.as_deref().unwrap().contains("172.16.0.0/12"));
        assert_eq!(r.warnings.len(), 4, "{:?}", r.warnings);
        let lan_only = prefs(&[("allowedNetworks", "192.168.1.0/24")]);
        assert!(self_check(&lan_only, me, "https://x").fatal.is_none());
    }

    #[test]
    fn answers_are_read_in_json_and_xml() {
        let json = br#"{"MediaContainer":{"Setting":[{"id":"allowedNetworks","value":"10.0.0.0/8"},{"id":"GdmEnabled","value":true}]}}"#;
        let p = parse_prefs(json).unwrap();
        assert_eq!(p["allowedNetworks"], "10.0.0.0/8");
        assert_eq!(p["GdmEnabled"], "true");
        let xml = br#"<?xml version="1.0"?><MediaContainer size="1"><Setting id="allowedNetworks" value="1.2.3.4"/></MediaContainer>"#;
        assert_eq!(parse_prefs(xml).unwrap()["allowedNetworks"], "1.2.3.4");
        assert_eq!(
            transient_token_in(br#"<MediaContainer size="0" token="transient-abc"/>"#).as_deref(),
            Some("transient-abc")
        );
        assert_eq!(
            transient_token_in(br#"{"MediaContainer":{"token":"t2"}}"#).as_deref(),
            Some("t2")
        );
        let list = serde_json::json!([
            {"type": "server", "token": "share1", "invited": {"id": 7, "username": "bob", "title": "Bob"}},
            {"type": "device", "token": "own", "owned": true},
        ]);
        let entries = parse_access_tokens(&list).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].account.id, "7");
        assert_eq!(entries[0].account.username, "bob");
    }
}
