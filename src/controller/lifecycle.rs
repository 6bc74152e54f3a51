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
use crate::domain::{ReporterKind, Usage, UseKind};

/// Bounds of the deletion window and the rotation period, as the CRD schema sets them.
const MIN_WINDOW_DAYS: u8 = 7;
const MAX_WINDOW_DAYS: u8 = 30;
const MIN_PERIOD_DAYS: u16 = 90;
const MAX_PERIOD_DAYS: u16 = 2560;

/// The condition that reports whether a key can be used.
pub const READY: &str = "Ready";
/// The condition that reports a transition the controller refused.
pub const TRANSITION_REFUSED: &str = "TransitionRefused";
/// The condition that reports a use attempted while the key was pending deletion (or a
/// version pending destruction), which postponed the destruction.
pub const USED_WHILE_PENDING: &str = "UsedWhilePendingDeletion";

/// One version as the material records it (never the material itself).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    pub version: u32,
    pub created: Timestamp,
    pub trigger: VersionTrigger,
    pub request: Option<String>,
    /// When the version will be destroyed, as the material promises it.
    pub deletion_time: Option<Timestamp>,
    /// When the version was destroyed (alone, before the key).
    pub destroyed: Option<Timestamp>,
    /// When the version's imported material expired and was deleted (until the same
    /// material is imported again).
    pub expired: Option<Timestamp>,
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
    /// Why the controller refused the deletion the spec asks for, as the material records
    /// it (the key stays usable while the spec asks for the same without force).
    pub deletion_refused: Option<&'a str>,
    /// For a key the KMS plugin serves: the oldest version stored data may still use, as
    /// the last finished storage migration recorded it in the material.
    pub storage_oldest: Option<u32>,
    /// When the key's versions were last used (none before anything reported a use).
    pub usage: Option<&'a Usage>,
    /// `kubekms keyring restore` is recreating the key with the keyId its annotation
    /// names: its material comes from the backup, so none is made here.
    pub awaiting_restore: Option<&'a str>,
    /// When the key's imported material expires, as the material records it.
    pub valid_to: Option<Timestamp>,
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
    /// that the material will be destroyed at `at` (a later time than one already
    /// promised postpones it). `forced` names what still needed the key, when
    /// spec.deletion.force overrode it: the shell audits that.
    ScheduleDeletion { at: Timestamp, forced: Option<String> },
    /// Record that the deletion the spec asks for is refused, and why.
    RefuseDeletion { message: String },
    /// Remove a refusal the spec no longer asks for.
    ClearDeletionRefusal,
    /// Promise (or postpone) the destruction of one version.
    ScheduleVersionDestruction { version: u32, at: Timestamp, forced: Option<String> },
    /// Remove a version's promised destruction.
    CancelVersionDestruction { version: u32 },
    /// Destroy one version's material.
    DestroyVersion { version: u32 },
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
    Settle { status: Box<KmsKeyStatus>, requeue_after: Option<SignedDuration> },
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
    let mut refused: Vec<(&'static str, String)> = Vec::new();
    let mut used_while_pending: Option<String> = None;
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
    let current =
        versions.iter().rev().find(|v| v.destroyed.is_none() && v.expired.is_none()).map(|v| v.version);
    let storage_key = o.storage_oldest.is_some() || o.usage.is_some_and(Usage::is_storage_key);
    next.versions = versions.iter().map(|v| version_status(o, v, current, storage_key)).collect();
    next.current_version = current;
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
    if !deletion_requested && o.deletion_refused.is_some() {
        return Plan::Act(MaterialAction::ClearDeletionRefusal);
    }
    // A refused deletion leaves the key as it was, while the spec asks for the same
    // without force.
    let refusal =
        o.deletion_refused.filter(|_| o.promised_deletion.is_none() && !o.spec.deletion.force && !destroyed);
    let pending = deletion_requested && refusal.is_none();
    if let Some(message) = refusal {
        refused.push(("DeletionRefused", message.to_owned()));
    }
    let window = o.spec.deletion.pending_window_days.clamp(MIN_WINDOW_DAYS, MAX_WINDOW_DAYS);
    let state = match o.material {
        _ if destroyed => {
            // Destroyed is final; keep the version history, marked destroyed.
            next.versions = prev
                .versions
                .iter()
                .map(|v| KeyVersionStatus {
                    state: KeyVersionState::Destroyed,
                    deletion_time: None,
                    used_by_stored_data: v.used_by_stored_data.map(|_| false),
                    ..v.clone()
                })
                .collect();
            next.current_version = prev.current_version;
            next.last_rotation_time = prev.last_rotation_time.clone();
            next.deletion_time = o.promised_deletion.map(Time).or_else(|| prev.deletion_time.clone());
            KeyState::Destroyed
        }
        _ if pending => {
            let Some(deletion_time) = o.promised_deletion else {
                // The schema bounds the window to 7–30 days; clamp anyway, in case the CRD
                // installed is older than this controller.
                // (Without material there is nothing to protect.)
                let need = matches!(o.material, Material::Present { .. })
                    .then(|| still_needed(o, now, window, cal, storage_key))
                    .flatten();
                if let Some(need) = &need
                    && !o.spec.deletion.force
                {
                    return Plan::Act(MaterialAction::RefuseDeletion { message: refusal_message(need) });
                }
                let at = ceil_second(add(now, cal.days(u32::from(window))));
                return Plan::Act(MaterialAction::ScheduleDeletion { at, forced: need });
            };
            // Every use attempted meanwhile starts the waiting period anew.
            if let Some(used) = o.usage.and_then(|u| u.last_use_of_any(UseKind::Refused)) {
                let later = ceil_second(add(used, cal.days(u32::from(window))));
                if later > deletion_time {
                    return Plan::Act(MaterialAction::ScheduleDeletion { at: later, forced: None });
                }
                if add(used, cal.days(u32::from(window))) >= deletion_time {
                    used_while_pending = Some(format!(
                        "the key was asked for while pending deletion (last by {used}); its destruction \
                         waits until it has gone unused for {window} days, now until {deletion_time}"
                    ));
                }
            }
            if now >= deletion_time {
                return Plan::Act(MaterialAction::Destroy);
            }
            next.deletion_time = Some(Time(deletion_time));
            requeue = Some(deletion_time);
            if o.spec.enabled && prev.observed_enabled == Some(false) {
                refused.push((
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
                status: Box::new(with_conditions(
                    KmsKeyStatus { state: prev.state, ..owned(prev) },
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
                    Vec::new(),
                    None,
                )),
                requeue_after: None,
            };
        }
        Material::Absent if o.awaiting_restore.is_some() => {
            let key_id = o.awaiting_restore.unwrap_or_default();
            return Plan::Settle {
                status: Box::new(with_conditions(
                    owned(prev),
                    prev,
                    o.generation,
                    now,
                    (
                        "False",
                        "AwaitingRestore",
                        format!(
                            "kubekms keyring restore is recreating this key (keyId {key_id}) and writes its \
                             material; if it was interrupted, run it again: it resumes this key"
                        ),
                    ),
                    Vec::new(),
                    None,
                )),
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
        // Imported material that expired (or is past its validTo, before its deletion): the
        // key waits for the same material again.
        Material::Present { .. }
            if o.spec.origin == Origin::External
                && (current.is_none() || o.valid_to.is_some_and(|t| t <= now)) =>
        {
            KeyState::PendingImport
        }
        Material::Present { .. } if o.spec.enabled => KeyState::Enabled,
        // (Destroyed material was handled first.)
        Material::Present { .. } | Material::Destroyed { .. } => KeyState::Disabled,
    };
    next.state = Some(state);
    if matches!(state, KeyState::Enabled | KeyState::Disabled) {
        next.valid_to = o.valid_to.map(Time);
        requeue = min_time(requeue, o.valid_to);
    }

    // Single versions: only while the key itself is neither pending deletion nor destroyed.
    if matches!(state, KeyState::Enabled | KeyState::Disabled) {
        match plan_versions(o, versions, current, storage_key, now, cal) {
            VersionPlan::Act(action) => return Plan::Act(action),
            VersionPlan::Settle { refusals, wake, used } => {
                refused.extend(refusals);
                requeue = min_time(requeue, wake);
                used_while_pending = used_while_pending.or(used);
            }
        }
    }

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
                refused
                    .insert(0, ("RotationRefused", format!("on-demand rotation {request:?} refused: {why}")));
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
        requeue = min_time(requeue, Some(due));
    }

    // A refused rotation or enable stays reported while the spec still asks for it (the
    // rotation is not retried; the enable was refused when spec.enabled turned true); the
    // other refusals are decided anew each time.
    if let Some(c) = find(&prev.conditions, TRANSITION_REFUSED) {
        let first = c.message.split(ALSO).next().unwrap_or_default().to_owned();
        let still = match c.reason.as_str() {
            "RotationRefused" => {
                o.spec.rotation.on_demand_request.is_some()
                    && o.spec.rotation.on_demand_request == prev.last_on_demand_request
            }
            "EnableRefused" => state == KeyState::PendingDeletion && o.spec.enabled,
            _ => false,
        };
        let reason = if c.reason == "EnableRefused" { "EnableRefused" } else { "RotationRefused" };
        // A fresh refusal is reported first; one kept from before after it.
        if still && !refused.iter().any(|(r, _)| *r == reason) {
            refused.push((reason, first));
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
        KeyState::PendingImport => match versions.iter().filter_map(|v| v.expired).max().or(o.valid_to) {
            Some(at) => (
                "False",
                "PendingImport",
                format!(
                    "the imported key material expired at {at}; import the same material again \
                     (kubekms key import) to use the key and its versions"
                ),
            ),
            None => (
                "False",
                "PendingImport",
                "waiting for imported key material (kubekms key import)".to_owned(),
            ),
        },
        KeyState::Destroyed => ("False", "Destroyed", "the key material has been destroyed".to_owned()),
        KeyState::Creating => ("False", "Creating", "creating version 1".to_owned()),
    };
    let status = with_conditions(next, prev, o.generation, now, ready, refused, used_while_pending);
    let requeue_after = requeue.map(|t| t.duration_since(now).max(SignedDuration::from_secs(1)));
    Plan::Settle { status: Box::new(status), requeue_after }
}

fn min_time(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One version as status reports it.
fn version_status(
    o: &Observed<'_>,
    v: &VersionInfo,
    current: Option<u32>,
    storage_key: bool,
) -> KeyVersionStatus {
    let disabled = o.spec.versions.iter().any(|r| r.version == v.version && !r.enabled);
    let state = if v.destroyed.is_some() {
        KeyVersionState::Destroyed
    } else if v.expired.is_some() {
        KeyVersionState::Expired
    } else if v.deletion_time.is_some() {
        KeyVersionState::PendingDestruction
    } else if disabled && Some(v.version) != current {
        KeyVersionState::Disabled
    } else {
        KeyVersionState::Enabled
    };
    let last_decrypt = o
        .usage
        .and_then(|u| u.reporters.iter().filter_map(|r| r.versions.get(&v.version)?.last_decrypt).max());
    KeyVersionStatus {
        version: v.version,
        created: Time(v.created),
        state,
        deletion_time: v.deletion_time.map(Time),
        last_decrypt: last_decrypt.map(Time),
        used_by_stored_data: storage_key
            .then(|| v.destroyed.is_none() && o.storage_oldest.is_none_or(|oldest| v.version >= oldest)),
    }
}

/// What still needs a key whose deletion is asked for, if anything: data kube-apiserver
/// stores under it, or a decryption within the waiting period's length.
fn still_needed(
    o: &Observed<'_>,
    now: Timestamp,
    window_days: u8,
    cal: Calendar,
    storage_key: bool,
) -> Option<String> {
    if storage_key {
        return Some(
            "kube-apiserver stores data under this key (a KMS plugin serves it): every object it \
             encrypted would become unreadable"
                .to_owned(),
        );
    }
    let last = o.usage.and_then(|u| u.last_use_of_any(UseKind::Decrypt))?;
    (add(last, cal.days(u32::from(window_days))) > now).then(|| {
        format!("the key decrypted data within the last {window_days} days (until {last} at the latest)")
    })
}

fn refusal_message(need: &str) -> String {
    format!(
        "deletion refused: {need}. Make sure nothing needs the key any more, or set \
         spec.deletion.force: true to schedule the deletion anyway (recorded in the audit trail)"
    )
}

/// What the single-version requests call for.
enum VersionPlan {
    Act(MaterialAction),
    Settle { refusals: Vec<(&'static str, String)>, wake: Option<Timestamp>, used: Option<String> },
}

/// Carries out `spec.versions`: promises, postpones, cancels and performs the destruction
/// of single versions, and explains the requests it refuses. A request to destroy a
/// version that something still needs waits (refused, and reported) until nothing does —
/// for a key kube-apiserver stores data under, until a storage migration has moved that
/// data off the version — unless it says `force`.
fn plan_versions(
    o: &Observed<'_>,
    versions: &[VersionInfo],
    current: Option<u32>,
    storage_key: bool,
    now: Timestamp,
    cal: Calendar,
) -> VersionPlan {
    let mut refusals = Vec::new();
    let mut wake = None;
    let mut used = None;
    let all = [ReporterKind::StoragePlugin, ReporterKind::KeyApi];
    for v in versions.iter().filter(|v| v.destroyed.is_none()) {
        let request = o.spec.versions.iter().find(|r| r.version == v.version);
        let wanted = request.is_some_and(|r| r.destruction.scheduled);
        let window = request.map_or(MIN_WINDOW_DAYS, |r| r.destruction.pending_window_days);
        let window = cal.days(u32::from(window.clamp(MIN_WINDOW_DAYS, MAX_WINDOW_DAYS)));
        match (wanted, v.deletion_time) {
            (false, Some(_)) => {
                return VersionPlan::Act(MaterialAction::CancelVersionDestruction { version: v.version });
            }
            (false, None) => {}
            (true, None) => {
                if Some(v.version) == current {
                    continue; // refused below, with the other requests about the current version
                }
                let force = request.is_some_and(|r| r.destruction.force);
                let need = version_needed(o, v.version, storage_key, now, window);
                match need {
                    Some((need, until)) if !force => {
                        // Look again when the need ends (a migration's record wakes the
                        // controller by itself).
                        wake = min_time(wake, until);
                        refusals.push((
                            "VersionDestructionRefused",
                            format!(
                                "destruction of version {} waits: {need}; it is carried out once nothing \
                                 needs the version (or set force: true in its spec.versions entry)",
                                v.version
                            ),
                        ));
                    }
                    forced => {
                        let forced = forced.map(|(need, _)| need);
                        let at = ceil_second(add(now, window));
                        return VersionPlan::Act(MaterialAction::ScheduleVersionDestruction {
                            version: v.version,
                            at,
                            forced,
                        });
                    }
                }
            }
            (true, Some(deletion_time)) => {
                if let Some(last) = o.usage.and_then(|u| u.last_use(v.version, UseKind::Refused, &all)) {
                    let later = ceil_second(add(last, window));
                    if later > deletion_time {
                        return VersionPlan::Act(MaterialAction::ScheduleVersionDestruction {
                            version: v.version,
                            at: later,
                            forced: None,
                        });
                    }
                    if add(last, window) >= deletion_time {
                        used = Some(format!(
                            "version {} was asked for while pending destruction (last by {last}); its \
                             destruction waits until {deletion_time}",
                            v.version
                        ));
                    }
                }
                if now >= deletion_time {
                    return VersionPlan::Act(MaterialAction::DestroyVersion { version: v.version });
                }
                wake = min_time(wake, Some(deletion_time));
            }
        }
    }
    for r in &o.spec.versions {
        let known = versions.iter().any(|v| v.version == r.version);
        let asks = !r.enabled || r.destruction.scheduled;
        if !known && asks {
            refusals.push((
                "VersionRequestRefused",
                format!("spec.versions names version {}, which the key does not have", r.version),
            ));
        } else if Some(r.version) == current && asks {
            refusals.push((
                "VersionRequestRefused",
                format!(
                    "version {} is the current version: it cannot be disabled or destroyed; rotate the key \
                     first, and the request takes effect once another version is current",
                    r.version
                ),
            ));
        }
    }
    VersionPlan::Settle { refusals, wake, used }
}

/// What still needs one version, if anything, and until when (if that is known).
fn version_needed(
    o: &Observed<'_>,
    version: u32,
    storage_key: bool,
    now: Timestamp,
    window: SignedDuration,
) -> Option<(String, Option<Timestamp>)> {
    if storage_key && o.storage_oldest.is_none_or(|oldest| version >= oldest) {
        let need = format!(
            "data kube-apiserver stores may still be encrypted under version {version} until a storage \
             migration has moved it to a later version (see status.storageMigration)"
        );
        return Some((need, None));
    }
    // For a key the plugin serves, a finished migration answers for the stored data; only
    // workloads' own decryptions count then.
    let from: &[ReporterKind] = if storage_key {
        &[ReporterKind::KeyApi]
    } else {
        &[ReporterKind::KeyApi, ReporterKind::StoragePlugin]
    };
    let last = o.usage.and_then(|u| u.last_use(version, UseKind::Decrypt, from))?;
    let until = last.saturating_add(window).unwrap_or(Timestamp::MAX);
    (until > now).then(|| {
        (
            format!("it decrypted data within its waiting period's length (until {last} at the latest)"),
            Some(until),
        )
    })
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
    refused: Vec<(&str, String)>,
    used_while_pending: Option<String>,
) -> KmsKeyStatus {
    let mut conditions = vec![condition(&prev.conditions, READY, ready.0, ready.1, ready.2, generation, now)];
    if let Some((reason, _)) = refused.first() {
        let message = refused.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>().join(ALSO);
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
    if let Some(message) = used_while_pending {
        conditions.push(condition(
            &prev.conditions,
            USED_WHILE_PENDING,
            "True",
            "UsedWhilePending",
            message,
            generation,
            now,
        ));
    }
    next.conditions = conditions;
    next
}

/// Between the refusals one TransitionRefused condition reports.
const ALSO: &str = " | also: ";

/// The conditions this planner writes; others (StorageMigrated) belong to other writers.
const OWN_CONDITIONS: [&str; 3] = [READY, TRANSITION_REFUSED, USED_WHILE_PENDING];

/// `status` without what other writers own (the storage migration's field and condition):
/// what a planned status is compared with, so that their writes cause no write of ours.
pub fn owned(status: &KmsKeyStatus) -> KmsKeyStatus {
    let mut own = status.clone();
    own.storage_migration = None;
    own.conditions.retain(|c| OWN_CONDITIONS.contains(&c.type_.as_str()));
    own
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
        (Some(KeyState::Enabled | KeyState::Disabled), Some(KeyState::PendingImport)) => {
            let when = prev.valid_to.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
            out.push(normal(
                "KeyMaterialExpired",
                "ExpireImportedMaterial",
                format!("the imported key material expired at {when} and is deleted; the key waits for the same material"),
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
        let (reason, action) = match reason.as_str() {
            "EnableRefused" => ("EnableRefused", "Enable"),
            "DeletionRefused" => ("DeletionRefused", "ScheduleDeletion"),
            "VersionDestructionRefused" => ("VersionDestructionRefused", "ScheduleVersionDestruction"),
            "VersionRequestRefused" => ("VersionRequestRefused", "ChangeVersion"),
            _ => ("RotationRefused", "Rotate"),
        };
        out.push(Transition { warning: true, reason, action, note: message });
    }
    if prev.state == Some(KeyState::PendingDeletion)
        && next.state == Some(KeyState::PendingDeletion)
        && let (Some(a), Some(b)) = (&prev.deletion_time, &next.deletion_time)
        && b.0 > a.0
    {
        out.push(Transition {
            warning: true,
            reason: "KeyUsedWhilePendingDeletion",
            action: "PostponeDeletion",
            note: format!("the key was asked for while pending deletion; its destruction moved to {}", b.0),
        });
    }
    if next.state != Some(KeyState::Destroyed) {
        out.extend(version_transitions(prev, next));
    }
    out
}

/// The Events single versions' changes deserve.
fn version_transitions(prev: &KmsKeyStatus, next: &KmsKeyStatus) -> Vec<Transition> {
    use KeyVersionState::{Destroyed, Disabled, Enabled, Expired, PendingDestruction};
    let mut out = Vec::new();
    for n in &next.versions {
        let Some(p) = prev.versions.iter().find(|p| p.version == n.version) else { continue };
        let v = n.version;
        let when = || n.deletion_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default();
        let (warning, reason, action, note) = match (p.state, n.state) {
            (PendingDestruction, PendingDestruction) => match (&p.deletion_time, &n.deletion_time) {
                (Some(a), Some(b)) if b.0 > a.0 => (
                    true,
                    "VersionUsedWhilePendingDestruction",
                    "PostponeVersionDestruction",
                    format!(
                        "version {v} was asked for while pending destruction; its destruction moved to {}",
                        b.0
                    ),
                ),
                _ => continue,
            },
            (a, b) if a == b => continue,
            (_, PendingDestruction) => (
                false,
                "VersionDestructionScheduled",
                "ScheduleVersionDestruction",
                format!("version {v} will be destroyed at {}", when()),
            ),
            (_, Destroyed) => {
                (false, "VersionDestroyed", "DestroyVersion", format!("version {v} has been destroyed"))
            }
            (_, Expired) => (
                false,
                "VersionMaterialExpired",
                "ExpireImportedMaterial",
                format!("version {v}'s imported material expired and is deleted"),
            ),
            (Expired, _) => (
                false,
                "VersionMaterialImported",
                "Import",
                format!("version {v}'s material was imported again"),
            ),
            (PendingDestruction, s) => (
                false,
                "VersionDestructionCancelled",
                "CancelVersionDestruction",
                format!("the destruction of version {v} was cancelled; it is {s:?}"),
            ),
            (_, Disabled) => {
                (false, "VersionDisabled", "DisableVersion", format!("version {v} refuses to decrypt"))
            }
            (_, Enabled) => (false, "VersionEnabled", "EnableVersion", format!("version {v} decrypts again")),
        };
        out.push(Transition { warning, reason, action, note });
    }
    out
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
