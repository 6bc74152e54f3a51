//! The attacker's view: each test binds an identity to exactly the Kubernetes rights it
//! names and tries to make kubekms do what only kubekms's own rights should allow. Every
//! attack here worked before the fix it names: status as a report (the first tests), the
//! right to grant — the admission policies that record a grant's creator and check the
//! right, the controller's check of every grant's creator, the key API's CreateGrant —
//! and the policy that lets only the controller write status.

use std::time::Duration;

use kube::Api;
use kubekms::api::{GrantState, KeyState, KmsGrant, KmsKey, KmsKeyMaterial};
use kubekms::proto::keyapi::*;
use tokio::sync::RwLock;
use tonic::Code;

use crate::keyapi::{as_sa, bind_key_user, code, decrypt, enabled_key, encrypt, grant_state};
use crate::support::{
    Run, TestNamespace, can_i, client, env_var, eventually, kubectl, kubectl_ok, kubekms_bin, run_dir,
};

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

pub(crate) async fn wait_state(ns: &str, name: &str, want: KeyState) -> KmsKey {
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

/// One test removes the admission check of the right to grant for a moment; the tests
/// that count on that check hold this for reading, that one for writing.
static ADMISSION: RwLock<()> = RwLock::const_new(());

pub(crate) fn user(ns: &str, sa: &str) -> String {
    format!("system:serviceaccount:{ns}:{sa}")
}

/// kubectl as the ServiceAccount `ns/sa` (the admin impersonates it).
pub(crate) fn kubectl_as(ns: &str, sa: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let who = format!("--as={}", user(ns, sa));
    let all: Vec<&str> = std::iter::once(who.as_str()).chain(args.iter().copied()).collect();
    kubectl(&all, stdin)
}

/// ServiceAccount `ns/sa` with a Role of exactly `rules` (YAML list items) and nothing
/// else; returns once RBAC answers with the first rule's verb.
async fn with_rights(ns: &str, sa: &str, rules: &[&str], check: (&str, &str)) {
    let _ = kubectl(&["create", "serviceaccount", sa, "-n", ns], None);
    let manifest = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: {sa}, namespace: {ns}}}\nrules:\n{}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: {sa}, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {sa}}}\n\
         subjects:\n- {{kind: ServiceAccount, name: {sa}, namespace: {ns}}}\n",
        rules.join("\n")
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&manifest));
    let who = user(ns, sa);
    eventually(WAIT, &format!("RBAC to let {who} {} {}", check.0, check.1), || async {
        can_i(ns, &who, check.0, check.1).then_some(())
    })
    .await;
}

const CREATE_GRANTS: &str = "- {apiGroups: [kms.kubekms.io], resources: [kmsgrants], verbs: [create]}";

fn creategrant_on(key: &str) -> String {
    format!(
        "- {{apiGroups: [kms.kubekms.io], resources: [kmskeys], resourceNames: [{key}], verbs: [creategrant]}}"
    )
}

fn grant_manifest(name: &str, key: &str, ns: &str, grantee: &str, ops: &str) -> String {
    format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsGrant\nmetadata: {{name: {name}}}\nspec:\n  keyRef: {{name: {key}}}\n  grantee: {{kind: ServiceAccount, namespace: {ns}, name: {grantee}}}\n  operations: [{ops}]\n"
    )
}

/// A policy statement for ServiceAccount `ns/sa`, indented for a key spec.
fn statement(sid: &str, effect: &str, ns: &str, sa: &str, ops: &str) -> String {
    format!(
        "    - sid: {sid}\n      effect: {effect}\n      principals: [{{kind: ServiceAccount, namespace: {ns}, name: {sa}}}]\n      operations: [{ops}]\n"
    )
}

fn policy(delegate: bool, statements: &[String]) -> String {
    format!("  policy:\n    delegateToRBAC: {delegate}\n    statements:\n{}", statements.concat())
}

