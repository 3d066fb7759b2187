"""The one window reader (pread-based, readinto only) and the one double-buffer chunker."""

from __future__ import annotations

import io
import os
import threading

import pytest

from qtbuild.formats.double_buffer import double_buffered_chunks
from qtbuild.formats.errors import EifFormatError
from qtbuild.formats.file_window import FileWindow

DATA = bytes(range(256)) * 16  # 4096 bytes


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    with open(path, "rb") as handle:
        yield handle


def test_window_reads_its_range_only(data_file):
    window = FileWindow(data_file, 100, 50)
    assert window.read() == DATA[100:150]
    assert window.read(10) == b""


def test_window_is_seekable_with_its_own_position(data_file):
    window = FileWindow(data_file, 100, 50)
    assert window.seek(10) == 10 and window.read(5) == DATA[110:115] and window.tell() == 15
    assert window.seek(-5, io.SEEK_END) == 45 and window.read() == DATA[145:150]
    assert window.seek(-3, io.SEEK_CUR) == 47 and window.read(100) == DATA[147:150]


def test_windows_never_move_the_shared_file_offset(data_file):
    data_file.seek(7)
    first, second = FileWindow(data_file, 0, 100), FileWindow(data_file, 2000, 100)
    assert first.read(10) == DATA[:10]
    assert second.read(10) == DATA[2000:2010]
    assert first.read(10) == DATA[10:20]
    assert os.lseek(data_file.fileno(), 0, os.SEEK_CUR) == 7 and data_file.read(3) == DATA[7:10]


def test_windows_can_be_read_from_many_threads(data_file):
    results: dict[int, bytes] = {}

    def read(start: int) -> None:
        results[start] = FileWindow(data_file, start, 1000).read()

    threads = [threading.Thread(target=read, args=(start,)) for start in range(0, 3000, 100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[start] == DATA[start:start + 1000] for start in results) and len(results) == 30


def test_a_file_shorter_than_the_window_is_eof_or_the_callers_error(data_file):
    assert FileWindow(data_file, 4000, 200).read() == DATA[4000:]
    strict = FileWindow(data_file, 4000, 200, truncated=lambda offset: EifFormatError(f"short at {offset}"))
    assert strict.read(96) == DATA[4000:]
    with pytest.raises(EifFormatError, match="short at 4096"):
        strict.read(1)


def test_a_closed_source_stops_its_windows(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    with open(path, "rb") as handle:
        window = FileWindow(handle, 0, 10)
    with pytest.raises(ValueError):
        window.read(1)


def test_in_memory_sources_are_read_with_seek_and_readinto():
    source = io.BytesIO(DATA)
    window = FileWindow(source, 10, 20)
    assert window.read(5) == DATA[10:15] and window.read() == DATA[15:30]


def test_buffered_reader_gives_the_rest(data_file):
    buffered = io.BufferedReader(FileWindow(data_file, 0, 300))
    assert buffered.peek(4)[:4] == DATA[:4]
    assert buffered.read(3) == DATA[:3]
    assert buffered.seek(256) == 256 and buffered.read() == DATA[256:300]


def test_a_window_of_a_path_owns_its_descriptor(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    window = FileWindow.of_path(path, 1, 3)
    assert window.read() == DATA[1:4]
    source = window._source
    window.close()
    assert source.closed


def test_negative_bounds_are_refused(data_file):
    with pytest.raises(ValueError):
        FileWindow(data_file, -1, 5)


def test_chunks_alternate_between_two_buffers():
    chunks = list(double_buffered_chunks(io.BytesIO(DATA), 1000, EifFormatError, chunk_size=300))
    assert [len(chunk) for chunk in chunks] == [300, 300, 300, 100]
    # chunk k+2 reuses chunk k's buffer; chunk k+1 does not, so the digest thread can hash chunk k
    assert chunks[0].obj is chunks[2].obj and chunks[1].obj is chunks[3].obj
    assert chunks[0].obj is not chunks[1].obj


def test_chunk_contents_are_the_stream():
    chunks = double_buffered_chunks(io.BytesIO(DATA), 4000, EifFormatError, 999)
    assert b"".join(bytes(chunk) for chunk in chunks) == DATA[:4000]
    assert list(double_buffered_chunks(io.BytesIO(b""), 0, EifFormatError)) == []


def test_a_stream_that_ends_early_raises_the_callers_error():
    with pytest.raises(EifFormatError, match="^1000$"):
        list(double_buffered_chunks(io.BytesIO(DATA[:3096]), 4096, lambda left: EifFormatError(str(left)), 1024))


def test_buffered_windows_peek_and_small_ones_are_read_directly(data_file):
    large = FileWindow.buffered(data_file, 0, 4096 * 3)
    assert isinstance(large, io.BufferedReader) and large.peek(2)[:2] == DATA[:2]
    assert large.read(5) == DATA[:5]
    small = FileWindow.buffered(data_file, 5, 100)  # read in one call anyway: no buffer to fill
    assert small.read() == DATA[5:105] and small.read(1) == b""
