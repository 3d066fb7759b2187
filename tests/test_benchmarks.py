"""Every benchmark runs end to end in its small mode (CI's smoke test; all together < 60 s).

The small mode is the arguments below; the figures are printed, not checked (machines vary).
Benchmarks run as a user runs them: a fresh interpreter with -P on the installed package, and
tests/ on PYTHONPATH for run_start.py's image factory (its documented invocation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"

SMALL = [
    pytest.param("attest.py", ["--seconds", "0.3"], "documents/s", id="attest"),
    pytest.param("eif_write.py", ["--size-mib", "4", "--repeat", "1"], "MB/s", id="eif_write"),
    pytest.param("kms.py", ["--seconds", "0.5", "--clients", "1", "--client-processes", "1"], "req/s", id="kms"),
    pytest.param("proxy.py", ["--streams", "2", "--mib", "1", "--round-trips", "5", "--repeat", "1"], "latency",
                 id="proxy"),
    pytest.param("convert.py", ["--size-mib", "4", "--files", "200", "--repeat", "1"], "x the floor", id="convert"),
    pytest.param("run_start.py", ["--size-mib", "2", "--repeat", "1"], "cli   median", id="run_start",
                 marks=pytest.mark.root),
]

#: Programs a benchmark shells out to (scripts/install-system.sh installs them).
NEEDS = {"convert.py": ["gzip", "sha384sum", "umoci", "cpio"], "run_start.py": ["busybox"]}


@pytest.mark.benchmark
@pytest.mark.parametrize("script, args, expected", SMALL)
def test_benchmark_small_mode(script, args, expected):
    missing = [tool for tool in NEEDS.get(script, []) if shutil.which(tool) is None]
    if missing:
        message = f"{script} needs {', '.join(missing)} (bash scripts/install-system.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([sys.executable, "-P", str(BENCHMARKS / script), *args], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout


def test_every_benchmark_has_a_small_mode():
    scripts = {path.name for path in BENCHMARKS.glob("*.py")}
    assert scripts == {param.values[0] for param in SMALL}
