//! The lifecycle driven through time with an injected clock: every step feeds the
//! previous status and the material back in, as the controller does.

use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::api::{Deletion, KeyPolicy, KeySpec, KeyUsage, Rotation};
use crate::domain::{ReporterKind, Usage};

const DAY: SignedDuration = SignedDuration::from_hours(24);

fn t0() -> Timestamp {
    "2026-01-01T00:00:00Z".parse().unwrap()
}

fn days(n: i64) -> SignedDuration {
    SignedDuration::from_hours(24 * n)
}

fn spec() -> KmsKeySpec {
    KmsKeySpec {
        description: String::new(),
        key_spec: KeySpec::SymmetricDefault,
        key_usage: KeyUsage::EncryptDecrypt,
        origin: Origin::Kubekms,
        enabled: true,
        rotation: Rotation::default(),
        deletion: Deletion::default(),
        policy: KeyPolicy::default(),
        versions: Vec::new(),
    }
}

fn version_mut(m: &mut Material, n: u32) -> &mut VersionInfo {
    match m {
        Material::Present { versions, .. } => versions.iter_mut().find(|v| v.version == n).unwrap(),
        other => panic!("no version {n} in {other:?}"),
    }
}

/// A key and its material, reconciled the way the controller does: plan, apply the
/// material action, plan again, keep the status.
struct Sim {
    spec: KmsKeySpec,
    generation: i64,
    deleting: bool,
    status: KmsKeyStatus,
    material: Material,
    /// The deletion time the material object records.
    promised_deletion: Option<Timestamp>,
    /// The refusal the material object records.
    deletion_refused: Option<String>,
    storage_oldest: Option<u32>,
    usage: Option<Usage>,
    awaiting_restore: Option<String>,
    /// The validTo of imported material, as the material object records it.
    valid_to: Option<Timestamp>,
    now: Timestamp,
    events: Vec<&'static str>,
    actions: Vec<MaterialAction>,
}

impl Sim {
    fn new() -> Self {
        Sim {
            spec: spec(),
            generation: 1,
            deleting: false,
            status: KmsKeyStatus { key_id: Some("k-1".into()), ..Default::default() },
            material: Material::Absent,
            promised_deletion: None,
            deletion_refused: None,
            storage_oldest: None,
            usage: None,
            awaiting_restore: None,
            valid_to: None,
            now: t0(),
            events: vec![],
            actions: vec![],
        }
    }

    fn edit(&mut self, f: impl FnOnce(&mut KmsKeySpec)) {
        f(&mut self.spec);
        self.generation += 1;
    }

    fn plan(&self) -> Plan {
        let o = Observed {
            spec: &self.spec,
            generation: self.generation,
            deleting: self.deleting,
            status: &self.status,
            material: &self.material,
            promised_deletion: self.promised_deletion,
            deletion_refused: self.deletion_refused.as_deref(),
            storage_oldest: self.storage_oldest,
            usage: self.usage.as_ref(),
            awaiting_restore: self.awaiting_restore.as_deref(),
            valid_to: self.valid_to,
        };
        plan(&o, self.now, Calendar { day: DAY })
    }

    fn apply(&mut self, action: &MaterialAction) {
        let version = |versions: &[VersionInfo]| versions.len() as u32 + 1;
        self.actions.push(action.clone());
        match action {
            MaterialAction::ScheduleDeletion { at, .. } => {
                self.deletion_refused = None;
                return self.promised_deletion = Some(*at);
            }
            MaterialAction::CancelDeletion => return self.promised_deletion = None,
            MaterialAction::RefuseDeletion { message } => {
                return self.deletion_refused = Some(message.clone());
            }
            MaterialAction::ClearDeletionRefusal => return self.deletion_refused = None,
            MaterialAction::ScheduleVersionDestruction { version: n, at, .. } => {
                return version_mut(&mut self.material, *n).deletion_time = Some(*at);
            }
            MaterialAction::CancelVersionDestruction { version: n } => {
                return version_mut(&mut self.material, *n).deletion_time = None;
            }
            MaterialAction::DestroyVersion { version: n } => {
                let now = self.now;
                return version_mut(&mut self.material, *n).destroyed = Some(now);
            }
            _ => {}
        }
        self.material = match (&self.material, action) {
            (Material::Absent, MaterialAction::Create { request }) => Material::Present {
                versions: vec![VersionInfo {
                    version: 1,
                    created: self.now,
                    trigger: VersionTrigger::Created,
                    request: request.clone(),
                    deletion_time: None,
                    destroyed: None,
                    expired: None,
                }],
                root_key_matches: true,
            },
            (
                Material::Present { versions, root_key_matches },
                MaterialAction::Rotate { trigger, request },
            ) => {
                let mut versions = versions.clone();
                versions.push(VersionInfo {
                    version: version(&versions),
                    created: self.now,
                    trigger: *trigger,
                    request: request.clone(),
                    deletion_time: None,
                    destroyed: None,
                    expired: None,
                });
                Material::Present { versions, root_key_matches: *root_key_matches }
            }
            (_, MaterialAction::Destroy) => Material::Destroyed { at: self.now },
            (m, a) => panic!("action {a:?} on material {m:?}"),
        };
    }

