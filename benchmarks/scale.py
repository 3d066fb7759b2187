#!/usr/bin/env python3
"""Benchmark: does `qtbuild convert` scale linearly in bytes and in files, within 300 MB of RAM?

Usage: python benchmarks/scale.py [--gib 2.5,5,10] [--gzip-gib 0.5,1,2] [--files 250000,500000,1000000]
                                  [--linked-files 250000,500000,1000000] [--repeat 1] [--dir DIR] [--keep]
       python benchmarks/scale.py --small     (the CI mode: 20/40/80 MiB twice, 10k/20k/40k files; 2 runs)

Each series ('' skips one) is generated, streamed to disk (never held in memory) with
deterministic content (a seeded PRNG picks names and sizes; file data is a 1 MiB random block
rotated per file and tagged with the file's number, so it is cheap to write yet incompressible
for gzip's 32 KiB window):

  bytes   docker-archive (Docker < 25 layout, uncompressed layers, read in place): 4 layers, 99 %
          of the bytes in 4-64 MiB files, 1 % in 1-16 KiB files (500 to a directory).
  gzip    OCI layout with gzip layers (level 1), same plan as bytes: inflated, verified, spilled.
  files   docker-archive (uncompressed) of N non-directory members of 0-256 bytes over 4 layers,
          1,000 to a directory; 1 % hardlinks, 1 % symlinks; layer 3 overwrites 1 % of layer 1's
          files and whites out 0.5 % of layer 2's (the flatten rules' per-entry paths all run).
  links   as files, but every other member is a hardlink to the file before it (package stores,
          git objects): one hardlink group per two files.

Each image is converted with the real CLI in a child process (``qtbuild convert -q SOURCE -o
out.eif``) whose own CPU time and peak RSS come from ``os.wait4``.  A series' images are
generated first, then converted --repeat times, interleaved (machine noise hits every size
alike; the best times and the largest RSS count), then deleted: the disk holds one series and
one EIF at a time (the default bytes series needs ~28 GiB; --dir says where).  A one-file image
converted in every round gives the fixed cost (interpreter start, kernel blob, EIF sections),
subtracted from each time before it is divided by the size, so per-unit figures compare
between sizes.

Printed: per image, wall and CPU seconds, both per GiB or per 100k files (net of the fixed
cost), peak RSS; per series, the linearity ratio (per-unit time at the largest size over the
smallest; target <= 1.25) and the largest RSS (target <= 300 MB).  The last line, ``ratios:
{json}``, holds the CPU-time linearity ratios (CPU time, unlike wall time, hardly moves with the
other load on a shared machine) that tests/test_benchmarks.py checks against
benchmarks/baseline.json.  GiB here is 2**30 bytes of file data (the archive adds tar headers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from typing import Any

# python-isal (qtbuild inflates with it) also deflates faster than zlib: the gzip series is quicker to generate.
from isal import isal_zlib as _deflate

MIB = 1 << 20
GIB = 1 << 30
BLOCK = 512
RSS_TARGET_MB = 300
LINEARITY_TARGET = 1.25


# --------------------------------------------------------------------------------------------
# Streaming tar writers
# --------------------------------------------------------------------------------------------


class _Sink:
    """Where a layer's tar stream goes: SHA-256 of the tar (diff_id), optional gzip, SHA-256 of
    the blob, and the file."""

    def __init__(self, handle, gzip: bool):
        self.handle, self.diff, self.blob, self.size = handle, hashlib.sha256(), hashlib.sha256(), 0
        self._gzip = _deflate.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if gzip else None

    def write(self, data) -> None:
        self.diff.update(data)
        if self._gzip is not None:
            data = self._gzip.compress(data)
        self._out(data)

    def _out(self, data) -> None:
        if data:
            self.blob.update(data)
            self.size += len(data)
            self.handle.write(data)

    def finish(self) -> tuple[str, str, int]:
        """(blob digest, diff_id, blob size)."""
        if self._gzip is not None:
            self._out(self._gzip.flush())
        return "sha256:" + self.blob.hexdigest(), "sha256:" + self.diff.hexdigest(), self.size


class _Data:
    """Deterministic incompressible file data: a 1 MiB random block, rotated and tagged per file."""

    def __init__(self, seed: int):
        block = random.Random(seed).randbytes(MIB)
        self._view = memoryview(block + block)

    def write(self, sink: _Sink, number: int, size: int) -> None:
        tag = struct.pack(">QQ", number, size)[:size]
        sink.write(tag)
        left, offset = size - len(tag), (number * 4099) % MIB
        while left:
            piece = min(left, MIB)
            sink.write(self._view[offset:offset + piece])
            left -= piece


class _LayerTar:
    """Writes tar members straight to a sink (ustar headers, or PAX for long names)."""

    def __init__(self, sink: _Sink, data: _Data):
        self._sink, self._data = sink, data

    def _header(self, name: str, kind: bytes, size: int = 0, mode: int = 0o644, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mode, info.linkname = kind, size, mode, link
        info.mtime = 1_700_000_000
        self._sink.write(info.tobuf(tarfile.PAX_FORMAT))

    def directory(self, name: str) -> None:
        self._header(name, tarfile.DIRTYPE, mode=0o755)

    def file(self, name: str, number: int, size: int) -> None:
        self._header(name, tarfile.REGTYPE, size)
        self._data.write(self._sink, number, size)
        if size % BLOCK:
            self._sink.write(bytes(BLOCK - size % BLOCK))

    def symlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.SYMTYPE, mode=0o777, link=target)

    def hardlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.LNKTYPE, link=target)

    def empty(self, name: str) -> None:
        self._header(name, tarfile.REGTYPE)

    def close(self) -> None:
        self._sink.write(bytes(2 * BLOCK))


class _OuterTar:
    """The docker-archive itself: members whose size is learnt after streaming them (a
    placeholder header is written first and rewritten in place), so a layer is never copied."""

    def __init__(self, path: str):
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()

    def begin(self) -> int:
        start = self.handle.tell()
        self.handle.write(bytes(BLOCK))
        return start

    def end(self, start: int, name: str) -> None:
        end = self.handle.tell()
        size = end - start - BLOCK
        self.handle.write(bytes(-size % BLOCK))
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        self.handle.seek(start)
        self.handle.write(info.tobuf(tarfile.USTAR_FORMAT))
        self.handle.seek(0, os.SEEK_END)

    def add(self, name: str, data: bytes) -> None:
        start = self.begin()
        self.handle.write(data)
        self.end(start, name)

    def close(self) -> None:
        self.handle.write(bytes(2 * BLOCK))
        self.handle.close()


# --------------------------------------------------------------------------------------------
# Image plans: each yields, per layer, a function writing that layer's members
# --------------------------------------------------------------------------------------------

LAYERS = 4


def _bytes_members(total: int, seed: int):
    """Per layer, the members of a ``total``-byte image (see the module docstring)."""
    rng = random.Random(seed)
    layers: list[list[tuple[str, int]]] = [[] for _ in range(LAYERS)]
    small_budget, large_budget, number = total // 100, total - total // 100, 0
    while large_budget > 0:
        size = min(large_budget, rng.randint(4 * MIB, 64 * MIB))
        layers[number % LAYERS].append((f"opt/large{number % LAYERS}/blob{number:06d}.bin", size))
        large_budget -= size
        number += 1
    small = 0
    while small_budget > 0:
        size = min(small_budget, rng.randint(1024, 16 * 1024))
        layer = small % LAYERS
        layers[layer].append((f"usr/share/small{layer}/{small // 500:04d}/f{small:07d}", size))
        small_budget -= size
        small += 1
    return layers


def _write_bytes_layer(tar: _LayerTar, members: list[tuple[str, int]], first_number: int) -> None:
    made: set[str] = set()
    for offset, (name, size) in enumerate(members):
        parent = name.rpartition("/")[0]
        if parent not in made:
            parts = parent.split("/")
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    tar.directory(directory)
        tar.file(name, first_number + offset, size)


def _files_layer(tar: _LayerTar, layer: int, count: int, linked: bool = False) -> None:
    """``count`` non-directory members of layer ``layer`` (see the module docstring); ``linked``:
    every other one a hardlink to the file before it."""
    rng = random.Random(1000 + layer)
    tar.directory(f"l{layer}")
    written = 0
    if layer == LAYERS - 1:  # overwrite 1 % of layer 1's files, white out 0.5 % of layer 2's
        for i in range(0, count, 100):
            tar.file(f"l1/{i // 1000:04d}/f{i:07d}", 10_000_000 + i, rng.randint(0, 256))
            written += 1
        for i in range(1, count, 200):
            tar.empty(f"l2/{i // 1000:04d}/.wh.f{i:07d}")
            written += 1
    i = 0
    while written < count:
        if i % 1000 == 0:
            tar.directory(f"l{layer}/{i // 1000:04d}")
        name = f"l{layer}/{i // 1000:04d}/f{i:07d}"
        if i % 100 == 98 or (linked and i % 2):
            tar.hardlink(name, f"l{layer}/{i // 1000:04d}/f{i - 1:07d}")
        elif i % 100 == 99:
            tar.symlink(name, f"f{i - 2:07d}")
        else:
            tar.file(name, layer * 10_000_000 + i, rng.randint(0, 256))
        written += 1
        i += 1


def _layer_writers(kind: str, amount: float):
    if kind in ("files", "links"):
        counts = [int(amount) // LAYERS + (1 if layer < int(amount) % LAYERS else 0) for layer in range(LAYERS)]
        return [lambda tar, layer=layer: _files_layer(tar, layer, counts[layer], linked=kind == "links")
                for layer in range(LAYERS)]
    plans = _bytes_members(int(amount * GIB), seed=7)
    starts = [sum(len(plan) for plan in plans[:layer]) for layer in range(LAYERS)]
    return [lambda tar, layer=layer: _write_bytes_layer(tar, plans[layer], starts[layer]) for layer in range(LAYERS)]


def _config(diff_ids: list[str]) -> bytes:
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }, separators=(",", ":")).encode()


def write_docker_archive(path: str, writers) -> None:
    """A docker-archive (legacy layout) with uncompressed layers, streamed into ``path``."""
    data, outer, names, diff_ids = _Data(seed=1), _OuterTar(path), [], []
    try:
        for writer in writers:
            start = outer.begin()
            sink = _Sink(outer.handle, gzip=False)
            tar = _LayerTar(sink, data)
            writer(tar)
            tar.close()
            _, diff_id, _ = sink.finish()
            name = diff_id.split(":")[1] + "/layer.tar"
            outer.end(start, name)
            names.append(name)
            diff_ids.append(diff_id)
        config = _config(diff_ids)
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        outer.add(config_name, config)
        outer.add("manifest.json", json.dumps([{"Config": config_name, "RepoTags": ["scale:latest"],
                                                "Layers": names}]).encode())
    finally:
        outer.close()


def write_oci_layout(path: str, writers) -> None:
    """An OCI layout with gzip layers, each streamed into its blob file."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs)
    data, layers = _Data(seed=1), []
    for writer in writers:
        temp = os.path.join(blobs, "partial")
        with open(temp, "wb") as handle:
            sink = _Sink(handle, gzip=True)
            tar = _LayerTar(sink, data)
            writer(tar)
            tar.close()
            digest, diff_id, size = sink.finish()
        os.rename(temp, os.path.join(blobs, digest.split(":")[1]))
        layers.append((digest, diff_id, size))
    config = _config([diff_id for _, diff_id, _ in layers])
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _put_blob(blobs, config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}
                   for digest, _, size in layers],
    }, separators=(",", ":")).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _put_blob(blobs, manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "scale"}}]}
    with open(os.path.join(path, "index.json"), "w") as handle:
        json.dump(index, handle)
    with open(os.path.join(path, "oci-layout"), "w") as handle:
        handle.write('{"imageLayoutVersion":"1.0.0"}')


