#!/usr/bin/env bash
# Installs the Python AWS clients of the end-to-end tests (boto3, the AWS CLI, the AWS
# Encryption SDK; e2e/awsclient/requirements.txt, every version pinned) from PyPI into a
# virtualenv cached outside the clone, keyed by a hash of the requirements and the Python
# version, so a warm run installs nothing. Links `aws` and `kubekms-aws-python` into
# BIN_DIR and prints the virtualenv's python.
#
# Usage: e2e/tools/python-clients.sh [BIN_DIR]
# Environment:
#   KUBEKMS_PYTHON_CACHE  cache root (default: $XDG_CACHE_HOME/kubekms/python or ~/.cache/kubekms/python)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin_dir="${1:-$here/../.bin}"
requirements="$here/../awsclient/requirements.txt"
cache="${KUBEKMS_PYTHON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubekms/python}"
mkdir -p "$bin_dir" "$cache"

key="$( (cat "$requirements"; python3 --version) | sha256sum | cut -c1-12)"
venv="$cache/$key"
# A virtualenv records its own path, so it is built where it lives; `.complete` marks one
# whose installation finished.
if [[ ! -f "$venv/.complete" ]]; then
  echo "installing the Python AWS clients (cold; cached in $venv)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
  touch "$venv/.complete"
fi
ln -sfn "$venv/bin/aws" "$bin_dir/aws"
ln -sfn "$venv/bin/python" "$bin_dir/kubekms-aws-python"
echo "$venv/bin/python"
