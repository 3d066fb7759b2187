"""Tests for qtbuild.formats.cpio: deterministic newc writer and bounded reader."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import stat
import subprocess
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtbuild.formats.cpio import CpioArchive, CpioEntry, iter_archive
from qtbuild.formats.errors import CpioFormatError

DIR = stat.S_IFDIR
REG = stat.S_IFREG
LNK = stat.S_IFLNK
CPIO = shutil.which("cpio")
needs_gnu_cpio = pytest.mark.skipif(CPIO is None, reason="GNU cpio not installed (apt-get install cpio)")


# -- independent helpers: raw newc bytes built by hand ------------------------------------------


def raw_member(name: bytes, mode: int = REG | 0o644, data: bytes = b"", *, ino: int = 1, nlink: int = 1,
               magic: bytes = b"070701", filesize: int | None = None, namesize: int | None = None,
               mtime: int = 0) -> bytes:
    """One member exactly as the format describes it, with overridable size fields."""
    fields = [ino, mode, 0, 0, nlink, mtime, len(data) if filesize is None else filesize,
              0, 0, 0, 0, len(name) + 1 if namesize is None else namesize, 0]
    head = magic + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


TRAILER = raw_member(b"TRAILER!!!", 0)


def raw_archive(*members: bytes) -> bytes:
    return b"".join(members) + TRAILER


class Pipe:
    """A non-seekable stream returning at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int | None = None):
        self._buffer = io.BytesIO(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        if self._step is not None and (n < 0 or n > self._step):
            n = self._step
        return self._buffer.read(n)

    def seekable(self) -> bool:
        return False


def build(entries, **kwargs) -> bytes:
    out = io.BytesIO()
    archive = CpioArchive(entries, **kwargs)
    assert archive.write_to(out) == archive.size == len(out.getvalue())
    return out.getvalue()


def read_all(fileobj, **kwargs):
    """[(member, data bytes)] of an archive."""
    return [(m, d.read()) for m, d in iter_archive(fileobj, **kwargs)]


def d(path: bytes, perm: int = 0o755, **kw) -> CpioEntry:
    return CpioEntry(path, DIR | perm, **kw)


def f(path: bytes, data: bytes = b"", perm: int = 0o644, **kw) -> CpioEntry:
    return CpioEntry(path, REG | perm, size=len(data), data=data, **kw)


def link(path: bytes, target: bytes) -> CpioEntry:
    return CpioEntry(path, LNK | 0o777, link_target=target)


SAMPLE = [
    d(b"etc"), f(b"etc/hosts", b"127.0.0.1 localhost\n", mtime=1_700_000_000),
    d(b"bin"), f(b"bin/sh", b"\x7fELF" * 100, perm=0o4755, uid=0, gid=0),
    link(b"bin/bash", b"sh"), d(b"etc/ssl"), f(b"etc/ssl/empty"),
    f(b"a", b"shared", hardlink_key="k"), f(b"bin/a2", b"shared", hardlink_key="k"),
    CpioEntry(b"etc/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    CpioEntry(b"etc/fifo", stat.S_IFIFO | 0o644),
    d(b"tmp", perm=0o1777, uid=1000, gid=1000, mtime=0xFFFFFFFF),
]


# -- writer ---------------------------------------------------------------------------------------


def test_header_bytes_are_exact():
    blob = build([d(b"a", mtime=0x5F5E100A), f(b"a/x", b"hello")])
    expected = (
        b"070701" b"00000001" b"000041ED" b"00000000" b"00000000" b"00000002" b"5F5E100A"
        b"00000000" b"00000000" b"00000000" b"00000000" b"00000000" b"00000002" b"00000000" b"a\0"
        b"070701" b"00000002" b"000081A4" b"00000000" b"00000000" b"00000001" b"00000000"
        b"00000005" b"00000000" b"00000000" b"00000000" b"00000000" b"00000004" b"00000000"
        b"a/x\0\0\0" b"hello\0\0\0"
        b"070701" + b"00000000" * 4 + b"00000001" + b"00000000" * 6 + b"0000000B" b"00000000"
        b"TRAILER!!!\0\0\0\0"
    )
    assert blob == expected
    assert len(blob) % 4 == 0  # no 512-byte block padding after the trailer


def test_empty_archive_is_just_the_trailer():
    archive = CpioArchive([])
    assert archive.size == 124
    assert read_all(io.BytesIO(build([]))) == []


def test_round_trip_sample():
    blob = build(SAMPLE)
    members = read_all(io.BytesIO(blob))
    by_path = {m.path: (m, data) for m, data in members}
    assert [m.path for m, _ in members] == sorted(e.path for e in SAMPLE)
    for entry in SAMPLE:
        member, data = by_path[entry.path]
        assert (member.mode, member.uid, member.gid, member.mtime) == (entry.mode, entry.uid, entry.gid, entry.mtime)
        assert member.link_target == entry.link_target
        assert member.rdev == entry.rdev
        assert member.dev == (0, 0)
    assert by_path[b"etc/hosts"][1] == b"127.0.0.1 localhost\n"
    assert by_path[b"etc"][0].nlink == 3 and by_path[b"tmp"][0].nlink == 2
    assert by_path[b"etc/console"][0].is_char_device and by_path[b"etc/fifo"][0].is_fifo


def test_sort_puts_parents_first_bytewise():
    paths = [m.path for m, _ in read_all(io.BytesIO(build([d(b"a"), f(b"a/b"), f(b"a-c"), f(b"a.d"), d(b"B")])))]
    assert paths == [b"B", b"a", b"a-c", b"a.d", b"a/b"]


def test_inode_numbering_and_hardlink_convention():
    entries = [d(b"d"), f(b"z", b"DATA", hardlink_key=1), f(b"d/y", b"DATA", hardlink_key=1),
               f(b"c", b"x"), f(b"d/a", b"DATA", hardlink_key=1)]
    members = read_all(io.BytesIO(build(entries, inode_start=100)))
    info = [(m.path, m.ino, m.nlink, m.size, data) for m, data in members]
    assert info == [
        (b"c", 100, 1, 1, b"x"),
        (b"d", 101, 2, 0, b""),
        (b"d/a", 102, 3, 0, b""),
        (b"d/y", 102, 3, 0, b""),
        (b"z", 102, 3, 4, b"DATA"),  # data only on the last link in archive order
    ]


def test_bytes_identical_across_runs_and_orderings():
    blob = build(SAMPLE)
    for seed in range(5):
        shuffled = SAMPLE[:]
        random.Random(seed).shuffle(shuffled)
        assert build(shuffled) == blob


def test_callable_data_is_opened_lazily_streamed_and_closed():
    opened, reads = [], []

    class Source(io.BytesIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

        def readinto(self, buffer):
            reads.append(len(buffer))
            return super().readinto(buffer)

    payload = os.urandom(300_000)

    def opener():
        stream = Source(payload)
        opened.append(stream)
        return stream

    archive = CpioArchive([CpioEntry(b"big", REG | 0o600, size=len(payload), data=opener)])
    assert opened == []
    chunks = list(archive.chunks(chunk_size=4096))
    assert len(opened) == 1 and opened[0].closed
    assert all(0 < len(c) <= 4096 for c in chunks)
    assert max(n for n in reads) <= 4096 and sum(reads) > len(payload)
    assert sum(map(len, chunks)) == archive.size
    [(member, data)] = read_all(io.BytesIO(b"".join(chunks)))
    assert data == payload


@pytest.mark.parametrize("actual", [b"short", b"much too long!!"])
def test_data_stream_of_wrong_length_raises_at_write_time(actual):
    archive = CpioArchive([CpioEntry(b"f", REG | 0o644, size=10, data=lambda: io.BytesIO(actual))])
    with pytest.raises(CpioFormatError, match="b'f'.*data stream"):
        archive.write_to(io.BytesIO())


@pytest.mark.parametrize(
    "entries, match",
    [
        ([f(b"/abs")], "absolute"),
        ([f(b"")], "empty path"),
        ([d(b"a"), f(b"a/../b")], r"\.\. component"),
        ([d(b"a"), f(b"a/./b")], r"\. component"),
        ([d(b"a"), f(b"a//b")], "empty component"),
        ([f(b"a/")], "empty component"),
        ([f(b"nu\0l")], "NUL"),
        ([f(b"x" * 256)], "NAME_MAX"),
        ([f(b"/".join([b"d" * 200] * 21))], "exceeds 4095"),
        ([link(b"l", b"t" * 4096)], "link_target of 4096 bytes"),
        ([link(b"l", b"")], "non-empty"),
        ([link(b"l", b"a\0b")], "NUL"),
        ([CpioEntry(b"big", REG | 0o644, size=1 << 32, data=lambda: io.BytesIO())], "4 GiB or more"),
        ([f(b"a"), f(b"a")], "duplicate"),
        ([f(b"a"), d(b"a")], "duplicate"),
        ([f(b"missing/child")], "parent directory b'missing'"),
        ([f(b"notdir"), f(b"notdir/child")], "parent directory"),
        ([f(b"a", mtime=1 << 32)], "mtime"),
        ([f(b"a", mtime=-1)], "mtime"),
        ([f(b"a", uid=1 << 32)], "uid"),
        ([f(b"a", gid=-5)], "gid"),
        ([CpioEntry(b"c", stat.S_IFCHR | 0o600, rdev=(1 << 32, 0))], "rdev major"),
        ([CpioEntry(b"a", 0o644)], "file type"),
        ([CpioEntry(b"a", REG | 0o200000)], "bits outside"),
        ([d(b"a", hardlink_key=1)], "hardlink_key on a non-regular"),
        ([f(b"a", b"x", hardlink_key=1), link(b"b", b"a")], None),  # a symlink is not in the group: fine
        ([f(b"a", b"x", hardlink_key=1), f(b"b", b"x", perm=0o600, hardlink_key=1)], "different mode"),
        ([f(b"a", b"x", hardlink_key=1), f(b"b", b"y!", hardlink_key=1)], "different size"),
        ([CpioEntry(b"a", REG | 0o644, size=3, data=b"ab")], "data has 2 bytes"),
        ([CpioEntry(b"a", REG | 0o644, size=3)], "no data"),
        ([CpioEntry(b"a", REG | 0o644, size=1, data="x")], "bytes or a callable"),
        ([CpioEntry(b"a", DIR | 0o755, data=b"")], "data on a non-regular"),
        ([CpioEntry(b"a", REG | 0o644, link_target=b"x")], "link_target on a non-symlink"),
    ],
)
def test_writer_refusals(entries, match):
    if match is None:
        CpioArchive(entries)
        return
    with pytest.raises(CpioFormatError, match=match):
        CpioArchive(entries)


def test_writer_limits_accept_the_maximum():
    long_path = b"/".join([b"d" * 255] * 15) + b"/" + b"f" * 255  # 4095 bytes
    assert len(long_path) == 4095
    dirs = [d(long_path[:i]) for i in range(len(long_path)) if long_path[i:i + 1] == b"/"]
    members = read_all(io.BytesIO(build(dirs + [f(long_path), link(b"l", b"t" * 4095)])))
    assert {m.path for m, _ in members} >= {long_path, b"l"}


def test_inode_overflow_is_refused():
    with pytest.raises(CpioFormatError, match="inode number"):
        CpioArchive([f(b"a"), f(b"b")], inode_start=0xFFFFFFFF)
    CpioArchive([f(b"a")], inode_start=0xFFFFFFFF)


# -- writer: property tests ----------------------------------------------------------------------

_names = st.sampled_from([b"a", b"b", b"c", b"a-b", b"a.b", b"bin", b"\xff\xfe"])


@st.composite
def trees(draw):
    """Random valid entry lists: a set of paths, all parents as directories, random leaves."""
    paths = draw(st.sets(st.lists(_names, min_size=1, max_size=4).map(b"/".join), max_size=12))
    parents = {p[:i] for p in paths for i in range(len(p)) if p[i:i + 1] == b"/"}
    entries = [d(p, perm=draw(st.sampled_from([0o755, 0o700, 0o2775]))) for p in sorted(parents)]
    for path in sorted(paths - parents):
        kind = draw(st.sampled_from(["file", "link", "dir", "fifo", "hard"]))
        if kind == "file":
            entries.append(f(path, draw(st.binary(max_size=40)), mtime=draw(st.integers(0, 0xFFFFFFFF))))
        elif kind == "hard":
            entries.append(f(path, b"shared", hardlink_key="group"))
        elif kind == "link":
            entries.append(link(path, draw(st.binary(min_size=1, max_size=20).filter(lambda t: b"\0" not in t))))
        elif kind == "dir":
            entries.append(d(path))
        else:
            entries.append(CpioEntry(path, stat.S_IFIFO | 0o600, uid=draw(st.integers(0, 0xFFFFFFFF))))
    return entries


@given(trees(), st.randoms(use_true_random=False))
def test_property_round_trip_and_determinism(entries, rnd):
    blob = build(entries)
    shuffled = entries[:]
    rnd.shuffle(shuffled)
    assert build(shuffled) == blob
    members = read_all(Pipe(blob, step=7))
    assert [m.path for m, _ in members] == sorted(e.path for e in entries)
    expected = {e.path: e for e in entries}
    group = [m for m, _ in members if expected[m.path].hardlink_key is not None]
    for member, data in members:
        entry = expected[member.path]
        assert (member.mode, member.uid, member.gid, member.mtime, member.link_target) == \
            (entry.mode, entry.uid, entry.gid, entry.mtime, entry.link_target)
        if entry.hardlink_key is not None:
            assert member.nlink == len(group) and member.ino == group[0].ino
            assert data == (b"shared" if member is group[-1] else b"")
        elif member.is_file:
            assert data == entry.data and member.nlink == 1
        if member.is_dir:
            subdirs = [e for e in entries if e.file_type == DIR and e.path.rpartition(b"/")[0] == member.path]
            assert member.nlink == 2 + len(subdirs)
    inos = {m.ino for m, _ in members}
    assert sorted(inos) == list(range(1, len(inos) + 1))
    assert len(inos) == len(members) - max(len(group) - 1, 0)


# -- reader ---------------------------------------------------------------------------------------


def test_reader_normalises_dot_slash_and_skips_root():
    blob = raw_archive(raw_member(b".", DIR | 0o755), raw_member(b"./a", DIR | 0o755),
                       raw_member(b"./a/f", data=b"xyz"))
    assert [(m.path, data) for m, data in read_all(io.BytesIO(blob))] == [(b"a", b""), (b"a/f", b"xyz")]


def test_reader_accepts_crc_magic_lowercase_hex_and_gen_init_cpio_symlinks():
    member = raw_member(b"l", LNK | 0o777, b"target\0", magic=b"070702").replace(b"000081A4", b"000081a4")
    [(m, data)] = read_all(io.BytesIO(raw_archive(member)))
    assert m.link_target == b"target" and m.size == 7 and data == b""


def test_reader_stops_at_trailer_and_leaves_stream_after_it():
    first = raw_archive(raw_member(b"one", data=b"1"))
    second = raw_archive(raw_member(b"two", data=b"22"))
    stream = io.BytesIO(first + second)
    assert [m.path for m, _ in iter_archive(stream)] == [b"one"]
    assert stream.tell() == len(first)
    assert [m.path for m, _ in iter_archive(stream)] == [b"two"]


def test_member_data_interfaces_and_skipping():
    payload = bytes(range(256)) * 10
    blob = raw_archive(raw_member(b"a", data=payload), raw_member(b"b", data=b"tail"))
    for stream in (io.BytesIO(blob), Pipe(blob, step=3)):
        it = iter_archive(stream)
        member, data = next(it)
        assert member.path == b"a" and data.read(5) == payload[:5]
        buf = bytearray(10)
        assert data.readinto(buf) == 10 and bytes(buf) == payload[5:15]
        assert b"".join(data)[:5] == payload[15:20]
        assert data.read() == b"" and data.read(3) == b""
        member, data2 = next(it)  # previous data fully consumed
        with pytest.raises(ValueError):
            data.read()
        assert data2.read() == b"tail"
        assert list(it) == []
    # unread data is skipped on both seekable and non-seekable input
    assert [m.path for m, _ in iter_archive(Pipe(blob))] == [b"a", b"b"]
    assert [m.offset for m, _ in iter_archive(io.BytesIO(blob))] == [0, 112 + 2560]


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"", "without a TRAILER"),
        (raw_member(b"a"), "without a TRAILER"),
        (b"070707" + b"0" * 200, "070707"),
        (b"x" * 200, "bad magic"),
        (raw_archive(raw_member(b"a").replace(b"000081A4", b"+00081A4")), "c_mode at offset 14"),
        (raw_archive(raw_member(b"a").replace(b"000081A4", b" 00081A4")), "c_mode"),
        (raw_archive(raw_member(b"a").replace(b"000081A4", b"0000_1A4")), "c_mode"),
        (raw_archive(raw_member(b"a").replace(b"000081A4", b"0x0081A4")), "c_mode"),
        (raw_archive(raw_member(b"a", namesize=0)), "c_namesize"),
        (raw_archive(raw_member(b"a", namesize=5000)), "c_namesize .* 5000"),
        (raw_archive(raw_member(b"ab", namesize=2)), "not NUL-terminated"),
        (raw_archive(raw_member(b"a\0b")), "contains a NUL"),
        (raw_archive(raw_member(b"/etc/passwd")), "absolute"),
        (raw_archive(raw_member(b"../x")), r"\.\. component"),
        (raw_archive(raw_member(b"a/../../x")), r"\.\. component"),
        (raw_archive(raw_member(b"a//b")), "empty component"),
        (raw_archive(raw_member(b"")), "empty path"),
        (raw_archive(raw_member(b"a", 0o644)), "file type"),
        (raw_archive(raw_member(b"a", DIR | 0o755, b"body")), "non-regular"),
        (raw_archive(raw_member(b"l", LNK | 0o777, b"")), "symlink"),
        (raw_archive(raw_member(b"l", LNK | 0o777, b"t" * 4097)), "symlink"),
        (raw_archive(raw_member(b"l", LNK | 0o777, b"a\0b")), "symlink target"),
        (raw_archive(raw_member(b".", REG | 0o644)), "root entry"),
        (raw_archive(raw_member(b"a", data=b"12345678"))[:-130], "truncated"),
        (raw_archive(raw_member(b"a", filesize=0xFFFFFFFF)), "truncated.*4294967295"),
    ],
)
def test_reader_rejects_malformed(blob, match):
    with pytest.raises(CpioFormatError, match=match):
        read_all(io.BytesIO(blob))


