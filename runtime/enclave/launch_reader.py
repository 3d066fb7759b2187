"""What the enclave's first process is: read from an unpacked customer ramdisk, as its init would.

The ramdisk (``qtbuild.convert.ramdisk``) holds ``launch.json`` (argv, env, cwd, uid, gid, groups),
and nitro-cli's ``cmd`` and ``env`` files (one item per line).  :func:`read_launch` prefers
``launch.json`` and falls back to ``cmd``/``env`` (cwd ``/``, uid/gid 0), as images built by
other tools carry only those.  Files are opened relative to the ramdisk's root without
following symlinks, and are bounded in size.

Contract: returns a :class:`qtbuild.formats.launch_record.Launch` whose fields have the right types, or raises
:class:`~qtbuild.runtime.enclave.errors.EnclaveError` naming the file and the problem; the values
themselves (paths, ids) are checked again by :class:`qtbuild.runtime.sandbox.SandboxSpec`.
"""

from __future__ import annotations

import os

from qtbuild.formats.bounded_input import read_bounded
from qtbuild.formats.launch_record import MAX_LAUNCH_FILE, Launch, LaunchFormatError, parse_cmd_env, parse_launch_json

from .errors import EnclaveError

__all__ = ["read_launch"]


def read_launch(root_fd: int) -> Launch:
    """The launch description of the ramdisk unpacked at ``root_fd``."""
    try:
        document = _read(root_fd, "launch.json")
        if document is not None:
            return parse_launch_json(document)
        cmd = _read(root_fd, "cmd")
        if cmd is None:
            raise EnclaveError("the image has neither launch.json nor cmd in its ramdisk: nothing to run")
        return parse_cmd_env(cmd, _read(root_fd, "env") or b"")
    except LaunchFormatError as exc:
        raise EnclaveError(f"the image's {exc}") from None


def _read(root_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=root_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EnclaveError(f"the image's {name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        too_large = EnclaveError(f"the image's {name} is larger than {MAX_LAUNCH_FILE} bytes")
        return read_bounded(handle, MAX_LAUNCH_FILE, too_large)
