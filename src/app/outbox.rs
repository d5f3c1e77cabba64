//! The outbox: what the gateway has to tell users (security notices, reset links, address
//! confirmations, new sign-ins) is written to the store — a notice in the same transaction as
//! the audit entry of its event — and sent by a worker. The worker takes a lease on a few due
//! messages (so with several replicas one sends each), renders each (links with one-time tokens
//! are made at this moment), sends it, and records the outcome; a failure is tried again with
//! growing delays, a refusal by the server is final. An SMTP server that is down delays mail and
//! nothing else: no request waits for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::app::{now_ms, App};
use crate::metrics::Family;
use crate::store::{AuditEntry, NewOutbox, OutboxMessage, OutboxOutcome, User};

/// The mail channel of the outbox.
pub const MAIL: &str = "mail";
/// The webhook channel of the outbox (`address` names the webhook).
pub const WEBHOOK: &str = "webhook";
/// How many due messages one pass takes.
const BATCH: i64 = 5;
/// How often the worker looks for due messages when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);
/// A message older than this is given up (and counted as failed).
const GIVE_UP_AFTER_MS: i64 = 3 * 24 * 3600 * 1000;
/// The longest wait between two attempts.
const MAX_RETRY_DELAY_MS: i64 = 3600 * 1000;

/// The notice an audited event sends to the user it is about, if any.
pub fn notice_kind(event: &str, outcome: &str) -> Option<&'static str> {
    if outcome != "success" {
        return None;
    }
    Some(match event {
        "password_change" | "reset_link_used" => "password_changed",
        "2fa_enroll" => "two_factor_enabled",
        "2fa_disable" => "two_factor_disabled",
        "passkey_add" => "passkey_added",
        "passkey_remove" => "passkey_removed",
        "signout_all_devices" => "signed_out_everywhere",
        "admin_disable"
        | "admin_enable"
        | "admin_unlock"
        | "admin_require_reset"
        | "reset_link_issued"
        | "passkey_link_issued"
        | "admin_require_passkey"
        | "admin_passkey_optional"
        | "admin_signout"
        | "admin_group_add"
        | "admin_group_remove"
        | "require_reset"
        | "unlock" => "account_changed_by_admin",
        _ => return None,
    })
}

/// The mail message that tells `user` of an audited event, when they have a verified address.
pub fn notice_for(entry: &AuditEntry, user: Option<&User>) -> Option<NewOutbox> {
    let kind = notice_kind(&entry.event, &entry.outcome)?;
    let user = user.filter(|u| u.email.is_some())?;
    Some(NewOutbox {
        channel: MAIL.to_string(),
        kind: kind.to_string(),
        user_id: Some(user.id),
        address: None,
        params: json!({
            "at_ms": entry.at_ms,
            "ip": entry.ip,
            "device": entry.user_agent,
            "detail": notice_detail(&entry.event, &entry.detail),
        })
        .to_string(),
    })
}

/// What a notice says happened, in words for its reader.
fn notice_detail(event: &str, detail: &str) -> String {
    let what = match event {
        "admin_disable" => "your account was disabled",
        "admin_enable" => "your account was enabled",
        "admin_unlock" | "unlock" => "your account was unlocked",
        "admin_require_reset" | "require_reset" => {
            "you must choose a new password at your next sign-in"
        }
        "reset_link_issued" => "a password reset link was made for you",
        "passkey_link_issued" => "a link to register a passkey was made for you",
        "admin_require_passkey" => "you must sign in with a passkey from now on",
        "admin_passkey_optional" => "you may sign in with your password again",
        "admin_signout" => "every device was signed out",
        "admin_group_add" | "admin_group_remove" => "your groups were changed",
        "signout_all_devices" => "you chose \"Sign out of all devices\"",
        _ => "",
    };
    match (what.is_empty(), detail.is_empty()) {
        (true, _) => detail.to_string(),
        (false, true) => what.to_string(),
        (false, false) => format!("{what} ({detail})"),
    }
}

/// The webhook deliveries of an event about `user`: one per configured webhook that asked for
/// the event.
pub fn webhook_messages(
    hooks: &[crate::config::webhook::WebhookConfig],
    event: &str,
    user: Option<&User>,
    entry: &AuditEntry,
) -> Vec<NewOutbox> {
    let params = json!({
        "at_ms": entry.at_ms,
        "user": user.map(|u| u.name.clone()),
        "ip": entry.ip,
        "device": entry.user_agent,
        "detail": notice_detail(&entry.event, &entry.detail),
    })
    .to_string();
    hooks
        .iter()
        .filter(|h| h.events.iter().any(|e| e == event))
        .map(|h| NewOutbox {
            channel: WEBHOOK.to_string(),
            kind: event.to_string(),
            user_id: user.map(|u| u.id),
            address: Some(h.name.clone()),
            params: params.clone(),
        })
        .collect()
}

