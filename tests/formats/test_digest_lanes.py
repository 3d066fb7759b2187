"""The digest's hashing lanes (``SectionStreamDigest``): an error on either lane reaches the caller,
no later chunk is hashed on that lane, and the lanes' threads end."""

from __future__ import annotations

import threading

import pytest

from qtbuild.formats import eif_stream
from qtbuild.formats.eif import SectionType
from qtbuild.formats.eif_stream import SectionStreamDigest
from qtbuild.formats.eif_writer import write_eif


def _lanes_alive() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("eif-digest")]


def test_a_failing_sink_is_raised_to_the_writer_and_the_lanes_end(tmp_path):
    class DiskFull(OSError):
        pass

    sunk: list[int] = []

    def sink(view: memoryview) -> None:
        sunk.append(len(view))
        if len(sunk) == 3:
            raise DiskFull(28, "No space left on device")

    with pytest.raises(DiskFull), SectionStreamDigest(sink=sink) as digest:
        digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, 10 * 4096)
        for index in range(10):
            digest.update(bytes([index]) * 4096)
    assert len(sunk) == 3  # the header (written by the caller), two chunks (the second failed), no more
    assert _lanes_alive() == []


def test_a_failing_hash_lane_is_raised_and_later_chunks_are_skipped(monkeypatch):
    hashed: list[int] = []
    original = SectionStreamDigest._lane_a

    def lane_a(self, hashers, view):
        if view[0] == 2:
            raise ValueError("lane a failed on chunk 2")
        hashed.append(view[0])
        original(self, hashers, view)

    monkeypatch.setattr(SectionStreamDigest, "_lane_a", lane_a)
    digest = SectionStreamDigest()
    digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, 6 * 100)
    with pytest.raises(ValueError, match="chunk 2"):
        for index in range(6):
            digest.update(bytes([index]) * 100)
        digest.measurements()
    with pytest.raises(ValueError, match="chunk 2"):  # and again: the lane's state is lost
        digest.close()
    assert hashed == [0, 1]
    assert _lanes_alive() == []


def test_an_eif_written_after_a_failed_one_is_whole(tmp_path, monkeypatch):
    """A failure leaves nothing behind that a later digest would share."""
    calls = {"n": 0}
    original = SectionStreamDigest._lane_b

    def lane_b(self, hashers, view):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "Input/output error")
        original(self, hashers, view)

    monkeypatch.setattr(SectionStreamDigest, "_lane_b", lane_b)
    with pytest.raises(OSError, match="Input/output"):
        write_eif(tmp_path / "a.eif", kernel=b"k" * 5000, cmdline="c", ramdisks=[b"r" * 5000], metadata=b"{}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(SectionStreamDigest, "_lane_b", original)
    first = write_eif(tmp_path / "b.eif", kernel=b"k" * 5000, cmdline="c", ramdisks=[b"r" * 5000], metadata=b"{}")
    assert first == write_eif(None, kernel=b"k" * 5000, cmdline="c", ramdisks=[b"r" * 5000], metadata=b"{}")
    assert eif_stream.DEPTH >= 2 and _lanes_alive() == []
