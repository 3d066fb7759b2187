"""One read-only window ``[start, start + size)`` over a file, read with ``os.preadv``.

:class:`FileWindow` implements ``readinto`` only (on :class:`io.RawIOBase`, which derives
``read``/``readall``); wrap it in :class:`io.BufferedReader` where small reads or ``peek`` are
wanted.  It keeps its own position and never moves the file's offset, so any number of windows
(and the file object's owner) can share one descriptor, from any thread.

The source is a file object or any object with ``fileno()`` (asked on every read, so a closed
source stops its windows instead of reading a recycled descriptor).  Sources without a
descriptor (``io.BytesIO``: images held in memory) are read with ``seek`` + ``readinto``, which
moves the source's position: share those between windows on one thread only.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import BinaryIO, Protocol


class _Source(Protocol):
    def fileno(self) -> int: ...


def _has_descriptor(source: object) -> bool:
    try:
        source.fileno()  # type: ignore[attr-defined]
    except (AttributeError, io.UnsupportedOperation):
        return False
    return True


class FileWindow(io.RawIOBase):
    """Bytes ``[start, start + size)`` of ``source`` as a seekable, read-only raw stream.

    At the end of the file before the window's end, ``readinto`` raises ``truncated(offset)``
    (the absolute offset) when given, else returns 0 (EOF) as a short file would.
    """

    def __init__(self, source: _Source | io.IOBase, start: int, size: int, *,
                 truncated: Callable[[int], Exception] | None = None) -> None:
        if start < 0 or size < 0:
            raise ValueError(f"window {start}+{size} has a negative bound")
        self._source, self._start, self._size, self._truncated = source, start, size, truncated
        self._pread = _has_descriptor(source)
        self._pos = 0

    @classmethod
    def of_path(cls, path: str | os.PathLike, start: int, size: int) -> FileWindow:
        """A window over ``path``, on a descriptor of its own (closed with the window)."""
        return _OwningWindow(open(path, "rb", buffering=0), start, size)

    @classmethod
    def buffered(cls, source: _Source | io.IOBase, start: int, size: int, *,
                 truncated: Callable[[int], Exception] | None = None) -> BinaryIO:
        """A window behind :class:`io.BufferedReader`: small reads and ``peek`` are buffered,
        large ones go straight from ``preadv`` into the caller's result.

        A window no larger than one buffer is returned unbuffered: it is read in one call anyway,
        and a spill store opens one per file, where a BufferedReader doubles the cost.
        """
        window = cls(source, start, size, truncated=truncated)
        if size <= io.DEFAULT_BUFFER_SIZE:
            return window  # type: ignore[return-value]
        return io.BufferedReader(window)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        want = self._size - self._pos
        if want <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        if want < len(view):
            view = view[:want]
        offset = self._start + self._pos
        if self._pread:
            got = os.preadv(self._source.fileno(), [view], offset)
        else:
            self._source.seek(offset)  # type: ignore[union-attr]
            got = self._source.readinto(view) or 0  # type: ignore[union-attr]
        if not got and self._truncated is not None:
            raise self._truncated(offset)
        self._pos += got
        return got



class _OwningWindow(FileWindow):
    """A window that closes its source with itself (see :meth:`FileWindow.of_path`)."""

    def close(self) -> None:
        if not self.closed:
            self._source.close()  # type: ignore[union-attr]
        super().close()

