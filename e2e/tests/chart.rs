//! The Helm chart: lint, templates validated by the real API server, bad values refused by
//! the schema, install and upgrade into the local control plane (no kubelet runs there, so
//! the objects are checked, not running pods), and least-privilege RBAC.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{
    Run, TestNamespace, can_i, eventually, kubeconfig_path, kubectl, kubectl_ok, kubekms_bin, run_dir,
};

fn helm(args: &[&str]) -> Run {
    let helm = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/.bin/helm");
    Command::new(helm).args(args).env("KUBECONFIG", kubeconfig_path()).output().expect("run helm").into()
}

const KUBE_VERSION: &str = "1.37.2";

fn template(release: &str, ns: &str, sets: &[&str]) -> Run {
    let mut args = vec!["template", release, chart_path(), "-n", ns, "--kube-version", KUBE_VERSION];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    helm(&args)
}

fn chart_path() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/charts/kubekms")
}

/// The documents of a rendered template.
fn docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(yaml)
        .expect("parse the rendered chart")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Every container (init containers too) of every workload in the rendered chart meets the
/// restricted Pod Security profile's container rules.
fn assert_restricted(rendered: &[serde_json::Value]) {
    let mut checked = 0;
    for d in rendered {
        let kind = d["kind"].as_str().unwrap_or_default();
        if !["Deployment", "DaemonSet"].contains(&kind) {
            continue;
        }
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{kind} pod");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        for c in pod["containers"].as_array().unwrap() {
            assert!(
                c["livenessProbe"].is_object() && c["readinessProbe"].is_object(),
                "{kind}/{} lacks a liveness or readiness probe",
                c["name"]
            );
        }
        let containers = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["initContainers"].as_array().into_iter().flatten());
        for c in containers {
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{kind}/{}", c["name"]);
            assert_eq!(sc["readOnlyRootFilesystem"], true);
            assert_eq!(sc["allowPrivilegeEscalation"], false);
            assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
            assert!(c["resources"]["requests"].is_object(), "{kind}/{} has no resource requests", c["name"]);
            checked += 1;
        }
    }
    assert!(checked >= 3, "expected the controller, server and plugin containers");
}

