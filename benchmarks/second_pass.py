#!/usr/bin/env python3
"""Benchmark: the second pass of ``qtbuild measure`` (the EIF write phase), thread by thread.

Usage: python -P benchmarks/second_pass.py SOURCE [--layer N] [--repeat 5]
                                           [--reference-python OTHER/.venv/bin/python]
       python -P benchmarks/second_pass.py --size-mib 16 [--repeat 3]   (the small mode)

Each run is a child process that runs ``measure`` on SOURCE (``oci:DIR:TAG``, ``docker-archive:FILE``)
in process and reports, for its write phase only (from the end of ``flatten`` to the last chunk
hashed): the wall time, the CPU time of every thread (by role: the two hashing lanes, the re-read
workers, the archive writer on the main thread, others), each as a share of the wall time ("busy"),
and how idle the machine's CPUs were meanwhile (/proc/stat: other processes' load shows there).

``--layer N`` (an OCI layout only) measures an image of that layer alone (its blob linked, not
copied, into a temporary layout), so the write phase is that layer's region of the full run.  On
the issue-16 image, ``--layer 1`` is ``usr/lib/medium`` (4,196 files of 77 KB inflated a second
time): ``python -P benchmarks/second_pass.py oci:BENCH/layout:bench --layer 1 --reference-python
OTHER/.venv/bin/python``, BENCH being an image ``benchmarks/convert.py --keep`` generated.

With --reference-python the same runs use that interpreter too (another checkout's venv),
interleaved round by round; the medians of the per-round ratios of wall and CPU are reported.

``--size-mib N`` (no SOURCE) generates a one-layer gzip image of N MiB of 77 KB files (half random,
half text: about 2:1, like the benchmark's middle layer) and measures that, with no layer kept
from the first pass (so the layer is inflated a second time, as one over the keep budget is).  The last line,
``ratios: {json}``, holds the write phase's CPU time over its floor, the two SHA-384 passes over
the bytes it hashed (SHA-384 timed beside it, in this process) — what tests/test_benchmarks.py reads.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

#: One child: measure SOURCE in process; print the write phase's figures as JSON.
CHILD = r"""
import json, os, sys, threading, time

def machine():
    fields = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(fields), fields[3] + fields[4]

ROLES = {"MainThread": "writer", "eif-digest-a": "lane a", "eif-digest-b": "lane b", "reread": "re-read"}
def role(thread):
    return ROLES.get(thread.name.rstrip("_0123456789").rstrip("-"), "other")

ENDED = {}  # thread -> (its CPU time when it ended, when)
run = threading.Thread.run
def counted_run(self):
    try:
        run(self)
    finally:
        ENDED[self] = (time.thread_time(), time.perf_counter())
threading.Thread.run = counted_run

def threads_cpu():
    cpu = {}
    for thread in threading.enumerate():
        try:
            cpu[thread] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except (OSError, TypeError):
            continue
    return cpu

import qtbuild.convert.kept_layers as kept_layers
import qtbuild.convert.pipeline as pipeline
import qtbuild.formats.eif_stream as eif_stream
from qtbuild.convert.pipeline import ConvertOptions, convert

if sys.argv[2] == "re-read":  # a layer small enough to keep from the first pass is inflated again all the same
    kept_layers.KEEP_BUDGET = 0
marks = {}
flatten = pipeline.flatten
def timed_flatten(*args, **kwargs):
    tree = flatten(*args, **kwargs)
    marks["start"] = (time.perf_counter(), machine(), threads_cpu())
    return tree
pipeline.flatten = timed_flatten
measurements = eif_stream.SectionStreamDigest.measurements
def timed_measurements(self, *args):
    result = measurements(self, *args)  # every chunk hashed; the lanes are still alive
    marks["end"] = (time.perf_counter(), machine(), threads_cpu())
    marks["hashed"] = self.length
    return result
eif_stream.SectionStreamDigest.measurements = timed_measurements

convert(sys.argv[1], ConvertOptions(output=None, quiet=True))
(wall0, (total0, idle0), cpu0), (wall1, (total1, idle1), cpu1) = marks["start"], marks["end"]
wall = wall1 - wall0
ended = {thread: seconds for thread, (seconds, when) in ENDED.items() if wall0 < when <= wall1}
roles = {}
for thread, seconds in {**ended, **cpu1}.items():
    roles[role(thread)] = roles.get(role(thread), 0.0) + seconds - cpu0.get(thread, 0.0)
print(json.dumps({"wall": wall, "cpu": sum(roles.values()), "roles": roles, "hashed": marks["hashed"],
                  "idle": (idle1 - idle0) / max(total1 - total0, 1)}))
"""


class _Layout:
    """An OCI layout being written under ``into``: blobs by content, then its index (one image)."""

    def __init__(self, into: str):
        self.into, self.blobs = into, os.path.join(into, "blobs", "sha256")
        os.makedirs(self.blobs)

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blobs, digest), "wb") as handle:
            handle.write(data)
        return "sha256:" + digest

    def finish(self, manifest: dict, tag: str) -> str:
        """Write ``manifest`` and the index naming it ``tag``; returns the image's source string."""
        data = json.dumps(manifest).encode()
        index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                    "digest": self.put(data), "size": len(data),
                                                    "annotations": {"org.opencontainers.image.ref.name": tag}}]}
        with open(os.path.join(self.into, "index.json"), "w") as handle:
            json.dump(index, handle)
        with open(os.path.join(self.into, "oci-layout"), "w") as handle:
            handle.write('{"imageLayoutVersion": "1.0.0"}')
        return f"oci:{self.into}:{tag}"


