"""`make bench`: kubekms against the Go reference KMS v2 plugin and against no encryption,
measured in one run on one machine, on a control plane of its own (see bench/README.md).

Sections, each repeated --runs times:
  plugin      Encrypt/Decrypt of kubekms and of the Go reference next to an empty gRPC call
  API server  create, get and list of Secrets with identity, aesgcm, the reference, kubekms
  cold start  kube-apiserver restarted over those Secrets: until ready, and the first list
  memory      idle and peak resident memory of the plugins, the controller and the server
  controller  KmsKeys to Enabled, one rotation of each, and the API requests it took
  key API     Encrypt and GenerateDataKey next to GenerateRandom
  AWS API     Encrypt and GenerateDataKey over the AWS API, next to local-kms
  flood       16 valid callers alone, then while a flood of bad requests hits the server
              (also on its own: --flood SECONDS, `make bench-flood`)

Run it through bench/run.sh, which builds what it needs first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The control plane is shared with `make up`: its package lives in e2e/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

import report  # noqa: E402 (after the path)
from cluster import (CONTROLLER_SA_NAMESPACE, ETCD_PREFIX, INFRA_LABEL, KEYAPI_CALLER, KEYAPI_KEY, PROVIDERS, BenchPlane,
                     Layout)
from components import Components
from controlplane.cluster import AWS_REGION, CLUSTER_KEY, KUBEKMS_NAMESPACE
from controlplane.procs import Failure, log, run, stop_all, stop_recorded, wait_until

SECTIONS = ("plugin", "API server", "cold start", "memory", "controller", "key API", "AWS API", "flood")


@dataclass
class Sizes:
    runs: int
    plugin_calls: int  # per measurement of `kubekms bench plugin`
    secrets: int
    secret_bytes: int
    lists: int  # full lists measured per run
    concurrency: int  # concurrent API requests of the load generator
    keys: int
    keyapi_calls: int  # per measurement of `kubekms bench keyapi`
    flood_seconds: int  # each phase of `kubekms bench flood` (alone, flooded)


FULL = Sizes(runs=5, plugin_calls=20000, secrets=5000, secret_bytes=4096, lists=5, concurrency=16,
             keys=1000, keyapi_calls=5000, flood_seconds=60)
SMOKE = Sizes(runs=1, plugin_calls=200, secrets=40, secret_bytes=4096, lists=2, concurrency=16,
              keys=10, keyapi_calls=100, flood_seconds=4)

SECRETS_NAMESPACE = "bench-secrets"
KEYS_NAMESPACE = "bench-keys"
MIB = 1024.0


class Suite:
    def __init__(self, layout: Layout, sizes: Sizes):
        self.l = layout
        self.sizes = sizes
        self.cp = BenchPlane(layout)
        self.c = Components(self.cp)
        self.samples: list[dict] = []
        self.details: dict = {"controller_requests": []}

    def add(self, section: str, measure: str, unit: str, better: str | None, subject: str, run_: int,
            value: float, base: float | None = None) -> None:
        self.samples.append({"section": section, "measure": measure, "unit": unit, "better": better,
                             "subject": subject, "run": run_, "value": value, "base": base})

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        """A new run directory, etcd, kube-apiserver (identity), the kubekms CRDs and RBAC,
        and the two keys the plugin and the key API use, enabled by a setup controller that
        is stopped again before anything is measured."""
        self.l.check_ports_free()
        marker = self.l.run_dir / ".kubekms-bench"
        if self.l.run_dir.exists():
            if any(self.l.run_dir.iterdir()) and not marker.exists():
                raise Failure(f"{self.l.run_dir} is not empty and was not made by the benchmark; "
                              "refusing to delete it (set KUBEKMS_BENCH_RUN_DIR to another directory)")
            shutil.rmtree(self.l.run_dir)
        self.l.run_dir.mkdir(parents=True)
        marker.write_text("state of a kubekms benchmark run; deleted by the next run\n")
        log(f"preparing {self.l.run_dir}")
        self.cp.prepare()
        self.cp.start_etcds()
        log("starting kube-apiserver")
        self.cp.start_apiserver_with("identity")
        self.cp.install_kubekms()
        caller_ns, caller = KEYAPI_CALLER
        self.cp.apply(f"""\
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {caller}, namespace: {caller_ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {caller}-keys, namespace: {caller_ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kubekms-key-user}}
subjects: [{{kind: ServiceAccount, name: {caller}, namespace: {caller_ns}}}]
""")
        log("creating the cluster key and the key API's key")
        kubeconfig = self.cp.service_account_kubeconfig(KUBEKMS_NAMESPACE, "kubekms-controller")
        controller = self.c.start_controller("setup-controller", kubeconfig, INFRA_LABEL, plugin_key=CLUSTER_KEY)
        for ns, name in (CLUSTER_KEY, KEYAPI_KEY):
            self.cp.create_key(ns, name, INFRA_LABEL)
        for ns, name in (CLUSTER_KEY, KEYAPI_KEY):
            self.cp.wait_key_enabled(ns, name)
        controller.stop()

    # --- plugin --------------------------------------------------------------------------

    def bench_plugin(self, socket: Path, out: Path) -> list[dict]:
        run([self.l.kubekms, "bench", "plugin", "--socket", socket, "--calls", self.sizes.plugin_calls,
             "--concurrency", "1,16", "--json", out], "kubekms bench plugin")
        return json.loads(out.read_text())

    def plugin_section(self, r: int) -> None:
        """Both plugins started afresh; each measured by `kubekms bench plugin` against its own
        floor; the order alternates between runs."""
        procs = {"kubekms": self.c.start_kubekms_plugin(), "reference": self.c.start_reference_plugin()}
        sockets = {"kubekms": self.l.kubekms_socket, "reference": self.l.reference_socket}
        time.sleep(1)
        for subject, proc in procs.items():
            memory = proc.memory_kib()
            self.add("memory", "plugin, idle", "MiB", "lower", subject, r, memory["VmRSS"] / MIB)
            self.add("memory", "plugin, idle, anonymous (not the executable's pages)", "MiB", "lower", subject, r,
                     memory["RssAnon"] / MIB)
        order = ["kubekms", "reference"] if r % 2 else ["reference", "kubekms"]
        for subject in order:
            cpu = procs[subject].cpu_seconds()
            rows = self.bench_plugin(sockets[subject], self.l.run_dir / f"plugin-{subject}-{r}.json")
            cpu = procs[subject].cpu_seconds() - cpu
            self.add_bench_rows("plugin", "kubekms bench plugin", rows, ("floor", "empty call"), "floor",
                                ("plugin", ("Encrypt", "Decrypt")), subject, r)
            # CPU time is what the plugin costs the node, whatever else the machine is doing.
            # The few warm-up calls of each measurement count in the time, not in the calls.
            calls = sum(row["calls"] for row in rows if row["target"] == "plugin")
            self.add("plugin", "plugin CPU time per call (Encrypt and Decrypt)", "µs", "lower", subject, r,
                     cpu / calls * 1e6)
        for subject, proc in procs.items():
            self.add("memory", "plugin, peak after the plugin load", "MiB", "lower", subject, r,
                     proc.memory_kib()["VmHWM"] / MIB)
            proc.stop()

    def add_bench_rows(self, section: str, tool: str, rows: list[dict], floor: tuple[str, str], baseline: str,
                       measured: tuple[str, tuple[str, ...]], subject: str, r: int) -> None:
        """Samples from the JSON rows of `kubekms bench plugin|keyapi`: for each operation of
        `measured` (target, operations) at 1 and 16 callers, calls/s, p50 and p99 of `subject`,
        each next to the `floor` (target, operation) of the same invocation, which is the
        row's baseline, named `baseline`."""
        def find(target: str, op: str, n: int) -> dict:
            for row in rows:
                if row["target"] == target and row["operation"] == op and row["concurrency"] == n:
                    return row
            raise Failure(f"`{tool}` gave no {target} {op} row at {n} callers")

        target, ops = measured
        for op in ops:
            for n in (1, 16):
                base, got = find(*floor, n), find(target, op, n)
                callers = "1 caller" if n == 1 else f"{n} callers"
                for measure, field, unit, better in ((f"{op}, {callers}", "calls_per_second", "calls/s", "higher"),
                                                     (f"{op} p50, {callers}", "p50_us", "µs", "lower"),
                                                     (f"{op} p99, {callers}", "p99_us", "µs", "lower")):
                    self.add(section, measure, unit, better, baseline, r, base[field])
                    self.add(section, measure, unit, better, subject, r, got[field], base=base[field])

    # --- API server ----------------------------------------------------------------------

    def apiserver_section(self, r: int) -> None:
        """Per provider: an empty Secrets etcd, kube-apiserver started with the provider,
        N Secrets created, read and listed, a check that etcd holds them as the provider
        writes them, then a restart and the first full list."""
        s = self.sizes
        order = list(PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[:r % len(PROVIDERS)])
        results: dict[str, dict] = {}
        for provider in order:
            self.cp.stop_apiserver()
            self.cp.reset_secrets()
            log(f"run {r}: API server with {provider}")
            self.cp.start_apiserver_with(provider)
            cpu = self.cp.apiserver.cpu_seconds()
            res = self.cp.loadgen("secrets", "--namespace", SECRETS_NAMESPACE, "--count", str(s.secrets),
                                  "--size", str(s.secret_bytes), "--concurrency", str(s.concurrency),
                                  "--lists", str(s.lists))
            res["cpu"] = self.cp.apiserver.cpu_seconds() - cpu
            stored = self.cp.stored_secret(SECRETS_NAMESPACE, "s-00000")
            if not stored.startswith(ETCD_PREFIX[provider]):
                raise Failure(f"with {provider}, etcd holds a Secret starting {stored[:32]!r}, "
                              f"not {ETCD_PREFIX[provider]!r}: the provider is not in use")
            self.cp.stop_apiserver()
            ready = self.cp.start_apiserver_with(provider)
            first = self.cp.loadgen("list", "--namespace", SECRETS_NAMESPACE, "--expect", str(s.secrets))
            res["cold"] = {"ready": ready, "list": first["seconds"]}
            results[provider] = res

        n = f"{s.secrets:,}"
        size = f"{s.secret_bytes // 1024} KiB" if s.secret_bytes % 1024 == 0 else f"{s.secret_bytes} B"
        measures = [
            ("API server", f"create {n} Secrets of {size}, {s.concurrency} clients", "Secrets/s", "higher",
             lambda x: x["create"]["per_second"]),
            ("API server", "create p50", "ms", "lower", lambda x: x["create"]["p50_ms"]),
            ("API server", "create p99", "ms", "lower", lambda x: x["create"]["p99_ms"]),
            ("API server", f"get each Secret, {s.concurrency} clients", "Secrets/s", "higher",
             lambda x: x["get"]["per_second"]),
            ("API server", "get p50", "ms", "lower", lambda x: x["get"]["p50_ms"]),
            ("API server", "get p99", "ms", "lower", lambda x: x["get"]["p99_ms"]),
            ("API server", f"list all {n}, p50 of {s.lists}", "ms", "lower", lambda x: x["list"]["p50_ms"]),
            ("API server", "kube-apiserver CPU time for all of the above", "s", "lower", lambda x: x["cpu"]),
            ("cold start", "restart → ready", "s", "lower", lambda x: x["cold"]["ready"]),
            ("cold start", f"first full list ({n})", "s", "lower", lambda x: x["cold"]["list"]),
            ("cold start", "restart → first list done", "s", "lower",
             lambda x: x["cold"]["ready"] + x["cold"]["list"]),
        ]
        for section, measure, unit, better, get in measures:
            base = get(results["identity"])
            for provider in PROVIDERS:
                value = get(results[provider])
                self.add(section, measure, unit, better, provider, r, value,
                         base=None if provider == "identity" else base)

    # --- controller ----------------------------------------------------------------------

    def controller_section(self, r: int) -> None:
        """A fresh controller, as its own ServiceAccount (audited), for a label of its own:
        K keys created and enabled, then each rotated once; then the keys are removed."""
        s = self.sizes
        sa = f"ctl-{r}"
        self.cp.apply(f"""\
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {sa}, namespace: {CONTROLLER_SA_NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: kubekms-bench-{sa}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kubekms-controller}}
subjects: [{{kind: ServiceAccount, name: {sa}, namespace: {CONTROLLER_SA_NAMESPACE}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: kubekms-bench-{sa}, namespace: {KUBEKMS_NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: kubekms-controller-leader}}
subjects: [{{kind: ServiceAccount, name: {sa}, namespace: {CONTROLLER_SA_NAMESPACE}}}]
""")
        kubeconfig = self.cp.service_account_kubeconfig(CONTROLLER_SA_NAMESPACE, sa)
        label = f"bench.kubekms.io/run=ctl-{r}"
        log(f"run {r}: controller with {s.keys:,} KmsKeys")
        controller = self.c.start_controller(f"controller-{r}", kubeconfig, label)
        time.sleep(1)
        idle = controller.memory_kib()["VmRSS"]
        res = self.cp.loadgen("keys", "--namespace", KEYS_NAMESPACE, "--count", str(s.keys), "--label", label,
                              "--concurrency", str(s.concurrency))
        after = controller.memory_kib()
        controller.stop()
        requests = self.count_requests(f"system:serviceaccount:{CONTROLLER_SA_NAMESPACE}:{sa}")
        self.details["controller_requests"].append({"run": r, **requests})
        self.cp.loadgen("delete-keys", "--namespace", KEYS_NAMESPACE, "--label", label,
                        "--concurrency", str(s.concurrency))

        k = f"{s.keys:,}"
        self.add("controller", f"{k} KmsKeys created → all Enabled", "s", "lower", "kubekms", r,
                 res["enabled_seconds"])
        self.add("controller", f"{k} rotations requested → all rotated", "s", "lower", "kubekms", r,
                 res["rotated_seconds"])
        self.add("controller", "API requests of the controller (create + rotate)", "requests", "lower", "kubekms", r,
                 requests["total"])
        self.add("controller", "API requests per key", "requests", "lower", "kubekms", r, requests["total"] / s.keys)
        self.add("memory", "controller, idle", "MiB", "lower", "kubekms", r, idle / MIB)
        self.add("memory", f"controller, peak during {k} keys", "MiB", "lower", "kubekms", r, after["VmHWM"] / MIB)
        self.add("memory", f"controller, resident after {k} keys", "MiB", "lower", "kubekms", r, after["VmRSS"] / MIB)

    def count_requests(self, user: str) -> dict:
        """The API requests `user` made, from the audit log: distinct audit IDs (a watch logs
        two stages), by verb and resource."""
        ids: dict[str, str] = {}
        with open(self.cp.audit_log, encoding="utf-8") as f:
            for line in f:
                event = json.loads(line)
                if event.get("user", {}).get("username") != user:
                    continue
                ref = event.get("objectRef") or {}
                resource = ref.get("resource", "-") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                ids.setdefault(event["auditID"], f"{event['verb']} {resource}")
        if not ids:
            raise Failure(f"the audit log has no request of {user}; is auditing on?")
        by_kind: dict[str, int] = {}
        for kind in ids.values():
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return {"total": len(ids), "by_verb_and_resource": dict(sorted(by_kind.items()))}

    # --- key API -------------------------------------------------------------------------

    def keyapi_section(self, r: int) -> None:
        s = self.sizes
        server = self.c.start_server()
        time.sleep(1)
        idle = server.memory_kib()["VmRSS"]
        out = self.l.run_dir / f"keyapi-{r}.json"
        run([self.l.kubekms, "bench", "keyapi", "--key", "/".join(KEYAPI_KEY),
             "--service-account", "/".join(KEYAPI_CALLER), "--server", f"https://127.0.0.1:{self.l.ports.server}",
             "--ca", self.l.pki / "ca.crt", "--calls", s.keyapi_calls, "--concurrency", "1,16", "--json", out],
            "kubekms bench keyapi", env={"KUBECONFIG": str(self.cp.kubeconfig)})
        aws_rows = self.aws_load(r)
        peak = server.memory_kib()["VmHWM"]
        server.stop()
        rows = json.loads(out.read_text())
        self.add_bench_rows("key API", "kubekms bench keyapi", rows, ("floor", "GenerateRandom"), "GenerateRandom",
                            ("kubekms", ("Encrypt", "GenerateDataKey")), "kubekms", r)
        self.add_aws_rows(aws_rows, rows, r)
        self.add("memory", "server, idle", "MiB", "lower", "kubekms", r, idle / MIB)
        self.add("memory", "server, peak after the key API load", "MiB", "lower", "kubekms", r, peak / MIB)

    # --- AWS API -------------------------------------------------------------------------

    def aws_load(self, r: int) -> list[dict]:
        """bench/awsload (the AWS SDK for Go v2) against kubekms's AWS API, with credentials
        from its STS endpoint for the key API caller's ServiceAccount token, and against a
        fresh local-kms with a key it creates: the same calls, sizes and callers."""
        s, ports = self.sizes, self.l.ports
        caller_ns, caller = KEYAPI_CALLER
        token = self.l.run_dir / "aws-caller.token"
        token.write_text(self.cp.kubectl("create", "token", caller, "-n", caller_ns, "--audience", "kubekms",
                                         "--duration", "1h").strip())
        clean = {k: "" for k in os.environ if k.startswith("AWS_")}
        common = {**clean, "AWS_REGION": AWS_REGION, "AWS_CONFIG_FILE": "/dev/null",
                  "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_EC2_METADATA_DISABLED": "true"}
        kubekms_env = {**common, "AWS_ROLE_ARN": f"arn:aws:iam::{caller_ns}:role/{caller}",
                       "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_SESSION_NAME": "bench",
                       "AWS_ENDPOINT_URL_STS": f"https://127.0.0.1:{ports.aws}",
                       "AWS_CA_BUNDLE": str(self.l.pki / "ca.crt")}
        load = [self.l.bench_bin / "awsload", "--calls", s.keyapi_calls, "--concurrency", "1,16"]
        out = self.l.run_dir / f"aws-kubekms-{r}.json"
        run([*load, "--endpoint", f"https://127.0.0.1:{ports.aws}", "--key", "/".join(KEYAPI_KEY),
             "--target", "kubekms", "--json", out], "awsload against kubekms", env=kubekms_env)
        rows = json.loads(out.read_text())
        data = self.l.run_dir / f"local-kms-{r}"
        shutil.rmtree(data, ignore_errors=True)
        local = self.cp.process("local-kms").start(
            [self.l.bench_bin / "local-kms"],
            env={"PORT": str(self.l.local_kms_port), "KMS_DATA_PATH": str(data), "KMS_REGION": AWS_REGION,
                 "KMS_ACCOUNT_ID": "111122223333"})
        wait_until(30, "local-kms to listen", lambda: port_open(self.l.local_kms_port), local, 0.1)
        out = self.l.run_dir / f"aws-local-kms-{r}.json"
        try:
            run([*load, "--endpoint", f"http://127.0.0.1:{self.l.local_kms_port}", "--create-key",
                 "--target", "local-kms", "--json", out], "awsload against local-kms",
                env={**common, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
        finally:
            local.stop()
        return rows + json.loads(out.read_text())

    def add_aws_rows(self, aws: list[dict], grpc: list[dict], r: int) -> None:
        """Encrypt and GenerateDataKey at 1 and 16 callers: kubekms over the AWS API (the
        Go SDK) and over gRPC (`kubekms bench keyapi`, same run), each next to local-kms
        measured by the same Go client in the same run."""
        def find(rows: list[dict], target: str, op: str, n: int) -> dict:
            for row in rows:
                if row["target"] == target and row["operation"] == op and row["concurrency"] == n:
                    return row
            raise Failure(f"no {target} {op} row at {n} callers")

        for op in ("Encrypt", "GenerateDataKey"):
            for n in (1, 16):
                base = find(aws, "local-kms", op, n)
                callers = "1 caller" if n == 1 else f"{n} callers"
                for api, got in (("AWS API, Go SDK", find(aws, "kubekms", op, n)),
                                 ("gRPC API", find(grpc, "kubekms", op, n))):
                    for measure, field, unit, better in (
                            (f"{op}, {callers}, {api}", "calls_per_second", "calls/s", "higher"),
                            (f"{op} p50, {callers}, {api}", "p50_us", "µs", "lower"),
                            (f"{op} p99, {callers}, {api}", "p99_us", "µs", "lower")):
                        self.add("AWS API", measure, unit, better, "local-kms", r, base[field])
                        self.add("AWS API", measure, unit, better, "kubekms", r, got[field], base=base[field])

    # --- flood ---------------------------------------------------------------------------

    def flood_section(self, r: int) -> None:
        """`kubekms bench flood` against a fresh server: 16 valid callers (Encrypt, then
        Decrypt) for flood_seconds alone, then as long again while junk and expired tokens,
        oversized requests, forged AWS sessions, junk STS tokens and idle connections hit
        both of its ports; the server's VmRSS sampled throughout."""
        s, ports = self.sizes, self.l.ports
        server = self.c.start_server()
        out = self.l.run_dir / f"flood-{r}.json"
        run([self.l.kubekms, "bench", "flood", "--key", "/".join(KEYAPI_KEY),
             "--service-account", "/".join(KEYAPI_CALLER), "--server", f"https://127.0.0.1:{ports.server}",
             "--ca", self.l.pki / "ca.crt", "--aws-endpoint", f"https://127.0.0.1:{ports.aws}",
             "--aws-region", AWS_REGION, "--callers", 16, "--duration", f"{s.flood_seconds}s",
             "--server-pid", server.pid, "--json", out],
            "kubekms bench flood", env={"KUBECONFIG": str(self.cp.kubeconfig)})
        if not server.alive():
            raise Failure("the server died under the flood (see its log in the run directory)")
        server.stop()
        report_ = json.loads(out.read_text())
        phases = {p["name"]: p for p in report_["phases"]}
        for name, p in phases.items():
            if p["calls"] == 0:
                raise Failure(f"the valid callers made no call in the {name} phase")
        for kind, answers in report_["flood"].items():
            if "OK (accepted!)" in answers:
                raise Failure(f"the server accepted a bad request: {kind}")
            if not answers:
                raise Failure(f"the flood sent nothing of: {kind}")
        # The limits under test answer as documented (each kind may also see closed connections).
        for kind, expected in (("gRPC, 256 KiB Encrypt (limit 64 KiB)", "OutOfRange"),
                               ("gRPC, expired token", "Unauthenticated"),
                               ("AWS, 256 KiB Encrypt body (limit 64 KiB)", "HTTP 413 ValidationException")):
            if expected not in report_["flood"].get(kind, {}):
                raise Failure(f"{kind}: expected {expected}, got {report_['flood'].get(kind)}")
        self.details.setdefault("flood", []).append({"run": r, **report_})
        alone, flooded = phases["alone"], phases["flood"]
        if alone["errors"]:
            raise Failure(f"valid calls failed without any flood: {alone['errors']}")
        if flooded["errors"]:
            raise Failure(f"the flood made valid calls fail: {flooded['errors']}")
        for measure, field, unit, better, scale in (
                ("valid callers' calls/s", "calls_per_second", "calls/s", "higher", 1),
                ("valid callers' p50", "p50_us", "µs", "lower", 1),
                ("valid callers' p99", "p99_us", "µs", "lower", 1),
                ("valid callers' error rate", "error_rate", "%", "lower", 100),
                ("server VmRSS, peak", "rss_peak_kib", "MiB", "lower", 1 / MIB),
                ("server VmRSS, end of the phase", "rss_end_kib", "MiB", "lower", 1 / MIB)):
            base = alone[field] * scale
            self.add("flood", measure, unit, better, "alone", r, base)
            self.add("flood", measure, unit, better, "kubekms", r, flooded[field] * scale, base=base or None)
        for kind, answers in sorted(report_["flood"].items()):
            self.add("flood", f"flood requests: {kind}", "count", None, "kubekms", r, sum(answers.values()))

    # --- the whole run -------------------------------------------------------------------

    def run_flood(self) -> None:
        """`make bench-flood`: the setup, then only the flood section."""
        self.setup()
        for r in range(1, self.sizes.runs + 1):
            log(f"run {r}: flood ({self.sizes.flood_seconds} s alone, then as long flooded)")
            self.flood_section(r)

    def run_all(self) -> None:
        runs = range(1, self.sizes.runs + 1)
        self.setup()
        for r in runs:
            log(f"run {r}: plugins")
            self.plugin_section(r)
        # Both plugins stay up from here on, as they would beside kube-apiserver.
        self.c.start_kubekms_plugin()
        self.c.start_reference_plugin()
        for r in runs:
            self.apiserver_section(r)
        for r in runs:
            self.controller_section(r)
        for r in runs:
            log(f"run {r}: key API")
            self.keyapi_section(r)
        # Once, not per run: its two phases are minutes long and each is its own reference.
        log("flood")
        self.flood_section(1)


def port_open(number: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", number)) == 0


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"machine": f"{os.cpu_count()} CPUs ({cpu}), {mem_gib:.0f} GiB, Linux {platform.release()}"}


def versions(layout: Layout) -> dict:
    def out(argv: list, default: str = "unknown") -> str:
        try:
            return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=30,
                                  cwd=layout.root).stdout.strip() or default
        except OSError:
            return default

    commit = out(["git", "rev-parse", "--short", "HEAD"])
    # The kubekms binary is built from the working tree: say when its sources differ from HEAD.
    if out(["git", "status", "--porcelain", "--", "src", "proto", "build.rs", "Cargo.toml", "Cargo.lock"], ""):
        commit += " (with uncommitted changes)"
    kms = out(["go", "-C", layout.root / "bench" / "reference-plugin", "list", "-m", "-f", "{{.Version}}",
               "k8s.io/kms"])
    return {
        "kubekms": commit,
        "kube-apiserver": out([layout.e2e_bin / "kube-apiserver", "--version"]).split()[-1],
        "etcd": out([layout.e2e_bin / "etcd", "--version"]).splitlines()[0].split()[-1],
        "reference plugin": f"k8s.io/kms {kms}, {out(['go', 'env', 'GOVERSION'])}",
        "rustc": out(["rustc", "--version"]),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run: checks that everything works")
    parser.add_argument("--runs", type=int, help=f"repetitions of every section (default {FULL.runs}, smoke 1)")
    parser.add_argument("--out", type=Path,
                        help="directory for the results (default bench/results; smoke: bench/.smoke-results)")
    parser.add_argument("--kubekms", type=Path, required=True,
                        help="the kubekms binary (run.sh gives the release build; the debug build for --smoke)")
    parser.add_argument("--flood", type=int, metavar="SECONDS",
                        help="run only the flood section, each of its two phases this long (1 run unless --runs)")
    sized = {"secrets": "Secrets created, read and listed", "keys": "KmsKeys for the controller",
             "plugin_calls": "calls per plugin measurement", "keyapi_calls": "calls per key API measurement"}
    for field, what in sized.items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, metavar="N",
                            help=f"{what} (default {getattr(FULL, field)}, smoke {getattr(SMOKE, field)})")
    args = parser.parse_args()

    args.sizes = SMOKE if args.smoke else FULL
    if args.runs is not None:
        if not 1 <= args.runs <= 20:
            parser.error("--runs must be from 1 to 20")
        args.sizes = replace(args.sizes, runs=args.runs)
    for field in sized:
        value = getattr(args, field)
        if value is not None:
            if not 1 <= value <= 1_000_000:
                parser.error(f"--{field.replace('_', '-')} must be from 1 to 1000000")
            args.sizes = replace(args.sizes, **{field: value})
    if args.flood is not None:
        if not 1 <= args.flood <= 3600:
            parser.error("--flood must be from 1 to 3600 seconds")
        args.sizes = replace(args.sizes, flood_seconds=args.flood, runs=args.runs or 1)
    if not (args.kubekms.is_file() and os.access(args.kubekms, os.X_OK)):
        parser.error(f"--kubekms {args.kubekms} is not an executable file")
    return args


def main() -> int:
    args = parse_args()
    root = Path(__file__).resolve().parent.parent
    run_dir = Path(os.environ.get("KUBEKMS_BENCH_RUN_DIR", root / "bench" / ".run")).resolve()
    out_dir = args.out or root / "bench" / (".smoke-results" if args.smoke else "results")

    # SIGTERM (make interrupted, CI cancelled) unwinds like Ctrl-C, so every process stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        layout = Layout(root=root, run_dir=run_dir, kubekms=args.kubekms.resolve())
        stop_recorded(run_dir)  # what a run that was killed outright left behind
        suite = Suite(layout, args.sizes)
        suite.run_flood() if args.flood is not None else suite.run_all()
    except Failure as e:
        log(f"error: {e}")
        return 1
    finally:
        stop_all()
    mode = "smoke" if args.smoke else "flood" if args.flood is not None else "full"
    meta = {"mode": mode}
    if args.smoke:
        meta["note"] = "debug build and tiny sizes: this run checks that the benchmark works; its numbers mean nothing"
    meta.update({"date": time.strftime("%Y-%m-%d %H:%M %Z"), **machine(), **versions(layout),
                 "sizes": asdict(args.sizes), "duration": f"{(time.monotonic() - started) / 60:.1f} min"})
    rows = report.aggregate(suite.samples, SECTIONS)
    name = {"smoke": "smoke", "flood": "flood", "full": "latest"}[mode]
    md, js = report.write(out_dir, name, rows, meta, suite.samples, suite.details)
    print(report.markdown(rows, meta))
    log(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
