//! The storage migration planner: every step from a rotation to the record, failures and
//! retries, a second rotation mid-migration, a destroyed key, odd inputs; and a simulation
//! that plays the planner against a fake migrator and apiserver until it settles.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::domain::{ReporterKind, ReporterUse, Usage, VersionUse};

const KEY: &str = "0123abcd-ef45-6789-0000-111122223333";

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn secrets() -> Resource {
    "secrets".parse().unwrap()
}

fn widgets() -> Resource {
    "widgets.example.com".parse().unwrap()
}

/// A plugin's usage record: it encrypted under `versions`.
fn usage(versions: &[u32]) -> Usage {
    let encrypted = VersionUse { last_encrypt: Some(at(0)), ..Default::default() };
    Usage {
        reporters: vec![ReporterUse {
            name: "plugin/host".into(),
            kind: ReporterKind::StoragePlugin,
            granularity: SignedDuration::from_hours(24),
            versions: versions.iter().map(|v| (*v, encrypted.clone())).collect::<BTreeMap<_, _>>(),
        }],
    }
}

fn material(versions: u32, oldest_in_use: Option<u32>) -> Material {
    Material::Present {
        versions: (1..=versions).collect(),
        storage: oldest_in_use.map(|v| Record { oldest_in_use: v, migrated_at: at(-100) }),
    }
}

fn svm(version: u32, resource: &Resource, attempt: u32, phase: Phase, created: i64) -> Migration {
    Migration {
        name: migration_name(KEY, version, resource, attempt),
        version,
        resource: resource.clone(),
        attempt,
        phase,
        created: at(created),
        finished: phase.finished().then(|| at(created + 5)),
        message: if phase == Phase::Failed { "patch failed".into() } else { String::new() },
    }
}

struct Case {
    material: Material,
    usage: Option<Usage>,
    resources: Vec<Resource>,
    migrations: Vec<Migration>,
    other: Option<String>,
}

impl Case {
    fn new(material: Material, usage: Option<Usage>) -> Self {
        Case { material, usage, resources: vec![secrets()], migrations: Vec::new(), other: None }
    }

    fn plan(&self, now: Timestamp) -> Plan {
        let o = Observed {
            key_id: KEY,
            generation: 3,
            material: &self.material,
            usage: self.usage.as_ref(),
            resources: &self.resources,
            migrations: &self.migrations,
            other_running: self.other.as_deref(),
            conditions: &[],
        };
        plan(&o, now, Backoff::default())
    }
}

fn report(plan: &Plan) -> &Report {
    match plan {
        Plan::Settle { report: Some(r), .. } => r,
        other => panic!("expected a report, got {other:?}"),
    }
}

fn phase(plan: &Plan) -> Option<StorageMigrationPhase> {
    report(plan).migration.as_ref().map(|m| m.phase)
}

fn create(version: u32, resource: &Resource, attempt: u32) -> Plan {
    Plan::Act(Action::Create {
        name: migration_name(KEY, version, resource, attempt),
        version,
        resource: resource.clone(),
        attempt,
    })
}

#[test]
fn resources_parse_as_the_flag_names_them() {
    assert_eq!(secrets(), Resource { group: String::new(), resource: "secrets".into() });
    assert_eq!(widgets(), Resource { group: "example.com".into(), resource: "widgets".into() });
    assert_eq!(widgets().to_string(), "widgets.example.com");
    for bad in ["", "Secrets", "secrets.", ".apps", "a b", "-x", "x.-y", &"a".repeat(64)] {
        assert!(bad.parse::<Resource>().is_err(), "{bad:?} is accepted");
    }
}

#[test]
fn names_are_deterministic_valid_and_bounded() {
    assert_eq!(migration_name(KEY, 2, &secrets(), 1), "kubekms-0123abcd-v2-secrets-1");
    let long: Resource = format!("{}.{}", "r".repeat(63), vec!["g".repeat(63); 3].join(".")).parse().unwrap();
    let name = migration_name(KEY, 7, &long, 12);
    assert!(name.len() <= 253 && name.ends_with("-12"), "{name}");
    assert_ne!(migration_name(KEY, 2, &secrets(), 1), migration_name(KEY, 2, &secrets(), 2));
}

#[test]
fn a_key_no_plugin_serves_is_left_alone() {
    for usage in [None, Some(Usage::default())] {
        let case = Case::new(material(3, None), usage);
        assert_eq!(case.plan(at(0)), Plan::Settle { report: None, requeue_after: None });
    }
}

