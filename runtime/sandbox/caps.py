"""Privileges of the application process: ids, capabilities and ``no_new_privs``.

Contract, in the order :mod:`qtbuild.runtime.sandbox.helper` calls them:

1. :func:`drop_bounding_set` — empties the bounding set (needs CAP_SETPCAP, still held), so
   no later ``execve`` (setuid binary or file capabilities) can bring a capability back.
2. :func:`set_ids` — supplementary groups (unless the user namespace forbids ``setgroups``),
   gid, then uid (real, effective and saved).  Needs CAP_SETUID/CAP_SETGID, still held.
3. :func:`clear_capabilities` — clears the ambient set, then effective, permitted and
   inheritable (an application running as uid 0 would otherwise keep them).
4. :func:`set_no_new_privs`.
"""

from __future__ import annotations

import ctypes
import errno
import os

from .syscalls import check, libc, prctl

__all__ = ["clear_capabilities", "drop_bounding_set", "effective_capabilities", "set_ids", "set_no_new_privs"]

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_bounding_set() -> None:
    """Drop every capability the kernel knows from the bounding set."""
    for cap in range(64):
        try:
            prctl(PR_CAPBSET_DROP, cap, what=f"dropping capability {cap} from the bounding set")
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # past the last capability this kernel has
                return
            raise


def set_ids(uid: int, gid: int, groups: list[int], set_groups: bool) -> None:
    """Switch to ``uid``/``gid``/``groups`` for good (real, effective and saved ids)."""
    if set_groups:
        os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def clear_capabilities() -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="clearing ambient capabilities")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc.capset(ctypes.byref(header), data), "capset (clearing capabilities)")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, what="PR_SET_NO_NEW_PRIVS")


def effective_capabilities() -> int:
    """The calling process's effective capability mask (for checks and tests)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc.capget(ctypes.byref(header), data), "capget")
    return data[0].effective | data[1].effective << 32
