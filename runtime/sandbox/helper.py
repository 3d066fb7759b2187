"""The sandbox helper: ``python -m qtbuild.runtime.sandbox.helper --plan-fd N --status-fd M``.

Started fresh (hence single-threaded) by :func:`qtbuild.runtime.sandbox.start_sandbox`, it reads the
plan (JSON, :meth:`SandboxSpec.to_plan` plus ``cgroup_procs``) from fd N until EOF and
reports on fd M, one JSON object per line: ``{"pid": P}`` (host pid of the sandbox's PID 1),
then ``{"started": true}`` once the application is exec'd or ``{"error": "..."}`` naming the
step that failed, and finally ``{"exit": {"code": C, "signal": S}}`` when the application ends.

Three processes, one straight line (step numbers as in docs/sandbox.md):

* helper (outside)  1 join the cgroup · 2 unshare namespaces with a user namespace: rootless,
  the caller's uid/gid mapped to the application's; as root, the subordinate range of the
  plan's ``ids`` (root inside is an unprivileged host uid) · 3 fork PID 1, report its pid,
  wait for it and exit as it did.
* init (PID 1)      4 private mounts, root bound onto itself, sources opened (then, as root,
  become the namespace's root), /proc, /dev, /tmp, binds ·
  5 pivot_root · 6 hostname, ``lo`` up · fork the application, then reap every process until
  the application exits, kill the rest of the namespace and report the application's status.
* application       7 close inherited fds, rlimits · 8 bounding set, ids, capabilities,
  no_new_privs, cwd · 9 seccomp · 10 execve with a PATH search in the spec's environment.

Every module used after ``pivot_root`` is imported here, before it: the host filesystem is
gone by then.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import sys

from . import caps, mounts, namespaces, proctitle, seccomp
from .spec import SandboxError, step
from .syscalls import close_range, prctl, unshare

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOFILE = (1024, 65536)  # soft, hard (capped by the current hard limit)
_MAX_MESSAGE = 3500     # keeps every status line under PIPE_BUF, so writes are atomic


class Channel:
    """The status pipe back to the host: one JSON object per line."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **message) -> None:
        os.write(self.fd, (json.dumps(message) + "\n").encode())

    def error(self, exc: BaseException) -> None:
        self.send(error=describe(exc))

    def close(self) -> None:
        os.close(self.fd)


def describe(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, SandboxError) else f"{type(exc).__name__}: {exc}"
    return text[:_MAX_MESSAGE]


# -- helper (outside the sandbox) ---------------------------------------------------------------

def helper(plan: dict, status: Channel) -> None:
    """Steps 1-3; exits the way PID 1 exits."""
    for procs in plan["cgroup_procs"]:                                       # 1
        with step(f"joining cgroup {os.path.dirname(procs)}"), open(procs, "w") as handle:
            handle.write(str(os.getpid()))
    rootless = os.geteuid() != 0
    host_uid, host_gid = os.geteuid(), os.getegid()
    if rootless:                                                             # 2
        with step("creating namespaces (user, mount, pid, net, ipc, uts, cgroup)"):
            namespaces.enter(with_user=True)
        with step("writing the user namespace's uid/gid maps"):
            namespaces.map_ids(plan["uid"], host_uid, plan["gid"], host_gid)
    else:
        ids = plan["ids"]
        with step(f"creating namespaces (user mapped to host ids {ids['uid']}+{ids['count']}, mount, pid, net, "
                  "ipc, uts, cgroup)"):
            namespaces.enter_mapped(ids["uid"], ids["gid"], ids["count"])
    pid = os.fork()                                                          # 3
    if pid == 0:
        try:
            code = init(plan, status, rootless)
        except BaseException as exc:
            status.error(exc)
            code = 1
        os._exit(code)
    status.send(pid=pid)
    status.close()
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):  # die the same way (SIGKILL and SIGSTOP cannot be caught anyway)
        if os.WTERMSIG(wait_status) not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(os.WTERMSIG(wait_status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(wait_status))
    os._exit(os.waitstatus_to_exitcode(wait_status))


# -- init (PID 1 inside) ------------------------------------------------------------------------

def init(plan: dict, status: Channel, rootless: bool) -> int:
    """Steps 4-6, then start the application and reap; returns PID 1's exit code."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the helper dying takes the whole namespace down
    proctitle.set_title("init")  # /proc/1/cmdline is readable inside: no host paths in it
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # PID 1 ignores signals it has no handler for
    sources = mounts.open_sources(plan["root"], plan["binds"])               # 4
    if not rootless:  # from now on files are created as the range's first id, not as an unmapped host root
        with step("switching to root of the user namespace"):
            namespaces.become_root()
    root_fd = mounts.build_root(sources)
    mounts.enter_root(root_fd)                                               # 5
    with step("setting the hostname"):                                       # 6
        namespaces.set_hostname(plan["hostname"])
    with step("bringing up the loopback interface"):
        namespaces.loopback_up()
    app_pid, failure = _spawn_application(plan, rootless)
    status.send(**({"error": failure} if failure else {"started": True}))
    _protect_init()
    app_status = reap(app_pid)
    if failure:
        return 127
    code = os.WEXITSTATUS(app_status) if os.WIFEXITED(app_status) else None
    sig = os.WTERMSIG(app_status) if os.WIFSIGNALED(app_status) else None
    status.send(exit={"code": code, "signal": sig})
    if code is not None:
        return code
    assert sig is not None  # waitpid without WUNTRACED: the application exited or was killed
    return 128 + sig


def _spawn_application(plan: dict, rootless: bool) -> tuple[int, str | None]:
    """Fork the application; returns its pid and, if it failed before execve, why."""
    read_end, write_end = os.pipe()  # close-on-exec: EOF with no data means execve succeeded
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            application(plan, rootless, write_end)
        except BaseException as exc:
            os.write(write_end, describe(exc).encode())
        os._exit(127)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 4096):
        chunks.append(chunk)
    os.close(read_end)
    return pid, b"".join(chunks).decode(errors="replace") or None


def _protect_init() -> None:
    """Best effort: keep the OOM killer on the application rather than PID 1 (needs
    CAP_SYS_RESOURCE on the host, so only as root) and make PID 1 non-dumpable."""
    prctl(PR_SET_DUMPABLE, 0)
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("-1000")
    except OSError:
        pass


def reap(app_pid: int) -> int:
    """Reap every child until none is left; when the application exits, SIGKILL the rest of
    the namespace.  Returns the application's wait status."""
    app_status = 0
    while True:
        try:
            pid, wait_status = os.waitpid(-1, 0)
        except ChildProcessError:
            return app_status
        if pid == app_pid:
            app_status = wait_status
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)  # from PID 1: every other process in the namespace


