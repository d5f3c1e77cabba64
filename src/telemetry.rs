//! Logging: a `tracing` subscriber in text or JSON, its level from the config or `RUST_LOG`,
//! and the redaction of secrets that may appear in request targets. Access log lines are
//! emitted by the proxy under the target `portcullis::access`, through [`access`].
//!
//! Lines are formatted on the thread that logs them. In the text format an access line is
//! written by [`access`] straight into the sink, byte for byte as `tracing_subscriber`'s default
//! format would write it but without its per-field formatting machinery; in JSON it goes
//! through `tracing` like every other line. Access-log lines are appended to a shared
//! buffer that a flusher thread writes out every [`FLUSH_EVERY`] in one `write(2)`: a proxy thread
//! never makes a system call or wakes another thread for its access line. Every other line is
//! written at once, after whatever the buffer holds, so lines keep their order and a warning or
//! an error is on stderr before the call that logged it returns. Nothing is dropped: a buffer
//! past [`MAX_PENDING`] is written out by the thread that filled it.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
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

/// How long an access-log line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Bytes buffered before the thread that logs writes them out itself.
const MAX_PENDING: usize = 1 << 20;

/// The target of access-log lines, the only ones that wait in the buffer.
const ACCESS_TARGET: &str = "portcullis::access";

