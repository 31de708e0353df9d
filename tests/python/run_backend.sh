#!/usr/bin/env bash
# A real model server as a backend behind the gateway: installs
# tests/python/requirements-NAME.txt into .venv-NAME/ when missing or changed, then runs
# `pytest -m NAME tests/python/test_NAME.py` against the built gateway (run after
# scripts/test.sh or `cargo build`).
#
#   tests/python/run_backend.sh NAME [pytest args]
#
#   mlserver  MLServer + mlserver-sklearn: first install 70-140 s and 570 MB, then
#             about 10 s a run.
#   kserve    KServe's Python model server: first install 80-140 s and 500 MB, then
#             about 5 s a run.
#
# Environment: PYTHON (interpreter for the venv, default python3), INFERGATE_BIN,
# CARGO_TARGET_DIR, PYTEST_ADDOPTS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

NAME="${1:-}"
[[ -n "$NAME" ]] || die "usage: tests/python/run_backend.sh NAME [pytest args] (NAME: mlserver or kserve)"
shift
REQUIREMENTS="$ROOT/tests/python/requirements-$NAME.txt"
TESTS="tests/python/test_$NAME.py"
[[ -f "$REQUIREMENTS" && -f "$ROOT/$TESTS" ]] \
    || die "unknown backend '$NAME': needs tests/python/requirements-$NAME.txt and $TESTS"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-$NAME"
STAMP="$VENV/.infergate-requirements.txt"

if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found"
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi
# Keeps git from listing the venv (what Python 3.13's venv writes itself).
[[ -f "$VENV/.gitignore" ]] || printf '*\n' > "$VENV/.gitignore"
# Both files count: requirements-NAME.txt includes requirements.txt.
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

say "pytest -m $NAME $TESTS"
started=$SECONDS
timeout 600 "$VENV/bin/python" -m pytest -q -rxX -m "$NAME" "$TESTS" "$@"
say "$NAME suite passed in $((SECONDS - started)) s"
