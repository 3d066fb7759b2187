"""What a local enclave holds on the host, and how it is released: by its supervisor when the
enclave ends, or by ``stop`` after the supervisor died.

Held, and released by :func:`release_host_state` (idempotent, every step best effort so one
failure does not leave the rest behind):

* its memory: ``<dir>/root`` — a tmpfs sized to ``--mem`` as root, mounted inside the
  supervisor's private mount namespace (so the kernel frees it when the supervisor and its
  sandbox are gone, even if nobody cleans up); rootless, a plain directory;
* its vsock directory ``<vsock root>/<cid>/`` (as root a small tmpfs of its own, mounted on the
  host: the only host-visible place the enclave can write) and its registration
  (``qtbuild.runtime.sdk.vsock``);
* the security-module and console sockets, and its PKI leaf.

The sandbox itself (processes and cgroup) is released by :func:`kill_sandbox`, from the
record, when no supervisor is left to do it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
from pathlib import Path

from qtbuild.runtime.sandbox import SandboxError
from qtbuild.runtime.sandbox.cgroups import Cgroup
from qtbuild.runtime.sandbox.syscalls import mount, setns, umount2
from qtbuild.runtime.sdk import vsock

from .state import EnclaveDir, EnclaveRecord

__all__ = ["hand_over_vsock", "in_mount_namespace", "kill_sandbox", "prepare_memory", "prepare_vsock",
           "process_start_time", "release_host_state", "release_memory"]

log = logging.getLogger(__name__)

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
#: The enclave's vsock directory holds only sockets (inodes without data): a small tmpfs.
VSOCK_SIZE, VSOCK_INODES = 1 << 20, 4096
_EXIT_WAIT = 5.0


def prepare_memory(dest: Path, memory_bytes: int, *, use_tmpfs: bool) -> None:
    """Create ``dest`` and, with ``use_tmpfs``, mount a tmpfs of ``memory_bytes`` on it."""
    dest.mkdir(mode=0o755, exist_ok=True)
    if use_tmpfs:
        mount("tmpfs", os.fspath(dest), "tmpfs", MS_NOSUID | MS_NODEV, f"size={memory_bytes},mode=0755")


def release_memory(dest: Path) -> None:
    """Unmount ``dest`` if it is a mount point, then remove it and whatever it holds."""
    if os.path.ismount(dest):
        umount2(os.fspath(dest), MNT_DETACH)
    shutil.rmtree(dest, ignore_errors=True)


def prepare_vsock(root: Path, cid: int) -> Path:
    """A fresh ``<root>/<cid>/`` for the enclave's listeners.  As root, it is a tmpfs of its own,
    mounted in the caller's mount namespace (which must be the host's, so parent processes see
    it): ``nosuid,nodev,noexec`` — a setuid file dropped there cannot raise anyone's
    privileges — and :data:`VSOCK_SIZE` bytes, :data:`VSOCK_INODES` inodes, charged to the
    memory cgroup of the writer (the enclave), so it neither fills the host disk nor escapes
    ``--mem``.  Hand it to the application with :func:`hand_over_vsock`.  Rootless: a plain
    directory (the application is the caller's own uid)."""
    directory = root / str(cid)
    _unmount_and_remove(directory)  # a stale one from a crash nobody stopped
    directory.mkdir(mode=0o755)
    if os.geteuid() == 0:
        mount("tmpfs", os.fspath(directory), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              f"size={VSOCK_SIZE},nr_inodes={VSOCK_INODES},mode=0755")
    return directory


def hand_over_vsock(directory: Path, uid: int, gid: int) -> None:
    """Make ``directory`` (from :func:`prepare_vsock`) the application's, as the host sees its
    ids, so it can bind its listeners there (as root only)."""
    if os.geteuid() == 0:
        os.chown(directory, uid, gid)


def release_host_state(directory: EnclaveDir, record: EnclaveRecord, vsock_root: Path,
                       host_namespace: int | None = None) -> None:
    """Release everything but the sandbox (see the module docstring).  ``host_namespace``: an
    fd of the host's mount namespace when the caller has left it (the vsock tmpfs is unmounted
    there); None when the caller is in it."""
    config = vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, os.fspath(vsock_root))
    _attempt("unregistering the vsock CID", vsock.unregister_enclave, record.cid, config=config)
    vsock_dir = vsock_root / str(record.cid)
    if host_namespace is None:
        _attempt("removing the vsock directory", _unmount_and_remove, vsock_dir)
    else:
        _attempt("removing the vsock directory", in_mount_namespace, host_namespace, _unmount_and_remove, vsock_dir)
    _attempt("releasing the enclave memory", release_memory, directory.root)
    for path in (directory.qtsm_socket, directory.console_socket):
        _attempt(f"removing {path.name}", path.unlink, missing_ok=True)
    if record.leaf_name and record.pki_state_dir:
        _attempt("forgetting the PKI leaf", _forget_leaf, record.pki_state_dir, record.leaf_name)


def kill_sandbox(record: EnclaveRecord) -> None:
    """Kill what is left of the sandbox after its supervisor died: every process in its cgroup
    (then remove the cgroup), or, without cgroup, its PID 1 — the kernel then ends the rest."""
    if record.cgroup:
        try:
            Cgroup(record.cgroup["version"], record.cgroup["paths"]).remove()
        except SandboxError as exc:
            log.warning("%s", exc)
    if record.sandbox_pid:
        _kill_verified(record.sandbox_pid, record.sandbox_start)


def process_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/<pid>/stat field 22), which
    together with the pid names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def _kill_verified(pid: int, start_time: int) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``start_time``; wait for it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_start_time(pid) != start_time:
            return  # gone, and the pid reused
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], _EXIT_WAIT)  # readable once it has exited
    finally:
        os.close(pidfd)


def _unmount_and_remove(path: Path) -> None:
    while os.path.ismount(path):
        umount2(os.fspath(path), MNT_DETACH)
    shutil.rmtree(path, ignore_errors=True)


def in_mount_namespace(namespace_fd: int, action, *args) -> None:
    """Run ``action(*args)`` in the mount namespace ``namespace_fd`` (e.g. the host's, from the
    supervisor's private one): in a forked child, since a multithreaded process cannot switch
    mount namespaces.  Raises OSError when the child fails."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 0
        try:
            setns(namespace_fd, CLONE_NEWNS)
            action(*args)
        except OSError as exc:
            code = exc.errno or 1
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        reason = os.strerror(code) if code > 0 else f"status {code}"
        raise OSError(max(code, 0), f"in the host mount namespace: {reason}")


def _forget_leaf(state_dir: str, leaf_name: str) -> None:
    from qtbuild.runtime.qtsm.pki import LocalPki, PkiError  # x509 & co.: not on the supervisor's start path

    with contextlib.suppress(PkiError):  # the PKI is gone: nothing to forget
        LocalPki.load(state_dir).forget_leaf(leaf_name)


def _attempt(what: str, action, *args, **kwargs) -> None:
    try:
        action(*args, **kwargs)
    except OSError as exc:
        log.warning("%s failed: %s", what, exc)