def _put_blob(blobs: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest.split(":")[1]), "wb") as handle:
        handle.write(data)
    return digest


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def convert(source: str, output: str) -> tuple[float, float, float]:
    """Run ``qtbuild convert`` in a child; return its (wall seconds, CPU seconds, own peak RSS in MB)."""
    command = [sys.executable, "-P", "-c", "from qtbuild.cli import main; main()", "convert", "-q", source,
               "-o", output]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # the PCRs it prints are not needed
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"convert failed ({child.returncode}): {' '.join(command)}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _generate(workdir: str, kind: str, amount: float) -> str:
    """Write the image under its own directory; return its qtbuild source reference."""
    directory = tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir)
    writers = _layer_writers(kind, amount)
    if kind == "gzip":
        layout = os.path.join(directory, "layout")
        write_oci_layout(layout, writers)
        return f"oci:{layout}:scale"
    archive = os.path.join(directory, "image.tar")
    write_docker_archive(archive, writers)
    return f"docker-archive:{archive}"


def _image_directory(source: str) -> str:
    path = source.split(":", 1)[1].removesuffix(":scale")
    return os.path.dirname(path)


def measure_series(workdir: str, kind: str, amounts: list[float], repeat: int, fixed: list[dict[str, Any]],
                   sync: bool) -> list[dict[str, Any]]:
    """Generate the series' images, then convert each ``repeat`` times, interleaved (so machine
    noise hits every size alike), with a conversion of the one-file image in each round whose
    times go to ``fixed``; the best times and the largest RSS count.  Images are then deleted."""
    results: list[dict[str, Any]] = []
    sources: list[str] = []
    try:
        for amount in [1.0, *amounts]:
            start = time.perf_counter()
            sources.append(_generate(workdir, "files" if not results else kind, amount))
            results.append({"kind": kind, "amount": amount, "generated": time.perf_counter() - start,
                            "seconds": float("inf"), "cpu": float("inf"), "rss": 0.0})
        output = os.path.join(workdir, "out.eif")
        for _ in range(repeat):
            for result, source in zip(results, sources, strict=True):
                if sync:
                    os.sync()  # no earlier run's dirty pages in flight
                seconds, cpu, rss = convert(source, output)
                result["seconds"], result["cpu"] = min(result["seconds"], seconds), min(result["cpu"], cpu)
                result["rss"] = max(result["rss"], rss)
                result["eif"] = os.path.getsize(output)
                os.unlink(output)
                print(f"  {_label(kind, result['amount']) if result is not results[0] else 'one file'}: "
                      f"{seconds:.2f} s, CPU {cpu:.2f} s, {rss:.0f} MB", file=sys.stderr, flush=True)
    finally:
        for source in sources:
            shutil.rmtree(_image_directory(source), ignore_errors=True)
    fixed.append(results[0])
    return results[1:]


