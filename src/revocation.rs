//! The in-memory revocation view and the loop that keeps it in sync with the store.
//!
//! The view answers "is this token still alive?" without touching the store: a map of revoked
//! session ids (128-bit, mapped to the time the token would expire anyway, swept periodically),
//! per-user cutoffs, a global cutoff and the set of disabled users. It is built from a store
//! snapshot at start and advanced by the store's event log in sequence order; events written by
//! this process are also applied at once. Applying an event twice is harmless.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::store::{
    DynStore, RevocationEvent, RevokedEntry, SequencedEvent, SessionId, Snapshot, StoreResult,
};

/// How many events one delta poll fetches at most; the loop keeps fetching while full pages come.
pub const EVENT_PAGE: i64 = 1000;
/// How often expired entries are swept from the revoked-session map.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Events were missed: the log does not continue where the view stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the revocation log skips from sequence {expected} to {found}")]
pub struct SeqGap {
    pub expected: i64,
    pub found: i64,
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    /// Events applied from the log.
    pub applied: usize,
    /// Whether the view was rebuilt from a snapshot (a gap in the log, or asked for).
    pub resynced: bool,
    /// Media notes among the events applied, for the media routes' state.
    pub notes: Vec<(crate::store::MediaNote, i64)>,
}

/// Why the view refuses a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    Session,
    UserSignedOut,
    EveryoneSignedOut,
    UserDisabled,
    KeyRetired,
}

/// A bound media-server token, keyed in the view by its keyed hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaEntry {
    pub sid: SessionId,
    pub user_id: i64,
    pub user_name: Arc<str>,
    pub issued_ms: i64,
    pub expires_ms: i64,
}

/// What the view says about a media token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaCheck {
    /// Never bound here (or expired and swept).
    Unknown,
    Expired,
    Revoked(Revoked),
    Alive(MediaEntry),
}

/// Decodes the hex of a keyed hash; `None` unless it is 32 bytes.
pub fn hash_from_hex(hex_text: &str) -> Option<[u8; 32]> {
    hex::decode(hex_text).ok()?.try_into().ok()
}

/// Revoked session ids: a sorted base of compact entries (built from a snapshot, 20 bytes each,
/// binary-searched) and a small map of revocations applied since, merged into the base once it
/// grows. A million revoked sessions take about 20 MB.
#[derive(Default)]
struct RevokedSet {
    base: Vec<RevokedEntry>,
    recent: HashMap<u128, i64>,
}

/// The recent map is merged into the sorted base when it holds this many entries.
const MERGE_AT: usize = 64 * 1024;

impl RevokedSet {
    fn from_entries(mut base: Vec<RevokedEntry>) -> RevokedSet {
        base.sort_unstable();
        // Sorted by id then expiry: keep the last (latest expiry) of each id.
        base.reverse();
        base.dedup_by_key(|e| e.id_key());
        base.reverse();
        base.shrink_to_fit();
        RevokedSet {
            base,
            recent: HashMap::new(),
        }
    }

    fn position(&self, sid: SessionId) -> Result<usize, usize> {
        let key = RevokedEntry::key(sid);
        self.base.binary_search_by(|e| e.id_key().cmp(&key))
    }

    fn contains(&self, sid: SessionId) -> bool {
        (!self.recent.is_empty() && self.recent.contains_key(&sid.0)) || self.position(sid).is_ok()
    }

    fn insert(&mut self, sid: SessionId, expires_ms: i64) {
        if let Ok(i) = self.position(sid) {
            self.base[i].extend_to(expires_ms);
            return;
        }
        let e = self.recent.entry(sid.0).or_insert(expires_ms);
        *e = (*e).max(expires_ms);
        if self.recent.len() >= MERGE_AT {
            let recent = std::mem::take(&mut self.recent);
            let mut all = std::mem::take(&mut self.base);
            all.extend(
                recent
                    .into_iter()
                    .map(|(id, exp)| RevokedEntry::new(SessionId(id), exp)),
            );
            *self = RevokedSet::from_entries(all);
        }
    }

