//! The call paths' side of usage reporting: [`UseRecorder::record`] notes that one version
//! of one key was used, in memory, synchronously and cheaply (a map lookup under a mutex).
//! Per key, version and kind of use it keeps the start of the period of the last use, and
//! marks the key for writing only when that period advances — so a reporter writes each
//! key's usage record at most once per version and kind per period, never once per call.
//! The [writer](super::writer) takes what is marked; nothing here waits on it.
//!
//! Memory is bounded: the reporter serves a bounded set of keys (one for a plugin, the
//! cluster's keys for a key API server) and a key has at most [`MAX_VERSIONS`] versions,
//! but the recorder caps both anyway ([`Limits`]). At the key cap it forgets a key whose
//! record is already written (the writer reads the stored record back before it next
//! writes that key); only when every key held is still unwritten is a use dropped, and
//! counted.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard};

use jiff::Timestamp;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use crate::domain::{KeyInfo, UseKind, VersionUse};

/// The most versions one key has (as `KmsKeyMaterial` and `KmsKeyUsage` allow).
pub const MAX_VERSIONS: usize = 1000;
/// The most keys a recorder holds by default.
pub const MAX_KEYS: usize = 10_000;

/// Notes uses of key versions. The plugin and the key API call it once per call that used
/// (or was refused) a version; tests use [`NoRecorder`] or one that captures.
pub trait UseRecorder: Send + Sync + 'static {
    fn record(&self, key: &KeyInfo, version: u32, kind: UseKind);
}

/// Records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecorder;

impl UseRecorder for NoRecorder {
    fn record(&self, _key: &KeyInfo, _version: u32, _kind: UseKind) {}
}

/// The key a usage record belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// How much a recorder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub keys: usize,
    pub versions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { keys: MAX_KEYS, versions: MAX_VERSIONS }
    }
}

/// What the recorder knows of one key.
#[derive(Debug, Clone)]
struct KeyUses {
    owner: KeyOwner,
    versions: BTreeMap<u32, VersionUse>,
    /// Changed since it was last written.
    dirty: bool,
    /// Counts changes, so that a write of an older state does not clear a newer change.
    generation: u64,
    /// Whether the stored record was read back (or found absent) since this entry was made.
    loaded: bool,
}

impl KeyUses {
    fn pending(&self) -> Pending {
        Pending {
            owner: self.owner.clone(),
            versions: self.versions.clone(),
            generation: self.generation,
            needs_load: !self.loaded,
        }
    }
}

/// One key's record to write: everything this reporter knows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub owner: KeyOwner,
    pub versions: BTreeMap<u32, VersionUse>,
    pub generation: u64,
    /// Whether the writer must first read back what this reporter stored before (after a
    /// restart, or once the key was forgotten), since a write replaces the reporter's
    /// whole entry.
    pub needs_load: bool,
}

/// The recorder: uses in memory, per key, version and kind, at period granularity.
pub struct Recorder {
    granularity: NonZeroU32,
    limits: Limits,
    clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
    keys: Mutex<HashMap<String, KeyUses>>,
    changed: Notify,
    dropped: Counter,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("granularity", &self.granularity)
            .field("limits", &self.limits)
            .finish()
    }
}

/// The start of the period of `granularity` seconds that holds `at`; periods are aligned
/// to the Unix epoch.
pub fn period_start(at: Timestamp, granularity: NonZeroU32) -> Timestamp {
    let g = i64::from(granularity.get());
    let s = at.as_second();
    Timestamp::from_second(s - s.rem_euclid(g)).unwrap_or(at)
}

fn slot(uses: &mut VersionUse, kind: UseKind) -> &mut Option<Timestamp> {
    match kind {
        UseKind::Encrypt => &mut uses.last_encrypt,
        UseKind::Decrypt => &mut uses.last_decrypt,
        UseKind::Refused => &mut uses.last_refused,
    }
}

