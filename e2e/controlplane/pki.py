"""The control plane's credentials: a local CA, the certificates signed by it, the
service-account signing key, and kubeconfig files. Each certificate is made when its file
is missing, so a run directory of an earlier version gains those added since; a new
component's certificate is one entry in `certificates`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from controlplane.procs import log, run

LEAF = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature"]
SERVING = [*LEAF, "extendedKeyUsage=serverAuth"]
CLIENT = [*LEAF, "extendedKeyUsage=clientAuth"]


def certificates(cluster: str, apiserver_ips: tuple[str, ...] = ()) -> dict[str, tuple[str, list[str]]]:
    """The certificates of the control plane named `cluster`: file name (without .crt
    and .key) → subject and X.509 extensions. The API server's also names `apiserver_ips`
    (its address on a node's network, its Service's cluster IP)."""
    extra = "".join(f",IP:{ip}" for ip in apiserver_ips)
    return {
        "apiserver": ("/CN=kube-apiserver", [
            *SERVING, "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
                      f"DNS:kubernetes.default.svc{extra}"]),
        "admin": (f"/O=system:masters/CN={cluster}-admin", CLIENT),
        # The user the API server's bootstrap RBAC gives kube-controller-manager its rights.
        "kube-controller-manager": ("/CN=system:kube-controller-manager", CLIENT),
        # The kubekms key API, also under the name of the chart's Service.
        "server": ("/CN=kubekms-server", [
            *SERVING, "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubekms-server.kubekms-system.svc"]),
        # The node of `make cluster`: its kubelet, kube-scheduler and kube-proxy, as the
        # bootstrap RBAC and the Node authorizer name them.
        "kubelet": (f"/O=system:nodes/CN=system:node:{cluster}", CLIENT),
        "kube-scheduler": ("/CN=system:kube-scheduler", CLIENT),
        "kube-proxy": ("/CN=system:kube-proxy", CLIENT),
    }


def _openssl(*args: object) -> None:
    run(["openssl", *args], f"openssl {args[0]}", timeout=60)


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)


def _make_ca(tmp: Path, _pki: Path, cluster: str) -> list[str]:
    _ec_key(tmp / "ca.key")
    _openssl("req", "-x509", "-new", "-key", tmp / "ca.key", "-subj", f"/CN={cluster}-ca", "-days", "3650",
             "-out", tmp / "ca.crt", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ["ca.key", "ca.crt"]


def _make_leaf(tmp: Path, pki: Path, name: str, subject: str, extensions: list[str]) -> list[str]:
    _ec_key(tmp / f"{name}.key")
    _openssl("req", "-new", "-key", tmp / f"{name}.key", "-subj", subject, "-out", tmp / f"{name}.csr")
    (tmp / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    _openssl("x509", "-req", "-in", tmp / f"{name}.csr", "-CA", pki / "ca.crt", "-CAkey", pki / "ca.key",
             "-CAcreateserial", "-days", "3650", "-extfile", tmp / f"{name}.ext", "-out", tmp / f"{name}.crt")
    return [f"{name}.key", f"{name}.crt"]


def _make_service_account_key(tmp: Path, _pki: Path) -> list[str]:
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", tmp / "sa.key")
    _openssl("pkey", "-in", tmp / "sa.key", "-pubout", "-out", tmp / "sa.pub")
    return ["sa.key", "sa.pub"]


def make_pki(pki: Path, cluster: str, apiserver_ips: tuple[str, ...] = ()) -> None:
    """The CA, every certificate of `certificates` and the service-account key (sa.key,
    sa.pub), those that are missing. Each appears whole or not at all: made in a temporary
    directory, then moved in, the file whose presence says it is done last."""
    if not (pki / "ca.crt").exists():
        shutil.rmtree(pki, ignore_errors=True)  # certificates of another CA are no use
    pki.mkdir(parents=True, mode=0o700, exist_ok=True)
    # (the file that says a step is done, the step, its arguments after tmp and pki)
    steps = [("ca.crt", _make_ca, (cluster,))]
    steps += [(f"{name}.crt", _make_leaf, (name, subject, extensions))
              for name, (subject, extensions) in certificates(cluster, apiserver_ips).items()]
    steps.append(("sa.pub", _make_service_account_key, ()))
    missing = [step for step in steps if not (pki / step[0]).exists()]
    if not missing:
        return
    log(f"creating in {pki}: {', '.join(done for done, _, _ in missing)}")
    old_umask = os.umask(0o077)
    try:
        for _, make, args in missing:
            with tempfile.TemporaryDirectory(prefix=".new-", dir=pki) as tmp:
                for file in make(Path(tmp), pki, *args):
                    os.replace(Path(tmp) / file, pki / file)
    finally:
        os.umask(old_umask)


def write_private(path: Path, data: bytes) -> None:
    """Writes a file only its owner may read (kubekms refuses looser root key files),
    replacing what is there at once."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_kubeconfig(path: Path, cluster: str, server: str, ca: Path, user: str, credentials: dict[str, str]) -> None:
    """A kubeconfig for the API server at `server` in which `user` authenticates with
    `credentials` (fields of a kubeconfig user entry: token, or client-certificate and
    client-key)."""
    fields = "".join(f"    {key}: {value}\n" for key, value in credentials.items())
    write_private(path, f"""\
apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
{fields}contexts:
- name: {user}
  context:
    cluster: {cluster}
    user: {user}
current-context: {user}
""".encode())
