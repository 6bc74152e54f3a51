//! The CRDs as a user meets them: installed, explained, accepting good objects and
//! rejecting bad ones at admission with a message that names the field.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kubekms::api::{KeyState, KmsGrant, KmsKey};

use crate::support::{TestNamespace, client, eventually, kubectl, kubectl_ok};

#[tokio::test]
async fn the_api_server_reports_its_real_version() {
    // Built from k8s.io/kubernetes with version ldflags (e2e/tools/build.sh).
    let version = client().await.apiserver_version().await.expect("/version");
    assert_eq!(version.git_version, "v1.37.2");
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "37"));
    assert_eq!(version.git_tree_state, "clean");
}

#[tokio::test]
async fn crds_are_installed_and_established() {
    let crds: Api<CustomResourceDefinition> = Api::all(client().await);
    for name in ["kmskeys.kms.kubekms.io", "kmsgrants.kms.kubekms.io", "kmskeymaterials.kms.kubekms.io"] {
        let crd = crds.get(name).await.unwrap_or_else(|e| panic!("{name} is not installed: {e}"));
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
    // The installed CRDs are exactly what the binary generates.
    for generated in kubekms::api::all_crds() {
        let name = generated.metadata.name.clone().unwrap_or_default();
        let live = crds.get(&name).await.expect("get crd");
        assert_eq!(
            serde_json::to_value(&live.spec.versions).unwrap(),
            serde_json::to_value(&generated.spec.versions).unwrap(),
            "{name}: the installed schema differs from `kubekms crds`"
        );
    }
}

/// Every field of the spec schema, as dotted paths below `spec`.
fn spec_fields(schema: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else { return };
    for (name, sub) in props {
        let path = format!("{prefix}.{name}");
        out.push(path.clone());
        let sub = sub.get("items").unwrap_or(sub);
        spec_fields(sub, &path, out);
    }
}

#[tokio::test]
async fn kubectl_explain_documents_every_spec_field() {
    let crd = serde_json::to_value(<KmsKey as kube::CustomResourceExt>::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut fields = Vec::new();
    spec_fields(spec, "kmskey.spec", &mut fields);
    assert!(fields.len() > 15, "expected the full spec, got {fields:?}");

    let top = kubectl_ok(&["explain", "kmskey.spec"], None);
    assert!(top.contains("KmsKey"), "{top}");
    for field in &fields {
        let out = kubectl_ok(&["explain", field], None);
        let description = out
            .split("DESCRIPTION:")
            .nth(1)
            .map(|d| d.split("FIELDS:").next().unwrap_or(d).trim().to_owned())
            .unwrap_or_default();
        assert!(description.len() > 10, "`kubectl explain {field}` has no description:\n{out}");
    }
}

const GOOD_KEY: &str = r#"
apiVersion: kms.kubekms.io/v1alpha1
kind: KmsKey
metadata:
  name: orders
spec:
  description: Encrypts order data
  rotation:
    periodDays: 180
  policy:
    statements:
    - sid: web-may-encrypt
      effect: Allow
      principals:
      - kind: ServiceAccount
        namespace: apps
        name: web
      operations: [Encrypt, GenerateDataKey]
    - effect: Deny
      principals:
      - kind: Group
        name: contractors
      operations: [Decrypt]
"#;

const GOOD_GRANT: &str = r#"
apiVersion: kms.kubekms.io/v1alpha1
kind: KmsGrant
metadata:
  name: batch-decrypt
spec:
  keyRef:
    name: orders
  grantee:
    kind: ServiceAccount
    namespace: batch
    name: nightly
  operations: [Decrypt, DescribeKey]
  constraints:
    encryptionContextSubset:
      tenant: acme
  expiresAt: "2030-01-01T00:00:00Z"
  retiringPrincipal:
    kind: User
    name: security-admin
"#;

#[tokio::test]
async fn valid_key_and_grant_are_accepted_and_read_back_with_defaults() {
    let ns = TestNamespace::new("crd-valid");
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(GOOD_KEY));
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(GOOD_GRANT));

    let keys: Api<KmsKey> = Api::namespaced(client().await, &ns.name);
    let key = keys.get("orders").await.expect("get key");
    assert_eq!(key.spec.description, "Encrypts order data");
    assert_eq!(key.spec.rotation.period_days, 180);
    assert!(key.spec.rotation.automatic, "automatic rotation defaults to on");
    assert_eq!(key.spec.deletion.pending_window_days, 30, "deletion window defaults to 30 days");
    assert!(!key.spec.deletion.scheduled);
    assert!(key.spec.enabled);
    assert!(key.spec.policy.delegate_to_rbac);
    assert_eq!(key.spec.policy.statements.len(), 2);

    let grants: Api<KmsGrant> = Api::namespaced(client().await, &ns.name);
    let grant = grants.get("batch-decrypt").await.expect("get grant");
    assert_eq!(grant.spec.key_ref.name, "orders");
    assert_eq!(grant.spec.grantee.namespace.as_deref(), Some("batch"));

    // The status subresource is the controller's (an admission policy refuses anyone
    // else, tested in redteam.rs), and printer columns show it.
    eventually(Duration::from_secs(30), "the controller to report the key Enabled", || async {
        let key = keys.get("orders").await.ok()?;
        (key.status?.state == Some(KeyState::Enabled)).then_some(())
    })
    .await;
    let table = kubectl_ok(&["get", "kmskeys", "-n", &ns.name], None);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "STATE", "VERSION", "NEXT ROTATION", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {header}");
    }
    assert!(table.contains("Enabled"), "{table}");
    let table = kubectl_ok(&["get", "kmsg", "-n", &ns.name], None);
    let header = table.lines().next().unwrap_or_default();
    for column in ["KEY", "GRANTEE", "STATE", "EXPIRES"] {
        assert!(header.contains(column), "missing column {column}: {header}");
    }
    let wide = kubectl_ok(&["get", "kmsg", "-n", &ns.name, "-o", "wide"], None);
    assert!(wide.lines().next().unwrap_or_default().contains("CREATOR"), "{wide}");
}

