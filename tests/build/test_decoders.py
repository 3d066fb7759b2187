"""qtbuild.sources.decoders: the one gzip / zstd decoder of both passes over a layer.

The gzip tests run with isal's reader and with the standard library's (the fallback where isal
has no wheel): both must give the same output and the same one-line errors.
"""

from __future__ import annotations

import gzip
import io
import os

import pytest

from qtbuild.errors import ImageError
from qtbuild.sources import decoders
from qtbuild.sources.decoders import CorruptCompressedData, open_decoder

from helpers.imagefactory import compress

DATA = os.urandom(300_000) + bytes(700_000) + b"tail" * 100_000


@pytest.fixture(params=["isal", "stdlib"])
def reader(request, monkeypatch):
    """Which gzip reader the decoders use: isal's (the dependency) or the standard library's."""
    if request.param == "stdlib":
        monkeypatch.setattr(decoders, "GzipReader", gzip.GzipFile)
    else:
        from isal.igzip import IGzipFile

        assert decoders.GzipReader is IGzipFile
    return request.param


def decode_all(blob: bytes, kind: str | None = "gzip", n: int = 1 << 16) -> list[bytes]:
    decode = open_decoder(kind, io.BytesIO(blob), "layer L")
    chunks = []
    while chunk := decode(n):
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("kind,parts", [("gzip", 1), ("gzip", 5), ("zstd", 1), ("zstd", 5), (None, 1)])
def test_reads_are_exactly_n_bytes_across_members_and_frames(reader, kind, parts):
    chunks = decode_all(compress(DATA, kind, parts=parts), kind, n=100_000)
    assert b"".join(chunks) == DATA
    assert [len(c) for c in chunks[:-1]] == [100_000] * (len(chunks) - 1)


def test_empty_members(reader):
    assert decode_all(gzip.compress(b"", mtime=0) * 3 + gzip.compress(b"x", mtime=0)) == [b"x"]


def test_data_after_the_last_member_is_refused(reader):
    with pytest.raises(CorruptCompressedData, match=r"^layer L: unexpected data after the end of the gzip stream$"):
        decode_all(compress(DATA, "gzip") + b"not a gzip member at all")


def test_data_between_members_is_refused(reader):
    blob = compress(DATA, "gzip") + b"0123456789abcdef" + compress(b"x", "gzip")
    with pytest.raises(CorruptCompressedData, match="unexpected data after the end of the gzip stream"):
        decode_all(blob)


def test_a_few_bytes_after_the_last_member_are_refused(reader):
    # the standard library sees 2 bytes that are not the magic; isal wants a whole 10-byte header
    with pytest.raises(CorruptCompressedData,
                       match="unexpected data after|truncated gzip stream .or followed by fewer than 10 bytes"):
        decode_all(compress(DATA, "gzip") + b"junk")


def test_zero_padding_after_a_member_is_skipped(reader):
    """gzip(1), zlib's gzread and both readers skip zero bytes after a member (tape padding)."""
    blob = compress(DATA, "gzip") + bytes(5) + compress(b"x", "gzip") + bytes(600)
    assert b"".join(decode_all(blob)) == DATA + b"x"


@pytest.mark.parametrize("cut", [9, 100, len(compress(DATA, "gzip")) // 2])
def test_truncated_stream(reader, cut):
    blob = compress(DATA, "gzip", parts=2)[:-cut]
    with pytest.raises(CorruptCompressedData, match=r"^layer L: truncated gzip stream"):
        decode_all(blob)


def test_corrupt_crc(reader):
    blob = bytearray(compress(DATA, "gzip"))
    blob[-8] ^= 1  # the CRC-32 in the trailer: every byte inflates, the check fails
    with pytest.raises(CorruptCompressedData, match=r"^layer L: corrupt gzip data: .*(CRC|crc)"):
        decode_all(bytes(blob))


def test_corrupt_deflate_data(reader):
    blob = bytearray(compress(DATA, "gzip"))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(CorruptCompressedData, match=r"^layer L: corrupt gzip data"):
        decode_all(bytes(blob))


def test_the_error_is_an_image_error_without_a_chained_traceback(reader):
    with pytest.raises(ImageError) as caught:
        decode_all(compress(DATA, "gzip")[:-100])
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_errors_of_the_source_propagate_unchanged(reader):
    class Failing(io.RawIOBase):
        def __init__(self, data):
            self._data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            n = self._data.readinto(buffer)
            if not n:
                raise ImageError("blob X: digest mismatch")
            return n

    decode = open_decoder("gzip", Failing(compress(DATA, "gzip")), "layer L")
    with pytest.raises(ImageError, match="^blob X: digest mismatch$"):
        while decode(1 << 20):
            pass


def test_isal_reader_refills_its_own_buffer_with_readinto():
    """The copy this replaced: decompressobj(...).decompress(data, n) copied the unconsumed rest
    of ``data`` into a new ``unconsumed_tail`` on every call.  isal's reader keeps the compressed
    input in its own buffer and refills it in place through ``readinto`` (``read`` is never used)."""

    class ReadintoOnly(io.RawIOBase):
        def __init__(self, data):
            self._data = io.BytesIO(data)
            self.sizes: list[int] = []

        def readable(self):
            return True

        def read(self, n=-1):
            raise AssertionError("the gzip reader must refill its buffer with readinto")

        def readinto(self, buffer):
            self.sizes.append(len(buffer))
            return self._data.readinto(buffer)

    source = ReadintoOnly(compress(DATA, "gzip", parts=3))
    decode = open_decoder("gzip", source, "layer L")
    out = []
    while chunk := decode(4096):  # many small reads: the input is still refilled in big pieces
        out.append(chunk)
    assert b"".join(out) == DATA
    assert len(source.sizes) < 10 and min(source.sizes[:1]) >= 64 * 1024


def test_an_endless_member_header_is_refused_in_bounded_memory():
    """FNAME ends only at a zero byte: isal's reader refuses a header larger than its buffer
    instead of growing it with the blob (python-isal issue 250)."""
    import resource

    blob = b"\x1f\x8b\x08\x08" + bytes(6) + b"a" * (64 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CorruptCompressedData, match="^layer L: corrupt gzip data: .*header"):
        decode_all(blob)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 << 10  # KiB: far below the 64 MiB


def test_zstd_corrupt():
    blob = compress(DATA, "zstd") + b"garbage!"
    with pytest.raises(CorruptCompressedData, match="^layer L: corrupt zstd data"):
        decode_all(blob, "zstd")
