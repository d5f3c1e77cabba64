//! Users from the LDAP directory (`[directory]`): their sign-in (a bind as the user, never a
//! password kept here), their local record (made at the first sign-in, kept for sessions, TOTP,
//! passkeys and the audit), and the sync that brings the directory's removals, disabled
//! accounts and group changes to every session and media token: a user the directory no longer
//! lets in is disabled here (every token ends, on every replica, through the store's events),
//! and their groups, which the access rules read, follow the directory's.
//!
//! A name lives in one place only: a local account's name is never looked up in the directory,
//! and a directory entry with the name of a local account is refused (reported by the sync;
//! `portcullis user add`, the admin page and single sign-on refuse a name the directory
//! holds). A record belongs to the entry it was made for (its stable id, else its DN): another
//! entry that gets the name later is refused, never handed the record.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::app::{now_ms, App, ClientInfo, LoginError};
use crate::auth::canonical_user_name;
use crate::config::Secret;
use crate::directory::{listing_key, Authenticated, Directory, DirectoryError, DirectoryUser};
use crate::metrics::Family;
use crate::store::{StoreError, User};

/// Whether a user is a local account (a password kept here). A directory user has a DN, or,
/// for the moment between its record's making and the DN's writing, no password at all.
fn is_local_account(user: &User) -> bool {
    user.directory_dn.is_none() && !user.password_hash.is_empty()
}

/// What the directory sync saw last, for `/readyz`.
#[derive(Debug, Default)]
pub struct DirectoryStatus {
    /// The last failure to reach the directory, cleared by the next success.
    last_error: Mutex<Option<String>>,
    /// When the sync last read the directory through (ms; 0: not yet).
    pub last_sync_ms: std::sync::atomic::AtomicI64,
    /// Names refused to the directory (a local account's, or another entry's), reported once.
    conflicts_reported: Mutex<HashSet<String>>,
}

impl DirectoryStatus {
    fn set_error(&self, e: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = e;
    }

    pub fn error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Where a password is checked: local accounts by their hash, directory users by a bind.
pub(crate) enum PasswordCheck {
    /// The password is right; the user as they now stand (made or brought up to date from the
    /// directory for a directory user).
    Right(User),
    /// Wrong, or no such user: the local record, if any, for the account's lock.
    Wrong(Option<User>),
}

impl App {
    /// The directory client, when `[directory]` is configured.
    pub fn directory(&self) -> Option<&Directory> {
        self.directory.as_deref()
    }

    /// Whether a sign-in with this name goes to the directory: a directory is configured and the
    /// name is not a local account's.
    pub(crate) fn signs_in_through_directory(&self, local: Option<&User>) -> bool {
        self.directory.is_some() && local.is_none_or(|u| !is_local_account(u))
    }

    /// Notes how a directory operation ended, for `portcullis_directory_up` and `/readyz`.
    fn directory_answered(&self, result: Result<(), &DirectoryError>) {
        match result {
            Err(DirectoryError::Unavailable(why)) => {
                self.metrics.directory_up.set(0);
                self.directory_status.set_error(Some(why.clone()));
                tracing::warn!(error = %why, "directory unavailable");
            }
            Ok(()) | Err(DirectoryError::Ambiguous(_)) => self.metrics.directory_up.set(1),
        }
    }

