"""Crash consistency under load (`make chaos`, and a short run in `make test`).

A control plane of its own (run directory e2e/.run-chaos, ports from --port-base) under a
steady load: a writer creating and updating Secrets with unique content, a reader reading
them back, and a key-API caller encrypting and decrypting through `kubekms encrypt` and
`kubekms decrypt`. Round after round it kills each target with SIGKILL at a random moment
and restarts it after a random short delay, as a kubelet would: the plugin, kube-apiserver,
etcd, the controller (at any moment, in the middle of a rotation, in the middle of a
deletion being scheduled) and the key API server. After each round it checks:

  - every Secret whose write was acknowledged (HTTP 2xx) reads back through kube-apiserver
    (so through the plugin) with the content last acknowledged, and etcd holds every
    Secret envelope-encrypted by kubekms, with no plaintext;
  - every KmsKey's versions, in its material and in its status, are 1..n with nothing
    duplicated, skipped or lost, and n is one more than the rotations asked for;
  - a deletion interrupted by the kill is scheduled once, at the time of its request;
  - `kubekms audit verify` passes on the controller's, the plugin's and the key API
    server's audit logs (a line cut by a kill is reported, never a silent gap), each a
    series of files that rotate every --audit-log-max-size (2Ki) and are checked as one
    chain, so that kills land in the middle of rotations;
  - no process leaked: every component runs as the process the supervisor started, and no
    other process of the run directory is left.

The seed of the random schedule is printed at the start (--seed replays it); the table at
the end gives, per target, the rounds survived, the longest write outage, the key API's
error rate, and overall the Secrets written and lost. Exit status 1 at the first failed
check, with the round and the seed.

  e2e/chaos.sh [--rounds N] [--targets a,b] [--seed S] [--smoke]   (builds, then runs this)
"""

from __future__ import annotations

import argparse
import base64
import calendar
import http.client
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from controlplane.procs import Failure, Process, log, stop_recorded  # noqa: E402

NAMESPACE = "chaos"
PREFIX = b"k8s:enc:kms:v2:kubekms:"
TARGETS = ("plugin", "kube-apiserver", "etcd", "controller", "controller-rotation", "controller-deletion",
           "server")
# The environment variables of the control plane's ports, in the order they get ports
# from --port-base.
PORT_VARS = ("KUBEKMS_ETCD_PORT", "KUBEKMS_ETCD_PEER_PORT", "KUBEKMS_APISERVER_PORT",
             "KUBEKMS_CONTROLLER_METRICS_PORT", "KUBEKMS_PLUGIN_METRICS_PORT", "KUBEKMS_SERVER_PORT",
             "KUBEKMS_SERVER_METRICS_PORT", "KUBEKMS_CONTROLLER_MANAGER_PORT", "KUBEKMS_AWS_PORT")


class CheckFailed(Exception):
    """A round's check found a broken promise."""


def eventually(timeout: float, what: str, check, interval: float = 0.5):
    """Calls `check` until it returns something other than None; CheckFailed after
    `timeout` seconds, with the last error it raised."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = check()
            if value is not None:
                return value
        except (Failure, OSError, KeyError, ValueError, CheckFailed) as e:
            last = e
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else ""))
        time.sleep(interval)


# --- the load ------------------------------------------------------------------------------

class Api:
    """kube-apiserver's REST API as the admin, one connection per request (a restarted
    API server is found again at once)."""

    def __init__(self, pki: Path, port: int):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
        """The status code and body; 0 when no answer came (refused, reset, timed out)."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            return 0, b""
        finally:
            conn.close()


def secret_body(name: str, content: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {"value": base64.b64encode(content.encode()).decode()}}


@dataclass
class Written:
    """What the writer knows of one Secret: the content last acknowledged, and the contents
    of writes that got no acknowledgement (they may or may not have been applied). After
    such a write the name is written no more, so what it may hold stays known."""
    acked: str | None = None
    maybe: set[str] = field(default_factory=set)

    def allowed(self) -> set[str]:
        return self.maybe | ({self.acked} if self.acked is not None else set())


