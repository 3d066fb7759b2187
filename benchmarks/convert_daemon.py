#!/usr/bin/env python3
"""Benchmark: `qtbuild convert docker://IMAGE` against `docker save IMAGE` alone (issue 16, item 3).

Usage: python benchmarks/convert_daemon.py [--size-mib 1024] [--files 21000] [--repeat 3] [--dir DIR]
                                          [--reference-python PYTHON]

Generates the image benchmarks/convert.py generates (≈ --size-mib of file data over 3 layers:
many small files, medium files, a few large ones; no Docker Hub), `docker load`s it under a
unique tag, then times, interleaved, each in a fresh process:

  docker save   docker save TAG > /dev/null            (the daemon's export and transfer alone)
  convert       qtbuild convert -q docker://TAG -o DIR/out.eif
  reference     the same with --reference-python (e.g. another checkout's venv: an A/B in one run)

The reference writes to /dev/null, so the ratio charges convert for everything it does beyond the
daemon's export: reading the stream, verifying diff_ids, flattening, writing the EIF (on the disk
of DIR).  Target: convert <= 1.15 x docker save.  The last line, ``ratios: {json}`` (the median of
the per-round ratios), is what tests/test_benchmarks.py checks against benchmarks/baseline.json.
The image is removed from the daemon at the end.  Needs a reachable Docker daemon and the docker CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MIB = 1 << 20


def _convert_benchmark():
    """benchmarks/convert.py as a module (run with -P, a script's directory is not on sys.path):
    its image generator makes the same synthetic image here."""
    spec = importlib.util.spec_from_file_location("convert_benchmark", Path(__file__).with_name("convert.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_image(workdir: str, total: int, files: int, tag: str) -> None:
    """Generate the image (convert.py's, as a legacy docker-archive) and load it into the daemon as ``tag``."""
    archive = _convert_benchmark().generate(workdir, total, files)["archive"]
    loaded = subprocess.run(["docker", "load", "-q", "-i", archive], check=True, capture_output=True, text=True)
    archive_tag = loaded.stdout.strip().rpartition(" ")[2]  # "Loaded image: bench:latest"
    subprocess.run(["docker", "tag", archive_tag, tag], check=True, capture_output=True)
    subprocess.run(["docker", "rmi", archive_tag], capture_output=True)  # untags it; the image stays as `tag`
    shutil.rmtree(os.path.join(workdir, "layout"), ignore_errors=True)
    os.unlink(archive)


def timed(command: str) -> float:
    # as installed packages run: with their bytecode cached (a PYTHONDONTWRITEBYTECODE shell would
    # charge convert for compiling every module, a cost docker save, a Go binary, never has)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    start = time.perf_counter()
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"benchmark command failed ({result.returncode}): {command}\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=21000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (docker save, convert), interleaved")
    parser.add_argument("--dir", default=None, help="where the image is generated and the EIF written")
    parser.add_argument("--reference-python", default=None,
                        help="also time convert run by this interpreter (its qtbuild), interleaved")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="qtbuild-bench-daemon-", dir=options.dir)
    tag = f"qtbuild-bench/daemon:{uuid.uuid4().hex[:12]}"
    loaded = False
    try:
        start = time.perf_counter()
        loaded = True
        load_image(workdir, options.size_mib * MIB, options.files, tag)
        print(f"generated and loaded {options.size_mib} MiB / {options.files} files as {tag} in "
              f"{time.perf_counter() - start:.1f} s under {workdir}")
        output = os.path.join(workdir, "out.eif")
        qtbuild = f"{sys.executable} -c 'from qtbuild.cli import main; main()'"
        commands = {
            "docker save": f"docker save {tag} > /dev/null",
            "convert": f"{qtbuild} convert -q docker://{tag} -o {output} > /dev/null",
        }
        if options.reference_python:
            commands["reference"] = (f"{options.reference_python} -c 'from qtbuild.cli import main; main()' "
                                     f"convert -q docker://{tag} -o {output} > /dev/null")
        rounds: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(options.repeat):  # interleaved, so machine noise hits both alike
            for name, command in commands.items():
                if os.path.exists(output):
                    os.unlink(output)
                os.sync()  # no earlier run's dirty pages in flight
                rounds[name].append(timed(command))
        for name, times in rounds.items():
            print(f"{name:12s} median {statistics.median(times):7.2f} s   best {min(times):7.2f} s")
        ratio = statistics.median(c / s for c, s in zip(rounds["convert"], rounds["docker save"], strict=True))
        print(f"convert docker:// = {ratio:.2f} x docker save (target <= 1.15); load {os.getloadavg()[0]:.2f}")
        if options.reference_python:
            reference = statistics.median(r / s for r, s in zip(rounds["reference"], rounds["docker save"],
                                                                 strict=True))
            print(f"reference          = {reference:.2f} x docker save")
        print("ratios: " + json.dumps({"daemon_time_over_save": ratio}, sort_keys=True))
    finally:
        if loaded:
            subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
