#!/usr/bin/env bash
# Stops everything e2e/up.sh started, newest first. Safe to run twice. Keeps the data in
# e2e/.run (etcd, certificates, root key) so `make up` resumes; `make clean` removes it.
# `e2e/down.sh kube-apiserver` stops only the named components.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if (($# > 0)); then
  for name in "$@"; do
    if pid_alive "$name"; then log "stopping $name"; fi
    stop "$name"
  done
  exit 0
fi

for name in server controller kube-apiserver plugin etcd; do
  if pid_alive "$name"; then log "stopping $name"; fi
  stop "$name"
done
# Anything else recorded (a component a test started) goes too.
if [[ -d "$PID_DIR" ]]; then
  for f in "$PID_DIR"/*.pid; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .pid)"
    if pid_alive "$name"; then log "stopping $name"; fi
    stop "$name"
  done
fi
