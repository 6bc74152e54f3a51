"""Helpers of the node's end-to-end tests: kubectl and helm on `make cluster`'s cluster,
waiting, etcd, the chart's pods and their containers in the node's containerd."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable

from controlplane.cluster import KUBEKMS_NAMESPACE, ROOT, TOOLS
from controlplane.node import NAME, Node, run_dir

RELEASE_BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "kubekms"
IMAGES = run_dir() / "images"
NODE = NAME


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["kubectl", "--kubeconfig", str(run_dir() / "kubeconfig"), *args], input=stdin,
                          capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr}")
    return done


def kubectl_json(*args: str) -> dict:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def helm(*args: str, timeout: float = 600) -> str:
    done = subprocess.run([str(TOOLS / "helm"), "--kubeconfig", str(run_dir() / "kubeconfig"), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"helm {' '.join(args)} failed: {done.stderr}"
    return done.stdout


def eventually(timeout: float, what: str, check: Callable[[], object], interval: float = 1.0):
    """The first true value of check(), tried until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
            if last:
                return last
        except AssertionError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last})")
        time.sleep(interval)


def etcd_value(node: Node, key: str) -> bytes:
    return node.cp.etcdctl(node.cp.ports.etcd, "get", key, "--print-value-only")


def pods(component: str) -> list[dict]:
    return kubectl_json("get", "pods", "-n", KUBEKMS_NAMESPACE, "-l",
                        f"app.kubernetes.io/instance=kubekms,app.kubernetes.io/component={component}")["items"]


def ready(pod: dict) -> bool:
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def container_pid(node: Node, container_id: str) -> int:
    """The host pid of a running container, from the node's containerd."""
    cid = container_id.removeprefix("containerd://")
    for line in node.ctr("tasks", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid and fields[2] == "RUNNING":
            return int(fields[1])
    raise AssertionError(f"container {cid} is not running in the node's containerd")


def write_secret(namespace: str, name: str, value: str) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
        "stringData": {"v": value}}))


def read_secret(namespace: str, name: str) -> str:
    import base64
    data = kubectl_json("get", "secret", name, "-n", namespace)["data"]["v"]
    return base64.b64decode(data).decode()



def socket_server_pid(path: Path) -> int:
    """The pid of the process that serves the unix socket at `path` (its peer credentials)."""
    import socket
    import struct
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
    return pid