    /// One reconcile; returns the requeue delay.
    fn reconcile(&mut self) -> Option<SignedDuration> {
        for _ in 0..3 {
            match self.plan() {
                Plan::Act(action) => self.apply(&action),
                Plan::Settle { status, requeue_after } => {
                    for t in transitions(&self.status, &status) {
                        self.events.push(t.reason);
                    }
                    self.status = *status;
                    return requeue_after;
                }
            }
        }
        panic!("the plan did not settle after 3 material actions: {:?}", self.actions);
    }

    fn state(&self) -> KeyState {
        self.status.state.unwrap()
    }

    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.type_ == type_)
    }

    fn take_events(&mut self) -> Vec<&'static str> {
        std::mem::take(&mut self.events)
    }
}

#[test]
fn a_new_key_gets_version_one_and_is_enabled() {
    let mut k = Sim::new();
    let requeue = k.reconcile();
    assert_eq!(k.state(), KeyState::Enabled);
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.status.versions.len(), 1);
    assert_eq!(k.status.last_rotation_time, None);
    assert_eq!(k.status.next_rotation_time, Some(Time(t0() + days(365))));
    assert_eq!(requeue, Some(days(365)));
    assert_eq!(k.take_events(), ["KeyCreated"]);
    let ready = k.condition(READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Enabled"));
    assert_eq!(ready.observed_generation, Some(1));
}

#[test]
fn reconciling_an_unchanged_key_changes_nothing() {
    let mut k = Sim::new();
    k.reconcile();
    let before = k.status.clone();
    k.now += SignedDuration::from_mins(5);
    k.reconcile();
    assert_eq!(k.status, before, "status must not change without cause (no spin)");
    assert!(k.take_events().len() == 1);
    assert_eq!(k.actions.len(), 1);
}

#[test]
fn automatic_rotation_happens_when_due_and_only_then() {
    let mut k = Sim::new();
    k.reconcile();
    k.now = t0() + days(365) - SignedDuration::from_secs(1);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1), "not yet due");
    k.now = t0() + days(365);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
    assert_eq!(k.status.versions.len(), 2, "version 1 is kept");
    assert_eq!(k.status.last_rotation_time, Some(Time(k.now)));
    assert_eq!(k.status.next_rotation_time, Some(Time(k.now + days(365))));
    assert_eq!(k.take_events(), ["KeyCreated", "KeyRotated"]);
    assert_eq!(k.actions[1], MaterialAction::Rotate { trigger: VersionTrigger::Scheduled, request: None });
}

#[test]
fn a_shorter_period_applies_from_the_last_rotation() {
    let mut k = Sim::new();
    k.reconcile();
    k.now = t0() + days(100);
    k.edit(|s| s.rotation.period_days = 90);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2), "90 days since version 1 have passed");
    assert_eq!(k.status.next_rotation_time, Some(Time(k.now + days(90))));
}

#[test]
fn automatic_rotation_off_means_no_schedule() {
    let mut k = Sim::new();
    k.spec.rotation.automatic = false;
    k.reconcile();
    assert_eq!(k.status.next_rotation_time, None);
    k.now = t0() + days(5000);
    assert_eq!(k.reconcile(), None);
    assert_eq!(k.status.current_version, Some(1));
}

#[test]
fn on_demand_rotation_happens_once_per_request() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.rotation.on_demand_request = Some("r1".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
    assert_eq!(k.status.last_on_demand_request.as_deref(), Some("r1"));
    k.reconcile();
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2), "the same request rotates once");
    k.edit(|s| s.rotation.on_demand_request = Some("r2".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(3));
    assert_eq!(k.take_events(), ["KeyCreated", "KeyRotated", "KeyRotated"]);
    // The automatic schedule restarts from the on-demand rotation.
    assert_eq!(k.status.next_rotation_time, Some(Time(k.now + days(365))));
}

#[test]
fn a_request_present_at_creation_is_handled_by_version_one() {
    let mut k = Sim::new();
    k.spec.rotation.on_demand_request = Some("initial".into());
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.status.last_on_demand_request.as_deref(), Some("initial"));
}