/// Keeps the later of two periods in `into`; whether it changed.
fn keep_later(into: &mut Option<Timestamp>, other: Option<Timestamp>) -> bool {
    match (into.as_ref(), other) {
        (_, None) => false,
        (Some(have), Some(t)) if *have >= t => false,
        (_, Some(t)) => {
            *into = Some(t);
            true
        }
    }
}

impl Recorder {
    /// A recorder with periods of `granularity` seconds, on the system clock.
    pub fn new(granularity: NonZeroU32) -> Self {
        Self::with_clock(granularity, Limits::default(), Timestamp::now)
    }

    /// A recorder on `clock` (tests step it).
    pub fn with_clock(
        granularity: NonZeroU32,
        limits: Limits,
        clock: impl Fn() -> Timestamp + Send + Sync + 'static,
    ) -> Self {
        Recorder {
            granularity,
            limits,
            clock: Box::new(clock),
            keys: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            dropped: Counter::default(),
        }
    }

    pub fn granularity(&self) -> NonZeroU32 {
        self.granularity
    }

    /// How many uses were dropped because the recorder was full of unwritten keys.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// The counter of dropped uses, for the metrics registry.
    pub fn dropped_counter(&self) -> Counter {
        self.dropped.clone()
    }

    /// Resolves once something changed since the last time it resolved (a change made
    /// while nobody waits is not missed).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The map, even if a thread panicked holding it: every change to it is complete.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, KeyUses>> {
        self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every key changed since it was last written.
    pub fn pending(&self) -> Vec<Pending> {
        let keys = self.lock();
        let mut out: Vec<Pending> = keys.values().filter(|k| k.dirty).map(KeyUses::pending).collect();
        out.sort_by(|a, b| a.owner.uid.cmp(&b.owner.uid));
        out
    }

    /// What the recorder holds of key `uid`, if that is still to be written.
    pub fn pending_key(&self, uid: &str) -> Option<Pending> {
        let keys = self.lock();
        keys.get(uid).filter(|k| k.dirty).map(KeyUses::pending)
    }

    /// What this reporter stored for key `uid` before, read back: kept where it is later
    /// than what the recorder holds. A later write then keeps it.
    pub fn loaded(&self, uid: &str, stored: &BTreeMap<u32, VersionUse>) {
        let mut keys = self.lock();
        let Some(entry) = keys.get_mut(uid) else { return };
        for (version, uses) in stored {
            if entry.versions.len() >= self.limits.versions && !entry.versions.contains_key(version) {
                continue;
            }
            let have = entry.versions.entry(*version).or_default();
            for kind in [UseKind::Encrypt, UseKind::Decrypt, UseKind::Refused] {
                keep_later(slot(have, kind), uses.last(kind));
            }
        }
        entry.loaded = true;
        entry.generation += 1;
    }

    /// The record of key `uid` at `generation` was written: it is clean unless it changed
    /// since.
    pub fn written(&self, uid: &str, generation: u64) {
        let mut keys = self.lock();
        if let Some(entry) = keys.get_mut(uid)
            && entry.generation == generation
        {
            entry.dirty = false;
        }
    }

    /// Room for one more key: forgets a written one when full; false if all are unwritten.
    fn make_room(&self, keys: &mut HashMap<String, KeyUses>) -> bool {
        if keys.len() < self.limits.keys {
            return true;
        }
        let clean = keys.iter().find(|(_, k)| !k.dirty).map(|(uid, _)| uid.clone());
        match clean {
            Some(uid) => keys.remove(&uid).is_some(),
            None => false,
        }
    }

    fn drop_use(&self, key: &KeyInfo, version: u32) {
        if self.dropped.inc() == 0 {
            tracing::warn!(
                key = %key.display(),
                version,
                "the usage recorder is full of unwritten records: dropping uses until the writer catches up"
            );
        }
    }
}