/// The level filter: `RUST_LOG` when set, else the config's level, with the libraries that
/// could log secrets capped ([`CAPPED_TARGETS`]).
fn level_filter(level: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in CAPPED_TARGETS {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

/// Starts logging to stderr. `RUST_LOG`, when set, wins over the config's level. Keep the guard
/// until the process ends: dropping it writes out the lines still buffered. The level and the
/// format can be changed later by [`reconfigure`] (a config reload).
pub fn init(cfg: &LogConfig) -> LogGuard {
    use tracing_subscriber::util::SubscriberInitExt;

    JSON.store(cfg.format == LogFormat::Json, Relaxed);
    let sink = Sink::new(Box::new(std::io::stderr()));
    let guard = sink.start_flusher(FLUSH_EVERY);
    let (subscriber, handle) = subscriber(level_filter(&cfg.level), &sink);
    // Installing it also sets the `log` crate's maximum level to the subscriber's.
    if subscriber.try_init().is_ok() {
        let _ = ACCESS_SINK.set(sink);
        let _ = LEVEL.set(handle);
    }
    guard
}

type LevelHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The subscriber [`init`] installs: the level filter (reloadable), then a layer for each
/// format, both writing into `sink`; the [`JSON`] flag picks the one that writes (callsite
/// interest is rebuilt when it flips).
fn subscriber(
    filter: EnvFilter,
    sink: &Sink,
) -> (
    impl tracing::Subscriber + Send + Sync + 'static,
    LevelHandle,
) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    set_max_level(&filter);
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let text = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(sink.clone())
        .with_timer(UtcMicros)
        .with_filter(Format { json: false });
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_writer(sink.clone())
        .with_timer(UtcMicros)
        .with_filter(Format { json: true });
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    (subscriber, handle)
}

/// Applies a reloaded `[log]` section: the level (unless `RUST_LOG` is set, which keeps
/// winning) and the format. Returns an error when logging was not started by [`init`].
pub fn reconfigure(cfg: &LogConfig) -> Result<(), String> {
    let handle = LEVEL
        .get()
        .ok_or_else(|| "logging was not started by the gateway".to_string())?;
    let filter = level_filter(&cfg.level);
    let previous = set_max_level(&filter);
    // The reload rebuilds the callsites' interest and the process-wide maximum level (from the
    // hint just stored).
    if let Err(e) = handle.reload(filter) {
        *lock(&MAX_LEVEL) = previous;
        return Err(format!("cannot change the log level: {e}"));
    }
    let json = cfg.format == LogFormat::Json;
    if JSON.swap(json, Relaxed) != json {
        tracing::callsite::rebuild_interest_cache();
    }
    log::set_max_level(as_log(LevelFilter::current()));
    Ok(())
}

/// The most verbose level the level filter lets through: the format filters' level hint (see
/// [`Format`]). Read when callsite interest is rebuilt, never per event.
static MAX_LEVEL: Mutex<LevelFilter> = Mutex::new(LevelFilter::TRACE);

/// Stores the level filter's hint for the subscriber built or reloaded next, which reads it;
/// returns the hint it replaces.
fn set_max_level(filter: &EnvFilter) -> LevelFilter {
    use tracing_subscriber::Layer;
    // No hint: the filter has directives on span fields, which any level may match.
    let level =
        Layer::<tracing_subscriber::Registry>::max_level_hint(filter).unwrap_or(LevelFilter::TRACE);
    std::mem::replace(&mut *lock(&MAX_LEVEL), level)
}

fn as_log(level: LevelFilter) -> log::LevelFilter {
    match level.into_level() {
        None => log::LevelFilter::Off,
        Some(Level::ERROR) => log::LevelFilter::Error,
        Some(Level::WARN) => log::LevelFilter::Warn,
        Some(Level::INFO) => log::LevelFilter::Info,
        Some(Level::DEBUG) => log::LevelFilter::Debug,
        Some(Level::TRACE) => log::LevelFilter::Trace,
    }
}

/// The filter of each format's layer: the text layer takes the events while the text format is
/// chosen, the JSON layer while JSON is. Decided per callsite and cached (a switch rebuilds the
/// cache). Its level hint is the level filter's, for the layer in use, so the process-wide
/// maximum level, which `tracing`'s macros and the `log` crate's (Pingora's) check before
/// anything else, stays at the level that is logged. A filter without a hint made it TRACE:
/// every `debug!` on Pingora's request path then went through the `log` bridge to the level
/// filter, 1 µs of every proxied request (bench/profile.sh).
struct Format {
    json: bool,
}

impl Format {
    fn in_use(&self) -> bool {
        JSON.load(Relaxed) == self.json
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for Format {
    fn enabled(&self, _: &Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.in_use()
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if self.in_use() {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(if self.in_use() {
            *lock(&MAX_LEVEL)
        } else {
            LevelFilter::OFF
        })
    }
}

/// Whether lines are written as JSON (else text).
static JSON: AtomicBool = AtomicBool::new(false);

/// Changes the level filter of the installed subscriber.
static LEVEL: OnceLock<LevelHandle> = OnceLock::new();

/// Where [`access`] writes text lines itself; set by [`init`].
static ACCESS_SINK: OnceLock<Sink> = OnceLock::new();

/// The fields of one access-log line, in the order they are written.
#[derive(Debug, Clone, Copy)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub client: &'a str,
    pub method: &'a str,
    /// Already redacted ([`redact_target`]).
    pub path: &'a str,
    pub route: &'a str,
    pub decision: &'a str,
    pub reason: &'a str,
    pub user: &'a str,
    pub status: u16,
    pub duration_ms: f64,
}

/// Logs one access line at INFO under `portcullis::access`, if that target is enabled. Inside
/// a span (none is entered on the proxy path today) or when this thread cannot use its buffer,
/// the line goes through `tracing` instead, which writes the span context too.
pub fn access(line: &AccessLine<'_>) {
    if !tracing::enabled!(target: ACCESS_TARGET, Level::INFO) {
        return;
    }
    let sink = match ACCESS_SINK.get() {
        Some(sink) if !JSON.load(Relaxed) && tracing::Span::current().is_none() => sink,
        _ => {
            access_event(line);
            return;
        }
    };
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let written = LINE.try_with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return false;
        };
        buf.clear();
        utc_micros(|second, micros| {
            buf.extend_from_slice(second.as_bytes());
            buf.push(b'.');
            push_digits(&mut buf, micros, 6);
        });
        write_access_fields(&mut buf, line);
        sink.append(&buf, true);
        true
    });
    if !matches!(written, Ok(true)) {
        access_event(line);
    }
}

/// The access line as a `tracing` event, for the JSON format (and any subscriber but ours).
fn access_event(line: &AccessLine<'_>) {
    tracing::info!(
        target: ACCESS_TARGET,
        request_id = %line.request_id,
        client = %line.client,
        method = %line.method,
        path = %line.path,
        route = line.route,
        decision = line.decision,
        reason = line.reason,
        user = line.user,
        status = line.status,
        duration_ms = line.duration_ms,
    );
}

