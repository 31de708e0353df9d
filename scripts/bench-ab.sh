#!/usr/bin/env bash
# Two builds of the gateway, A and B, in turns on the same box: on a shared machine
# whose speed drifts from minute to minute, only alternating runs of the same workload
# compare two builds fairly. Each round starts a fresh release sim (zero service time)
# and one gateway (`serve --worker-threads 1` unless THREADS_A/THREADS_B say otherwise,
# the shipped defaults), sends a warm-up,
# then N `simple` ModelInfer calls with h2load (-c 8 -m 16, one h2load thread), checks
# that every call was answered 2xx, and prints req/s and the gateway's user and system
# CPU per call (/proc/PID/stat). Ends with the median of each column per build.
#
#   cargo build --release -p infergate -p infergate-client --bins --example grpc_body
#   cp target/release/infergate /tmp/infergate-a      # before the change
#   ... change, rebuild ...
#   scripts/bench-ab.sh /tmp/infergate-a target/release/infergate
#   ROUNDS=7 N=200000 scripts/bench-ab.sh A B
#   THREADS_B=2 scripts/bench-ab.sh target/release/infergate target/release/infergate  # scaling
#
# A benchmark, not a test: loopback only, every run bounded by count and by `timeout`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
[ $# -eq 2 ] || { echo "usage: $0 GATEWAY_A GATEWAY_B" >&2; exit 2; }
A="$1" B="$2"
N="${N:-100000}" ROUNDS="${ROUNDS:-5}" WARM="${WARM:-10000}"
THREADS_A="${THREADS_A:-1}" THREADS_B="${THREADS_B:-1}"   # the gateways' --worker-threads
SIM_PORT=18311 GW_PORT=18312
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
for f in "$A" "$B" "$BIN/infergate" "$BIN/infergate-cli" "$BIN/examples/grpc_body"; do
  [ -x "$f" ] || { echo "missing $f (see the build line at the top)" >&2; exit 1; }
done
"$BIN/examples/grpc_body" simple "$WORK/simple.bin" >/dev/null

load() { # calls -> h2load output
  timeout 120 h2load -n "$1" -c 8 -m 16 -t 1 -d "$WORK/simple.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$GW_PORT/inference.GRPCInferenceService/ModelInfer" 2>&1
}
one() { # gateway binary, worker threads -> "req/s user_ns sys_ns"
  "$BIN/infergate" sim --listen 127.0.0.1:$SIM_PORT --name d --slots 256 --latency-ms 0 --no-orca-oob \
    >"$WORK/sim.log" 2>&1 &
  local sim=$!
  "$1" serve --backend 127.0.0.1:$SIM_PORT --listen 127.0.0.1:$GW_PORT --metrics-listen 127.0.0.1:18313 \
    --admin-listen 127.0.0.1:18314 --worker-threads "$2" >"$WORK/gw.log" 2>&1 &
  local gw=$!
  pids=("$sim" "$gw")
  for _ in $(seq 100); do  # readiness: a real call answered, bounded at 10 s
    "$BIN/infergate-cli" --addr 127.0.0.1:$GW_PORT infer -m simple >/dev/null 2>&1 && break
    sleep 0.1
  done
  load "$WARM" >/dev/null
  local u0 s0 u1 s1 out ok
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$gw/stat")
  out=$(load "$N")
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$gw/stat")
  kill "$gw" "$sim" 2>/dev/null; wait "$gw" "$sim" 2>/dev/null || true
  ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
  [ "$ok" = "$N" ] || { echo "only $ok of $N calls answered 2xx:" >&2; echo "$out" >&2; exit 1; }
  local tick; tick=$(getconf CLK_TCK)
  echo "$(echo "$out" | awk '/^finished in/ {print int($4)}') $(( (u1 - u0) * 1000000000 / tick / N )) $(( (s1 - s0) * 1000000000 / tick / N ))"
}
median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
printf '%-6s %-5s %10s %12s %12s\n' round build "req/s" "user ns/call" "sys ns/call"
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    bin="$A" threads="$THREADS_A"; [ "$side" = B ] && bin="$B" threads="$THREADS_B"
    one "$bin" "$threads" >"$WORK/result"
    read -r rps user sys <"$WORK/result"
    printf '%-6s %-5s %10s %12s %12s\n' "$r" "$side" "$rps" "$user" "$sys" | tee -a "$WORK/$side"
  done
done
for side in A B; do
  printf 'median %-5s %10s %12s %12s\n' "$side" \
    "$(awk '{print $3}' "$WORK/$side" | median)" "$(awk '{print $4}' "$WORK/$side" | median)" \
    "$(awk '{print $5}' "$WORK/$side" | median)"
done