#[tokio::test]
async fn lint_and_server_side_dry_run_with_default_and_other_values() {
    for sets in [
        // The defaults need no value: the chart issues the key API's certificate itself.
        &[][..],
        &["server.tls.certManager.issuerRef.name=ca", "server.tls.certManager.issuerRef.kind=ClusterIssuer"]
            [..],
        &[
            "server.tls.secretName=tls",
            "rootKey.source=secret",
            "rootKey.secretName=kubekms-root-key",
            "controller.replicas=3",
            "server.replicas=1",
            "server.minAvailable=0",
            "plugin.key=kms-system/etcd-secrets",
            "plugin.createKey=false",
            "networkPolicy.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "image.pullSecrets[0]=registry",
            "controller.selector=team=payments",
        ][..],
    ] {
        let mut args = vec!["lint", "--strict", chart_path(), "--kube-version", KUBE_VERSION];
        for s in sets {
            args.extend(["--set", s]);
        }
        let lint = helm(&args);
        assert!(lint.ok, "helm lint --strict {sets:?}:\n{}{}", lint.stdout, lint.stderr);
    }

    let ns = TestNamespace::new("chart-dry-run");
    let ns = ns.name.as_str();
    let defaults = template("dry", ns, &[]);
    assert!(defaults.ok, "{}", defaults.stderr);
    let rendered = docs(&defaults.stdout);
    assert_restricted(&rendered);
    let kinds: Vec<&str> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "Deployment",
        "DaemonSet",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
        "ClusterRole",
        "Role",
        "ValidatingAdmissionPolicy",
        "KmsKey",
        "Secret",
        "ConfigMap",
    ] {
        assert!(kinds.contains(&kind), "no {kind} in the default rendering: {kinds:?}");
    }
    assert!(
        !kinds.contains(&"NetworkPolicy") && !kinds.contains(&"ServiceMonitor"),
        "optional objects are off by default"
    );
    let dry = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&defaults.stdout));
    assert!(dry.ok, "the API server refused the default rendering:\n{}", dry.stderr);
    // The guards against deleting key material outlive the release; nothing else does.
    let kept: Vec<String> = rendered
        .iter()
        .filter(|d| d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep")
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let mut expected: Vec<String> =
        ["kmskey-deletion", "kmskeymaterial-protection", "kmskeymaterials-crd-deletion"]
            .iter()
            .flat_map(|p| {
                [
                    format!("ValidatingAdmissionPolicy/dry-{p}"),
                    format!("ValidatingAdmissionPolicyBinding/dry-{p}"),
                ]
            })
            .collect();
    expected.push("KmsKey/cluster-secrets".to_owned());
    let mut kept_sorted = kept.clone();
    kept_sorted.sort();
    expected.sort();
    assert_eq!(kept_sorted, expected, "what helm uninstall keeps");

    kubectl_ok(
        &["apply", "-f", concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/tests/fixtures/servicemonitor-crd.yaml")],
        None,
    );
    kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "--timeout=30s",
        ],
        None,
    );
    let other = template(
        "dry-other",
        ns,
        &[
            "server.tls.secretName=tls",
            "rootKey.source=secret",
            "rootKey.secretName=kubekms-root-key",
            "controller.replicas=3",
            &format!("plugin.key={ns}/etcd-secrets"),
            "networkPolicy.enabled=true",
            "metrics.serviceMonitor.enabled=true",
        ],
    );
    assert!(other.ok, "{}", other.stderr);
    let rendered = docs(&other.stdout);
    assert_restricted(&rendered);
    let kinds: Vec<&str> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(kinds.contains(&"NetworkPolicy") && kinds.contains(&"ServiceMonitor"));
    let controller = rendered
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "dry-other-controller")
        .unwrap();
    assert_eq!(controller["spec"]["replicas"], 3);
    let pod = &controller["spec"]["template"]["spec"];
    assert_eq!(
        pod["initContainers"][0]["args"][1], "copy",
        "a root key in a Secret is copied to a private file"
    );
    let dry = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&other.stdout));
    assert!(dry.ok, "the API server refused the non-default rendering:\n{}", dry.stderr);

    // The static-pod path: no DaemonSet, but the cluster key and the plugin's identity.
    let static_pod = template("dry-static", ns, &["server.tls.secretName=tls", "plugin.enabled=false"]);
    assert!(static_pod.ok, "{}", static_pod.stderr);
    let rendered = docs(&static_pod.stdout);
    assert!(!rendered.iter().any(|d| d["kind"] == "DaemonSet"), "plugin.enabled=false renders no DaemonSet");
    assert!(
        rendered.iter().any(|d| d["kind"] == "KmsKey" && d["metadata"]["name"] == "cluster-secrets"),
        "the cluster key is created for the static pod too"
    );
    assert!(
        rendered
            .iter()
            .any(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == "dry-static-plugin"),
        "the static pod authenticates as the plugin's ServiceAccount"
    );
}

