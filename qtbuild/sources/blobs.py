"""Verified blob streams: the only way image bytes reach the rest of qtbuild.

- :class:`VerifyingReader` wraps a stored blob and checks its size and SHA-256 against the
  descriptor when the stream reaches its end (and refuses bytes beyond the expected size).
- :func:`open_uncompressed` sniffs the compression of a layer blob (gzip, possibly multi-member;
  zstd, possibly multi-frame; or a plain tar), decompresses it as a stream
  (:mod:`qtbuild.sources.decoders`), caps the output against decompression bombs and checks the
  SHA-256 of the output against the layer's ``diff_id`` at the end.
- :func:`read_document` reads a small verified blob (manifest, index, config) into memory.
- :class:`BlobStore` / :class:`StoredLayer`: the small interface a source implements to serve
  blobs by descriptor, and the :class:`~qtbuild.sources.base.Layer` built on it.

Every stream here is read-only, non-seekable, reads its source in 1 MiB chunks and holds at most
a few chunks in memory.  ``read(n)`` returns exactly ``n`` bytes unless the stream ends, so the
streams can be handed to ``tarfile.open(fileobj=..., mode="r|")`` directly.  Every failure is an
:class:`~qtbuild.errors.ImageError` naming the blob.
"""

from __future__ import annotations

import abc
import io
import os
from collections.abc import Callable
from typing import BinaryIO, cast

from qtbuild.errors import ImageError
from qtbuild.formats.file_window import FileWindow
from qtbuild.sources.base import MAX_JSON_DOCUMENT, Descriptor, Layer
from qtbuild.sources.decoders import open_decoder
from qtbuild.sources.hash_behind import HashBehind
from qtbuild.sources.local_blob import LocalBlob

CHUNK = 1 << 20
#: Default cap on one layer's uncompressed size.
DEFAULT_MAX_BYTES = 64 << 30
#: Default cap on uncompressed:compressed ratio, enforced once the output passes the grace size.
DEFAULT_MAX_RATIO = 1000
DEFAULT_RATIO_GRACE = 100 << 20

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff_compression(head: bytes) -> str | None:
    """``"gzip"``, ``"zstd"`` or None (plain) from the first bytes of a blob."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return None


class _Stream(io.RawIOBase):
    """Base of the readers here: subclasses implement :meth:`_read_some`.

    ``_read_some(n)`` returns 1..n bytes, or ``b""`` exactly once the stream is finished (after
    any end-of-stream verification passed).  ``read(n)`` loops until ``n`` bytes or the end.
    """

    def readable(self) -> bool:
        return True

    @abc.abstractmethod
    def _read_some(self, n: int) -> bytes:
        ...

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        parts, got = [], 0
        while got < size:
            chunk = self._read_some(min(size - got, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def readall(self) -> bytes:
        parts = []
        while chunk := self._read_some(CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_exact_or_less(raw: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes from ``raw``, fewer only at its end (raw streams may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = raw.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class VerifyingReader(_Stream):
    """A stored blob checked against its descriptor.

    Contract: yields at most ``size`` bytes; when the underlying stream ends, raises ImageError
    unless exactly ``size`` bytes came and their SHA-256 is ``digest``; if the underlying stream
    has more than ``size`` bytes, raises ImageError instead of returning them.  Only after the
    check passed does ``read`` return ``b""``.  Closing it closes the underlying stream.
    """

    def __init__(self, raw: BinaryIO, *, size: int, digest: str, what: str):
        super().__init__()
        self._raw = raw
        self.expected_size = size
        self.expected_digest = digest
        self.what = what
        self._hash = HashBehind("sha256")
        self.bytes_read = 0
        self._verified = False

    def _read_some(self, n: int) -> bytes:
        if self._verified:
            return b""
        remaining = self.expected_size - self.bytes_read
        if remaining == 0:
            self._finish()
            return b""
        chunk = self._raw.read(min(n, remaining))
        if not chunk:
            raise ImageError(
                f"{self.what}: truncated, got {self.bytes_read} of {self.expected_size} bytes"
            )
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)  # HashBehind may still read it after we return it
        self._hash.update(chunk)
        self.bytes_read += len(chunk)
        return chunk

    def _finish(self) -> None:
        if self._raw.read(1):
            raise ImageError(f"{self.what}: size mismatch, blob is longer than the {self.expected_size} bytes declared")
        actual = "sha256:" + self._hash.hexdigest()
        self._hash.close()
        if actual != self.expected_digest:
            raise ImageError(f"{self.what}: digest mismatch, expected {self.expected_digest}, got {actual}")
        self._verified = True

    def close(self) -> None:
        if not self.closed:
            self._hash.close()
            self._raw.close()
        super().close()


class _CompressedInput(io.RawIOBase):
    """The compressed side of a :class:`_Decompressed`: the sniffed head, then ``raw``.

    ``bytes_read`` counts what was taken from ``raw`` (for the ratio cap).  ``readinto`` (how
    the gzip reader refills its own buffer) copies from the last chunk read, which stays an
    immutable ``bytes``: a :class:`VerifyingReader` may still be hashing it on its worker.
    """

    def __init__(self, raw: BinaryIO, head: bytes):
        super().__init__()
        self._raw = raw
        self._chunk, self._offset = head, 0  # the bytes of self._chunk before the offset are handed out
        self.bytes_read = len(head)

    def readable(self) -> bool:
        return True

    def _fetch(self, n: int) -> None:
        if self._offset == len(self._chunk):
            self._chunk, self._offset = self._raw.read(n), 0
            self.bytes_read += len(self._chunk)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes: the rest of the last chunk, or a new chunk returned whole (no copy)."""
        if size < 0:
            return self.readall()
        self._fetch(size)
        chunk, start = self._chunk, self._offset
        self._offset = min(len(chunk), start + size)
        return chunk if start == 0 and self._offset == len(chunk) else chunk[start:self._offset]

    def readinto(self, buffer) -> int:
        self._fetch(CHUNK)
        start = self._offset
        size = min(len(buffer), len(self._chunk) - start)
        buffer[:size] = memoryview(self._chunk)[start:start + size]
        self._offset = start + size
        return size


