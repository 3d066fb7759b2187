"""The spill store's ranges are windows on its one read-only descriptor."""

from __future__ import annotations

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
