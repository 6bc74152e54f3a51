//! Reconciling one KmsKey: a thin shell around [`lifecycle::plan`] that reads the
//! material, carries out the planned material change, writes status (server-side apply,
//! only when it changed) and publishes an Event per transition.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::cluster::{ERROR_FIELD_MANAGER, FIELD_MANAGER};
use super::lifecycle::{self, Material, MaterialAction, Observed, Plan, VersionInfo};
use super::{Context, Error};
use crate::api::{KeyState, KmsKey, KmsKeyMaterial, KmsKeyStatus, VersionTrigger};
use crate::audit::AuditEvent;
use crate::crypto::KeyMaterial;
use crate::keyring::{self, Owner};
use crate::telemetry::error_chain;

/// Guards what the garbage collector cannot: a KmsKey goes away only after its material
/// has been destroyed (the material object is cluster-scoped and has no owner reference).
pub const FINALIZER: &str = "kms.kubekms.io/destroy-material";

/// The longest the controller waits before looking at a key again, so a clock that was
/// corrected or a missed event is noticed within this time.
const MAX_REQUEUE: Duration = Duration::from_secs(3600);

pub async fn reconcile(key: Arc<KmsKey>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_key(&key, &ctx).await;
    let m = &ctx.metrics;
    m.reconcile_seconds
        .get_or_create(&super::metrics::KindLabels { kind: "KmsKey" })
        .observe(started.elapsed().as_secs_f64());
    let outcome = if result.is_ok() { "ok" } else { "error" };
    m.reconciles.get_or_create(&super::metrics::ResultLabels { kind: "KmsKey", result: outcome }).inc();
    if let Err(e) = &result {
        m.errors.get_or_create(&super::metrics::ErrorLabels { kind: "KmsKey", category: e.category() }).inc();
        report_failure(&key, &ctx, e).await;
    }
    result
}

pub fn error_policy(_key: Arc<KmsKey>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, category = error.category(), "reconcile failed");
    Action::requeue(if error.is_conflict() { Duration::from_secs(1) } else { Duration::from_secs(15) })
}

pub(super) fn owner(key: &KmsKey) -> Result<Owner, Error> {
    Ok(Owner {
        namespace: key.namespace().ok_or(Error::MissingField("metadata.namespace"))?,
        name: key.name_any(),
        uid: key.uid().ok_or(Error::MissingField("metadata.uid"))?,
    })
}

