#!/usr/bin/env bash
# Install qtbuild and its test dependencies into ./.venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
echo "qtbuild installed in $(pwd)/.venv (run .venv/bin/qtbuild --help)" >&2
