"""Which files this process holds open: spill files are unlinked as soon as they are created, so a
directory listing cannot show where they went."""

from __future__ import annotations

import contextlib
import os


def open_files_under(directory: str | os.PathLike) -> list[str]:
    """The paths (``... (deleted)`` for unlinked files) of this process's descriptors in ``directory``."""
    prefix = os.path.join(os.fspath(directory), "")
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [path for path in paths if path.startswith(prefix)]