async fn reconcile_key(key: &KmsKey, ctx: &Context) -> Result<Action, Error> {
    let owner = owner(key)?;
    let cluster = ctx.cluster.as_ref();
    let deleting = key.meta().deletion_timestamp.is_some();
    let has_finalizer = key.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        cluster.set_finalizer(key, FINALIZER, key.resource_version(), true).await?;
    }

    let cached_status = key.status.clone().unwrap_or_default();
    let status = ctx.written.current(&owner.uid, &cached_status);
    let mut material = current_material(ctx, &owner.uid, &status).await?;
    let mut now = Timestamp::now();
    let mut clock_checked = false;
    let generation = key.meta().generation.unwrap_or(0);
    // Read once per reconcile: what was used decides refusals and postponements, and is
    // read fresh when a deletion is asked for or falls due (both reconcile).
    let usage = cluster.usage(&owner.uid).await?.map(|u| crate::domain::Usage::from(&u));
    for _ in 0..5 {
        let view = material_view(material.as_ref(), &ctx.root);
        let spec = material.as_ref().map(|m| &m.spec);
        let promised_deletion = spec.and_then(|s| s.deletion_time.as_ref()).map(|t| t.0);
        let observed = Observed {
            spec: &key.spec,
            generation,
            deleting,
            status: &status,
            material: &view,
            promised_deletion,
            deletion_refused: spec.and_then(|s| s.deletion_refused.as_ref()).map(|r| r.message.as_str()),
            storage_oldest: spec.and_then(|s| s.storage.as_ref()).map(|s| s.oldest_version_in_use),
            usage: usage.as_ref(),
            awaiting_restore: key.annotations().get(keyring::RESTORE_ANNOTATION).map(String::as_str),
            valid_to: spec.and_then(|s| s.imported.as_ref()?.valid_to.as_ref()).map(|t| t.0),
        };
        match lifecycle::plan(&observed, now, ctx.calendar) {
            Plan::Act(action) => {
                // Promising a deletion time: measure the waiting period from the later of
                // this controller's clock and the API server's, so a controller whose clock
                // is behind cannot promise an early destruction.
                let promises = matches!(
                    action,
                    MaterialAction::ScheduleDeletion { .. }
                        | MaterialAction::ScheduleVersionDestruction { .. }
                );
                if promises && !clock_checked {
                    clock_checked = true;
                    let server_now = cluster.server_time().await?;
                    if server_now > now {
                        now = server_now;
                        continue;
                    }
                }
                let due = match &action {
                    MaterialAction::Destroy => promised_deletion,
                    MaterialAction::DestroyVersion { version } => spec
                        .and_then(|s| s.versions.iter().find(|v| v.version == *version))
                        .and_then(|v| v.deletion_time.as_ref())
                        .map(|t| t.0),
                    _ => None,
                };
                if let Some(wait) = api_server_not_yet_due(ctx, due).await? {
                    return Ok(Action::requeue(wait));
                }
                match apply(ctx, key, &owner, material.as_ref(), &action, now).await {
                    Ok(updated) => material = Some(updated),
                    Err(e) if e.is_conflict() => material = cluster.material(&owner.uid).await?,
                    Err(e) => return Err(e),
                }
            }
            Plan::Settle { status: next, requeue_after } => {
                let key_id = key_id(&owner, material.as_ref());
                // A key awaiting its restored material has no keyId yet: its UID will not be.
                let awaiting =
                    material.is_none() && key.annotations().contains_key(keyring::RESTORE_ANNOTATION);
                let next = KmsKeyStatus {
                    key_id: (!awaiting).then(|| key_id.to_owned()),
                    root_keys: root_keys(material.as_ref(), ctx.root.fingerprint()),
                    ..*next
                };
                let mut resource_version = key.resource_version();
                if next != lifecycle::owned(&status) {
                    // Audited before status reports it: a transition that cannot be audited
                    // is not reported, and is audited again by the retry.
                    let transitions = lifecycle::transitions(&status, &next);
                    audit(ctx, key, (&owner, key_id), next.current_version, &transitions)?;
                    resource_version = cluster.patch_key_status(&owner.namespace, &owner.name, &next).await?;
                    ctx.written.wrote(&owner.uid, &cached_status, &status, next.clone());
                    publish(ctx, key, &transitions).await;
                }
                if next.current_version.is_some() && !deleting {
                    grant_plugin_access(ctx, &owner).await?;
                }
                if deleting && next.state == Some(KeyState::Destroyed) {
                    // Status says Destroyed before the tombstone goes, so a retry after a
                    // failure below still knows the key is destroyed.
                    cluster.delete_usage(&owner.uid).await?;
                    cluster.delete_material(&owner.uid).await?;
                    cluster.set_finalizer(key, FINALIZER, resource_version, false).await?;
                    ctx.written.forget(&owner.uid);
                    return Ok(Action::await_change());
                }
                if let Some(current) = material.as_ref()
                    && let Some(next_batch) = rewrap(ctx, &owner, current).await?
                {
                    return Ok(Action::requeue(next_batch));
                }
                let wait = requeue_after
                    .and_then(|d| Duration::try_from(d).ok())
                    .map_or(MAX_REQUEUE, |d| d.min(MAX_REQUEUE));
                return Ok(Action::requeue(wait));
            }
        }
    }
    Err(Error::Unsettled)
}

/// For the KMS plugin's key: applies the plugin's ClusterRole with one rule, reading this
/// key's material (named by the key's UID) and nothing else. Applied on every settled
/// reconcile of that key — a no-op for the API server when nothing changed — so a role
/// that was reset (say by `helm upgrade --force`) is repaired within the hour.
async fn grant_plugin_access(ctx: &Context, owner: &Owner) -> Result<(), Error> {
    let Some(access) = &ctx.plugin_access else { return Ok(()) };
    if access.key_namespace != owner.namespace || access.key_name != owner.name {
        return Ok(());
    }
    ctx.cluster.apply_plugin_role(&access.cluster_role, &owner.uid).await
}