class _Decompressed(_Stream):
    """Decompressed output of ``raw`` with bomb caps and a final SHA-256 check (see open_uncompressed)."""

    def __init__(self, raw: BinaryIO, head: bytes, *, diff_id: str | None, what: str,
                 max_bytes: int, max_ratio: float, ratio_grace: int):
        super().__init__()
        self._raw = raw
        self._input = _CompressedInput(raw, head)
        self._diff_id = diff_id
        self._what = what
        self._max_bytes = max_bytes
        self._max_ratio = max_ratio
        self._ratio_grace = ratio_grace
        self._hash = HashBehind("sha256") if diff_id else None
        self.uncompressed_bytes = 0
        self._done = False
        self._decode = open_decoder(sniff_compression(head), self._input, what)

    @property
    def compressed_bytes(self) -> int:
        return self._input.bytes_read

    def _read_some(self, n: int) -> bytes:
        if self._done:
            return b""
        chunk = self._decode(min(n, CHUNK))
        if not chunk:
            self._finish()
            return b""
        self.uncompressed_bytes += len(chunk)
        self._check_caps()
        if self._hash is not None:
            self._hash.update(chunk)
        return chunk

    def _check_caps(self) -> None:
        out = self.uncompressed_bytes
        if out > self._max_bytes:
            raise ImageError(f"{self._what}: decompression bomb? uncompressed size exceeds {self._max_bytes} bytes")
        if out > self._ratio_grace and out > self._max_ratio * max(self.compressed_bytes, 1):
            raise ImageError(
                f"{self._what}: decompression bomb? {out} bytes from {self.compressed_bytes} compressed "
                f"(ratio over {self._max_ratio}:1)"
            )

    def _finish(self) -> None:
        if self._input.read(1):  # decoders stop at the end of the input; anything left is an error
            raise ImageError(f"{self._what}: unexpected data after the end of the compressed stream")
        if self._hash is not None:
            actual = "sha256:" + self._hash.hexdigest()
            self._hash.close()
            if actual != self._diff_id:
                raise ImageError(
                    f"{self._what}: diff_id mismatch, config says {self._diff_id}, layer content is {actual}"
                )
        self._done = True

    def close(self) -> None:
        if not self.closed:
            if self._hash is not None:
                self._hash.close()
            self._raw.close()
        super().close()


def open_uncompressed(raw: BinaryIO, *, diff_id: str | None, what: str,
                      max_bytes: int = DEFAULT_MAX_BYTES, max_ratio: float = DEFAULT_MAX_RATIO,
                      ratio_grace: int = DEFAULT_RATIO_GRACE) -> BinaryIO:
    """The decompressed content of the blob stream ``raw`` (which this stream owns and closes).

    Compression is sniffed from the first bytes: gzip (all members), zstd (all frames) or none.
    Raises ImageError, naming ``what``, when the output exceeds ``max_bytes``, when it exceeds
    ``max_ratio`` times the compressed input after the first ``ratio_grace`` bytes, on corrupt
    or trailing data, and at the end if the SHA-256 of the output is not ``diff_id`` (None skips
    that check).  Errors of ``raw`` itself (e.g. a :class:`VerifyingReader`) propagate.
    """
    head = _read_exact_or_less(raw, 4)
    skip_hash = (
        sniff_compression(head) is None
        and isinstance(raw, VerifyingReader)
        and raw.expected_digest == diff_id
    )  # a plain blob whose digest is its diff_id: the VerifyingReader already checks those bytes
    decompressed = _Decompressed(raw, head, diff_id=None if skip_hash else diff_id, what=what,
                                 max_bytes=max_bytes, max_ratio=max_ratio, ratio_grace=ratio_grace)
    return cast(BinaryIO, decompressed)  # a RawIOBase: it reads as BinaryIO


