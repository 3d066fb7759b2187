"""Serve a compressed layer's file data by inflating the layer again, instead of spilling it.

``qtbuild measure`` keeps nothing it computes, so writing every decompressed layer to disk (the
spill store) only to read it back once is wasted I/O and disk space.  For a layer whose blob is
a local file, :class:`LayerRereader` answers ``open_range(offset, size)`` from a fresh
decompression of the blob instead.  gzip cannot seek, so:

* a *cursor* is one decompression of the layer read forward (on a read-ahead thread, so
  inflating overlaps hashing); a request is served by the cursor furthest along that has not
  passed its offset, skipping forward to it; a request behind every cursor opens a new one from
  the start (at most :data:`MAX_CURSORS`, least recently used closed first);
* while a cursor skips forward, the data of files that will still be asked for (``needed``: the
  (offset, size) of every file the tree can output) is kept in a *stash* of at most
  32 MiB in memory (:class:`Stash`), so a member archived after its bytewise successors (``lib-x`` after
  ``lib/…``) costs no re-inflation;
* the bytes inflated are counted; once they exceed :data:`REINFLATE_FACTOR` times the layer
  plus :data:`REINFLATE_ALLOWANCE` (an adversarial member order), the layer is decompressed once
  more into ``spill`` and served from there — the old behaviour, paid only by such layers.

Ranges served are the bytes of the layer's tar stream, whose blob digest the first pass verified;
the re-read streams verify it again when read to the end (:meth:`close` finishes them and
re-raises a mismatch, e.g. a blob changed in between).  Not thread-safe: one reader at a time, as
the cpio writer reads files one after another.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Callable, Sequence
from typing import BinaryIO, cast

from qtbuild.convert.readahead import ReadAhead
from qtbuild.convert.spill import SpillStore
from qtbuild.errors import ImageError

MAX_CURSORS = 3
REINFLATE_FACTOR = 4
REINFLATE_ALLOWANCE = 64 << 20
CHUNK = 1 << 20


class _Cursor:
    """One forward decompression of the layer."""

    def __init__(self, stream: io.RawIOBase):
        self.stream = stream
        self.pos = 0
        self.busy = False
        self._scratch = bytearray(CHUNK)

    def readinto(self, view: memoryview) -> int:
        got = self.stream.readinto(view) or 0
        self.pos += got
        return got

    def read_exact(self, n: int) -> bytes:
        data = bytearray(n)
        view, done = memoryview(data), 0
        while done < n and (got := self.readinto(view[done:])):
            done += got
        return bytes(view[:done])

    def skip(self, n: int) -> int:
        """Discard ``n`` bytes; return how many there were (fewer at the end)."""
        view = memoryview(self._scratch)
        done = 0
        while done < n:
            got = self.stream.readinto(view[:min(CHUNK, n - done)])
            if not got:
                break
            done += got
        self.pos += done
        return done

    def finish(self) -> None:
        """Read to the end (the stream's checks run there)."""
        while self.skip(CHUNK):
            pass


class _RangeStream(io.RawIOBase):
    """``size`` bytes read from a cursor; releases it when closed."""

    def __init__(self, cursor: _Cursor, size: int):
        super().__init__()
        self._cursor, self._left = cursor, size
        cursor.busy = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._left:
            return 0
        view = memoryview(buffer).cast("B")
        got = self._cursor.readinto(view[:min(len(view), self._left)])
        self._left -= got
        return got

    def close(self) -> None:
        self._cursor.busy = False
        super().close()


class LayerRereader:
    """Range access to a layer's tar stream by re-decompression; see the module docstring.

    ``reopen()`` returns the layer's decompressed stream afresh; ``size`` is the stream's length
    (as the first pass measured it); ``needed`` lists ``(offset, size)`` of the files that will
    be read, sorted by offset; ``stash`` is shared between the layers of one image.
    """

    def __init__(self, reopen: Callable[[], BinaryIO], size: int, needed: Sequence[tuple[int, int]],
                 stash: Stash, spill: SpillStore, what: str):
        self._reopen, self._size, self._what = reopen, size, what
        self._needed = needed
        self._needed_offsets = [offset for offset, _ in needed]
        self._stash = stash
        self._spill = spill
        self._spill_base: int | None = None
        self._cursors: list[_Cursor] = []
        self.inflated = 0

    def open_range(self, offset: int, size: int) -> BinaryIO:
        if offset < 0 or size < 0 or offset + size > self._size:
            raise ImageError(f"{self._what}: range {offset}+{size} outside the layer's {self._size} bytes")
        if self._spill_base is not None:
            return self._spill.open_range(self._spill_base + offset, size)
        kept = self._stash.take(self, offset, size)
        if kept is not None:
            return cast(BinaryIO, io.BytesIO(kept))
        if self.inflated > REINFLATE_FACTOR * self._size + REINFLATE_ALLOWANCE:
            self._spill_layer()
            return self._spill.open_range(cast(int, self._spill_base) + offset, size)
        cursor = self._cursor_for(offset)
        self._advance(cursor, offset)
        return cast(BinaryIO, _RangeStream(cursor, size))

    def _cursor_for(self, offset: int) -> _Cursor:
        usable = [c for c in self._cursors if c.pos <= offset and not c.busy]
        if usable:
            cursor = max(usable, key=lambda c: c.pos)
            self._cursors.remove(cursor)
        else:
            if len(self._cursors) >= MAX_CURSORS:
                self._cursors.pop(0).stream.close()
            cursor = _Cursor(ReadAhead(self._reopen()))
        self._cursors.append(cursor)  # most recently used last
        return cursor

    def _advance(self, cursor: _Cursor, offset: int) -> None:
        """Skip ``cursor`` to ``offset``, stashing needed files on the way."""
        start = cursor.pos
        index = bisect.bisect_left(self._needed_offsets, start)
        while cursor.pos < offset:
            if index < len(self._needed) and self._needed[index][0] < offset:
                file_offset, file_size = self._needed[index]
                index += 1
                if file_offset < cursor.pos or file_offset + file_size > offset:
                    continue
                cursor.skip(file_offset - cursor.pos)
                if self._stash.room(file_size):
                    self._stash.put(self, file_offset, cursor.read_exact(file_size))
                continue
            cursor.skip(offset - cursor.pos)
            break
        self.inflated += cursor.pos - start
        if cursor.pos != offset:
            raise ImageError(f"{self._what}: a second read of the layer ended at {cursor.pos} bytes, "
                             f"before offset {offset} (the blob changed?)")

    def _spill_layer(self) -> None:
        """Decompress the whole layer into the spill store (adversarial member order)."""
        self._spill_base = self._spill.size
        with self._reopen() as stream:
            while chunk := stream.read(CHUNK):
                self._spill.append(chunk)
        self._spill.flush()
        self.close_cursors()

    def close_cursors(self) -> None:
        for cursor in self._cursors:
            cursor.stream.close()
        self._cursors = []

    def finish(self) -> None:
        """Read every cursor to its end, so the blob's digest is checked again (ImageError if not)."""
        for cursor in self._cursors:
            if not cursor.busy:
                cursor.finish()
        self.close_cursors()


class Stash:
    """File data read ahead of its turn, keyed by (reader, offset); at most ``limit`` bytes."""

    def __init__(self, limit: int = 32 << 20):
        self._limit = limit
        self._used = 0
        self._data: dict[tuple[int, int], bytes] = {}

    def room(self, size: int) -> bool:
        return self._used + size <= self._limit

    def put(self, reader: LayerRereader, offset: int, data: bytes) -> None:
        key = (id(reader), offset)
        if key not in self._data:
            self._data[key] = data
            self._used += len(data)

    def take(self, reader: LayerRereader, offset: int, size: int) -> bytes | None:
        data = self._data.get((id(reader), offset))
        if data is None or len(data) != size:
            return None
        del self._data[(id(reader), offset)]
        self._used -= len(data)
        return data
