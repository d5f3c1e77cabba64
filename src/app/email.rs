//! Users' email addresses and what they make possible: an address is the user's only once a
//! confirmation link sent to it was followed (the old address is told of the change); a
//! forgotten password is reset through a link mailed to the verified address. The answer to
//! "forgot my password" is the same, and takes the same time, whether or not the account or
//! address exists: the work happens after the answer.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use serde_json::json;

use crate::app::account::{token_hash, AccountError, Reauth};
use crate::app::{now_ms, App, ClientInfo};
use crate::auth::Identity;
use crate::config::mail::valid_address;
use crate::config::Secret;
use crate::store::{DeviceSeen, EmailConfirmation, Record, StoreError, User};
use sha2::{Digest, Sha256};

/// Reset requests one client address may make per window.
const FORGOT_PER_CLIENT: u32 = 10;
const FORGOT_CLIENT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Reset mails one account may be sent per window (counted in the store: on every replica).
const FORGOT_PER_ACCOUNT: i64 = 3;
const FORGOT_ACCOUNT_WINDOW: Duration = Duration::from_secs(3600);
/// Reset requests looked up at once; more are answered alike and dropped.
const FORGOT_IN_FLIGHT: usize = 16;
/// New sign-in alerts (mail and webhooks) one user may cause per window.
const ALERTS_PER_USER: u32 = 5;
/// Address changes one user may start per window (each mails a new address).
const CHANGES_PER_USER: u32 = 5;

/// The throttles of the mail a visitor can cause to be sent.
pub struct MailLimits {
    by_client: Cache<String, u32>,
    changes: Cache<i64, u32>,
    alerts: Cache<i64, u32>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Default for MailLimits {
    fn default() -> Self {
        MailLimits {
            by_client: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FORGOT_CLIENT_WINDOW)
                .build(),
            changes: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FORGOT_ACCOUNT_WINDOW)
                .build(),
            alerts: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FORGOT_ACCOUNT_WINDOW)
                .build(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(FORGOT_IN_FLIGHT)),
        }
    }
}

/// Counts one more use of `key` in `cache`; whether it is still within `limit`.
fn within<K>(cache: &Cache<K, u32>, key: K, limit: u32) -> bool
where
    K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
{
    let n = cache
        .entry(key)
        .and_upsert_with(|old| old.map_or(1, |e| e.into_value().saturating_add(1)))
        .into_value();
    n <= limit
}

/// Why an address change was refused.
#[derive(Debug, thiserror::Error)]
pub enum EmailError {
    #[error("mail is not set up on this gateway")]
    NoMail,
    #[error("that is not an email address")]
    BadAddress,
    #[error("that is your address already")]
    Same,
    #[error("too many address changes; try again later")]
    TooMany,
    #[error("{0}")]
    Account(#[from] AccountError),
}

impl From<StoreError> for EmailError {
    fn from(e: StoreError) -> Self {
        EmailError::Account(AccountError::Unavailable(e))
    }
}

/// What a visitor's "forgot my password" did, for the page that answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgot {
    /// Taken (whether or not anything is sent).
    Accepted,
    /// This client asked too often.
    Throttled,
}

/// A device's kind, for a reader and for telling devices apart: the browser and system of a
/// browser (`Firefox on Linux`), or an app's own product name (`Jellyfin Android`).
pub fn device_family(user_agent: &str) -> String {
    let ua = user_agent.trim();
    if ua.is_empty() {
        return "an unnamed client".into();
    }
    let system = [
        ("Android", "Android"),
        ("iPhone", "iOS"),
        ("iPad", "iPadOS"),
        ("Windows", "Windows"),
        ("Mac OS X", "macOS"),
        ("Macintosh", "macOS"),
        ("CrOS", "ChromeOS"),
        ("Linux", "Linux"),
    ]
    .iter()
    .find(|(needle, _)| ua.contains(needle))
    .map(|(_, name)| *name);
    let browser = [
        ("Edg/", "Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("Chrome/", "Chrome"),
        ("Chromium/", "Chromium"),
        ("Safari/", "Safari"),
    ]
    .iter()
    .find(|(needle, _)| ua.contains(needle))
    .map(|(_, name)| *name);
    match (ua.starts_with("Mozilla/"), browser, system) {
        (true, Some(b), Some(s)) => format!("{b} on {s}"),
        (true, Some(b), None) => b.to_string(),
        (true, None, Some(s)) => format!("a browser on {s}"),
        _ => ua
            .split(['/', '('])
            .next()
            .unwrap_or(ua)
            .trim()
            .chars()
            .take(64)
            .collect(),
    }
}

/// The key a client is throttled by: its address, or for IPv6 its /64 (one host often holds a
/// whole /64).
fn client_key(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) if a.to_ipv4_mapped().is_none() => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        _ => ip.to_string(),
    }
}