    fn len(&self) -> usize {
        self.base.len() + self.recent.len()
    }

    /// Heap bytes held (the map's buckets counted at capacity, one control byte each).
    fn heap_bytes(&self) -> usize {
        self.base.capacity() * std::mem::size_of::<RevokedEntry>()
            + self.recent.capacity() * (std::mem::size_of::<(u128, i64)>() + 1)
    }

    fn retain_unexpired(&mut self, now_ms: i64) {
        self.base.retain(|e| e.expires_ms() > now_ms);
        self.recent.retain(|_, exp| *exp > now_ms);
    }
}

#[derive(Default)]
struct ViewState {
    retired_keys: HashSet<String>,
    revoked: RevokedSet,
    user_cutoff: HashMap<i64, i64>,
    global_cutoff: Option<i64>,
    disabled: HashSet<i64>,
    media: HashMap<[u8; 32], MediaEntry>,
    /// Each user's groups (`admins` for administrators), for the access rules, with the
    /// sequence number of the event that set them (an older event never undoes a newer one).
    groups: HashMap<i64, (i64, Arc<[String]>)>,
    /// Highest sequence number applied from the store's log in order.
    seq: i64,
    last_sync: Option<Instant>,
    last_error: Option<String>,
}

/// Sizes of the view, for metrics and `/readyz`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ViewStats {
    pub revoked_sessions: usize,
    pub user_cutoffs: usize,
    pub disabled_users: usize,
    pub media_tokens: usize,
    pub seq: i64,
    /// Heap bytes of the view's tables (hash maps counted at capacity).
    pub heap_bytes: usize,
}

#[derive(Default)]
pub struct RevocationView {
    state: RwLock<ViewState>,
}

impl RevocationView {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides whether a token of `user_id`, session `sid`, issued at `issued_ms` and signed
    /// with key `kid`, is revoked. A token issued at or before a cutoff is dead.
    pub fn check(
        &self,
        sid: SessionId,
        user_id: i64,
        issued_ms: i64,
        kid: &str,
    ) -> Result<(), Revoked> {
        let s = self.read();
        if !s.retired_keys.is_empty() && s.retired_keys.contains(kid) {
            return Err(Revoked::KeyRetired);
        }
        if s.disabled.contains(&user_id) {
            return Err(Revoked::UserDisabled);
        }
        if s.global_cutoff.is_some_and(|c| issued_ms <= c) {
            return Err(Revoked::EveryoneSignedOut);
        }
        if s.user_cutoff.get(&user_id).is_some_and(|c| issued_ms <= *c) {
            return Err(Revoked::UserSignedOut);
        }
        if s.revoked.contains(sid) {
            return Err(Revoked::Session);
        }
        Ok(())
    }

    /// A user's groups (`admins` for an administrator); none for a user in no group.
    pub fn groups_of(&self, user_id: i64) -> Option<Arc<[String]>> {
        self.read().groups.get(&user_id).map(|(_, g)| g.clone())
    }

