//! Encryption at rest with the real kube-apiserver: Secrets go to etcd through the kubekms
//! KMS v2 plugin, and survive rotation and restarts of every piece.
//!
//! Tests named `disruptive_*` restart kube-apiserver and the plugin or disable the cluster
//! key, so `make test` runs them one at a time after all the others.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kube::Api;
use kubekms::api::{KeyState, KmsKey};
use kubekms::proto::kmsv2::{DecryptRequest, EncryptedObject, StatusRequest};
use prost::Message;

use crate::support::{
    Run, TestNamespace, can_i, client, control_plane, env_var, etcd_get, eventually, kubectl, kubectl_ok,
    kubekms_bin, patch_key,
};

pub(crate) const PREFIX: &[u8] = b"k8s:enc:kms:v2:kubekms:";
pub(crate) const CLUSTER_KEY: (&str, &str) = ("kube-system", "cluster-secrets");

pub(crate) fn socket() -> PathBuf {
    PathBuf::from(env_var("KMS_SOCKET"))
}

/// The stored envelope of a Secret, read straight from etcd.
pub(crate) fn stored(namespace: &str, name: &str) -> EncryptedObject {
    let raw = etcd_get(&format!("/registry/secrets/{namespace}/{name}"));
    assert!(
        raw.starts_with(PREFIX),
        "not encrypted by kubekms: {:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(40)])
    );
    EncryptedObject::decode(&raw[PREFIX.len()..]).expect("parse the stored EncryptedObject")
}

/// What kube-apiserver asks the plugin to read `object`: to decrypt its DEK seed.
pub(crate) fn decrypt_request(object: &EncryptedObject) -> DecryptRequest {
    DecryptRequest {
        ciphertext: object.encrypted_dek_source.clone(),
        uid: "e2e".into(),
        key_id: object.key_id.clone(),
        annotations: object.annotations.clone().into_iter().collect::<HashMap<_, _>>(),
    }
}

pub(crate) fn create_secret(ns: &str, name: &str, value: &str) -> Run {
    kubectl(&["create", "secret", "generic", name, "-n", ns, &format!("--from-literal=value={value}")], None)
}

pub(crate) fn read_secret(ns: &str, name: &str) -> String {
    let b64 = kubectl_ok(&["get", "secret", name, "-n", ns, "-o", "jsonpath={.data.value}"], None);
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap()).unwrap()
}

pub(crate) async fn plugin_key_id() -> Option<String> {
    let mut c = kubekms::plugin::client::connect(&socket()).await.ok()?;
    let status = c.status(StatusRequest {}).await.ok()?.into_inner();
    (status.healthz == "ok").then_some(status.key_id)
}

pub(crate) async fn cluster_key() -> KmsKey {
    let keys: Api<KmsKey> = Api::namespaced(client().await, CLUSTER_KEY.0);
    keys.get(CLUSTER_KEY.1).await.expect("the cluster key")
}

pub(crate) fn patch_cluster_key(merge_patch: &str) {
    patch_key(CLUSTER_KEY.0, CLUSTER_KEY.1, merge_patch);
}

fn expected_key_id(key: &KmsKey) -> String {
    let status = key.status.clone().unwrap();
    format!("kubekms:{}:{}", status.key_id.unwrap(), status.current_version.unwrap())
}

#[tokio::test]
async fn secrets_are_encrypted_in_etcd() {
    let ns = TestNamespace::new("atrest");
    let ns = ns.name.as_str();
    let health = kubectl_ok(&["get", "--raw", "/healthz/kms-providers"], None);
    assert_eq!(health.trim(), "ok");

    let values: Vec<String> = (0..3).map(|i| format!("plaintext-{i}-{}", uuid::Uuid::new_v4())).collect();
    for (i, v) in values.iter().enumerate() {
        assert!(create_secret(ns, &format!("s{i}"), v).ok);
    }
    let key = cluster_key().await;
    for (i, v) in values.iter().enumerate() {
        let raw = etcd_get(&format!("/registry/secrets/{ns}/s{i}"));
        assert!(raw.starts_with(PREFIX));
        assert!(!raw.windows(v.len()).any(|w| w == v.as_bytes()), "plaintext in etcd");
        let object = stored(ns, &format!("s{i}"));
        assert!(
            object.key_id.starts_with(&format!("kubekms:{}:", key.metadata.uid.clone().unwrap())),
            "{}",
            object.key_id
        );
        assert_eq!(
            object.annotations.get("key.kms.kubekms.io").map(Vec::as_slice),
            Some(&b"kube-system/cluster-secrets"[..])
        );
        assert!(object.encrypted_dek_source.len() <= 1024);
        assert_eq!(read_secret(ns, &format!("s{i}")), *v, "kubectl get returns the plaintext");
    }
}

