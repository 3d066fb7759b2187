#!/usr/bin/env bash
# The guardrails, as CI runs them (.ci/run calls this before the test suite):
#   ruff (pyproject.toml [tool.ruff]) over the repository, zero findings;
#   mypy with check_untyped_defs over formats/, runtime/ and qtbuild/, zero errors
#     (scripts/typecheck.sh: checked under their installed names);
#   the layer/cycle and packaging tests (tests/test_architecture.py, tests/test_packaging.py).
# Usage: bash scripts/check.sh [--all]   (--all: then the whole test suite, the README's command)
# Needs .venv (bash scripts/install.sh installs ruff and mypy with the test extra).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '== %s\n' "$*" >&2; }

step "ruff check"
.venv/bin/ruff check .
step "mypy (scripts/typecheck.sh)"
bash scripts/typecheck.sh
step "layer, cycle and packaging tests"
.venv/bin/python -P -m pytest -q -p no:cacheprovider tests/test_architecture.py tests/test_packaging.py
if [ "${1:-}" = "--all" ]; then
  step "the test suite"
  .venv/bin/python -P -m pytest -q
fi
