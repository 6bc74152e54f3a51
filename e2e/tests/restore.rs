//! Backup and restore across clusters: keys backed up in the cluster of `make up` (A) are
//! restored into a second, fresh control plane (B) started by the test with the same root
//! key, and what A's key API and `kubekms encrypt` made decrypts in B. A damaged backup,
//! and a restore that would reuse a key's name or keyId, are refused whole.
//!
//! Named `disruptive_*`, so `make test` runs it alone: starting a second control plane
//! loads the machine. B's ports start at `KUBEKMS_RESTORE_PORT_BASE` (default 39500; nine
//! consecutive ports) and its state is in `KUBEKMS_RESTORE_RUN_DIR` (default
//! e2e/.run-restore), removed when the test passes.

use std::os::unix::fs::PermissionsExt;

use kube::Api;
use kubekms::api::{KeyState, KmsKey};

use crate::fresh::{Cluster, Fresh, run_dir_from, stderr};
use crate::keyapi::{bind_key_user, decrypt, enabled_key, encrypt, key_user_binding};
use crate::lifecycle::wait_key_for;
use crate::support::{TestNamespace, kubectl_ok, patch_key, run_dir};

/// Where cluster B's ports start.
const PORT_BASE: &str = "KUBEKMS_RESTORE_PORT_BASE";
const DEFAULT_PORT_BASE: u16 = 39500;

