"""The sandbox's filesystem view: the enclave root bound onto itself, fresh ``/proc``,
``/dev``, ``/dev/shm`` and ``/tmp``, the caller's binds, then ``pivot_root`` into it.

Contract of :func:`open_sources`, :func:`build_root` and :func:`enter_root`:

* Must run in a private mount namespace, in the new PID namespace (for ``/proc``).
* Mount points inside the image are opened component by component from the root with
  ``O_NOFOLLOW``: a symlink planted in the image as an *intermediate* component is refused
  (:class:`SandboxError`), a symlink *at* the mount point is replaced by a fresh directory or
  file, so nothing is ever mounted outside the root (runc CVE-2026-41579 class).  Missing
  directories and mount-point files are created in the root.  Every mount targets the opened
  descriptor (``/proc/self/fd/N``), never a path that could be swapped afterwards.
* ``/proc/sys``, ``/proc/sysrq-trigger``, ``/proc/irq`` and ``/proc/bus`` are read-only, as in
  bubblewrap: an application running as uid 0 without capabilities could otherwise write them.
* Binds are not recursive; a read-only bind keeps the source mount's locked flags.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .spec import SandboxError, step
from .syscalls import mount, pivot_root, umount2

__all__ = ["Sources", "build_root", "enter_root", "open_sources"]

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x2000, 0x4000, 0x40000
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 0x400, 0x800, 0x200000
MNT_DETACH = 2
# statvfs f_flag bits (ST_*) -> mount flags (MS_*), for remounts that must keep locked flags.
_LOCKED_FLAGS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME,
                 2048: MS_NODIRATIME, 4096: MS_RELATIME}

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2"}
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")


@dataclass
class Sources:
    """What the root is built from, opened (``O_PATH``) while the process still has the host
    view: the root (bound onto itself), the host device nodes and the bind sources.  Mounting
    from ``/proc/self/fd/N`` afterwards needs no access to the host paths, which may sit in
    directories the sandbox's own root (an unprivileged host uid) cannot enter."""

    root_fd: int
    devices: dict[str, int]
    binds: list[tuple[int, dict]]


def open_sources(root: str, binds: list[dict]) -> Sources:
    """Step 4a: make every mount private, bind ``root`` onto itself and open it and every
    source (``binds``: dicts with source/target/read_only)."""
    with step("making / rprivate"):
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    with step(f"binding the root {root} onto itself"):
        mount(root, root, None, MS_BIND | MS_REC)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    devices = {}
    for name in DEVICES:
        with step(f"opening /dev/{name}"):
            devices[name] = os.open(f"/dev/{name}", os.O_PATH | os.O_CLOEXEC)
    opened = []
    for bind in binds:
        with step(f"opening the bind source {bind['source']}"):
            opened.append((os.open(bind["source"], os.O_PATH | os.O_CLOEXEC), bind))
    return Sources(root_fd, devices, opened)


