#!/usr/bin/env bash
# Gateway overhead: the same load generator against one simulated backend directly and
# through the gateway, in the same run, for `simple` and for a 1 MiB identity_fp32
# payload. Load generators: h2load (Debian's nghttp2-client, not ours) with a
# pre-encoded gRPC body, and infergate-cli bench. Prints a table and the gateway's peak
# memory. Loopback only; every run is bounded by count.
#
#   scripts/bench-overhead.sh            # needs: cargo build --release; apt-get install nghttp2-client
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
N_SMALL="${N_SMALL:-40000}"
N_LARGE="${N_LARGE:-1500}"
STREAMS="${STREAMS:-32}"
WORK="$(mktemp -d)"
SIM_PORT=18101 GW_PORT=18001
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
"$BIN/grpc_body" simple "$WORK/simple.bin" >/dev/null 2>&1 || cargo run -q --release -p infergate-client --example grpc_body -- simple "$WORK/simple.bin" >/dev/null
cargo run -q --release -p infergate-client --example grpc_body -- identity_fp32 "$WORK/1m.bin" 1048576 >/dev/null

# A fast backend (no service time, many slots) so the gateway's cost is what shows.
"$BIN/infergate" sim --listen 127.0.0.1:$SIM_PORT --name direct --slots 256 --latency-ms 0 --no-orca-oob >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
pids+=($SIM_PID)
"$BIN/infergate" serve --backend 127.0.0.1:$SIM_PORT --listen 127.0.0.1:$GW_PORT \
  --metrics-listen 127.0.0.1:18002 --admin-listen 127.0.0.1:18003 --worker-threads 1 >"$WORK/gw.log" 2>&1 &
GW_PID=$!
pids+=($GW_PID)
for _ in $(seq 100); do
  "$BIN/infergate-cli" --addr 127.0.0.1:$GW_PORT health >/dev/null 2>&1 && break
  sleep 0.1   # readiness poll of a separate process, bounded at 10 s
done

cpu_ms() { awk '{print ($14 + $15) * 1000 / '"$(getconf CLK_TCK)"'}' "/proc/$1/stat"; }
h2() { # target body count -> "rps, mean, ok, CPU per call of gateway and backend"
  local out g0 s0 g1 s1
  g0=$(cpu_ms $GW_PID); s0=$(cpu_ms $SIM_PID)
  out=$(h2load -n "$3" -c 1 -m "$STREAMS" -d "$2" -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$1/inference.GRPCInferenceService/ModelInfer" 2>&1)
  local rps; rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  local ok; ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
  # h2load prints min/max/mean/sd for request time; percentiles come from infergate-cli.
  local mean; mean=$(echo "$out" | awk '/^time for request:/ {print $6}')
  g1=$(cpu_ms $GW_PID); s1=$(cpu_ms $SIM_PID)
  local cpu; cpu=$(awk -v g=$((${g1%.*} - ${g0%.*})) -v s=$((${s1%.*} - ${s0%.*})) -v n="$3" \
    'BEGIN { printf "CPU/call: gateway %.0f µs, backend %.0f µs", g * 1000 / n, s * 1000 / n }')
  echo "$rps req/s, mean ${mean}, 2xx=$ok/$3, $cpu"
}
cli() { # target model extra... -> json
  "$BIN/infergate-cli" --addr "127.0.0.1:$1" bench -q --json -m "$2" -c "$STREAMS" "${@:3}" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); l=r["latency_us"]; print("%.0f req/s, p50 %.2f ms, p99 %.2f ms, ok=%d/%d" % (r["throughput"], l["p50"]/1000, l["p99"]/1000, r["ok"], r["sent"]))'
}

echo "## gateway overhead, $(date -u +%F), $(nproc) cores, gateway --worker-threads 1, $STREAMS concurrent streams on 1 connection"
echo
echo "| load generator | payload | direct to backend | through gateway |"
echo "|---|---|---|---|"
echo "| h2load | simple (2×64 B) | $(h2 $SIM_PORT "$WORK/simple.bin" "$N_SMALL") | $(h2 $GW_PORT "$WORK/simple.bin" "$N_SMALL") |"
echo "| infergate-cli bench | simple | $(cli $SIM_PORT simple -n "$N_SMALL") | $(cli $GW_PORT simple -n "$N_SMALL") |"
HWM_SMALL=$(awk '/VmHWM/ {print $2, $3}' /proc/$GW_PID/status)
echo "| h2load | identity_fp32 1 MiB | $(h2 $SIM_PORT "$WORK/1m.bin" "$N_LARGE") | $(h2 $GW_PORT "$WORK/1m.bin" "$N_LARGE") |"
echo "| infergate-cli bench | identity_fp32 1 MiB | $(cli $SIM_PORT identity_fp32 --payload-bytes 1048576 -n "$N_LARGE") | $(cli $GW_PORT identity_fp32 --payload-bytes 1048576 -n "$N_LARGE") |"
echo
echo "gateway peak RSS (VmHWM): $HWM_SMALL after the small-payload runs, $(awk '/VmHWM/ {print $2, $3}' /proc/$GW_PID/status) after the 1 MiB runs ($STREAMS calls of 1 MiB in flight at once)"
