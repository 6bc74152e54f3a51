//! The reconcile shell against a recording [`Cluster`]: what it writes, and in which
//! order (finalizer → material → status → plugin role → tombstone → finalizer removal).
//! The planner's decisions are tested in `lifecycle_tests.rs`; these pin the shell.

use std::sync::{Arc, Mutex, RwLock};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::storagemigration::v1::StorageVersionMigration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::Event;
use kube::runtime::reflector;
use prometheus_client::registry::Registry;

use super::cluster::Cluster;
use super::key::{FINALIZER, reconcile};
use super::lifecycle::Calendar;
use super::metrics::ControllerMetrics;
use super::{Context, Error, PluginAccess};
use crate::api::{KeyState, KmsGrantStatus, KmsKey, KmsKeyMaterial, KmsKeyStatus, VersionTrigger};
use crate::crypto::{KeyMaterial, RootKey};
use crate::keyring::Owner;
use crate::testing::AuditSink;

/// One call the shell made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    AddFinalizer,
    RemoveFinalizer,
    CreateMaterial { versions: usize },
    ReplaceMaterial { versions: usize, promised: bool, destroyed: bool },
    DeleteUsage,
    DeleteMaterial,
    PatchStatus(Option<KeyState>),
    PluginRole { role: String, key_id: String },
    Event(String),
}

/// A cluster that remembers what was written and answers reads from it.
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<Call>>,
    material: Mutex<Option<KmsKeyMaterial>>,
    status: Mutex<Option<KmsKeyStatus>>,
    /// When set, the next material write fails with this API status code.
    fail_material_write: Mutex<Option<u16>>,
}

impl Recording {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn material_write(&self, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        if let Some(code) = self.fail_material_write.lock().unwrap().take() {
            let source =
                kube::Error::Api(kube::core::Status::failure("refused", "Refused").with_code(code).boxed());
            return Err(Error::Material(crate::keyring::MaterialError::Update { name: "m".into(), source }));
        }
        let mut stored = object.clone();
        stored.metadata.resource_version = Some(format!("rv-{}", object.spec.versions.len()));
        *self.material.lock().unwrap() = Some(stored.clone());
        Ok(stored)
    }
}

#[tonic::async_trait]
impl Cluster for Recording {
    async fn set_finalizer(
        &self,
        _: &KmsKey,
        finalizer: &str,
        _: Option<String>,
        present: bool,
    ) -> Result<(), Error> {
        assert_eq!(finalizer, FINALIZER);
        self.record(if present { Call::AddFinalizer } else { Call::RemoveFinalizer });
        Ok(())
    }
    async fn usage(&self, _: &str) -> Result<Option<crate::api::KmsKeyUsage>, Error> {
        Ok(None)
    }

    async fn delete_usage(&self, _: &str) -> Result<(), Error> {
        self.record(Call::DeleteUsage);
        Ok(())
    }

