#!/usr/bin/env bash
# `make cluster`: a one-node cluster with the Helm chart installed for real (e2e/controlplane/node.py
# says what runs where). Builds and installs what it needs: kube-scheduler, kubelet and
# kube-proxy (e2e/tools/build.sh, from the same k8s.io/kubernetes release as kube-apiserver),
# containerd, runc, the CNI plugins and umoci (Debian's packages, when missing), the release
# build of kubekms and its image (e2e/tools/image.sh), and the node's pause image.
# Writes e2e/.run-cluster/env. `make down` stops it; `e2e/cluster.sh down` stops only it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

node() { PYTHONPATH="$E2E_DIR${PYTHONPATH:+:$PYTHONPATH}" python3 -m controlplane.node "$@"; }
if [[ "${1:-}" == down ]]; then
  shift
  node down "$@"
  exit 0
fi

require_tools
if ! command -v containerd >/dev/null || ! command -v runc >/dev/null || [[ ! -x /usr/lib/cni/bridge ]] \
  || ! command -v umoci >/dev/null || ! command -v nsenter >/dev/null; then
  log "installing containerd, runc, the CNI plugins and umoci (Debian's packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc containernetworking-plugins umoci \
    util-linux iproute2 iptables >/dev/null
fi
# The Debian package starts its own containerd where a service manager runs; the node's
# containerd is another, with its own socket and state.
KUBEKMS_BUILD_NODE=1 "$E2E_DIR/tools/build.sh" "$BIN_DIR"

images="${KUBEKMS_CLUSTER_RUN_DIR:-$E2E_DIR/.run-cluster}/images"
mkdir -p "$images"
release="${CARGO_TARGET_DIR:-$ROOT_DIR/target}/release/kubekms"
log "building kubekms (release; its image)"
(cd "$ROOT_DIR" && cargo build --quiet --release --locked --bin kubekms)
"$E2E_DIR/tools/image.sh" "$release" "$images/kubekms.tar"
if [[ ! -x "$images/pause" || "$E2E_DIR/tools/pause/pause.c" -nt "$images/pause" ]]; then
  gcc -static -Os -s -o "$images/pause" "$E2E_DIR/tools/pause/pause.c"
fi
"$E2E_DIR/tools/image.sh" "$images/pause" "$images/pause.tar" kubekms.local/pause:1
node up --kubekms "$release" --image "$images/kubekms.tar" --image "$images/pause.tar" "$@"
