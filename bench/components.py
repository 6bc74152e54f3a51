"""The programs under test, started beside the benchmark's kube-apiserver: the kubekms
plugin, controller and key API server (release builds), each started as `make up` starts
it and then waited for until it does its work, and the Go reference plugin."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cluster import BenchPlane, metric_value
from controlplane.cluster import KUBEKMS_NAMESPACE
from controlplane.procs import Process, wait_until


class Components:
    def __init__(self, cp: BenchPlane):
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
        proc = self.cp.start_plugin("kubekms-plugin", self._plugin_kubeconfig, self.l.kubekms_socket,
                                    self.cp.run_dir / "kubekms-plugin")
        wait_until(60, "the kubekms plugin to encrypt", lambda: self.plugin_works(self.l.kubekms_socket), proc,
                   interval=0.2)
        return proc

    def start_reference_plugin(self) -> Process:
        return self.cp.start("reference-plugin", [
            self.l.bench_bin / "reference-plugin", "--socket", self.l.reference_socket,
            "--key-file", self.cp.run_dir / "reference.key",
        ], lambda: self.plugin_works(self.l.reference_socket), "the reference plugin to encrypt", interval=0.2)

    def start_controller(self, name: str, kubeconfig: Path, selector: str,
                         plugin_key: tuple[str, str] | None = None) -> Process:
        """`kubekms controller` for the keys that match `selector`; returns once it leads."""
        proc = self.cp.start_controller(name, kubeconfig, selector, plugin_key)
        metrics = f"http://127.0.0.1:{self.l.ports.controller_metrics}/metrics"
        wait_until(60, f"{name} to hold the leader Lease",
                   lambda: metric_value(metrics, "kubekms_controller_leader") == 1, proc, interval=0.2)
        return proc

    def start_server(self) -> Process:
        """`kubekms server`, the key API, as its ServiceAccount."""
        if self._server_kubeconfig is None:
            self._server_kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-server")
        return self.cp.start_server("kubekms-server", self._server_kubeconfig, self.cp.run_dir / "server-audit.log")
