//! Re-encryption after rotation on the real control plane: after the cluster key rotates,
//! with no other command, every stored Secret moves to the new version (read raw from
//! etcd), through kube-controller-manager's storage version migrator; the key's status,
//! Events, metrics, audit trail and material record say so; a rotation during a migration
//! loses and doubles nothing. And no kubekms identity can read Secrets.
//!
//! The test that rotates the shared cluster key and restarts kube-apiserver is named
//! `disruptive_*`, so `make test` runs it alone.

use std::time::{Duration, Instant};

use k8s_openapi::api::storagemigration::v1::StorageVersionMigration;
use kube::Api;
use kube::api::ListParams;
use kubekms::api::{KmsKey, KmsKeyMaterial, StorageMigrationPhase};

use crate::plugin::{
    CLUSTER_KEY, cluster_key, cluster_key_enabled, create_secret, patch_cluster_key, read_secret, stored,
};
use crate::support::{
    TestNamespace, client, control_plane, env_var, eventually, http_get, kubectl, kubectl_ok, run_dir,
};

/// The version a stored key id (`kubekms:<keyId>:<version>`) names.
pub(crate) fn version_of(key_id: &str) -> u32 {
    key_id
        .rsplit(':')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("not a kubekms key id: {key_id}"))
}

fn current_version(key: &KmsKey) -> u32 {
    key.status.as_ref().and_then(|s| s.current_version).expect("the cluster key has a current version")
}

fn migrated_condition(key: &KmsKey) -> Option<(String, String)> {
    let status = key.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == "StorageMigrated")?;
    Some((c.status.clone(), c.reason.clone()))
}

/// Waits until nothing is left to migrate (an earlier test may have rotated the key): new
/// Secrets are written under the current version and status shows no migration under way.
/// Returns the current version.
pub(crate) async fn settled(ns: &str) -> u32 {
    let mut n = 0;
    eventually(Duration::from_secs(300), "the cluster key's storage migration to settle", || {
        n += 1;
        let probe = format!("probe-{n}");
        async move {
            let key = cluster_key().await;
            let current = current_version(&key);
            let migration = key.status.as_ref().and_then(|s| s.storage_migration.clone());
            let done =
                migration.is_none_or(|m| m.phase == StorageMigrationPhase::Succeeded && m.version == current);
            if !done {
                return None;
            }
            assert!(create_secret(ns, &probe, "probe").ok);
            (version_of(&stored(ns, &probe).key_id) == current).then_some(current)
        }
    })
    .await
}

