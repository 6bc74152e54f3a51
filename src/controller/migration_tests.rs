//! The storage migration shell against a fake cluster: what it creates, records and
//! reports, in which order, and that it reports a change once. The planner's decisions are
//! tested in `migration_plan_tests.rs`; these pin the shell.

use std::sync::{Arc, Mutex, RwLock};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::storagemigration::v1::{StorageVersionMigration, StorageVersionMigrationStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::Event;
use kube::runtime::reflector;
use prometheus_client::registry::Registry;
use serde_json::json;

use super::cluster::Cluster;
use super::lifecycle::Calendar;
use super::metrics::{ControllerMetrics, MigrationLabels};
use super::migration::{MigrationContext, reconcile};
use super::migration_plan::{Backoff, STORAGE_MIGRATED};
use super::{Context, Error};
use crate::api::{
    KmsGrantStatus, KmsKey, KmsKeyMaterial, KmsKeyStatus, KmsKeyUsage, StorageMigrationPhase,
    StorageMigrationStatus,
};
use crate::crypto::{KeyMaterial, RootKey};
use crate::keyring::Owner;
use crate::testing::AuditSink;

const UID: &str = "0123abcd-0000-0000-0000-000000000000";

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Create(String),
    Delete(String),
    Record(u32),
    Status(Option<StorageMigrationPhase>, String),
    Event(String),
}

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<Call>>,
    material: Mutex<Option<KmsKeyMaterial>>,
    usage: Mutex<Option<KmsKeyUsage>>,
    svms: Mutex<Vec<StorageVersionMigration>>,
    status: Mutex<KmsKeyStatus>,
    /// The next material replace fails with a conflict (someone else wrote it meanwhile).
    conflict: Mutex<bool>,
}

impl Fake {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// The migrator finishes every migration with `condition` (Succeeded or Failed).
    fn finish(&self, condition: &str) {
        for m in self.svms.lock().unwrap().iter_mut() {
            if m.status.is_none() {
                m.status = Some(StorageVersionMigrationStatus {
                    conditions: Some(vec![Condition {
                        type_: condition.into(),
                        status: "True".into(),
                        reason: condition.into(),
                        message: "done".into(),
                        observed_generation: None,
                        last_transition_time: Time(Timestamp::now()),
                    }]),
                    resource_version: Some("1".into()),
                });
            }
        }
    }
}

fn not_here() -> Error {
    Error::MissingField("a call the storage migration does not make")
}

