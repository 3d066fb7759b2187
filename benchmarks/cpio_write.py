#!/usr/bin/env python3
"""Benchmark: the archive writer's CPU per entry, over a layer of many small files kept in memory.

Usage: python benchmarks/cpio_write.py [--reuse IMAGE_DIR | --size-mib 48 --files 8000] [--repeat 5]
                                      [--reference-python OTHER/.venv/bin/python]

The bottom layer of an image (``benchmarks/convert.py``'s shape: 80 % of the files, small, in
directories of 500) is flattened as ``qtbuild measure`` does it (kept in memory from the first
pass, :mod:`qtbuild.convert.kept_layers`), then, in a child process, three passes over its entries
are timed, each ``--repeat`` times (the fastest run counts):

  walk    the tree's entries alone (what the writer is given: ``FlatTree.iter_entries``);
  write   the writer alone: ``CpioStream.ring_chunks`` into the EIF writer's ring, consumed;
  hashed  the writer into the EIF writer's digest (``SectionStreamDigest``: two SHA-384 lanes and
          the CRC on their own threads), as ``measure`` writes the customer ramdisk;
  sha384  the floor of ``hashed``: one SHA-384 over the archive's bytes, on one thread.

Reported: the main thread's CPU per entry of ``write`` less ``walk`` (the writer's own per-entry
Python; also as a multiple of ``walk``'s, which the regression check reads), and of ``hashed``;
the wall time of ``hashed`` over ``sha384`` (two lanes on two free CPUs: 1.0 at best).  With
``--reference-python`` the same child runs under that interpreter too (another checkout's venv),
interleaved round by round, and each figure is also given as the median of the per-round ratios.
On the issue-16 image (16,837 files of 6.4 KB):
``python -P benchmarks/cpio_write.py --reuse BENCH --reference-python OTHER/.venv/bin/python``,
where BENCH is an image ``benchmarks/convert.py --keep`` generated.  The last line,
``ratios: {json}``, is what tests/test_benchmarks.py reads.
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

MIB = 1 << 20

#: One child: flatten the image's bottom layer as measure does, time the passes, print JSON.
CHILD = r"""
import hashlib, json, sys, time
from qtbuild.convert.flatten import flatten
from qtbuild.formats.cpio import CpioStream
from qtbuild.formats.eif import SectionType
from qtbuild.formats.eif_stream import SectionStreamDigest
from qtbuild.formats import eif_writer
from qtbuild.formats.eif_writer import RING_BUFFERS
from qtbuild.sources.open import open_image

source, repeat = sys.argv[1], int(sys.argv[2])
RING_CHUNK = getattr(eif_writer, "RING_CHUNK", 1 << 20)  # the EIF writer's buffer size (1 MiB before it was named)
sys.setswitchinterval(0.0005)  # as convert and measure run (qtbuild/convert/gil.py)
with open_image(source, platform=None) as image, flatten(image.layers()[:1], reread=True) as tree:
    assert tree.spill_bytes == 0
    stream = CpioStream(tree.iter_entries, hardlink_groups=tree.hardlink_groups)
    entries = sum(1 for _ in tree.iter_entries())
    archive = b"".join(stream.chunks())

    def walk():
        for _ in tree.iter_entries():
            pass

    def write():
        for _ in stream.ring_chunks(RING_BUFFERS, RING_CHUNK):
            pass

    def hashed():
        with SectionStreamDigest() as digest:
            digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, 0, buffers=RING_BUFFERS)
            for chunk in stream.ring_chunks(RING_BUFFERS, RING_CHUNK):
                digest.update(chunk)
            pcr0 = digest.measurements().pcr0
        return pcr0

    def sha384():
        view = memoryview(archive)
        hasher = hashlib.sha384()
        for start in range(0, len(view), 1 << 20):
            hasher.update(view[start:start + (1 << 20)])

    best = {}
    for _ in range(repeat):
        for name, function in (("walk", walk), ("write", write), ("hashed", hashed), ("sha384", sha384)):
            cpu, wall = time.thread_time(), time.perf_counter()
            function()
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], cpu), min(old[1], wall))
    print(json.dumps({"entries": entries, "bytes": len(archive), "pcr0": hashed().hex(),
                      **{name: {"cpu": cpu, "wall": wall} for name, (cpu, wall) in best.items()}}))
