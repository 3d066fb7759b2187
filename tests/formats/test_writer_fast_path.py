"""The archive writer's per-entry fast paths (issue 16, sixth round): a plain regular file in the
directory entered last is checked in a few C-level operations and copied into the ring with no
generator, its data in one step when its stream offers ``read_view``.  Each fast path must write
the same bytes and refuse the same entries, with the same messages, as the general path."""

from __future__ import annotations

import io
import random
import re
import stat

import pytest

from qtbuild.formats import cpio
from qtbuild.formats.cpio import CpioArchive, CpioEntry, CpioStream, iter_archive
from qtbuild.formats.errors import CpioFormatError

REG, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


class _General(CpioEntry):
    """The same entry, but not exactly a CpioEntry: the writer gives it the general path only."""

    __slots__ = ()


def _outcome(entries: list, chunk_size: int = 1 << 20) -> bytes | str:
    """The archive the stream writes, or the message it refuses it with."""
    try:
        return b"".join(bytes(view) for view in CpioStream(lambda: iter(entries)).ring_chunks(4, chunk_size))
    except CpioFormatError as error:
        return str(error)


_NAMES = [b"b", b"zz", b".", b"..", b"", b"x" * 255, b"x" * 256, b"b\0", b"b/c", b"a", b"0"]
_VALUES = {
    "mode": [REG | 0o644, REG | 0o7777, REG | 0o10000, REG | 0o200000, DIR | 0o755, LNK | 0o777, 0o644, -1, True,
             0x100000000, 1.0],
    "uid": [0, 1000, 0xFFFFFFFF, 0x100000000, -1, True, 2.0],
    "gid": [0, 7, 0xFFFFFFFF, 0x100000000, -5, False],
    "mtime": [0, 1700000000, 0xFFFFFFFF, 0x100000000, -1, True],
    "size": [0, 3, 5, 0x100000000, -1, True],
    "link_target": [None, None, None, b"t", b""],
    "rdev": [(0, 0), (0, 0), (1, 3), (0,), [0, 0], (0, -1), (0, 0x100000000), (True, 0), (0, 1.0), None],
    "data": [None, b"abc", b"abcde", bytearray(b"abc"), lambda: io.BytesIO(b"abc"), 5, "abc"],
    "hardlink_key": [None, None, None, 0],
    "nlink": [None, None, 1, 2, 0, True, 1.0, -1],
}


def _variant(rng: random.Random) -> CpioEntry:
    """A plain file in ``etc/`` with one to three fields replaced by edge values, valid or not."""
    entry = CpioEntry(b"etc/" + rng.choice(_NAMES[:2]), REG | 0o644, size=3, data=b"abc")
    changes = {name: rng.choice(_VALUES[name]) for name in rng.sample(sorted(_VALUES), rng.randint(1, 3))}
    if rng.random() < 0.3:
        changes["path"] = rng.choice([b"etc/", b"/etc/", b"etc//"]) + rng.choice(_NAMES)
    if rng.random() < 0.1:
        changes["path"] = rng.choice([b"etc/./b", b"etc/../b", b"/b", b"b", b"e/b", b"etc\0/b", "etc/b",
                                      b"etc/" + b"d" * 4092])
    return entry._replace(**changes)


def test_the_fast_path_writes_and_refuses_exactly_as_the_general_path():
    rng = random.Random(16)
    written = refused = 0
    for _ in range(4000):
        entry = _variant(rng)
        before = [CpioEntry(b"etc", DIR | 0o755, nlink=2), CpioEntry(b"etc/a", REG | 0o644)][:rng.randint(1, 2)]
        fast = _outcome(before + [entry], chunk_size=8192)
        assert fast == _outcome(before + [_General(*entry)], chunk_size=8192), entry
        written += isinstance(fast, bytes)
        refused += isinstance(fast, str)
    assert written > 400 and refused > 2000  # both outcomes are reached


@pytest.mark.parametrize("name_bytes, message", [(95, None), (96, r"path of 4096 bytes exceeds 4095")])
def test_the_fast_path_keeps_the_path_length_limit(name_bytes, message):
    """A name of at most NAME_MAX bytes in a deep directory can still make the path too long."""
    directories = [b"/".join([b"d" * 249] * depth) for depth in range(1, 17)]  # the deepest: 3999 bytes
    entries = [CpioEntry(path, DIR | 0o755, nlink=3 if path != directories[-1] else 2) for path in directories]
    entries.append(CpioEntry(directories[-1] + b"/" + b"f" * name_bytes, REG | 0o644))
    outcome = _outcome(entries)
    assert outcome == _outcome([_General(*entry) for entry in entries])
    if message is None:
        assert isinstance(outcome, bytes)
    else:
        assert isinstance(outcome, str) and re.search(message, outcome)