/// Applies `manifest` in `ns` and asserts the API server refuses it with a message that
/// contains every one of `expected`.
fn assert_rejected(ns: &str, manifest: &str, expected: &[&str]) {
    let run = kubectl(&["apply", "-n", ns, "-f", "-"], Some(manifest));
    assert!(!run.ok, "the API server accepted:\n{manifest}");
    assert_eq!(run.code, Some(1), "kubectl exit code");
    for text in expected {
        assert!(run.stderr.contains(text), "expected {text:?} in the error:\n{}", run.stderr);
    }
}

fn key_with(spec: &str) -> String {
    format!("apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: bad\nspec:\n{spec}")
}

fn grant_with(spec: &str) -> String {
    format!(
        "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsGrant\nmetadata:\n  name: bad\nspec:\n  keyRef: {{name: k}}\n{spec}"
    )
}

#[tokio::test]
async fn bad_keys_are_rejected_naming_the_field() {
    let ns = TestNamespace::new("crd-bad-key");
    let ns = ns.name.as_str();
    assert_rejected(ns, &key_with("  rotation: {periodDays: 89}"), &["spec.rotation.periodDays", "90"]);
    assert_rejected(ns, &key_with("  rotation: {periodDays: 2561}"), &["spec.rotation.periodDays", "2560"]);
    assert_rejected(
        ns,
        &key_with("  deletion: {pendingWindowDays: 6}"),
        &["spec.deletion.pendingWindowDays", "7"],
    );
    assert_rejected(
        ns,
        &key_with("  deletion: {pendingWindowDays: 31}"),
        &["spec.deletion.pendingWindowDays", "30"],
    );
    assert_rejected(ns, &key_with("  keySpec: RSA_2048"), &["spec.keySpec", "SYMMETRIC_DEFAULT"]);
    assert_rejected(ns, &key_with("  keyUsage: SIGN_VERIFY"), &["spec.keyUsage"]);
    assert_rejected(ns, &key_with("  origin: AWS_KMS"), &["spec.origin"]);
    assert_rejected(ns, &key_with("  rotation: {onDemandRequest: \"\"}"), &["spec.rotation.onDemandRequest"]);
    assert_rejected(
        ns,
        &key_with(
            "  policy:\n    statements:\n    - effect: Maybe\n      principals: [{kind: User, name: a}]\n      operations: [Encrypt]",
        ),
        &["spec.policy.statements[0].effect"],
    );
    assert_rejected(
        ns,
        &key_with(
            "  policy:\n    statements:\n    - effect: Allow\n      principals: [{kind: ServiceAccount, name: web}]\n      operations: [Encrypt]",
        ),
        &["spec.policy.statements[0].principals[0]", "namespace is required for a ServiceAccount"],
    );
    assert_rejected(
        ns,
        &key_with(
            "  policy:\n    statements:\n    - effect: Allow\n      principals: [{kind: User, name: a}]\n      operations: []",
        ),
        &["spec.policy.statements[0].operations"],
    );
}

