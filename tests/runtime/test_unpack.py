"""Tests for qtbuild.runtime.unpack: safe extraction of cpio newc archives, hostile archives included."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess

import pytest

from qtbuild.formats.cpio import CpioArchive, CpioEntry
from qtbuild.formats.errors import CpioFormatError
from qtbuild.runtime.sandbox.subids import IdRange
from qtbuild.runtime.unpack import UnpackReport, unpack_archive

DIR, REG, LNK = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
CPIO = shutil.which("cpio")


def raw_member(name: bytes, mode: int = REG | 0o644, data: bytes = b"", *, ino: int = 1, nlink: int = 1,
               mtime: int = 0) -> bytes:
    """A newc member built by hand (so hostile names the writer refuses can be produced)."""
    fields = [ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % value for value in fields) + name + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def raw_archive(*members: bytes) -> bytes:
    return b"".join(members) + raw_member(b"TRAILER!!!", 0)


def written(entries) -> bytes:
    out = io.BytesIO()
    CpioArchive(entries).write_to(out)
    return out.getvalue()


@pytest.fixture
def area(tmp_path):
    """(dest, sentinel): dest is where archives go; sentinel is a sibling that must stay untouched."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_bytes(b"keep")
    dest = tmp_path / "dest"
    yield dest, sentinel
    assert sorted(os.listdir(tmp_path)) == ["dest", "sentinel"] or sorted(os.listdir(tmp_path)) == ["sentinel"]
    assert os.listdir(sentinel) == ["keep"]
    assert (sentinel / "keep").read_bytes() == b"keep"


def unpack(blob: bytes, dest, **kwargs) -> UnpackReport:
    return unpack_archive(io.BytesIO(blob), dest, **kwargs)


# -- round trip -----------------------------------------------------------------------------------


TREE = [
    CpioEntry(b"etc", DIR | 0o755, mtime=1_000),
    CpioEntry(b"etc/hosts", REG | 0o644, mtime=2_000, size=6, data=b"hosts\n"),
    CpioEntry(b"ro", DIR | 0o555, mtime=3_000),
    CpioEntry(b"ro/inside", REG | 0o400, mtime=4_000, size=2, data=b"ro"),
    CpioEntry(b"ro/sub", DIR | 0o500, mtime=5_000),
    CpioEntry(b"ro/sub/x", REG | 0o755, mtime=6_000, size=0, data=b""),
    CpioEntry(b"link", LNK | 0o777, mtime=7_000, link_target=b"etc/hosts"),
    CpioEntry(b"h1", REG | 0o640, mtime=8_000, size=4, data=b"HARD", hardlink_key="h"),
    CpioEntry(b"etc/h2", REG | 0o640, mtime=8_000, size=4, data=b"HARD", hardlink_key="h"),
    CpioEntry(b"ro/h3", REG | 0o640, mtime=8_000, size=4, data=b"HARD", hardlink_key="h"),
    CpioEntry(b"sticky", DIR | 0o1777, mtime=9_000),
]


def test_round_trip_tree(area):
    dest, _ = area
    report = unpack(written(TREE), dest)
    assert report == UnpackReport(files=4, dirs=4, symlinks=1, hardlinks=2, skipped_devices=[], stripped_setid=[])
    for entry in TREE:
        full = os.path.join(dest, entry.path.decode())
        st_ = os.lstat(full)
        assert stat.S_IFMT(st_.st_mode) == entry.file_type, entry.path
        assert int(st_.st_mtime) == entry.mtime, entry.path
        if entry.file_type == LNK:
            assert os.readlink(full).encode() == entry.link_target
            continue
        assert stat.S_IMODE(st_.st_mode) == stat.S_IMODE(entry.mode), entry.path
        if entry.file_type == REG:
            with open(full, "rb") as fh:
                assert fh.read() == entry.data
    assert os.path.samefile(dest / "h1", dest / "etc" / "h2")
    assert os.path.samefile(dest / "h1", dest / "ro" / "h3")
    assert os.lstat(dest / "h1").st_nlink == 3
    _make_writable(dest)


