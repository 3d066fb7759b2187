"""The EIF write phase's producer: cpio archives written into a ring of reused buffers
(``CpioStream.ring_chunks``), the digest lanes honouring that ring, and the scan's quick
validation agreeing with the full checks."""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import stat
import time

import pytest

from qtbuild.formats.cpio import CpioArchive, CpioEntry, CpioStream, _check_entry_fully, _plainly_valid
from qtbuild.formats.eif import SectionType
from qtbuild.formats.eif_stream import SectionStreamDigest
from qtbuild.formats.eif_writer import write_eif
from qtbuild.formats.errors import CpioFormatError, EifFormatError

REG, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


def _archive() -> CpioArchive:
    rng = random.Random(7)
    entries = [CpioEntry(b"d", DIR | 0o755), CpioEntry(b"d/sub", DIR | 0o700),
               CpioEntry(b"d/link", LNK | 0o777, link_target=b"sub/" + b"x" * 300)]
    for index in range(40):  # small files: many members per buffer, members across buffer ends
        data = rng.randbytes(rng.randrange(0, 700))
        entries.append(CpioEntry(b"d/sub/f%02d" % index, REG | 0o644, size=len(data), data=data))
    big = rng.randbytes(5000)  # spans several buffers, read through readinto
    entries.append(CpioEntry(b"d/big", REG | 0o600, size=len(big), data=lambda: io.BytesIO(big)))
    for name in (b"d/h1", b"d/h2"):  # a hardlink group: data on the last link only
        entries.append(CpioEntry(name, REG | 0o644, size=3, data=b"abc", hardlink_key="h"))
    return CpioArchive(entries)


@pytest.mark.parametrize("buffers, chunk_size", [(1, 4096), (2, 1000), (3, 997), (4, 64)])
def test_ring_chunks_write_the_same_bytes_and_keep_each_view_for_the_ring(buffers, chunk_size):
    archive = _archive()
    expected = b"".join(archive.chunks())
    seen: list[tuple[memoryview, bytes]] = []
    for view in archive.ring_chunks(buffers, chunk_size):
        assert 0 < len(view) <= chunk_size
        seen.append((view, bytes(view)))
        # every view of the last buffers - 1 requests (this one included) is still unchanged
        for kept, content in seen[-buffers:]:
            assert bytes(kept) == content
    assert all(len(view) == chunk_size for view, _ in seen[:-1])  # few, full chunks
    assert b"".join(content for _, content in seen) == expected
    assert len(expected) == archive.size


def test_write_to_and_chunks_use_readinto_in_bounded_pieces():
    reads: list[int] = []

    class Source(io.BytesIO):
        def readinto(self, buffer):
            reads.append(len(buffer))
            return super().readinto(buffer)

    payload = bytes(range(256)) * 1000
    archive = CpioArchive([CpioEntry(b"big", REG | 0o600, size=len(payload), data=lambda: Source(payload))])
    out = io.BytesIO()
    assert archive.write_to(out) == archive.size
    # the data once, and a probe of one byte that finds the stream's end
    assert max(reads) <= 1 << 20 and sum(reads) == len(payload) + 1 and reads[-1] == 1
    assert b"".join(archive.chunks(chunk_size=4096)) == out.getvalue()