def test_reader_limits():
    blob = raw_archive(*(raw_member(b"f%d" % i) for i in range(5)))
    with pytest.raises(CpioFormatError, match="max_entries"):
        read_all(io.BytesIO(blob), max_entries=4)
    assert len(read_all(io.BytesIO(blob), max_entries=5)) == 5
    with pytest.raises(CpioFormatError, match="c_namesize"):
        read_all(io.BytesIO(raw_archive(raw_member(b"abcdef"))), max_name=6)
    with pytest.raises(CpioFormatError, match="symlink"):
        read_all(io.BytesIO(raw_archive(raw_member(b"l", LNK | 0o777, b"abc"))), max_link_target=2)


def test_archive_size_bounds_the_input():
    blob = raw_archive(raw_member(b"a", data=b"x" * 100))
    with pytest.raises(CpioFormatError, match="truncated"):
        read_all(Pipe(blob + b"junk"), archive_size=150)
    assert len(read_all(Pipe(blob), archive_size=len(blob))) == 1


@pytest.mark.parametrize("make_stream", [io.BytesIO, Pipe], ids=["seekable", "pipe"])
def test_huge_declared_size_is_rejected_without_allocating(make_stream):
    blob = raw_member(b"big", filesize=0xFFFFFFFF) + b"x" * 1000
    tracemalloc.start()
    try:
        with pytest.raises(CpioFormatError, match="truncated"):
            for _member, data in iter_archive(make_stream(blob)):
                data.read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def _consume(stream, **kwargs) -> None:
    for _member, data in iter_archive(stream, **kwargs):
        data.read()


