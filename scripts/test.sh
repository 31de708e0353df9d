#!/usr/bin/env bash
# The project's test command: builds the workspace, runs every Rust test, then runs the
# Python compatibility suite (the stock Triton `tritonclient.grpc` client against a real
# `infergate demo`) from a virtual environment in .venv/.
#
#   scripts/test.sh
#
# Needs cargo and python3 (with the venv module). Environment:
#   PYTHON            interpreter used to create .venv (default: python3)
#   CARGO_TARGET_DIR  honoured when locating the built binary
#   PYTEST_ADDOPTS    extra pytest options (standard pytest variable)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/tests/python/requirements.txt"
STAMP="$VENV/.infergate-requirements.txt"

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (with rustup)"
# Fail before the long build if the Python suite cannot run at all.
if [[ ! -x "$VENV/bin/python" ]] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    die "$PYTHON not found: the tritonclient compatibility suite needs Python 3 with the venv module (Debian/Ubuntu: apt-get install python3 python3-venv)"
fi

say "cargo build --workspace"
cargo build --workspace

say "cargo test --workspace"
cargo test --workspace

# --- Python compatibility suite ---------------------------------------------------------

if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "$VENV is broken (its interpreter does not run); recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" \
        || die "'$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi

if ! "$VENV/bin/python" -c 'import tritonclient.grpc, numpy, pytest' >/dev/null 2>&1 \
    || ! cmp -s "$REQUIREMENTS" "$STAMP"; then
    say "installing $(basename "$REQUIREMENTS") into $VENV"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$STAMP"
fi

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
export INFERGATE_BIN="$TARGET_DIR/debug/infergate"
[[ -x "$INFERGATE_BIN" ]] || die "built binary not found at $INFERGATE_BIN"

say "pytest tests/python (INFERGATE_BIN=$INFERGATE_BIN)"
"$VENV/bin/python" -m pytest -q tests/python
