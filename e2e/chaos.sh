#!/usr/bin/env bash
# `make chaos` and `make chaos-smoke`: crash consistency under load (e2e/chaos.py, which
# says what each round does and checks), on a control plane of its own (e2e/.run-chaos,
# ports from $KUBEKMS_CHAOS_PORT_BASE, default 34500), which it stops at the end.
# Builds what it needs first, as e2e/up.sh does. Arguments go to e2e/chaos.py
# (--rounds N, --targets a,b, --seed S, --smoke ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools
"$E2E_DIR/tools/build.sh" "$BIN_DIR"
log "building kubekms"
(cd "$ROOT_DIR" && cargo build --quiet --bin kubekms)
PYTHONPATH="$E2E_DIR${PYTHONPATH:+:$PYTHONPATH}" PATH="$BIN_DIR:$PATH" \
  python3 "$E2E_DIR/chaos.py" --kubekms "${CARGO_TARGET_DIR:-$ROOT_DIR/target}/debug/kubekms" "$@"
