"""TarScanner's ``seek_over_data``: same members as reading, file data seeked over, truncation still refused."""

from __future__ import annotations

import io

import pytest

from qtbuild.convert.tarscan import ByteBudget, TarFormatError, TarScanner

from helpers.imagefactory import file, make_tar


def _tar(files: dict[str, bytes]) -> bytes:
    return make_tar(file(name, data) for name, data in files.items())


class _CountingReads(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.bytes_read = 0

    def read(self, n: int | None = -1) -> bytes:
        data = super().read(n)
        self.bytes_read += len(data)
        return data


def _members(stream, **kw) -> list[tuple[bytes, int, int]]:
    scanner = TarScanner(stream, **kw)
    members = [(m.name, m.data_offset, m.size) for m in scanner]
    scanner.drain()
    return members


FILES = {"small": b"s" * 100, "big": b"b" * (3 << 20), "medium": b"m" * (200 << 10), "last": b"x"}


def test_same_members_as_reading_and_big_data_is_not_read():
    tar = _tar(FILES)
    stream = _CountingReads(tar)
    budget, progress = ByteBudget(1 << 40), []
    seeking = _members(stream, seek_over_data=True, budget=budget, progress=progress.append)
    assert seeking == _members(io.BytesIO(tar))
    assert stream.bytes_read < 1 << 20  # the 3 MiB and 200 KiB files were seeked over
    assert sum(progress) == len(tar)  # skipped bytes still count, for the progress bar and the budget


def test_member_beyond_the_end_is_truncation():
    tar = _tar(FILES)
    cut = tar[: tar.index(b"b" * 1024) + (1 << 20)]  # inside the big file's data
    with pytest.raises(TarFormatError, match="truncated archive"):
        _members(io.BytesIO(cut), seek_over_data=True)


def test_budget_counts_seeked_bytes():
    tar = _tar(FILES)
    with pytest.raises(TarFormatError):
        _members(io.BytesIO(tar), seek_over_data=True, budget=ByteBudget(1 << 20))


def test_needs_a_seekable_stream_without_tee():
    with pytest.raises(ValueError):
        TarScanner(io.BytesIO(b""), seek_over_data=True, tee=lambda chunk: None)