UNITS = {"bytes": (1, "GiB"), "gzip": (1, "GiB"), "files": (100_000, "100k files"), "links": (100_000, "100k files")}


def _label(kind: str, amount: float) -> str:
    if kind in ("files", "links"):
        return f"{int(amount):,} files" + (" ½ links" if kind == "links" else "")
    return f"{amount:g} GiB" + (" gzip" if kind == "gzip" else "")


def _per_unit(result: dict, key: str, fixed: float) -> float:
    per = UNITS[result["kind"]][0]
    return max(result[key] - fixed, 0.0) / (result["amount"] / per)


def report(results: list[dict], fixed: float, fixed_cpu: float) -> dict[str, float]:
    """Print the table and the per-series verdicts; return the CPU-time linearity ratios."""
    ratios: dict[str, float] = {}
    print(f"fixed cost (one-file image): {fixed:.2f} s wall, {fixed_cpu:.2f} s CPU; per-unit figures are net of it")
    print(f"{'image':16s} {'wall s':>8s} {'CPU s':>8s} {'wall/unit':>10s} {'CPU/unit':>9s} {'unit':6s} "
          f"{'peak RSS':>10s} {'EIF MiB':>8s} {'gen s':>6s}")
    for kind, (_, unit) in UNITS.items():
        series = [result for result in results if result["kind"] == kind]
        for result in series:
            result["wall_unit"] = _per_unit(result, "seconds", fixed)
            result["cpu_unit"] = _per_unit(result, "cpu", fixed_cpu)
            print(f"{_label(kind, result['amount']):16s} {result['seconds']:8.2f} {result['cpu']:8.2f} "
                  f"{result['wall_unit']:10.3f} {result['cpu_unit']:9.3f} {unit.split()[0]:6s} "
                  f"{result['rss']:7.1f} MB {result['eif'] / MIB:8.0f} {result['generated']:6.1f}")
        if len(series) > 1:
            small, large = series[0], series[-1]
            wall, cpu = large["wall_unit"] / small["wall_unit"], large["cpu_unit"] / small["cpu_unit"]
            ratios[f"{kind}_cpu_time_per_unit_largest_over_smallest"] = cpu
            rss = max(result["rss"] for result in series)
            print(f"  {kind}: time per {unit} at {_label(kind, large['amount'])} over {_label(kind, small['amount'])}:"
                  f" wall {wall:.2f}, CPU {cpu:.2f} (target <= {LINEARITY_TARGET}); "
                  f"peak RSS {rss:.0f} MB (target <= {RSS_TARGET_MB})")
    return ratios


