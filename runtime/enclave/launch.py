"""What the enclave's first process is: read from an unpacked customer ramdisk, as its init would.

The ramdisk (``qtbuild.ramdisk``) holds ``launch.json`` (argv, env, cwd, uid, gid, groups),
and nitro-cli's ``cmd`` and ``env`` files (one item per line).  :func:`read_launch` prefers
``launch.json`` and falls back to ``cmd``/``env`` (cwd ``/``, uid/gid 0), as images built by
other tools carry only those.  Files are opened relative to the ramdisk's root without
following symlinks, and are bounded in size.

Contract: returns a :class:`LaunchSpec` whose fields have the right types, or raises
:class:`~runtime.enclave.errors.EnclaveError` naming the file and the problem; the values
themselves (paths, ids) are checked again by :class:`runtime.sandbox.SandboxSpec`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import EnclaveError

__all__ = ["LaunchSpec", "read_launch"]

MAX_LAUNCH_FILE = 1 << 20
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class LaunchSpec:
    argv: list[str]
    env: list[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)


def read_launch(root_fd: int) -> LaunchSpec:
    """The launch description of the ramdisk unpacked at ``root_fd``."""
    document = _read(root_fd, "launch.json")
    if document is not None:
        return _from_json(document)
    cmd = _read(root_fd, "cmd")
    if cmd is None:
        raise EnclaveError("the image has neither launch.json nor cmd in its ramdisk: nothing to run")
    argv = _lines(cmd, "cmd")
    env = _lines(_read(root_fd, "env") or b"", "env")
    return LaunchSpec(argv, env if any(e.startswith("PATH=") for e in env) else [DEFAULT_PATH, *env])


def _read(root_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnclaveError(f"the image's {name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_LAUNCH_FILE + 1)
    if len(data) > MAX_LAUNCH_FILE:
        raise EnclaveError(f"the image's {name} is larger than {MAX_LAUNCH_FILE} bytes")
    return data


def _lines(data: bytes, name: str) -> list[str]:
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise EnclaveError(f"the image's {name} file is not UTF-8") from None
    return [line for line in text.split("\n") if line]


def _from_json(data: bytes) -> LaunchSpec:
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise EnclaveError(f"the image's launch.json is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise EnclaveError("the image's launch.json is not an object")
    spec = LaunchSpec(
        argv=_typed(document, "argv", list, str), env=_typed(document, "env", list, str),
        cwd=_typed(document, "cwd", str), uid=_typed(document, "uid", int), gid=_typed(document, "gid", int),
        groups=_typed(document, "groups", list, int),
    )
    if not spec.argv:
        raise EnclaveError("the image's launch.json has an empty argv: nothing to run")
    return spec


def _typed(document: dict, key: str, kind: type, item: type | None = None):
    value = document.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and item is not None:
        ok = all(isinstance(element, item) and not isinstance(element, bool) for element in value)
    if not ok:
        expected = f"a list of {item.__name__}" if item else kind.__name__
        raise EnclaveError(f"the image's launch.json: {key!r} must be {expected}")
    return value
