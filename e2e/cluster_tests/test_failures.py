"""What users meet when things go wrong on a node, and the other way to run the plugin:
the plugin pod killed (kubelet restarts it; kube-apiserver keeps reading Secrets), the static
pod of `kubekms manifests static-pod` in place of the DaemonSet, `helm upgrade` to a new image
with a client calling the key API throughout, and a node reboot in which kube-apiserver comes
up before the plugin pod exists. They change the cluster, so they run after test_chart.py,
one at a time, and each leaves the chart as `helm install` made it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from support import (IMAGES, KUBEKMS_NAMESPACE, NODE, RELEASE_BIN, ROOT, container_pid, etcd_value, eventually,
                     helm, kubectl, kubectl_json, socket_server_pid, pods, read_secret, ready, write_secret)

from controlplane.cluster import CLUSTER_KEY
from controlplane.node import (HOST_ROOT_KEY, NETNS, PLUGIN_SOCKET, RUN_AS_USER, down, in_netns)

CHART = str(ROOT / "charts" / "kubekms")


def kms_healthy(node) -> bool:
    return node.cp.api_get("/healthz/kms-providers")[0] == 200


def test_a_killed_plugin_pod_is_restarted_and_secrets_stay_readable(node, namespace):
    write_secret(namespace, "before", "kept")
    plugin = pods("plugin")[0]
    status = plugin["status"]["containerStatuses"][0]
    os.kill(container_pid(node, status["containerID"]), signal.SIGKILL)
    # While kubelet restarts it, kube-apiserver reads Secrets with the keys it holds.
    restarted = None
    deadline = time.monotonic() + 120
    while restarted is None and time.monotonic() < deadline:
        assert read_secret(namespace, "before") == "kept"
        current = pods("plugin")
        if current and current[0]["status"]["containerStatuses"][0]["restartCount"] > status["restartCount"] \
                and ready(current[0]):
            restarted = current[0]
        time.sleep(0.5)
    assert restarted is not None, "kubelet did not restart the plugin pod"
    assert restarted["metadata"]["name"] == plugin["metadata"]["name"], "the same pod, restarted in place"
    eventually(60, "the KMS provider healthy again", lambda: kms_healthy(node))
    write_secret(namespace, "after", "written")
    assert etcd_value(node, f"/registry/secrets/{namespace}/after").startswith(b"k8s:enc:kms:v2:kubekms:")


def plugin_kubeconfig(node) -> Path:
    """A kubeconfig for the chart's plugin ServiceAccount on the node, for the static pod
    (which has no ServiceAccount token), readable only by the kubekms user."""
    token = kubectl("create", "token", "kubekms-plugin", "-n", KUBEKMS_NAMESPACE, "--duration", "2h").stdout.strip()
    ca = base64.b64encode((node.cp.pki / "ca.crt").read_bytes()).decode()
    path = HOST_ROOT_KEY.parent / "plugin.kubeconfig"
    path.unlink(missing_ok=True)
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "plugin",
        "clusters": [{"name": "node", "cluster": {"server": node.cp.server, "certificate-authority-data": ca}}],
        "users": [{"name": "plugin", "user": {"token": token}}],
        "contexts": [{"name": "plugin", "context": {"cluster": "node", "user": "plugin"}}]}))
    os.chown(path, RUN_AS_USER, RUN_AS_USER)
    path.chmod(0o400)
    return path


def test_the_static_pod_serves_kube_apiserver_in_place_of_the_daemonset(node, namespace):
    helm("upgrade", "kubekms", CHART, "-n", KUBEKMS_NAMESPACE, "--reuse-values", "--set", "plugin.enabled=false",
         "--wait", "--timeout", "3m")
    manifest = node.manifests / "kubekms-plugin.yaml"
    try:
        eventually(60, "the DaemonSet's pod to go", lambda: not pods("plugin"))
        plugin_kubeconfig(node)
        pod = subprocess.run([str(RELEASE_BIN), "manifests", "static-pod", "--key", "/".join(CLUSTER_KEY),
                              "--only", "pod"], capture_output=True, text=True, check=True).stdout
        manifest.write_text(pod)
        mirror = f"kubekms-plugin-{NODE}"

        def static_ready():
            found = kubectl("get", "pod", mirror, "-n", "kube-system", "-o", "json", check=False)
            return found.returncode == 0 and ready(json.loads(found.stdout)) and json.loads(found.stdout)
        running = eventually(120, "the static plugin pod to be Ready", static_ready)
        pid = container_pid(node, running["status"]["containerStatuses"][0]["containerID"])
        assert socket_server_pid(PLUGIN_SOCKET) == pid
        eventually(60, "the KMS provider healthy through the static pod", lambda: kms_healthy(node))
        value = f"static-{uuid.uuid4().hex}"
        write_secret(namespace, "static", value)
        assert etcd_value(node, f"/registry/secrets/{namespace}/static").startswith(b"k8s:enc:kms:v2:kubekms:")
        assert read_secret(namespace, "static") == value
    finally:
        manifest.unlink(missing_ok=True)
        eventually(60, "the static pod to go", lambda: kubectl("get", "pod", f"kubekms-plugin-{NODE}", "-n",
                                                               "kube-system", check=False).returncode != 0)
        helm("upgrade", "kubekms", CHART, "-n", KUBEKMS_NAMESPACE, "--reuse-values", "--set", "plugin.enabled=true",
             "--wait", "--timeout", "3m")
    eventually(60, "the KMS provider healthy through the DaemonSet again", lambda: kms_healthy(node))


class KeyApiLoop(threading.Thread):
    """Calls the key API through its Service, by name, from the node's network, a new
    process (a new connection) each call, until stopped or for at most `limit` seconds."""

    def __init__(self, node, namespace: str, limit: float = 600):
        super().__init__(daemon=True)
        self.node, self.namespace, self.limit = node, namespace, limit
        self.calls, self.failures = 0, []
        self.stop = threading.Event()
        self.dir = Path(tempfile.mkdtemp(prefix="kubekms-loop-"))
        service_ip = kubectl("get", "svc", "kubekms-server", "-n", KUBEKMS_NAMESPACE,
                             "-o", "jsonpath={.spec.clusterIP}").stdout
        (self.dir / "hosts").write_text(f"{service_ip} kubekms-server.{KUBEKMS_NAMESPACE}.svc\n")
        (self.dir / "ca.crt").write_text(kubectl("get", "configmap", "kubekms-ca", "-n", KUBEKMS_NAMESPACE,
                                                 "-o", "jsonpath={.data.ca\\.crt}").stdout)
        (self.dir / "token").write_text(kubectl("create", "token", "app", "-n", namespace, "--audience", "kubekms",
                                                "--duration", "1h").stdout.strip())
        (self.dir / "in").write_bytes(b"rolling")

    def run(self) -> None:
        # The Service's name resolves through a hosts file in a mount namespace of its own.
        call = (f"mount --bind {self.dir}/hosts /etc/hosts && exec {RELEASE_BIN} encrypt "
                f"--key {self.namespace}/app-data --token-file {self.dir}/token --in {self.dir}/in "
                f"--out {self.dir}/out")
        env = {**os.environ, "KUBEKMS_ADDR": f"https://kubekms-server.{KUBEKMS_NAMESPACE}.svc:8443",
               "KUBEKMS_CA": str(self.dir / "ca.crt")}
        deadline = time.monotonic() + self.limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            done = subprocess.run([*map(str, in_netns("unshare", "-m", "sh", "-c", call))], env=env,
                                  capture_output=True, text=True, timeout=60)
            self.calls += 1
            if done.returncode != 0:
                self.failures.append(done.stderr.strip())
            time.sleep(0.1)


def test_helm_upgrade_to_a_new_image_rolls_without_a_failed_call(node, namespace):
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "kmskey.yaml"))
    kubectl("apply", "-n", namespace, "-f", "-", stdin=(ROOT / "examples" / "app" / "pod.yaml").read_text()
            .split("---\napiVersion: v1\nkind: Pod")[0])  # the ServiceAccount and its RoleBinding only
    kubectl("wait", "-n", namespace, "kmskey/app-data", "--for=jsonpath={.status.state}=Enabled", "--timeout=60s")
    # A new image: the same files under another tag, as a release would bring.
    tag = f"0.1.0-rolled-{uuid.uuid4().hex[:6]}"
    archive = IMAGES / "kubekms-rolled.tar"
    subprocess.run([str(ROOT / "e2e" / "tools" / "image.sh"), str(RELEASE_BIN), str(archive),
                    f"ghcr.io/kubekms/kubekms:{tag}"], check=True, capture_output=True)
    node.ctr("images", "import", archive)
    before = {c: {p["metadata"]["name"] for p in pods(c)} for c in ("controller", "server", "plugin")}
    strategy = kubectl_json("get", "daemonset", "kubekms-plugin", "-n", KUBEKMS_NAMESPACE)["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}, strategy

    loop = KeyApiLoop(node, namespace)
    loop.start()
    try:
        eventually(60, "the loop's first call", lambda: loop.calls > 0)
        helm("upgrade", "kubekms", CHART, "-n", KUBEKMS_NAMESPACE, "--reuse-values", "--set", f"image.tag={tag}",
             "--wait", "--timeout", "5m")
        for kind in ("deployment/kubekms-controller", "deployment/kubekms-server", "daemonset/kubekms-plugin"):
            kubectl("rollout", "status", "-n", KUBEKMS_NAMESPACE, kind, "--timeout=180s")
        calls_at_end = loop.calls
        eventually(60, "a few more calls after the rollout", lambda: loop.calls > calls_at_end + 3)
    finally:
        loop.stop.set()
        loop.join(90)
        subprocess.run(["rm", "-rf", str(loop.dir)], check=False)
    assert loop.calls > 10 and not loop.failures, f"{len(loop.failures)} of {loop.calls} calls failed: " \
                                                  f"{loop.failures[:3]}"
    for component, old in before.items():
        # The old pods go once they have drained (the server's preStop, then SIGTERM).
        now = eventually(90, f"the old {component} pods to go",
                         lambda: (lambda found: not old & {p["metadata"]["name"] for p in found} and found)(
                             pods(component)))
        assert len(now) == len(old) and all(ready(p) for p in now), f"{component}: {now}"
        assert all(p["spec"]["containers"][0]["image"].endswith(f":{tag}") for p in now)
    eventually(60, "the KMS provider healthy through the new plugin pod", lambda: kms_healthy(node))
    # Back to the chart's default image, as installed.
    helm("upgrade", "kubekms", CHART, "-n", KUBEKMS_NAMESPACE, "--reset-values", "--wait", "--timeout", "5m")
    node.ctr("images", "rm", f"ghcr.io/kubekms/kubekms:{tag}")


def test_a_rebooted_node_serves_secrets_once_the_plugin_pod_is_back(node, namespace):
    value = f"reboot-{uuid.uuid4().hex}"
    write_secret(namespace, "survives", value)
    # Everything stops, pods and all, as in a power cut; /run goes.
    down()
    assert not Path(f"/run/netns/{NETNS}").exists()
    # kube-apiserver first, before any plugin pod exists.
    node.network()
    node.cp.start_etcd()
    node.kube_apiserver()
    assert not kms_healthy(node)
    livez = node.cp.api_get("/livez?verbose")
    assert livez[0] == 200, f"/livez fails without the plugin: {livez[1].decode()}"
    assert b"kms-providers" not in livez[1], "kms-providers is no liveness check"
    readyz = node.cp.api_get("/readyz?verbose")
    failed = sorted(line for line in readyz[1].decode().splitlines() if line.startswith("[-]"))
    # Not ready: the KMS provider, and the Secrets' watch cache, which cannot decrypt them.
    assert readyz[0] != 200 and failed == ["[-]informer-sync failed: reason withheld",
                                           "[-]kms-providers failed: reason withheld"], readyz[1].decode()
    assert node.cp.api_get("/healthz/kms-providers")[0] != 200
    assert kubectl("get", "secret", "survives", "-n", namespace, check=False).returncode != 0
    assert kubectl("get", "namespace", namespace, check=False).returncode == 0, "all else is served"
    # The rest of the node; kubelet starts the plugin pod, and Secrets read again.
    node.up()
    assert kms_healthy(node)
    eventually(60, "kube-apiserver ready", lambda: node.cp.api_get("/readyz")[0] == 200)
    assert read_secret(namespace, "survives") == value
    for component in ("controller", "server", "plugin"):
        assert all(ready(p) for p in pods(component)), component
