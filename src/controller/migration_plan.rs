//! The storage migration after a rotation, as a pure function: the key's material (its
//! versions and the storage record), the usage its KMS plugins reported, the
//! StorageVersionMigrations that exist and the time decide the one next step and the
//! status to report.
//!
//! The rules: a key whose current version C is newer than the oldest version stored data
//! may still use (the material's storage record, or its oldest version when there is none)
//! is migrated once every KMS plugin reported an Encrypt under C (kube-apiserver re-seeds
//! at its next Status poll, and writes under C from then on): one StorageVersionMigration
//! per configured resource, never while another key's migration runs. When every resource's
//! migration succeeded, the record says C; a failed one is retried with the next attempt
//! after a backoff. A migration under way when the key rotates again finishes and is
//! recorded first. Finished migrations that a later one superseded are deleted.
//!
//! Nothing here reads status: what status shows is derived from the objects above, so a
//! forged status changes nothing and is overwritten.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::lifecycle::condition;
use crate::api::{StorageMigrationPhase, StorageMigrationStatus};
use crate::domain::Usage;

/// The condition that reports whether stored data is encrypted under the current version.
pub const STORAGE_MIGRATED: &str = "StorageMigrated";

/// A resource kube-apiserver encrypts: `secrets`, or `<resource>.<group>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource {
    pub group: String,
    pub resource: String,
}

/// Why a resource name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a resource name (`secrets`, or `<resource>.<group>` such as `widgets.example.com`)")]
pub struct ResourceError(String);

impl FromStr for Resource {
    type Err = ResourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (resource, group) = s.split_once('.').unwrap_or((s, ""));
        if s.contains('.') && group.is_empty() {
            return Err(ResourceError(s.to_owned()));
        }
        let label = |p: &str| {
            !p.is_empty()
                && p.len() <= 63
                && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        };
        let group_ok = group.is_empty() || (group.len() <= 253 && group.split('.').all(label));
        if !label(resource) || !group_ok {
            return Err(ResourceError(s.to_owned()));
        }
        Ok(Resource { group: group.to_owned(), resource: resource.to_owned() })
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// Where one StorageVersionMigration is, from its conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created; the migrator has not started it (it waits for the resource's list
    /// resourceVersion and for the garbage collector's cache).
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// One StorageVersionMigration of this key, as its name, labels and status say.
#[derive(Debug, Clone, PartialEq)]
pub struct Migration {
    pub name: String,
    /// The key version it moves stored data to.
    pub version: u32,
    pub resource: Resource,
    /// Counting from 1 for each version and resource.
    pub attempt: u32,
    pub phase: Phase,
    pub created: Timestamp,
    /// When it succeeded or failed.
    pub finished: Option<Timestamp>,
    /// The migrator's message of its last condition (why it failed).
    pub message: String,
}

/// What the key's material says, as far as the migration is concerned.
#[derive(Debug, Clone, PartialEq)]
pub enum Material {
    /// There is none, or it was destroyed: nothing to migrate to, ever.
    Gone,
    Present {
        /// Every version number (at least one).
        versions: Vec<u32>,
        /// The storage record, if a migration established one.
        storage: Option<Record>,
    },
}

/// The material's storage record: every stored object is encrypted under `oldest_in_use`
/// or a later version, as a migration that finished at `migrated_at` established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub oldest_in_use: u32,
    pub migrated_at: Timestamp,
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// The key's UID (its keyId), which names its migrations.
    pub key_id: &'a str,
    pub generation: i64,
    pub material: &'a Material,
    /// What the key's reporters recorded (`None` before anything reported a use).
    pub usage: Option<&'a Usage>,
    /// The resources kube-apiserver encrypts with the key (the controller's flag).
    pub resources: &'a [Resource],
    /// This key's StorageVersionMigrations.
    pub migrations: &'a [Migration],
    /// Another key whose migration has not finished (`namespace/name`), if any.
    pub other_running: Option<&'a str>,
    /// The conditions status shows now (only for their lastTransitionTime).
    pub conditions: &'a [Condition],
}

/// The one change a reconcile makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Create a StorageVersionMigration.
    Create { name: String, version: u32, resource: Resource, attempt: u32 },
    /// Write the storage record: every stored object is encrypted under `version` or later.
    Record { version: u32, migrated_at: Timestamp, resources: Vec<String> },
    /// Delete a StorageVersionMigration (superseded and finished, or of a destroyed key).
    Delete { name: String },
}

/// What status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub migration: Option<StorageMigrationStatus>,
    pub condition: Condition,
}

/// What the reconcile should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Make this change, then plan again with its result.
    Act(Action),
    /// Report this (nothing to report for a key that is not a storage key) and look again
    /// after `requeue_after` (or when something changes).
    Settle { report: Option<Report>, requeue_after: Option<SignedDuration> },
}

/// How long to wait before retrying a failed attempt.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: SignedDuration,
    pub max: SignedDuration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { first: SignedDuration::from_secs(30), max: SignedDuration::from_mins(15) }
    }
}

impl Backoff {
    /// The wait after the failure of attempt `attempt` (1, 2, …): first, doubled each time.
    pub fn after(&self, attempt: u32) -> SignedDuration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.first.checked_mul(1 << doublings).unwrap_or(self.max).min(self.max)
    }
}

/// How often to look while waiting for something no watch reports in time (kube-apiserver's
/// re-seed shows as a usage write, which is watched; this is a safety net).
const POLL: SignedDuration = SignedDuration::from_secs(30);

/// The name of the migration of `resource` to `version` of key `key_id`, attempt `attempt`:
/// deterministic, so that creating it twice (a stale cache, a crash) creates it once.
pub fn migration_name(key_id: &str, version: u32, resource: &Resource, attempt: u32) -> String {
    let uid: String = key_id.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let name = format!("kubekms-{}-v{version}-{resource}-{attempt}", uid.to_ascii_lowercase());
    if name.len() <= 253 {
        return name;
    }
    // A very long group: keep the name valid; labels carry what it is about.
    let keep = format!("-{attempt}");
    format!("{}{keep}", name[..253 - keep.len()].trim_end_matches(['.', '-']))
}

/// Decides the next step for one key at `now`.
pub fn plan(o: &Observed<'_>, now: Timestamp, backoff: Backoff) -> Plan {
    let Material::Present { versions, storage } = o.material else {
        // The key was destroyed (perhaps mid-migration): its migrations are moot.
        return match o.migrations.first() {
            Some(m) => Plan::Act(Action::Delete { name: m.name.clone() }),
            None => Plan::Settle { report: None, requeue_after: None },
        };
    };
    let Some(usage) = o.usage.filter(|u| u.is_storage_key()) else {
        return Plan::Settle { report: None, requeue_after: None };
    };
    let (Some(&first), Some(&current)) = (versions.iter().min(), versions.iter().max()) else {
        return Plan::Settle { report: None, requeue_after: None };
    };
    let oldest = storage.map_or(first, |r| r.oldest_in_use);
    let latest = latest_attempts(o.migrations);
    let report = |state: State| Some(report(o, state, now));

    if oldest > current {
        return settle_or_clean(o, &latest, report(State::RecordAhead { oldest, current }), None);
    }

    // A migration to an earlier version than the current one (the key rotated again while
    // it ran): let it finish, and record it if it succeeded for every resource.
    if let Some(earlier) =
        o.migrations.iter().map(|m| m.version).filter(|v| *v > oldest && *v < current).max()
    {
        let of_earlier = of_version(&latest, earlier);
        if of_earlier.iter().any(|m| !m.phase.finished()) {
            let state = State::Running { version: earlier, of: of_earlier, next: Some(current) };
            return Plan::Settle { report: report(state), requeue_after: Some(POLL) };
        }
        if let Some(done) = all_succeeded(o.resources, &of_earlier) {
            return Plan::Act(done);
        }
        // It failed for some resource: the migration to the current version supersedes it.
    }

    if current <= oldest {
        let state = match storage {
            Some(r) => State::Succeeded {
                version: r.oldest_in_use,
                of: of_version(&latest, r.oldest_in_use),
                at: r.migrated_at,
            },
            None => State::SingleVersion { version: current },
        };
        return settle_or_clean(o, &latest, report(state), None);
    }
    if !usage.storage_encrypts_under(current) {
        return settle_or_clean(
            o,
            &latest,
            report(State::WaitingForApiServer { version: current }),
            Some(POLL),
        );
    }

    let of_current = of_version(&latest, current);
    let missing: Vec<&Resource> =
        o.resources.iter().filter(|r| !of_current.iter().any(|m| &m.resource == *r)).collect();
    if let Some(resource) = missing.first() {
        if of_current.is_empty()
            && let Some(other) = o.other_running
        {
            let state = State::WaitingForOther { version: current, other: other.to_owned() };
            return settle_or_clean(o, &latest, report(state), Some(POLL));
        }
        return Plan::Act(create(o.key_id, current, resource, 1));
    }
    // A failed resource is retried once its backoff has passed (while others may run).
    let retry_at = |m: &Migration| {
        m.finished.unwrap_or(m.created).saturating_add(backoff.after(m.attempt)).unwrap_or(Timestamp::MAX)
    };
    let failed: Vec<&Migration> = of_current
        .iter()
        .copied()
        .filter(|m| m.phase == Phase::Failed && o.resources.contains(&m.resource))
        .collect();
    if let Some(m) = failed.iter().filter(|m| retry_at(m) <= now).min_by_key(|m| retry_at(m))
        && o.other_running.is_none()
    {
        return Plan::Act(create(o.key_id, current, &m.resource, m.attempt.saturating_add(1)));
    }
    if of_current.iter().any(|m| !m.phase.finished()) {
        let state = State::Running { version: current, of: of_current, next: None };
        return settle_or_clean(o, &latest, report(state), Some(POLL));
    }
    if let Some(done) = all_succeeded(o.resources, &of_current) {
        return Plan::Act(done);
    }
    let next_retry = failed.iter().map(|m| retry_at(m)).min().unwrap_or(now);
    let wait = if next_retry > now { next_retry.duration_since(now) } else { POLL };
    let state = State::Failed { version: current, of: of_current, retry_at: next_retry };
    settle_or_clean(o, &latest, report(state), Some(wait.max(SignedDuration::from_secs(1))))
}

