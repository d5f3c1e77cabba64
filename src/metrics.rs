//! Prometheus metrics. Every metric name is defined here, with the `portcullis_` prefix; label
//! values come from closed enums or the operator's route names, never from request data.
//! Per-request counters are resolved to handles once at start, not per request.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::auth::DenyReason;

pub const REQUESTS_TOTAL: &str = "portcullis_requests_total";
pub const REQUEST_DURATION: &str = "portcullis_request_duration_seconds";
pub const LOGINS_TOTAL: &str = "portcullis_logins_total";
pub const REVOCATIONS_TOTAL: &str = "portcullis_revocations_total";
pub const VIEW_REVOKED_SESSIONS: &str = "portcullis_revocation_view_revoked_sessions";
pub const VIEW_USER_CUTOFFS: &str = "portcullis_revocation_view_user_cutoffs";
pub const VIEW_SEQUENCE: &str = "portcullis_revocation_view_sequence";
pub const SYNC_LAST_SUCCESS: &str = "portcullis_sync_last_success_timestamp_seconds";
pub const SYNC_ERRORS_TOTAL: &str = "portcullis_sync_errors_total";
pub const STORE_ERRORS_TOTAL: &str = "portcullis_store_errors_total";
pub const BUILD_INFO: &str = "portcullis_build_info";
pub const SECOND_FACTOR_TOTAL: &str = "portcullis_second_factor_total";
pub const UPSTREAM_DURATION: &str = "portcullis_upstream_duration_seconds";
pub const ACTIVE_SESSIONS: &str = "portcullis_active_sessions";
pub const SYNC_LAG: &str = "portcullis_sync_lag_seconds";
pub const WEBSOCKETS_OPEN: &str = "portcullis_websockets_open";
pub const LOCKOUTS_TOTAL: &str = "portcullis_lockouts_total";
pub const MEDIA_TOKENS_BOUND_TOTAL: &str = "portcullis_media_tokens_bound_total";
pub const MEDIA_LOGOUTS_TOTAL: &str = "portcullis_media_logouts_total";
pub const VIEW_MEDIA_TOKENS: &str = "portcullis_revocation_view_media_tokens";
pub const PLAYBACK_GRANTS: &str = "portcullis_playback_grants_active";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "portcullis_connections_closed_total";
pub const CONNECTIONS_DROPPED_TOTAL: &str = "portcullis_connections_dropped_total";
pub const VIEW_BYTES: &str = "portcullis_revocation_view_bytes";
pub const SYNC_RESYNCS_TOTAL: &str = "portcullis_sync_resyncs_total";
pub const PUSH_CONNECTED: &str = "portcullis_sync_push_connected";
pub const OIDC_LOGINS_TOTAL: &str = "portcullis_oidc_logins_total";
pub const OIDC_BACKCHANNEL_LOGOUTS_TOTAL: &str = "portcullis_oidc_backchannel_logouts_total";
pub const OIDC_LINKS_TOTAL: &str = "portcullis_oidc_links_total";
pub const MEDIA_RESOLUTIONS_TOTAL: &str = "portcullis_media_resolutions_total";
pub const MEDIA_LINKS_TOTAL: &str = "portcullis_media_links_total";
pub const MEDIA_REFUSALS_TOTAL: &str = "portcullis_media_refusals_total";
pub const PASSKEYS_TOTAL: &str = "portcullis_passkeys_total";
pub const RULE_DECISIONS_TOTAL: &str = "portcullis_rule_decisions_total";
pub const CONFIG_RELOADS_TOTAL: &str = "portcullis_config_reloads_total";
pub const CONFIG_LOADED_TIMESTAMP: &str = "portcullis_config_loaded_timestamp_seconds";
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "portcullis_config_last_reload_successful";
pub const CONFIG_RESTART_PENDING: &str = "portcullis_config_restart_pending";
pub const DIRECTORY_OPERATIONS_TOTAL: &str = "portcullis_directory_operations_total";
pub const DIRECTORY_SYNC_CHANGES_TOTAL: &str = "portcullis_directory_sync_changes_total";
pub const DIRECTORY_LAST_SYNC: &str = "portcullis_directory_last_sync_timestamp_seconds";
pub const DIRECTORY_UP: &str = "portcullis_directory_up";
pub const OUTBOX_MESSAGES_TOTAL: &str = "portcullis_outbox_messages_total";
pub const OUTBOX_QUEUED: &str = "portcullis_outbox_queued";
pub const OUTBOX_OLDEST_AGE: &str = "portcullis_outbox_oldest_age_seconds";
pub const ACME_ORDERS_TOTAL: &str = "portcullis_acme_orders_total";

/// Every metric family, for the test that compares them with a fresh gateway's exposition.
pub const ALL_FAMILIES: &[&str] = &[
    REQUESTS_TOTAL,
    REQUEST_DURATION,
    LOGINS_TOTAL,
    REVOCATIONS_TOTAL,
    VIEW_REVOKED_SESSIONS,
    VIEW_USER_CUTOFFS,
    VIEW_SEQUENCE,
    SYNC_LAST_SUCCESS,
    SYNC_ERRORS_TOTAL,
    STORE_ERRORS_TOTAL,
    BUILD_INFO,
    SECOND_FACTOR_TOTAL,
    UPSTREAM_DURATION,
    ACTIVE_SESSIONS,
    SYNC_LAG,
    WEBSOCKETS_OPEN,
    LOCKOUTS_TOTAL,
    MEDIA_TOKENS_BOUND_TOTAL,
    MEDIA_LOGOUTS_TOTAL,
    VIEW_MEDIA_TOKENS,
    PLAYBACK_GRANTS,
    CONNECTIONS_CLOSED_TOTAL,
    CONNECTIONS_DROPPED_TOTAL,
    VIEW_BYTES,
    SYNC_RESYNCS_TOTAL,
    PUSH_CONNECTED,
    OIDC_LOGINS_TOTAL,
    OIDC_BACKCHANNEL_LOGOUTS_TOTAL,
    OIDC_LINKS_TOTAL,
    MEDIA_RESOLUTIONS_TOTAL,
    MEDIA_LINKS_TOTAL,
    MEDIA_REFUSALS_TOTAL,
    PASSKEYS_TOTAL,
    RULE_DECISIONS_TOTAL,
    CONFIG_RELOADS_TOTAL,
    CONFIG_LOADED_TIMESTAMP,
    CONFIG_LAST_RELOAD_SUCCESSFUL,
    CONFIG_RESTART_PENDING,
    UPSTREAM_UP,
    DIRECTORY_OPERATIONS_TOTAL,
    DIRECTORY_SYNC_CHANGES_TOTAL,
    DIRECTORY_LAST_SYNC,
    DIRECTORY_UP,
    OUTBOX_MESSAGES_TOTAL,
    OUTBOX_QUEUED,
    OUTBOX_OLDEST_AGE,
    ACME_ORDERS_TOTAL,
];

