//! The KmsKey lifecycle as a pure function: what the key's material and spec say, and the
//! time, decide the next material change (at most one per reconcile) and the status.
//!
//! Nothing here talks to the API server, so every transition — rotation due, window
//! elapsed, cancel, a restart between writing material and writing status, a clock that
//! jumps — is a plain unit test. Everything is derived from the material (what exists, and
//! the deletion time promised, which the material object records) and the spec (what is
//! wanted). Status is a report: what it contributes decides no destruction and no use of
//! a key — only the last observed `enabled` (for the EnableRefused condition), the last
//! handled on-demand request (so that a refused request is not retried; whoever can edit
//! status could as well edit the request), and, when the material object is gone, that
//! the key was destroyed or had material (which only ever stops kubekms from making new
//! material). A crash between a material write and the status write therefore neither
//! repeats nor loses a version, and a forged status is overwritten at the next reconcile.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{
    KeyState, KeyVersionState, KeyVersionStatus, KmsKeySpec, KmsKeyStatus, MAX_VERSIONS, Origin,
    VersionTrigger,
};

/// Bounds of the deletion window and the rotation period, as the CRD schema sets them.
const MIN_WINDOW_DAYS: u8 = 7;
const MAX_WINDOW_DAYS: u8 = 30;
const MIN_PERIOD_DAYS: u16 = 90;
const MAX_PERIOD_DAYS: u16 = 2560;

/// The condition that reports whether a key can be used.
pub const READY: &str = "Ready";
/// The condition that reports a transition the controller refused.
pub const TRANSITION_REFUSED: &str = "TransitionRefused";

/// One version as the material records it (never the material itself).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub version: u32,
    pub created: Timestamp,
    pub trigger: VersionTrigger,
    pub request: Option<String>,
}

/// What the key's `KmsKeyMaterial` says.
#[derive(Debug, Clone, PartialEq)]
pub enum Material {
    /// There is none.
    Absent,
    /// Versions exist (at least one), oldest first.
    Present { versions: Vec<VersionInfo>, root_key_matches: bool },
    /// The material was destroyed at this time.
    Destroyed { at: Timestamp },
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub spec: &'a KmsKeySpec,
    pub generation: i64,
    /// `kubectl delete` got past the admission policy (metadata.deletionTimestamp is set).
    pub deleting: bool,
    pub status: &'a KmsKeyStatus,
    pub material: &'a Material,
    /// The deletion time the material object records (promised when the controller first
    /// saw the deletion requested).
    pub promised_deletion: Option<Timestamp>,
}

/// The one material change a reconcile makes.
#[derive(Debug, Clone, PartialEq)]
pub enum MaterialAction {
    /// Create the material with version 1 (recording the on-demand request, if any, as
    /// handled by it).
    Create { request: Option<String> },
    /// Add a version.
    Rotate { trigger: VersionTrigger, request: Option<String> },
    /// Record in the material object (creating one without versions if there is none)
    /// that the material will be destroyed at `at`.
    ScheduleDeletion { at: Timestamp },
    /// Remove the promised deletion time: the deletion was cancelled.
    CancelDeletion,
    /// Destroy every version (or record a destroyed key that never had material).
    Destroy,
}

/// What the reconcile should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Change the material, then plan again with the result.
    Act(MaterialAction),
    /// Write this status (if it differs) and look again after `requeue_after`.
    Settle { status: KmsKeyStatus, requeue_after: Option<SignedDuration> },
}

/// How long a "day" of rotation periods and deletion windows lasts. One real day,
/// except in tests that shorten it.
#[derive(Debug, Clone, Copy)]
pub struct Calendar {
    pub day: SignedDuration,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar { day: SignedDuration::from_hours(24) }
    }
}

/// Why a calendar is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    #[error("a day must last a positive time, got {0:#?}")]
    NotPositive(SignedDuration),
}

impl Calendar {
    /// A calendar whose day lasts `day`, which must be positive (a day of zero or less would
    /// make every rotation period and deletion window already over).
    pub fn new(day: SignedDuration) -> Result<Calendar, CalendarError> {
        if day.is_positive() { Ok(Calendar { day }) } else { Err(CalendarError::NotPositive(day)) }
    }