#[tokio::test]
async fn disruptive_backup_restores_into_a_fresh_cluster() {
    let a = Cluster { run_dir: run_dir(), port_env: PORT_BASE, default_base: DEFAULT_PORT_BASE };
    let ns = TestNamespace::new("restore");
    let ns = ns.name.as_str();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();

    // In A: a key with two versions, a blob under each, and a file from `kubekms encrypt`.
    let key = enabled_key(ns, "data", "  description: restored\n").await;
    let (key_id, uid_a) = (key.status.unwrap().key_id.unwrap(), key.metadata.uid.unwrap());
    assert_eq!(key_id, uid_a, "a key made here has its UID as keyId");
    kubectl_ok(&["create", "serviceaccount", "app", "-n", ns], None);
    bind_key_user(ns, ns, "app");
    let mut api_a = a.key_api(ns, "app").await;
    let name = format!("{ns}/data");
    let blob1 = encrypt(&mut api_a, &name, b"under version 1", &[("tenant", "acme")]).await.unwrap();
    patch_key(ns, "data", r#"{"spec":{"rotation":{"onDemandRequest":"2026-12-01T00:00"}}}"#);
    let second = |k: &KmsKey| k.status.as_ref().and_then(|s| s.current_version) == Some(2);
    wait_key_for(std::time::Duration::from_secs(30), ns, "data", "version 2", second).await;
    let blob2 = encrypt(&mut api_a, &name, b"under version 2", &[]).await.unwrap();
    std::fs::write(path("plain"), b"a file kubekms encrypt wrote\n".repeat(1000)).unwrap();
    let sa = format!("{ns}/app");
    let enc =
        ["encrypt", "--service-account", &sa, "--key", &name, "--in", &path("plain"), "--out", &path("enc")];
    let out = a.kubekms(&enc);
    assert!(out.status.success(), "{}", stderr(&out));
    // And a key that has no material yet: restored without a keyId of its own.
    let pending = "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata: {name: pending}\nspec: {origin: EXTERNAL}\n";
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(pending));

    // The backup: one file, private, that shows nothing of what it holds.
    let out = a.kubekms(&["keyring", "backup", "--out", &path("backup"), "--namespace", ns]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("backed up 2 keys (2 versions)"), "{out:?}");
    let file = std::fs::read(path("backup")).unwrap();
    assert_eq!(std::fs::metadata(path("backup")).unwrap().permissions().mode() & 0o777, 0o600);
    let text = String::from_utf8_lossy(&file);
    assert!(!text.contains(&key_id) && !text.contains("restored"), "the backup is encrypted");
    let again = a.kubekms(&["keyring", "backup", "--out", &path("backup"), "--namespace", ns]);
    assert!(!again.status.success() && stderr(&again).contains("must not exist yet"), "{}", stderr(&again));

    // Restoring into A itself: data is here already (same keyId), but pending is another key
    // of the same name there (it would get a new keyId), so nothing is restored.
    let out = a.kubekms(&["keyring", "restore", "--in", &path("backup")]);
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(message.contains("nothing was restored"), "{message}");
    assert!(message.contains(&format!("KmsKey {ns}/pending already exists")), "{message}");
    assert!(!message.contains(&format!("{ns}/data")), "{message}");

    // B: a fresh cluster with the same root key.
    let b = Cluster {
        run_dir: run_dir_from("KUBEKMS_RESTORE_RUN_DIR", ".run-restore"),
        port_env: PORT_BASE,
        default_base: DEFAULT_PORT_BASE,
    };
    let fresh = Fresh::start(b, Some(&a.run_dir.join("root.key")));
    let b = &fresh.0;
    let keys_b: Api<KmsKey> = Api::namespaced(b.client().await, ns);

    // A damaged or truncated backup is refused whole: nothing of it appears in B.
    let mut flipped = file.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    std::fs::write(path("flipped"), &flipped).unwrap();
    std::fs::write(path("truncated"), &file[..file.len() - 1]).unwrap();
    for bad in ["flipped", "truncated"] {
        let out = b.kubekms(&["keyring", "restore", "--in", &path(bad)]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(
            stderr(&out).contains("the backup is damaged (changed or truncated)"),
            "{bad}: {}",
            stderr(&out)
        );
    }
    assert!(keys_b.get_opt("data").await.unwrap().is_none(), "a refused restore writes nothing");

    // A restore interrupted after it created the KmsKey, before its material: the key waits,
    // claims no keyId, and the next restore resumes it.
    b.kubectl(&["create", "namespace", ns]);
    let placeholder = format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: data\n  namespace: {ns}\n  \
         annotations: {{kms.kubekms.io/restoring-key-id: {key_id}}}\nspec: {{description: restored}}\n"
    );
    std::fs::write(path("placeholder"), placeholder).unwrap();
    b.kubectl(&["apply", "-f", &path("placeholder")]);
    let waiting = wait_key_in(&keys_b, "the interrupted key to await its material", |k| {
        let s = k.status.as_ref();
        s.is_some_and(|s| s.conditions.iter().any(|c| c.reason == "AwaitingRestore"))
    })
    .await;
    assert_eq!(waiting.status.as_ref().unwrap().key_id, None, "no keyId of its own");

    let out = b.kubekms(&["keyring", "restore", "--in", &path("backup")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("restored 2 keys: {ns}/data, {ns}/pending")), "{said}");
    let restored = wait_key_in(&keys_b, "the restored key to be Enabled at version 2", |k| {
        let s = k.status.as_ref();
        s.and_then(|s| s.state) == Some(KeyState::Enabled) && s.and_then(|s| s.current_version) == Some(2)
    })
    .await;
    assert_eq!(restored.status.as_ref().unwrap().key_id.as_deref(), Some(key_id.as_str()), "the same keyId");
    assert_ne!(restored.metadata.uid.as_deref(), Some(uid_a.as_str()), "a new object");
    assert_eq!(restored.metadata.uid, waiting.metadata.uid, "the interrupted key, resumed");
    assert_eq!(restored.spec.description, "restored");
    let annotations = restored.metadata.annotations.unwrap_or_default();
    assert!(
        !annotations.contains_key(kubekms::keyring::RESTORE_ANNOTATION),
        "the restore annotation is gone"
    );

    // What A made decrypts in B.
    b.kubectl(&["create", "serviceaccount", "app", "-n", ns]);
    let binding = key_user_binding(ns, ns, "app");
    b.kubectl(&binding.iter().map(String::as_str).collect::<Vec<_>>());
    let mut api_b = b.key_api(ns, "app").await;
    let one = decrypt(&mut api_b, &blob1.ciphertext_blob, &[("tenant", "acme")]).await.unwrap();
    let by = one.key.unwrap();
    assert_eq!(one.plaintext, b"under version 1");
    assert_eq!((by.key, by.key_id, by.version), (name.clone(), key_id.clone(), 1));
    let two = decrypt(&mut api_b, &blob2.ciphertext_blob, &[]).await.unwrap();
    assert_eq!((two.plaintext.as_slice(), two.key.unwrap().version), (&b"under version 2"[..], 2));
    let dec = ["decrypt", "--service-account", &sa, "--in", &path("enc"), "--out", &path("dec")];
    let out = b.kubekms(&dec);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(path("dec")).unwrap(), std::fs::read(path("plain")).unwrap());

    // The restored key lives on in B: it rotates under the same keyId.
    let patch = r#"{"spec":{"rotation":{"onDemandRequest":"2026-12-02T00:00"}}}"#;
    b.kubectl(&["patch", "kmskey", "data", "-n", ns, "--type", "merge", "-p", patch]);
    wait_key_in(&keys_b, "version 3", |k| k.status.as_ref().and_then(|s| s.current_version) == Some(3)).await;
    let three = encrypt(&mut api_b, &name, b"under version 3", &[]).await.unwrap();
    let by = three.key.unwrap();
    assert_eq!((by.key_id.as_str(), by.version), (key_id.as_str(), 3));
    let back = decrypt(&mut api_b, &three.ciphertext_blob, &[]).await.unwrap();
    assert_eq!(back.plaintext, b"under version 3");

    // The key that had no material is a new key here, with a keyId of its own.
    let pending_b = keys_b.get("pending").await.unwrap();
    assert_eq!(pending_b.spec.origin, kubekms::api::Origin::External);

    // Restoring the same backup again: data is here, pending would be a second key.
    let out = b.kubekms(&["keyring", "restore", "--in", &path("backup")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("KmsKey {ns}/pending already exists")), "{}", stderr(&out));
    drop(fresh);
}

async fn wait_key_in(keys: &Api<KmsKey>, what: &str, cond: impl Fn(&KmsKey) -> bool) -> KmsKey {
    crate::support::eventually(std::time::Duration::from_secs(60), what, || async {
        keys.get("data").await.ok().filter(|k| cond(k))
    })
    .await
}