/// Milliseconds to wait before the attempt after `attempts` failed ones: `initial`, doubled each
/// time up to an hour, with a fifth of jitter either way.
pub fn retry_delay_ms(initial: Duration, attempts: i64) -> i64 {
    let base = (initial.as_millis() as i64)
        .saturating_mul(1 << attempts.clamp(0, 20))
        .min(MAX_RETRY_DELAY_MS);
    let jitter = base / 5;
    base - jitter + (rand::random::<u64>() % (2 * jitter as u64 + 1)) as i64
}

/// A time for a reader: `2026-12-06 05:31 UTC`.
fn when(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_default()
}

/// A lifetime for a reader: `1 hour`, `30 minutes`.
fn lifetime(d: Duration) -> String {
    let mins = d.as_secs() / 60;
    match mins {
        0 => format!("{} seconds", d.as_secs()),
        1 => "1 minute".into(),
        m if m % 60 == 0 && m / 60 == 1 => "1 hour".into(),
        m if m % 60 == 0 => format!("{} hours", m / 60),
        m => format!("{m} minutes"),
    }
}

impl App {
    /// The webhook deliveries of an event about `user`.
    pub(crate) fn webhook_messages(
        &self,
        event: &str,
        user: Option<&User>,
        entry: &AuditEntry,
    ) -> Vec<NewOutbox> {
        webhook_messages(&self.config().webhooks, event, user, entry)
    }

    /// A mail message for the outbox; `None` when mail is not configured.
    pub(crate) fn mail_message(
        &self,
        kind: &str,
        user_id: Option<i64>,
        address: Option<&str>,
        params: Value,
    ) -> Option<NewOutbox> {
        self.mailer.as_ref()?;
        Some(NewOutbox {
            channel: MAIL.to_string(),
            kind: kind.to_string(),
            user_id,
            address: address.map(str::to_string),
            params: params.to_string(),
        })
    }

