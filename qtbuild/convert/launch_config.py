"""What the enclave runs: argv, environment, working directory and user, resolved at build time.

Two command semantics (``--cmd-semantics``):

- ``oci`` (default): argv = Entrypoint + Cmd, as ``docker run`` does.
- ``nitro``: argv = Cmd if present, else Entrypoint — what nitro-cli and ``qt enclave make-img``
  do (they never join the two; users porting images trip over it).

``User`` is resolved through the image's own ``/etc/passwd`` and ``/etc/group`` (``name``,
``uid``, ``name:group``, ``uid:gid``; a numeric uid need not exist, a name must), as runc does for
``docker run``: supplementary groups from ``/etc/group`` only when no group is given, and ``HOME``
(unless Env sets it) the user's passwd home directory, ``/`` for a user without an entry.  The
result is recorded in the customer ramdisk (see :mod:`qtbuild.convert.ramdisk`) so the runtime
needs no guessing; changing these rules moves PCRs, hence the launch layout version
(:data:`~qtbuild.formats.launch_record.LAUNCH_LAYOUT_VERSION`).
"""

from __future__ import annotations

import posixpath
import re
import stat
from collections.abc import Callable
from typing import Protocol

from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioEntry
from qtbuild.formats.launch_record import Launch, LaunchFormatError, with_default_path

#: /etc/passwd and /etc/group bigger than this are not read.
MAX_ACCOUNT_FILE = 1 << 20
#: A numeric id as passwd/group and ``User`` write it.  Not str.isdigit(), which also accepts
#: Unicode digits such as "²" that int() then refuses.
_NUMBER = re.compile(r"[0-9]{1,20}")  # longer is out of range anyway, and int() of >4300 digits raises


class _EntryLookup(Protocol):
    def get(self, path: bytes, /) -> CpioEntry | None: ...


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def resolve_launch(config: dict, read_file: Callable[[str], bytes | None], *, semantics: str = "oci") -> Launch:
    """Resolve an image config's command, env, WorkingDir and User.

    ``read_file(path)`` returns the bytes of a file in the image (absolute path) or None.
    Raises ImageError when there is no command, an element contains a newline, or the user or
    group cannot be resolved.
    """
    container = config.get("config") or config.get("Config") or {}
    if not isinstance(container, dict):
        raise ImageError("image config: 'config' is not an object")
    argv = _command(container, semantics)
    env = with_default_path(_string_list(container.get("Env"), "Env"))
    cwd = container.get("WorkingDir") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        raise ImageError(f"image WorkingDir {str(cwd)[:200]!r} is not an absolute path without NUL: fix WORKDIR")
    uid, gid, groups, user, home = _resolve_user(container.get("User") or "", read_file)
    if not any(item.startswith("HOME=") for item in env):
        env = [*env, f"HOME={home}"]
    try:
        return Launch(argv, env, posixpath.normpath(cwd), uid, gid, groups, user)
    except LaunchFormatError as exc:
        raise ImageError(f"image {exc}") from None


def _command(container: dict, semantics: str) -> list[str]:
    entrypoint = _string_list(container.get("Entrypoint"), "Entrypoint")
    cmd = _string_list(container.get("Cmd"), "Cmd")
    if semantics == "oci":
        argv = entrypoint + cmd
    elif semantics == "nitro":
        argv = cmd or entrypoint
    else:
        raise ImageError(f"unknown command semantics {semantics!r}: use oci or nitro")
    if not argv:
        raise ImageError(
            "the image has no command (neither ENTRYPOINT nor CMD): add `CMD [\"/path/to/app\"]` to the Dockerfile"
        )
    return argv


def _string_list(value: object, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ImageError(f"image config: {name} is not a list of strings")
    return list(value)


def _resolve_user(spec: str, read_file: Callable[[str], bytes | None]) -> tuple[int, int, list[int], str, str]:
    """(uid, gid, supplementary groups, user name, home) for an image's ``User`` (runc's rules)."""
    if not isinstance(spec, str):
        raise ImageError("image config: User is not a string")
    user_part, _, group_part = (spec or "root").partition(":")
    passwd = _parse_accounts(read_file("/etc/passwd"), 7)
    groups_db = _parse_accounts(read_file("/etc/group"), 4)
    numeric = _is_number(user_part)
    entry = next((row for row in passwd if row[0] == user_part or (numeric and row[2] == user_part)), None)
    if entry is not None:
        if not _is_number(entry[3]):
            raise ImageError(f"image User {spec!r}: /etc/passwd gives user {entry[0]!r} the group id "
                             f"{entry[3][:50]!r}, which is not a number: fix the image's /etc/passwd")
        uid, gid, name, home = int(entry[2]), int(entry[3]), entry[0], entry[5] or "/"
    elif numeric or not spec:
        # docker: an unknown numeric uid (or root in an image without passwd) runs with gid 0, HOME /
        uid, gid, name, home = int(user_part) if numeric else 0, 0, user_part, "/"
    else:
        raise ImageError(f"image User {spec!r}: no user {user_part!r} in the image's /etc/passwd")
    if group_part:
        # runc: supplementary groups only make sense in the implicit form (no group given)
        return uid, _resolve_group(group_part, groups_db, spec), [], name, home
    supplementary = sorted({int(row[2]) for row in groups_db if name in row[3].split(",")} - {gid})
    return uid, gid, supplementary, name, home


def _resolve_group(group: str, groups_db: list[list[str]], spec: str) -> int:
    if _is_number(group):
        return int(group)
    row = next((row for row in groups_db if row[0] == group), None)
    if row is None:
        raise ImageError(f"image User {spec!r}: no group {group!r} in the image's /etc/group")
    return int(row[2])


def _parse_accounts(data: bytes | None, fields: int) -> list[list[str]]:
    if not data:
        return []
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split(":")
        if len(parts) >= fields - 1 and not line.startswith("#") and _is_number(parts[2]):
            rows.append(parts + [""] * (fields - len(parts)))
    return rows


def tree_file_reader(entries: _EntryLookup) -> Callable[[str], bytes | None]:
    """A ``read_file`` over flattened entries (``get(path bytes) → CpioEntry | None``: a dict or a
    :class:`~qtbuild.convert.flatten.FlatTree`), following symlinks a little."""

    def read(path: str) -> bytes | None:
        key = path.lstrip("/").encode()
        for _ in range(8):
            entry = entries.get(key)
            if entry is None:
                return None
            if stat.S_ISLNK(entry.mode):
                target = (entry.link_target or b"").decode("utf-8", "replace")
                base = posixpath.dirname("/" + key.decode("utf-8", "replace"))
                key = posixpath.normpath(posixpath.join(base, target)).lstrip("/").encode()
                continue
            if not stat.S_ISREG(entry.mode) or entry.size > MAX_ACCOUNT_FILE:
                return None
            data = entry.data
            if callable(data):
                with data() as handle:
                    return handle.read(entry.size)
            return bytes(data or b"")
        return None

    return read
