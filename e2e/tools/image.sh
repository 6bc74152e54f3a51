#!/usr/bin/env bash
# Builds the kubekms container image without a container engine, with umoci (Debian's
# package, installed here when missing): the image the Dockerfile builds, from a binary
# built on this machine. Same entrypoint (/usr/local/bin/kubekms), same user (65532:65532,
# "nonroot"), same files that kubekms uses: the binary, the shared libraries it links and
# their loader (from this Debian, as distroless/cc-debian12 has them), /etc/passwd and
# /etc/group naming the nonroot user, the CA certificates, an empty /tmp. Nothing else: no
# shell, no package manager.
#
# Usage: e2e/tools/image.sh BINARY ARCHIVE [REFERENCE]
#   BINARY     the kubekms executable (a release build); the entrypoint is
#              /usr/local/bin/<its name>, so the same script makes the node's pause image
#   ARCHIVE    the OCI archive to write (for `ctr images import`)
#   REFERENCE  default ghcr.io/kubekms/kubekms:<version of BINARY>
# An archive already made from the same binary and reference is kept as it is.
set -euo pipefail

binary="$1" archive="$2"
[[ -x "$binary" ]] || { echo "image.sh: $binary is not an executable" >&2; exit 1; }
name="$(basename "$binary")"
reference="${3:-}"
if [[ -z "$reference" ]]; then
  reference="ghcr.io/kubekms/kubekms:$("$binary" --version | awk '{print $2}')"
fi
repository="${reference%:*}" tag="${reference##*:}"

if ! command -v umoci >/dev/null; then
  echo "installing umoci (Debian package)" >&2
  apt-get install -y -qq umoci >/dev/null || { apt-get update -qq && apt-get install -y -qq umoci >/dev/null; }
fi

stamp="$archive.source"
want="$( (sha256sum <"$binary"; echo "$reference"; sha256sum <"${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)"
if [[ -f "$archive" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/kubekms-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/bundle/rootfs"

umoci init --layout "$work/layout"
umoci new --image "$work/layout:$tag"
umoci unpack --image "$work/layout:$tag" "$work/bundle"

install -D -m 0755 "$binary" "$root/usr/local/bin/$name"
# The shared libraries the binary links, and the dynamic loader, at their paths here.
while read -r lib; do
  install -D -m 0644 "$(readlink -f "$lib")" "$root$lib"
done < <(ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' || true)
chmod 0755 "$root"/lib64/ld-linux-*.so.* 2>/dev/null || true
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$root/etc" "$root/home/nonroot"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$root/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
chown 65532:65532 "$root/home/nonroot"
install -d -m 1777 "$root/tmp"

umoci repack --image "$work/layout:$tag" "$work/bundle"
umoci config --image "$work/layout:$tag" --config.user 65532:65532 \
  --config.entrypoint "/usr/local/bin/$name" --config.workingdir / \
  --config.env PATH=/usr/local/bin:/usr/bin:/bin \
  --author kubekms --architecture amd64 --os linux
umoci gc --layout "$work/layout"

# ctr names an imported image after org.opencontainers.image.ref.name: the full reference.
python3 - "$work/layout/index.json" "$reference" <<'EOF'
import json, sys
path, reference = sys.argv[1:]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["org.opencontainers.image.ref.name"] = reference
json.dump(index, open(path, "w"))
EOF
mkdir -p "$(dirname "$archive")"
tar -C "$work/layout" -cf "$archive.new" .
mv "$archive.new" "$archive"
echo "$want" >"$stamp"
echo "built $reference into $archive ($(du -k "$archive" | cut -f1) KiB, repository $repository)" >&2