/// The network of an address: its /24 (IPv4) or /48 (IPv6); the text itself otherwise.
fn network_of(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            let o = a.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(a)) => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
        Err(_) => ip.to_string(),
    }
}

/// What tells a sign-in's device and network apart from others, hashed (the store keeps no
/// user agent or address for this).
pub fn device_fingerprint(user_agent: &str, ip: &str) -> String {
    let text = format!("{}\n{}", device_family(user_agent), network_of(ip));
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// How a session was signed in, in words, from its methods (`amr`).
fn how_signed_in(amr: &[String]) -> &'static str {
    let has = |m: &str| amr.iter().any(|a| a == m);
    if has("media") {
        "a media app (its own sign-in through the gateway)"
    } else if has("hwk") {
        "a passkey"
    } else if has("sso") {
        "single sign-on"
    } else if has("otp") {
        "password and code"
    } else {
        "password"
    }
}

impl App {
    /// Notes a sign-in's device and network; one not seen before for the user mails them a
    /// new sign-in alert with a "this wasn't me" link (when alerts are on and they have a
    /// verified address). The first sign-in on record alerts nobody.
    pub(crate) async fn note_sign_in(&self, user: &User, client: &ClientInfo, amr: &[String]) {
        let fingerprint = device_fingerprint(&client.user_agent, &client.ip);
        // A burst of new devices (an intruder trying user agents) is told a few times, not
        // without end.
        let capped = self
            .mail_limits
            .alerts
            .get(&user.id)
            .is_some_and(|n| n >= ALERTS_PER_USER);
        // The alert (audit entry, mail, webhooks) is written in the transaction that notes a
        // device not seen before, and only then.
        let alert = (!capped).then(|| self.sign_in_alert(user, client, amr));
        let store = match &alert {
            Some(record) => self.store.recording(record.clone()),
            None => Arc::clone(&self.store),
        };
        let seen = match store.note_device(user.id, &fingerprint, now_ms()).await {
            Ok(s) => s,
            Err(e) => {
                self.store_error("outbox", e);
                return;
            }
        };
        if seen != DeviceSeen::New {
            return;
        }
        let Some(alert) = alert else {
            tracing::warn!(user = %user.name, "new sign-in alerts: the hourly cap is reached");
            return;
        };
        within(&self.mail_limits.alerts, user.id, ALERTS_PER_USER);
        super::log_audit(&alert.entry);
        if !alert.outbox.is_empty() {
            self.outbox_wake.notify_one();
        }
    }

