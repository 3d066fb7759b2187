"""Namespaces: entering fresh ones, mapping ids in a user namespace, naming the UTS namespace
and bringing up the only network interface a fresh network namespace has (``lo``).

Contract: :func:`enter` must be called by a single-threaded process (the kernel refuses
``CLONE_NEWUSER`` otherwise).  The PID namespace applies to the caller's *children* only: the
first child forked afterwards is PID 1.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from .syscalls import unshare

__all__ = ["CLONE_NEWUSER", "SANDBOX_NAMESPACES", "become_root", "enter", "enter_mapped", "loopback_up", "map_ids",
           "set_hostname"]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SANDBOX_NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags at the start of the union


def enter(with_user: bool) -> None:
    """Unshare mount, cgroup, UTS, IPC, PID and network namespaces (and a user namespace
    first when ``with_user``: the unprivileged case, where it grants the others)."""
    unshare(SANDBOX_NAMESPACES | (CLONE_NEWUSER if with_user else 0))


def enter_mapped(uid: int, gid: int, count: int) -> None:
    """As root: unshare a user namespace with the sandbox's namespaces, inside ids
    ``0 .. count-1`` being host uids ``uid ..`` and gids ``gid ..``.

    A range can only be mapped by a process with CAP_SETUID/CAP_SETGID in the *parent* user
    namespace, which the caller loses by unsharing; so, as bubblewrap's privileged mode and
    newuidmap(1) do, the maps are written from outside: by a child forked first, which waits
    until the caller has unshared, writes ``/proc/<caller>/{uid,gid}_map`` and exits (its
    status says whether it could).  ``setgroups`` stays allowed: the map was written with
    privilege."""
    ready_read, ready_write = os.pipe()
    caller = os.getpid()
    mapper = os.fork()
    if mapper == 0:
        os.close(ready_write)
        code = 0
        try:
            if os.read(ready_read, 1) == b"1":
                _write_proc(f"/proc/{caller}/uid_map", f"0 {uid} {count}\n")
                _write_proc(f"/proc/{caller}/gid_map", f"0 {gid} {count}\n")
        except OSError as exc:
            code = exc.errno or 1
        os._exit(code)
    os.close(ready_read)
    try:
        unshare(SANDBOX_NAMESPACES | CLONE_NEWUSER)
        os.write(ready_write, b"1")
    finally:
        os.close(ready_write)
        _, status = os.waitpid(mapper, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise OSError(code, f"writing the uid/gid maps from outside: {os.strerror(code) if code > 0 else code}")


def become_root() -> None:
    """Take uid and gid 0 of the current user namespace (capabilities in it are kept): a
    process whose host ids are not mapped in it cannot create files on filesystems mounted
    inside it."""
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def map_ids(inside_uid: int, outside_uid: int, inside_gid: int, outside_gid: int) -> None:
    """Map one uid and one gid of the new user namespace, from inside it.  ``setgroups`` is
    denied first, as the kernel requires for an unprivileged gid map."""
    _write_proc("/proc/self/setgroups", "deny")
    _write_proc("/proc/self/uid_map", f"{inside_uid} {outside_uid} 1\n")
    _write_proc("/proc/self/gid_map", f"{inside_gid} {outside_gid} 1\n")


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def loopback_up() -> None:
    """Set IFF_UP on ``lo`` in the current network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(b"lo", 0)
        _, flags = _IFREQ.unpack(fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