#[test]
fn restart_between_material_and_status_neither_repeats_nor_loses_a_version() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.rotation.on_demand_request = Some("r1".into()));
    // The controller adds version 2, then dies before writing status.
    let Plan::Act(action) = k.plan() else { panic!("expected a rotation") };
    k.apply(&action);
    let stale_status = k.status.clone();
    assert_eq!(stale_status.current_version, Some(1));
    // After the restart it sees the material and the old status.
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
    assert_eq!(k.actions.len(), 2, "no second rotation for the same request");
    assert_eq!(k.take_events(), ["KeyCreated", "KeyRotated"], "the rotation is still reported once");

    // The same for a scheduled rotation.
    k.now += days(365);
    let Plan::Act(action) = k.plan() else { panic!("expected a rotation") };
    k.apply(&action);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(3));
    assert_eq!(k.actions.len(), 3);
}

#[test]
fn disable_and_enable() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.enabled = false);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Disabled);
    assert_eq!(k.status.next_rotation_time, None, "a disabled key does not rotate");
    let ready = k.condition(READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Disabled"));
    k.edit(|s| s.enabled = true);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Enabled);
    assert_eq!(k.take_events(), ["KeyCreated", "KeyDisabled", "KeyEnabled"]);
}

#[test]
fn a_key_disabled_past_its_rotation_date_rotates_when_enabled() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.enabled = false);
    k.reconcile();
    k.now = t0() + days(400);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1));
    k.edit(|s| s.enabled = true);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
}

#[test]
fn rotating_a_disabled_key_is_refused_and_changes_nothing() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.enabled = false);
    k.reconcile();
    k.take_events();
    k.edit(|s| s.rotation.on_demand_request = Some("r1".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.state(), KeyState::Disabled);
    let refused = k.condition(TRANSITION_REFUSED).unwrap();
    assert_eq!(refused.reason, "RotationRefused");
    assert!(refused.message.contains("the key is Disabled"), "{}", refused.message);
    assert_eq!(k.take_events(), ["RotationRefused"]);
    // Reported once, kept while the spec asks for it, not carried out on enable.
    k.reconcile();
    assert!(k.take_events().is_empty());
    assert!(k.condition(TRANSITION_REFUSED).is_some());
    k.edit(|s| s.enabled = true);
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1), "a refused request is not carried out later");
    // A new request works, and clears the refusal.
    k.edit(|s| s.rotation.on_demand_request = Some("r2".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
    assert!(k.condition(TRANSITION_REFUSED).is_none());
}

#[test]
fn deletion_waits_for_the_window_and_then_destroys() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| {
        s.deletion.scheduled = true;
        s.deletion.pending_window_days = 7;
    });
    let requeue = k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    let deletion_time = t0() + days(7);
    assert_eq!(k.status.deletion_time, Some(Time(deletion_time)));
    assert_eq!(requeue, Some(days(7)));
    assert_eq!(k.status.next_rotation_time, None);

    // Nothing is destroyed a second early, even past the rotation date of a 7-day window.
    k.now = deletion_time - SignedDuration::from_secs(1);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    assert!(!k.actions.contains(&MaterialAction::Destroy));
    assert_eq!(k.status.deletion_time, Some(Time(deletion_time)), "the promised time does not move");

    k.now = deletion_time;
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
    assert!(k.status.versions.iter().all(|v| v.state == KeyVersionState::Destroyed));
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.take_events(), ["KeyCreated", "KeyDeletionScheduled", "KeyMaterialDestroyed"]);

    // Destroyed is final.
    k.edit(|s| {
        s.deletion.scheduled = false;
        s.enabled = false;
    });
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
    assert_eq!(k.actions.iter().filter(|a| **a == MaterialAction::Destroy).count(), 1);
}

#[test]
fn a_destroyed_key_whose_tombstone_is_gone_stays_destroyed() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    k.now += days(30);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
    // kubectl delete, and the controller removed the tombstone but not yet the finalizer.
    k.deleting = true;
    k.material = Material::Absent;
    k.promised_deletion = None;
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
    assert_eq!(k.status.deletion_time.as_ref().map(|t| t.0), Some(t0() + days(30)));
    let at = t0() + days(30);
    assert_eq!(
        k.actions,
        [
            MaterialAction::Create { request: None },
            MaterialAction::ScheduleDeletion { at, forced: None },
            MaterialAction::Destroy
        ],
        "no new material, no second destruction"
    );
}

#[test]
fn cancelling_deletion_leaves_the_key_disabled() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    k.now += days(3);
    k.edit(|s| {
        s.deletion.scheduled = false;
        s.enabled = false;
    });
    k.reconcile();
    assert_eq!(k.state(), KeyState::Disabled);
    assert_eq!(k.status.deletion_time, None);
    assert_eq!(k.take_events(), ["KeyCreated", "KeyDeletionScheduled", "KeyDeletionCancelled"]);
    // Scheduling again starts a fresh window.
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert_eq!(k.status.deletion_time, Some(Time(k.now + days(30))));
}

