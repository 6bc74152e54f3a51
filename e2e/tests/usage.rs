//! Usage records on the real control plane: the KMS plugin (as kube-apiserver uses it) and
//! the key API each write their own entry of a key's `KmsKeyUsage`, per version, within
//! seconds of a use; and nobody but kubekms's identities may write one — a namespace admin
//! has no RBAC for it, and even an identity RBAC lets write it is refused by admission.

use std::time::Duration;

use serde_json::Value;

use crate::keyapi::{as_sa, bind_key_user, decrypt, enabled_key, encrypt};
use crate::plugin::{create_secret, decrypt_request, socket, stored};
use crate::redteam::{ClusterObjects, every_write_of, kubectl_as, user};
use crate::support::{Run, TestNamespace, can_i, eventually, kubectl, kubectl_ok};

/// How soon a use shows in the record: the writer writes a second after the first use of a
/// period (and retries every few seconds at first).
const WRITTEN: Duration = Duration::from_secs(20);

/// `kubectl get kmskeyusage <uid> -o json`, if it exists.
fn usage(uid: &str) -> Option<Value> {
    let run = kubectl(&["get", "kmskeyusage", uid, "-o", "json"], None);
    run.ok.then(|| serde_json::from_str(&run.stdout).unwrap())
}

/// The entry of the first reporter of `kind` in `usage`, for `version`.
fn version_use<'a>(usage: &'a Value, kind: &str, version: u32) -> Option<&'a Value> {
    usage["spec"]["reporters"]
        .as_array()?
        .iter()
        .filter(|r| r["kind"] == kind)
        .flat_map(|r| r["versions"].as_array().into_iter().flatten())
        .find(|v| v["version"] == version)
}

/// Waits until a reporter of `kind` shows every one of `fields` for `version` of key `uid`,
/// each the start of a period that holds now; returns the record.
async fn reported(uid: &str, kind: &str, version: u32, fields: &[&str]) -> Value {
    let what = format!("{kind} to report {fields:?} of version {version} of key {uid}");
    let record = eventually(WRITTEN, &what, || async {
        let record = usage(uid)?;
        let entry = version_use(&record, kind, version)?;
        fields.iter().all(|f| entry[*f].is_string()).then_some(record)
    })
    .await;
    let now = jiff::Timestamp::now();
    let entry = version_use(&record, kind, version).unwrap();
    for field in fields {
        let at: jiff::Timestamp = entry[*field].as_str().unwrap().parse().unwrap();
        assert!(
            at <= now && now.duration_since(at) < jiff::SignedDuration::from_hours(24),
            "{field}: {entry}"
        );
    }
    record
}

#[tokio::test]
async fn the_plugin_and_the_key_api_report_each_version_they_use() {
    let ns = TestNamespace::new("usage");
    let ns = ns.name.as_str();

    // A Secret written through kube-apiserver: its DEK seed is under a version of the cluster
    // key, which the plugin encrypted it with; kube-apiserver decrypts it when it reads a
    // Secret under a seed it does not hold (after a restart), as here.
    assert!(create_secret(ns, "s", "value").ok);
    let object = stored(ns, "s");
    let (uid, version) = object.key_id.strip_prefix("kubekms:").and_then(|r| r.rsplit_once(':')).unwrap();
    let version: u32 = version.parse().unwrap();
    let mut plugin = kubekms::plugin::client::connect(&socket()).await.unwrap();
    plugin.decrypt(decrypt_request(&object)).await.unwrap();
    let record = reported(uid, "StoragePlugin", version, &["lastEncrypt", "lastDecrypt"]).await;
    assert_eq!(record["spec"]["owner"]["name"], "cluster-secrets");
    let plugin_entry =
        record["spec"]["reporters"].as_array().unwrap().iter().find(|r| r["kind"] == "StoragePlugin");
    let plugin_entry = plugin_entry.unwrap();
    assert!(plugin_entry["name"].as_str().unwrap().starts_with("plugin/"), "{plugin_entry}");
    // `make up` records use per second (KUBEKMS_USAGE_GRANULARITY_SECONDS); the default is a day.
    assert_eq!(plugin_entry["granularitySeconds"], 1);
    // The plugin's entry is the plugin's: its own field manager owns it.
    let managers = kubectl_ok(&["get", "kmskeyusage", uid, "--show-managed-fields", "-o", "json"], None);
    assert!(managers.contains(&format!("kubekms-usage/{}", plugin_entry["name"].as_str().unwrap())));

    // An application key used through the key API.
    let key = enabled_key(ns, "app", "  description: used through the key API\n").await;
    let app_uid = key.metadata.uid.unwrap();
    bind_key_user(ns, ns, "app");
    let mut c = as_sa(ns, "app").await;
    let blob = encrypt(&mut c, &format!("{ns}/app"), b"payload", &[]).await.unwrap().ciphertext_blob;
    assert_eq!(decrypt(&mut c, &blob, &[]).await.unwrap().plaintext, b"payload");
    let record = reported(&app_uid, "KeyApi", 1, &["lastEncrypt", "lastDecrypt"]).await;
    assert_eq!(record["spec"]["owner"]["namespace"], ns);
    assert!(version_use(&record, "StoragePlugin", 1).is_none(), "no plugin serves this key");
    let _cleanup = ClusterObjects(vec![format!("kmskeyusage/{app_uid}")]);
}

