"""The programs under test, started beside the benchmark's kube-apiserver: the kubekms
plugin, controller and key API server (release builds) and the Go reference plugin."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cluster import CLUSTER_KEY, KUBEKMS_NAMESPACE, ControlPlane, http_ok, metric_value
from controlplane.procs import Process, wait_until


class Components:
    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.l = cp.l
        self._plugin_kubeconfig: Path | None = None
        self._server_kubeconfig: Path | None = None

    def plugin_works(self, socket: Path) -> bool:
        """Whether an Encrypt and a Decrypt through the plugin at `socket` succeed (one call
        of `kubekms bench plugin`, which also checks the floor)."""
        if not socket.is_socket():
            return False
        done = subprocess.run([str(self.l.kubekms), "bench", "plugin", "--socket", str(socket),
                               "--calls", "1", "--concurrency", "1"], capture_output=True, timeout=30)
        return done.returncode == 0

    def start_kubekms_plugin(self) -> Process:
        """`kubekms plugin` for the cluster key, as its ServiceAccount, with its state (key
        cache and audit log) in the run directory."""
        if self._plugin_kubeconfig is None:
            self._plugin_kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-plugin")
        proc = Process("kubekms-plugin", self.cp.run_dir).start([
            self.l.kubekms, "plugin", "--kubeconfig", self._plugin_kubeconfig,
            "--key", f"{CLUSTER_KEY[0]}/{CLUSTER_KEY[1]}", "--socket", self.l.kubekms_socket,
            "--root-key-file", self.cp.run_dir / "root.key", "--state-dir", self.cp.run_dir / "kubekms-plugin",
            "--metrics-addr", f"127.0.0.1:{self.l.plugin_metrics_port}",
        ])
        wait_until(60, "the kubekms plugin to encrypt", lambda: self.plugin_works(self.l.kubekms_socket), proc,
                   interval=0.2)
        return proc

    def start_reference_plugin(self) -> Process:
        proc = Process("reference-plugin", self.cp.run_dir).start([
            self.l.bench_bin / "reference-plugin", "--socket", self.l.reference_socket,
            "--key-file", self.cp.run_dir / "reference.key",
        ])
        wait_until(60, "the reference plugin to encrypt", lambda: self.plugin_works(self.l.reference_socket), proc,
                   interval=0.2)
        return proc

    def start_controller(self, name: str, kubeconfig: Path, selector: str,
                         plugin_key: tuple[str, str] | None = None) -> Process:
        """`kubekms controller` for the keys that match `selector`, leader-elected as in a
        Deployment; returns once it leads. With `plugin_key` it lets the plugin read that
        key's material, as the chart's controller does."""
        metrics = f"http://127.0.0.1:{self.l.controller_metrics_port}"
        plugin_args = ["--plugin-key", "/".join(plugin_key), "--plugin-material-role", "kubekms-plugin"] \
            if plugin_key else []
        proc = Process(name, self.cp.run_dir).start([
            self.l.kubekms, "controller", "--kubeconfig", kubeconfig,
            "--root-key-file", self.cp.run_dir / "root.key",
            "--metrics-addr", f"127.0.0.1:{self.l.controller_metrics_port}",
            "--leader-election-namespace", KUBEKMS_NAMESPACE, "--selector", selector, *plugin_args,
        ])
        wait_until(60, f"{name} to hold the leader Lease",
                   lambda: metric_value(f"{metrics}/metrics", "kubekms_controller_leader") == 1, proc, interval=0.2)
        return proc

    def start_server(self) -> Process:
        """`kubekms server`, the key API, as its ServiceAccount."""
        if self._server_kubeconfig is None:
            self._server_kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-server")
        pki = self.l.pki
        proc = Process("kubekms-server", self.cp.run_dir).start([
            self.l.kubekms, "server", "--kubeconfig", self._server_kubeconfig,
            "--listen", f"127.0.0.1:{self.l.server_port}", "--tls-cert", pki / "server.crt",
            "--tls-key", pki / "server.key", "--root-key-file", self.cp.run_dir / "root.key",
            "--audit-log", self.cp.run_dir / "server-audit.log",
            "--metrics-addr", f"127.0.0.1:{self.l.server_metrics_port}",
        ])
        wait_until(60, "the key API server's /readyz",
                   lambda: http_ok(f"http://127.0.0.1:{self.l.server_metrics_port}/readyz"), proc, interval=0.2)
        return proc
