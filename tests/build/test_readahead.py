"""ReadAhead: same bytes as the source, source errors surface at the reader, close stops the worker."""

from __future__ import annotations

import io
import os

import pytest

from qtbuild.convert.readahead import ReadAhead


class _Failing(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        got = self._data.readinto(buffer)
        if not got:
            raise ValueError("digest mismatch at EOF")
        return got


def test_same_bytes_in_odd_read_sizes():
    data = os.urandom(3 * (1 << 20) + 777)
    stream = ReadAhead(io.BytesIO(data), chunk_size=65536, depth=2)
    out = bytearray()
    for size in [1, 511, 512, 100000, 7] * 1000:
        piece = stream.read(size)
        if not piece:
            break
        out += piece
    out += stream.read()
    assert bytes(out) == data
    stream.close()


def test_source_error_is_raised_to_the_reader_after_the_data():
    stream = ReadAhead(_Failing(b"x" * 1000), chunk_size=256)
    received = bytearray()
    with pytest.raises(ValueError, match="digest mismatch"):
        while piece := stream.read(100):
            received += piece
    assert bytes(received) == b"x" * 1000
    stream.close()


def test_close_before_the_end_stops_the_worker():
    stream = ReadAhead(io.BytesIO(bytes(50 << 20)), chunk_size=1 << 20, depth=2)
    stream.read(10)
    stream.close()
    assert stream.closed