#[tokio::test]
async fn bad_values_are_refused_by_the_schema() {
    for (sets, expected) in [
        (vec!["controller.replicas=0"], "/controller/replicas"),
        (vec!["rootKey.source=vault"], "/rootKey/source"),
        (vec!["plugin.key=no-slash"], "/plugin/key"),
        (vec!["server.tokenCacheTTL=forever"], "/server/tokenCacheTTL"),
        (vec!["runAsUser=0"], "/runAsUser"),
        (vec!["controler.replicas=2"], "additional properties 'controler' not allowed"),
        (vec!["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (vec!["rootKey.source=secret"], "secretName"),
        (vec!["server.tls.certManager.issuerRef.kind=Certificate"], "/server/tls/certManager/issuerRef/kind"),
        (vec!["server.tls.days=0"], "/server/tls/days"),
        (vec!["server.preStopSeconds=0"], "/server/preStopSeconds"),
        (vec!["plugin.auditLog.maxSize=1G"], "/plugin/auditLog/maxSize"),
        (vec!["plugin.auditLog.maxFiles=-1"], "/plugin/auditLog/maxFiles"),
    ] {
        let all = sets;
        let run = template("bad", "kubekms-system", &all);
        assert!(!run.ok, "accepted {all:?}");
        assert!(run.stderr.contains(expected), "{all:?}: expected {expected:?} in\n{}", run.stderr);
    }
}

/// The values of a root key in a SoftHSM2 token, as the README shows them.
const PKCS11: &[&str] = &[
    "server.tls.secretName=tls",
    "rootKey.provider=pkcs11",
    "rootKey.pkcs11.module=/opt/softhsm/lib/libsofthsm2.so",
    "rootKey.pkcs11.tokenLabel=kubekms",
    "rootKey.pkcs11.keyLabel=kubekms-root-1",
    "rootKey.pkcs11.pinSecret.name=kubekms-hsm-pin",
    "rootKey.pkcs11.env[0].name=SOFTHSM2_CONF",
    "rootKey.pkcs11.env[0].value=/opt/softhsm/softhsm2.conf",
    "rootKey.pkcs11.volumes[0].name=softhsm",
    "rootKey.pkcs11.volumes[0].hostPath.path=/opt/softhsm",
    "rootKey.pkcs11.volumes[0].hostPath.type=Directory",
    "rootKey.pkcs11.volumeMounts[0].name=softhsm",
    "rootKey.pkcs11.volumeMounts[0].mountPath=/opt/softhsm",
];

#[tokio::test]
async fn pkcs11_root_key_in_every_component() {
    let ns = TestNamespace::new("chart-pkcs11");
    let ns = ns.name.as_str();
    let run = template("hsm", ns, PKCS11);
    assert!(run.ok, "{}", run.stderr);
    let rendered = docs(&run.stdout);
    assert_restricted(&rendered);
    let mut seen = Vec::new();
    for d in rendered
        .iter()
        .filter(|d| ["Deployment", "DaemonSet"].contains(&d["kind"].as_str().unwrap_or_default()))
    {
        let pod = &d["spec"]["template"]["spec"];
        let name = d["metadata"]["name"].as_str().unwrap();
        let c = &pod["containers"][0];
        let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
        for flag in [
            "--pkcs11-module=/opt/softhsm/lib/libsofthsm2.so",
            "--pkcs11-token-label=kubekms",
            "--pkcs11-key-label=kubekms-root-1",
            "--pkcs11-pin-file=/run/kubekms-pin/pin",
        ] {
            assert!(args.contains(&flag), "{name}: no {flag} in {args:?}");
        }
        assert!(
            !args.iter().any(|a| {
                a.starts_with("--root-key-file")
                    || a.starts_with("--pkcs11-slot")
                    || a.starts_with("--pkcs11-previous-key-label")
            }),
            "{name}: {args:?}"
        );
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "SOFTHSM2_CONF" && e["value"] == "/opt/softhsm/softhsm2.conf"),
            "{name}: no SOFTHSM2_CONF in {}",
            c["env"]
        );
        let mounts = c["volumeMounts"].as_array().unwrap();
        assert!(
            mounts.iter().any(|m| m["name"] == "softhsm" && m["mountPath"] == "/opt/softhsm"),
            "{name}: {mounts:?}"
        );
        assert!(
            mounts.iter().any(|m| m["name"] == "pkcs11-pin-private"
                && m["mountPath"] == "/run/kubekms-pin"
                && m["readOnly"] == true),
            "{name}: {mounts:?}"
        );
        assert!(
            !mounts.iter().any(|m| m["name"] == "root-key" || m["name"] == "pkcs11-pin"),
            "{name}: {mounts:?}"
        );
        // The PIN reaches the container only through the init container's private copy.
        let init = pod["initContainers"].as_array().unwrap();
        assert_eq!(init.len(), 1, "{name}: {init:?}");
        assert_eq!(
            init[0]["args"],
            serde_json::json!([
                "root-key",
                "copy-pin",
                "--from",
                "/var/run/secrets/kubekms-pin/pin",
                "--out",
                "/run/kubekms-pin/pin"
            ])
        );
        let volumes = pod["volumes"].as_array().unwrap();
        let pin = volumes.iter().find(|v| v["name"] == "pkcs11-pin").unwrap();
        assert_eq!(pin["secret"]["secretName"], "kubekms-hsm-pin");
        assert_eq!(pin["secret"]["items"], serde_json::json!([{"key": "pin", "path": "pin"}]));
        let private = volumes.iter().find(|v| v["name"] == "pkcs11-pin-private").unwrap();
        assert_eq!(private["emptyDir"]["medium"], "Memory");
        assert!(volumes.iter().any(|v| v["name"] == "softhsm" && v["hostPath"]["path"] == "/opt/softhsm"));
        assert!(!volumes.iter().any(|v| v["name"] == "root-key"), "{name}: no root key file");
        seen.push(name.to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["hsm-controller", "hsm-plugin", "hsm-server"]);
    let dry = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&run.stdout));
    assert!(dry.ok, "the API server refused the pkcs11 rendering:\n{}", dry.stderr);

    // The private copy really is what the token code accepts: mode 0400 from a 0440 Secret file.
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("pin");
    std::fs::write(&shared, "1234\n").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o440)).unwrap();
    let private = dir.path().join("private");
    let copy = Command::new(kubekms_bin())
        .args(["root-key", "copy-pin", "--from"])
        .arg(&shared)
        .arg("--out")
        .arg(&private)
        .output()
        .unwrap();
    assert!(copy.status.success(), "{}", String::from_utf8_lossy(&copy.stderr));
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o400);

    // A slot instead of a label.
    let mut slot: Vec<&str> =
        PKCS11.iter().copied().filter(|s| !s.starts_with("rootKey.pkcs11.tokenLabel")).collect();
    slot.push("rootKey.pkcs11.slot=0");
    let run = template("hsm", ns, &slot);
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stdout.contains("- --pkcs11-slot=0") && !run.stdout.contains("--pkcs11-token-label"));

    // During a root-key rotation inside the token: the old key's label, in every component
    // (controller, server and plugin), beside the new one.
    let mut rotating = PKCS11.to_vec();
    rotating.push("rootKey.pkcs11.previousKeyLabel=kubekms-root-0");
    let run = template("hsm", ns, &rotating);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(
        run.stdout.matches("- --pkcs11-previous-key-label=kubekms-root-0").count(),
        3,
        "{}",
        run.stdout
    );
    assert_eq!(run.stdout.matches("- --pkcs11-key-label=kubekms-root-1").count(), 3);

    // The default stays a root key file, without a trace of the token.
    let defaults = template("hsm", ns, &["server.tls.secretName=tls"]);
    assert!(defaults.ok, "{}", defaults.stderr);
    assert!(defaults.stdout.contains("- --root-key-file=/etc/kubekms/root.key"));
    assert!(
        !defaults.stdout.contains("--pkcs11") && !defaults.stdout.contains("kubekms-pin"),
        "the default rendering mentions the token"
    );
}

