"""One enclave's supervisor: ``python -m qtbuild.runtime.enclave.supervisor --dir D --lock-fd L
--status-fd S [--console-fd C]``.

Started detached (its own session, so it outlives the CLI and ignores the terminal's Ctrl-C)
by :mod:`qtbuild.runtime.enclave.manager`, which has written the enclave's record (status Starting) in
``D`` and passes the ``alive.lock`` it holds (fd L): whoever holds that lock *is* the enclave,
and the kernel releases it when the supervisor dies, however it dies.

The supervisor plays the hypervisor and the enclave's init:

1. as root, mount the enclave's vsock directory (a small tmpfs, :mod:`.resources`) on the host,
   then enter a private mount namespace (the enclave memory then vanishes with it); create the
   enclave's cgroup;
2. load the image (:mod:`qtbuild.runtime.enclave.loader`: checks, PCRs, unpack into memory) from
   inside that cgroup (:mod:`.charged`), files owned by the enclave's subordinate ids; meanwhile,
   on the other CPU, import the security module's stack and load the local PKI (none of it
   depends on the image: this module imports only what steps 1-2 need, for a short start);
3. serve the security module on ``D/qtsm.sock`` (the cloud profile's boot PCRs from the image,
   ``--parent-role``, ``--instance-id``; zeros in debug mode; its chain of the local PKI) and, in
   debug mode, the
   console (:mod:`qtbuild.runtime.enclave.console`) on ``D/console.sock``;
4. start the application in its sandbox (:mod:`qtbuild.runtime.enclave.plan`); ``start_sandbox``
   returns once the application has been exec'd in its namespaces: that is "Running";
5. boot heartbeat: if a parent listener is bound on CID 3 port 9000 (e.g. a tool waiting with
   :func:`qtbuild.runtime.sdk.vsock.heartbeat_listen`), send it ``0xB7`` from the enclave's CID, as Nitro's
   init does; without a listener nothing is sent (the status pipe already told the CLI);
6. register the enclave's CID with its network namespace (vsock peer identity; skipped when
   the application has already ended), record Running, report ``{"ready": summary}`` on fd S;
7. wait for the application; then release everything (:mod:`qtbuild.runtime.enclave.resources`),
   record Stopped (or OOM) with the exit status, report ``{"exit": {...}}`` on fd S if the CLI
   still listens, and exit.

A failure before step 6 is reported as ``{"error", "code", "check_failed"}`` on fd S after
undoing what was done.  SIGTERM, SIGINT and SIGHUP stop the enclave (the application is
killed); the final record is still written.  With ``--console-fd`` (``--attach-console``),
the application's output, from its first byte, is also copied to fd C until it ends.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qtbuild.formats.measure import Measurements
from qtbuild.runtime.sandbox import Sandbox, SandboxError, SandboxExit, cgroups, start_sandbox
from qtbuild.runtime.sandbox.cgroups import Cgroup
from qtbuild.runtime.sandbox.host import Helper, spawn_helper
from qtbuild.runtime.sandbox.spec import DEFAULT_CGROUP_ROOT
from qtbuild.runtime.sandbox.subids import IdRange, enclave_ids
from qtbuild.runtime.sandbox.syscalls import mount, unshare
from qtbuild.runtime.sdk import vsock

from . import resources
from .charged import load_charged
from .console import ConsoleServer, RingBuffer, pump
from .errors import EnclaveError
from .loader import HARDWARE_BOOT, HARDWARE_NOTE, LoadedImage, load_image
from .plan import cgroup_limits, sandbox_spec
from .state import (
    OOM,
    RUNNING,
    STOPPED,
    EnclaveDir,
    EnclaveRecord,
    read_record,
    write_record,
)

if TYPE_CHECKING:
    from qtbuild.runtime.qtsm.device import SecurityModule
    from qtbuild.runtime.qtsm.server import Server

#: When this module's imports were done (CLOCK_MONOTONIC is system-wide: the CLI compares it with
#: its own clock to tell the supervisor's start-up from the phases below).
_IMPORTED = time.monotonic()

log = logging.getLogger("qtbuild.enclave")

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
HEARTBEAT_TIMEOUT = 1.0
DRAIN_TIMEOUT = 10.0


class StatusPipe:
    """The one-way channel to the CLI that started us; silent once the CLI is gone."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, **message) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (json.dumps(message) + "\n").encode())
        except OSError:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Supervisor:
    """The enclave described by ``directory``'s record (see the module docstring)."""

    def __init__(self, directory: EnclaveDir, record: EnclaveRecord, console_fd: int | None) -> None:
        self.directory, self.record, self.console_fd = directory, record, console_fd
        self.vsock_root = directory.runtime.vsock_root
        self.as_root = os.geteuid() == 0
        self.stop_requested = threading.Event()
        self.sandbox: Sandbox | None = None
        self.helper: Helper | None = None
        #: the console pipe (debug mode): the application's stdout/stderr, and the end the pump reads
        self.output_fd: int | None = None
        self.console_read: int | None = None
        self.cgroup: Cgroup | None = None
        self.ids: IdRange | None = None
        self.host_namespace: int | None = None
        self.vsock_dir = self.vsock_root / str(record.cid)
        self.qtsm: Server | None = None
        #: the security module, but for the image's PCRs (:meth:`_prepare_security_module`)
        self.make_device: Callable[[Measurements], SecurityModule] | None = None
        self.console: ConsoleServer | None = None
        #: time.monotonic() at the end of each start phase, reported with "ready" (benchmarks/run_start.py)
        self.phases: dict[str, float] = {"supervisor_imports": _IMPORTED}
        self.threads: list[threading.Thread] = []

    # -- start ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Steps 1-6; raises EnclaveError (after :meth:`release`) on failure."""
        try:
            if self.as_root:
                self.ids = _enclave_ids()
                self.host_namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
                self.vsock_dir = resources.prepare_vsock(self.vsock_root, self.record.cid)  # on the host
                _private_mount_namespace()
            else:
                self.vsock_dir = resources.prepare_vsock(self.vsock_root, self.record.cid)
            self._create_cgroup()
            self.output_fd = self._console_pipe() if self.record.debug else None
            self.helper = spawn_helper(None, self.output_fd, self.output_fd)  # its start overlaps the load
            self.phases["host_setup"] = time.monotonic()
            image = self._load()
            self.phases["verify_unpack"] = time.monotonic()
            self._serve_security_module(image)
            if self.record.debug:
                self._open_console()
            self.phases["security_module"] = time.monotonic()
            self._start_sandbox(image)
            self.phases["sandbox_exec"] = time.monotonic()
            self._record_sandbox()
            self._heartbeat()
            self._register()
        except BaseException:
            self.release()
            raise
        self.record.status = RUNNING
        write_record(self.directory, self.record)

    def _create_cgroup(self) -> None:
        """The enclave's cgroup, before anything is charged to it (recorded for ``stop``)."""
        record = self.record
        if record.no_limits:
            return
        try:
            self.cgroup = cgroups.create(record.sandbox_name, cgroup_limits(record), DEFAULT_CGROUP_ROOT)
        except SandboxError as exc:
            reason = str(exc).replace("no_limits=True", "--no-limits")
            raise EnclaveError(f"the enclave's sandbox could not start: {reason}", check_failed=True) from None
        record.cgroup = {"version": self.cgroup.version, "paths": self.cgroup.paths}
        write_record(self.directory, record)

    def _load(self) -> LoadedImage:
        """Load the image from inside the enclave's cgroup (:mod:`.charged`), then hand the
        vsock directory to the application's user."""
        record = self.record
        image = load_charged(self.cgroup, functools.partial(
            load_image, record.eif_path, self.directory.root, memory_bytes=record.memory_mib << 20,
            use_tmpfs=self.as_root, preserve_owner=self.as_root, ids=self.ids),
            meanwhile=self._prepare_security_module)
        record.measurements = image.measurements.nitro()["Measurements"]
        if image.boot == HARDWARE_BOOT:
            record.notes.append(HARDWARE_NOTE)
        write_record(self.directory, record)
        resources.hand_over_vsock(self.vsock_dir, *self._host_ids(image.launch.uid, image.launch.gid))
        return image

    def _host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        """The host's view of the application's ``uid``/``gid`` (shifted into the range as root)."""
        if self.ids is None:
            return uid, gid
        return self.ids.host_uid(uid), self.ids.host_gid(gid)

    def _prepare_security_module(self) -> None:
        """Everything of the security module that does not depend on the image — its imports
        (x509, COSE, CBOR: the bulk of a supervisor's imports) and the local PKI — done while
        the loader child unpacks (:func:`.charged.load_charged`'s ``meanwhile``)."""
        from qtbuild.runtime.qtsm.clouds import machine_seed
        from qtbuild.runtime.qtsm.clouds import profile as cloud_profile
        from qtbuild.runtime.qtsm.device import SecurityModule
        from qtbuild.runtime.qtsm.pki import LocalPki

        record = self.record
        pki = LocalPki.load(record.pki_state_dir)
        cloud = cloud_profile(record.cloud)
        parent_id = cloud.parent_id(record.instance_id, machine_seed())
        signer = pki.signer(record.leaf_name, cloud.name)
        module_id = cloud.module_id(record.leaf_name, parent_id)

        def make_device(measurements: Measurements) -> SecurityModule:
            pcrs = cloud.boot_pcrs(measurements, parent_id=parent_id, parent_role=record.parent_role)
            return SecurityModule(pcrs, debug=record.debug, signer=signer, module_id=module_id, profile=cloud)

        self.make_device = make_device

    def _serve_security_module(self, image: LoadedImage) -> None:
        from qtbuild.runtime.qtsm.server import serve_device

        assert self.make_device is not None, "prepared while the image loaded"
        self.qtsm = serve_device(self.make_device(image.measurements), self.directory.qtsm_socket)
        if self.as_root:  # the application's user must be able to connect (the path is ours alone)
            os.chown(self.directory.qtsm_socket, *self._host_ids(image.launch.uid, image.launch.gid))

    def _console_pipe(self) -> int:
        """The pipe the application's output goes to; returns its write end (the read end is
        :meth:`_open_console`'s, once the image is loaded: no thread may run before that fork)."""
        self.console_read, write_end = os.pipe2(os.O_CLOEXEC)
        return write_end

    def _open_console(self) -> None:
        """Ring buffer, its socket server and (attach mode) the copy to the CLI, fed from
        :meth:`_console_pipe`."""
        ring = RingBuffer()
        read_end, self.console_read = self.console_read, None
        assert read_end is not None, "the console pipe is made first"
        self._thread(pump, read_end, ring)
        self.console = ConsoleServer(ring, self.directory.console_socket)
        if self.console_fd is not None:
            self._thread(_copy_to_fd, ring, self.console_fd)
            self.console_fd = None

    def _start_sandbox(self, image: LoadedImage) -> None:
        output_fd = self.output_fd
        try:
            if self.stop_requested.is_set():
                raise EnclaveError("stopped while starting")
            spec = sandbox_spec(self.record, image, self.directory, self.vsock_root, output_fd=output_fd)
            spec.ids = self.ids
            cgroup, self.cgroup = self.cgroup, None  # the sandbox owns it from here on
            helper, self.helper = self.helper, None  # and the helper
            self.sandbox = start_sandbox(spec, cgroup, helper)
        except SandboxError as exc:
            reason = str(exc).replace("no_limits=True", "--no-limits")
            raise EnclaveError(f"the enclave's sandbox could not start: {reason}", check_failed=True) from None
        finally:
            self._close_output()  # the sandbox holds its own copy: EOF comes when it ends
        if self.stop_requested.is_set():
            self._kill_async()

    def _heartbeat(self) -> None:
        config = self._vsock_config(self.record.cid)
        if not os.path.exists(vsock.socket_path(config.emulated_root, vsock.PARENT_CID, vsock.HEARTBEAT_PORT)):
            return
        try:
            vsock.send_heartbeat(timeout=HEARTBEAT_TIMEOUT, config=config)
        except OSError as exc:
            log.warning("boot heartbeat to CID 3 port %d not acknowledged: %s", vsock.HEARTBEAT_PORT, exc)

    def _register(self) -> None:
        """Tie the enclave's CID to its network namespace (vsock peer identity)."""
        try:
            vsock.register_enclave(self.record.cid, self._started().pid, config=self._vsock_config(vsock.PARENT_CID))
        except ProcessLookupError:
            log.info("the application ended before its vsock identity was registered")

    def _record_sandbox(self) -> None:
        """What ``stop`` needs to kill the sandbox should this supervisor die."""
        record, sandbox = self.record, self._started()
        record.sandbox_pid = sandbox.pid
        record.sandbox_start = resources.process_start_time(sandbox.pid) or 0
        write_record(self.directory, record)

    # -- run and stop -----------------------------------------------------------------------

    def wait(self) -> SandboxExit:
        """Step 7's wait: the application's exit (or its kill, on a stop request)."""
        result = self._started().wait()
        assert result is not None  # without a timeout, wait returns once the sandbox has ended
        return result

    def request_stop(self, *_signal_args) -> None:
        """Signal handler: stop the enclave (now if it runs, before it starts otherwise)."""
        self.stop_requested.set()
        if self.sandbox is not None:
            self._kill_async()

    def _kill_async(self) -> None:
        threading.Thread(target=self._started().kill, daemon=True).start()

    def _started(self) -> Sandbox:
        """The sandbox; only steps after :meth:`_start_sandbox` succeeded ask for it."""
        assert self.sandbox is not None, "the sandbox has not started"
        return self.sandbox

    def release(self) -> None:
        """Release everything this supervisor holds (idempotent)."""
        if self.helper is not None:  # spawned, but no sandbox took it
            self.helper.discard()
            self.helper = None
        self._close_output()
        if self.console_read is not None:
            os.close(self.console_read)
            self.console_read = None
        if self.sandbox is not None:
            self.sandbox.cleanup()
        if self.cgroup is not None:  # created, but no sandbox took it
            self.cgroup.remove()
            self.cgroup = None
        for thread in self.threads:  # output pump, then the copy to an attached CLI
            thread.join(DRAIN_TIMEOUT)
        for server in (self.console, self.qtsm):
            if server is not None:
                server.close()
        self.console = self.qtsm = None
        if self.console_fd is not None:
            os.close(self.console_fd)
            self.console_fd = None
        resources.release_host_state(self.directory, self.record, self.vsock_root, self.host_namespace)

    def finish(self, result: SandboxExit) -> dict:
        """Record how the enclave ended; returns the exit report."""
        record = self.record
        record.exit_signal = result.signal
        record.exit_code = result.code if result.signal is None else 128 + result.signal
        killed = result.signal == signal.SIGKILL
        record.status = OOM if result.oom_killed and killed else STOPPED
        write_record(self.directory, record)
        return {"status": record.status, "code": record.exit_code, "signal": record.exit_signal}

    # -- helpers ----------------------------------------------------------------------------

    def _close_output(self) -> None:
        if self.output_fd is not None:
            os.close(self.output_fd)
            self.output_fd = None

    def _vsock_config(self, cid: int) -> vsock.VsockConfig:
        return vsock.VsockConfig(vsock.EMULATED, cid, os.fspath(self.vsock_root))

    def _thread(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)