#[test]
fn a_single_version_needs_no_migration_and_no_record() {
    let plan = Case::new(material(1, None), Some(usage(&[1]))).plan(at(0));
    let r = report(&plan);
    assert_eq!(r.migration, None);
    assert_eq!((r.condition.status.as_str(), r.condition.reason.as_str()), ("True", "NothingToMigrate"));
}

#[test]
fn after_a_rotation_it_waits_for_kube_apiserver_to_write_under_the_new_version() {
    let case = Case::new(material(2, None), Some(usage(&[1])));
    let plan = case.plan(at(0));
    assert_eq!(phase(&plan), Some(StorageMigrationPhase::Waiting));
    let r = report(&plan);
    assert_eq!((r.condition.status.as_str(), r.condition.reason.as_str()), ("False", "WaitingForApiServer"));
    assert!(matches!(plan, Plan::Settle { requeue_after: Some(_), .. }));
}

#[test]
fn once_it_does_one_migration_per_resource_is_created() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.resources = vec![secrets(), widgets()];
    assert_eq!(case.plan(at(0)), create(2, &secrets(), 1));
    case.migrations.push(svm(2, &secrets(), 1, Phase::Pending, 0));
    assert_eq!(case.plan(at(0)), create(2, &widgets(), 1), "the second resource follows at once");
    case.migrations.push(svm(2, &widgets(), 1, Phase::Pending, 0));
    let plan = case.plan(at(1));
    assert_eq!(phase(&plan), Some(StorageMigrationPhase::Running));
    let m = report(&plan).migration.clone().unwrap();
    assert_eq!((m.version, m.attempts, m.started.map(|t| t.0), m.finished), (2, 1, Some(at(0)), None));
    assert_eq!(report(&plan).condition.reason, "MigrationRunning");
}

#[test]
fn when_every_resource_succeeded_the_record_is_written_then_reported() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.resources = vec![secrets(), widgets()];
    case.migrations =
        vec![svm(2, &secrets(), 1, Phase::Succeeded, 0), svm(2, &widgets(), 1, Phase::Running, 0)];
    assert_eq!(phase(&case.plan(at(9))), Some(StorageMigrationPhase::Running), "not before every resource");
    case.migrations[1] = svm(2, &widgets(), 1, Phase::Succeeded, 10);
    assert_eq!(
        case.plan(at(20)),
        Plan::Act(Action::Record {
            version: 2,
            migrated_at: at(15),
            resources: vec!["secrets".into(), "widgets.example.com".into()]
        })
    );
    case.material = material(2, Some(2));
    let plan = case.plan(at(20));
    let r = report(&plan);
    assert_eq!(
        r.migration.as_ref().map(|m| (m.phase, m.version)),
        Some((StorageMigrationPhase::Succeeded, 2))
    );
    assert_eq!((r.condition.status.as_str(), r.condition.reason.as_str()), ("True", "MigrationSucceeded"));
    assert!(matches!(plan, Plan::Settle { requeue_after: None, .. }), "nothing more to do");
}

#[test]
fn a_failed_migration_is_retried_after_a_growing_backoff() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Failed, 0)];
    // Failed at 5; the first backoff is 30 s.
    let plan = case.plan(at(10));
    assert_eq!(phase(&plan), Some(StorageMigrationPhase::Failed));
    let r = report(&plan);
    assert_eq!((r.condition.status.as_str(), r.condition.reason.as_str()), ("False", "MigrationFailed"));
    assert!(r.condition.message.contains("patch failed"), "{}", r.condition.message);
    assert_eq!(
        plan,
        Plan::Settle { report: Some(r.clone()), requeue_after: Some(SignedDuration::from_secs(25)) }
    );
    assert_eq!(case.plan(at(35)), create(2, &secrets(), 2));

    // The second attempt fails too: the old one is deleted, and the wait doubles.
    case.migrations.push(svm(2, &secrets(), 2, Phase::Failed, 40));
    assert_eq!(case.plan(at(50)), Plan::Act(Action::Delete { name: migration_name(KEY, 2, &secrets(), 1) }));
    case.migrations.remove(0);
    let plan = case.plan(at(50));
    assert!(
        matches!(plan, Plan::Settle { requeue_after: Some(d), .. } if d == SignedDuration::from_secs(55))
    );
    assert_eq!(report(&plan).migration.as_ref().map(|m| m.attempts), Some(2));
    assert_eq!(case.plan(at(105)), create(2, &secrets(), 3));
    assert_eq!(Backoff::default().after(100), Backoff::default().max);
}

