#!/usr/bin/env bash
# Builds the end-to-end tests' AWS SDK for Go v2 client (e2e/awsclient/go, versions pinned
# by its go.mod and go.sum) from the Go module proxy into a cache outside the clone, keyed
# by a hash of its sources and the Go version, like e2e/tools/build.sh; a warm run builds
# nothing. Links it into BIN_DIR and prints its path.
#
# Usage: e2e/tools/go-client.sh [BIN_DIR]
# Environment:
#   KUBEKMS_TOOLS_CACHE  cache root (default: $XDG_CACHE_HOME/kubekms/tools or ~/.cache/kubekms/tools)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/../awsclient/go"
bin_dir="${1:-$here/../.bin}"
cache="${KUBEKMS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubekms/tools}"
mkdir -p "$bin_dir" "$cache"

key="$( (cat "$src/go.mod" "$src/go.sum" "$src"/*.go; go env GOVERSION; echo CGO_ENABLED=0) | sha256sum | cut -c1-12)"
dir="$cache/kubekms-awsclient-$key"
if [[ ! -x "$dir/kubekms-awsclient" ]]; then
  echo "building the AWS SDK for Go v2 test client (cold; cached in $dir)" >&2
  tmp="$(mktemp -d "$cache/.kubekms-awsclient.XXXXXX")"
  (cd "$src" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp/kubekms-awsclient" .)
  rm -rf "$dir"
  mv "$tmp" "$dir"
fi
ln -sfn "$dir/kubekms-awsclient" "$bin_dir/kubekms-awsclient"
echo "$dir/kubekms-awsclient"
