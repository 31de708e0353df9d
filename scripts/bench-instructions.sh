#!/usr/bin/env bash
# Instructions per forwarded call: the gateway runs under valgrind's callgrind, which
# counts instructions, not seconds, so the figure repeats on a noisy box. One release sim
# is the backend (outside valgrind); h2load sends a warm-up, the counters are zeroed,
# then N calls are counted and the total is divided by N. Every call is checked whole
# (h2load counts HTTP 200; the gateway's grpc-status is read from a last real call).
#
#   cargo build --release -p infergate -p infergate-client --bins --examples
#   scripts/bench-instructions.sh                 # N=2000 simple calls, -c 1 -m 16
#   N=4000 TRACING=1 scripts/bench-instructions.sh  # with tracing at 100% sampling
#   KEEP=/tmp/cg scripts/bench-instructions.sh      # keep the profiles for callgrind_annotate
#
# Prints one line: instructions per call (gateway process, all threads), and the
# instructions per call of the same calls sent straight to the sim for scale.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
N="${N:-2000}"
WARM="${WARM:-300}"
WORK="$(mktemp -d)"
SIM_PORT=18201 GW_PORT=18202
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }
"$BIN/examples/grpc_body" simple "$WORK/simple.bin" >/dev/null

"$BIN/infergate" sim --listen 127.0.0.1:$SIM_PORT --name direct --slots 256 --latency-ms 0 --no-orca-oob >"$WORK/sim.log" 2>&1 &
pids+=($!)
envs=()
if [[ -n "${TRACING:-}" ]]; then
  # A real OTLP sink (the project's example), every call sampled.
  "$BIN/examples/otlp_sink" 127.0.0.1:18205 >"$WORK/sink.log" 2>&1 &
  pids+=($!)
  envs+=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18205 OTEL_TRACES_SAMPLER=always_on)
fi
env "${envs[@]}" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" --dump-instr=no --compress-strings=no --compress-pos=no --collect-atstart=yes \
  "$BIN/infergate" serve --backend 127.0.0.1:$SIM_PORT --listen 127.0.0.1:$GW_PORT \
  --metrics-listen 127.0.0.1:18203 --admin-listen 127.0.0.1:18204 --worker-threads 1 \
  >"$WORK/gw.log" 2>&1 &
GW_PID=$!
pids+=($GW_PID)
for _ in $(seq 600); do
  "$BIN/infergate-cli" --addr 127.0.0.1:$GW_PORT infer -m simple >/dev/null 2>&1 && break
  sleep 0.1   # readiness poll of a separate process under valgrind, bounded at 60 s
done
"$BIN/infergate-cli" --addr 127.0.0.1:$GW_PORT infer -m simple >/dev/null \
  || { echo "the gateway does not answer a real call" >&2; cat "$WORK/gw.log" >&2; exit 1; }

load() { # port count -> 2xx count
  h2load -n "$2" -c 1 -m 16 -d "$WORK/simple.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://127.0.0.1:$1/inference.GRPCInferenceService/ModelInfer" 2>&1 | awk '/^status codes:/ {print $3}'
}
total_ir() { # dump, then sum the "summary:" / "totals:" lines of this run's files
  callgrind_control -d "$GW_PID" >/dev/null 2>&1
  local sum=0
  for f in "$WORK"/cg.*; do
    local v; v=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}
load $GW_PORT "$WARM" >/dev/null
callgrind_control -z "$GW_PID" >/dev/null 2>&1
ok=$(load $GW_PORT "$N")
"$BIN/infergate-cli" --addr 127.0.0.1:$GW_PORT infer -m simple >/dev/null \
  || { echo "a real call failed after the run" >&2; exit 1; }
ir=$(total_ir)
if [[ -n "${KEEP:-}" ]]; then mkdir -p "$KEEP"; cp "$WORK"/cg.* "$KEEP"/; fi
echo "gateway: $((ir / N)) instructions per call (${N} simple calls, ${ok} answered 2xx, -c 1 -m 16, --worker-threads 1${TRACING:+, tracing 100%})"
