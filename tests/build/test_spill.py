"""The spill store's ranges are windows on its one read-only descriptor."""

from __future__ import annotations

import os

import pytest

from qtbuild.convert.spill import SpillStore


def test_ranges_read_back_what_was_appended(tmp_path):
    with SpillStore(str(tmp_path)) as store:
        store.append(b"hello ")
        store.append(b"world")
        store.flush()
        assert store.open_range(0, 5).read() == b"hello"
        assert store.open_range(6, 5).read(100) == b"world"
        with pytest.raises(ValueError, match="outside the spill store"):
            store.open_range(6, 6)


def test_a_range_refuses_to_read_after_the_store_is_closed(tmp_path):
    store = SpillStore(str(tmp_path))
    store.append(b"data")
    store.flush()
    stream = store.open_range(0, 4)
    store.close()
    with pytest.raises(ValueError, match="spill store is closed"):
        stream.read()


def test_files_are_created_at_the_first_append_beside_the_output_and_unlinked_at_once(tmp_path):
    from helpers.open_files import open_files_under

    store = SpillStore(str(tmp_path))
    segment, named = store.segment(), store.segment(named=True)
    assert open_files_under(tmp_path) == []  # nothing on disk before the first append
    store.append(b"a")
    segment.append(b"b")
    named.append(b"tar")
    named.flush()
    held = set(open_files_under(tmp_path))  # each file: a writer and a reader descriptor
    assert len(held) == 3 and sum(path.endswith(" (deleted)") for path in held) == 2, held
    assert os.listdir(tmp_path) == [os.path.basename(named.path)]  # only the named one has a name
    with open(named.path, "rb") as file:
        assert file.read() == b"tar"  # no lead: a reader opening the path sees exactly what was appended
    store.close()
    assert open_files_under(tmp_path) == [] and os.listdir(tmp_path) == []


def test_layer_sized_appends_go_to_the_file_without_waiting_in_the_write_buffer(tmp_path):
    """A 1 MiB chunk (what the tar scan tees) is written from the caller's buffer, not copied into the
    writer's first: it is in the file before any flush.  Small appends around it keep their order."""
    chunk = os.urandom(1 << 20)
    with SpillStore(str(tmp_path)) as store:
        store.append(b"head")
        store.append(chunk)
        assert os.pread(store.fileno(), 16, os.fstat(store.fileno()).st_size - 16) == chunk[-16:]
        store.append(b"tail")
        store.flush()
        assert store.open_range(0, 4).read() == b"head"
        assert store.open_range(4, len(chunk)).read() == chunk
        assert store.open_range(4 + len(chunk), 4).read() == b"tail"
