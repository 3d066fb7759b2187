"""Reading command inputs: a file path or ``-`` for stdin, bounded in size."""

from __future__ import annotations

import sys

from qtbuild.cli.errors import InputError


def read_bounded(path: str, limit: int, what: str) -> bytes:
    """The bytes of ``path`` (``-``: stdin); InputError naming ``what`` when over ``limit``."""
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"{path}: larger than {limit} bytes: {what}")
    return data
