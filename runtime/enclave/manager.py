"""Start, query, stop and read the console of local enclaves: the API behind ``qtbuild run`` and
``qtbuild enclave``.

::

    manager = Manager()                                  # RuntimeDir.default(); stderr notes
    started = manager.start(RunOptions("app.eif", debug=True, attach_console=True))
    started.summary        # {"EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB", "LaunchMode",
                           #  "ProcessID", "Status": "Running"}
    started.console        # attach mode: a binary stream of the application's output, until it ends
    started.wait()         # attach mode: {"status", "code", "signal"} once the enclave has ended
    manager.query()        # [record.public(status), ...]; Status Running / Stopped (+ExitCode) / OOM / Crashed
    manager.stop(0)        # {"EnclaveID": 0, "Terminated": true}
    manager.console(0, sys.stdout.buffer)

Contracts:

* :meth:`Manager.start` checks the rules (:mod:`qtbuild.runtime.enclave.rules`), creates the local PKI
  if missing (with a note), reserves an enclave id and CID under the runtime lock, starts the
  supervisor (:mod:`qtbuild.runtime.enclave.supervisor`) detached, and returns once the application
  runs — or raises the supervisor's :class:`~qtbuild.runtime.enclave.errors.EnclaveError` after removing
  the reservation.
* :meth:`Manager.stop` asks a live supervisor to stop (SIGTERM; SIGKILL after
  ``STOP_TIMEOUT``), kills and releases whatever a dead one left (:mod:`qtbuild.runtime.enclave.resources`),
  and forgets the enclave.  A stopped enclave's record stays (for ``query``) until ``stop``.
* Every failure is an :class:`~qtbuild.runtime.enclave.errors.EnclaveError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from qtbuild.runtime.qtsm.cloud_names import CLOUDS
from qtbuild.runtime.qtsm.pki_location import default_state_dir, is_initialised
from qtbuild.runtime.sandbox.host import helper_env

from . import resources, rules
from .console import ConsoleBusy, read_console
from .errors import E_FILE, E_INVALID_ARGUMENT, E_NOT_RUNNING, EnclaveError
from .state import (
    CRASHED,
    RUNNING,
    EnclaveDir,
    EnclaveRecord,
    RuntimeDir,
    holds_cid,
    observed_status,
    read_record,
    write_record,
)

__all__ = ["Manager", "RunOptions", "Started"]

START_TIMEOUT = 300.0   # seconds for the supervisor to load a large image and start it
STOP_TIMEOUT = 10.0
_POLL = 0.02


@dataclass(frozen=True)
class RunOptions:
    """What ``qtbuild run`` takes (``attach_console`` implies debug mode)."""

    eif: str
    cpus: int = rules.DEFAULT_CPUS
    memory_mib: int = rules.DEFAULT_MEMORY_MIB
    cid: int | None = None
    debug: bool = False
    attach_console: bool = False
    parent_role: str | None = None
    instance_id: str | None = None
    no_limits: bool = False
    cloud: str = "qingtian"
    name: str = ""
    cpu_ids: tuple[int, ...] | None = None


@dataclass
class Started:
    """A started enclave: its summary and, in attach mode, its output and final status."""

    summary: dict
    console: BinaryIO | None
    status: BinaryIO
    #: time.monotonic() at the end of each of the supervisor's start phases, in order
    phases: dict[str, float] = field(default_factory=dict)

    def wait(self) -> dict:
        """``{"status", "code", "signal"}`` once the enclave has ended (``Crashed`` if its
        supervisor died without saying)."""
        for line in self.status:
            message = json.loads(line)
            if "exit" in message:
                return message["exit"]
        return {"status": CRASHED, "code": None, "signal": None}

    def close(self) -> None:
        for stream in (self.console, self.status):
            if stream is not None:
                stream.close()


def _stderr_note(message: str) -> None:
    print(f"qtbuild: note: {message}", file=sys.stderr)


class Manager:
    """The enclaves of one runtime directory."""

    def __init__(self, runtime: RuntimeDir | None = None, *, notify: Callable[[str], None] = _stderr_note) -> None:
        self.runtime = runtime or RuntimeDir.default()
        self.notify = notify

    # -- start ------------------------------------------------------------------------------

    def start(self, options: RunOptions) -> Started:
        eif = os.path.abspath(options.eif)
        rules.check_resources(options.cpus, options.memory_mib, _file_size(eif), rules.available_cpus())
        if options.cpu_ids is not None:
            rules.check_cpu_ids(options.cpu_ids, os.sched_getaffinity(0))
        rules.check_cid_range(options.cid)
        if options.instance_id is not None or options.cloud not in CLOUDS:
            _check_cloud(options.cloud, options.instance_id)
        pki_dir = self._ensure_pki()
        directory, lock_fd = self._reserve(options, eif, pki_dir)
        try:
            return self._spawn(directory, lock_fd, options.attach_console)
        finally:
            os.close(lock_fd)

    def _ensure_pki(self) -> str:
        state_dir = default_state_dir()
        if not is_initialised(state_dir):
            self._create_pki(state_dir)
        return os.fspath(state_dir)

    def _create_pki(self, state_dir: Path) -> None:
        from qtbuild.runtime.qtsm.pki import LocalPki, PkiError  # x509 & co.: only when creating it, once

        try:
            with self.runtime.locked():
                pki = LocalPki.init(state_dir)
        except PkiError as exc:
            raise EnclaveError(str(exc)) from None
        self.notify(f"created the local attestation PKI in {state_dir}; verifiers pin its root "
                    f"(SHA-256 {pki.root_fingerprint()})")

    def _reserve(self, options: RunOptions, eif: str, pki_dir: str) -> tuple[EnclaveDir, int]:
        """Choose id and CID, create the enclave directory with its Starting record, and hold
        its alive lock (returned fd) — all under the runtime lock."""
        with self.runtime.locked():
            entries = self._entries()
            active = [(d, r) for d, r in entries if r is not None and holds_cid(observed_status(d, r))]
            cid = rules.choose_cid(options.cid, {r.cid: r.enclave_id for _, r in active})
            rules.check_capacity([r.enclave_id for _, r in active], rules.max_enclaves())
            taken = {d.enclave_id for d, _ in entries}
            enclave_id = next(n for n in range(len(taken) + 1) if n not in taken)
            directory = self.runtime.enclave(enclave_id)
            directory.path.mkdir(mode=0o700)
            lock_fd = directory.take_alive_lock()
            token = secrets.token_hex(6)
            write_record(directory, EnclaveRecord(
                enclave_id=enclave_id, cid=cid, cpus=options.cpus, memory_mib=options.memory_mib,
                debug=options.debug or options.attach_console, eif_path=eif, parent_role=options.parent_role,
                instance_id=options.instance_id, no_limits=options.no_limits, cloud=options.cloud,
                name=options.name, cpu_ids=list(options.cpu_ids) if options.cpu_ids is not None else None,
                pki_state_dir=pki_dir,
                leaf_name=f"enclave-{enclave_id}-{token}", sandbox_name=f"enclave-{enclave_id}-{token}"))
        return directory, lock_fd

    def _spawn(self, directory: EnclaveDir, lock_fd: int, attach: bool) -> Started:
        """Start the supervisor and wait for its first word: ready, or why not."""
        status_read, status_write = os.pipe()
        console_read, console_write = os.pipe() if attach else (None, None)
        try:
            process = _start_supervisor(directory, lock_fd, status_write, console_write)
        except BaseException:
            _close(status_read, console_read)
            self._forget(directory)
            raise
        finally:
            _close(status_write, console_write)
        status = os.fdopen(status_read, "rb")
        console = os.fdopen(console_read, "rb", buffering=0) if console_read is not None else None  # attach
        message = _first_message(status, START_TIMEOUT)
        if message is not None and "ready" in message:
            for note in getattr(read_record(directory), "notes", []):
                self.notify(note)
            return Started(message["ready"], console, status, message.get("phases", {}))
        status.close()
        if console is not None:
            console.close()
        error = _start_failure(message, process, directory)
        self._forget(directory)
        raise error

    # -- query ------------------------------------------------------------------------------

    def records(self) -> list[tuple[EnclaveRecord, str]]:
        """Every enclave's record with its observed status, by id."""
        return [(record, observed_status(directory, record)) for directory, record in self._entries()
                if record is not None]

    def record(self, enclave_id: int) -> EnclaveRecord:
        """The record of ``enclave_id`` (unknown → error)."""
        return self._find(enclave_id)[1]

    def query(self, enclave_id: int | None = None) -> list[dict]:
        """Every enclave's public record (or only ``enclave_id``'s; unknown → error)."""
        found = []
        for directory, record in self._entries():
            if record is not None and enclave_id in (None, record.enclave_id):
                found.append(record.public(observed_status(directory, record)))
        if enclave_id is not None and not found:
            raise _unknown(enclave_id)
        return found

    # -- stop -------------------------------------------------------------------------------

    def stop(self, enclave_id: int) -> dict:
        """Stop the enclave (whatever its state) and forget it."""
        directory, record = self._find(enclave_id)
        if directory.is_alive():
            _signal_supervisor(directory, record, signal.SIGTERM)
            if not _wait_dead(directory, STOP_TIMEOUT):
                _signal_supervisor(directory, record, signal.SIGKILL)
                _wait_dead(directory, STOP_TIMEOUT)
        record = read_record(directory) or record
        if observed_status(directory, record) == CRASHED:  # nobody released it: do it here
            resources.kill_sandbox(record)
            resources.release_host_state(directory, record, self.runtime.vsock_root)
        self._forget(directory)
        return {"EnclaveID": enclave_id, "Terminated": True}

    def stop_all(self) -> list[dict]:
        return [self.stop(directory.enclave_id) for directory, record in self._entries() if record is not None]

    # -- console ----------------------------------------------------------------------------

    def console(self, enclave_id: int, output: BinaryIO) -> None:
        """Copy the enclave's console to ``output`` until it stops (debug mode only)."""
        directory, record = self._find(enclave_id)
        rules.check_console(enclave_id, record.debug)
        if observed_status(directory, record) != RUNNING:
            raise EnclaveError(f"enclave {enclave_id} is not running", code=E_NOT_RUNNING)
        try:
            read_console(directory.console_socket, output)
        except ConsoleBusy as exc:
            raise EnclaveError(f"enclave {enclave_id}: {exc}") from None
        except ConnectionError:
            raise EnclaveError(f"enclave {enclave_id} is not running", code=E_NOT_RUNNING) from None

    # -- helpers ----------------------------------------------------------------------------

    def _entries(self) -> list[tuple[EnclaveDir, EnclaveRecord | None]]:
        return [(directory, read_record(directory)) for directory in self.runtime.enclave_dirs()]

    def _find(self, enclave_id: int) -> tuple[EnclaveDir, EnclaveRecord]:
        directory = self.runtime.enclave(enclave_id)
        record = read_record(directory)
        if record is None:
            raise _unknown(enclave_id)
        return directory, record

    def _forget(self, directory: EnclaveDir) -> None:
        with self.runtime.locked():
            shutil.rmtree(directory.path, ignore_errors=True)


