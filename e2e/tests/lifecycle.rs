//! The KmsKey lifecycle on the real control plane, driven with kubectl as a user would.

use std::time::Duration;

use base64::Engine;
use kube::Api;
use kubekms::api::{KeyState, KmsKey, KmsKeyMaterial};

use crate::support::{
    TEST_CONTROLLER_LABEL, TestController, TestNamespace, client, event_reasons, eventually, kubectl,
    kubectl_ok, patch_key, run_dir,
};

const WAIT: Duration = Duration::from_secs(30);

fn key_manifest(name: &str, extra_metadata: &str, spec: &str) -> String {
    format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: {name}\n{extra_metadata}spec:\n  description: e2e\n{spec}"
    )
}

/// Waits until the key satisfies `cond` and returns it.
async fn wait_key(ns: &str, name: &str, what: &str, cond: impl Fn(&KmsKey) -> bool) -> KmsKey {
    wait_key_for(WAIT, ns, name, what, cond).await
}

/// [`wait_key`], waiting at most `timeout`.
pub(crate) async fn wait_key_for(
    timeout: Duration,
    ns: &str,
    name: &str,
    what: &str,
    cond: impl Fn(&KmsKey) -> bool,
) -> KmsKey {
    let api: Api<KmsKey> = Api::namespaced(client().await, ns);
    eventually(timeout, what, || {
        let api = api.clone();
        let cond = &cond;
        async move { api.get(name).await.ok().filter(|k| cond(k)) }
    })
    .await
}

fn state(k: &KmsKey) -> Option<KeyState> {
    k.status.as_ref().and_then(|s| s.state)
}

fn observed(k: &KmsKey) -> bool {
    k.status.as_ref().and_then(|s| s.observed_generation) == k.metadata.generation
}

pub(crate) fn condition<'a>(
    k: &'a KmsKey,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    k.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