    /// The record of a sign-in from a device or network not seen before: its audit entry, the
    /// webhooks that asked for it and, when alerts are on and the user has a verified
    /// address, the mail that tells them.
    fn sign_in_alert(&self, user: &User, client: &ClientInfo, amr: &[String]) -> Record {
        let mut entry = self.audit_entry(
            "new_sign_in",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        entry.user_agent = device_family(&client.user_agent);
        entry.detail = format!("by {}", how_signed_in(amr));
        let mut outbox = self.webhook_messages("new_sign_in", Some(user), &entry);
        let alerts = self
            .config()
            .mail
            .as_ref()
            .is_some_and(|m| m.new_sign_in_alerts);
        if alerts && user.email.is_some() {
            outbox.extend(self.mail_message(
                "new_sign_in",
                Some(user.id),
                None,
                json!({
                    "at_ms": entry.at_ms,
                    "ip": client.ip,
                    "device": entry.user_agent,
                    "how": how_signed_in(amr),
                }),
            ));
        }
        Record { entry, outbox }
    }

    /// The user a "this wasn't me" link belongs to, or why it is not valid.
    pub async fn not_me_link_user(
        &self,
        token: &str,
    ) -> Result<Result<User, crate::store::ResetLinkState>, StoreError> {
        use crate::store::ResetLinkState;
        match self
            .store
            .not_me_link_state(&token_hash(token), now_ms())
            .await?
        {
            ResetLinkState::Valid { user_id } => match self.store.find_user_by_id(user_id).await? {
                Some(u) => Ok(Ok(u)),
                None => Ok(Err(ResetLinkState::Unknown)),
            },
            other => Ok(Err(other)),
        }
    }

    /// Uses a "this wasn't me" link: every device of the user signed out and (for an account
    /// whose password the gateway keeps) the new password set, in one write; audited, and the
    /// user told.
    pub async fn redeem_not_me_link(
        &self,
        token: &str,
        password: Option<(Secret, Secret)>,
        client: &ClientInfo,
    ) -> Result<Result<(), crate::store::ResetLinkState>, AccountError> {
        let user = match self.not_me_link_user(token).await? {
            Ok(u) => u,
            Err(state) => return Ok(Err(state)),
        };
        let hash = match (user.directory_dn.is_some(), password) {
            (true, _) => None,
            (false, Some((new, confirm))) => {
                Some(self.new_password_hash(&user.name, new, confirm).await?)
            }
            (false, None) => {
                return Err(AccountError::Policy(
                    crate::auth::password::PolicyError::TooShort(self.config().password.min_length),
                ))
            }
        };
        match self
            .store
            .redeem_not_me_link(&token_hash(token), hash.as_deref(), now_ms())
            .await?
        {
            Some((_, event)) => {
                self.apply(&[event]);
                let mut e =
                    self.audit_entry("not_me", "success", Some((user.id, &user.name)), client);
                e.detail = if hash.is_some() {
                    "every device signed out, password replaced".into()
                } else {
                    "every device signed out".into()
                };
                self.audit(e).await;
                Ok(Ok(()))
            }
            None => Ok(Err(crate::store::ResetLinkState::Used)),
        }
    }

    /// Whether the gateway can send mail.
    pub fn mail_enabled(&self) -> bool {
        self.mailer.is_some()
    }

    /// A one-time link that makes `address` the user's, stored by its hash.
    pub(crate) async fn email_confirmation_link(
        &self,
        user: &User,
        address: &str,
    ) -> Result<String, StoreError> {
        let config = self.config();
        let token = data_encoding::BASE64URL_NOPAD.encode(&rand::random::<[u8; 32]>());
        let now = now_ms();
        let expires = now + config.auth.reset_link_ttl.as_millis() as i64;
        self.store
            .create_email_confirmation(&token_hash(&token), user.id, address, now, expires)
            .await?;
        Ok(format!(
            "{}/_portcullis/email/confirm/{token}",
            config.server.public_url.trim_end_matches('/')
        ))
    }

    /// Starts a change of the signed-in user's address: confirmed as a sensitive change (the
    /// password, or a passkey), then a confirmation link goes to the new address. Nothing
    /// changes until it is followed.
    pub async fn request_email_change(
        &self,
        identity: &Identity,
        address: &str,
        reauth: Reauth,
        client: &ClientInfo,
    ) -> Result<(), EmailError> {
        if !self.mail_enabled() {
            return Err(EmailError::NoMail);
        }
        let address = address.trim();
        if !valid_address(address) {
            return Err(EmailError::BadAddress);
        }
        let user = self
            .store
            .find_user_by_id(identity.user_id)
            .await?
            .ok_or(AccountError::NoSuchUser)?;
        if user
            .email
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case(address))
        {
            return Err(EmailError::Same);
        }
        self.reauthenticate(identity, reauth, client, "email_change_requested")
            .await?;
        if !within(&self.mail_limits.changes, user.id, CHANGES_PER_USER) {
            return Err(EmailError::TooMany);
        }
        let mut e = self.audit_entry(
            "email_change_requested",
            "success",
            Some((user.id, &user.name)),
            client,
        );
        e.detail = format!("to {address}");
        let mail = self.mail_message(
            "confirm_email",
            Some(user.id),
            Some(address),
            json!({ "address": address, "at_ms": e.at_ms, "ip": client.ip }),
        );
        self.audit_with(e, mail.into_iter().collect()).await;
        Ok(())
    }

