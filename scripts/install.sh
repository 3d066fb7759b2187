#!/usr/bin/env bash
# Install qtbuild and its test dependencies into ./.venv (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,demo]'
# An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set nothing is ever cached:
# `qtbuild run` starts three interpreters (CLI, supervisor, sandbox helper), each of which would then
# compile ~100 of our modules again (≈ 0.15 s each).  Precompile, as installing a wheel does; the
# interpreter ignores a .pyc whose source has changed since (it checks the source's mtime and size).
.venv/bin/python -m compileall -q formats runtime qtbuild >/dev/null
echo "qtbuild installed in $(pwd)/.venv (run .venv/bin/qtbuild --help)" >&2

# The enclave SDK must run on Debian bookworm's own packages (python3-cryptography 38,
# python3-cbor2 5.4): a second venv with exactly those versions lets the tests prove it.
if [ ! -x .venv-bookworm/bin/python ]; then
  python3 -m venv .venv-bookworm
  .venv-bookworm/bin/python -m pip install -q "cryptography==38.0.4" "cbor2==5.4.6"
fi