/// The status writes of this controller that its watch cache may not show yet, per key UID.
///
/// A reconcile woken (say, by the material watch) before the key's watch has delivered the
/// controller's own last status write sees the status that write replaced. Planning from it
/// would write the same change again — with a new condition time — and announce it twice.
/// So the controller plans from the status it wrote whenever the cache shows one that it has
/// since replaced. Only this controller writes these fields (one field manager, one leader).
#[derive(Debug, Default)]
pub struct StatusMemory(std::sync::Mutex<std::collections::HashMap<String, Written>>);

#[derive(Debug, Default)]
struct Written {
    /// Statuses this controller replaced and the cache may still show, oldest first.
    replaced: Vec<KmsKeyStatus>,
    /// The status it wrote last.
    latest: KmsKeyStatus,
}

/// How many replaced statuses are remembered per key: writes follow each other faster than
/// the watch delivers them only a few times in a row.
const REPLACED_REMEMBERED: usize = 8;

impl StatusMemory {
    /// The status to plan from, given what the watch cache shows.
    pub fn current(&self, uid: &str, cached: &KmsKeyStatus) -> KmsKeyStatus {
        let Ok(mut written) = self.0.lock() else { return cached.clone() };
        match written.get(uid) {
            Some(w) if w.replaced.contains(cached) => w.latest.clone(),
            Some(_) => {
                // The cache has caught up (or status changed some other way): nothing to
                // remember any more.
                written.remove(uid);
                cached.clone()
            }
            None => cached.clone(),
        }
    }

    /// Records a status write: `next` replaced `base`, which was planned from `cached`.
    pub fn wrote(&self, uid: &str, cached: &KmsKeyStatus, base: &KmsKeyStatus, next: KmsKeyStatus) {
        let Ok(mut written) = self.0.lock() else { return };
        let entry = written.entry(uid.to_owned()).or_default();
        for s in [cached, base] {
            if !entry.replaced.contains(s) {
                entry.replaced.push(s.clone());
            }
        }
        if entry.replaced.len() > REPLACED_REMEMBERED {
            let excess = entry.replaced.len() - REPLACED_REMEMBERED;
            entry.replaced.drain(..excess);
        }
        entry.latest = next;
    }

    /// Forgets a key that is gone.
    pub fn forget(&self, uid: &str) {
        if let Ok(mut written) = self.0.lock() {
            written.remove(uid);
        }
    }
}

/// The key's material: from the watch cache when it is at least as new as status says,
/// otherwise read from the API server.
async fn current_material(
    ctx: &Context,
    key_id: &str,
    status: &KmsKeyStatus,
) -> Result<Option<KmsKeyMaterial>, Error> {
    let cached = ctx.material_cache.get(&ObjectRef::new(key_id));
    let fresh_enough = |m: &KmsKeyMaterial| {
        m.spec.destroyed_at.is_some()
            || (status.state != Some(KeyState::Destroyed)
                && m.spec.versions.last().map(|v| v.version) >= status.current_version)
    };
    match cached {
        Some(m) if fresh_enough(&m) => Ok(Some((*m).clone())),
        // A key that never had status has no material yet, or only material a crashed
        // attempt created: creating it then finds that one (409, then a read).
        None if status.key_id.is_none() && status.current_version.is_none() => Ok(None),
        _ => ctx.cluster.material(key_id).await,
    }
}

/// The root keys that wrap the versions of `material`, by fingerprint (for status).
fn root_keys(material: Option<&KmsKeyMaterial>, primary: &str) -> Vec<crate::api::RootKeyUse> {
    let Some(m) = material else { return Vec::new() };
    keyring::versions_by_root(&m.spec)
        .into_iter()
        .map(|(fingerprint, versions)| crate::api::RootKeyUse {
            fingerprint: fingerprint.to_owned(),
            primary: fingerprint == primary,
            versions,
        })
        .collect()
}