pub(crate) fn rotate() {
    let request = format!("migrate-{}", uuid::Uuid::new_v4().simple());
    patch_cluster_key(&format!(r#"{{"spec":{{"rotation":{{"onDemandRequest":"{request}"}}}}}}"#));
}

pub(crate) async fn rotated_to(version: u32) {
    eventually(Duration::from_secs(30), "the rotation", || async {
        (current_version(&cluster_key().await) >= version).then_some(())
    })
    .await;
}

/// Waits until every named Secret is stored under `version`; returns how long it took.
pub(crate) async fn all_stored_under(
    ns: &str,
    names: &[String],
    version: u32,
    timeout: Duration,
) -> Duration {
    let start = Instant::now();
    eventually(timeout, &format!("every Secret stored under version {version}"), || async {
        names.iter().all(|n| version_of(&stored(ns, n).key_id) == version).then_some(())
    })
    .await;
    start.elapsed()
}

async fn migrated_to(version: u32) -> KmsKey {
    eventually(
        Duration::from_secs(60),
        &format!("status to show the migration to {version} succeeded"),
        || async {
            let key = cluster_key().await;
            let m = key.status.as_ref()?.storage_migration.clone()?;
            (m.phase == StorageMigrationPhase::Succeeded
                && m.version == version
                && migrated_condition(&key) == Some(("True".into(), "MigrationSucceeded".into())))
            .then_some(key)
        },
    )
    .await
}

async fn material(key: &KmsKey) -> KmsKeyMaterial {
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    materials.get(key.metadata.uid.as_deref().unwrap()).await.expect("the cluster key's material")
}

/// The controller audit trail's storage migration lines: (operation, version).
fn audited_migrations() -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(run_dir().join("controller").join("audit.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["operation"].as_str().is_some_and(|o| o.starts_with("StorageMigration")))
        .map(|v| (v["operation"].as_str().unwrap().to_owned(), v["keyVersion"].as_u64().unwrap() as u32))
        .collect()
}

async fn metric(name: &str) -> f64 {
    let port: u16 = env_var("KUBEKMS_CONTROLLER_METRICS").rsplit(':').next().unwrap().parse().unwrap();
    let (_, body) = http_get(port, "/metrics").await.expect("the controller's metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in the controller's metrics"))
}

#[tokio::test]
async fn disruptive_rotation_moves_every_stored_secret_to_the_new_version() {
    cluster_key_enabled().await;
    let ns = TestNamespace::new("migrate");
    let ns = ns.name.as_str();
    let v1 = settled(ns).await;
    let names: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let values: Vec<String> = names.iter().map(|n| format!("{n}-{}", uuid::Uuid::new_v4())).collect();
    for (name, value) in names.iter().zip(&values) {
        assert!(create_secret(ns, name, value).ok);
        assert_eq!(version_of(&stored(ns, name).key_id), v1);
    }
    let all_read = || {
        for (name, value) in names.iter().zip(&values) {
            assert_eq!(&read_secret(ns, name), value, "{name}");
        }
    };
    let started_before = metric("kubekms_storage_migrations_total{result=\"started\"}").await;
    let succeeded_before = metric("kubekms_storage_migrations_total{result=\"succeeded\"}").await;

    // Rotate, and do nothing else: kube-apiserver notices the new key id at its next KMS
    // Status poll (within a minute), the controller sees the plugin's Encrypt under it and
    // creates a StorageVersionMigration, which kube-controller-manager runs.
    let v2 = v1 + 1;
    rotate();
    rotated_to(v2).await;
    let took = all_stored_under(ns, &names, v2, Duration::from_secs(240)).await;
    eprintln!("rotation to version {v2}: every Secret stored under it after {took:?}");
    let key = migrated_to(v2).await;
    let m = key.status.as_ref().unwrap().storage_migration.clone().unwrap();
    assert!(m.attempts >= 1 && m.started.is_some() && m.finished.is_some(), "{m:?}");
    let record = material(&key).await.spec.storage.expect("the material's storage record");
    assert_eq!((record.oldest_version_in_use, record.resources), (v2, vec!["secrets".to_owned()]));
    all_read();

    // Reported everywhere: Events, metrics, the audit trail.
    // (An Event follows the status that reports it.)
    crate::lifecycle::wait_events(
        CLUSTER_KEY.0,
        CLUSTER_KEY.1,
        &["StorageMigrationStarted", "StorageMigrationSucceeded"],
    )
    .await;
    assert!(metric("kubekms_storage_migrations_total{result=\"started\"}").await > started_before);
    assert!(metric("kubekms_storage_migrations_total{result=\"succeeded\"}").await > succeeded_before);
    let audited = audited_migrations();
    for op in ["StorageMigrationStarted", "StorageMigrationSucceeded"] {
        assert!(audited.contains(&(op.to_owned(), v2)), "{op} of version {v2} not audited: {audited:?}");
    }

    // The migration's status has a field manager of its own, beside the key reconciler's.
    let managers: Vec<(String, String)> = key
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.as_deref() == Some("status"))
        .map(|f| (f.manager.clone().unwrap_or_default(), serde_json::to_string(&f.fields_v1).unwrap()))
        .collect();
    let owns = |manager: &str, field: &str| managers.iter().any(|(m, f)| m == manager && f.contains(field));
    assert!(owns("kubekms-migration", "f:storageMigration"), "{managers:?}");
    assert!(owns("kubekms-migration", r#"k:{\"type\":\"StorageMigrated\"}"#), "{managers:?}");
    assert!(owns("kubekms-controller", r#"k:{\"type\":\"Ready\"}"#), "{managers:?}");
    assert!(!owns("kubekms-controller", "f:storageMigration"), "{managers:?}");

    // A rotation while the migration to the next version runs: that one finishes and is
    // recorded, then the newest version's migration runs; nothing is lost or doubled.
    let (v3, v4) = (v2 + 1, v2 + 2);
    let start = Instant::now();
    rotate();
    rotated_to(v3).await;
    eventually(Duration::from_secs(180), &format!("the migration to {v3} to run"), || async {
        let m = cluster_key().await.status?.storage_migration?;
        (m.version == v3 && m.phase == StorageMigrationPhase::Running).then_some(())
    })
    .await;
    eprintln!("rotation to version {v3}: its migration started after {:?}", start.elapsed());
    rotate();
    rotated_to(v4).await;
    let took = all_stored_under(ns, &names, v4, Duration::from_secs(360)).await;
    eprintln!(
        "rotation to version {v4} during the migration to {v3}: every Secret under {v4} after {took:?}"
    );
    let key = migrated_to(v4).await;
    assert_eq!(material(&key).await.spec.storage.map(|r| r.oldest_version_in_use), Some(v4));
    let audited = audited_migrations();
    for v in [v3, v4] {
        assert!(
            audited.contains(&("StorageMigrationSucceeded".to_owned(), v)),
            "the migration to {v} did not finish: {audited:?}"
        );
    }
    all_read();
    let listed = kubectl_ok(&["get", "secrets", "-n", ns, "-o", "name"], None);
    let ours = listed.lines().filter(|l| l.starts_with("secret/s")).count();
    assert_eq!(ours, names.len(), "{listed}");
    // Superseded migrations are deleted: the newest is kept.
    let svms: Api<StorageVersionMigration> = Api::all(client().await);
    let uid = key.metadata.uid.clone().unwrap();
    let left = svms
        .list(&ListParams::default().labels(&format!("kms.kubekms.io/key-uid={uid}")))
        .await
        .unwrap()
        .items;
    let left: Vec<String> = left.into_iter().filter_map(|m| m.metadata.name).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(&format!("-v{v4}-secrets-")), "{left:?}");

    // Every Secret reads after kube-apiserver restarts (it decrypts every DEK seed again).
    control_plane("down.sh", &["kube-apiserver"]);
    control_plane("up.sh", &["kube-apiserver"]);
    eventually(Duration::from_secs(60), "kube-apiserver's KMS provider to be healthy", || async {
        kubectl(&["get", "--raw", "/healthz/kms-providers"], None).ok.then_some(())
    })
    .await;
    all_read();
}

#[tokio::test]
async fn no_kubekms_identity_can_read_secrets() {
    // Every ServiceAccount in kubekms's namespace (controller, plugin, key API server and
    // any other), in every namespace, for every verb that reveals a Secret.
    let accounts = kubectl_ok(&["get", "serviceaccounts", "-n", "kubekms-system", "-o", "name"], None);
    let accounts: Vec<&str> = accounts.lines().filter_map(|l| l.strip_prefix("serviceaccount/")).collect();
    for sa in ["kubekms-controller", "kubekms-plugin", "kubekms-server"] {
        assert!(accounts.contains(&sa), "{sa} missing from {accounts:?}");
    }
    let can = |who: &str, verb: &str, resource: &str| {
        kubectl(&["auth", "can-i", verb, resource, "--all-namespaces", "--as", who], None).stdout.trim()
            == "yes"
    };
    for sa in &accounts {
        let who = format!("system:serviceaccount:kubekms-system:{sa}");
        for verb in ["get", "list", "watch"] {
            assert!(!can(&who, verb, "secrets"), "{who} may {verb} Secrets");
        }
    }
    // The check itself works: the controller may create migrations, which do the rewriting.
    let controller = "system:serviceaccount:kubekms-system:kubekms-controller";
    assert!(can(controller, "create", "storageversionmigrations.storagemigration.k8s.io"));
    assert!(!can(controller, "patch", "secrets"), "the controller may rewrite Secrets itself");
}
