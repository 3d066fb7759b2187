"""Spill store: an append-only temporary file holding decompressed layer bytes, read back by range.

Layers whose blob cannot be read in place (compressed, or not a local file) are copied here while
their tar stream is scanned; file data is later read from ``(offset, size)`` ranges of this file.

Contract:
- Nothing touches the disk until the first :meth:`SpillStore.append`; then a private directory
  (mode 0700) is created under ``directory`` (default :func:`tempfile.gettempdir`) holding one file.
- :meth:`append` returns nothing; :attr:`size` is the offset the next byte will have.
- :meth:`open_range` returns a stream of exactly the bytes ``[offset, offset + size)`` (fewer only
  if the file is shorter, which the cpio writer reports).  Call :meth:`flush` after appending and
  before reading.  Streams share one read-only descriptor (``os.pread``, safe across threads) and
  refuse to read after :meth:`close`.
- :meth:`segment` gives another append-only file in the same directory (same interface, its own
  offsets from 0): flatten spills several layers at once, each on its own thread, into their own
  segments.  A segment is written by one thread at a time; the store's lock only guards creating
  the directory.  :attr:`total_size` counts the store's file and every segment.
- :meth:`close` removes the directory (segments included); it is idempotent.  Memory use is
  bounded by the write buffers whatever the amount spilled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from typing import BinaryIO

from qtbuild.errors import naming_path
from qtbuild.formats.file_window import FileWindow

#: Bytes before offset 0 of a spill file.  Appending 1 MiB chunks at page-aligned offsets makes
#: the page cache take 1 MiB folios, which on the VMs measured (fresh guest memory) cost twice the
#: system time of the small folios that unaligned appends get (0.45 vs 0.22 s per GiB).
LEAD = 512


class SpillFile:
    """One append-only file of a spill directory, read back by range through one descriptor."""

    def __init__(self, store: SpillStore, name: str):
        self._store = store
        self._name = name
        self._writer: BinaryIO | None = None
        self._read_fd: int | None = None
        self._size = 0
        self.closed = False

    @property
    def size(self) -> int:
        """Bytes appended so far (the offset of the next appended byte)."""
        return self._size

    def append(self, chunk: bytes) -> None:
        """Append ``chunk`` at offset :attr:`size`."""
        if self.closed:
            raise ValueError("spill store is closed")
        writer = self._writer if self._writer is not None else self._open()
        with naming_path(self._file):
            writer.write(chunk)
        self._size += len(chunk)

    @property
    def _file(self) -> str:
        return os.path.join(self._store.path or self._store.parent, self._name)

    def _open(self) -> BinaryIO:
        self._store.make_directory()
        path = self._file
        self._writer = open(path, "xb", buffering=1 << 20)  # noqa: SIM115 -- the store owns it; close() closes it
        self._read_fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._writer.write(bytes(LEAD))
        return self._writer

    def flush(self) -> None:
        """Make everything appended readable through :meth:`open_range`."""
        if self._writer is not None:
            with naming_path(self._file):
                self._writer.flush()

    def open_range(self, offset: int, size: int) -> BinaryIO:
        """A stream of ``size`` bytes starting at ``offset``."""
        if offset < 0 or size < 0 or offset + size > self._size:
            raise ValueError(f"range {offset}+{size} outside the spill store of {self._size} bytes")
        return FileWindow.buffered(self, LEAD + offset, size)

    def opener(self, offset: int, size: int) -> Callable[[], BinaryIO]:
        """A callable opening :meth:`open_range` ``(offset, size)`` (for ``CpioEntry.data``)."""
        return partial(self.open_range, offset, size)

    def fileno(self) -> int:
        """The read-only descriptor :meth:`open_range` streams share (ValueError once closed)."""
        if self.closed or self._read_fd is None:
            raise ValueError("spill store is closed")
        return self._read_fd

    def close(self) -> None:
        """Close the file (idempotent); the store removes it with its directory."""
        self.closed = True
        writer, self._writer = self._writer, None
        fd, self._read_fd = self._read_fd, None
        try:
            if writer is not None:
                writer.close()
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)


class SpillStore(SpillFile):
    """Append-only temporary byte store; see the module docstring."""

    def __init__(self, directory: str | None = None):
        self._parent = directory
        self._dir: str | None = None
        self._lock = threading.Lock()
        self._segments: list[SpillFile] = []
        super().__init__(self, "layers.bin")

    @property
    def path(self) -> str | None:
        """The private directory, once something was appended."""
        return self._dir

    @property
    def parent(self) -> str:
        """Where the private directory goes."""
        return self._parent or tempfile.gettempdir()

    def make_directory(self) -> None:
        """Create the private directory unless it exists (any thread)."""
        with self._lock:
            if self.closed:
                raise ValueError("spill store is closed")
            if self._dir is None:
                with naming_path(self.parent):
                    self._dir = tempfile.mkdtemp(prefix="qtbuild-spill-", dir=self._parent)

    def segment(self) -> SpillFile:
        """A new append-only file in the store's directory (created on its first append)."""
        with self._lock:
            if self.closed:
                raise ValueError("spill store is closed")
            segment = SpillFile(self, f"segment-{len(self._segments)}.bin")
            self._segments.append(segment)
        return segment

    @property
    def total_size(self) -> int:
        """Bytes held by the store's file and its segments."""
        return self.size + sum(segment.size for segment in self._segments)

    def close(self) -> None:
        """Close the files and remove the directory (idempotent)."""
        with self._lock:
            self.closed = True
            segments = list(self._segments)
        try:
            for segment in segments:
                segment.close()
            super().close()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "closed", True):
            self.close()