/// Everything after the time's digits: `Z  INFO portcullis::access: request_id=… duration_ms=…`
/// and the newline, as the default format writes the event [`access_event`] logs: `%` fields
/// as `Display` shows them, strings quoted as `Debug` shows them.
fn write_access_fields(buf: &mut Vec<u8>, line: &AccessLine<'_>) {
    buf.extend_from_slice(b"Z  INFO portcullis::access: request_id=");
    buf.extend_from_slice(line.request_id.as_bytes());
    buf.extend_from_slice(b" client=");
    buf.extend_from_slice(line.client.as_bytes());
    buf.extend_from_slice(b" method=");
    buf.extend_from_slice(line.method.as_bytes());
    buf.extend_from_slice(b" path=");
    buf.extend_from_slice(line.path.as_bytes());
    for (name, value) in [
        (&b" route="[..], line.route),
        (b" decision=", line.decision),
        (b" reason=", line.reason),
        (b" user=", line.user),
    ] {
        buf.extend_from_slice(name);
        push_quoted(buf, value);
    }
    buf.extend_from_slice(b" status=");
    push_digits(buf, u32::from(line.status), 1);
    // `{:?}` of an f64, as `tracing` records it (`1.0`, not `1`).
    let _ = writeln!(buf, " duration_ms={:?}", line.duration_ms);
}

/// A string as `{:?}` writes it: quoted, with escapes where needed (printable ASCII needs
/// none but for `"` and `\`).
fn push_quoted(buf: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

/// `n` in decimal, zero-padded to at least `width` digits (at most ten in all).
fn push_digits(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    while i > 0 && (n > 0 || digits.len() - i < width) {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    buf.extend_from_slice(&digits[i..]);
}

/// Wall-clock time in UTC to the microsecond, as `tracing_subscriber`'s `SystemTime` writes it;
/// the date and time of day are worked out once a second per thread.
#[derive(Clone, Copy)]
struct UtcMicros;

impl FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        utc_micros(|second, micros| write!(w, "{second}.{micros:06}Z"))
    }
}