@given(st.binary(max_size=600))
def test_fuzz_random_bytes_only_raise_cpio_format_error(blob):
    for stream in (io.BytesIO(blob), Pipe(blob, step=5)):
        with contextlib.suppress(CpioFormatError):
            _consume(stream)


_VALID = build(SAMPLE)


@st.composite
def mutations(draw):
    blob = bytearray(_VALID)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "hexdigit", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(blob) - 1, 0)))
        if action == "flip" and blob:
            blob[pos] = draw(st.integers(0, 255))
        elif action == "hexdigit" and blob:
            blob[pos] = draw(st.sampled_from(b"0123456789ABCDEFf"))
        elif action == "truncate":
            del blob[pos:]
        elif action == "insert":
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del blob[pos:pos + draw(st.integers(1, 8))]
    return bytes(blob)


@given(mutations(), st.booleans())
def test_fuzz_mutated_archives_only_raise_cpio_format_error(blob, seekable):
    stream = io.BytesIO(blob) if seekable else Pipe(blob, step=13)
    with contextlib.suppress(CpioFormatError):
        _consume(stream)


# -- GNU cpio as an independent implementation ----------------------------------------------------


def _tree_snapshot(root) -> dict:
    """path -> (type, perm, content or link target, mtime, inode group) for a directory tree."""
    snapshot, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st_ = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISLNK(st_.st_mode):
                content = os.readlink(full)
            elif stat.S_ISREG(st_.st_mode):
                with open(full, "rb") as fh:
                    content = fh.read()
            else:
                content = None
            group = inodes.setdefault(st_.st_ino, rel) if stat.S_ISREG(st_.st_mode) and st_.st_nlink > 1 else None
            mtime = None if stat.S_ISDIR(st_.st_mode) else int(st_.st_mtime)
            snapshot[rel] = (stat.S_IFMT(st_.st_mode), stat.S_IMODE(st_.st_mode), content, mtime, group)
    return snapshot