/// Rewraps one batch of the versions that a previous root key wraps under the primary, in
/// one conditional write, at most one batch per key per [`super::Rewrap::pause`]; `None`
/// when there was nothing to rewrap, else when to look again (the material watch usually
/// brings the next reconcile first). A conflict is not an error: the next reconcile
/// tries again.
async fn rewrap(ctx: &Context, owner: &Owner, current: &KmsKeyMaterial) -> Result<Option<Duration>, Error> {
    let Some(next) = keyring::with_rewrapped(current, &ctx.root, ctx.rewrap.batch)? else {
        if let Ok(mut at) = ctx.rewrapped_at.lock() {
            at.remove(&owner.uid);
        }
        return Ok(None);
    };
    let pause = ctx.rewrap.pause;
    let since = ctx.rewrapped_at.lock().ok().and_then(|at| at.get(&owner.uid).map(|t| t.elapsed()));
    if let Some(since) = since.filter(|s| *s < pause) {
        return Ok(Some(pause - since));
    }
    let wait = pause.max(Duration::from_secs(1));
    match ctx.cluster.replace_material(&next).await {
        Ok(written) => {
            let left = keyring::versions_by_root(&written.spec)
                .into_iter()
                .filter(|(fp, _)| *fp != ctx.root.fingerprint())
                .map(|(_, n)| n)
                .sum::<u32>();
            ctx.metrics
                .material_changes
                .get_or_create(&super::metrics::ActionLabels { action: "rewrap" })
                .inc();
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, root_key = ctx.root.fingerprint(), left, "rewrapped a batch of versions under the primary root key");
            if let Ok(mut at) = ctx.rewrapped_at.lock() {
                at.insert(owner.uid.clone(), std::time::Instant::now());
            }
            Ok(Some(wait))
        }
        Err(e) if e.is_conflict() => Ok(Some(Duration::from_secs(1))),
        Err(e) => Err(e),
    }
}

/// What the planner needs to know of the material object.
pub fn material_view(material: Option<&KmsKeyMaterial>, root: &crate::crypto::RootKey) -> Material {
    match material {
        None => Material::Absent,
        Some(m) => match &m.spec.destroyed_at {
            Some(at) => Material::Destroyed { at: at.0 },
            None if m.spec.versions.is_empty() => Material::Absent,
            None => Material::Present {
                versions: m
                    .spec
                    .versions
                    .iter()
                    .map(|v| VersionInfo {
                        version: v.version,
                        created: v.created.0,
                        trigger: v.trigger,
                        request: v.request.clone(),
                        deletion_time: v.deletion_time.as_ref().map(|t| t.0),
                        destroyed: v.destroyed_at.as_ref().map(|t| t.0),
                        expired: v.expired_at.as_ref().map(|t| t.0),
                    })
                    .collect(),
                root_key_matches: keyring::versions_by_root(&m.spec).into_keys().all(|fp| root.knows(fp)),
            },
        },
    }
}

