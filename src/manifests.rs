//! `kubekms manifests static-pod`: the KMS plugin as a static pod, for clusters whose API
//! server must never depend on a scheduled pod, with the matching EncryptionConfiguration.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, HostPathVolumeSource, Pod, PodSecurityContext,
    PodSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use crate::domain::NamespacedName;

/// What the static pod needs to know, checked by `StaticPod::new`.
#[derive(Debug, Clone)]
pub struct StaticPod {
    /// The KmsKey that encrypts Secrets.
    key: NamespacedName,
    image: String,
    paths: NodePaths,
    run_as_user: i64,
    metrics_port: i32,
}

/// Where the plugin's directories and files are on the control-plane node.
#[derive(Debug, Clone)]
pub struct NodePaths {
    /// The directory of the socket kube-apiserver connects to.
    pub socket_dir: String,
    /// The plugin's cache and audit log.
    pub state_dir: String,
    /// Where the root key is.
    pub root_key: NodeRootKey,
    /// The previous root key file, during a root-key rotation (whatever the primary is).
    pub previous_root_key_file: Option<String>,
    /// A kubeconfig for the plugin's identity (static pods have no ServiceAccount token).
    pub kubeconfig: String,
}

/// The root key on the control-plane node: a file, or a PKCS#11 token.
#[derive(Debug, Clone)]
pub enum NodeRootKey {
    /// The root key file, mounted read-only at /etc/kubekms/root.key.
    File(String),
    Pkcs11(NodePkcs11),
}

/// The root key in a PKCS#11 token, as the node sees it. The module (and its token
/// directory, for a software token) is mounted at the same path, so that a module
/// configured with absolute paths finds them; the PIN file at /etc/kubekms/pkcs11.pin.
#[derive(Debug, Clone)]
pub struct NodePkcs11 {
    pub module: String,
    /// The token's label, or its slot.
    pub token: Result<String, u64>,
    pub pin_file: String,
    pub key_label: String,
    /// A directory the module keeps its token in (SoftHSM's `directories.tokendir`),
    /// mounted writable; none for a hardware token reached through the module alone.
    pub token_dir: Option<String>,
    /// The label of the previous root key object in the same token, during a root-key
    /// rotation.
    pub previous_key_label: Option<String>,
}

const PIN_PATH: &str = "/etc/kubekms/pkcs11.pin";
const PREVIOUS_ROOT_KEY_PATH: &str = "/etc/kubekms/previous-root.key";

/// Why the static pod cannot be made. `StaticPod` is what `kubekms manifests static-pod`
/// prints, so the errors name that command's flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaticPodError {
    #[error("{flag} must be an absolute path on the node, got {path:?}")]
    NotAbsolute { flag: &'static str, path: String },
    #[error("--run-as-user must not be root (0) or negative, got {0}")]
    Privileged(i64),
    #[error("--metrics-port must be from 1024 to 65535, got {0}")]
    MetricsPort(i32),
    #[error("--pkcs11-key-label must not be empty")]
    KeyLabel,
}

fn host_path(name: &str, path: &str, kind: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        host_path: Some(HostPathVolumeSource { path: path.to_owned(), type_: Some(kind.to_owned()) }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            host: Some("127.0.0.1".into()),
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(6),
        ..Default::default()
    }
}

impl StaticPod {
    /// Checks what the pod needs: absolute paths (a static pod has no working directory),
    /// a user other than root, and an unprivileged port for the metrics.
    pub fn new(
        key: NamespacedName,
        image: String,
        mut paths: NodePaths,
        run_as_user: i64,
        metrics_port: i32,
    ) -> Result<StaticPod, StaticPodError> {
        let mut checked = vec![
            ("--socket-dir", &paths.socket_dir),
            ("--state-dir", &paths.state_dir),
            ("--kubeconfig", &paths.kubeconfig),
        ];
        match &paths.root_key {
            NodeRootKey::File(file) => checked.push(("--root-key-file", file)),
            NodeRootKey::Pkcs11(p) => {
                checked.extend([("--pkcs11-module", &p.module), ("--pkcs11-pin-file", &p.pin_file)]);
                checked.extend(p.token_dir.iter().map(|d| ("--pkcs11-token-dir", d)));
                if p.key_label.is_empty() {
                    return Err(StaticPodError::KeyLabel);
                }
            }
        }
        checked.extend(paths.previous_root_key_file.iter().map(|p| ("--previous-root-key-file", p)));
        for (flag, path) in checked {
            if !path.starts_with('/') {
                return Err(StaticPodError::NotAbsolute { flag, path: path.clone() });
            }
        }
        if run_as_user <= 0 {
            return Err(StaticPodError::Privileged(run_as_user));
        }
        if !(1024..=65535).contains(&metrics_port) {
            return Err(StaticPodError::MetricsPort(metrics_port));
        }
        paths.socket_dir = paths.socket_dir.trim_end_matches('/').to_owned();
        Ok(StaticPod { key, image, paths, run_as_user, metrics_port })
    }

