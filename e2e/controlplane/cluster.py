"""One control plane on 127.0.0.1 — etcd, kube-apiserver and the kubekms components — in a
run directory and on ports of its own. `make up` (controlplane/__main__.py) and the benchmark
(bench/cluster.py) both start theirs with `ControlPlane`: each component is one method that
starts its process and returns it once it is ready, and a new component (kube-scheduler, a
kubelet) is one more such method, with its certificate in pki.certificates and its port in
Ports."""

from __future__ import annotations

import json
import os
import secrets
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable

from controlplane.pki import make_pki, write_kubeconfig, write_private
from controlplane.procs import Failure, Process, log, process, run, wait_until

ROOT = Path(__file__).resolve().parents[2]  # the checkout: crds/, charts/
TOOLS = ROOT / "e2e" / ".bin"  # etcd, etcdctl, kube-apiserver, helm (e2e/tools/build.sh)

KUBEKMS_NAMESPACE = "kubekms-system"
# KUBEKMS_ROOT_KEY=pkcs11: the SoftHSM2 module (Debian package softhsm2), its token and key.
SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SOFTHSM_TOKEN = "kubekms"
SOFTHSM_KEY = "kubekms-root-1"
CLUSTER_KEY = ("kube-system", "cluster-secrets")  # the KmsKey the kubekms plugin uses


def port(env: str, default: int, count: int = 1) -> int:
    """The first of `count` consecutive ports, from the environment variable `env`."""
    value = os.environ.get(env, str(default))
    if not value.isdigit() or not 0 < int(value) <= 65536 - count:
        raise Failure(f"{env}={value!r} is not a port number (it and the next {count - 1} ports)"
                      if count > 1 else f"{env}={value!r} is not a port number")
    return int(value)


@dataclass(frozen=True)
class Ports:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_metrics: int
    plugin_metrics: int
    server: int
    server_metrics: int
    # kube-controller-manager's secure port (health checks only); 0 where none runs.
    controller_manager: int = 0
    # The key API server's AWS KMS API and STS port; 0 where it is not served.
    aws: int = 0


# The region the local control plane's AWS API serves (key ARNs carry it).
AWS_REGION = "kubekms-local"


# The local control plane records key use per second rather than per day, so tests whose
# controller runs with one-second days (deletion refused for a recent decryption, a use
# while pending postponing destruction) see it at the same scale.
USAGE_GRANULARITY = os.environ.get("KUBEKMS_USAGE_GRANULARITY_SECONDS", "1")
# The most grants a key may have on these control planes' key API servers (kubekms's
# default is 1,000): small, so that e2e/tests/aws.rs reaches the bound in seconds.
SERVER_MAX_GRANTS_PER_KEY = 100

def socket_path(run_dir: Path, name: str) -> Path:
    """run_dir/name, or, where that is longer than a unix socket path may be (107 bytes),
    a short private directory under $TMPDIR named after run_dir."""
    path = run_dir / name
    if len(str(path)) <= 100:
        return path
    short = Path(os.environ.get("TMPDIR", "/tmp")) / f"kubekms-{sha256(str(run_dir).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / name


# The kube-controller-manager controllers `make up` runs. The storage version migrator
# (StorageVersionMigration, GA in 1.37) rewrites every object of a resource, which is how
# kubekms moves stored Secrets to a new key version after a rotation; it finds the objects
# through the garbage collector's monitors, so it needs the garbage collector.
CONTROLLER_MANAGER_CONTROLLERS = ",".join([
    "serviceaccount-controller", "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    "namespace-controller", "garbage-collector-controller", "storage-version-migrator-controller",
])


def https_ok(url: str) -> bool:
    """Whether an HTTPS GET of url answers 200, whatever certificate serves it (a
    component's self-signed health endpoint on 127.0.0.1)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def http_ok(url: str) -> bool:
    """Whether a plain-HTTP GET of url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def kms_provider(name: str, socket: Path) -> str:
    """An EncryptionConfiguration provider entry for the KMS v2 plugin on `socket`."""
    return (f"  - kms:\n      apiVersion: v2\n      name: {name}\n      endpoint: unix://{socket}\n"
            "      timeout: 3s\n")