def _private_mount_namespace() -> None:
    """A mount namespace of our own, private, so the tmpfs never appears on (or propagates to)
    the host and goes away with this process and its sandbox.  Must run before any thread."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def _enclave_ids() -> IdRange:
    try:
        return enclave_ids()
    except SandboxError as exc:
        raise EnclaveError(f"the enclave's user namespace: {exc}", check_failed=True) from None
def _copy_to_fd(ring: RingBuffer, fd: int) -> None:
    """Attach mode: the whole output to ``fd`` (the CLI's pipe) until the end or the CLI leaves."""
    try:
        for data in ring.follow(0):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except OSError:
        pass  # the CLI went away (EPIPE): the enclave runs on
    finally:
        os.close(fd)


def run(directory: EnclaveDir, status: StatusPipe, console_fd: int | None) -> int:
    """Steps 1-7 for the enclave in ``directory``; returns the process exit code."""
    record = read_record(directory)
    if record is None:
        status.send(error=f"no enclave record in {directory.path} (removed while starting?)", check_failed=True)
        return 1
    record.process_id = os.getpid()
    write_record(directory, record)
    supervisor = Supervisor(directory, record, console_fd)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, supervisor.request_stop)
    try:
        supervisor.boot()
    except EnclaveError as exc:
        status.send(**exc.to_message())
        return 1
    except Exception as exc:
        log.exception("start failed")
        status.send(error=f"the enclave could not start: {type(exc).__name__}: {exc}", check_failed=True)
        return 1
    supervisor.phases["ready"] = time.monotonic()
    status.send(ready=record.summary(), phases=supervisor.phases)
    result = supervisor.wait()
    supervisor.release()
    status.send(exit=supervisor.finish(result))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtbuild.runtime.enclave.supervisor")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--console-fd", type=int)
    args = parser.parse_args(argv)
    for fd in (args.lock_fd, args.status_fd, args.console_fd):
        if fd is not None:
            os.set_inheritable(fd, False)  # never passed on (the lock is held until we exit)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    status = StatusPipe(args.status_fd)
    try:
        return run(EnclaveDir(Path(args.dir)), status, args.console_fd)
    finally:
        status.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