#[test]
fn only_the_failed_resource_is_retried() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.resources = vec![secrets(), widgets()];
    case.migrations =
        vec![svm(2, &secrets(), 1, Phase::Succeeded, 0), svm(2, &widgets(), 1, Phase::Failed, 0)];
    assert_eq!(case.plan(at(100)), create(2, &widgets(), 2));
    case.migrations.push(svm(2, &widgets(), 2, Phase::Succeeded, 100));
    // Recorded (naming both resources), then the superseded failed attempt is deleted.
    let Plan::Act(Action::Record { version: 2, resources, .. }) = case.plan(at(200)) else {
        panic!("no record")
    };
    assert_eq!(resources, ["secrets", "widgets.example.com"]);
    case.material = material(2, Some(2));
    assert_eq!(case.plan(at(200)), Plan::Act(Action::Delete { name: migration_name(KEY, 2, &widgets(), 1) }));
    case.migrations.remove(1);
    assert_eq!(phase(&case.plan(at(200))), Some(StorageMigrationPhase::Succeeded));
}

#[test]
fn never_while_another_key_migrates() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.other = Some("team/other".into());
    let plan = case.plan(at(0));
    assert_eq!(report(&plan).condition.reason, "WaitingForOtherMigration");
    assert!(report(&plan).condition.message.contains("team/other"));
    // A retry waits too.
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Failed, 0)];
    assert_eq!(phase(&case.plan(at(1000))), Some(StorageMigrationPhase::Failed));
    case.other = None;
    assert_eq!(case.plan(at(1000)), create(2, &secrets(), 2));
}

#[test]
fn a_rotation_during_a_migration_lets_it_finish_and_records_it_first() {
    // Migrating to 2; the key rotates to 3, and kube-apiserver already writes under 3.
    let mut case = Case::new(material(3, None), Some(usage(&[1, 2, 3])));
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Running, 0)];
    let plan = case.plan(at(10));
    let m = report(&plan).migration.clone().unwrap();
    assert_eq!((m.phase, m.version), (StorageMigrationPhase::Running, 2), "no migration to 3 yet");
    assert!(m.message.contains("version 3 became current"), "{}", m.message);

    case.migrations = vec![svm(2, &secrets(), 1, Phase::Succeeded, 0)];
    assert!(matches!(case.plan(at(20)), Plan::Act(Action::Record { version: 2, .. })));
    case.material = material(3, Some(2));
    assert_eq!(case.plan(at(20)), create(3, &secrets(), 1));
    case.migrations.push(svm(3, &secrets(), 1, Phase::Running, 20));
    // The migration to 2 is superseded once the one to 3 runs.
    assert_eq!(case.plan(at(30)), Plan::Act(Action::Delete { name: migration_name(KEY, 2, &secrets(), 1) }));
    case.migrations.remove(0);
    case.migrations[0] = svm(3, &secrets(), 1, Phase::Succeeded, 20);
    assert!(matches!(case.plan(at(30)), Plan::Act(Action::Record { version: 3, .. })));
}

#[test]
fn an_earlier_migration_that_failed_is_superseded_by_the_current_version() {
    let mut case = Case::new(material(3, None), Some(usage(&[1, 2, 3])));
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Failed, 0)];
    assert_eq!(case.plan(at(1)), create(3, &secrets(), 1), "no retry of 2: 3 moves everything");
}

#[test]
fn an_earlier_migration_is_not_recorded_over_a_later_record() {
    let mut case = Case::new(material(3, Some(3)), Some(usage(&[1, 2, 3])));
    case.migrations =
        vec![svm(2, &secrets(), 1, Phase::Succeeded, 0), svm(3, &secrets(), 1, Phase::Succeeded, 10)];
    assert_eq!(case.plan(at(20)), Plan::Act(Action::Delete { name: migration_name(KEY, 2, &secrets(), 1) }));
    case.migrations.remove(0);
    assert_eq!(phase(&case.plan(at(20))), Some(StorageMigrationPhase::Succeeded));
}

#[test]
fn a_destroyed_key_has_its_migrations_deleted_and_reports_nothing() {
    let mut case = Case::new(Material::Gone, Some(usage(&[1, 2])));
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Running, 0)];
    assert_eq!(case.plan(at(1)), Plan::Act(Action::Delete { name: migration_name(KEY, 2, &secrets(), 1) }));
    case.migrations.clear();
    assert_eq!(case.plan(at(1)), Plan::Settle { report: None, requeue_after: None });
}