async fn apply(
    ctx: &Context,
    key: &KmsKey,
    owner: &Owner,
    material: Option<&KmsKeyMaterial>,
    action: &MaterialAction,
    now: Timestamp,
) -> Result<KmsKeyMaterial, Error> {
    let cluster = ctx.cluster.as_ref();
    let label = |action| super::metrics::ActionLabels { action };
    let updated = match (action, material) {
        (MaterialAction::Create { request }, current) => {
            let first = KeyMaterial::generate().map_err(Error::Random)?;
            let created = match current {
                // An object without versions (it held a deletion promise that was cancelled).
                Some(empty) => {
                    let object = keyring::with_version(
                        empty,
                        &ctx.root,
                        &first,
                        VersionTrigger::Created,
                        request.clone(),
                        now,
                    )?;
                    cluster.replace_material(&object).await?
                }
                None => {
                    let first = Some((&first, VersionTrigger::Created, request.clone()));
                    let object = keyring::new_material(owner, key.spec.origin, &ctx.root, first, None, now)?;
                    cluster.create_material(owner, &object).await?
                }
            };
            ctx.metrics.material_changes.get_or_create(&label("create")).inc();
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, "created version 1");
            created
        }
        (MaterialAction::Rotate { trigger, request }, Some(current)) => {
            let next = keyring::with_rotation(current, &ctx.root, *trigger, request.clone(), now)?;
            let rotated = cluster.replace_material(&next).await?;
            ctx.metrics.material_changes.get_or_create(&label("rotate")).inc();
            tracing::info!(
                key = %format!("{}/{}", owner.namespace, owner.name),
                key_id = %owner.uid,
                version = rotated.spec.versions.last().map(|v| v.version),
                trigger = ?trigger,
                "rotated"
            );
            rotated
        }
        (MaterialAction::ScheduleDeletion { at, forced }, Some(current)) => {
            audit_forced(ctx, key, (owner, key_id(owner, material)), None, forced.as_deref())?;
            let postponed = current.spec.deletion_time.is_some();
            let scheduled =
                cluster.replace_material(&keyring::with_deletion_time(current, Some(*at))).await?;
            if postponed {
                ctx.metrics.material_changes.get_or_create(&label("postpone_deletion")).inc();
                tracing::warn!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, deletion_time = %at, "the key was asked for while pending deletion; postponed its destruction");
            } else {
                tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, deletion_time = %at, forced = forced.is_some(), "promised the deletion time");
            }
            scheduled
        }
        (MaterialAction::ScheduleDeletion { at, forced }, None) => {
            // A key without material yet (EXTERNAL, not imported): the promise needs an
            // object to live in, without versions.
            audit_forced(ctx, key, (owner, key_id(owner, material)), None, forced.as_deref())?;
            let empty = keyring::new_material(owner, key.spec.origin, &ctx.root, None, None, now)?;
            cluster.create_material(owner, &keyring::with_deletion_time(&empty, Some(*at))).await?
        }
        (MaterialAction::RefuseDeletion { message }, Some(current)) => {
            tracing::warn!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, %message, "refused the deletion");
            cluster
                .replace_material(&keyring::with_deletion_refused(current, Some((message.clone(), now))))
                .await?
        }
        (MaterialAction::ClearDeletionRefusal, Some(current)) => {
            cluster.replace_material(&keyring::with_deletion_refused(current, None)).await?
        }
        (MaterialAction::ScheduleVersionDestruction { version, at, forced }, Some(current)) => {
            audit_forced(ctx, key, (owner, key_id(owner, material)), Some(*version), forced.as_deref())?;
            let postponed =
                current.spec.versions.iter().any(|v| v.version == *version && v.deletion_time.is_some());
            let object =
                keyring::with_version_deletion(current, *version, Some(*at)).ok_or(Error::Unsettled)?;
            let scheduled = cluster.replace_material(&object).await?;
            let what =
                if postponed { "postpone_version_destruction" } else { "schedule_version_destruction" };
            ctx.metrics.material_changes.get_or_create(&label(what)).inc();
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, version, deletion_time = %at, postponed, "promised a version's destruction");
            scheduled
        }
        (MaterialAction::CancelVersionDestruction { version }, Some(current)) => {
            let object = keyring::with_version_deletion(current, *version, None).ok_or(Error::Unsettled)?;
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, version, "cancelled a version's destruction");
            cluster.replace_material(&object).await?
        }
        (MaterialAction::DestroyVersion { version }, Some(current)) => {
            let object = keyring::with_version_destroyed(current, *version, now).ok_or(Error::Unsettled)?;
            let destroyed = cluster.replace_material(&object).await?;
            ctx.metrics.material_changes.get_or_create(&label("destroy_version")).inc();
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, version, "destroyed a version's material");
            destroyed
        }
        (MaterialAction::CancelDeletion, Some(current)) => {
            let cancelled = cluster.replace_material(&keyring::with_deletion_time(current, None)).await?;
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, "cancelled the deletion");
            cancelled
        }
        (MaterialAction::Destroy, Some(current)) => {
            let destroyed = cluster.replace_material(&keyring::destroyed(current, now)).await?;
            ctx.metrics.material_changes.get_or_create(&label("destroy")).inc();
            tracing::info!(key = %format!("{}/{}", owner.namespace, owner.name), key_id = %owner.uid, "destroyed key material");
            destroyed
        }
        (MaterialAction::Destroy, None) => {
            // A key that never had material (EXTERNAL, never imported): record it as
            // destroyed so it can never get material later.
            let object = keyring::new_material(owner, key.spec.origin, &ctx.root, None, Some(now), now)?;
            cluster.create_material(owner, &object).await?
        }
        (
            MaterialAction::Rotate { .. }
            | MaterialAction::CancelDeletion
            | MaterialAction::RefuseDeletion { .. }
            | MaterialAction::ClearDeletionRefusal
            | MaterialAction::ScheduleVersionDestruction { .. }
            | MaterialAction::CancelVersionDestruction { .. }
            | MaterialAction::DestroyVersion { .. },
            None,
        ) => {
            return Err(Error::Unsettled);
        }
    };
    Ok(updated)
}

