"""The tar stream of a local layer blob, decompressed a second time, as cheaply as that can be trusted.

The first pass over a layer verified its blob's SHA-256.  A second decompression of the same file
(:mod:`qtbuild.convert.reread`) needs only proof that the file did not change in between:

* a *settled* blob (:class:`~qtbuild.sources.local_blob.LocalBlob`) is proven unchanged by its
  file identity: checked on the descriptor read here when it is opened and in :meth:`finish`
  (and by the re-reader on the path at the very end).  Nothing is hashed, and reading may stop
  anywhere: :meth:`finish` does not read the rest;
* any other blob is hashed again as it is read; :meth:`finish` reads (without decompressing)
  what is left of it and compares the digest.

The compressed bytes are read with ``pread`` in :data:`INPUT_CHUNK` pieces: smaller than the
decompressed chunks asked for, so a piece is usually consumed whole by one inflate call (a
leftover input tail is copied at every call).  Decoding (gzip members, zstd frames, corrupt data
as ImageError) is :mod:`qtbuild.sources.blobs`'s.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from qtbuild.errors import ImageError
from qtbuild.sources.blobs import _GzipDecoder, _zstd_decoder, sniff_compression
from qtbuild.sources.local_blob import LocalBlob

INPUT_CHUNK = 256 * 1024


class BlobTarStream:
    """``read(n)``: 1..n bytes of the blob's tar stream (gzip, zstd or plain), ``b""`` at the end.
    Not thread-safe; :meth:`close` it."""

    def __init__(self, blob: LocalBlob):
        self._blob = blob
        try:
            self._fd = os.open(blob.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ImageError(f"{blob.what}: cannot open {blob.path}: {exc.strerror or exc}") from None
        self._position, self._end = blob.start, blob.start + blob.size
        self._hash = None if blob.settled else hashlib.sha256()
        try:
            if blob.settled:
                blob.check(os.fstat(self._fd))
            kind = sniff_compression(os.pread(self._fd, 4, self._position))
        except BaseException:
            os.close(self._fd)
            raise
        self._decode: Callable[[int], bytes] = self._read_input  # a plain tar
        if kind == "gzip":
            self._decode = _GzipDecoder(self._read_input, blob.what).read
        elif kind == "zstd":
            self._decode = _zstd_decoder(self._read_input, blob.what)

    def _read_input(self, n: int) -> bytes:
        size = min(n, INPUT_CHUNK, self._end - self._position)
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

    def read(self, n: int) -> bytes:
        return self._decode(n)

    def finish(self) -> None:
        """Prove the blob unchanged since its first pass (ImageError if not); see the module docstring."""
        if self._hash is None:
            self._blob.check(os.fstat(self._fd))
            return
        while self._read_input(INPUT_CHUNK):
            pass
        if "sha256:" + self._hash.hexdigest() != self._blob.digest:
            raise ImageError(f"{self._blob.what}: digest mismatch on the second read, expected "
                             f"{self._blob.digest} (the blob changed between the passes over it)")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

