"""A layer blob stored in a local file, stamped with the file's identity before a first pass reads it.

A second read of such a blob (``qtbuild measure`` inflates layers again instead of spilling
them) must see the bytes the first pass verified.  Hashing the blob again proves it but costs a
SHA-256 pass; the file's identity proves it for free when it can be trusted:

* the identity is ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``, taken (by
  :class:`LocalBlob`) *before* the first pass opens the file;
* any write to the file, truncation, ``utime`` or ``chmod`` sets its ctime to the current time,
  which no system call can set back (only changing the system clock could); replacing the file
  (rename) changes its inode number.  So an unchanged identity at the end of the second pass
  means the file the first pass read, unmodified;
* except within one timestamp tick: a file changed just before the stamp and again just after it
  can keep the same ctime.  A blob whose ctime is less than :data:`SETTLE_NS` older than the
  stamp is therefore not ``settled``, and its second read must hash it again.  (2 s: the coarsest
  timestamps Linux file systems keep; kernel ticks are at most 10 ms.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import BinaryIO

from qtbuild.errors import ImageError

#: A blob whose ctime is at least this much older than the stamp counts as settled.
SETTLE_NS = 2_000_000_000


def file_identity(status: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file is modified or replaced (see the module docstring)."""
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


class LocalBlob:
    """Bytes ``[start, start + size)`` of the local file ``path``: a blob of SHA-256 ``digest``.

    Calling it returns the blob's decompressed, verified tar stream afresh (``open_uncompressed``),
    as :meth:`qtbuild.sources.base.Layer.reread_opener`'s result does.  ``identity`` is the file's
    identity when this object was made; ``settled``: whether that identity proves the file
    unchanged later (see the module docstring), else a second read must hash the blob again.
    """

    def __init__(self, path: str, start: int, size: int, digest: str, what: str,
                 open_uncompressed: Callable[[], BinaryIO]):
        self.path, self.start, self.size, self.digest, self.what = path, start, size, digest, what
        self._open_uncompressed = open_uncompressed
        stamped = time.time_ns()
        try:
            status = os.stat(path)
        except OSError as exc:
            raise ImageError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
        self.identity = file_identity(status)
        self.settled = status.st_ctime_ns <= stamped - SETTLE_NS

    def __call__(self) -> BinaryIO:
        return self._open_uncompressed()

    def check(self, status: os.stat_result | None = None) -> None:
        """Raise ImageError unless the file (``status`` of it, else stat of the path) has the
        identity it had when this object was made."""
        try:
            status = status or os.stat(self.path)
        except OSError as exc:
            raise ImageError(f"{self.what}: its blob file became unreadable between the passes over it "
                             f"({exc.strerror or exc}); run the command again") from None
        if file_identity(status) != self.identity:
            raise ImageError(f"{self.what}: its blob file {self.path} was modified or replaced between the "
                             f"passes over it; run the command again")