#[test]
fn enabling_a_key_pending_deletion_is_refused() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.enabled = false);
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    k.take_events();
    k.edit(|s| s.enabled = true);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    let refused = k.condition(TRANSITION_REFUSED).unwrap();
    assert_eq!(refused.reason, "EnableRefused");
    assert_eq!(k.take_events(), ["EnableRefused"]);
    k.reconcile();
    assert!(k.take_events().is_empty(), "reported once");
    assert!(k.condition(TRANSITION_REFUSED).is_some(), "kept while enabled: true stands");
}

#[test]
fn scheduling_deletion_of_an_enabled_key_is_not_an_enable_attempt() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    k.edit(|s| s.description = "going away".into());
    k.reconcile();
    assert!(k.condition(TRANSITION_REFUSED).is_none());
}

#[test]
fn rotating_a_key_pending_deletion_is_refused() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    k.edit(|s| s.rotation.on_demand_request = Some("r1".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.condition(TRANSITION_REFUSED).unwrap().reason, "RotationRefused");
}

#[test]
fn kubectl_delete_that_got_through_still_waits_for_the_window() {
    let mut k = Sim::new();
    k.reconcile();
    k.deleting = true;
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    assert_eq!(k.status.deletion_time, Some(Time(t0() + days(30))));
    assert!(k.condition(READY).unwrap().message.contains("the KmsKey was deleted"));
    k.now = t0() + days(30);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

#[test]
fn external_keys_wait_for_import_and_never_rotate() {
    let mut k = Sim::new();
    k.spec.origin = Origin::External;
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingImport);
    assert!(k.actions.is_empty(), "no material is generated for an EXTERNAL key");
    // The material arrives (imported).
    k.material = one_version(VersionTrigger::Imported, k.now);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Enabled);
    assert_eq!(k.status.next_rotation_time, None);
    k.now += days(1000);
    k.edit(|s| s.rotation.on_demand_request = Some("r".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.take_events(), ["KeyMaterialImported", "RotationRefused"]);
}

#[test]
fn imported_material_expires_at_its_validto_and_the_key_waits_for_it_again() {
    let mut k = Sim::new();
    k.spec.origin = Origin::External;
    k.reconcile();
    k.material = one_version(VersionTrigger::Imported, k.now);
    let valid_to = k.now + SignedDuration::from_hours(2);
    k.valid_to = Some(valid_to);
    let requeue = k.reconcile();
    assert_eq!(k.state(), KeyState::Enabled);
    assert_eq!(k.status.valid_to, Some(Time(valid_to)));
    assert_eq!(requeue, Some(SignedDuration::from_hours(2)), "woken at validTo");
    // At validTo, before the import reconciler has deleted the material: already refused.
    k.now = valid_to;
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingImport);
    assert!(k.condition(READY).unwrap().message.contains("expired at"));
    assert_eq!(k.take_events(), ["KeyMaterialImported", "KeyMaterialExpired"]);
    // The material is deleted: version 1 is Expired, there is no current version.
    let Material::Present { versions, .. } = &mut k.material else { panic!() };
    versions[0].expired = Some(valid_to);
    k.valid_to = Some(valid_to);
    k.now += SignedDuration::from_secs(5);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingImport);
    assert_eq!(k.status.current_version, None);
    assert_eq!(k.status.versions[0].state, KeyVersionState::Expired);
    assert_eq!(k.status.valid_to, None);
    assert!(k.actions.is_empty(), "no material is made for it");
    // The same material is imported again, without an expiry.
    let Material::Present { versions, .. } = &mut k.material else { panic!() };
    versions[0].expired = None;
    k.valid_to = None;
    assert_eq!(k.reconcile(), None);
    assert_eq!(k.state(), KeyState::Enabled);
    assert_eq!(k.status.current_version, Some(1));
    assert_eq!(k.status.versions[0].state, KeyVersionState::Enabled);
    assert_eq!(k.take_events(), ["VersionMaterialExpired", "KeyMaterialImported", "VersionMaterialImported"]);
}

