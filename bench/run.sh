#!/usr/bin/env bash
# `make bench` and `make bench-smoke`: builds everything the benchmark needs, then runs
# bench/suite.py, which prints one table and writes it as Markdown and JSON.
#
# Usage: bench/run.sh [--smoke] [--flood SECONDS] [--runs N] [--out DIR] [--secrets N] [--keys N] [--plugin-calls N] [--keyapi-calls N]
#   --smoke   tiny sizes and one run of each section, with the debug build of kubekms: checks
#             that every part of the benchmark works (part of `make test`), measures nothing
#   --flood SECONDS  only the flood section (`make bench-flood`): 16 valid callers alone for
#             SECONDS, then as long under a flood of bad requests (release build; bench/results/flood.*)
#   --runs N  repetitions of every section (default 5; each figure is their median)
#   --out DIR where to write latest.md and latest.json (default bench/results; smoke:
#             bench/.smoke-results/smoke.{md,json})
#   --secrets, --keys, --plugin-calls, --keyapi-calls  change one size (see bench/suite.py)
#
# It runs its own etcd and kube-apiserver on 127.0.0.1 (ports 22379-22382, 26443, 28443-28445,
# 28080-28082; see bench/README.md to move them) with its state in bench/.run, so it never
# touches the control plane of `make up`. Every process it starts is stopped when it ends.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

usage() { sed -n '5,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

smoke=0
pass=()
while (($#)); do
  case "$1" in
    --smoke) smoke=1; pass+=("$1") ;;
    --flood|--runs|--out|--secrets|--keys|--plugin-calls|--keyapi-calls)
      (($# >= 2)) || { echo "bench/run.sh: $1 needs a value" >&2; usage; }
      pass+=("$1" "$2"); shift ;;
    -h|--help) usage ;;
    *) echo "bench/run.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done

for tool in go cargo kubectl openssl python3; do
  command -v "$tool" >/dev/null || { echo "bench/run.sh: $tool is needed but not on PATH" >&2; exit 1; }
done
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
  || { echo "bench/run.sh: python3 3.9 or newer is needed" >&2; exit 1; }

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# etcd, kube-apiserver and helm (cached under ~/.cache/kubekms/tools), then the reference
# plugin and the load generator (cached there too).
"$root/e2e/tools/build.sh"
"$here/build.sh"

target="${CARGO_TARGET_DIR:-$root/target}"
if ((smoke)); then
  # The smoke run checks that the benchmark works, not how fast: the debug build that
  # `make test` has already made will do, and saves a release build.
  log "building kubekms (debug, for the smoke run)"
  (cd "$root" && cargo build --quiet --bin kubekms)
  kubekms="$target/debug/kubekms"
  log "unit tests of the reference plugin and of the report"
  (cd "$here/reference-plugin" && go test ./...)
  (cd "$here" && python3 -m unittest discover -s . -p 'test_*.py')
else
  log "building kubekms (release)"
  (cd "$root" && cargo build --quiet --release --bin kubekms)
  kubekms="$target/release/kubekms"
fi

cd "$here"
exec python3 suite.py --kubekms "$kubekms" "${pass[@]}"