    fn days(&self, n: u32) -> SignedDuration {
        self.day.checked_mul(n as i32).unwrap_or(SignedDuration::MAX)
    }
}

fn add(t: Timestamp, d: SignedDuration) -> Timestamp {
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

/// Rounds up to a whole second, the precision status keeps: a promised time read back
/// from status is never earlier than the one computed.
fn ceil_second(t: Timestamp) -> Timestamp {
    let up = i64::from(t.subsec_nanosecond() > 0);
    Timestamp::from_second(t.as_second().saturating_add(up)).unwrap_or(t)
}

/// Decides the next step for one key at time `now`.
pub fn plan(o: &Observed<'_>, now: Timestamp, cal: Calendar) -> Plan {
    let prev = o.status;
    let mut next = KmsKeyStatus {
        key_id: prev.key_id.clone(),
        observed_generation: Some(o.generation),
        observed_enabled: Some(o.spec.enabled),
        last_on_demand_request: prev.last_on_demand_request.clone(),
        ..Default::default()
    };
    let mut refused: Option<(&'static str, String)> = None;
    let mut requeue: Option<Timestamp> = None;

    // What the spec asks for, besides the state: an on-demand rotation not yet handled.
    let pending_request = o.spec.rotation.on_demand_request.as_ref().filter(|req| {
        prev.last_on_demand_request.as_ref() != Some(*req)
            && !matches!(o.material, Material::Present { versions, .. }
                if versions.iter().any(|v| v.request.as_ref() == Some(*req)))
    });

    let versions: &[VersionInfo] = match o.material {
        Material::Present { versions, .. } => versions,
        _ => &[],
    };
    if let Some(request) = &o.spec.rotation.on_demand_request
        && versions.iter().any(|v| v.request.as_ref() == Some(request))
    {
        next.last_on_demand_request = Some(request.clone());
    }
    next.versions = versions
        .iter()
        .map(|v| KeyVersionStatus {
            version: v.version,
            created: Time(v.created),
            state: KeyVersionState::Enabled,
            deletion_time: None,
            last_decrypt: None,
            used_by_stored_data: None,
        })
        .collect();
    next.current_version = versions.last().map(|v| v.version);
    next.last_rotation_time = versions.iter().skip(1).last().map(|v| Time(v.created));

    let deletion_requested = o.spec.deletion.scheduled || o.deleting;
    let destroyed = match o.material {
        Material::Destroyed { .. } => true,
        // The tombstone of a destroyed key is removed just before its KmsKey goes away.
        Material::Absent => prev.state == Some(KeyState::Destroyed),
        Material::Present { .. } => false,
    };
    if !destroyed && !deletion_requested && o.promised_deletion.is_some() {
        return Plan::Act(MaterialAction::CancelDeletion);
    }
    let state = match o.material {
        _ if destroyed => {
            // Destroyed is final; keep the version history, marked destroyed.
            next.versions = prev
                .versions
                .iter()
                .map(|v| KeyVersionStatus { state: KeyVersionState::Destroyed, ..v.clone() })
                .collect();
            next.current_version = prev.current_version;
            next.last_rotation_time = prev.last_rotation_time.clone();
            next.deletion_time = o.promised_deletion.map(Time).or_else(|| prev.deletion_time.clone());
            KeyState::Destroyed
        }
        _ if deletion_requested => {
            let Some(deletion_time) = o.promised_deletion else {
                // The schema bounds the window to 7–30 days; clamp anyway, in case the CRD
                // installed is older than this controller.
                let window = o.spec.deletion.pending_window_days.clamp(MIN_WINDOW_DAYS, MAX_WINDOW_DAYS);
                let at = ceil_second(add(now, cal.days(u32::from(window))));
                return Plan::Act(MaterialAction::ScheduleDeletion { at });
            };
            if now >= deletion_time {
                return Plan::Act(MaterialAction::Destroy);
            }
            next.deletion_time = Some(Time(deletion_time));
            requeue = Some(deletion_time);
            if o.spec.enabled && prev.observed_enabled == Some(false) {
                refused = Some((
                    "EnableRefused",
                    "the key is pending deletion and cannot be enabled; cancel the deletion first \
                     (spec.deletion.scheduled: false, with spec.enabled: false), then enable it"
                        .to_owned(),
                ));
            }
            KeyState::PendingDeletion
        }
        Material::Absent if prev.current_version.is_some() => {
            // The material existed and is gone without being destroyed by kubekms: never
            // paper over that with new material.
            return Plan::Settle {
                status: with_conditions(
                    KmsKeyStatus { state: prev.state, ..prev.clone() },
                    prev,
                    o.generation,
                    now,
                    (
                        "False",
                        "MaterialMissing",
                        "the key's KmsKeyMaterial has disappeared; restore that object from a backup; \
                         kubekms will not replace it with new material"
                            .to_owned(),
                    ),
                    None,
                ),
                requeue_after: None,
            };
        }
        Material::Absent => match o.spec.origin {
            Origin::Kubekms => {
                return Plan::Act(MaterialAction::Create {
                    request: o.spec.rotation.on_demand_request.clone(),
                });
            }
            Origin::External => KeyState::PendingImport,
        },
        Material::Present { .. } if o.spec.enabled => KeyState::Enabled,
        // (Destroyed material was handled first.)
        Material::Present { .. } | Material::Destroyed { .. } => KeyState::Disabled,
    };
    next.state = Some(state);

    // Rotation: on demand first, then on schedule; only an Enabled key of our own making
    // rotates.
    let root_key_matches = matches!(o.material, Material::Present { root_key_matches: true, .. });
    let may_rotate = |label: &str| -> Result<(), String> {
        if state != KeyState::Enabled {
            return Err(format!("the key is {}; only an Enabled key can be {label}", state.as_str()));
        }
        if o.spec.origin == Origin::External {
            return Err(format!("the key's material is imported (origin EXTERNAL); it cannot be {label}"));
        }
        if !root_key_matches {
            return Err("the key's material is wrapped by another root key than this controller's".into());
        }
        if versions.len() >= MAX_VERSIONS {
            return Err(format!("the key already has {MAX_VERSIONS} versions, the most a key can hold"));
        }
        Ok(())
    };
    if let Some(request) = pending_request {
        match may_rotate("rotated") {
            Ok(()) => {
                return Plan::Act(MaterialAction::Rotate {
                    trigger: VersionTrigger::OnDemand,
                    request: Some(request.clone()),
                });
            }
            Err(why) => {
                next.last_on_demand_request = Some(request.clone());
                refused = Some(("RotationRefused", format!("on-demand rotation {request:?} refused: {why}")));
            }
        }
    }
    if state == KeyState::Enabled
        && o.spec.rotation.automatic
        && o.spec.origin == Origin::Kubekms
        && let Some(latest) = versions.last()
    {
        let period = o.spec.rotation.period_days.clamp(MIN_PERIOD_DAYS, MAX_PERIOD_DAYS);
        let due = add(latest.created, cal.days(u32::from(period)));
        if now >= due && may_rotate("rotated").is_ok() {
            return Plan::Act(MaterialAction::Rotate { trigger: VersionTrigger::Scheduled, request: None });
        }
        next.next_rotation_time = Some(Time(due));
        requeue = Some(requeue.map_or(due, |r| r.min(due)));
    }

    // A refusal stays reported while the spec still asks for the refused thing.
    if refused.is_none()
        && let Some(c) = find(&prev.conditions, TRANSITION_REFUSED)
    {
        let still = match c.reason.as_str() {
            "EnableRefused" => state == KeyState::PendingDeletion && o.spec.enabled,
            "RotationRefused" => {
                o.spec.rotation.on_demand_request.is_some()
                    && o.spec.rotation.on_demand_request == prev.last_on_demand_request
            }
            _ => false,
        };
        if still {
            refused = Some((
                if c.reason == "EnableRefused" { "EnableRefused" } else { "RotationRefused" },
                c.message.clone(),
            ));
        }
    }

    let ready = match state {
        KeyState::Enabled => {
            ("True", "Enabled", format!("version {} is current", next.current_version.unwrap_or(0)))
        }
        KeyState::Disabled => ("False", "Disabled", "the key is disabled (spec.enabled: false)".to_owned()),
        KeyState::PendingDeletion => (
            "False",
            "PendingDeletion",
            match &next.deletion_time {
                Some(t) if o.deleting && !o.spec.deletion.scheduled => {
                    format!("the KmsKey was deleted; its material will be destroyed at {}", t.0)
                }
                Some(t) => format!(
                    "the key material will be destroyed at {}; cancel with spec.deletion.scheduled: false",
                    t.0
                ),
                None => "the key is pending deletion".to_owned(),
            },
        ),
        KeyState::PendingImport => {
            ("False", "PendingImport", "waiting for imported key material (kubekms key import)".to_owned())
        }
        KeyState::Destroyed => ("False", "Destroyed", "the key material has been destroyed".to_owned()),
        KeyState::Creating => ("False", "Creating", "creating version 1".to_owned()),
    };
    let status = with_conditions(next, prev, o.generation, now, ready, refused);
    let requeue_after = requeue.map(|t| t.duration_since(now).max(SignedDuration::from_secs(1)));
    Plan::Settle { status, requeue_after }
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// A condition with `lastTransitionTime` kept from `prev` unless its status flips.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: i64,
    now: Timestamp,
) -> Condition {
    let last_transition_time = match find(prev, type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: Some(generation),
        last_transition_time,
    }
}

fn with_conditions(
    mut next: KmsKeyStatus,
    prev: &KmsKeyStatus,
    generation: i64,
    now: Timestamp,
    ready: (&str, &str, String),
    refused: Option<(&str, String)>,
) -> KmsKeyStatus {
    let mut conditions = vec![condition(&prev.conditions, READY, ready.0, ready.1, ready.2, generation, now)];
    if let Some((reason, message)) = refused {
        conditions.push(condition(
            &prev.conditions,
            TRANSITION_REFUSED,
            "True",
            reason,
            message,
            generation,
            now,
        ));
    }
    next.conditions = conditions;
    next
}

/// An Event the controller publishes for a status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
}

/// The Events that going from `prev` to `next` deserves. Derived from status, after it
/// was written, so a crash between a material write and the status write still reports
/// the change once.
pub fn transitions(prev: &KmsKeyStatus, next: &KmsKeyStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let normal = |reason, action, note: String| Transition { warning: false, reason, action, note };
    let version = next.current_version.unwrap_or(0);
    match (prev.state, next.state) {
        (a, b) if a == b => {}
        (None | Some(KeyState::Creating), Some(KeyState::Enabled | KeyState::Disabled)) => {
            out.push(normal("KeyCreated", "Create", format!("created version {version}")));
        }
        (Some(KeyState::PendingImport), Some(KeyState::Enabled | KeyState::Disabled)) => {
            out.push(normal(
                "KeyMaterialImported",
                "Import",
                format!("imported material as version {version}"),
            ));
        }
        (_, Some(KeyState::Destroyed)) => {
            out.push(normal("KeyMaterialDestroyed", "Destroy", "the key material has been destroyed".into()));
        }
        (Some(KeyState::PendingDeletion), Some(s)) => out.push(normal(
            "KeyDeletionCancelled",
            "CancelDeletion",
            format!("deletion cancelled; the key is {}", s.as_str()),
        )),
        (_, Some(KeyState::PendingDeletion)) => {
            let when = next.deletion_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            out.push(normal(
                "KeyDeletionScheduled",
                "ScheduleDeletion",
                format!("the key material will be destroyed at {when}"),
            ));
        }
        (_, Some(KeyState::Disabled)) => {
            out.push(normal("KeyDisabled", "Disable", "the key is disabled".into()))
        }
        (_, Some(KeyState::Enabled)) => out.push(normal("KeyEnabled", "Enable", "the key is enabled".into())),
        _ => {}
    }
    if let (Some(a), Some(b)) = (prev.current_version, next.current_version)
        && b > a
    {
        out.push(normal("KeyRotated", "Rotate", format!("version {b} is current (was {a})")));
    }
    let refusal = |s: &KmsKeyStatus| {
        find(&s.conditions, TRANSITION_REFUSED).map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = refusal(next)
        && refusal(prev).as_ref() != Some(&(reason.clone(), message.clone()))
    {
        out.push(Transition {
            warning: true,
            reason: if reason == "EnableRefused" { "EnableRefused" } else { "RotationRefused" },
            action: if reason == "EnableRefused" { "Enable" } else { "Rotate" },
            note: message,
        });
    }
    out
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
