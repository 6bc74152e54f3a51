# Shared helpers for the local control plane scripts. Source it; do not run it.
# shellcheck shell=bash

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$E2E_DIR/.." && pwd)"
RUN_DIR="${KUBEKMS_RUN_DIR:-$E2E_DIR/.run}"
BIN_DIR="$E2E_DIR/.bin"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# require_tools: fails at once, naming what is missing, when a prerequisite of the
# control plane and its tests is not on PATH (etcd, kube-apiserver, kube-controller-manager
# and helm are built here).
require_tools() {
  reserve_ports
  local tool missing=()
  for tool in cargo go kubectl python3 openssl curl sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  # The PKCS#11 root key's tests (KUBEKMS_ROOT_KEY=pkcs11) use a SoftHSM2 token.
  if ! command -v softhsm2-util >/dev/null 2>&1; then
    log "installing the Debian package softhsm2 (a PKCS#11 token for the HSM root key's tests)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2; } >/dev/null \
      || die "could not install softhsm2 (apt-get install softhsm2)"
  fi
  ((${#missing[@]} == 0)) || die "not on PATH: ${missing[*]} (README.md, \"Try it\", lists the prerequisites)"
}

# reserve_ports: keeps the kernel from handing out the control planes' fixed ports (33000-39999:
# `make up`'s, the SoftHSM2 pass's, the chaos test's, the restore and root-key rotation tests',
# and 35000-35999 for the processes the end-to-end tests start, support::free_port;
# 44500-44599: `make cluster`'s) as the source ports of outgoing connections, which made a
# component's start fail now and then with "Address already in use" under load. Root only
# (net.ipv4.ip_local_reserved_ports); adds to what is reserved already; a no-op elsewhere.
KUBEKMS_RESERVED_PORTS="33000-39999,44500-44599"
reserve_ports() {
  local file=/proc/sys/net/ipv4/ip_local_reserved_ports current
  [[ -w "$file" ]] || return 0
  current="$(cat "$file")"
  [[ ",$current," == *",$KUBEKMS_RESERVED_PORTS,"* ]] && return 0
  echo "${current:+$current,}$KUBEKMS_RESERVED_PORTS" >"$file" 2>/dev/null || true
}

# controlplane up|down|running ARGS...: the control plane itself, e2e/controlplane (Python,
# shared with the benchmark); `python3 -m controlplane --help` says more.
controlplane() {
  PYTHONPATH="$E2E_DIR${PYTHONPATH:+:$PYTHONPATH}" python3 -m controlplane "$@"
}
