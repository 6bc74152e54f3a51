#!/usr/bin/env bash
# `make test-cluster`: the end-to-end tests of the node (e2e/cluster_tests, pytest) against
# `make cluster`'s cluster. Starts it if it is not running, and stops it again afterwards if
# this script started it. PYTEST_ARGS are passed on (e.g. -k upgrade).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT_DIR"

cluster_run="${KUBEKMS_CLUSTER_RUN_DIR:-$E2E_DIR/.run-cluster}"
started_here=0
if ! KUBEKMS_RUN_DIR="$cluster_run" controlplane running kube-apiserver; then started_here=1; fi
cleanup() {
  local rc=$?
  if ((started_here)); then
    "$E2E_DIR/cluster.sh" down || rc=1
    # `make down` leaves nothing of the node: no process, mount, network namespace, cgroup.
    if ! PYTHONPATH="$E2E_DIR" python3 -m controlplane.node leftovers; then
      log "error: the node left the above behind"
      rc=1
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT

"$E2E_DIR/cluster.sh"
python3 -c 'import pytest' 2>/dev/null || python3 -m pip install -q pytest
log "the node's end-to-end tests"
PYTHONPATH="$E2E_DIR" python3 -m pytest -v -p no:cacheprovider "$E2E_DIR/cluster_tests" ${PYTEST_ARGS:-}
