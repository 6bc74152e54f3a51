//! Re-encryption after rotation: a thin shell around [`migration_plan::plan`] that reads a
//! key's usage, material and StorageVersionMigrations, carries out the planned step
//! (create or delete a StorageVersionMigration, write the material's storage record) and
//! reports the migration in the key's status (its own field manager), in Events, in the
//! audit trail and in metrics.
//!
//! kube-controller-manager's storage version migrator does the rewriting: it patches every
//! object of a resource, and kube-apiserver writes an object whose stored key id is not the
//! current one anew, under the current version. kubekms never reads those objects itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::storagemigration::v1::{StorageVersionMigration, StorageVersionMigrationSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, GroupResource, ObjectMeta, Time};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource as _, ResourceExt};

use super::cluster::MIGRATION_FIELD_MANAGER;
use super::migration_plan::{
    self, Backoff, Material, Migration, Observed, Phase, Plan, Record, Report, Resource, Transition,
};
use super::{Context, Error};
use crate::api::{KmsKey, KmsKeyMaterial, StorageMigrationStatus, StorageRecord};
use crate::audit::AuditEvent;
use crate::domain::Usage;

/// Labels and annotations of the StorageVersionMigrations kubekms creates.
pub const KEY_UID_LABEL: &str = "kms.kubekms.io/key-uid";
pub const VERSION_LABEL: &str = "kms.kubekms.io/key-version";
pub const ATTEMPT_LABEL: &str = "kms.kubekms.io/attempt";
pub const KEY_ANNOTATION: &str = "kms.kubekms.io/key";

/// What the migration reconciler shares.
pub struct MigrationContext {
    pub inner: Arc<Context>,
    /// The resources kube-apiserver encrypts with the plugin's key.
    pub resources: Vec<Resource>,
    pub backoff: Backoff,
    /// The reports this reconciler wrote that the watch cache may not show yet, per key
    /// UID: what the cache showed before the write, and the write.
    written: Mutex<HashMap<String, (Option<StorageMigrationStatus>, Report)>>,
}

impl MigrationContext {
    pub fn new(inner: Arc<Context>, resources: Vec<Resource>, backoff: Backoff) -> Self {
        MigrationContext { inner, resources, backoff, written: Mutex::default() }
    }
}

pub async fn reconcile(key: Arc<KmsKey>, ctx: Arc<MigrationContext>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_key(&key, &ctx).await;
    ctx.inner.metrics.observe_reconcile("StorageMigration", started, &result);
    result
}

pub fn error_policy(_key: Arc<KmsKey>, error: &Error, _ctx: Arc<MigrationContext>) -> Action {
    tracing::warn!(error = %error, category = error.category(), "storage migration reconcile failed");
    Action::requeue(if error.is_conflict() { Duration::from_secs(1) } else { Duration::from_secs(15) })
}

/// The KmsKey a StorageVersionMigration of kubekms's is about (its annotation).
pub fn migration_key(migration: &StorageVersionMigration) -> Option<ObjectRef<KmsKey>> {
    let (ns, name) = migration.annotations().get(KEY_ANNOTATION)?.split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}