def _start_supervisor(directory: EnclaveDir, lock_fd: int, status_fd: int, console_fd: int | None) -> subprocess.Popen:
    """``python -m qtbuild.runtime.enclave.supervisor`` for ``directory``, detached (own session), its
    diagnostics appended to the enclave's log."""
    command = [sys.executable, "-s", "-m", "qtbuild.runtime.enclave.supervisor", "--dir", os.fspath(directory.path),
               "--lock-fd", str(lock_fd), "--status-fd", str(status_fd)]
    passed = [lock_fd, status_fd]
    if console_fd is not None:
        command += ["--console-fd", str(console_fd)]
        passed.append(console_fd)
    with open(directory.log, "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                pass_fds=passed, env=helper_env(), cwd="/", start_new_session=True)


def _check_cloud(cloud: str, instance_id: str | None) -> None:
    """EnclaveError unless ``instance_id`` has ``cloud``'s shape (and ``cloud`` is one)."""
    from qtbuild.runtime.qtsm.clouds import profile as cloud_profile  # x509 & co.: not for a plain `run`

    try:
        cloud_profile(cloud).check_instance_id(instance_id)
    except ValueError as exc:
        raise EnclaveError(f"--instance-id: {exc}", code=E_INVALID_ARGUMENT) from None


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


def _file_size(path: str) -> int:
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise EnclaveError(f"cannot open the image {path}: {exc.strerror}", code=E_FILE) from None
    if not os.path.isfile(path):
        raise EnclaveError(f"{path} is not a file", code=E_FILE)
    return size


def _unknown(enclave_id: int) -> EnclaveError:
    return EnclaveError(f"no enclave with id {enclave_id}", code=E_INVALID_ARGUMENT)


def _first_message(status: BinaryIO, timeout: float) -> dict | None:
    ready, _, _ = select.select([status], [], [], timeout)
    line = status.readline() if ready else b""
    return json.loads(line) if line else None


def _start_failure(message: dict | None, process: subprocess.Popen, directory: EnclaveDir) -> EnclaveError:
    """The error to raise for a start that did not reach "ready" (the supervisor is waited for)."""
    if message is None:
        process.kill()
    process.wait()
    if message is not None and "error" in message:
        return EnclaveError.from_message(message)
    return EnclaveError(f"the enclave supervisor exited without starting the enclave: {_last_log_line(directory)}",
                        check_failed=True)


def _last_log_line(directory: EnclaveDir) -> str:
    try:
        lines = directory.log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def _signal_supervisor(directory: EnclaveDir, record: EnclaveRecord, signum: int) -> None:
    """Signal the supervisor through a pidfd, once its pid is known and while it holds the lock
    (so the pid cannot have been reused)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while not record.process_id and time.monotonic() < deadline:  # it writes its pid first thing
        time.sleep(_POLL)
        record = read_record(directory) or record
    try:
        pidfd = os.pidfd_open(record.process_id)
    except OSError:
        return  # already gone
    try:
        if directory.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signum)
    finally:
        os.close(pidfd)


def _wait_dead(directory: EnclaveDir, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while directory.is_alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True

