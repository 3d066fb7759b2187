"""qtbuild.convert.reinflate: the second read of a local gzip blob, through the first pass's decoder."""

from __future__ import annotations

import gzip
import hashlib
import io
import os

import pytest

from qtbuild.convert.reinflate import BlobTarStream
from qtbuild.errors import ImageError
from qtbuild.sources import local_blob
from qtbuild.sources.local_blob import LocalBlob

TAR = os.urandom(1 << 20) + bytes(2 << 20)


def _stamped(path, blob: bytes, digest_of: bytes) -> LocalBlob:
    """``blob`` stored at offset 512 of ``path``; its digest taken from ``digest_of``."""
    path.write_bytes(b"h" * 512 + blob)
    digest = "sha256:" + hashlib.sha256(digest_of).hexdigest()
    return LocalBlob(str(path), 512, len(blob), digest, "layer 1", lambda: io.BytesIO(TAR))


def test_an_unsettled_blob_is_hashed_as_the_gzip_reader_fills_its_buffer(tmp_path, monkeypatch):
    """The gzip reader refills its buffer through readinto (the file read straight into it): what
    it reads is still hashed.  Only the header's OS byte differs here, so every byte inflates the
    same and only the digest can tell."""
    monkeypatch.setattr(local_blob, "SETTLE_NS", 10**12)  # never settled: hashed again
    first = gzip.compress(TAR, mtime=0)
    changed = bytearray(first)
    changed[9] ^= 0x01  # OS byte of the member header
    stream = BlobTarStream(_stamped(tmp_path / "blob", bytes(changed), digest_of=first))
    try:
        assert stream.read(len(TAR) + 1) == TAR
        with pytest.raises(ImageError, match="layer 1: digest mismatch on the second read"):
            stream.finish(lambda: False)
    finally:
        stream.close()


def test_corrupt_gzip_on_the_second_read_names_the_likely_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(local_blob, "SETTLE_NS", 10**12)
    blob = bytearray(gzip.compress(TAR, mtime=0))
    blob[-8] ^= 1  # the member's CRC-32
    stream = BlobTarStream(_stamped(tmp_path / "blob", bytes(blob), digest_of=bytes(blob)))
    try:
        with pytest.raises(ImageError, match=r"^layer 1: corrupt gzip data: .*, on the second read "
                                             r"\(the blob changed between the passes over it\?\)$"):
            while stream.read(1 << 20):
                pass
    finally:
        stream.close()


@pytest.mark.parametrize("settled", [True, False])
def test_reads_are_exactly_n_bytes_and_an_unchanged_blob_passes(tmp_path, monkeypatch, settled):
    """Unsettled, the digest check passes only if every byte the gzip reader read was hashed."""
    monkeypatch.setattr(local_blob, "SETTLE_NS", -(10**12) if settled else 10**12)
    blob = b"".join(gzip.compress(TAR[i:i + 700_000], mtime=0) for i in range(0, len(TAR), 700_000))
    stream = BlobTarStream(_stamped(tmp_path / "blob", blob, digest_of=blob))
    try:
        sizes = []
        while chunk := stream.read(300_000):
            sizes.append(len(chunk))
        assert sum(sizes) == len(TAR) and set(sizes[:-1]) == {300_000}
        stream.finish(lambda: False)
    finally:
        stream.close()
