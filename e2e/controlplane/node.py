"""`make cluster`: a one-node cluster on this machine, on which the Helm chart runs for real.

The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) runs on the
host, as `make up`'s does, but in a run directory and on ports of its own; the node (containerd
with runc and Debian's CNI plugins, kubelet, kube-proxy, and a small cluster DNS) runs in a
network namespace of its own, so that its bridge, its routes and kube-proxy's iptables rules
stay off the host's network and go with the namespace. Everything the node makes is in places
of its own: the run directory, /run/kubekms-node (containerd's state and images), the cgroup
/kubekms-node (every pod), the network namespace kubekms-node, and the chart's default host
paths (/etc/kubekms/root.key, /var/run/kubekms, /var/lib/kubekms). `down` stops it all and
removes every mount, process, network namespace and cgroup it made.

  host (10.247.0.1)  ──veth──  netns kubekms-node (10.247.0.2)
  kube-apiserver :KUBEKMS_CLUSTER_APISERVER_PORT         containerd, kubelet, kube-proxy, DNS
                                                         bridge kubekms0 10.245.0.1/24 (pods)
  Services: 10.246.0.0/24; the `kubernetes` Service is 10.246.0.1 → 10.247.0.1.

kube-apiserver reads Secrets through the KMS plugin's socket in /var/run/kubekms, whichever
pod serves it (the chart's DaemonSet or the static pod of `kubekms manifests static-pod`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from controlplane.cluster import (IDENTITY, KUBEKMS_NAMESPACE, ROOT, TOOLS, ControlPlane, Ports, https_ok,
                                  kms_provider, port, write_encryption_config)
from controlplane.procs import Failure, Process, log, run, stop_named, stop_recorded, up_or_down, wait_until

NAME = "kubekms-node"  # the node, its network namespace, its cgroup, its CA's name
NETNS = NAME
HOST_VETH, NODE_VETH = "kubekms-h", "kubekms-n"
HOST_IP, NODE_IP = "10.247.0.1", "10.247.0.2"
BRIDGE, POD_CIDR, POD_GATEWAY = "kubekms0", "10.245.0.0/24", "10.245.0.1"
SERVICE_CIDR, KUBERNETES_SERVICE_IP = "10.246.0.0/24", "10.246.0.1"
CLUSTER_DNS = POD_GATEWAY

STATE = Path(os.environ.get("KUBEKMS_NODE_STATE", "/run/kubekms-node"))  # containerd's root, state, socket
CGROUP = "/kubekms-node"  # kubelet's cgroupRoot: every pod's cgroup is under it

# The chart's default host paths (values.yaml: rootKey.hostPath, plugin.socketDir,
# plugin.stateDir); `helm install` with no --set finds them here.
HOST_ROOT_KEY = Path("/etc/kubekms/root.key")
HOST_SOCKET_DIR = Path("/var/run/kubekms")
HOST_STATE_DIR = Path("/var/lib/kubekms")
PLUGIN_SOCKET = HOST_SOCKET_DIR / "kms.sock"
RUN_AS_USER = 65532

RELEASE = "kubekms"
PAUSE_IMAGE = "kubekms.local/pause:1"

# Stopped first, in this order, then anything else recorded.
STOP_ORDER = ("kube-proxy", "kubelet", "dns", "containerd", "kube-scheduler", "kube-controller-manager",
              "kube-apiserver", "etcd")


def run_dir() -> Path:
    return Path(os.environ.get("KUBEKMS_CLUSTER_RUN_DIR", ROOT / "e2e" / ".run-cluster"))


def in_netns(*argv: object) -> list:
    """argv run in the node's network namespace (and only that: the mounts are the host's,
    so that kubelet, containerd and the pods see the same volumes)."""
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *argv]


def node_http_ok(url: str) -> bool:
    """Whether a plain-HTTP GET of url, from the node's network namespace, answers 200."""
    return sh(*in_netns("curl", "-sf", "-o", "/dev/null", url), check=False).returncode == 0


