"""The host side: :func:`start_sandbox` and the :class:`Sandbox` handle it returns.

Contract of :func:`start_sandbox`: it returns only once the application has been exec'd inside
the fully set-up sandbox; any step that fails (including a missing cgroup controller when
``no_limits`` is false, or an unknown command) raises :class:`SandboxError` naming the step,
after undoing everything.  It is safe to call from a multithreaded process: the sandbox is
built by a freshly exec'd helper (:mod:`qtbuild.runtime.sandbox.helper`), never by a forked copy of
the caller.

Contract of :func:`spawn_helper`: it starts that helper ahead of time (the interpreter's start
and imports are most of a sandbox's start-up), for the caller to do other work meanwhile; the
helper waits for its plan, so nothing is set up until :func:`start_sandbox` gets it with the
same stdio, and :meth:`Helper.discard` ends an unused one.

Contract of :class:`Sandbox`: ``wait()`` returns the application's :class:`SandboxExit` (or
``None`` on timeout) and then cleans up; ``kill()`` SIGKILLs the sandbox's PID 1 — the kernel
then kills every process in its PID namespace — and cleans up; ``cleanup()`` kills if still
running, removes the cgroup and closes the status pipe, and is idempotent.  The sandbox's
mounts live only in its own mount namespace and vanish with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading

import qtbuild

from .cgroups import Cgroup, Limits, create
from .spec import SandboxError, SandboxExit, SandboxSpec
from .subids import enclave_ids

__all__ = ["Helper", "Sandbox", "spawn_helper", "start_sandbox"]

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(qtbuild.__file__)))


def start_sandbox(spec: SandboxSpec, cgroup: Cgroup | None = None, helper: Helper | None = None) -> Sandbox:
    """Build the sandbox described by ``spec`` and start its application in it.

    ``cgroup``: an existing cgroup to run in, its limits already applied (e.g. one the caller
    has charged the sandbox's root filesystem to); the spec's limits are then not applied
    again, and the cgroup belongs to the sandbox from here on (removed by its cleanup, also
    when starting fails).  ``helper``: one :func:`spawn_helper` started with the spec's stdio
    (it belongs to the sandbox from here on; a new one is started otherwise)."""
    try:
        if helper is not None and helper.stdio != (spec.stdin, spec.stdout, spec.stderr):
            raise ValueError("the helper was spawned with other stdio than the spec's")
        if os.geteuid() == 0 and spec.ids is None:
            spec = dataclasses.replace(spec, ids=enclave_ids())
        spec.validate()
        if os.geteuid() != 0 and spec.groups:
            raise SandboxError("groups: supplementary groups need root (an unprivileged user namespace maps one "
                               "uid and one gid and denies setgroups)")
        if cgroup is None and not spec.no_limits:
            limits = Limits(spec.memory_bytes, spec.cpus, spec.pids_max, spec.cpu_ids)
            cgroup = create(spec.name, limits, spec.cgroup_root)
        if helper is None:
            helper = spawn_helper(spec.stdin, spec.stdout, spec.stderr)
        helper.send_plan(spec, cgroup)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        if helper is not None:
            helper.discard()
        raise
    sandbox = Sandbox(helper.process, helper.status, cgroup)
    try:
        sandbox._await_start()
    except BaseException:
        sandbox.cleanup()
        raise
    return sandbox


def command(*args: str) -> list[str]:
    """The helper's command line (the current interpreter running :mod:`qtbuild.runtime.sandbox.helper`)."""
    return [sys.executable, "-s", "-m", "qtbuild.runtime.sandbox.helper", *args]


def helper_env() -> dict[str, str]:
    """The helper's environment: only what it needs to import this package (the application's
    environment comes from the spec, never from here)."""
    return {"PYTHONPATH": _PACKAGE_PARENT, "PYTHONDONTWRITEBYTECODE": "1"}


class Helper:
    """A started sandbox helper waiting for its plan (see :func:`spawn_helper`)."""

    def __init__(self, process: subprocess.Popen, plan_fd: int, status, stdio: tuple[int | None, ...]) -> None:
        self.process, self.status, self.stdio = process, status, stdio
        self._plan_fd: int | None = plan_fd

    def send_plan(self, spec: SandboxSpec, cgroup: Cgroup | None) -> None:
        """Hand the helper its plan (it then builds the sandbox); once only."""
        assert self._plan_fd is not None, "the plan was sent already"
        plan = spec.to_plan()
        plan["cgroup_procs"] = cgroup.procs_files() if cgroup else []
        fd, self._plan_fd = self._plan_fd, None
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(plan).encode())

    def discard(self) -> None:
        """End a helper that will build no sandbox (idempotent)."""
        if self._plan_fd is not None:
            os.close(self._plan_fd)
            self._plan_fd = None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.status.close()