async fn reconcile_key(key: &KmsKey, ctx: &MigrationContext) -> Result<Action, Error> {
    let owner = super::key::owner(key)?;
    let cluster = ctx.inner.cluster.as_ref();
    let usage = cluster.usage(&owner.uid).await?.map(|u| Usage::from(&u));
    if !usage.as_ref().is_some_and(Usage::is_storage_key) {
        // Not the key of a KMS plugin (it never had a migration): woken when its usage changes.
        return Ok(Action::await_change());
    }
    let all = cluster.migrations().await?;
    let running = all.iter().filter_map(parse).filter(|m| !m.phase.finished()).count();
    ctx.inner.metrics.storage_migrations_running.set(i64::try_from(running).unwrap_or(i64::MAX));
    let mut mine: Vec<Migration> =
        all.iter().filter(|m| m.labels().get(KEY_UID_LABEL) == Some(&owner.uid)).filter_map(parse).collect();
    let other_running = all
        .iter()
        .filter(|m| m.labels().get(KEY_UID_LABEL) != Some(&owner.uid))
        .find(|m| parse(m).is_some_and(|p| !p.phase.finished()))
        .map(|m| m.annotations().get(KEY_ANNOTATION).cloned().unwrap_or_else(|| m.name_any()));
    let mut material = cluster.material(&owner.uid).await?;
    let cached = key.status.clone().unwrap_or_default();
    let last = last_report(ctx, &owner.uid, &cached);
    let conditions = [last.condition.clone()];
    let generation = key.meta().generation.unwrap_or(0);
    // Migrations recorded in this reconcile, announced once status is written.
    let mut announced = Vec::new();
    for _ in 0..16 {
        let view = material_view(material.as_ref());
        let observed = Observed {
            key_id: &owner.uid,
            generation,
            material: &view,
            usage: usage.as_ref(),
            resources: &ctx.resources,
            migrations: &mine,
            other_running: other_running.as_deref(),
            conditions: &conditions,
        };
        let now = Timestamp::now();
        match migration_plan::plan(&observed, now, ctx.backoff) {
            Plan::Act(migration_plan::Action::Create { name, version, resource, attempt }) => {
                let object = new_migration(key, &owner.uid, &name, version, &resource, attempt);
                let created = cluster.create_migration(&object).await?;
                tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), %name, version, %resource, attempt, "created a StorageVersionMigration");
                // As stored (its creation time is the API server's); one that is not what
                // kubekms writes stops this reconcile rather than being created again.
                mine.retain(|m| m.name != name);
                mine.push(parse(&created).ok_or(Error::Unsettled)?);
            }
            Plan::Act(migration_plan::Action::Record { version, migrated_at, resources }) => {
                let Some(current) = material.as_ref() else { return Err(Error::Unsettled) };
                // Audited before it is recorded: a success that cannot be audited is not
                // recorded (and is audited again by the retry).
                let success = migration_plan::recorded(version, &resources);
                audit(ctx, &owner, &success)?;
                let mut updated = current.clone();
                updated.spec.storage = Some(StorageRecord {
                    oldest_version_in_use: version,
                    migrated_at: Time(migrated_at),
                    resources,
                });
                match cluster.replace_material(&updated).await {
                    Ok(written) => {
                        tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), version, "recorded that stored data is encrypted under this version or later");
                        material = Some(written);
                        announced.push(success);
                    }
                    Err(e) if e.is_conflict() => material = cluster.material(&owner.uid).await?,
                    Err(e) => return Err(e),
                }
            }
            Plan::Act(migration_plan::Action::Delete { name }) => {
                cluster.delete_migration(&name).await?;
                tracing::debug!(%name, "deleted a superseded StorageVersionMigration");
                mine.retain(|m| m.name != name);
            }
            Plan::Settle { report, requeue_after } => {
                settle(ctx, key, &owner, &cached, last, report, announced).await?;
                let wait = requeue_after.and_then(|d| Duration::try_from(d).ok());
                return Ok(wait.map_or_else(Action::await_change, |d| Action::requeue(d.min(MAX_REQUEUE))));
            }
        }
    }
    Err(Error::Unsettled)
}

/// The longest wait before looking at a key again.
const MAX_REQUEUE: Duration = Duration::from_secs(3600);

