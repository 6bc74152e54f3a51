//! The attacker's view: each test binds an identity to exactly the Kubernetes rights it
//! names and tries to make kubekms do what only kubekms's own rights should allow. Every
//! attack here worked before the fix it names.

use std::time::Duration;

use kube::Api;
use kubekms::api::{KeyState, KmsKey, KmsKeyMaterial};

use crate::support::{TestNamespace, client, env_var, eventually, kubectl, kubectl_ok, kubekms_bin, run_dir};

const WAIT: Duration = Duration::from_secs(30);

/// A Role in `ns` with `verbs` on `resources` of kms.kubekms.io, bound to user `who`.
fn grant_rights(ns: &str, who: &str, resources: &[&str], verbs: &[&str]) {
    let manifest = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {who}, namespace: {ns}}}\n\
         rules:\n- apiGroups: [kms.kubekms.io]\n  resources: [{}]\n  verbs: [{}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {who}, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {who}}}\n\
         subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: {who}}}\n",
        resources.join(", "),
        verbs.join(", ")
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&manifest));
}

/// `kubectl patch` of a key as user `who` (the status subresource when `status`); whether
/// the API server took it.
fn patch_as(who: &str, ns: &str, key: &str, status: bool, json: &str) -> bool {
    let mut args = vec!["patch", "kmskey", key, "-n", ns, "--as", who, "--type", "merge", "-p", json];
    if status {
        args.push("--subresource=status");
    }
    kubectl(&args, None).ok
}

async fn material(key: &KmsKey) -> KmsKeyMaterial {
    let uid = key.metadata.uid.as_deref().unwrap();
    Api::<KmsKeyMaterial>::all(client().await).get(uid).await.unwrap()
}

async fn wait_state(ns: &str, name: &str, want: KeyState) -> KmsKey {
    let api: Api<KmsKey> = Api::namespaced(client().await, ns);
    eventually(WAIT, &format!("{ns}/{name} to be {}", want.as_str()), || {
        let api = api.clone();
        async move { api.get(name).await.ok().filter(|k| k.status.as_ref().and_then(|s| s.state) == Some(want)) }
    })
    .await
}

fn create_key(ns: &str, name: &str) {
    let manifest = format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: {name}\nspec:\n  description: e2e\n"
    );
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifest));
}

/// Runs the kubekms CLI against the key API of `make up`, feeding `input`.
fn cli(args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(kubekms_bin())
        .args(args)
        .env("KUBECONFIG", run_dir().join("kubeconfig"))
        .env("KUBEKMS_ADDR", env_var("KUBEKMS_ADDR"))
        .env("KUBEKMS_CA", env_var("KUBEKMS_CA"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// Attack: `patch` on kmskeys and kmskeys/status. Schedule deletion, move
/// status.deletionTime into the past and touch the spec so the controller looks again:
/// the material used to be destroyed within seconds. Now the deletion time lives in the
/// material object, which only kubekms writes; status is a report, rewritten from it.
#[tokio::test]
async fn a_forged_deletion_time_destroys_nothing() {
    let ns = TestNamespace::new("forge-deletion");
    let ns = ns.name.as_str();
    create_key(ns, "k");
    wait_state(ns, "k", KeyState::Enabled).await;
    grant_rights(ns, "mallory", &["kmskeys", "kmskeys/status"], &["get", "patch"]);

    assert!(patch_as(
        "mallory",
        ns,
        "k",
        false,
        r#"{"spec":{"deletion":{"scheduled":true,"pendingWindowDays":7}}}"#
    ));
    let pending = wait_state(ns, "k", KeyState::PendingDeletion).await;
    let promised = material(&pending).await.spec.deletion_time.expect("the material records the promise");
    let reported = pending.status.as_ref().and_then(|s| s.deletion_time.clone());
    assert_eq!(reported, Some(promised.clone()), "status reports the promise");
    assert!(promised.0 >= jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24 * 7 - 1));

    // The forgery: refused by the API server, or taken and then overwritten.
    let forged = patch_as("mallory", ns, "k", true, r#"{"status":{"deletionTime":"2000-01-01T00:00:00Z"}}"#);
    assert!(patch_as("mallory", ns, "k", false, r#"{"spec":{"description":"wake the controller"}}"#));
    let api: Api<KmsKey> = Api::namespaced(client().await, ns);
    let restored = eventually(WAIT, "the forged deletion time to be overwritten", || {
        let api = api.clone();
        let promised = promised.clone();
        async move {
            let k = api.get("k").await.ok()?;
            let s = k.status.as_ref()?;
            (s.observed_generation == k.metadata.generation && s.deletion_time.as_ref() == Some(&promised))
                .then_some(k)
        }
    })
    .await;
    let kept = material(&restored).await;
    assert!(
        kept.spec.destroyed_at.is_none() && !kept.spec.versions.is_empty(),
        "forged={forged}: nothing destroyed"
    );
    assert_eq!(kept.spec.deletion_time, Some(promised), "the promise did not move");
    assert_eq!(restored.status.and_then(|s| s.state), Some(KeyState::PendingDeletion));
}

/// Attack: `patch` on kmskeys/status. A Disabled key's status set back to Enabled used to
/// make the key API decrypt with it again. Now the key API decides from the spec and the
/// material, at once.
#[tokio::test]
async fn a_forged_enabled_state_does_not_unlock_a_disabled_key() {
    let ns = TestNamespace::new("forge-enabled");
    let ns = ns.name.as_str();
    create_key(ns, "k");
    wait_state(ns, "k", KeyState::Enabled).await;
    let _ = kubectl(&["create", "serviceaccount", "app", "-n", ns], None);
    kubectl_ok(
        &[
            "create",
            "rolebinding",
            "app-keys",
            "-n",
            ns,
            "--clusterrole=kubekms-key-user",
            &format!("--serviceaccount={ns}:app"),
        ],
        None,
    );
    let sa = format!("{ns}/app");
    let sealed = cli(&["encrypt", "--key", &format!("{ns}/k"), "--service-account", &sa], b"the secret");
    assert!(sealed.status.success(), "{}", String::from_utf8_lossy(&sealed.stderr));

    kubectl_ok(
        &["patch", "kmskey", "k", "-n", ns, "--type", "merge", "-p", r#"{"spec":{"enabled":false}}"#],
        None,
    );
    wait_state(ns, "k", KeyState::Disabled).await;
    grant_rights(ns, "mallory", &["kmskeys/status"], &["get", "patch"]);
    let forged = patch_as("mallory", ns, "k", true, r#"{"status":{"state":"Enabled"}}"#);

    let opened = cli(&["decrypt", "--service-account", &sa], &sealed.stdout);
    assert_eq!(opened.status.code(), Some(6), "forged={forged}: {}", String::from_utf8_lossy(&opened.stderr));
    assert!(
        String::from_utf8_lossy(&opened.stderr).contains("is Disabled"),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    assert!(!String::from_utf8_lossy(&opened.stdout).contains("the secret"));
}
