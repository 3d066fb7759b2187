"""Streaming decoders of compressed layer blobs (gzip, zstd): the one way qtbuild inflates a layer.

Both passes over a layer read through :func:`open_decoder`: the first pass
(:func:`qtbuild.sources.blobs.open_uncompressed`, which adds the decompression-bomb caps and the
diff_id check) and ``measure``'s second pass over a local blob (:mod:`qtbuild.convert.reinflate`).

A decoder is a callable ``decode(n)`` returning exactly ``n`` bytes of output, fewer only at the end
of the stream (``b""`` then).  It reads its compressed input from a :class:`CompressedSource`.

- gzip (every member) goes through python-isal's ``IGzipFile``.  Its reader is written in C:
  it keeps the compressed input in one buffer of its own, refilled with the source's
  ``readinto`` (no copy of the leftover input per call, no new input buffer per call), fills the
  caller's ``n`` bytes across input refills and member boundaries with the GIL released, and
  checks every member's CRC-32 and length.  A member header (its name and comment end only at a
  zero byte) may not outgrow that buffer (512 KiB): python-isal 1.9.1 refuses it instead of
  growing the buffer without bound (python-isal issue 250).  On the benchmark image it inflates the three gzip
  layers in 0.62 CPU-s where ``decompressobj`` with ``max_length`` took 0.86 (copies of the
  unconsumed input and a fresh buffer for each).  Without isal the standard library's
  ``GzipFile`` (zlib) does the same, more slowly.
- zstd (every frame) goes through python-zstandard's bounded stream reader.
- ``None`` (a plain tar) is the source's own ``read``.

What follows a gzip member must be another member.  Other data is refused: ``unexpected data after
the end of the gzip stream`` (isal's reader looks at 10 bytes at once, so with it fewer than 10
bytes of other data at the very end read as a truncated member header).  Zero bytes after a
member are skipped as padding, as gzip(1), zlib's ``gzread`` and both readers here do (Go's
``compress/gzip`` refuses them); the output, and so the diff_id that is checked, is unchanged.

Every failure of the compressed data is a :class:`CorruptCompressedData` (an
:class:`~qtbuild.errors.ImageError`) naming ``what``; errors of the source itself propagate as
they are.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from typing import BinaryIO, Protocol, cast

try:
    from isal import isal_zlib as _inflate
    from isal.igzip import IGzipFile as GzipReader
except ImportError:  # pragma: no cover -- platforms without isal wheels: zlib, identical output
    _inflate = zlib  # type: ignore[misc]
    from gzip import GzipFile as GzipReader  # type: ignore[assignment]

from qtbuild.errors import ImageError

#: How much compressed input a zstd decoder asks its source for at a time.
INPUT_CHUNK = 1 << 20

#: ``decode(n)``: up to ``n`` bytes of output, exactly ``n`` unless the stream ends; ``b""`` at its end.
Decode = Callable[[int], bytes]

#: OverflowError: isal's reader refuses a member header larger than its buffer.
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (zlib.error, cast(type[BaseException], _inflate.error),
                                                     OverflowError)


class CompressedSource(Protocol):
    """Where a decoder reads compressed bytes: ``read(n)`` returns 1..n bytes, ``b""`` at the end;
    ``readinto(buffer)`` fills a prefix of ``buffer`` and returns its length, 0 at the end."""

    def read(self, n: int = -1, /) -> bytes: ...

    def readinto(self, buffer, /) -> int: ...


class CorruptCompressedData(ImageError):
    """A layer's compressed stream is corrupt, truncated or followed by other data."""


def open_decoder(kind: str | None, source: CompressedSource, what: str) -> Decode:
    """The decoder of ``kind`` (``"gzip"``, ``"zstd"`` or None for plain bytes) over ``source``."""
    if kind == "gzip":
        return gzip_decoder(source, what)
    if kind == "zstd":
        return zstd_decoder(source, what)
    return source.read


def gzip_decoder(source: CompressedSource, what: str) -> Decode:
    """gzip, every member, through isal's C reader (see the module docstring for what it refuses)."""
    reader = GzipReader(fileobj=cast(BinaryIO, source), mode="rb")

    def decode(n: int) -> bytes:
        try:
            return reader.read(n)
        except gzip.BadGzipFile as exc:
            if str(exc).startswith("Not a gzipped file"):  # the bytes after a member are not a member
                raise CorruptCompressedData(f"{what}: unexpected data after the end of the gzip stream") from None
            raise CorruptCompressedData(f"{what}: corrupt gzip data: {exc}") from None
        except EOFError:
            raise CorruptCompressedData(f"{what}: truncated gzip stream (or followed by fewer than 10 bytes "
                                        f"that are not a gzip member)") from None
        except _INFLATE_ERRORS as exc:
            raise CorruptCompressedData(f"{what}: corrupt gzip data: {exc}") from None

    return decode


def zstd_decoder(source: CompressedSource, what: str) -> Decode:
    """zstd, every frame, through python-zstandard's bounded stream reader."""
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(BinaryIO, source), read_size=INPUT_CHUNK, read_across_frames=True, closefd=False
    )

    def decode(n: int) -> bytes:
        parts: list[bytes] = []
        wanted = n
        try:
            while wanted and (data := reader.read(wanted)):  # a read may stop at a frame's end
                parts.append(data)
                wanted -= len(data)
        except zstandard.ZstdError as exc:
            raise CorruptCompressedData(f"{what}: corrupt zstd data: {exc}") from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    return decode