class _ReadOnly(io.RawIOBase):
    """A data stream with ``read`` but no ``readinto`` of its own, yielding at most 7 bytes a call."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def read(self, n=-1):
        return self._data.read(min(n, 7) if n >= 0 else 7)

    readinto = None  # type: ignore[assignment]


def test_streams_without_readinto_are_read_with_read():
    data = bytes(range(100))
    archive = CpioArchive([CpioEntry(b"f", REG | 0o644, size=len(data), data=lambda: _ReadOnly(data))])
    by_bytes = CpioArchive([CpioEntry(b"f", REG | 0o644, size=len(data), data=data)])
    assert b"".join(archive.chunks()) == b"".join(by_bytes.chunks())


@pytest.mark.parametrize("actual", [b"short", b"much too long!!"])
def test_a_stream_of_the_wrong_length_is_refused_in_the_ring_too(actual):
    archive = CpioArchive([CpioEntry(b"f", REG | 0o644, size=10, data=lambda: _ReadOnly(actual))])
    with pytest.raises(CpioFormatError, match="b'f'.*data stream"):
        list(archive.ring_chunks(4, 3))


class _RingOfMarkedChunks:
    """A ring source whose chunk i is filled with byte i % 251; it refills a buffer as soon as the
    contract allows, so a digest that let it run further ahead would hash overwritten bytes."""

    def __init__(self, count: int, chunk: int):
        self.size, self._count, self._chunk = count * chunk, count, chunk

    def data(self) -> bytes:
        return b"".join(bytes([i % 251]) * self._chunk for i in range(self._count))

    def chunks(self):
        raise AssertionError("the writer must prefer ring_chunks")

    def ring_chunks(self, buffers: int, chunk_size: int):
        assert chunk_size >= self._chunk
        ring = [bytearray(self._chunk) for _ in range(buffers)]
        for index in range(self._count):
            buffer = ring[index % buffers]
            buffer[:] = bytes([index % 251]) * self._chunk
            yield memoryview(buffer)


def test_the_digest_keeps_ring_chunks_until_both_lanes_are_done():
    source = _RingOfMarkedChunks(count=24, chunk=4096)
    seen: list[int] = []

    def slow_sink(view: memoryview) -> None:
        if len(view) == 4096:
            time.sleep(0.002)  # the producer would lap this lane if the digest did not wait
            content = bytes(view)
            seen.append(content[0] if content.count(content[0]) == len(content) else -1)

    with SectionStreamDigest(sink=slow_sink) as digest:
        digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, source.size, buffers=4)
        for chunk in source.ring_chunks(4, 4096):
            digest.update(chunk)
        ring_pcrs = digest.measurements()
    with SectionStreamDigest() as digest:
        digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, source.size)
        digest.update(source.data())
        assert ring_pcrs == digest.measurements()
    assert seen == [i % 251 for i in range(24)]


def test_the_writer_streams_a_ring_source(tmp_path):
    source = _RingOfMarkedChunks(count=9, chunk=300_000)
    from_ring = write_eif(tmp_path / "ring.eif", kernel=b"k", cmdline="c", ramdisks=[b"b", source], metadata=b"{}")
    from_bytes = write_eif(tmp_path / "bytes.eif", kernel=b"k", cmdline="c", ramdisks=[b"b", source.data()],
                           metadata=b"{}")
    assert from_ring == from_bytes
    assert (tmp_path / "ring.eif").read_bytes() == (tmp_path / "bytes.eif").read_bytes()


def test_a_source_with_one_buffer_cannot_be_queued():
    with SectionStreamDigest() as digest, pytest.raises(ValueError):
        digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, 1, buffers=1)


# -- the scan's quick validation -----------------------------------------------------------------

_PATHS = [b"a", b"a/b", b"", b"/a", b"a//b", b"a/./b", b"a/..", b"a\0b", b"x" * 256, b"x" * 255,
          b"a/" * 2047 + b"a", b"a/" * 2048 + b"a", bytearray(b"a"), "a"]
_INTS = [0, 1, 0xFFFFFFFF, 0x100000000, -1, True, 1.0, stat.S_IFREG]
_MODES = [REG | 0o644, DIR | 0o755, LNK | 0o777, stat.S_IFCHR | 0o600, stat.S_IFIFO | 0o644, stat.S_IFSOCK,
          stat.S_IFBLK | 0o7777, 0o170000 | 0o644, 0o644, REG | 0o10000, REG | 0o200000, -1, 0x100000000, True]
_RDEVS = [(0, 0), (1, 3), (0,), [0, 0], (0, -1), (0, 0x100000000), (True, 0)]
_DATA = [None, b"", b"xyz", bytearray(b"xyz"), lambda: io.BytesIO(b"xyz"), 5]
_TARGETS = [None, b"t", b"", b"t\0", b"t" * 4095, b"t" * 4096, "t"]
_KEYS = [None, 1, "k"]
_NLINKS = [None, 0, 1, 2, 3, 0xFFFFFFFF, 0x100000000, -1, True, 2.0]


_POOLS = {"path": _PATHS, "mode": _MODES, "uid": _INTS, "gid": _INTS, "mtime": _INTS,
          "size": [0, 3, 0x100000000, -1, True], "link_target": _TARGETS, "rdev": _RDEVS, "data": _DATA,
          "hardlink_key": _KEYS, "nlink": _NLINKS}
_BASES = [
    CpioEntry(b"etc", DIR | 0o755, uid=1000, gid=1000, mtime=1700000000),
    CpioEntry(b"etc/passwd", REG | 0o644, size=3, data=b"abc"),
    CpioEntry(b"etc/big", REG | 0o600, size=3, data=lambda: io.BytesIO(b"abc"), hardlink_key=4),
    CpioEntry(b"etc/empty", REG | 0o644),
    CpioEntry(b"bin/sh", LNK | 0o777, link_target=b"/bin/busybox"),
    CpioEntry(b"dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
    CpioEntry(b"x" * 255 + b"/y", stat.S_IFIFO | 0o644),
]


def _variants(seed: int, count: int):
    """Ordinary entries with one to three fields replaced by edge values, valid or not."""
    rng = random.Random(seed)
    for _ in range(count):
        changes = {name: rng.choice(_POOLS[name]) for name in rng.sample(sorted(_POOLS), rng.randint(1, 3))}
        yield rng.choice(_BASES)._replace(**changes)


def _fully_valid(entry) -> bool:
    try:
        _check_entry_fully(entry)
    except CpioFormatError:
        return False
    return True


def test_quick_validation_accepts_only_what_the_full_checks_accept():
    accepted = 0
    for entry in itertools.chain(_variants(1, 20_000), [object(), None]):
        if _plainly_valid(entry):
            accepted += 1
            assert _fully_valid(entry), entry
    assert accepted > 2000  # the variants do reach the quick path


@pytest.mark.parametrize("entry", _BASES)
def test_ordinary_entries_take_the_quick_path(entry):
    assert _plainly_valid(entry) and _fully_valid(entry)


def test_an_archive_of_edge_entries_is_refused_as_before():
    refused = [entry for entry in _variants(2, 3000) if not _fully_valid(entry)]
    for entry in refused[:200]:
        with pytest.raises(CpioFormatError):
            CpioArchive([entry])
    assert hashlib.sha256(b"".join(CpioArchive([]).chunks())).hexdigest()  # the empty archive still builds


# -- a tree that changes between two passes ----------------------------------------------------------


def _changing_stream() -> CpioStream:
    """A stream whose entries change after the first pass (which gives it its size)."""
    calls = itertools.count()

    def entries():
        data = b"xy" if next(calls) == 0 else b"xyzzy"  # 4 + 8 bytes with padding
        return iter([CpioEntry(b"a", REG | 0o644, size=len(data), data=data)])

    stream = CpioStream(entries)
    assert stream.size is None
    assert len(b"".join(stream.chunks())) == stream.size
    return stream


def test_entries_that_change_between_passes_are_refused():
    with pytest.raises(CpioFormatError, match="entries changed between passes"):
        list(_changing_stream().ring_chunks(4, 64))


def test_an_eif_from_entries_that_changed_is_not_written(tmp_path):
    with pytest.raises((CpioFormatError, EifFormatError)):
        write_eif(tmp_path / "x.eif", kernel=b"k", cmdline="c", ramdisks=[b"b", _changing_stream()],
                  metadata=b"{}")
    assert list(tmp_path.iterdir()) == []


class _Pieces(io.RawIOBase):
    """A data stream whose ``read`` returns pieces of at most ``piece`` bytes, each kept for the test."""

    def __init__(self, data: bytes, piece: int, given: list[bytes]):
        self._data, self._at, self._piece, self._given = data, 0, piece, given

    def readable(self) -> bool:
        return True

    def read(self, n=-1):
        piece = self._data[self._at:self._at + min(n, self._piece)]
        self._at += len(piece)
        if piece:
            self._given.append(piece)
        return piece


def test_large_files_pass_through_the_ring_as_their_streams_pieces():
    """A file of PASS_THROUGH bytes or more is yielded as the stream's own bytes (no copy into the
    ring); the ring's views around it stay valid for the ring, and the archive is unchanged."""
    from qtbuild.formats.cpio import PASS_THROUGH

    rng = random.Random(3)
    big = rng.randbytes(3 * PASS_THROUGH + 123)
    small = rng.randbytes(1000)
    given: list[bytes] = []
    entries = [CpioEntry(b"a", REG | 0o644, size=len(small), data=small),
               CpioEntry(b"b", REG | 0o644, size=len(big), data=lambda: _Pieces(big, PASS_THROUGH, given)),
               CpioEntry(b"c", REG | 0o644, size=len(small), data=small)]
    expected = b"".join(CpioArchive([entry._replace(data=big) if entry.path == b"b" else entry
                                     for entry in entries]).chunks(chunk_size=4096))
    archive = CpioArchive(entries)
    views = list(archive.ring_chunks(2, 1 << 20))
    passed = [view for view in views if isinstance(view.obj, bytes)]
    assert len(passed) == len(given) and all(view.obj is piece for view, piece in zip(passed, given, strict=True))
    assert b"".join(given) == big
    ring = [view for view in views if not isinstance(view.obj, bytes)]
    assert len(ring) == 2  # the headers before the big file, and everything after it
    assert b"".join(bytes(view) for view in views) == expected
    assert all(0 < len(view) <= 1 << 20 for view in views)


