# Shared helpers for the local control plane scripts. Source it; do not run it.
# shellcheck shell=bash

E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$E2E_DIR/.." && pwd)"
RUN_DIR="${KUBEKMS_RUN_DIR:-$E2E_DIR/.run}"
BIN_DIR="$E2E_DIR/.bin"
PID_DIR="$RUN_DIR/pids"
LOG_DIR="$RUN_DIR/logs"

ETCD_CLIENT_PORT="${KUBEKMS_ETCD_PORT:-32379}"
ETCD_PEER_PORT="${KUBEKMS_ETCD_PEER_PORT:-32380}"
APISERVER_PORT="${KUBEKMS_APISERVER_PORT:-36443}"
CONTROLLER_METRICS_PORT="${KUBEKMS_CONTROLLER_METRICS_PORT:-38080}"
PLUGIN_METRICS_PORT="${KUBEKMS_PLUGIN_METRICS_PORT:-38081}"
SERVER_PORT="${KUBEKMS_SERVER_PORT:-38443}"
SERVER_METRICS_PORT="${KUBEKMS_SERVER_METRICS_PORT:-38082}"
KUBEKMS_NAMESPACE=kubekms-system
CLUSTER_KEY=kube-system/cluster-secrets
KMS_SOCKET="$RUN_DIR/kms.sock"
# A unix socket path is limited to 107 bytes; fall back to a short one for deep checkouts.
if ((${#KMS_SOCKET} > 100)); then
  KMS_SOCKET="${TMPDIR:-/tmp}/kubekms-$(printf '%s' "$RUN_DIR" | sha256sum | cut -c1-12).sock"
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# require_tools: fails at once, naming what is missing, when a prerequisite of the
# control plane and its tests is not on PATH (etcd, kube-apiserver and helm are built here).
require_tools() {
  local tool missing=()
  for tool in cargo go kubectl python3 openssl curl sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) || die "not on PATH: ${missing[*]} (README.md, \"Try it\", lists the prerequisites)"
}

# wait_until SECONDS DESCRIPTION COMMAND...: runs COMMAND every half second until it
# succeeds; fails with DESCRIPTION after SECONDS.
wait_until() {
  local timeout="$1" what="$2"; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "timed out after ${timeout}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

# wait_for NAME SECONDS DESCRIPTION COMMAND...: like wait_until, but fails at once,
# showing NAME's log, when the process recorded for NAME exits.
wait_for() {
  local name="$1" timeout="$2" what="$3"; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    pid_alive "$name" || die_with_log "$name" "$name exited while waiting for $what"
    ((SECONDS < deadline)) || die_with_log "$name" "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}

# pid_alive NAME: whether the process recorded for NAME runs.
pid_alive() {
  local f="$PID_DIR/$1.pid"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# start NAME COMMAND...: starts COMMAND in its own session, logging to logs/NAME.log.
start() {
  local name="$1"; shift
  mkdir -p "$PID_DIR" "$LOG_DIR"
  setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$PID_DIR/$name.pid"
}

# stop NAME: stops the process group recorded for NAME (TERM, then KILL after 20s).
stop() {
  local name="$1" f="$PID_DIR/$1.pid" pid
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop on SIGTERM; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

# die_with_log NAME MESSAGE: fails, showing the end of NAME's log.
die_with_log() {
  log "error: $2; last lines of $LOG_DIR/$1.log:"
  tail -n 30 "$LOG_DIR/$1.log" >&2 || true
  exit 1
}