#[tokio::test]
async fn bad_pkcs11_values_are_refused() {
    let without =
        |prefix: &str| -> Vec<&str> { PKCS11.iter().copied().filter(|s| !s.starts_with(prefix)).collect() };
    let mut both = PKCS11.to_vec();
    both.push("rootKey.pkcs11.slot=1");
    let mut previous_file = PKCS11.to_vec();
    previous_file.push("rootKey.previous.hostPath=/etc/kubekms/old.key");
    let mut previous_same = PKCS11.to_vec();
    previous_same.push("rootKey.pkcs11.previousKeyLabel=kubekms-root-1");
    for (sets, expected) in [
        (
            without("rootKey.pkcs11.module"),
            "rootKey.pkcs11.module is required when rootKey.provider is pkcs11",
        ),
        (
            without("rootKey.pkcs11.keyLabel"),
            "rootKey.pkcs11.keyLabel is required when rootKey.provider is pkcs11",
        ),
        (
            without("rootKey.pkcs11.pinSecret"),
            "rootKey.pkcs11.pinSecret.name is required when rootKey.provider is pkcs11",
        ),
        (
            without("rootKey.pkcs11.tokenLabel"),
            "rootKey.pkcs11.tokenLabel or rootKey.pkcs11.slot is required",
        ),
        (both, "rootKey.pkcs11.tokenLabel and rootKey.pkcs11.slot are both set: give exactly one"),
        (
            previous_file,
            "with provider pkcs11, give the previous key in the token as rootKey.pkcs11.previousKeyLabel",
        ),
        (previous_same, "rootKey.pkcs11.previousKeyLabel is the same label as rootKey.pkcs11.keyLabel"),
        (vec!["rootKey.provider=vault"], "/rootKey/provider"),
        (vec!["rootKey.pkcs11.module=libsofthsm2.so"], "/rootKey/pkcs11/module"),
        (vec!["rootKey.pkcs11.slot=-1"], "/rootKey/pkcs11/slot"),
        (vec!["rootKey.pkcs11.tokenlabel=x"], "additional properties 'tokenlabel' not allowed"),
    ] {
        let run = template("bad", "kubekms-system", &sets);
        assert!(!run.ok, "accepted {sets:?}");
        assert!(run.stderr.contains(expected), "{sets:?}: expected {expected:?} in\n{}", run.stderr);
    }
}

