"""Serve a compressed layer's file data by inflating the layer again, instead of spilling it.

``qtbuild measure`` keeps nothing it computes, so writing every decompressed layer to disk (the
spill store) only to read it back once is wasted I/O and disk space.  For a layer whose blob is
a local file, :class:`LayerRereader` answers ``open_range(offset, size)`` from a fresh
decompression of the blob instead.  gzip cannot seek, so:

* a *cursor* is one decompression of the layer read forward by a worker thread, which hands
  the reader only the data of the files that will be asked for (``needed``: the (offset, size)
  of every file the tree can output), cut in pieces of ``min(1 MiB, rest of the file)`` and
  batched, at most :data:`DEPTH` batches ahead (inflating overlaps hashing; the reader's thread
  only passes ready ``bytes`` on); a request is served by the cursor furthest along that has not
  passed its file, skipping forward to it; a request behind every cursor opens a new one from the
  start (at most :data:`MAX_CURSORS`, least recently used closed first);
* while a cursor skips forward, the files it passes are kept in a *stash* of at most 32 MiB in
  memory (:class:`Stash`), so a member archived after its bytewise successors (``lib-x`` after
  ``lib/…``) costs no re-inflation;
* the bytes inflated are counted; once they exceed :data:`REINFLATE_FACTOR` times the layer
  plus :data:`REINFLATE_ALLOWANCE` (an adversarial member order), the layer is decompressed once
  more into ``spill`` and served from there — the old behaviour, paid only by such layers.

Ranges served are the bytes of the layer's tar stream, whose blob digest the first pass verified.
:meth:`LayerRereader.finish` proves they still were: for a blob in a local file
(:class:`~qtbuild.sources.local_blob.LocalBlob`) that has settled, by the file's identity, with no
second hash (:mod:`qtbuild.convert.reinflate`); for any other, by reading a cursor to its end,
which verifies the digest again (a mismatch, e.g. a blob changed in between, is an ImageError).
Not thread-safe: one reader at a time, as the cpio writer reads files one after another.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO, Protocol, cast

from qtbuild.convert.handoff import Handoff
from qtbuild.convert.reinflate import BlobTarStream
from qtbuild.convert.spill import SpillStore
from qtbuild.errors import ImageError
from qtbuild.sources.local_blob import LocalBlob

MAX_CURSORS = 3
REINFLATE_FACTOR = 4
REINFLATE_ALLOWANCE = 64 << 20
CHUNK = 1 << 20
#: A piece of a file's data as a cursor hands it over: ``bytes``, or a view of a block read with it.
Piece = bytes | memoryview
#: A cursor's worker hands pieces (up to CHUNK bytes) over in batches of at least this many bytes
#: (or the last ones; so a batch holds less than 2 MiB) ...
BATCH = 1 << 20
#: ... and runs at most this many batches ahead of the reader: with the batch being filled, the
#: one being read and the block read last, at most about 12 MiB a cursor (7 MiB when files are
#: large; main's read-ahead: 6).
DEPTH = 3
#: Files smaller than this are cut out of blocks of BLOCK bytes read at once (their headers and
#: neighbours with them), not read one by one: one source read for dozens of small files.  Each
#: read gives the GIL up while it inflates and waits for it back (up to the 0.5 ms switch interval
#: while the cpio producer runs Python): reads of 1 MiB, not of 256 KiB or of one 80 KiB file,
#: keep that wait small next to the work done without the GIL.
SMALL = 1 << 20
BLOCK = 1 << 20
#: A layer's first cursor is started by :meth:`LayerRereader.start` before any of its files is asked
#: for, so that layers needed later inflate while the earlier ones are written; its worker may run
#: this many batches ahead instead of :data:`DEPTH` (at most about 22 MiB for each re-read layer).
AHEAD_DEPTH = 8

class _Stopped(Exception):
    """The cursor was closed: its worker ends."""


class _TarSource(Protocol):
    """A layer's tar stream as a cursor's worker reads it."""

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end (``b""`` there)."""

    def finish(self, stopped: Callable[[], bool]) -> None:
        """Prove the stream the bytes the first pass verified (ImageError if not); may read on,
        unless ``stopped()`` turns true (then it returns, proving nothing)."""

    def close(self) -> None:
        ...