    /// Follows a confirmation link: the address becomes the user's; the address it replaces
    /// is told.
    pub async fn confirm_email(
        &self,
        token: &str,
        client: &ClientInfo,
    ) -> Result<EmailConfirmation, StoreError> {
        let hash = token_hash(token);
        // The user and both addresses are read first, so that the change, its audit entry,
        // the mail to the address it replaces and the webhooks are written in one transaction.
        let named = self.store.email_confirmation(&hash).await?;
        let user = match &named {
            Some((id, _)) => self.store.find_user_by_id(*id).await?,
            None => None,
        };
        let (Some((user_id, address)), Some(user)) = (named, user) else {
            return self.store.confirm_email(&hash, now_ms()).await;
        };
        let mut e = self.audit_entry(
            "email_changed",
            "success",
            Some((user_id, &user.name)),
            client,
        );
        e.detail = format!("to {address}");
        let mut more = self.webhook_messages("email_changed", Some(&user), &e);
        if let Some(old) = user
            .email
            .as_deref()
            .filter(|old| !old.eq_ignore_ascii_case(&address))
        {
            more.extend(self.mail_message(
                "email_changed",
                Some(user_id),
                Some(old),
                json!({ "address": address, "at_ms": e.at_ms, "ip": client.ip }),
            ));
        }
        // A link used or expired commits nothing, and so records nothing.
        self.audited_with(e, more, |s| async move {
            s.confirm_email(&hash, now_ms()).await
        })
        .await
    }

    /// "Forgot my password" for `identifier` (a user name or an address). The answer does not
    /// depend on whether anything is sent: the lookup and the mail happen after it. Only users
    /// with a verified address, whose password the gateway keeps, are sent a link.
    pub fn forgot_password(self: &Arc<Self>, identifier: &str, client: &ClientInfo) -> Forgot {
        if !within(
            &self.mail_limits.by_client,
            client_key(&client.ip),
            FORGOT_PER_CLIENT,
        ) {
            return Forgot::Throttled;
        }
        let identifier = crate::auth::canonical_user_name(identifier);
        if identifier.is_empty() || identifier.len() > 254 || !self.mail_enabled() {
            return Forgot::Accepted;
        }
        // A bounded number at once: a flood is answered alike and dropped.
        let Ok(permit) = Arc::clone(&self.mail_limits.in_flight).try_acquire_owned() else {
            tracing::warn!("forgot password: too many requests at once; one dropped");
            return Forgot::Accepted;
        };
        let this = Arc::clone(self);
        let client = client.clone();
        tokio::spawn(async move {
            let outcome = this.send_reset_link(&identifier, &client).await;
            tracing::info!(outcome, "forgot password: request handled");
            drop(permit);
        });
        Forgot::Accepted
    }

    async fn send_reset_link(&self, identifier: &str, client: &ClientInfo) -> &'static str {
        let found = if identifier.contains('@') {
            self.store.find_user_by_email(identifier).await
        } else {
            self.store.find_user(identifier).await
        };
        let user = match found {
            Ok(Some(u)) => u,
            Ok(None) => return "no such account",
            Err(e) => {
                self.store_error("find_user", e);
                return "store unavailable";
            }
        };
        let since = now_ms() - FORGOT_ACCOUNT_WINDOW.as_millis() as i64;
        let recent = match self
            .store
            .count_outbox_since(user.id, "password_reset", since)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                self.store_error("outbox", e);
                return "store unavailable";
            }
        };
        let refusal = if user.email.is_none() {
            Some("no verified address")
        } else if user.directory_dn.is_some() {
            Some("a directory user")
        } else if !user.password_set {
            Some("signs in by single sign-on only")
        } else if user.disabled {
            Some("disabled")
        } else if recent >= FORGOT_PER_ACCOUNT {
            Some("too many requests for this account")
        } else {
            None
        };
        let mut e = self.audit_entry(
            "password_reset_requested",
            if refusal.is_none() {
                "success"
            } else {
                "refused"
            },
            Some((user.id, &user.name)),
            client,
        );
        e.detail = refusal.unwrap_or("link mailed").to_string();
        // The link's mail is written with the audit entry of the request.
        let mail = match refusal {
            Some(_) => None,
            None => self.mail_message(
                "password_reset",
                Some(user.id),
                None,
                json!({ "at_ms": e.at_ms, "ip": client.ip }),
            ),
        };
        self.audit_with(e, mail.into_iter().collect()).await;
        refusal.unwrap_or("queued")
    }
}