#[tokio::test]
async fn a_second_plugin_refuses_a_live_socket() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(kubekms_bin())
        .args(["plugin", "--key", "kube-system/cluster-secrets", "--socket"])
        .arg(socket())
        .args(crate::support::root_key_args())
        .arg("--state-dir")
        .arg(dir.path())
        .args(["--kubeconfig", crate::support::run_dir().join("kubekms-plugin.kubeconfig").to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is served by another running process; refusing to take it over"), "{stderr}");
    assert!(socket().exists(), "the live socket is untouched");
    let bad = std::process::Command::new(kubekms_bin())
        .args(["plugin", "--key", "no-slash", "--root-key-file", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not NAMESPACE/NAME"));
}

async fn wait_secret_write(ns: &str, prefix: &str, want_ok: bool, timeout: Duration) -> String {
    let what = if want_ok { "Secret writes to succeed" } else { "Secret writes to fail" };
    let mut n = 0;
    eventually(timeout, what, || {
        n += 1;
        let name = format!("{prefix}-{n}");
        async move {
            let run = create_secret(ns, &name, "probe");
            (run.ok == want_ok).then_some(if run.ok { name } else { run.stderr })
        }
    })
    .await
}

/// Enables the cluster key (a failed run may have left it disabled) and waits until the
/// plugin and kube-apiserver are healthy.
pub(crate) async fn cluster_key_enabled() {
    patch_cluster_key(r#"{"spec":{"enabled":true}}"#);
    eventually(Duration::from_secs(30), "the cluster key to be Enabled", || async {
        (cluster_key().await.status?.state == Some(KeyState::Enabled)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "the plugin to be healthy", || async { plugin_key_id().await }).await;
    eventually(Duration::from_secs(60), "kube-apiserver's KMS provider to be healthy", || async {
        kubectl(&["get", "--raw", "/healthz/kms-providers"], None).ok.then_some(())
    })
    .await;
}

#[tokio::test]
async fn disruptive_rotation_restarts_and_disable() {
    cluster_key_enabled().await;
    let ns = TestNamespace::new("disruptive");
    let ns = ns.name.as_str();
    let old_id = expected_key_id(&cluster_key().await);
    assert!(create_secret(ns, "before", "old-value").ok);
    assert_eq!(stored(ns, "before").key_id, old_id);
    // Stays under the old version to the end: every version must keep decrypting.
    assert!(create_secret(ns, "kept-old", "kept-value").ok);
    let old_object = stored(ns, "kept-old");
    assert_eq!(old_object.key_id, old_id);

    // Rotate: the plugin reports the new key id within seconds (it watches the key) …
    let request = format!("e2e-{}", uuid::Uuid::new_v4());
    patch_cluster_key(&format!(r#"{{"spec":{{"rotation":{{"onDemandRequest":"{request}"}}}}}}"#));
    let new_id = eventually(Duration::from_secs(30), "the new key version", || async {
        let key = cluster_key().await;
        let id = expected_key_id(&key);
        (id != old_id).then_some(id)
    })
    .await;
    eventually(Duration::from_secs(10), "the plugin to report the new key id", || async {
        (plugin_key_id().await.as_deref() == Some(new_id.as_str())).then_some(())
    })
    .await;
    // … and kube-apiserver uses it for new Secrets once it has polled Status (every minute).
    let fresh = eventually(Duration::from_secs(120), "a new Secret under the new key id", || {
        let name = format!("after-{}", uuid::Uuid::new_v4().simple());
        let new_id = new_id.clone();
        async move {
            assert!(create_secret(ns, &name, "new-value").ok);
            (stored(ns, &name).key_id == new_id).then_some(name)
        }
    })
    .await;
    assert_eq!(read_secret(ns, "before"), "old-value", "old Secrets still read");
    assert_eq!(stored(ns, "before").key_id, old_id);
    // A no-op update re-encrypts an old Secret under the new key.
    let json = kubectl_ok(&["get", "secret", "before", "-n", ns, "-o", "json"], None);
    kubectl_ok(&["replace", "-f", "-"], Some(&json));
    assert_eq!(stored(ns, "before").key_id, new_id);
    assert_eq!(read_secret(ns, "before"), "old-value");

    let all = [("before", "old-value"), ("kept-old", "kept-value"), (fresh.as_str(), "new-value")];
    let all_read = || {
        for (name, value) in all {
            assert_eq!(read_secret(ns, name), value, "{name}");
        }
    };

    // Restart kube-apiserver: it decrypts every DEK seed through the plugin again.
    control_plane("down.sh", &["kube-apiserver"]);
    control_plane("up.sh", &["kube-apiserver"]);
    all_read();

    // Restart the plugin.
    control_plane("down.sh", &["plugin"]);
    control_plane("up.sh", &["plugin"]);
    eventually(Duration::from_secs(30), "the plugin to be healthy", || async { plugin_key_id().await }).await;
    all_read();

    // Cold start: with the API server down, the plugin starts from its cache, reports the
    // last key id and decrypts every cached version.
    let fresh_object = stored(ns, &fresh);
    control_plane("down.sh", &["kube-apiserver", "plugin"]);
    control_plane("up.sh", &["plugin"]);
    let id = eventually(Duration::from_secs(30), "the plugin to serve from its cache", || async {
        plugin_key_id().await
    })
    .await;
    assert_eq!(id, new_id);
    let mut c = kubekms::plugin::client::connect(&socket()).await.unwrap();
    for (version, object) in [("new", &fresh_object), ("old", &old_object)] {
        let seed = c.decrypt(decrypt_request(object)).await.unwrap_or_else(|e| {
            panic!("decrypt the {version} version from the cache while the API server is down: {e}")
        });
        assert_eq!(seed.into_inner().plaintext.len(), 32);
    }
    control_plane("up.sh", &["kube-apiserver"]);
    all_read();

    // Disable the key: once kube-apiserver has noticed (its DEK seed stays valid for writes
    // for up to 3 minutes after the last healthy Status), new Secret writes fail; reads
    // continue from its cache of decrypted seeds.
    patch_cluster_key(r#"{"spec":{"enabled":false}}"#);
    let keys: Api<KmsKey> = Api::namespaced(client().await, CLUSTER_KEY.0);
    eventually(Duration::from_secs(30), "the key to be Disabled", || async {
        let k = keys.get(CLUSTER_KEY.1).await.ok()?;
        (k.status?.state == Some(KeyState::Disabled)).then_some(())
    })
    .await;
    // The plugin that started from its cache went back to the API server when it returned:
    // it sees the key disabled within seconds.
    eventually(Duration::from_secs(30), "the plugin to report the disabled key", || async {
        plugin_key_id().await.is_none().then_some(())
    })
    .await;
    let error = wait_secret_write(ns, "while-disabled", false, Duration::from_secs(330)).await;
    assert!(error.to_lowercase().contains("kms") || error.contains("encrypt"), "{error}");
    all_read();
    patch_cluster_key(r#"{"spec":{"enabled":true}}"#);
    let name = wait_secret_write(ns, "reenabled", true, Duration::from_secs(120)).await;
    assert_eq!(stored(ns, &name).key_id, new_id);
}

#[tokio::test]
async fn the_plugin_reads_its_own_key_material_and_no_other() {
    // The controller of `make up` runs with --plugin-key for the cluster key; the plugin's
    // ServiceAccount has the chart's RBAC.
    let key = cluster_key().await;
    let uid = key.metadata.uid.clone().expect("uid");
    let plugin = "system:serviceaccount:kubekms-system:kubekms-plugin";
    // Key material is cluster-scoped: the namespace does not matter.
    let can = |verb: &str, resource: &str| can_i("default", plugin, verb, resource);
    eventually(Duration::from_secs(30), "the controller to grant the plugin its key's material", || async {
        can("get", &format!("kmskeymaterials/{uid}")).then_some(())
    })
    .await;

    let ns = TestNamespace::new("plugin-rbac");
    let ns = ns.name.as_str();
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some("apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: other\nspec: {}\n"),
    );
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    let other = eventually(Duration::from_secs(30), "the other key to be Enabled", || async {
        keys.get("other")
            .await
            .ok()
            .filter(|k| k.status.as_ref().and_then(|s| s.state) == Some(KeyState::Enabled))
    })
    .await;
    let other_uid = other.metadata.uid.expect("uid");
    assert!(!can("get", &format!("kmskeymaterials/{other_uid}")), "the plugin reads another key's material");
    assert!(!can("list", "kmskeymaterials"), "the plugin lists key material");
    assert!(!can("watch", "kmskeymaterials"), "the plugin watches key material");
    assert!(can("get", &format!("kmskeymaterials/{uid}")), "still its own");
    // It reports the use of its own key only.
    for verb in ["get", "create", "patch"] {
        assert!(can(verb, &format!("kmskeyusages/{uid}")), "the plugin may not {verb} its key's usage");
        assert!(
            !can(verb, &format!("kmskeyusages/{other_uid}")),
            "the plugin may {verb} another key's usage"
        );
    }
    assert!(!can("delete", &format!("kmskeyusages/{uid}")), "the plugin deletes its key's usage");
    assert!(!can("list", "kmskeyusages"), "the plugin lists usage");

    // The role's rules name the cluster key's material and usage record, one per purpose.
    let role = kubectl_ok(&["get", "clusterrole", "kubekms-plugin", "-o", "jsonpath={.rules}"], None);
    let rules: serde_json::Value = serde_json::from_str(&role).expect("rules");
    assert_eq!(rules, kubekms::controller::cluster::plugin_role_rules(&uid));
    assert_eq!(rules[0]["resources"], serde_json::json!(["kmskeymaterials"]));
    assert_eq!(rules[0]["verbs"], serde_json::json!(["get"]));
}