#[test]
fn a_resource_added_to_the_flag_is_migrated_before_recording() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Succeeded, 0)];
    case.resources = vec![secrets(), widgets()];
    assert_eq!(case.plan(at(10)), create(2, &widgets(), 1));
}

#[test]
fn an_empty_resource_list_records_nothing() {
    let mut case = Case::new(material(2, None), Some(usage(&[1, 2])));
    case.resources.clear();
    case.migrations = vec![svm(2, &secrets(), 1, Phase::Succeeded, 0)];
    assert!(!matches!(case.plan(at(10)), Plan::Act(Action::Record { .. })));
}

#[test]
fn a_record_ahead_of_the_current_version_is_reported_not_acted_on() {
    let case = Case::new(material(2, Some(5)), Some(usage(&[1, 2])));
    let plan = case.plan(at(0));
    let r = report(&plan);
    assert_eq!(
        (r.condition.status.as_str(), r.condition.reason.as_str()),
        ("False", "StorageRecordInconsistent")
    );
    assert_eq!(r.migration, None);
}

#[test]
fn a_second_kube_apiserver_still_on_the_old_version_holds_the_migration() {
    let mut u = usage(&[1, 2]);
    let mut second = u.reporters[0].clone();
    second.name = "plugin/other".into();
    second.versions.remove(&2);
    u.reporters.push(second);
    assert_eq!(
        phase(&Case::new(material(2, None), Some(u)).plan(at(0))),
        Some(StorageMigrationPhase::Waiting)
    );
}

#[test]
fn a_missing_migration_is_created_again_under_its_own_name() {
    // It was created, then someone deleted it before it finished: created again, same
    // attempt (the name makes a double creation harmless).
    let case = Case::new(material(2, None), Some(usage(&[1, 2])));
    assert_eq!(case.plan(at(0)), create(2, &secrets(), 1));
    assert_eq!(case.plan(at(500)), create(2, &secrets(), 1));
}

#[test]
fn events_follow_the_reported_phase_once() {
    let status = |phase, version, attempts| StorageMigrationStatus {
        version,
        phase,
        attempts,
        started: None,
        finished: None,
        message: "m".into(),
    };
    let waiting = status(StorageMigrationPhase::Waiting, 2, 0);
    let running = status(StorageMigrationPhase::Running, 2, 1);
    let failed = status(StorageMigrationPhase::Failed, 2, 1);
    let retry = status(StorageMigrationPhase::Running, 2, 2);
    let done = status(StorageMigrationPhase::Succeeded, 2, 2);
    let reasons = |prev: Option<&StorageMigrationStatus>, next: &StorageMigrationStatus| {
        transitions(prev, Some(next)).into_iter().map(|t| (t.reason, t.warning, t.result)).collect::<Vec<_>>()
    };
    assert!(reasons(None, &waiting).is_empty());
    assert_eq!(reasons(Some(&waiting), &running), [("StorageMigrationStarted", false, "started")]);
    assert!(reasons(Some(&running), &running).is_empty(), "no event without a change");
    assert_eq!(reasons(Some(&running), &failed), [("StorageMigrationFailed", true, "failed")]);
    assert_eq!(reasons(Some(&failed), &retry), [("StorageMigrationStarted", false, "started")]);
    assert!(reasons(Some(&retry), &done).is_empty(), "announced by the record, not by status");
    let success = recorded(2, &["secrets".to_owned()]);
    assert_eq!(
        (success.reason, success.warning, success.result, success.version),
        ("StorageMigrationSucceeded", false, "succeeded", 2)
    );
    let next = status(StorageMigrationPhase::Running, 3, 1);
    assert_eq!(reasons(Some(&done), &next)[0].0, "StorageMigrationStarted", "the next version's migration");
    assert!(transitions(Some(&done), None).is_empty());
}

