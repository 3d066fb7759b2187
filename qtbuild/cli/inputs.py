"""Reading command inputs: a file path or ``-`` for stdin, bounded in size."""

from __future__ import annotations

import sys

from qtbuild.cli.errors import InputError
from qtbuild.formats.bounded_input import read_bounded as formats_read_bounded


def read_bounded(path: str, limit: int, what: str) -> bytes:
    """The bytes of ``path`` (``-``: stdin); InputError naming ``what`` when over ``limit``."""
    too_large = InputError(f"{path}: larger than {limit} bytes: {what}")
    if path == "-":
        return formats_read_bounded(sys.stdin.buffer, limit, too_large)
    with open(path, "rb") as handle:
        return formats_read_bounded(handle, limit, too_large)