def one_layer_layout(source: str, layer: int, into: str) -> str:
    """An OCI layout of layer ``layer`` of the OCI layout ``source`` alone; returns its source string."""
    if not source.startswith("oci:"):
        raise SystemExit("--layer needs an oci:DIR:TAG source")
    directory, _, tag = source[len("oci:"):].partition(":")
    blobs = os.path.join(directory, "blobs", "sha256")

    def blob(digest: str) -> bytes:
        with open(os.path.join(blobs, digest.split(":", 1)[1]), "rb") as handle:
            return handle.read()

    with open(os.path.join(directory, "index.json"), "rb") as handle:
        index = json.loads(handle.read())
    descriptor = next(m for m in index["manifests"]
                      if not tag or m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    manifest = json.loads(blob(descriptor["digest"]))
    config = json.loads(blob(manifest["config"]["digest"]))
    chosen = manifest["layers"][layer]
    config["rootfs"]["diff_ids"] = [config["rootfs"]["diff_ids"][layer]]
    config.setdefault("config", {})["Cmd"] = ["/bin/sh"]
    out = _Layout(into)
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {**manifest["config"], "digest": out.put(config_bytes), "size": len(config_bytes)}
    manifest["layers"] = [chosen]
    name = chosen["digest"].split(":", 1)[1]
    os.link(os.path.join(blobs, name), os.path.join(out.blobs, name))  # the blob itself is not copied
    return out.finish(manifest, "layer")


def small_layout(size_mib: int, into: str) -> str:
    """A one-layer gzip OCI layout of ``size_mib`` MiB of 77 KB files; returns its source string."""
    rng = random.Random(16)
    text = b"".join(b"line %d of a medium file\n" % i for i in range(2000))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("usr", "usr/lib", "usr/lib/medium"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for index in range(size_mib * (1 << 20) // 77_000):
            data = rng.randbytes(38_500) + text[:38_500]
            info = tarfile.TarInfo(f"usr/lib/medium/f{index:05d}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)
    out = _Layout(into)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": out.put(config), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": out.put(layer), "size": len(layer)}]}
    return out.finish(manifest, "small")


def sha384_seconds_per_byte() -> float:
    """CPU time SHA-384 takes a byte here, in 1 MiB updates (as the lanes hash)."""
    block, hasher = os.urandom(1 << 20), hashlib.sha384()
    start = time.thread_time()
    for _ in range(64):
        hasher.update(block)
    return (time.thread_time() - start) / (64 << 20)


def run(python: str, source: str, reread: bool) -> dict:
    done = subprocess.run([python, "-P", "-c", CHILD, source, "re-read" if reread else "as-is"],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode:
        raise SystemExit(f"{python}: measure failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def line(label: str, figures: dict) -> str:
    wall = figures["wall"]
    roles = "  ".join(f"{role} {seconds:.2f} ({seconds / wall:.0%})"
                      for role, seconds in sorted(figures["roles"].items(), key=lambda item: -item[1]))
    busy = figures["cpu"] / wall / (os.cpu_count() or 1)
    return (f"{label:9} write phase {wall:.3f} s, CPU {figures['cpu']:.2f} s ({busy:.0%} of the CPUs), "
            f"machine idle {figures['idle']:.0%}; {roles}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?")
    parser.add_argument("--layer", type=int, help="measure an image of this layer (0 = bottom) of an OCI layout alone")
    parser.add_argument("--size-mib", type=int, help="measure a generated one-layer image of this size instead")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference-python")
    args = parser.parse_args()
    if (args.source is None) == (args.size_mib is None):
        parser.error("give either SOURCE or --size-mib")
    with tempfile.TemporaryDirectory(prefix="qtbuild-second-pass-") as scratch:
        if args.size_mib is not None:
            source = small_layout(args.size_mib, scratch)
        elif args.layer is not None:
            source = one_layer_layout(args.source, args.layer, scratch)
        else:
            source = args.source
        pythons = [("this", sys.executable)] + ([("reference", args.reference_python)] if args.reference_python else [])
        results: dict[str, list[dict]] = {label: [] for label, _ in pythons}
        for round_ in range(args.repeat):
            for label, python in pythons:
                figures = run(python, source, args.size_mib is not None)
                results[label].append(figures)
                print(f"round {round_ + 1} " + line(label, figures), flush=True)
    print("load average " + " ".join(f"{load:.2f}" for load in os.getloadavg()))
    for label, runs in results.items():
        median = {"wall": statistics.median(r["wall"] for r in runs), "cpu": statistics.median(r["cpu"] for r in runs),
                  "idle": statistics.median(r["idle"] for r in runs),
                  "roles": {role: statistics.median(r["roles"].get(role, 0.0) for r in runs)
                            for role in runs[0]["roles"]}}
        print("median  " + line(label, median))
    if args.reference_python:
        this, reference = results["this"], results["reference"]
        wall = statistics.median(a["wall"] / b["wall"] for a, b in zip(this, reference, strict=True))
        cpu = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(this, reference, strict=True))
        print(f"this / reference (median of the rounds' ratios): write phase wall {wall:.3f} x, CPU {cpu:.3f} x")
    floor = statistics.median(2 * r["hashed"] for r in results["this"]) * sha384_seconds_per_byte()
    over = statistics.median(r["cpu"] for r in results["this"]) / floor
    print(f"write phase CPU over its SHA-384 floor ({floor:.2f} CPU-s): {over:.2f}")
    print("ratios: " + json.dumps({"write_cpu_time_over_sha384": over}))


if __name__ == "__main__":
    main()
