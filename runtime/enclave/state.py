"""The local runtime's state directory: where it is, what is in it, and the enclave records.

Location: ``$QTBUILD_RUNTIME_DIR``, else ``/run/qtbuild`` for root, else
``$XDG_RUNTIME_DIR/qtbuild`` (``/tmp/qtbuild-<uid>`` without it).  Layout::

    <runtime>/lock                     flock(2) taken while enclaves are allocated or removed
    <runtime>/vsock/                   the emulated vsock root of this host (see qtbuild.runtime.sdk.vsock):
        3/                             the parent's listeners (CID 3); as root a small tmpfs
        <cid>/                         each enclave's listeners (as root a small tmpfs each); .enclaves/
                                       their registrations
    <runtime>/enclaves/<id>/           one directory per enclave (0700), removed by ``stop``:
        record.json                    the :class:`EnclaveRecord` (replaced atomically)
        alive.lock                     flock(2)ed by the supervisor for its whole life
        supervisor.log                 the supervisor's diagnostics
        qtsm.sock                      the security module (bound at the cloud's /dev/qtsm or /dev/nsm)
        console.sock                   the debug console (debug mode only)
        root/                          the enclave's memory: the unpacked ramdisks (a tmpfs as root, in
                                       the supervisor's own mount namespace), and
            qtsm.sock                  the security module (bound at /dev/qtsm and /dev/nsm inside)

Contract: records are written whole (temporary file + rename), so readers never take a lock;
allocation of enclave ids and CIDs happens under :meth:`RuntimeDir.locked`.  An enclave whose
record says Starting/Running but whose ``alive.lock`` nobody holds has lost its supervisor:
:func:`observed_status` reports it ``Crashed`` (immune to pid reuse: the kernel drops the lock
when the supervisor dies, however it dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qtbuild.formats.bounded_input import load_json_object, read_bounded
from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.sandbox.syscalls import mount, umount2

__all__ = [
    "CRASHED", "ENV_RUNTIME_DIR", "OOM", "RUNNING", "STARTING", "STOPPED", "EnclaveDir", "EnclaveRecord",
    "RuntimeDir", "holds_cid", "observed_status", "read_record", "write_record",
]

ENV_RUNTIME_DIR = "QTBUILD_RUNTIME_DIR"
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MNT_DETACH = 2
STARTING, RUNNING, STOPPED, OOM, CRASHED = "Starting", "Running", "Stopped", "OOM", "Crashed"
#: Statuses in which a supervisor is supposed to be alive.
LIVE_STATUSES = (STARTING, RUNNING)
MAX_RECORD = 1 << 20


def default_runtime_dir() -> Path:
    """The runtime directory for this process (see the module docstring)."""
    if os.environ.get(ENV_RUNTIME_DIR):
        return Path(os.environ[ENV_RUNTIME_DIR])
    if os.geteuid() == 0:
        return Path("/run/qtbuild")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "qtbuild"
    return Path(f"/tmp/qtbuild-{os.geteuid()}")


@dataclass(frozen=True)
class EnclaveDir:
    """One enclave's directory and the names in it."""

    path: Path

    @property
    def enclave_id(self) -> int:
        return int(self.path.name)

    @property
    def runtime(self) -> RuntimeDir:
        """The runtime directory this enclave belongs to."""
        return RuntimeDir(self.path.parent.parent)

    @property
    def record(self) -> Path:
        return self.path / "record.json"

    @property
    def alive_lock(self) -> Path:
        return self.path / "alive.lock"

    @property
    def log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def qtsm_socket(self) -> Path:
        """In the enclave memory: private to the supervisor as root, and no host path shows in the
        enclave's mountinfo."""
        return self.root / "qtsm.sock"

    @property
    def console_socket(self) -> Path:
        return self.path / "console.sock"

    @property
    def root(self) -> Path:
        return self.path / "root"

    def is_alive(self) -> bool:
        """Whether a supervisor holds this enclave's ``alive.lock``."""
        try:
            fd = os.open(self.alive_lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def take_alive_lock(self) -> int:
        """Create ``alive.lock`` and hold it (returns the fd; the lock lives as long as any
        copy of it, e.g. the supervisor's inherited one)."""
        fd = os.open(self.alive_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd


@dataclass(frozen=True)
class RuntimeDir:
    """The runtime directory (see the module docstring)."""

    path: Path

    @classmethod
    def default(cls) -> RuntimeDir:
        return cls(default_runtime_dir())

    @property
    def vsock_root(self) -> Path:
        return self.path / "vsock"

    @property
    def enclaves(self) -> Path:
        return self.path / "enclaves"

    def enclave(self, enclave_id: int) -> EnclaveDir:
        return EnclaveDir(self.enclaves / str(enclave_id))

    @property
    def parent_vsock(self) -> Path:
        """The parent's (CID 3) listeners, bound read-only into every enclave."""
        return self.vsock_root / "3"

    def ensure(self) -> None:
        """Create the directory tree (the runtime and vsock directories 0755, enclaves 0700)
        and, as root, mount the parent's vsock directory (see :meth:`_mount_parent_vsock`)."""
        for path, mode in ((self.path, 0o755), (self.enclaves, 0o700), (self.vsock_root, 0o755),
                           (self.parent_vsock, 0o755)):
            path.mkdir(mode=mode, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._mount_parent_vsock()

    def _mount_parent_vsock(self) -> None:
        """Make ``vsock/3`` a small tmpfs of its own (``nosuid,nodev,noexec``), once: it is
        bound into every enclave, and a bind of a host directory would show the host path in
        the enclave's ``/proc/self/mountinfo``.  Left as it is when listeners were already
        bound there on the underlying disk (mounting over them would hide them).  It stays
        mounted, like ``/run``; :meth:`unmount` undoes it."""
        fd = os.open(self.path / "vsock.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.ismount(self.parent_vsock) or os.listdir(self.parent_vsock):
                return
            mount("tmpfs", os.fspath(self.parent_vsock), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "size=1m,nr_inodes=4096,mode=0755")
        finally:
            os.close(fd)

    def unmount(self) -> None:
        """Unmount what :meth:`ensure` mounted (for tests, demos and uninstalling: the caller
        makes sure no enclave or parent listener still needs it)."""
        while os.path.ismount(self.parent_vsock):
            umount2(os.fspath(self.parent_vsock), MNT_DETACH)

    def enclave_dirs(self) -> list[EnclaveDir]:
        """Every enclave directory, by id."""
        try:
            names = [name for name in os.listdir(self.enclaves) if name.isdigit()]
        except FileNotFoundError:
            return []
        return [self.enclave(enclave_id) for enclave_id in sorted(map(int, names))]

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the runtime lock (exclusive) for allocations and removals."""
        self.ensure()
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@dataclass
class EnclaveRecord:
    """What the runtime knows about one enclave.  The first group of fields is what ``query``
    shows (:meth:`public`; ``ProcessID`` is the supervisor's pid, the process that *is* the
    enclave); the rest is the supervisor's bookkeeping, needed to clean up after a crash."""

    enclave_id: int
    cid: int
    cpus: int
    memory_mib: int
    debug: bool
    eif_path: str
    status: str = STARTING
    process_id: int = 0
    exit_code: int | None = None
    exit_signal: int | None = None
    measurements: dict | None = None
    parent_role: str | None = None
    instance_id: str | None = None
    no_limits: bool = False
    cloud: str = "qingtian"
    name: str = ""
    cpu_ids: list[int] | None = None
    pki_state_dir: str = ""
    leaf_name: str = ""
    sandbox_name: str = ""
    sandbox_pid: int = 0
    sandbox_start: int = 0
    cgroup: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def launch_mode(self) -> str:
        return "debug" if self.debug else "normal"

    def summary(self, status: str | None = None) -> dict:
        """The ``run`` answer, in qt's key order."""
        return {"EnclaveID": self.enclave_id, "EnclaveCID": self.cid, "NumberOfCPUs": self.cpus,
                "MemoryMiB": self.memory_mib, "LaunchMode": self.launch_mode, "ProcessID": self.process_id,
                "Status": status or self.status}

    def public(self, status: str | None = None) -> dict:
        """The ``query`` entry: the summary, the exit status when stopped, the image's PCRs."""
        document = self.summary(status)
        if document["Status"] in (STOPPED, OOM) and self.exit_code is not None:
            document["ExitCode"] = self.exit_code
        if document["Status"] in (STOPPED, OOM) and self.exit_signal is not None:
            document["Signal"] = self.exit_signal
        document["EifPath"] = self.eif_path
        document["Cloud"] = self.cloud
        if self.measurements is not None:
            document["Measurements"] = self.measurements
        return document

    @classmethod
    def from_json(cls, data: dict) -> EnclaveRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def write_record(directory: EnclaveDir, record: EnclaveRecord) -> None:
    """Replace the record atomically (not durably: no enclave outlives the machine's uptime, and
    `run` writes the record six times before the application is reported running)."""
    data = json.dumps(asdict(record), sort_keys=True).encode() + b"\n"
    write_atomically(directory.record, data, 0o644, durable=False)


def read_record(directory: EnclaveDir) -> EnclaveRecord | None:
    """The record, or None when the directory has none (being created or removed)."""
    try:
        with open(directory.record, "rb") as handle:
            data = read_bounded(handle, MAX_RECORD, ValueError(f"{directory.record} is larger than {MAX_RECORD} bytes"))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    return EnclaveRecord.from_json(load_json_object(data, what=str(directory.record), error=ValueError))


def observed_status(directory: EnclaveDir, record: EnclaveRecord) -> str:
    """The record's status, or ``Crashed`` when its supervisor should be alive and is not."""
    if record.status in LIVE_STATUSES and not directory.is_alive():
        return CRASHED
    return record.status


def holds_cid(status: str) -> bool:
    """Whether an enclave in ``status`` still occupies its CID and counts against the limit
    (a crashed enclave may still have processes and sockets until ``stop`` cleans up)."""
    return status in (*LIVE_STATUSES, CRASHED)