pub(crate) async fn wait_events(ns: &str, name: &str, expected: &[&str]) {
    let what = format!("Events {expected:?} on {ns}/{name}");
    eventually(WAIT, &what, || async {
        let got = event_reasons(ns, name).await;
        expected.iter().all(|e| got.iter().any(|g| g == e)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn key_lifecycle_with_kubectl() {
    let ns = TestNamespace::new("lifecycle");
    let ns = ns.name.as_str();
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_manifest("app", "", "")));

    // Creating → Enabled with version 1; keyId is the object's UID.
    let key = wait_key(ns, "app", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    let status = key.status.clone().unwrap();
    assert_eq!(status.key_id, key.metadata.uid);
    assert_eq!(status.current_version, Some(1));
    assert_eq!(status.versions.len(), 1);
    assert!(status.next_rotation_time.is_some());
    let ready = condition(&key, "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Enabled"));
    wait_events(ns, "app", &["KeyCreated"]).await;
    let table = kubectl_ok(&["get", "kmskey", "app", "-n", ns], None);
    assert!(table.contains("Enabled") && table.contains(" 1 "), "{table}");

    // Rotate on demand → version 2 current, version 1 kept.
    patch_key(ns, "app", r#"{"spec":{"rotation":{"onDemandRequest":"first"}}}"#);
    let key =
        wait_key(ns, "app", "version 2", |k| k.status.as_ref().and_then(|s| s.current_version) == Some(2))
            .await;
    let status = key.status.clone().unwrap();
    assert_eq!(status.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(status.last_on_demand_request.as_deref(), Some("first"));
    assert!(status.last_rotation_time.is_some());
    wait_events(ns, "app", &["KeyRotated"]).await;
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    let material = materials.get(key.metadata.uid.as_deref().unwrap()).await.unwrap();
    assert_eq!(material.spec.versions.len(), 2, "both versions are held");

    // Disable → enable.
    patch_key(ns, "app", r#"{"spec":{"enabled":false}}"#);
    wait_key(ns, "app", "Disabled", |k| state(k) == Some(KeyState::Disabled)).await;
    wait_events(ns, "app", &["KeyDisabled"]).await;

    // Rotating a disabled key is refused with a condition and an Event; nothing changes.
    patch_key(ns, "app", r#"{"spec":{"rotation":{"onDemandRequest":"while-disabled"}}}"#);
    let key =
        wait_key(ns, "app", "the refusal", |k| observed(k) && condition(k, "TransitionRefused").is_some())
            .await;
    let refused = condition(&key, "TransitionRefused").unwrap();
    assert_eq!(refused.reason, "RotationRefused");
    assert!(refused.message.contains("Disabled"), "{}", refused.message);
    assert_eq!(key.status.as_ref().unwrap().current_version, Some(2));
    wait_events(ns, "app", &["RotationRefused"]).await;

    patch_key(ns, "app", r#"{"spec":{"enabled":true}}"#);
    let key = wait_key(ns, "app", "Enabled again", |k| state(k) == Some(KeyState::Enabled)).await;
    assert_eq!(
        key.status.as_ref().unwrap().current_version,
        Some(2),
        "a refused rotation is not carried out later"
    );
    wait_events(ns, "app", &["KeyEnabled"]).await;

    // Schedule deletion → PendingDeletion 30 days out.
    patch_key(ns, "app", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    let key = wait_key(ns, "app", "PendingDeletion", |k| state(k) == Some(KeyState::PendingDeletion)).await;
    let deletion_time = key.status.as_ref().unwrap().deletion_time.clone().unwrap().0;
    let days = deletion_time.duration_since(jiff::Timestamp::now()).as_hours() / 24;
    assert!((29..=30).contains(&days), "deletion in {days} days");
    wait_events(ns, "app", &["KeyDeletionScheduled"]).await;

    // Enabling a key pending deletion is refused.
    patch_key(ns, "app", r#"{"spec":{"enabled":false}}"#);
    wait_key(ns, "app", "enabled:false observed", observed).await;
    patch_key(ns, "app", r#"{"spec":{"enabled":true}}"#);
    let key = wait_key(ns, "app", "EnableRefused", |k| {
        observed(k) && condition(k, "TransitionRefused").is_some_and(|c| c.reason == "EnableRefused")
    })
    .await;
    assert_eq!(state(&key), Some(KeyState::PendingDeletion));
    wait_events(ns, "app", &["EnableRefused"]).await;

    // A plain `kubectl delete` is refused and says how to schedule deletion.
    let run = kubectl(&["delete", "kmskey", "app", "-n", ns], None);
    assert!(!run.ok);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("still holds key material"), "{}", run.stderr);
    assert!(run.stderr.contains(r#"{"spec":{"deletion":{"scheduled":true}}}"#), "{}", run.stderr);

    // Cancel (with enabled: false, as the schema insists) → Disabled.
    patch_key(ns, "app", r#"{"spec":{"enabled":false,"deletion":{"scheduled":false}}}"#);
    let key =
        wait_key(ns, "app", "Disabled after cancel", |k| observed(k) && state(k) == Some(KeyState::Disabled))
            .await;
    assert!(key.status.as_ref().unwrap().deletion_time.is_none());
    wait_events(ns, "app", &["KeyDeletionCancelled"]).await;
    assert_eq!(key.status.as_ref().unwrap().versions.len(), 2, "nothing was destroyed");
}

#[tokio::test]
async fn wrapped_material_never_contains_the_plaintext() {
    let ns = TestNamespace::new("material");
    let ns = ns.name.as_str();
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_manifest("k", "", "")));
    wait_key(ns, "k", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    patch_key(ns, "k", r#"{"spec":{"rotation":{"onDemandRequest":"2"}}}"#);
    let key =
        wait_key(ns, "k", "version 2", |k| k.status.as_ref().and_then(|s| s.current_version) == Some(2))
            .await;
    let uid = key.metadata.uid.clone().unwrap();

    // What any reader of the API gets: the object as JSON.
    let raw = kubectl_ok(&["get", "kmskeymaterial", &uid, "-o", "json"], None);
    let material: KmsKeyMaterial = serde_json::from_str(&raw).unwrap();
    let root = crate::support::root_key();
    assert_eq!(material.spec.root_key_fingerprint, root.fingerprint());
    let b64 = base64::engine::general_purpose::STANDARD;
    for version in &material.spec.versions {
        let plain = kubekms::keyring::unwrap_version(&root, &material, version).unwrap();
        let plain = plain.expose();
        let wrapped = b64.decode(version.wrapped.as_deref().unwrap()).unwrap();
        for haystack in [raw.as_bytes(), wrapped.as_slice()] {
            assert!(!haystack.windows(plain.len()).any(|w| w == plain), "plaintext material found");
        }
        let hex: String = plain.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!raw.contains(&b64.encode(plain)) && !raw.contains(&hex), "encoded plaintext material found");
    }
    // Nor does the key itself, its Events, or the controller's log mention it.
    let key_yaml = kubectl_ok(&["get", "kmskey", "k", "-n", ns, "-o", "yaml"], None);
    let events = kubectl_ok(&["get", "events", "-n", ns, "-o", "yaml"], None);
    for version in &material.spec.versions {
        let plain = kubekms::keyring::unwrap_version(&root, &material, version).unwrap();
        let encoded = b64.encode(plain.expose());
        assert!(!key_yaml.contains(&encoded) && !events.contains(&encoded));
        assert!(
            !key_yaml.contains(version.wrapped.as_deref().unwrap()),
            "wrapped material is not in KmsKey status"
        );
    }
}

#[tokio::test]
async fn key_material_is_readable_only_by_kubekms() {
    // Namespace admins and viewers (the built-in aggregated roles) cannot read material;
    // the controller cannot read Secrets.
    let ns = TestNamespace::new("rbac");
    kubectl_ok(
        &["create", "rolebinding", "jane-admin", "--clusterrole=admin", "--user=jane", "-n", &ns.name],
        None,
    );
    for (who, verb, resource) in [
        ("jane", "get", "kmskeymaterials"),
        ("jane", "list", "kmskeymaterials"),
        ("system:serviceaccount:kubekms-system:kubekms-controller", "get", "secrets"),
        ("system:serviceaccount:kubekms-system:kubekms-controller", "list", "secrets"),
        ("system:serviceaccount:default:app", "get", "kmskeymaterials"),
    ] {
        let run = kubectl(&["auth", "can-i", verb, resource, "-n", &ns.name, "--as", who], None);
        assert_eq!(run.stdout.trim(), "no", "{who} can {verb} {resource}");
    }
    let run = kubectl(
        &[
            "auth",
            "can-i",
            "get",
            "kmskeymaterials",
            "--as",
            "system:serviceaccount:kubekms-system:kubekms-controller",
        ],
        None,
    );
    assert_eq!(run.stdout.trim(), "yes");
}

#[tokio::test]
async fn deletion_is_carried_through_to_destroyed_material() {
    // A controller of this test's own, where a "day" lasts one second: the 7-day window
    // is 7 seconds. Production defaults are untouched.
    let label = format!("destroy-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let _controller = TestController::start(&label, "a", &["--unsafe-day-length", "1s"]);
    let ns = TestNamespace::new("destroy");
    let ns = ns.name.as_str();
    let labels = format!("  labels:\n    {TEST_CONTROLLER_LABEL}: {label}\n");
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&key_manifest("doomed", &labels, "  deletion: {pendingWindowDays: 7}\n")),
    );
    let key = wait_key(ns, "doomed", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    let uid = key.metadata.uid.clone().unwrap();

    patch_key(ns, "doomed", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    let key =
        wait_key(ns, "doomed", "PendingDeletion", |k| state(k) == Some(KeyState::PendingDeletion)).await;
    let deletion_time = key.status.as_ref().unwrap().deletion_time.clone().unwrap().0;
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    assert_eq!(materials.get(&uid).await.unwrap().spec.versions.len(), 1, "nothing destroyed yet");

    let key = wait_key(ns, "doomed", "Destroyed", |k| state(k) == Some(KeyState::Destroyed)).await;
    assert!(jiff::Timestamp::now() >= deletion_time, "destroyed before its deletion time");
    let status = key.status.unwrap();
    assert!(status.versions.iter().all(|v| v.state == kubekms::api::KeyVersionState::Destroyed));
    let material = materials.get(&uid).await.unwrap();
    assert!(material.spec.versions.is_empty(), "the wrapped material is gone");
    assert!(material.spec.destroyed_at.is_some());
    wait_events(ns, "doomed", &["KeyDeletionScheduled", "KeyMaterialDestroyed"]).await;

    // Now the object can go, and its material record with it.
    kubectl_ok(&["delete", "kmskey", "doomed", "-n", ns, "--wait=false"], None);
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    eventually(WAIT, "the KmsKey to be gone", || async {
        keys.get_opt("doomed").await.unwrap().is_none().then_some(())
    })
    .await;
    eventually(WAIT, "the KmsKeyMaterial to be gone", || async {
        materials.get_opt(&uid).await.unwrap().is_none().then_some(())
    })
    .await;
}

async fn lease_holder(name: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client().await, "kubekms-system");
    leases.get_opt(name).await.ok().flatten()?.spec?.holder_identity
}

#[tokio::test]
async fn a_second_replica_takes_over_and_finishes_pending_work() {
    let label = format!("failover-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let timing = [
        "--unsafe-day-length",
        "1s",
        "--lease-duration",
        "4s",
        "--renew-deadline",
        "3s",
        "--retry-period",
        "500ms",
    ];
    let mut a = TestController::start(&label, "a", &timing);
    let lease = format!("test-{label}");
    let first = eventually(WAIT, "a leader", || lease_holder(&lease)).await;
    let mut b = TestController::start(&label, "b", &timing);
    // Both are ready (the standby too); only one leads.
    for c in [&a, &b] {
        eventually(WAIT, "/readyz", || async {
            c.http_get("/readyz").await.filter(|(code, _)| *code == 200)
        })
        .await;
    }
    let (leader, standby) = if a.http_get("/metrics").await.unwrap().1.contains("kubekms_controller_leader 1")
    {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(standby.http_get("/metrics").await.unwrap().1.contains("kubekms_controller_leader 0"));

    let ns = TestNamespace::new("failover");
    let ns = ns.name.as_str();
    let labels = format!("  labels:\n    {TEST_CONTROLLER_LABEL}: {label}\n");
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&key_manifest("k", &labels, "  deletion: {pendingWindowDays: 7}\n")),
    );
    wait_key(ns, "k", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    patch_key(ns, "k", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    wait_key(ns, "k", "PendingDeletion", |k| state(k) == Some(KeyState::PendingDeletion)).await;

    // The leader crashes; the standby takes the Lease and destroys the material when due.
    leader.kill();
    let next = eventually(Duration::from_secs(60), "a new leader", || async {
        lease_holder(&lease).await.filter(|h| *h != first)
    })
    .await;
    assert_ne!(next, first);
    let key =
        wait_key(ns, "k", "Destroyed by the new leader", |k| state(k) == Some(KeyState::Destroyed)).await;
    assert_eq!(key.status.unwrap().versions.len(), 1, "no version was duplicated or lost");
    assert!(standby.http_get("/metrics").await.unwrap().1.contains("kubekms_controller_leader 1"));

    // A graceful stop releases the Lease at once.
    assert_eq!(standby.terminate(), Some(0));
    eventually(WAIT, "the Lease to be released", || async {
        lease_holder(&lease).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restarted_controller_rewrites_nothing() {
    let label = format!("restart-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let mut c = TestController::start(&label, "a", &[]);
    let ns = TestNamespace::new("restart");
    let ns = ns.name.as_str();
    let labels = format!("  labels:\n    {TEST_CONTROLLER_LABEL}: {label}\n");
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_manifest("k", &labels, "")));
    let before = wait_key(ns, "k", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    assert_eq!(c.terminate(), Some(0), "SIGTERM stops the controller cleanly");

    let c = TestController::start(&label, "b", &[]);
    // Wait until the new controller has reconciled the key at least once.
    eventually(WAIT, "a reconcile", || async {
        let (_, metrics) = c.http_get("/metrics").await?;
        metrics.contains(r#"kubekms_controller_reconciles_total{kind="KmsKey",result="ok"}"#).then_some(())
    })
    .await;
    let api: Api<KmsKey> = Api::namespaced(client().await, ns);
    let after = api.get("k").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "reconciling an unchanged key wrote"
    );
    // Keys by state, zeros included, counting only the keys this controller manages.
    let (_, metrics) = c.http_get("/metrics").await.unwrap();
    for (state, count) in [("Enabled", 1), ("Disabled", 0), ("PendingDeletion", 0), ("Creating", 0)] {
        let line = format!("kubekms_keys{{state=\"{state}\"}} {count}\n");
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    assert_eq!(materials.get(after.metadata.uid.as_deref().unwrap()).await.unwrap().spec.versions.len(), 1);
}

#[tokio::test]
async fn root_key_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    let run = |args: &[&str]| {
        std::process::Command::new(crate::support::kubekms_bin()).args(args).output().unwrap()
    };

    let out = run(&["root-key", "create", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let fingerprint = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(fingerprint.contains("rk1-"));

    let again = run(&["root-key", "create", "--out", path.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists; refusing to overwrite"));

    // The controller refuses bad root key files with a clear message and exit code 1.
    let controller = |file: &str| {
        let kubeconfig = run_dir().join("kubekms-controller.kubeconfig");
        run(&[
            "controller",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--root-key-file",
            file,
            "--metrics-addr",
            "127.0.0.1:0",
            "--leader-elect=false",
        ])
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let missing = dir.path().join("missing.key");
    let short = dir.path().join("short.key");
    std::fs::write(&short, [1u8; 16]).unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (file, message) in [
        (path.to_str().unwrap(), "readable by group or others (mode 0644)"),
        (missing.to_str().unwrap(), "cannot be read"),
        (short.to_str().unwrap(), "holds 16 bytes; a root key is exactly 32 bytes"),
    ] {
        let out = controller(file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(message), "expected {message:?} in:\n{stderr}");
    }
    // The log names the key by fingerprint only.
    let log = std::fs::read_to_string(run_dir().join("logs/controller.log")).unwrap_or_default();
    assert!(log.contains(crate::support::root_key().fingerprint()));
    // (A root key in an HSM is nowhere to be read, in a log or elsewhere.)
    if let Ok(root) = std::fs::read(run_dir().join("root.key")) {
        let b64 = base64::engine::general_purpose::STANDARD;
        assert!(!log.contains(&b64.encode(&root)));
    }
}

#[tokio::test]
async fn key_material_cannot_be_deleted_or_destroyed_by_hand() {
    let ns = TestNamespace::new("material-guard");
    let ns = ns.name.as_str();
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_manifest("k", "", "")));
    let key = wait_key(ns, "k", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    let uid = key.metadata.uid.clone().unwrap();
    // Even a cluster administrator cannot skip the waiting period through the material.
    let run = kubectl(&["delete", "kmskeymaterial", &uid], None);
    assert!(!run.ok);
    assert!(run.stderr.contains("destroyed only after its deletion waiting period"), "{}", run.stderr);
    let run = kubectl(
        &[
            "patch",
            "kmskeymaterial",
            &uid,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"destroyedAt":"2026-01-01T00:00:00Z","versions":[]}}"#,
        ],
        None,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("only the kubekms controller destroys key material"), "{}", run.stderr);
    // Removing a version is refused by the schema.
    let run = kubectl(
        &[
            "patch",
            "kmskeymaterial",
            &uid,
            "--type",
            "json",
            "-p",
            r#"[{"op":"remove","path":"/spec/versions/0"}]"#,
        ],
        None,
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("key versions are never removed"), "{}", run.stderr);
    let materials: Api<KmsKeyMaterial> = Api::all(client().await);
    assert_eq!(materials.get(&uid).await.unwrap().spec.versions.len(), 1);
}

#[tokio::test]
async fn rescheduling_before_a_cancellation_is_processed_is_refused() {
    // With the controller stopped, a cancellation stays unprocessed (status still says
    // PendingDeletion); scheduling again then must not reuse the old deletion time, so the
    // API server refuses it until the controller has caught up.
    let label = format!("resched-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let mut controller = TestController::start(&label, "a", &[]);
    let ns = TestNamespace::new("resched");
    let ns = ns.name.as_str();
    let labels = format!("  labels:\n    {TEST_CONTROLLER_LABEL}: {label}\n");
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_manifest("k", &labels, "")));
    wait_key(ns, "k", "Enabled", |k| state(k) == Some(KeyState::Enabled)).await;
    patch_key(ns, "k", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    wait_key(ns, "k", "PendingDeletion", |k| state(k) == Some(KeyState::PendingDeletion)).await;
    controller.kill();
    patch_key(ns, "k", r#"{"spec":{"enabled":false,"deletion":{"scheduled":false}}}"#);
    let run = kubectl(
        &[
            "patch",
            "kmskey",
            "k",
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"deletion":{"scheduled":true}}}"#,
        ],
        None,
    );
    assert!(!run.ok, "rescheduled before the cancellation was processed");
    assert!(run.stderr.contains("has not been processed yet"), "{}", run.stderr);
    // Once a controller has processed the cancellation, scheduling works again.
    let _controller = TestController::start(&label, "b", &[]);
    wait_key(ns, "k", "Disabled", |k| state(k) == Some(KeyState::Disabled)).await;
    patch_key(ns, "k", r#"{"spec":{"deletion":{"scheduled":true}}}"#);
    wait_key(ns, "k", "PendingDeletion again", |k| state(k) == Some(KeyState::PendingDeletion)).await;
}

/// Removes the admission policy of a test, also when the test fails.
struct PolicyGuard(String);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let _ = kubectl(
            &[
                "delete",
                "validatingadmissionpolicybinding,validatingadmissionpolicy",
                &self.0,
                "--ignore-not-found",
            ],
            None,
        );
    }
}

#[tokio::test]
async fn a_key_whose_material_cannot_be_stored_says_why_and_recovers() {
    let ns = TestNamespace::new("create-fails");
    let ns = ns.name.as_str();
    // An admission policy refuses the material of this namespace's keys: a stand-in for any
    // failure to store version 1 (a webhook, a quota, an RBAC mistake).
    let policy = format!("e2e-refuse-material-{ns}");
    let guard = PolicyGuard(policy.clone());
    let manifests = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {policy}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [kms.kubekms.io]
      apiVersions: ["*"]
      operations: [CREATE]
      resources: [kmskeymaterials]
  validations:
  - expression: "object.spec.owner.namespace != '{ns}'"
    message: the e2e test refuses key material in {ns}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {policy}
spec:
  policyName: {policy}
  validationActions: [Deny]
"#
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&manifests));
    // Wait until the policy is in force: a dry-run of such a material, as the controller
    // (anyone else's is refused by the chart's material guard anyway), is refused.
    let probe = format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKeyMaterial\nmetadata:\n  name: probe-{ns}\nspec:\n  origin: KUBEKMS\n  rootKeyFingerprint: probe\n  owner: {{namespace: {ns}, name: probe, uid: probe}}\n"
    );
    eventually(WAIT, "the admission policy in force", || async {
        let controller = "--as=system:serviceaccount:kubekms-system:kubekms-controller";
        let run = kubectl(&["create", controller, "--dry-run=server", "-f", "-"], Some(&probe));
        (!run.ok && run.stderr.contains("refuses key material")).then_some(())
    })
    .await;

    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_manifest("doomed", "", "")));
    let key = wait_key(ns, "doomed", "Creating with the reason", |k| {
        state(k) == Some(KeyState::Creating)
            && condition(k, "Ready").is_some_and(|c| c.status == "False" && c.reason == "CreateFailed")
    })
    .await;
    let ready = condition(&key, "Ready").unwrap();
    assert!(ready.message.contains("refuses key material"), "the condition says why: {}", ready.message);
    assert!(key.status.as_ref().unwrap().key_id.is_none(), "no key id before there is material");
    wait_events(ns, "doomed", &["ReconcileFailed"]).await;
    let table = kubectl_ok(&["get", "kmskey", "doomed", "-n", ns], None);
    assert!(table.contains("Creating"), "{table}");

    // Once the cause is gone the controller's retry creates version 1.
    drop(guard);
    let api: Api<KmsKey> = Api::namespaced(client().await, ns);
    let key = eventually(Duration::from_secs(90), "Enabled after the policy is gone", || {
        let api = api.clone();
        async move { api.get("doomed").await.ok().filter(|k| state(k) == Some(KeyState::Enabled)) }
    })
    .await;
    let status = key.status.clone().unwrap();
    assert_eq!(status.current_version, Some(1));
    assert_eq!(status.key_id, key.metadata.uid);
    let ready = condition(&key, "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Enabled"));
    wait_events(ns, "doomed", &["KeyCreated"]).await;
}