#[tonic::async_trait]
impl Cluster for Fake {
    async fn set_finalizer(&self, _: &KmsKey, _: &str, _: Option<String>, _: bool) -> Result<(), Error> {
        Err(not_here())
    }
    async fn material(&self, _: &str) -> Result<Option<KmsKeyMaterial>, Error> {
        Ok(self.material.lock().unwrap().clone())
    }
    async fn usage(&self, _: &str) -> Result<Option<KmsKeyUsage>, Error> {
        Ok(self.usage.lock().unwrap().clone())
    }
    async fn delete_usage(&self, _: &str) -> Result<(), Error> {
        Err(not_here())
    }
    async fn create_material(&self, _: &Owner, _: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        Err(not_here())
    }
    async fn replace_material(&self, object: &KmsKeyMaterial) -> Result<KmsKeyMaterial, Error> {
        if std::mem::take(&mut *self.conflict.lock().unwrap()) {
            let source =
                kube::Error::Api(kube::core::Status::failure("changed", "Conflict").with_code(409).boxed());
            return Err(Error::Material(crate::keyring::MaterialError::Update { name: UID.into(), source }));
        }
        self.record(Call::Record(object.spec.storage.as_ref().map_or(0, |s| s.oldest_version_in_use)));
        *self.material.lock().unwrap() = Some(object.clone());
        Ok(object.clone())
    }
    async fn delete_material(&self, _: &str) -> Result<(), Error> {
        Err(not_here())
    }
    async fn patch_key_status(&self, _: &str, _: &str, _: &KmsKeyStatus) -> Result<Option<String>, Error> {
        Err(not_here())
    }
    async fn fresh_key(&self, _: &str, _: &str) -> Option<KmsKey> {
        None
    }
    async fn report_creating(&self, _: &str, _: &str, _: Option<String>, _: &Condition) {}
    async fn patch_grant_status(&self, _: &str, _: &str, _: &KmsGrantStatus) -> Result<(), Error> {
        Err(not_here())
    }
    async fn rbac_allows(
        &self,
        _: &crate::domain::Identity,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<bool, Error> {
        Err(not_here())
    }
    async fn apply_plugin_role(&self, _: &str, _: &str) -> Result<(), Error> {
        Err(not_here())
    }
    async fn server_time(&self) -> Result<Timestamp, Error> {
        Err(not_here())
    }
    async fn publish(&self, _: &ObjectReference, event: Event) {
        self.record(Call::Event(event.reason));
    }
    async fn migrations(&self) -> Result<Vec<StorageVersionMigration>, Error> {
        Ok(self.svms.lock().unwrap().clone())
    }
    async fn create_migration(
        &self,
        migration: &StorageVersionMigration,
    ) -> Result<StorageVersionMigration, Error> {
        let mut svms = self.svms.lock().unwrap();
        if let Some(existing) = svms.iter().find(|m| m.metadata.name == migration.metadata.name) {
            return Ok(existing.clone());
        }
        let mut stored = migration.clone();
        stored.metadata.creation_timestamp = Some(Time(Timestamp::now()));
        svms.push(stored.clone());
        self.record(Call::Create(migration.metadata.name.clone().unwrap_or_default()));
        Ok(stored)
    }
    async fn delete_migration(&self, name: &str) -> Result<(), Error> {
        self.svms.lock().unwrap().retain(|m| m.metadata.name.as_deref() != Some(name));
        self.record(Call::Delete(name.into()));
        Ok(())
    }
    async fn patch_migration_status(
        &self,
        _: &str,
        _: &str,
        migration: Option<&StorageMigrationStatus>,
        condition: &Condition,
    ) -> Result<(), Error> {
        let mut status = self.status.lock().unwrap();
        status.storage_migration = migration.cloned();
        status.conditions.retain(|c| c.type_ != STORAGE_MIGRATED);
        status.conditions.push(condition.clone());
        self.record(Call::Status(migration.map(|m| m.phase), condition.reason.clone()));
        Ok(())
    }
}

fn material(versions: u32) -> KmsKeyMaterial {
    let versions: Vec<_> = (1..=versions)
        .map(|v| json!({"version": v, "created": "2026-01-01T00:00:00Z", "trigger": "Created", "wrapped": "x"}))
        .collect();
    let mut m: KmsKeyMaterial = serde_json::from_value(json!({
        "apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsKeyMaterial", "metadata": {"name": UID},
        "spec": {"owner": {"namespace": "kube-system", "name": "k", "uid": UID}, "origin": "KUBEKMS",
                 "rootKeyFingerprint": "f", "versions": versions},
    }))
    .unwrap();
    m.metadata.resource_version = Some("1".into());
    m
}

fn usage(encrypted: &[u32]) -> KmsKeyUsage {
    let versions: Vec<_> =
        encrypted.iter().map(|v| json!({"version": v, "lastEncrypt": "2026-01-01T00:00:00Z"})).collect();
    serde_json::from_value(json!({
        "apiVersion": "kms.kubekms.io/v1alpha1", "kind": "KmsKeyUsage", "metadata": {"name": UID},
        "spec": {"owner": {"namespace": "kube-system", "name": "k", "uid": UID},
                 "reporters": [{"name": "plugin/a", "kind": "StoragePlugin", "granularitySeconds": 86400,
                                "versions": versions}]},
    }))
    .unwrap()
}

fn key(status: KmsKeyStatus) -> Arc<KmsKey> {
    let mut key = KmsKey::new("k", serde_json::from_value(json!({})).unwrap());
    key.metadata.namespace = Some("kube-system".into());
    key.metadata.uid = Some(UID.into());
    key.metadata.generation = Some(1);
    key.status = Some(status);
    Arc::new(key)
}

fn context(fake: Arc<Fake>, audit: &AuditSink) -> Arc<MigrationContext> {
    let mut registry = Registry::default();
    let keys = Arc::new(RwLock::new(reflector::store::<KmsKey>().0));
    let root = RootKey::from_material(KeyMaterial::generate().unwrap());
    let inner = Arc::new(Context {
        cluster: fake,
        audit: audit.log(&root),
        root: Arc::new(root),
        material_cache: reflector::store::<KmsKeyMaterial>().0,
        calendar: Calendar { day: SignedDuration::from_hours(24) },
        metrics: Arc::new(ControllerMetrics::register(&mut registry, keys)),
        written: Default::default(),
        plugin_access: None,
        rewrap: Default::default(),
        rewrapped_at: Default::default(),
    });
    Arc::new(MigrationContext::new(inner, vec!["secrets".parse().unwrap()], Backoff::default()))
}

fn counted(ctx: &MigrationContext, result: &'static str) -> u64 {
    ctx.inner.metrics.storage_migrations.get_or_create(&MigrationLabels { result }).get()
}

#[tokio::test]
async fn a_rotation_is_migrated_recorded_and_reported_once() {
    let fake = Arc::new(Fake::default());
    *fake.material.lock().unwrap() = Some(material(2));
    *fake.usage.lock().unwrap() = Some(usage(&[1]));
    let audit = AuditSink::default();
    let ctx = context(fake.clone(), &audit);
    let name = "kubekms-0123abcd-v2-secrets-1".to_owned();

    // kube-apiserver has not re-seeded yet: Waiting, nothing created.
    reconcile(key(KmsKeyStatus::default()), ctx.clone()).await.unwrap();
    assert_eq!(
        fake.take(),
        [Call::Status(Some(StorageMigrationPhase::Waiting), "WaitingForApiServer".into())]
    );

    *fake.usage.lock().unwrap() = Some(usage(&[1, 2]));
    let stale = fake.status.lock().unwrap().clone();
    reconcile(key(stale.clone()), ctx.clone()).await.unwrap();
    assert_eq!(
        fake.take(),
        [
            Call::Create(name.clone()),
            Call::Status(Some(StorageMigrationPhase::Running), "MigrationRunning".into()),
            Call::Event("StorageMigrationStarted".into()),
        ]
    );
    // Woken again before the watch shows that status write: nothing is written or
    // announced twice, and the migration is not created again.
    reconcile(key(stale), ctx.clone()).await.unwrap();
    assert_eq!(fake.take(), []);

    fake.finish("Succeeded");
    let shown = fake.status.lock().unwrap().clone();
    reconcile(key(shown), ctx.clone()).await.unwrap();
    assert_eq!(
        fake.take(),
        [
            Call::Record(2),
            Call::Status(Some(StorageMigrationPhase::Succeeded), "MigrationSucceeded".into()),
            Call::Event("StorageMigrationSucceeded".into()),
        ]
    );
    let record = fake.material.lock().unwrap().clone().unwrap().spec.storage.unwrap();
    assert_eq!((record.oldest_version_in_use, record.resources), (2, vec!["secrets".to_owned()]));
    let shown = fake.status.lock().unwrap().clone();
    reconcile(key(shown), ctx.clone()).await.unwrap();
    assert_eq!(fake.take(), [], "settled");

    let ops: Vec<String> =
        audit.lines().iter().map(|l| l["operation"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ops, ["StorageMigrationStarted", "StorageMigrationSucceeded"]);
    assert_eq!(audit.lines()[1]["keyVersion"], 2);
    assert_eq!((counted(&ctx, "started"), counted(&ctx, "succeeded"), counted(&ctx, "failed")), (1, 1, 0));
}

#[tokio::test]
async fn a_failure_is_a_warning_and_a_conflicting_record_is_written_again() {
    let fake = Arc::new(Fake::default());
    *fake.material.lock().unwrap() = Some(material(2));
    *fake.usage.lock().unwrap() = Some(usage(&[1, 2]));
    let audit = AuditSink::default();
    let ctx = context(fake.clone(), &audit);
    reconcile(key(KmsKeyStatus::default()), ctx.clone()).await.unwrap();
    fake.take();
    fake.finish("Failed");
    let shown = fake.status.lock().unwrap().clone();
    reconcile(key(shown), ctx.clone()).await.unwrap();
    assert_eq!(
        fake.take(),
        [
            Call::Status(Some(StorageMigrationPhase::Failed), "MigrationFailed".into()),
            Call::Event("StorageMigrationFailed".into()),
        ]
    );
    assert_eq!(audit.lines().last().unwrap()["result"], "Failed");
    assert_eq!(counted(&ctx, "failed"), 1);

    // A successful attempt whose record loses a race is written again on the fresh material.
    fake.svms.lock().unwrap().clear();
    fake.take();
    let shown = fake.status.lock().unwrap().clone();
    reconcile(key(shown), ctx.clone()).await.unwrap();
    fake.take();
    fake.finish("Succeeded");
    *fake.conflict.lock().unwrap() = true;
    let shown = fake.status.lock().unwrap().clone();
    reconcile(key(shown), ctx.clone()).await.unwrap();
    let calls = fake.take();
    assert_eq!(calls.iter().filter(|c| **c == Call::Record(2)).count(), 1, "{calls:?}");
}

#[tokio::test]
async fn a_key_no_plugin_serves_is_not_touched() {
    let fake = Arc::new(Fake::default());
    *fake.material.lock().unwrap() = Some(material(3));
    let ctx = context(fake.clone(), &AuditSink::default());
    reconcile(key(KmsKeyStatus::default()), ctx).await.unwrap();
    assert_eq!(fake.take(), []);
}

#[tokio::test]
async fn a_destroyed_key_loses_its_migrations() {
    let fake = Arc::new(Fake::default());
    *fake.material.lock().unwrap() = Some(material(2));
    *fake.usage.lock().unwrap() = Some(usage(&[1, 2]));
    let ctx = context(fake.clone(), &AuditSink::default());
    reconcile(key(KmsKeyStatus::default()), ctx.clone()).await.unwrap();
    fake.take();
    let mut destroyed = material(0);
    destroyed.spec.destroyed_at = Some(Time(Timestamp::now()));
    *fake.material.lock().unwrap() = Some(destroyed);
    let shown = fake.status.lock().unwrap().clone();
    reconcile(key(shown), ctx).await.unwrap();
    assert_eq!(fake.take(), [Call::Delete("kubekms-0123abcd-v2-secrets-1".into())]);
    assert!(fake.svms.lock().unwrap().is_empty());
}