@pytest.mark.parametrize("actual_size", [-1, +1])
def test_a_passed_through_stream_of_the_wrong_length_is_refused(actual_size):
    from qtbuild.formats.cpio import PASS_THROUGH

    data = bytes(PASS_THROUGH + 10 + actual_size)
    archive = CpioArchive([CpioEntry(b"f", REG | 0o644, size=PASS_THROUGH + 10,
                                     data=lambda: _Pieces(data, 4096, []))])
    with pytest.raises(CpioFormatError, match="b'f'.*data stream"):
        list(archive.ring_chunks(4, 1 << 20))


def test_a_small_chunk_the_digest_copies_still_takes_its_buffers_turn(monkeypatch):
    """A ring view under COPY_BELOW is copied before it is queued, but the source counts it among
    the ``buffers - 1`` views after which it refills a buffer.  The digest once stopped counting
    it, so a large view two buffers back was overwritten while a lane still had it: a ring that
    yielded a partly filled buffer before a passed-through file gave EIFs with a wrong CRC."""
    from qtbuild.formats import eif_stream

    original_lane_a = eif_stream.SectionStreamDigest._lane_a

    def slow_lane_a(self, hashers, view):
        time.sleep(0.2)  # the source refills the buffer meanwhile unless the digest waits for this lane
        original_lane_a(self, hashers, view)

    monkeypatch.setattr(eif_stream.SectionStreamDigest, "_lane_a", slow_lane_a)
    large, small = b"L" * eif_stream.COPY_BELOW, b"s" * 100
    buffers = [bytearray(large), bytearray(small)]
    with SectionStreamDigest() as digest:
        digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, len(large) + len(small) + 3, buffers=2)
        digest.update(memoryview(buffers[0]))
        digest.update(memoryview(buffers[1]))  # the copy: one more view, so buffer 0 is the source's again
        buffers[0][:] = b"X" * len(large)
        digest.update(b"end")
        pcrs, crc = digest.measurements(), digest.crc
    with SectionStreamDigest() as digest:
        digest.begin_section(SectionType.RAMDISK.label, SectionType.RAMDISK, len(large) + len(small) + 3)
        digest.update(large + small + b"end")
        assert (pcrs, crc) == (digest.measurements(), digest.crc)


