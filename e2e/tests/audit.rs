//! Management actions are audited twice: kube-apiserver records who asked (with the audit
//! policy of examples/kube-apiserver-audit-policy.yaml, which `make up` runs it with), and
//! the kubekms controller records what it carried out, in its own chained audit log.

use std::time::Duration;

use crate::support::{TestNamespace, eventually, kubectl_ok, kubekms_bin, run_dir};

const WAIT: Duration = Duration::from_secs(30);

/// The JSON lines of a log file that satisfy `pick`.
fn lines(file: &str, pick: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir().join(file)).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|v| pick(v)).collect()
}

#[tokio::test]
async fn a_disable_is_found_in_the_api_server_and_controller_audit_logs() {
    let ns = TestNamespace::new("mgmt-audit");
    let ns = ns.name.as_str();
    let key = "apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\nmetadata:\n  name: k\nspec:\n  description: e2e\n";
    kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(key));
    let rights = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: jane, namespace: {ns}}}\n\
         rules:\n- apiGroups: [kms.kubekms.io]\n  resources: [kmskeys]\n  verbs: [get, patch]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: jane, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: jane}}\n\
         subjects:\n- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: jane}}\n"
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&rights));
    let key_name = format!("{ns}/k");
    eventually(WAIT, "the key's creation in the controller's audit log", || async {
        let created = lines("controller/audit.log", |l| {
            l["operation"] == "KeyCreated" && l["key"] == key_name.as_str()
        });
        (!created.is_empty()).then_some(())
    })
    .await;

    kubectl_ok(
        &[
            "patch",
            "kmskey",
            "k",
            "-n",
            ns,
            "--as",
            "jane",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"enabled":false}}"#,
        ],
        None,
    );

    // kube-apiserver: who asked, and what.
    let asked = eventually(WAIT, "jane's patch in kube-apiserver's audit log", || async {
        let found = lines("kube-apiserver-audit.log", |e| {
            e["verb"] == "patch"
                && e["objectRef"]["resource"] == "kmskeys"
                && e["objectRef"]["namespace"] == ns
                && e["objectRef"]["name"] == "k"
                && e["stage"] == "ResponseComplete"
                && e["impersonatedUser"]["username"] == "jane"
        });
        found.into_iter().next()
    })
    .await;
    // (`kubectl --as`: the admin impersonates jane; a real jane's request names her as `user`.)
    assert_eq!(asked["requestObject"]["spec"]["enabled"], false, "the request body is recorded: {asked}");
    assert_eq!(asked["responseStatus"]["code"], 200);

    // The controller: what it did, chained and MACed.
    let done = eventually(WAIT, "the disable in the controller's audit log", || async {
        lines("controller/audit.log", |l| l["operation"] == "KeyDisabled" && l["key"] == key_name.as_str())
            .pop()
    })
    .await;
    assert_eq!(done["component"], "controller");
    assert_eq!(done["result"], "OK");
    // The field manager that wrote the change, as the key's managedFields name it.
    let managed = kubectl_ok(&["get", "kmskey", "k", "-n", ns, "--show-managed-fields", "-o", "json"], None);
    let managed: serde_json::Value = serde_json::from_str(&managed).unwrap();
    let writer = managed["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("subresource").is_none() && !e["manager"].as_str().unwrap().starts_with("kubekms-"))
        .max_by_key(|e| e["time"].as_str().unwrap().to_owned())
        .map(|e| e["manager"].as_str().unwrap().to_owned())
        .unwrap();
    assert_eq!(
        done["principal"],
        format!("manager:{writer}").as_str(),
        "the field manager that asked: {done}"
    );
    let verify = std::process::Command::new(kubekms_bin())
        .args(["audit", "verify"])
        .arg(run_dir().join("controller/audit.log"))
        .args(crate::support::root_key_args())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("intact (chain and MACs)"));
}