    /// The outbox worker: every second, or at once when woken, sends what is due.
    pub async fn run_outbox(self: Arc<Self>) {
        let owner = format!(
            "{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        );
        loop {
            let busy = self.outbox_pass(&owner).await;
            self.refresh_outbox_metrics().await;
            if !busy {
                let _ = tokio::time::timeout(POLL, self.outbox_wake.notified()).await;
            }
        }
    }

    /// One pass: takes due messages and sends them. Whether it found any.
    pub async fn outbox_pass(&self, owner: &str) -> bool {
        let config = self.config();
        let (timeout, retry_initial) = match &config.mail {
            Some(m) => (m.timeout, m.retry_initial),
            None => (
                crate::config::mail::DEFAULT_TIMEOUT,
                crate::config::mail::DEFAULT_RETRY_INITIAL,
            ),
        };
        // Each message may take two timeouts (mail) or a webhook's own; the lease covers the
        // batch with room to spare, and the pass stops early rather than outlive it.
        let per_message_ms = (timeout.as_millis() as i64 * 2).max(20_000);
        let lease_ms = per_message_ms * BATCH + 30_000;
        let deadline = std::time::Instant::now()
            + Duration::from_millis((lease_ms - per_message_ms - 10_000).max(0) as u64);
        let claimed = match self
            .store
            .claim_outbox(owner, now_ms(), lease_ms, BATCH)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                self.store_error("outbox", e);
                return false;
            }
        };
        for m in &claimed {
            if std::time::Instant::now() > deadline {
                // The rest go back when the lease runs out.
                break;
            }
            let outcome = match m.channel.as_str() {
                WEBHOOK => self.deliver_webhook(m, retry_initial).await,
                _ => self.deliver(m, retry_initial).await,
            };
            let label = match &outcome {
                OutboxOutcome::Sent => "sent",
                OutboxOutcome::Retry { error, .. } => {
                    tracing::warn!(id = m.id, channel = %m.channel, kind = %m.kind, error = %error, "outbox: will try again");
                    "retry"
                }
                OutboxOutcome::Failed { error } => {
                    tracing::warn!(id = m.id, channel = %m.channel, kind = %m.kind, error = %error, "outbox: given up");
                    "failed"
                }
            };
            self.metrics
                .counter(Family::Outbox, &[m.channel.as_str(), label])
                .inc();
            if let Err(e) = self
                .store
                .finish_outbox(m.id, owner, &outcome, now_ms())
                .await
            {
                self.store_error("outbox", e);
            }
        }
        !claimed.is_empty()
    }

    /// Delivers one webhook message: the event as JSON, signed.
    async fn deliver_webhook(&self, m: &OutboxMessage, retry_initial: Duration) -> OutboxOutcome {
        let Some(hooks) = self.webhooks.as_ref() else {
            return OutboxOutcome::Failed {
                error: "no webhooks are configured".into(),
            };
        };
        let now = now_ms();
        if now - m.created_ms > GIVE_UP_AFTER_MS {
            return OutboxOutcome::Failed {
                error: "not delivered within three days".into(),
            };
        }
        let params: Value = serde_json::from_str(&m.params).unwrap_or(Value::Null);
        let at = params["at_ms"].as_i64().unwrap_or(m.created_ms);
        let body = json!({
            "id": m.id,
            "event": m.kind,
            "at": time::OffsetDateTime::from_unix_timestamp(at / 1000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()),
            "user": params["user"],
            "ip": params["ip"],
            "device": params["device"],
            "detail": params["detail"],
        })
        .to_string();
        let name = m.address.as_deref().unwrap_or_default();
        match hooks
            .send(name, m.id, &m.kind, body.as_bytes(), now / 1000)
            .await
        {
            Ok(()) => OutboxOutcome::Sent,
            Err(crate::mail::SendError::Permanent(e)) => OutboxOutcome::Failed { error: e },
            Err(crate::mail::SendError::Transient(e)) => OutboxOutcome::Retry {
                at_ms: now + retry_delay_ms(retry_initial, m.attempts),
                error: e,
            },
        }
    }

    /// Renders and sends one message.
    async fn deliver(&self, m: &OutboxMessage, retry_initial: Duration) -> OutboxOutcome {
        let Some(mailer) = self.mailer.as_ref() else {
            return OutboxOutcome::Failed {
                error: "mail is not configured".into(),
            };
        };
        let now = now_ms();
        if now - m.created_ms > GIVE_UP_AFTER_MS {
            return OutboxOutcome::Failed {
                error: "not sent within three days".into(),
            };
        }
        let user = match m.user_id {
            Some(id) => match self.store.find_user_by_id(id).await {
                Ok(u) => u,
                Err(e) => {
                    return OutboxOutcome::Retry {
                        at_ms: now + retry_delay_ms(retry_initial, m.attempts),
                        error: e.to_string(),
                    }
                }
            },
            None => None,
        };
        // A reset link queued while the server was down goes out only if the user may still
        // have one.
        if m.kind == "password_reset"
            && user
                .as_ref()
                .is_none_or(|u| u.disabled || u.directory_dn.is_some() || !u.password_set)
        {
            return OutboxOutcome::Failed {
                error: "the user may no longer reset a password here".into(),
            };
        }
        let Some(to) = m
            .address
            .clone()
            .or_else(|| user.as_ref().and_then(|u| u.email.clone()))
        else {
            return OutboxOutcome::Failed {
                error: "the user has no verified address".into(),
            };
        };
        let params: Value = serde_json::from_str(&m.params).unwrap_or(Value::Null);
        let vars = match self.mail_vars(m, user.as_ref(), &params).await {
            Ok(v) => v,
            Err(e) => {
                return OutboxOutcome::Retry {
                    at_ms: now + retry_delay_ms(retry_initial, m.attempts),
                    error: e,
                }
            }
        };
        let rendered = match mailer.render(&m.kind, &vars) {
            Ok(r) => r,
            Err(e) => return OutboxOutcome::Failed { error: e },
        };
        // The SMTP client bounds only its connection: the whole conversation gets two timeouts.
        let limit = self
            .config()
            .mail
            .as_ref()
            .map_or(crate::config::mail::DEFAULT_TIMEOUT, |m| m.timeout)
            * 2;
        let sent = tokio::time::timeout(limit, mailer.send(&to, &rendered))
            .await
            .unwrap_or_else(|_| {
                Err(crate::mail::SendError::Transient(format!(
                    "the SMTP server did not finish within {limit:?}"
                )))
            });
        match sent {
            Ok(()) => OutboxOutcome::Sent,
            Err(crate::mail::SendError::Permanent(e)) => OutboxOutcome::Failed { error: e },
            Err(crate::mail::SendError::Transient(e)) => OutboxOutcome::Retry {
                at_ms: now + retry_delay_ms(retry_initial, m.attempts),
                error: e,
            },
        }
    }

    /// What a message's template may say: its recipient, the event's time, address, device
    /// and detail, the gateway's pages, and the one-time link it carries (made now).
    async fn mail_vars(
        &self,
        m: &OutboxMessage,
        user: Option<&User>,
        params: &Value,
    ) -> Result<BTreeMap<&'static str, String>, String> {
        let config = self.config();
        let base = config.server.public_url.trim_end_matches('/').to_string();
        let text = |k: &str| params[k].as_str().unwrap_or_default().to_string();
        let mut vars = BTreeMap::new();
        vars.insert("gateway", base.clone());
        vars.insert("login", format!("{base}/_portcullis/login"));
        vars.insert("account", format!("{base}/_portcullis/account"));
        vars.insert("ttl", lifetime(config.auth.reset_link_ttl));
        vars.insert(
            "time",
            when(params["at_ms"].as_i64().unwrap_or(m.created_ms)),
        );
        vars.insert("ip", text("ip"));
        vars.insert("device", text("device"));
        vars.insert("detail", text("detail"));
        vars.insert("how", text("how"));
        vars.insert("address", text("address"));
        if let Some(u) = user {
            vars.insert("user", u.name.clone());
        }
        let link = match (m.kind.as_str(), user) {
            ("password_reset", Some(u)) => Some(
                crate::app::account::create_link(
                    &self.store,
                    &config,
                    u,
                    crate::app::account::LinkPurpose::Password,
                )
                .await
                .map_err(|e| e.to_string())?,
            ),
            ("confirm_email", Some(u)) => Some(
                self.email_confirmation_link(u, m.address.as_deref().unwrap_or_default())
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            ("new_sign_in", Some(u)) => {
                let link = crate::app::account::create_link(
                    &self.store,
                    &config,
                    u,
                    crate::app::account::LinkPurpose::NotMe,
                )
                .await
                .map_err(|e| e.to_string())?;
                vars.insert("not_me_link", link);
                None
            }
            _ => None,
        };
        if let Some(link) = link {
            vars.insert("link", link);
        }
        Ok(vars)
    }

    /// Keeps the outbox gauges current.
    async fn refresh_outbox_metrics(&self) {
        for channel in [MAIL, WEBHOOK] {
            if let Ok(stats) = self.store.outbox_stats(channel).await {
                self.metrics.outbox_queued(channel).set(stats.queued);
                let age = stats
                    .oldest_created_ms
                    .map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
                self.metrics.outbox_oldest_age(channel).set(age);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_from_the_initial_one_up_to_an_hour_with_jitter() {
        let initial = Duration::from_secs(10);
        for (attempts, base) in [(0, 10_000), (1, 20_000), (3, 80_000), (30, 3_600_000)] {
            for _ in 0..50 {
                let d = retry_delay_ms(initial, attempts);
                assert!(
                    d >= base - base / 5 && d <= base + base / 5,
                    "{attempts}: {d}"
                );
            }
        }
    }

    #[test]
    fn notices_go_only_to_users_with_a_verified_address_and_only_for_successes() {
        let mut user = User {
            id: 7,
            name: "alice".into(),
            ..User::default()
        };
        let entry = AuditEntry {
            at_ms: 1,
            event: "password_change".into(),
            outcome: "success".into(),
            ip: "192.0.2.1".into(),
            ..AuditEntry::default()
        };
        assert_eq!(notice_for(&entry, Some(&user)), None, "no address");
        user.email = Some("alice@example.org".into());
        let n = notice_for(&entry, Some(&user)).unwrap();
        assert_eq!((n.kind.as_str(), n.user_id), ("password_changed", Some(7)));
        let failed = AuditEntry {
            outcome: "failure".into(),
            ..entry.clone()
        };
        assert_eq!(notice_for(&failed, Some(&user)), None);
        let login = AuditEntry {
            event: "login".into(),
            ..entry
        };
        assert_eq!(notice_for(&login, Some(&user)), None);
    }

    #[test]
    fn lifetimes_and_times_read_well() {
        assert_eq!(lifetime(Duration::from_secs(3600)), "1 hour");
        assert_eq!(lifetime(Duration::from_secs(7200)), "2 hours");
        assert_eq!(lifetime(Duration::from_secs(900)), "15 minutes");
        assert_eq!(when(0), "1970-01-01 00:00 UTC");
    }
}
