#!/usr/bin/env python3
"""Benchmark: the first pass over gzip layers alone (inflate, blob SHA-256, diff_id SHA-256).

Usage: python benchmarks/first_pass.py [--layout DIR[:TAG]] [--size-mib 32] [--repeat 3]
                                      [--reference-python OTHER/.venv/bin/python]
       python benchmarks/first_pass.py --layout DIR[:TAG] --per-member [--repeat 3]
                                      [--reference-python OTHER/.venv/bin/python]
       python benchmarks/first_pass.py --flatten SOURCE [--spill] [--repeat 5]
                                      [--reference-python OTHER/.venv/bin/python]

Reads every gzip layer of an OCI layout (default: a synthetic one of --size-mib, one layer)
through ``qtbuild.sources.blobs.open_uncompressed`` exactly as convert's first pass does (a
``VerifyingReader`` over the blob file, the diff_id checked, read in 1 MiB pieces), with no tar
parsing.  Each run is a child process that reports the CPU time of all its threads and its wall
time after its imports.  Beside it, the floor: the same work done with the libraries directly on
one thread (python-isal's gzip reader into one reused buffer, ``hashlib`` over the blob and over
the output).  With --reference-python the same qtbuild code path also runs under that
interpreter (another checkout's venv), interleaved round by round.

Reported per round and as medians of the per-round ratios: CPU over the floor's CPU, and with a
reference, CPU and wall over the reference's.  The last line, ``ratios: {json}``, is what
tests/test_benchmarks.py reads.  On the issue-16 image:
``python -P benchmarks/first_pass.py --layout BENCH/layout:bench --reference-python OTHER/.venv/bin/python``,
where BENCH is an image ``benchmarks/convert.py --keep`` generated.

``--per-member`` (with ``--layout``) times the per-member Python alone: the image's bottom gzip
layer is inflated into memory first (not timed), then scanned on a worker thread (``LayerScan``,
``TarScanner``) and applied to a tree (flatten's ``_apply_layer``) as the first pass does, from
1 MiB chunks that cost no copy.  Per round, the best of 5 runs in one child: the CPU time of both
threads per member; with a reference, the median of the per-round ratios.  On the issue-16 image:
``python -P benchmarks/first_pass.py --layout BENCH/layout:bench --per-member --reference-python OTHER``.

``--flatten SOURCE`` (``oci:DIR:TAG``, ``docker-archive:FILE``) times the whole first pass instead:
``flatten()`` as ``qtbuild measure`` runs it (compressed local layers re-read later, nothing
spilled; ``--spill``: as ``convert`` runs it), under the same GIL switch interval and deferred
verification.  Per run: its wall time, the CPU time of all threads, and how busy the CPUs were
(CPU / wall / CPU count); with a reference, the medians of the per-round wall and CPU ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

REF_NAME = "org.opencontainers.image.ref.name"
GZIP_TYPES = ("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.docker.image.rootfs.diff.tar.gzip")

#: One child: read every layer as convert's first pass does, print {"cpu", "wall", "bytes"}.
QTBUILD_PASS = r"""
import json, os, resource, sys, time
from qtbuild.sources.blobs import VerifyingReader, open_uncompressed

layers = json.loads(sys.argv[1])
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu0, wall0, total = usage.ru_utime + usage.ru_stime, time.perf_counter(), 0
for path, size, digest, diff_id in layers:
    raw = VerifyingReader(open(path, "rb", buffering=0), size=size, digest=digest, what=path)
    with open_uncompressed(raw, diff_id=diff_id, what=path) as stream:
        while chunk := stream.read(1 << 20):
            total += len(chunk)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime - cpu0, "wall": time.perf_counter() - wall0, "bytes": total}))
"""

#: The floor: the same three jobs with the libraries directly, on one thread, no verification logic.
FLOOR = r"""
import hashlib, json, resource, sys, time
from isal.igzip import IGzipFile

class Hashed:
    def __init__(self, file):
        self.file, self.hash = file, hashlib.sha256()
    def readinto(self, buffer):
        n = self.file.readinto(buffer)
        self.hash.update(memoryview(buffer)[:n])
        return n
    def read(self, n):
        data = self.file.read(n)
        self.hash.update(data)
        return data

layers = json.loads(sys.argv[1])
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu0, wall0, total = usage.ru_utime + usage.ru_stime, time.perf_counter(), 0
buffer = bytearray(1 << 20)
for path, size, digest, diff_id in layers:
    with open(path, "rb", buffering=0) as file:
        blob = Hashed(file)
        reader, out = IGzipFile(fileobj=blob, mode="rb"), hashlib.sha256()
        while n := reader.readinto(buffer):
            out.update(memoryview(buffer)[:n])
            total += n
        assert "sha256:" + blob.hash.hexdigest() == digest and "sha256:" + out.hexdigest() == diff_id
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime - cpu0, "wall": time.perf_counter() - wall0, "bytes": total}))
"""


#: One child: flatten SOURCE (argv[1]) as measure (argv[2] == "reread") or convert does; print {"cpu", "wall"}.
FLATTEN_PASS = r"""
import json, resource, sys, time
from qtbuild.convert.flatten import flatten
from qtbuild.convert.gil import short_gil_switches
from qtbuild.convert.verify_gate import deferred_verification
from qtbuild.sources.open import open_image

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