#[test]
fn expired_material_of_a_key_pending_deletion_leaves_it_pending_deletion() {
    let mut k = Sim::new();
    k.spec.origin = Origin::External;
    k.material = one_version(VersionTrigger::Imported, k.now);
    k.valid_to = Some(k.now + SignedDuration::from_hours(1));
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    k.now += SignedDuration::from_hours(2);
    let Material::Present { versions, .. } = &mut k.material else { panic!() };
    versions[0].expired = k.valid_to;
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    k.now += days(30);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

#[test]
fn an_external_key_pending_import_can_be_deleted() {
    let mut k = Sim::new();
    k.spec.origin = Origin::External;
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    k.now += days(30);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

#[test]
fn missing_material_is_reported_not_replaced() {
    let mut k = Sim::new();
    k.reconcile();
    k.material = Material::Absent;
    k.reconcile();
    assert_eq!(k.actions.len(), 1, "no new material");
    let ready = k.condition(READY).unwrap();
    assert_eq!(ready.reason, "MaterialMissing");
    assert_eq!(k.status.current_version, Some(1));
}

/// Material holding version 1 alone, made by `trigger` at `created`.
fn one_version(trigger: VersionTrigger, created: Timestamp) -> Material {
    let v1 = VersionInfo {
        version: 1,
        created,
        trigger,
        request: None,
        deletion_time: None,
        destroyed: None,
        expired: None,
    };
    Material::Present { versions: vec![v1], root_key_matches: true }
}

#[test]
fn a_key_being_restored_gets_no_material_of_the_controllers_making() {
    let mut k = Sim::new();
    k.awaiting_restore = Some("6ece15cd-0195-4985-aff9-395763ad0a3b".into());
    k.reconcile();
    assert!(k.actions.is_empty(), "no version 1 is made: the backup's versions come");
    let ready = k.condition(READY).unwrap();
    assert_eq!(ready.reason, "AwaitingRestore");
    assert!(ready.message.contains("keyId 6ece15cd-0195-4985-aff9-395763ad0a3b"), "{}", ready.message);
    assert_eq!(k.status.state, None);
    // Once the material is there the annotation no longer matters.
    k.material = one_version(VersionTrigger::Created, t0());
    k.reconcile();
    assert_eq!(k.state(), KeyState::Enabled);
    assert!(k.actions.is_empty());
}

#[test]
fn a_foreign_root_key_blocks_rotation() {
    let mut k = Sim::new();
    k.reconcile();
    if let Material::Present { root_key_matches, .. } = &mut k.material {
        *root_key_matches = false;
    }
    k.edit(|s| s.rotation.on_demand_request = Some("r".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(1));
    assert!(k.condition(TRANSITION_REFUSED).unwrap().message.contains("another root key"));
}

#[test]
fn clock_jumps_rotate_once_and_keep_the_promised_deletion_time() {
    let mut k = Sim::new();
    k.reconcile();
    // The clock jumps a decade ahead: one rotation, not one per missed period.
    k.now = t0() + days(3650);
    k.reconcile();
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
    // Then back again: nothing is due, nothing changes.
    k.now = t0();
    k.reconcile();
    assert_eq!(k.status.current_version, Some(2));
    assert_eq!(k.state(), KeyState::Enabled);
    // A deletion scheduled now keeps its promised time whatever the clock does next;
    // a clock behind the promise destroys nothing (the controller also checks the API
    // server's clock before destroying, see key.rs).
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    let promised = k.status.deletion_time.clone().unwrap();
    k.now = t0() - days(365);
    k.reconcile();
    assert_eq!(k.status.deletion_time, Some(promised.clone()));
    assert_eq!(k.state(), KeyState::PendingDeletion);
    k.now = promised.0;
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

#[test]
fn out_of_range_windows_and_periods_are_clamped() {
    // A CRD older than the controller might let these through; the controller still never
    // waits less than 7 days before destroying, nor rotates more often than every 90.
    let mut k = Sim::new();
    k.spec.rotation.period_days = 1;
    k.reconcile();
    assert_eq!(k.status.next_rotation_time, Some(Time(t0() + days(90))));
    k.edit(|s| {
        s.deletion.scheduled = true;
        s.deletion.pending_window_days = 0;
    });
    k.reconcile();
    assert_eq!(k.status.deletion_time, Some(Time(t0() + days(7))));
}

#[test]
fn conditions_keep_their_transition_time_until_they_flip() {
    let mut k = Sim::new();
    k.reconcile();
    let first = k.condition(READY).unwrap().last_transition_time.clone();
    k.now += days(1);
    k.edit(|s| s.description = "x".into());
    k.reconcile();
    assert_eq!(k.condition(READY).unwrap().last_transition_time, first);
    k.edit(|s| s.enabled = false);
    k.reconcile();
    assert_eq!(k.condition(READY).unwrap().last_transition_time, Time(k.now));
}

#[test]
fn the_version_limit_is_reported() {
    let mut k = Sim::new();
    k.reconcile();
    let versions = (1..=MAX_VERSIONS as u32)
        .map(|v| VersionInfo {
            version: v,
            created: k.now,
            trigger: VersionTrigger::OnDemand,
            request: None,
            deletion_time: None,
            destroyed: None,
            expired: None,
        })
        .collect();
    k.material = Material::Present { versions, root_key_matches: true };
    k.edit(|s| s.rotation.on_demand_request = Some("one too many".into()));
    k.reconcile();
    assert_eq!(k.status.current_version, Some(MAX_VERSIONS as u32));
    assert!(k.condition(TRANSITION_REFUSED).unwrap().message.contains("1000 versions"));
}

#[test]
fn a_day_must_last_a_positive_time() {
    assert_eq!(Calendar::new(SignedDuration::from_secs(2)).unwrap().day, SignedDuration::from_secs(2));
    assert_eq!(Calendar::new(SignedDuration::from_hours(24)).unwrap().day, Calendar::default().day);
    for bad in [SignedDuration::ZERO, SignedDuration::from_secs(-1), SignedDuration::MIN] {
        assert_eq!(Calendar::new(bad).unwrap_err(), CalendarError::NotPositive(bad));
    }
    let err = Calendar::new(SignedDuration::ZERO).unwrap_err();
    assert_eq!(err.to_string(), "a day must last a positive time, got 0s");
}

#[test]
fn a_forged_status_changes_no_deletion_decision_and_is_overwritten() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    let promised = t0() + days(30);
    assert_eq!(k.promised_deletion, Some(promised));
    // Someone with patch on kmskeys/status moves the deletion time into the past.
    k.now += days(1);
    k.status.deletion_time = Some(Time(t0() - days(1)));
    k.reconcile();
    assert!(!k.actions.contains(&MaterialAction::Destroy), "nothing destroyed before the promised time");
    assert_eq!(k.status.deletion_time, Some(Time(promised)), "the forged time is overwritten");
    // … or claims the key was never pending deletion, with another state.
    k.status.state = Some(KeyState::Enabled);
    k.status.deletion_time = None;
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    assert_eq!(k.status.deletion_time, Some(Time(promised)), "the promise is kept, not renewed");
    k.now = promised;
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

#[test]
fn the_deletion_time_is_promised_once_and_cancelled_in_the_material() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert_eq!(k.actions[1], MaterialAction::ScheduleDeletion { at: t0() + days(30), forced: None });
    // Later reconciles keep the promise (no second write, however often they run).
    k.now += days(2);
    k.reconcile();
    assert_eq!(k.actions.len(), 2);
    k.edit(|s| {
        s.deletion.scheduled = false;
        s.enabled = false;
    });
    k.reconcile();
    assert_eq!(k.actions[2], MaterialAction::CancelDeletion);
    assert_eq!(k.promised_deletion, None);
    // A forged status that still says PendingDeletion does not bring the promise back.
    k.status.state = Some(KeyState::PendingDeletion);
    k.status.deletion_time = Some(Time(t0()));
    k.reconcile();
    assert_eq!((k.state(), k.status.deletion_time.clone()), (KeyState::Disabled, None));
}

#[test]
fn a_key_without_material_keeps_its_promise_in_an_empty_object() {
    let mut k = Sim::new();
    k.spec.origin = Origin::External;
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingImport);
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert_eq!(k.actions, [MaterialAction::ScheduleDeletion { at: t0() + days(30), forced: None }]);
    assert_eq!(k.state(), KeyState::PendingDeletion);
    k.now += days(30);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

fn usage(kind: ReporterKind, version: u32, u: crate::domain::VersionUse) -> Usage {
    Usage {
        reporters: vec![crate::domain::ReporterUse {
            name: "r".into(),
            kind,
            granularity: DAY,
            versions: [(version, u)].into(),
        }],
    }
}

fn decrypted(at: Timestamp) -> crate::domain::VersionUse {
    crate::domain::VersionUse { last_decrypt: Some(at), ..Default::default() }
}

fn refused_use(at: Timestamp) -> crate::domain::VersionUse {
    crate::domain::VersionUse { last_refused: Some(at), ..Default::default() }
}

fn rotated(k: &mut Sim, request: &str) {
    k.edit(|s| s.rotation.on_demand_request = Some(request.into()));
    k.reconcile();
}

#[test]
fn deleting_the_key_stored_data_needs_is_refused_until_forced() {
    let mut k = Sim::new();
    k.reconcile();
    k.usage = Some(usage(ReporterKind::StoragePlugin, 1, decrypted(t0())));
    k.take_events();
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Enabled, "a refused deletion leaves the key usable");
    assert_eq!(k.promised_deletion, None);
    let refused = k.condition(TRANSITION_REFUSED).unwrap();
    assert_eq!(refused.reason, "DeletionRefused");
    assert!(refused.message.contains("kube-apiserver stores data under this key"), "{}", refused.message);
    assert!(refused.message.contains("spec.deletion.force: true"), "says what to do: {}", refused.message);
    assert_eq!(k.take_events(), ["DeletionRefused"]);
    // Refused for good: a later reconcile neither retries nor reports it again.
    k.now += days(60);
    k.reconcile();
    assert_eq!(k.promised_deletion, None);
    assert!(k.take_events().is_empty());

    k.edit(|s| s.deletion.force = true);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion);
    assert_eq!(k.deletion_refused, None, "the promise ends the refusal");
    let forced = k.actions.iter().find_map(|a| match a {
        MaterialAction::ScheduleDeletion { forced, .. } => forced.clone(),
        _ => None,
    });
    assert!(forced.unwrap().contains("kube-apiserver stores data"), "the override is named, for the audit");
}

#[test]
fn a_refusal_goes_when_the_spec_stops_asking() {
    let mut k = Sim::new();
    k.reconcile();
    k.usage = Some(usage(ReporterKind::KeyApi, 1, decrypted(t0())));
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    assert!(k.deletion_refused.as_deref().unwrap().contains("decrypted data within the last 30 days"));
    k.edit(|s| s.deletion.scheduled = false);
    k.reconcile();
    assert_eq!(k.deletion_refused, None);
    assert!(k.condition(TRANSITION_REFUSED).is_none());
    assert_eq!(k.state(), KeyState::Enabled);
}

#[test]
fn an_application_key_unused_for_its_window_is_scheduled_without_force() {
    let mut k = Sim::new();
    k.reconcile();
    k.usage = Some(usage(ReporterKind::KeyApi, 1, decrypted(t0())));
    k.now = t0() + days(8);
    k.edit(|s| {
        s.deletion.scheduled = true;
        s.deletion.pending_window_days = 7;
    });
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion, "last decrypt ended more than 7 days ago");
    assert_eq!(k.promised_deletion, Some(t0() + days(15)));
}

