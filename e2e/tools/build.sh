#!/usr/bin/env bash
# Builds the real control plane used by the end-to-end tests — etcd, etcdctl,
# kube-apiserver, kube-controller-manager and helm — from the Go module proxy, into a
# cache outside the clone. Each tool lands in a directory keyed by its version and by a
# hash of what decides its binary (its wrapper module, package, flags and the Go
# version), so a warm run rebuilds nothing, and a pin change or a new tool rebuilds only
# what changed.
#
# Usage: e2e/tools/build.sh [BIN_DIR]
#   BIN_DIR (default e2e/.bin) receives symlinks to the cached binaries.
# Environment:
#   KUBEKMS_TOOLS_CACHE  cache root (default: $XDG_CACHE_HOME/kubekms/tools or ~/.cache/kubekms/tools)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin_dir="${1:-$here/../.bin}"
cache="${KUBEKMS_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubekms/tools}"
mkdir -p "$bin_dir" "$cache"
bin_dir="$(cd "$bin_dir" && pwd)"

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0

# module_version MODULE_DIR MODULE: the version a wrapper's go.mod requires.
module_version() {
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

# build NAME WRAPPER_DIR PACKAGE VERSION [LDFLAGS]
build() {
  local name="$1" wrapper="$here/$2" pkg="$3" version="$4" ldflags="${5:-}"
  local flags=(-mod=readonly -trimpath -ldflags "-s -w $ldflags")
  local key
  key="$( (cat "$wrapper/go.mod" "$wrapper/go.sum"; printf '%s\n' "$pkg" "${flags[*]}" "$(go env GOVERSION)" CGO_ENABLED=0) \
    | sha256sum | cut -c1-12)"
  local dir="$cache/$name-$version-$key"
  if [[ ! -x "$dir/$name" ]]; then
    echo "building $name $version (cold build; cached in $dir)" >&2
    local tmp
    tmp="$(mktemp -d "$cache/.$name.XXXXXX")"
    (cd "$wrapper" && CGO_ENABLED=0 go build "${flags[@]}" -o "$tmp/$name" "$pkg")
    rm -rf "$dir"
    mv "$tmp" "$dir"
  fi
  ln -sfn "$dir/$name" "$bin_dir/$name"
}

check_pin() {
  local got
  got="$(module_version "$here/$1" "$2")"
  if [[ "$got" != "$3" ]]; then
    echo "e2e/tools/$1/go.mod requires $2 $got but build.sh pins $3" >&2
    exit 1
  fi
}
check_pin kube-apiserver k8s.io/kubernetes "$KUBE_VERSION"
check_pin kube-controller-manager k8s.io/kubernetes "$KUBE_VERSION"
for tool in kube-scheduler kubelet kube-proxy; do check_pin "$tool" k8s.io/kubernetes "$KUBE_VERSION"; done
check_pin etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
check_pin helm helm.sh/helm/v3 "$HELM_VERSION"

minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
kube_ldflags="-X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

build etcd etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
build etcdctl etcd go.etcd.io/etcd/etcdctl/v3 "$ETCD_VERSION"
build helm helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build kube-apiserver kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$KUBE_VERSION" "$kube_ldflags"
build kube-controller-manager kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager \
  "$KUBE_VERSION" "$kube_ldflags"
# The node of `make cluster` (e2e/cluster.sh): built only when asked for, since `make up`
# and `make test` run without one.
if [[ "${KUBEKMS_BUILD_NODE:-0}" == 1 ]]; then
  for tool in kube-scheduler kubelet kube-proxy; do
    build "$tool" "$tool" "k8s.io/kubernetes/cmd/$tool" "$KUBE_VERSION" "$kube_ldflags"
  done
fi
