#!/usr/bin/env python3
"""Benchmark: time from ``qtbuild run`` to the application's first output, for the hello sample or a ≈50 MB image.

Usage: PYTHONPATH=tests .venv/bin/python -P benchmarks/run_start.py [--hello | --size-mib 50] [--repeat 5]
       [--dir DIR] [--keep]
(the image is built with the tests' helpers, so tests/ goes on the path: see README, Benchmarks)

Builds (once, not timed) an image — with --hello the hello sample's (samples/hello: a static
busybox and hello.sh, its Dockerfile's entrypoint), else a static busybox plus ≈ --size-mib of
file data shaped like an application image (2000 small files, 100 medium, 2 large; random
bytes, so nothing is sparse) — converts it with ``qtbuild convert`` (local profile), then
--repeat times:

  cli   ``qtbuild run EIF --attach-console --mem M`` in a fresh process; the clock runs from
        spawning it to the application's first line on its stdout (interpreter start-up,
        checks, supervisor start, single-pass verify + unpack into tmpfs, PKI, sandbox, exec);
  api   ``Manager.start(RunOptions(..., attach_console=True))`` in this process; the clock runs
        from the call to the first console byte (the same minus the CLI's interpreter start-up).

Each enclave is stopped before the next.  Each cli run is paired with a bare interpreter start
(``python -P -c pass``, the floor of any CLI); the last line, ``ratios: {json}`` (the median of
the per-pair ratios cli / bare interpreter, and api / bare interpreter), is what the regression
check reads (tests/test_benchmarks.py, benchmarks/baseline.json).  Prints median, min and max per
mode; target (issue 16): cli median ≤ 0.3 s for the hello sample.  Needs root (tmpfs, cgroups;
rootless: add --no-limits) and busybox-static.
A temporary runtime and state directory are used, so the host's enclaves are not touched.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from qtbuild.convert.pipeline import ConvertOptions, convert
from qtbuild.runtime.enclave import Manager, RunOptions
from qtbuild.runtime.enclave.state import RuntimeDir

from helpers.imagefactory import default_config, write_oci_layout

MIB = 1 << 20
FIRST_LINE = b"app: first output"
HELLO_LINE = b"hello enclave!"
HELLO_SCRIPT = Path(__file__).resolve().parent.parent / "samples" / "hello" / "hello.sh"
BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")


def _busybox() -> str:
    busybox = next((path for path in BUSYBOX if os.path.exists(path)), None)
    if busybox is None:
        sys.exit("run_start: a static busybox is needed (apt-get install busybox-static)")
    return busybox


def _hello_layer() -> bytes:
    """The hello sample's layer, as its Dockerfile builds it: /bin/busybox and /hello.sh."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(_busybox(), arcname="bin/busybox")
        _add(tar, "hello.sh", HELLO_SCRIPT.read_bytes(), 0o644)
    return buffer.getvalue()


