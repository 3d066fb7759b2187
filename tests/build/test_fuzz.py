"""Fuzzing every parser of untrusted input (issue 12): stored inputs replayed, plus a short
coverage-guided run per parser.

tests/helpers/fuzz_targets.py lists the parsers and the typed errors each may raise; any other
exception is a crash.  ``scripts/fuzz.sh --minutes N`` is the long run; it stores crashing
inputs in tests/corpus/fuzz/<target>/, which test_stored_inputs_raise_only_typed_errors
replays (each was a crash before its fix).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.fuzz_targets import FUZZ_CORPUS, TARGETS, regression_inputs

TESTS = Path(__file__).resolve().parents[1]
SHORT_RUN_SECONDS = 15


def test_regression_inputs_belong_to_a_target():
    stored = {path.name for path in FUZZ_CORPUS.iterdir()} if FUZZ_CORPUS.is_dir() else set()
    assert stored <= set(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_stored_inputs_raise_only_typed_errors(name):
    target = TARGETS[name]
    inputs = target.seeds() + [path.read_bytes() for path in regression_inputs(name)]
    assert inputs, f"{name} has no seeds"
    for data in inputs:
        with contextlib.suppress(target.typed):
            target.run(data)


def test_short_coverage_guided_run_finds_no_crash(tmp_path):
    """One atheris process for every parser (the first input byte picks one)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    result = subprocess.run([sys.executable, "-P", "-m", "helpers.fuzz_run", "all", "--seconds",
                             str(SHORT_RUN_SECONDS), "--crashers", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["crashes"] == [], (summary, sorted(p.name for p in tmp_path.rglob("*")))
    assert all(count > 0 for count in summary["per_target"].values()), summary["per_target"]