    /// Looks a media token up by its keyed hash and decides whether it is alive at `now_ms`.
    pub fn check_media(&self, hash: &[u8; 32], now_ms: i64) -> MediaCheck {
        let entry = {
            let s = self.read();
            match s.media.get(hash) {
                Some(e) => e.clone(),
                None => return MediaCheck::Unknown,
            }
        };
        if entry.expires_ms <= now_ms {
            return MediaCheck::Expired;
        }
        match self.check(entry.sid, entry.user_id, entry.issued_ms, "") {
            Ok(()) => MediaCheck::Alive(entry),
            Err(r) => MediaCheck::Revoked(r),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ViewState> {
        match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ViewState> {
        match self.state.read() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Replaces the whole view with a snapshot.
    pub fn load(&self, snap: Snapshot, now: Instant) {
        let started = Instant::now();
        let revoked = RevokedSet::from_entries(snap.revoked);
        tracing::debug!(sort = ?started.elapsed(), "revoked set built");
        let mut s = self.write();
        s.revoked = revoked;
        s.user_cutoff = snap.user_cutoffs.into_iter().collect();
        s.global_cutoff = snap.global_cutoff;
        s.disabled = snap.disabled_users.into_iter().collect();
        s.retired_keys = snap.retired_keys.into_iter().collect();
        s.media = snap
            .media_tokens
            .into_iter()
            .filter_map(|m| {
                Some((
                    hash_from_hex(&m.token_hash)?,
                    MediaEntry {
                        sid: m.sid,
                        user_id: m.user_id,
                        user_name: m.user_name.into(),
                        issued_ms: m.issued_ms,
                        expires_ms: m.expires_ms,
                    },
                ))
            })
            .collect();
        let mut groups: HashMap<i64, Vec<String>> = HashMap::new();
        for (user_id, group) in snap.groups {
            groups.entry(user_id).or_default().push(group);
        }
        s.groups = groups
            .into_iter()
            .map(|(user, mut list)| {
                // `admins` first, as the store lists a user's groups.
                list.sort_by_key(|g| (g != "admins", g.clone()));
                (user, (snap.seq, list.into()))
            })
            .collect();
        s.seq = snap.seq;
        s.last_sync = Some(now);
        s.last_error = None;
    }

    /// Applies an event this process just committed, without advancing the sequence number
    /// (earlier events written by other processes may not have been seen yet).
    pub fn apply_local(&self, event: &RevocationEvent) {
        apply(&mut self.write(), event, None);
    }

    /// [`Self::apply_local`] for an event whose sequence number is known (this process wrote
    /// it): a group change older than the one held is then ignored.
    pub fn apply_committed(&self, event: &SequencedEvent) {
        apply(&mut self.write(), &event.event, Some(event.seq));
    }

    /// Applies events fetched from the log, in order; returns how many advanced the view.
    /// Sequence numbers are gap-free in commit order, so an event that does not follow the
    /// view's sequence number means events were missed (purged, or a bug): nothing is applied
    /// and the caller rebuilds the view from a snapshot.
    pub fn apply_from_log(&self, events: &[SequencedEvent], now: Instant) -> Result<usize, SeqGap> {
        let mut s = self.write();
        let newer = events.iter().filter(|e| e.seq > s.seq);
        for (expected, e) in (s.seq + 1..).zip(newer) {
            if e.seq != expected {
                return Err(SeqGap {
                    expected,
                    found: e.seq,
                });
            }
        }
        let mut applied = 0;
        for e in events {
            if e.seq <= s.seq {
                continue;
            }
            apply(&mut s, &e.event, Some(e.seq));
            s.seq = e.seq;
            applied += 1;
        }
        s.last_sync = Some(now);
        s.last_error = None;
        Ok(applied)
    }

    /// Marks the view as in sync with the store without new events (a delta poll that found
    /// nothing new).
    pub fn mark_synced(&self, now: Instant) {
        let mut s = self.write();
        s.last_sync = Some(now);
        s.last_error = None;
    }

    pub fn record_sync_error(&self, message: String) {
        self.write().last_error = Some(message);
    }

    /// Removes revoked sessions whose tokens have expired anyway.
    pub fn sweep(&self, now_ms: i64) -> usize {
        let mut s = self.write();
        let before = s.revoked.len();
        s.revoked.retain_unexpired(now_ms);
        s.media.retain(|_, m| m.expires_ms > now_ms);
        before - s.revoked.len()
    }

    /// The earliest issue time a new token of `user_id` may carry and still be alive: one
    /// millisecond after the latest cutoff that applies to the user.
    pub fn min_issue_ms(&self, user_id: i64) -> i64 {
        let s = self.read();
        let user = s.user_cutoff.get(&user_id).copied().unwrap_or(i64::MIN);
        let global = s.global_cutoff.unwrap_or(i64::MIN);
        user.max(global).saturating_add(1)
    }

    pub fn seq(&self) -> i64 {
        self.read().seq
    }

    /// Time since the view last synced successfully, `None` if it never did.
    pub fn staleness(&self, now: Instant) -> Option<Duration> {
        self.read()
            .last_sync
            .map(|t| now.saturating_duration_since(t))
    }

    pub fn last_error(&self) -> Option<String> {
        self.read().last_error.clone()
    }

    pub fn is_key_retired(&self, kid: &str) -> bool {
        self.read().retired_keys.contains(kid)
    }

    pub fn stats(&self) -> ViewStats {
        let s = self.read();
        ViewStats {
            revoked_sessions: s.revoked.len(),
            user_cutoffs: s.user_cutoff.len(),
            disabled_users: s.disabled.len(),
            media_tokens: s.media.len(),
            seq: s.seq,
            heap_bytes: s.revoked.heap_bytes()
                + s.user_cutoff.capacity() * (std::mem::size_of::<(i64, i64)>() + 1)
                + s.disabled.capacity() * (std::mem::size_of::<i64>() + 1)
                + s.media.capacity() * (std::mem::size_of::<([u8; 32], MediaEntry)>() + 1)
                + s.media.values().map(|m| m.user_name.len()).sum::<usize>()
                + s.groups.capacity() * (std::mem::size_of::<(i64, (i64, Arc<[String]>))>() + 1)
                + s.groups
                    .values()
                    .flat_map(|(_, g)| g.iter())
                    .map(|g| std::mem::size_of::<String>() + g.len())
                    .sum::<usize>(),
        }
    }
}

fn apply(s: &mut ViewState, event: &RevocationEvent, seq: Option<i64>) {
    match *event {
        RevocationEvent::KeyRetired { ref kid } => {
            s.retired_keys.insert(kid.clone());
        }
        RevocationEvent::SessionRevoked {
            sid, expires_ms, ..
        } => {
            s.revoked.insert(sid, expires_ms);
        }
        RevocationEvent::UserCutoff { user_id, at_ms } => {
            let c = s.user_cutoff.entry(user_id).or_insert(at_ms);
            *c = (*c).max(at_ms);
        }
        RevocationEvent::GlobalCutoff { at_ms } => {
            s.global_cutoff = Some(s.global_cutoff.map_or(at_ms, |c| c.max(at_ms)));
        }
        RevocationEvent::UserDisabled { user_id } => {
            s.disabled.insert(user_id);
        }
        RevocationEvent::UserEnabled { user_id } => {
            s.disabled.remove(&user_id);
        }
        // Facts for the media routes, not for the view: the application hands them on.
        RevocationEvent::MediaNote { .. } => {}
        RevocationEvent::GroupsChanged {
            user_id,
            ref groups,
        } => {
            let seq = seq.unwrap_or(i64::MIN);
            if s.groups.get(&user_id).is_some_and(|(held, _)| *held > seq) {
                return;
            }
            s.groups.insert(user_id, (seq, groups.as_slice().into()));
        }
        RevocationEvent::MediaBound {
            sid,
            user_id,
            ref user_name,
            ref token_hash,
            issued_ms,
            expires_ms,
        } => {
            if let Some(hash) = hash_from_hex(token_hash) {
                s.media.insert(
                    hash,
                    MediaEntry {
                        sid,
                        user_id,
                        user_name: user_name.as_str().into(),
                        issued_ms,
                        expires_ms,
                    },
                );
            }
        }
    }
}

/// Fetches every event after the view's sequence number and applies it; rebuilds the view
/// from a snapshot when the log has a gap.
pub async fn sync_once(store: &DynStore, view: &RevocationView) -> StoreResult<SyncOutcome> {
    let mut outcome = SyncOutcome::default();
    loop {
        let seen = view.seq();
        let events = store.events_since(seen, EVENT_PAGE).await?;
        let full = events.len() as i64 == EVENT_PAGE;
        match view.apply_from_log(&events, Instant::now()) {
            Ok(n) => {
                outcome.applied += n;
                outcome
                    .notes
                    .extend(events.iter().filter(|e| e.seq > seen).filter_map(
                        |e| match &e.event {
                            RevocationEvent::MediaNote { note, until_ms } => {
                                Some((note.clone(), *until_ms))
                            }
                            _ => None,
                        },
                    ));
            }
            Err(gap) => {
                tracing::warn!(%gap, "rebuilding the revocation view from a snapshot");
                resync(store, view).await?;
                outcome.resynced = true;
                return Ok(outcome);
            }
        }
        if !full {
            return Ok(outcome);
        }
    }
}

/// Rebuilds the whole view from a store snapshot.
pub async fn resync(store: &DynStore, view: &RevocationView) -> StoreResult<()> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let snapshot = store.snapshot(now_ms).await?;
    view.load(snapshot, Instant::now());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(n: u128) -> SessionId {
        SessionId(n)
    }

    #[test]
    fn cutoffs_kill_tokens_issued_at_or_before_them() {
        let v = RevocationView::new();
        v.apply_local(&RevocationEvent::UserCutoff {
            user_id: 1,
            at_ms: 1000,
        });
        assert_eq!(v.check(sid(1), 1, 1000, "k"), Err(Revoked::UserSignedOut));
        assert_eq!(v.check(sid(1), 1, 1001, "k"), Ok(()));
        assert_eq!(v.check(sid(1), 2, 999, "k"), Ok(()));
        v.apply_local(&RevocationEvent::GlobalCutoff { at_ms: 2000 });
        assert_eq!(
            v.check(sid(1), 2, 1999, "k"),
            Err(Revoked::EveryoneSignedOut)
        );
    }

    #[test]
    fn applying_log_twice_is_harmless_and_seq_only_advances() {
        let v = RevocationView::new();
        let events = vec![
            SequencedEvent {
                seq: 1,
                event: RevocationEvent::SessionRevoked {
                    sid: sid(7),
                    user_id: 1,
                    expires_ms: 50,
                },
            },
            SequencedEvent {
                seq: 2,
                event: RevocationEvent::UserDisabled { user_id: 3 },
            },
        ];
        assert_eq!(v.apply_from_log(&events, Instant::now()), Ok(2));
        assert_eq!(v.apply_from_log(&events, Instant::now()), Ok(0));
        assert_eq!(v.seq(), 2);
        assert_eq!(v.check(sid(7), 1, 10, "k"), Err(Revoked::Session));
        assert_eq!(v.check(sid(8), 3, 10, "k"), Err(Revoked::UserDisabled));
    }

    #[test]
    fn a_gap_in_the_log_applies_nothing_and_is_reported() {
        let v = RevocationView::new();
        let event = |seq| SequencedEvent {
            seq,
            event: RevocationEvent::UserDisabled { user_id: seq },
        };
        assert_eq!(v.apply_from_log(&[event(1)], Instant::now()), Ok(1));
        assert_eq!(
            v.apply_from_log(&[event(2), event(4)], Instant::now()),
            Err(SeqGap {
                expected: 3,
                found: 4
            })
        );
        assert_eq!(v.seq(), 1);
        assert_eq!(v.check(sid(1), 2, 0, "k"), Ok(()));
        assert_eq!(
            v.apply_from_log(&[event(3)], Instant::now())
                .and_then(|_| v.apply_from_log(&[event(2), event(3), event(4)], Instant::now())),
            Err(SeqGap {
                expected: 2,
                found: 3
            })
        );
    }

    #[test]
    fn local_apply_does_not_skip_unseen_log_events() {
        let v = RevocationView::new();
        v.apply_local(&RevocationEvent::GlobalCutoff { at_ms: 5 });
        assert_eq!(v.seq(), 0);
    }

    #[test]
    fn retired_keys_kill_every_token_they_signed() {
        let v = RevocationView::new();
        v.apply_local(&RevocationEvent::KeyRetired { kid: "old".into() });
        assert_eq!(
            v.check(sid(1), 1, i64::MAX, "old"),
            Err(Revoked::KeyRetired)
        );
        assert_eq!(v.check(sid(1), 1, i64::MAX, "new"), Ok(()));
    }

    #[test]
    fn media_tokens_die_with_their_session_user_and_lifetime() {
        let v = RevocationView::new();
        let hash = [7u8; 32];
        assert_eq!(v.check_media(&hash, 0), MediaCheck::Unknown);
        v.apply_local(&RevocationEvent::MediaBound {
            sid: sid(5),
            user_id: 2,
            user_name: "bob".into(),
            token_hash: hex::encode(hash),
            issued_ms: 100,
            expires_ms: 10_000,
        });
        assert!(
            matches!(v.check_media(&hash, 200), MediaCheck::Alive(e) if &*e.user_name == "bob")
        );
        assert_eq!(v.check_media(&hash, 10_000), MediaCheck::Expired);
        v.apply_local(&RevocationEvent::UserCutoff {
            user_id: 2,
            at_ms: 150,
        });
        assert_eq!(
            v.check_media(&hash, 200),
            MediaCheck::Revoked(Revoked::UserSignedOut)
        );
        assert_eq!(v.sweep(10_000), 0);
        assert_eq!(v.check_media(&hash, 200), MediaCheck::Unknown);
    }

    #[test]
    fn the_revoked_set_finds_ids_in_its_base_and_its_recent_map_and_merges() {
        let base: Vec<RevokedEntry> = (1..=1000u128)
            .map(|n| RevokedEntry::new(sid(((n * 7919) << 64) | n), 5_000))
            .chain(std::iter::once(RevokedEntry::new(
                sid((7919 << 64) | 1),
                9_000,
            )))
            .collect();
        let mut set = RevokedSet::from_entries(base);
        assert_eq!(set.len(), 1000, "duplicates folded");
        assert!(set.contains(sid((7919 << 64) | 1)));
        assert_eq!(
            set.base[set.position(sid((7919 << 64) | 1)).unwrap()].expires_ms(),
            9_000
        );
        assert!(!set.contains(sid((7919 << 64) | 2)));
        assert!(!set.contains(sid(1)));
        for n in 0..(MERGE_AT as u128 + 10) {
            set.insert(sid(u128::MAX - n), 10_000);
        }
        assert!(set.recent.len() < MERGE_AT, "merged into the base");
        assert_eq!(set.len(), 1000 + MERGE_AT + 10);
        assert!(set.contains(sid(u128::MAX)) && set.contains(sid(u128::MAX - MERGE_AT as u128)));
        assert!(set.base.windows(2).all(|w| w[0].id_key() < w[1].id_key()));
        set.retain_unexpired(6_000);
        assert_eq!(set.len(), MERGE_AT + 10 + 1);
    }

    #[test]
    fn sweep_drops_only_expired_revocations() {
        let v = RevocationView::new();
        for (n, exp) in [(1, 1000), (2, 2000)] {
            v.apply_local(&RevocationEvent::SessionRevoked {
                sid: sid(n),
                user_id: 1,
                expires_ms: exp,
            });
        }
        assert_eq!(v.sweep(1500), 1);
        assert_eq!(v.check(sid(1), 1, 0, "k"), Ok(()));
        assert_eq!(v.check(sid(2), 1, 0, "k"), Err(Revoked::Session));
    }
}
