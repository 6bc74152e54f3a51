"""The benchmark's own control plane, apart from the one of `make up` but started by the same
code (e2e/controlplane): two etcds (one only for Secrets, wiped between measurements), a
kube-apiserver restarted with each encryption provider, and the kubekms components and the
Go reference plugin beside it. Everything lives in one run directory and on ports of its own."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from controlplane.cluster import (IDENTITY, TOOLS, ControlPlane, Ports, kms_provider, port, socket_path,
                                  write_encryption_config)
from controlplane.pki import write_private
from controlplane.procs import Failure, Process, run

# The encryption providers compared for Secrets, and how each marks a value in etcd.
PROVIDERS = ("identity", "aesgcm", "reference", "kubekms")
ETCD_PREFIX = {
    "identity": b"k8s\x00",  # plain protobuf
    "aesgcm": b"k8s:enc:aesgcm:v1:bench:",
    "reference": b"k8s:enc:kms:v2:reference:",
    "kubekms": b"k8s:enc:kms:v2:kubekms:",
}

KEYAPI_KEY = ("bench-keyapi", "api-key")  # the KmsKey of the key API benchmark
KEYAPI_CALLER = ("bench-keyapi", "caller")  # the ServiceAccount that calls the key API
CONTROLLER_SA_NAMESPACE = "kubekms-bench-ctl"  # the audited controllers' ServiceAccounts
INFRA_LABEL = "bench.kubekms.io/role=infra"  # keys the setup controller manages


@dataclass
class Layout:
    """Where everything is: the checkout, the run directory, the binaries, the ports.

    The default ports lie below Linux's ephemeral range (32768-60999), where an outgoing
    connection could otherwise hold one of them just when a component wants to listen."""

    root: Path
    run_dir: Path
    kubekms: Path

    def __post_init__(self) -> None:
        self.e2e_bin = TOOLS
        self.bench_bin = self.root / "bench" / ".bin"
        self.pki = self.run_dir / "pki"
        etcd = port("KUBEKMS_BENCH_ETCD_PORT", 22379, 4)
        metrics = port("KUBEKMS_BENCH_METRICS_PORT", 28080, 3)
        self.ports = Ports(etcd=etcd, etcd_peer=etcd + 1, apiserver=port("KUBEKMS_BENCH_APISERVER_PORT", 26443),
                           controller_metrics=metrics, plugin_metrics=metrics + 1,
                           server=port("KUBEKMS_BENCH_SERVER_PORT", 28443), server_metrics=metrics + 2,
                           aws=port("KUBEKMS_BENCH_AWS_PORT", 28444))
        # local-kms, the AWS KMS emulator the AWS API is measured next to (plain HTTP).
        self.local_kms_port = port("KUBEKMS_BENCH_LOCAL_KMS_PORT", 28445)
        self.secrets_etcd_port = etcd + 2
        self.secrets_etcd_peer_port = etcd + 3
        self.kubekms_socket = socket_path(self.run_dir, "kubekms.sock")
        self.reference_socket = socket_path(self.run_dir, "reference.sock")

    def check_ports_free(self) -> None:
        p = self.ports
        for number in (p.etcd, p.etcd_peer, self.secrets_etcd_port, self.secrets_etcd_peer_port, p.apiserver,
                       p.server, p.controller_metrics, p.plugin_metrics, p.server_metrics, p.aws,
                       self.local_kms_port):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", number))
                except OSError:
                    raise Failure(
                        f"port {number} on 127.0.0.1 is in use; move the benchmark's ports with "
                        "KUBEKMS_BENCH_ETCD_PORT (4 ports from it), KUBEKMS_BENCH_APISERVER_PORT, "
                        "KUBEKMS_BENCH_SERVER_PORT, KUBEKMS_BENCH_AWS_PORT, KUBEKMS_BENCH_LOCAL_KMS_PORT and "
                        "KUBEKMS_BENCH_METRICS_PORT (3 ports from it)"
                    ) from None


class BenchPlane(ControlPlane):
    """The shared control plane with what the benchmark adds: an etcd for Secrets only,
    an EncryptionConfiguration per provider, kube-apiserver's audit log, the load generator."""

    def __init__(self, layout: Layout):
        super().__init__("kubekms-bench", layout.run_dir, layout.ports, layout.kubekms)
        self.l = layout
        self.audit_log = self.run_dir / "audit.log"
        self.etcd: Process | None = None
        self.secrets_etcd: Process | None = None
        self.apiserver: Process | None = None
        self.provider: str | None = None

    # --- files ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """PKI, kubeconfig, root key, the reference plugin's key, the encryption
        configurations and the audit policy, in a new run directory."""
        super().prepare()
        write_private(self.run_dir / "reference.key", secrets.token_bytes(32))
        aesgcm = f"  - aesgcm:\n      keys:\n      - name: bench\n        secret: " \
                 f"{base64.b64encode(secrets.token_bytes(32)).decode()}\n"
        first = {"identity": IDENTITY, "aesgcm": aesgcm,
                 "reference": kms_provider("reference", self.l.reference_socket),
                 "kubekms": kms_provider("kubekms", self.l.kubekms_socket)}
        for provider in PROVIDERS:
            fallback = () if provider == "identity" else (IDENTITY,)
            write_encryption_config(self.encryption_config(provider), first[provider], *fallback)
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

    # --- etcd ----------------------------------------------------------------------------

    def start_etcds(self) -> None:
        """The main etcd (everything but Secrets) and the etcd for Secrets."""
        self.etcd = self.start_etcd()
        self.secrets_etcd = self.start_etcd("etcd-secrets", self.l.secrets_etcd_port, self.l.secrets_etcd_peer_port)

    def reset_secrets(self) -> None:
        """Starts the Secrets' etcd afresh, empty; kube-apiserver must be stopped."""
        if self.apiserver is not None:
            raise Failure("reset_secrets needs kube-apiserver stopped")
        if self.secrets_etcd is not None:
            self.secrets_etcd.stop()
        shutil.rmtree(self.run_dir / "etcd-secrets", ignore_errors=True)
        self.secrets_etcd = self.start_etcd("etcd-secrets", self.l.secrets_etcd_port, self.l.secrets_etcd_peer_port)

    def stored_secret(self, namespace: str, name: str) -> bytes:
        """The raw value of a Secret in etcd, as kube-apiserver wrote it."""
        return self.etcdctl(self.l.secrets_etcd_port, "get", f"/registry/secrets/{namespace}/{name}",
                            "--print-value-only")

    # --- kube-apiserver ------------------------------------------------------------------

    def start_apiserver_with(self, provider: str) -> float:
        """Starts kube-apiserver with `provider` encrypting Secrets; returns the seconds from
        the start of the process until /readyz answers ok."""
        if self.apiserver is not None:
            raise Failure("kube-apiserver already runs")
        self.apiserver = self.start_apiserver(
            self.encryption_config(provider),
            # Secrets go to their own etcd, which is wiped between measurements.
            "--etcd-servers-overrides", f"/secrets#http://127.0.0.1:{self.l.secrets_etcd_port}",
            "--audit-policy-file", str(self.run_dir / "audit-policy.yaml"),
            "--audit-log-path", str(self.audit_log), "--audit-log-format", "json", "--audit-log-maxsize", "0")
        self.provider = provider
        return time.monotonic() - self.apiserver.started

    def stop_apiserver(self) -> None:
        if self.apiserver is not None:
            self.apiserver.stop()
        self.apiserver = self.provider = None

    def loadgen(self, *args: str, timeout: float = 1800) -> dict:
        """Runs bench/.bin/loadgen as the admin and returns its JSON result."""
        pki = self.l.pki
        out = run([self.l.bench_bin / "loadgen", *args, "--server", self.server, "--ca", pki / "ca.crt",
                   "--cert", pki / "admin.crt", "--key", pki / "admin.key", "--timeout", f"{int(timeout)}s"],
                  f"loadgen {args[0]}", timeout=timeout + 30)
        return json.loads(out)

    # --- kubekms on this API server ------------------------------------------------------

    def install_kubekms(self, *templates: str) -> None:
        """The CRDs and kubekms's RBAC, and the benchmark's namespaces."""
        super().install_kubekms(*templates)
        for ns in (CONTROLLER_SA_NAMESPACE, KEYAPI_KEY[0]):
            self.create_namespace(ns)

    def create_key(self, namespace: str, name: str, label: str) -> None:
        label_key, label_value = label.split("=", 1)
        self.ensure_key(namespace, name, "kubekms benchmark key", {label_key: label_value})

    def wait_key_enabled(self, namespace: str, name: str, timeout: int = 120) -> None:
        self.kubectl("wait", f"kmskey/{name}", "-n", namespace, "--for=jsonpath={.status.state}=Enabled",
                     f"--timeout={timeout}s")


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
