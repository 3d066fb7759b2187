"""What a local enclave holds on the host, and how it is released: by its supervisor when the
enclave ends, or by ``stop`` after the supervisor died.

Held, and released by :func:`release_host_state` (idempotent, every step best effort so one
failure does not leave the rest behind):

* its memory: ``<dir>/root`` — a tmpfs sized to ``--mem`` as root, mounted inside the
  supervisor's private mount namespace (so the kernel frees it when the supervisor and its
  sandbox are gone, even if nobody cleans up); rootless, a plain directory;
* its vsock directory ``<vsock root>/<cid>/`` and its registration (``qtbuild.runtime.sdk.vsock``);
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

from qtbuild.runtime.qtsm.pki import LocalPki, PkiError
from qtbuild.runtime.sandbox import SandboxError
from qtbuild.runtime.sandbox.cgroups import Cgroup
from qtbuild.runtime.sandbox.syscalls import mount, umount2
from qtbuild.runtime.sdk import vsock

from .state import EnclaveDir, EnclaveRecord

__all__ = ["kill_sandbox", "prepare_memory", "prepare_vsock", "process_start_time", "release_host_state",
           "release_memory"]

log = logging.getLogger(__name__)

MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH = 2
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


def prepare_vsock(root: Path, cid: int, uid: int, gid: int) -> Path:
    """A fresh ``<root>/<cid>/`` for the enclave's listeners, owned by its application's user
    (as root) so the application can bind there."""
    directory = root / str(cid)
    shutil.rmtree(directory, ignore_errors=True)  # a stale one from a crash nobody stopped
    directory.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(directory, uid, gid)
    return directory


def release_host_state(directory: EnclaveDir, record: EnclaveRecord, vsock_root: Path) -> None:
    """Release everything but the sandbox (see the module docstring)."""
    config = vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, os.fspath(vsock_root))
    _attempt("unregistering the vsock CID", vsock.unregister_enclave, record.cid, config=config)
    _attempt("removing the vsock directory", _remove_tree, vsock_root / str(record.cid))
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


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _forget_leaf(state_dir: str, leaf_name: str) -> None:
    with contextlib.suppress(PkiError):  # the PKI is gone: nothing to forget
        LocalPki.load(state_dir).forget_leaf(leaf_name)


def _attempt(what: str, action, *args, **kwargs) -> None:
    try:
        action(*args, **kwargs)
    except OSError as exc:
        log.warning("%s failed: %s", what, exc)