class Load:
    """The writer, the reader and the key-API caller, each a thread, pausable for the
    checks; every operation is recorded as (time, ok)."""

    def __init__(self, api: Api, rng: random.Random, key_api: list[str], rate: float):
        self.api = api
        self.rng = random.Random(rng.random())
        self.key_api = key_api  # the `kubekms` command line up to the verb's own flags
        self.rate = rate
        self.lock = threading.Lock()
        self.secrets: dict[str, Written] = {}
        self.retired: set[str] = set()
        self.writes: list[tuple[float, bool]] = []
        self.key_calls: list[tuple[float, bool]] = []
        self.reads = 0
        self.read_failures = 0
        self.mismatches: list[str] = []
        self.counter = 0
        self.busy = 0  # operations in flight
        self.running = threading.Event()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True, name=f.__name__)
                        for f in (self.writer, self.reader, self.key_caller)]

    def start(self) -> None:
        self.running.set()
        for t in self.threads:
            t.start()

    def pause(self) -> None:
        """Stops issuing operations; returns once none is in flight."""
        with self.lock:
            self.running.clear()
        while True:
            with self.lock:
                if self.busy == 0:
                    return
            time.sleep(0.05)

    def resume(self) -> None:
        self.running.set()

    def stop(self) -> None:
        self.stopped.set()
        self.running.set()
        for t in self.threads:
            t.join(timeout=30)

    def _wait_turn(self, period: float) -> bool:
        """Waits `period`, then until the load runs; counts the operation that follows as in
        flight until `_done`."""
        time.sleep(period)
        while True:
            with self.lock:
                if self.stopped.is_set():
                    return False
                if self.running.is_set():
                    self.busy += 1
                    return True
            time.sleep(0.05)

    def _done(self) -> None:
        with self.lock:
            self.busy -= 1

    def writer(self) -> None:
        while self._wait_turn(1 / self.rate):
            with self.lock:
                self.counter += 1
                n = self.counter
                updatable = [k for k, w in self.secrets.items() if w.acked is not None and k not in self.retired]
                content = f"chaos-{n}-{uuid.uuid4().hex}"
                if updatable and self.rng.random() < 0.3:
                    name, method = self.rng.choice(updatable), "PUT"
                else:
                    name, method = f"w-{n:06d}", "POST"
                written = self.secrets.setdefault(name, Written())
                written.maybe.add(content)  # in flight
            path = f"/api/v1/namespaces/{NAMESPACE}/secrets" + (f"/{name}" if method == "PUT" else "")
            code, _ = self.api.request(method, path, secret_body(name, content))
            with self.lock:
                ok = 200 <= code < 300
                if ok:
                    written.acked = content
                    written.maybe.discard(content)
                else:
                    self.retired.add(name)
                self.writes.append((time.monotonic(), ok))
                self.busy -= 1

    def reader(self) -> None:
        while self._wait_turn(0.5):
            with self.lock:
                names = [k for k, w in self.secrets.items() if w.acked is not None]
                name = self.rng.choice(names) if names else None
                before = self.secrets[name].allowed() if name else set()
            if name is None:
                self._done()
                continue
            code, body = self.api.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}")
            with self.lock:
                allowed = before | self.secrets[name].allowed()
                self.reads += 1
                self.busy -= 1
                if code != 200:
                    self.read_failures += 1
                    continue
                try:
                    value = base64.b64decode(json.loads(body)["data"]["value"]).decode()
                except (ValueError, KeyError, TypeError) as e:
                    value = f"(unreadable: {e})"
                if value not in allowed:
                    self.mismatches.append(f"{name} read {value!r}, written {sorted(allowed)}")

    def key_caller(self) -> None:
        while self._wait_turn(0.5):
            plaintext = f"key-api-{uuid.uuid4().hex}".encode()
            ok = False
            try:
                enc = subprocess.run([*self.key_api[:1], "encrypt", *self.key_api[1:], "--key", f"{NAMESPACE}/app"],
                                     input=plaintext, capture_output=True, timeout=20)
                if enc.returncode == 0:
                    dec = subprocess.run([*self.key_api[:1], "decrypt", *self.key_api[1:]], input=enc.stdout,
                                         capture_output=True, timeout=20)
                    ok = dec.returncode == 0 and dec.stdout == plaintext
            except (subprocess.TimeoutExpired, OSError):
                ok = False
            with self.lock:
                self.key_calls.append((time.monotonic(), ok))
                self.busy -= 1


