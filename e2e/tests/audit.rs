//! Management actions are audited twice: kube-apiserver records who asked (with the audit
//! policy of examples/kube-apiserver-audit-policy.yaml, which `make up` runs it with), and
//! the kubekms controller records what it carried out, in its own chained audit log. And
//! `kubekms audit verify` checks a rotated series of audit log files as one chain.

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

/// A rotated series written by the audit writer the components use, checked by the CLI as
/// an auditor would: one chain across the files, a removed file named by the records it
/// held, a series whose oldest files were removed verified from where it starts.
#[test]
fn audit_verify_checks_a_rotated_series_as_one_chain() {
    use kubekms::audit::{AuditEvent, AuditLimits, AuditLog, Rotation};
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("root.key");
    let made = std::process::Command::new(kubekms_bin())
        .args(["root-key", "create", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let root = kubekms::crypto::RootKey::load(&key).unwrap();
    let write = |path: &std::path::Path, from: u32, to: u32, max_files: usize| {
        let rotation = Rotation { max_size: 2048, max_files };
        let log = AuditLog::open_with(path, &root, AuditLimits::default(), rotation).unwrap();
        for i in from..=to {
            let event = AuditEvent {
                component: "plugin",
                request_id: format!("req-{i}"),
                principal: "uid=0".into(),
                operation: "Encrypt",
                key: Some("kube-system/cluster-secrets".into()),
                result: "OK",
                ..Default::default()
            };
            log.record(&event).unwrap();
        }
    };
    let verify = |path: &std::path::Path, extra: &[&str]| {
        let out = std::process::Command::new(kubekms_bin())
            .args(["audit", "verify"])
            .arg(path)
            .arg("--root-key-file")
            .arg(&key)
            .args(extra)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let log = dir.path().join("audit.log");
    write(&log, 1, 40, 0);
    let mut rotated: Vec<(u64, std::path::PathBuf)> = kubekms::audit::rotated(&log).unwrap();
    assert!(rotated.len() >= 4, "{rotated:?}");
    let (code, out, err) = verify(&log, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let summary =
        format!("{} and {} rotated files: 40 lines intact (chain and MACs)", log.display(), rotated.len());
    assert!(out.contains(&summary), "{summary:?} in\n{out}");
    assert!(out.contains(&format!("{}: sequences 1 to ", rotated[0].1.display())), "{out}");
    // Reopened, the chain goes on in the series.
    write(&log, 41, 45, 0);
    let (code, out, _) = verify(&log, &["--expect-seq", "45"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("45 lines intact (chain and MACs)"), "{out}");

    // Without its current file (a crash right after a rotation), every rotated file counts.
    let bare = tempfile::tempdir().unwrap();
    for (_, file) in kubekms::audit::rotated(&log).unwrap() {
        std::fs::copy(&file, bare.path().join(file.file_name().unwrap())).unwrap();
    }
    let (code, out, err) = verify(&bare.path().join("audit.log"), &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    let kept = kubekms::audit::rotated(&log).unwrap().len();
    assert!(out.contains(&format!("audit.log and {kept} rotated files: ")), "{kept} in\n{out}");

    // A middle file removed: named by the records it held, exit status 1.
    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    rotated = kubekms::audit::rotated(&log).unwrap();
    let (gone, next) = (rotated[1].0, rotated[2].0);
    std::fs::remove_file(copy.path().join(format!("audit.log.{gone}"))).unwrap();
    let (code, out, err) = verify(&copy.path().join("audit.log"), &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    let missing = format!(
        "audit.log.{next}: line 1 has sequence number {next}: the records {gone} to {} are missing",
        next - 1
    );
    assert!(err.contains(&missing), "{missing:?} in\n{err}");

    // The oldest files removed by the bound: refused unless the auditor says where the kept
    // part may begin, and then verified from there.
    write(&log, 46, 60, 2);
    rotated = kubekms::audit::rotated(&log).unwrap();
    assert_eq!(rotated.len(), 2, "{rotated:?}");
    let first = rotated[0].0;
    let (code, out, err) = verify(&log, &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains(&format!("verify from there with --from-seq {first}")), "{err}");
    let (code, out, err) = verify(&log, &["--from-seq", &first.to_string()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let kept = format!("{} lines (sequences {first} to 60) intact (chain and MACs)", 60 - first + 1);
    assert!(out.contains(&kept), "{kept:?} in\n{out}");
    // Bad input: a sequence number is 1 or more.
    let (code, _, err) = verify(&log, &["--from-seq", "0"]);
    assert_eq!(code, Some(2), "{err}");
}
