//! Bounded caches for the answers of TokenReviews and SubjectAccessReviews. When full, the
//! least recently used entry makes room — never a clear-all — and "no" answers are held
//! apart from "yes" answers, in a bound of their own, so that a flood of junk (invalid
//! tokens, questions about keys the asker may not use) can push out only other junk, never
//! the answers valid callers are served from.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A map of at most `capacity` entries that forgets the least recently used one to make
/// room for a new one.
pub struct Lru<K, V> {
    capacity: usize,
    /// Counts uses; an entry's stamp is the count at its last use.
    clock: u64,
    entries: HashMap<K, (V, u64)>,
    /// Keys by stamp, least recently used first.
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// An empty map holding at most `capacity` entries (none at all for 0).
    pub fn new(capacity: usize) -> Self {
        Lru { capacity, clock: 0, entries: HashMap::new(), order: BTreeMap::new() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The value of `key`, which becomes the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        let tick = self.tick();
        let entry = self.entries.get_mut(key)?;
        self.order.remove(&entry.1);
        entry.1 = tick;
        self.order.insert(tick, key.clone());
        Some(&entry.0)
    }

    /// Sets `key` to `value`, the most recently used, forgetting the least recently used
    /// entry if the map is full; says whether it forgot one.
    pub fn insert(&mut self, key: K, value: V) -> bool {
        if self.capacity == 0 {
            return false;
        }
        self.remove(&key);
        let mut evicted = false;
        if self.entries.len() >= self.capacity
            && let Some((_, oldest)) = self.order.pop_first()
        {
            self.entries.remove(&oldest);
            evicted = true;
        }
        let tick = self.tick();
        self.order.insert(tick, key.clone());
        self.entries.insert(key, (value, tick));
        evicted
    }

    pub fn remove(&mut self, key: &K) {
        if let Some((_, stamp)) = self.entries.remove(key) {
            self.order.remove(&stamp);
        }
    }
}

/// A cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached<V> {
    Yes(V),
    No,
}

/// Yes-or-no answers, each valid until a time of type `T`: "yes" answers (with a value)
/// and "no" answers in separate [`Lru`]s.
pub struct Answers<K, V, T> {
    yes: Lru<K, (V, T)>,
    no: Lru<K, T>,
}

impl<K: Hash + Eq + Clone, V: Clone, T: Ord + Copy> Answers<K, V, T> {
    /// At most `yes` "yes" answers and, apart, `no` "no" answers.
    pub fn new(yes: usize, no: usize) -> Self {
        Answers { yes: Lru::new(yes), no: Lru::new(no) }
    }

    /// The answer for `key`, if one is cached and still valid at `now` (an expired one is
    /// dropped).
    pub fn get(&mut self, key: &K, now: T) -> Option<Cached<V>> {
        match self.yes.get(key) {
            Some((value, until)) if now < *until => return Some(Cached::Yes(value.clone())),
            Some(_) => self.yes.remove(key),
            None => {}
        }
        match self.no.get(key) {
            Some(until) if now < *until => Some(Cached::No),
            Some(_) => {
                self.no.remove(key);
                None
            }
            None => None,
        }
    }

    /// Caches `answer` for `key` until `until`, replacing any other answer for it; says
    /// whether an answer of the same kind was forgotten to make room.
    pub fn insert(&mut self, key: K, answer: Cached<V>, until: T) -> bool {
        match answer {
            Cached::Yes(value) => {
                self.no.remove(&key);
                self.yes.insert(key, (value, until))
            }
            Cached::No => {
                self.yes.remove(&key);
                self.no.insert(key, until)
            }
        }
    }

    /// How many answers of each kind are held: (yes, no).
    pub fn len(&self) -> (usize, usize) {
        (self.yes.len(), self.no.len())
    }

    /// [`Answers::insert`], reported to `metrics`: an answer forgotten to make room, and how
    /// many of each kind are held. `label(yes)` is the label set of the "yes" or "no" answers.
    pub fn insert_reported<L: Labels>(
        &mut self,
        key: K,
        answer: Cached<V>,
        until: T,
        metrics: &AnswerMetrics<L>,
        label: impl Fn(bool) -> L,
    ) {
        let yes = matches!(answer, Cached::Yes(_));
        if self.insert(key, answer, until) {
            metrics.evicted.get_or_create(&label(yes)).inc();
        }
        let (held_yes, held_no) = self.len();
        for (yes, n) in [(true, held_yes), (false, held_no)] {
            metrics.entries.get_or_create(&label(yes)).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// What a label set of [`AnswerMetrics`] must be.
pub trait Labels: Clone + std::fmt::Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static {}

impl<L: Clone + std::fmt::Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static> Labels for L {}

/// The metrics of an [`Answers`] cache: the answers held and those forgotten to make room,
/// by a label set that names the cache and the kind of answer.
#[derive(Clone, Debug)]
pub struct AnswerMetrics<L> {
    entries: Family<L, Gauge>,
    evicted: Family<L, Counter>,
}

impl<L: Labels> Default for AnswerMetrics<L> {
    fn default() -> Self {
        AnswerMetrics { entries: Family::default(), evicted: Family::default() }
    }
}

impl<L: Labels> AnswerMetrics<L> {
    /// Registers `{prefix}_entries` ("{what} cached, by {by}") and `{prefix}_evicted_total`.
    pub fn register(&self, registry: &mut Registry, prefix: &str, what: &str, by: &str) {
        registry.register(
            format!("{prefix}_entries"),
            format!("{what} cached, by {by}"),
            self.entries.clone(),
        );
        registry.register(
            format!("{prefix}_evicted"),
            format!("Cached {what} forgotten to make room, by {by}"),
            self.evicted.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entry_makes_room() {
        let mut lru = Lru::new(3);
        for k in ["a", "b", "c"] {
            assert!(!lru.insert(k, k.to_uppercase()), "room for {k}");
        }
        assert_eq!(lru.get(&"a"), Some(&"A".to_owned()), "a is now the most recently used");
        assert!(lru.insert("d", "D".into()), "full: one is forgotten");
        assert_eq!(lru.len(), 3);
        assert_eq!(lru.get(&"b"), None, "b, the least recently used, made room");
        for k in ["a", "c", "d"] {
            assert!(lru.get(&k).is_some(), "{k}");
        }
        // Replacing a value does not grow the map, and makes the entry the most recent.
        lru.insert("a", "A2".into());
        lru.insert("e", "E".into());
        assert_eq!((lru.len(), lru.get(&"a")), (3, Some(&"A2".to_owned())));
        assert_eq!(lru.get(&"c"), None);
        lru.remove(&"a");
        assert_eq!((lru.len(), lru.get(&"a")), (2, None));

        let mut none = Lru::new(0);
        none.insert("a", 1);
        assert!(none.is_empty(), "a zero bound holds nothing");
    }

    #[test]
    fn a_flood_of_no_answers_never_pushes_out_a_yes() {
        let mut answers: Answers<u32, &str, u64> = Answers::new(2, 3);
        answers.insert(1, Cached::Yes("alice"), 100);
        let evicted = (1000..2000).filter(|&junk| answers.insert(junk, Cached::No, 100)).count();
        assert_eq!(evicted, 997, "all but the first three made room");
        assert_eq!(answers.len(), (1, 3), "the no answers stay within their own bound");
        assert_eq!(answers.get(&1, 50), Some(Cached::Yes("alice")));
        assert_eq!(answers.get(&1999, 50), Some(Cached::No), "the latest junk is remembered");
        assert_eq!(answers.get(&1000, 50), None, "the oldest junk was forgotten");
    }

    #[test]
    fn answers_expire_and_replace_one_another() {
        let mut answers: Answers<&str, u8, u64> = Answers::new(2, 2);
        answers.insert("t", Cached::Yes(7), 10);
        assert_eq!(answers.get(&"t", 9), Some(Cached::Yes(7)));
        assert_eq!(answers.get(&"t", 10), None, "valid until, not at, its time");
        assert_eq!(answers.len(), (0, 0), "an expired answer is dropped");
        answers.insert("t", Cached::No, 20);
        assert_eq!(answers.get(&"t", 0), Some(Cached::No));
        answers.insert("t", Cached::Yes(8), 20);
        assert_eq!((answers.get(&"t", 0), answers.len()), (Some(Cached::Yes(8)), (1, 0)));
    }
}
