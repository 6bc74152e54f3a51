#!/usr/bin/env bash
# Builds the benchmark's two Go programs, as e2e/tools/build.sh builds etcd and
# kube-apiserver: into a cache outside the clone, one directory per program keyed by its
# version and a hash of its module (go.mod, go.sum and every .go file), so a warm run
# builds nothing and any change to the code rebuilds it.
#
#   reference-plugin  the Go KMS v2 reference plugin (k8s.io/kms, pinned below)
#   loadgen           the API client that creates, reads and lists Secrets and KmsKeys
#   awsload           Encrypt and GenerateDataKey with the AWS SDK for Go v2 (pinned by its go.sum)
#   local-kms         github.com/nsmithuk/local-kms, the AWS KMS emulator (pinned below), from
#                     the Go module proxy, keyed by its version and the Go version
#
# Usage: bench/build.sh [BIN_DIR]
#   BIN_DIR (default bench/.bin) receives symlinks to the cached binaries.
# Environment:
#   KUBEKMS_TOOLS_CACHE  cache root (default: $XDG_CACHE_HOME/kubekms/tools or ~/.cache/kubekms/tools)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin_dir="${1:-$here/.bin}"
cache="${KUBEKMS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubekms/tools}"
mkdir -p "$bin_dir" "$cache"
bin_dir="$(cd "$bin_dir" && pwd)"

# The k8s.io/kms release the reference plugin is built on; its go.mod must require it.
KMS_VERSION=v0.37.2

# build NAME VERSION: builds the module bench/NAME into $cache/NAME-VERSION-HASH.
build() {
  local name="$1" version="$2" module="$here/$1" key dir tmp
  key="$(cd "$module" && cat go.mod $(ls go.sum 2>/dev/null) $(find . -name '*.go' | sort) "$here/build.sh" \
    | sha256sum | cut -c1-12)"
  dir="$cache/bench-$name-$version-$key"
  if [[ ! -x "$dir/$name" ]]; then
    echo "building $name $version (cached in $dir)" >&2
    tmp="$(mktemp -d "$cache/.bench-$name.XXXXXX")"
    (cd "$module" && CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$tmp/$name" .)
    rm -rf "$dir"
    mv "$tmp" "$dir"
  fi
  ln -sfn "$dir/$name" "$bin_dir/$name"
}

got="$(cd "$here/reference-plugin" && go list -m -f '{{.Version}}' k8s.io/kms)"
if [[ "$got" != "$KMS_VERSION" ]]; then
  echo "bench/reference-plugin/go.mod requires k8s.io/kms $got but bench/build.sh pins $KMS_VERSION" >&2
  exit 1
fi

build reference-plugin "kms-$KMS_VERSION"
# loadgen uses the standard library only; its version is the Go toolchain's.
build loadgen "$(go env GOVERSION)"
build awsload "$(go env GOVERSION)"

LOCAL_KMS_VERSION=v0.0.0-20260228092603-2a5e92d09ab6
key="$( (echo "$LOCAL_KMS_VERSION"; go env GOVERSION; echo CGO_ENABLED=0) | sha256sum | cut -c1-12)"
dir="$cache/bench-local-kms-$key"
if [[ ! -x "$dir/local-kms" ]]; then
  echo "building local-kms $LOCAL_KMS_VERSION (cached in $dir)" >&2
  tmp="$(mktemp -d "$cache/.bench-local-kms.XXXXXX")"
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "github.com/nsmithuk/local-kms@$LOCAL_KMS_VERSION"
  rm -rf "$dir"
  mv "$tmp" "$dir"
fi
ln -sfn "$dir/local-kms" "$bin_dir/local-kms"
