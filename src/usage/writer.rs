//! The writer: takes the keys the [recorder](super::recorder) marked and writes this
//! reporter's entry of each key's `KmsKeyUsage` through a [`UsageStore`] (server-side apply
//! under a field manager of the reporter's own, so that it owns only its entry). It writes
//! a few seconds after the first use of a period (uses of the same moment coalesce), retries
//! with backoff for as long as it takes — a marked key stays marked until a write of it
//! succeeds — and flushes once more on shutdown. Nothing here blocks a call.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::recorder::{Pending, Recorder};
use crate::domain::{ReporterKind, VersionUse};
use crate::telemetry::error_chain;

/// The longest field manager the API server accepts.
pub const MAX_FIELD_MANAGER_LEN: usize = 128;
/// The longest reporter name `KmsKeyUsage` accepts.
pub const MAX_REPORTER_NAME_LEN: usize = 253;
/// What every reporter's field manager starts with.
pub const FIELD_MANAGER_PREFIX: &str = "kubekms-usage/";

/// Who reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reporter {
    /// Its entry's name in `spec.reporters` (sanitized, see [`Reporter::new`]).
    pub name: String,
    pub kind: ReporterKind,
    pub granularity: NonZeroU32,
}

impl Reporter {
    /// A reporter named `name`, made fit for `KmsKeyUsage`: printable ASCII without spaces
    /// (anything else becomes `_`), at most 253 bytes, never empty.
    pub fn new(name: &str, kind: ReporterKind, granularity: NonZeroU32) -> Self {
        let name = shorten(&sanitize(name), MAX_REPORTER_NAME_LEN, name);
        Reporter { name, kind, granularity }
    }

    /// `kubekms-usage/<name>`, at most 128 bytes: a longer name is cut and ends with a hash
    /// of the whole name, so that two reporters never share a field manager (and so never
    /// overwrite each other's entry).
    pub fn field_manager(&self) -> String {
        let room = MAX_FIELD_MANAGER_LEN - FIELD_MANAGER_PREFIX.len();
        format!("{FIELD_MANAGER_PREFIX}{}", shorten(&self.name, room, &self.name))
    }
}

fn sanitize(name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
    if clean.is_empty() { "unnamed".to_owned() } else { clean }
}

/// `text` if it fits in `max` bytes (ASCII); otherwise its start and `~` and 8 hex digits of
/// the SHA-256 of `whole`.
fn shorten(text: &str, max: usize, whole: &str) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let digest = Sha256::digest(whole.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{}~{hash}", &text[..max - 9])
}

/// Why a read or write of a usage record failed (the cause is for the log).
#[derive(Debug, thiserror::Error)]
#[error("failed to {step} the usage record")]
pub struct StoreError {
    pub step: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where usage records live: the API server ([`super::k8s::KubeUsageStore`]), or a test's map.
#[tonic::async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// What `reporter` stored for the key `uid` before (empty when nothing).
    async fn read(&self, uid: &str, reporter: &Reporter) -> Result<BTreeMap<u32, VersionUse>, StoreError>;
    /// Writes `reporter`'s whole entry of the record of `pending.owner`.
    async fn apply(&self, reporter: &Reporter, pending: &Pending) -> Result<(), StoreError>;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    /// `ok` or `error`.
    result: &'static str,
}

/// The writer's metrics.
#[derive(Debug, Clone, Default)]
pub struct UsageMetrics {
    writes: Family<WriteLabels, Counter>,
    pending: Gauge,
}

impl UsageMetrics {
    /// Registers `kubekms_usage_writes_total{result}`, `kubekms_usage_pending_keys` and
    /// `kubekms_usage_dropped_total` (the recorder's).
    pub fn register(registry: &mut Registry, recorder: &Recorder) -> Self {
        let m = UsageMetrics::default();
        registry.register(
            "kubekms_usage_writes",
            "Writes of this reporter's entry of KmsKeyUsage records, by result",
            m.writes.clone(),
        );
        registry.register(
            "kubekms_usage_pending_keys",
            "Keys whose usage record has uses not yet written",
            m.pending.clone(),
        );
        registry.register(
            "kubekms_usage_dropped",
            "Uses not recorded because the recorder was full of unwritten keys",
            recorder.dropped_counter(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.writes.get_or_create(&WriteLabels { result }).inc();
    }

    #[cfg(test)]
    fn writes(&self, result: &'static str) -> u64 {
        self.writes.get_or_create(&WriteLabels { result }).get()
    }
}

/// How the writer paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// How long after a change it writes, so that uses of the same moment share a write.
    pub delay: Duration,
    /// The first wait after a failure; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long the flush on shutdown may take.
    pub shutdown_flush: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            delay: Duration::from_secs(1),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            shutdown_flush: Duration::from_secs(5),
        }
    }
}

