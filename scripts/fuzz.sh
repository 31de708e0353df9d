#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: the parsers of untrusted
# bytes (request peeking and deframing, grpc-timeout, ORCA binary/TEXT/JSON, the
# Prometheus text parser, config loading). Skips, with a message and exit 0, where the
# nightly toolchain or cargo-fuzz is missing.
#
#   scripts/fuzz.sh                  # every target, FUZZ_SECONDS (default 20) each
#   scripts/fuzz.sh wire_deframe     # some targets
#   FUZZ_SECONDS=300 scripts/fuzz.sh config
#
# Seeds are fuzz/corpus/TARGET/seed-*; what a run learns goes to fuzz/target/corpus
# (kept between runs, not tracked). A crash is written to fuzz/artifacts/TARGET/ and
# counted as a failure: reproduce it with
# `cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none TARGET FILE`, and
# add the input as a regression test where the code is fixed.
# FUZZ_SANITIZER: none (default: the code under test forbids unsafe, so AddressSanitizer
# mostly costs time) or address. Overflow checks and debug assertions are on.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SECONDS_EACH="${FUZZ_SECONDS:-20}"
SANITIZER="${FUZZ_SANITIZER:-none}"
WORK="$ROOT/fuzz/target/corpus"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: skipped (no nightly toolchain: rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: skipped (cargo-fuzz is not installed: cargo install cargo-fuzz)"
    exit 0
fi

mapfile -t ALL < <(cargo +nightly fuzz list --fuzz-dir fuzz)
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then
    TARGETS=("${ALL[@]}")
fi

began=$(date +%s)
echo "==> cargo +nightly fuzz build (sanitizer: $SANITIZER)"
if ! cargo +nightly fuzz build --fuzz-dir fuzz --sanitizer "$SANITIZER" --debug-assertions; then
    echo "fuzz: 0 passed, ${#TARGETS[@]} failed (the targets do not build)"
    exit 1
fi
built=$(date +%s)
# The binaries just built are run as they are (`cargo fuzz run` would rebuild them when
# a source file changes while the targets run).
TRIPLE="$(rustc +nightly -vV | sed -n 's/^host: //p')"
BIN="$ROOT/fuzz/target/$TRIPLE/release"

passed=0
failed=0
failures=()
for target in "${TARGETS[@]}"; do
    mkdir -p "$WORK/$target" "fuzz/artifacts/$target"
    log="$ROOT/fuzz/target/fuzz-$target.log"
    echo "==> $target: ${SECONDS_EACH}s"
    # New inputs go to the work corpus; the tracked seeds are only read.
    if "$BIN/$target" "$WORK/$target" "fuzz/corpus/$target" \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
        echo "    ok: ${runs:-?} runs"
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$target")
        echo "    FAILED (log: $log)"
        grep -E 'panicked at|Test unit written to|ERROR: libFuzzer' "$log" | head -5 | sed 's/^/    /'
    fi
done
ended=$(date +%s)

echo "fuzz: $passed passed, $failed failed (build $((built - began))s, runs $((ended - built))s)"
if [[ $failed -gt 0 ]]; then
    echo "failed: ${failures[*]}"
    exit 1
fi
