//! The gateway's own calls to an OpenID provider: discovery, keys, the token endpoint and
//! userinfo. HTTP/1.1 over rustls (Mozilla's roots), bounded answers and a timeout per call.
//! Plain http is used only where the provider's configuration allows it ([`PlainHttp`], decided
//! once from the configured issuer); the caller checks every URL with [`allowed`] first.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Largest answer read from a provider (discovery documents and key sets are a few KiB).
pub const MAX_REPLY_BYTES: usize = 256 * 1024;
/// How long one call to a provider may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "`{0}` is not an https URL (plain http only with a plain-http loopback issuer, or with allow_insecure_http)"
    )]
    Insecure(String),
    #[error("`{0}` is not a valid URL")]
    BadUrl(String),
    #[error("the provider is not answering: {0}")]
    Unreachable(String),
    #[error("the provider took longer than {0:?}")]
    Timeout(Duration),
    #[error("the provider's answer is larger than {MAX_REPLY_BYTES} bytes")]
    TooLarge,
    #[error("the provider answered {status} to {what}")]
    Status { status: u16, what: &'static str },
    #[error("the provider's answer to {0} is not JSON")]
    NotJson(&'static str),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// Where one provider may be called over plain http, decided once from its configuration (never
/// from what its discovery document says).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlainHttp {
    /// https only: the issuer is https (a discovery document cannot downgrade its endpoints).
    Never,
    /// The configured issuer is itself plain http on a loopback host: plain http to loopback
    /// hosts only.
    Loopback,
    /// `allow_insecure_http = true`: plain http anywhere.
    Anywhere,
}

impl PlainHttp {
    pub fn for_issuer(issuer: &str, allow_insecure_http: bool) -> PlainHttp {
        if allow_insecure_http {
            return PlainHttp::Anywhere;
        }
        match url::Url::parse(issuer) {
            Ok(u) if u.scheme() == "http" && crate::config::oidc_is_loopback(&u) => {
                PlainHttp::Loopback
            }
            _ => PlainHttp::Never,
        }
    }
}

/// Whether the gateway may call `url`: https, or plain http as `plain` allows.
pub fn allowed(url: &str, plain: PlainHttp) -> Result<url::Url, HttpError> {
    let parsed = url::Url::parse(url).map_err(|_| HttpError::BadUrl(url.to_string()))?;
    let ok = match parsed.scheme() {
        "https" => true,
        "http" => match plain {
            PlainHttp::Anywhere => true,
            PlainHttp::Loopback => crate::config::oidc_is_loopback(&parsed),
            PlainHttp::Never => false,
        },
        _ => false,
    };
    if ok {
        Ok(parsed)
    } else {
        Err(HttpError::Insecure(url.to_string()))
    }
}

/// A pooled client for provider calls.
#[derive(Clone)]
pub struct ProviderClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl ProviderClient {
    pub fn new() -> Result<ProviderClient, HttpError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(ProviderClient { client })
    }

    async fn call(
        &self,
        req: Request<Full<Bytes>>,
        what: &'static str,
    ) -> Result<Value, HttpError> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|_| HttpError::TooLarge)?
                .to_bytes();
            Ok::<_, HttpError>((status, body))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, fut)
            .await
            .map_err(|_| HttpError::Timeout(CALL_TIMEOUT))??;
        if !(200..300).contains(&status) {
            return Err(HttpError::Status { status, what });
        }
        serde_json::from_slice(&body).map_err(|_| HttpError::NotJson(what))
    }

    /// `GET url` with an optional Bearer token; the answer must be 2xx JSON.
    pub async fn get_json(
        &self,
        url: &url::Url,
        bearer: Option<&str>,
        what: &'static str,
    ) -> Result<Value, HttpError> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "portcullis");
        if let Some(token) = bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|_| HttpError::BadUrl(url.to_string()))?;
        self.call(req, what).await
    }

    /// `POST url` with a form body and optional HTTP Basic client authentication.
    pub async fn post_form(
        &self,
        url: &url::Url,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
        what: &'static str,
    ) -> Result<Value, HttpError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(url.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "portcullis")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some((id, secret)) = basic {
            // RFC 6749 §2.3.1: both form-urlencoded before joining.
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", enc(id), enc(secret));
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD.encode(pair);
            req = req.header(header::AUTHORIZATION, format!("Basic {b64}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| HttpError::BadUrl(url.to_string()))?;
        self.call(req, what).await
    }
}
