"""cpio "newc" (SVR4 portable ASCII) codec: a deterministic writer and a bounded, safe reader.

Layout of one member (all numbers are 8 ASCII hex digits)::

    magic "070701" | ino mode uid gid nlink mtime filesize devmajor devminor
                   | rdevmajor rdevminor namesize check
    name + NUL, padded with NULs so that header + name is a multiple of 4
    data (filesize bytes), padded with NULs to a multiple of 4

The archive ends with a member named ``TRAILER!!!``.

Writer (:class:`CpioArchive`) contract
--------------------------------------
* Members are sorted bytewise by path (so every parent precedes its children), inode numbers are
  sequential from ``inode_start`` in archive order (one per inode), and every numeric field is
  written as 8 UPPERCASE hex digits, like the kernel's ``gen_init_cpio`` and GNU cpio.  dev
  major/minor and ``c_check`` are always 0.  The same entries, in any input order, give the same
  bytes.
* Hardlinks (regular files sharing a ``hardlink_key``) share one inode number and carry the true
  link count; like GNU cpio, the data is written only on the LAST link in archive order and the
  earlier links have ``c_filesize`` 0.  All links of a group must agree on mode, uid, gid, mtime
  and size; the data written is the last link's ``data``.
* Directories get nlink = 2 + number of direct subdirectories, other entries 1 (hardlinks: the
  group size).  :class:`CpioStream` writes in one pass, so it takes these counts from the
  entries (``CpioEntry.nlink``) and checks them against the archive as it goes;
  :class:`CpioArchive` counts them itself.
* The trailer is ``TRAILER!!!`` with nlink 1 and every other field 0 (as GNU cpio writes it).
  Unlike GNU cpio and ``gen_init_cpio`` the archive is NOT padded to a 512-byte block after the
  trailer: its size is exactly the sum of its 4-aligned members, which is what :attr:`size` says.
* Refused with :class:`~qtbuild.formats.errors.CpioFormatError` in the constructor, before anything is
  written (what the Linux kernel's ``init/initramfs.c`` would silently drop or fail to create):

  - invalid paths: empty, leading ``/``, empty / ``.`` / ``..`` components, NUL bytes;
  - paths longer than 4095 bytes (``c_namesize``, which counts the NUL, must be <= PATH_MAX 4096,
    else the kernel skips the member) or with a component longer than NAME_MAX 255 bytes;
  - symlink targets that are empty, contain NUL or are longer than 4095 bytes (the kernel skips
    bodies over PATH_MAX and ``symlink(2)`` refuses targets of PATH_MAX bytes or more);
  - regular files of 4 GiB or more (32-bit ``c_filesize``);
  - uid, gid, mtime, rdev major/minor or inode numbers outside 0..0xFFFFFFFF;
  - a mode with unknown file type or bits outside ``S_IFMT | 0o7777``;
  - duplicate paths; entries whose parent path is not a directory entry of the same archive;
  - ``hardlink_key`` on a non-regular entry, or a hardlink group with inconsistent metadata;
  - ``data`` on non-regular entries, ``link_target`` on non-symlinks, ``bytes`` data whose length
    differs from ``size``, or no data with a non-zero size;
  - a declared ``nlink`` that disagrees with the archive (a directory's subdirectories, a
    hardlink group's links), is below 2 on a directory, or is not 1 on any other non-hardlink.

  A ``data`` stream yielding more or fewer bytes than ``size`` at write time also raises
  :class:`CpioFormatError` (the archive is then incomplete, never silently corrupt).

Reader (:func:`iter_archive`) contract
--------------------------------------
* Accepts magic ``070701`` and ``070702`` (the "crc" variant; its checksum is NOT verified).
  Hex fields may be upper or lower case; anything else is rejected.  Padding bytes are not checked.
* Every malformed input raises :class:`CpioFormatError` naming the field and byte offset
  (relative to where the archive starts in the stream); reads are bounded by ``max_name``,
  ``max_link_target`` and a 1 MiB chunk, so a hostile size never allocates more than the input.
* A leading ``./`` (archives of ``find .``) is removed and the root entry ``.`` (or ``./``) is
  skipped; it must be a directory.  Remaining paths must be canonical as for the writer.
* Iteration stops at ``TRAILER!!!``; the stream is left just after the trailer member.  The
  kernel instead keeps reading: concatenated archives (optionally separated by NUL padding) are
  unpacked one after another, so skip any NUL padding and call :func:`iter_archive` again to
  read the next one.
"""

from __future__ import annotations

import functools
import io
import re
import stat
from array import array
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from qtbuild.formats.errors import CpioFormatError

__all__ = [
    "CpioArchive",
    "CpioEntry",
    "CpioMember",
    "MemberData",
    "iter_archive",
    "path_problem",
]

MAGIC_NEWC = b"070701"
MAGIC_CRC = b"070702"
HEADER_SIZE = 110
TRAILER_NAME = b"TRAILER!!!"
PATH_MAX = 4096
NAME_MAX = 255
MAX_PATH_BYTES = PATH_MAX - 1
MAX_LINK_TARGET_BYTES = PATH_MAX - 1
U32_MAX = 0xFFFFFFFF
CHUNK_SIZE = 1 << 20
#: A file at least this large is yielded by :meth:`CpioStream.ring_chunks` as the pieces its stream
#: reads (immutable ``bytes``), not copied into the ring: a second copy of every large file's data
#: was most of the writer's own CPU time besides Python.
PASS_THROUGH = 256 << 10

_FIELDS = (
    "c_ino", "c_mode", "c_uid", "c_gid", "c_nlink", "c_mtime", "c_filesize",
    "c_devmajor", "c_devminor", "c_rdevmajor", "c_rdevminor", "c_namesize", "c_check",
)
_HEX8 = re.compile(rb"[0-9A-Fa-f]{8}")
_S_IFREG = stat.S_IFREG
_FILE_TYPES = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)


def _pad4(n: int) -> int:
    """Number of NUL bytes that align ``n`` up to a multiple of 4."""
    return -n % 4


def path_problem(path: bytes) -> str | None:
    """Why ``path`` is not a canonical archive path, or None if it is.

    Canonical: non-empty, relative, ``/``-separated, no NUL, no empty, ``.`` or ``..`` component.
    Length limits are the caller's business.
    """
    if not path:
        return "empty path"
    if b"\0" in path:
        return "NUL byte in path"
    if path.startswith(b"/"):
        return "absolute path"
    for component in path.split(b"/"):
        if component in (b"", b".", b".."):
            return f"{component.decode('ascii') or 'empty'!s} component in path"
    return None