#[tokio::test]
async fn install_upgrade_uninstall_and_least_privilege() {
    let ns = TestNamespace::new("chart");
    let ns = ns.name.as_str();
    let release = format!("rel-{}", &ns[ns.len() - 6..]);
    let pki = run_dir().join("pki");
    kubectl_ok(
        &[
            "create",
            "secret",
            "tls",
            "kubekms-tls",
            "-n",
            ns,
            &format!("--cert={}", pki.join("server.crt").display()),
            &format!("--key={}", pki.join("server.key").display()),
        ],
        None,
    );
    let key = format!("plugin.key={ns}/cluster-secrets");
    // The release's admission policies apply to the whole cluster: they trust the control
    // plane's own controller and server too, which keep serving the other tests.
    let kept = KeptPolicies(release.clone());
    let install = helm(&[
        "install",
        &release,
        chart_path(),
        "-n",
        ns,
        "--set",
        "server.tls.secretName=kubekms-tls",
        "--set",
        &key,
        "--set",
        "trustedIdentities.controllers[0]=system:serviceaccount:kubekms-system:kubekms-controller",
        "--set",
        "trustedIdentities.servers[0]=system:serviceaccount:kubekms-system:kubekms-server",
        "--set",
        "trustedIdentities.plugins[0]=system:serviceaccount:kubekms-system:kubekms-plugin",
    ]);
    assert!(install.ok, "helm install:\n{}{}", install.stdout, install.stderr);
    assert!(
        install.stdout.contains("EncryptionConfiguration"),
        "NOTES print the EncryptionConfiguration:\n{}",
        install.stdout
    );
    assert!(install.stdout.contains("unix:///var/run/kubekms/kms.sock"));

    let replicas = |name: &str| {
        kubectl_ok(&["get", "deployment", name, "-n", ns, "-o", "jsonpath={.spec.replicas}"], None)
    };
    assert_eq!(replicas(&format!("{release}-controller")), "2");
    assert_eq!(replicas(&format!("{release}-server")), "2");
    for object in [
        format!("daemonset/{release}-plugin"),
        format!("service/{release}-server"),
        format!("pdb/{release}-controller"),
        format!("pdb/{release}-server"),
        format!("serviceaccount/{release}-controller"),
        format!("serviceaccount/{release}-plugin"),
        format!("serviceaccount/{release}-server"),
        format!("role/{release}-controller-leader"),
        "kmskey/cluster-secrets".to_owned(),
    ] {
        kubectl_ok(&["get", &object, "-n", ns], None);
    }
    let ds = kubectl_ok(&["get", "daemonset", &format!("{release}-plugin"), "-n", ns, "-o", "json"], None);
    let ds: serde_json::Value = serde_json::from_str(&ds).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["node-role.kubernetes.io/control-plane"], "");
    assert_eq!(pod["tolerations"][0]["key"], "node-role.kubernetes.io/control-plane");
    let host_paths: Vec<&str> =
        pod["volumes"].as_array().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    assert_eq!(host_paths, ["/var/run/kubekms", "/var/lib/kubekms", "/etc/kubekms/root.key"]);

    // Least privilege, component by component.
    let sa = |c: &str| format!("system:serviceaccount:{ns}:{release}-{c}");
    let (controller, plugin, server) = (sa("controller"), sa("plugin"), sa("server"));
    for (who, verb, resource, where_, allowed) in [
        (&controller, "create", "kmskeymaterials", ns, true),
        (&controller, "patch", "kmskeys:status", "default", true),
        (&controller, "get", "secrets", ns, false),
        (&controller, "list", "secrets", "kube-system", false),
        (&controller, "delete", "kmskeys", ns, false),
        (&controller, "update", "kmskeys", ns, false),
        (&controller, "patch", "kmsgrants:status", "default", true),
        (&controller, "create", "leases", ns, true),
        (&controller, "create", "tokenreviews", ns, false),
        (&controller, "create", "subjectaccessreviews", ns, true),
        (&controller, "patch", &format!("clusterroles/{release}-plugin"), ns, true),
        (&controller, "patch", "clusterroles/cluster-admin", ns, false),
        (&controller, "create", "clusterroles", ns, false),
        (&controller, "get", "kmskeyusages", ns, true),
        (&controller, "delete", "kmskeyusages", ns, true),
        // The storage migration: it asks kube-controller-manager to rewrite Secrets, and
        // never reads them itself.
        (&controller, "create", "storageversionmigrations", ns, true),
        (&controller, "delete", "storageversionmigrations", ns, true),
        (&controller, "watch", "storageversionmigrations", ns, true),
        (&controller, "patch", "storageversionmigrations:status", ns, false),
        (&controller, "watch", "secrets", "kube-system", false),
        // The plugin's material role is empty until the controller names its key's material
        // (tested on the running control plane in plugin.rs).
        (&plugin, "get", "kmskeymaterials", ns, false),
        (&plugin, "list", "kmskeymaterials", ns, false),
        (&plugin, "create", "kmskeymaterials", ns, false),
        (&plugin, "get", "kmskeys/cluster-secrets", ns, true),
        (&plugin, "get", "kmskeys/other", ns, false),
        (&plugin, "list", "kmskeys", "default", false),
        (&plugin, "get", "secrets", ns, false),
        (&plugin, "update", "kmskeys", ns, false),
        (&plugin, "patch", "kmskeyusages", ns, false),
        (&plugin, "create", "kmskeyusages", ns, false),
        (&server, "create", "tokenreviews", ns, true),
        (&server, "create", "subjectaccessreviews", ns, true),
        (&server, "list", "kmsgrants", "default", true),
        (&server, "patch", "kmsgrants:status", "default", true),
        (&server, "create", "kmsgrants", "default", true),
        (&server, "delete", "kmsgrants", "default", false),
        (&server, "patch", "kmsgrants", "default", false),
        (&server, "create", "kmskeymaterials", ns, false),
        (&server, "update", "kmskeys", ns, false),
        (&server, "patch", "kmskeys:status", ns, false),
        (&server, "get", "secrets", ns, false),
        (&server, "encrypt", "kmskeys", ns, false),
        (&server, "patch", "kmskeyusages", ns, true),
        (&server, "create", "kmskeyusages", ns, true),
        (&server, "delete", "kmskeyusages", ns, false),
    ] {
        assert_eq!(can_i(where_, who, verb, resource), allowed, "{who} {verb} {resource} in {where_}");
    }

    // Upgrade with other values.
    let upgrade = helm(&[
        "upgrade",
        &release,
        chart_path(),
        "-n",
        ns,
        "--reuse-values",
        "--set",
        "controller.replicas=3",
        "--set",
        "networkPolicy.enabled=true",
    ]);
    assert!(upgrade.ok, "helm upgrade:\n{}{}", upgrade.stdout, upgrade.stderr);
    assert_eq!(replicas(&format!("{release}-controller")), "3");
    kubectl_ok(&["get", "networkpolicy", &format!("{release}-server"), "-n", ns], None);
    let history = helm(&["history", &release, "-n", ns]);
    assert!(history.stdout.contains("deployed") && history.stdout.lines().count() >= 3, "{}", history.stdout);

    // Uninstall removes the workloads but keeps the key (and so its material) and the
    // policies that guard its deletion: material stays undeletable without the chart.
    let uninstall = helm(&["uninstall", &release, "-n", ns]);
    assert!(uninstall.ok, "{}", uninstall.stderr);
    assert!(!kubectl(&["get", "deployment", &format!("{release}-controller"), "-n", ns], None).ok);
    kubectl_ok(&["get", "kmskey", "cluster-secrets", "-n", ns], None);
    for policy in kept.names() {
        for kind in ["validatingadmissionpolicy", "validatingadmissionpolicybinding"] {
            let run = kubectl(&["get", kind, &policy, "-o", "jsonpath={.metadata.name}"], None);
            assert!(run.ok, "helm uninstall removed {kind} {policy}:\n{}", run.stderr);
        }
    }
    for gone in [
        format!("{release}-kmsgrant-creation"),
        format!("{release}-status-writers"),
        format!("{release}-kmskeyusage-writers"),
    ] {
        assert!(
            !kubectl(&["get", "validatingadmissionpolicy", &gone], None).ok,
            "{gone} outlived the release"
        );
    }
    let uid =
        kubectl_ok(&["get", "kmskey", "cluster-secrets", "-n", ns, "-o", "jsonpath={.metadata.uid}"], None);
    let run = kubectl(&["delete", "kmskeymaterial", &uid, "--dry-run=server"], None);
    assert!(
        !run.ok && run.stderr.contains("destroyed only after its deletion waiting period"),
        "{}",
        run.stderr
    );
    let run = kubectl(&["delete", "crd", "kmskeymaterials.kms.kubekms.io", "--dry-run=server"], None);
    assert!(!run.ok && run.stderr.contains("kms.kubekms.io/confirm-deletion"), "{}", run.stderr);
}

