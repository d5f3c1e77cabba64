//! The gateway's calls to plex.tv: who a token belongs to (`api/v2/user`), the server's
//! owner-side token list (`api/v2/server/access_tokens`, with the server's own token), the JWT
//! keys (`api/v2/auth/keys`), and the owner's levers for "also sign out at plex.tv" (remove one
//! of the owner's devices, stop sharing with a friend). Tokens travel in the `X-Plex-Token`
//! header, never in a URL the gateway logs.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use serde_json::Value;
use subtle::ConstantTimeEq;

use crate::config::Secret;

use super::{parse_access_tokens, parse_user, AccessEntry, AccountInfo};

/// Largest plex.tv answer read (a big server's token list runs to a few hundred KiB).
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;
/// How long one call to plex.tv may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The client identifier the gateway presents to plex.tv.
const CLIENT_ID: &str = "portcullis-gateway";

#[derive(Debug, thiserror::Error)]
pub enum TvError {
    /// plex.tv answered, and refused (the token is not valid there).
    #[error("plex.tv refused the token ({0})")]
    Refused(u16),
    #[error("plex.tv is not reachable: {0}")]
    Unavailable(String),
    #[error("plex.tv's answer to {0} could not be read")]
    Unreadable(&'static str),
}

/// One of the owner's devices at plex.tv (`devices.xml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TvDevice {
    pub id: String,
    pub client_id: String,
    pub name: String,
    pub product: String,
    /// The device's token (`token`, as python-plexapi's `MyPlexDevice` reads it); empty when
    /// plex.tv lists none.
    pub token: Secret,
}

impl TvDevice {
    /// Whether `token` is this device's token, compared in constant time (a device listed
    /// without one holds none).
    pub fn holds(&self, token: &str) -> bool {
        let own = self.token.expose();
        !own.is_empty() && bool::from(own.as_bytes().ct_eq(token.as_bytes()))
    }
}

#[derive(Clone)]
pub struct PlexTv {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl PlexTv {
    pub fn new() -> Result<PlexTv, TvError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| TvError::Unavailable(format!("TLS setup: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(PlexTv {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        })
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        accept: &'static str,
    ) -> Result<(u16, Bytes), TvError> {
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::ACCEPT, accept)
            .header(header::USER_AGENT, "portcullis")
            .header("X-Plex-Client-Identifier", CLIENT_ID)
            .header("X-Plex-Product", "Portcullis")
            .header("X-Plex-Version", env!("CARGO_PKG_VERSION"));
        if let Some(t) = token {
            req = req.header("X-Plex-Token", t);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| TvError::Unavailable(format!("bad request: {e}")))?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| TvError::Unavailable(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|_| TvError::Unavailable("the answer is too large".to_string()))?
                .to_bytes();
            Ok::<_, TvError>((status, body))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| TvError::Unavailable(format!("no answer within {CALL_TIMEOUT:?}")))??;
        match status {
            200..=299 => Ok((status, body)),
            400..=499 if status != 408 && status != 429 => Err(TvError::Refused(status)),
            _ => Err(TvError::Unavailable(format!("it answered {status}"))),
        }
    }

    async fn json(
        &self,
        url: &str,
        token: Option<&str>,
        what: &'static str,
    ) -> Result<Value, TvError> {
        let (_, body) = self
            .call(Method::GET, url, token, "application/json")
            .await?;
        serde_json::from_slice(&body).map_err(|_| TvError::Unreadable(what))
    }

    /// The account a token belongs to.
    pub async fn user(&self, base: &str, token: &str) -> Result<AccountInfo, TvError> {
        let v = self
            .json(&format!("{base}/api/v2/user"), Some(token), "api/v2/user")
            .await?;
        parse_user(&v).ok_or(TvError::Unreadable("api/v2/user"))
    }

