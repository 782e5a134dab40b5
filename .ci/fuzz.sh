#!/usr/bin/env bash
# Short fuzz run for CI (issue 10): build every cargo-fuzz target in fuzz/ and run each for
# FUZZ_SECONDS over the committed seed corpus; any crash, panic, failed oracle, leak or
# timeout fails the script and leaves the reproducer in fuzz/artifacts/<target>/.
#
#   FUZZ_SECONDS   seconds per target (default 20)
#   FUZZ_TARGETS   space-separated subset (default: every target)
#   FUZZ_SANITIZER address (default) or none
#
# CI has only the stable toolchain: cargo-fuzz's nightly flags (-Zsanitizer, sancov options)
# are accepted by stable rustc with RUSTC_BOOTSTRAP=1. The corpus is copied to a scratch
# directory, so new inputs found in CI never dirty the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir fuzz)}"
# One build of all targets (fuzz/Cargo.toml is its own workspace: shared dependencies).
cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/mcast-fuzz-XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in $targets; do
  mkdir -p "$scratch/$t"
  cp -r "fuzz/corpus/$t/." "$scratch/$t/"
  # Per-target options live next to the corpus (e.g. a larger -max_len for big inputs).
  extra=()
  if [ -f "fuzz/options/$t" ]; then
    read -r -a extra <"fuzz/options/$t"
  fi
  echo "== fuzz $t: ${seconds}s"
  if ! cargo fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$t" "$scratch/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${extra[@]}" 2>"$scratch/$t.log"; then
    tail -n 60 "$scratch/$t.log" >&2
    failed+=("$t")
  else
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$scratch/$t.log" || true
  fi
done
if ((${#failed[@]})); then
  echo ".ci/fuzz.sh: fuzz targets failed: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
  exit 1
fi
echo ".ci/fuzz.sh: all fuzz targets ran ${seconds}s without a crash"