/// Plays the planner against a fake cluster: a migrator that finishes each migration two
/// steps after it is created (failing the first `fail_first` attempts), a kube-apiserver
/// that writes under a new version some steps after a rotation, and rotations at given
/// steps. Returns the records written, in order.
fn simulate(rotations: &[u32], apiserver_lag: u32, fail_first: u32) -> (Vec<u32>, Material, Vec<Migration>) {
    let mut versions = 1u32;
    let mut rotated_at: BTreeMap<u32, u32> = BTreeMap::new();
    let mut storage: Option<Record> = None;
    let mut migrations: Vec<Migration> = Vec::new();
    let mut records = Vec::new();
    let mut failures = 0;
    let mut created_at_step: BTreeMap<String, u32> = BTreeMap::new();
    for step in 0..400u32 {
        let now = at(i64::from(step) * 10);
        if rotations.contains(&step) {
            versions += 1;
            rotated_at.insert(versions, step);
        }
        let encrypts: Vec<u32> =
            (1..=versions).filter(|v| rotated_at.get(v).is_none_or(|s| step >= s + apiserver_lag)).collect();
        // The migrator: a migration created two steps ago finishes now.
        for m in migrations.iter_mut().filter(|m| !m.phase.finished()) {
            if created_at_step.get(&m.name).is_some_and(|s| s + 2 <= step) {
                let fail = failures < fail_first;
                failures += u32::from(fail);
                m.phase = if fail { Phase::Failed } else { Phase::Succeeded };
                m.finished = Some(now);
            }
        }
        let material = Material::Present { versions: (1..=versions).collect(), storage };
        let u = usage(&encrypts);
        let resources = [secrets()];
        let o = Observed {
            key_id: KEY,
            generation: 1,
            material: &material,
            usage: Some(&u),
            resources: &resources,
            migrations: &migrations,
            other_running: None,
            conditions: &[],
        };
        match plan(
            &o,
            now,
            Backoff { first: SignedDuration::from_secs(10), max: SignedDuration::from_secs(40) },
        ) {
            Plan::Act(Action::Create { name, version, resource, attempt }) => {
                assert!(
                    !migrations.iter().any(|m| !m.phase.finished()),
                    "step {step}: a second migration while one runs"
                );
                assert!(
                    encrypts.contains(&version),
                    "step {step}: migrating before kube-apiserver writes under {version}"
                );
                assert!(!migrations.iter().any(|m| m.name == name), "step {step}: {name} twice");
                created_at_step.insert(name.clone(), step);
                migrations.push(Migration {
                    name,
                    version,
                    resource,
                    attempt,
                    phase: Phase::Pending,
                    created: now,
                    finished: None,
                    message: "boom".into(),
                });
            }
            Plan::Act(Action::Record { version, migrated_at, .. }) => {
                assert!(
                    storage.is_none_or(|r| version > r.oldest_in_use),
                    "step {step}: the record goes back"
                );
                let m = migrations.iter().find(|m| m.version == version && m.phase == Phase::Succeeded);
                assert!(m.is_some(), "step {step}: recorded {version} without a succeeded migration");
                storage = Some(Record { oldest_in_use: version, migrated_at });
                records.push(version);
            }
            Plan::Act(Action::Delete { name }) => {
                let m = migrations.iter().find(|m| m.name == name).unwrap();
                assert!(m.phase.finished(), "step {step}: deleted a running migration");
                migrations.retain(|m| m.name != name);
            }
            Plan::Settle { .. } => {}
        }
    }
    (records, Material::Present { versions: (1..=versions).collect(), storage }, migrations)
}

#[test]
fn simulation_one_rotation_ends_recorded_with_one_migration_left() {
    let (records, material, migrations) = simulate(&[5], 3, 0);
    assert_eq!(records, [2]);
    assert!(matches!(material, Material::Present { storage: Some(Record { oldest_in_use: 2, .. }), .. }));
    assert_eq!(migrations.len(), 1, "the latest is kept: {migrations:?}");
}

#[test]
fn simulation_failures_are_retried_until_recorded() {
    let (records, _, migrations) = simulate(&[5], 3, 3);
    assert_eq!(records, [2]);
    assert_eq!(migrations.len(), 1);
    assert_eq!(migrations[0].attempt, 4);
}

#[test]
fn simulation_a_rotation_mid_migration_records_each_version_in_order() {
    // Rotations at steps 5 and 9; kube-apiserver follows 3 steps later, so the migration to
    // 2 (created at step 8) is running when version 3 arrives.
    let (records, material, _) = simulate(&[5, 9], 3, 0);
    assert_eq!(records, [2, 3]);
    assert!(matches!(material, Material::Present { storage: Some(Record { oldest_in_use: 3, .. }), .. }));
    // Rotations faster than kube-apiserver follows: only the last one is migrated to.
    let (records, _, _) = simulate(&[5, 6, 7], 10, 0);
    assert_eq!(records, [4]);
}