/// Before destroying material, the API server's clock must agree that the promised
/// deletion time has passed, so a controller node whose clock runs ahead cannot destroy
/// early. Returns how long to wait if it does not.
async fn api_server_not_yet_due(
    ctx: &Context,
    promised: Option<Timestamp>,
) -> Result<Option<Duration>, Error> {
    let Some(deletion_time) = promised else {
        return Ok(None);
    };
    let server_now = ctx.cluster.server_time().await?;
    if server_now >= deletion_time {
        return Ok(None);
    }
    let ahead = deletion_time.duration_since(server_now);
    tracing::warn!(
        %deletion_time,
        %server_now,
        "this controller's clock says the deletion time has passed but the API server's does not; waiting"
    );
    Ok(Some(
        Duration::try_from(ahead.max(SignedDuration::from_secs(1))).unwrap_or(MAX_REQUEUE).min(MAX_REQUEUE),
    ))
}

/// The key's keyId: its material's, or its UID before it has material.
fn key_id<'a>(owner: &'a Owner, material: Option<&'a KmsKeyMaterial>) -> &'a str {
    material.map_or(&owner.uid, |m| m.spec.key_id())
}

/// One chained audit line per transition, naming who last changed the key (its field
/// manager, as the API server records it).
fn audit(
    ctx: &Context,
    key: &KmsKey,
    (owner, key_id): (&Owner, &str),
    version: Option<u32>,
    transitions: &[lifecycle::Transition],
) -> Result<(), Error> {
    let principal = requester(key);
    for t in transitions {
        let event = AuditEvent {
            component: "controller",
            request_id: uuid::Uuid::new_v4().to_string(),
            principal: principal.clone(),
            operation: t.reason,
            key: Some(format!("{}/{}", owner.namespace, owner.name)),
            key_id: Some(key_id.to_owned()),
            key_version: version,
            result: if t.warning { "Refused" } else { "OK" },
            reason: Some(t.note.clone()),
            ..Default::default()
        };
        ctx.audit.record(&event).map_err(Error::Audit)?;
    }
    Ok(())
}

/// Audits a deletion or version destruction scheduled with `force` over what still
/// needed it, before the promise is written (a promise that cannot be audited is not made).
fn audit_forced(
    ctx: &Context,
    key: &KmsKey,
    (owner, key_id): (&Owner, &str),
    version: Option<u32>,
    forced: Option<&str>,
) -> Result<(), Error> {
    let Some(need) = forced else { return Ok(()) };
    let event = AuditEvent {
        component: "controller",
        request_id: uuid::Uuid::new_v4().to_string(),
        principal: requester(key),
        operation: if version.is_some() {
            "ScheduleVersionDestructionForced"
        } else {
            "ScheduleDeletionForced"
        },
        key: Some(format!("{}/{}", owner.namespace, owner.name)),
        key_id: Some(key_id.to_owned()),
        key_version: version,
        result: "OK",
        reason: Some(format!("force: true overrode: {need}")),
        ..Default::default()
    };
    ctx.audit.record(&event).map_err(Error::Audit)
}

/// Who asked for what the controller now does: the last field manager of the object's
/// spec and metadata other than the controller itself.
pub fn requester<K: kube::Resource>(object: &K) -> String {
    crate::kubeclient::last_writer(object, &[FIELD_MANAGER, ERROR_FIELD_MANAGER])
        .map_or_else(|| "unknown".to_owned(), |m| format!("manager:{m}"))
}