    async fn material(&self, _: &str) -> Result<Option<KmsKeyMaterial>, Error> {
        Ok(self.material.lock().unwrap().clone())
    }
    async fn create_material(&self, _: &Owner, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        let stored = self.material_write(object)?;
        self.record(Call::CreateMaterial { versions: object.spec.versions.len() });
        Ok(stored)
    }
    async fn replace_material(&self, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        let stored = self.material_write(object)?;
        self.record(Call::ReplaceMaterial {
            versions: object.spec.versions.len(),
            promised: object.spec.deletion_time.is_some(),
            destroyed: object.spec.destroyed_at.is_some(),
        });
        Ok(stored)
    }
    async fn delete_material(&self, _: &str) -> Result<(), Error> {
        *self.material.lock().unwrap() = None;
        self.record(Call::DeleteMaterial);
        Ok(())
    }
    async fn patch_key_status(
        &self,
        _: &str,
        _: &str,
        status: &KmsKeyStatus,
    ) -> Result<Option<String>, Error> {
        *self.status.lock().unwrap() = Some(status.clone());
        self.record(Call::PatchStatus(status.state));
        Ok(Some("rv".into()))
    }
    async fn fresh_key(&self, _: &str, _: &str) -> Option<KmsKey> {
        None
    }
    async fn report_creating(&self, _: &str, _: &str, _: Option<String>, _: &Condition) {}
    async fn patch_grant_status(&self, _: &str, _: &str, _: &KmsGrantStatus) -> Result<(), Error> {
        Ok(())
    }
    async fn rbac_allows(
        &self,
        _: &crate::domain::Identity,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<bool, Error> {
        Ok(false)
    }
    async fn apply_plugin_role(&self, role: &str, key_id: &str) -> Result<(), Error> {
        self.record(Call::PluginRole { role: role.into(), key_id: key_id.into() });
        Ok(())
    }
    async fn server_time(&self) -> Result<Timestamp, Error> {
        Ok(Timestamp::now())
    }
    async fn publish(&self, _: &ObjectReference, event: Event) {
        self.record(Call::Event(event.reason));
    }
    // The storage migration's calls (its shell has tests of its own: migration_tests.rs).
    async fn migrations(&self) -> Result<Vec<StorageVersionMigration>, Error> {
        Ok(Vec::new())
    }
    async fn create_migration(&self, m: &StorageVersionMigration) -> Result<StorageVersionMigration, Error> {
        Ok(m.clone())
    }
    async fn delete_migration(&self, _: &str) -> Result<(), Error> {
        Ok(())
    }
    async fn patch_migration_status(
        &self,
        _: &str,
        _: &str,
        _: Option<&crate::api::StorageMigrationStatus>,
        _: &Condition,
    ) -> Result<(), Error> {
        Ok(())
    }
}

/// A key "apps/k", with automatic rotation off so that only what a test does happens.
fn key(spec: serde_json::Value) -> KmsKey {
    let mut spec = spec;
    spec["rotation"] = serde_json::json!({"automatic": false});
    let mut key = KmsKey::new("k", serde_json::from_value(spec).unwrap());
    key.metadata.namespace = Some("apps".into());
    key.metadata.uid = Some("uid-1".into());
    key.metadata.generation = Some(1);
    key.metadata.resource_version = Some("1".into());
    key
}

/// A context whose days last a microsecond, so a deletion window passes between two
/// reconciles.
fn context(cluster: Arc<Recording>, plugin_key: bool) -> Arc<Context> {
    audited_context(cluster, plugin_key, &AuditSink::default())
}

fn audited_context(cluster: Arc<Recording>, plugin_key: bool, audit: &AuditSink) -> Arc<Context> {
    let root = RootKey::from_material(KeyMaterial::generate().unwrap());
    context_with_root(cluster, plugin_key, audit, root, Default::default())
}

fn context_with_root(
    cluster: Arc<Recording>,
    plugin_key: bool,
    audit: &AuditSink,
    root: RootKey,
    rewrap: super::Rewrap,
) -> Arc<Context> {
    let mut registry = Registry::default();
    let keys = Arc::new(RwLock::new(reflector::store::<KmsKey>().0));
    Arc::new(Context {
        cluster,
        audit: audit.log(&root),
        root: Arc::new(root),
        material_cache: reflector::store::<KmsKeyMaterial>().0,
        calendar: Calendar { day: SignedDuration::from_micros(1) },
        metrics: Arc::new(ControllerMetrics::register(&mut registry, keys)),
        written: Default::default(),
        plugin_access: plugin_key.then(|| PluginAccess {
            key_namespace: "apps".into(),
            key_name: "k".into(),
            cluster_role: "plugin-material".into(),
        }),
        rewrap,
        rewrapped_at: Default::default(),
    })
}

/// The key as the watch would show it after the shell's writes.
fn after(mut key: KmsKey, cluster: &Recording, finalizer: bool) -> KmsKey {
    key.status = cluster.status.lock().unwrap().clone();
    key.metadata.finalizers = finalizer.then(|| vec![FINALIZER.to_owned()]);
    key
}

fn events(calls: &[Call]) -> Vec<Call> {
    calls.iter().filter(|c| matches!(c, Call::Event(_))).cloned().collect()
}

fn writes(calls: &[Call]) -> Vec<Call> {
    calls.iter().filter(|c| !matches!(c, Call::Event(_))).cloned().collect()
}

#[tokio::test]
async fn a_new_key_gets_its_finalizer_then_material_then_status_then_the_plugin_role() {
    let cluster = Arc::new(Recording::default());
    let ctx = context(cluster.clone(), true);
    reconcile(Arc::new(key(serde_json::json!({}))), ctx.clone()).await.unwrap();
    let calls = cluster.take();
    let plugin_role = Call::PluginRole { role: "plugin-material".into(), key_id: "uid-1".into() };
    assert_eq!(
        writes(&calls),
        [
            Call::AddFinalizer,
            Call::CreateMaterial { versions: 1 },
            Call::PatchStatus(Some(KeyState::Enabled)),
            plugin_role.clone()
        ]
    );
    let status_at = calls.iter().position(|c| *c == Call::PatchStatus(Some(KeyState::Enabled))).unwrap();
    let role_at = calls.iter().position(|c| *c == plugin_role).unwrap();
    assert!(
        calls[status_at + 1..role_at].iter().all(|c| matches!(c, Call::Event(_))) && status_at + 1 < role_at,
        "the Events announce the written status, before the plugin role: {calls:?}"
    );

    // Settled: a reconcile of the key as written writes nothing but the plugin role, which
    // is re-applied on every settled reconcile so that a reset role is repaired.
    let settled = after(key(serde_json::json!({})), &cluster, true);
    reconcile(Arc::new(settled), ctx).await.unwrap();
    assert_eq!(cluster.take(), [plugin_role]);
}

#[tokio::test]
async fn other_keys_do_not_touch_the_plugin_role() {
    let cluster = Arc::new(Recording::default());
    reconcile(Arc::new(key(serde_json::json!({}))), context(cluster.clone(), false)).await.unwrap();
    assert!(!cluster.take().iter().any(|c| matches!(c, Call::PluginRole { .. })));
}

#[tokio::test]
async fn a_rotation_writes_the_new_version_before_the_status_that_names_it() {
    let cluster = Arc::new(Recording::default());
    let ctx = context(cluster.clone(), false);
    reconcile(Arc::new(key(serde_json::json!({}))), ctx.clone()).await.unwrap();
    cluster.take();
    let mut rotate = after(key(serde_json::json!({"rotation": {"onDemandRequest": "r1"}})), &cluster, true);
    rotate.spec.rotation.on_demand_request = Some("r1".into());
    rotate.spec.rotation.automatic = false;
    rotate.metadata.generation = Some(2);
    reconcile(Arc::new(rotate), ctx).await.unwrap();
    let calls = cluster.take();
    assert_eq!(
        writes(&calls),
        [
            Call::ReplaceMaterial { versions: 2, promised: false, destroyed: false },
            Call::PatchStatus(Some(KeyState::Enabled))
        ]
    );
    assert_eq!(cluster.status.lock().unwrap().as_ref().and_then(|s| s.current_version), Some(2));
    assert!(!events(&calls).is_empty(), "the rotation is announced");
}

#[tokio::test]
async fn after_a_root_key_rotation_each_reconcile_rewraps_one_batch_and_status_counts_them() {
    let root = |b: u8| RootKey::from_material(KeyMaterial::from_slice(&[b; 32]).unwrap());
    let (fp_a, fp_b) = (root(1).fingerprint().to_owned(), root(2).fingerprint().to_owned());
    let cluster = Arc::new(Recording::default());
    let audit = AuditSink::default();
    let ctx_a = context_with_root(cluster.clone(), false, &audit, root(1), Default::default());
    reconcile(Arc::new(key(serde_json::json!({}))), ctx_a).await.unwrap();
    // Two more versions under A.
    let mut m = cluster.material.lock().unwrap().clone().unwrap();
    for _ in 0..2 {
        m = crate::keyring::with_rotation(&m, &root(1), VersionTrigger::Scheduled, None, Timestamp::now())
            .unwrap();
    }
    *cluster.material.lock().unwrap() = Some(m);
    cluster.take();

    let batch = super::Rewrap { batch: std::num::NonZeroUsize::new(2).unwrap(), pause: Default::default() };
    let ctx_b =
        context_with_root(cluster.clone(), false, &audit, root(2).with_previous(root(1)).unwrap(), batch);
    let uses = |cluster: &Recording| {
        let status = cluster.status.lock().unwrap().clone().unwrap();
        status.root_keys.iter().map(|r| (r.fingerprint.clone(), r.primary, r.versions)).collect::<Vec<_>>()
    };
    let replaced = Call::ReplaceMaterial { versions: 3, promised: false, destroyed: false };
    reconcile(Arc::new(after(key(serde_json::json!({})), &cluster, true)), ctx_b.clone()).await.unwrap();
    assert_eq!(writes(&cluster.take()), [Call::PatchStatus(Some(KeyState::Enabled)), replaced.clone()]);
    assert_eq!(uses(&cluster), [(fp_a.clone(), false, 3)], "status reports what was there before the batch");
    reconcile(Arc::new(after(key(serde_json::json!({})), &cluster, true)), ctx_b.clone()).await.unwrap();
    assert_eq!(writes(&cluster.take()), [Call::PatchStatus(Some(KeyState::Enabled)), replaced]);
    let mut after_two: Vec<_> = uses(&cluster);
    after_two.sort();
    let mut expected = vec![(fp_a.clone(), false, 1), (fp_b.clone(), true, 2)];
    expected.sort();
    assert_eq!(after_two, expected);
    // The last batch done, the next reconcile reports it and writes no material.
    reconcile(Arc::new(after(key(serde_json::json!({})), &cluster, true)), ctx_b.clone()).await.unwrap();
    assert_eq!(writes(&cluster.take()), [Call::PatchStatus(Some(KeyState::Enabled))]);
    assert_eq!(uses(&cluster), [(fp_b.clone(), true, 3)]);
    reconcile(Arc::new(after(key(serde_json::json!({})), &cluster, true)), ctx_b).await.unwrap();
    assert_eq!(writes(&cluster.take()), [], "settled");
    // Every version unwraps with B alone.
    let m = cluster.material.lock().unwrap().clone().unwrap();
    for v in &m.spec.versions {
        crate::keyring::unwrap_version(&root(2), &m, v).unwrap();
    }
}

#[tokio::test]
async fn a_deleted_key_goes_material_then_status_then_tombstone_then_finalizer() {
    let cluster = Arc::new(Recording::default());
    let ctx = context(cluster.clone(), false);
    reconcile(Arc::new(key(serde_json::json!({}))), ctx.clone()).await.unwrap();
    // Schedule deletion: the deletion time is promised in the material object before
    // status reports it; nothing is destroyed yet.
    let spec = serde_json::json!({"deletion": {"scheduled": true, "pendingWindowDays": 7}});
    let mut scheduled = after(key(spec.clone()), &cluster, true);
    scheduled.metadata.generation = Some(2);
    cluster.take();
    reconcile(Arc::new(scheduled.clone()), ctx.clone()).await.unwrap();
    assert_eq!(
        writes(&cluster.take()),
        [
            Call::ReplaceMaterial { versions: 1, promised: true, destroyed: false },
            Call::PatchStatus(Some(KeyState::PendingDeletion))
        ]
    );

    // `kubectl delete` once the window has passed: seven microsecond days, rounded up to
    // the next second.
    let due = cluster.material.lock().unwrap().as_ref().and_then(|m| m.spec.deletion_time.clone()).unwrap().0;
    let reported = cluster.status.lock().unwrap().as_ref().and_then(|s| s.deletion_time.clone());
    assert_eq!(reported.map(|t| t.0), Some(due), "status reports the promise");
    while Timestamp::now() < due {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut deleted = after(scheduled, &cluster, true);
    deleted.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    reconcile(Arc::new(deleted), ctx).await.unwrap();
    assert_eq!(
        writes(&cluster.take()),
        [
            Call::ReplaceMaterial { versions: 0, promised: true, destroyed: true },
            Call::PatchStatus(Some(KeyState::Destroyed)),
            Call::DeleteUsage,
            Call::DeleteMaterial,
            Call::RemoveFinalizer
        ]
    );
}

#[tokio::test]
async fn a_failed_material_write_writes_no_status() {
    let cluster = Arc::new(Recording::default());
    *cluster.fail_material_write.lock().unwrap() = Some(500);
    let ctx = context(cluster.clone(), true);
    let err = reconcile(Arc::new(key(serde_json::json!({}))), ctx).await.unwrap_err();
    assert_eq!(err.category(), "material_update");
    let calls = cluster.take();
    assert_eq!(writes(&calls), [Call::AddFinalizer], "no status, no plugin role without material");
    assert_eq!(events(&calls), [Call::Event("ReconcileFailed".into())]);
}

#[tokio::test]
async fn every_transition_is_audited_before_status_reports_it() {
    let cluster = Arc::new(Recording::default());
    let audit = AuditSink::default();
    let ctx = audited_context(cluster.clone(), false, &audit);
    let mut created = key(serde_json::json!({}));
    created.metadata.managed_fields =
        Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some("kubectl-client-side-apply".into()),
            operation: Some("Update".into()),
            time: Some(Time(Timestamp::UNIX_EPOCH)),
            ..Default::default()
        }]);
    reconcile(Arc::new(created.clone()), ctx.clone()).await.unwrap();
    let lines = audit.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(
        (
            &line["component"],
            &line["operation"],
            &line["principal"],
            &line["key"],
            &line["keyVersion"],
            &line["result"]
        ),
        (
            &"controller".into(),
            &"KeyCreated".into(),
            &"manager:kubectl-client-side-apply".into(),
            &"apps/k".into(),
            &1.into(),
            &"OK".into()
        )
    );
    cluster.take();

    // An audit log that cannot be written: the transition is not reported, and the retry
    // audits it.
    audit.fail(true);
    let mut disable = after(created, &cluster, true);
    disable.spec.enabled = false;
    disable.metadata.generation = Some(2);
    let err = reconcile(Arc::new(disable.clone()), ctx.clone()).await.unwrap_err();
    assert_eq!(err.category(), "audit");
    assert!(
        !writes(&cluster.take()).iter().any(|c| matches!(c, Call::PatchStatus(_))),
        "no status without its audit line"
    );
    audit.fail(false);
    reconcile(Arc::new(disable), ctx).await.unwrap();
    assert_eq!(writes(&cluster.take()), [Call::PatchStatus(Some(KeyState::Disabled))]);
    assert_eq!(audit.lines().last().unwrap()["operation"], "KeyDisabled");
}