IDENTITY = "  - identity: {}\n"


def write_encryption_config(path: Path, *providers: str) -> Path:
    """An EncryptionConfiguration for Secrets: the first provider writes, all of them read."""
    path.write_text("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
                    "- resources: [secrets]\n  providers:\n" + "".join(providers))
    return path


class ControlPlane:
    """A control plane named `name` (its CA, kubeconfigs and etcd members carry the name)
    with its state in `run_dir`, its processes in run_dir/pids and run_dir/logs."""

    def __init__(self, name: str, run_dir: Path, ports: Ports, kubekms: Path, host: str = "127.0.0.1"):
        self.name = name
        self.run_dir = run_dir
        self.ports = ports
        self.kubekms = kubekms
        self.host = host  # the address kube-apiserver listens on and advertises
        self.pki = run_dir / "pki"
        self.server = f"https://{host}:{ports.apiserver}"
        self.kubeconfig = run_dir / "kubeconfig"  # the admin's (system:masters)
        self.root_key = run_dir / "root.key"
        # KUBEKMS_ROOT_KEY=pkcs11: the root key in a SoftHSM2 token of the run directory,
        # chosen when the run directory is first prepared and kept with it.
        self.root_key_mode = os.environ.get("KUBEKMS_ROOT_KEY", "file")
        if self.root_key_mode not in ("file", "pkcs11"):
            raise Failure(f"KUBEKMS_ROOT_KEY={self.root_key_mode!r}: file or pkcs11")
        if (run_dir / "root-key.args").exists():
            self.root_key_mode = "pkcs11" if "--pkcs11-module" in (run_dir / "root-key.args").read_text() else "file"
        self.softhsm = run_dir / "softhsm"
        if self.root_key_mode == "pkcs11":
            os.environ["SOFTHSM2_CONF"] = str(self.softhsm / "softhsm2.conf")
        self._tls: ssl.SSLContext | None = None

    # --- files ---------------------------------------------------------------------------

    def prepare(self, apiserver_ips: tuple[str, ...] = ()) -> None:
        """The PKI (what is missing of it), the admin's kubeconfig and the root key."""
        make_pki(self.pki, self.name, (self.host, *apiserver_ips) if self.host != "127.0.0.1" else apiserver_ips)
        self.write_kubeconfig(self.kubeconfig, "admin", {"client-certificate": str(self.pki / "admin.crt"),
                                                         "client-key": str(self.pki / "admin.key")})
        args = self.run_dir / "root-key.args"
        if self.root_key_mode == "pkcs11":
            self.prepare_softhsm()
        elif not self.root_key.exists():
            run([self.kubekms, "root-key", "create", "--out", self.root_key], "kubekms root-key create")
        args.write_text("".join(f"{a}\n" for a in self.root_key_args()))

    def root_key_args(self) -> list[str]:
        """The flags that give a kubekms component the root key (also in run_dir/root-key.args,
        one a line, for the tests)."""
        if self.root_key_mode == "pkcs11":
            return ["--pkcs11-module", str(SOFTHSM_MODULE), "--pkcs11-token-label", SOFTHSM_TOKEN,
                    "--pkcs11-pin-file", str(self.softhsm / "pin"), "--pkcs11-key-label", SOFTHSM_KEY]
        return ["--root-key-file", str(self.root_key)]

    @staticmethod
    def audit_rotation_args() -> list[str]:
        """How the components' audit log files rotate: at $KUBEKMS_AUDIT_LOG_MAX_SIZE when set
        (the chaos test rotates small, so that kills land in the middle of rotations), every
        rotated file kept so that the whole series verifies; otherwise kubekms's defaults."""
        size = os.environ.get("KUBEKMS_AUDIT_LOG_MAX_SIZE")
        return ["--audit-log-max-size", size, "--audit-log-max-files", "0"] if size else []

    def prepare_softhsm(self) -> None:
        """A SoftHSM2 token in run_dir/softhsm (its config in softhsm2.conf, which
        SOFTHSM2_CONF names for every process started here) with the root key generated
        inside it by `kubekms root-key create --pkcs11-…`."""
        conf = self.softhsm / "softhsm2.conf"
        if (self.softhsm / "created").exists():
            return
        if not SOFTHSM_MODULE.exists():
            raise Failure(f"{SOFTHSM_MODULE} is missing: install the Debian package softhsm2")
        tokens = self.softhsm / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
        pin = secrets.token_hex(8)
        run(["softhsm2-util", "--init-token", "--free", "--label", SOFTHSM_TOKEN,
             "--so-pin", secrets.token_hex(8), "--pin", pin], "softhsm2-util --init-token")
        write_private(self.softhsm / "pin", f"{pin}\n".encode())
        run([self.kubekms, "root-key", "create", *self.root_key_args()], "kubekms root-key create --pkcs11-…")
        (self.softhsm / "created").write_text("")

    def write_kubeconfig(self, path: Path, user: str, credentials: dict[str, str]) -> None:
        write_kubeconfig(path, self.name, self.server, self.pki / "ca.crt", user, credentials)

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """run_dir/NAME.kubeconfig, authenticating as the ServiceAccount with a token from
        the TokenRequest API."""
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", "720h").strip()
        path = self.run_dir / f"{name}.kubeconfig"
        self.write_kubeconfig(path, name, {"token": token})
        return path

    # --- processes -----------------------------------------------------------------------

    def process(self, name: str) -> Process:
        """The process `name` of this run directory, started here or recorded earlier."""
        return process(name, self.run_dir)

    def start(self, name: str, argv: list, ready: Callable[[], bool], what: str, timeout: float = 60,
              interval: float = 0.1, runs: str | None = None) -> Process:
        """Starts `argv` as `name` and returns once `ready()` holds; fails, with its log, if
        it exits first or `timeout` passes. `runs`: the executable argv[0] execs, if any."""
        proc = self.process(name).start(argv, runs=runs)
        wait_until(timeout, what, ready, proc, interval)
        return proc

    # --- components ----------------------------------------------------------------------

    def start_etcd(self, name: str = "etcd", port: int | None = None, peer_port: int | None = None) -> Process:
        """A one-member etcd with its data in run_dir/NAME, on the ports of `self.ports`
        unless others are given."""
        port, peer_port = port or self.ports.etcd, peer_port or self.ports.etcd_peer
        url, peer = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        return self.start(name, [
            TOOLS / "etcd", "--name", self.name, "--data-dir", self.run_dir / name,
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}", "--listen-metrics-urls", "",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], lambda: self.etcdctl(port, "endpoint", "health") is not None, f"{name} to become healthy")

    def etcdctl(self, port: int, *args: str) -> bytes:
        """etcdctl on the etcd at `port`; returns its output, as bytes (values are binary)."""
        # etcdctl refuses --endpoints beside ETCDCTL_ENDPOINTS, which e2e/.run/env exports.
        env = {k: v for k, v in os.environ.items() if k != "ETCDCTL_ENDPOINTS"}
        done = subprocess.run([str(TOOLS / "etcdctl"), "--endpoints", f"http://127.0.0.1:{port}", *args],
                              capture_output=True, timeout=60, env=env)
        if done.returncode != 0:
            raise Failure(f"etcdctl {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def start_apiserver(self, encryption_config: Path, *flags: str, readyz: str = "/readyz",
                        authorization: str = "RBAC") -> Process:
        """kube-apiserver on the etcd of `self.ports`, with RBAC, client certificates, a
        service-account issuer and `encryption_config` for Secrets; `flags` are added.
        Returns once `readyz` answers ok; the process's `started` says when it began."""
        pki = self.pki
        return self.start("kube-apiserver", [
            TOOLS / "kube-apiserver",
            "--etcd-servers", f"http://127.0.0.1:{self.ports.etcd}",
            "--bind-address", self.host, "--advertise-address", self.host,
            # A loopback address cannot be the `kubernetes` Service's endpoint.
            "--endpoint-reconciler-type", "none" if self.host == "127.0.0.1" else "lease",
            "--secure-port", self.ports.apiserver,
            "--tls-cert-file", pki / "apiserver.crt", "--tls-private-key-file", pki / "apiserver.key",
            "--client-ca-file", pki / "ca.crt", "--authorization-mode", authorization,
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", pki / "sa.pub", "--service-account-signing-key-file", pki / "sa.key",
            "--service-cluster-ip-range", "10.96.0.0/16", "--cert-dir", self.run_dir / "apiserver-certs",
            "--encryption-provider-config", encryption_config,
            # Without it, SIGTERM leaves kube-apiserver waiting up to a minute in
            # http.Server.Shutdown for the open watch connections (the plugin's, say) to close.
            "--shutdown-watch-termination-grace-period=2s",
            "--profiling=false", "--v=1", *flags,
        ], lambda: self.api_get(readyz)[0] == 200, f"kube-apiserver {readyz}", timeout=180, interval=0.05)

    def start_controller_manager(self, controllers: str = CONTROLLER_MANAGER_CONTROLLERS) -> Process:
        """kube-controller-manager with the controllers the tests need: ServiceAccounts and
        their tokens, the root CA ConfigMap, namespaces (so that a deleted namespace goes
        away), the garbage collector and the storage version migrator; leader election off. Returns once /healthz is ok."""
        pki = self.pki
        kubeconfig = self.run_dir / "kube-controller-manager.kubeconfig"
        self.write_kubeconfig(kubeconfig, "system:kube-controller-manager",
                              {"client-certificate": str(pki / "kube-controller-manager.crt"),
                               "client-key": str(pki / "kube-controller-manager.key")})
        port = self.ports.controller_manager
        return self.start("kube-controller-manager", [
            TOOLS / "kube-controller-manager", "--kubeconfig", kubeconfig,
            "--authentication-kubeconfig", kubeconfig, "--authorization-kubeconfig", kubeconfig,
            "--bind-address", "127.0.0.1", "--secure-port", port, "--cert-dir", self.run_dir / "controller-manager-certs",
            "--leader-elect=false", "--controllers", controllers,
            # Each controller as its own ServiceAccount, with the bootstrap RBAC role that names
            # it (system:kube-controller-manager itself may do little); no front proxy here.
            "--use-service-account-credentials=true", "--authentication-skip-lookup=true",
            "--root-ca-file", pki / "ca.crt", "--service-account-private-key-file", pki / "sa.key",
            "--profiling=false", "--v=1",
        ], lambda: https_ok(f"https://127.0.0.1:{port}/healthz"), "kube-controller-manager /healthz", timeout=120)

    def start_controller(self, name: str, kubeconfig: Path, selector: str,
                         plugin_key: tuple[str, str] | None = None) -> Process:
        """`kubekms controller` for the KmsKeys that match `selector`, leader-elected as in
        the chart's Deployment, its audit trail in NAME/audit.log of the run directory. With
        `plugin_key` it lets the plugin read that key's material, as the chart's controller
        does."""
        plugin_args = ["--plugin-key", "/".join(plugin_key), "--plugin-material-role", "kubekms-plugin"] \
            if plugin_key else []
        metrics = f"127.0.0.1:{self.ports.controller_metrics}"
        audit_log = self.run_dir / name / "audit.log"
        audit_log.parent.mkdir(parents=True, exist_ok=True)
        return self.start(name, [
            self.kubekms, "controller", "--kubeconfig", kubeconfig, *self.root_key_args(),
            "--audit-log", audit_log, *self.audit_rotation_args(),
            "--metrics-addr", metrics, "--leader-election-namespace", KUBEKMS_NAMESPACE,
            "--selector", selector, *plugin_args,
        ], lambda: http_ok(f"http://{metrics}/readyz"), f"{name}'s /readyz")

    def start_plugin(self, name: str, kubeconfig: Path, socket: Path, state_dir: Path) -> Process:
        """`kubekms plugin` for the cluster key on `socket`, its key cache and audit log in
        `state_dir`; returns once it listens (it serves once it has the key)."""
        return self.start(name, [
            self.kubekms, "plugin", "--kubeconfig", kubeconfig, "--key", "/".join(CLUSTER_KEY),
            "--socket", socket, *self.root_key_args(), "--state-dir", state_dir, *self.audit_rotation_args(),
            "--metrics-addr", f"127.0.0.1:{self.ports.plugin_metrics}",
            "--usage-granularity-seconds", USAGE_GRANULARITY,
        ], socket.is_socket, f"{name}'s socket")

    def start_server(self, name: str, kubeconfig: Path, audit_log: Path) -> Process:
        """`kubekms server`, the key API, with the PKI's server certificate."""
        audit_log.parent.mkdir(parents=True, exist_ok=True)
        return self.start(name, [
            self.kubekms, "server", "--kubeconfig", kubeconfig, "--listen", f"127.0.0.1:{self.ports.server}",
            "--tls-cert", self.pki / "server.crt", "--tls-key", self.pki / "server.key",
            *self.root_key_args(), "--audit-log", audit_log, *self.audit_rotation_args(),
            "--metrics-addr", f"127.0.0.1:{self.ports.server_metrics}",
            "--usage-granularity-seconds", USAGE_GRANULARITY,
            "--max-grants-per-key", str(SERVER_MAX_GRANTS_PER_KEY),
            *(["--aws-listen", f"127.0.0.1:{self.ports.aws}", "--aws-region", AWS_REGION] if self.ports.aws else []),
        ], lambda: http_ok(f"http://127.0.0.1:{self.ports.server_metrics}/readyz"), f"{name}'s /readyz")

    # --- the API -------------------------------------------------------------------------

    def api_get(self, path: str) -> tuple[int, bytes]:
        """GET as the admin; returns the status code and the body."""
        if self._tls is None:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._tls = ctx
        try:
            with urllib.request.urlopen(self.server + path, context=self._tls, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError) as e:
            raise Failure(f"GET {path}: {e}") from e

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return run(["kubectl", "--kubeconfig", self.kubeconfig, *args], f"kubectl {args[0]}", stdin=stdin)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=manifest)

    def create_namespace(self, name: str) -> None:
        self.apply(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")

    def install_kubekms(self, *templates: str) -> None:
        """The CRDs, and from the chart the RBAC of the controller, the plugin and the
        server, and `templates` (such as templates/deletion-protection.yaml)."""
        log("applying crds/ and kubekms's RBAC from charts/kubekms")
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        self.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                     "crd/kmskeys.kms.kubekms.io", "crd/kmsgrants.kms.kubekms.io", "crd/kmskeymaterials.kms.kubekms.io",
                     "crd/kmsaliases.kms.kubekms.io", "crd/kmskeyimports.kms.kubekms.io")
        self.create_namespace(KUBEKMS_NAMESPACE)
        version = run([TOOLS / "kube-apiserver", "--version"], "kube-apiserver --version").split()[-1]
        show = [arg for t in ("templates/controller-rbac.yaml", "templates/plugin-rbac.yaml",
                              "templates/server-rbac.yaml", *templates) for arg in ("--show-only", t)]
        self.apply(run([TOOLS / "helm", "template", "kubekms", ROOT / "charts" / "kubekms",
                        "--namespace", KUBEKMS_NAMESPACE, "--kube-version", version,
                        "--set", f"plugin.key={'/'.join(CLUSTER_KEY)}",
                        # Required by the chart's schema; only its Deployment (not rendered) uses it.
                        "--set", "server.tls.secretName=unused",
                        # The server serves the AWS API when it has a port for it.
                        "--set", f"server.aws.enabled={'true' if self.ports.aws else 'false'}", *show],
                       "helm template"))

    def ensure_key(self, namespace: str, name: str, description: str, labels: dict[str, str] | None = None) -> bool:
        """Creates the KmsKey unless it exists (an existing one is left as it is); returns
        whether it did."""
        try:
            self.kubectl("get", "kmskey", name, "-n", namespace)
            return False
        except Failure:
            pass
        label_map = ", ".join(f"{k}: {v}" for k, v in (labels or {}).items())
        self.apply(f"""\
apiVersion: kms.kubekms.io/v1alpha1
kind: KmsKey
metadata: {{name: {name}, namespace: {namespace}, labels: {{{label_map}}}}}
spec: {{description: {json.dumps(description)}}}
""")
        return True