#[tokio::test]
async fn only_kubekms_writes_usage_records() {
    let ns = TestNamespace::new("rt-usage");
    let ns = ns.name.as_str();
    let key = enabled_key(ns, "k", "  description: its usage is kubekms's to record\n").await;
    let uid = key.metadata.uid.unwrap();
    bind_key_user(ns, ns, "app");
    let mut c = as_sa(ns, "app").await;
    encrypt(&mut c, &format!("{ns}/k"), b"x", &[]).await.unwrap();
    let _record = ClusterObjects(vec![format!("kmskeyusage/{uid}")]);
    reported(&uid, "KeyApi", 1, &["lastEncrypt"]).await;

    // The namespace's admin, who may do anything to its KmsKeys, has no right to the record.
    let _ = kubectl(&["create", "serviceaccount", "admin", "-n", ns], None);
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "admin",
            "-n",
            ns,
            "--clusterrole=admin",
            &format!("--serviceaccount={ns}:admin"),
        ],
        None,
    );
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "key-admin",
            "-n",
            ns,
            "--clusterrole=kubekms-key-admin",
            &format!("--serviceaccount={ns}:admin"),
        ],
        None,
    );
    let admin = user(ns, "admin");
    eventually(Duration::from_secs(30), "RBAC to let the admin delete the key", || async {
        can_i(ns, &admin, "delete", "kmskeys").then_some(())
    })
    .await;
    for verb in ["create", "patch", "update", "delete"] {
        assert!(!can_i(ns, &admin, verb, &format!("kmskeyusages/{uid}")), "the namespace admin may {verb}");
    }

    // What a GitOps tool or a wildcard ClusterRole holds: every write of kmskeyusages. The
    // admission policy refuses each.
    let _rbac = every_write_of(ns, "gitops", "kmskeyusages").await;
    let refused = |run: Run, what: &str| {
        assert!(!run.ok, "gitops could {what}: {}", run.stdout);
        assert!(
            run.stderr.contains("only kubekms's plugins, key API servers and controllers write KmsKeyUsage"),
            "{what}: {}",
            run.stderr
        );
    };
    let before = usage(&uid).unwrap()["spec"].clone();
    refused(
        kubectl_as(
            ns,
            "gitops",
            &["patch", "kmskeyusage", &uid, "--type", "merge", "-p", r#"{"spec":{"reporters":[]}}"#],
            None,
        ),
        "erase the uses",
    );
    let forged = format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKeyUsage\nmetadata: {{name: forged-{ns}}}\n\
         spec:\n  owner: {{namespace: {ns}, name: other, uid: forged-{ns}}}\n  reporters:\n  \
         - {{name: server/forged, kind: KeyApi, granularitySeconds: 86400, versions: [{{version: 1, lastRefused: '2030-01-01T00:00:00Z'}}]}}\n"
    );
    refused(kubectl_as(ns, "gitops", &["create", "-f", "-"], Some(&forged)), "forge a use");
    refused(kubectl_as(ns, "gitops", &["delete", "kmskeyusage", &uid], None), "delete the record");
    assert_eq!(usage(&uid).unwrap()["spec"], before, "the record is as kubekms wrote it");
}
