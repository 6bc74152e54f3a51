"""`make up` and `make down`: the local control plane of the end-to-end tests and the demo.
etcd and kube-apiserver with RBAC, a service-account issuer and an admin kubeconfig;
kube-controller-manager (service accounts, namespaces, garbage collection, storage version
migration); the CRDs, kubekms's RBAC and deletion protection (from the Helm chart); a root
key; and the kubekms controller, KMS v2 plugin and key API server, each as its ServiceAccount. State in
e2e/.run (KUBEKMS_RUN_DIR), ports from KUBEKMS_*_PORT; writes e2e/.run/env. e2e/up.sh and
e2e/down.sh run it (up.sh builds what it needs first):

  python3 -m controlplane up --kubekms BIN [COMPONENT...]   start all, or the named ones
  python3 -m controlplane down [COMPONENT...]               stop all, or the named ones
  python3 -m controlplane kill COMPONENT...                 SIGKILL the named ones (a crash)
  python3 -m controlplane running COMPONENT                 exit status 0 if it runs

Safe to run twice: what already runs is left alone, except a kubekms component whose
binary has changed since it started, which is restarted."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from controlplane.cluster import (AWS_REGION, CLUSTER_KEY, IDENTITY, KUBEKMS_NAMESPACE, ROOT, TOOLS, ControlPlane, Ports,
                                  kms_provider, port, socket_path, write_encryption_config)
from controlplane.procs import Process, log, stop_recorded, up_or_down, wait_until

# `make down` stops these first, in this order (clients before what they depend on; the
# plugin after kube-apiserver, which calls it), then anything else recorded.
STOP_ORDER = ("server", "controller", "kube-controller-manager", "kube-apiserver", "plugin", "etcd")


# The kube-apiserver audit policy the README recommends for clusters that run kubekms.
AUDIT_POLICY = ROOT / "examples" / "kube-apiserver-audit-policy.yaml"


def run_dir() -> Path:
    return Path(os.environ.get("KUBEKMS_RUN_DIR", ROOT / "e2e" / ".run"))


class Local:
    """The control plane of `make up`: one method per component, each of which starts
    the component unless it runs already."""

    def __init__(self, kubekms: Path):
        ports = Ports(
            etcd=port("KUBEKMS_ETCD_PORT", 32379), etcd_peer=port("KUBEKMS_ETCD_PEER_PORT", 32380),
            apiserver=port("KUBEKMS_APISERVER_PORT", 36443),
            controller_metrics=port("KUBEKMS_CONTROLLER_METRICS_PORT", 38080),
            plugin_metrics=port("KUBEKMS_PLUGIN_METRICS_PORT", 38081),
            server=port("KUBEKMS_SERVER_PORT", 38443), server_metrics=port("KUBEKMS_SERVER_METRICS_PORT", 38082),
            controller_manager=port("KUBEKMS_CONTROLLER_MANAGER_PORT", 30257),
            aws=port("KUBEKMS_AWS_PORT", 38445))
        self.cp = ControlPlane("kubekms-e2e", run_dir(), ports, kubekms)
        self.socket = socket_path(self.cp.run_dir, "kms.sock")
        self.encryption_config = self.cp.run_dir / "encryption-config.yaml"

    def etcd(self) -> None:
        if self.cp.process("etcd").alive():
            return
        log(f"starting etcd on http://127.0.0.1:{self.cp.ports.etcd}")
        self.cp.start_etcd()

    def kube_apiserver(self) -> None:
        if self.cp.process("kube-apiserver").alive():
            return
        log(f"starting kube-apiserver on {self.cp.server}")
        # Ready apart from the KMS provider: on a first start the key it needs does not
        # exist yet, because the CRDs and the controller come after the API server. Every
        # write to kubekms's objects is audited with the policy the README gives.
        self.cp.start_apiserver(self.encryption_config, "--encryption-provider-config-automatic-reload=true",
                                "--audit-policy-file", AUDIT_POLICY,
                                "--audit-log-path", self.cp.run_dir / "kube-apiserver-audit.log",
                                "--audit-log-format=json", "--audit-log-maxsize=100",
                                readyz="/readyz?exclude=kms-providers")

    def kube_controller_manager(self) -> None:
        if self.cp.process("kube-controller-manager").alive():
            return
        log(f"starting kube-controller-manager (health on https://127.0.0.1:{self.cp.ports.controller_manager})")
        self.cp.start_controller_manager()

    def controller(self) -> None:
        if self._runs_current_build("controller"):
            return
        kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-controller")
        log(f"starting the kubekms controller (metrics on 127.0.0.1:{self.cp.ports.controller_metrics})")
        self.cp.start_controller("controller", kubeconfig, "!kms.kubekms.io/test-controller", plugin_key=CLUSTER_KEY)
        self._record_build("controller")

    def plugin(self) -> None:
        if self._runs_current_build("plugin"):
            return
        # Without kube-apiserver the plugin starts from its cache with the kubeconfig it had.
        kubeconfig = self.cp.run_dir / "kubekms-plugin.kubeconfig"
        if self.cp.process("kube-apiserver").alive():
            kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-plugin")
        log(f"starting the kubekms KMS v2 plugin on {self.socket} (key {'/'.join(CLUSTER_KEY)})")
        self.cp.start_plugin("plugin", kubeconfig, self.socket, self.cp.run_dir / "plugin")
        self._record_build("plugin")

    def server(self) -> None:
        if self._runs_current_build("server"):
            return
        kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-server")
        log(f"starting the kubekms key API server on https://127.0.0.1:{self.cp.ports.server}"
            f" (AWS KMS API and STS on https://127.0.0.1:{self.cp.ports.aws})")
        self.cp.start_server("server", kubeconfig, self.cp.run_dir / "server" / "audit.log")
        self._record_build("server")

    # --- a rebuilt kubekms replaces the running one ----------------------------------------

    def _build_stamp(self, name: str) -> Path:
        return self.cp.run_dir / "pids" / f"{name}.binary"

    def _build(self) -> str:
        return f"{hashlib.sha256(self.cp.kubekms.read_bytes()).hexdigest()}  -\n"  # as sha256sum prints it

    def _runs_current_build(self, name: str) -> bool:
        """Whether `name` runs, and not an older build of kubekms than the current one;
        if not, it is stopped, to be started again."""
        stamp = self._build_stamp(name)
        proc = self.cp.process(name)
        if proc.alive() and not (stamp.exists() and stamp.read_text() != self._build()):
            return True
        proc.stop()
        return False

    def _record_build(self, name: str) -> None:
        self._build_stamp(name).write_text(self._build())

    # --- all of it -----------------------------------------------------------------------

    def up(self) -> None:
        cp = self.cp
        cp.run_dir.mkdir(parents=True, exist_ok=True)
        cp.prepare()
        # Secrets through the kubekms KMS v2 plugin; identity reads what was stored before.
        write_encryption_config(self.encryption_config, kms_provider("kubekms", self.socket), IDENTITY)
        self.etcd()
        # With a cache from an earlier run the plugin starts first, as it would beside a
        # restarting kube-apiserver: it serves from the cache until the API server answers.
        if (cp.run_dir / "plugin" / "key-cache-v1").is_file() and (cp.run_dir / "kubekms-plugin.kubeconfig").is_file():
            self.plugin()
        self.kube_apiserver()
        cp.install_kubekms("templates/deletion-protection.yaml", "templates/write-protection.yaml")
        self.controller()
        self.server()
        self.cluster_key()
        self.plugin()
        self.wait_kms_healthy()
        # Once the KMS provider is healthy: kube-controller-manager exits when
        # kube-apiserver's /healthz fails for its first seconds, as it does on a first start
        # until the cluster key exists.
        self.kube_controller_manager()
        self.write_env()
        log(f"control plane is up: source {cp.run_dir}/env")

    def cluster_key(self) -> None:
        """The KmsKey that encrypts the cluster's Secrets, with its first version."""
        ns, name = CLUSTER_KEY
        if self.cp.ensure_key(ns, name, "Encrypts the Secrets of the local control plane in etcd (KMS v2)"):
            log(f"created the KmsKey {ns}/{name} that encrypts the cluster's Secrets")
        self.cp.kubectl("wait", f"kmskey/{name}", "-n", ns, "--for=jsonpath={.status.keyId}", "--timeout=60s")

    def wait_kms_healthy(self) -> None:
        ns, name = CLUSTER_KEY
        state = self.cp.kubectl("get", "kmskey", name, "-n", ns, "-o", "jsonpath={.status.state}")
        if state == "Enabled":
            wait_until(90, "the KMS provider to be healthy (/healthz/kms-providers)",
                       lambda: self.cp.api_get("/healthz/kms-providers")[0] == 200, self.cp.process("kube-apiserver"))
            return
        log(f"warning: the cluster key {ns}/{name} is {state}, so Secrets cannot be written; enable it with:")
        log(f"  kubectl patch kmskey {name} -n {ns} --type merge -p '{{\"spec\":{{\"enabled\":true}}}}'")

    def write_env(self) -> None:
        r, p = self.cp.run_dir, self.cp.ports
        (r / "env").write_text(f"""\
# Written by e2e/up.sh: source it to talk to the local control plane.
export KUBECONFIG='{self.cp.kubeconfig}'
export ETCDCTL_ENDPOINTS='http://127.0.0.1:{p.etcd}'
export KUBEKMS_E2E_RUN_DIR='{r}'
{self.root_key_env()}export KMS_SOCKET='{self.socket}'
export KUBEKMS_ADDR='https://127.0.0.1:{p.server}'
export KUBEKMS_CA='{self.cp.pki / "ca.crt"}'
export KUBEKMS_CONTROLLER_METRICS='http://127.0.0.1:{p.controller_metrics}'
export KUBEKMS_PLUGIN_METRICS='http://127.0.0.1:{p.plugin_metrics}'
export KUBEKMS_SERVER_METRICS='http://127.0.0.1:{p.server_metrics}'
export KUBEKMS_AWS_ENDPOINT='https://127.0.0.1:{p.aws}'
export KUBEKMS_STS_ENDPOINT='https://127.0.0.1:{p.aws}'
export KUBEKMS_AWS_REGION='{AWS_REGION}'
export PATH='{TOOLS}':"$PATH"
""")

    def root_key_env(self) -> str:
        """The environment that gives `kubekms` commands the root key of this run directory."""
        cp = self.cp
        if cp.root_key_mode != "pkcs11":
            return f"export KUBEKMS_ROOT_KEY_FILE='{cp.root_key}'\n"
        flags = dict(zip(cp.root_key_args()[::2], cp.root_key_args()[1::2]))
        env = {"SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]}
        env |= {"KUBEKMS_" + f.removeprefix("--").replace("-", "_").upper(): v for f, v in flags.items()}
        return "".join(f"export {k}='{v}'\n" for k, v in env.items())

    def components(self) -> dict:
        """What `e2e/up.sh NAME...` can start, by name."""
        return {"etcd": self.etcd, "kube-apiserver": self.kube_apiserver,
                "kube-controller-manager": self.kube_controller_manager, "controller": self.controller,
                "plugin": self.plugin, "server": self.server}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m controlplane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the control plane, or the named components")
    up.add_argument("--kubekms", type=Path, required=True, help="the kubekms binary")
    up.add_argument("components", nargs="*", metavar="COMPONENT")
    down = commands.add_parser("down", help="stop the control plane, or the named components")
    down.add_argument("components", nargs="*", metavar="COMPONENT")
    kill = commands.add_parser("kill", help="SIGKILL the named components, as a crash would end them")
    kill.add_argument("components", nargs="+", metavar="COMPONENT")
    running = commands.add_parser("running", help="exit status 0 if the component runs")
    running.add_argument("component")
    args = parser.parse_args()

    if args.command == "running":
        return 0 if Process(args.component, run_dir()).alive() else 1
    return up_or_down(args.command, args.components, run_dir(), lambda: stop_recorded(run_dir(), STOP_ORDER),
                      lambda: Local(args.kubekms))

if __name__ == "__main__":
    sys.exit(main())