/// What status shows of the migration, or, while the watch cache does not show this
/// reconciler's last write yet, that write.
fn last_report(ctx: &MigrationContext, uid: &str, cached: &crate::api::KmsKeyStatus) -> Report {
    let shown = Report {
        migration: cached.storage_migration.clone(),
        condition: cached
            .conditions
            .iter()
            .find(|c| c.type_ == migration_plan::STORAGE_MIGRATED)
            .cloned()
            .unwrap_or_else(|| Condition {
                type_: String::new(),
                status: String::new(),
                reason: String::new(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }),
    };
    match ctx.written.lock().ok().and_then(|w| w.get(uid).cloned()) {
        Some((before, written)) if before == shown.migration && shown != written => written,
        _ => shown,
    }
}

/// Writes the report if it differs from the last one (the transitions it shows audited
/// first), then announces and counts those transitions and the successes recorded.
async fn settle(
    ctx: &MigrationContext,
    key: &KmsKey,
    owner: &crate::keyring::Owner,
    cached: &crate::api::KmsKeyStatus,
    last: Report,
    report: Option<Report>,
    announced: Vec<Transition>,
) -> Result<(), Error> {
    let cluster = ctx.inner.cluster.as_ref();
    let mut transitions = announced;
    if let Some(report) = report.filter(|r| *r != last) {
        let shown = migration_plan::transitions(last.migration.as_ref(), report.migration.as_ref());
        for t in &shown {
            audit(ctx, owner, t)?;
        }
        cluster
            .patch_migration_status(
                &owner.namespace,
                &owner.name,
                report.migration.as_ref(),
                &report.condition,
            )
            .await?;
        if let Ok(mut written) = ctx.written.lock() {
            written.insert(owner.uid.clone(), (cached.storage_migration.clone(), report));
        }
        transitions.extend(shown);
    }
    let reference = key.object_ref(&());
    for t in transitions {
        ctx.inner
            .metrics
            .storage_migrations
            .get_or_create(&super::metrics::MigrationLabels { result: t.result })
            .inc();
        let event = Event {
            type_: if t.warning { EventType::Warning } else { EventType::Normal },
            reason: t.reason.to_owned(),
            note: Some(t.note),
            action: t.action.to_owned(),
            secondary: None,
        };
        cluster.publish(&reference, event).await;
    }
    Ok(())
}

/// One chained audit line for a migration transition.
fn audit(ctx: &MigrationContext, owner: &crate::keyring::Owner, t: &Transition) -> Result<(), Error> {
    let event = AuditEvent {
        component: "controller",
        request_id: uuid::Uuid::new_v4().to_string(),
        principal: MIGRATION_FIELD_MANAGER.to_owned(),
        operation: t.reason,
        key: Some(format!("{}/{}", owner.namespace, owner.name)),
        key_id: Some(owner.uid.clone()),
        key_version: Some(t.version),
        result: if t.warning { "Failed" } else { "OK" },
        reason: Some(t.note.clone()),
        ..Default::default()
    };
    ctx.inner.audit.record(&event).map_err(Error::Audit)
}

/// What the planner needs of the material object.
fn material_view(material: Option<&KmsKeyMaterial>) -> Material {
    match material {
        Some(m) if m.spec.destroyed_at.is_none() && !m.spec.versions.is_empty() => Material::Present {
            versions: m.spec.versions.iter().map(|v| v.version).collect(),
            storage: m
                .spec
                .storage
                .as_ref()
                .map(|r| Record { oldest_in_use: r.oldest_version_in_use, migrated_at: r.migrated_at.0 }),
        },
        _ => Material::Gone,
    }
}

/// A StorageVersionMigration of `resource` to `version` of `key`.
fn new_migration(
    key: &KmsKey,
    key_id: &str,
    name: &str,
    version: u32,
    resource: &Resource,
    attempt: u32,
) -> StorageVersionMigration {
    let labels = BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "kubekms".to_owned()),
        (KEY_UID_LABEL.to_owned(), key_id.to_owned()),
        (VERSION_LABEL.to_owned(), version.to_string()),
        (ATTEMPT_LABEL.to_owned(), attempt.to_string()),
    ]);
    let key_name = format!("{}/{}", key.namespace().unwrap_or_default(), key.name_any());
    StorageVersionMigration {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(KEY_ANNOTATION.to_owned(), key_name)])),
            ..Default::default()
        },
        spec: Some(StorageVersionMigrationSpec {
            resource: GroupResource { group: resource.group.clone(), resource: resource.resource.clone() },
        }),
        status: None,
    }
}

/// One of kubekms's StorageVersionMigrations as the planner sees it; `None` for one whose
/// labels or spec are not what kubekms writes (it is left alone).
pub fn parse(object: &StorageVersionMigration) -> Option<Migration> {
    let labels = object.labels();
    let version = labels.get(VERSION_LABEL)?.parse().ok()?;
    let attempt = labels.get(ATTEMPT_LABEL)?.parse().ok()?;
    let spec = object.spec.as_ref()?;
    let conditions = object.status.as_ref().and_then(|s| s.conditions.as_deref()).unwrap_or_default();
    let holds = |type_: &str| conditions.iter().find(|c| c.type_ == type_ && c.status == "True");
    let (phase, last) = match (holds("Succeeded"), holds("Failed"), holds("Running")) {
        (Some(c), _, _) => (Phase::Succeeded, Some(c)),
        (None, Some(c), _) => (Phase::Failed, Some(c)),
        (None, None, Some(c)) => (Phase::Running, Some(c)),
        (None, None, None) => (Phase::Pending, None),
    };
    Some(Migration {
        name: object.name_any(),
        version,
        resource: Resource { group: spec.resource.group.clone(), resource: spec.resource.resource.clone() },
        attempt,
        phase,
        created: object.meta().creation_timestamp.as_ref().map_or(Timestamp::UNIX_EPOCH, |t| t.0),
        finished: last.filter(|_| phase.finished()).map(|c| c.last_transition_time.0),
        message: last.map(|c| c.message.clone()).unwrap_or_default(),
    })
}
