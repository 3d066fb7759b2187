"""Every benchmark runs end to end in its small mode (CI's smoke test; all together < 60 s) and its
ratios must not regress by more than 50 % against ``benchmarks/baseline.json``.

A benchmark's last ``ratios: {json}`` line holds dimensionless figures measured in the same run
(qtbuild against a floor measured beside it: direct TCP, ``gzip -dc | sha384sum``, a bare
interpreter start, a bare ES384 signature…), so machine speed and load cancel out to first order.
The baseline stores, per ratio, its value in the small mode and whether higher or lower is
better; a ratio fails when the cost it stands for grows more than ``tolerance`` times (1.5: a
throughput ratio below baseline / 1.5, a time ratio above baseline × 1.5) — wide enough for a
shared CI machine, narrow enough that a real slowdown cannot rot silently.

To re-measure the baseline after an intended change: run
``QTBUILD_BENCHMARK_BASELINE=update .venv/bin/python -P -m pytest -q tests/test_benchmarks.py`` three
times and keep, per ratio, the worst of the three (benchmarks/baseline.json records that it was
done so); a quiet machine gives a tighter baseline, say in the commit which it was.
Benchmarks run as a user runs them: a fresh interpreter with -P on the installed package, and
tests/ on PYTHONPATH for run_start.py's image factory (its documented invocation).  The 10 GB and
1,000,000-file modes (scale.py's defaults, convert.py --many-files) stay out of CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"
BASELINE = BENCHMARKS / "baseline.json"

SMALL = [
    pytest.param("attest.py", ["--seconds", "0.6"], "documents/s", id="attest"),
    pytest.param("eif_write.py", ["--size-mib", "64", "--repeat", "5"], "MB/s", id="eif_write"),
    pytest.param("kms.py", ["--seconds", "1", "--clients", "1", "--client-processes", "1"], "req/s", id="kms"),
    pytest.param("proxy.py", ["--streams", "8", "--mib", "8", "--round-trips", "50", "--repeat", "5"], "latency",
                 id="proxy"),
    pytest.param("convert.py", ["--size-mib", "24", "--files", "400", "--repeat", "3"], "x the floor", id="convert"),
    pytest.param("convert_daemon.py", ["--size-mib", "24", "--files", "400", "--repeat", "3"], "x docker save",
                 id="convert_daemon"),
    pytest.param("first_pass.py", ["--size-mib", "32", "--repeat", "3"], "CPU-s", id="first_pass"),
    pytest.param("cpio_write.py", ["--rounds", "1", "--repeat", "3"], "us/entry", id="cpio_write"),
    pytest.param("second_pass.py", ["--size-mib", "32", "--repeat", "3"], "SHA-384 floor", id="second_pass"),
    pytest.param("scale.py", ["--small"], "time per 100k files", id="scale"),
    pytest.param("run_start.py", ["--size-mib", "2", "--repeat", "3"], "cli   median", id="run_start",
                 marks=pytest.mark.root),
]

#: Programs a benchmark shells out to (scripts/install-system.sh installs them).
NEEDS = {"convert.py": ["gzip", "sha384sum", "umoci", "cpio"], "run_start.py": ["busybox"],
         "convert_daemon.py": ["docker"]}
#: Benchmarks that talk to the Docker daemon (skipped when none answers, except under CI).
NEEDS_DAEMON = {"convert_daemon.py"}


def measured_ratios(stdout: str) -> dict[str, float]:
    """The benchmark's last ``ratios: {json}`` line."""
    lines = [line for line in stdout.splitlines() if line.startswith("ratios: ")]
    assert lines, "the benchmark printed no 'ratios: {json}' line"
    return json.loads(lines[-1].removeprefix("ratios: "))


def regressions(expected: dict[str, dict], measured: dict[str, float], tolerance: float) -> list[str]:
    """One message per baseline ratio that is missing or whose cost grew more than ``tolerance`` times."""
    problems = []
    for name, spec in expected.items():
        if name not in measured:
            problems.append(f"{name}: not measured (baseline {spec['value']:.3g})")
            continue
        value, base = measured[name], spec["value"]
        growth = (base / value if value > 0 else float("inf")) if spec["better"] == "higher" else value / base
        if growth > tolerance:
            problems.append(f"{name}: {value:.3g} against baseline {base:.3g} ({spec['better']} is better): "
                            f"{growth:.2f}x worse, more than the {tolerance}x tolerated")
    return problems


def _a_cost(name: str) -> bool:
    """Whether a new ratio is a cost (time or latency over a floor: lower is better)."""
    return "latency" in name or "time" in name


def _update_baseline(script: str, args: list[str], ratios: dict[str, float]) -> None:
    baseline = json.loads(BASELINE.read_text())
    entry = baseline["benchmarks"].setdefault(script, {"ratios": {}})
    entry["args"] = args
    for name, value in ratios.items():
        better = entry["ratios"].get(name, {}).get("better", "lower" if _a_cost(name) else "higher")
        entry["ratios"][name] = {"value": round(value, 4), "better": better}
    BASELINE.write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")


@pytest.mark.benchmark
@pytest.mark.parametrize("script, args, expected", SMALL)
def test_benchmark_small_mode(script, args, expected):
    missing = [tool for tool in NEEDS.get(script, []) if shutil.which(tool) is None]
    if not missing and script in NEEDS_DAEMON and subprocess.run(["docker", "info"], capture_output=True).returncode:
        missing = ["a running Docker daemon"]
    if missing:
        message = f"{script} needs {', '.join(missing)} (bash scripts/install-system.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([sys.executable, "-P", str(BENCHMARKS / script), *args], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(TESTS)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout
    ratios = measured_ratios(result.stdout)
    if os.environ.get("QTBUILD_BENCHMARK_BASELINE") == "update":
        _update_baseline(script, args, ratios)
        return
    baseline = json.loads(BASELINE.read_text())
    entry = baseline["benchmarks"][script]
    assert entry["args"] == args, "baseline.json was measured with other arguments: re-measure it"
    problems = regressions(entry["ratios"], ratios, baseline["tolerance"])
    assert not problems, "\n".join(problems) + "\n\n" + result.stdout


def test_every_benchmark_has_a_small_mode_and_a_baseline():
    scripts = {path.name for path in BENCHMARKS.glob("*.py")}
    assert scripts == {param.values[0] for param in SMALL}
    baseline = json.loads(BASELINE.read_text())
    assert set(baseline["benchmarks"]) == scripts
    assert all(entry["ratios"] for entry in baseline["benchmarks"].values())
    assert all(spec["better"] in ("higher", "lower") for entry in baseline["benchmarks"].values()
               for spec in entry["ratios"].values())


def test_regression_check_tolerates_noise_and_catches_a_slowdown():
    assert _a_cost("cli_time_over_interpreter") and _a_cost("latency_proxy_over_direct")
    assert not _a_cost("throughput_proxy_over_direct")
    expected = {"throughput": {"value": 0.9, "better": "higher"}, "time": {"value": 2.0, "better": "lower"}}
    assert regressions(expected, {"throughput": 0.61, "time": 2.99}, 1.5) == []
    assert regressions(expected, {"throughput": 0.95, "time": 1.0}, 1.5) == []      # improvements pass
    problems = regressions(expected, {"throughput": 0.59, "time": 3.01}, 1.5)
    assert [problem.split(":")[0] for problem in problems] == ["throughput", "time"]
    assert regressions(expected, {"time": 2.0}, 1.5) == ["throughput: not measured (baseline 0.9)"]
    assert regressions(expected, {"throughput": 0.0, "time": 2.0}, 1.5)[0].startswith("throughput: 0 against")