/// A label of a labelled family: a closed list of values, or the names of something
/// configured (routes, single sign-on providers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// A label's name and its values, in groups (a family may share a group with another).
    Values(&'static str, &'static [&'static [&'static str]]),
    /// The `provider` label: the configured single sign-on providers' ids.
    Provider,
    /// The `rule` label: the configured access rules' names, and `default` (a route's
    /// `default_policy`).
    Rule,
}

/// The verdicts of the access rules (the `verdict` label of [`RULE_DECISIONS_TOTAL`]).
pub const RULE_VERDICTS: &[&str] = &["allow", "bypass", "deny", "sign_in", "step_up"];

/// The counter families whose every series is exported at zero from the start, with the label
/// values each may carry, so alert rules with `rate()` and dashboards work on a fresh gateway.
/// A value counted anywhere must be listed here (checked where it is counted, in debug builds);
/// the tests compare a fresh gateway's exposition with this list. (`portcullis_requests_total`
/// is per route, from `DenyReason::ALL` and `RejectReason::ALL`; `portcullis_upstream_up` per
/// route once probed.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Logins,
    SecondFactor,
    StoreErrors,
    Revocations,
    MediaTokensBound,
    MediaLogouts,
    ConnectionsDropped,
    ConfigReloads,
    ActiveSessions,
    OidcLogins,
    OidcBackchannel,
    OidcLinks,
    MediaResolutions,
    MediaLinks,
    MediaRefusals,
    Passkeys,
    RuleDecisions,
    DirectoryOperations,
    DirectorySyncChanges,
    Outbox,
    AcmeOrders,
}

/// The results of a gateway login (`LoginError` labels, and success or a step still owed).
const GATEWAY_LOGIN_RESULTS: &[&str] = &[
    "success",
    "pending",
    "invalid_credentials",
    "throttled",
    "locked",
    "disabled",
    "second_factor_required",
    "invalid_code",
    "restart_login",
    "password_reset_required",
    "second_factor_enrollment_required",
    "passkey_required",
    "password_policy",
    "store_unavailable",
    "directory_unavailable",
    "internal_error",
];

/// The outbox's channels (`channel` label of the outbox metrics).
pub const OUTBOX_CHANNELS: &[&str] = &["mail", "webhook"];

/// What the directory sync changed (`portcullis_directory_sync_changes_total{change}`).
pub const DIRECTORY_SYNC_CHANGES: &[&str] = &["disabled", "enabled", "groups", "conflict"];

/// Every [`DenyReason`]'s label, in its order (a unit test keeps the two alike).
const DENY_REASONS: &[&str] = &[
    "no_credentials",
    "malformed_token",
    "wrong_token_type",
    "unknown_key",
    "wrong_algorithm",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "session_revoked",
    "user_signed_out",
    "everyone_signed_out",
    "user_disabled",
    "key_retired",
    "unknown_media_token",
    "gateway_session_required",
    "ambiguous_credentials",
    "unlinked_account",
    "device_not_approved",
    "owner_only",
    "foreign_session",
    "rule_denied",
    "two_factor_required",
];

/// Every [`RejectReason`]'s label, in its order (a unit test keeps the two alike).
const REJECT_REASONS: &[&str] = &[
    "bad_path",
    "headers_too_large",
    "no_route",
    "body_too_large",
    "two_tokens",
    "bad_client_field",
    "blocked_path",
    "view_stale",
    "bad_framing",
    "bad_head",
    "upgrade_refused",
    "rate_limited",
    "slow_body",
    "cross_site_upgrade",
    "upstream_misconfigured",
    "identity_unavailable",
];

/// Results only a media-server login has.
const MEDIA_LOGIN_RESULTS: &[&str] = &[
    "refused_by_policy",
    "invalid_request",
    "not_approved",
    "upstream_unavailable",
    "upstream_refused",
    "unreadable_answer",
    "no_gateway_user",
    "user_mismatch",
];

/// Results only a passkey sign-in has (`PasskeyError` labels).
const PASSKEY_LOGIN_RESULTS: &[&str] = &[
    "expired_ceremony",
    "malformed_response",
    "not_json",
    "body_too_large",
    "wrong_origin",
    "wrong_rp_id",
    "user_not_verified",
    "unknown_credential",
    "possible_clone",
    "bad_signature",
    "refused",
];

/// Store operations that can fail (`portcullis_store_errors_total{operation}`).
const STORE_OPERATIONS: &[&str] = &[
    "accept_totp",
    "append_audit",
    "append_media_note",
    "bind_media_token",
    "clear_failures",
    "count_sessions",
    "create_session",
    "end_idle_media_sessions",
    "find_user",
    "get_oidc_session",
    "media_logout",
    "media_logout_done",
    "outbox",
    "oidc_backchannel",
    "owed_media_logouts",
    "purge",
    "record_failure",
    "record_oidc_session",
    "revoke_session",
    "set_admin",
    "signout_user",
    "sync",
    "touch_sessions",
    "use_recovery_code",
];

/// How a single sign-on login ended, before any token or gateway-login refusal (`SsoError`).
const SSO_RESULTS: &[&str] = &[
    "success",
    "pending",
    "linked",
    "unknown_provider",
    "not_discovered",
    "flow_expired",
    "state_mismatch",
    "provider_denied",
    "provider_error",
    "not_linked",
    "link_conflict",
    "admin_not_auto_linked",
    "not_signed_in",
    "store_unavailable",
];

/// ID-token and logout-token refusals (`oidc::TokenRefusal`).
const TOKEN_REFUSALS: &[&str] = &[
    "malformed",
    "wrong_algorithm",
    "unknown_key",
    "bad_signature",
    "wrong_issuer",
    "wrong_audience",
    "wrong_azp",
    "expired",
    "issued_in_future",
    "not_yet_valid",
    "too_old",
    "wrong_nonce",
    "no_subject",
    "not_logout_token",
    "nonce_in_logout_token",
    "no_sub_or_sid",
    "no_jti",
];

/// Back-channel logout results before any token refusal (`BackchannelError`).
const BACKCHANNEL_RESULTS: &[&str] = &[
    "success",
    "unknown_provider",
    "not_discovered",
    "missing_token",
    "replayed",
    "store_unavailable",
];

