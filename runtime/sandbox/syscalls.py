"""Thin ctypes access to the Linux system calls Python 3.11 does not expose.

Contract: every wrapper raises :class:`OSError` (with ``errno`` set and the call named in the
message) when the kernel refuses, and returns ``None`` or the call's non-negative result
otherwise.  Nothing here decides policy; the callers do.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["check", "close_range", "libc", "mount", "pivot_root", "prctl", "setns", "syscall_number", "umount2",
           "unshare"]

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long

_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}


def check(result: int, what: str) -> int:
    """Return ``result`` unless it is -1, in which case raise OSError for ``what``."""
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def syscall_number(table: dict[str, int]) -> int:
    """The number for this machine from ``table`` (keyed by ``platform.machine()``)."""
    machine = platform.machine()
    if machine not in table:
        raise OSError(0, f"unsupported architecture {machine!r}")
    return table[machine]


def _bytes(value: str | bytes | None) -> bytes | None:
    return os.fsencode(value) if value is not None else None


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0, *, what: str = "prctl") -> int:
    return check(libc.prctl(option, arg2, arg3, arg4, arg5), what)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)),
          f"mount {source or fstype} on {target}")


def umount2(target: str, flags: int) -> None:
    check(libc.umount2(_bytes(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = syscall_number(_PIVOT_ROOT)
    check(libc.syscall(number, _bytes(new_root), _bytes(put_old)), "pivot_root")


def close_range(first: int, last: int = 2**32 - 1) -> None:
    """Close every fd from ``first`` to ``last`` (one call; ``close_range`` is 436 on x86_64
    and aarch64)."""
    check(libc.syscall(436, ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(0)), "close_range")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), f"setns({nstype:#x})")