#: A member's header, name, NUL and padding in one format operation: the 13 fields, the name,
#: then the NUL and padding as one of :data:`_NULS` (the writer formats one per member).
_MEMBER_HEAD = MAGIC_NEWC + b"%08X" * len(_FIELDS) + b"%s%s"
#: :data:`_MEMBER_HEAD` for the usual member, whose dev and rdev numbers are 0 (fewer numbers to
#: format): c_ino, c_mode to c_mtime already formatted, c_filesize, c_namesize, the name, then the
#: NUL and padding.
_PLAIN_HEAD = MAGIC_NEWC + b"%08X%s%08X" + b"0" * 32 + b"%08X" + b"0" * 8 + b"%s%s"
#: 1 to 4 NULs: a name's terminating NUL plus the padding that aligns header + name to 4 bytes.
_NULS = (b"", b"\0", b"\0\0", b"\0\0\0", b"\0\0\0\0")
#: NUL padding that aligns data of length n to 4 bytes, indexed by n % 4.
_DATA_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


def _member_bytes(header_values: tuple[int, ...], name: bytes) -> bytes:
    """Header, name, NUL and padding: everything before a member's data."""
    return _MEMBER_HEAD % (*header_values, name, _NULS[1 + _pad4(HEADER_SIZE + len(name) + 1)])


def _member_size(name: bytes, filesize: int) -> int:
    head = HEADER_SIZE + len(name) + 1
    return head + _pad4(head) + filesize + _pad4(filesize)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class CpioEntry(NamedTuple):
    """One file to archive; see the module docstring for what :class:`CpioArchive` accepts.

    A named tuple, not a frozen dataclass: immutable all the same, and built in a third of the
    time (one is built per file of every image converted).  Change a field with ``_replace``.

    ``nlink``: the member's link count, which :class:`CpioStream` writes before it has seen the
    entries that decide it: a directory's 2 + its direct subdirectories, a hardlink's number of
    links in its group.  :class:`CpioStream` needs it on every directory and hardlink;
    :class:`CpioArchive` counts it when it is None.  Other entries have None (or 1).  A declared
    count is checked against the archive as it is written.

    ``data``: ``bytes``, or a callable opening a binary stream of the file's data, read with
    ``readinto`` (or ``read``) and then closed.  A stream whose data is in memory already may offer
    ``read_view()``: everything it has left as one ``bytes`` or byte ``memoryview``, without a copy
    (:mod:`qtbuild.convert.kept_layers` does); the writer then copies it in one step.
    """

    path: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    link_target: bytes | None = None
    rdev: tuple[int, int] = (0, 0)
    data: bytes | Callable[[], BinaryIO] | None = None
    hardlink_key: Hashable | None = None
    nlink: int | None = None

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)


def _refuse(path: bytes, problem: str) -> CpioFormatError:
    return CpioFormatError(f"cpio entry {path!r}: {problem}")


