"""Errors of the build side that the CLI reports as input errors (exit 2)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


class ImageError(Exception):
    """A container image cannot be used: unreadable, malformed, hostile, or not found.

    The message names the problem and, where there is one, the fix.
    """


@contextlib.contextmanager
def naming_path(path: str | os.PathLike) -> Iterator[None]:
    """Give OS errors raised without a file name (a write into a full ``TMPDIR``) ``path`` as
    their file name, so the one-line report says where the space ran out."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from exc
