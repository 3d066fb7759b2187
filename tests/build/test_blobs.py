"""qtbuild.sources.blobs: verified blob streams and bounded decompression."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import pytest
import zstandard

from qtbuild.errors import ImageError
from qtbuild.sources.base import MAX_JSON_DOCUMENT, Descriptor
from qtbuild.sources.blobs import (
    CHUNK,
    VerifyingReader,
    file_range_opener,
    open_uncompressed,
    read_document,
    verify_bytes,
)

from helpers.imagefactory import compress, file, make_layer, sha256_digest

# Compressible but not trivial: 3 MiB spans several 1 MiB chunks on both sides of a decoder.
DATA = (os.urandom(1 << 20) + bytes(1 << 20)) + b"tail" * (1 << 18)


def verifying(data: bytes, *, size: int | None = None, digest: str | None = None) -> VerifyingReader:
    return VerifyingReader(io.BytesIO(data), size=len(data) if size is None else size,
                           digest=digest or sha256_digest(data), what="blob X")


def drain(stream) -> bytes:
    with stream:
        return stream.read()


# -- VerifyingReader --------------------------------------------------------------------------

def test_verifying_reader_passes_exact_content():
    assert drain(verifying(DATA)) == DATA


def test_verifying_reader_read_n_returns_full_chunks():
    class Trickle(io.RawIOBase):  # returns one byte per read, like a slow socket
        def __init__(self, data):
            self._data = io.BytesIO(data)

        def readable(self):
            return True

        def read(self, n=-1):
            return self._data.read(1)

    reader = VerifyingReader(Trickle(b"abcdef"), size=6, digest=sha256_digest(b"abcdef"), what="x")
    assert reader.read(4) == b"abcd"
    assert reader.read(4) == b"ef"
    assert reader.read(4) == b""


def test_verifying_reader_digest_mismatch():
    with pytest.raises(ImageError, match="blob X: digest mismatch"):
        drain(verifying(DATA, digest=sha256_digest(b"other")))


def test_verifying_reader_truncated():
    with pytest.raises(ImageError, match=r"truncated, got 10 of 11 bytes"):
        drain(verifying(b"0123456789", size=11))


def test_verifying_reader_refuses_bytes_beyond_declared_size():
    reader = verifying(b"0123456789", size=4, digest=sha256_digest(b"0123"))
    assert reader.read(4) == b"0123"
    with pytest.raises(ImageError, match="size mismatch, blob is longer than the 4 bytes"):
        reader.read(100)


def test_verifying_reader_only_reports_eof_after_the_check():
    reader = verifying(b"abc", digest=sha256_digest(b"abd"))
    assert reader.read(3) == b"abc"
    with pytest.raises(ImageError, match="digest mismatch"):
        reader.read(1)


def test_read_document_refuses_oversized_descriptor_before_reading():
    class Exploding(io.RawIOBase):
        def read(self, n=-1):
            raise AssertionError("must not be read")

    d = Descriptor("application/json", "sha256:" + "0" * 64, MAX_JSON_DOCUMENT + 1)
    with pytest.raises(ImageError, match="refusing documents over"):
        read_document(Exploding(), d, "manifest M")


def test_verify_bytes():
    d = Descriptor("x", sha256_digest(b"{}"), 2)
    assert verify_bytes(b"{}", d, "doc") == b"{}"
    with pytest.raises(ImageError, match="doc: digest mismatch"):
        verify_bytes(b"[]", d, "doc")


# -- open_uncompressed ------------------------------------------------------------------------

@pytest.mark.parametrize("compression,parts", [(None, 1), ("gzip", 1), ("gzip", 7), ("zstd", 1), ("zstd", 5)])
def test_decompresses_all_members_and_frames(compression, parts):
    blob = compress(DATA, compression, parts=parts)
    out = drain(open_uncompressed(verifying(blob), diff_id=sha256_digest(DATA), what="layer L"))
    assert out == DATA


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_multi_member_is_not_cut_after_the_first(compression):
    # stdlib zlib.decompressobj / zstandard.decompress stop after the first member / frame:
    blob = compress(DATA, compression, parts=3)
    first_only = (zlib_first_member(blob) if compression == "gzip"
                  else zstandard.ZstdDecompressor().decompress(blob, max_output_size=len(DATA)))
    assert len(first_only) < len(DATA)
    assert drain(open_uncompressed(io.BytesIO(blob), diff_id=sha256_digest(DATA), what="L")) == DATA


def zlib_first_member(blob: bytes) -> bytes:
    import zlib

    return zlib.decompressobj(31).decompress(blob)


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_diff_id_mismatch(compression):
    blob = compress(DATA, compression, parts=2)
    with pytest.raises(ImageError, match="layer L: diff_id mismatch"):
        drain(open_uncompressed(verifying(blob), diff_id=sha256_digest(b"other"), what="layer L"))


def test_plain_blob_with_digest_equal_to_diff_id_is_still_verified():
    corrupt = b"X" + DATA[1:]
    raw = VerifyingReader(io.BytesIO(corrupt), size=len(DATA), digest=sha256_digest(DATA), what="blob B")
    with pytest.raises(ImageError, match="blob B: digest mismatch"):
        drain(open_uncompressed(raw, diff_id=sha256_digest(DATA), what="layer L"))


def test_blob_errors_propagate_through_the_decompressor():
    blob = compress(DATA, "gzip")
    raw = verifying(blob, digest=sha256_digest(b"not it"))
    with pytest.raises(ImageError, match="blob X: digest mismatch"):
        drain(open_uncompressed(raw, diff_id=sha256_digest(DATA), what="layer L"))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_compressed_stream(compression):
    blob = compress(DATA, compression)[:-9]
    with pytest.raises(ImageError, match="layer L: (truncated gzip|diff_id mismatch)"):
        drain(open_uncompressed(io.BytesIO(blob), diff_id=sha256_digest(DATA), what="layer L"))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("garbage", [b"garbage!", b"garbage after the stream"])
def test_trailing_garbage_is_refused(compression, garbage):
    # isal's gzip reader reads a member header as 10 bytes: fewer look like a truncated one
    expected = "unexpected data after" if len(garbage) >= 10 else "truncated gzip stream .or followed by fewer"
    blob = compress(DATA, compression) + garbage
    with pytest.raises(ImageError, match=f"layer L: ({expected}|corrupt zstd)"):
        drain(open_uncompressed(io.BytesIO(blob), diff_id=sha256_digest(DATA), what="layer L"))


def test_corrupt_gzip_data():
    blob = bytearray(compress(DATA, "gzip"))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(ImageError, match="layer L: corrupt gzip data"):
        drain(open_uncompressed(io.BytesIO(bytes(blob)), diff_id=None, what="layer L"))


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_total_size_cap(compression):
    blob = compress(DATA, compression)
    with pytest.raises(ImageError, match="decompression bomb.*exceeds 1000000 bytes"):
        drain(open_uncompressed(io.BytesIO(blob), diff_id=None, what="L", max_bytes=1_000_000))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_ratio_cap(compression):
    zeros = bytes(8 << 20)
    blob = compress(zeros, compression)
    assert len(zeros) / len(blob) > 100
    with pytest.raises(ImageError, match=r"decompression bomb.*ratio over 100:1"):
        drain(open_uncompressed(io.BytesIO(blob), diff_id=None, what="L", max_ratio=100, ratio_grace=1 << 20))
    # the same blob passes with the default caps
    assert drain(open_uncompressed(io.BytesIO(blob), diff_id=sha256_digest(zeros), what="L")) == zeros


def test_output_is_produced_in_bounded_chunks():
    zeros = bytes(32 << 20)
    stream = open_uncompressed(io.BytesIO(compress(zeros, "gzip")), diff_id=None, what="L")
    sizes = []
    while chunk := stream._read_some(1 << 30):  # ask for far more than a chunk
        sizes.append(len(chunk))
    assert max(sizes) <= CHUNK and sum(sizes) == len(zeros)


def test_empty_blob_and_empty_members():
    empty_tar_digest = sha256_digest(b"")
    assert drain(open_uncompressed(io.BytesIO(b""), diff_id=empty_tar_digest, what="L")) == b""
    two_empty = gzip.compress(b"", mtime=0) * 2
    assert drain(open_uncompressed(io.BytesIO(two_empty), diff_id=empty_tar_digest, what="L")) == b""


def test_stream_works_with_tarfile_stream_mode():
    layer = make_layer([file(f"f{i}", os.urandom(3000)) for i in range(50)])
    stream = open_uncompressed(io.BytesIO(compress(layer, "zstd", parts=4)), diff_id=sha256_digest(layer), what="L")
    with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        names = [m.name for m in tar]
        assert stream.read() == b""  # drained: diff_id checked
    assert names == [f"f{i}" for i in range(50)]


def test_file_range_opener_bounds(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"xxHELLOyy")
    opener = file_range_opener(path, 2, 5)
    with opener(1, 3) as f:
        assert f.read() == b"ELL"
    with pytest.raises(ImageError, match="outside a blob of 5 bytes"):
        opener(3, 3)


def test_the_image_interface_does_not_import_the_blob_machinery():
    """qtbuild.sources.base ↔ qtbuild.sources.blobs was an import cycle; base is the lower module."""
    import subprocess
    import sys

    code = "import sys, qtbuild.sources.base; print('qtbuild.sources.blobs' in sys.modules)"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from qtbuild.sources.base import Layer

    assert "open_uncompressed" in Layer.__abstractmethods__
