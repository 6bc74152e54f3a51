//! The controller's Prometheus metrics: reconciles, errors by category, keys by state,
//! material changes, leadership.

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

use crate::api::{KeyState, KmsKey};

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
        };
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