/// Calls `f` with the time now: `YYYY-MM-DDTHH:MM:SS` in UTC and the microseconds past it. The
/// text of the second is worked out once a second per thread.
fn utc_micros<R>(mut f: impl FnMut(&str, u32) -> R) -> R {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let micros = now.subsec_micros();
    let cached = SECOND.try_with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, utc_second(secs));
        }
        f(&cached.1, micros)
    });
    match cached {
        Ok(r) => r,
        // The thread is ending and its cache is gone.
        Err(_) => f(&utc_second(secs), micros),
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix time (days to a civil date: Howard Hinnant's algorithm).
fn utc_second(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// Where log lines go: a buffer for access lines, and the output behind it.
#[derive(Clone)]
pub struct Sink {
    shared: Arc<Shared>,
}

struct Shared {
    /// Lines not yet written. Always locked before `out`, so lines leave in the order they came.
    pending: Mutex<Pending>,
    out: Mutex<Box<dyn Write + Send>>,
    /// Wakes the flusher early when the process stops.
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    /// A flusher runs: access lines may wait for it.
    batching: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Sink {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Sink {
            shared: Arc::new(Shared {
                pending: Mutex::new(Pending::default()),
                out: Mutex::new(out),
                wake: Condvar::new(),
            }),
        }
    }

    /// Starts the thread that writes the buffer out `every` so often. Without it (or once
    /// its guard is dropped) every line is written at once.
    pub fn start_flusher(&self, every: Duration) -> LogGuard {
        let shared = self.shared.clone();
        // Set before the thread first looks; without a thread, lines are written at once.
        lock(&self.shared.pending).batching = true;
        let thread = std::thread::Builder::new()
            .name("portcullis-log".into())
            .spawn(move || {
                let mut pending = lock(&shared.pending);
                while pending.batching {
                    pending = shared
                        .wake
                        .wait_timeout(pending, every)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    pending = shared.write_out(pending);
                }
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(_) => {
                lock(&self.shared.pending).batching = false;
                None
            }
        };
        LogGuard {
            shared: self.shared.clone(),
            thread,
        }
    }

    /// Appends one formatted line; it waits for the flusher when `batched`.
    fn append(&self, line: &[u8], batched: bool) {
        let mut pending = lock(&self.shared.pending);
        pending.bytes.extend_from_slice(line);
        if !batched || !pending.batching || pending.bytes.len() >= MAX_PENDING {
            drop(self.shared.write_out(pending));
        }
    }
}

impl Shared {
    /// Writes out everything pending; the pending lock is held until `out` is taken, so no
    /// later line can overtake these.
    fn write_out<'a>(&'a self, mut pending: MutexGuard<'a, Pending>) -> MutexGuard<'a, Pending> {
        if pending.bytes.is_empty() {
            return pending;
        }
        let bytes = std::mem::take(&mut pending.bytes);
        let mut out = lock(&self.out);
        let result = out.write_all(&bytes).and_then(|()| out.flush());
        drop(out);
        // Keep the allocation for the next batch.
        let mut bytes = bytes;
        bytes.clear();
        if pending.bytes.capacity() < bytes.capacity() {
            pending.bytes = bytes;
        }
        // stderr gone (closed pipe): nothing more useful to do with the line.
        let _ = result;
        pending
    }
}

/// Keeps the flusher running; dropping it writes out what is buffered and stops the thread.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        lock(&self.shared.pending).batching = false;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        drop(self.shared.write_out(lock(&self.shared.pending)));
    }
}

/// One event's writer: the fmt layer formats the whole line, then writes it in one call.
pub struct LineWriter {
    sink: Sink,
    batched: bool,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sink.append(buf, self.batched);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            batched: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter {
        LineWriter {
            sink: self.clone(),
            batched: *meta.level() >= Level::INFO && meta.target() == ACCESS_TARGET,
        }
    }
}

/// A request target with the values of secret query parameters replaced by `REDACTED`.
pub fn redact_target(target: &str) -> Cow<'_, str> {
    let Some((path, query)) = target.split_once('?') else {
        return Cow::Borrowed(target);
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
    Cow::Owned(format!("{path}?{}", parts.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read while the sink holds it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }
    }

    fn log_through(sink: &Sink, f: impl FnOnce()) {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(sink.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, f);
    }

    /// The subscriber's level hint is the configured level (what `tracing` and the `log` crate
    /// check before calling it), not TRACE, whatever the format; and the layer in use writes.
    #[test]
    fn the_subscriber_hints_the_configured_level_and_writes_in_the_chosen_format() {
        use tracing::Subscriber;
        for (level, want) in [
            ("info", LevelFilter::INFO),
            ("warn", LevelFilter::WARN),
            ("debug", LevelFilter::DEBUG),
        ] {
            let out = Shared::default();
            let sink = Sink::new(Box::new(out.clone()));
            let (subscriber, _handle) = subscriber(EnvFilter::new(level), &sink);
            assert_eq!(subscriber.max_level_hint(), Some(want), "level {level}");
            tracing::subscriber::with_default(subscriber, || {
                tracing::warn!(target: "portcullis::test", "written at {level}");
                tracing::debug!(target: "portcullis::test", "debug at {level}");
            });
            let text = out.text();
            assert!(text.contains(&format!("written at {level}")), "{text}");
            assert_eq!(text.contains("debug at"), level == "debug", "{text}");
        }
    }

    #[test]
    fn access_lines_wait_for_the_flusher_and_other_lines_keep_their_order() {
        let out = Shared::default();
        let sink = Sink::new(Box::new(out.clone()));
        let guard = sink.start_flusher(FLUSH_EVERY);
        log_through(&sink, || {
            tracing::info!(target: "portcullis::access", "first");
            tracing::info!(target: "portcullis::access", "second");
        });
        // Not written by the logging thread: they wait for the flusher (50 ms), and then all
        // arrive in one write.
        let started = std::time::Instant::now();
        while !out.text().contains("second") {
            assert!(started.elapsed() < Duration::from_secs(5), "never flushed");
            std::thread::sleep(Duration::from_millis(5));
        }
        log_through(&sink, || {
            tracing::info!(target: "portcullis::access", "third");
            tracing::warn!("a warning");
        });
        // The warning is written at once, after the access line logged before it.
        let text = out.text();
        let (third, warning) = (text.find("third").unwrap(), text.find("a warning").unwrap());
        assert!(text.find("first").unwrap() < text.find("second").unwrap());
        assert!(third < warning, "{text}");
        log_through(
            &sink,
            || tracing::info!(target: "portcullis::access", "last"),
        );
        drop(guard);
        assert!(out.text().contains("last"), "the guard writes out the rest");
    }

    /// One event as the library's default text format writes it, from the space after the time.
    fn default_line(f: impl FnOnce()) -> String {
        let out = Shared::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(Sink::new(Box::new(out.clone())))
            .with_ansi(false)
            .with_timer(UtcMicros)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = out.text();
        text.split_once('Z').unwrap().1.to_string()
    }

    #[test]
    fn access_lines_read_as_the_default_format_writes_them() {
        let first = AccessLine {
            request_id: "9f2c",
            client: "127.0.0.1",
            method: "GET",
            path: "/Videos/1/stream?ApiKey=REDACTED",
            route: "media",
            decision: "allow",
            reason: "valid_session",
            user: "alice",
            status: 200,
            duration_ms: 0.418_372,
        };
        let lines = [
            first,
            // Strings that need escapes, whole and tiny numbers, a long IPv6 client.
            AccessLine {
                reason: "valid \"session\"\n",
                user: "Zoë\\x\t",
                route: "",
                client: "2001:db8::ff00:42:8329",
                status: 0,
                duration_ms: 1.0,
                ..first
            },
            AccessLine {
                method: "PROPFIND",
                path: "/",
                status: 65_535,
                duration_ms: 0.000_012_3,
                ..first
            },
            AccessLine {
                status: 7,
                duration_ms: 123_456_789.5,
                ..first
            },
        ];
        for line in lines {
            let mut ours = Vec::new();
            write_access_fields(&mut ours, &line);
            let ours = String::from_utf8(ours).unwrap();
            let theirs = default_line(|| access_event(&line));
            assert_eq!(ours.strip_prefix('Z'), Some(theirs.as_str()));
        }
        // Without the text sink (as under any subscriber but the gateway's own), `access`
        // logs through `tracing`; inside a span the span's context is written too.
        assert!(ACCESS_SINK.get().is_none());
        let via_access = default_line(|| access(&first));
        let mut direct = Vec::new();
        write_access_fields(&mut direct, &first);
        assert_eq!(
            Some(via_access.as_str()),
            std::str::from_utf8(&direct).unwrap().strip_prefix('Z')
        );
        let in_span = default_line(|| {
            let _span = tracing::info_span!("request", id = 7).entered();
            access(&first);
        });
        assert!(
            in_span.contains(" request{id=7}: portcullis::access: request_id=9f2c "),
            "{in_span}"
        );
        let mut first_line = Vec::new();
        write_access_fields(&mut first_line, &first);
        assert_eq!(
            String::from_utf8(first_line).unwrap(),
            "Z  INFO portcullis::access: request_id=9f2c client=127.0.0.1 method=GET \
             path=/Videos/1/stream?ApiKey=REDACTED route=\"media\" decision=\"allow\" \
             reason=\"valid_session\" user=\"alice\" status=200 duration_ms=0.418372\n"
        );
    }

    #[test]
    fn digits_are_padded_to_their_width() {
        for (n, width, want) in [
            (0, 6, "000000"),
            (42, 6, "000042"),
            (0, 1, "0"),
            (65_535, 1, "65535"),
        ] {
            let mut buf = Vec::new();
            push_digits(&mut buf, n, width);
            assert_eq!(buf, want.as_bytes());
        }
        let mut buf = Vec::new();
        push_digits(&mut buf, u32::MAX, 6);
        assert_eq!(buf, b"4294967295");
        // A width past ten digits is capped, not a panic.
        let mut buf = Vec::new();
        push_digits(&mut buf, 5, 12);
        assert_eq!(buf, b"0000000005");
    }

    #[test]
    fn the_time_reads_as_the_library_writes_it() {
        assert_eq!(utc_second(0), "1970-01-01T00:00:00");
        assert_eq!(utc_second(951_825_599), "2000-02-29T11:59:59");
        assert_eq!(utc_second(4_102_444_800), "2100-01-01T00:00:00");
        assert_eq!(utc_second(1_795_892_399), "2026-11-28T18:59:59");
        for _ in 0..3 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            UtcMicros.format_time(&mut Writer::new(&mut ours)).unwrap();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
            // Equal to the second, unless a second boundary fell between the two calls.
            if ours[..19] == theirs[..19] {
                return;
            }
        }
        panic!("the time never matched the library's");
    }

    #[test]
    fn without_a_flusher_or_past_the_cap_lines_are_written_at_once() {
        let out = Shared::default();
        let sink = Sink::new(Box::new(out.clone()));
        log_through(
            &sink,
            || tracing::info!(target: "portcullis::access", "alone"),
        );
        assert!(out.text().contains("alone"));

        let out = Shared::default();
        let sink = Sink::new(Box::new(out.clone()));
        // A flusher that would not wake within the test: only the logging thread can write.
        let _guard = sink.start_flusher(Duration::from_secs(3600));
        let line = vec![b'x'; MAX_PENDING / 4 + 1];
        for _ in 0..3 {
            sink.append(&line, true);
        }
        assert!(lock(&out.0).is_empty(), "under the cap, access lines wait");
        sink.append(&line, true);
        assert_eq!(
            lock(&out.0).len(),
            4 * line.len(),
            "a full buffer is written by its logger"
        );
    }

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
