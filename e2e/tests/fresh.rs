//! A control plane of a test's own, started by e2e/controlplane in a run directory and on
//! ports of its own (beside the one of `make up`), for tests that need a fresh cluster or
//! restart its components with other flags.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubekms::client::TokenSource;

use crate::support::kubekms_bin;

/// A control plane started by e2e/controlplane in a run directory of its own, its ports
/// from `port_env` (nine consecutive ports; `default_base` when unset).
pub struct Cluster {
    pub run_dir: PathBuf,
    pub port_env: &'static str,
    pub default_base: u16,
}

impl Cluster {
    pub fn env(&self, name: &str) -> String {
        let env = std::fs::read_to_string(self.run_dir.join("env")).expect("read the cluster's env");
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.trim_matches('\'').to_owned())
            .unwrap_or_else(|| panic!("{name} is not in {}/env", self.run_dir.display()))
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", self.run_dir.join("kubeconfig"))
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the kubekms CLI against this cluster, as its administrator.
    pub fn kubekms(&self, args: &[&str]) -> Output {
        self.kubekms_with(args, &[])
    }

    /// [`Cluster::kubekms`] with more environment variables.
    pub fn kubekms_with(&self, args: &[&str], vars: &[(&str, &std::ffi::OsStr)]) -> Output {
        Command::new(kubekms_bin())
            .args(args)
            .envs(vars.iter().copied())
            .env("KUBECONFIG", self.run_dir.join("kubeconfig"))
            .env("KUBEKMS_ROOT_KEY_FILE", self.run_dir.join("root.key"))
            .env("KUBEKMS_ADDR", self.env("KUBEKMS_ADDR"))
            .env("KUBEKMS_CA", self.env("KUBEKMS_CA"))
            .output()
            .expect("run kubekms")
    }

    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.run_dir.join("kubeconfig")).unwrap();
        let options = kube::config::KubeConfigOptions::default();
        kube::Client::try_from(kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.unwrap())
            .unwrap()
    }

    /// A key API client as ServiceAccount `ns/sa` of this cluster.
    pub async fn key_api(&self, ns: &str, sa: &str) -> kubekms::client::Client {
        let token =
            self.kubectl(&["create", "token", sa, "-n", ns, "--audience", "kubekms", "--duration", "10m"]);
        let source = TokenSource::Literal(zeroize::Zeroizing::new(token.trim().to_owned()));
        let ca = PathBuf::from(self.env("KUBEKMS_CA"));
        kubekms::client::connect(&self.env("KUBEKMS_ADDR"), Some(&ca), &source).await.expect("connect")
    }

    /// The first of the cluster's ports (etcd's).
    pub fn port_base(&self) -> u16 {
        std::env::var(self.port_env).ok().and_then(|p| p.parse().ok()).unwrap_or(self.default_base)
    }

    pub fn controlplane(&self, command: &[&str]) {
        self.controlplane_with(command, &[]);
    }

    /// [`Cluster::controlplane`] with more environment variables, which the components it
    /// starts inherit.
    pub fn controlplane_with(&self, command: &[&str], vars: &[(&str, &std::ffi::OsStr)]) {
        let base = self.port_base();
        let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e");
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "controlplane"])
            .args(command)
            .envs(vars.iter().copied())
            .env("PYTHONPATH", &e2e)
            .env("KUBEKMS_RUN_DIR", &self.run_dir);
        for (i, name) in [
            "ETCD_PORT",
            "ETCD_PEER_PORT",
            "APISERVER_PORT",
            "CONTROLLER_METRICS_PORT",
            "PLUGIN_METRICS_PORT",
            "SERVER_PORT",
            "SERVER_METRICS_PORT",
            "CONTROLLER_MANAGER_PORT",
            "AWS_PORT",
        ]
        .into_iter()
        .enumerate()
        {
            cmd.env(format!("KUBEKMS_{name}"), (base + i as u16).to_string());
        }
        let out = cmd.output().expect("run the control plane");
        assert!(out.status.success(), "controlplane {command:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A fresh cluster, with a copy of `root_key` when given (else a root key of its own).
/// Stopped when dropped; its state removed when the test passed.
pub struct Fresh(pub Cluster);

impl Fresh {
    /// Starts it on the ports and in the run directory (emptied first) of `cluster`.
    pub fn start(cluster: Cluster, root_key: Option<&Path>) -> Fresh {
        cluster.controlplane(&["down"]);
        let _ = std::fs::remove_dir_all(&cluster.run_dir);
        std::fs::create_dir_all(&cluster.run_dir).unwrap();
        if let Some(root_key) = root_key {
            let copy = cluster.run_dir.join("root.key");
            std::fs::copy(root_key, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let fresh = Fresh(cluster);
        fresh.0.controlplane(&["up", "--kubekms", kubekms_bin()]);
        fresh
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        self.0.controlplane(&["down"]);
        if std::thread::panicking() {
            eprintln!("the test cluster's logs are in {}/logs", self.0.run_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0.run_dir);
        }
    }
}

/// The run directory `$var`, or e2e/`default` when unset.
pub fn run_dir_from(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e").join(default))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