fn create(key_id: &str, version: u32, resource: &Resource, attempt: u32) -> Action {
    Action::Create {
        name: migration_name(key_id, version, resource, attempt),
        version,
        resource: resource.clone(),
        attempt,
    }
}

/// The latest attempt of each (version, resource).
fn latest_attempts(migrations: &[Migration]) -> Vec<&Migration> {
    let mut latest: BTreeMap<(u32, &Resource), &Migration> = BTreeMap::new();
    for m in migrations {
        let entry = latest.entry((m.version, &m.resource)).or_insert(m);
        if m.attempt > entry.attempt {
            *entry = m;
        }
    }
    latest.into_values().collect()
}

fn of_version<'a>(latest: &[&'a Migration], version: u32) -> Vec<&'a Migration> {
    latest.iter().copied().filter(|m| m.version == version).collect()
}

/// The record to write when every configured resource's latest attempt succeeded.
fn all_succeeded(resources: &[Resource], of_version: &[&Migration]) -> Option<Action> {
    let succeeded = |r: &Resource| of_version.iter().any(|m| &m.resource == r && m.phase == Phase::Succeeded);
    if resources.is_empty() || !resources.iter().all(succeeded) {
        return None;
    }
    let version = of_version.first()?.version;
    let migrated_at = of_version.iter().filter_map(|m| m.finished).max()?;
    Some(Action::Record {
        version,
        migrated_at,
        resources: resources.iter().map(ToString::to_string).collect(),
    })
}

/// Settles, unless a finished migration was superseded by a later one of the same
/// resource (a later attempt, or a later version): that one is deleted first.
fn settle_or_clean(
    o: &Observed<'_>,
    latest: &[&Migration],
    report: Option<Report>,
    requeue_after: Option<SignedDuration>,
) -> Plan {
    let kept = |m: &Migration| {
        latest.iter().any(|l| l.name == m.name)
            && !latest.iter().any(|l| l.resource == m.resource && l.version > m.version)
    };
    match o.migrations.iter().find(|m| m.phase.finished() && !kept(m)) {
        Some(m) => Plan::Act(Action::Delete { name: m.name.clone() }),
        None => Plan::Settle { report, requeue_after },
    }
}