#[test]
fn a_use_while_pending_deletion_postpones_the_destruction() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| {
        s.deletion.scheduled = true;
        s.deletion.pending_window_days = 7;
    });
    k.reconcile();
    assert_eq!(k.promised_deletion, Some(t0() + days(7)));
    k.take_events();
    // Refused on day 5 (recorded as the day's period, so up to day 6).
    k.now = t0() + days(5);
    k.usage = Some(usage(ReporterKind::KeyApi, 1, refused_use(t0() + days(5))));
    k.reconcile();
    assert_eq!(k.promised_deletion, Some(t0() + days(13)), "the window starts again after the last use");
    assert_eq!(k.take_events(), ["KeyUsedWhilePendingDeletion"]);
    let used = k.condition(USED_WHILE_PENDING).unwrap();
    assert_eq!(used.status, "True");
    k.now = t0() + days(7);
    k.reconcile();
    assert_eq!(k.state(), KeyState::PendingDeletion, "not destroyed at the end of the first window");
    k.now = t0() + days(13);
    k.reconcile();
    assert_eq!(k.state(), KeyState::Destroyed);
}

#[test]
fn a_version_of_the_cluster_key_is_destroyed_only_after_a_migration_moved_its_data() {
    let mut k = Sim::new();
    k.reconcile();
    k.usage = Some(usage(ReporterKind::StoragePlugin, 1, decrypted(t0())));
    rotated(&mut k, "r1");
    assert_eq!(k.status.versions[0].used_by_stored_data, Some(true));
    k.take_events();
    k.edit(|s| {
        s.versions = vec![crate::api::VersionRequest {
            version: 1,
            enabled: true,
            destruction: Deletion { scheduled: true, pending_window_days: 7, force: false },
        }]
    });
    k.reconcile();
    let refused = k.condition(TRANSITION_REFUSED).unwrap();
    assert_eq!(refused.reason, "VersionDestructionRefused");
    assert!(refused.message.contains("storage migration"), "{}", refused.message);
    assert_eq!(k.status.versions[0].state, KeyVersionState::Enabled, "still decrypts the stored data");
    assert_eq!(k.take_events(), ["VersionDestructionRefused"]);

    // The migration finished: version 2 holds everything stored.
    k.storage_oldest = Some(2);
    k.reconcile();
    assert_eq!(k.status.versions[0].used_by_stored_data, Some(false));
    assert_eq!(k.status.versions[0].state, KeyVersionState::PendingDestruction);
    assert_eq!(k.status.versions[0].deletion_time, Some(Time(k.now + days(7))));
    assert!(k.condition(TRANSITION_REFUSED).is_none());
    assert_eq!(k.take_events(), ["VersionDestructionScheduled"]);
    k.now += days(7);
    k.reconcile();
    assert_eq!(k.status.versions[0].state, KeyVersionState::Destroyed);
    assert_eq!(k.status.versions[1].state, KeyVersionState::Enabled);
    assert_eq!(k.state(), KeyState::Enabled);
    assert_eq!(k.status.current_version, Some(2));
    assert_eq!(k.take_events(), ["VersionDestroyed"]);
    // A destroyed version's number is never used again.
    rotated(&mut k, "r2");
    assert_eq!(k.status.current_version, Some(3));
}

