//! Shared helpers for the end-to-end tests: the local control plane written by
//! `make up` (e2e/.run), one namespace per test, kubectl as a user would run it, and
//! waiting on conditions with a timeout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

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

/// Merge-patches a KmsKey with kubectl, as a user would; fails the test if kubectl does.
pub fn patch_key(ns: &str, name: &str, json: &str) {
    kubectl_ok(&["patch", "kmskey", name, "-n", ns, "--type", "merge", "-p", json], None);
}

/// `kubectl auth can-i`; `resource` is TYPE, TYPE/NAME, or TYPE:SUBRESOURCE.
pub fn can_i(ns: &str, who: &str, verb: &str, resource: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, "-n", ns, "--as", who];
    let sub;
    match resource.split_once(':') {
        Some((r, s)) => {
            sub = format!("--subresource={s}");
            args.extend([r, sub.as_str()]);
        }
        None => args.push(resource),
    }
    kubectl(&args, None).stdout.trim() == "yes"
}

/// A namespace of its own for one test. Deleted when the test passes; kept (and its
/// kubekms objects printed) when it fails, so the state can be inspected.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub fn new(prefix: &str) -> Self {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        TestNamespace::named(&format!("{prefix}-{suffix}"))
    }

    /// A namespace of exactly this name.
    pub fn named(name: &str) -> Self {
        kubectl_ok(&["create", "namespace", name], None);
        TestNamespace { name: name.to_owned() }
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

/// Polls `check` every 200 ms until it returns `Some`, or fails the test after `timeout`
/// with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The kubekms binary under test.
/// The flags that give a `kubekms` command the root key of `make up`, as its components
/// got them (run_dir/root-key.args: a file, or with KUBEKMS_ROOT_KEY=pkcs11 a SoftHSM2
/// token, which SOFTHSM2_CONF must name in the tests' environment, as e2e/test.sh does).
pub fn root_key_args() -> Vec<String> {
    let path = run_dir().join("root-key.args");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} cannot be read ({e}); run `make up` first", path.display()));
    let args: Vec<String> = text.lines().map(str::to_owned).collect();
    if args.iter().any(|a| a == "--pkcs11-module") {
        let conf = run_dir().join("softhsm/softhsm2.conf");
        assert_eq!(
            std::env::var_os("SOFTHSM2_CONF").map(PathBuf::from),
            Some(conf.clone()),
            "the control plane's root key is in SoftHSM2: export SOFTHSM2_CONF={}",
            conf.display()
        );
    }
    args
}

/// Whether `make up` keeps the root key in a PKCS#11 token (KUBEKMS_ROOT_KEY=pkcs11).
pub fn root_key_in_hsm() -> bool {
    root_key_args().iter().any(|a| a == "--pkcs11-module")
}

/// The root key of `make up`, opened in this process.
pub fn root_key() -> kubekms::crypto::RootKey {
    use kubekms::crypto::{Pkcs11Config, RootKey, RootKeySource, TokenSelector};
    let args = root_key_args();
    let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let source = match flag("--pkcs11-module") {
        None => RootKeySource::File(flag("--root-key-file").expect("--root-key-file").into()),
        Some(module) => RootKeySource::Pkcs11(Pkcs11Config {
            module: module.into(),
            token: TokenSelector::Label(flag("--pkcs11-token-label").expect("--pkcs11-token-label")),
            pin_file: flag("--pkcs11-pin-file").expect("--pkcs11-pin-file").into(),
            key_label: flag("--pkcs11-key-label").expect("--pkcs11-key-label"),
        }),
    };
    RootKey::open(&source).expect("open the control plane's root key")
}

pub fn kubekms_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kubekms")
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
/// A port on 127.0.0.1 for a process a test starts, from 35000-35999, which `make test`
/// reserves (e2e/lib.sh, `reserve_ports`): an ephemeral port, found free and handed on,
/// could be taken meanwhile as the source port of some outgoing connection (it was, once,
/// under load). Each test process takes its own hundred (by its pid), one after the other,
/// and skips any port found in use.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 35000 + (std::process::id() % 10) as u16 * 100;
    for _ in 0..100 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {base}-{}", base + 99)
}