def sh(*argv: object, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise Failure(f"{' '.join(map(str, argv))} failed: {done.stderr.strip()}")
    return done


class Node:
    def __init__(self, kubekms: Path, images: list[Path]):
        self.dir = run_dir()
        ports = Ports(
            etcd=port("KUBEKMS_CLUSTER_ETCD_PORT", 44579), etcd_peer=port("KUBEKMS_CLUSTER_ETCD_PEER_PORT", 44580),
            apiserver=port("KUBEKMS_CLUSTER_APISERVER_PORT", 44543),
            controller_metrics=0, plugin_metrics=0, server=0, server_metrics=0,
            controller_manager=port("KUBEKMS_CLUSTER_CONTROLLER_MANAGER_PORT", 44557))
        self.scheduler_port = port("KUBEKMS_CLUSTER_SCHEDULER_PORT", 44559)
        self.kubelet_port = port("KUBEKMS_KUBELET_PORT", 44550)
        self.kubelet_healthz_port = port("KUBEKMS_KUBELET_HEALTHZ_PORT", 44548)
        self.proxy_healthz_port = port("KUBEKMS_KUBE_PROXY_HEALTHZ_PORT", 44556)
        self.proxy_metrics_port = port("KUBEKMS_KUBE_PROXY_METRICS_PORT", 44549)
        self.cp = ControlPlane(NAME, self.dir, ports, kubekms, host=HOST_IP)
        self.images = images
        self.encryption_config = self.dir / "encryption-config.yaml"
        self.manifests = self.dir / "manifests"  # kubelet's static pods
        self.containerd_socket = STATE / "containerd.sock"

    def process(self, name: str) -> Process:
        return self.cp.process(name)

    # --- the network ---------------------------------------------------------------------

    def network(self) -> None:
        """The node's network namespace, its veth to the host and the pods' bridge."""
        if Path(f"/run/netns/{NETNS}").exists():
            return
        log(f"creating the network namespace {NETNS} ({NODE_IP}, pods on {BRIDGE} {POD_CIDR})")
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NODE_VETH, "netns", NETNS)
        sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_VETH)
        sh("ip", "link", "set", HOST_VETH, "up")
        # Replies of the control plane to pods; the route goes with the veth.
        sh("ip", "route", "add", POD_CIDR, "via", NODE_IP, "dev", HOST_VETH)
        for argv in (["ip", "link", "set", "lo", "up"],
                     ["ip", "addr", "add", f"{NODE_IP}/30", "dev", NODE_VETH],
                     ["ip", "link", "set", NODE_VETH, "up"],
                     ["ip", "route", "add", "default", "via", HOST_IP],
                     ["ip", "link", "add", BRIDGE, "type", "bridge"],
                     ["ip", "addr", "add", f"{POD_GATEWAY}/24", "dev", BRIDGE],
                     ["ip", "link", "set", BRIDGE, "up"],
                     # Each of these is the namespace's own: the host's stay as they are.
                     ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                     ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]):
            sh(*in_netns(*argv))

    def cni_config(self) -> Path:
        conf = self.dir / "cni"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "10-kubekms.conflist").write_text(f"""\
{{"cniVersion": "0.4.0", "name": "kubekms", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
    "hairpinMode": true,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_CIDR}", "gateway": "{POD_GATEWAY}"}}]],
             "dataDir": "{STATE / 'cni'}"}}}},
  {{"type": "loopback"}}]}}
""")
        return conf

    # --- host paths of the chart ---------------------------------------------------------

    def host_paths(self) -> None:
        """The root key and the plugin's directories where the chart's defaults expect
        them, owned by the user every kubekms container runs as."""
        if not (self.dir / "etcd").exists():
            # A new cluster: the plugin's cache of another cluster's material is no use.
            shutil.rmtree(HOST_STATE_DIR, ignore_errors=True)
        for d in (HOST_ROOT_KEY.parent, HOST_SOCKET_DIR, HOST_STATE_DIR):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, RUN_AS_USER, RUN_AS_USER)
            d.chmod(0o700)
        if not HOST_ROOT_KEY.exists():
            log(f"creating the root key {HOST_ROOT_KEY}")
            run([self.cp.kubekms, "root-key", "create", "--out", HOST_ROOT_KEY], "kubekms root-key create")
        os.chown(HOST_ROOT_KEY, RUN_AS_USER, RUN_AS_USER)
        HOST_ROOT_KEY.chmod(0o400)

    # --- the control plane ---------------------------------------------------------------

    def kube_apiserver(self) -> None:
        if self.process("kube-apiserver").alive():
            return
        if not self.encryption_config.exists():
            # Until the chart's plugin serves, Secrets are stored as they come (helm keeps
            # its release in one); enable_kms() then puts the plugin first. Not even as a
            # second provider before that: a KMS provider without its plugin fails
            # /healthz and /readyz, and with them the `kubernetes` Service's creation and
            # kube-controller-manager's start.
            write_encryption_config(self.encryption_config, IDENTITY)
        log(f"starting kube-apiserver on {self.cp.server}")
        self.cp.start_apiserver(self.encryption_config, "--encryption-provider-config-automatic-reload=true",
                                "--service-cluster-ip-range", SERVICE_CIDR,
                                "--kubelet-client-certificate", self.cp.pki / "admin.crt",
                                "--kubelet-client-key", self.cp.pki / "admin.key",
                                "--kubelet-preferred-address-types", "InternalIP",
                                readyz=self.apiserver_ready_check(), authorization="Node,RBAC")

    def apiserver_ready_check(self) -> str:
        """What kube-apiserver answers before the plugin pod runs. On the first start no
        Secret is encrypted, so /readyz passes but for the KMS provider. On a restart with
        Secrets encrypted and no plugin yet (a node reboot), /readyz also fails
        informer-sync (the Secrets' watch cache cannot decrypt them), but /livez passes:
        kms-providers is no liveness check, so a liveness probe on /livez does not restart
        kube-apiserver for it, and kube-apiserver serves what kubelet needs to start the
        plugin pod."""
        return "/livez" if self.kms_enabled() else "/readyz?exclude=kms-providers"

    def kube_controller_manager(self) -> None:
        if self.process("kube-controller-manager").alive():
            return
        log("starting kube-controller-manager (all its default controllers)")
        self.cp.start_controller_manager(controllers="*")

    def kube_scheduler(self) -> None:
        if self.process("kube-scheduler").alive():
            return
        kubeconfig = self.component_kubeconfig("kube-scheduler", "system:kube-scheduler")
        log("starting kube-scheduler")
        self.cp.start("kube-scheduler", [
            TOOLS / "kube-scheduler", "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
            "--authorization-kubeconfig", kubeconfig, "--authentication-skip-lookup=true",
            "--bind-address", "127.0.0.1", "--secure-port", self.scheduler_port, "--leader-elect=false",
            "--cert-dir", self.dir / "scheduler-certs", "--profiling=false", "--v=1",
        ], lambda: https_ok(f"https://127.0.0.1:{self.scheduler_port}/healthz"), "kube-scheduler /healthz",
            timeout=120)

    def component_kubeconfig(self, name: str, user: str) -> Path:
        path = self.dir / f"{name}.kubeconfig"
        self.cp.write_kubeconfig(path, user, {"client-certificate": str(self.cp.pki / f"{name}.crt"),
                                              "client-key": str(self.cp.pki / f"{name}.key")})
        return path

    # --- the node ------------------------------------------------------------------------

    def containerd(self) -> None:
        if self.process("containerd").alive():
            return
        STATE.mkdir(parents=True, exist_ok=True)
        config = self.dir / "containerd.toml"
        config.write_text(f"""\
version = 2
root = "{STATE / 'root'}"
state = "{STATE / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{STATE / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  # This machine's root may not lower oom_score_adj below its own (the pause container asks
  # for -998): every container gets at least containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/bin/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.cni_config()}"
""")
        log(f"starting containerd (state in {STATE})")
        self.cp.start("containerd", in_netns("/usr/bin/containerd", "--config", config, "--log-level", "warn"),
                      lambda: self.ctr("version") is not None, "containerd", timeout=60, runs="/usr/bin/containerd")
        for image in self.images:
            log(f"importing {image.name} into containerd")
            self.ctr("images", "import", "--all-platforms", image)

    def ctr(self, *args: object) -> str:
        return run(["ctr", "--address", self.containerd_socket, "--namespace", "k8s.io", *args], f"ctr {args[0]}")

    def cgroup(self) -> None:
        """kubelet's cgroupRoot, in every hierarchy (kubelet creates what is below it)."""
        for hierarchy in _cgroup_hierarchies():
            d = hierarchy / CGROUP.lstrip("/")
            d.mkdir(exist_ok=True)
            for name in ("cpuset.cpus", "cpuset.mems"):  # cgroup v1's cpuset starts empty
                if (d / name).exists() and not (d / name).read_text().strip():
                    (d / name).write_text((hierarchy / name).read_text())

    def kubelet(self) -> None:
        if self.process("kubelet").alive():
            return
        self.cgroup()
        self.manifests.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.component_kubeconfig("kubelet", f"system:node:{NAME}")
        resolv = self.dir / "resolv.conf"
        resolv.write_text("")  # pods get the cluster DNS, and nothing of the host's
        config = self.dir / "kubelet.yaml"
        config.write_text(f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: {self.kubelet_port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {self.kubelet_healthz_port}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {self.cp.pki / 'ca.crt'}}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: unix://{self.containerd_socket}
cgroupDriver: cgroupfs
cgroupRoot: {CGROUP}
failCgroupV1: false
failSwapOn: false
staticPodPath: {self.manifests}
clusterDNS: [{CLUSTER_DNS}]
clusterDomain: cluster.local
resolvConf: {resolv}
# The host's disk is shared: never evict or collect images because of it.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
syncFrequency: 10s
fileCheckFrequency: 5s
nodeStatusReportFrequency: 10s
serializeImagePulls: false
""")
        log(f"starting kubelet (node {NAME}, {NODE_IP}:{self.kubelet_port})")
        self.cp.start("kubelet", in_netns(
            TOOLS / "kubelet", "--config", config, "--kubeconfig", kubeconfig, "--hostname-override", NAME,
            "--node-ip", NODE_IP, "--root-dir", self.dir / "kubelet", "--cert-dir", self.dir / "kubelet-certs",
            "--v=1"),
            lambda: node_http_ok(f"http://127.0.0.1:{self.kubelet_healthz_port}/healthz"), "kubelet /healthz",
            timeout=120, runs=str(TOOLS / "kubelet"))

    def kube_proxy(self) -> None:
        if self.process("kube-proxy").alive():
            return
        kubeconfig = self.component_kubeconfig("kube-proxy", "system:kube-proxy")
        config = self.dir / "kube-proxy.yaml"
        config.write_text(f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
hostnameOverride: {NAME}
mode: iptables
clusterCIDR: {POD_CIDR}
healthzBindAddress: 127.0.0.1:{self.proxy_healthz_port}
metricsBindAddress: 127.0.0.1:{self.proxy_metrics_port}
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
        log("starting kube-proxy (iptables, in the node's network namespace)")
        self.cp.start("kube-proxy", in_netns(TOOLS / "kube-proxy", "--config", config, "--v=1"),
                      lambda: node_http_ok(f"http://127.0.0.1:{self.proxy_healthz_port}/livez"), "kube-proxy /livez",
                      timeout=60, runs=str(TOOLS / "kube-proxy"))

    def dns(self) -> None:
        if self.process("dns").alive():
            return
        log(f"starting the cluster DNS on {CLUSTER_DNS}:53 (Services' cluster IPs)")
        python = shutil.which("python3") or "python3"
        self.cp.start("dns", in_netns(python, "-m", "controlplane.dns", "--listen", CLUSTER_DNS,
                                      "--server", self.cp.server, "--pki", self.cp.pki),
                      lambda: "serving" in self.process("dns").log_tail(), "the cluster DNS", runs=python)

    def wait_node_ready(self) -> None:
        """The node registered, labelled as a control-plane node (kubelet may not label itself
        so; kubeadm does it the same way) and Ready."""
        wait_until(120, f"node {NAME} to register", lambda: bool(self.cp.kubectl("get", "node", NAME, "-o", "name")),
                   self.process("kubelet"), interval=1)
        self.cp.kubectl("label", "node", NAME, "--overwrite", "node-role.kubernetes.io/control-plane=")
        self.cp.kubectl("wait", f"node/{NAME}", "--for=condition=Ready", "--timeout=120s")

    # --- the chart -----------------------------------------------------------------------

    def install_chart(self) -> None:
        """`helm install` with the chart's defaults, then every pod Ready."""
        helm = [TOOLS / "helm", "--kubeconfig", self.cp.kubeconfig]
        listed = run([*helm, "list", "-n", KUBEKMS_NAMESPACE, "-q"], "helm list")
        if RELEASE not in listed.split():
            log("helm install kubekms charts/kubekms (the chart's default values)")
            run([*helm, "install", RELEASE, ROOT / "charts" / "kubekms", "-n", KUBEKMS_NAMESPACE,
                 "--create-namespace", "--wait", "--timeout", "5m"], "helm install", timeout=360)
        self.wait_pods_ready()

    def wait_pods_ready(self) -> None:
        for kind in ("deployment/kubekms-controller", "deployment/kubekms-server", "daemonset/kubekms-plugin"):
            self.cp.kubectl("rollout", "status", "-n", KUBEKMS_NAMESPACE, kind, "--timeout=180s")
        # After a reboot the workloads' status is the one from before it: the pods say more.
        wait_until(180, "every kubekms pod to be Ready", self._pods_ready, self.process("kubelet"), interval=1)

    def _pods_ready(self) -> bool:
        found = json.loads(self.cp.kubectl("get", "pods", "-n", KUBEKMS_NAMESPACE, "-o", "json",
                                           "-l", f"app.kubernetes.io/instance={RELEASE}"))["items"]
        current = [p for p in found if not p["metadata"].get("deletionTimestamp")]
        workloads = json.loads(self.cp.kubectl("get", "deployments,daemonsets", "-n", KUBEKMS_NAMESPACE, "-o", "json",
                                               "-l", f"app.kubernetes.io/instance={RELEASE}"))["items"]
        wanted = sum(w["spec"].get("replicas", w["status"].get("desiredNumberScheduled", 0)) for w in workloads)
        return len(current) == wanted and all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
            for p in current)

    def enable_kms(self) -> None:
        """Secrets through the plugin pod: kubekms first in the EncryptionConfiguration
        (kube-apiserver reloads it), and what was stored before rewritten through it."""
        if self.kms_enabled():
            wait_until(120, "the KMS provider to be healthy (/healthz/kms-providers)",
                       lambda: self.cp.api_get("/healthz/kms-providers")[0] == 200,
                       self.process("kube-apiserver"), interval=1)
            return
        log("Secrets are now encrypted through the plugin pod (kubekms first in the EncryptionConfiguration)")
        write_encryption_config(self.encryption_config, kms_provider("kubekms", PLUGIN_SOCKET), IDENTITY)
        wait_until(120, "kube-apiserver to encrypt Secrets through the plugin (it reloads its configuration)",
                   self._reloaded, self.process("kube-apiserver"), interval=1)
        self.cp.kubectl("delete", "secret", "kubekms-probe", "-n", "default")
        secrets = self.cp.kubectl("get", "secrets", "-A", "-o", "json")
        self.cp.kubectl("replace", "-f", "-", stdin=secrets)

    def kms_enabled(self) -> bool:
        return "- kms:" in self.encryption_config.read_text()

    def _reloaded(self) -> bool:
        """Whether kube-apiserver writes with kubekms: a probe Secret is stored encrypted."""
        self.cp.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: kubekms-probe, namespace: default}\n"
                      f"stringData: {{at: '{time.time()}'}}\n")
        raw = self.cp.etcdctl(self.cp.ports.etcd, "get", "/registry/secrets/default/kubekms-probe",
                              "--print-value-only")
        return raw.startswith(b"k8s:enc:kms:v2:kubekms:")

    # --- all of it -----------------------------------------------------------------------

    def up(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.network()
        self.cp.prepare(apiserver_ips=(KUBERNETES_SERVICE_IP,))
        self.host_paths()
        if not self.process("etcd").alive():
            self.cp.start_etcd()
        self.kube_apiserver()
        # As on a node that reboots: kubelet starts the pods bound to it (the plugin's among
        # them) from what kube-apiserver serves, without the scheduler or the controllers.
        self.containerd()
        self.kubelet()
        self.kube_proxy()
        self.dns()
        if self.kms_enabled():
            log("waiting for the plugin pod to serve kube-apiserver (Secrets go through it)")
            wait_until(180, "the KMS provider to be healthy (/healthz/kms-providers)",
                       lambda: self.cp.api_get("/healthz/kms-providers")[0] == 200,
                       self.process("kube-apiserver"), interval=1)
        # kube-controller-manager waits for a healthy /healthz at its start.
        self.kube_controller_manager()
        self.kube_scheduler()
        self.wait_node_ready()
        self.install_chart()
        self.enable_kms()
        self.write_env()
        log(f"the cluster is up: source {self.dir}/env")

    def components(self) -> dict:
        return {"etcd": lambda: None if self.process("etcd").alive() else self.cp.start_etcd(),
                "kube-apiserver": self.kube_apiserver, "kube-controller-manager": self.kube_controller_manager,
                "kube-scheduler": self.kube_scheduler, "containerd": self.containerd, "kubelet": self.kubelet,
                "kube-proxy": self.kube_proxy, "dns": self.dns}

    def write_env(self) -> None:
        (self.dir / "env").write_text(f"""\
# Written by e2e/cluster.sh: source it to talk to the cluster of `make cluster`.
export KUBECONFIG='{self.cp.kubeconfig}'
export ETCDCTL_ENDPOINTS='http://127.0.0.1:{self.cp.ports.etcd}'
export KUBEKMS_CLUSTER_RUN_DIR='{self.dir}'
export CONTAINERD_ADDRESS='{self.containerd_socket}'
export CONTAINERD_NAMESPACE=k8s.io
export PATH='{TOOLS}':"$PATH"
""")


# --- `make down` -----------------------------------------------------------------------------


def _cgroup_hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted here (cgroup v1 or v2)."""
    return [Path(line.split()[1]) for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[2] in ("cgroup", "cgroup2")]


def _cgroup_dirs() -> list[Path]:
    """The node's cgroup in every hierarchy that has it."""
    return [d for d in (h / CGROUP.lstrip("/") for h in _cgroup_hierarchies()) if d.is_dir()]


def _cgroup_pids() -> set[int]:
    pids = set()
    for d in _cgroup_dirs():
        for procs in d.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                pass
    return pids


def _mounts_under(*prefixes: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any(target == str(p) or target.startswith(f"{p}/") for p in prefixes):
            found.append(target)
    return found


def down() -> None:
    """Stops the cluster and removes what the node made outside its run directory's files:
    pods' processes, mounts, network namespaces, cgroups, and the node's network namespace
    with its bridge and iptables rules. Safe to run twice."""
    d = run_dir()
    if Process("kube-proxy", d).alive():
        stop_named(d, ["kube-proxy"])
    # The pods' network namespaces, known by the processes in the node's cgroup.
    pod_netns = set()
    for pid in _cgroup_pids():
        try:
            pod_netns.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
        except OSError:
            pass
    stop_named(d, ["kubelet", "dns", "containerd"])
    for pid in _cgroup_pids():  # the pods' processes and their shims
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for shim in _shims():
        os.kill(shim, signal.SIGKILL)
    wait_until(30, "the node's processes to exit", lambda: not _cgroup_pids() and not _shims())
    stop_named(d, STOP_ORDER[4:])
    stop_recorded(d)
    netns_dir = Path("/run/netns")
    for ns in sorted(netns_dir.glob("cni-*")) if netns_dir.is_dir() else []:
        try:
            if os.stat(ns).st_ino in pod_netns:
                sh("umount", ns, check=False)
                ns.unlink()
        except OSError:
            pass
    for target in sorted(_mounts_under(d, STATE), key=len, reverse=True):
        sh("umount", target, check=False)
    left = _mounts_under(d, STATE)
    for target in sorted(left, key=len, reverse=True):
        sh("umount", "-l", target, check=False)
    if Path(f"/run/netns/{NETNS}").exists():
        log(f"removing the network namespace {NETNS} (its bridge, routes and iptables rules)")
        sh("ip", "netns", "delete", NETNS)
    sh("ip", "link", "delete", HOST_VETH, check=False)
    for cg in _cgroup_dirs():
        for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        cg.rmdir()
    shutil.rmtree(STATE, ignore_errors=True)


def leftovers() -> list[str]:
    """What of the node is still there: processes in its cgroup or of its containerd, mounts
    under its directories, network namespaces (its own and its pods'), its host veth,
    cgroups. Empty after `down`."""
    found = [f"process {pid}" for pid in sorted(_cgroup_pids() | set(_shims()))]
    for name in ("containerd", "kubelet", "kube-proxy", "dns", "kube-apiserver", "etcd"):
        if Process(name, run_dir()).alive():
            found.append(f"process {name}")
    found += [f"mount {m}" for m in _mounts_under(run_dir(), STATE)]
    if Path(f"/run/netns/{NETNS}").exists():
        found.append(f"network namespace {NETNS}")
    if sh("ip", "link", "show", HOST_VETH, check=False).returncode == 0:
        found.append(f"link {HOST_VETH}")
    found += [f"cgroup {d}" for d in _cgroup_dirs()]
    # kube-proxy's and CNI's rules live in the node's network namespace, never the host's.
    if shutil.which("iptables-save"):
        found += [f"host iptables rule {r}" for r in sh("iptables-save", check=False).stdout.splitlines()
                  if "KUBE-" in r or BRIDGE in r or POD_CIDR in r]
    if STATE.exists():
        found.append(f"directory {STATE}")
    return found


def _shims() -> list[int]:
    """containerd-shim processes of the node's containerd (they name its socket)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"containerd-shim-runc-v2") and \
                str(STATE / "containerd.sock").encode() in b" ".join(cmdline):
            found.append(int(proc.name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m controlplane.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the cluster and install the chart, or start the named components")
    up.add_argument("--kubekms", type=Path, required=True, help="the kubekms binary (of the image)")
    up.add_argument("--image", type=Path, action="append", default=[], help="an OCI archive to import")
    up.add_argument("components", nargs="*", metavar="COMPONENT")
    down_cmd = commands.add_parser("down", help="stop the cluster, or the named components")
    down_cmd.add_argument("components", nargs="*", metavar="COMPONENT")
    commands.add_parser("leftovers", help="list what of the node is left (exit status 1 if anything)")
    args = parser.parse_args()
    if args.command == "leftovers":
        left = leftovers()
        for thing in left:
            print(thing)
        return 1 if left else 0
    return up_or_down(args.command, args.components, run_dir(), down, lambda: Node(args.kubekms, args.image))

if __name__ == "__main__":
    sys.exit(main())