/// The admission policies a release leaves behind on uninstall, deleted when the test ends:
/// they guard the whole cluster, and each test release would add another set.
struct KeptPolicies(String);

impl KeptPolicies {
    fn names(&self) -> Vec<String> {
        ["kmskey-deletion", "kmskeymaterial-protection", "kmskeymaterials-crd-deletion"]
            .iter()
            .map(|p| format!("{}-{p}", self.0))
            .collect()
    }
}

impl Drop for KeptPolicies {
    fn drop(&mut self) {
        for name in self.names() {
            let _ = kubectl(
                &[
                    "delete",
                    "validatingadmissionpolicybinding,validatingadmissionpolicy",
                    &name,
                    "--ignore-not-found",
                ],
                None,
            );
        }
    }
}

#[tokio::test]
async fn static_pod_manifest_is_valid() {
    let out = Command::new(kubekms_bin())
        .args(["manifests", "static-pod", "--key", "kube-system/cluster-secrets", "--only", "pod"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let pod = String::from_utf8(out.stdout).unwrap();
    // Admission looks up kube-system's default ServiceAccount for any pod that is not a
    // kubelet mirror pod; kube-controller-manager creates it.
    eventually(Duration::from_secs(60), "kube-system's default ServiceAccount", || async {
        kubectl(&["get", "serviceaccount", "default", "-n", "kube-system"], None).ok.then_some(())
    })
    .await;
    let dry = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&pod));
    assert!(dry.ok, "the API server refused the static pod:\n{}", dry.stderr);
    // The root key in a PKCS#11 token: the module, the PIN file and the token directory.
    let hsm = [
        "--pkcs11-module=/usr/lib/softhsm/libsofthsm2.so",
        "--pkcs11-token-label=kubekms",
        "--pkcs11-pin-file=/etc/kubekms/hsm.pin",
        "--pkcs11-key-label=kubekms-root-1",
        "--pkcs11-token-dir=/var/lib/softhsm/tokens",
    ];
    let out = Command::new(kubekms_bin())
        .args(["manifests", "static-pod", "--key", "kube-system/cluster-secrets", "--only", "pod"])
        .args(hsm)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pod = String::from_utf8(out.stdout).unwrap();
    assert!(
        pod.contains("--pkcs11-pin-file=/etc/kubekms/pkcs11.pin") && !pod.contains("root-key-file"),
        "{pod}"
    );
    let dry = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&pod));
    assert!(dry.ok, "the API server refused the PKCS#11 static pod:\n{}", dry.stderr);
    let no_pin = Command::new(kubekms_bin())
        .args(["manifests", "static-pod", "--key", "kube-system/x"])
        .args(hsm.iter().filter(|a| !a.starts_with("--pkcs11-pin-file")))
        .output()
        .unwrap();
    assert_eq!(no_pin.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_pin.stderr).contains("--pkcs11-module needs --pkcs11-pin-file"));
    let bad = Command::new(kubekms_bin())
        .args(["manifests", "static-pod", "--key", "kube-system/x", "--state-dir", "relative"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--state-dir must be an absolute path"));
}