    /// Every token valid for the server (friends' and Plex Home users'), with its account.
    pub async fn access_tokens(
        &self,
        base: &str,
        server_token: &str,
    ) -> Result<Vec<AccessEntry>, TvError> {
        let v = self
            .json(
                &format!("{base}/api/v2/server/access_tokens"),
                Some(server_token),
                "api/v2/server/access_tokens",
            )
            .await?;
        parse_access_tokens(&v).ok_or(TvError::Unreadable("api/v2/server/access_tokens"))
    }

    /// plex.tv's published JWT keys.
    pub async fn keys(&self, base: &str) -> Result<JwkSet, TvError> {
        let v = self
            .json(
                &format!("{base}/api/v2/auth/keys"),
                None,
                "api/v2/auth/keys",
            )
            .await?;
        serde_json::from_value(v).map_err(|_| TvError::Unreadable("api/v2/auth/keys"))
    }

    /// The owner's devices.
    pub async fn devices(&self, base: &str, owner_token: &str) -> Result<Vec<TvDevice>, TvError> {
        let (_, body) = self
            .call(
                Method::GET,
                &format!("{base}/devices.xml"),
                Some(owner_token),
                "application/xml",
            )
            .await?;
        std::str::from_utf8(&body)
            .ok()
            .and_then(parse_devices)
            .ok_or(TvError::Unreadable("devices.xml"))
    }

    /// Removes one of the owner's devices at plex.tv (its token stops working there).
    pub async fn delete_device(
        &self,
        base: &str,
        owner_token: &str,
        id: &str,
    ) -> Result<(), TvError> {
        if !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TvError::Unreadable("devices.xml"));
        }
        self.call(
            Method::DELETE,
            &format!("{base}/devices/{id}.xml"),
            Some(owner_token),
            "application/xml",
        )
        .await
        .map(|_| ())
    }

    /// Stops sharing the owner's servers with a friend (their share tokens stop working).
    pub async fn unshare(
        &self,
        base: &str,
        owner_token: &str,
        account_id: &str,
    ) -> Result<(), TvError> {
        if !account_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TvError::Unreadable("account id"));
        }
        self.call(
            Method::DELETE,
            &format!("{base}/api/v2/sharings/{account_id}"),
            Some(owner_token),
            "application/json",
        )
        .await
        .map(|_| ())
    }
}

/// The devices of a `devices.xml` document (each needs its `id` and `clientIdentifier`).
fn parse_devices(text: &str) -> Option<Vec<TvDevice>> {
    let doc = roxmltree::Document::parse(text).ok()?;
    Some(
        doc.descendants()
            .filter(|n| n.has_tag_name("Device"))
            .filter_map(|n| {
                Some(TvDevice {
                    id: n.attribute("id")?.to_string(),
                    client_id: n.attribute("clientIdentifier")?.to_string(),
                    name: n.attribute("name").unwrap_or_default().to_string(),
                    product: n.attribute("product").unwrap_or_default().to_string(),
                    token: Secret::new(n.attribute("token").unwrap_or_default().to_string()),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_holds_its_own_token_and_no_other() {
        let xml = r#"<MediaContainer size="2">
<Device name="Server" product="Plex Media Server" clientIdentifier="abc" id="11" token="server-token-1234567"/>
<Device name="Phone" product="Plex for iOS" clientIdentifier="def" id="12"/>
<Device name="No id" clientIdentifier="ghi" token="x"/>
</MediaContainer>"#;
        let devices = parse_devices(xml).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].token.expose(), "server-token-1234567");
        assert!(devices[0].holds("server-token-1234567"));
        assert!(!devices[0].holds("server-token-123456"));
        assert!(!devices[0].holds("server-token-12345678"));
        assert!(!devices[1].holds(""));
        assert!(!devices[1].holds("server-token-1234567"));
        assert!(!format!("{:?}", devices[0]).contains("server-token"));
        assert!(parse_devices("<MediaContainer").is_none());
    }
}
