#!/usr/bin/env bash
# Stock gRPC tools against a real `infergate demo`, through server reflection only (no
# .proto files): buf curl (npm's @bufbuild/buf, installed under .tools/buf when missing)
# lists and describes the services on both ports, through reflection v1 and v1alpha,
# calls ModelInfer with a JSON body, the admin ListBackends with the token (and without
# it), and grpc.health.v1.Health/Check.
#
#   scripts/stock-tools.sh          # after scripts/test.sh (or cargo build), as .ci/run does
#
# Needs python3 (to read the JSON answers) and npm; where npm is missing it is installed
# with apt-get (Debian's nodejs and npm) when this runs as root or with sudo. Only when npm
# cannot be had is the check skipped, with a message saying so (exit 0). Every step is
# bounded: the whole run takes about 10 s once buf is installed, at most a few minutes.
# Environment:
#   INFERGATE_BIN      the gateway binary (default: $CARGO_TARGET_DIR or target, /debug/infergate)
#   BUF_VERSION        @bufbuild/buf version to install (default below)
#   STOCK_TOOLS_KEEP   set to keep the demo's log directory
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BUF_VERSION="${BUF_VERSION:-1.75.0}"
BUF_PREFIX="$ROOT/.tools/buf"
BUF="$BUF_PREFIX/node_modules/.bin/buf"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN="${INFERGATE_BIN:-$TARGET_DIR/debug/infergate}"

