//! The controller's Prometheus metrics: reconciles, errors by category, keys by state,
//! material changes, storage migrations, leadership.

use std::fmt;
use std::sync::{Arc, RwLock};

use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{KeyState, KmsKey, KmsKeyMaterial};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    /// started, succeeded, failed.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Every metric the controller updates.
#[derive(Debug)]
pub struct ControllerMetrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Family<KindLabels, Histogram>,
    pub material_changes: Family<ActionLabels, Counter>,
    pub leader: Gauge,
    /// `kubekms_storage_migrations_total{result}`: storage migration attempts started, and
    /// migrations that succeeded (recorded) or failed.
    pub storage_migrations: Family<MigrationLabels, Counter>,
    /// `kubekms_storage_migrations_running`: kubekms's StorageVersionMigrations not finished.
    pub storage_migrations_running: Gauge,
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl ControllerMetrics {
    /// Registers the metrics (under `kubekms_controller_`) and the keys-by-state gauge,
    /// which counts the controller's cache of KmsKeys at each scrape.
    pub fn register(registry: &mut Registry, keys: Arc<RwLock<Store<KmsKey>>>) -> Self {
        let m = ControllerMetrics {
            reconciles: Family::default(),
            errors: Family::default(),
            reconcile_seconds: Family::new_with_constructor(duration_histogram),
            material_changes: Family::default(),
            leader: Gauge::default(),
            storage_migrations: Family::default(),
            storage_migrations_running: Gauge::default(),
        };
        for result in ["started", "succeeded", "failed"] {
            let _ = m.storage_migrations.get_or_create(&MigrationLabels { result });
        }
        registry.register(
            "kubekms_storage_migrations",
            "Storage migrations after a rotation: attempts started, and migrations that succeeded or failed",
            m.storage_migrations.clone(),
        );
        registry.register(
            "kubekms_storage_migrations_running",
            "StorageVersionMigrations kubekms created that have not finished",
            m.storage_migrations_running.clone(),
        );
        let sub = registry.sub_registry_with_prefix("kubekms_controller");
        sub.register("reconciles", "Reconciles by kind and result", m.reconciles.clone());
        sub.register("reconcile_errors", "Failed reconciles by kind and error category", m.errors.clone());
        sub.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            m.reconcile_seconds.clone(),
        );
        sub.register(
            "material_changes",
            "Key material changes: create, rotate, destroy",
            m.material_changes.clone(),
        );
        sub.register("leader", "1 while this replica is the leader", m.leader.clone());
        registry.register_collector(Box::new(KeysByState(keys)));
        m
    }

    /// Counts and times one reconcile of `kind`, and its error's category.
    pub fn observe_reconcile<T>(
        &self,
        kind: &'static str,
        started: std::time::Instant,
        result: &Result<T, super::Error>,
    ) {
        self.reconcile_seconds.get_or_create(&KindLabels { kind }).observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.reconciles.get_or_create(&ResultLabels { kind, result: outcome }).inc();
        if let Err(e) = result {
            self.errors.get_or_create(&ErrorLabels { kind, category: e.category() }).inc();
        }
    }
}

/// `kubekms_keys{state}`: KmsKeys by status.state, zeros included (from the current
/// leadership term's cache; all zero on a standby replica).
struct KeysByState(Arc<RwLock<Store<KmsKey>>>);

impl fmt::Debug for KeysByState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeysByState")
    }
}

impl Collector for KeysByState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let family = Family::<StateLabels, Gauge>::default();
        for state in KeyState::ALL {
            let _ = family.get_or_create(&StateLabels { state: state.as_str() });
        }
        let keys = self.0.read().map(|s| s.state()).unwrap_or_default();
        for key in keys {
            if let Some(state) = key.status.as_ref().and_then(|s| s.state) {
                family.get_or_create(&StateLabels { state: state.as_str() }).inc();
            }
        }
        let metric =
            encoder.encode_descriptor("kubekms_keys", "KmsKeys by state", None, family.metric_type())?;
        family.encode(metric)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootKeyLabels {
    fingerprint: String,
    primary: &'static str,
}

/// Registers `kubekms_root_key_versions{fingerprint, primary}`: the key versions (not
/// destroyed) each root key wraps, counted in the current term's material cache at each
/// scrape (nothing on a standby replica). After a root-key rotation the series with
/// `primary="false"` fall to zero as the controller rewraps; the primary's is always there.
pub fn register_root_keys(
    registry: &mut Registry,
    materials: Arc<RwLock<Store<KmsKeyMaterial>>>,
    primary: &str,
) {
    registry.register_collector(Box::new(VersionsByRootKey { materials, primary: primary.to_owned() }));
}

struct VersionsByRootKey {
    materials: Arc<RwLock<Store<KmsKeyMaterial>>>,
    primary: String,
}

impl fmt::Debug for VersionsByRootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VersionsByRootKey")
    }
}

impl Collector for VersionsByRootKey {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let family = Family::<RootKeyLabels, Gauge>::default();
        let labels = |fingerprint: &str| RootKeyLabels {
            fingerprint: fingerprint.to_owned(),
            primary: if fingerprint == self.primary { "true" } else { "false" },
        };
        let _ = family.get_or_create(&labels(&self.primary));
        let materials = self.materials.read().map(|s| s.state()).unwrap_or_default();
        for m in materials {
            for (fingerprint, n) in crate::keyring::versions_by_root(&m.spec) {
                family.get_or_create(&labels(fingerprint)).inc_by(i64::from(n));
            }
        }
        let metric = encoder.encode_descriptor(
            "kubekms_root_key_versions",
            "Key versions by the root key that wraps them (primary=\"false\": still to rewrap after a root-key rotation)",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}
