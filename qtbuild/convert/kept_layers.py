"""Compressed layers kept in memory from the first pass, so ``measure`` need not inflate them again.

``qtbuild measure`` re-inflates a local compressed layer to read its file data
(:mod:`qtbuild.convert.reread`) instead of spilling it to disk.  For a layer of many small files
that second pass is mostly per-file work on a worker thread that competes for the GIL with the
archive writer, not inflating: the first pass already held every chunk of the layer's tar stream
once, so holding on to them costs no CPU at all.  A :class:`KeptLayer` is the first pass's
``tee``: it keeps references to the chunks (immutable ``bytes``, no copy) and then serves
``open_range(offset, size)`` from them.

Bounded: the layers kept share :func:`keep_budget` bytes (128 MiB, or a sixteenth of the machine's
memory or of the process's cgroup memory limit if that is less; the benchmark image's bottom layer,
its 16,837 small files in 120 MB, fits; the two above do not).  A larger budget buys little: keeping
the benchmark's second layer too (512 MiB) saved another 3 % of the time for 300 MB more memory.
:func:`plan_kept` gives each re-read layer, bottom first, a reservation of its gzip trailer's size
(``ISIZE``, the tar stream's length modulo 2**32) while the sum fits the budget; a layer whose hint
is missing (not gzip) or too large is not kept. The hint is untrusted: a layer whose stream
outgrows its reservation drops what it kept and is re-read as before, so memory never exceeds the
budget whatever the image claims. What is kept comes from the first pass's verified stream (its
digests are checked when its scan ends), so a kept layer needs no second proof.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from collections.abc import Mapping
from typing import BinaryIO, cast

from qtbuild.errors import ImageError
from qtbuild.sources.local_blob import LocalBlob

#: Bytes of tar stream kept in memory for all the layers of one image together, at most ...
KEEP_BUDGET = 128 << 20
#: ... this fraction of the memory the process may use: the machine's, or its cgroup's limit if
#: lower (a 1 GiB machine or container keeps at most 64 MiB).
KEEP_SHARE = 16
_CGROUP_ROOT = "/sys/fs/cgroup"
_GZIP_MAGIC = b"\x1f\x8b"


def gzip_size_hint(blob: LocalBlob) -> int | None:
    """The tar stream's length as the gzip trailer of ``blob`` states it (None: not gzip, unreadable).

    Only a hint: the trailer holds the last member's length modulo 2**32 and is not verified yet."""
    if blob.size < 20:
        return None
    try:
        fd = os.open(blob.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            magic = os.pread(fd, 2, blob.start)
            trailer = os.pread(fd, 4, blob.start + blob.size - 4)
        finally:
            os.close(fd)
    except OSError:
        return None
    if magic != _GZIP_MAGIC or len(trailer) != 4:
        return None
    return cast(int, struct.unpack("<I", trailer)[0])


def keep_budget() -> int:
    """:data:`KEEP_BUDGET`, or 1/:data:`KEEP_SHARE` of the memory available if that is less: the
    physical memory or the process's cgroup limit, whichever is lower (:data:`KEEP_BUDGET` if neither is known)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        physical = 0
    limits = [limit for limit in (physical, cgroup_memory_limit()) if limit and limit > 0]
    return min(KEEP_BUDGET, min(limits) // KEEP_SHARE) if limits else KEEP_BUDGET


def cgroup_memory_limit() -> int | None:
    """The memory limit of the process's own cgroup (v1 or v2), None when it has none or it cannot be read."""
    from qtbuild.runtime.sandbox.cgroups import own_cgroup  # only measure asks: not on convert's import path

    try:
        names = (f"{_CGROUP_ROOT}{own_cgroup('').rstrip('/')}/memory.max",
                 f"{_CGROUP_ROOT}/memory{own_cgroup('memory').rstrip('/')}/memory.limit_in_bytes")
    except (OSError, ValueError):
        return None
    limits = []
    for name in names:  # a hierarchy not mounted there (v1 on a v2 host, or the reverse) names no file
        try:
            with open(name) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def plan_kept(reopeners: Mapping[int, object], budget: int | None = None) -> dict[int, KeptLayer]:
    """A :class:`KeptLayer` for each re-read layer (index → its ``reread_opener()``) to keep, bottom
    first, while the gzip size hints of those kept fit ``budget`` (default :func:`keep_budget`) together."""
    kept: dict[int, KeptLayer] = {}
    left = keep_budget() if budget is None else budget
    for index in sorted(reopeners):
        blob = reopeners[index]
        hint = gzip_size_hint(blob) if isinstance(blob, LocalBlob) else None
        if hint is not None and 0 < hint <= left:
            kept[index] = KeptLayer(hint)
            left -= hint
    return kept


class KeptLayer:
    """A layer's tar stream as the first pass read it, if it fit ``limit`` bytes.

    :meth:`append` is the scan's ``tee`` (one thread); once the scan is done, :attr:`whole` says
    whether every chunk was kept, :attr:`length` is the stream's length read (kept or not), and
    :meth:`open_range` serves file data from the chunks."""

    def __init__(self, limit: int):
        self._limit = limit
        self._chunks: list[memoryview] = []  # views of the chunks (immutable bytes): sliced per file
        self._starts: list[int] = []
        self.length = 0
        self.whole = True

    def append(self, chunk: bytes) -> None:
        size = len(chunk)
        if self.whole:
            if self.length + size > self._limit:  # the hint was wrong: re-read the layer instead
                self.whole = False
                self._chunks, self._starts = [], []
            else:
                self._starts.append(self.length)
                self._chunks.append(memoryview(chunk if type(chunk) is bytes else bytes(chunk)))
        self.length += size

    def open_range(self, offset: int, size: int) -> BinaryIO:
        """A stream of bytes ``[offset, offset + size)`` of the layer's tar stream."""
        end = offset + size
        if offset < 0 or size < 0 or end > self.length or not self.whole:
            raise ImageError(f"range {offset}+{size} outside the {self.length} bytes kept of a layer")
        if not size:
            return cast(BinaryIO, _ViewStream(memoryview(b"")))
        index = bisect_right(self._starts, offset) - 1
        start, chunk = self._starts[index], self._chunks[index]
        if end - start <= len(chunk):  # the usual case: one file per call, so no cast() call either
            return _ViewStream(chunk[offset - start:end - start])  # type: ignore[return-value]
        parts = [chunk[offset - start:]]
        while (start := start + len(chunk)) < end:
            index += 1
            chunk = self._chunks[index]
            parts.append(chunk[:end - start])
        return cast(BinaryIO, _ViewStream(memoryview(b"".join(parts))))


class _ViewStream:
    """A minimal read-only binary stream over a memoryview (``read``, ``readinto``, ``close``, context
    manager): :class:`io.BytesIO` would copy the view, and costs more to create."""

    __slots__ = ("_view", "_at", "closed")

    def __init__(self, view: memoryview):
        self._view, self._at = view, 0
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        at = self._at
        end = len(self._view) if size is None or size < 0 else min(at + size, len(self._view))
        self._at = end
        return bytes(self._view[at:end])

    def read_view(self) -> memoryview:
        """What is left to read, as a view of the kept chunk (no copy); the stream is then at its
        end (the archive writer's one-step read, see :class:`~qtbuild.formats.cpio.CpioEntry`)."""
        if self.closed:
            raise ValueError("read of a closed file")
        at, self._at = self._at, len(self._view)
        return self._view[at:]

    def readinto(self, buffer) -> int:
        if self.closed:
            raise ValueError("readinto of a closed file")
        at = self._at
        step = min(len(buffer), len(self._view) - at)
        buffer[:step] = self._view[at:at + step]
        self._at = at + step
        return step

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> _ViewStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
