#!/usr/bin/env bash
# Builds and runs the fuzz targets of fuzz/fuzz_targets with libFuzzer (the libfuzzer-sys
# crate), on the stable toolchain: the coverage instrumentation is rustc's own
# SanitizerCoverage pass, switched on with the -C flags below (what cargo-fuzz passes, less
# the nightly-only -Zsanitizer; kubekms forbids unsafe code, so AddressSanitizer would find
# nothing the Rust checks do not). No cargo-fuzz to install, no nightly needed.
#
# Usage: fuzz/run.sh build               build every target
#        fuzz/run.sh run SECONDS [TARGET…] run each target (default: all) for SECONDS
#        fuzz/run.sh seeds               rewrite the committed seed corpus (fuzz/seeds)
#
# The target directory is outside the clone, keyed by the toolchain, so that CI reuses it:
#   $XDG_CACHE_HOME/kubekms/fuzz-<rustc version> (override: KUBEKMS_FUZZ_TARGET_DIR).
# Each target grows its corpus in fuzz/corpus/<target> (not committed), starting from
# fuzz/seeds/<target>; a failing input goes to fuzz/artifacts/<target>/, and the run
# fails. Each run's figures (executions, speed, corpus) are printed, one line per target,
# and appended to fuzz/artifacts/runs.tsv.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/kubekms"
rustc_key="$(rustc --version | tr -c 'a-zA-Z0-9.\n' '-')"
export CARGO_TARGET_DIR="${KUBEKMS_FUZZ_TARGET_DIR:-$cache/fuzz-$rustc_key}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="$CARGO_TARGET_DIR/$triple/release"

flags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
)

targets() { ls fuzz_targets | sed 's/\.rs$//'; }

# audit_append writes a log file per input: in memory, where there is a tmpfs, it runs
# faster and spares the disk.
if [[ -z "${TMPDIR:-}" && -d /dev/shm && -w /dev/shm ]]; then
  export TMPDIR=/dev/shm
fi

build() {
  echo "building the fuzz targets (target directory $CARGO_TARGET_DIR)" >&2
  # --target keeps the flags off build scripts and proc macros, as cargo-fuzz does.
  RUSTFLAGS="${flags[*]}" cargo build --release --locked --quiet --target "$triple" --bins
}

run_one() {
  local target="$1" seconds="$2" log
  mkdir -p "corpus/$target" "artifacts/$target"
  log="$(mktemp)"
  local rc=0
  "$bin_dir/$target" "corpus/$target" "seeds/$target" \
    -max_total_time="$seconds" -print_final_stats=1 -max_len=8192 -timeout=20 -rss_limit_mb=1024 \
    -artifact_prefix="artifacts/$target/" >"$log" 2>&1 || rc=$?
  local execs speed units
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
  units="$(find "corpus/$target" -type f | wc -l)"
  printf '%s\t%s\t%s s\t%s execs\t%s execs/s\t%s corpus inputs\trc %s\n' \
    "$(date -u +%FT%TZ)" "$target" "$seconds" "${execs:-?}" "${speed:-?}" "$units" "$rc" | tee -a artifacts/runs.tsv
  if ((rc != 0)); then
    tail -40 "$log" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

case "${1:-}" in
  build) build ;;
  run)
    seconds="${2:?usage: fuzz/run.sh run SECONDS [TARGET…]}"
    shift 2
    build
    ((${#@})) || set -- $(targets)
    failed=()
    for target in "$@"; do run_one "$target" "$seconds" || failed+=("$target"); done
    if ((${#failed[@]})); then
      echo "fuzz targets failed: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
      exit 1
    fi
    ;;
  seeds)
    build
    for target in $(targets); do
      rm -rf "seeds/$target"
      KUBEKMS_FUZZ_SEEDS="seeds/$target" "$bin_dir/$target"
    done
    du -sh seeds
    ;;
  *) sed -n '2,20p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac
