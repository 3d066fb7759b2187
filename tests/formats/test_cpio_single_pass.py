"""The one-pass ramdisk writer: ``CpioStream`` validates and writes each entry once, taking the
link counts it cannot know in advance from the entries, and the EIF writer gives a section of
unknown size its size (and the CRC its correction) once the section has been written."""

from __future__ import annotations

import io
import itertools
import random
import stat
import zlib

import pytest

from qtbuild.formats.cpio import CpioArchive, CpioEntry, CpioStream, _with_link_counts, iter_archive
from qtbuild.formats.crc32 import crc32_replace
from qtbuild.formats.eif import CRC_OFFSET, HEADER_SIZE, EifReader
from qtbuild.formats.eif_writer import BytesSource, write_eif
from qtbuild.formats.errors import CpioFormatError
from qtbuild.signing_keys import Pcr0Signer

from helpers.certs import make_signer

REG, DIR, LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


def f(path: bytes, data: bytes = b"", **kw) -> CpioEntry:
    return CpioEntry(path, REG | 0o644, size=len(data), data=data, **kw)


def d(path: bytes, nlink: int | None = None) -> CpioEntry:
    return CpioEntry(path, DIR | 0o755, nlink=nlink)


class Counted:
    """Entries handed out afresh on each call, counting the calls."""

    def __init__(self, entries: list[CpioEntry]):
        self.entries = entries
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return iter(self.entries)


def one_pass(entries: list[CpioEntry], **kw) -> bytes:
    return b"".join(CpioStream(lambda: iter(entries), **kw).chunks())


def random_tree(seed: int) -> list[CpioEntry]:
    """Nested directories whose names make other entries sort between a directory and its
    subtree (``a``, ``a-b``, ``a.c`` before ``a/...``), files, symlinks and hardlink groups across
    directories, in bytewise order, link counts undeclared."""
    rng = random.Random(seed)
    names = [b"a", b"a-b", b"a.c", b"a0", b"b", b"z"]
    directories, entries = [b""], []
    for _ in range(60):
        parent = rng.choice(directories)
        path = (parent + b"/" if parent else b"") + rng.choice(names) + b"%d" % rng.randrange(3)
        if any(entry.path == path for entry in entries):
            continue
        kind = rng.random()
        if kind < 0.35:
            directories.append(path)
            entries.append(d(path))
        elif kind < 0.55:
            entries.append(CpioEntry(path, LNK | 0o777, link_target=b"../t"))
        elif kind < 0.8:
            key = rng.randrange(4)
            entries.append(f(path, b"linked %d" % key, hardlink_key=key))
        else:
            entries.append(f(path, rng.randbytes(rng.randrange(20))))
    return sorted(entries, key=lambda entry: entry.path)


@pytest.mark.parametrize("seed", range(25))
def test_one_pass_writes_what_the_planned_archive_writes(seed):
    entries = random_tree(seed)
    expected = b"".join(CpioArchive(entries).chunks())
    source = Counted(_with_link_counts(entries))
    stream = CpioStream(source)
    assert stream.size is None  # nothing is read before the archive is written
    assert source.calls == 0
    assert b"".join(bytes(view) for view in stream.ring_chunks(3, 64)) == expected
    assert source.calls == 1  # every entry is read once
    assert stream.size == len(expected)


def test_a_parent_after_a_sibling_that_sorts_between_is_found():
    # "a-b" sorts between "a" and "a/c": the writer must still know "a" when "a/c" comes.
    entries = [d(b"a", 3), d(b"a-b", 2), f(b"a-b0"), d(b"a/c", 2), f(b"a/c/x"), f(b"a/d")]
    members = {m.path: m for m, _data in iter_archive(io.BytesIO(one_pass(entries)))}
    assert members[b"a"].nlink == 3 and members[b"a-b"].nlink == 2 and members[b"a/c"].nlink == 2


@pytest.mark.parametrize("entries, message", [
    ([d(b"a", 2), d(b"a/b", 2)],
     r"cpio entry b'a': nlink 2 declared, but the directory has 1 subdirectories \(nlink 3\)"),
    ([d(b"a", 4), d(b"a/b", 2), f(b"a/c")], r"b'a': nlink 4 declared, but the directory has 1 subdirectories"),
    ([d(b"a", 3), d(b"a-b", 2), d(b"a/x", 3), d(b"a/x/y", 2), d(b"a/x/z", 2)], r"b'a/x': nlink 3 declared.* 2 sub"),
    ([d(b"a")], r"cpio entry b'a': directory without nlink"),
    ([f(b"a", b"x", hardlink_key=1)], r"cpio entry b'a': hardlink without nlink"),
    ([f(b"a", b"x", hardlink_key=1, nlink=2), f(b"b", b"x", hardlink_key=1, nlink=3)],
     r"cpio entry b'b': hardlink of b'a' with a different nlink"),
    ([f(b"a", b"x", hardlink_key=1, nlink=1), f(b"b", b"x", hardlink_key=1, nlink=1)],
     r"cpio entry b'b': hardlink of b'a': the group has more links than its nlink 1"),
    ([f(b"a", b"x", hardlink_key="k", nlink=3), f(b"b", b"x", hardlink_key="k", nlink=3), f(b"c")],
     r"cpio entry b'a': hardlink group has 2 links, its nlink says 3"),
    ([d(b"a", 1)], r"nlink 1 of a directory is below 2"),
    ([d(b"a", 0x100000000)], r"nlink 4294967296 does not fit 32 bits"),
    ([f(b"a", nlink=2)], r"nlink 2 on an entry that is neither a directory nor a hardlink"),
    ([d(b"a", 2), f(b"b/c")], r"cpio entry b'b/c': parent directory b'b' is not an entry of the archive"),
    ([f(b"a"), f(b"a/b")], r"parent directory b'a' is not an entry"),
    ([d(b"a", 2), d(b"a", 2)], r"cpio entry b'a': duplicate path"),
    ([f(b"b"), f(b"a")], r"entries are not in bytewise path order \(after b'b'\)"),
])
def test_a_wrong_or_missing_count_and_every_old_refusal_hold_in_one_pass(entries, message):
    with pytest.raises(CpioFormatError, match=message):
        one_pass(entries)


def test_the_largest_link_counts_fit_the_group_records():
    # nlink up to 2**32 - 1 fits the writer's 32-bit records; the writer counts the links, so a
    # count the entries do not reach is refused, whatever its size.
    with pytest.raises(CpioFormatError, match="nlink 4294967295 declared"):
        one_pass([d(b"a", 0xFFFFFFFF)])
    with pytest.raises(CpioFormatError, match="hardlink group has 1 links, its nlink says 4294967295"):
        one_pass([f(b"a", b"x", hardlink_key=0, nlink=0xFFFFFFFF)], hardlink_groups=1)
    ((member, data),) = [(m, data.read()) for m, data in iter_archive(io.BytesIO(
        one_pass([f(b"a", b"x", hardlink_key=0, nlink=1)], hardlink_groups=1)))]
    assert member.nlink == 1 and data == b"x"


def test_inode_numbers_run_out_in_one_pass():
    with pytest.raises(CpioFormatError, match="inode number 4294967296 does not fit 32 bits"):
        one_pass([f(b"a"), f(b"b")], inode_start=0xFFFFFFFF)
    assert one_pass([f(b"a")], inode_start=0xFFFFFFFF)


def test_entry_is_a_cheap_immutable_tuple():
    entry = f(b"a", b"x")
    with pytest.raises(AttributeError):
        entry.size = 2  # type: ignore[misc]
    assert entry._replace(path=b"b").path == b"b" and entry.path == b"a"
    assert hash(entry) == hash(f(b"a", b"x"))


# -- the EIF writer: a section whose size is known at its end -------------------------------------


def eif_inputs(ramdisk) -> dict:
    return dict(kernel=b"K" * 1000, cmdline="console=ttyS0", metadata=b'{"ImageName":"x"}',
                ramdisks=[b"bootstrap" * 10, ramdisk])


def archive_entries() -> list[CpioEntry]:
    rng = random.Random(3)
    return _with_link_counts([d(b"d"), d(b"d/e")] + [f(b"d/e/f%03d" % i, rng.randbytes(rng.randrange(5000)))
                                                     for i in range(300)] + [f(b"z", b"tail")])


def test_an_eif_from_a_stream_of_unknown_size_is_byte_identical(tmp_path):
    entries = archive_entries()
    expected = b"".join(CpioArchive(entries).chunks())
    known = write_eif(tmp_path / "known.eif", **eif_inputs(BytesSource(expected)))
    stream = CpioStream(lambda: iter(entries))
    unknown = write_eif(tmp_path / "unknown.eif", **eif_inputs(stream))
    assert (tmp_path / "unknown.eif").read_bytes() == (tmp_path / "known.eif").read_bytes()
    assert unknown == known
    # measure: no file, the same measurements and CRC, the stream's size known from the first write
    assert write_eif(None, **eif_inputs(CpioStream(lambda: iter(entries)))) == known


def test_a_signed_eif_places_the_signature_after_the_section_of_unknown_size(tmp_path):
    key, pem = make_signer("P-384")
    entries = archive_entries()
    result = write_eif(tmp_path / "s.eif", signer=Pcr0Signer(key, pem), **eif_inputs(CpioStream(lambda: iter(entries))))
    data = (tmp_path / "s.eif").read_bytes()
    with EifReader.from_bytes(data) as reader:
        assert not reader.defects
        ramdisk, signature = reader.sections[-2], reader.sections[-1]
        assert signature.offset == ramdisk.offset + 12 + ramdisk.size == result.sections[-1].offset
        assert data[ramdisk.offset + 12:][:ramdisk.size] == b"".join(CpioArchive(entries).chunks())
        assert reader.header.crc32 == zlib.crc32(data[HEADER_SIZE:], zlib.crc32(data[:CRC_OFFSET])) == result.crc32


def test_a_refused_entry_mid_stream_leaves_no_output_file(tmp_path):
    entries = archive_entries()
    bad = entries[:200] + [entries[150]] + entries[200:]  # a duplicate after 1 MiB of data
    target = tmp_path / "out.eif"
    with pytest.raises(CpioFormatError, match="entries are not in bytewise path order"):
        write_eif(target, **eif_inputs(CpioStream(lambda: iter(bad))))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CpioFormatError, match="nlink 3 declared"):  # the count is checked before the file is kept
        write_eif(target, **eif_inputs(CpioStream(lambda: iter([d(b"a", 3)]))))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length, offset, width", [(12, 0, 12), (1000, 988, 12), (1 << 20, 12345, 12), (9, 3, 1)])
def test_crc32_replace_agrees_with_a_fresh_crc(length, offset, width):
    rng = random.Random(length)
    message = bytearray(rng.randbytes(length))
    old, new = bytes(message[offset:offset + width]), rng.randbytes(width)
    crc = zlib.crc32(message)
    message[offset:offset + width] = new
    assert crc32_replace(crc, length, offset, old, new) == zlib.crc32(message)
    with pytest.raises(ValueError):
        crc32_replace(crc, length, length - width + 1, old, new)


def test_streams_share_no_state_between_writes():
    entries = _with_link_counts(random_tree(5))
    stream = CpioStream(lambda: iter(entries))
    first, second = (b"".join(stream.chunks()) for _ in itertools.repeat(None, 2))
    assert first == second