def build_root(sources: Sources) -> int:
    """Steps 4b-4e: mount the fresh filesystems and the binds inside the root.  Returns an fd
    of the new root for :func:`enter_root` (the source fds are closed)."""
    root_fd = sources.root_fd
    with step("mounting a fresh /proc"):
        _mount_proc(root_fd)
    with step("mounting /dev"):
        _mount_dev(root_fd, sources.devices)
    with step("mounting /tmp"):
        _mount_on(root_fd, "/tmp", True, "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for fd, bind in sources.binds:
        with step(f"binding {bind['source']} to {bind['target']}"):
            _bind(root_fd, fd, bind["target"], bind["read_only"])
    for fd in [*sources.devices.values(), *(fd for fd, _ in sources.binds)]:
        os.close(fd)
    return root_fd


def enter_root(root_fd: int) -> None:
    """Step 5: ``pivot_root`` into the prepared root and detach the old one (or, where the
    current root cannot be pivoted — an initramfs — move the root over ``/`` and chroot)."""
    with step("pivoting into the root"):
        os.fchdir(root_fd)
        os.close(root_fd)
        try:
            pivot_root(".", ".")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            mount(".", "/", None, MS_MOVE)
            os.chroot(".")
        else:
            umount2(".", MNT_DETACH)
        os.chdir("/")


def _mount_proc(root_fd: int) -> None:
    _mount_on(root_fd, "/proc", True, "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    with _opened(root_fd, "/proc", True) as proc:
        for name in PROC_READ_ONLY:
            try:
                fd = os.open(name, _PATH, dir_fd=proc)
            except FileNotFoundError:
                continue
            try:
                mount(_fd_path(fd), _fd_path(fd), None, MS_BIND | MS_REC)
            finally:
                os.close(fd)
            fd = os.open(name, _PATH, dir_fd=proc)  # reopened: now the bind mount, not what is under it
            try:
                _remount_read_only(_fd_path(fd))
            finally:
                os.close(fd)


def _mount_dev(root_fd: int, devices: dict[str, int]) -> None:
    _mount_on(root_fd, "/dev", True, "tmpfs", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755")
    for name, fd in devices.items():
        _bind(root_fd, fd, f"/dev/{name}", read_only=False)
    with _opened(root_fd, "/dev", True) as dev:
        for name, target in DEV_LINKS.items():
            os.symlink(target, name, dir_fd=dev)
    _mount_on(root_fd, "/dev/shm", True, "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777")


def _bind(root_fd: int, source_fd: int, target: str, read_only: bool) -> None:
    is_dir = stat.S_ISDIR(os.fstat(source_fd).st_mode)
    with _mountpoint(root_fd, target, is_dir) as fd:
        mount(_fd_path(source_fd), _fd_path(fd), None, MS_BIND)
    if read_only:
        with _opened(root_fd, target, is_dir) as fd:
            _remount_read_only(_fd_path(fd))


def _mount_on(root_fd: int, target: str, is_dir: bool, source: str, fstype: str, flags: int,
              data: str | None = None) -> None:
    with _mountpoint(root_fd, target, is_dir) as fd:
        mount(source, _fd_path(fd), fstype, flags, data)


def _remount_read_only(path: str) -> None:
    current = os.statvfs(path).f_flag
    locked = 0
    for st_flag, ms_flag in _LOCKED_FLAGS.items():
        if current & st_flag:
            locked |= ms_flag
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked)


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@contextmanager
def _opened(root_fd: int, target: str, is_dir: bool) -> Iterator[int]:
    """An O_PATH fd of the existing ``target`` under ``root_fd``, walking without following
    symlinks (a mount on a component is crossed: it is ours)."""
    with _path_fd(root_fd, target, is_dir, create=False) as fd:
        yield fd


@contextmanager
def _mountpoint(root_fd: int, target: str, is_dir: bool) -> Iterator[int]:
    """An O_PATH fd of ``target`` under ``root_fd``, creating it (and missing parents) as a
    directory or an empty file; a symlink at ``target`` is replaced, one above it refused."""
    with _path_fd(root_fd, target, is_dir, create=True) as fd:
        yield fd


@contextmanager
def _path_fd(root_fd: int, target: str, is_dir: bool, *, create: bool) -> Iterator[int]:
    parent, name = _walk(root_fd, target, create=create)
    try:
        if create:
            _prepare(parent, name, target, is_dir)
        fd = os.open(name, _PATH | (os.O_DIRECTORY if is_dir else 0), dir_fd=parent)
    finally:
        os.close(parent)
    try:
        yield fd
    finally:
        os.close(fd)


def _walk(root_fd: int, target: str, create: bool) -> tuple[int, str]:
    """(fd of the parent directory of ``target``, last component), never following symlinks."""
    *parents, name = [part for part in target.split("/") if part]
    fd = os.dup(root_fd)
    try:
        for index, part in enumerate(parents):
            try:
                next_fd = _open_dir(fd, part, create)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = "/" + "/".join(parents[:index + 1])
                raise SandboxError(f"mount point {target}: {where} in the image is a symlink or not a directory; "
                                   "refusing to follow it (fix the image or choose another target)") from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _open_dir(parent: int, name: str, create: bool) -> int:
    try:
        return os.open(name, _PATH | os.O_DIRECTORY, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(name, 0o755, dir_fd=parent)
        return os.open(name, _PATH | os.O_DIRECTORY, dir_fd=parent)


def _prepare(parent: int, name: str, target: str, is_dir: bool) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        os.unlink(name, dir_fd=parent)
        st = None
    if st is None:
        if is_dir:
            os.mkdir(name, 0o755, dir_fd=parent)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=parent))
    elif stat.S_ISDIR(st.st_mode) != is_dir:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise SandboxError(f"mount point {target} is {kind} in the image, which does not match what is "
                           "mounted there")
