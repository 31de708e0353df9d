#!/usr/bin/env bash
# The cost of TLS (issue 15): the same gateway (--worker-threads 1) in front of the same
# simulated backend (no service time), once in the clear on both hops and once with TLS
# on the front door and to the backend. Same h2load workloads against both, in one run:
#   c8m16   `simple`, 8 connections x 16 streams   (throughput)
#   c1m1    `simple`, one call at a time           (latency)
# Prints requests per second and the gateway's CPU per call (utime+stime from
# /proc/PID/stat over the run), each with its ratio to plaintext. Connections are
# opened once per run, so this is the steady-state cost of the records, not of
# handshakes. A benchmark, not a test: loopback only, every run bounded by count.
#
#   cargo build --release -p infergate -p infergate-client --bins --examples
#   scripts/bench-tls.sh                  # about a minute
#   N=200000 scripts/bench-tls.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
N="${N:-60000}"
N_LAT="${N_LAT:-10000}"
WORK="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
die() { echo "bench-tls: $*" >&2; exit 1; }
[ -x "$BIN/infergate" ] && [ -x "$BIN/infergate-cli" ] && [ -x "$BIN/examples/grpc_body" ] ||
  die "build first: cargo build --release -p infergate -p infergate-client --bins --examples"
command -v h2load >/dev/null || die "h2load is missing (apt-get install nghttp2-client)"
command -v openssl >/dev/null || die "openssl is missing"

# A CA and a certificate for localhost that it signed.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj "/CN=bench CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$WORK/ext"
openssl x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 1 -extfile "$WORK/ext" -out "$WORK/tls.pem" 2>/dev/null

"$BIN/examples/grpc_body" simple "$WORK/simple.bin" >/dev/null
sim() { "$BIN/infergate" sim --listen "127.0.0.1:$1" --slots 256 --latency-ms 0 --no-orca-oob "${@:2}" >/dev/null 2>&1 & pids+=($!); }
sim 18201
sim 18202 --tls-cert "$WORK/tls.pem" --tls-key "$WORK/tls.key"

cat > "$WORK/plain.toml" <<TOML
listen = "127.0.0.1:18211"
metrics_listen = "127.0.0.1:18212"
admin_listen = "127.0.0.1:18213"
worker_threads = 1
[[backends]]
address = "127.0.0.1:18201"
TOML
cat > "$WORK/tls.toml" <<TOML
listen = "127.0.0.1:18221"
metrics_listen = "127.0.0.1:18222"
admin_listen = "127.0.0.1:18223"
worker_threads = 1
[tls]
cert = "$WORK/tls.pem"
key = "$WORK/tls.key"
[backend_tls]
ca = "$WORK/ca.pem"
server_name = "localhost"
[[backends]]
address = "127.0.0.1:18202"
TOML

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

run() { # variant, config, url
  local name=$1 cfg=$2 url=$3
  "$BIN/infergate" serve --config "$cfg" >"$WORK/gw-$name.log" 2>&1 &
  local gw=$!
  pids+=($gw)
  local ready=""
  for _ in $(seq 100); do
    if h2load -n 1 -c 1 -d "$WORK/simple.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
         "$url" 2>/dev/null | grep -q '1 succeeded'; then ready=1; break; fi
    sleep 0.1
  done
  [ -n "$ready" ] || die "$name: the gateway never answered (log: $(tail -3 "$WORK/gw-$name.log"))"
  for load in "c8m16 $N 8 16" "c1m1 $N_LAT 1 1"; do
    set -- $load
    h2load -n "$(( $2 / 10 ))" -c "$3" -m "$4" -d "$WORK/simple.bin" -H 'content-type: application/grpc' \
      -H 'te: trailers' "$url" >/dev/null 2>&1  # warm-up, not counted
    local before after out rps ok
    before=$(cpu_ticks $gw)
    out=$(timeout 120 h2load -n "$2" -c "$3" -m "$4" -d "$WORK/simple.bin" -H 'content-type: application/grpc' \
      -H 'te: trailers' "$url" 2>&1)
    after=$(cpu_ticks $gw)
    rps=$(awk '/^finished in/ {print $4}' <<<"$out")
    ok=$(awk '/^requests:/ {print $8}' <<<"$out")
    [ "$ok" = "$2" ] || die "$name $1: $ok of $2 calls succeeded"
    echo "$name $1 $rps $(python3 -c "print(($after - $before) / $TICK / $2 * 1e6)")"
  done
  kill -TERM $gw; wait $gw 2>/dev/null || true
}

{
  run plain "$WORK/plain.toml" http://127.0.0.1:18211/inference.GRPCInferenceService/ModelInfer
  run tls "$WORK/tls.toml" https://localhost:18221/inference.GRPCInferenceService/ModelInfer
} > "$WORK/results"
python3 - "$WORK/results" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
base = {r[1]: r for r in rows if r[0] == "plain"}
print("| hops | load | req/s | ratio | gateway CPU µs/call | ratio |")
print("|---|---|---|---|---|---|")
for name, load, rps, cpu in rows:
    b = base[load]
    print(f"| {name} | {load} | {float(rps):.0f} | {float(rps)/float(b[2]):.2f} | {float(cpu):.1f} | {float(cpu)/float(b[3]):.2f} |")
PY