impl Family {
    pub const ALL: [Family; 21] = [
        Family::Logins,
        Family::SecondFactor,
        Family::StoreErrors,
        Family::Revocations,
        Family::MediaTokensBound,
        Family::MediaLogouts,
        Family::ConnectionsDropped,
        Family::ConfigReloads,
        Family::ActiveSessions,
        Family::OidcLogins,
        Family::OidcBackchannel,
        Family::OidcLinks,
        Family::MediaResolutions,
        Family::MediaLinks,
        Family::MediaRefusals,
        Family::Passkeys,
        Family::RuleDecisions,
        Family::DirectoryOperations,
        Family::DirectorySyncChanges,
        Family::Outbox,
        Family::AcmeOrders,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Family::Logins => LOGINS_TOTAL,
            Family::SecondFactor => SECOND_FACTOR_TOTAL,
            Family::StoreErrors => STORE_ERRORS_TOTAL,
            Family::Revocations => REVOCATIONS_TOTAL,
            Family::MediaTokensBound => MEDIA_TOKENS_BOUND_TOTAL,
            Family::MediaLogouts => MEDIA_LOGOUTS_TOTAL,
            Family::ConnectionsDropped => CONNECTIONS_DROPPED_TOTAL,
            Family::ConfigReloads => CONFIG_RELOADS_TOTAL,
            Family::ActiveSessions => ACTIVE_SESSIONS,
            Family::OidcLogins => OIDC_LOGINS_TOTAL,
            Family::OidcBackchannel => OIDC_BACKCHANNEL_LOGOUTS_TOTAL,
            Family::OidcLinks => OIDC_LINKS_TOTAL,
            Family::MediaResolutions => MEDIA_RESOLUTIONS_TOTAL,
            Family::MediaLinks => MEDIA_LINKS_TOTAL,
            Family::MediaRefusals => MEDIA_REFUSALS_TOTAL,
            Family::Passkeys => PASSKEYS_TOTAL,
            Family::RuleDecisions => RULE_DECISIONS_TOTAL,
            Family::DirectoryOperations => DIRECTORY_OPERATIONS_TOTAL,
            Family::DirectorySyncChanges => DIRECTORY_SYNC_CHANGES_TOTAL,
            Family::Outbox => OUTBOX_MESSAGES_TOTAL,
            Family::AcmeOrders => ACME_ORDERS_TOTAL,
        }
    }

    /// The family's labels, in the order their values are given.
    pub fn labels(self) -> &'static [Label] {
        use Label::{Provider, Values};
        match self {
            Family::Logins => &[
                Values(
                    "method",
                    &[&[
                        "password",
                        "api",
                        "media_password",
                        "quick_connect",
                        "passkey",
                    ]],
                ),
                Values(
                    "result",
                    &[
                        GATEWAY_LOGIN_RESULTS,
                        MEDIA_LOGIN_RESULTS,
                        PASSKEY_LOGIN_RESULTS,
                    ],
                ),
            ],
            Family::SecondFactor => &[
                Values("method", &[&["totp", "recovery_code", "passkey"]]),
                Values("result", &[&["success", "failure"]]),
            ],
            Family::StoreErrors => &[Values("operation", &[STORE_OPERATIONS])],
            Family::Revocations => &[Values(
                "scope",
                &[&[
                    "session",
                    "user",
                    "everyone",
                    "user_disabled",
                    "user_enabled",
                    "key_retired",
                    "media_bound",
                    "media_note",
                    "media",
                ]],
            )],
            Family::MediaTokensBound => &[Values(
                "source",
                &[&["media_password", "quick_connect", "adopted", "plex"]],
            )],
            Family::MediaLogouts => &[Values(
                "result",
                &[&["done", "gone", "retry", "unreadable"]],
            )],
            Family::ConnectionsDropped => &[Values("reason", &[&["head_timeout", "per_ip_cap"]])],
            Family::ConfigReloads => &[Values(
                "result",
                &[&["applied", "needs_restart", "refused"]],
            )],
            Family::ActiveSessions => &[Values("kind", &[&["web", "api", "media"]])],
            Family::OidcLogins => &[
                Provider,
                Values(
                    "result",
                    &[SSO_RESULTS, TOKEN_REFUSALS, GATEWAY_LOGIN_RESULTS],
                ),
            ],
            Family::OidcBackchannel => &[
                Provider,
                Values("result", &[BACKCHANNEL_RESULTS, TOKEN_REFUSALS]),
            ],
            Family::OidcLinks => &[
                Provider,
                Values("how", &[&["auto", "user", "admin", "created", "unlink"]]),
            ],
            Family::MediaResolutions => &[
                Values("kind", &[&["plex"]]),
                Values(
                    "source",
                    &[&["access_list", "plex_tv", "jwt", "transient", "none"]],
                ),
                Values(
                    "result",
                    &[&[
                        "bound",
                        "unlinked",
                        "device_pending",
                        "disabled",
                        "unknown",
                        "expired",
                        "forged",
                        "ambiguous",
                        "unavailable",
                        "rate_limited",
                    ]],
                ),
            ],
            Family::MediaLinks => &[
                Values("kind", &[&["plex"]]),
                Values(
                    "action",
                    &[&[
                        "admin_link",
                        "user_link",
                        "unlink",
                        "approve",
                        "revoke_device",
                        "revoke_upstream",
                    ]],
                ),
            ],
            Family::MediaRefusals => &[
                Values("kind", &[&["plex"]]),
                Values("reason", &[DENY_REASONS, REJECT_REASONS]),
            ],
            Family::Passkeys => &[Values(
                "event",
                &[&["registered", "removed", "clone_warning"]],
            )],
            Family::RuleDecisions => &[Label::Rule, Values("verdict", &[RULE_VERDICTS])],
            Family::DirectoryOperations => &[
                Values("operation", &[&["service_bind", "user_bind", "search"]]),
                Values("outcome", &[&["ok", "rejected", "error"]]),
            ],
            Family::DirectorySyncChanges => &[Values("change", &[DIRECTORY_SYNC_CHANGES])],
            Family::Outbox => &[
                Values("channel", &[OUTBOX_CHANNELS]),
                Values("result", &[&["sent", "retry", "failed"]]),
            ],
            Family::AcmeOrders => &[Values("result", &[&["issued", "failed"]])],
        }
    }

    /// Every label-value combination of the family, given the configured providers and rules.
    pub fn series(self, providers: &[String], rules: &[String]) -> Vec<Vec<String>> {
        let mut all: Vec<Vec<String>> = vec![Vec::new()];
        for label in self.labels() {
            let mut values: Vec<String> = match label {
                Label::Values(_, groups) => groups
                    .iter()
                    .flat_map(|g| g.iter())
                    .map(|s| s.to_string())
                    .collect(),
                Label::Provider => providers.to_vec(),
                Label::Rule => rules
                    .iter()
                    .cloned()
                    .chain(std::iter::once("default".to_string()))
                    .collect(),
            };
            let mut seen = std::collections::HashSet::new();
            values.retain(|v| seen.insert(v.clone()));
            all = all
                .into_iter()
                .flat_map(|prefix| {
                    values.iter().map(move |v| {
                        let mut s = prefix.clone();
                        s.push(v.clone());
                        s
                    })
                })
                .collect();
        }
        all
    }

    /// Whether `values` are declared for the family (a provider label takes any id).
    pub fn declares(self, values: &[&str]) -> bool {
        let labels = self.labels();
        labels.len() == values.len()
            && labels.iter().zip(values).all(|(l, v)| match l {
                Label::Values(_, groups) => groups.iter().any(|g| g.contains(v)),
                Label::Provider | Label::Rule => true,
            })
    }
}