with open_image(sys.argv[1], platform=None) as image, short_gil_switches(), deferred_verification():
    cpu0, wall0 = cpu(), time.perf_counter()
    tree = flatten(image.layers(), reread=sys.argv[2] == "reread")
    wall, used = time.perf_counter() - wall0, cpu() - cpu0
    tree.close()
print(json.dumps({"cpu": used, "wall": wall}))
"""


#: One child: the per-member path over the inflated layer argv[1]; print {"cpu", "members"} (best of 5).
PER_MEMBER = r"""
import json, resource, sys
from isal.igzip import IGzipFile
from qtbuild.convert import flatten as flatten_module
from qtbuild.convert.layer_scan import LayerScan
from qtbuild.convert.tarscan import ByteBudget, TarLimits

with IGzipFile(sys.argv[1], "rb") as file:
    data = file.read()
chunks = [data[start:start + (1 << 20)] for start in range(0, len(data), 1 << 20)]

class Chunks:
    def __init__(self):
        self._chunks = iter(chunks)
    def read(self, size):
        return next(self._chunks, b"")
    def close(self):
        pass

class Bottom:
    diff_id = "sha256:bottom"

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

best = None
for _ in range(5):
    builder = flatten_module._TreeBuilder(flatten_module.FlattenLimits(), 0)
    start = cpu()
    scan = LayerScan(Chunks, limits=TarLimits(), budget=ByteBudget(1 << 40).share(0), tee=lambda chunk: None)
    flatten_module._apply_layer(builder, 0, Bottom(), scan, {}, None)
    used = cpu() - start
    best = used if best is None else min(best, used)
print(json.dumps({"cpu": best, "members": builder._entries}))
"""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def layers_of(layout: str) -> list[tuple[str, int, str, str]]:
    """``(path, size, digest, diff_id)`` of the gzip layers of the layout's image (TAG or the first)."""
    layout, _, tag = layout.partition(":")
    blobs = os.path.join(layout, "blobs", "sha256")

    def document(digest: str) -> dict:
        with open(os.path.join(blobs, digest.split(":", 1)[1]), "rb") as file:
            return json.load(file)

    with open(os.path.join(layout, "index.json"), "rb") as file:
        manifests = json.load(file)["manifests"]
    chosen = [m for m in manifests if not tag or m.get("annotations", {}).get(REF_NAME) == tag]
    manifest = document(chosen[0]["digest"])
    diff_ids = document(manifest["config"]["digest"])["rootfs"]["diff_ids"]
    return [(os.path.join(blobs, layer["digest"].split(":", 1)[1]), layer["size"], layer["digest"], diff_id)
            for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True) if layer["mediaType"] in GZIP_TYPES]