def test_plain_files_take_the_fast_path(monkeypatch):
    checked = []
    monkeypatch.setattr(cpio, "_check_entry", lambda entry: checked.append(entry.path))
    entries = [CpioEntry(b"d", DIR | 0o755, nlink=2)] + [
        CpioEntry(b"d/f%03d" % index, REG | 0o640, uid=index, mtime=index // 10, size=3, data=b"abc")
        for index in range(100)]
    assert isinstance(_outcome(entries), bytes)
    assert checked == [b"d"]


def test_neighbours_reusing_header_digits_read_back_exactly():
    """The header's mode to mtime digits are reused while neighbours share them: every change of
    one field, and a device's rdev, must still reach its own header."""
    rng = random.Random(3)
    entries = [CpioEntry(b"d", DIR | 0o755, nlink=2)]
    for index in range(300):
        mode = rng.choice([REG | 0o644, REG | 0o600, stat.S_IFCHR | 0o600, LNK | 0o777])
        fields = {"uid": rng.choice([0, 0, 1]), "gid": rng.choice([0, 0, 2]), "mtime": rng.choice([0, 0, 5])}
        path = b"d/%03d" % index
        if mode & 0o170000 == REG:
            data = rng.randbytes(rng.randrange(8))
            entries.append(CpioEntry(path, mode, size=len(data), data=data, **fields))
        elif mode & 0o170000 == LNK:
            entries.append(CpioEntry(path, mode, link_target=b"t" * rng.randrange(1, 6), **fields))
        else:
            entries.append(CpioEntry(path, mode, rdev=rng.choice([(0, 0), (1, 3), (4, 0), (0, 5)]), **fields))
    archive = _outcome(entries, chunk_size=997)
    assert isinstance(archive, bytes) and archive == b"".join(CpioArchive(entries).chunks(64))
    read = [(member, data.read()) for member, data in iter_archive(io.BytesIO(archive))]
    for entry, (member, data) in zip(entries, read, strict=True):
        assert (member.path, member.mode, member.uid, member.gid, member.mtime, member.rdev) == \
            (entry.path, entry.mode, entry.uid, entry.gid, entry.mtime, entry.rdev)
        assert member.nlink == (2 if entry.mode & 0o170000 == DIR else 1)
        if entry.mode & 0o170000 == REG:
            assert data == entry.data


class _Viewed:
    """A stream that gives its data in one ``read_view`` call; reading it otherwise is a failure."""

    def __init__(self, data: bytes):
        self._data, self.closed, self.views = data, False, 0

    def read_view(self) -> memoryview:
        self.views += 1
        return memoryview(self._data)

    def readinto(self, buffer) -> int:
        raise AssertionError("a stream with read_view was read with readinto")

    read = readinto

    def close(self) -> None:
        self.closed = True


def test_a_stream_with_read_view_is_copied_in_one_step_and_closed():
    streams: list[_Viewed] = []

    def opener(data: bytes):
        def open_() -> _Viewed:
            streams.append(_Viewed(data))
            return streams[-1]
        return open_

    payloads = [bytes([index]) * index for index in range(1, 40)]
    entries = [CpioEntry(b"f%02d" % index, REG | 0o644, size=len(data), data=opener(data))
               for index, data in enumerate(payloads)]
    archive = _outcome(entries, chunk_size=256)  # members cross buffers too: those take the general path
    assert isinstance(archive, bytes)
    assert [data.read() for _member, data in iter_archive(io.BytesIO(archive))] == payloads
    assert streams and all(stream.closed for stream in streams)
    assert sum(stream.views for stream in streams) > 20  # most small members fit their buffer


@pytest.mark.parametrize("actual, message", [(b"ab", r"data stream ended after 2 bytes, size is 3"),
                                             (b"abcd", r"data stream yielded more than size 3 bytes")])
def test_a_read_view_of_the_wrong_length_is_refused(actual, message):
    stream = _Viewed(actual)
    entries = [CpioEntry(b"f", REG | 0o644, size=3, data=lambda: stream)]
    assert _outcome(entries) == f"cpio entry b'f': {message}"
    assert stream.closed


@pytest.mark.parametrize("actual, message", [(b"ab", r"data stream ended after 2 bytes, size is 3"),
                                             (b"abcd", r"data stream yielded more than size 3 bytes")])
def test_a_read_stream_of_the_wrong_length_is_refused_on_the_fast_path(actual, message):
    closed = []

    class Stream(io.BytesIO):
        def close(self):
            closed.append(True)
            super().close()

    entries = [CpioEntry(b"f", REG | 0o644, size=3, data=lambda: Stream(actual))]
    assert _outcome(entries) == f"cpio entry b'f': {message}"
    assert closed == [True]