/// How a reload ended (the `result` label of [`CONFIG_RELOADS_TOTAL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadResult {
    /// Every change was applied.
    Applied,
    /// Applied, except keys that only take effect after a restart.
    NeedsRestart,
    /// The file failed validation (or its certificates could not be loaded): nothing changed.
    Refused,
}

impl ReloadResult {
    pub const ALL: [ReloadResult; 3] = [
        ReloadResult::Applied,
        ReloadResult::NeedsRestart,
        ReloadResult::Refused,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::NeedsRestart => "needs_restart",
            ReloadResult::Refused => "refused",
        }
    }
}
pub const UPSTREAM_UP: &str = "portcullis_upstream_up";
pub const TLS_CERT_EXPIRY: &str = "portcullis_tls_certificate_expiry_seconds";

/// Families exported only once what they tell of is configured (a certificate: TLS on the
/// public listener); the tests check them on a gateway configured so.
pub const CONFIGURED_FAMILIES: &[&str] = &[TLS_CERT_EXPIRY];

/// Reasons a request is refused before authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    BadPath,
    HeadersTooLarge,
    NoRoute,
    BodyTooLarge,
    /// Two different media-server tokens in one request.
    TwoTokens,
    /// A media-server client field (Client, Device, DeviceId, Version) or token that is too
    /// long or holds control characters or path separators.
    BadClientField,
    /// A media-server path refused by configuration (e.g. the first-run wizard).
    BlockedPath,
    /// The revocation view has not synced for `store.max_staleness` and `store.on_stale` is
    /// `deny`: sessions cannot be confirmed.
    ViewStale,
    /// Ambiguous or malformed framing (Content-Length / Transfer-Encoding): smuggling.
    BadFraming,
    /// A malformed request head: bare LF, obs-fold, control bytes, Host, underscored names.
    BadHead,
    /// An `Upgrade: h2c` request.
    UpgradeRefused,
    /// Too many Quick Connect requests from one address, or failed approvals by one user.
    RateLimited,
    /// A body the gateway reads itself did not arrive within `server.body_timeout`.
    SlowBody,
    /// A WebSocket upgrade carried by the session cookie from a page of another origin
    /// (cross-site WebSocket hijacking).
    CrossSiteUpgrade,
    /// A Plex server whose settings let the gateway in without a token (or were never read):
    /// the route serves nobody.
    UpstreamMisconfigured,
    /// A media token never seen that cannot be resolved now (plex.tv unreachable).
    IdentityUnavailable,
}

impl RejectReason {
    pub const ALL: [RejectReason; 16] = [
        RejectReason::BadPath,
        RejectReason::HeadersTooLarge,
        RejectReason::NoRoute,
        RejectReason::BodyTooLarge,
        RejectReason::TwoTokens,
        RejectReason::BadClientField,
        RejectReason::BlockedPath,
        RejectReason::ViewStale,
        RejectReason::BadFraming,
        RejectReason::BadHead,
        RejectReason::UpgradeRefused,
        RejectReason::RateLimited,
        RejectReason::SlowBody,
        RejectReason::CrossSiteUpgrade,
        RejectReason::UpstreamMisconfigured,
        RejectReason::IdentityUnavailable,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::BadPath => "bad_path",
            RejectReason::HeadersTooLarge => "headers_too_large",
            RejectReason::NoRoute => "no_route",
            RejectReason::BodyTooLarge => "body_too_large",
            RejectReason::TwoTokens => "two_tokens",
            RejectReason::BadClientField => "bad_client_field",
            RejectReason::BlockedPath => "blocked_path",
            RejectReason::ViewStale => "view_stale",
            RejectReason::BadFraming => "bad_framing",
            RejectReason::BadHead => "bad_head",
            RejectReason::UpgradeRefused => "upgrade_refused",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::SlowBody => "slow_body",
            RejectReason::CrossSiteUpgrade => "cross_site_upgrade",
            RejectReason::UpstreamMisconfigured => "upstream_misconfigured",
            RejectReason::IdentityUnavailable => "identity_unavailable",
        }
    }
}

/// Pre-resolved counters of one route label.
pub struct RouteCounters {
    pub allowed: IntCounter,
    /// Credential-less requests let through by a playback grant (or, for artwork, a live
    /// session seen at the same address).
    pub granted: IntCounter,
    /// Requests the gateway answered for the media server (the hidden user list) or
    /// performed on the client's behalf (media logins).
    pub media_handled: IntCounter,
    pub public: IntCounter,
    pub gateway_page: IntCounter,
    pub upstream_unavailable: IntCounter,
    pub proxy_error: IntCounter,
    pub refused: RefusalCounters,
    pub duration: Histogram,
    pub upstream_duration: Histogram,
}

/// One pre-resolved counter per refusal reason (a request counts without a label lookup):
/// deny reasons indexed like [`DenyReason::ALL`], reject reasons like [`RejectReason::ALL`].
pub struct RefusalCounters {
    denied: Vec<IntCounter>,
    rejected: Vec<IntCounter>,
}

impl RefusalCounters {
    /// `series(decision, reason)` is the counter of one reason, `decision` `deny` or `reject`.
    fn new(series: impl Fn(&str, &str) -> IntCounter) -> RefusalCounters {
        RefusalCounters {
            denied: DenyReason::ALL
                .iter()
                .map(|r| series("deny", r.as_str()))
                .collect(),
            rejected: RejectReason::ALL
                .iter()
                .map(|r| series("reject", r.as_str()))
                .collect(),
        }
    }

