#!/usr/bin/env bash
# MLServer as a backend behind the gateway: installs requirements-mlserver.txt into
# .venv-mlserver/ when missing or changed, then runs `pytest -m mlserver` against the
# built gateway (run after scripts/test.sh or `cargo build`). About 20 s once installed;
# the first install takes about 70 s and 550 MB.
#
#   tests/python/run_mlserver.sh [pytest args]
#
# Environment: PYTHON (interpreter for the venv, default python3), INFERGATE_BIN,
# CARGO_TARGET_DIR, PYTEST_ADDOPTS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-mlserver"
REQUIREMENTS="$ROOT/tests/python/requirements-mlserver.txt"
STAMP="$VENV/.infergate-requirements.txt"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi
# Both files count: requirements-mlserver.txt includes requirements.txt.
WANT="$(cat "$REQUIREMENTS" "$ROOT/tests/python/requirements.txt")"
if [[ ! -f "$STAMP" ]] || [[ "$(cat "$STAMP")" != "$WANT" ]]; then
    say "installing $(basename "$REQUIREMENTS") into $VENV"
    started=$SECONDS
    timeout 900 "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQUIREMENTS"
    printf '%s' "$WANT" > "$STAMP"
    say "installed in $((SECONDS - started)) s"
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
export INFERGATE_BIN="${INFERGATE_BIN:-$TARGET_DIR/debug/infergate}"
[[ -x "$INFERGATE_BIN" ]] || die "built binary not found at $INFERGATE_BIN (cargo build --bin infergate)"

say "pytest -m mlserver tests/python/test_mlserver.py"
timeout 600 "$VENV/bin/python" -m pytest -q -rxX -m mlserver tests/python/test_mlserver.py "$@"
