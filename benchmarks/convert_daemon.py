#!/usr/bin/env python3
"""Benchmark: `qtbuild convert docker://IMAGE` against `docker save IMAGE` alone (issue 16, item 3).

Usage: python benchmarks/convert_daemon.py [--size-mib 1024] [--files 21000] [--repeat 3] [--dir DIR]
                                          [--reference-python PYTHON] [--image TAG]

Generates the image benchmarks/convert.py generates (≈ --size-mib of file data over 3 layers:
many small files, medium files, a few large ones; no Docker Hub), `docker load`s it under a
unique tag (or takes --image, an image already in the daemon, left as it is), then times,
interleaved, each in a fresh process:

  docker save   docker save TAG, spliced into /dev/null    (the daemon's export and transfer alone)
  convert       qtbuild convert -q docker://TAG -o DIR/out.eif
  reference     the same with --reference-python (e.g. another checkout's venv: an A/B in one run)

The save writes to /dev/null, so the ratio charges convert for everything it does beyond the
daemon's export: reading the stream, verifying diff_ids, flattening, writing the EIF (on the disk
of DIR).  Target: convert <= 1.15 x docker save.  Besides the totals it reports when the first and
the last byte of the save arrived (for docker save at the pipe; for convert as qtbuild read them,
through benchmarks/instrument/stream_marks.py), when the EIF write ran, convert's time after the last byte,
and the floor of the ratio through the save API: (the save's last byte + the EIF write, which
needs every layer) / the save.  The last line, ``ratios: {json}`` (the median of the per-round
ratios), is what tests/test_benchmarks.py checks against benchmarks/baseline.json.  A generated
image is removed from the daemon at the end.  Needs a reachable Docker daemon and the docker CLI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
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
#: The name benchmarks/convert.py's archive gives the image.
ARCHIVE_TAG = "bench:latest"


def _convert_benchmark():
    """benchmarks/convert.py as a module (run with -P, a script's directory is not on sys.path):
    its image generator makes the same synthetic image here."""
    spec = importlib.util.spec_from_file_location("convert_benchmark", Path(__file__).with_name("convert.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image_id(reference: str) -> str | None:
    found = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", reference], capture_output=True,
                           text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def load_image(workdir: str, total: int, files: int, tag: str) -> None:
    """Generate the image (convert.py's, as a legacy docker-archive) and load it into the daemon as ``tag``.

    The archive names the image ``bench:latest``; a ``bench:latest`` someone else has in the daemon
    is left (or put back) as it was, not untagged."""
    archive = _convert_benchmark().generate(workdir, total, files)["archive"]
    before = _image_id(ARCHIVE_TAG)
    subprocess.run(["docker", "load", "-q", "-i", archive], check=True, capture_output=True, text=True)
    subprocess.run(["docker", "tag", ARCHIVE_TAG, tag], check=True, capture_output=True)
    if before is None:
        subprocess.run(["docker", "rmi", ARCHIVE_TAG], capture_output=True)  # untags it; the image stays as `tag`
    elif _image_id(ARCHIVE_TAG) != before:
        subprocess.run(["docker", "tag", before, ARCHIVE_TAG], check=True, capture_output=True)
    shutil.rmtree(os.path.join(workdir, "layout"), ignore_errors=True)
    os.unlink(archive)


def _environment() -> dict[str, str]:
    # as installed packages run: with their bytecode cached (a PYTHONDONTWRITEBYTECODE shell would
    # charge convert for compiling every module, a cost docker save, a Go binary, never has)
    return {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def timed_save(tag: str) -> dict[str, float]:
    """``docker save TAG`` into /dev/null (spliced, no copy through Python): total, first and last byte."""
    start = time.time()
    process = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=_environment())
    assert process.stdout is not None
    marks: dict[str, float] = {}
    with open(os.devnull, "wb") as null:
        while os.splice(process.stdout.fileno(), null.fileno(), 1 << 24):
            marks.setdefault("first byte", time.time() - start)
    marks["last byte"] = time.time() - start
    _, stderr = process.communicate()
    marks["total"] = time.time() - start
    if process.returncode != 0:
        raise SystemExit(f"docker save {tag} failed ({process.returncode}): {stderr.decode(errors='replace')}")
    return marks


def timed_convert(python: str, tag: str, output: str, marks_file: str) -> dict[str, float]:
    """``qtbuild convert -q docker://TAG -o OUTPUT`` run by ``python``, with the stream marks of
    benchmarks/instrument/stream_marks.py (first/last byte of the save stream, EIF write start/end)."""
    hook = Path(__file__).with_name("instrument") / "stream_marks.py"
    code = f"exec(open({str(hook)!r}).read()); from qtbuild.cli import main; main()"
    start = time.time()
    environment = {**_environment(), "QTBUILD_BENCH_T0": repr(start), "QTBUILD_BENCH_MARKS": marks_file}
    # -P: the working directory is not put on sys.path, so each interpreter runs its own checkout's qtbuild
    # (started from a checkout, the reference interpreter imported the checkout's code, not its own)
    result = subprocess.run([python, "-P", "-c", code, "convert", "-q", f"docker://{tag}", "-o", output],
                            capture_output=True, text=True, env=environment)
    total = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"convert with {python} failed ({result.returncode}):\n{result.stderr}")
    with open(marks_file) as file:
        marks = json.load(file)
    return {**marks, "total": total, "after last byte": total - marks["last byte"]}


def _median(runs: list[dict[str, float]], key: str) -> float:
    """The median of ``key`` over the runs (NaN when a run lacks it: an older qtbuild without that step)."""
    return statistics.median(run.get(key, math.nan) for run in runs)


def report(rounds: dict[str, list[dict[str, float]]]) -> float:
    """Print the per-command medians and the floor arithmetic; return the convert/save ratio."""
    saves = rounds["docker save"]
    for index, save_run in enumerate(saves):
        print(f"round {index + 1}: " + ", ".join(
            f"{name} {runs[index]['total']:.2f} s" + ("" if name == "docker save" else
                                                       f" ({runs[index]['total'] / save_run['total']:.2f} x)")
            for name, runs in rounds.items()))
    for name, runs in rounds.items():
        line = (f"{name:12s} median {_median(runs, 'total'):6.2f} s (best {min(r['total'] for r in runs):6.2f}); "
                f"first byte {_median(runs, 'first byte'):5.2f} s, last byte {_median(runs, 'last byte'):5.2f} s")
        if name != "docker save":
            line = line.replace("; first byte", f"; request sent {_median(runs, 'request'):5.2f} s, first byte")
            line += (f"; EIF write {_median(runs, 'write start'):5.2f}-{_median(runs, 'write end'):5.2f} s; "
                     f"after the last byte {_median(runs, 'after last byte'):5.2f} s")
        print(line)
    for name, runs in rounds.items():
        if name != "docker save":
            ratio = statistics.median(c["total"] / s["total"] for c, s in zip(runs, saves, strict=True))
            print(f"{name} docker:// = {ratio:.2f} x docker save (target <= 1.15)")
    if "reference" in rounds:  # the A/B itself: paired within each round, so the save's own noise drops out
        paired = statistics.median(c["total"] / r["total"] for c, r in zip(rounds["convert"], rounds["reference"],
                                                                           strict=True))
        print(f"convert / reference = {paired:.3f} (median of the per-round ratios)")
    save, first, last = (_median(saves, key) for key in ("total", "first byte", "last byte"))
    write = statistics.median(r.get("write end", math.nan) - r.get("write start", math.nan)
                              for r in rounds["convert"])
    print(f"docker save: {first:.2f} s of {save:.2f} s before its first byte (the daemon's export into a temp "
          f"dir, {first / save:.0%}: no client can overlap it), {last - first:.2f} s streaming")
    print(f"floor via the save API: (save's last byte + the EIF write, which needs every layer) / save = "
          f"({last:.2f} + {write:.2f}) / {save:.2f} = {(last + write) / save:.2f} x")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return statistics.median(c["total"] / s["total"] for c, s in zip(rounds["convert"], saves, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=21000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of (docker save, convert), interleaved")
    parser.add_argument("--dir", default=None, help="where the image is generated and the EIF written")
    parser.add_argument("--reference-python", default=None,
                        help="also time convert run by this interpreter (its qtbuild), interleaved")
    parser.add_argument("--image", default=None,
                        help="time this image already in the daemon instead of generating one (left as it is)")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="qtbuild-bench-daemon-", dir=options.dir)
    tag = options.image or f"qtbuild-bench/daemon:{uuid.uuid4().hex[:12]}"
    loaded = False
    try:
        if not options.image:
            start = time.perf_counter()
            loaded = True
            load_image(workdir, options.size_mib * MIB, options.files, tag)
            print(f"generated and loaded {options.size_mib} MiB / {options.files} files as {tag} in "
                  f"{time.perf_counter() - start:.1f} s under {workdir}")
        output = os.path.join(workdir, "out.eif")
        marks = os.path.join(workdir, "marks.json")
        pythons = {"convert": sys.executable}
        if options.reference_python:
            pythons["reference"] = options.reference_python
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ("docker save", *pythons)}
        for index in range(options.repeat):  # interleaved, so machine noise hits all alike
            converts = list(pythons)[::-1 if index % 2 else 1]  # alternating: no one always runs right after the save
            for name in ("docker save", *converts):
                if os.path.exists(output):
                    os.unlink(output)
                os.sync()  # no earlier run's dirty pages in flight
                run = timed_save(tag) if name == "docker save" else timed_convert(pythons[name], tag, output, marks)
                rounds[name].append(run)
        ratio = report(rounds)
        print("ratios: " + json.dumps({"daemon_time_over_save": ratio}, sort_keys=True))
    finally:
        if loaded:
            subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
