#!/usr/bin/env bash
# `make demo`: a walkthrough on the local control plane. Every step prints the command
# it runs, so you can paste it yourself afterwards (`source e2e/.run/env` first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT_DIR"

"$E2E_DIR/up.sh"
source "$RUN_DIR/env"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step kubectl get crds
kubectl get namespace demo >/dev/null 2>&1 || step kubectl create namespace demo
step kubectl apply -n demo -f examples/kmskey.yaml
step kubectl get kmskey app-data -n demo -o yaml
step kubectl get kmskeys -n demo

printf '\nThe control plane keeps running: source e2e/.run/env and use kubectl; `make down` stops it.\n'