impl UseRecorder for Recorder {
    fn record(&self, key: &KeyInfo, version: u32, kind: UseKind) {
        if key.uid.is_empty() || version == 0 {
            return;
        }
        let period = period_start((self.clock)(), self.granularity);
        let changed = {
            let mut keys = self.lock();
            if !keys.contains_key(&key.uid) {
                if !self.make_room(&mut keys) {
                    drop(keys);
                    self.drop_use(key, version);
                    return;
                }
                let owner = KeyOwner {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    uid: key.uid.clone(),
                };
                let entry =
                    KeyUses { owner, versions: BTreeMap::new(), dirty: false, generation: 0, loaded: false };
                keys.insert(key.uid.clone(), entry);
            }
            let Some(entry) = keys.get_mut(&key.uid) else { return };
            if entry.versions.len() >= self.limits.versions && !entry.versions.contains_key(&version) {
                drop(keys);
                self.drop_use(key, version);
                return;
            }
            let changed = keep_later(slot(entry.versions.entry(version).or_default(), kind), Some(period));
            if changed {
                entry.dirty = true;
                entry.generation += 1;
            }
            changed
        };
        if changed {
            self.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;
    use crate::domain::KeyState;

    fn key(uid: &str) -> KeyInfo {
        KeyInfo {
            namespace: "ns".into(),
            name: format!("key-{uid}"),
            key_id: uid.into(),
            uid: uid.into(),
            state: KeyState::Enabled,
            current_version: Some(1),
            refused_versions: Default::default(),
            valid_to: None,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    /// A recorder with periods of 100 s on a clock the test sets.
    fn recorder(limits: Limits) -> (Recorder, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(1_000));
        let clock = now.clone();
        let r = Recorder::with_clock(NonZeroU32::new(100).unwrap(), limits, move || {
            at(clock.load(Ordering::Relaxed))
        });
        (r, now)
    }

    fn write_all(r: &Recorder) -> Vec<Pending> {
        let pending = r.pending();
        for p in &pending {
            r.written(&p.owner.uid, p.generation);
        }
        pending
    }

    #[test]
    fn periods_are_aligned_to_the_epoch() {
        let day = NonZeroU32::new(86_400).unwrap();
        assert_eq!(period_start(at(86_400 * 3 + 5), day), at(86_400 * 3));
        assert_eq!(period_start(at(86_400 * 3), day), at(86_400 * 3));
        assert_eq!(period_start(at(-1), day), at(-86_400));
        assert_eq!(period_start(at(17), NonZeroU32::MIN), at(17));
    }

    #[test]
    fn a_use_is_written_once_per_period_and_kind() {
        let (r, now) = recorder(Limits::default());
        assert!(r.pending().is_empty());
        r.record(&key("a"), 1, UseKind::Decrypt);
        let first = write_all(&r);
        assert_eq!(first.len(), 1);
        assert_eq!(
            first[0].owner,
            KeyOwner { namespace: "ns".into(), name: "key-a".into(), uid: "a".into() }
        );
        assert_eq!(first[0].versions[&1].last_decrypt, Some(at(1_000)));
        assert!(first[0].needs_load, "the first write of a key reads back what was stored");

        // The same use in the same period: nothing to write.
        now.store(1_099, Ordering::Relaxed);
        r.record(&key("a"), 1, UseKind::Decrypt);
        assert!(r.pending().is_empty());

        // Another kind, or another version, in the same period: one more write.
        r.record(&key("a"), 1, UseKind::Encrypt);
        r.record(&key("a"), 2, UseKind::Refused);
        let second = write_all(&r);
        assert_eq!(second.len(), 1);
        let v = &second[0].versions;
        assert_eq!(
            (v[&1].last_decrypt, v[&1].last_encrypt, v[&2].last_refused),
            (Some(at(1_000)), Some(at(1_000)), Some(at(1_000)))
        );

        // The period advances: written again, with the new period.
        now.store(1_100, Ordering::Relaxed);
        r.record(&key("a"), 1, UseKind::Decrypt);
        let third = write_all(&r);
        assert_eq!(third[0].versions[&1].last_decrypt, Some(at(1_100)));
        assert_eq!(third[0].versions[&2].last_refused, Some(at(1_000)), "a write carries all it knows");
    }

    #[test]
    fn a_failed_or_overtaken_write_leaves_the_key_dirty() {
        let (r, now) = recorder(Limits::default());
        r.record(&key("a"), 1, UseKind::Decrypt);
        let taken = r.pending();
        // The write fails: still pending.
        assert_eq!(r.pending(), taken);
        // A newer use lands while the write of the older state is under way.
        now.store(1_200, Ordering::Relaxed);
        r.record(&key("a"), 1, UseKind::Decrypt);
        r.written("a", taken[0].generation);
        let again = r.pending();
        assert_eq!(again.len(), 1, "the newer use is still to write");
        assert_eq!(again[0].versions[&1].last_decrypt, Some(at(1_200)));
        r.written("a", again[0].generation);
        assert!(r.pending().is_empty());
    }

    #[test]
    fn what_was_stored_before_is_kept_unless_later_here() {
        let (r, _) = recorder(Limits::default());
        r.record(&key("a"), 2, UseKind::Decrypt);
        let stored = BTreeMap::from([
            (1, VersionUse { last_decrypt: Some(at(500)), ..Default::default() }),
            (
                2,
                VersionUse { last_decrypt: Some(at(900)), last_encrypt: Some(at(900)), ..Default::default() },
            ),
        ]);
        r.loaded("a", &stored);
        let p = r.pending();
        assert!(!p[0].needs_load);
        assert_eq!(p[0].versions[&1].last_decrypt, Some(at(500)));
        assert_eq!(p[0].versions[&2].last_decrypt, Some(at(1_000)));
        assert_eq!(p[0].versions[&2].last_encrypt, Some(at(900)));
    }

    #[test]
    fn memory_is_bounded_and_only_written_keys_are_forgotten() {
        let (r, _) = recorder(Limits { keys: 2, versions: 3 });
        r.record(&key("a"), 1, UseKind::Decrypt);
        r.record(&key("b"), 1, UseKind::Decrypt);
        // Full of unwritten keys: a third key's use is dropped and counted.
        r.record(&key("c"), 1, UseKind::Decrypt);
        assert_eq!(r.dropped(), 1);
        assert_eq!(r.pending().iter().map(|p| p.owner.uid.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        // Once a is written it may be forgotten to make room.
        r.written("a", r.pending()[0].generation);
        r.record(&key("c"), 1, UseKind::Decrypt);
        assert_eq!(r.dropped(), 1);
        assert_eq!(r.pending().iter().map(|p| p.owner.uid.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        // a comes back: it must be read back before it is written again.
        r.written("b", r.pending()[0].generation);
        r.record(&key("a"), 1, UseKind::Encrypt);
        assert!(r.pending().iter().find(|p| p.owner.uid == "a").unwrap().needs_load);
        // Versions per key are capped too.
        for v in 1..=4 {
            r.record(&key("a"), v, UseKind::Decrypt);
        }
        assert_eq!(r.dropped(), 2);
        assert_eq!(r.pending().iter().find(|p| p.owner.uid == "a").unwrap().versions.len(), 3);
    }

    #[tokio::test]
    async fn a_change_wakes_the_writer_even_if_it_was_not_waiting() {
        let (r, _) = recorder(Limits::default());
        r.record(&key("a"), 1, UseKind::Decrypt);
        tokio::time::timeout(std::time::Duration::from_secs(1), r.changed()).await.unwrap();
        // No change, no wake-up.
        r.record(&key("a"), 1, UseKind::Decrypt);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(20), r.changed()).await.is_err());
    }

    #[test]
    fn a_use_without_a_key_id_or_version_is_ignored() {
        let (r, _) = recorder(Limits::default());
        r.record(&key(""), 1, UseKind::Decrypt);
        r.record(&key("a"), 0, UseKind::Decrypt);
        assert!(r.pending().is_empty());
    }
}
