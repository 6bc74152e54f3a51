#!/usr/bin/env bash
# `make test`: the unit tests, then the end-to-end tests against a local control plane.
# Starts the control plane if it is not running, and stops it again afterwards if this
# script started it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT_DIR"

log "unit tests"
cargo test --lib --bins

started_here=0
if ! controlplane running kube-apiserver; then started_here=1; fi
cleanup() {
  local rc=$?
  if ((started_here)); then "$E2E_DIR/down.sh" || true; fi
  exit "$rc"
}
trap cleanup EXIT

"$E2E_DIR/up.sh"
log "the AWS clients of the AWS API's tests (pinned; cached outside the clone)"
"$E2E_DIR/tools/python-clients.sh" "$BIN_DIR" >/dev/null
"$E2E_DIR/tools/go-client.sh" "$BIN_DIR" >/dev/null
"$E2E_DIR/tools/sops.sh" "$BIN_DIR" >/dev/null
log "end-to-end tests"
cargo test --features e2e --test e2e -- --skip disruptive --test-threads "${KUBEKMS_E2E_THREADS:-4}"
log "end-to-end tests that restart or disable shared components, one at a time"
cargo test --features e2e --test e2e disruptive -- --test-threads 1
log "benchmark smoke run (tiny sizes: checks that \`make bench\` works; measures nothing)"
"$ROOT_DIR/bench/run.sh" --smoke
