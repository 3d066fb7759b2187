#!/usr/bin/env python3
"""Benchmark: `qtbuild convert` against the decompression floor and the by-hand pipeline.

Usage: python benchmarks/convert.py [--size-mib 1024] [--files 21000] [--dir DIR] [--keep]
                                   [--reference-python OTHER/.venv/bin/python]
                                   [--reuse KEPT_IMAGE_DIR] [--only oci|archive|measure ...]
       python benchmarks/convert.py --many-files [--dir DIR]

Generates a synthetic image (≈ --size-mib of file data over 3 gzip layers, --files files:
many small, some medium, a few large; partly compressible) as an OCI layout (gzip layers) and a
docker-archive (legacy layout, uncompressed layers, as Docker 20 saves), then times, each in a
child process with its peak RSS:

  convert (oci)      qtbuild convert oci:DIR:bench -o out.eif
  convert (archive)  qtbuild convert docker-archive:bench.tar -o out.eif
  measure (oci)      qtbuild measure oci:DIR:bench
  floor              gzip -dc layer1 layer2 layer3 | sha384sum
  by hand            umoci raw unpack + find | sort | GNU cpio -o -H newc --reproducible | sha384sum

Each command runs --repeat times (interleaved); the best time and the largest peak RSS are
reported, with the load average.  Targets (issue 16): convert from gzip layers <= 0.8 x the
floor with peak RSS <= 150 MB; convert from uncompressed layers (the docker-archive) <= 0.5 x the
floor of the same image's gzip layers; measure from gzip layers <= 0.7 x the floor (and it
writes nothing to disk).  Needs gzip, sha384sum, umoci and cpio (scripts/install-system.sh;
--without-by-hand skips umoci/cpio).  The last line, ``ratios: {json}`` (each qtbuild command
over the floor, the median of the per-round ratios), is what the regression check reads
(tests/test_benchmarks.py, benchmarks/baseline.json).

``--many-files`` instead measures memory against file count and path length (issue 12, target
<= 300 MB peak RSS for each): two docker-archives (uncompressed layers) with 1,000,000 tiny files
(1,000 directories of 1,000) and with 100,000 files whose paths are ~4 KB (1,000 chains of 15
directories with 250-byte names, 100 files with 200-byte names in each), converted once each.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

MIB = 1 << 20


class _HashingWriter(io.RawIOBase):
    """Counts and SHA-256-hashes what passes through to ``target``."""

    def __init__(self, target) -> None:
        self.target, self.hasher, self.size = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self.target.write(data)


def _payload(rng: random.Random, size: int) -> bytes:
    """Half random, half repetitive text: compresses roughly 2:1 like typical binaries."""
    half = size // 2
    return rng.randbytes(half) + (b"lorem ipsum dolor sit amet " * (size // 27 + 1))[: size - half]


def _layer_plan(total: int, files: int) -> list[list[tuple[str, int]]]:
    """Three layers: many small files, medium files, a few large files."""
    small, medium = int(files * 0.8), files - int(files * 0.8) - 4
    small_size = max(1, int(total * 0.1) // small)
    medium_size = max(1, int(total * 0.3) // medium)
    large_size = int(total * 0.6) // 4
    return [
        [(f"usr/share/small/{i // 500:03d}/f{i:06d}", small_size) for i in range(small)],
        [(f"usr/lib/medium/{i // 200:03d}/m{i:05d}.so", medium_size) for i in range(medium)],
        [(f"opt/big/blob{i}", large_size) for i in range(4)],
    ]


def write_layer(path: str, plan: list[tuple[str, int]], rng: random.Random) -> tuple[str, str, int]:
    """Write one gzip layer; return (blob digest, diff_id, blob size)."""
    with open(path, "wb") as raw:
        blob = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=blob, mode="wb", compresslevel=1, mtime=0) as compressed:
            diff = _HashingWriter(compressed)
            with tarfile.open(fileobj=diff, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                directories = sorted({os.path.dirname(name) for name, _ in plan})
                for directory in _with_parents(directories):
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                for name, size in plan:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = size, 0o644
                    tar.addfile(info, io.BytesIO(_payload(rng, size)))
    return "sha256:" + blob.hasher.hexdigest(), "sha256:" + diff.hasher.hexdigest(), blob.size


def _with_parents(directories: list[str]) -> list[str]:
    out = set()
    for directory in directories:
        parts = directory.split("/")
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(out)


def generate(workdir: str, total: int, files: int) -> dict:
    """Write the OCI layout and docker-archive; return paths."""
    rng = random.Random(42)
    layout = os.path.join(workdir, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    layers = []
    for index, plan in enumerate(_layer_plan(total, files)):
        temp = os.path.join(workdir, f"layer{index}.tar.gz")
        digest, diff_id, size = write_layer(temp, plan, rng)
        os.rename(temp, os.path.join(blobs, digest.split(":")[1]))
        layers.append((digest, diff_id, size))
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/opt/big/blob0"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id, _ in layers]},
    }, separators=(",", ":")).encode()
    config_digest = _put_blob(blobs, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
                   for d, _, s in layers],
    }, separators=(",", ":")).encode()
    manifest_digest = _put_blob(blobs, manifest)
    with open(os.path.join(layout, "index.json"), "w") as handle:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
            "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}, handle)
    with open(os.path.join(layout, "oci-layout"), "w") as handle:
        handle.write('{"imageLayoutVersion":"1.0.0"}')
    archive = os.path.join(workdir, "bench.tar")
    _write_legacy_archive(archive, blobs, layers, config, config_digest)
    return {"layout": layout, "archive": archive,
            "layers": [os.path.join(blobs, d.split(":")[1]) for d, _, _ in layers]}


def _put_blob(blobs: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest.split(":")[1]), "wb") as handle:
        handle.write(data)
    return digest


def _write_legacy_archive(path: str, blobs: str, layers, config: bytes, config_digest: str) -> None:
    """docker save (Docker < 25) layout: <id>/layer.tar uncompressed, <config>.json, manifest.json."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        names = []
        for digest, diff_id, _ in layers:
            name = diff_id.split(":")[1] + "/layer.tar"
            with (gzip.open(os.path.join(blobs, digest.split(":")[1]), "rb") as source,
                  tempfile.TemporaryFile() as plain):
                shutil.copyfileobj(source, plain, 4 * MIB)
                info = tarfile.TarInfo(name)
                info.size = plain.tell()
                plain.seek(0)
                tar.addfile(info, plain)
            names.append(name)
        _add_bytes(tar, config_digest.split(":")[1] + ".json", config)
        entry = {"Config": config_digest.split(":")[1] + ".json", "RepoTags": ["bench:latest"], "Layers": names}
        _add_bytes(tar, "manifest.json", json.dumps([entry]).encode())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