def _image_layer(size: int, rng: random.Random) -> bytes:
    """busybox + sh/echo/sleep, and ≈ ``size`` bytes of data: 20 % small, 40 % medium, 40 % large."""
    busybox = _busybox()
    plan = [(f"usr/share/app/s{i // 100:02d}/f{i:04d}", size // 5 // 2000) for i in range(2000)]
    plan += [(f"usr/lib/app/m{i:03d}.so", size * 2 // 5 // 100) for i in range(100)]
    plan += [(f"opt/app/large{i}", size // 5) for i in range(2)]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "sleep"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        app = f"#!/bin/sh\necho '{FIRST_LINE.decode()}'\nexec sleep 60\n".encode()
        _add(tar, "app.sh", app, 0o755)
        for name, file_size in plan:
            _add(tar, name, rng.randbytes(file_size), 0o644)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def build(workdir: str, size_mib: int, hello: bool) -> str:
    layout = os.path.join(workdir, "layout")
    if hello:
        config = default_config(cmd=None, entrypoint=["/bin/busybox", "sh", "/hello.sh"])
        write_oci_layout(layout, [_hello_layer()], config, compression=None)
    else:
        layer = _image_layer(size_mib * MIB, random.Random(5))
        config = default_config(cmd=["/bin/sh", "/app.sh"], env=["PATH=/bin"])
        write_oci_layout(layout, [layer], config, compression=None)
    output = os.path.join(workdir, "bench.eif")
    convert(f"oci:{layout}:latest", ConvertOptions(output=output, quiet=True))
    return output


def memory_for(eif: str) -> int:
    return max(256, -(-os.path.getsize(eif) * 4 // MIB) + 64)


def time_cli(eif: str, extra: list[str], first_line: bytes) -> float:
    command = [sys.executable, "-P", "-c", "from qtbuild.cli import main; main()", "run", eif, "--attach-console",
               "--mem", str(memory_for(eif)), *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in process.stdout:
            if line.startswith(first_line):
                return time.perf_counter() - started
        sys.exit(f"run_start: no output from the enclave: {process.stderr.read().decode()[-500:]}")
    finally:
        process.kill()
        process.wait()
        Manager(notify=lambda _: None).stop_all()


def time_interpreter() -> float:
    """A bare interpreter's start and exit: the floor under every CLI run."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-P", "-c", "pass"], check=True)
    return time.perf_counter() - started


#: The supervisor's start phases (Started.phases), in order, each measured from the previous end:
#: supervisor_imports (from Manager.start: checks, reservation, the supervisor's interpreter and
#: imports), host_setup (ids, vsock tmpfs, mount namespace, cgroup, spawning the sandbox helper),
#: verify_unpack (the loader child's single pass; meanwhile the security module's imports and the
#: PKI load), security_module (serving it; console), sandbox_exec (the helper's namespaces,
#: mounts, seccomp, execve), ready (record, heartbeat, vsock registration).
PHASES = ("supervisor_imports", "host_setup", "verify_unpack", "security_module", "sandbox_exec", "ready")


def time_api(eif: str, no_limits: bool, phases: dict[str, list[float]], first_line: bytes) -> float:
    """Seconds from Manager.start to the first console line; appends each phase's seconds to ``phases``
    (supervisor_imports: spawning the supervisor's interpreter and its imports; first_output: from
    "ready" to the application's first line)."""
    manager = Manager(notify=lambda _: None)
    started = time.monotonic()
    enclave = manager.start(RunOptions(eif, memory_mib=memory_for(eif), attach_console=True, no_limits=no_limits))
    try:
        first = enclave.console.read(len(first_line))
        ended = time.monotonic()
        assert first == first_line, first
        previous = started
        for name in PHASES:
            phases.setdefault(name, []).append(enclave.phases[name] - previous)
            previous = enclave.phases[name]
        phases.setdefault("first_output", []).append(ended - previous)
        return ended - started
    finally:
        enclave.close()
        manager.stop_all()


def warn_if_not_precompiled() -> None:
    """Say so when the runtime's bytecode is not cached: every interpreter `run` starts would
    compile it again, and that, not the start-up, is then what is measured."""
    import importlib.util

    from qtbuild.runtime.enclave import supervisor

    if not os.path.exists(importlib.util.cache_from_source(supervisor.__file__)):
        print("run_start: note: qtbuild's modules have no cached bytecode (an editable install with "
              "PYTHONDONTWRITEBYTECODE); scripts/install.sh precompiles them", file=sys.stderr)


def report(name: str, samples: list[float]) -> None:
    print(f"{name:4}  median {statistics.median(samples):6.3f} s   min {min(samples):6.3f} s   "
          f"max {max(samples):6.3f} s   ({len(samples)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hello", action="store_true", help="the hello sample's image (issue 16's target)")
    parser.add_argument("--size-mib", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--no-limits", action="store_true", help="rootless hosts without cgroup delegation")
    args = parser.parse_args()
    warn_if_not_precompiled()
    workdir = args.dir or tempfile.mkdtemp(prefix="qtb-run-", dir="/tmp")
    os.environ["QTBUILD_RUNTIME_DIR"] = os.path.join(workdir, "rt")
    os.environ["QTBUILD_STATE_DIR"] = os.path.join(workdir, "state")
    try:
        eif = build(workdir, args.size_mib, args.hello)
        first_line = HELLO_LINE if args.hello else FIRST_LINE
        print(f"image: {os.path.getsize(eif) / MIB:.1f} MiB, --mem {memory_for(eif)} MiB")
        extra = ["--no-limits"] if args.no_limits else []
        time_cli(eif, extra, first_line)  # warm-up: page cache, PKI creation
        bare: list[float] = []
        cli: list[float] = []
        api: list[float] = []
        phases: dict[str, list[float]] = {}
        for _ in range(args.repeat):  # interleaved, so machine noise hits all three alike
            bare.append(time_interpreter())
            cli.append(time_cli(eif, extra, first_line))
            api.append(time_api(eif, args.no_limits, phases, first_line))
        report("bare", bare)
        report("cli", cli)
        report("api", api)
        print("api per phase (median s): " + "  ".join(f"{name} {statistics.median(samples):.3f}"
                                                       for name, samples in phases.items()))
        ratios = {"cli_time_over_interpreter": statistics.median(c / b for c, b in zip(cli, bare, strict=True)),
                  "api_time_over_interpreter": statistics.median(a / b for a, b in zip(api, bare, strict=True))}
        print("ratios: " + json.dumps(ratios, sort_keys=True))
    finally:
        if not args.keep:
            # as root the runtime mounts a small tmpfs for the parent's vsock listeners: leave none behind
            RuntimeDir(Path(workdir) / "rt").unmount()
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