say() { printf '==> %s\n' "$*"; }
die() { printf 'stock-tools: error: %s\n' "$*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 not found (it reads the JSON answers)"

# --- buf ----------------------------------------------------------------------------------

ensure_npm() {
    command -v npm >/dev/null 2>&1 && return 0
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
        sudo="sudo -n"
    fi
    command -v apt-get >/dev/null 2>&1 || return 1
    say "npm not found: apt-get install nodejs npm"
    DEBIAN_FRONTEND=noninteractive timeout 300 $sudo apt-get update -q || return 1
    DEBIAN_FRONTEND=noninteractive timeout 600 $sudo apt-get install -y -q --no-install-recommends nodejs npm || return 1
    command -v npm >/dev/null 2>&1
}

if [[ ! -x "$BUF" ]] || [[ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
    if ! ensure_npm; then
        echo "stock-tools: SKIPPED: npm is not installed and could not be installed (apt-get as root or sudo); buf curl was not run"
        exit 0
    fi
    say "npm install --prefix .tools/buf @bufbuild/buf@$BUF_VERSION"
    timeout 300 npm install --prefix "$BUF_PREFIX" --no-audit --no-fund --loglevel=error \
        "@bufbuild/buf@$BUF_VERSION" || die "npm could not install @bufbuild/buf@$BUF_VERSION"
    [[ -x "$BUF" ]] || die "npm installed @bufbuild/buf but $BUF is missing"
fi
say "buf $("$BUF" --version)"

# --- the demo -----------------------------------------------------------------------------

if [[ ! -x "$BIN" ]]; then
    say "cargo build --bin infergate"
    cargo build --bin infergate
fi
[[ -x "$BIN" ]] || die "gateway binary not found at $BIN"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/infergate-stock-tools.XXXXXX")"
TOKEN="stock-tools-$RANDOM$RANDOM"
DEMO_PID=""
cleanup() {
    if [[ -n "$DEMO_PID" ]] && kill -0 "$DEMO_PID" 2>/dev/null; then
        kill -TERM "$DEMO_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$DEMO_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$DEMO_PID" 2>/dev/null || true
        wait "$DEMO_PID" 2>/dev/null || true
    fi
    if [[ -n "${STOCK_TOOLS_KEEP:-}" ]]; then
        echo "stock-tools: demo log kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Port 0 everywhere: the demo prints where it listens.
say "$BIN demo (ports chosen by the kernel, admin token set)"
INFERGATE_ADMIN_TOKEN="$TOKEN" RUST_LOG="${RUST_LOG:-warn}" "$BIN" demo \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    >"$WORK/demo.out" 2>"$WORK/demo.err" &
DEMO_PID=$!

FRONT="" ADMIN=""
for _ in $(seq 300); do
    FRONT="$(awk '/^  inference /{print $NF}' "$WORK/demo.out")"
    ADMIN="$(awk '/^  admin API /{print $NF}' "$WORK/demo.out")"
    [[ -n "$FRONT" && -n "$ADMIN" ]] && break
    kill -0 "$DEMO_PID" 2>/dev/null || { cat "$WORK/demo.err" >&2; die "the demo exited early"; }
    sleep 0.1
done
[[ -n "$FRONT" && -n "$ADMIN" ]] || { cat "$WORK/demo.err" >&2; die "the demo did not start within 30 s"; }
say "demo: inference $FRONT, admin $ADMIN (pid $DEMO_PID)"

# --- checks -------------------------------------------------------------------------------

PASSED=0
FAILED=0
# buf curl with gRPC (reflection and calls), bounded; stdout in $OUT, exit status in $RC.
bufcurl() {
    set +e
    OUT="$(timeout 30 "$BUF" curl --timeout 20s --protocol grpc "$@" 2>"$WORK/buf.err")"
    RC=$?
    set -e
    ERR="$(cat "$WORK/buf.err")"
}
# check NAME PYTHON: the Python expression, over `out` (stdout text), `j` (stdout as JSON
# when it parses), `rc` and `err`, must be true.
check() {
    local name="$1" expr="$2"
    if OUT="$OUT" RC="$RC" ERR="$ERR" python3 - "$expr" <<'PY'
import base64, json, os, struct, sys
out, rc, err = os.environ["OUT"], int(os.environ["RC"]), os.environ["ERR"]
try:
    j = json.loads(out)
except ValueError:
    j = None
def ints(b64):
    raw = base64.b64decode(b64)
    return list(struct.unpack("<%di" % (len(raw) // 4), raw))
sys.exit(0 if eval("(" + sys.argv[1] + "\n)") else 1)
PY
    then
        PASSED=$((PASSED + 1))
        echo "ok    $name"
    else
        FAILED=$((FAILED + 1))
        echo "FAIL  $name (exit $RC)"
        printf '%s\n' "$OUT" | head -40 | sed 's/^/      /'
        [[ -z "$ERR" ]] || printf '%s\n' "$ERR" | head -10 | sed 's/^/      stderr: /'
    fi
}

INFER_METHODS='["ServerLive","ServerReady","ModelReady","ServerMetadata","ModelMetadata","ModelInfer","ModelStreamInfer","ModelConfig","ModelStatistics","RepositoryIndex"]'
COMMON='["grpc.health.v1.Health","grpc.reflection.v1.ServerReflection","grpc.reflection.v1alpha.ServerReflection"]'

bufcurl --list-services "http://$FRONT"
check "front: list services" "out.split() == sorted($COMMON + ['inference.GRPCInferenceService'])"
bufcurl --list-services "http://$ADMIN"
check "admin: list services" "out.split() == sorted($COMMON + ['infergate.admin.v1.Admin'])"

# --list-methods resolves every advertised service to its descriptor: this is what
# failed with NOT_FOUND for the reflection services before they were registered.
for proto in grpc-v1 grpc-v1alpha; do
    bufcurl --reflect-protocol "$proto" --list-methods "http://$FRONT"
    check "front: describe inference.GRPCInferenceService and every service ($proto)" \
        "all('inference.GRPCInferenceService/' + m in out.split() for m in $INFER_METHODS)
         and 'grpc.health.v1.Health/Check' in out.split()
         and 'grpc.reflection.v1.ServerReflection/ServerReflectionInfo' in out.split()
         and 'grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo' in out.split()"
    bufcurl --reflect-protocol "$proto" --list-methods "http://$ADMIN"
    check "admin: describe infergate.admin.v1.Admin and every service ($proto)" \
        "all('infergate.admin.v1.Admin/' + m in out.split() for m in ['ListBackends','ListModels','DrainBackend','GetConfig','WatchEvents'])
         and 'grpc.health.v1.Health/Watch' in out.split()
         and 'grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo' in out.split()"
done

# ModelInfer with a JSON body (typed contents in, raw little-endian bytes out).
A="$(seq -s, 0 15)"
B="$(printf '1,%.0s' $(seq 16) | sed 's/,$//')"
bufcurl -d "{\"model_name\":\"simple\",\"id\":\"buf-1\",\"inputs\":[
    {\"name\":\"INPUT0\",\"datatype\":\"INT32\",\"shape\":[1,16],\"contents\":{\"int_contents\":[$A]}},
    {\"name\":\"INPUT1\",\"datatype\":\"INT32\",\"shape\":[1,16],\"contents\":{\"int_contents\":[$B]}}]}" \
    "http://$FRONT/inference.GRPCInferenceService/ModelInfer"
check "ModelInfer simple (JSON body): OUTPUT0 = a + b, OUTPUT1 = a - b" \
    "rc == 0 and j['modelName'] == 'simple' and j['id'] == 'buf-1'
     and [o['name'] for o in j['outputs']] == ['OUTPUT0', 'OUTPUT1']
     and ints(j['rawOutputContents'][0]) == [i + 1 for i in range(16)]
     and ints(j['rawOutputContents'][1]) == [i - 1 for i in range(16)]"

bufcurl -d '{"name":"simple"}' "http://$FRONT/inference.GRPCInferenceService/ModelMetadata"
check "ModelMetadata simple" \
    "rc == 0 and j['name'] == 'simple' and [i['name'] for i in j['inputs']] == ['INPUT0', 'INPUT1']"

bufcurl -H "authorization: Bearer $TOKEN" -d '{}' "http://$ADMIN/infergate.admin.v1.Admin/ListBackends"
check "admin ListBackends with the token: the demo's three backends, ready" \
    "rc == 0 and len(j['backends']) == 3 and all(b['health'] == 'ready' and 'simple' in b['models'] for b in j['backends'])"
bufcurl -d '{}' "http://$ADMIN/infergate.admin.v1.Admin/ListBackends"
check "admin ListBackends without the token: UNAUTHENTICATED" \
    "rc == 16 << 3 and 'authorization' in (out + err)"

bufcurl -d '{"service":""}' "http://$FRONT/grpc.health.v1.Health/Check"
check "front: grpc.health.v1.Health/Check \"\" is SERVING" "rc == 0 and j['status'] == 'SERVING'"
bufcurl -d '{"service":"simple"}' "http://$FRONT/grpc.health.v1.Health/Check"
check "front: grpc.health.v1.Health/Check simple is SERVING" "rc == 0 and j['status'] == 'SERVING'"
bufcurl -d '{"service":""}' "http://$ADMIN/grpc.health.v1.Health/Check"
check "admin: grpc.health.v1.Health/Check \"\" is SERVING" "rc == 0 and j['status'] == 'SERVING'"
bufcurl -d '{"service":"no_such_model"}' "http://$FRONT/grpc.health.v1.Health/Check"
check "front: grpc.health.v1.Health/Check of an unknown model is NOT_FOUND" "rc == 5 << 3"

kill -0 "$DEMO_PID" 2>/dev/null || { FAILED=$((FAILED + 1)); echo "FAIL  the demo died during the checks"; }
echo "stock-tools: $PASSED passed, $FAILED failed"
[[ "$FAILED" = 0 ]]
