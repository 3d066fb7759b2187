#!/usr/bin/env python3
"""Benchmark: `qtbuild convert docker://IMAGE` against `docker save IMAGE` alone (issue 16, item 3).

Usage: python benchmarks/convert_daemon.py [--size-mib 1024] [--files 21000] [--repeat 3] [--dir DIR]

Generates an image (≈ --size-mib of file data over 3 layers: many small files, medium files, a
few large ones; no Docker Hub), `docker load`s it under a unique tag, then times, interleaved,
each in a fresh process:

  docker save   docker save TAG > /dev/null            (the daemon's export and transfer alone)
  convert       qtbuild convert -q docker://TAG -o DIR/out.eif

The reference writes to /dev/null, so the ratio charges convert for everything it does beyond the
daemon's export: reading the stream, verifying diff_ids, flattening, writing the EIF (on the disk
of DIR).  Target: convert <= 1.15 x docker save.  The last line, ``ratios: {json}`` (the median of
the per-round ratios), is what tests/test_benchmarks.py checks against benchmarks/baseline.json.
The image is removed from the daemon at the end.  Needs a reachable Docker daemon and the docker CLI.
"""

from __future__ import annotations

import argparse
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
import uuid

MIB = 1 << 20


def _payload(rng: random.Random, size: int) -> bytes:
    """Half random, half repetitive text, like typical binaries."""
    half = size // 2
    return rng.randbytes(half) + (b"lorem ipsum dolor sit amet " * (size // 27 + 1))[: size - half]


def _layer_plan(total: int, files: int) -> list[list[tuple[str, int]]]:
    small, medium = int(files * 0.8), files - int(files * 0.8) - 4
    small_size = max(1, int(total * 0.1) // small)
    medium_size = max(1, int(total * 0.3) // medium)
    large_size = int(total * 0.6) // 4
    return [
        [(f"usr/share/small/{i // 500:03d}/f{i:06d}", small_size) for i in range(small)],
        [(f"usr/lib/medium/{i // 200:03d}/m{i:05d}.so", medium_size) for i in range(medium)],
        [(f"opt/big/blob{i}", large_size) for i in range(4)],
    ]


def _write_layer(path: str, plan: list[tuple[str, int]], rng: random.Random) -> str:
    """An uncompressed layer tar; returns its diff_id."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({"/".join(name.split("/")[:i]) for name, _ in plan
                              for i in range(1, name.count("/") + 1)})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, size in plan:
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, 0o644
            tar.addfile(info, io.BytesIO(_payload(rng, size)))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def generate(workdir: str, total: int, files: int, tag: str) -> str:
    """A docker-archive (legacy layout) of the benchmark image, tagged ``tag``; returns its path."""
    rng = random.Random(42)
    layers = []
    for index, plan in enumerate(_layer_plan(total, files)):
        path = os.path.join(workdir, f"layer{index}.tar")
        layers.append((path, _write_layer(path, plan, rng)))
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/opt/big/blob0"], "Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
    }, separators=(",", ":")).encode()
    archive = os.path.join(workdir, "image.tar")
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        names = []
        for path, diff_id in layers:
            names.append(diff_id.split(":")[1] + "/layer.tar")
            tar.add(path, names[-1])
            os.unlink(path)
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        _add_bytes(tar, config_name, config)
        _add_bytes(tar, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [tag],
                                                      "Layers": names}]).encode())
    return archive


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


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
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="qtbuild-bench-daemon-", dir=options.dir)
    tag = f"qtbuild-bench/daemon:{uuid.uuid4().hex[:12]}"
    loaded = False
    try:
        start = time.perf_counter()
        archive = generate(workdir, options.size_mib * MIB, options.files, tag)
        subprocess.run(["docker", "load", "-q", "-i", archive], check=True, capture_output=True)
        loaded = True
        os.unlink(archive)
        print(f"generated and loaded {options.size_mib} MiB / {options.files} files as {tag} in "
              f"{time.perf_counter() - start:.1f} s under {workdir}")
        output = os.path.join(workdir, "out.eif")
        qtbuild = f"{sys.executable} -c 'from qtbuild.cli import main; main()'"
        commands = {
            "docker save": f"docker save {tag} > /dev/null",
            "convert": f"{qtbuild} convert -q docker://{tag} -o {output} > /dev/null",
        }
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
        print("ratios: " + json.dumps({"daemon_time_over_save": ratio}, sort_keys=True))
    finally:
        if loaded:
            subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