def _make_writable(root) -> None:
    """Let tmp_path cleanup remove read-only directories (matters when not root)."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)


def test_hardlinks_with_data_on_first_link(area):
    """Other writers (and the kernel) also accept the data on the first link."""
    dest, _ = area
    blob = raw_archive(raw_member(b"a", data=b"first", ino=7, nlink=2), raw_member(b"b", ino=7, nlink=2))
    report = unpack(blob, dest)
    assert (report.files, report.hardlinks) == (1, 1)
    assert (dest / "b").read_bytes() == b"first" and os.path.samefile(dest / "a", dest / "b")


def test_dangling_hardlink_group_gives_empty_file(area):
    dest, _ = area
    report = unpack(raw_archive(raw_member(b"a", ino=9, nlink=3)), dest)
    assert report.files == 1 and (dest / "a").read_bytes() == b""


def test_overlay_rules(area):
    dest, _ = area
    dest.mkdir()
    (dest / "d").mkdir(mode=0o700)
    (dest / "f").write_bytes(b"old")
    blob = raw_archive(raw_member(b"d", DIR | 0o751), raw_member(b"f", LNK | 0o777, b"d"),
                       raw_member(b"emptydir", DIR | 0o755), raw_member(b"emptydir", REG | 0o644, b"now a file"))
    report = unpack(blob, dest)
    assert stat.S_IMODE(os.lstat(dest / "d").st_mode) == 0o751
    assert os.readlink(dest / "f") == "d"
    assert (dest / "emptydir").read_bytes() == b"now a file"
    assert report.dirs == 2


@pytest.mark.root  # chown to other users
def test_preserve_owner(area):
    dest, _ = area
    blob = written([CpioEntry(b"f", REG | 0o644, uid=1234, gid=4321),
                    CpioEntry(b"l", LNK | 0o777, uid=1235, gid=4322, link_target=b"/nowhere")])
    unpack(blob, dest, preserve_owner=True)
    assert (os.lstat(dest / "f").st_uid, os.lstat(dest / "f").st_gid) == (1234, 4321)
    assert (os.lstat(dest / "l").st_uid, os.lstat(dest / "l").st_gid) == (1235, 4322)
    unpack(blob, dest / "plain")
    assert os.lstat(dest / "plain" / "f").st_uid == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to other users needs root")
def test_owners_shifted_into_a_subordinate_range(area):
    dest, _ = area
    ids = IdRange(uid=300000, gid=400000, count=65536)
    blob = written([CpioEntry(b"d", DIR | 0o755, uid=0, gid=0), CpioEntry(b"d/f", REG | 0o644, uid=1000, gid=65534),
                    CpioEntry(b"d/l", LNK | 0o777, uid=65535, gid=1, link_target=b"f")])
    unpack(blob, dest, preserve_owner=True, ids=ids)
    owners = {name: (os.lstat(dest / name).st_uid, os.lstat(dest / name).st_gid) for name in ("d", "d/f", "d/l")}
    assert owners == {"d": (300000, 400000), "d/f": (301000, 465534), "d/l": (365535, 400001)}
    outside = written([CpioEntry(b"g", REG | 0o644, uid=65536, gid=0)])
    with pytest.raises(CpioFormatError, match=r"owner 65536:0 is outside the 65536 ids mapped into the enclave"):
        unpack(outside, dest / "other", preserve_owner=True, ids=ids)


# -- hostile archives ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "members, match",
    [
        ([raw_member(b"../x", data=b"evil")], r"\.\. component"),
        ([raw_member(b"ok", DIR | 0o755), raw_member(b"ok/../../x", data=b"evil")], r"\.\. component"),
        ([raw_member(b"/abs", data=b"evil")], "absolute"),
        ([raw_member(b"missing/x", data=b"evil")], "parent directory is missing"),
        ([raw_member(b"file", data=b"x"), raw_member(b"file/x", data=b"evil")], "symlink or not a directory"),
        ([raw_member(b"d", DIR | 0o755), raw_member(b"d/c", data=b"x"), raw_member(b"d", data=b"f")],
         "non-empty directory"),
    ],
)
def test_hostile_paths_are_refused(area, members, match):
    dest, _ = area
    with pytest.raises(CpioFormatError, match=match):
        unpack(raw_archive(*members), dest)


def test_symlink_to_outside_then_write_through_it(area):
    dest, sentinel = area
    blob = raw_archive(raw_member(b"a", LNK | 0o777, str(sentinel).encode()),
                       raw_member(b"a/evil", data=b"pwned"))
    with pytest.raises(CpioFormatError, match=r"b'a/evil'.*symlinks are not followed"):
        unpack(blob, dest)


def test_symlink_to_dotdot_then_write_through_it(area):
    dest, _ = area
    blob = raw_archive(raw_member(b"up", LNK | 0o777, b".."),
                       raw_member(b"up/sentinel/keep", data=b"pwned"))
    with pytest.raises(CpioFormatError, match="symlinks are not followed"):
        unpack(blob, dest)
    blob = raw_archive(raw_member(b"up", LNK | 0o777, b".."), raw_member(b"up/new", DIR | 0o755))
    with pytest.raises(CpioFormatError, match="symlinks are not followed"):
        unpack(blob, dest)


def test_file_over_symlink_replaces_the_link_not_its_target(area):
    dest, sentinel = area
    blob = raw_archive(raw_member(b"a", LNK | 0o777, str(sentinel / "keep").encode()),
                       raw_member(b"a", data=b"inside"))
    unpack(blob, dest)
    assert not os.path.islink(dest / "a") and (dest / "a").read_bytes() == b"inside"


@pytest.mark.parametrize("replacement", ["symlink", "dir", "plain file"])
def test_hardlink_to_missing_inode_is_refused(area, replacement):
    """The first link of an inode is replaced before the link carrying the data arrives."""
    dest, sentinel = area
    replacements = {
        "symlink": raw_member(b"a", LNK | 0o777, str(sentinel / "keep").encode()),
        "dir": raw_member(b"a", DIR | 0o755),
        "plain file": raw_member(b"a", data=b"other inode", ino=99),
    }
    blob = raw_archive(raw_member(b"a", ino=5, nlink=2), replacements[replacement],
                       raw_member(b"b", data=b"pwned", ino=5, nlink=2))
    with pytest.raises(CpioFormatError, match="b'b': its hardlink source was removed or replaced"):
        unpack(blob, dest)
    _make_writable(dest)


def test_devices_fifos_sockets_are_skipped(area):
    dest, _ = area
    blob = written([CpioEntry(b"dev", DIR | 0o755),
                    CpioEntry(b"dev/sda", stat.S_IFBLK | 0o660, rdev=(8, 0)),
                    CpioEntry(b"dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
                    CpioEntry(b"fifo", stat.S_IFIFO | 0o644),
                    CpioEntry(b"sock", stat.S_IFSOCK | 0o755)])
    report = unpack(blob, dest)
    assert report.skipped_devices == [b"dev/null", b"dev/sda", b"fifo", b"sock"]
    assert sorted(os.listdir(dest)) == ["dev"] and os.listdir(dest / "dev") == []


def test_setuid_and_setgid_are_stripped(area):
    dest, _ = area
    blob = written([CpioEntry(b"su", REG | 0o4755, size=1, data=b"x"),
                    CpioEntry(b"sg", REG | 0o2711, size=0, data=b""),
                    CpioEntry(b"gdir", DIR | 0o2775)])
    report = unpack(blob, dest)
    assert sorted(report.stripped_setid) == [b"gdir", b"sg", b"su"]
    assert stat.S_IMODE(os.stat(dest / "su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "sg").st_mode) == 0o711
    assert stat.S_IMODE(os.stat(dest / "gdir").st_mode) == 0o775


def test_keep_setgid_strips_only_setuid(area):
    dest, _ = area
    blob = written([CpioEntry(b"su", REG | 0o6755, size=1, data=b"x"),
                    CpioEntry(b"sg", REG | 0o2711, size=0, data=b""),
                    CpioEntry(b"gdir", DIR | 0o2775)])
    report = unpack(blob, dest, keep_setgid=True)
    assert report.stripped_setid == [b"su"]
    assert stat.S_IMODE(os.stat(dest / "su").st_mode) == 0o2755
    assert stat.S_IMODE(os.stat(dest / "sg").st_mode) == 0o2711
    assert stat.S_IMODE(os.stat(dest / "gdir").st_mode) == 0o2775


def test_malformed_archive_raises_format_error(area):
    dest, _ = area
    blob = written([CpioEntry(b"f", REG | 0o644, size=100, data=b"y" * 100)])
    with pytest.raises(CpioFormatError, match="truncated"):
        unpack(blob[:150], dest)
    with pytest.raises(CpioFormatError, match="truncated"):
        unpack_archive(io.BytesIO(blob), dest / "x", archive_size=150)


def test_long_component_is_a_format_error(area):
    dest, _ = area
    with pytest.raises(CpioFormatError, match="b'xxx"):
        unpack(raw_archive(raw_member(b"x" * 300, data=b"")), dest)


# -- GNU cpio interop -----------------------------------------------------------------------------


@pytest.mark.skipif(CPIO is None, reason="GNU cpio not installed (apt-get install cpio)")
def test_unpack_gnu_cpio_archive(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "file").write_bytes(b"payload")
    os.link(src / "sub" / "file", src / "hard")
    os.symlink("sub/file", src / "sym")
    os.chmod(src / "sub", 0o750)
    names = subprocess.run(["find", "."], cwd=src, capture_output=True, check=True).stdout
    blob = subprocess.run([CPIO, "-o", "-H", "newc", "--quiet"], cwd=src, input=names,
                          capture_output=True, check=True).stdout
    dest = tmp_path / "dest"
    report = unpack(blob, dest)
    assert (report.files, report.hardlinks, report.symlinks, report.dirs) == (1, 1, 1, 1)
    assert (dest / "hard").read_bytes() == b"payload"
    assert os.path.samefile(dest / "hard", dest / "sub" / "file")
    assert os.readlink(dest / "sym") == "sub/file"
    assert stat.S_IMODE(os.stat(dest / "sub").st_mode) == 0o750