    pub fn denied(&self, r: DenyReason) -> &IntCounter {
        let i = DenyReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        &self.denied[i]
    }

    pub fn rejected(&self, r: RejectReason) -> &IntCounter {
        let i = RejectReason::ALL.iter().position(|x| *x == r).unwrap_or(0);
        &self.rejected[i]
    }
}

/// The metric families that per-route counters are taken from.
struct RouteFamilies {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_duration: HistogramVec,
}

impl RouteFamilies {
    fn counters(&self, name: &str) -> RouteCounters {
        let requests = &self.requests;
        RouteCounters {
            allowed: requests.with_label_values(&[name, "allow", "valid_session"]),
            granted: requests.with_label_values(&[name, "allow", "playback_grant"]),
            media_handled: requests.with_label_values(&[name, "gateway", "media_handled"]),
            public: requests.with_label_values(&[name, "allow", "public_path"]),
            gateway_page: requests.with_label_values(&[name, "gateway", "own_page"]),
            upstream_unavailable: requests.with_label_values(&[
                name,
                "error",
                "upstream_unavailable",
            ]),
            proxy_error: requests.with_label_values(&[name, "error", "proxy_error"]),
            refused: RefusalCounters::new(|decision, reason| {
                requests.with_label_values(&[name, decision, reason])
            }),
            duration: self.duration.with_label_values(&[name]),
            upstream_duration: self.upstream_duration.with_label_values(&[name]),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Indexed like the config's routes (which only grow: a reload retires, never removes).
    routes: ArcSwap<Vec<Arc<RouteCounters>>>,
    /// For requests that matched no route, and the gateway's own pages.
    no_route: Arc<RouteCounters>,
    /// The families per-route counters are made from, for routes a reload adds.
    route_families: RouteFamilies,
    /// Serialises [`Metrics::ensure_routes`].
    routes_grow: Mutex<()>,
    config_reloads: IntCounterVec,
    pub config_loaded: Gauge,
    /// 0 while the file on disk was refused by the last reload (the running config is older).
    pub config_last_reload_ok: IntGauge,
    /// 1 when keys changed in the file that only a restart applies.
    pub config_restart_pending: IntGauge,
    logins: IntCounterVec,
    revocations: IntCounterVec,
    pub view_revoked_sessions: IntGauge,
    pub view_user_cutoffs: IntGauge,
    pub view_sequence: IntGauge,
    pub sync_last_success: Gauge,
    pub sync_errors: IntCounter,
    store_errors: IntCounterVec,
    second_factor: IntCounterVec,
    pub lockouts: IntCounter,
    active_sessions: IntGaugeVec,
    pub sync_lag: Gauge,
    pub websockets_open: IntGauge,
    media_tokens_bound: IntCounterVec,
    media_logouts: IntCounterVec,
    pub view_media_tokens: IntGauge,
    pub playback_grants: IntGauge,
    pub connections_closed: IntCounter,
    /// Client connections the admission watchman shut, by `proxy::admission::Closed`.
    connections_dropped: IntCounterVec,
    pub sync_resyncs: IntCounter,
    pub view_bytes: IntGauge,
    pub push_connected: IntGauge,
    /// Single sign-on callbacks by provider and result (`success`, `pending` or the typed
    /// reason of a refusal: see `app::sso::SsoError::label`).
    oidc_logins: IntCounterVec,
    /// Back-channel logouts by provider and result (`success` or the typed reason).
    oidc_backchannel: IntCounterVec,
    /// Links made and removed, by provider and how (`auto`, `user`, `admin`, `unlink`).
    oidc_links: IntCounterVec,
    /// Media tokens the gateway had not seen, resolved by kind, source and result.
    media_resolutions: IntCounterVec,
    /// Media account links, device approvals and upstream revocations, by kind and action.
    media_links: IntCounterVec,
    media_refusals: IntCounterVec,
    /// The Plex series of `media_refusals` (counted per request).
    plex_refused: RefusalCounters,
    /// Passkeys registered and removed, and clone warnings.
    passkeys: IntCounterVec,
    rule_decisions: IntCounterVec,
    directory_operations: IntCounterVec,
    directory_sync_changes: IntCounterVec,
    /// When the directory sync last read the directory through (0: never).
    pub directory_last_sync: Gauge,
    /// 1 while the directory answers, 0 after an operation failed for want of it.
    pub directory_up: IntGauge,
    outbox_messages: IntCounterVec,
    acme_orders: IntCounterVec,
    outbox_queued: IntGaugeVec,
    outbox_oldest_age: prometheus::GaugeVec,
    /// 1 when the route's upstream answered its last probe (at start, or for `/readyz`).
    pub upstream_up: IntGaugeVec,
    /// Seconds until each served certificate expires, by name.
    tls_expiry: IntGaugeVec,
    tls_expiry_names: Mutex<Vec<String>>,
}

/// Route label for requests answered before a route was chosen, or by the gateway's own pages.
pub const NO_ROUTE_LABEL: &str = "-";

impl Metrics {
    pub fn new(route_names: &[String], store_backend: &str) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(REQUESTS_TOTAL, "Requests by route, decision and reason."),
            &["route", "decision", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(REQUEST_DURATION, "Time from request to end of response.").buckets(
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ],
            ),
            &["route"],
        )?;
        let logins = IntCounterVec::new(
            Opts::new(LOGINS_TOTAL, "Login attempts by method and result."),
            &["method", "result"],
        )?;
        let revocations = IntCounterVec::new(
            Opts::new(
                REVOCATIONS_TOTAL,
                "Revocations committed by this instance, by scope (session, user, everyone, \
                 user_disabled, key_retired; media: a media-server token ended upstream).",
            ),
            &["scope"],
        )?;
        let view_revoked_sessions = IntGauge::new(
            VIEW_REVOKED_SESSIONS,
            "Revoked, unexpired session ids held in the revocation view.",
        )?;
        let view_user_cutoffs = IntGauge::new(
            VIEW_USER_CUTOFFS,
            "Users with a sign-out cutoff in the view.",
        )?;
        let view_sequence = IntGauge::new(
            VIEW_SEQUENCE,
            "Highest revocation event sequence number applied to the view.",
        )?;
        let sync_last_success = Gauge::new(
            SYNC_LAST_SUCCESS,
            "Unix time of the last successful sync of the revocation view.",
        )?;
        let sync_errors = IntCounter::new(SYNC_ERRORS_TOTAL, "Failed revocation view syncs.")?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                STORE_ERRORS_TOTAL,
                "Store operations that failed, by operation.",
            ),
            &["operation"],
        )?;
        let second_factor = IntCounterVec::new(
            Opts::new(
                SECOND_FACTOR_TOTAL,
                "Second-factor checks by method and result.",
            ),
            &["method", "result"],
        )?;
        let lockouts = IntCounter::new(LOCKOUTS_TOTAL, "Accounts locked after repeated failures.")?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                UPSTREAM_DURATION,
                "Time from sending a request upstream to the end of its response.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["route"],
        )?;
        let active_sessions = IntGaugeVec::new(
            Opts::new(
                ACTIVE_SESSIONS,
                "Live sessions in the store by kind (refreshed periodically, not per request).",
            ),
            &["kind"],
        )?;
        let sync_lag = Gauge::new(
            SYNC_LAG,
            "Seconds since the revocation view last synced with the store.",
        )?;
        let websockets_open = IntGauge::new(WEBSOCKETS_OPEN, "WebSocket connections open now.")?;
        let media_tokens_bound = IntCounterVec::new(
            Opts::new(
                MEDIA_TOKENS_BOUND_TOTAL,
                "Media-server tokens bound to gateway users, by how they were minted.",
            ),
            &["source"],
        )?;
        let media_logouts = IntCounterVec::new(
            Opts::new(
                MEDIA_LOGOUTS_TOTAL,
                "Upstream logouts of ended media tokens, by result.",
            ),
            &["result"],
        )?;
        let view_media_tokens = IntGauge::new(
            VIEW_MEDIA_TOKENS,
            "Bound media-server tokens held in the revocation view.",
        )?;
        let playback_grants = IntGauge::new(
            PLAYBACK_GRANTS,
            "Playback grants held now (refreshed periodically).",
        )?;
        let connections_closed = IntCounter::new(
            CONNECTIONS_CLOSED_TOTAL,
            "Open WebSockets and streams closed because their session ended.",
        )?;
        let connections_dropped = IntCounterVec::new(
            Opts::new(
                CONNECTIONS_DROPPED_TOTAL,
                "Client connections shut because no complete request head arrived in time \
                 (head_timeout) or their address held too many (per_ip_cap).",
            ),
            &["reason"],
        )?;
        let sync_resyncs = IntCounter::new(
            SYNC_RESYNCS_TOTAL,
            "Times the revocation view was rebuilt from a store snapshot (a gap in the event log, \
             a re-established push connection, or a failed sync).",
        )?;
        let view_bytes = IntGauge::new(
            VIEW_BYTES,
            "Heap bytes held by the revocation view's tables.",
        )?;
        let push_connected = IntGauge::new(
            PUSH_CONNECTED,
            "1 while the store's push announcements (PostgreSQL LISTEN, SQLite's watch on its \
             file) are connected; 0 when not.",
        )?;
        let oidc_logins = IntCounterVec::new(
            Opts::new(
                OIDC_LOGINS_TOTAL,
                "Single sign-on logins by provider and result (success, pending, or the reason \
                 they were refused).",
            ),
            &["provider", "result"],
        )?;
        let oidc_backchannel = IntCounterVec::new(
            Opts::new(
                OIDC_BACKCHANNEL_LOGOUTS_TOTAL,
                "Back-channel logout requests from providers by provider and result (success, or \
                 the reason they were refused).",
            ),
            &["provider", "result"],
        )?;
        let oidc_links = IntCounterVec::new(
            Opts::new(
                OIDC_LINKS_TOTAL,
                "Links between provider subjects and users made (auto, user, admin, created) or \
                 removed (unlink).",
            ),
            &["provider", "how"],
        )?;
        registry.register(Box::new(oidc_logins.clone()))?;
        registry.register(Box::new(oidc_backchannel.clone()))?;
        registry.register(Box::new(oidc_links.clone()))?;
        let media_resolutions = IntCounterVec::new(
            Opts::new(
                MEDIA_RESOLUTIONS_TOTAL,
                "Media tokens the gateway had not seen before (Plex), resolved by kind, source \
                 (access_list, plex_tv, jwt, transient) and result (bound, or why not).",
            ),
            &["kind", "source", "result"],
        )?;
        let media_links = IntCounterVec::new(
            Opts::new(
                MEDIA_LINKS_TOTAL,
                "Media accounts linked to and unlinked from gateway users, devices approved and \
                 revoked, and upstream revocations, by kind and action.",
            ),
            &["kind", "action"],
        )?;
        let media_refusals = IntCounterVec::new(
            Opts::new(
                MEDIA_REFUSALS_TOTAL,
                "Requests refused on media routes with identity at the gateway (Plex), by kind \
                 and reason (a deny or reject reason of portcullis_requests_total).",
            ),
            &["kind", "reason"],
        )?;
        let plex_refused =
            RefusalCounters::new(|_, reason| media_refusals.with_label_values(&["plex", reason]));
        registry.register(Box::new(media_resolutions.clone()))?;
        registry.register(Box::new(media_links.clone()))?;
        registry.register(Box::new(media_refusals.clone()))?;
        let passkeys = IntCounterVec::new(
            Opts::new(
                PASSKEYS_TOTAL,
                "Passkeys registered and removed, and sign-ins refused because a passkey's \
                 signature counter did not move forward (a possibly copied credential).",
            ),
            &["event"],
        )?;
        registry.register(Box::new(passkeys.clone()))?;
        let rule_decisions = IntCounterVec::new(
            Opts::new(
                RULE_DECISIONS_TOTAL,
                "Requests decided by the access rules, by the rule that matched (`default`: the \
                 route's default_policy) and verdict (allow, bypass, deny, sign_in, step_up).",
            ),
            &["rule", "verdict"],
        )?;
        registry.register(Box::new(rule_decisions.clone()))?;
        let directory_operations = IntCounterVec::new(
            Opts::new(
                DIRECTORY_OPERATIONS_TOTAL,
                "LDAP directory operations by kind (service_bind, user_bind, search) and \
                 outcome (ok; rejected: wrong password or nothing found; error: the directory \
                 could not answer).",
            ),
            &["operation", "outcome"],
        )?;
        registry.register(Box::new(directory_operations.clone()))?;
        let directory_sync_changes = IntCounterVec::new(
            Opts::new(
                DIRECTORY_SYNC_CHANGES_TOTAL,
                "What the directory sync changed: users disabled (gone from the directory or \
                 disabled there) or enabled again, group changes, and names held by a local \
                 account and a directory entry at once (conflict).",
            ),
            &["change"],
        )?;
        registry.register(Box::new(directory_sync_changes.clone()))?;
        let directory_last_sync = Gauge::new(
            DIRECTORY_LAST_SYNC,
            "When the directory sync last read the whole directory (Unix seconds; 0: never, \
             or no directory is configured).",
        )?;
        registry.register(Box::new(directory_last_sync.clone()))?;
        let directory_up = IntGauge::new(
            DIRECTORY_UP,
            "1 while the LDAP directory answers, 0 after an operation failed for want of it \
             (also 0 when no directory is configured).",
        )?;
        registry.register(Box::new(directory_up.clone()))?;
        let outbox_messages = IntCounterVec::new(
            Opts::new(
                OUTBOX_MESSAGES_TOTAL,
                "Attempts to send outbox messages (mail) by channel and result: sent, retry \
                 (failed for now, tried again later) or failed (refused for good, or too old).",
            ),
            &["channel", "result"],
        )?;
        registry.register(Box::new(outbox_messages.clone()))?;
        let acme_orders = IntCounterVec::new(
            Opts::new(
                ACME_ORDERS_TOTAL,
                "Certificate orders to the ACME certificate authority (tls.acme) by result: \
                 issued, or failed (the certificate served keeps serving; see /readyz).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(acme_orders.clone()))?;
        let outbox_queued = IntGaugeVec::new(
            Opts::new(
                OUTBOX_QUEUED,
                "Outbox messages waiting to be sent (neither sent nor given up), by channel.",
            ),
            &["channel"],
        )?;
        registry.register(Box::new(outbox_queued.clone()))?;
        let outbox_oldest_age = prometheus::GaugeVec::new(
            Opts::new(
                OUTBOX_OLDEST_AGE,
                "Age of the oldest outbox message waiting to be sent, by channel (0: none).",
            ),
            &["channel"],
        )?;
        registry.register(Box::new(outbox_oldest_age.clone()))?;
        for channel in OUTBOX_CHANNELS {
            outbox_queued.with_label_values(&[channel]).set(0);
            outbox_oldest_age.with_label_values(&[channel]).set(0.0);
        }
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                UPSTREAM_UP,
                "1 when the route's upstream answered its last probe (at start, and on each \
                 /readyz), 0 when it did not.",
            ),
            &["route"],
        )?;
        registry.register(Box::new(upstream_up.clone()))?;
        let tls_expiry = IntGaugeVec::new(
            Opts::new(
                TLS_CERT_EXPIRY,
                "Seconds until the certificate of the public listener expires, by its name \
                 (negative once expired).",
            ),
            &["name"],
        )?;
        registry.register(Box::new(tls_expiry.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Build information; the value is always 1."),
            &["version", "store"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), store_backend])
            .set(1);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(logins.clone()))?;
        registry.register(Box::new(revocations.clone()))?;
        registry.register(Box::new(view_revoked_sessions.clone()))?;
        registry.register(Box::new(view_user_cutoffs.clone()))?;
        registry.register(Box::new(view_sequence.clone()))?;
        registry.register(Box::new(sync_last_success.clone()))?;
        registry.register(Box::new(sync_errors.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(second_factor.clone()))?;
        registry.register(Box::new(lockouts.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(active_sessions.clone()))?;
        registry.register(Box::new(sync_lag.clone()))?;
        registry.register(Box::new(websockets_open.clone()))?;
        registry.register(Box::new(media_tokens_bound.clone()))?;
        registry.register(Box::new(media_logouts.clone()))?;
        registry.register(Box::new(view_media_tokens.clone()))?;
        registry.register(Box::new(playback_grants.clone()))?;
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(connections_dropped.clone()))?;
        registry.register(Box::new(sync_resyncs.clone()))?;
        registry.register(Box::new(push_connected.clone()))?;
        registry.register(Box::new(view_bytes.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let config_reloads = IntCounterVec::new(
            Opts::new(
                CONFIG_RELOADS_TOTAL,
                "Configuration reloads by result (applied, needs_restart, refused).",
            ),
            &["result"],
        )?;
        let config_loaded = Gauge::new(
            CONFIG_LOADED_TIMESTAMP,
            "When the configuration in force was loaded (start or last applied reload).",
        )?;
        let config_last_reload_ok = IntGauge::new(
            CONFIG_LAST_RELOAD_SUCCESSFUL,
            "Whether the last configuration reload was applied (1) or refused (0).",
        )?;
        config_last_reload_ok.set(1);
        let config_restart_pending = IntGauge::new(
            CONFIG_RESTART_PENDING,
            "Whether keys changed by a reload wait for a restart to take effect.",
        )?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(config_loaded.clone()))?;
        registry.register(Box::new(config_last_reload_ok.clone()))?;
        registry.register(Box::new(config_restart_pending.clone()))?;

        let route_families = RouteFamilies {
            requests,
            duration,
            upstream_duration,
        };
        let routes = route_names
            .iter()
            .map(|name| Arc::new(route_families.counters(name)))
            .collect();
        let metrics = Metrics {
            registry,
            routes: ArcSwap::from_pointee(routes),
            no_route: Arc::new(route_families.counters(NO_ROUTE_LABEL)),
            route_families,
            routes_grow: Mutex::new(()),
            config_reloads,
            config_loaded,
            config_last_reload_ok,
            config_restart_pending,
            logins,
            revocations,
            view_revoked_sessions,
            view_user_cutoffs,
            view_sequence,
            sync_last_success,
            sync_errors,
            store_errors,
            second_factor,
            lockouts,
            active_sessions,
            sync_lag,
            websockets_open,
            media_tokens_bound,
            media_logouts,
            view_media_tokens,
            playback_grants,
            connections_closed,
            connections_dropped,
            sync_resyncs,
            push_connected,
            view_bytes,
            oidc_logins,
            oidc_backchannel,
            oidc_links,
            media_resolutions,
            media_links,
            media_refusals,
            plex_refused,
            passkeys,
            rule_decisions,
            directory_operations,
            directory_sync_changes,
            directory_last_sync,
            directory_up,
            outbox_messages,
            acme_orders,
            outbox_queued,
            outbox_oldest_age,
            upstream_up,
            tls_expiry,
            tls_expiry_names: Mutex::new(Vec::new()),
        };
        metrics.show_at_zero(None, None);
        Ok(metrics)
    }

    /// Makes every declared series of the families exist (at zero): those per provider for
    /// `providers`, those per rule for `rules` (and `default`), the others when both are `None`.
    fn show_at_zero(&self, providers: Option<&[String]>, rules: Option<&[String]>) {
        for family in Family::ALL {
            let labels = family.labels();
            let wanted = if labels.contains(&Label::Provider) {
                providers.is_some()
            } else if labels.contains(&Label::Rule) {
                rules.is_some()
            } else {
                providers.is_none() && rules.is_none()
            };
            if !wanted {
                continue;
            }
            for series in family.series(providers.unwrap_or(&[]), rules.unwrap_or(&[])) {
                let values: Vec<&str> = series.iter().map(String::as_str).collect();
                match family {
                    Family::ActiveSessions => {
                        self.active_sessions.with_label_values(&values);
                    }
                    _ => {
                        self.counter(family, &values);
                    }
                }
            }
        }
    }

    /// Shows every provider's series at zero from the start.
    pub fn register_oidc_providers(&self, ids: &[String]) {
        if !ids.is_empty() {
            self.show_at_zero(Some(ids), None);
        }
    }

    /// Shows every access rule's series (and `default`'s) at zero, at start and after a reload.
    pub fn register_rules(&self, names: &[String]) {
        self.show_at_zero(None, Some(names));
    }

    /// Counts directory operations by (operation, outcome), for the directory client (which
    /// sits below the metrics).
    pub fn directory_counter(&self) -> impl Fn(&str, &str) + Send + Sync + 'static {
        let vec = self.directory_operations.clone();
        move |operation, outcome| {
            debug_assert!(
                Family::DirectoryOperations.declares(&[operation, outcome]),
                "{operation} {outcome}"
            );
            vec.with_label_values(&[operation, outcome]).inc();
        }
    }

    /// Records each served certificate's name and seconds to its expiry: exactly these series
    /// (a certificate no longer served, or renamed, leaves).
    pub fn set_tls_expiries(&self, certificates: &[(String, i64)]) {
        let mut last = self
            .tls_expiry_names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let names: Vec<String> = certificates.iter().map(|(n, _)| n.clone()).collect();
        if *last != names {
            self.tls_expiry.reset();
            *last = names;
        }
        for (name, seconds) in certificates {
            self.tls_expiry.with_label_values(&[name]).set(*seconds);
        }
    }

    /// The gauge of messages waiting in the outbox's `channel`.
    pub fn outbox_queued(&self, channel: &str) -> IntGauge {
        self.outbox_queued.with_label_values(&[channel])
    }

    /// The gauge of the age of the oldest message waiting in the outbox's `channel`.
    pub fn outbox_oldest_age(&self, channel: &str) -> Gauge {
        self.outbox_oldest_age.with_label_values(&[channel])
    }

    /// The gauge of live sessions of `kind` (`web`, `api`, `media`).
    pub fn active_sessions(&self, kind: &str) -> IntGauge {
        debug_assert!(Family::ActiveSessions.declares(&[kind]), "kind {kind}");
        self.active_sessions.with_label_values(&[kind])
    }

    /// The counter of `family` with label `values`. A value the family does not declare would
    /// appear only after its first increment: a bug, caught here in debug builds (the tests).
    pub fn counter(&self, family: Family, values: &[&str]) -> IntCounter {
        debug_assert!(
            family.declares(values),
            "{} does not declare {values:?}",
            family.name()
        );
        let vec = match family {
            Family::Logins => &self.logins,
            Family::SecondFactor => &self.second_factor,
            Family::StoreErrors => &self.store_errors,
            Family::Revocations => &self.revocations,
            Family::MediaTokensBound => &self.media_tokens_bound,
            Family::MediaLogouts => &self.media_logouts,
            Family::ConnectionsDropped => &self.connections_dropped,
            Family::ConfigReloads => &self.config_reloads,
            Family::OidcLogins => &self.oidc_logins,
            Family::OidcBackchannel => &self.oidc_backchannel,
            Family::OidcLinks => &self.oidc_links,
            Family::MediaResolutions => &self.media_resolutions,
            Family::MediaLinks => &self.media_links,
            Family::MediaRefusals => &self.media_refusals,
            Family::Passkeys => &self.passkeys,
            Family::RuleDecisions => &self.rule_decisions,
            Family::DirectoryOperations => &self.directory_operations,
            Family::DirectorySyncChanges => &self.directory_sync_changes,
            Family::Outbox => &self.outbox_messages,
            Family::AcmeOrders => &self.acme_orders,
            Family::ActiveSessions => unreachable!("{} is a gauge", family.name()),
        };
        vec.with_label_values(values)
    }

    /// The counters of requests a plex route refused, by reason.
    pub fn plex_refused(&self) -> &RefusalCounters {
        &self.plex_refused
    }

    /// Counters of route `index`, or of the no-route label when `None`.
    pub fn route(&self, index: Option<usize>) -> Arc<RouteCounters> {
        index
            .and_then(|i| self.routes.load().get(i).cloned())
            .unwrap_or_else(|| self.no_route.clone())
    }

    /// Makes counters for routes past those known (`names` in route order: a reload only
    /// appends routes), so a new route counts from its first request.
    pub fn ensure_routes(&self, names: &[&str]) {
        let _one_at_a_time = self
            .routes_grow
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.routes.load_full();
        if names.len() <= current.len() {
            return;
        }
        let mut grown: Vec<Arc<RouteCounters>> = current.as_ref().clone();
        for name in &names[current.len()..] {
            grown.push(Arc::new(self.route_families.counters(name)));
        }
        self.routes.store(Arc::new(grown));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_with_labels() {
        let m = Metrics::new(&["media".to_string()], "sqlite").unwrap();
        m.route(Some(0)).refused.denied(DenyReason::Expired).inc();
        m.route(None).refused.rejected(RejectReason::BadPath).inc();
        let text = m.render();
        assert!(text.contains(
            r#"portcullis_requests_total{decision="deny",reason="expired",route="media"} 1"#
        ));
        assert!(text.contains(
            r#"portcullis_requests_total{decision="reject",reason="bad_path",route="-"} 1"#
        ));
        assert!(text.contains(r#"portcullis_build_info{store="sqlite""#));
    }

    #[test]
    fn the_declared_refusal_reasons_are_the_enums_labels() {
        let deny: Vec<&str> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
        let reject: Vec<&str> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(deny, DENY_REASONS);
        assert_eq!(reject, REJECT_REASONS);
        let m = Metrics::new(&[], "sqlite").unwrap();
        m.plex_refused().denied(DenyReason::UnlinkedAccount).inc();
        m.plex_refused().rejected(RejectReason::TwoTokens).inc();
        let text = m.render();
        for series in [
            r#"portcullis_media_refusals_total{kind="plex",reason="unlinked_account"} 1"#,
            r#"portcullis_media_refusals_total{kind="plex",reason="two_tokens"} 1"#,
            r#"portcullis_media_refusals_total{kind="plex",reason="owner_only"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }
}
