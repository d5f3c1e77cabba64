//! The gateway's own calls to a media server: the login routes it performs on the client's
//! behalf (so the minted token is bound before the client sees it), `GET /Users/Me` for
//! adopting an unknown token, and `POST /Sessions/Logout` for every token the gateway ends.

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Largest upstream answer the gateway reads into memory (login results are a few KiB).
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;
/// How long one call to the media server may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the media server is not answering: {0}")]
    Unreachable(String),
    #[error("the media server took longer than {0:?}")]
    Timeout(Duration),
    #[error("the media server's answer is larger than {MAX_REPLY_BYTES} bytes")]
    TooLarge,
    #[error("the request to the media server could not be built: {0}")]
    Build(String),
}

/// A complete answer from the media server.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body decoded from its `Content-Encoding` (identity, gzip, deflate), if possible.
    pub fn decoded(&self) -> Option<Vec<u8>> {
        let encoding = self
            .headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .trim()
            .to_ascii_lowercase();
        let mut out = Vec::new();
        let limit = MAX_REPLY_BYTES as u64 * 8;
        match encoding.as_str() {
            "" | "identity" => return Some(self.body.to_vec()),
            "gzip" | "x-gzip" => flate2::read::GzDecoder::new(&self.body[..])
                .take(limit)
                .read_to_end(&mut out)
                .ok()?,
            "deflate" => flate2::read::ZlibDecoder::new(&self.body[..])
                .take(limit)
                .read_to_end(&mut out)
                .ok()?,
            _ => return None,
        };
        Some(out)
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.decoded()?).ok()
    }
}

/// A pooled HTTP/1.1 client for the media servers behind the gateway.
#[derive(Clone)]
pub struct MediaClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for MediaClient {
    fn default() -> Self {
        Self::new()
    }
}

impl MediaClient {
    pub fn new() -> MediaClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        MediaClient {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
        }
    }

    /// Sends one request to `upstream` and reads the whole answer.
    pub async fn call(
        &self,
        upstream: SocketAddr,
        method: Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Reply, CallError> {
        let uri = format!("http://{upstream}{path_and_query}");
        let mut builder = http::Request::builder().method(method).uri(uri);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
            h.insert(
                http::header::HOST,
                http::HeaderValue::from_str(&upstream.to_string())
                    .map_err(|e| CallError::Build(e.to_string()))?,
            );
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| CallError::Build(e.to_string()))?;
        let work = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| CallError::Unreachable(e.to_string()))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|_| CallError::TooLarge)?
                .to_bytes();
            Ok(Reply {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| CallError::Timeout(CALL_TIMEOUT))?
    }
}

/// A JSON object's field, matched case-insensitively (Jellyfin answers PascalCase, or
/// camelCase when asked; its request bodies are read case-insensitively too).
pub fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

pub fn field_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    field(v, key)?.as_str()
}

/// What the gateway needs from an `AuthenticationResult`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResult {
    pub token: String,
    pub user_id: String,
    pub user_name: String,
    pub device_id: Option<String>,
}

/// Reads `AccessToken`, `User.Id`, `User.Name` and `SessionInfo.DeviceId`.
pub fn login_result(v: &Value) -> Option<LoginResult> {
    let user = field(v, "User")?;
    let token = field_str(v, "AccessToken")?.to_string();
    if token.trim().is_empty() {
        return None;
    }
    Some(LoginResult {
        token,
        user_id: field_str(user, "Id")?.to_string(),
        user_name: field_str(user, "Name")?.to_string(),
        device_id: field(v, "SessionInfo")
            .and_then(|s| field_str(s, "DeviceId"))
            .map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn login_results_parse_in_either_case() {
        let pascal = serde_json::json!({
            "User": {"Id": "u1", "Name": "Alice"},
            "SessionInfo": {"DeviceId": "d1"},
            "AccessToken": "t1", "ServerId": "s"
        });
        let camel = serde_json::json!({
            "user": {"id": "u1", "name": "Alice"},
            "sessionInfo": {"deviceId": "d1"},
            "accessToken": "t1", "serverId": "s"
        });
        for v in [pascal, camel] {
            let r = login_result(&v).unwrap();
            assert_eq!(
                (r.token.as_str(), r.user_id.as_str(), r.user_name.as_str()),
                ("t1", "u1", "Alice")
            );
            assert_eq!(r.device_id.as_deref(), Some("d1"));
        }
        assert!(login_result(&serde_json::json!({"AccessToken": ""})).is_none());
    }

    #[test]
    fn gzip_answers_are_decoded() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(br#"{"a":1}"#).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let reply = Reply {
            status: 200,
            headers,
            body: gz.finish().unwrap().into(),
        };
        assert_eq!(reply.json().unwrap()["a"], 1);
    }
}
