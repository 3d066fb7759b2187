"""The tar stream of a local layer blob, decompressed a second time, as cheaply as that can be trusted.

The first pass over a layer verified its blob's SHA-256.  A second decompression of the same file
(:mod:`qtbuild.convert.reread`) needs only proof that the file did not change in between:

* a *settled* blob (:class:`~qtbuild.sources.local_blob.LocalBlob`) is proven unchanged by its
  file identity: checked on the descriptor read here when it is opened and in :meth:`finish`
  (and by the re-reader on the path at the very end).  Nothing is hashed, and reading may stop
  anywhere: :meth:`finish` does not read the rest;
* any other blob is hashed again as it is read; :meth:`finish` reads (without decompressing)
  what is left of it and compares the digest.

``read(n)`` returns exactly ``n`` bytes (fewer only at the end), so a reader asking for a file's
data a chunk at a time gets each chunk as one fresh ``bytes`` object, with no copy to join or
slice it.  The blob is decoded by :mod:`qtbuild.sources.decoders`, as on the first pass; the gzip
reader there refills its buffer with :meth:`_BlobFile.readinto`, which reads the file straight
into it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from qtbuild.errors import ImageError
from qtbuild.sources.blobs import sniff_compression
from qtbuild.sources.decoders import CorruptCompressedData, open_decoder
from qtbuild.sources.local_blob import LocalBlob

INPUT_CHUNK = 256 * 1024


class _BlobFile:
    """The blob's compressed bytes read with ``pread``, hashed unless the blob is settled."""

    def __init__(self, blob: LocalBlob):
        self._blob = blob
        try:
            self._fd = os.open(blob.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ImageError(f"{blob.what}: cannot open {blob.path}: {exc.strerror or exc}") from None
        self._position, self._end = blob.start, blob.start + blob.size
        self._hash = None if blob.settled else hashlib.sha256()
        if blob.settled:
            try:
                blob.check(os.fstat(self._fd))
            except BaseException:
                self.close()
                raise

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        size = self._end - self._position if n < 0 else min(n, self._end - self._position)
        if size <= 0:
            return b""
        chunk = os.pread(self._fd, size, self._position)
        self._advance(len(chunk))
        if self._hash is not None:
            self._hash.update(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[:max(self._end - self._position, 0)]
        if not view:
            return 0
        size = os.preadv(self._fd, [view], self._position)
        self._advance(size)
        if self._hash is not None:
            self._hash.update(view[:size])
        return size

    def _advance(self, size: int) -> None:
        if not size:
            raise ImageError(f"{self._blob.what}: its blob file is shorter than on the first pass over it "
                             f"(modified in between?)")
        self._position += size

    def finish(self, stopped: Callable[[], bool]) -> None:
        if self._hash is None:
            self._blob.check(os.fstat(self._fd))
            return
        while self.read(INPUT_CHUNK):
            if stopped():
                return
        if "sha256:" + self._hash.hexdigest() != self._blob.digest:
            raise ImageError(f"{self._blob.what}: digest mismatch on the second read, expected "
                             f"{self._blob.digest} (the blob changed between the passes over it)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlobTarStream:
    """``read(n)``: ``n`` bytes of the blob's tar stream (gzip, zstd or plain), fewer only at
    its end.  Not thread-safe; :meth:`close` it."""

    def __init__(self, blob: LocalBlob):
        self._file = _BlobFile(blob)
        try:
            kind = sniff_compression(os.pread(self._file._fd, 4, blob.start))
            self._decode = open_decoder(kind, self._file, blob.what)
        except BaseException:
            self._file.close()
            raise

    def read(self, n: int) -> bytes:
        data = self._decode_some(n)
        while 0 < len(data) < n and (more := self._decode_some(n - len(data))):  # a plain blob's pread may be short
            data += more
        return data

    def _decode_some(self, n: int) -> bytes:
        try:
            return self._decode(n)
        except CorruptCompressedData as exc:
            raise ImageError(f"{exc}, on the second read (the blob changed between the passes over it?)") from None

    def finish(self, stopped: Callable[[], bool]) -> None:
        """Prove the blob unchanged since its first pass (ImageError if not; see the module
        docstring), unless ``stopped()`` turns true while the rest of an unsettled blob is hashed."""
        self._file.finish(stopped)

    def close(self) -> None:
        self._file.close()