GNU_SAMPLE = [e for e in SAMPLE if e.file_type in (DIR, REG, LNK)]  # no mknod needed


@needs_gnu_cpio
def test_gnu_cpio_lists_and_extracts_our_archive(tmp_path):
    blob = build(GNU_SAMPLE)
    listing = subprocess.run([CPIO, "-it", "--quiet"], input=blob, capture_output=True, check=True)
    assert listing.stdout.decode().split("\n")[:-1] == sorted(e.path.decode() for e in GNU_SAMPLE)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([CPIO, "-idm", "--quiet", "--no-absolute-filenames"], input=blob, cwd=out,
                   capture_output=True, check=True)
    snap = _tree_snapshot(out)
    for entry in GNU_SAMPLE:
        kind, perm, content, mtime, _group = snap[entry.path.decode()]
        assert kind == entry.file_type and perm == stat.S_IMODE(entry.mode)
        if entry.file_type == REG:
            assert content == entry.data and mtime == entry.mtime
        elif entry.file_type == LNK:
            assert content == entry.link_target.decode()
    assert os.path.samefile(out / "a", out / "bin" / "a2")


def make_gnu_tree(root) -> None:
    """A small tree with a hardlink, a symlink, an empty file and nested directories."""
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "sub" / "file").write_bytes(b"gnu data\n")
    os.link(root / "sub" / "file", root / "hard")
    os.symlink("sub/file", root / "sym")
    (root / "sub" / "deep" / "empty").write_bytes(b"")
    (root / "odd").write_bytes(b"123")  # length not a multiple of 4
    os.chmod(root / "odd", 0o600)
    for path in [root / "sub" / "file", root / "odd"]:
        os.utime(path, (1_600_000_000, 1_600_000_000))


