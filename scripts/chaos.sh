#!/usr/bin/env bash
# The chaos suite (issue 13): faults on one of three simulated backends under open-loop
# load through the default gateway config, as real processes on 127.0.0.1.
#
#   scripts/chaos.sh                  every fault (about 4 minutes), Markdown table at the end
#   scripts/chaos.sh hang stall       a subset (kill hang stall latency errors flap partition
#                                     sigterm reload; also errors-unavailable)
#   scripts/chaos.sh soak [MINUTES]   steady load, gateway RSS and open fds each minute
#                                     (default 30 minutes; a benchmark, not for CI)
#
# Builds the release binaries when they are missing (or predate `bench --timeline`), then
# runs scripts/chaos.py (Python 3, standard library only) under a hard time limit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x target/release/infergate || ! -x target/release/infergate-cli ]] ||
    ! target/release/infergate-cli bench --help 2>/dev/null | grep -q -- '--timeline'; then
    echo "[chaos] building release binaries" >&2
    cargo build --release -p infergate -p infergate-client --bins
fi

# The partition row drops the backend's loopback traffic with iptables (root only).
if ! command -v iptables >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[chaos] installing iptables for the partition fault" >&2
    apt-get install -y -q --no-install-recommends iptables >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends iptables >/dev/null 2>&1) \
        || echo "[chaos] could not install iptables; the partition row will be skipped" >&2
fi

if [[ "${1:-}" == soak ]]; then
    minutes="${2:-30}"
    [[ "$minutes" =~ ^[0-9]+$ ]] || { echo "soak MINUTES: a whole number, not '$minutes'" >&2; exit 2; }
    limit=$((minutes * 60 + 300))
else
    limit=900   # the whole suite takes 4-5 minutes
fi

export CHAOS_COMMAND="scripts/chaos.sh${*:+ $*}"
# SIGTERM first (chaos.py cleans up its processes and iptables rules), SIGKILL 20 s later.
exec timeout --kill-after=20 "$limit" python3 scripts/chaos.py "$@"
