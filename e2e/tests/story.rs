//! Rotation that finishes, end to end on the cluster key: Secrets written under one
//! version, a rotation, the storage migration that moves them all, the cluster key's
//! deletion refused because its stored data depends on it, and the old version destroyed
//! after its waiting period — with every Secret still readable, before and after
//! kube-apiserver restarts. The destruction runs under a controller of the test's own with
//! one-second days (the cluster key is handed to it by label for the test's duration).
//!
//! Named `disruptive_*`: it rotates the shared cluster key and restarts kube-apiserver.

use std::time::Duration;

use kube::Api;
use kubekms::api::{KeyState, KeyVersionState, KmsKey, KmsKeyMaterial};

use crate::migration::{all_stored_under, rotate, rotated_to, settled, version_of};
use crate::plugin::{
    CLUSTER_KEY, cluster_key, cluster_key_enabled, create_secret, patch_cluster_key, read_secret, stored,
};
use crate::support::{
    TEST_CONTROLLER_LABEL, TestController, TestNamespace, client, control_plane, eventually, kubectl,
    kubectl_ok,
};
use crate::versions::refusal;

const WAIT: Duration = Duration::from_secs(60);

async fn cluster_key_where(what: &str, cond: impl Fn(&KmsKey) -> bool) -> KmsKey {
    eventually(WAIT, what, || {
        let cond = &cond;
        async move { Some(cluster_key().await).filter(|k| cond(k)) }
    })
    .await
}

/// Hands the cluster key back to the shared controller, whatever the test left.
struct GiveBack;

impl Drop for GiveBack {
    fn drop(&mut self) {
        let _ = kubectl(
            &["label", "kmskey", CLUSTER_KEY.1, "-n", CLUSTER_KEY.0, &format!("{TEST_CONTROLLER_LABEL}-")],
            None,
        );
        patch_cluster_key(r#"{"spec":{"deletion":{"scheduled":false},"versions":null}}"#);
    }
}

#[tokio::test]
async fn disruptive_the_old_version_is_destroyed_once_migrated_and_every_secret_still_reads() {
    cluster_key_enabled().await;
    let ns = TestNamespace::new("story");
    let ns = ns.name.as_str();
    let old = settled(ns).await;
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    for name in &names {
        assert!(create_secret(ns, name, &format!("value of {name}")).ok);
        assert_eq!(version_of(&stored(ns, name).key_id), old);
    }
    let all_read = || {
        for name in &names {
            assert_eq!(read_secret(ns, name), format!("value of {name}"), "{name}");
        }
    };

    // Rotate; the migration moves every Secret to the new version, and the old version is
    // no longer used by stored data.
    rotate();
    rotated_to(old + 1).await;
    all_stored_under(ns, &names, old + 1, Duration::from_secs(240)).await;
    let key = cluster_key_where("the old version to be no longer used by stored data", |k| {
        k.status.as_ref().is_some_and(|s| {
            s.versions.iter().any(|v| v.version == old && v.used_by_stored_data == Some(false))
        })
    })
    .await;
    let uid = key.metadata.uid.clone().unwrap();
    all_read();

    // Deleting the key stored data depends on is refused, and changes nothing.
    let _give_back = GiveBack;
    patch_cluster_key(r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    let key = cluster_key_where("the deletion to be refused", |k| {
        refusal(k).is_some_and(|(r, _)| r == "DeletionRefused")
    })
    .await;
    assert!(
        refusal(&key).unwrap().1.contains("kube-apiserver stores data under this key"),
        "{:?}",
        refusal(&key)
    );
    assert_eq!(key.status.as_ref().unwrap().state, Some(KeyState::Enabled));
    assert!(create_secret(ns, "during-refusal", "x").ok, "Secrets are still written");
    patch_cluster_key(r#"{"spec":{"deletion":{"scheduled":false}}}"#);
    cluster_key_where("the refusal to go", |k| refusal(k).is_none()).await;
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    assert!(materials.get(&uid).await.unwrap().spec.deletion_time.is_none(), "no deletion was promised");

    // The old version's destruction, under a controller whose days last a second.
    let label = format!("story-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let _controller = TestController::start(&label, "a", &["--unsafe-day-length", "1s"]);
    kubectl_ok(
        &["label", "kmskey", CLUSTER_KEY.1, "-n", CLUSTER_KEY.0, &format!("{TEST_CONTROLLER_LABEL}={label}")],
        None,
    );
    patch_cluster_key(&format!(
        r#"{{"spec":{{"versions":[{{"version":{old},"destruction":{{"scheduled":true,"pendingWindowDays":7}}}}]}}}}"#
    ));
    let key = cluster_key_where("the old version to be PendingDestruction", |k| {
        k.status.as_ref().is_some_and(|s| {
            s.versions.iter().any(|v| v.version == old && v.state == KeyVersionState::PendingDestruction)
        })
    })
    .await;
    assert_eq!(key.status.as_ref().unwrap().current_version, Some(old + 1));
    all_read();
    cluster_key_where("the old version to be Destroyed", |k| {
        k.status.as_ref().is_some_and(|s| {
            s.versions.iter().any(|v| v.version == old && v.state == KeyVersionState::Destroyed)
        })
    })
    .await;
    let material = materials.get(&uid).await.unwrap();
    let destroyed = material.spec.versions.iter().find(|v| v.version == old).unwrap();
    assert!(destroyed.wrapped.is_none(), "the old version's material is gone");

    // Every Secret still reads, and again after kube-apiserver restarts and has to ask the
    // plugin to decrypt every DEK seed anew.
    all_read();
    control_plane("down.sh", &["kube-apiserver"]);
    control_plane("up.sh", &["kube-apiserver"]);
    eventually(WAIT, "kube-apiserver's KMS provider to be healthy", || async {
        kubectl(&["get", "--raw", "/healthz/kms-providers"], None).ok.then_some(())
    })
    .await;
    all_read();
    for name in &names {
        assert_eq!(version_of(&stored(ns, name).key_id), old + 1, "{name}");
    }
}
