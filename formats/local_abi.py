"""The kernel-section descriptor of qtbuild's local runtime ABI.

Images built with the ``local`` boot profile carry, in place of a Linux kernel, this descriptor::

    QTBUILD-LOCAL-RUNTIME\\n{"abi":"qtbuild-local/1","arch":"x86_64",...}\\n

(compact JSON, sorted keys).  The local runtime (``qtbuild run``) checks it before loading an
image; hardware would refuse to boot it, and ``qtbuild describe`` says so.
"""

from __future__ import annotations

import json

from qtbuild.formats.bounded_input import load_json_object
from qtbuild.formats.errors import FormatError

LOCAL_MAGIC = b"QTBUILD-LOCAL-RUNTIME\n"
LOCAL_ABI = "qtbuild-local/1"
MAX_DESCRIPTOR = 4096
RUNS_ONLY_LOCALLY = (
    "kernel section is a qtbuild local-runtime descriptor, not a Linux kernel: this image runs only under `qtbuild run`"
)


def make_local_kernel(arch: str) -> bytes:
    """The descriptor bytes for ``arch`` (x86_64 or aarch64)."""
    descriptor = {
        "abi": LOCAL_ABI,
        "arch": arch,
        "bootstrap": "none: the runtime reads /cmd, /env and /launch.json and execs the application",
        "note": "not a Linux kernel: this image boots only under `qtbuild run`",
    }
    return LOCAL_MAGIC + json.dumps(descriptor, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def parse_local_kernel(kernel: bytes) -> dict | None:
    """The descriptor as a dict if ``kernel`` is one, else None (never raises)."""
    if not kernel.startswith(LOCAL_MAGIC) or len(kernel) > MAX_DESCRIPTOR:
        return None
    try:
        document = load_json_object(kernel[len(LOCAL_MAGIC):], what="local-runtime descriptor")
    except FormatError:
        return None
    if not str(document.get("abi", "")).startswith("qtbuild-local/"):
        return None
    return document