_WRAPPER = (
    "import resource, subprocess, sys\n"
    "status = subprocess.run(['bash', '-o', 'pipefail', '-c', sys.argv[1]], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(status)\n"
)


def timed(command: str, env: dict | None = None) -> tuple[float, float]:
    """Run a shell command in a fresh wrapper process; return (seconds, peak RSS in MB of the
    largest process it ran)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _WRAPPER, command], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"benchmark command failed ({result.returncode}): {command}\n{result.stderr}")
    return elapsed, int(result.stdout.strip()) / 1024


def _many_files_layer(path: str, names) -> str:
    """An uncompressed layer of 8-byte files at ``names`` (parents first); returns its diff_id."""
    with open(path, "wb") as raw:
        layer = _HashingWriter(raw)
        with tarfile.open(fileobj=layer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name, is_dir in names:
                info = tarfile.TarInfo(name)
                if is_dir:
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
                else:
                    info.size, info.mode = 8, 0o644
                    tar.addfile(info, io.BytesIO(b"contents"))
    return "sha256:" + layer.hasher.hexdigest()


def _million_files():
    for d in range(1000):
        yield f"d{d:04d}", True
        for f in range(1000):
            yield f"d{d:04d}/f{f:07d}", False


def _long_paths():
    for chain in range(1000):
        parts = [f"{chain:04d}-{level:02d}-" + "p" * 242 for level in range(15)]
        for level in range(15):
            yield "/".join(parts[:level + 1]), True
        for f in range(100):
            yield "/".join(parts) + f"/{f:03d}-" + "n" * 196, False


def many_files(workdir: str) -> None:
    """The --many-files mode (see the module docstring)."""
    qtbuild = f"{sys.executable} -c 'from qtbuild.cli import main; main()'"
    for label, names in (("1,000,000 files", _million_files()), ("100,000 files, 4 KB paths", _long_paths())):
        start = time.perf_counter()
        layer = os.path.join(workdir, "layer.tar")
        diff_id = _many_files_layer(layer, names)
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}, separators=(",", ":")).encode()
        archive = os.path.join(workdir, "image.tar")
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(layer, "layer/layer.tar")
            _add_bytes(tar, "config.json", config)
            _add_bytes(tar, "manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["many:latest"],
                                                          "Layers": ["layer/layer.tar"]}]).encode())
        os.unlink(layer)
        generated = time.perf_counter() - start
        seconds, rss = timed(f"{qtbuild} convert -q docker-archive:{archive} -o {workdir}/many.eif")
        size = os.path.getsize(f"{workdir}/many.eif")
        print(f"{label:28s} convert {seconds:7.2f} s   peak RSS {rss:7.1f} MB   (image "
              f"{os.path.getsize(archive) / MIB:.0f} MiB generated in {generated:.0f} s, EIF {size / MIB:.0f} MiB)",
              flush=True)
        os.unlink(archive)
        os.unlink(f"{workdir}/many.eif")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=21000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated image and outputs")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command; the best is reported")
    parser.add_argument("--many-files", action="store_true", help="memory against file count and path length")
    parser.add_argument("--without-by-hand", action="store_true", help="skip the umoci + GNU cpio pipeline")
    parser.add_argument("--reference-python", default=None,
                        help="also time the qtbuild commands with this interpreter (e.g. another checkout's "
                             ".venv/bin/python), interleaved, and report each as a ratio to it")
    parser.add_argument("--reuse", metavar="IMAGE_DIR", default=None,
                        help="time the image a --keep run generated in IMAGE_DIR (its layout/ and bench.tar) "
                             "instead of generating one; outputs still go to a new directory under --dir")
    parser.add_argument("--only", choices=SOURCES, action="append", default=None,
                        help="time only this qtbuild command (and the floor); repeat for several")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="qtbuild-bench-", dir=options.dir)
    if options.many_files:
        try:
            many_files(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    try:
        start = time.perf_counter()
        if options.reuse:
            paths = generated(options.reuse)
            print(f"reusing the image under {options.reuse}; outputs under {workdir}")
        else:
            paths = generate(workdir, options.size_mib * MIB, options.files)
            print(f"generated {options.size_mib} MiB / {options.files} files in {time.perf_counter() - start:.1f} s "
                  f"under {workdir}")
        qtbuild = f"{sys.executable} -P -c 'from qtbuild.cli import main; main()'"
        rootfs = os.path.join(workdir, "umoci-rootfs")
        commands = {
            "convert (oci)": f"{qtbuild} convert -q oci:{paths['layout']}:bench -o {workdir}/oci.eif",
            "convert (archive)": f"{qtbuild} convert -q docker-archive:{paths['archive']} -o {workdir}/archive.eif",
            "measure (oci)": f"{qtbuild} measure -q oci:{paths['layout']}:bench",
            "floor": f"gzip -dc {' '.join(paths['layers'])} | sha384sum",
            "by hand": (f"umoci raw unpack --image {paths['layout']}:bench {rootfs} && cd {rootfs} && "
                        f"find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible | sha384sum"),
        }
        if options.without_by_hand:
            del commands["by hand"]
        timed_sources = [(source, name, target) for source, name, target in TIMED
                         if options.only is None or source in options.only]
        for _source, name, _target in set(TIMED) - set(timed_sources):
            del commands[name]
        if options.reference_python:
            reference = f"{options.reference_python} -P -c 'from qtbuild.cli import main; main()'"
            for _source, name, _target in timed_sources:
                commands[f"{name} ref"] = commands[name].replace(qtbuild, reference)
        results = {name: (float("inf"), 0.0) for name in commands}
        rounds: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(options.repeat):  # interleaved, so machine noise hits every command alike
            for name, command in commands.items():
                # outputs of the previous run are removed outside the timing
                shutil.rmtree(rootfs, ignore_errors=True)
                for output in ("oci.eif", "archive.eif"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(workdir, output))
                os.sync()  # no earlier run's dirty pages in flight
                seconds, rss = timed(command)
                rounds[name].append(seconds)
                results[name] = (min(results[name][0], seconds), max(results[name][1], rss))
        for name, (seconds, rss) in results.items():
            print(f"{name:18s} {seconds:7.2f} s   peak RSS {rss:7.1f} MB")
        ratios = {f"{source}_time_over_floor": statistics.median(t / f for t, f in zip(rounds[name], rounds["floor"],
                                                                                         strict=True))
                  for source, name, _target in timed_sources}
        for source, name, target in timed_sources:
            faster = (f", {results['by hand'][0] / results[name][0]:.2f} x faster than by hand"
                      if "by hand" in results else "")
            print(f"{name}: {ratios[f'{source}_time_over_floor']:.2f} x the floor (gzip; median of rounds; "
                  f"target <= {target}){faster}")
        if options.reference_python:
            for _source, name, _target in timed_sources:
                ratio = statistics.median(t / r for t, r in zip(rounds[name], rounds[f"{name} ref"], strict=True))
                print(f"{name}: {ratio:.2f} x the reference (median of rounds)")
        print(f"load average {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        print("ratios: " + json.dumps(ratios, sort_keys=True))
    finally:
        if not options.keep:
            shutil.rmtree(workdir, ignore_errors=True)


#: The qtbuild commands timed: (--only name, row name, issue 16's target as a multiple of the floor).
TIMED = [("oci", "convert (oci)", 0.8), ("archive", "convert (archive)", 0.5), ("measure", "measure (oci)", 0.7)]
SOURCES = [source for source, _name, _target in TIMED]


def generated(image_dir: str) -> dict:
    """The paths :func:`generate` returned for the image it wrote under ``image_dir`` (a --keep run's)."""
    layout = os.path.join(image_dir, "layout")
    blobs = os.path.join(layout, "blobs", "sha256")
    with open(os.path.join(layout, "index.json")) as handle:
        manifest_digest = json.load(handle)["manifests"][0]["digest"]
    with open(os.path.join(blobs, manifest_digest.split(":")[1])) as handle:
        layers = [layer["digest"] for layer in json.load(handle)["layers"]]
    return {"layout": layout, "archive": os.path.join(image_dir, "bench.tar"),
            "layers": [os.path.join(blobs, digest.split(":")[1]) for digest in layers]}


if __name__ == "__main__":
    main()
