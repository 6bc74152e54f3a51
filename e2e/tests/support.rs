//! Shared helpers for the end-to-end tests: the local control plane written by
//! `make up` (e2e/.run), one namespace per test, kubectl as a user would run it, and
//! waiting on conditions with a timeout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The directory `make up` writes (kubeconfig, env, logs).
pub fn run_dir() -> PathBuf {
    std::env::var_os("KUBEKMS_E2E_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/.run"))
}

/// The admin kubeconfig of the local control plane.
pub fn kubeconfig_path() -> PathBuf {
    let path = run_dir().join("kubeconfig");
    assert!(
        path.exists(),
        "no local control plane: {} is missing; run `make up` (or `make test`) first",
        path.display()
    );
    path
}

/// A client for the local control plane, as the admin.
pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("load kubeconfig");
    Client::try_from(config).expect("build client")
}

/// What a kubectl run returned.
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            ok: o.status.success(),
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs kubectl against the local control plane, with `stdin` piped in.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Run {
    use std::io::Write;
    let mut cmd = Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig_path()).args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("run kubectl");
    if let (Some(mut pipe), Some(input)) = (child.stdin.take(), stdin) {
        pipe.write_all(input.as_bytes()).expect("write kubectl stdin");
    }
    child.wait_with_output().expect("wait for kubectl").into()
}

/// Runs kubectl and fails the test unless it succeeds; returns stdout.
pub fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let run = kubectl(args, stdin);
    assert!(run.ok, "kubectl {args:?} failed ({:?}):\n{}{}", run.code, run.stdout, run.stderr);
    run.stdout
}

/// A namespace of its own for one test. Deleted when the test passes; kept (and its
/// kubekms objects printed) when it fails, so the state can be inspected.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(prefix: &str) -> Self {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let name = format!("{prefix}-{suffix}");
        kubectl_ok(&["create", "namespace", &name], None);
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dump = kubectl(&["get", "kmskeys,kmsgrants", "-n", &self.name, "-o", "yaml"], None);
            eprintln!("--- state of namespace {} ---\n{}{}", self.name, dump.stdout, dump.stderr);
            let events = kubectl(&["get", "events", "-n", &self.name], None);
            eprintln!("--- events ---\n{}", events.stdout);
        } else {
            let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
        }
    }
}