#[test]
fn the_current_version_is_neither_disabled_nor_destroyed() {
    let mut k = Sim::new();
    k.reconcile();
    k.take_events();
    k.edit(|s| {
        s.versions = vec![crate::api::VersionRequest {
            version: 1,
            enabled: false,
            destruction: Deletion { scheduled: true, pending_window_days: 7, force: true },
        }]
    });
    k.reconcile();
    assert_eq!(k.status.versions[0].state, KeyVersionState::Enabled);
    let refused = k.condition(TRANSITION_REFUSED).unwrap();
    assert!(refused.message.contains("version 1 is the current version"), "{}", refused.message);
    assert!(k.actions.iter().all(|a| !matches!(a, MaterialAction::ScheduleVersionDestruction { .. })));
    // Unknown versions are named too.
    k.edit(|s| s.versions[0].version = 9);
    k.reconcile();
    assert!(
        k.condition(TRANSITION_REFUSED).unwrap().message.contains("version 9, which the key does not have")
    );
}

#[test]
fn a_version_is_disabled_and_enabled_again_and_its_destruction_cancelled() {
    let mut k = Sim::new();
    k.reconcile();
    rotated(&mut k, "r1");
    k.take_events();
    let request = |enabled, scheduled| crate::api::VersionRequest {
        version: 1,
        enabled,
        destruction: Deletion { scheduled, pending_window_days: 7, force: false },
    };
    k.edit(|s| s.versions = vec![request(false, false)]);
    k.reconcile();
    assert_eq!(k.status.versions[0].state, KeyVersionState::Disabled);
    assert_eq!(k.take_events(), ["VersionDisabled"]);
    k.edit(|s| s.versions = vec![request(false, true)]);
    k.reconcile();
    assert_eq!(k.status.versions[0].state, KeyVersionState::PendingDestruction);
    // Refused on day 3: the destruction moves.
    k.now += days(3);
    k.usage = Some(usage(ReporterKind::KeyApi, 1, refused_use(k.now)));
    k.reconcile();
    assert_eq!(k.status.versions[0].deletion_time, Some(Time(k.now + days(8))));
    assert!(k.condition(USED_WHILE_PENDING).is_some());
    k.edit(|s| s.versions = vec![request(true, false)]);
    k.reconcile();
    assert_eq!(k.status.versions[0].state, KeyVersionState::Enabled);
    assert_eq!(
        k.take_events(),
        ["VersionDestructionScheduled", "VersionUsedWhilePendingDestruction", "VersionDestructionCancelled"]
    );
}

