"""Bounded streaming reader for untrusted tar layers (ustar, PAX, GNU long names).

Why not :mod:`tarfile`: it reads PAX and GNU long-name headers of any size into memory, trusts
every header, and differs from Go's ``archive/tar`` (what Docker and containerd use) in several
corners.  Where two parsers could see different members in the same bytes (CVE-2025-62518), this
reader either behaves like Go or refuses the layer.

Contract
--------
* :class:`TarScanner` iterates the members of the stream in order.  Meta headers (PAX ``x`` and
  ``g``, GNU ``L``/``K``) are folded into the member they describe.  Each member's data is
  consumed (skipped, and passed to ``tee`` with everything else read) when the iterator advances;
  the caller only keeps :attr:`TarMember.data_offset` and :attr:`TarMember.size`.
* Reads use 1 MiB chunks; memory is bounded by one chunk plus the capped meta headers.  With
  ``seek_over_data`` (a seekable stream, no ``tee``) reads are 64 KiB and member data beyond them
  is seeked over, not read: for a blob read in place whose bytes another reader verifies anyway.
  A member that extends beyond the stream's end is still refused as truncation.
* End of archive: two zero blocks, a zero block followed by EOF, or EOF at a header boundary.
  A zero block followed by a non-zero block is an error (as in Go).  Whatever follows the end is
  ignored; :meth:`TarScanner.drain` reads it to EOF (so the source can verify its digest) without
  passing it to ``tee``.
* Numbers: octal (space/NUL trimmed, digits only) or GNU base-256 (``0x80`` / ``0xff`` prefix).
  The header checksum is verified (unsigned or signed sum, like Go and GNU tar).
* Names: PAX ``path``/``linkpath`` or GNU ``L``/``K`` replace the header fields; a member may not
  mix PAX and GNU long headers, nor repeat one kind (tarfile and Go disagree on who wins).  The
  ustar ``prefix`` is used only with the POSIX magic ``ustar\\0`` + version ``00`` (as in Go); a
  non-empty prefix in a V7 header is refused as ambiguous.  GNU long names are cut at their
  terminating NUL; any non-NUL byte after it is refused.
* PAX: records are parsed strictly (``"<len> <key>=<value>\\n"``, no duplicate keys); ``size``,
  ``uid``, ``gid`` must be decimal, ``mtime`` may be fractional (floored).  ``SCHILY.xattr.*`` and
  ``LIBARCHIVE.xattr.*`` names are reported in :attr:`TarMember.xattrs`.  ``GNU.sparse.*`` and
  typeflag ``S`` are refused (sparse files).  Global ``g`` headers are parsed and ignored, like
  Go and containerd do; a global header setting ``path``, ``linkpath`` or ``size`` is refused,
  since POSIX readers (and :mod:`tarfile`) would apply it to later members.
* Size: the PAX ``size`` is authoritative for how much data follows (the standard, and what Go
  and tarfile do); a ustar ``size`` field that disagrees with it is refused.  Header-only types
  (links, devices, directories, fifos) must declare size 0.
* Refused with :class:`TarFormatError`: bad checksum or number, truncation, unknown typeflags,
  NUL bytes in names, names or link targets longer than ``max_name`` bytes, regular files larger
  than ``max_file_size``, meta headers larger than their caps, negative or out-of-range
  uid/gid/device numbers, and more stream bytes than the :class:`ByteBudget` allows.
"""

from __future__ import annotations

import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple
from zlib import adler32

from qtbuild.errors import ImageError

__all__ = [
    "BLOCK_DEVICE", "CHAR_DEVICE", "DIRECTORY", "FIFO", "HARDLINK", "REGULAR", "SYMLINK",
    "BudgetShare", "ByteBudget", "TarFormatError", "TarLimits", "TarMember", "TarScanner",
]

BLOCK_SIZE = 512
CHUNK_SIZE = 1 << 20
#: Read size when member data is seeked over: headers and small files in one read, larger files skipped.
SEEK_CHUNK_SIZE = 64 << 10
ZERO_BLOCK = bytes(BLOCK_SIZE)
U32_MAX = 0xFFFFFFFF

REGULAR = "file"
HARDLINK = "hardlink"
SYMLINK = "symlink"
CHAR_DEVICE = "char device"
BLOCK_DEVICE = "block device"
DIRECTORY = "directory"
FIFO = "fifo"