class _VerifiedStream:
    """A :data:`_TarSource` over a stream that verifies itself when read to its end."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def read(self, n: int) -> bytes:
        return self._stream.read(n)

    def finish(self, stopped: Callable[[], bool]) -> None:
        while not stopped() and self._stream.read(CHUNK):
            pass

    def close(self) -> None:
        self._stream.close()


class _Cursor:
    """One forward decompression of the layer, on a worker thread.

    The worker reads the tar stream and hands over, in order, the data of ``ranges`` as
    ``(range index, piece)`` pairs, in batches: a range comes in pieces of exactly
    ``min(CHUNK, rest of the range)`` bytes, each a ``bytes`` object read as such (no copy), but
    a range smaller than :data:`SMALL` (or inside the block read with one) is cut out of a block
    of :data:`BLOCK` bytes read with its neighbours — as a ``memoryview`` of the block, not a
    copy (the reader copies it once, into the cpio writer's ring; a batch counts each block its
    views hold, so it holds no more memory than a batch of copies), unless it spans two blocks
    (then joined) — and a large range starting in such a block has its first piece joined;
    everything else is dropped.  After the last range it runs
    ``source.finish()``; its error, like any other, reaches the reader where it is.  ``next`` is
    the index of the range the reader takes next; ``torn``: a range whose rest, left by a stream
    closed early, is queued.
    """

    def __init__(self, source: _TarSource, ranges: Sequence[tuple[int, int]], what: str, depth: int = DEPTH):
        self._source, self._ranges, self.what = source, ranges, what
        self.next = 0
        self.torn = -1
        self.busy = False
        self.inflated = 0
        self._handoff: Handoff[list[tuple[int, Piece]]] = Handoff(depth)
        self._batch: list[tuple[int, Piece]] = []
        self._taken = 0
        self._batch_out: list[tuple[int, Piece]] = []  # the worker's batch being filled, and its bytes
        self._batched = 0
        self._held: object = None  # the block the newest view in the batch being filled holds
        self._block, self._block_start = memoryview(b""), 0
        self._worker = threading.Thread(target=self._run, name="reread", daemon=True)
        self._worker.start()

    # -- worker side ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._produce()
            self._source.finish(lambda: self._handoff.stopped)
            self._handoff.end()
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the reader, raised there
            self._handoff.fail(exc)

    def _produce(self) -> None:
        position = 0  # stream offset of the next byte the source gives
        block, start = memoryview(b""), 0  # bytes read ahead, from stream offset start (up to position)
        queue = self._queue
        for index, (offset, size) in enumerate(self._ranges):
            end = offset + size
            if end <= position:  # in the block read ahead
                queue(index, block[offset - start:end - start])
            elif size < SMALL:
                queue(index, self._small_range(offset, end, block, start, position))
                block, start = self._block, self._block_start
                position = start + len(block)
            else:
                self._large_range(index, offset, end, block, start, position)
                block, start, position = memoryview(b""), end, end
        if self._batch_out:
            self._handoff.put(self._batch_out)

    def _queue(self, index: int, piece: Piece) -> None:
        """Add a piece to the batch being filled; hand the batch over once it holds :data:`BATCH` bytes
        (for views, the bytes of the blocks they keep alive)."""
        self._batch_out.append((index, piece))
        if type(piece) is memoryview:
            held = piece.obj
            if held is not self._held:
                self._held = held
                self._batched += memoryview(held).nbytes
        else:
            self._batched += len(piece)
        if self._batched >= BATCH:
            self._handoff.put(self._batch_out)
            self._batch_out, self._batched, self._held = [], 0, None

    def _small_range(self, offset: int, end: int, block: memoryview, start: int, position: int) -> Piece:
        """The bytes of a small range ending beyond ``position``, read with the next block (kept in
        ``self._block``, from ``self._block_start``): a view of it, or, when the range starts in
        ``block`` (from ``start``), that part joined to the rest."""
        if offset - position >= BLOCK:
            position = self._skip(position, offset)
        self._block_start = position
        self._block = ahead = memoryview(self._read(max(BLOCK, end - position), position, end))
        if position + len(ahead) < end:
            self._ended(position + len(ahead), end)
        if offset < position:  # it starts in the block before
            return b"".join((block[offset - start:], ahead[:end - position]))
        return ahead[offset - position:end - position]

    def _large_range(self, index: int, offset: int, end: int, block: memoryview, start: int, position: int) -> None:
        """Queue the pieces of a large range ending beyond ``position``, each read as such (the first
        one completed from the source when the range starts in ``block``, from ``start``)."""
        if offset < position:
            head = block[offset - start:]
            rest = min(CHUNK, end - offset) - len(head)
            piece = self._read(rest, position, end)
            if len(piece) < rest:
                self._ended(position + len(piece), end)
            self._queue(index, b"".join((head, piece)))
            position += rest
        else:
            position = self._skip(position, offset)
        while position < end:
            piece = self._read(min(CHUNK, end - position), position, end)
            self._queue(index, piece)
            position += len(piece)

    def _skip(self, position: int, offset: int) -> int:
        """Inflate and drop the data from ``position`` up to ``offset`` (no one asked for it)."""
        while position < offset:
            position += len(self._read(min(CHUNK, offset - position), position, offset))
        return position

    def _read(self, n: int, position: int, target: int) -> bytes:
        if self._handoff.stopped:
            raise _Stopped
        data = self._source.read(n)
        if not data:
            self._ended(position, target)
        self.inflated = position + len(data)
        return data

    def _ended(self, position: int, target: int) -> None:
        raise ImageError(f"{self.what}: a second read of the layer ended at {position} bytes, before "
                         f"offset {target} (the blob changed?)")

    # -- reader side ------------------------------------------------------------------------
    def _fill(self) -> bool:
        """Make the next batch current; False at the end (re-raises the worker's error)."""
        batch = self._handoff.get()
        if batch is None:
            return False
        self._batch, self._taken = batch, 0
        return True

    def peek(self) -> int:
        """The range index of the next piece (``len(ranges)`` at the end)."""
        while self._taken == len(self._batch):
            if not self._fill():
                return len(self._ranges)
        return self._batch[self._taken][0]

    def take(self) -> Piece:
        """The next piece (after :meth:`peek` said which range it belongs to)."""
        piece = self._batch[self._taken][1]
        self._taken += 1
        return piece

    def drain(self) -> None:
        """Take everything up to the end (so ``source.finish()`` ran: ImageError if it failed)."""
        while self.peek() < len(self._ranges):
            self.take()

    def close(self) -> None:
        self._handoff.stop()
        self._worker.join()
        self._source.close()


class _RangeStream:
    """The data of range ``index`` of a cursor (``size`` bytes); releases the cursor when closed.

    A minimal read-only binary stream (``read``, ``readinto``, ``close``, context manager), not an
    :class:`io.RawIOBase`: one is made per file, and that base class costs ten times as much to
    create and close.  ``read(n)`` with ``n`` at least the pending piece returns that piece
    itself (no copy)."""

    __slots__ = ("_cursor", "_index", "_left", "_piece", "_at", "_on_close", "closed")

    def __init__(self, cursor: _Cursor, index: int, size: int, on_close: Callable[[], None] | None = None):
        self._cursor, self._index, self._left = cursor, index, size
        self._piece: Piece = b""  # the piece being read, and how far
        self._at = 0
        self._on_close = on_close
        self.closed = False
        cursor.busy = True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def _next_piece(self) -> None:
        cursor = self._cursor
        if cursor.peek() != self._index:
            raise ImageError(f"{cursor.what}: a second read of the layer lost the data of a file")
        self._piece, self._at = cursor.take(), 0

    def read(self, size: int | None = -1) -> bytes:
        """``size`` bytes (all that is left if None or negative), fewer only at the end."""
        if not self._left:
            if self.closed:
                raise ValueError("read of a closed file")
            return b""
        size = self._left if size is None or size < 0 else min(size, self._left)
        if self._at == len(self._piece):
            self._next_piece()
        piece, at = self._piece, self._at
        self._left -= size
        if at == 0 and size == len(piece):  # the usual case: asked for pieces as the worker cut them
            self._at = size
            return piece if type(piece) is bytes else bytes(piece)
        if size <= len(piece) - at:
            self._at = at + size
            return bytes(piece[at:at + size])
        parts, wanted = [piece[at:]], size - (len(piece) - at)
        while wanted:
            self._next_piece()
            part = self._piece[:wanted]
            parts.append(part)
            wanted -= len(part)
            self._at = len(part)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` as far as the file's data allows (copied from the pieces, no join)."""
        view = memoryview(buffer).cast("B")
        size = min(len(view), self._left)
        if not size:
            if self.closed:
                raise ValueError("readinto of a closed file")
            return 0
        filled = 0
        while filled < size:
            if self._at == len(self._piece):
                self._next_piece()
            piece, at = self._piece, self._at
            step = min(size - filled, len(piece) - at)
            view[filled:filled + step] = piece if step == len(piece) else memoryview(piece)[at:at + step]
            self._at = at + step
            filled += step
        self._left -= size
        return size

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            cursor = self._cursor
            cursor.busy = False
            if self._left:
                cursor.torn = self._index
                self._left = 0
            cursor.next = self._index + 1
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> _RangeStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LayerRereader:
    """Range access to a layer's tar stream by re-decompression; see the module docstring.

    ``reopen()`` returns the layer's decompressed stream afresh (verified when read to its end);
    when it is a :class:`LocalBlob`, cursors read the blob file directly instead
    (:mod:`qtbuild.convert.reinflate`: no second SHA-256 of a settled blob).  ``size`` is the
    stream's length (as the first pass measured it); ``needed`` lists ``(offset, size)`` of the
    files that will be read, sorted by offset; ``stash`` is shared between the layers of one image.
    """

    def __init__(self, reopen: Callable[[], BinaryIO], size: int, needed: Sequence[tuple[int, int]],
                 stash: Stash, spill: SpillStore, what: str):
        self._reopen, self._size, self._what = reopen, size, what
        self._needed = needed
        self._index_of = {offset: index for index, (offset, _) in enumerate(needed)}
        self._stash = stash
        self._spill = spill
        self._spill_base: int | None = None
        self._cursors: list[_Cursor] = []
        self._closed_inflated = 0
        self._served = False
        self._verified = False

    @property
    def inflated(self) -> int:
        """Bytes of the tar stream decompressed so far by this reader's cursors (workers included)."""
        return self._closed_inflated + sum(cursor.inflated for cursor in self._cursors)

    def start(self) -> None:
        """Start inflating the layer for its first needed file now (:data:`AHEAD_DEPTH` batches
        ahead) if its blob is a settled local file and no cursor runs yet.  Optional: without it, the
        first request starts the cursor; with it, that request is served as any other by that cursor.

        Only a settled blob: its identity proves it unchanged up to :meth:`finish`, however early it
        was read; an unsettled one is proven by hashing what is read, so reading it early would let a
        change made after the first pass but before the files are asked for go unnoticed."""
        blob = self._reopen
        if (isinstance(blob, LocalBlob) and blob.settled and self._needed and not self._cursors
                and self._spill_base is None):
            self._cursors.append(_Cursor(self._source(), self._needed, self._what, AHEAD_DEPTH))

    def open_range(self, offset: int, size: int) -> BinaryIO:
        index = self._index_of.get(offset)
        cursor = self._cursors[-1] if self._cursors else None
        if (cursor is not None and index is not None and cursor.next == index and not cursor.busy
                and not self._stash and self._needed[index][1] == size and cursor.peek() == index):
            return cast(BinaryIO, _RangeStream(cursor, index, size))  # the usual case: the file after the last one
        return self._open_range(offset, size, index)

    def _open_range(self, offset: int, size: int, index: int | None) -> BinaryIO:
        if offset < 0 or size < 0 or offset + size > self._size:
            raise ImageError(f"{self._what}: range {offset}+{size} outside the layer's {self._size} bytes")
        if self._spill_base is not None:
            return self._spill.open_range(self._spill_base + offset, size)
        kept = self._stash.take(self, offset, size)
        if kept is not None:
            return cast(BinaryIO, io.BytesIO(kept))
        if not size:
            return cast(BinaryIO, io.BytesIO(b""))
        self._served = True
        if index is None or self._needed[index][1] != size:
            return self._open_unlisted(offset, size)
        cursor = self._cursor_for(index)
        if cursor is None:  # every cursor is past it: re-inflated too often, spill the layer once
            self._spill_layer()
            return self._spill.open_range(cast(int, self._spill_base) + offset, size)
        self._advance(cursor, index)
        return cast(BinaryIO, _RangeStream(cursor, index, size))

    def _open_unlisted(self, offset: int, size: int) -> BinaryIO:
        """A range that is no file's data: a decompression of its own, closed with the stream."""
        cursor = _Cursor(self._source(), [(offset, size)], self._what)

        def close() -> None:
            self._closed_inflated += cursor.inflated
            cursor.close()

        try:
            cursor.peek()
        except BaseException:
            close()
            raise
        return cast(BinaryIO, _RangeStream(cursor, 0, size, on_close=close))

    def _source(self) -> _TarSource:
        if isinstance(self._reopen, LocalBlob):
            return BlobTarStream(self._reopen)
        return _VerifiedStream(self._reopen())

    def _cursor_for(self, index: int) -> _Cursor | None:
        """The cursor furthest along that has not passed range ``index``, else a new one (None when
        the layer was decompressed more than :data:`REINFLATE_FACTOR` times already)."""
        usable = [c for c in self._cursors if c.next <= index and not c.busy]
        if usable:
            cursor = max(usable, key=lambda c: c.next)
            self._cursors.remove(cursor)
        else:
            if self.inflated > REINFLATE_FACTOR * self._size + REINFLATE_ALLOWANCE:
                return None
            if len(self._cursors) >= MAX_CURSORS:
                self._close_cursor(self._cursors.pop(0))
            cursor = _Cursor(self._source(), self._needed, self._what)
        self._cursors.append(cursor)  # most recently used last
        return cursor

    def _close_cursor(self, cursor: _Cursor) -> None:
        self._closed_inflated += cursor.inflated
        cursor.close()

    def _advance(self, cursor: _Cursor, index: int) -> None:
        """Take ``cursor``'s pieces up to range ``index``, stashing whole files that fit on the way."""
        while (ahead := cursor.peek()) < index:
            pieces = []
            while cursor.peek() == ahead:
                pieces.append(cursor.take())
            offset, size = self._needed[ahead]
            if ahead != cursor.torn and self._stash.room(size):
                self._stash.put(self, offset, b"".join(pieces))
        if cursor.peek() != index:
            raise ImageError(f"{self._what}: a second read of the layer lost the data of a file")
        cursor.next = index

    def _spill_layer(self) -> None:
        """Decompress the whole layer into the spill store (adversarial member order)."""
        self._spill_base = self._spill.size
        with self._reopen() as stream:
            while chunk := stream.read(CHUNK):
                self._spill.append(chunk)
        self._spill.flush()
        self._verified = True
        self.close_cursors()

    def close_cursors(self) -> None:
        for cursor in self._cursors:
            self._close_cursor(cursor)
        self._cursors = []

    def finish(self) -> None:
        """Prove that what was served came from the blob the first pass verified (ImageError if
        not): a settled :class:`LocalBlob` by its file identity, anything else by reading a cursor
        (or a new decompression) to its end."""
        try:
            if isinstance(self._reopen, LocalBlob) and self._reopen.settled:
                self._reopen.check()
                return
            for cursor in self._cursors:
                if not cursor.busy:
                    cursor.drain()
                    self._verified = True
            if self._served and not self._verified:
                source = self._source()
                try:
                    source.finish(lambda: False)
                finally:
                    source.close()
        finally:
            self.close_cursors()


class Stash:
    """File data read ahead of its turn, keyed by (reader, offset); at most ``limit`` bytes."""

    def __init__(self, limit: int = 32 << 20):
        self._limit = limit
        self._used = 0
        self._data: dict[tuple[int, int], bytes] = {}

    def __bool__(self) -> bool:
        return bool(self._data)

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