def read_document(raw: BinaryIO, descriptor: Descriptor, what: str) -> bytes:
    """Read a small blob (manifest, index, config) whole, verified against ``descriptor``.

    The descriptor's size is checked against MAX_JSON_DOCUMENT before anything is read.
    """
    if descriptor.size > MAX_JSON_DOCUMENT:
        raise ImageError(f"{what} is {descriptor.size} bytes; refusing documents over {MAX_JSON_DOCUMENT} bytes")
    with VerifyingReader(raw, size=descriptor.size, digest=descriptor.digest, what=what) as reader:
        return reader.read()


def verify_bytes(data: bytes, descriptor: Descriptor, what: str) -> bytes:
    """Return ``data`` if its size and SHA-256 match ``descriptor``, else raise ImageError."""
    return read_document(io.BytesIO(data), descriptor, what)


def open_file_range(path: str | os.PathLike, start: int, size: int) -> BinaryIO:
    """Bytes ``[start, start + size)`` of a local file, as a buffered read-only stream with its own descriptor."""
    return io.BufferedReader(FileWindow.of_path(path, start, size))


RangeOpener = Callable[[int, int], BinaryIO]


class _SharedDescriptor:
    """One read-only descriptor on a file, closed when the last window and opener drop it.

    The windows of a range opener share it: an ``open(2)`` per file of the image cost as much as
    reading small files.  Windows read it with ``preadv`` (no shared offset), from any thread.
    """

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed in __del__, when no window needs it

    def fileno(self) -> int:
        return self._file.fileno()

    def __del__(self):
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


def file_range_opener(path: str | os.PathLike, start: int, size: int) -> RangeOpener:
    """A ``(offset, length) -> stream`` callable over the blob stored at ``[start, start+size)`` of
    ``path``; ranges outside the blob raise ImageError.  Its streams share one descriptor."""
    shared = _SharedDescriptor(path)

    def open_range(offset: int, length: int) -> BinaryIO:
        if offset < 0 or length < 0 or offset + length > size:
            raise ImageError(f"range {offset}+{length} lies outside a blob of {size} bytes")
        return FileWindow.buffered(shared, start + offset, length)

    return open_range


class BlobStore(abc.ABC):
    """Where a source keeps its blobs.  Implementations only locate bytes; callers verify them."""

    @abc.abstractmethod
    def open_raw(self, descriptor: Descriptor) -> BinaryIO:
        """The stored bytes of ``descriptor``'s blob, unverified (ImageError if it is missing)."""

    def local_range(self, descriptor: Descriptor) -> tuple[str, int, int] | None:
        """``(path, start, size)`` if the blob lies contiguously in a local file, else None."""
        return None

    def has(self, descriptor: Descriptor) -> bool:
        """Whether the blob is there at all (archives and layouts may omit other platforms')."""
        return True

    def open_verified(self, descriptor: Descriptor, what: str) -> VerifyingReader:
        return VerifyingReader(self.open_raw(descriptor), size=descriptor.size,
                               digest=descriptor.digest, what=what)

    def read_document(self, descriptor: Descriptor, what: str) -> bytes:
        return read_document(self.open_raw(descriptor), descriptor, what)


class StoredLayer(Layer):
    """A layer whose blob lives in a :class:`BlobStore`."""

    def __init__(self, store: BlobStore, descriptor: Descriptor, diff_id: str):
        self._store = store
        self.descriptor = descriptor
        self.diff_id = diff_id

    def open_blob(self) -> BinaryIO:
        return cast(BinaryIO, self._store.open_verified(self.descriptor, f"layer {self.descriptor.digest}"))

    def open_uncompressed(self) -> BinaryIO:
        return open_uncompressed(self.open_blob(), diff_id=self.diff_id, what=f"layer {self.descriptor.digest}")

    def range_opener(self) -> RangeOpener | None:
        """Random access for a blob stored uncompressed in a local file (sniffed, not trusted
        from the media type).  Reads through it are *not* re-verified: use it only for a layer
        that has been read to the end through :meth:`open_uncompressed` (which verifies it)."""
        location = self._store.local_range(self.descriptor)
        if location is None:
            return None
        path, start, size = location
        if size != self.descriptor.size:
            return None
        with open_file_range(path, start, min(size, 4)) as head:
            if sniff_compression(head.read()) is not None:
                return None
        return file_range_opener(path, start, size)

    def reread_opener(self) -> LocalBlob | None:
        """See :meth:`Layer.reread_opener`: for blobs the store keeps in a local file (a
        :class:`~qtbuild.sources.local_blob.LocalBlob`: stamped now, before a first pass reads it)."""
        location = self._store.local_range(self.descriptor)
        if location is None:
            return None
        what = f"layer {self.descriptor.digest}"
        path, start, _ = location
        return LocalBlob(path, start, self.descriptor.size, self.descriptor.digest, what,
                         lambda: open_uncompressed(self.open_blob(), diff_id=None, what=what))

    def __repr__(self) -> str:
        return f"StoredLayer({self.descriptor.digest}, diff_id={self.diff_id})"
