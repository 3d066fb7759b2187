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
slice it.  gzip is read through isal's ``GzipFile`` (its C reader keeps the compressed input in
its own buffer: reads of any size cost no copy of it; the standard library's without isal); zstd
through :mod:`qtbuild.sources.blobs`'s decoder.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from typing import cast

try:
    from isal import isal_zlib as _inflate
    from isal.igzip import IGzipFile as GzipFile
except ImportError:  # pragma: no cover -- platforms without isal wheels
    import zlib as _inflate  # type: ignore[no-redef]
    from gzip import GzipFile  # type: ignore[assignment]

from qtbuild.errors import ImageError
from qtbuild.sources.blobs import _zstd_decoder, sniff_compression
from qtbuild.sources.local_blob import LocalBlob

INPUT_CHUNK = 256 * 1024
_GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error,
                                                  cast(type[BaseException], _inflate.error))


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
        if not chunk:
            raise ImageError(f"{self._blob.what}: its blob file is shorter than on the first pass over it "
                             f"(modified in between?)")
        self._position += len(chunk)
        if self._hash is not None:
            self._hash.update(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        chunk = self.read(len(view))
        view[:len(chunk)] = chunk
        return len(chunk)

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
        self._what = blob.what
        self._file = _BlobFile(blob)
        self._gzip: GzipFile | None = None
        try:
            kind = sniff_compression(os.pread(self._file._fd, 4, blob.start))
            if kind == "gzip":
                self._gzip = GzipFile(fileobj=self._file, mode="rb")
                self._decode: Callable[[int], bytes] = self._gzip.read
            elif kind == "zstd":
                self._decode = _zstd_decoder(lambda n: self._file.read(min(n, INPUT_CHUNK)), blob.what)
            else:
                self._decode = self._file.read
        except BaseException:
            self._file.close()
            raise

    def read(self, n: int) -> bytes:
        try:
            data = self._decode(n)
        except _GZIP_ERRORS as exc:
            raise ImageError(f"{self._what}: corrupt gzip data on the second read: {exc} "
                             f"(the blob changed between the passes over it?)") from None
        while 0 < len(data) < n and (more := self._decode(n - len(data))):  # zstd may stop at a frame
            data += more
        return data

    def finish(self, stopped: Callable[[], bool]) -> None:
        """Prove the blob unchanged since its first pass (ImageError if not; see the module
        docstring), unless ``stopped()`` turns true while the rest of an unsettled blob is hashed."""
        self._file.finish(stopped)

    def close(self) -> None:
        self._file.close()