/// Where the key's migration is, for the report.
enum State<'a> {
    SingleVersion { version: u32 },
    WaitingForApiServer { version: u32 },
    WaitingForOther { version: u32, other: String },
    Running { version: u32, of: Vec<&'a Migration>, next: Option<u32> },
    Failed { version: u32, of: Vec<&'a Migration>, retry_at: Timestamp },
    Succeeded { version: u32, of: Vec<&'a Migration>, at: Timestamp },
    RecordAhead { oldest: u32, current: u32 },
}

fn resource_list(resources: &[Resource]) -> String {
    resources.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn report(o: &Observed<'_>, state: State<'_>, now: Timestamp) -> Report {
    let resources = resource_list(o.resources);
    let status = |version, phase, of: &[&Migration], message: String| {
        let started = of.iter().map(|m| m.created).min().map(Time);
        let finished = if of.is_empty() || of.iter().any(|m| !m.phase.finished()) {
            None
        } else {
            of.iter().filter_map(|m| m.finished).max().map(Time)
        };
        Some(StorageMigrationStatus {
            version,
            phase,
            attempts: of.iter().map(|m| m.attempt).max().unwrap_or(0),
            started,
            finished,
            message,
        })
    };
    let (migration, ok, reason, message) = match state {
        State::SingleVersion { version } => (
            None,
            true,
            "NothingToMigrate",
            format!("version {version} is the key's only version: stored data uses no other"),
        ),
        State::WaitingForApiServer { version } => {
            let message = format!(
                "waiting until kube-apiserver encrypts under version {version} (it notices a new key id at its next \
                 KMS Status poll, within a minute); then {resources} are rewritten"
            );
            (
                status(version, StorageMigrationPhase::Waiting, &[], message.clone()),
                false,
                "WaitingForApiServer",
                message,
            )
        }
        State::WaitingForOther { version, other } => {
            let message = format!(
                "waiting for the storage migration of key {other} to finish; then {resources} move to version {version}"
            );
            (
                status(version, StorageMigrationPhase::Waiting, &[], message.clone()),
                false,
                "WaitingForOtherMigration",
                message,
            )
        }
        State::Running { version, of, next } => {
            let names: Vec<&str> = of.iter().map(|m| m.name.as_str()).collect();
            let mut message = format!(
                "rewriting {resources} under version {version} (StorageVersionMigration {})",
                names.join(", ")
            );
            if let Some(next) = next {
                message.push_str(&format!("; version {next} became current meanwhile and is migrated next"));
            }
            (
                status(version, StorageMigrationPhase::Running, &of, message.clone()),
                false,
                "MigrationRunning",
                message,
            )
        }
        State::Failed { version, of, retry_at } => {
            let why: Vec<String> = of
                .iter()
                .filter(|m| m.phase == Phase::Failed)
                .map(|m| format!("{} (attempt {}): {}", m.resource, m.attempt, m.message))
                .collect();
            let message = format!(
                "the migration to version {version} failed for {}; retrying at {}",
                why.join("; "),
                retry_at.round(jiff::Unit::Second).unwrap_or(retry_at)
            );
            (
                status(version, StorageMigrationPhase::Failed, &of, message.clone()),
                false,
                "MigrationFailed",
                message,
            )
        }
        State::Succeeded { version, of, at } => {
            let message =
                format!("every stored object of {resources} is encrypted under version {version} or later");
            let mut done = status(version, StorageMigrationPhase::Succeeded, &of, message.clone());
            if let Some(done) = done.as_mut() {
                done.finished = Some(Time(at));
            }
            (done, true, "MigrationSucceeded", message)
        }
        State::RecordAhead { oldest, current } => (
            None,
            false,
            "StorageRecordInconsistent",
            format!(
                "the material's storage record names version {oldest}, later than the current version {current}; \
                 nothing is migrated until that is repaired"
            ),
        ),
    };
    let condition = condition(
        o.conditions,
        STORAGE_MIGRATED,
        if ok { "True" } else { "False" },
        reason,
        message,
        o.generation,
        now,
    );
    Report { migration, condition }
}

/// An Event (and an audit line) that going from `prev` to `next` deserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    /// The metric label: started, succeeded, failed.
    pub result: &'static str,
    pub version: u32,
    pub note: String,
}

/// The transitions from what status showed to what it shows now: a migration attempt
/// started, or failed. Success is announced when it is recorded ([`recorded`]): status may
/// move on to the next version's migration in the same reconcile.
pub fn transitions(
    prev: Option<&StorageMigrationStatus>,
    next: Option<&StorageMigrationStatus>,
) -> Vec<Transition> {
    let Some(next) = next else { return Vec::new() };
    let same_attempt = prev.is_some_and(|p| p.version == next.version && p.attempts == next.attempts);
    let was = |phase| prev.is_some_and(|p| p.phase == phase) && same_attempt;
    let t = |warning, reason, result, note: String| Transition {
        warning,
        reason,
        action: "MigrateStorage",
        result,
        version: next.version,
        note,
    };
    match next.phase {
        StorageMigrationPhase::Running if !was(StorageMigrationPhase::Running) => vec![t(
            false,
            "StorageMigrationStarted",
            "started",
            format!("moving stored data to version {} (attempt {})", next.version, next.attempts),
        )],
        StorageMigrationPhase::Failed if !was(StorageMigrationPhase::Failed) => {
            vec![t(true, "StorageMigrationFailed", "failed", next.message.clone())]
        }
        _ => Vec::new(),
    }
}

/// The announcement of a migration that succeeded, as its record is written.
pub fn recorded(version: u32, resources: &[String]) -> Transition {
    Transition {
        warning: false,
        reason: "StorageMigrationSucceeded",
        action: "MigrateStorage",
        result: "succeeded",
        version,
        note: format!(
            "every stored object of {} is encrypted under version {version} or later",
            resources.join(", ")
        ),
    }
}

#[cfg(test)]
#[path = "migration_plan_tests.rs"]
mod tests;