_TYPEFLAGS = {
    b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"1": HARDLINK, b"2": SYMLINK,
    b"3": CHAR_DEVICE, b"4": BLOCK_DEVICE, b"5": DIRECTORY, b"6": FIFO,
}
_HEADER_ONLY = frozenset({HARDLINK, SYMLINK, CHAR_DEVICE, BLOCK_DEVICE, DIRECTORY, FIFO})
_META_TYPES = frozenset({b"x", b"g", b"L", b"K"})
_STRUCTURAL_PAX_KEYS = (b"path", b"linkpath", b"size")
_MAGIC_POSIX = b"ustar\x0000"
_MAGIC_GNU = b"ustar  \x00"


class TarFormatError(ImageError):
    """The layer is not a tar stream this reader accepts; the message says where and why."""


@dataclass(frozen=True)
class TarLimits:
    """Caps on what one member may declare (all in bytes)."""

    max_long_name: int = 8 << 10  # GNU 'L' / 'K' data
    max_pax_header: int = 1 << 20  # PAX 'x' / 'g' data
    max_name: int = 4095  # member names and link targets (kernel PATH_MAX - 1)
    max_file_size: int = U32_MAX  # regular files (cpio newc has 32-bit sizes)


class ByteBudget:
    """A shared cap on stream bytes read across layers (against tar and decompression bombs).

    Used directly, it counts streams read one after another.  Layers read at once each count
    through their :meth:`share`, and layer ``i`` is held to the bytes of layers ``0..i`` — what
    reading them one after another would have counted — so the layer refused does not depend on
    thread timing: a layer over the limit while a lower one is still being read waits for the
    lower layers (which may be refused first) and only then fails.  Since lower layers can still
    grow after a higher one was read, :meth:`BudgetShare.finish` checks once more at its end.
    While lower layers are being read a higher layer may pass a ``check`` that one-after-another
    reading would have failed; it is then refused by a later charge or at its end instead.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._cond = threading.Condition()
        self._used: dict[int, int] = {}  # per layer index (0 when used directly)
        self._total = 0  # of _used: while it leaves room, no layer is over
        self._open: set[int] = set()  # shares not finished

    @property
    def used(self) -> int:
        with self._cond:
            return sum(self._used.values())

    def share(self, index: int) -> BudgetShare:
        """The budget of layer ``index`` (0 = bottom), to be finished when the layer was read."""
        with self._cond:
            self._used.setdefault(index, 0)
            self._open.add(index)
        return BudgetShare(self, index)

    def check(self, n: int, what: str) -> None:
        """Refuse before reading ``n`` more bytes that would exceed the budget."""
        self._check(0, n, what)

    def fits(self, n: int) -> bool:
        """True when ``n`` more bytes certainly pass :meth:`check` (cheap: no lock, no message)."""
        return self._total + n <= self.limit

    def charge(self, n: int) -> None:
        """Account for ``n`` bytes read; raise once the budget is exceeded."""
        self._charge(0, n)

    def _check(self, index: int, n: int, what: str) -> None:
        if self._over_once_settled(index, n):
            raise TarFormatError(f"{what} of {n} bytes would exceed the limit of {self.limit} bytes "
                                 f"of uncompressed layer data (possible tar bomb)")

    def _charge(self, index: int, n: int) -> None:
        with self._cond:
            self._used[index] = self._used.get(index, 0) + n
            self._total += n
        if self._total > self.limit:
            self._refuse_if_over(index)

    def _refuse_if_over(self, index: int, *, settled: bool = False) -> None:
        if self._over_once_settled(index, 0, settled=settled):
            raise TarFormatError(f"more than {self.limit} bytes of uncompressed layer data "
                                 f"(possible tar bomb)")

    def _over_once_settled(self, index: int, n: int, *, settled: bool = False) -> bool:
        """Whether layers ``0..index`` plus ``n`` bytes exceed the limit, waiting for the lower
        layers still being read when they do (they only grow, and may fail first) — or, with
        ``settled``, in any case."""
        with self._cond:
            while True:
                over = sum(used for layer, used in self._used.items() if layer <= index) + n > self.limit
                if not (over or settled) or not any(layer < index for layer in self._open):
                    return over
                self._cond.wait()

    def _finish(self, index: int) -> None:
        with self._cond:
            self._open.discard(index)
            self._cond.notify_all()


class BudgetShare:
    """One layer's view of a :class:`ByteBudget` (see :meth:`ByteBudget.share`)."""

    def __init__(self, budget: ByteBudget, index: int):
        self._budget = budget
        self._index = index
        self._finished = False

    def check(self, n: int, what: str) -> None:
        self._budget._check(self._index, n, what)

    def fits(self, n: int) -> bool:
        return self._budget.fits(n)

    def charge(self, n: int) -> None:
        self._budget._charge(self._index, n)

    def finish(self, *, read: bool) -> None:
        """The layer's reading ended (``read``: to its end, so check its total once the lower
        layers are read too; else it failed or was stopped).  Later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        try:
            if read:
                self._budget._refuse_if_over(self._index, settled=True)
        finally:
            self._budget._finish(self._index)


class TarMember(NamedTuple):
    """One member as declared by its headers (name not normalised).

    ``kind`` is one of the module's type constants.  ``mode`` holds the 12 permission bits only.
    ``size`` is the number of data bytes stored after the header (0 for header-only kinds).
    ``header_offset`` is where the member's first header (meta headers included) starts in the
    stream, ``data_offset`` where its data starts.  ``xattrs`` lists extended attribute names.
    A named tuple: immutable, and built in a tenth of a frozen dataclass's time (one per member).
    """

    name: bytes
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: tuple[str, ...]
    header_offset: int
    data_offset: int


class _Input:
    """The tar stream: 1 MiB reads, absolute offsets, tee, budget and progress accounting."""

    def __init__(self, stream: BinaryIO, tee, budget: ByteBudget | BudgetShare | None, progress,
                 seek_over_data: bool = False):
        self._stream = stream
        self.tee: Callable[[bytes], object] | None = tee
        self._budget = budget
        self._progress = progress
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._end: int | None = None  # the stream's length, when data is seeked over
        self._chunk = CHUNK_SIZE
        if seek_over_data:
            if tee is not None or not stream.seekable():
                raise ValueError("seek_over_data needs a seekable stream and no tee")
            start = stream.tell()
            self._end = stream.seek(0, 2) - start
            stream.seek(start)
            self._chunk = SEEK_CHUNK_SIZE

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def _read_chunk(self) -> bytes:
        """The next chunk of the stream, accounted for and passed to ``tee``; empty at EOF."""
        chunk = self._stream.read(self._chunk)
        if chunk:
            self._account(len(chunk))
            if self.tee is not None:
                self.tee(chunk)
        return chunk

    def _fill(self) -> bool:
        """Append one chunk from the stream to the unread buffer; False at EOF."""
        chunk = self._read_chunk()
        if not chunk:
            return False
        rest = self._buf[self._pos:]
        self._base += self._pos
        self._buf = rest + chunk if rest else chunk
        self._pos = 0
        return True

    def read_exact(self, n: int, what: str) -> bytes | None:
        """The next ``n`` bytes; None at EOF exactly here; truncation error on a partial read."""
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        return self._read_across(n, what)

    def _read_across(self, n: int, what: str) -> bytes | None:
        """:meth:`read_exact` for bytes that run past the buffer.  They are joined from the
        buffer's rest and the chunks read, and the last chunk becomes the buffer as it is: a
        header across a chunk boundary (one per chunk in a layer of small files) costs a copy of
        itself, not of the 1 MiB chunk after it."""
        start = self.offset
        parts = [self._buf[self._pos:]]
        missing = n - len(parts[0])
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while True:
            chunk = self._read_chunk()
            if not chunk:
                if missing == n:
                    return None
                raise TarFormatError(f"truncated archive: {what} at offset {start} "
                                     f"needs {n} bytes, the stream ends first")
            if len(chunk) >= missing:
                parts.append(chunk[:missing])
                self._buf, self._pos = chunk, missing
                return b"".join(parts)
            parts.append(chunk)
            missing -= len(chunk)
            self._base += len(chunk)

    def require(self, n: int, what: str) -> bytes:
        data = self.read_exact(n, what)
        if data is None:
            raise TarFormatError(f"truncated archive: {what} at offset {self.offset} is missing")
        return data

    def _account(self, n: int) -> None:
        if self._budget is not None:
            self._budget.charge(n)
        if self._progress is not None:
            self._progress(n)

    def skip(self, n: int, what: str) -> None:
        """Consume ``n`` bytes (they still go to ``tee``; seeked over with ``seek_over_data``)."""
        while True:
            take = min(n, len(self._buf) - self._pos)
            self._pos += take
            n -= take
            if not n:
                return
            if self._end is not None:
                self._seek_over(n, what)
                return
            if not self._fill():
                raise TarFormatError(f"truncated archive: {what} ends early at offset {self.offset}")

    def skip_data(self, n: int, header_offset: int) -> None:
        """:meth:`skip` for the data of the member whose headers start at ``header_offset``."""
        pos = self._pos + n
        if pos <= len(self._buf):
            self._pos = pos
        else:
            self.skip(n, f"data of member at offset {header_offset}")

    def _seek_over(self, n: int, what: str) -> None:
        """Skip ``n`` bytes beyond the (fully consumed) buffer without reading them."""
        assert self._end is not None
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        if self._base + n > self._end:
            raise TarFormatError(f"truncated archive: {what} ends early at offset {self._end}")
        self._stream.seek(n, 1)
        self._base += n
        self._account(n)

    def drain(self) -> None:
        """Read the stream to EOF without tee-ing it (seeked over with ``seek_over_data``)."""
        if self._end is not None:
            self._base += len(self._buf)
            self._buf, self._pos = b"", 0
            if self._end > self._base:
                self._seek_over(self._end - self._base, "trailing data")
            return
        self.tee = None
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while self._fill():
            self._base += len(self._buf)
            self._buf = b""


def _padding(size: int) -> int:
    return -size % BLOCK_SIZE


def _number(field: bytes, what: str, offset: int, *, signed: bool = False) -> int:
    """An octal or base-256 numeric header field (Go's rules: trim spaces and NULs, digits only)."""
    if field and field[0] & 0x80:
        if field[0] == 0x80:
            return int.from_bytes(field[1:], "big")
        if field[0] == 0xFF and signed:
            return int.from_bytes(field, "big", signed=True)
        raise TarFormatError(f"header at offset {offset}: field {what} has an invalid base-256 value")
    text = field.strip(b" \0")
    if text.translate(None, b"01234567"):
        raise TarFormatError(f"header at offset {offset}: field {what} is not an octal number: {field!r}")
    return int(text, 8) if text else 0


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` for a 512-byte block, in C: Adler-32's low half is 1 + the byte sum modulo
    65521, exact for 256 bytes (at most 65280)."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def _verify_checksum(block: bytes, stored: int, offset: int) -> None:
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return
    high = sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored != unsigned - 256 * high:
        raise TarFormatError(f"header at offset {offset}: checksum mismatch (not a tar header, "
                             f"or corrupt)")


class _Header(NamedTuple):
    """The fields of one 512-byte header."""

    typeflag: bytes
    name: bytes
    linkname: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    devmajor: int
    devminor: int


#: name mode uid gid size mtime chksum typeflag linkname magic+version uname gname devmajor devminor prefix
_LAYOUT = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
#: Bytes a plain octal field may hold (digits, padded with spaces and NULs).
_OCTAL_FIELD_BYTES = b"01234567 \0"


def _numbers(fields: tuple[bytes, ...], what: tuple[str, ...], offset: int) -> list[int]:
    """Octal/base-256 fields; the common case (plain octal) without a call per field."""
    try:
        if not b"".join(fields).translate(None, _OCTAL_FIELD_BYTES):
            # int() refuses what strip() leaves inside (spaces, NULs); signs, "_" and "0o" cannot occur.
            return [int(field.strip(b" \0") or b"0", 8) for field in fields]
    except ValueError:
        pass
    return [_number(field, name, offset, signed=name == "mtime") for field, name in zip(fields, what, strict=True)]


_FIELD_NAMES = ("mode", "uid", "gid", "size", "mtime")
_DEVICE_FIELD_NAMES = ("devmajor", "devminor")


def _parse_header(block: bytes, offset: int) -> _Header:
    (name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic, _uname, _gname,
     devmajor, devminor, prefix) = _LAYOUT.unpack(block)
    _verify_checksum(block, _number(chksum, "chksum", offset), offset)
    mode_n, uid_n, gid_n, size_n, mtime_n = _numbers((mode, uid, gid, size, mtime), _FIELD_NAMES, offset)
    name = name.partition(b"\0")[0]
    if magic == _MAGIC_POSIX:
        prefix = prefix.partition(b"\0")[0]
        if prefix:
            name = prefix + b"/" + name
    elif magic != _MAGIC_GNU and prefix.strip(b"\0"):
        raise TarFormatError(f"header at offset {offset}: non-empty prefix field in a non-ustar header "
                             f"(readers disagree on whether it is part of the name)")
    major = minor = 0
    if magic in (_MAGIC_POSIX, _MAGIC_GNU):
        major, minor = _numbers((devmajor, devminor), _DEVICE_FIELD_NAMES, offset)
    return _Header(typeflag, name, linkname.partition(b"\0")[0], mode_n & 0o7777, uid_n, gid_n, size_n, mtime_n,
                   major, minor)


def parse_pax_records(data: bytes, offset: int) -> dict[bytes, bytes]:
    """Parse PAX extended header records strictly (``"<len> <key>=<value>\\n"``, no duplicates)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise TarFormatError(f"PAX header at offset {offset}: malformed record length at byte {pos}")
        end = pos + int(digits)
        if end > len(data) or end <= space + 1 or data[end - 1] != 0x0A:
            raise TarFormatError(f"PAX header at offset {offset}: malformed record at byte {pos}")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise TarFormatError(f"PAX header at offset {offset}: record at byte {pos} has no key=value")
        if key in records:
            raise TarFormatError(f"PAX header at offset {offset}: duplicate key {key.decode('utf-8', 'replace')!r}")
        records[key] = value
        pos = end
    return records


def _pax_decimal(records: dict[bytes, bytes], key: bytes, where: str) -> int | None:
    value = records.get(key)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 30:
        raise TarFormatError(f"{where}: PAX {key.decode()}={value[:40]!r} is not a "
                             f"non-negative decimal number")
    return int(value)


def _pax_mtime(records: dict[bytes, bytes], where: str) -> int | None:
    """PAX ``mtime`` (``[-]digits[.digits]``), floored to whole seconds."""
    value = records.get(b"mtime")
    if value is None:
        return None
    sign, body = (-1, value[1:]) if value.startswith(b"-") else (1, value)
    whole, dot, fraction = body.partition(b".")
    if not whole.isdigit() or (dot and not fraction.isdigit()) or len(whole) > 30:
        raise TarFormatError(f"{where}: PAX mtime={value[:40]!r} is not a number")
    seconds = int(whole)
    if sign < 0:
        return -seconds - (1 if dot and fraction.strip(b"0") else 0)
    return seconds


def _pax_xattrs(records: dict[bytes, bytes]) -> tuple[str, ...]:
    """Extended attribute names from ``SCHILY.xattr.<name>`` and ``LIBARCHIVE.xattr.<url-encoded
    name>`` keys (values, base64 for libarchive, are never needed)."""
    if not records:
        return ()
    names = []
    for key in records:
        if key.startswith(b"SCHILY.xattr."):
            names.append(key[len(b"SCHILY.xattr."):].decode("utf-8", "backslashreplace"))
        elif key.startswith(b"LIBARCHIVE.xattr."):
            names.append(urllib.parse.unquote(key[len(b"LIBARCHIVE.xattr."):].decode("utf-8", "backslashreplace")))
    return tuple(names)


_NUL_TO_SPACE = bytes.maketrans(b"\0", b" ")
#: Typeflags :func:`_quick_member` takes (``\0`` and ``7`` go the general way: V7 directories, rarity).
_QUICK_KINDS = {b"0": REGULAR, b"5": DIRECTORY, b"2": SYMLINK, b"1": HARDLINK}
_new_member = tuple.__new__
#: Distinct mode/uid/gid and mtime fields :func:`_quick_member` keeps parsed, per scanner.
_KNOWN_FIELDS = 256
_EMPTY_FIELD = b" " * 8  # devmajor or devminor left empty (NULs), as many writers do for non-devices
#: devmajor and devminor as writers leave them for anything but devices (both 0, or both empty).
_NO_DEVICE_NUMBERS = frozenset({bytes(16), b"0000000\x000000000\x00", b"0000000 0000000 "})
#: What :func:`_quick_member` reads: name, the six numbers (mode uid gid size mtime chksum),
#: typeflag, linkname, magic + version, (uname, gname skipped), devmajor + devminor, prefix.
_QUICK_LAYOUT = struct.Struct("100s56sc100s8s64x16s155s12x")


def _quick_member(block: bytes, offset: int, max_name: int, max_file_size: int, known: dict) -> TarMember | None:
    """The member of a plain ustar or GNU header at ``offset``, if it is one that every rule of
    :class:`TarScanner` plainly accepts; else None, and the general path parses ``block`` again
    (and names the problem, if there is one).

    The common case in one call, on one thread per layer for every member: the fields are
    unpacked at once (no :class:`_Header`), NULs become spaces so that ``int()`` takes the octal
    fields as they are (it strips spaces; anything but digits and padding was refused first, so it
    cannot accept a sign or ``_``; padding inside a field makes it fail: the general path).  Device
    numbers left as zeros or NULs (every member but devices) are not parsed.  ``known``: the
    scanner's cache of the mode/uid/gid and mtime fields it parsed (most members of a layer repeat
    them; a field's bytes decide its value), bounded here.  The caller still checks the byte budget.
    """
    name, numbers, flag, linkname, magic, devices, prefix = _QUICK_LAYOUT.unpack(block)
    kind = _QUICK_KINDS.get(flag)
    if kind is None or (magic != _MAGIC_POSIX and magic != _MAGIC_GNU):
        return None
    numbers = numbers.translate(_NUL_TO_SPACE)  # mode uid gid size mtime chksum
    if numbers.translate(None, b"01234567 "):
        return None
    major = minor = 0
    if devices not in _NO_DEVICE_NUMBERS:
        devices = devices.translate(_NUL_TO_SPACE)
        if devices.translate(None, b"01234567 "):
            return None
        try:
            major = int(devices[:8], 8) if devices[:8] != _EMPTY_FIELD else 0
            minor = int(devices[8:], 8) if devices[8:] != _EMPTY_FIELD else 0
        except ValueError:  # padding inside a field
            return None
    try:
        size = int(numbers[24:36], 8)
        stored = int(numbers[48:56], 8)
        owner, stamp = numbers[:24], numbers[36:48]
        mode_uid_gid, mtime = known.get(owner), known.get(stamp)
        if mode_uid_gid is None or mtime is None:
            mode_uid_gid = (int(owner[:8], 8) & 0o7777, int(owner[8:16], 8), int(owner[16:], 8))
            mtime = int(stamp, 8)
            if len(known) >= _KNOWN_FIELDS:
                known.clear()
            known[owner], known[stamp] = mode_uid_gid, mtime
    except ValueError:  # an empty field, or padding inside one
        return None
    mode, uid, gid = mode_uid_gid
    # The sum of every byte, the chksum field counted as spaces: _byte_sum(block) - its own byte sum
    # (Adler-32's low half - 1) + 8 * 32, inline.
    total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - (adler32(block[148:156]) & 0xFFFF)
    if stored != total + 255:
        return None
    name = name.partition(b"\0")[0]
    if magic == _MAGIC_POSIX:
        prefix = prefix.partition(b"\0")[0]
        if prefix:
            name = prefix + b"/" + name
    linkname = linkname.partition(b"\0")[0]
    # uid, gid and device numbers of 8 octal digits at most stay below 2**24: no 32-bit check.
    if (size and kind is not REGULAR) or size > max_file_size or len(name) > max_name or len(linkname) > max_name:
        return None
    return _new_member(TarMember, (name, kind, mode, uid, gid, mtime, size, linkname, major, minor, (),
                                   offset, offset + BLOCK_SIZE))


@dataclass
class _Pending:
    """Meta headers collected for the next member."""

    start: int
    pax: dict[bytes, bytes] | None = None
    long_name: bytes | None = None
    long_link: bytes | None = None

    @property
    def empty(self) -> bool:
        return self.pax is None and self.long_name is None and self.long_link is None


#: A member's pending meta headers until it has some (never filled).
_NO_META = _Pending(-1)


class TarScanner:
    """Iterate the members of an untrusted tar stream; see the module docstring for the contract.

    ``tee`` receives every chunk read until the end of the archive (use it to spill the stream),
    ``budget`` caps the bytes read, ``progress`` is called with the size of every chunk read.
    ``seek_over_data``: seek over member data instead of reading it (a seekable stream without
    ``tee``; the bytes skipped still count for ``budget`` and ``progress``).
    """

    def __init__(self, stream: BinaryIO, *, limits: TarLimits = TarLimits(),
                 tee: Callable[[bytes], object] | None = None, budget: ByteBudget | BudgetShare | None = None,
                 progress: Callable[[int], object] | None = None, seek_over_data: bool = False):
        self._input = _Input(stream, tee, budget, progress, seek_over_data)
        self._limits = limits
        self._budget = budget

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to parse."""
        return self._input.offset

    def __iter__(self) -> Iterator[TarMember]:
        # Per member, on one thread per layer: the input's buffer is read here directly while a
        # header and the data after it are in it (most members of a layer of small files), and
        # through its methods otherwise.
        source = self._input
        read_exact, skip_data = source.read_exact, source.skip_data
        limits, budget = self._limits, self._budget
        max_name, max_file_size = limits.max_name, limits.max_file_size
        known: dict[bytes, object] = {}
        while True:
            buffer, pos = source._buf, source._pos
            offset = source._base + pos
            if pos + BLOCK_SIZE <= len(buffer):
                block: bytes | None = buffer[pos:pos + BLOCK_SIZE]
                source._pos = pos + BLOCK_SIZE
            else:
                block = read_exact(BLOCK_SIZE, "header")
            member = None if block is None else _quick_member(block, offset, max_name, max_file_size, known)
            if member is None or (budget is not None and member.size and not budget.fits(member.size)):
                member = self._next_member(block, offset)
                if member is None:
                    return
            yield member
            size = member.size
            if size:
                end = source._pos + size + (-size % BLOCK_SIZE)
                if end <= len(source._buf):
                    source._pos = end
                else:
                    skip_data(size + (-size % BLOCK_SIZE), member.header_offset)

    def drain(self) -> None:
        """Read whatever follows the end of the archive to EOF (not tee-d)."""
        self._input.drain()

    # -- headers -----------------------------------------------------------------------------

    def _next_member(self, block: bytes | None, start: int) -> TarMember | None:
        """The member whose first header ``block`` (None at EOF) was read at offset ``start``."""
        read_exact = self._input.read_exact
        pending = _NO_META  # replaced on the first meta header (most members have none)
        offset = start
        while True:
            if offset != start:
                block = read_exact(BLOCK_SIZE, "header")
            if block is None or block == ZERO_BLOCK:
                if not pending.empty:
                    raise TarFormatError(f"archive ends at offset {offset} right after extended headers")
                if block is not None:
                    self._expect_end(offset)
                return None
            header = _parse_header(block, offset)
            if header.typeflag in _META_TYPES:
                if pending is _NO_META:
                    pending = _Pending(start)
                self._read_meta(header, pending, offset)
                offset = self.offset
                continue
            if pending.empty:
                return self._plain_member(header, start)
            return self._member(header, pending)

    def _expect_end(self, offset: int) -> None:
        following = self._input.read_exact(BLOCK_SIZE, "end-of-archive block")
        if following is not None and following != ZERO_BLOCK:
            raise TarFormatError(f"a zero block at offset {offset} is followed by a non-zero block "
                                 f"(a lone zero block is not an end-of-archive marker)")

    def _read_meta(self, header: _Header, pending: _Pending, offset: int) -> None:
        flag = header.typeflag
        is_pax = flag in (b"x", b"g")
        cap = self._limits.max_pax_header if is_pax else self._limits.max_long_name
        what = {b"x": "PAX extended header", b"g": "PAX global header",
                b"L": "GNU long name", b"K": "GNU long link name"}[flag]
        if header.size > cap:
            raise TarFormatError(f"{what} at offset {offset} declares {header.size} bytes, "
                                 f"more than the limit of {cap}")
        if self._budget is not None:
            self._budget.check(header.size, what)
        data = self._input.require(header.size, what)
        self._input.skip(_padding(header.size), f"padding of {what}")
        if flag == b"g":
            if not pending.empty:
                raise TarFormatError(f"{what} at offset {offset} between a member's extended headers")
            self._check_global(parse_pax_records(data, offset), offset)
        elif flag == b"x":
            if not pending.empty:
                raise TarFormatError(f"{what} at offset {offset} follows another extended header "
                                     f"for the same member (readers disagree on which wins)")
            pending.pax = parse_pax_records(data, offset)
        else:
            self._set_long(pending, flag, _long_name(data, what, offset), offset)

    @staticmethod
    def _set_long(pending: _Pending, flag: bytes, value: bytes, offset: int) -> None:
        attr = "long_name" if flag == b"L" else "long_link"
        if pending.pax is not None or getattr(pending, attr) is not None:
            raise TarFormatError(f"GNU long name header at offset {offset} repeats or mixes with a "
                                 f"PAX header for the same member (readers disagree on which wins)")
        setattr(pending, attr, value)

    @staticmethod
    def _check_global(records: dict[bytes, bytes], offset: int) -> None:
        for key in records:
            if key in _STRUCTURAL_PAX_KEYS or key.startswith(b"GNU.sparse."):
                raise TarFormatError(f"PAX global header at offset {offset} sets {key.decode('utf-8', 'replace')!r}; "
                                     f"readers disagree on whether it applies to later members")

    # -- members -----------------------------------------------------------------------------

    def _plain_member(self, header: _Header, start: int) -> TarMember:
        """A member without meta headers: :meth:`_member`'s rules with nothing to fold in."""
        name, linkname, size = header.name, header.linkname, header.size
        kind = _TYPEFLAGS.get(header.typeflag)
        if header.typeflag == b"\0" and name.endswith(b"/"):
            kind = DIRECTORY  # old V7 directories (Go and tarfile agree)
        max_name = self._limits.max_name
        is_link = kind is HARDLINK or kind is SYMLINK
        if (kind is None or (kind is not REGULAR and size) or size > self._limits.max_file_size
                or len(name) > max_name or b"\0" in name
                or (is_link and (len(linkname) > max_name or b"\0" in linkname))
                or max(header.uid, header.gid, header.devmajor, header.devminor) > U32_MAX):
            return self._member(header, _Pending(start))  # the general path names the problem
        if self._budget is not None and size and not self._budget.fits(size):
            self._budget.check(size, f"member {_show(name)} at offset {start}")
        return TarMember(name, kind, header.mode, header.uid, header.gid, header.mtime, size, linkname,
                         header.devmajor, header.devminor, (), start, self.offset)

    def _member(self, header: _Header, pending: _Pending) -> TarMember:
        records = pending.pax or {}
        name = header.name
        if pending.long_name is not None:
            name = pending.long_name
        elif b"path" in records:
            name = records[b"path"]
        where = f"member {_show(name)} at offset {pending.start}"
        kind = self._kind(header, name, records, where)
        linkname = header.linkname
        if pending.long_link is not None:
            linkname = pending.long_link
        elif b"linkpath" in records:
            linkname = records[b"linkpath"]
        self._check_names(name, linkname, kind, where)
        size = self._size(header, records, kind, where)
        uid = _pax_decimal(records, b"uid", where)
        gid = _pax_decimal(records, b"gid", where)
        mtime = _pax_mtime(records, where)
        member = TarMember(
            name=name, kind=kind, mode=header.mode,
            uid=header.uid if uid is None else uid, gid=header.gid if gid is None else gid,
            mtime=header.mtime if mtime is None else mtime, size=size, linkname=linkname,
            devmajor=header.devmajor, devminor=header.devminor, xattrs=_pax_xattrs(records),
            header_offset=pending.start, data_offset=self.offset,
        )
        if max(member.uid, member.gid, member.devmajor, member.devminor) > U32_MAX:
            for what in ("uid", "gid", "devmajor", "devminor"):
                if getattr(member, what) > U32_MAX:
                    raise TarFormatError(f"{where}: {what} {getattr(member, what)} does not fit 32 bits")
        return member

    @staticmethod
    def _kind(header: _Header, name: bytes, records: dict[bytes, bytes], where: str) -> str:
        flag = header.typeflag
        if flag == b"S" or (records and any(key.startswith(b"GNU.sparse.") for key in records)):
            raise TarFormatError(f"{where}: sparse files are not supported (re-create the layer "
                                 f"without --sparse)")
        kind = _TYPEFLAGS.get(flag)
        if kind is None:
            raise TarFormatError(f"{where}: unsupported tar typeflag {flag!r}")
        if flag == b"\0" and name.endswith(b"/"):
            kind = DIRECTORY  # old V7 directories (Go and tarfile agree)
        return kind

    def _check_names(self, name: bytes, linkname: bytes, kind: str, where: str) -> None:
        limit = self._limits.max_name
        if b"\0" in name:
            raise TarFormatError(f"{where}: NUL byte in the member name")
        if len(name) > limit:
            raise TarFormatError(f"{where}: name of {len(name)} bytes exceeds {limit}")
        if kind in (HARDLINK, SYMLINK):
            if b"\0" in linkname:
                raise TarFormatError(f"{where}: NUL byte in the link target")
            if len(linkname) > limit:
                raise TarFormatError(f"{where}: link target of {len(linkname)} bytes exceeds {limit}")

    def _size(self, header: _Header, records: dict[bytes, bytes], kind: str, where: str) -> int:
        size = header.size
        pax_size = _pax_decimal(records, b"size", where)
        if pax_size is not None:
            if pax_size != header.size:
                raise TarFormatError(f"{where}: PAX size {pax_size} disagrees with the ustar size "
                                     f"field {header.size} (readers would split the stream "
                                     f"differently; CVE-2025-62518)")
            size = pax_size
        if kind in _HEADER_ONLY and size:
            raise TarFormatError(f"{where}: a {kind} declares {size} data bytes (must be 0)")
        if size > self._limits.max_file_size:
            raise TarFormatError(f"{where}: file of {size} bytes is too large (the limit is "
                                 f"{self._limits.max_file_size}; cpio newc sizes have 32 bits)")
        if self._budget is not None and not self._budget.fits(size):
            self._budget.check(size, where)
        return size


def _long_name(data: bytes, what: str, offset: int) -> bytes:
    """A GNU long name: the data up to its terminating NUL, which may only be followed by NULs."""
    value, _, rest = data.partition(b"\0")
    if rest.strip(b"\0"):
        raise TarFormatError(f"{what} at offset {offset} contains a NUL byte inside the name")
    return value


def _show(name: bytes, limit: int = 200) -> str:
    """A member name for messages: quoted, decoded with escapes, shortened."""
    text = name[:limit].decode("utf-8", "backslashreplace")
    return "'" + text + ("…" if len(name) > limit else "") + "'"
