"""The sandbox's seccomp filter: a raw classic-BPF deny list, installed last before ``execve``.

Contract of :func:`build_filter` / :func:`install`:

* A syscall from another ABI than the native one (``seccomp_data.arch`` differs: i386 via
  ``int 0x80`` on x86_64, arm32 on aarch64) kills the process; x32 syscalls (number with
  bit 30 set) fail with ENOSYS.
* :data:`DENIED` syscalls fail with EPERM: mounting and namespace changes, ptrace and
  cross-process memory access, kexec, modules, bpf, keyrings, perf, userfaultfd, io_uring.
* ``socket(AF_VSOCK, …)`` fails with EPERM: AF_VSOCK is not confined by network namespaces,
  so on a VM host the sandbox could otherwise reach real vsock peers.
* ``clone`` with any ``CLONE_NEW*`` flag fails with EPERM (it would bypass the ``unshare``
  denial); ``clone3`` fails with ENOSYS (its flags are out of BPF's reach; libc then falls
  back to ``clone``).
* Everything else is allowed.  :func:`install` requires ``no_new_privs`` (or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from .syscalls import prctl

__all__ = ["AF_VSOCK", "DENIED", "build_filter", "install", "supported"]

AF_VSOCK = 40
# name -> (x86_64 number, aarch64 number)
_NUMBERS = {
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "unshare": (272, 97), "setns": (308, 268),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "bpf": (321, 280), "keyctl": (250, 219),
    "add_key": (248, 217), "request_key": (249, 218), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "open_by_handle_at": (304, 265),
    "socket": (41, 198), "clone": (56, 220), "clone3": (435, 435),
}
DENIED = tuple(name for name in _NUMBERS if name not in ("socket", "clone", "clone3"))
_ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column in _NUMBERS, AUDIT_ARCH_*
_X32_SYSCALL_BIT = 0x40000000
_CLONE_NEW_FLAGS = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET

# Classic BPF opcodes and seccomp return values.
_LD_ABS = 0x20       # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15          # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35          # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45         # BPF_JMP | BPF_JSET | BPF_K
_RET = 0x06          # BPF_RET | BPF_K
_KILL_PROCESS = 0x80000000
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
# struct seccomp_data offsets: nr, arch, instruction pointer, args[6] (low 32 bits little-endian first).
_NR, _ARCH, _ARG0 = 0, 4, 16

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def supported(machine: str | None = None) -> bool:
    """Whether a filter exists for ``machine`` (default: this one)."""
    return (machine or platform.machine()) in _ARCHES


def build_filter(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k) instructions for ``machine`` (default: this one)."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise OSError(0, f"no seccomp filter for architecture {machine!r}")
    column, audit_arch = _ARCHES[machine]
    nr = {name: numbers[column] for name, numbers in _NUMBERS.items()}
    deny = _ERRNO | errno.EPERM
    prog = [(_LD_ABS, 0, 0, _ARCH), (_JEQ, 1, 0, audit_arch), (_RET, 0, 0, _KILL_PROCESS), (_LD_ABS, 0, 0, _NR)]
    if machine == "x86_64":
        prog += [(_JGE, 0, 1, _X32_SYSCALL_BIT), (_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    for name in DENIED:
        prog += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, deny)]
    prog += [(_JEQ, 0, 1, nr["clone3"]), (_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    prog += [(_JEQ, 0, 3, nr["socket"]), (_LD_ABS, 0, 0, _ARG0), (_JEQ, 0, 1, AF_VSOCK), (_RET, 0, 0, deny)]
    prog += [(_LD_ABS, 0, 0, _NR),
             (_JEQ, 0, 3, nr["clone"]), (_LD_ABS, 0, 0, _ARG0), (_JSET, 0, 1, _CLONE_NEW_FLAGS), (_RET, 0, 0, deny)]
    prog += [(_RET, 0, 0, _ALLOW)]
    return prog


def install() -> None:
    """Load the filter into the calling thread (inherited by children and across execve)."""
    prog = build_filter()
    code = b"".join(struct.pack("HBBI", *insn) for insn in prog)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(prog), ctypes.addressof(buffer))
    prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), what="installing the seccomp filter")