"""


def run_child(python: str, source: str, repeat: int) -> dict:
    result = subprocess.run([python, "-P", "-c", CHILD, source, str(repeat)], capture_output=True, text=True,
                            cwd=tempfile.gettempdir())
    if result.returncode:
        sys.exit(f"{python}: the benchmark child failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def figures(run: dict) -> dict[str, float]:
    """Per-entry CPU in microseconds (the writer's own, and with the lanes) and hashed / sha384 wall."""
    per_entry = 1e6 / run["entries"]
    writer = run["write"]["cpu"] - run["walk"]["cpu"]
    return {"writer_us_per_entry": writer * per_entry,
            "hashed_us_per_entry": run["hashed"]["cpu"] * per_entry,
            "hashed_wall_over_sha384": run["hashed"]["wall"] / run["sha384"]["wall"],
            "writer_time_over_tree_walk": writer / run["walk"]["cpu"]}


def _generate(workdir: str, size_mib: int, files: int) -> str:
    """An image of benchmarks/convert.py's shape (its generator, loaded from beside this file)."""
    spec = importlib.util.spec_from_file_location("convert_benchmark", os.path.join(os.path.dirname(__file__),
                                                                                     "convert.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate(workdir, size_mib * MIB, files)["layout"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", metavar="IMAGE_DIR", default=None,
                        help="the image a `benchmarks/convert.py --keep` run generated in IMAGE_DIR")
    parser.add_argument("--size-mib", type=int, default=48, help="without --reuse: the generated image's size")
    parser.add_argument("--files", type=int, default=8000, help="without --reuse: its file count")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each pass in a child; the fastest counts")
    parser.add_argument("--rounds", type=int, default=3, help="children per interpreter, interleaved")
    parser.add_argument("--reference-python", default=None, help="another checkout's interpreter to compare with")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="qtbuild-cpio-write-")
    try:
        layout = (os.path.join(options.reuse, "layout") if options.reuse
                  else _generate(workdir, options.size_mib, options.files))
        source = f"oci:{layout}:bench"
        pythons = {"this": sys.executable}
        if options.reference_python:
            pythons["reference"] = options.reference_python
        rounds: dict[str, list[dict]] = {name: [] for name in pythons}
        for _ in range(options.rounds):
            for name, python in pythons.items():
                rounds[name].append(run_child(python, source, options.repeat))
        first = rounds["this"][0]
        print(f"{first['entries']} entries, {first['bytes'] / MIB:.1f} MiB of archive; "
              f"best of {options.repeat} runs in each of {options.rounds} rounds")
        medians = {}
        for name, runs in rounds.items():
            medians[name] = {key: statistics.median(figures(run)[key] for run in runs) for key in figures(first)}
            print(f"{name:9s} writer {medians[name]['writer_us_per_entry']:5.2f} us/entry "
                  f"({medians[name]['writer_time_over_tree_walk']:.2f} x the tree's walk), "
                  f"with the lanes {medians[name]['hashed_us_per_entry']:5.2f} us/entry, "
                  f"hashed wall {medians[name]['hashed_wall_over_sha384']:.2f} x one SHA-384")
        if "reference" in rounds:
            if {run["pcr0"] for run in rounds["this"] + rounds["reference"]} != {first["pcr0"]}:
                sys.exit("the two interpreters' archives differ (PCR0)")
            for key in figures(first):
                ratio = statistics.median(figures(this)[key] / figures(reference)[key]
                                          for this, reference in zip(rounds["this"], rounds["reference"],
                                                                     strict=True))
                print(f"{key}: {ratio:.2f} x the reference (median of rounds)")
        print(f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        print("ratios: " + json.dumps({"writer_time_over_tree_walk": medians["this"]["writer_time_over_tree_walk"]},
                                      sort_keys=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