#[tokio::test]
async fn immutable_key_fields_cannot_change_after_creation() {
    let ns = TestNamespace::new("crd-immutable");
    let ns = ns.name.as_str();
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&key_with("  origin: KUBEKMS")));
    assert_rejected(ns, &key_with("  origin: EXTERNAL"), &["spec.origin", "origin is immutable"]);
    // SYMMETRIC_DEFAULT is the only key spec so far, so any change is refused by the enum
    // before the immutability rule (which the CRD carries for when there are more).
    assert_rejected(ns, &key_with("  keySpec: HMAC_256"), &["spec.keySpec"]);

    // The deletion window is fixed once deletion is scheduled.
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&key_with("  deletion: {scheduled: true, pendingWindowDays: 10}")),
    );
    assert_rejected(
        ns,
        &key_with("  deletion: {scheduled: true, pendingWindowDays: 20}"),
        &["spec.deletion", "pendingWindowDays cannot change while deletion is scheduled"],
    );
    // Cancelling a deletion must leave the key disabled, as in AWS KMS — once the key is
    // PendingDeletion (a deletion the controller refused, for a key still in use, is
    // withdrawn without disabling the key).
    let keys: Api<KmsKey> = Api::namespaced(client().await, ns);
    eventually(Duration::from_secs(30), "the key to be PendingDeletion", || async {
        let k = keys.get("bad").await.ok()?;
        (k.status?.state == Some(KeyState::PendingDeletion)).then_some(())
    })
    .await;
    assert_rejected(
        ns,
        &key_with("  deletion: {scheduled: false, pendingWindowDays: 10}"),
        &["cancelling a scheduled deletion leaves the key Disabled"],
    );
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&key_with("  enabled: false\n  deletion: {scheduled: false, pendingWindowDays: 10}")),
    );
}

#[tokio::test]
async fn bad_grants_are_rejected_naming_the_field() {
    let ns = TestNamespace::new("crd-bad-grant");
    let ns = ns.name.as_str();
    let grantee = "  grantee: {kind: ServiceAccount, namespace: apps, name: web}\n";
    assert_rejected(
        ns,
        &grant_with(&format!(
            "{grantee}  operations: [Decrypt]\n  constraints:\n    encryptionContextEquals: {{a: b}}\n    encryptionContextSubset: {{a: b}}"
        )),
        &["spec.constraints", "set at most one of encryptionContextEquals and encryptionContextSubset"],
    );
    assert_rejected(ns, &grant_with(&format!("{grantee}  operations: []")), &["spec.operations"]);
    assert_rejected(ns, &grant_with(grantee), &["spec.operations", "Required value"]);
    assert_rejected(ns, &grant_with(&format!("{grantee}  operations: [Fly]")), &["spec.operations[0]"]);
    assert_rejected(
        ns,
        &grant_with(&format!("{grantee}  operations: [Encrypt, Encrypt]")),
        &["spec.operations[1]", "Duplicate value"],
    );
    assert_rejected(
        ns,
        &grant_with("  grantee: {kind: User, namespace: apps, name: jane}\n  operations: [Encrypt]"),
        &["spec.grantee", "not allowed for a User or Group"],
    );
    assert_rejected(
        ns,
        &grant_with(&format!("{grantee}  operations: [Encrypt]\n  expiresAt: tomorrow")),
        &["spec.expiresAt"],
    );

    // A grant's terms are fixed.
    kubectl_ok(
        &["apply", "-n", ns, "-f", "-"],
        Some(&grant_with(&format!("{grantee}  operations: [Encrypt]"))),
    );
    assert_rejected(
        ns,
        &grant_with(&format!("{grantee}  operations: [Encrypt, Decrypt]")),
        &["spec", "a grant's terms cannot change"],
    );
}

/// kube-controller-manager runs beside the API server: a deleted namespace goes away, and
/// a new one gets its default ServiceAccount.
#[tokio::test]
async fn namespaces_are_deleted_and_get_service_accounts() {
    let name = format!("kcm-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    kubectl_ok(&["create", "namespace", &name], None);
    eventually(std::time::Duration::from_secs(60), "the namespace's default ServiceAccount", || async {
        kubectl(&["get", "serviceaccount", "default", "-n", &name], None).ok.then_some(())
    })
    .await;
    kubectl_ok(&["create", "configmap", "doomed", "-n", &name], None);
    kubectl_ok(&["delete", "namespace", &name, "--wait=false"], None);
    eventually(std::time::Duration::from_secs(60), "the deleted namespace to be gone", || async {
        let get = kubectl(&["get", "namespace", &name], None);
        (!get.ok && get.stderr.contains("NotFound")).then_some(())
    })
    .await;
}