/// The grant once its Ready condition gives `reason`.
async fn grant_reason(ns: &str, name: &str, reason: &str) -> KmsGrant {
    let grants: Api<KmsGrant> = Api::namespaced(client().await, ns);
    eventually(WAIT, &format!("grant {name} to be {reason}"), || async {
        grants.get(name).await.ok().filter(|g| {
            g.status.as_ref().and_then(|s| s.conditions.first()).is_some_and(|c| c.reason == reason)
        })
    })
    .await
}

fn ready_message(grant: &KmsGrant) -> String {
    grant.status.as_ref().and_then(|s| s.conditions.first()).map(|c| c.message.clone()).unwrap_or_default()
}

/// A ciphertext of `plaintext` under `ns/key`, made by ServiceAccount `ns/owner` (which
/// the key lets encrypt).
async fn ciphertext(ns: &str, key: &str, owner: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut owner = as_sa(ns, owner).await;
    encrypt(&mut owner, &format!("{ns}/{key}"), plaintext, &[])
        .await
        .expect("the owner encrypts")
        .ciphertext_blob
}

/// Asserts the grantee is refused, several times over, as long as the controller had to
/// settle the grant: a grant that gives nothing must give nothing at any moment.
async fn stays_refused(who: &mut kubekms::client::Client, blob: &[u8]) {
    for _ in 0..5 {
        assert_eq!(code(decrypt(who, blob, &[]).await), Code::PermissionDenied);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn create_grant_request(key: &str, name: &str, ns: &str, grantee: &str, ops: &[&str]) -> CreateGrantRequest {
    CreateGrantRequest {
        key: key.to_owned(),
        name: name.to_owned(),
        grantee: Some(Principal {
            kind: "ServiceAccount".into(),
            name: grantee.into(),
            namespace: ns.into(),
        }),
        operations: ops.iter().map(|o| (*o).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_on_kmsgrants_alone_is_not_the_right_to_grant() {
    let _admission = ADMISSION.read().await;
    let ns = TestNamespace::new("rt-create-only");
    let ns = ns.name.as_str();
    enabled_key(ns, "policy-only", &policy(false, &[statement("web", "Allow", ns, "web", "Decrypt")])).await;
    enabled_key(ns, "rbac", "  description: delegates to RBAC\n").await;
    with_rights(ns, "mallory", &[CREATE_GRANTS], ("create", "kmsgrants")).await;
    for key in ["policy-only", "rbac"] {
        let run = kubectl_as(
            ns,
            "mallory",
            &["create", "-n", ns, "-f", "-"],
            Some(&grant_manifest("mine", key, ns, "mallory", "Decrypt")),
        );
        assert!(!run.ok, "a grant on {key} was admitted:\n{}", run.stdout);
        for text in [
            format!("{} may not create a grant on KmsKey {key}", user(ns, "mallory")),
            format!("the RBAC verb creategrant on kmskeys/{key}"),
            "key API CreateGrant".to_owned(),
        ] {
            assert!(run.stderr.contains(&text), "expected {text:?} in:\n{}", run.stderr);
        }
    }
    assert!(kubectl_ok(&["get", "kmsgrants", "-n", ns, "-o", "name"], None).trim().is_empty());
}

#[tokio::test]
async fn creategrant_on_the_key_lets_a_grantor_give_decrypt() {
    let _admission = ADMISSION.read().await;
    let ns = TestNamespace::new("rt-grantor");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: delegates to RBAC\n").await;
    bind_key_user(ns, ns, "owner");
    let blob = ciphertext(ns, "k", "owner", b"granted").await;
    let mut reader = as_sa(ns, "reader").await;
    assert_eq!(code(decrypt(&mut reader, &blob, &[]).await), Code::PermissionDenied);
    with_rights(ns, "grantor", &[CREATE_GRANTS, &creategrant_on("k")], ("create", "kmsgrants")).await;
    eventually(WAIT, "RBAC to let the grantor creategrant", || async {
        can_i(ns, &user(ns, "grantor"), "creategrant", "kmskeys/k").then_some(())
    })
    .await;

    // The grantor names someone else as the creator: admission records the grantor.
    let forged = grant_manifest("read", "k", ns, "reader", "Decrypt")
        + "  creator: {username: kubekms-e2e-admin, groups: [system:masters]}\n";
    let run = kubectl_as(ns, "grantor", &["create", "-n", ns, "-f", "-"], Some(&forged));
    assert!(run.ok, "the grantor may grant:\n{}", run.stderr);
    let g = grant_state(ns, "read", GrantState::Active).await;
    let creator = g.spec.creator.clone().expect("admission records the creator");
    assert_eq!(creator.username, user(ns, "grantor"), "the creator is who created the grant");
    assert!(creator.groups.contains(&format!("system:serviceaccounts:{ns}")), "{:?}", creator.groups);
    assert_eq!(g.status.as_ref().and_then(|s| s.creator.clone()), Some(user(ns, "grantor")));
    assert!(
        ready_message(&g).contains(&format!("granted by {}", user(ns, "grantor"))),
        "{}",
        ready_message(&g)
    );
    let plain = eventually(WAIT, "the grantee to decrypt", || async {
        decrypt(&mut reader.clone(), &blob, &[]).await.ok()
    })
    .await;
    assert_eq!(plain.plaintext, b"granted");
    // Nobody changes the record afterwards, not even the admin.
    let run = kubectl(
        &[
            "patch",
            "kmsgrant",
            "read",
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"creator":{"username":"someone-else"}}}"#,
        ],
        None,
    );
    assert!(!run.ok && run.stderr.contains("a grant's terms cannot change"), "{}", run.stderr);
}

/// Removes the bindings of the shared control plane's admission check of the right to
/// grant until dropped, then puts them back and waits until they are in force again.
struct WithoutRightToGrantCheck {
    saved: Vec<String>,
    probe: Box<dyn Fn() -> bool>,
}

impl WithoutRightToGrantCheck {
    /// `probe` tries (a dry run of) something only that check refuses.
    async fn new(probe: impl Fn() -> bool + 'static) -> Self {
        let list = kubectl_ok(&["get", "validatingadmissionpolicybindings", "-o", "json"], None);
        let list: serde_json::Value = serde_json::from_str(&list).unwrap();
        let mut saved = Vec::new();
        for b in list["items"].as_array().into_iter().flatten() {
            if b["spec"]["policyName"].as_str() != Some("kubekms-kmsgrant-creation") {
                continue;
            }
            let name = b["metadata"]["name"].as_str().unwrap().to_owned();
            let manifest = serde_json::json!({
                "apiVersion": b["apiVersion"], "kind": b["kind"],
                "metadata": {"name": name, "labels": b["metadata"]["labels"]},
                "spec": b["spec"],
            });
            saved.push(manifest.to_string());
            kubectl_ok(&["delete", "validatingadmissionpolicybinding", &name], None);
        }
        eventually(WAIT, "the API server to drop the check", || async { probe().then_some(()) }).await;
        WithoutRightToGrantCheck { saved, probe: Box::new(probe) }
    }

    async fn restore(mut self) {
        let restored = !self.saved.is_empty();
        for manifest in self.saved.drain(..) {
            kubectl_ok(&["apply", "-f", "-"], Some(&manifest));
        }
        if restored {
            eventually(WAIT, "the check to be back in force", || async { (!(self.probe)()).then_some(()) })
                .await;
        }
    }
}

impl Drop for WithoutRightToGrantCheck {
    fn drop(&mut self) {
        for manifest in self.saved.drain(..) {
            let _ = kubectl(&["apply", "-f", "-"], Some(&manifest));
        }
    }
}

/// Disruptive: it lifts a cluster-wide admission check for a while, which a concurrent test
/// (a chart release with a check of its own) would put back in its way.
#[tokio::test]
async fn disruptive_a_grant_made_past_admission_gives_nothing() {
    let ns = TestNamespace::new("rt-past-admission");
    let ns = ns.name.as_str().to_owned();
    let ns = ns.as_str();
    enabled_key(ns, "rbac", "  description: delegates to RBAC\n").await;
    let owner = statement("owner", "Allow", ns, "owner", "Encrypt");
    enabled_key(ns, "policy-only", &policy(false, &[owner])).await;
    bind_key_user(ns, ns, "owner");
    let blobs =
        [ciphertext(ns, "rbac", "owner", b"one").await, ciphertext(ns, "policy-only", "owner", b"two").await];
    with_rights(ns, "mallory", &[CREATE_GRANTS], ("create", "kmsgrants")).await;

    // While nothing checks the right to grant at admission, mallory grants herself Decrypt
    // on both keys.
    {
        let _only_test = ADMISSION.write().await;
        let probe_ns = ns.to_owned();
        let probe = move || {
            let manifest = grant_manifest("probe", "rbac", &probe_ns, "mallory", "Decrypt");
            kubectl_as(
                &probe_ns,
                "mallory",
                &["create", "--dry-run=server", "-n", &probe_ns, "-f", "-"],
                Some(&manifest),
            )
            .ok
        };
        let unchecked = WithoutRightToGrantCheck::new(probe).await;
        for key in ["rbac", "policy-only"] {
            let manifest = grant_manifest(&format!("self-{key}"), key, ns, "mallory", "Decrypt");
            let run = kubectl_as(ns, "mallory", &["create", "-n", ns, "-f", "-"], Some(&manifest));
            assert!(run.ok, "with the check removed the grant is admitted:\n{}", run.stderr);
        }
        unchecked.restore().await;
    }

    let mut mallory = as_sa(ns, "mallory").await;
    for (key, blob) in ["rbac", "policy-only"].iter().zip(&blobs) {
        let g = grant_reason(ns, &format!("self-{key}"), "CreatorNotAuthorized").await;
        assert_eq!(g.status.as_ref().and_then(|s| s.state), Some(GrantState::Invalid));
        assert_eq!(g.spec.creator.as_ref().map(|c| c.username.clone()), Some(user(ns, "mallory")));
        let message = ready_message(&g);
        assert!(
            message.contains(&format!("{} has no right to grant on the key", user(ns, "mallory"))),
            "{message}"
        );
        stays_refused(&mut mallory, blob).await;
    }
}

#[tokio::test]
async fn a_policy_deny_wins_over_rbac_creategrant() {
    let _admission = ADMISSION.read().await;
    let ns = TestNamespace::new("rt-deny");
    let ns = ns.name.as_str();
    let no_grants = statement("no-grants-by-grantor", "Deny", ns, "grantor", "CreateGrant");
    enabled_key(ns, "k", &policy(true, &[no_grants])).await;
    // A second key: the grantor may grant, but the policy denies it Decrypt, so it cannot
    // give Decrypt to anyone (a Deny is not sidestepped by granting to another identity).
    let no_decrypt = statement("no-decrypt-for-grantor", "Deny", ns, "grantor", "Decrypt");
    enabled_key(ns, "k2", &policy(true, &[no_decrypt])).await;
    bind_key_user(ns, ns, "owner");
    let blobs = [ciphertext(ns, "k", "owner", b"one").await, ciphertext(ns, "k2", "owner", b"two").await];
    with_rights(
        ns,
        "grantor",
        &[CREATE_GRANTS, &creategrant_on("k"), &creategrant_on("k2")],
        ("create", "kmsgrants"),
    )
    .await;
    eventually(WAIT, "RBAC to let the grantor creategrant", || async {
        (can_i(ns, &user(ns, "grantor"), "creategrant", "kmskeys/k")
            && can_i(ns, &user(ns, "grantor"), "creategrant", "kmskeys/k2"))
        .then_some(())
    })
    .await;

    // Admission asks RBAC, which allows; the controller reads the policy, which denies.
    for key in ["k", "k2"] {
        let run = kubectl_as(
            ns,
            "grantor",
            &["create", "-n", ns, "-f", "-"],
            Some(&grant_manifest(key, key, ns, "reader", "Decrypt")),
        );
        assert!(run.ok, "RBAC creategrant passes admission:\n{}", run.stderr);
    }
    let g = grant_reason(ns, "k", "CreatorNotAuthorized").await;
    let message = ready_message(&g);
    assert!(
        message.contains(&format!(
            r#"the key policy denies {} CreateGrant (statement "no-grants-by-grantor")"#,
            user(ns, "grantor")
        )),
        "{message}"
    );
    let g = grant_reason(ns, "k2", "CreatorNotAuthorized").await;
    let message = ready_message(&g);
    assert!(message.contains(r#"Decrypt (statement "no-decrypt-for-grantor")"#), "{message}");
    let mut reader = as_sa(ns, "reader").await;
    for blob in &blobs {
        stays_refused(&mut reader, blob).await;
    }

    // The key API's CreateGrant refuses the same, naming the statement.
    let mut grantor = as_sa(ns, "grantor").await;
    let refused = grantor
        .create_grant(create_grant_request(&format!("{ns}/k"), "via-api", ns, "reader", &["Decrypt"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    refused_for_create_grant(&refused, "no-grants-by-grantor");
    assert!(!kubectl(&["get", "kmsgrant", "via-api", "-n", ns], None).ok, "nothing was created");
}

#[tokio::test]
async fn status_is_written_by_the_controller_only() {
    let ns = TestNamespace::new("rt-status");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: its status is the controller's\n").await;
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&grant_manifest("live", "k", ns, "reader", "Decrypt")));
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&grant_manifest("dangling", "nope", ns, "forger", "Decrypt")),
    );
    grant_state(ns, "live", GrantState::Active).await;
    grant_reason(ns, "dangling", "KeyNotFound").await;
    let status_rights = [
        "- {apiGroups: [kms.kubekms.io], resources: [kmsgrants/status, kmskeys/status], verbs: [get, patch, update]}",
        "- {apiGroups: [kms.kubekms.io], resources: [kmsgrants, kmskeys], verbs: [get]}",
    ];
    with_rights(ns, "forger", &status_rights, ("patch", "kmsgrants:status")).await;
    assert!(can_i(ns, &user(ns, "forger"), "patch", "kmskeys:status"));

    let key_id = kubectl_ok(&["get", "kmskey", "k", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let patch_status = |kind: &str, name: &str, status: serde_json::Value| {
        let body = serde_json::json!({ "status": status }).to_string();
        kubectl_as(
            ns,
            "forger",
            &["patch", kind, name, "-n", ns, "--subresource=status", "--type", "merge", "-p", &body],
            None,
        )
    };
    for (kind, name, status, what) in [
        (
            "kmsgrant",
            "dangling",
            serde_json::json!({"state": "Active", "keyId": key_id}),
            "make a grant Active",
        ),
        ("kmsgrant", "live", serde_json::json!({"retiredBy": "someone"}), "retire a grant"),
        ("kmsgrant", "live", serde_json::json!({"creator": "someone-else"}), "change the recorded creator"),
        ("kmskey", "k", serde_json::json!({"state": "Disabled"}), "write a key's status"),
        (
            "kmskey",
            "k",
            serde_json::json!({"nextRotationTime": "2020-01-01T00:00:00Z"}),
            "write a key's status",
        ),
    ] {
        let run = patch_status(kind, name, status);
        assert!(!run.ok, "the forger could {what}: {}", run.stdout);
        let expected = if kind == "kmskey" {
            "only the kubekms controller writes the status of a KmsKey"
        } else {
            "only the kubekms controller writes the status of a KmsGrant"
        };
        assert!(run.stderr.contains(expected), "{what}: {}", run.stderr);
    }
    // Not even the admin writes status.
    let run = kubectl(
        &[
            "patch",
            "kmsgrant",
            "dangling",
            "-n",
            ns,
            "--subresource=status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"state":"Active"}}"#,
        ],
        None,
    );
    assert!(!run.ok && run.stderr.contains("only the kubekms controller"), "{}", run.stderr);

    let grants: Api<KmsGrant> = Api::namespaced(client().await, ns);
    let dangling = grants.get("dangling").await.unwrap().status.unwrap();
    assert_eq!(dangling.state, Some(GrantState::Invalid));
    let live = grants.get("live").await.unwrap().status.unwrap();
    assert_eq!(
        (live.state, live.retired_by, live.creator.as_deref()),
        (Some(GrantState::Active), None, Some("kubekms-e2e-admin"))
    );
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    assert_eq!(keys.get("k").await.unwrap().status.and_then(|s| s.state), Some(KeyState::Enabled));
}

/// The policy-only key `ns/k`, whose policy allows `ns/grantor` CreateGrant and `ns/owner`
/// Encrypt (and nobody anything else), and a ciphertext of `plaintext` under it.
async fn policy_only_key_with_a_grantor(ns: &str, plaintext: &[u8]) -> (String, Vec<u8>) {
    let statements = [
        statement("grantors", "Allow", ns, "grantor", "CreateGrant"),
        statement("owner", "Allow", ns, "owner", "Encrypt"),
    ];
    enabled_key(ns, "k", &policy(false, &statements)).await;
    (format!("{ns}/k"), ciphertext(ns, "k", "owner", plaintext).await)
}

#[tokio::test]
async fn a_policy_grantor_grants_through_the_key_api() {
    let _admission = ADMISSION.read().await;
    let ns = TestNamespace::new("rt-policy-grantor");
    let ns = ns.name.as_str();
    let (key, blob) = policy_only_key_with_a_grantor(ns, b"by policy").await;
    let reader = as_sa(ns, "reader").await;
    let mut grantor = as_sa(ns, "grantor").await;
    // The grantor holds no Kubernetes right at all: kubectl cannot create a grant for it.
    let run = kubectl_as(
        ns,
        "grantor",
        &["create", "-n", ns, "-f", "-"],
        Some(&grant_manifest("direct", "k", ns, "reader", "Decrypt")),
    );
    assert!(!run.ok, "{}", run.stdout);

    let created = grantor
        .create_grant(create_grant_request(&key, "", ns, "reader", &["Decrypt", "DescribeKey"]))
        .await
        .expect("the policy allows the grantor CreateGrant")
        .into_inner();
    let (grant_ns, name) = created.grant.split_once('/').unwrap();
    assert_eq!(grant_ns, ns);
    assert!(name.starts_with("grant-"), "a generated name: {name}");
    let g = grant_state(ns, name, GrantState::Active).await;
    assert_eq!(g.metadata.uid.as_deref(), Some(created.grant_id.as_str()));
    assert_eq!(
        g.spec.creator.as_ref().map(|c| c.username.clone()),
        Some(user(ns, "grantor")),
        "the caller, not the server"
    );
    assert!(ready_message(&g).contains(r#"by key policy statement "grantors""#), "{}", ready_message(&g));
    let plain = eventually(WAIT, "the grantee to decrypt", || async {
        decrypt(&mut reader.clone(), &blob, &[]).await.ok()
    })
    .await;
    assert_eq!(plain.plaintext, b"by policy");
    let audit = std::fs::read_to_string(run_dir().join("server/audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains(r#""operation":"CreateGrant""#)
            && l.contains(&created.grant_id)
            && l.contains(r#""result":"OK""#)),
        "the audit line names the grant created"
    );

    // Precise refusals: someone the policy does not name, bad terms, a taken name.
    let mut stranger = as_sa(ns, "stranger").await;
    let refused = stranger
        .create_grant(create_grant_request(&key, "", ns, "stranger", &["Decrypt"]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    refused_for_create_grant(&refused, "has no right to grant");
    let bad =
        grantor.create_grant(create_grant_request(&key, "", ns, "reader", &["decrypt"])).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains(r#""decrypt" is not an operation"#), "{}", bad.message());
    let again =
        grantor.create_grant(create_grant_request(&key, name, ns, "reader", &["Decrypt"])).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{}", again.message());
}

#[tokio::test]
async fn a_grant_gives_the_right_to_grant_only_within_itself() {
    let _admission = ADMISSION.read().await;
    let ns = TestNamespace::new("rt-onward");
    let ns = ns.name.as_str();
    let (key, blob) = policy_only_key_with_a_grantor(ns, b"onward").await;
    let mut grantor = as_sa(ns, "grantor").await;
    let mut bob = as_sa(ns, "bob").await;
    let mut carol = as_sa(ns, "carol").await;

    // bob may decrypt and grant onward; he gives carol Decrypt within his grant.
    let bobs = grantor
        .create_grant(create_grant_request(&key, "bob", ns, "bob", &["Decrypt", "CreateGrant"]))
        .await
        .unwrap()
        .into_inner();
    grant_state(ns, "bob", GrantState::Active).await;
    let carols = eventually(WAIT, "bob's grant to give him CreateGrant", || async {
        bob.clone().create_grant(create_grant_request(&key, "carol", ns, "carol", &["Decrypt"])).await.ok()
    })
    .await
    .into_inner();
    let g = grant_state(ns, "carol", GrantState::Active).await;
    assert_eq!(g.metadata.uid.as_deref(), Some(carols.grant_id.as_str()));
    let creator = g.spec.creator.clone().unwrap();
    assert_eq!((creator.username, creator.parent_grant), (user(ns, "bob"), Some(bobs.grant_id.clone())));
    assert!(ready_message(&g).contains(&format!("within grant {}", bobs.grant_id)), "{}", ready_message(&g));
    eventually(WAIT, "carol to decrypt", || async { decrypt(&mut carol.clone(), &blob, &[]).await.ok() })
        .await;
    // Nothing bob's grant does not give: not Encrypt.
    let wider =
        bob.create_grant(create_grant_request(&key, "wider", ns, "carol", &["Encrypt"])).await.unwrap_err();
    assert_eq!(wider.code(), Code::PermissionDenied);
    refused_for_create_grant(&wider, "gives more than that grant");
    // carol's grant does not give CreateGrant, so she cannot grant onward.
    let onward =
        carol.create_grant(create_grant_request(&key, "dave", ns, "dave", &["Decrypt"])).await.unwrap_err();
    assert_eq!(onward.code(), Code::PermissionDenied, "{}", onward.message());

    // Revoke bob's grant: the grant he made within it gives nothing either.
    kubectl_ok(&["delete", "kmsgrant", "bob", "-n", ns], None);
    let g = grant_reason(ns, "carol", "CreatorNotAuthorized").await;
    assert_eq!(g.status.and_then(|s| s.state), Some(GrantState::Invalid));
    eventually(WAIT, "carol to be refused", || async {
        (decrypt(&mut carol.clone(), &blob, &[]).await.err()?.code() == Code::PermissionDenied).then_some(())
    })
    .await;
}

/// Gives ServiceAccount `ns/sa` (created if needed) every write of the cluster-scoped
/// `resource`, as a GitOps tool or a wildcard ClusterRole holds it, through a ClusterRole
/// and binding that go when the returned guard drops; returns once RBAC allows a patch.
pub(crate) async fn every_write_of(ns: &str, sa: &str, resource: &str) -> ClusterObjects {
    let _ = kubectl(&["create", "serviceaccount", sa, "-n", ns], None);
    let name = format!("rt-{resource}-{ns}");
    let rbac = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: {name}}}\n\
         rules:\n- {{apiGroups: [kms.kubekms.io], resources: [{resource}], verbs: [get, create, update, patch, delete]}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: {name}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {name}}}\n\
         subjects:\n- {{kind: ServiceAccount, name: {sa}, namespace: {ns}}}\n"
    );
    let cleanup = ClusterObjects(vec![format!("clusterrolebinding/{name}"), format!("clusterrole/{name}")]);
    kubectl_ok(&["apply", "-f", "-"], Some(&rbac));
    let who = user(ns, sa);
    eventually(WAIT, &format!("RBAC to let {sa} patch {resource}"), || async {
        can_i("default", &who, "patch", resource).then_some(())
    })
    .await;
    cleanup
}

/// Deletes cluster-scoped objects of one test when it ends.
pub(crate) struct ClusterObjects(pub(crate) Vec<String>);

impl Drop for ClusterObjects {
    fn drop(&mut self) {
        for object in &self.0 {
            let _ = kubectl(&["delete", object, "--ignore-not-found"], None);
        }
    }
}

#[tokio::test]
async fn only_the_controller_writes_key_material() {
    let ns = TestNamespace::new("rt-material");
    let ns = ns.name.as_str();
    enabled_key(ns, "k", "  description: its material is the controller's\n").await;
    let uid = kubectl_ok(&["get", "kmskey", "k", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    // What a GitOps tool or a wildcard ClusterRole holds: every write of kmskeymaterials.
    let _cleanup = every_write_of(ns, "gitops", "kmskeymaterials").await;
    let refused = |run: Run, what: &str| {
        assert!(!run.ok, "gitops could {what}: {}", run.stdout);
        assert!(
            run.stderr.contains("only the kubekms controller writes key material"),
            "{what}: {}",
            run.stderr
        );
    };
    let patch = |json: &str| {
        kubectl_as(ns, "gitops", &["patch", "kmskeymaterial", &uid, "--type", "merge", "-p", json], None)
    };
    refused(patch(r#"{"metadata":{"labels":{"owned-by":"gitops"}}}"#), "label the material");
    refused(patch(r#"{"spec":{"deletionTime":"2000-01-01T00:00:00Z"}}"#), "promise an early deletion");
    let forged = format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKeyMaterial\nmetadata: {{name: forged-{ns}}}\n\
         spec:\n  origin: KUBEKMS\n  rootKeyFingerprint: rk1-forged\n  owner: {{namespace: {ns}, name: other, uid: forged-{ns}}}\n"
    );
    refused(kubectl_as(ns, "gitops", &["create", "-f", "-"], Some(&forged)), "create material");
    let stored = kubectl_ok(&["get", "kmskeymaterial", &uid, "-o", "json"], None);
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert!(stored["metadata"]["labels"]["owned-by"].is_null() && stored["spec"]["deletionTime"].is_null());
}

/// The key API tells a caller refused CreateGrant only that it may not (no oracle); why is
/// in its audit log, whose newest CreateGrant refusal must say `why`.
fn refused_for_create_grant(status: &tonic::Status, why: &str) {
    assert!(status.message().contains("you may not use it for CreateGrant"), "{}", status.message());
    let log = std::fs::read_to_string(crate::support::run_dir().join("server").join("audit.log")).unwrap();
    let reason = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["operation"] == "CreateGrant" && l["result"] == "PermissionDenied")
        .filter_map(|l| l["reason"].as_str().map(str::to_owned))
        .any(|r| r.contains(why));
    assert!(reason, "no CreateGrant refusal in the key API's audit log says {why:?}");
}
