#!/usr/bin/env bash
# Starts a local control plane for kubekms on 127.0.0.1: etcd, kube-apiserver and
# kube-controller-manager (built from the Go module proxy by e2e/tools/build.sh), with
# RBAC, a service-account issuer and an admin kubeconfig; installs the CRDs, kubekms's RBAC and deletion protection (from
# the Helm chart), creates a root key and runs the kubekms controller, plugin and key API
# server as their ServiceAccounts. Writes e2e/.run/env, which exports KUBECONFIG,
# ETCDCTL_ENDPOINTS and PATH for the tools.
#
# This script builds what the control plane needs; e2e/controlplane (shared with the
# benchmark) starts it. `e2e/up.sh NAME…` starts only the named components.
# Safe to run twice: what already runs is left alone. `make down` stops it all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools
"$E2E_DIR/tools/build.sh" "$BIN_DIR"
kubekms="${CARGO_TARGET_DIR:-$ROOT_DIR/target}/debug/kubekms"
if (($# == 0)); then
  log "building kubekms"
  (cd "$ROOT_DIR" && cargo build --quiet --bin kubekms)
  ln -sfn "$kubekms" "$BIN_DIR/kubekms"
fi
controlplane up --kubekms "$kubekms" "$@"
