#!/usr/bin/env bash
# Cost of observability: throughput and p99 through the gateway (--worker-threads 1) with
# (a) metrics and tracing both off, (b) metrics on (the default), (c) tracing on at 100%
# sampling exporting to a local OTLP receiver, (d) both on; ratios against (a), same
# run, same load generator (infergate-cli bench, and h2load for throughput). Loopback
# only; every run bounded by count.
#
#   cargo build --release --bins --examples && scripts/bench-telemetry.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
N="${N:-30000}"
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

"$BIN/examples/grpc_body" simple "$WORK/simple.bin" >/dev/null
"$BIN/infergate" sim --listen 127.0.0.1:18101 --slots 256 --latency-ms 0 --no-orca-oob >/dev/null 2>&1 &
pids+=($!)
"$BIN/examples/otlp_sink" 127.0.0.1:14317 >"$WORK/sink.log" 2>&1 &
pids+=($!)

run() { # name, extra env, extra flags
  local name=$1 envs=$2 flags=$3
  env $envs "$BIN/infergate" serve --backend 127.0.0.1:18101 --listen 127.0.0.1:18001 \
    --metrics-listen 127.0.0.1:18002 --admin-listen 127.0.0.1:18003 --worker-threads 1 $flags \
    >"$WORK/gw-$name.log" 2>&1 &
  local gw=$!
  for _ in $(seq 100); do "$BIN/infergate-cli" --addr 127.0.0.1:18001 health >/dev/null 2>&1 && break; sleep 0.1; done
  local h2 cli
  h2=$(h2load -n "$N" -c 1 -m 32 -d "$WORK/simple.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
       http://127.0.0.1:18001/inference.GRPCInferenceService/ModelInfer 2>&1 | awk '/^finished in/ {print $4}')
  cli=$("$BIN/infergate-cli" --addr 127.0.0.1:18001 bench -q --json -m simple -c 32 -n "$N" \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.0f %.3f" % (r["throughput"], r["latency_us"]["p99"]/1000))')
  kill -TERM $gw; wait $gw 2>/dev/null || true
  echo "$name $h2 $cli"
}

{
  run off "" "--no-metrics"
  run metrics "" ""
  run tracing "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:14317 OTEL_TRACES_SAMPLER=always_on" "--no-metrics"
  run both "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:14317 OTEL_TRACES_SAMPLER=always_on" ""
} > "$WORK/results"
python3 - "$WORK/results" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
base = {r[0]: r for r in rows}["off"]
print("| variant | h2load req/s | ratio | bench req/s | ratio | bench p99 ms | ratio |")
print("|---|---|---|---|---|---|---|")
for name, h2, cli, p99 in rows:
    print(f"| {name} | {float(h2):.0f} | {float(h2)/float(base[1]):.2f} | {float(cli):.0f} | {float(cli)/float(base[2]):.2f} | {float(p99):.2f} | {float(p99)/float(base[3]):.2f} |")
PY
tail -1 "$WORK/sink.log" | sed 's/^/otlp sink: /'
