//! Logging: a `tracing` subscriber in text or JSON, its level from the config or `RUST_LOG`,
//! and the redaction of secrets that may appear in request targets. Access log lines are
//! emitted by the proxy under the target `portcullis::access`.
//!
//! Lines are formatted on the thread that logs them and written by a writer thread, which
//! buffers every line queued since its last write and writes them in one system call: a proxy
//! thread never waits for stderr, and under load many access-log lines share one `write(2)`.
//! Nothing is dropped: when the queue is full, the logging thread waits.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Query keys whose values are secrets (compared ignoring ASCII case).
const SECRET_QUERY_KEYS: &[&str] = &[
    "api_key",
    "apikey",
    "x-plex-token",
    "x-emby-token",
    "token",
    "access_token",
    "password",
    "pw",
    "code",
    // Quick Connect: the secret a new device redeems for a token.
    "secret",
];

/// Libraries whose debug output carries request headers, query strings or SQL parameters:
/// they are held at these levels whatever the configured level, so secrets never reach a log.
const CAPPED_TARGETS: &[&str] = &[
    "pingora_core=info",
    "pingora_proxy=info",
    "pingora_cache=warn",
    "pingora_pool=info",
    "sqlx=warn",
    "hyper=info",
    "axum=info",
];

/// Lines queued for the writer thread before a logging thread waits for it.
const QUEUED_LINES: usize = 64 * 1024;

/// Starts logging to stderr. `RUST_LOG`, when set, wins over the config's level. Keep the guard
/// until the process ends: dropping it writes out the lines still queued.
pub fn init(cfg: &LogConfig) -> tracing_appender::non_blocking::WorkerGuard {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in CAPPED_TARGETS {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    // The writer thread flushes its buffer whenever its queue runs empty.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("portcullis-log")
        .finish(std::io::BufWriter::with_capacity(
            1 << 16,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    guard
}

/// A request target with the values of secret query parameters replaced by `REDACTED`.
pub fn redact_target(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_string();
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let decoded = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
            // A query that arrives fully percent-encoded as one key (`ApiKey%3Dabc%26…`), which
            // Jellyfin decodes for WebSockets: logged only as a marker.
            if !pair.contains('=') && decoded.contains('=') {
                return "ENCODED-QUERY-REDACTED".to_string();
            }
            if SECRET_QUERY_KEYS
                .iter()
                .any(|s| decoded.eq_ignore_ascii_case(s))
            {
                format!("{key}=REDACTED")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", parts.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact_target;

    #[test]
    fn fully_encoded_queries_and_quick_connect_secrets_are_redacted() {
        assert_eq!(
            redact_target("/socket?ApiKey%3Dabc%26deviceId%3Dx"),
            "/socket?ENCODED-QUERY-REDACTED"
        );
        assert_eq!(
            redact_target("/QuickConnect/Connect?Secret=abc"),
            "/QuickConnect/Connect?Secret=REDACTED"
        );
        assert_eq!(redact_target("/a?flag&b=1"), "/a?flag&b=1");
    }

    #[test]
    fn secret_query_values_are_redacted_in_any_case_and_encoding() {
        assert_eq!(
            redact_target("/v?ApiKey=s1&x=1&API_KEY=s2&X-Plex-Token=s3&%61pi_key=s4"),
            "/v?ApiKey=REDACTED&x=1&API_KEY=REDACTED&X-Plex-Token=REDACTED&%61pi_key=REDACTED"
        );
        assert_eq!(redact_target("/plain"), "/plain");
    }
}
