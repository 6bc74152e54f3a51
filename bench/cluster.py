"""The benchmark's own control plane, apart from the one of `make up`: two etcds (one only
for Secrets, wiped between measurements), a kube-apiserver restarted with each encryption
provider, and the kubekms components and the Go reference plugin beside it. Everything
lives in one run directory and on ports of its own."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from controlplane.procs import Failure, Process, run, wait_until

# The encryption providers compared for Secrets, and how each marks a value in etcd.
PROVIDERS = ("identity", "aesgcm", "reference", "kubekms")
ETCD_PREFIX = {
    "identity": b"k8s\x00",  # plain protobuf
    "aesgcm": b"k8s:enc:aesgcm:v1:bench:",
    "reference": b"k8s:enc:kms:v2:reference:",
    "kubekms": b"k8s:enc:kms:v2:kubekms:",
}

KUBEKMS_NAMESPACE = "kubekms-system"
CLUSTER_KEY = ("kube-system", "cluster-secrets")  # the KmsKey the kubekms plugin uses
KEYAPI_KEY = ("bench-keyapi", "api-key")  # the KmsKey of the key API benchmark
KEYAPI_CALLER = ("bench-keyapi", "caller")  # the ServiceAccount that calls the key API
CONTROLLER_SA_NAMESPACE = "kubekms-bench-ctl"  # the audited controllers' ServiceAccounts
INFRA_LABEL = "bench.kubekms.io/role=infra"  # keys the setup controller manages


def _port(env: str, default: int, count: int = 1) -> int:
    """The first of `count` consecutive ports, from the environment variable `env`."""
    value = os.environ.get(env, str(default))
    if not value.isdigit() or not 0 < int(value) <= 65536 - count:
        raise Failure(f"{env}={value!r} is not a port number (it and the next {count - 1} ports)"
                      if count > 1 else f"{env}={value!r} is not a port number")
    return int(value)


@dataclass
class Layout:
    """Where everything is: the checkout, the run directory, the binaries, the ports.

    The default ports lie below Linux's ephemeral range (32768-60999), where an outgoing
    connection could otherwise hold one of them just when a component wants to listen."""

    root: Path
    run_dir: Path
    kubekms: Path

    def __post_init__(self) -> None:
        self.e2e_bin = self.root / "e2e" / ".bin"
        self.bench_bin = self.root / "bench" / ".bin"
        self.pki = self.run_dir / "pki"
        self.etcd_port = _port("KUBEKMS_BENCH_ETCD_PORT", 22379, 4)
        self.etcd_peer_port = self.etcd_port + 1
        self.secrets_etcd_port = self.etcd_port + 2
        self.secrets_etcd_peer_port = self.etcd_port + 3
        self.apiserver_port = _port("KUBEKMS_BENCH_APISERVER_PORT", 26443)
        self.server_port = _port("KUBEKMS_BENCH_SERVER_PORT", 28443)
        metrics = _port("KUBEKMS_BENCH_METRICS_PORT", 28080, 3)
        self.controller_metrics_port = metrics
        self.plugin_metrics_port = metrics + 1
        self.server_metrics_port = metrics + 2
        sockets = self.run_dir
        # A unix socket path is limited to 107 bytes; use a short directory for deep checkouts.
        if len(str(sockets / "reference.sock")) > 100:
            sockets = Path("/tmp") / f"kubekms-bench-{os.getuid()}"
        self.kubekms_socket = sockets / "kubekms.sock"
        self.reference_socket = sockets / "reference.sock"

    def ports(self) -> list[int]:
        return [self.etcd_port, self.etcd_peer_port, self.secrets_etcd_port, self.secrets_etcd_peer_port,
                self.apiserver_port, self.server_port, self.controller_metrics_port,
                self.plugin_metrics_port, self.server_metrics_port]

    def check_ports_free(self) -> None:
        for port in self.ports():
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    raise Failure(
                        f"port {port} on 127.0.0.1 is in use; move the benchmark's ports with "
                        "KUBEKMS_BENCH_ETCD_PORT (4 ports from it), KUBEKMS_BENCH_APISERVER_PORT, "
                        "KUBEKMS_BENCH_SERVER_PORT and KUBEKMS_BENCH_METRICS_PORT (3 ports from it)"
                    ) from None


def make_pki(pki: Path) -> None:
    """A local CA; serving certificates for kube-apiserver and the key API; an admin client
    certificate (system:masters); the service-account signing key. As e2e/up.sh does."""
    pki.mkdir(parents=True, mode=0o700)

    def ossl(*args: str) -> None:
        run(["openssl", *args], f"openssl {args[0]}", timeout=60)

    def key(name: str) -> None:
        ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(pki / name))

    def sign(name: str, subject: str, extensions: list[str]) -> None:
        key(f"{name}.key")
        ossl("req", "-new", "-key", str(pki / f"{name}.key"), "-subj", subject, "-out", str(pki / f"{name}.csr"))
        (pki / f"{name}.ext").write_text("\n".join(extensions) + "\n")
        ossl("x509", "-req", "-in", str(pki / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
             "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-days", "30",
             "-extfile", str(pki / f"{name}.ext"), "-out", str(pki / f"{name}.crt"))

    old_umask = os.umask(0o077)
    try:
        key("ca.key")
        ossl("req", "-x509", "-new", "-key", str(pki / "ca.key"), "-subj", "/CN=kubekms-bench-ca", "-days", "30",
             "-out", str(pki / "ca.crt"), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        leaf = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature"]
        sign("apiserver", "/CN=kube-apiserver", leaf + [
            "extendedKeyUsage=serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
            "DNS:kubernetes.default.svc"])
        sign("server", "/CN=kubekms-server", leaf + [
            "extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        sign("admin", "/O=system:masters/CN=kubekms-bench-admin", leaf + ["extendedKeyUsage=clientAuth"])
        ossl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
        ossl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    finally:
        os.umask(old_umask)
    for leftover in list(pki.glob("*.csr")) + list(pki.glob("*.ext")):
        leftover.unlink()


def write_secret_file(path: Path, data: bytes) -> None:
    """Writes key material with mode 0600 (kubekms refuses looser root key files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class ControlPlane:
    def __init__(self, layout: Layout):
        self.l = layout
        self.run_dir = layout.run_dir
        self.server = f"https://127.0.0.1:{layout.apiserver_port}"
        self.kubeconfig = self.run_dir / "kubeconfig"
        self.audit_log = self.run_dir / "audit.log"
        self.etcd: Process | None = None
        self.secrets_etcd: Process | None = None
        self.apiserver: Process | None = None
        self.provider: str | None = None
        self._tls: ssl.SSLContext | None = None

    # --- files ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """PKI, kubeconfig, root key, the reference plugin's key, the encryption
        configurations and the audit policy, in a new run directory."""
        make_pki(self.l.pki)
        self.write_kubeconfig(self.kubeconfig, "admin",
                              f"    client-certificate: {self.l.pki / 'admin.crt'}\n"
                              f"    client-key: {self.l.pki / 'admin.key'}")
        run([self.l.kubekms, "root-key", "create", "--out", self.run_dir / "root.key"], "kubekms root-key create")
        write_secret_file(self.run_dir / "reference.key", secrets.token_bytes(32))
        aesgcm_secret = base64.b64encode(secrets.token_bytes(32)).decode()
        for provider in PROVIDERS:
            self.encryption_config(provider).write_text(self._encryption_yaml(provider, aesgcm_secret))
        # Only the audited controllers' requests are logged, once each (RequestReceived is
        # left out, so a request is one line, or two for a watch: count distinct auditIDs).
        (self.run_dir / "audit-policy.yaml").write_text(f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:{CONTROLLER_SA_NAMESPACE}"]
- level: None
""")

    def encryption_config(self, provider: str) -> Path:
        return self.run_dir / f"encryption-{provider}.yaml"

    def _encryption_yaml(self, provider: str, aesgcm_secret: str) -> str:
        def kms(name: str, socket_path: Path) -> str:
            return f"  - kms: {{apiVersion: v2, name: {name}, endpoint: 'unix://{socket_path}', timeout: 3s}}\n"

        first = {
            "identity": "  - identity: {}\n",
            "aesgcm": f"  - aesgcm:\n      keys:\n      - name: bench\n        secret: {aesgcm_secret}\n",
            "reference": kms("reference", self.l.reference_socket),
            "kubekms": kms("kubekms", self.l.kubekms_socket),
        }[provider]
        fallback = "" if provider == "identity" else "  - identity: {}\n"
        return ("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n"
                "- resources: [secrets]\n  providers:\n" + first + fallback)

    def write_kubeconfig(self, path: Path, user: str, credentials: str) -> None:
        text = f"""\
apiVersion: v1
kind: Config
clusters:
- name: kubekms-bench
  cluster:
    server: {self.server}
    certificate-authority: {self.l.pki / 'ca.crt'}
users:
- name: {user}
  user:
{credentials}
contexts:
- name: {user}
  context: {{cluster: kubekms-bench, user: {user}}}
current-context: {user}
"""
        path.unlink(missing_ok=True)
        write_secret_file(path, text.encode())

    # --- etcd ----------------------------------------------------------------------------

    def _etcd(self, name: str, port: int, peer_port: int) -> Process:
        url = f"http://127.0.0.1:{port}"
        peer = f"http://127.0.0.1:{peer_port}"
        proc = Process(name, self.run_dir).start([
            self.l.e2e_bin / "etcd", "--name", name, "--data-dir", self.run_dir / name,
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{name}={peer}", "--listen-metrics-urls", "",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        wait_until(60, f"{name} to be healthy", lambda: self.etcdctl(port, "endpoint", "health") is not None, proc)
        return proc

    def etcdctl(self, port: int, *args: str) -> bytes:
        done = subprocess.run([str(self.l.e2e_bin / "etcdctl"), "--endpoints", f"http://127.0.0.1:{port}", *args],
                              capture_output=True, timeout=60)
        if done.returncode != 0:
            raise Failure(f"etcdctl {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def start_etcd(self) -> None:
        """The main etcd (everything but Secrets) and the etcd for Secrets."""
        self.etcd = self._etcd("etcd", self.l.etcd_port, self.l.etcd_peer_port)
        self.secrets_etcd = self._etcd("etcd-secrets", self.l.secrets_etcd_port, self.l.secrets_etcd_peer_port)

    def reset_secrets(self) -> None:
        """Starts the Secrets' etcd afresh, empty; kube-apiserver must be stopped."""
        if self.apiserver is not None:
            raise Failure("reset_secrets needs kube-apiserver stopped")
        if self.secrets_etcd is not None:
            self.secrets_etcd.stop()
        subprocess.run(["rm", "-rf", str(self.run_dir / "etcd-secrets")], check=True)
        self.secrets_etcd = self._etcd("etcd-secrets", self.l.secrets_etcd_port, self.l.secrets_etcd_peer_port)

    def stored_secret(self, namespace: str, name: str) -> bytes:
        """The raw value of a Secret in etcd, as kube-apiserver wrote it."""
        return self.etcdctl(self.l.secrets_etcd_port, "get", f"/registry/secrets/{namespace}/{name}",
                            "--print-value-only")

    # --- kube-apiserver ------------------------------------------------------------------

    def start_apiserver(self, provider: str) -> float:
        """Starts kube-apiserver with `provider` encrypting Secrets; returns the seconds from
        the start of the process until /readyz answers ok."""
        if self.apiserver is not None:
            raise Failure("kube-apiserver already runs")
        pki = self.l.pki
        argv = [
            self.l.e2e_bin / "kube-apiserver",
            "--etcd-servers", f"http://127.0.0.1:{self.l.etcd_port}",
            # Secrets go to their own etcd, which is wiped between measurements.
            "--etcd-servers-overrides", f"/secrets#http://127.0.0.1:{self.l.secrets_etcd_port}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--endpoint-reconciler-type", "none", "--secure-port", self.l.apiserver_port,
            "--tls-cert-file", pki / "apiserver.crt", "--tls-private-key-file", pki / "apiserver.key",
            "--client-ca-file", pki / "ca.crt", "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", pki / "sa.pub", "--service-account-signing-key-file", pki / "sa.key",
            "--service-cluster-ip-range", "10.96.0.0/16", "--cert-dir", self.run_dir / "apiserver-certs",
            "--encryption-provider-config", self.encryption_config(provider),
            "--audit-policy-file", self.run_dir / "audit-policy.yaml",
            "--audit-log-path", self.audit_log, "--audit-log-format", "json", "--audit-log-maxsize", "0",
            # Without it, SIGTERM leaves kube-apiserver waiting up to a minute in
            # http.Server.Shutdown for the open watch connections (the plugin's, say) to close.
            "--shutdown-watch-termination-grace-period=2s",
            "--profiling=false", "--v=1",
        ]
        started = time.monotonic()
        proc = Process("kube-apiserver", self.run_dir).start(argv)
        self.apiserver, self.provider = proc, provider
        wait_until(180, f"kube-apiserver /readyz ({provider})", lambda: self.api_get("/readyz")[0] == 200,
                   proc, interval=0.05)
        return time.monotonic() - started

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            self.apiserver.stop()
        self.apiserver = self.provider = None

    def api_get(self, path: str) -> tuple[int, bytes]:
        """GET as the admin; returns the status code and the body."""
        if self._tls is None:
            ctx = ssl.create_default_context(cafile=str(self.l.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.l.pki / "admin.crt"), str(self.l.pki / "admin.key"))
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

    def loadgen(self, *args: str, timeout: float = 1800) -> dict:
        """Runs bench/.bin/loadgen as the admin and returns its JSON result."""
        pki = self.l.pki
        out = run([self.l.bench_bin / "loadgen", *args, "--server", self.server, "--ca", pki / "ca.crt",
                   "--cert", pki / "admin.crt", "--key", pki / "admin.key", "--timeout", f"{int(timeout)}s"],
                  f"loadgen {args[0]}", timeout=timeout + 30)
        return json.loads(out)

    # --- kubekms on this API server ------------------------------------------------------

    def install_kubekms(self) -> None:
        """The CRDs, and the RBAC of the controller, plugin and server from the chart."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(self.l.root / "crds"))
        self.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                     "crd/kmskeys.kms.kubekms.io", "crd/kmsgrants.kms.kubekms.io", "crd/kmskeymaterials.kms.kubekms.io")
        for ns in (KUBEKMS_NAMESPACE, CONTROLLER_SA_NAMESPACE, KEYAPI_KEY[0]):
            self.apply(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n")
        version = run([self.l.e2e_bin / "kube-apiserver", "--version"], "kube-apiserver --version").split()[-1]
        rbac = run([self.l.e2e_bin / "helm", "template", "kubekms", self.l.root / "charts" / "kubekms",
                    "--namespace", KUBEKMS_NAMESPACE, "--kube-version", version,
                    "--set", f"plugin.key={CLUSTER_KEY[0]}/{CLUSTER_KEY[1]}",
                    # Required by the chart's schema; only its Deployment (not rendered) uses it.
                    "--set", "server.tls.secretName=kubekms-bench-unused",
                    "--show-only", "templates/controller-rbac.yaml", "--show-only", "templates/plugin-rbac.yaml",
                    "--show-only", "templates/server-rbac.yaml"], "helm template")
        self.apply(rbac)

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount (created if missing)."""
        self.apply(f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: {namespace}}}\n")
        token = self.kubectl("create", "token", name, "-n", namespace, "--duration", "24h").strip()
        path = self.run_dir / f"{namespace}.{name}.kubeconfig"
        self.write_kubeconfig(path, name, f"    token: {token}")
        return path

    def create_key(self, namespace: str, name: str, label: str) -> None:
        label_key, label_value = label.split("=", 1)
        self.apply(f"""\
apiVersion: kms.kubekms.io/v1alpha1
kind: KmsKey
metadata: {{name: {name}, namespace: {namespace}, labels: {{{label_key}: {label_value}}}}}
spec: {{description: kubekms benchmark key}}
""")

    def wait_key_enabled(self, namespace: str, name: str, timeout: int = 120) -> None:
        self.kubectl("wait", f"kmskey/{name}", "-n", namespace, "--for=jsonpath={.status.state}=Enabled",
                     f"--timeout={timeout}s")


def http_ok(url: str) -> bool:
    """Whether a plain-HTTP GET of url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def metric_value(url: str, name: str) -> float | None:
    """The value of an unlabelled Prometheus metric at url, or None."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == name:
                    return float(parts[1])
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None
    return None
