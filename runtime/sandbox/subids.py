"""The subordinate uid/gid range a sandbox started by root runs in: root inside is never root
outside.

Rootless container runtimes map a container's ids onto a range of host ids that belongs to
nobody (``/etc/subuid`` and ``/etc/subgid``, "name:first:count" per line, see subuid(5)).
Sandboxes started as root do the same with the range of a dedicated name, ``qtbuild-enclave``
by default (``$QTBUILD_ENCLAVE_USER`` chooses another): inside ids ``0 .. count-1`` are host ids
``first .. first+count-1``, so the application's root is an unprivileged host uid that owns
no host file, device node or socket.

Contract of :func:`enclave_ids`:

* The first entry for the name in ``/etc/subuid`` and the first in ``/etc/subgid`` are used
  (an administrator chooses the range by writing them, e.g. ``qtbuild-enclave:300000:65536``).
* When the name has no entry, a range of :data:`DEFAULT_COUNT` ids (so images using uid 1000
  or 65534 work) is allocated and appended to the file, under an exclusive lock of the file:
  the first :data:`DEFAULT_COUNT`-aligned block at or above :data:`FIRST_ID` (shadow's
  ``SUB_UID_MIN``) that overlaps no other entry and no id in ``/etc/passwd`` (``/etc/group``
  for gids).  No account is created: the name only reserves the range, as in subuid(5).
* A range that includes host id 0 is refused (:class:`~.spec.SandboxError`), as are malformed
  entries for the name.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

from .errors import SandboxError

__all__ = ["DEFAULT_COUNT", "DEFAULT_USER", "ENV_USER", "FIRST_ID", "IdRange", "enclave_ids", "subordinate_range"]

ENV_USER = "QTBUILD_ENCLAVE_USER"
DEFAULT_USER = "qtbuild-enclave"
DEFAULT_COUNT = 65536
FIRST_ID = 100000
_MAX_ID = 2**32 - 2
_FIX = f"fix the entry, or choose another name with ${ENV_USER}"


@dataclass(frozen=True)
class IdRange:
    """Host uids ``uid .. uid+count-1`` and gids ``gid .. gid+count-1``, seen inside as
    ``0 .. count-1``."""

    uid: int
    gid: int
    count: int

    def host_uid(self, inside: int) -> int:
        return self.uid + inside

    def host_gid(self, inside: int) -> int:
        return self.gid + inside

    def contains(self, inside: int) -> bool:
        return 0 <= inside < self.count


def enclave_ids(user: str | None = None, *, subuid: str = "/etc/subuid", subgid: str = "/etc/subgid",
                passwd: str = "/etc/passwd", group: str = "/etc/group") -> IdRange:
    """The range of ``user`` (default ``$QTBUILD_ENCLAVE_USER`` or ``qtbuild-enclave``),
    allocated when missing (see the module docstring)."""
    name = user or os.environ.get(ENV_USER) or DEFAULT_USER
    if not name or any(c in name for c in ":\n\0"):
        raise SandboxError(f"${ENV_USER}: {name!r} is not a usable name for /etc/subuid")
    first_uid, count_uid = subordinate_range(subuid, name, _ids_in(passwd, 2))
    first_gid, count_gid = subordinate_range(subgid, name, _ids_in(group, 2))
    return IdRange(first_uid, first_gid, min(count_uid, count_gid))


def subordinate_range(path: str, name: str, taken_ids: set[int]) -> tuple[int, int]:
    """``(first, count)`` of ``name`` in the subordinate-id file ``path``, appending a new
    range that avoids every other entry and ``taken_ids`` when there is none."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with open(fd, encoding="utf-8", closefd=False) as handle:
            entries = _parse(handle.read(), path)
        for owner, first, count in entries:
            if owner == name:
                if first == 0:
                    raise SandboxError(f"{path}: the range of {name} starts at host id 0 (root); {_FIX}")
                return first, count
        first = _free_block([(first, count) for _, first, count in entries], taken_ids)
        data = f"{name}:{first}:{DEFAULT_COUNT}\n"
        if os.fstat(fd).st_size and not _ends_with_newline(fd):
            data = "\n" + data
        os.write(fd, data.encode())
        return first, DEFAULT_COUNT
    except OSError as exc:
        raise SandboxError(f"cannot read or extend {path} ({exc.strerror}): the sandbox maps root inside to a "
                           f"subordinate id range; add a line '{name}:<first>:65536' yourself") from exc
    finally:
        os.close(fd)


def _parse(text: str, path: str) -> list[tuple[str, int, int]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.strip().split(":")
        try:
            owner, first, count = fields[0], int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise SandboxError(f"{path} line {number}: expected name:first:count, got {line!r}") from None
        if first < 0 or count < 1 or first + count - 1 > _MAX_ID:
            raise SandboxError(f"{path} line {number}: the range {first}:{count} is out of bounds")
        entries.append((owner, first, count))
    return entries


def _free_block(ranges: list[tuple[int, int]], taken_ids: set[int]) -> int:
    first = FIRST_ID
    while first + DEFAULT_COUNT - 1 <= _MAX_ID:
        end = first + DEFAULT_COUNT
        clash = any(start < end and first < start + count for start, count in ranges)
        if not clash and not any(first <= taken < end for taken in taken_ids):
            return first
        first += DEFAULT_COUNT
    raise SandboxError("no free block of 65536 subordinate ids is left below 2^32")


def _ids_in(path: str, column: int) -> set[int]:
    """The numeric ids in ``column`` of a passwd/group style file (empty when it is missing)."""
    found = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split(":")
                if len(fields) > column and fields[column].isascii() and fields[column].isdigit():
                    found.add(int(fields[column]))
    except FileNotFoundError:
        pass
    return found


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return os.pread(fd, 1, size - 1) == b"\n"
