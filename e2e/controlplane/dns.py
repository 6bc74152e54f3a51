"""The cluster DNS of `make cluster`, in place of CoreDNS: answers A queries for
SERVICE.NAMESPACE.svc.cluster.local with the Service's cluster IP, read from kube-apiserver
as the admin, and NXDOMAIN for any other name (the node reaches nothing outside). AAAA and
other types of a Service's name get an empty answer. Enough for pods that find the key API
by its Service name, as examples/app/pod.yaml does.

  python3 -m controlplane.dns --listen IP --server URL --pki DIR
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

SUFFIX = ".svc.cluster.local"
TYPE_A, CLASS_IN = 1, 1
NOERROR, FORMERR, NXDOMAIN = 0, 1, 3


def parse_question(packet: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, name, qtype, end of the question) of a query; ValueError if malformed."""
    if len(packet) < 12:
        raise ValueError("short header")
    ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1:
        raise ValueError("not one question")
    labels, i = [], 12
    while True:
        if i >= len(packet):
            raise ValueError("truncated name")
        n = packet[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0 or i + 1 + n > len(packet):
            raise ValueError("bad label")
        labels.append(packet[i + 1:i + 1 + n].decode("ascii", errors="replace").lower())
        i += 1 + n
    if i + 4 > len(packet):
        raise ValueError("truncated question")
    qtype, _qclass = struct.unpack("!HH", packet[i:i + 4])
    return ident, flags, ".".join(labels), qtype, i + 4


def answer(packet: bytes, resolve) -> bytes:
    try:
        ident, flags, name, qtype, end = parse_question(packet)
    except ValueError:
        return struct.pack("!HHHHHH", struct.unpack("!H", packet[:2])[0] if len(packet) >= 2 else 0,
                           0x8000 | FORMERR, 0, 0, 0, 0)
    question = packet[12:end]
    ip = resolve(name)
    rd = flags & 0x0100
    if ip is None:
        return struct.pack("!HHHHHH", ident, 0x8400 | rd | NXDOMAIN, 1, 0, 0, 0) + question
    if qtype != TYPE_A:
        return struct.pack("!HHHHHH", ident, 0x8400 | rd | NOERROR, 1, 0, 0, 0) + question
    record = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, 5, 4) + socket.inet_aton(ip)
    return struct.pack("!HHHHHH", ident, 0x8400 | rd | NOERROR, 1, 1, 0, 0) + question + record


class Services:
    """Cluster IPs of Services, from kube-apiserver."""

    def __init__(self, server: str, pki: Path):
        self.server = server
        self.tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def resolve(self, name: str) -> str | None:
        if not name.endswith(SUFFIX):
            return None
        parts = name[:-len(SUFFIX)].split(".")
        if len(parts) != 2:
            return None
        service, namespace = parts
        try:
            with urllib.request.urlopen(f"{self.server}/api/v1/namespaces/{namespace}/services/{service}",
                                        context=self.tls, timeout=5) as resp:
                ip = json.load(resp).get("spec", {}).get("clusterIP")
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None
        return ip if ip and ip != "None" else None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m controlplane.dns", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--pki", type=Path, required=True)
    args = parser.parse_args()
    services = Services(args.server, args.pki)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.listen, 53))
    print(f"serving {SUFFIX[1:]} on {args.listen}:53", flush=True)
    while True:
        packet, peer = sock.recvfrom(4096)
        sock.sendto(answer(packet, services.resolve), peer)


if __name__ == "__main__":
    sys.exit(main())