#[test]
fn a_waiting_version_destruction_is_looked_at_again_when_the_version_is_no_longer_needed() {
    let mut k = Sim::new();
    k.reconcile();
    rotated(&mut k, "r1");
    k.usage = Some(usage(ReporterKind::KeyApi, 1, decrypted(k.now)));
    k.edit(|s| {
        s.versions = vec![crate::api::VersionRequest {
            version: 1,
            enabled: true,
            destruction: Deletion { scheduled: true, pending_window_days: 7, force: false },
        }]
    });
    let requeue = k.reconcile();
    assert_eq!(k.condition(TRANSITION_REFUSED).unwrap().reason, "VersionDestructionRefused");
    assert_eq!(requeue, Some(days(8)), "the last decryption's day, then 7 days");
    k.now += days(8);
    k.reconcile();
    assert_eq!(k.status.versions[0].state, KeyVersionState::PendingDestruction);
}

#[test]
fn a_fresh_refusal_is_the_reason_and_a_kept_one_follows() {
    let mut k = Sim::new();
    k.reconcile();
    k.edit(|s| s.enabled = false);
    k.reconcile();
    rotated(&mut k, "r");
    assert_eq!(k.condition(TRANSITION_REFUSED).unwrap().reason, "RotationRefused");
    k.edit(|s| s.deletion.scheduled = true);
    k.reconcile();
    k.edit(|s| s.enabled = true);
    k.reconcile();
    let refused = k.condition(TRANSITION_REFUSED).unwrap();
    assert_eq!(refused.reason, "EnableRefused");
    assert!(refused.message.contains(" | also: on-demand rotation \"r\" refused"), "{}", refused.message);
}
