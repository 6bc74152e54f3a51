#!/usr/bin/env bash
# Stops everything e2e/up.sh started, newest first, and anything else recorded in
# e2e/.run/pids (a component a test started). Safe to run twice. Keeps the data in
# e2e/.run (etcd, certificates, root key) so `make up` resumes; `make clean` removes it.
# `e2e/down.sh kube-apiserver` stops only the named components.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

controlplane down "$@"
