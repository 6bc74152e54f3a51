#!/usr/bin/env bash
# Builds SOPS (github.com/getsops/sops/v3/cmd/sops, the version below) from the Go module
# proxy into a cache outside the clone, keyed by that version and the Go version, like
# e2e/tools/go-client.sh; a warm run builds nothing (a cold one took 1m40s here). Links it
# into BIN_DIR and prints its path. The end-to-end tests encrypt a file with it under a
# kubekms key.
#
# Usage: e2e/tools/sops.sh [BIN_DIR]
# Environment:
#   KUBEKMS_TOOLS_CACHE  cache root (default: $XDG_CACHE_HOME/kubekms/tools or ~/.cache/kubekms/tools)
set -euo pipefail

version=v3.13.3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin_dir="${1:-$here/../.bin}"
cache="${KUBEKMS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubekms/tools}"
mkdir -p "$bin_dir" "$cache"

key="$( (echo "$version"; go env GOVERSION; echo CGO_ENABLED=0) | sha256sum | cut -c1-12)"
dir="$cache/sops-$version-$key"
if [[ ! -x "$dir/sops" ]]; then
  echo "building SOPS $version (cold; cached in $dir)" >&2
  tmp="$(mktemp -d "$cache/.sops.XXXXXX")"
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "github.com/getsops/sops/v3/cmd/sops@$version"
  rm -rf "$dir"
  mv "$tmp" "$dir"
fi
ln -sfn "$dir/sops" "$bin_dir/sops"
echo "$dir/sops"