def gnu_archive(root) -> bytes:
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    return subprocess.run([CPIO, "-o", "-H", "newc", "--quiet"], cwd=root, input=names,
                          capture_output=True, check=True).stdout


@needs_gnu_cpio
def test_reader_reads_gnu_cpio_archive(tmp_path):
    make_gnu_tree(tmp_path)
    blob = gnu_archive(tmp_path)
    assert len(blob) % 512 == 0  # GNU cpio pads to its block size after the trailer
    members = {m.path: (m, data) for m, data in read_all(io.BytesIO(blob))}
    assert set(members) == {b"sub", b"sub/deep", b"sub/file", b"hard", b"sym", b"sub/deep/empty", b"odd"}
    assert members[b"sym"][0].link_target == b"sub/file"
    assert members[b"odd"] == (members[b"odd"][0], b"123")
    assert members[b"odd"][0].permissions == 0o600 and members[b"odd"][0].mtime == 1_600_000_000
    file_m, hard_m = members[b"sub/file"][0], members[b"hard"][0]
    assert file_m.ino == hard_m.ino and file_m.nlink == hard_m.nlink == 2
    # GNU cpio also puts the data on the last link only
    assert sorted([members[b"sub/file"][1], members[b"hard"][1]]) == [b"", b"gnu data\n"]