def _sizes(text: str) -> list[float]:
    return sorted(float(part) for part in text.split(",") if part.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", default="2.5,5,10", help="bytes series: GiB of file data (comma-separated)")
    parser.add_argument("--gzip-gib", default="0.5,1,2", help="gzip series: GiB of file data ('' to skip)")
    parser.add_argument("--files", default="250000,500000,1000000", help="files series: member counts")
    parser.add_argument("--linked-files", default="250000,500000,1000000",
                        help="links series: member counts, half of them hardlinks")
    parser.add_argument("--repeat", type=int, default=1, help="conversions of each image; the best time counts")
    parser.add_argument("--small", action="store_true", help="the CI mode (see the module docstring)")
    parser.add_argument("--dir", default=None, help="where the work directory is created")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (images are still "
                                                             "deleted one by one to bound the disk used)")
    options = parser.parse_args()
    if options.small:
        options.gib, options.gzip_gib, options.files, options.linked_files, options.repeat = \
            "0.02,0.04,0.08", "0.02,0.04,0.08", "10000,20000,40000", "", 2
    if max(_sizes(options.gib) + [0]) > 28:  # a quarter of it per layer: ustar sizes stop at 8 GiB
        parser.error("--gib: at most 28 (each of the 4 layers is a ustar member of at most 8 GiB)")
    series = [("bytes", _sizes(options.gib)), ("gzip", _sizes(options.gzip_gib)), ("files", _sizes(options.files)),
              ("links", _sizes(options.linked_files))]
    workdir = tempfile.mkdtemp(prefix="qtbuild-scale-", dir=options.dir)
    print(f"work directory {workdir}; load average {os.getloadavg()[0]:.2f}", flush=True)
    try:
        fixed: list[dict[str, Any]] = []
        results = []
        for kind, amounts in series:
            if amounts:
                results += measure_series(workdir, kind, amounts, options.repeat, fixed, sync=not options.small)
        ratios = report(results, min(run["seconds"] for run in fixed), min(run["cpu"] for run in fixed))
        print(f"load average {os.getloadavg()[0]:.2f}")
        print("ratios: " + json.dumps(ratios, sort_keys=True))
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