@pytest.mark.parametrize("ring_chunk", [1 << 20, None])
def test_an_eif_with_a_passed_through_file_after_a_partly_filled_buffer_has_the_right_crc(tmp_path, monkeypatch,
                                                                                           ring_chunk):
    """The composition that failed in CI: full ring buffers of small files, a partly filled one
    (under COPY_BELOW: the digest copies it) before a large (passed-through) file, then full ones
    again, with lanes slower than the producer.  The file must equal the one written from the
    archive's bytes.  With the writer's ring buffers of 1 MiB (where it failed) and of today's size."""
    from qtbuild.formats import eif_stream, eif_writer

    if ring_chunk is not None:
        monkeypatch.setattr(eif_writer, "RING_CHUNK", ring_chunk)
    member = 120 + 4096  # a member's header (path d/a0000) and data
    before = (2 * eif_writer.RING_CHUNK + eif_stream.COPY_BELOW // 2) // member  # two full buffers and a bit
    rng = random.Random(11)
    entries = [CpioEntry(b"d", DIR | 0o755, nlink=2)]
    for index in range(before + 3 * eif_writer.RING_CHUNK // member):
        name = b"d/%s%05d" % (b"a" if index < before else b"c", index)
        data = rng.randbytes(4096)
        entries.append(CpioEntry(name, REG | 0o644, size=len(data), data=data))
        if index == before - 1:
            big = rng.randbytes(300 << 10)
            entries.append(CpioEntry(b"d/b", REG | 0o644, size=len(big), data=lambda big=big: io.BytesIO(big)))
    expected_bytes = b"".join(CpioArchive(list(entries)).chunks())
    reference = write_eif(tmp_path / "bytes.eif", kernel=b"k", cmdline="c", ramdisks=[b"b", expected_bytes],
                          metadata=b"{}")
    original_lane_a = eif_stream.SectionStreamDigest._lane_a

    def slow_lane_a(self, hashers, view):
        time.sleep(0.01)
        original_lane_a(self, hashers, view)

    monkeypatch.setattr(eif_stream.SectionStreamDigest, "_lane_a", slow_lane_a)
    result = write_eif(tmp_path / "ring.eif", kernel=b"k", cmdline="c", ramdisks=[b"b", CpioStream(lambda: entries)],
                       metadata=b"{}")
    assert (tmp_path / "ring.eif").read_bytes() == (tmp_path / "bytes.eif").read_bytes()
    assert result == reference


def test_a_small_archive_costs_one_ring_buffer():
    """The ring allocates a buffer when its first turn comes: an archive smaller than one buffer
    (most enclave images' launch files, the samples) does not pay for four."""
    import tracemalloc

    archive = CpioArchive([CpioEntry(b"f", REG | 0o644, size=5000, data=bytes(5000))])
    tracemalloc.start()
    try:
        views = [bytes(view) for view in archive.ring_chunks(4, 4 << 20)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert b"".join(views) == b"".join(archive.chunks())
    assert 4 << 20 <= peak < 5 << 20