async fn publish(ctx: &Context, key: &KmsKey, transitions: &[lifecycle::Transition]) {
    let reference = key.object_ref(&());
    for t in transitions {
        let event = Event {
            type_: if t.warning { EventType::Warning } else { EventType::Normal },
            reason: t.reason.to_owned(),
            note: Some(t.note.clone()),
            action: t.action.to_owned(),
            secondary: None,
        };
        ctx.cluster.publish(&reference, event).await;
    }
}

/// Makes a failure visible on the object: a Warning Event, and while the key has never
/// been settled (no material yet), state Creating and a Ready condition that says why.
/// Those are written under a field manager of their own, alone, and only onto the
/// resourceVersion just read from the API server: the cached object may be older than the
/// status the API server holds, and a settled key must never be shown as Creating. The
/// first settled status takes both over.
async fn report_failure(key: &KmsKey, ctx: &Context, error: &Error) {
    if error.is_conflict() {
        return;
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "ReconcileFailed".to_owned(),
        note: Some(error_chain(error)),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    ctx.cluster.publish(&key.object_ref(&()), event).await;
    if key.status.as_ref().and_then(|s| s.state).is_some_and(|s| s != KeyState::Creating) {
        return;
    }
    let (Some(ns), name) = (key.namespace(), key.name_any()) else { return };
    let Some(key) = ctx.cluster.fresh_key(&ns, &name).await else { return };
    let status = key.status.clone().unwrap_or_default();
    if status.state.is_some_and(|s| s != KeyState::Creating) {
        return;
    }
    let generation = key.meta().generation.unwrap_or(0);
    let ready = lifecycle::condition(
        &status.conditions,
        lifecycle::READY,
        "False",
        "CreateFailed",
        error_chain(error),
        generation,
        Timestamp::now(),
    );
    ctx.cluster.report_creating(&ns, &name, key.resource_version(), &ready).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyState;

    fn status(state: KeyState, version: u32) -> KmsKeyStatus {
        KmsKeyStatus { state: Some(state), current_version: Some(version), ..Default::default() }
    }

    #[test]
    fn a_stale_cache_is_planned_from_the_last_write() {
        let memory = StatusMemory::default();
        let (s0, s1, s2) =
            (KmsKeyStatus::default(), status(KeyState::Enabled, 1), status(KeyState::Enabled, 2));
        assert_eq!(memory.current("a", &s0), s0, "nothing written yet: the cache is the truth");

        memory.wrote("a", &s0, &s0, s1.clone());
        assert_eq!(memory.current("a", &s0), s1, "the cache has not seen the write");
        assert_eq!(memory.current("b", &s0), s0, "other keys are not affected");

        // A second write planned from the first, before the cache showed either.
        memory.wrote("a", &s0, &s1, s2.clone());
        assert_eq!(memory.current("a", &s0), s2);
        assert_eq!(memory.current("a", &s1), s2, "the cache shows the first write only");

        assert_eq!(memory.current("a", &s2), s2, "caught up");
        assert_eq!(memory.current("a", &s0), s0, "and forgotten once caught up");
    }

    #[test]
    fn a_status_changed_elsewhere_wins() {
        let memory = StatusMemory::default();
        let (s0, s1, other) =
            (KmsKeyStatus::default(), status(KeyState::Enabled, 1), status(KeyState::Disabled, 1));
        memory.wrote("a", &s0, &s0, s1);
        assert_eq!(memory.current("a", &other), other);
        assert_eq!(memory.current("a", &s0), s0);
    }

    #[test]
    fn what_is_remembered_is_bounded_and_forgotten_with_the_key() {
        let memory = StatusMemory::default();
        let states: Vec<_> = (1..=20).map(|v| status(KeyState::Enabled, v)).collect();
        for pair in states.windows(2) {
            memory.wrote("a", &pair[0], &pair[0], pair[1].clone());
        }
        let remembered = memory.0.lock().map(|w| w["a"].replaced.len()).unwrap_or_default();
        assert_eq!(remembered, REPLACED_REMEMBERED);
        assert_eq!(memory.current("a", &states[18]), states[19]);
        memory.forget("a");
        assert_eq!(memory.current("a", &states[18]), states[18]);
    }
}