    /// The Pod for /etc/kubernetes/manifests.
    pub fn pod(&self) -> Pod {
        let quantity = |s: &str| Quantity(s.to_owned());
        let mut args = vec![
            "plugin".to_owned(),
            format!("--key={}", self.key),
            "--socket=/var/run/kubekms/kms.sock".to_owned(),
        ];
        args.extend(self.root_key_args());
        args.extend([
            "--state-dir=/var/lib/kubekms".to_owned(),
            "--kubeconfig=/etc/kubekms/plugin.kubeconfig".to_owned(),
            format!("--metrics-addr=127.0.0.1:{}", self.metrics_port),
            "--log-json".to_owned(),
        ]);
        let (root_mounts, root_volumes) = self.root_key_volumes();
        Pod {
            metadata: ObjectMeta {
                name: Some("kubekms-plugin".into()),
                namespace: Some("kube-system".into()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/name".to_owned(), "kubekms".to_owned()),
                    ("app.kubernetes.io/component".to_owned(), "plugin".to_owned()),
                ])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                host_network: Some(true),
                automount_service_account_token: Some(false),
                priority_class_name: Some("system-node-critical".into()),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(self.run_as_user),
                    run_as_group: Some(self.run_as_user),
                    seccomp_profile: Some(SeccompProfile {
                        type_: "RuntimeDefault".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                containers: vec![Container {
                    name: "plugin".into(),
                    image: Some(self.image.clone()),
                    args: Some(args),
                    ports: Some(vec![ContainerPort {
                        name: Some("metrics".into()),
                        container_port: self.metrics_port,
                        host_ip: Some("127.0.0.1".into()),
                        ..Default::default()
                    }]),
                    liveness_probe: Some(probe("/healthz", self.metrics_port, 10)),
                    readiness_probe: Some(probe("/readyz", self.metrics_port, 5)),
                    security_context: Some(SecurityContext {
                        run_as_non_root: Some(true),
                        read_only_root_filesystem: Some(true),
                        allow_privilege_escalation: Some(false),
                        capabilities: Some(Capabilities {
                            drop: Some(vec!["ALL".into()]),
                            ..Default::default()
                        }),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    resources: Some(ResourceRequirements {
                        requests: Some(BTreeMap::from([
                            ("cpu".into(), quantity("50m")),
                            ("memory".into(), quantity("32Mi")),
                        ])),
                        limits: Some(BTreeMap::from([("memory".into(), quantity("128Mi"))])),
                        ..Default::default()
                    }),
                    volume_mounts: Some(
                        [
                            mount("socket", "/var/run/kubekms", false),
                            mount("state", "/var/lib/kubekms", false),
                            mount("kubeconfig", "/etc/kubekms/plugin.kubeconfig", true),
                        ]
                        .into_iter()
                        .chain(root_mounts)
                        .collect(),
                    ),
                    ..Default::default()
                }],
                volumes: Some(
                    [
                        host_path("socket", &self.paths.socket_dir, "Directory"),
                        host_path("state", &self.paths.state_dir, "Directory"),
                        host_path("kubeconfig", &self.paths.kubeconfig, "File"),
                    ]
                    .into_iter()
                    .chain(root_volumes)
                    .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The plugin's flags that say where the root key is, as the pod sees it.
    fn root_key_args(&self) -> Vec<String> {
        let mut args = match &self.paths.root_key {
            NodeRootKey::File(_) => vec!["--root-key-file=/etc/kubekms/root.key".to_owned()],
            NodeRootKey::Pkcs11(p) => {
                let mut args = vec![
                    format!("--pkcs11-module={}", p.module),
                    match &p.token {
                        Ok(label) => format!("--pkcs11-token-label={label}"),
                        Err(slot) => format!("--pkcs11-slot={slot}"),
                    },
                    format!("--pkcs11-pin-file={PIN_PATH}"),
                    format!("--pkcs11-key-label={}", p.key_label),
                ];
                args.extend(p.previous_key_label.iter().map(|l| format!("--pkcs11-previous-key-label={l}")));
                args
            }
        };
        if self.paths.previous_root_key_file.is_some() {
            args.push(format!("--previous-root-key-file={PREVIOUS_ROOT_KEY_PATH}"));
        }
        args
    }

    /// The mounts and host paths of the root key: its file, or the module, the PIN file
    /// and the token directory.
    fn root_key_volumes(&self) -> (Vec<VolumeMount>, Vec<Volume>) {
        let (mut mounts, mut volumes) = match &self.paths.root_key {
            NodeRootKey::File(file) => (
                vec![mount("root-key", "/etc/kubekms/root.key", true)],
                vec![host_path("root-key", file, "File")],
            ),
            NodeRootKey::Pkcs11(p) => {
                let mut mounts =
                    vec![mount("pkcs11-module", &p.module, true), mount("pkcs11-pin", PIN_PATH, true)];
                let mut volumes = vec![
                    host_path("pkcs11-module", &p.module, "File"),
                    host_path("pkcs11-pin", &p.pin_file, "File"),
                ];
                if let Some(dir) = &p.token_dir {
                    mounts.push(mount("pkcs11-tokens", dir, false));
                    volumes.push(host_path("pkcs11-tokens", dir, "Directory"));
                }
                (mounts, volumes)
            }
        };
        if let Some(previous) = &self.paths.previous_root_key_file {
            mounts.push(mount("previous-root-key", PREVIOUS_ROOT_KEY_PATH, true));
            volumes.push(host_path("previous-root-key", previous, "File"));
        }
        (mounts, volumes)
    }

    /// The EncryptionConfiguration that sends Secrets through this plugin.
    pub fn encryption_config(&self) -> serde_json::Value {
        json!({
            "apiVersion": "apiserver.config.k8s.io/v1",
            "kind": "EncryptionConfiguration",
            "resources": [{
                "resources": ["secrets"],
                "providers": [
                    {"kms": {"apiVersion": "v2", "name": "kubekms", "endpoint": format!("unix://{}/kms.sock", self.paths.socket_dir), "timeout": "3s"}},
                    {"identity": {}},
                ],
            }],
        })
    }

    /// Both documents, with comments saying where each goes.
    pub fn render(&self, only: Option<Part>) -> Result<String, serde_saphyr::ser_error::Error> {
        let mut out = String::new();
        if only != Some(Part::EncryptionConfig) {
            out.push_str(
                "# Save as /etc/kubernetes/manifests/kubekms-plugin.yaml on every control-plane node.\n",
            );
            out.push_str(&serde_saphyr::to_string(&self.pod())?);
        }
        if only.is_none() {
            out.push_str("---\n");
        }
        if only != Some(Part::Pod) {
            out.push_str(
                "# Save as /etc/kubernetes/enc/encryption-config.yaml and start kube-apiserver with\n\
                 # --encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml\n\
                 # --encryption-provider-config-automatic-reload=true (and hostPath mounts of\n\
                 # /etc/kubernetes/enc and the socket directory).\n",
            );
            out.push_str(&serde_saphyr::to_string(&self.encryption_config())?);
        }
        Ok(out)
    }
}

/// One of the two documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Pod,
    EncryptionConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> NodePaths {
        NodePaths {
            socket_dir: "/var/run/kubekms".into(),
            state_dir: "/var/lib/kubekms".into(),
            root_key: NodeRootKey::File("/etc/kubekms/root.key".into()),
            previous_root_key_file: None,
            kubeconfig: "/etc/kubekms/plugin.kubeconfig".into(),
        }
    }

    fn hsm(token_dir: Option<&str>) -> NodePkcs11 {
        NodePkcs11 {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token: Ok("kubekms".into()),
            pin_file: "/etc/kubekms/hsm.pin".into(),
            key_label: "kubekms-root-1".into(),
            token_dir: token_dir.map(str::to_owned),
            previous_key_label: None,
        }
    }

    #[test]
    fn a_previous_root_key_is_mounted_and_given_to_the_plugin() {
        let plain = serde_json::to_string(&pod(paths(), 65532, 9465).unwrap().pod()).unwrap();
        assert!(!plain.contains("previous"), "none unless asked for");
        let previous = NodePaths { previous_root_key_file: Some("/etc/kubekms/old.key".into()), ..paths() };
        let spec = pod(previous, 65532, 9465).unwrap().pod().spec.unwrap();
        let args = spec.containers[0].args.clone().unwrap();
        assert!(
            args.contains(&"--previous-root-key-file=/etc/kubekms/previous-root.key".to_owned()),
            "{args:?}"
        );
        let volume = spec.volumes.unwrap().into_iter().find(|v| v.name == "previous-root-key").unwrap();
        assert_eq!(volume.host_path.unwrap().path, "/etc/kubekms/old.key");
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        assert!(mounts.iter().any(|m| m.name == "previous-root-key" && m.read_only == Some(true)));
        let relative = NodePaths { previous_root_key_file: Some("old.key".into()), ..paths() };
        assert_eq!(
            pod(relative, 65532, 9465).unwrap_err(),
            StaticPodError::NotAbsolute { flag: "--previous-root-key-file", path: "old.key".into() }
        );
        // In a token: the previous key's label, beside the primary's.
        let mut p = paths();
        p.root_key = NodeRootKey::Pkcs11(NodePkcs11 {
            previous_key_label: Some("kubekms-root-0".into()),
            ..hsm(None)
        });
        let args = pod(p, 65532, 9465).unwrap().pod().spec.unwrap().containers[0].args.clone().unwrap();
        assert!(args.contains(&"--pkcs11-previous-key-label=kubekms-root-0".to_owned()), "{args:?}");
        assert!(args.contains(&"--pkcs11-key-label=kubekms-root-1".to_owned()), "{args:?}");
    }

    #[test]
    fn a_root_key_in_a_token_is_reached_through_its_module_pin_and_token_dir() {
        let mut p = paths();
        p.root_key = NodeRootKey::Pkcs11(hsm(Some("/var/lib/softhsm/tokens")));
        let pod = pod(p, 65532, 9465).unwrap().pod();
        let spec = pod.spec.unwrap();
        let c = &spec.containers[0];
        let args = c.args.clone().unwrap();
        for want in [
            "--pkcs11-module=/usr/lib/softhsm/libsofthsm2.so",
            "--pkcs11-token-label=kubekms",
            "--pkcs11-pin-file=/etc/kubekms/pkcs11.pin",
            "--pkcs11-key-label=kubekms-root-1",
        ] {
            assert!(args.contains(&want.to_owned()), "{want} in {args:?}");
        }
        assert!(!args.iter().any(|a| a.starts_with("--root-key-file")));
        let mounts: Vec<_> = c
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.mount_path, m.read_only))
            .collect();
        assert!(mounts.contains(&(
            "pkcs11-module".into(),
            "/usr/lib/softhsm/libsofthsm2.so".into(),
            Some(true)
        )));
        assert!(mounts.contains(&("pkcs11-pin".into(), "/etc/kubekms/pkcs11.pin".into(), Some(true))));
        assert!(mounts.contains(&("pkcs11-tokens".into(), "/var/lib/softhsm/tokens".into(), Some(false))));
        let volumes: Vec<_> = spec
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| (v.name, v.host_path.map(|h| h.path).unwrap_or_default()))
            .collect();
        assert!(volumes.contains(&("pkcs11-pin".into(), "/etc/kubekms/hsm.pin".into())));
        assert!(!volumes.iter().any(|(n, _)| n == "root-key"));
        // A slot instead of a label, and no token directory (a hardware token).
        let mut p = paths();
        p.root_key = NodeRootKey::Pkcs11(NodePkcs11 { token: Err(3), ..hsm(None) });
        let pod = super::StaticPod::new(
            "kube-system/cluster-secrets".parse().unwrap(),
            "img".into(),
            p,
            65532,
            9465,
        )
        .unwrap()
        .pod();
        let c = &pod.spec.unwrap().containers[0];
        assert!(c.args.clone().unwrap().contains(&"--pkcs11-slot=3".to_owned()));
        assert!(!c.volume_mounts.clone().unwrap().iter().any(|m| m.name == "pkcs11-tokens"));
    }

    #[test]
    fn the_token_settings_are_checked() {
        let refused = |edit: fn(&mut NodePkcs11)| {
            let mut h = hsm(Some("/var/lib/softhsm/tokens"));
            edit(&mut h);
            let mut p = paths();
            p.root_key = NodeRootKey::Pkcs11(h);
            pod(p, 65532, 9465).unwrap_err()
        };
        let not_absolute = |flag, path: &str| StaticPodError::NotAbsolute { flag, path: path.into() };
        assert_eq!(
            refused(|h| h.module = "libsofthsm2.so".into()),
            not_absolute("--pkcs11-module", "libsofthsm2.so")
        );
        assert_eq!(refused(|h| h.pin_file = "pin".into()), not_absolute("--pkcs11-pin-file", "pin"));
        assert_eq!(refused(|h| h.token_dir = Some("t".into())), not_absolute("--pkcs11-token-dir", "t"));
        assert_eq!(refused(|h| h.key_label = String::new()), StaticPodError::KeyLabel);
    }

    fn pod(paths: NodePaths, run_as_user: i64, metrics_port: i32) -> Result<StaticPod, StaticPodError> {
        let key = "kube-system/cluster-secrets".parse().unwrap();
        StaticPod::new(key, "ghcr.io/kubekms/kubekms:0.1.0".into(), paths, run_as_user, metrics_port)
    }

    fn sample() -> StaticPod {
        pod(paths(), 65532, 9465).unwrap()
    }

    #[test]
    fn every_path_is_absolute() {
        let relative = |edit: fn(&mut NodePaths)| {
            let mut p = paths();
            edit(&mut p);
            pod(p, 65532, 9465).unwrap_err()
        };
        let not_absolute = |flag, path: &str| StaticPodError::NotAbsolute { flag, path: path.into() };
        assert_eq!(relative(|p| p.socket_dir = "run".into()), not_absolute("--socket-dir", "run"));
        assert_eq!(relative(|p| p.state_dir = "relative".into()), not_absolute("--state-dir", "relative"));
        assert_eq!(
            relative(|p| p.root_key = NodeRootKey::File("".into())),
            not_absolute("--root-key-file", "")
        );
        assert_eq!(relative(|p| p.kubeconfig = "./k".into()), not_absolute("--kubeconfig", "./k"));
        assert!(
            relative(|p| p.state_dir = "relative".into())
                .to_string()
                .starts_with("--state-dir must be an absolute path on the node")
        );
    }

    #[test]
    fn the_plugin_is_not_root_and_its_port_is_unprivileged() {
        for user in [0, -1] {
            assert_eq!(pod(paths(), user, 9465).unwrap_err(), StaticPodError::Privileged(user));
        }
        for port in [0, 80, 1023, 65536, -1] {
            assert_eq!(pod(paths(), 65532, port).unwrap_err(), StaticPodError::MetricsPort(port));
        }
        assert!(pod(paths(), 1, 1024).is_ok() && pod(paths(), 65532, 65535).is_ok());
    }

    #[test]
    fn a_trailing_slash_of_the_socket_dir_is_dropped() {
        let mut p = paths();
        p.socket_dir = "/var/run/kubekms//".into();
        let config = pod(p, 65532, 9465).unwrap().encryption_config();
        assert_eq!(
            config["resources"][0]["providers"][0]["kms"]["endpoint"],
            "unix:///var/run/kubekms/kms.sock"
        );
    }

    #[test]
    fn the_pod_and_the_encryption_config_agree_on_the_socket() {
        let yaml = sample().render(None).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(docs.len(), 2);
        let pod: Pod = serde_json::from_value(docs[0].clone()).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
        let c = &spec.containers[0];
        assert!(c.args.as_ref().unwrap().contains(&"--key=kube-system/cluster-secrets".to_owned()));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));
        assert_eq!(
            docs[1]["resources"][0]["providers"][0]["kms"]["endpoint"],
            "unix:///var/run/kubekms/kms.sock"
        );
        assert_eq!(docs[1]["resources"][0]["providers"][1], serde_json::json!({"identity": {}}));
        let only_pod = sample().render(Some(Part::Pod)).unwrap();
        assert!(!only_pod.contains("EncryptionConfiguration") && !only_pod.contains("---"));
        let only_config = sample().render(Some(Part::EncryptionConfig)).unwrap();
        assert!(only_config.contains("EncryptionConfiguration") && !only_config.contains("kind: Pod"));
    }
}