def longest_outage(writes: list[tuple[float, bool]], since: float) -> float:
    """The longest time from a failed write (at or after `since`) to the next acknowledged
    one; a failure with no acknowledgement after it counts up to the last write."""
    longest, first_fail = 0.0, None
    for t, ok in writes:
        if t < since:
            continue
        if not ok and first_fail is None:
            first_fail = t
        elif ok and first_fail is not None:
            longest, first_fail = max(longest, t - first_fail), None
    if first_fail is not None and writes:
        longest = max(longest, writes[-1][0] - first_fail)
    return longest


# --- the control plane ---------------------------------------------------------------------

class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_dir = args.run_dir
        os.environ["KUBEKMS_RUN_DIR"] = str(self.run_dir)
        for i, var in enumerate(PORT_VARS):
            os.environ[var] = str(args.port_base + i)
        os.environ.pop("ETCDCTL_ENDPOINTS", None)
        from controlplane.__main__ import Local  # reads the ports from the environment
        self.local = Local(args.kubekms)
        self.cp = self.local.cp
        self.kubekms = str(args.kubekms)
        self.rotations = 0  # asked of the cluster key since the start
        self.cluster_versions_at_start = 0
        self.results: dict[str, dict] = {t: {"rounds": 0, "outage": 0.0, "key_calls": 0, "key_errors": 0}
                                         for t in args.targets}
        self.self_exits: dict[str, int] = {}
        self.lost: int | None = None  # of the last check of the Secrets
        self.cut_lines: dict[str, int] = {}
        self.rotated_files: dict[str, int] = {}

    # --- kubectl and the objects ---

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return self.cp.kubectl(*args, stdin=stdin)

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def setup(self) -> None:
        if self.run_dir.exists():
            stop_recorded(self.run_dir)
            shutil.rmtree(self.run_dir)
        self.local.up()
        self.cp.create_namespace(NAMESPACE)
        self.cp.apply(f"""\
apiVersion: kms.kubekms.io/v1alpha1
kind: KmsKey
metadata: {{name: app, namespace: {NAMESPACE}}}
spec: {{description: the chaos test's key API caller's key}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: app, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: app-keys, namespace: {NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kubekms-key-user}}
subjects: [{{kind: ServiceAccount, name: app, namespace: {NAMESPACE}}}]
""")
        self.kubectl("wait", "kmskey/app", "-n", NAMESPACE, "--for=jsonpath={.status.state}=Enabled", "--timeout=60s")
        token = self.kubectl("create", "token", "app", "-n", NAMESPACE, "--audience", "kubekms", "--duration", "48h")
        token_file = self.run_dir / "chaos-app.token"
        token_file.write_text(token.strip())
        key_api = [self.kubekms, "--server", f"https://127.0.0.1:{self.cp.ports.server}",
                   "--ca", str(self.cp.pki / "ca.crt"), "--token-file", str(token_file)]
        self.cluster_versions_at_start = len(self.material_versions(self.cluster_key_uid()))
        self.api = Api(self.cp.pki, self.cp.ports.apiserver)
        self.seed_secrets(self.args.stored)
        self.load = Load(self.api, self.rng, key_api, self.args.rate)

    def seed_secrets(self, count: int) -> None:
        """Stored Secrets for a rotation's migration to move (acknowledged like the writer's)."""
        self.seeded: dict[str, str] = {}
        for i in range(count):
            name, content = f"stored-{i:05d}", f"stored-{i}-{uuid.uuid4().hex}"
            code, body = self.api.request("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", secret_body(name, content))
            if code != 201:
                raise Failure(f"seeding Secret {name}: HTTP {code} {body[:200]!r}")
            self.seeded[name] = content

    def cluster_key_uid(self) -> str:
        return self.get_json("kmskey", "cluster-secrets", "-n", "kube-system")["metadata"]["uid"]

    def material_versions(self, uid: str) -> list[int]:
        material = self.get_json("kmskeymaterial", uid)
        return [v["version"] for v in material["spec"].get("versions", [])]

    # --- kills ---

    def process(self, name: str) -> Process:
        return self.cp.process(name)

    def kill(self, name: str) -> float:
        proc = self.process(name)
        if not proc.alive():
            raise CheckFailed(f"{name} is not running before its kill")
        at = time.monotonic()
        log(f"kill -9 {name} (pid {proc.pid})")
        proc.kill()
        return at

    def restart(self, name: str) -> None:
        """Starts `name` again after a random short delay, retrying as a kubelet would when
        the start fails (kube-apiserver while etcd is still coming back, say)."""
        time.sleep(self.rng.uniform(0.2, 3.0))
        start = self.local.components()[name]
        for attempt in range(1, 6):
            try:
                start()
                return
            except Failure as e:
                log(f"restart {attempt} of {name} failed: {str(e).splitlines()[0]}")
                self.process(name).kill()
                time.sleep(2 * attempt)
        raise CheckFailed(f"{name} did not start again after 5 attempts; see {self.process(name).log_path}")

    def supervise(self) -> None:
        """Restarts a component that exited on its own (a kubelet would), and counts it."""
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "plugin", "controller", "server"):
            if not self.process(name).alive():
                log(f"{name} exited on its own; restarting it")
                self.self_exits[name] = self.self_exits.get(name, 0) + 1
                self.restart(name)

    def wait_write_acknowledged(self, since: float) -> None:
        def acked():
            with self.load.lock:
                return True if any(ok and t > since for t, ok in self.load.writes) else None
        eventually(240, "a Secret write to be acknowledged after the restart", acked)

    def round(self, target: str, n: int) -> float:
        """One kill of `target` under load; returns the kill's time."""
        time.sleep(self.rng.uniform(1.0, 5.0))  # a random moment
        if target == "controller-rotation":
            return self.kill_mid_rotation()
        if target == "controller-deletion":
            return self.kill_mid_deletion(n)
        at = self.kill(target)
        self.restart(target)
        return at

    def rotate_cluster_key(self) -> None:
        self.rotations += 1
        request = f"chaos-{uuid.uuid4().hex[:12]}"
        self.kubectl("patch", "kmskey", "cluster-secrets", "-n", "kube-system", "--type", "merge", "-p",
                     json.dumps({"spec": {"rotation": {"onDemandRequest": request}}}))

    def kill_mid_rotation(self) -> float:
        self.rotate_cluster_key()
        time.sleep(self.rng.uniform(0.0, 1.5))
        at = self.kill("controller")
        self.restart("controller")
        if self.args.mid_migration:
            # Again once the migration to the new version runs: kube-apiserver takes the
            # new key id at its next KMS Status poll (within a minute).
            want = self.cluster_versions_at_start + self.rotations

            def running():
                m = self.get_json("kmskey", "cluster-secrets", "-n", "kube-system").get("status", {}).get(
                    "storageMigration") or {}
                return True if m.get("version") == want and m.get("phase") == "Running" else None
            try:
                eventually(150, f"the storage migration to version {want} to run", running, interval=0.2)
                time.sleep(self.rng.uniform(0.0, 1.0))
                self.kill("controller")
                self.restart("controller")
            except CheckFailed as e:
                log(f"note: no kill mid-migration this round ({e})")
        return at

    def kill_mid_deletion(self, n: int) -> float:
        name = f"doomed-{n}"
        self.cp.apply(f"apiVersion: kms.kubekms.io/v1alpha1\nkind: KmsKey\n"
                      f"metadata: {{name: {name}, namespace: {NAMESPACE}}}\nspec: {{deletion: {{pendingWindowDays: 7}}}}\n")
        self.kubectl("wait", f"kmskey/{name}", "-n", NAMESPACE, "--for=jsonpath={.status.state}=Enabled",
                     "--timeout=120s")
        asked = time.time()
        self.kubectl("patch", "kmskey", name, "-n", NAMESPACE, "--type", "merge", "-p",
                     '{"spec":{"deletion":{"scheduled":true}}}')
        time.sleep(self.rng.uniform(0.0, 1.0))
        at = self.kill("controller")
        self.restart("controller")
        self.check_deletion(name, asked)
        return at

    # --- the checks ---

    def check_deletion(self, name: str, asked: float) -> None:
        """The deletion is scheduled once, at its request's time plus the window, and
        cancelling it gives a Disabled key whose material no longer holds a deletion time."""
        week = 7 * 86400

        def pending():
            key = self.get_json("kmskey", name, "-n", NAMESPACE)
            return key if key.get("status", {}).get("state") == "PendingDeletion" else None
        key = eventually(120, f"{name} to be PendingDeletion", pending)
        material = self.get_json("kmskeymaterial", key["metadata"]["uid"])
        promised = material["spec"].get("deletionTime")
        if promised is None or key["status"].get("deletionTime") != promised:
            raise CheckFailed(f"{name}: material deletionTime {promised}, status {key['status'].get('deletionTime')}")
        at = calendar.timegm(time.strptime(promised.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S"))
        if not asked + week - 2 <= at <= time.time() + week + 2:
            raise CheckFailed(f"{name}: deletion at {promised}, asked at {time.ctime(asked)} with a 7-day window")
        self.kubectl("patch", "kmskey", name, "-n", NAMESPACE, "--type", "merge", "-p",
                     '{"spec":{"enabled":false,"deletion":{"scheduled":false}}}')

        def cancelled():
            k = self.get_json("kmskey", name, "-n", NAMESPACE)
            m = self.get_json("kmskeymaterial", k["metadata"]["uid"])
            return True if k["status"].get("state") == "Disabled" and "deletionTime" not in m["spec"] else None
        eventually(120, f"{name}'s deletion to be cancelled", cancelled)

    def check_secrets(self) -> tuple[int, int]:
        """Every acknowledged Secret reads back with its content, through kube-apiserver;
        etcd holds every one encrypted by kubekms. Returns (acknowledged, lost)."""
        def listed():
            code, body = self.api.request("GET", f"/api/v1/namespaces/{NAMESPACE}/secrets", timeout=60)
            return json.loads(body) if code == 200 else None
        items = eventually(120, "the list of Secrets", listed)["items"]
        read = {s["metadata"]["name"]: base64.b64decode(s.get("data", {}).get("value", "")).decode()
                for s in items if s["metadata"]["name"].startswith(("w-", "stored-"))}
        lost = []
        with self.load.lock:
            expected = dict(self.load.secrets)
        acked = 0
        for name, w in expected.items():
            if w.acked is not None:
                acked += 1
                if read.get(name) not in w.allowed():
                    lost.append(f"{name}: read {read.get(name)!r}, acknowledged {w.acked!r}")
            elif name in read and read[name] not in w.allowed():
                lost.append(f"{name}: read {read[name]!r}, never written")
        for name, content in self.seeded.items():
            if read.get(name) != content:
                lost.append(f"{name}: read {read.get(name)!r}, acknowledged {content!r}")
        strangers = set(read) - set(expected) - set(self.seeded)
        if strangers:
            lost.append(f"Secrets nobody wrote: {sorted(strangers)[:5]}")
        raw = json.loads(self.cp.etcdctl(self.cp.ports.etcd, "get", "--prefix", f"/registry/secrets/{NAMESPACE}/",
                                         "-w", "json"))
        for kv in raw.get("kvs", []):
            key, value = base64.b64decode(kv["key"]).decode(), base64.b64decode(kv["value"])
            content = read.get(key.rsplit("/", 1)[-1])
            if not value.startswith(PREFIX):
                lost.append(f"{key} is not encrypted by kubekms in etcd: {value[:30]!r}")
            elif content and content.encode() in value:
                lost.append(f"{key}: plaintext in etcd")
        if self.load.mismatches:
            lost.extend(self.load.mismatches)
        self.lost = len(lost)
        if lost:
            raise CheckFailed(f"{len(lost)} Secrets lost or changed:\n  " + "\n  ".join(lost[:20]))
        return acked + len(self.seeded), 0

    def check_versions(self) -> None:
        """Every KmsKey's versions are 1..n in its material and its status; the cluster
        key's n is one more per rotation asked."""
        want_cluster = self.cluster_versions_at_start + self.rotations
        unsettled: list[str] = []

        def settled():
            unsettled.clear()
            materials = {m["metadata"]["name"]: [v["version"] for v in m["spec"].get("versions", [])]
                         for m in self.get_json("kmskeymaterials")["items"]}
            for k in self.get_json("kmskeys", "-A")["items"]:
                name = f"{k['metadata']['namespace']}/{k['metadata']['name']}"
                want = want_cluster if name == "kube-system/cluster-secrets" else None
                material = materials.get(k["metadata"]["uid"], [])
                status = [v["version"] for v in k.get("status", {}).get("versions", [])]
                n = len(material)
                if material != list(range(1, n + 1)):
                    raise CheckFailed(f"{name}: the material's versions are {material}")
                if want is not None and n > want:
                    raise CheckFailed(f"{name}: {n} versions for {want - 1} rotations: a rotation was doubled")
                if not (n and (want is None or n == want) and status == material
                        and k.get("status", {}).get("currentVersion") == n):
                    unsettled.append(f"{name}: material {material}, status {status}, want {want or 'n'}")
            return None if unsettled else True
        try:
            eventually(120, "every key's versions in material and status to be 1..n", settled)
        except CheckFailed as e:
            raise CheckFailed(f"{e}; {unsettled}") from e

    def check_audit(self) -> None:
        for name in ("controller/audit.log", "server/audit.log", "plugin/audit.log"):
            path = self.run_dir / name
            done = subprocess.run([self.kubekms, "audit", "verify", str(path), *self.cp.root_key_args()],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0 or "intact (chain and MACs)" not in done.stdout:
                raise CheckFailed(f"kubekms audit verify {name}: {done.stdout}{done.stderr}")
            self.cut_lines[name] = done.stdout.count("was cut short during its write")
            rotated = re.search(r" and (\d+) rotated files?:", done.stdout)
            self.rotated_files[name] = int(rotated.group(1)) if rotated else 0

    def check_processes(self) -> None:
        """Every component runs as the process the supervisor started (its pid file names
        it), and no other process of the run directory is left."""
        owned = set()
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "plugin", "controller", "server"):
            proc = self.process(name)
            if not proc.alive():
                raise CheckFailed(f"{name} is not running")
            owned.add(proc.pid)
        mine = str(self.run_dir).encode()
        leaked = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in owned or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            zombie_of_mine = state == "Z" and int(ppid) == os.getpid()
            if mine in cmdline or zombie_of_mine:
                shown = cmdline.replace(b"\0", b" ")[:120].decode(errors="replace")
                leaked.append(f"{entry.name} ({'zombie' if zombie_of_mine else state}): {shown}")
        if leaked:
            raise CheckFailed("processes left behind:\n  " + "\n  ".join(leaked))

    def check(self) -> int:
        self.supervise()
        acked, _ = self.check_secrets()
        self.check_versions()
        self.check_audit()
        self.check_processes()
        return acked

    # --- the run ---

    def run(self) -> int:
        log(f"chaos: seed {self.args.seed}, {self.args.rounds} rounds of {', '.join(self.args.targets)}")
        started = time.monotonic()
        self.setup()
        self.load.start()
        acked = 0
        try:
            for n in range(1, self.args.rounds + 1):
                order = list(self.args.targets)
                self.rng.shuffle(order)
                for target in order:
                    log(f"round {n}: {target}")
                    with self.load.lock:
                        calls_before = len(self.load.key_calls)
                    at = self.round(target, n)
                    self.wait_write_acknowledged(time.monotonic())
                    time.sleep(2)  # a little load after the recovery
                    self.load.pause()
                    r = self.results[target]
                    with self.load.lock:
                        r["outage"] = max(r["outage"], longest_outage(self.load.writes, at))
                        calls = self.load.key_calls[calls_before:]
                    r["key_calls"] += len(calls)
                    r["key_errors"] += sum(1 for _, ok in calls if not ok)
                    acked = self.check()
                    r["rounds"] += 1
                    self.load.resume()
            self.load.pause()
            self.final_checks()
        except (CheckFailed, Failure) as e:
            log(f"FAILED (seed {self.args.seed}): {e}")
            self.report(acked, time.monotonic() - started)
            return 1
        except SystemExit:
            log(f"interrupted (seed {self.args.seed}); the rounds finished so far:")
            self.report(acked, time.monotonic() - started)
            raise
        finally:
            self.load.stop()
        self.report(acked, time.monotonic() - started)
        return 0

    def final_checks(self) -> None:
        """After the last round: a rotation asked during the run has its storage migration
        finish (every stored Secret moves to the newest version)."""
        if not self.rotations:
            return
        want = self.cluster_versions_at_start + self.rotations

        def migrated():
            m = self.get_json("kmskey", "cluster-secrets", "-n", "kube-system").get("status", {}).get(
                "storageMigration") or {}
            return True if m.get("version") == want and m.get("phase") == "Succeeded" else None
        eventually(420, f"the storage migration to version {want} to succeed", migrated, interval=2)

    def report(self, acked: int, seconds: float) -> None:
        with self.load.lock:
            writes = len(self.load.writes)
            failed = sum(1 for _, ok in self.load.writes if not ok)
            reads, read_failures = self.load.reads, self.load.read_failures
        lines = [f"chaos: seed {self.args.seed}, {seconds / 60:.1f} min; Secrets acknowledged {acked} "
                 f"(writes {writes}, {failed} not acknowledged), lost {self.lost}; reads {reads} "
                 f"({read_failures} failed)",
                 f"{'target':<22}{'rounds':>7}{'longest write outage':>22}{'key API errors':>18}"]
        for target, r in self.results.items():
            rate = f"{r['key_errors']}/{r['key_calls']}" + (
                f" ({100 * r['key_errors'] / r['key_calls']:.0f}%)" if r["key_calls"] else "")
            lines.append(f"{target:<22}{r['rounds']:>7}{r['outage']:>21.1f}s{rate:>18}")
        if self.self_exits:
            lines.append(f"components that exited on their own (restarted): {self.self_exits}")
        lines.append(f"audit lines cut by a kill (reported by audit verify): {self.cut_lines}")
        lines.append(f"rotated audit files, each series verified as one chain: {self.rotated_files}")
        print("\n".join(lines), flush=True)
        (self.run_dir / "chaos-report.json").write_text(json.dumps(
            {"seed": self.args.seed, "seconds": round(seconds), "acknowledged": acked, "writes": writes,
             "lost": self.lost, "audit_cut_lines": self.cut_lines, "audit_rotated_files": self.rotated_files,
             "targets": self.results, "self_exits": self.self_exits}, indent=2))

    def down(self) -> None:
        from controlplane.__main__ import STOP_ORDER
        stop_recorded(self.run_dir, STOP_ORDER)


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubekms", type=Path, required=True, help="the kubekms binary")
    parser.add_argument("--rounds", type=int, default=10, help="rounds; each kills every target once")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--seed", type=int, default=None, help="the random schedule's seed (printed; replays a run)")
    parser.add_argument("--rate", type=float, default=5.0, help="Secret writes per second")
    parser.add_argument("--stored", type=int, default=300, help="Secrets stored before the load starts")
    parser.add_argument("--no-mid-migration", dest="mid_migration", action="store_false",
                        help="do not wait for a rotation's storage migration to kill the controller again")
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("KUBEKMS_CHAOS_PORT_BASE", "34500")),
                        help=f"the first of {len(PORT_VARS)} ports (default $KUBEKMS_CHAOS_PORT_BASE or 34500)")
    parser.add_argument("--run-dir", type=Path, default=root / "e2e" / ".run-chaos")
    parser.add_argument("--keep", action="store_true", help="leave the control plane running at the end")
    parser.add_argument("--audit-log-max-size", default="2Ki",
                        help="the components' audit log files rotate at this size, so that kills land mid-rotation")
    parser.add_argument("--smoke", action="store_true",
                        help="the short run of `make test`: 1 round, 50 stored Secrets, no kill mid-migration")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.stored, args.mid_migration = 1, 50, False
    args.targets = [t for t in args.targets.split(",") if t]
    os.environ["KUBEKMS_AUDIT_LOG_MAX_SIZE"] = args.audit_log_max_size
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown or not args.targets or args.rounds < 1:
        parser.error(f"unknown targets {unknown} (of {', '.join(TARGETS)}), or no rounds")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    # SIGTERM (CI's timeout, make's interrupt) still stops the control plane.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chaos = Chaos(args)
    try:
        return chaos.run()
    except Failure as e:
        log(f"error (seed {args.seed}): {e}")
        return 1
    finally:
        if not args.keep:
            chaos.down()


if __name__ == "__main__":
    sys.exit(main())