    /// Checks the password of a sign-in through the directory (see
    /// [`App::signs_in_through_directory`]). The directory being down is an error of its own:
    /// nobody is let in on an old answer, and no password is kept for that.
    pub(crate) async fn directory_password(
        &self,
        name: &str,
        local: Option<User>,
        password: &Secret,
        client: &ClientInfo,
    ) -> Result<PasswordCheck, LoginError> {
        let Some(directory) = self.directory() else {
            return Ok(PasswordCheck::Wrong(local));
        };
        // The same work as a local password check, so that an unknown name does not answer
        // faster than a known one.
        self.hasher.verify(None, password.clone()).await;
        let read_ms = now_ms();
        let outcome = directory.authenticate(name, password).await;
        self.directory_answered(outcome.as_ref().map(|_| ()));
        let adopt = |found: DirectoryUser, local: Option<User>| async move {
            self.adopt_directory_user(local, &found, read_ms, client)
                .await
                .map_err(|e| LoginError::Unavailable(self.store_error("find_user", e)))
        };
        match outcome {
            Err(DirectoryError::Unavailable(_)) => Err(LoginError::DirectoryUnavailable),
            Err(DirectoryError::Ambiguous(n)) => {
                tracing::warn!(name = %n, "directory: the name matches several entries; refused");
                Ok(PasswordCheck::Wrong(local))
            }
            // Gone, disabled there, or outside the user filter: the sync disables the record
            // (a sign-in by anyone must not end someone's sessions).
            Ok(Authenticated::UnknownUser) => Ok(PasswordCheck::Wrong(local)),
            // A wrong password counts against the account's lock, so the record is made for it.
            Ok(Authenticated::WrongPassword(found)) => {
                Ok(PasswordCheck::Wrong(adopt(found, local).await?))
            }
            Ok(Authenticated::Yes(found)) => Ok(match adopt(found, local).await? {
                Some(user) => PasswordCheck::Right(user),
                None => PasswordCheck::Wrong(None),
            }),
        }
    }

