//! Webhooks (`[[webhook]]`): a JSON body per security event, POSTed to each endpoint that asked
//! for that event, signed with HMAC-SHA256 over the timestamp and the body
//! (`X-Portcullis-Signature: t=UNIX,v1=HEX`), so the receiver can check who sent it and refuse
//! replays outside its window. Sent by the outbox worker, with its retries. An endpoint whose
//! name resolves to this host or a private network is refused unless it opted in.

use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{header, Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

use crate::config::webhook::{is_private, WebhookConfig};
use crate::config::Secret;
use crate::mail::SendError;

/// How long one delivery may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The signature of a delivery: HMAC-SHA256 with the webhook's secret over `"{t}.{body}"`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub struct Webhooks {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    hooks: Vec<(WebhookConfig, Secret)>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field(
                "hooks",
                &self.hooks.iter().map(|(c, _)| &c.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A problem with the files `[[webhook]]` names, as (key, problem).
pub type SetupError = (String, String);

impl Webhooks {
    /// Reads every webhook's secret and prepares the HTTP client.
    pub fn new(configs: &[WebhookConfig]) -> Result<Webhooks, SetupError> {
        let mut hooks = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let key = format!("webhook[{i}].secret_file");
            let text = std::fs::read_to_string(&c.secret_file).map_err(|e| {
                (
                    key.clone(),
                    format!("cannot read `{}`: {e}", c.secret_file.display()),
                )
            })?;
            let secret = text.trim_end_matches(['\r', '\n']).to_string();
            if secret.len() < 16 {
                return Err((
                    key,
                    format!(
                        "`{}` must hold a secret of at least 16 characters",
                        c.secret_file.display()
                    ),
                ));
            }
            hooks.push((c.clone(), Secret::new(secret)));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| ("webhook".to_string(), format!("TLS: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Webhooks {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            hooks,
        })
    }

    /// Delivers one event to the webhook `name`: 2xx is delivered; 408, 429 and 5xx, or no
    /// answer, are worth trying again; any other answer is final.
    pub async fn send(
        &self,
        name: &str,
        delivery: i64,
        event: &str,
        body: &[u8],
        now_s: i64,
    ) -> Result<(), SendError> {
        let Some((hook, secret)) = self.hooks.iter().find(|(c, _)| c.name == name) else {
            return Err(SendError::Permanent(format!(
                "no webhook `{name}` is configured any more"
            )));
        };
        if !hook.allow_private {
            let host = hook.url.host_str().unwrap_or_default().to_string();
            let port = hook.url.port_or_known_default().unwrap_or(443);
            let addrs = tokio::time::timeout(
                TIMEOUT,
                tokio::net::lookup_host((host.trim_matches(['[', ']']), port)),
            )
            .await
            .map_err(|_| SendError::Transient(format!("`{host}` did not resolve in time")))?
            .map_err(|e| SendError::Transient(format!("cannot resolve `{host}`: {e}")))?;
            for a in addrs {
                if is_private(a.ip()) {
                    return Err(SendError::Permanent(format!(
                        "`{host}` resolves to {} (this host or a private network): refused \
                         without allow_private",
                        a.ip()
                    )));
                }
            }
        }
        // Errors name the endpoint by scheme and host only: a path may hold a secret (chat
        // services put theirs there).
        let site = format!(
            "{}://{}",
            hook.url.scheme(),
            hook.url.host_str().unwrap_or_default()
        );
        let req = Request::builder()
            .method(Method::POST)
            .uri(hook.url.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "portcullis")
            .header("X-Portcullis-Event", event)
            .header("X-Portcullis-Delivery", delivery.to_string())
            .header(
                "X-Portcullis-Signature",
                signature(secret.expose().as_bytes(), now_s, body),
            )
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SendError::Transient(format!("{site}: {e}")))?;
            let status = resp.status().as_u16();
            // The answer's body is read (a little of it) so the connection can be reused.
            let _ = Limited::new(resp.into_body(), 4096).collect().await;
            Ok::<u16, SendError>(status)
        };
        let status = tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| SendError::Transient(format!("{site}: no answer within {TIMEOUT:?}")))??;
        match status {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(SendError::Transient(format!("{site} answered {status}"))),
            _ => Err(SendError::Permanent(format!("{site} answered {status}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_time_and_body() {
        // Known answer, from `printf '1700000000.{}' | openssl dgst -sha256 -hmac secret`.
        assert_eq!(
            signature(b"secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }
}