/// A `kubekms controller` process of a test's own, managing only the KmsKeys labelled
/// `kms.kubekms.io/test-controller=<label>` (the shared controller of `make up` leaves
/// those alone). Killed when dropped; its log is kept in e2e/.run/logs.
pub struct TestController {
    child: std::process::Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

/// The label that hands a KmsKey to a test's own controllers.
pub const TEST_CONTROLLER_LABEL: &str = "kms.kubekms.io/test-controller";

impl TestController {
    /// Starts a controller for `label`, with `extra` arguments (day length, lease timing).
    pub fn start(label: &str, name: &str, extra: &[&str]) -> Self {
        // The chart lets the controller use only its own Lease; give this test's Lease the
        // same rights.
        let rbac = format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: test-{label}, namespace: kubekms-system}}\n\
             rules:\n- apiGroups: [coordination.k8s.io]\n  resources: [leases]\n  resourceNames: [test-{label}]\n  verbs: [get, update]\n\
             ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: test-{label}, namespace: kubekms-system}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: test-{label}}}\n\
             subjects:\n- {{kind: ServiceAccount, name: kubekms-controller, namespace: kubekms-system}}\n"
        );
        kubectl_ok(&["apply", "-f", "-"], Some(&rbac));
        let metrics_port = free_port();
        let log = run_dir().join("logs").join(format!("test-controller-{label}-{name}.log"));
        let out = std::fs::File::create(&log).expect("create controller log");
        let child = Command::new(kubekms_bin())
            .args([
                "controller",
                "--kubeconfig",
                run_dir().join("kubekms-controller.kubeconfig").to_str().unwrap(),
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
                "--leader-election-namespace",
                "kubekms-system",
                "--leader-election-name",
                &format!("test-{label}"),
                "--selector",
                &format!("{TEST_CONTROLLER_LABEL}={label}"),
            ])
            .args(root_key_args())
            .args(extra)
            // The tests that shorten the day say so, as the controller demands.
            .env("KUBEKMS_UNSAFE_TEST_CLOCK", "shorten-waiting-periods")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start kubekms controller");
        TestController { child, metrics_port, log }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for a graceful exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().ok().and_then(|s| s.code())
    }

    /// GET a path of the metrics endpoint; `None` while it is not listening.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.metrics_port, path).await
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- controller log {} ---", self.log.display());
            if let Ok(text) = std::fs::read_to_string(&self.log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
            }
        }
        self.kill();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1:`port`; `None` if nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// The reasons of the Events about `name` in `namespace`, oldest first.
pub async fn event_reasons(namespace: &str, name: &str) -> Vec<String> {
    use k8s_openapi::api::events::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(client().await, namespace);
    let mut list: Vec<Event> = events
        .list(&Default::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    list.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    list.into_iter().filter_map(|e| e.reason).collect()
}

/// A variable that `make up` exported in e2e/.run/env.
pub fn env_var(name: &str) -> String {
    let env = std::fs::read_to_string(run_dir().join("env")).expect("read e2e/.run/env");
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .map(|v| v.trim_matches('\'').to_owned())
        .unwrap_or_else(|| panic!("{name} is not in e2e/.run/env"))
}

/// The raw value etcd holds for `key`, read with etcdctl (not through the API server).
pub fn etcd_get(key: &str) -> Vec<u8> {
    etcd_get_at(&env_var("ETCDCTL_ENDPOINTS"), key)
}

/// [`etcd_get`] from the etcd at `endpoints`.
pub fn etcd_get_at(endpoints: &str, key: &str) -> Vec<u8> {
    let etcdctl = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/.bin/etcdctl");
    let out = Command::new(etcdctl)
        .args(["--endpoints", endpoints, "get", key, "--print-value-only"])
        .output()
        .expect("run etcdctl");
    assert!(out.status.success(), "etcdctl get {key}: {}", String::from_utf8_lossy(&out.stderr));
    let mut value = out.stdout;
    if value.last() == Some(&b'\n') {
        value.pop();
    }
    value
}

/// Runs e2e/up.sh or e2e/down.sh with component names, failing the test if it fails.
pub fn control_plane(script: &str, components: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e").join(script);
    let out = Command::new(path).args(components).output().expect("run control plane script");
    assert!(
        out.status.success(),
        "e2e/{script} {components:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
