"""Spill store: append-only scratch files holding layer bytes, read back by range.

Layers whose blob cannot be read in place (compressed, or not a local file) are copied here while
their tar stream is scanned; file data is later read from ``(offset, size)`` ranges of this file.
A ``docker save`` stream (:mod:`qtbuild.sources.save_stream`) keeps the layers that arrive before
their turn here too, and a whole OCI-layout save in a named file.

Contract:
- Nothing touches the disk until a file's first :meth:`SpillFile.append`; then the file is created
  in ``directory`` (default :func:`tempfile.gettempdir`; the converter passes the output's
  directory), private (mode 0600, a random name starting ``.qtbuild-spill-``), and unlinked at once:
  its descriptors keep it alive, so nothing is left behind whatever ends the process.  A *named*
  file (:meth:`SpillStore.segment` with ``named=True``, for readers that open a path) keeps its
  name until the store closes; it holds exactly the appended bytes from offset 0.
- :meth:`append` returns nothing; :attr:`size` is the offset the next byte will have.
- :meth:`open_range` returns a stream of exactly the bytes ``[offset, offset + size)`` (fewer only
  if the file is shorter, which the cpio writer reports).  Call :meth:`flush` after appending and
  before reading.  Streams share one read-only descriptor (``os.pread``, safe across threads) and
  refuse to read after :meth:`close`.
- :meth:`segment` gives another append-only file in the same directory (same interface, its own
  offsets from 0): flatten spills several layers at once, each on its own thread, into their own
  segments.  A segment is written by one thread at a time.  :attr:`total_size` counts the store's
  file and every segment.
- :meth:`close` closes every file (and unlinks the named ones); it is idempotent.  Memory use is
  bounded by the write buffers whatever the amount spilled.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from typing import BinaryIO

from qtbuild.errors import naming_path
from qtbuild.formats.file_window import FileWindow

PREFIX = ".qtbuild-spill-"
#: Bytes before offset 0 of an unnamed spill file.  Appending 1 MiB chunks at page-aligned offsets makes
#: the page cache take 1 MiB folios, which on the VMs measured (fresh guest memory) cost twice the
#: system time of the small folios that unaligned appends get (0.45 vs 0.22 s per GiB).
LEAD = 512
#: The write buffer.  Smaller than the 1 MiB chunks layers are appended in, so those go to the file
#: straight from the caller's buffer: with a 1 MiB buffer, ``BufferedWriter`` copied every such chunk
#: into it first (a chunk fills it exactly), 1 GiB of memmove for a 1 GiB layer.  Small appends are
#: still gathered.
WRITE_BUFFER = 256 << 10


class SpillFile:
    """One append-only file of a spill store, read back by range through one descriptor."""

    def __init__(self, store: SpillStore, *, named: bool = False):
        self._store = store
        self._named = named
        self._lead = 0 if named else LEAD
        self._path: str | None = None
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
    def path(self) -> str | None:
        """The file's name once created (unlinked at once unless the file is named)."""
        return self._path

    @property
    def _file(self) -> str:
        return self._path or self._store.parent

    def _open(self) -> BinaryIO:
        parent = self._store.parent
        with naming_path(parent):
            fd, self._path = tempfile.mkstemp(prefix=PREFIX, suffix=".bin", dir=parent)
        self._writer = open(fd, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 -- the store owns it; close() closes it
        try:
            self._read_fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        finally:
            if not self._named:  # nothing to leave behind, whatever ends the process
                os.unlink(self._path)
        with naming_path(self._path):
            self._writer.write(bytes(self._lead))
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
        return FileWindow.buffered(self, self._lead + offset, size)

    def opener(self, offset: int, size: int) -> Callable[[], BinaryIO]:
        """A callable opening :meth:`open_range` ``(offset, size)`` (for ``CpioEntry.data``)."""
        return partial(self.open_range, offset, size)

    def fileno(self) -> int:
        """The read-only descriptor :meth:`open_range` streams share (ValueError once closed)."""
        if self.closed or self._read_fd is None:
            raise ValueError("spill store is closed")
        return self._read_fd

    def close(self) -> None:
        """Close the file, unlinking it if it is named (idempotent)."""
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
            if self._named and self._path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)


class SpillStore(SpillFile):
    """Append-only temporary byte store; see the module docstring."""

    def __init__(self, directory: str | None = None):
        self._parent = directory
        self._lock = threading.Lock()
        self._segments: list[SpillFile] = []
        super().__init__(self)

    @property
    def parent(self) -> str:
        """Where the files go."""
        return self._parent or tempfile.gettempdir()

    def segment(self, *, named: bool = False) -> SpillFile:
        """A new append-only file beside the store's (created on its first append); ``named``: see the
        module docstring."""
        with self._lock:
            if self.closed:
                raise ValueError("spill store is closed")
            segment = SpillFile(self, named=named)
            self._segments.append(segment)
        return segment

    @property
    def total_size(self) -> int:
        """Bytes held by the store's file and its segments."""
        return self.size + sum(segment.size for segment in self._segments)

    def close(self) -> None:
        """Close every file (idempotent)."""
        with self._lock:
            self.closed = True
            segments = list(self._segments)
        try:
            for segment in segments:
                segment.close()
        finally:
            super().close()

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "closed", True):
            self.close()