def spawn_helper(stdin: int | None, stdout: int | None, stderr: int | None) -> Helper:
    """Start a helper that will give the application these fds as 0/1/2 (None: /dev/null)."""
    plan_read, plan_write = os.pipe()
    status_read, status_write = os.pipe()
    try:
        process = subprocess.Popen(
            command("--plan-fd", str(plan_read), "--status-fd", str(status_write)),
            stdin=_stdio(stdin), stdout=_stdio(stdout), stderr=_stdio(stderr),
            pass_fds=(plan_read, status_write), env=helper_env(), cwd="/", start_new_session=True, close_fds=True)
    except BaseException:
        for fd in (plan_read, plan_write, status_read, status_write):
            os.close(fd)
        raise
    os.close(plan_read)
    os.close(status_write)
    return Helper(process, plan_write, os.fdopen(status_read, "rb"), (stdin, stdout, stderr))


def _stdio(fd: int | None) -> int:
    return subprocess.DEVNULL if fd is None else fd


class Sandbox:
    """A running sandbox.  ``pid`` is the host pid of its PID 1; ``cgroup`` its cgroup (None
    with ``no_limits``)."""

    def __init__(self, helper: subprocess.Popen, status, cgroup: Cgroup | None):
        self.pid = 0
        self.cgroup = cgroup
        self._helper = helper
        self._status = status
        self._pidfd: int | None = None
        self._exit: SandboxExit | None = None
        self._lock = threading.RLock()
        self._cleaned = False

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    # -- lifecycle ---------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> SandboxExit | None:
        """The application's exit status, once the sandbox has ended (then cleans up);
        ``None`` if it is still running after ``timeout`` seconds."""
        try:
            self._helper.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with self._lock:
            if self._exit is None:
                self._exit = self._collect_exit()
            self.cleanup()
            return self._exit

    def kill(self) -> None:
        """SIGKILL the whole sandbox, wait for it to end, and clean up."""
        with self._lock:
            self._signal_init()
        self.wait()

    def cleanup(self) -> None:
        """Kill the sandbox if it still runs, remove its cgroup, close the pipes.  Idempotent."""
        with self._lock:
            if self._cleaned:
                return
            if self._helper.poll() is None:
                self._signal_init()
                self._helper.wait()
            if self._exit is None:
                self._exit = self._collect_exit()
            self._cleaned = True
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
            self._status.close()
            if self.cgroup is not None:
                self.cgroup.remove()

    # -- internals ---------------------------------------------------------------------------

    def _await_start(self) -> None:
        """Read the helper's start-up messages: the pid of PID 1, then started or an error."""
        while True:
            message = self._read_message()
            if message is None:
                self._helper.wait()
                raise SandboxError(f"the sandbox helper exited ({self._helper.returncode}) before "
                                   "starting the application")
            if "pid" in message:
                self._adopt_init(message["pid"])
            elif "error" in message:
                raise SandboxError(message["error"])
            elif message.get("started"):
                return

    def _adopt_init(self, pid: int) -> None:
        """Record PID 1's host pid, holding a pidfd so a later kill cannot hit a reused pid."""
        self.pid = pid
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone (and reaped)
        if _parent_of(pid) == self._helper.pid:
            self._pidfd = pidfd
        else:
            os.close(pidfd)

    def _signal_init(self) -> None:
        """SIGKILL PID 1 (the kernel then kills its whole PID namespace) and, belt and braces,
        everything in the cgroup."""
        if self.cgroup is not None:
            self.cgroup.kill()
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        elif self._helper.poll() is None:
            self._helper.kill()  # PID 1 is not known yet: its parent death signal takes it down

    def _collect_exit(self) -> SandboxExit:
        """Build the exit status from PID 1's report, or from how the helper ended."""
        code: int | None = None
        sig: int | None = None
        reported = False
        while (message := self._read_message()) is not None:
            if "exit" in message:
                code, sig, reported = message["exit"]["code"], message["exit"]["signal"], True
        if not reported:
            returncode = self._helper.returncode
            code, sig = (None, -returncode) if returncode < 0 else (returncode, None)
        oom = self.cgroup.oom_kills() > 0 if self.cgroup is not None else False
        return SandboxExit(code=code, signal=sig, oom_killed=oom)

    def _read_message(self) -> dict | None:
        line = self._status.readline() if not self._status.closed else b""
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            return {"error": f"garbled message from the sandbox helper: {line[:200]!r}"}


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
