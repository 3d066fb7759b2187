"""Read a stream ahead on a worker thread, so producing bytes overlaps with consuming them.

Decompressing and hashing a layer (zlib, hashlib: both release the GIL) runs on the worker while
the caller parses tar headers and spills data; on two cores that roughly halves the first pass
over gzip layers.  Memory is bounded by ``depth × chunk_size``.
"""

from __future__ import annotations

import io
import threading
from typing import BinaryIO

from qtbuild.convert.handoff import Handoff


class ReadAhead(io.RawIOBase):
    """A read-only stream over ``source`` whose chunks are fetched by a background thread.

    Errors raised by ``source.read`` (e.g. a digest mismatch at EOF) are re-raised to the reader
    at the point in the stream where they happened.  ``close()`` stops the worker and closes
    ``source``.
    """

    def __init__(self, source: BinaryIO, *, chunk_size: int = 1 << 20, depth: int = 4) -> None:
        super().__init__()
        self._source = source
        self._chunk_size = chunk_size
        self._handoff: Handoff[bytes] = Handoff(depth)
        self._pending = memoryview(b"")
        self._worker = threading.Thread(target=self._fill, name="readahead", daemon=True)
        self._worker.start()

    def _fill(self) -> None:
        try:
            while chunk := self._source.read(self._chunk_size):
                if not self._handoff.put(chunk):
                    return  # the reader closed the stream
            self._handoff.end()
        except BaseException as exc:  # handed to the reader, raised there
            self._handoff.fail(exc)

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        """Make the next chunk pending; False at the end (re-raises the source's error)."""
        chunk = self._handoff.get()
        if chunk is None:
            return False
        self._pending = memoryview(chunk)
        return True

    def read(self, size: int | None = -1) -> bytes:
        """As ``RawIOBase.read``, but a whole pending chunk that fits is returned without a copy."""
        if size is None or size < 0:
            return self.readall()
        if not self._pending and not self._next():
            return b""
        pending = self._pending
        if len(pending) <= size and isinstance(pending.obj, bytes) and len(pending) == len(pending.obj):
            self._pending = memoryview(b"")
            return pending.obj
        return super().read(size) or b""

    def readinto(self, buffer) -> int:
        if not self._pending and not self._next():
            return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        if not self.closed:
            self._handoff.stop()
            self._worker.join()
            self._source.close()
        super().close()