def _check_u32(entry: CpioEntry, what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U32_MAX:
        raise _refuse(entry.path, f"{what} {value!r} does not fit 32 bits unsigned")


def _check_path(entry: CpioEntry) -> None:
    if not isinstance(entry.path, bytes):
        raise _refuse(entry.path, "path must be bytes")
    problem = path_problem(entry.path)
    if problem:
        raise _refuse(entry.path, problem)
    if len(entry.path) > MAX_PATH_BYTES:
        raise _refuse(entry.path[:64] + b"...",
                      f"path of {len(entry.path)} bytes exceeds {MAX_PATH_BYTES} "
                      f"(c_namesize incl. NUL must be <= PATH_MAX {PATH_MAX})")
    longest = max(len(c) for c in entry.path.split(b"/"))
    if longest > NAME_MAX:
        raise _refuse(entry.path, f"path component of {longest} bytes exceeds NAME_MAX {NAME_MAX}")


def _check_mode(entry: CpioEntry) -> None:
    _check_u32(entry, "mode", entry.mode)
    if entry.file_type not in _FILE_TYPES:
        raise _refuse(entry.path, f"mode {entry.mode:#o} has no known file type")
    if entry.mode & ~(stat.S_IFMT(entry.mode) | 0o7777):
        raise _refuse(entry.path, f"mode {entry.mode:#o} has bits outside S_IFMT|0o7777")


def _check_regular(entry: CpioEntry) -> None:
    if isinstance(entry.size, int) and entry.size > U32_MAX:
        raise _refuse(entry.path, f"size {entry.size} is 4 GiB or more (c_filesize has 32 bits)")
    _check_u32(entry, "size", entry.size)
    data = entry.data
    if data is None:
        if entry.size:
            raise _refuse(entry.path, f"size {entry.size} but no data")
    elif isinstance(data, (bytes, bytearray)):
        if len(data) != entry.size:
            raise _refuse(entry.path, f"size {entry.size} but data has {len(data)} bytes")
    elif not callable(data):
        raise _refuse(entry.path, f"data must be bytes or a callable, not {type(data).__name__}")


def _check_symlink(entry: CpioEntry) -> None:
    target = entry.link_target
    if not isinstance(target, bytes) or not target:
        raise _refuse(entry.path, "symlink needs a non-empty bytes link_target")
    if b"\0" in target:
        raise _refuse(entry.path, "NUL byte in link_target")
    if len(target) > MAX_LINK_TARGET_BYTES:
        raise _refuse(entry.path, f"link_target of {len(target)} bytes exceeds {MAX_LINK_TARGET_BYTES}")


def _plainly_valid(entry: CpioEntry) -> bool:
    """Whether ``entry`` passes :func:`_check_entry`, tested in a few C-level operations for the
    common case (the scan of a large tree spends most of its time validating).

    True only for entries the full checks accept; False for every entry they refuse and for a
    few odd ones they accept (int subclasses, bytearray data), which they then examine.
    """
    if type(entry) is not CpioEntry:
        return False
    path, mode, uid, gid, mtime, rdev = entry.path, entry.mode, entry.uid, entry.gid, entry.mtime, entry.rdev
    if (type(path) is not bytes or not 0 < len(path) <= MAX_PATH_BYTES or path[0] == 0x2F or b"\0" in path
            or type(mode) is not int or type(uid) is not int or type(gid) is not int or type(mtime) is not int
            or type(rdev) is not tuple or len(rdev) != 2 or type(rdev[0]) is not int or type(rdev[1]) is not int
            or not (0 <= mode <= 0o177777 and 0 <= uid <= U32_MAX and 0 <= gid <= U32_MAX
                    and 0 <= mtime <= U32_MAX and 0 <= rdev[0] <= U32_MAX and 0 <= rdev[1] <= U32_MAX)):
        return False
    components = path.split(b"/")
    if b"" in components or b"." in components or b".." in components or max(map(len, components)) > NAME_MAX:
        return False
    file_type, data, target, nlink = mode & 0o170000, entry.data, entry.link_target, entry.nlink
    if file_type == stat.S_IFREG:
        size = entry.size
        return (target is None and type(size) is int and 0 <= size <= U32_MAX
                and (size == 0 if data is None else type(data) is not bytes and callable(data)
                     or type(data) is bytes and len(data) == size)
                and (nlink is None or type(nlink) is int and (nlink == 1 or entry.hardlink_key is not None
                                                              and 0 < nlink <= U32_MAX)))
    if data is not None or entry.hardlink_key is not None:
        return False
    if file_type == stat.S_IFDIR:
        return target is None and (nlink is None or type(nlink) is int and 2 <= nlink <= U32_MAX)
    if nlink is not None and (type(nlink) is not int or nlink != 1):
        return False
    if file_type == stat.S_IFLNK:
        return type(target) is bytes and 0 < len(target) <= MAX_LINK_TARGET_BYTES and b"\0" not in target
    return target is None and file_type in _FILE_TYPES


def _plain_rdev(rdev: object) -> bool:
    """Whether ``rdev`` is a (major, minor) pair the checks accept."""
    return (type(rdev) is tuple and len(rdev) == 2 and type(rdev[0]) is int and type(rdev[1]) is int
            and not (rdev[0] | rdev[1]) >> 32)


def _check_entry(entry: CpioEntry) -> None:
    """Refuse everything about one entry that does not depend on the other entries."""
    if not _plainly_valid(entry):
        _check_entry_fully(entry)


def _check_entry_fully(entry: CpioEntry) -> None:
    """:func:`_check_entry` one check at a time, each naming what it refuses."""
    if not isinstance(entry, CpioEntry):
        raise CpioFormatError(f"expected CpioEntry, got {type(entry).__name__}")
    _check_path(entry)
    _check_mode(entry)
    for what in ("uid", "gid", "mtime"):
        _check_u32(entry, what, getattr(entry, what))
    if not (isinstance(entry.rdev, tuple) and len(entry.rdev) == 2):
        raise _refuse(entry.path, f"rdev {entry.rdev!r} is not a (major, minor) pair")
    for what, value in zip(("rdev major", "rdev minor"), entry.rdev, strict=True):
        _check_u32(entry, what, value)
    is_reg, is_lnk = entry.file_type == stat.S_IFREG, entry.file_type == stat.S_IFLNK
    if entry.data is not None and not is_reg:
        raise _refuse(entry.path, "data on a non-regular entry")
    if entry.hardlink_key is not None and not is_reg:
        raise _refuse(entry.path, "hardlink_key on a non-regular entry (hardlink groups must be regular files)")
    if entry.link_target is not None and not is_lnk:
        raise _refuse(entry.path, "link_target on a non-symlink entry")
    if is_reg:
        _check_regular(entry)
    elif is_lnk:
        _check_symlink(entry)
    if entry.nlink is not None:
        _check_nlink(entry)


def _check_nlink(entry: CpioEntry) -> None:
    _check_u32(entry, "nlink", entry.nlink)
    if entry.file_type == stat.S_IFDIR:
        if entry.nlink < 2:  # type: ignore[operator]
            raise _refuse(entry.path, f"nlink {entry.nlink} of a directory is below 2 (itself and its . entry)")
    elif entry.hardlink_key is not None:
        if entry.nlink < 1:  # type: ignore[operator]
            raise _refuse(entry.path, "nlink 0 of a hardlink")
    elif entry.nlink != 1:
        raise _refuse(entry.path, f"nlink {entry.nlink} on an entry that is neither a directory nor a hardlink")


_LINK_FIELDS = ("mode", "uid", "gid", "mtime", "size")


class _Groups:
    """The hardlink groups one writing pass has seen so far, in columns of machine integers.

    Per group: the links seen so far, its nlink and the attributes of its first link (mode, uid,
    gid, mtime, size: all checked to fit 32 bits before they get here) and its inode number — 32
    bytes, not a Python object per group (an image where half the files are hardlinks has one
    group per two files).  Groups are numbered densely: by the caller when it declares ``dense``
    groups (every key then is an int in ``range(dense)``), else here in order of first
    appearance, through a key → number dict.  The first link's path is not kept: the rare error
    that names it finds it by reading the entries again.
    """

    def __init__(self, dense: int | None):
        self._numbers: dict[Hashable, int] | None = None if dense is not None else {}
        self._dense = dense or 0
        self.seen = array("I", [0]) * self._dense
        self.nlink = array("I", [0]) * self._dense
        self.attributes = array("I", [0]) * (len(_LINK_FIELDS) * self._dense)
        self.ino = array("I", [0]) * self._dense

    def number(self, key: Hashable, path: bytes) -> int:
        """The group number of ``key``, creating its (empty) group on first sight."""
        numbers = self._numbers
        if numbers is None:
            if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < self._dense:
                raise _refuse(path, f"hardlink_key {key!r} is not an int in range({self._dense}) "
                                    f"(hardlink_groups={self._dense})")
            return key
        number = numbers.get(key)
        if number is None:
            number = numbers[key] = len(numbers)
            self.seen.append(0)
            self.nlink.append(0)
            self.attributes.extend([0] * len(_LINK_FIELDS))
            self.ino.append(0)
        return number

    def key(self, number: int) -> Hashable:
        """The key of group ``number`` (for an error message)."""
        if self._numbers is None:
            return number
        return next(key for key, value in self._numbers.items() if value == number)

    def start(self, number: int, entry: CpioEntry, ino: int) -> None:
        """Record the first link of group ``number`` and the group's inode number."""
        base = number * len(_LINK_FIELDS)
        self.attributes[base:base + len(_LINK_FIELDS)] = array("I", _link_attributes(entry))
        self.nlink[number] = entry.nlink  # type: ignore[assignment]
        self.ino[number] = ino

    def differing_field(self, number: int, entry: CpioEntry) -> str | None:
        """The first of mode, uid, gid, mtime, size, nlink in which ``entry`` differs from the
        group's first link."""
        base = number * len(_LINK_FIELDS)
        for offset, value in enumerate(_link_attributes(entry)):
            if self.attributes[base + offset] != value:
                return _LINK_FIELDS[offset]
        return "nlink" if self.nlink[number] != entry.nlink else None

    def incomplete(self) -> int | None:
        """The first group with fewer links than its nlink, or None (once every entry was seen)."""
        if self.nlink == self.seen:
            return None
        return next(number for number, links in enumerate(self.nlink) if links != self.seen[number])


def _link_attributes(entry: CpioEntry) -> tuple[int, int, int, int, int]:
    return entry.mode, entry.uid, entry.gid, entry.mtime, entry.size


def _find_directory(open_directories: list[list], path: bytes) -> list | None:
    """The record of directory ``path`` among the open directories (prefixes of the current path,
    shortest first), or None."""
    for record in reversed(open_directories):
        if record[0] == path:
            return record
        if len(record[0]) < len(path):
            return None
    return None


def _close_directory(record: list) -> None:
    """Refuse a directory whose subtree has been passed with a different count than it declared."""
    path, nlink, subdirectories = record
    if nlink != 2 + subdirectories:
        raise _refuse(path, f"nlink {nlink} declared, but the directory has {subdirectories} "
                            f"subdirectories (nlink {2 + subdirectories})")


class CpioStream:
    """A deterministic newc archive written in one pass from entries already in archive order.

    ``entries`` is called once for each :meth:`ring_chunks`/:meth:`chunks`/:meth:`write_to`;
    every call must yield the same entries, sorted bytewise by path.  Same contract as
    :class:`CpioArchive` (which is this over a sorted list), except:

    * Each entry is validated as it is written, against the entries before it, so a refused
      entry raises :class:`CpioFormatError` part-way through the output: a caller writing a file
      must then discard it (the EIF writer does).  Out-of-order entries are refused.
    * Every directory and hardlink must declare its ``nlink`` (its header is written before the
      entries that decide it).  The count is checked against the entries: a directory's once its
      subtree has been passed, a hardlink group's when the archive ends.
    * :attr:`size` is None until a pass has completed, then the archive's size; a later pass
      that writes a different size is refused.

    Between entries the writer keeps only the directories that are prefixes of the current path
    (their subtrees may still come) and one record per hardlink group, so an archive of millions
    of files needs neither its entry list nor its paths in memory.

    ``hardlink_groups``: when the caller numbers its hardlink groups densely, their count; every
    ``hardlink_key`` must then be an int in ``range(hardlink_groups)`` (others are refused), and a
    group's record is array slots at that index, with no dict from keys (32 bytes a group instead
    of ~120 with the dict).  The output bytes do not depend on the keys.
    """

    def __init__(self, entries: Callable[[], Iterable[CpioEntry]], *, inode_start: int = 1,
                 hardlink_groups: int | None = None, _checked: bool = False):
        if not isinstance(inode_start, int) or inode_start < 0:
            raise CpioFormatError(f"inode_start {inode_start!r} must be a non-negative integer")
        if hardlink_groups is not None and (not isinstance(hardlink_groups, int) or hardlink_groups < 0):
            raise CpioFormatError(f"hardlink_groups {hardlink_groups!r} must be a non-negative integer")
        self._entries = entries
        self._inode_start = inode_start
        self._hardlink_groups = hardlink_groups
        self._checked = _checked
        self.size: int | None = None

    def _members(self) -> Iterator[tuple[CpioEntry, int, int, int]]:
        """One pass: every member as ``(entry, inode number, link count, data size)``, each entry
        validated against those before it; declared link counts are checked as their directory's
        subtree, or the archive, ends."""
        checked, groups = self._checked, _Groups(self._hardlink_groups)
        # [path, nlink, subdirectories seen] of each directory whose subtree may still come: all
        # prefixes of the previous path, each followed there by "/" or a byte below it.
        open_directories: list[list] = []
        top: bytes | None = None  # the path of open_directories[-1]
        previous: bytes | None = None
        last_parent, parent_record = b"", None
        next_ino = self._inode_start
        plain_rdev: object = (0, 0)  # the last rdev that passed the checks (most entries share one tuple)
        for entry in self._entries():
            # The common case in a few C-level operations: a plain regular file in the directory
            # entered last.  Its parent is a directory entry already checked, so of its path only
            # the last component and the length need checking.  An entry passes here only if
            # _check_entry and the checks below would accept it, with the same inode and size;
            # any other takes them (tests/formats/test_writer_fast_path.py).
            if type(entry) is CpioEntry:
                path, mode, uid, gid, mtime, size, target, rdev, data, key, nlink = entry
                if (type(path) is bytes and type(mode) is int and mode & 0o170000 == _S_IFREG
                        and type(uid) is int and type(gid) is int and type(mtime) is int and type(size) is int
                        and not (mode >> 16 | (uid | gid | mtime | size) >> 32)
                        and target is None and key is None and (nlink is None or nlink == 1 and type(nlink) is int)
                        and (data is None and not size or type(data) is bytes and len(data) == size
                             or data is not None and type(data) is not bytes and callable(data))
                        and (rdev is plain_rdev or _plain_rdev(rdev))
                        and len(path) <= MAX_PATH_BYTES and next_ino <= U32_MAX):
                    parent, _slash, name = path.rpartition(b"/")
                    if (parent == top and path > previous  # type: ignore[operator]
                            and name and len(name) <= NAME_MAX and name != b"." and name != b".."
                            and b"\0" not in name):
                        plain_rdev, previous = rdev, path
                        ino, next_ino = next_ino, next_ino + 1
                        yield entry, ino, 1, size
                        continue
            if not checked:
                _check_entry(entry)
            path = entry.path
            if previous is not None and path <= previous:
                raise _refuse(path, "duplicate path" if path == previous else
                              f"entries are not in bytewise path order (after {previous!r})")
            previous = path
            while open_directories:
                top = open_directories[-1][0]
                if path.startswith(top) and path[len(top)] <= 0x2F:  # top/... may still follow
                    break
                _close_directory(open_directories.pop())
                top = open_directories[-1][0] if open_directories else None
            parent = path.rpartition(b"/")[0]
            if parent and parent != last_parent:  # siblings come in a row: find their parent once
                parent_record = _find_directory(open_directories, parent)
                if parent_record is None:
                    raise _refuse(path, f"parent directory {parent!r} is not an entry of the archive")
                last_parent = parent
            key = entry.hardlink_key
            if key is None:
                if next_ino > U32_MAX:
                    raise _refuse(path, f"inode number {next_ino} does not fit 32 bits")
                ino, next_ino = next_ino, next_ino + 1
                if entry.mode & 0o170000 != stat.S_IFDIR:
                    yield entry, ino, 1, _plain_filesize(entry)
                    continue
                nlink = entry.nlink
                if nlink is None:
                    raise _refuse(path, "directory without nlink (written in one pass, a directory must "
                                        "declare its link count: 2 + its subdirectories)")
                if parent:
                    parent_record[2] += 1  # type: ignore[index]
                open_directories.append([path, nlink, 0])
                top = path
                yield entry, ino, nlink, 0
                continue
            nlink = entry.nlink
            if nlink is None:
                raise _refuse(path, "hardlink without nlink (written in one pass, a hardlink must "
                                    "declare its group's link count)")
            group = groups.number(key, path)
            seen = groups.seen[group]
            if not seen:
                if next_ino > U32_MAX:
                    raise _refuse(path, f"inode number {next_ino} does not fit 32 bits")
                groups.start(group, entry, next_ino)
                next_ino += 1
            else:
                field = groups.differing_field(group, entry)
                if field is not None:
                    raise _refuse(path, f"hardlink of {self._first_link(key)!r} with a different {field}")
            seen += 1
            if seen > nlink:
                raise _refuse(path, f"hardlink of {self._first_link(key)!r}: the group has more links "
                                    f"than its nlink {nlink}")
            groups.seen[group] = seen
            # Like GNU cpio, the data goes with the last link; the others have c_filesize 0.
            yield entry, groups.ino[group], nlink, entry.size if seen == nlink else 0
        while open_directories:
            _close_directory(open_directories.pop())
        short = groups.incomplete()
        if short is not None:
            first = self._first_link(groups.key(short))
            raise _refuse(first, f"hardlink group has {groups.seen[short]} links, "
                                 f"its nlink says {groups.nlink[short]}")

    def _first_link(self, key: Hashable) -> bytes:
        """The path of the first entry with ``key`` (for an error message: it is not kept)."""
        return next(entry.path for entry in self._entries() if entry.hardlink_key == key)

    def ring_chunks(self, buffers: int, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        """Yield the archive as views of at most ``chunk_size`` bytes (none is empty): views into a
        ring of ``buffers`` buffers taken in turn, and views of immutable ``bytes``.

        A view into the ring stays unchanged until ``buffers - 1`` more views into the ring have
        been requested; then its buffer is refilled (the contract of
        :class:`~qtbuild.formats.eif_writer.RingSource`).  Headers and the data of files under
        :data:`PASS_THROUGH` bytes are written straight into the buffers — file data with the
        stream's ``readinto`` (or ``read_view``) — so every byte is copied once, and a consumer on other threads gets
        few, large chunks whatever the file sizes; a buffer is full (``chunk_size`` bytes) when
        yielded, except before a larger file.  That file's data is yielded as the ``bytes`` its
        stream's ``read(min(chunk_size, CHUNK_SIZE))`` returns, not copied at all.  Memory:
        ``buffers * chunk_size``.
        """
        if chunk_size <= 0 or buffers < 1:
            raise ValueError("chunk_size and buffers must be positive")
        ring = _Ring(buffers, chunk_size)
        pass_through = PASS_THROUGH if chunk_size >= PASS_THROUGH else U32_MAX + 1
        same: tuple = (-1, -1, -1, -1, -1, b"")
        for entry, ino, nlink, filesize in self._members():
            path, mode, uid, gid, mtime, _size, target, rdev, data, _key, _nlink = entry
            namesize = len(path) + 1
            if rdev[0] or rdev[1]:
                head = _MEMBER_HEAD % (ino, mode, uid, gid, nlink, mtime, filesize, 0, 0, rdev[0], rdev[1],
                                       namesize, 0, path, _NULS[1 + (-namesize - HEADER_SIZE) % 4])
            else:
                # Neighbours mostly share mode, uid, gid, nlink and mtime: their digits are reused.
                if mode != same[0] or uid != same[1] or gid != same[2] or nlink != same[3] or mtime != same[4]:
                    same = (mode, uid, gid, nlink, mtime, b"%08X%08X%08X%08X%08X" % (mode, uid, gid, nlink, mtime))
                head = _PLAIN_HEAD % (ino, same[5], filesize, namesize, path, _NULS[1 + (-namesize - HEADER_SIZE) % 4])
            # The usual member, a small one, fits in the buffer without filling it (padding
            # included): copied in with no generator, its data in one step where it is in memory.
            pos = ring.pos
            start = pos + len(head)
            end = start + filesize
            if end + 3 < chunk_size and filesize < pass_through:
                view = ring.view
                view[pos:start] = head
                if filesize:
                    if target is not None:
                        view[start:end] = target
                    elif type(data) is bytes:  # immutable: its length was checked
                        view[start:end] = data
                    else:
                        _fill(data() if callable(data) else _open_data(entry), view[start:end], path)
                    padded = end + (-filesize & 3)
                    view[end:padded] = _DATA_PADS[filesize & 3]
                    ring.pos = padded
                else:
                    ring.pos = start
                continue
            yield from ring.put(head)
            if filesize:
                if entry.link_target is not None:
                    yield from ring.put(entry.link_target)
                elif filesize >= PASS_THROUGH and chunk_size >= PASS_THROUGH:
                    yield from ring.pass_through(entry, filesize)
                else:
                    yield from ring.read_from(entry, filesize)
                yield from ring.put(_DATA_PADS[filesize % 4])
        yield from ring.put(_member_bytes((0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(TRAILER_NAME) + 1, 0), TRAILER_NAME))
        if ring.pos:
            yield ring.last()
        if self.size is None:
            self.size = ring.written
        elif ring.written != self.size:
            raise CpioFormatError(f"the entries changed between passes: {ring.written} bytes, "
                                  f"planned {self.size}")

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the archive in immutable pieces of at most ``chunk_size`` bytes (never empty),
        which may be kept; file data is read ``chunk_size`` bytes at a time, so memory stays
        bounded by about two chunks whatever the file sizes.  (:meth:`ring_chunks` saves the copy.)"""
        for view in self.ring_chunks(1, chunk_size):
            yield bytes(view)

    def write_to(self, fileobj) -> int:
        """Write the whole archive to ``fileobj``; return the number of bytes written (== size)."""
        written = 0
        for chunk in self.ring_chunks(1):
            fileobj.write(chunk)
            written += len(chunk)
        return written


class _Ring:
    """The writer's buffers, filled in turn: ``pos`` bytes of ``view`` are filled so far.

    Its generator methods yield each buffer (as a view of its filled bytes) the moment it is full.
    A buffer is allocated when its first turn comes, so a small archive costs one buffer's memory.
    """

    def __init__(self, buffers: int, size: int):
        self._views = [memoryview(bytearray(size))]
        self._buffers = buffers
        self._turn = 0
        self.view = self._views[0]
        self.size = size
        #: a passed-through file is read in pieces of at most this: never more than its stream hands over
        #: at once (a re-read layer's pieces are 1 MiB), so a larger buffer does not make it join pieces
        self.piece = min(size, CHUNK_SIZE)
        self.pos = 0
        self.written = 0  # bytes of the buffers yielded so far

    def take(self) -> memoryview:
        """The filled part of the current buffer; the next buffer becomes current."""
        filled = self.view[:self.pos]
        self.written += self.pos
        self._turn = (self._turn + 1) % self._buffers
        if self._turn == len(self._views):
            self._views.append(memoryview(bytearray(self.size)))
        self.view, self.pos = self._views[self._turn], 0
        return filled

    def last(self) -> memoryview:
        """The filled part of the current buffer, when nothing follows (no next buffer is made)."""
        self.written += self.pos
        return self.view[:self.pos]

    def put(self, data: bytes | memoryview) -> Iterator[memoryview]:
        """Copy ``data`` in."""
        pos, end = self.pos, self.pos + len(data)
        if end < self.size:
            self.view[pos:end] = data
            self.pos = end
            return
        done = 0
        while done < len(data):
            step = min(len(data) - done, self.size - self.pos)
            self.view[self.pos:self.pos + step] = data[done:done + step]
            self.pos += step
            done += step
            if self.pos == self.size:
                yield self.take()

    def pass_through(self, entry: CpioEntry, filesize: int) -> Iterator[memoryview]:
        """Yield what is filled of the current buffer, then ``entry``'s data as views of the
        ``bytes`` its stream's ``read`` returns (at most ``piece`` bytes each; a stream whose
        ``read`` gives anything else has it copied), checking it yields exactly ``filesize`` bytes."""
        if self.pos:
            yield self.take()
        stream = _open_data(entry)
        try:
            remaining = filesize
            while remaining:
                piece = stream.read(min(remaining, self.piece))
                if not piece:
                    raise _refuse(entry.path, f"data stream ended after {filesize - remaining} bytes, "
                                              f"size is {filesize}")
                if len(piece) > remaining:
                    raise _refuse(entry.path, f"data stream yielded more than size {filesize} bytes")
                if type(piece) is not bytes:
                    piece = bytes(piece)
                remaining -= len(piece)
                self.written += len(piece)
                yield memoryview(piece)
            if stream.read(1):
                raise _refuse(entry.path, f"data stream yielded more than size {filesize} bytes")
        finally:
            stream.close()

    def read_from(self, entry: CpioEntry, filesize: int) -> Iterator[memoryview]:
        """Read ``entry``'s data straight in, checking its stream yields exactly ``filesize`` bytes
        (a stream with ``read_view`` gives it in one call, see :func:`_fill`)."""
        stream = _open_data(entry)
        try:
            whole = _whole_view(stream, entry.path, filesize)
            if whole is not None:
                yield from self.put(whole)
                return
            readinto = _readinto_of(stream)
            remaining = filesize
            while remaining:
                pos = self.pos
                want = min(remaining, self.size - pos)
                got = readinto(self.view[pos:pos + want])
                if not got:
                    raise _refuse(entry.path, f"data stream ended after {filesize - remaining} bytes, "
                                              f"size is {filesize}")
                if got > want:
                    raise _refuse(entry.path, f"data stream yielded more than size {filesize} bytes")
                remaining -= got
                self.pos = pos + got
                if self.pos == self.size:
                    yield self.take()
            if stream.read(1):
                raise _refuse(entry.path, f"data stream yielded more than size {filesize} bytes")
        finally:
            stream.close()


#: Where :func:`_fill` reads past a file's size, to see that its stream ends there (never read).
_PROBE = memoryview(bytearray(1))


def _fill(stream: BinaryIO, target: memoryview, path: bytes) -> None:
    """Fill ``target`` with the data of ``path`` from ``stream`` (just opened; closed here), checking
    that the stream holds exactly ``len(target)`` bytes: in one step from a stream with
    ``read_view`` (:func:`_whole_view`), else with ``readinto`` (or ``read``)."""
    try:
        filesize = len(target)
        whole = _whole_view(stream, path, filesize)
        if whole is not None:
            target[:] = whole
            return
        readinto = _readinto_of(stream)
        filled = 0
        while filled < filesize:
            got = readinto(target[filled:])
            if not got:
                raise _wrong_length(path, filesize, filled)
            if got > filesize - filled:
                raise _wrong_length(path, filesize, filesize + 1)
            filled += got
        if readinto(_PROBE):  # one byte more than the size is too many
            raise _wrong_length(path, filesize, filesize + 1)
    finally:
        stream.close()


def _whole_view(stream: BinaryIO, path: bytes, filesize: int) -> bytes | memoryview | None:
    """Everything ``stream`` has left, in one call without a copy, when its type offers
    ``read_view`` (see :class:`CpioEntry`), checked to be ``filesize`` bytes; else None."""
    read_view = getattr(type(stream), "read_view", None)
    if read_view is None:
        return None
    whole = read_view(stream)
    if len(whole) != filesize:
        raise _wrong_length(path, filesize, len(whole))
    return whole


def _readinto_of(stream: BinaryIO) -> Callable[[memoryview], int]:
    """``stream``'s ``readinto``, or one made of its ``read`` (:func:`_read_into`)."""
    return getattr(stream, "readinto", None) or functools.partial(_read_into, stream)


def _wrong_length(path: bytes, filesize: int, got: int) -> CpioFormatError:
    """The refusal of a data stream that gave ``got`` bytes (more than ``filesize``: too many)."""
    if got > filesize:
        return _refuse(path, f"data stream yielded more than size {filesize} bytes")
    return _refuse(path, f"data stream ended after {got} bytes, size is {filesize}")


def _read_into(stream: BinaryIO, target: memoryview) -> int:
    """``readinto`` for a stream that only has ``read``; more bytes than fit count as too many."""
    piece = stream.read(len(target))
    if len(piece) > len(target):
        return len(target) + 1
    target[:len(piece)] = piece
    return len(piece)


class CpioArchive(CpioStream):
    """A deterministic newc archive planned from entries in any order; its exact byte size is
    known before writing.

    All validation happens here (see the module docstring): the entries are checked, sorted,
    their undeclared link counts counted, then passed through the writer once without writing.
    ``chunks``/``write_to`` only fail if a ``data`` stream does not yield exactly ``size`` bytes
    (or raises itself).
    """

    def __init__(self, entries: Iterable[CpioEntry], *, inode_start: int = 1):
        ordered = list(entries)
        for entry in ordered:
            _check_entry(entry)
        ordered.sort(key=lambda e: e.path)
        counted = _with_link_counts(ordered)
        super().__init__(lambda: iter(counted), inode_start=inode_start, _checked=True)
        self.size = sum(_member_size(entry.path, filesize) for entry, _ino, _nlink, filesize in self._members()) \
            + _member_size(TRAILER_NAME, 0)


def _with_link_counts(ordered: list[CpioEntry]) -> list[CpioEntry]:
    """``ordered`` with the nlink of each directory and hardlink that did not declare one counted:
    2 + a directory's direct subdirectories, a hardlink group's number of links."""
    subdirectories: dict[bytes, int] = {}
    links: dict[Hashable, int] = {}
    for entry in ordered:
        if entry.file_type == stat.S_IFDIR:
            parent = entry.path.rpartition(b"/")[0]
            subdirectories[parent] = subdirectories.get(parent, 0) + 1
        elif entry.hardlink_key is not None:
            links[entry.hardlink_key] = links.get(entry.hardlink_key, 0) + 1
    counted = []
    for entry in ordered:
        if entry.nlink is None and entry.file_type == stat.S_IFDIR:
            entry = entry._replace(nlink=2 + subdirectories.get(entry.path, 0))
        elif entry.nlink is None and entry.hardlink_key is not None:
            entry = entry._replace(nlink=links[entry.hardlink_key])
        counted.append(entry)
    return counted


def _plain_filesize(entry: CpioEntry) -> int:
    """c_filesize of an entry outside hardlink groups."""
    file_type = entry.file_type
    if file_type == stat.S_IFLNK:
        return len(entry.link_target or b"")
    return entry.size if file_type == stat.S_IFREG else 0


def _open_data(entry: CpioEntry) -> BinaryIO:
    if entry.data is None:
        return io.BytesIO(b"")
    if isinstance(entry.data, (bytes, bytearray)):
        return io.BytesIO(entry.data)
    return entry.data()



# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioMember:
    """One member as read from an archive (path normalised, see the module docstring).

    ``size`` is the declared ``c_filesize`` (for a symlink: the stored target length).  In newc,
    links of a hardlink group share ``(dev, ino)`` and ``nlink`` > 1; usually only the last one
    carries data and the others have size 0.
    """

    path: bytes
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    nlink: int
    ino: int
    dev: tuple[int, int]
    rdev: tuple[int, int]
    link_target: bytes | None
    offset: int

    @property
    def file_type(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def is_dir(self) -> bool:
        return self.file_type == stat.S_IFDIR

    @property
    def is_file(self) -> bool:
        return self.file_type == stat.S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.file_type == stat.S_IFLNK

    @property
    def is_char_device(self) -> bool:
        return self.file_type == stat.S_IFCHR

    @property
    def is_block_device(self) -> bool:
        return self.file_type == stat.S_IFBLK

    @property
    def is_device(self) -> bool:
        return self.is_char_device or self.is_block_device

    @property
    def is_fifo(self) -> bool:
        return self.file_type == stat.S_IFIFO

    @property
    def is_socket(self) -> bool:
        return self.file_type == stat.S_IFSOCK


class _Input:
    """The archive stream: tracks the offset, enforces the known size, reads in bounded pieces."""

    def __init__(self, fileobj, archive_size: int | None):
        self._file = fileobj
        self.pos = 0
        self._seekable = _is_seekable(fileobj)
        if archive_size is not None and archive_size < 0:
            raise ValueError("archive_size must be non-negative")
        self.limit = archive_size if archive_size is not None else self._remaining_in_file()

    def _remaining_in_file(self) -> int | None:
        if not self._seekable:
            return None
        try:
            start = self._file.tell()
            end = self._file.seek(0, io.SEEK_END)
            self._file.seek(start)
        except (OSError, ValueError):
            return None
        return max(end - start, 0)

    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.pos

    def require(self, n: int, what: str) -> None:
        """Refuse (before reading) ``n`` more bytes that the known archive size cannot hold."""
        remaining = self.remaining()
        if remaining is not None and n > remaining:
            raise CpioFormatError(f"truncated archive: {what} at offset {self.pos} needs {n} bytes, "
                                  f"only {remaining} remain")

    def read_some(self, n: int, what: str) -> bytes:
        """Read 1..min(n, CHUNK_SIZE) bytes; EOF before them is a truncation error."""
        n = min(n, CHUNK_SIZE)
        self.require(n, what)
        data = self._file.read(n)
        if not data:
            raise CpioFormatError(f"truncated archive: {what} at offset {self.pos} ends early")
        if len(data) > n:
            raise CpioFormatError(f"input stream returned more bytes than asked at offset {self.pos}")
        self.pos += len(data)
        return data

    def read_exact(self, n: int, what: str) -> bytes:
        self.require(n, what)
        pieces = []
        while n:
            piece = self.read_some(n, what)
            pieces.append(piece)
            n -= len(piece)
        return b"".join(pieces)

    def skip(self, n: int, what: str) -> None:
        self.require(n, what)
        if self._seekable and self.limit is not None:
            self._file.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        while n:
            n -= len(self.read_some(n, what))


def _is_seekable(fileobj) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


class MemberData:
    """Bounded reader for one member's data; valid only until the archive iterator advances.

    ``read(n=-1)``, ``readinto(buffer)`` and iteration (chunks of up to 1 MiB) never return more
    than the member's remaining bytes, and raise :class:`CpioFormatError` if the archive ends
    before them.  Using it after the iterator moved on raises ``ValueError``.
    """

    def __init__(self, source: _Input, size: int, path: bytes):
        self._source = source
        self._remaining = size
        self._what = f"data of {path!r}"
        self._valid = True

    @property
    def remaining(self) -> int:
        return self._remaining

    def readable(self) -> bool:
        return True

    def _check_valid(self) -> None:
        if not self._valid:
            raise ValueError("member data read after the archive iterator advanced")

    def _read_piece(self, n: int) -> bytes:
        piece = self._source.read_some(min(n, self._remaining), self._what)
        self._remaining -= len(piece)
        return piece

    def read(self, n: int | None = -1) -> bytes:
        self._check_valid()
        if n is None or n < 0:
            return b"".join(iter(self))
        pieces = []
        n = min(n, self._remaining)
        while n:
            piece = self._read_piece(n)
            pieces.append(piece)
            n -= len(piece)
        return b"".join(pieces)

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` as far as the member's remaining data allows; return the byte count."""
        self._check_valid()
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view) and self._remaining:
            piece = self._read_piece(len(view) - filled)
            view[filled:filled + len(piece)] = piece
            filled += len(piece)
        return filled

    def __iter__(self) -> Iterator[bytes]:
        self._check_valid()
        while self._remaining:
            yield self._read_piece(CHUNK_SIZE)

    def _finish(self) -> None:
        """Skip what the caller left unread, and invalidate."""
        if self._valid:
            self._valid = False
            self._source.skip(self._remaining, self._what)
            self._remaining = 0


def _parse_fields(raw: bytes, offset: int) -> dict[str, int]:
    magic = raw[:6]
    if magic not in (MAGIC_NEWC, MAGIC_CRC):
        hint = " (odc/old-ASCII cpio; use -H newc)" if magic == b"070707" else ""
        raise CpioFormatError(f"bad magic {magic!r} at offset {offset}{hint}, expected 070701 or 070702")
    fields = {}
    for index, name in enumerate(_FIELDS):
        start = 6 + 8 * index
        text = raw[start:start + 8]
        if not _HEX8.fullmatch(text):
            raise CpioFormatError(f"field {name} at offset {offset + start} is not 8 hex digits: {text!r}")
        fields[name] = int(text, 16)
    return fields


def _read_name(source: _Input, namesize: int, offset: int, max_name: int) -> bytes:
    if namesize == 0 or namesize > max_name:
        raise CpioFormatError(f"field c_namesize at offset {offset + 94} is {namesize}, "
                              f"must be 1..{max_name}")
    raw = source.read_exact(namesize + _pad4(HEADER_SIZE + namesize), f"name of member at offset {offset}")
    name = raw[:namesize]
    if name[-1] != 0:
        raise CpioFormatError(f"name at offset {offset + HEADER_SIZE} is not NUL-terminated")
    name = name[:-1]
    if b"\0" in name:
        raise CpioFormatError(f"name at offset {offset + HEADER_SIZE} contains a NUL byte")
    return name


def _normalise_path(name: bytes, offset: int) -> bytes | None:
    """Canonical path of a member name, or None for the root entry."""
    if name in (b".", b"./"):
        return None
    if name.startswith(b"./"):
        name = name[2:]
    problem = path_problem(name)
    if problem:
        raise CpioFormatError(f"name {name[:256]!r} of member at offset {offset}: {problem}")
    return name


def _check_body(fields: dict[str, int], path: bytes, offset: int, max_link_target: int) -> None:
    file_type = stat.S_IFMT(fields["c_mode"])
    size = fields["c_filesize"]
    where = f"member {path[:256]!r} at offset {offset}"
    if file_type not in _FILE_TYPES or fields["c_mode"] > 0o177777:
        raise CpioFormatError(f"field c_mode {fields['c_mode']:#o} of {where} has no known file type")
    if file_type == stat.S_IFLNK and not 0 < size <= max_link_target:
        raise CpioFormatError(f"field c_filesize of symlink {where} is {size}, must be 1..{max_link_target}")
    if file_type not in (stat.S_IFREG, stat.S_IFLNK) and size:
        raise CpioFormatError(f"field c_filesize of non-regular {where} is {size}, must be 0")


def _read_link_target(source: _Input, size: int, path: bytes, offset: int) -> bytes:
    raw = source.read_exact(size, f"symlink target of {path!r}")
    if raw.endswith(b"\0"):
        raw = raw[:-1]  # gen_init_cpio stores the terminating NUL
    if not raw or b"\0" in raw:
        raise CpioFormatError(f"symlink target of member {path!r} at offset {offset} is empty or contains NUL")
    return raw


def iter_archive(
    fileobj,
    *,
    archive_size: int | None = None,
    max_entries: int = 2_000_000,
    max_name: int = PATH_MAX,
    max_link_target: int = PATH_MAX,
) -> Iterator[tuple[CpioMember, MemberData]]:
    """Yield ``(member, data)`` for each member of the newc archive read from ``fileobj``.

    ``fileobj`` is read from its current position.  Sizes are checked against ``archive_size``
    if given, else against the stream's size when it is seekable; otherwise truncation is found
    when the stream ends early.  ``max_name`` bounds ``c_namesize`` (incl. NUL; the kernel's
    PATH_MAX by default), ``max_link_target`` the stored symlink target, ``max_entries`` the number
    of members (the root entry included, the trailer not).  Symlink targets are read eagerly into
    ``member.link_target`` and their ``data`` is empty.  See the module docstring for the rest.
    """
    source = _Input(fileobj, archive_size)
    count = 0
    while True:
        offset = source.pos
        if source.remaining() == 0:
            raise CpioFormatError(f"archive ends at offset {offset} without a TRAILER!!! member")
        fields = _parse_fields(source.read_exact(HEADER_SIZE, "header"), offset)
        name = _read_name(source, fields["c_namesize"], offset, max_name)
        if name == TRAILER_NAME:
            source.skip(fields["c_filesize"] + _pad4(fields["c_filesize"]), "trailer body")
            return
        count += 1
        if count > max_entries:
            raise CpioFormatError(f"more than max_entries={max_entries} members (offset {offset})")
        path = _normalise_path(name, offset)
        _check_body(fields, name if path is None else path, offset, max_link_target)
        size = fields["c_filesize"]
        source.require(size, f"data of {name[:256]!r} (c_filesize {size})")
        if path is None:
            if stat.S_IFMT(fields["c_mode"]) != stat.S_IFDIR:
                raise CpioFormatError(f"root entry {name!r} at offset {offset} is not a directory")
            continue
        member, data = _make_member(source, fields, path, offset)
        yield member, data
        data._finish()
        source.skip(_pad4(size), f"data padding of {path!r}")


def _make_member(source: _Input, fields: dict[str, int], path: bytes, offset: int) -> tuple[CpioMember, MemberData]:
    """Build the member; for a symlink, read its target now (its data is then empty)."""
    size = fields["c_filesize"]
    link_target = None
    if stat.S_ISLNK(fields["c_mode"]):
        link_target = _read_link_target(source, size, path, offset)
    member = CpioMember(
        path=path, mode=fields["c_mode"], uid=fields["c_uid"], gid=fields["c_gid"],
        mtime=fields["c_mtime"], size=size, nlink=fields["c_nlink"], ino=fields["c_ino"],
        dev=(fields["c_devmajor"], fields["c_devminor"]),
        rdev=(fields["c_rdevmajor"], fields["c_rdevminor"]),
        link_target=link_target, offset=offset,
    )
    return member, MemberData(source, 0 if link_target is not None else size, path)
