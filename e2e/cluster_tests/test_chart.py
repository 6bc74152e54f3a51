"""The chart as `helm install` with no --set leaves it on a real node: every pod Running and
Ready with the chart's own security contexts, probes, ServiceAccounts and RBAC; the plugin pod
serving kube-apiserver over the hostPath socket, so that Secrets are encrypted in etcd
through it; and the key API reached through its Service, by name, from a pod in another
namespace with a projected token (examples/app/pod.yaml, as it is)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from support import (KUBEKMS_NAMESPACE, NODE, ROOT, container_pid, etcd_value, eventually, helm, kubectl,
                     kubectl_json, socket_server_pid, pods, read_secret, ready, write_secret)

from controlplane.node import HOST_STATE_DIR, PLUGIN_SOCKET, RUN_AS_USER

COMPONENTS = {"controller": 2, "server": 2, "plugin": 1}


def test_release_installed_with_the_chart_defaults():
    release = kubectl_json("get", "secret", "-n", KUBEKMS_NAMESPACE, "-l", "owner=helm,name=kubekms")["items"]
    assert release, "no helm release kubekms"
    values = helm("get", "values", "kubekms", "-n", KUBEKMS_NAMESPACE, "-o", "json").strip()
    assert values in ("{}", "null"), f"the release was installed with values: {values}"


def test_every_pod_runs_ready_with_the_charts_security_context(node):
    for component, replicas in COMPONENTS.items():
        found = pods(component)
        assert len(found) == replicas and all(ready(p) for p in found), \
            f"{component}: {[(p['metadata']['name'], p['status'].get('phase')) for p in found]}"
        for pod in found:
            spec = pod["spec"]
            assert spec["serviceAccountName"] == f"kubekms-{component}"
            assert spec["nodeName"] == NODE
            container = spec["containers"][0]
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            # What the container really runs as, seen from the host.
            status = pod["status"]["containerStatuses"][0]
            pid = container_pid(node, status["containerID"])
            uids = next(line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("Uid:"))
            assert uids == [str(RUN_AS_USER)] * 4, f"{pod['metadata']['name']} runs as {uids}"
            caps = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("CapEff:"))
            assert int(caps, 16) == 0, f"{pod['metadata']['name']} has capabilities {caps}"
            root = next(line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                        if line.split()[4] == "/")
            assert "ro" in root[5].split(","), f"{pod['metadata']['name']}'s root is mounted {root[5]}"
            assert Path(f"/proc/{pid}/exe").resolve().name == "kubekms"


def test_the_plugin_pod_serves_kube_apiserver_and_secrets_are_encrypted_through_it(node, namespace):
    # The socket kube-apiserver connects to is the plugin pod's, on the hostPath.
    plugin = pods("plugin")[0]
    pid = container_pid(node, plugin["status"]["containerStatuses"][0]["containerID"])
    assert socket_server_pid(PLUGIN_SOCKET) == pid, f"the plugin pod (pid {pid}) does not serve {PLUGIN_SOCKET}"
    assert PLUGIN_SOCKET.stat().st_uid == RUN_AS_USER
    assert node.cp.api_get("/healthz/kms-providers")[0] == 200

    value = f"secret-{uuid.uuid4().hex}"
    write_secret(namespace, "db", value)
    raw = etcd_value(node, f"/registry/secrets/{namespace}/db")
    assert raw.startswith(b"k8s:enc:kms:v2:kubekms:"), raw[:40]
    assert value.encode() not in raw
    assert read_secret(namespace, "db") == value
    # The plugin pod did it: its audit trail, in its hostPath state directory, has
    # kube-apiserver's (root's) Encrypt of the DEK seed under the key version etcd names.
    audit = [json.loads(line) for line in (HOST_STATE_DIR / "audit.log").read_text().splitlines()]
    encrypts = [e for e in audit if e["operation"] == "Encrypt" and e["principal"].startswith("unix:uid=0,")]
    assert encrypts and encrypts[-1]["result"] == "OK", audit
    assert encrypts[-1]["keyId"].encode() in raw


def test_the_example_app_reaches_the_key_api_through_its_service(node, namespace):
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "kmskey.yaml"))
    kubectl("wait", "-n", namespace, "kmskey/app-data", "--for=jsonpath={.status.state}=Enabled", "--timeout=60s")
    # The CA the chart issued the key API's certificate with, in the app's namespace.
    ca = kubectl("get", "configmap", "kubekms-ca", "-n", KUBEKMS_NAMESPACE, "-o", "jsonpath={.data.ca\\.crt}").stdout
    assert "BEGIN CERTIFICATE" in ca
    kubectl("create", "configmap", "kubekms-ca", "-n", namespace, "--from-file=ca.crt=/dev/stdin", stdin=ca)
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples" / "app" / "pod.yaml"))

    def finished():
        status = kubectl_json("get", "pod", "app", "-n", namespace)["status"]
        for s in status.get("containerStatuses", []):
            for state in (s.get("state", {}), s.get("lastState", {})):
                if "terminated" in state:
                    return state["terminated"]
        return None
    terminated = eventually(120, "the app's encrypt to finish", finished)
    logs = kubectl("logs", "-n", namespace, "app", "--previous", check=False).stdout or \
        kubectl("logs", "-n", namespace, "app", check=False).stdout
    assert terminated["exitCode"] == 0, f"the app failed: {terminated} {logs}"
    # The key API saw the app's ServiceAccount encrypt under its key.
    audit = "".join(kubectl("logs", "-n", KUBEKMS_NAMESPACE, p["metadata"]["name"]).stdout for p in pods("server"))
    assert f"system:serviceaccount:{namespace}:app" in audit and "app-data" in audit


def image_archive_parts(archive: Path) -> tuple[dict, list[tuple[str, int, int, int]]]:
    """The image config of an OCI archive, and its files as (path, mode, uid, gid)."""
    import io
    import json
    import tarfile
    with tarfile.open(archive) as outer:
        def blob(digest: str) -> bytes:
            member = outer.extractfile(f"./blobs/sha256/{digest.split(':')[1]}")
            assert member is not None
            return member.read()
        index = json.loads(outer.extractfile("./index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        files = []
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as t:
                files += [(m.name.lstrip("./"), m.mode, m.uid, m.gid) for m in t.getmembers()]
    return config, files


def test_the_image_is_the_dockerfiles(node):
    from support import IMAGES
    config, files = image_archive_parts(IMAGES / "kubekms.tar")
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    user = next(line.split()[1] for line in dockerfile if line.startswith("USER "))
    entrypoint = next(line.split(None, 1)[1] for line in dockerfile if line.startswith("ENTRYPOINT "))
    assert config["config"]["User"] == user == f"{RUN_AS_USER}:{RUN_AS_USER}"
    assert config["config"]["Entrypoint"] == json.loads(entrypoint) == ["/usr/local/bin/kubekms"]
    paths = {path: (mode, uid) for path, mode, uid, _ in files}
    assert paths["usr/local/bin/kubekms"][0] & 0o111
    assert "etc/ssl/certs/ca-certificates.crt" in paths
    assert paths["tmp"][0] & 0o1777 == 0o1777
    # Only the binary and what it links: no shell, no package manager.
    assert not any(p in paths for p in ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/apt", "usr/bin/dpkg"))
    assert all(uid == 0 for path, (_, uid) in paths.items() if path != "home/nonroot")
    kubectl("get", "node", NODE)  # the image the pods run is this one, imported into the node
    assert "ghcr.io/kubekms/kubekms:" in node.ctr("images", "ls", "-q")