/// Writes what the recorder marked.
pub struct Writer<S> {
    pub recorder: Arc<Recorder>,
    pub store: S,
    pub reporter: Reporter,
    pub metrics: UsageMetrics,
    pub pacing: Pacing,
}

impl<S: UsageStore> Writer<S> {
    /// Writes marked keys until `shutdown`, then flushes once more (within
    /// [`Pacing::shutdown_flush`]).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = self.pacing.min_backoff;
        'serve: loop {
            tokio::select! {
                () = self.recorder.changed() => {}
                () = shutdown.cancelled() => break 'serve,
            }
            tokio::select! {
                () = tokio::time::sleep(self.pacing.delay) => {}
                () = shutdown.cancelled() => break 'serve,
            }
            while !self.flush().await {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shutdown.cancelled() => break 'serve,
                }
                backoff = (backoff * 2).min(self.pacing.max_backoff);
            }
            backoff = self.pacing.min_backoff;
        }
        let last = async {
            while !self.flush().await {
                tokio::time::sleep(self.pacing.min_backoff).await;
            }
        };
        if tokio::time::timeout(self.pacing.shutdown_flush, last).await.is_err() {
            tracing::warn!(
                reporter = %self.reporter.name,
                keys = self.recorder.pending().len(),
                "stopping with usage not written"
            );
        }
    }

    /// Writes every marked key once; whether all of them were written. Failures are
    /// counted one by one and logged once per flush (an outage fails them all alike).
    pub async fn flush(&self) -> bool {
        let mut failed = 0usize;
        let mut first = None;
        for pending in self.recorder.pending() {
            let uid = pending.owner.uid.clone();
            match self.write(pending).await {
                Ok(()) => self.metrics.count("ok"),
                Err(e) => {
                    failed += 1;
                    self.metrics.count("error");
                    first.get_or_insert((uid, e));
                }
            }
        }
        let left = self.recorder.pending().len();
        self.metrics.pending.set(i64::try_from(left).unwrap_or(i64::MAX));
        if let Some((uid, e)) = first {
            tracing::warn!(
                error = %error_chain(&e),
                key_id = %uid,
                failed,
                reporter = %self.reporter.name,
                "failed to write key usage; will retry"
            );
        }
        failed == 0
    }

    async fn write(&self, mut pending: Pending) -> Result<(), StoreError> {
        let uid = pending.owner.uid.clone();
        if pending.needs_load {
            // A write replaces this reporter's whole entry: keep what it stored before.
            let stored = self.store.read(&uid, &self.reporter).await?;
            self.recorder.loaded(&uid, &stored);
            match self.recorder.pending_key(&uid) {
                Some(p) => pending = p,
                None => return Ok(()),
            }
        }
        self.store.apply(&self.reporter, &pending).await?;
        self.recorder.written(&uid, pending.generation);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use jiff::Timestamp;

    use super::*;
    use crate::domain::{KeyInfo, KeyState, UseKind};
    use crate::usage::recorder::{Limits, UseRecorder};

    /// A store in memory that fails while `down`.
    #[derive(Default)]
    struct MemoryStore {
        down: AtomicBool,
        records: Mutex<BTreeMap<String, BTreeMap<u32, VersionUse>>>,
        applies: Mutex<u32>,
    }

    fn outage() -> StoreError {
        StoreError { step: "apply", source: Box::new(std::io::Error::other("connection refused")) }
    }

    #[tonic::async_trait]
    impl UsageStore for Arc<MemoryStore> {
        async fn read(&self, uid: &str, _: &Reporter) -> Result<BTreeMap<u32, VersionUse>, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(outage());
            }
            Ok(self.records.lock().unwrap().get(uid).cloned().unwrap_or_default())
        }

        async fn apply(&self, _: &Reporter, pending: &Pending) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(outage());
            }
            *self.applies.lock().unwrap() += 1;
            self.records.lock().unwrap().insert(pending.owner.uid.clone(), pending.versions.clone());
            Ok(())
        }
    }

    fn key() -> KeyInfo {
        KeyInfo {
            namespace: "ns".into(),
            name: "k".into(),
            key_id: "uid-1".into(),
            uid: "uid-1".into(),
            state: KeyState::Enabled,
            current_version: Some(2),
            refused_versions: Default::default(),
            valid_to: None,
        }
    }

    fn writer(store: Arc<MemoryStore>) -> Writer<Arc<MemoryStore>> {
        let g = NonZeroU32::new(86_400).unwrap();
        Writer {
            recorder: Arc::new(Recorder::with_clock(g, Limits::default(), || {
                Timestamp::from_second(86_400).unwrap()
            })),
            store,
            reporter: Reporter::new("plugin/host", ReporterKind::StoragePlugin, g),
            metrics: UsageMetrics::default(),
            pacing: Pacing {
                delay: Duration::from_millis(10),
                min_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(40),
                shutdown_flush: Duration::from_millis(200),
            },
        }
    }

    #[tokio::test]
    async fn an_outage_loses_nothing_and_the_stored_record_is_kept() {
        let store = Arc::new(MemoryStore::default());
        let before =
            VersionUse { last_decrypt: Some(Timestamp::from_second(0).unwrap()), ..Default::default() };
        store.records.lock().unwrap().insert("uid-1".into(), BTreeMap::from([(1, before.clone())]));
        store.down.store(true, Ordering::SeqCst);
        let w = writer(store.clone());
        w.recorder.record(&key(), 2, UseKind::Encrypt);
        assert!(!w.flush().await);
        assert!(!w.flush().await);
        assert_eq!(w.metrics.writes("error"), 2);
        assert_eq!(w.recorder.pending().len(), 1, "still to write");

        store.down.store(false, Ordering::SeqCst);
        assert!(w.flush().await);
        assert_eq!(w.metrics.writes("ok"), 1);
        assert!(w.recorder.pending().is_empty());
        let stored = store.records.lock().unwrap()["uid-1"].clone();
        assert_eq!(stored[&1], before, "what the reporter stored before its restart is kept");
        assert_eq!(stored[&2].last_encrypt, Some(Timestamp::from_second(86_400).unwrap()));
        // Nothing new: no write.
        w.recorder.record(&key(), 2, UseKind::Encrypt);
        assert!(w.flush().await);
        assert_eq!(*store.applies.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn the_task_writes_soon_after_a_use_retries_and_flushes_on_shutdown() {
        let store = Arc::new(MemoryStore::default());
        let w = writer(store.clone());
        let recorder = w.recorder.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(w.run(shutdown.clone()));
        recorder.record(&key(), 2, UseKind::Decrypt);
        let written = async {
            while !store.records.lock().unwrap().contains_key("uid-1") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), written).await.unwrap();

        // Down: the task retries until it is back.
        store.down.store(true, Ordering::SeqCst);
        recorder.record(&key(), 3, UseKind::Decrypt);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(recorder.pending().len(), 1);
        store.down.store(false, Ordering::SeqCst);
        let retried = async {
            while !recorder.pending().is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), retried).await.unwrap();

        // A use just before shutdown is written by the last flush.
        recorder.record(&key(), 4, UseKind::Refused);
        shutdown.cancel();
        task.await.unwrap();
        assert!(store.records.lock().unwrap()["uid-1"][&4].last_refused.is_some());
    }

    #[test]
    fn reporter_names_and_field_managers_fit_the_api() {
        let day = NonZeroU32::new(86_400).unwrap();
        let r = Reporter::new("plugin/node-1", ReporterKind::StoragePlugin, day);
        assert_eq!(r.name, "plugin/node-1");
        assert_eq!(r.field_manager(), "kubekms-usage/plugin/node-1");
        assert_eq!(Reporter::new("server/a b\u{e9}", ReporterKind::KeyApi, day).name, "server/a_b_");
        assert_eq!(Reporter::new("", ReporterKind::KeyApi, day).name, "unnamed");

        let long_a = Reporter::new(&format!("server/{}a", "x".repeat(300)), ReporterKind::KeyApi, day);
        let long_b = Reporter::new(&format!("server/{}b", "x".repeat(300)), ReporterKind::KeyApi, day);
        assert_eq!(long_a.name.len(), MAX_REPORTER_NAME_LEN);
        assert_ne!(long_a.name, long_b.name);
        let (ma, mb) = (long_a.field_manager(), long_b.field_manager());
        assert_eq!(ma.len(), MAX_FIELD_MANAGER_LEN);
        assert!(ma.starts_with(FIELD_MANAGER_PREFIX));
        assert_ne!(ma, mb, "two reporters never share a field manager");
    }
}