# -- the application ----------------------------------------------------------------------------

def application(plan: dict, rootless: bool, error_fd: int) -> None:
    """Steps 7-10; returns only by raising (execve replaced the process otherwise)."""
    with step("closing inherited file descriptors"):                          # 7
        close_all_fds(keep=error_fd)
    with step("setting rlimits"):
        _set_rlimits()
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python, and SIG_IGN survives execve
        signal.signal(sig, signal.SIG_DFL)
    if rootless and plan["groups"]:
        raise SandboxError("supplementary groups need root: an unprivileged user namespace denies setgroups")
    with step("dropping the capability bounding set"):                        # 8
        caps.drop_bounding_set()
    with step(f"switching to uid {plan['uid']} gid {plan['gid']} groups {plan['groups']}"):
        caps.set_ids(plan["uid"], plan["gid"], plan["groups"], set_groups=not rootless)
    with step("clearing capabilities"):
        caps.clear_capabilities()
    with step("setting no_new_privs"):
        caps.set_no_new_privs()
    with step(f"changing to the working directory {plan['cwd']}"):
        os.chdir(plan["cwd"])
    with step("installing the seccomp filter"):                               # 9
        seccomp.install()
    execute(plan["argv"], plan["env"])                                       # 10


def close_all_fds(keep: int) -> None:
    """Close every fd but 0, 1, 2 and ``keep`` (runc CVE-2024-21626: no host fd may reach the
    application); falls back to listing /proc/self/fd on kernels without close_range."""
    try:
        if keep > 3:
            close_range(3, keep - 1)
        close_range(keep + 1)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        for fd in [int(name) for name in os.listdir("/proc/self/fd")]:
            if fd > 2 and fd != keep:
                with contextlib.suppress(OSError):  # the directory listing's own fd
                    os.close(fd)


def _set_rlimits() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_hard = NOFILE[1] if hard == resource.RLIM_INFINITY else min(hard, NOFILE[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(NOFILE[0], new_hard), new_hard))


def execute(argv: list[str], env: list[str]) -> None:
    """execve ``argv`` with ``env``, searching the environment's PATH when ``argv[0]`` has no
    slash (like execvpe).  Raises SandboxError when nothing could be executed."""
    environment = dict(entry.partition("=")[::2] for entry in env)
    program = argv[0]
    candidates = [program]
    search_path = environment.get("PATH", DEFAULT_PATH)
    if "/" not in program:
        candidates = [os.path.join(directory or ".", program) for directory in search_path.split(":")]
    denied: OSError | None = None
    for candidate in candidates:
        try:
            os.execve(candidate, argv, environment)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:
            denied = exc
        except OSError as exc:
            raise SandboxError(f"cannot execute {candidate!r}: {exc.strerror}") from exc
    if denied is not None:
        raise SandboxError(f"cannot execute {program!r}: {denied.strerror}")
    where = f" in PATH={search_path}" if "/" not in program else ""
    raise SandboxError(f"cannot execute {program!r}: not found{where}")


# -- probe --------------------------------------------------------------------------------------

def probe_namespaces(ids: list[int] | None = None) -> dict:
    """Try, in this throwaway process, what :func:`helper` needs: a user namespace (in a child)
    and the sandbox's namespaces — as root with ``ids`` (uid, gid, count) mapped as
    :func:`helper` maps them."""
    result: dict = {}
    pid = os.fork()
    if pid == 0:
        try:
            unshare(namespaces.CLONE_NEWUSER)
            os._exit(0)
        except OSError as exc:
            os._exit(exc.errno or 1)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    result["userns"] = None if code == 0 else os.strerror(code)
    try:
        if ids is not None:
            namespaces.enter_mapped(*ids)
        else:
            namespaces.enter(with_user=os.geteuid() != 0)
        result["namespaces"] = None
    except OSError as exc:
        result["namespaces"] = exc.strerror or str(exc)
    return result


def main(argv: list[str]) -> None:
    if argv[:1] == ["--probe"] and len(argv) in (1, 4):
        print(json.dumps(probe_namespaces([int(value) for value in argv[1:]] or None)))
        return
    if len(argv) != 4 or argv[0] != "--plan-fd" or argv[2] != "--status-fd":
        raise SystemExit("usage: python -m qtbuild.runtime.sandbox.helper --plan-fd N --status-fd M "
                         "| --probe [UID GID COUNT]")
    plan_fd, status = int(argv[1]), Channel(int(argv[3]))
    try:
        with os.fdopen(plan_fd, "rb") as handle:
            plan = json.loads(handle.read())
        helper(plan, status)
    except BaseException as exc:
        status.error(exc)
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