def synthetic_layer(workdir: str, size: int) -> list[tuple[str, int, str, str]]:
    """One gzip layer of ``size`` bytes: incompressible and compressible stretches, like a tar of files."""
    from isal import isal_zlib

    rng = __import__("random").Random(16)
    data = b"".join(rng.randbytes(1 << 16) + bytes(1 << 16) + b"text line %d\n" % i * 3000
                    for i in range(max(1, size // ((1 << 17) + 39_000))))
    compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    blob = compressor.compress(data) + compressor.flush()
    path = os.path.join(workdir, "layer.tar.gz")
    with open(path, "wb") as file:
        file.write(blob)
    return [(path, len(blob), _sha256(path), "sha256:" + hashlib.sha256(data).hexdigest())]


def run(python: str, code: str, *args) -> dict:
    argv = [arg if isinstance(arg, str) else json.dumps(arg) for arg in args]
    out = subprocess.run([python, "-P", "-c", code, *argv], capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{python}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layout", help="an OCI layout DIR[:TAG] (default: a synthetic gzip layer)")
    parser.add_argument("--size-mib", type=int, default=32, help="size of the synthetic layer")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--reference-python", help="also run the qtbuild pass with this interpreter")
    parser.add_argument("--flatten", metavar="SOURCE", help="time flatten() over this image instead (oci:DIR:TAG, "
                        "docker-archive:FILE)")
    parser.add_argument("--spill", action="store_true", help="with --flatten: spill compressed layers, as convert "
                        "does (default: re-read them later, as measure does)")
    parser.add_argument("--per-member", action="store_true", help="with --layout: time the per-member Python (tar "
                        "scan and tree) over the image's bottom layer, inflated into memory first")
    args = parser.parse_args()
    if args.per_member:
        if not args.layout:
            parser.error("--per-member needs --layout")
        per_member_rounds(layers_of(args.layout)[0][0], args.repeat, args.reference_python)
        return
    if args.flatten:
        flatten_rounds(args.flatten, "spill" if args.spill else "reread", args.repeat, args.reference_python)
        return
    with tempfile.TemporaryDirectory(prefix="qtbuild-first-pass-") as workdir:
        layers = layers_of(args.layout) if args.layout else synthetic_layer(workdir, args.size_mib << 20)
        print(f"{len(layers)} gzip layers, {sum(layer[1] for layer in layers) / 1e6:.0f} MB compressed; "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        over_floor, over_ref_cpu, over_ref_wall = [], [], []
        for round_ in range(args.repeat):
            floor = run(sys.executable, FLOOR, layers)
            ours = run(sys.executable, QTBUILD_PASS, layers)
            assert ours["bytes"] == floor["bytes"]
            line = (f"round {round_ + 1}: {ours['bytes'] / 1e6:.0f} MB out; floor {floor['cpu']:.3f} CPU-s; "
                    f"qtbuild {ours['cpu']:.3f} CPU-s {ours['wall']:.3f} s")
            over_floor.append(ours["cpu"] / floor["cpu"])
            if args.reference_python:
                ref = run(args.reference_python, QTBUILD_PASS, layers)
                line += f"; reference {ref['cpu']:.3f} CPU-s {ref['wall']:.3f} s"
                over_ref_cpu.append(ours["cpu"] / ref["cpu"])
                over_ref_wall.append(ours["wall"] / ref["wall"])
            print(line, flush=True)
        ratios = {"first_pass_cpu_time_over_floor": statistics.median(over_floor)}
        if args.reference_python:
            ratios["first_pass_cpu_time_over_reference"] = statistics.median(over_ref_cpu)
            ratios["first_pass_time_over_reference"] = statistics.median(over_ref_wall)
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("medians of the per-round ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
        print("ratios: " + json.dumps({k: round(v, 4) for k, v in ratios.items()}))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def per_member_rounds(blob: str, repeat: int, reference: str | None) -> None:
    """``--per-member``: interleaved rounds of :data:`PER_MEMBER` over the gzip layer ``blob``."""
    print(f"per-member path over {os.path.basename(blob)[:12]}; load average {_load()}", flush=True)
    over_ref = []
    for round_ in range(repeat):
        runs = [("qtbuild", sys.executable)] + ([("reference", reference)] if reference else [])
        if round_ % 2:
            runs.reverse()
        results = {name: run(python, PER_MEMBER, blob) for name, python in runs}
        line = f"round {round_ + 1}: " + "; ".join(
            f"{name} {r['cpu'] * 1e3:.1f} ms CPU for {r['members']} members, "
            f"{r['cpu'] / r['members'] * 1e6:.2f} us each" for name, r in results.items())
        if reference:
            over_ref.append(results["qtbuild"]["cpu"] / results["reference"]["cpu"])
        print(line + f"; load {_load()}", flush=True)
    ratios = {"per_member_cpu_time_over_reference": statistics.median(over_ref)} if reference else {}
    if ratios:
        print("medians of the per-round ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("ratios: " + json.dumps({k: round(v, 4) for k, v in ratios.items()}))


def flatten_rounds(source: str, mode: str, repeat: int, reference: str | None) -> None:
    """``--flatten``: interleaved rounds of flatten() over ``source``; wall, CPU and busy CPUs of each."""
    cpus = os.cpu_count() or 1
    print(f"flatten {source} ({'as convert: spilled' if mode == 'spill' else 'as measure: re-read'}); "
          f"load average {_load()}", flush=True)
    walls, over_ref_wall, over_ref_cpu = [], [], []
    for round_ in range(repeat):
        runs = [("qtbuild", sys.executable)] + ([("reference", reference)] if reference else [])
        if round_ % 2:
            runs.reverse()  # neither side always runs first
        results = {}
        for name, python in runs:
            results[name] = result = run(python, FLATTEN_PASS, source, mode)
            result["busy"] = result["cpu"] / result["wall"] / cpus
        ours = results["qtbuild"]
        walls.append(ours["wall"])
        line = f"round {round_ + 1}: " + "; ".join(
            f"{name} {r['wall']:.3f} s, {r['cpu']:.3f} CPU-s, CPUs {r['busy']:.0%} busy" for name, r in results.items())
        if reference:
            over_ref_wall.append(ours["wall"] / results["reference"]["wall"])
            over_ref_cpu.append(ours["cpu"] / results["reference"]["cpu"])
        print(line + f"; load {_load()}", flush=True)
    ratios = {}
    if reference:
        ratios = {"flatten_time_over_reference": statistics.median(over_ref_wall),
                  "flatten_cpu_time_over_reference": statistics.median(over_ref_cpu)}
    print(f"median flatten wall {statistics.median(walls):.3f} s; load average {_load()}")
    if ratios:
        print("medians of the per-round ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("ratios: " + json.dumps({k: round(v, 4) for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