    /// The record of a directory user found by name, made if they have none yet (for a media
    /// server's sign-in, whose password the media server checks). `None` when the directory
    /// lets nobody of that name in.
    pub(crate) async fn directory_lookup(
        &self,
        name: &str,
        client: &ClientInfo,
    ) -> Result<Option<User>, DirectoryError> {
        let Some(directory) = self.directory() else {
            return Ok(None);
        };
        let read_ms = now_ms();
        let found = directory.find(name).await;
        self.directory_answered(found.as_ref().map(|_| ()));
        let found = match found {
            Ok(Some(f)) => f,
            Ok(None) | Err(DirectoryError::Ambiguous(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        match self
            .adopt_directory_user(None, &found, read_ms, client)
            .await
        {
            Ok(u) => Ok(u),
            Err(e) => {
                self.store_error("find_user", e);
                Ok(None)
            }
        }
    }

    /// Whether the directory holds `name` (for the ways a local account is made: the admin
    /// page, single sign-on). `Err` with the reason when that cannot be known: a name must live
    /// in one place only, so the account is not made then either.
    pub(crate) async fn name_in_directory(&self, name: &str) -> Result<Option<String>, String> {
        let Some(directory) = self.directory() else {
            return Ok(None);
        };
        match directory.find(name).await {
            Ok(found) => Ok(found.map(|u| u.dn)),
            Err(DirectoryError::Ambiguous(_)) => Ok(Some("several entries".to_string())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Checks a signed-in user's password: a local account's against its hash, a directory
    /// user's by a bind (as the entry the record belongs to). `Err` when the directory cannot
    /// answer.
    pub(crate) async fn password_is_right(
        &self,
        user: &User,
        password: Secret,
    ) -> Result<bool, DirectoryError> {
        if is_local_account(user) {
            return Ok(self
                .hasher
                .verify(Some(user.password_hash.clone()), password)
                .await);
        }
        let Some(directory) = self.directory() else {
            // A directory user while no directory is configured: nobody can vouch for them.
            return Ok(false);
        };
        let outcome = directory.authenticate(&user.name, &password).await;
        self.directory_answered(outcome.as_ref().map(|_| ()));
        Ok(match outcome? {
            Authenticated::Yes(found) => {
                found.is_entry(user.directory_dn.as_deref(), user.directory_id.as_deref())
            }
            _ => false,
        })
    }

    /// Makes (at the first sign-in) or brings up to date the local record of a directory user:
    /// their entry, their groups, administrator by `directory.admin_group`, enabled again if the
    /// directory had them disabled before `read_ms`. `None` when the name cannot be used here:
    /// a local account holds it, another entry's record does, or the gateway does not accept it.
    async fn adopt_directory_user(
        &self,
        local: Option<User>,
        found: &DirectoryUser,
        read_ms: i64,
        client: &ClientInfo,
    ) -> Result<Option<User>, StoreError> {
        let name = canonical_user_name(&found.name);
        if !crate::auth::valid_user_name(&name) {
            tracing::warn!(
                dn = %found.dn,
                "directory: the user's name is not one the gateway accepts (1 to 64 letters, \
                 digits, `. _ - @`); refused"
            );
            return Ok(None);
        }
        let user = match local {
            Some(u) if u.name.eq_ignore_ascii_case(&name) => Some(u),
            _ => self.store.find_user(&name).await?,
        };
        let user = match user {
            Some(u) if is_local_account(&u) => {
                self.report_conflict(&u.name, &found.dn, "a local account has this name");
                return Ok(None);
            }
            Some(u) if u.directory_dn.is_some() && !self.same_entry(&u, found) => {
                self.report_conflict(
                    &u.name,
                    &found.dn,
                    "the record of this name was made for another directory entry \
                     (`portcullis directory relink NAME` hands it to this one)",
                );
                return Ok(None);
            }
            Some(u) => u,
            None => match self.store.create_user(&name, "", false, now_ms()).await {
                Ok(u) => {
                    let mut e = self.audit_entry(
                        "directory_user",
                        "created",
                        Some((u.id, &u.name)),
                        client,
                    );
                    e.detail = format!("from {}", found.dn);
                    self.audit(e).await;
                    u
                }
                // Made a moment ago by another replica's sign-in.
                Err(_) => match self.store.find_user(&name).await? {
                    Some(u) if !is_local_account(&u) && self.same_entry(&u, found) => u,
                    _ => return Ok(None),
                },
            },
        };
        self.bring_up_to_date(&user, found, read_ms).await?;
        self.store.find_user_by_id(user.id).await
    }

    /// Whether a directory user's record belongs to `found` (a record still being made has no
    /// entry yet, and takes it).
    fn same_entry(&self, user: &User, found: &DirectoryUser) -> bool {
        user.directory_dn.is_none()
            || found.is_entry(user.directory_dn.as_deref(), user.directory_id.as_deref())
    }

    /// Brings a directory user's record in line with the directory's entry, read at `read_ms`.
    async fn bring_up_to_date(
        &self,
        user: &User,
        found: &DirectoryUser,
        read_ms: i64,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        if user.directory_dn.as_deref() != Some(found.dn.as_str())
            || (found.id.is_some() && user.directory_id != found.id)
        {
            self.store
                .set_directory_entry(user.id, &found.dn, found.id.as_deref())
                .await?;
        }
        if user.directory_disabled_ms.is_some() {
            let events = self
                .store
                .set_directory_disabled(user.id, false, now, read_ms)
                .await?;
            if !events.is_empty() {
                self.apply(&events);
                self.count_sync_change("enabled");
                let mut e = self.audit_entry(
                    "directory_sync",
                    "enabled",
                    Some((user.id, &user.name)),
                    &ClientInfo::default(),
                );
                e.detail = "the directory lets them in again".into();
                self.audit(e).await;
            }
        }
        let config = self.config();
        let Some(directory) = config.directory.as_ref() else {
            return Ok(());
        };
        let have: Vec<String> = self
            .store
            .groups_of(user.id)
            .await?
            .into_iter()
            .filter(|g| g != "admins")
            .collect();
        let mut changed = Vec::new();
        for g in have.iter().filter(|g| !found.groups.contains(g)) {
            if let Some(e) = self.store.set_group(user.id, g, false, now).await? {
                self.apply(&[e]);
                changed.push(format!("-{g}"));
            }
        }
        for g in found.groups.iter().filter(|g| !have.contains(g)) {
            if let Some(e) = self.store.set_group(user.id, g, true, now).await? {
                self.apply(&[e]);
                changed.push(format!("+{g}"));
            }
        }
        if let Some(admin) = found.is_admin(directory) {
            if admin != user.is_admin {
                if let Some(e) = self.store.set_group(user.id, "admins", admin, now).await? {
                    self.apply(&[e]);
                    changed.push(format!("{}admins", if admin { "+" } else { "-" }));
                }
            }
        }
        if !changed.is_empty() {
            self.count_sync_change("groups");
            let mut e = self.audit_entry(
                "directory_sync",
                "groups",
                Some((user.id, &user.name)),
                &ClientInfo::default(),
            );
            e.detail = changed.join(" ");
            self.audit(e).await;
        }
        Ok(())
    }

    /// A directory user the directory no longer lets in: disabled here, every token ended.
    async fn directory_user_gone(&self, user: &User, why: &str) {
        if user.disabled {
            return;
        }
        let now = now_ms();
        match self
            .store
            .set_directory_disabled(user.id, true, now, now)
            .await
        {
            Ok(events) if !events.is_empty() => {
                self.apply(&events);
                self.count_sync_change("disabled");
                let mut e = self.audit_entry(
                    "directory_sync",
                    "disabled",
                    Some((user.id, &user.name)),
                    &ClientInfo::default(),
                );
                e.detail = why.to_string();
                self.audit(e).await;
            }
            Ok(_) => {}
            Err(e) => {
                self.store_error("signout_user", e);
            }
        }
    }

    fn count_sync_change(&self, change: &str) {
        self.metrics
            .counter(Family::DirectorySyncChanges, &[change])
            .inc();
    }

    /// A directory entry refused the name it has: logged and counted once per name and entry.
    fn report_conflict(&self, name: &str, dn: &str, why: &str) {
        let first = self
            .directory_status
            .conflicts_reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(format!("{}\n{dn}", name.to_ascii_lowercase()));
        if first {
            self.count_sync_change("conflict");
            tracing::warn!(name, dn, "directory: the entry is refused: {why}");
        }
    }

    /// One pass of the directory sync: every directory user the directory no longer lets in is
    /// disabled (every token ends), one it lets in again is enabled, and groups follow the
    /// directory's. Users whose entry could not be read whole are left as they are; local
    /// accounts whose name a directory entry also has are reported.
    pub async fn sync_directory(&self) -> Result<(), DirectoryError> {
        let Some(directory) = self.directory() else {
            return Ok(());
        };
        let read_ms = now_ms();
        let listed = directory.all_users().await;
        self.directory_answered(listed.as_ref().map(|_| ()));
        let listed = listed?;
        let users = match self.store.list_users().await {
            Ok(u) => u,
            Err(e) => {
                self.store_error("find_user", e);
                return Ok(());
            }
        };
        for user in &users {
            let key = listing_key(&user.name);
            let found = listed.users.get(&key);
            if is_local_account(user) {
                if let Some(found) = found {
                    self.report_conflict(&user.name, &found.dn, "a local account has this name");
                }
                continue;
            }
            if listed.unsure.contains(&key) {
                continue;
            }
            match found {
                Some(found) if self.same_entry(user, found) => {
                    if let Err(e) = self.bring_up_to_date(user, found, read_ms).await {
                        self.store_error("find_user", e);
                    }
                }
                Some(found) => {
                    self.report_conflict(
                        &user.name,
                        &found.dn,
                        "the record of this name was made for another directory entry",
                    );
                    self.directory_user_gone(
                        user,
                        "its directory entry is gone (another entry has the name now)",
                    )
                    .await;
                }
                None => {
                    self.directory_user_gone(
                        user,
                        "gone from the directory, disabled there, or outside its user filter",
                    )
                    .await
                }
            }
        }
        let now = now_ms();
        self.directory_status
            .last_sync_ms
            .store(now, Ordering::Release);
        self.directory_status.set_error(None);
        self.metrics.directory_last_sync.set(now as f64 / 1000.0);
        Ok(())
    }

    /// Runs the directory sync every `directory.sync_interval` (sooner again after a failure).
    pub async fn run_directory_sync(self: Arc<Self>) {
        let Some(interval) = self.config().directory.as_ref().map(|d| d.sync_interval) else {
            return;
        };
        loop {
            let wait = match self.sync_directory().await {
                Ok(()) => interval,
                Err(_) => crate::directory::retry_after(interval),
            };
            tokio::time::sleep(wait).await;
        }
    }
}
