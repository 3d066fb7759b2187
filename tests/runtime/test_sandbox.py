"""Tests for qtbuild.runtime.sandbox: real sandboxes (as root), asserted from inside and from the host."""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qtbuild.runtime.sandbox import (
    Bind,
    SandboxError,
    SandboxSpec,
    probe,
    seccomp,
    start_sandbox,
)
from qtbuild.runtime.sandbox.host import helper_env, spawn_helper
from qtbuild.runtime.sandbox.subids import enclave_ids

from helpers.sandbox_helpers import (
    build_busybox_root,
    build_tool,
    install_file,
    run_in_sandbox,
    shift_owners,
)

# Run as root; the rootless variant is run from them as 'nobody'.
pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="Linux sandboxes only"), pytest.mark.root]

_names = itertools.count()
MiB = 1 << 20


@pytest.fixture(scope="session")
def tool(tmp_path_factory) -> Path:
    return build_tool(tmp_path_factory.mktemp("tool"))


@pytest.fixture
def root(tmp_path, tool) -> Path:
    image = build_busybox_root(tmp_path / "root")
    install_file(image, tool, "/bin/sbtool")
    shift_owners(image)
    return image


def make_spec(root: Path, *argv: str, **overrides) -> SandboxSpec:
    fields = {"root": str(root), "argv": list(argv), "env": ["PATH=/bin", "HOME=/"],
              "name": f"qtbt-{os.getpid()}-{next(_names)}"}
    fields.update(overrides)
    return SandboxSpec(**fields)


def sh(root: Path, script: str, **overrides):
    return run_in_sandbox(make_spec(root, "sh", "-c", script, **overrides))


def mountinfo() -> str:
    with open("/proc/self/mountinfo") as handle:
        return handle.read()


# -- the application ------------------------------------------------------------------------------

def test_app_output_and_exit_status(root):
    run = sh(root, "echo hello from inside; echo oops >&2; exit 7")
    assert run.stdout == "hello from inside\n"
    assert run.stderr == "oops\n"
    assert (run.exit.code, run.exit.signal, run.exit.oom_killed) == (7, None, False)


def test_exit_by_signal(root):
    run = sh(root, "kill -TERM $$")
    assert (run.exit.code, run.exit.signal) == (None, 15)


def test_env_cwd_ids_and_hostname(root):
    (root / "home" / "app").mkdir()
    run = sh(root, "id; pwd; echo FOO=$FOO; hostname; env | sort", uid=1000, gid=1000, groups=[10, 20],
             cwd="/home/app", env=["PATH=/bin", "FOO=bar baz"], hostname="qt-enclave")
    assert run.stdout.splitlines() == [
        "uid=1000(app) gid=1000(app) groups=10,20", "/home/app", "FOO=bar baz", "qt-enclave",
        "FOO=bar baz", "PATH=/bin", "PWD=/home/app", "SHLVL=1"]


def test_stdin_is_passed(root):
    read_end, write_end = os.pipe()
    os.write(write_end, b"through stdin\n")
    os.close(write_end)
    try:
        run = run_in_sandbox(make_spec(root, "cat", stdin=read_end))
    finally:
        os.close(read_end)
    assert run.stdout == "through stdin\n"


def test_only_std_fds_are_inherited(root):
    leaked = os.open("/etc/hostname", os.O_RDONLY)  # inheritable fds of the caller must not leak
    os.set_inheritable(leaked, True)
    try:
        run = sh(root, "ls /proc/self/fd")
    finally:
        os.close(leaked)
    assert sorted(int(fd) for fd in run.stdout.split()) == [0, 1, 2, 3]  # 3: the directory ls reads


def test_command_not_found_is_a_sandbox_error(root):
    with pytest.raises(SandboxError, match=r"cannot execute 'no-such-program': not found in PATH=/bin"):
        start_sandbox(make_spec(root, "no-such-program"))


def test_cwd_missing_is_a_sandbox_error(root):
    with pytest.raises(SandboxError, match="working directory /nowhere"):
        start_sandbox(make_spec(root, "true", cwd="/nowhere"))


# -- processes --------------------------------------------------------------------------------------

def test_app_is_child_of_pid1_and_sees_only_sandbox_processes(root):
    run = sh(root, "echo $$ $PPID; ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '")
    first, second = run.stdout.splitlines()
    assert first == "2 1"
    pids = [int(pid) for pid in second.split()]
    assert pids[:2] == [1, 2] and max(pids) < 10  # 1 init, 2 sh, then the pipeline


def test_leftover_processes_are_killed_when_the_app_exits(root):
    started = time.monotonic()
    run = sh(root, "sleep 1000 & sleep 1000 & echo started")
    assert run.stdout == "started\n" and run.exit.code == 0
    assert time.monotonic() - started < 10


def _exited_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` is gone or a zombie within ``seconds``.

    The cgroup is removed once its last task has left it, and a task leaves its cgroup inside
    do_exit, a moment before it turns zombie: /proc can still show the killed init running.
    """
    status = Path(f"/proc/{pid}/status")
    deadline = time.monotonic() + seconds
    while True:
        try:
            if "Z (zombie)" in status.read_text():
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def test_kill_ends_everything_and_cleans_up(root):
    spec = make_spec(root, "sh", "-c", "sleep 1000 & sleep 1000")
    sandbox = start_sandbox(spec)
    init_pid, cgroup_dirs = sandbox.pid, sandbox.cgroup.directories()
    assert all(os.path.isdir(path) for path in cgroup_dirs)
    assert os.path.exists(f"/proc/{init_pid}")
    sandbox.kill()
    result = sandbox.wait()
    assert (result.code, result.signal) == (None, 9)
    assert not any(os.path.exists(path) for path in cgroup_dirs)
    assert _exited_within(init_pid, seconds=5)
    sandbox.cleanup()  # idempotent
    sandbox.kill()


def test_wait_timeout_then_cleanup(root):
    sandbox = start_sandbox(make_spec(root, "sleep", "1000"))
    assert sandbox.wait(timeout=0.2) is None
    sandbox.cleanup()
    assert sandbox.wait(timeout=5).signal == 9


def test_fork_bomb_hits_pids_max_and_sandbox_exits_cleanly(root):
    run = run_in_sandbox(make_spec(root, "sbtool", "forks", "5000", pids_max=32))
    match = re.fullmatch(r"forks failed after (\d+) errno=(\d+)\n", run.stdout)
    assert match, run.stdout
    assert int(match.group(1)) < 32 and int(match.group(2)) == errno.EAGAIN
    assert run.exit.code == 0


def test_memory_limit_oom_kills(root):
    run = run_in_sandbox(make_spec(root, "sbtool", "memhog", "512", memory_bytes=64 * MiB))
    assert "memhog done" not in run.stdout
    assert run.exit.signal == 9 and run.exit.oom_killed


def test_memory_within_limit_is_fine(root):
    run = run_in_sandbox(make_spec(root, "sbtool", "memhog", "16", memory_bytes=128 * MiB, cpus=1))
    assert run.stdout == "memhog done\n" and run.exit.code == 0 and not run.exit.oom_killed


def test_limits_are_written_to_the_cgroup(root):
    sandbox = start_sandbox(make_spec(root, "sleep", "1000", memory_bytes=96 * MiB, cpus=1, pids_max=50))
    try:
        values = {}
        for path in sandbox.cgroup.directories():
            for name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max", "cpu.cfs_quota_us"):
                if os.path.exists(os.path.join(path, name)):
                    values[name] = Path(path, name).read_text().split()[0]
        assert values.get("memory.max", values.get("memory.limit_in_bytes")) == str(96 * MiB)
        assert values["pids.max"] == "50"
        assert values.get("cpu.max", values.get("cpu.cfs_quota_us")) == "100000"
        assert sandbox.pid in sandbox.cgroup.pids()
    finally:
        sandbox.kill()


def test_cpu_ids_pin_the_sandbox_to_those_cpus(root):
    """--cpu-ids: the application runs only on the CPUs named (a cpuset it cannot widen: asking
    the kernel for every CPU leaves it on the one it was given)."""
    pinned = max(os.sched_getaffinity(0))
    script = ("grep Cpus_allowed_list /proc/self/status; taskset -p ffffffff $$ >/dev/null 2>&1; "
              "grep Cpus_allowed_list /proc/self/status")
    run = sh(root, script, cpus=1, cpu_ids=(pinned,))
    assert run.stdout.split() == ["Cpus_allowed_list:", str(pinned)] * 2, run.stdout


def test_cpu_ids_are_validated(root):
    with pytest.raises(SandboxError, match=r"cpu_ids: \(\) must be a non-empty list"):
        start_sandbox(make_spec(root, "true", cpu_ids=()))


# -- isolation ----------------------------------------------------------------------------------------

def test_no_capabilities_no_new_privs_seccomp(root):
    run = sh(root, "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status")
    fields = dict(line.split(":\t") for line in run.stdout.splitlines())
    assert all(fields[name] == "0000000000000000" for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"))
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"


def test_no_network_only_lo(root):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    try:
        port = listener.getsockname()[1]
        run = sh(root, f"sbtool tcp 127.0.0.1 {port}; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert run.stdout.splitlines() == [f"tcp errno={errno.ECONNREFUSED}", "lo"]


def test_vsock_socket_is_denied(root):
    run = run_in_sandbox(make_spec(root, "sbtool", "vsock"))
    assert run.stdout == f"vsock errno={errno.EPERM}\n"


def test_escape_syscalls_are_denied(root):
    run = run_in_sandbox(make_spec(root, "sbtool", "escape"))
    results = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert results.pop("x32_getpid") == f"errno={errno.ENOSYS}"
    assert results == {name: f"errno={errno.EPERM}" for name in
                       ("unshare", "clone_newuser", "setns", "ptrace", "bpf", "keyctl", "io_uring_setup")}


def test_root_inside_is_an_unprivileged_host_uid(root, tmp_path):
    """Regression (issue 12, host device nodes): root in the sandbox is the subordinate range's
    first id, so host inodes it reaches are not its own."""
    ids = enclave_ids()
    devices = [f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom", "tty")]
    before = {path: os.stat(path) for path in devices}
    host_owned = tmp_path / "host-owned"
    host_owned.mkdir()
    run = sh(root, "cat /proc/self/uid_map /proc/self/gid_map | tr -s ' '; id -u; "
                   + "; ".join(f"chmod 000 {path} 2>/dev/null || echo {path} chmod refused" for path in devices)
                   + "; chown 1000 /dev/null 2>/dev/null || echo chown refused; "
                   "touch -d '2001-01-01' /dev/zero 2>/dev/null || echo utimes refused; "
                   "echo x > /host/f 2>/dev/null || echo host dir refused; echo data > /dev/null && echo null works",
             binds=[Bind(str(host_owned), "/host", read_only=False)])
    assert run.stdout.splitlines() == [
        f" 0 {ids.uid} {ids.count}", f" 0 {ids.gid} {ids.count}", "0",
        *(f"{path} chmod refused" for path in devices),
        "chown refused", "utimes refused", "host dir refused", "null works"]
    assert ids.uid >= 1000 and ids.count >= 65535
    after = {path: os.stat(path) for path in devices}
    for path in devices:
        fields = ("st_mode", "st_uid", "st_gid", "st_rdev", "st_ctime_ns")
        assert [getattr(after[path], f) for f in fields] == [getattr(before[path], f) for f in fields], path
    assert os.listdir(host_owned) == []


def test_mount_fails(root):
    run = sh(root, "mount -t tmpfs none /tmp; echo status=$?; umount /proc; echo status=$?")
    assert run.stdout.splitlines() == ["status=1", "status=1"]
    assert "permission denied" in run.stderr.lower() or "operation not permitted" in run.stderr.lower()


def test_host_files_are_not_visible(root, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("secret")
    run = sh(root, f"cat {secret} 2>/dev/null; echo status=$?; ls /; ls /proc/1/root 2>&1 | head -1; "
                   "test -e /work/main && echo work-visible; test -e /root && echo root-visible")
    lines = run.stdout.splitlines()
    assert lines[0] == "status=1"
    assert set(lines[1:]) >= {"bin", "dev", "etc", "home", "proc", "tmp"}
    assert "secret" not in run.stdout and "work-visible" not in lines and "root-visible" not in lines


def test_fresh_proc_dev_tmp_and_read_only_proc_sys(root):
    run = sh(root, "ls /dev | tr '\\n' ' '; echo; mount | grep -E ' /(proc|dev|tmp|dev/shm) ' | cut -d' ' -f3,5; "
                   "echo x > /proc/sys/kernel/hostname 2>/dev/null || echo sys-ro; "
                   "test -e /proc/sysrq-trigger && { echo h > /proc/sysrq-trigger; } 2>/dev/null || echo sysrq-ro; "
                   "echo data > /tmp/f && cat /tmp/f; head -c 4 /dev/zero | wc -c")
    lines = run.stdout.splitlines()
    assert lines[0].split() == sorted(["fd", "full", "null", "random", "shm", "stderr", "stdin",
                                       "stdout", "tty", "urandom", "zero"])
    assert set(lines[1:5]) == {"/proc proc", "/dev tmpfs", "/dev/shm tmpfs", "/tmp tmpfs"}
    assert lines[5:] == ["sys-ro", "sysrq-ro", "data", "4"]  # sysrq-trigger: read-only, or absent (no SYSRQ)


def test_unix_socket_bind_reaches_host_server(root, tmp_path):
    path = str(tmp_path / "echo.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o666)  # root inside is an unprivileged host uid: like any host user it needs write access
    server.listen(1)

    def echo_once():
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"echo:" + connection.recv(100))

    thread = threading.Thread(target=echo_once, daemon=True)
    thread.start()
    try:
        run = run_in_sandbox(make_spec(root, "sbtool", "unix", "/run/vsock/echo.sock", "ping",
                                       binds=[Bind(path, "/run/vsock/echo.sock")]))
    finally:
        thread.join(5)
        server.close()
    assert run.stdout == "unix ok\nreply=echo:ping\n"


def test_binds_read_only_and_writable(root, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "in").write_text("from host\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shift_owners(out_dir)  # writable for root inside: owned by the range's first id
    run = sh(root, "cat /data/in; echo x > /data/new 2>/dev/null || echo data-ro; echo result > /out/r",
             binds=[Bind(str(shared), "/data"), Bind(str(out_dir), "/out", read_only=False)])
    assert run.stdout.splitlines() == ["from host", "data-ro"]
    assert (out_dir / "r").read_text() == "result\n"
    assert not (shared / "new").exists()


# -- symlinks planted in the image (runc CVE-2026-41579 class) ------------------------------------------

def test_symlink_at_mount_point_is_replaced_not_followed(root, tmp_path):
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    shutil.rmtree(root / "tmp")
    (root / "tmp").symlink_to(host_dir)
    (root / "etc" / "conf").symlink_to(tmp_path / "host-file")
    (tmp_path / "host-file").write_text("host")
    source = tmp_path / "conf-source"
    source.write_text("bound")
    run = sh(root, "echo x > /tmp/written; test -L /tmp || echo tmp-is-dir; cat /etc/conf",
             binds=[Bind(str(source), "/etc/conf")])
    assert run.stdout.splitlines() == ["tmp-is-dir", "bound"]
    assert os.listdir(host_dir) == [] and (tmp_path / "host-file").read_text() == "host"


def test_symlink_above_mount_point_is_refused(root, tmp_path):
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (root / "run").symlink_to(host_dir)
    sock = tmp_path / "s"
    sock.write_text("")
    with pytest.raises(SandboxError, match=r"/run in the image is a symlink"):
        start_sandbox(make_spec(root, "true", binds=[Bind(str(sock), "/run/x/s")]))
    assert os.listdir(host_dir) == []


# -- cleanup and errors ---------------------------------------------------------------------------------

def test_cleanup_leaves_no_cgroup_or_mount(root):
    before = mountinfo()
    sandbox = start_sandbox(make_spec(root, "sh", "-c", "exit 3", memory_bytes=64 * MiB, cpus=1))
    directories = sandbox.cgroup.directories()
    assert sandbox.wait(10).code == 3
    assert not any(os.path.exists(path) for path in directories)
    # Compare only what concerns this test's directory: other processes on the host (parallel test
    # runs, enclaves) may mount and unmount elsewhere meanwhile.
    added = set(mountinfo().splitlines()) - set(before.splitlines())
    assert not [line for line in added if str(root.parent) in line]
    assert str(root.parent) not in mountinfo()


def test_missing_cgroups_is_an_error_unless_no_limits(root, tmp_path):
    empty = tmp_path / "no-cgroups"
    empty.mkdir()
    with pytest.raises(SandboxError, match=r"no cgroup v1 or v2 hierarchy found under .*no_limits=True"):
        start_sandbox(make_spec(root, "true", cgroup_root=str(empty)))
    run = run_in_sandbox(make_spec(root, "sh", "-c", "echo unlimited", cgroup_root=str(empty), no_limits=True))
    assert run.stdout == "unlimited\n" and run.exit.code == 0


def test_missing_controller_is_named(root, tmp_path):
    fake = tmp_path / "fake-v2"
    fake.mkdir()
    (fake / "cgroup.controllers").write_text("cpu io\n")
    with pytest.raises(SandboxError, match=r"controller\(s\) pids, memory not available"):
        start_sandbox(make_spec(root, "true", cgroup_root=str(fake), memory_bytes=64 * MiB))


def test_spec_validation(root):
    with pytest.raises(SandboxError, match="binds target"):
        start_sandbox(make_spec(root, "true", binds=[Bind("/etc/hostname", "relative/path")]))
    with pytest.raises(SandboxError, match="name"):
        start_sandbox(make_spec(root, "true", name="../escape"))
    with pytest.raises(SandboxError, match="argv"):
        start_sandbox(make_spec(root))


def test_works_from_a_multithreaded_caller(root):
    results = []

    def one():
        results.append(sh(root, "echo threaded").stdout)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == ["threaded\n"] * 3


def test_probe_reports_this_host():
    report = probe()
    assert report["namespaces"] is None and report["seccomp"]["filter"] and report["seccomp"]["supported_arch"]
    assert report["cgroup"]["version"] in (1, 2) and report["ok"]
    ids = enclave_ids()
    assert report["ids"] == {"uid": ids.uid, "gid": ids.gid, "count": ids.count}  # and mapped in "namespaces"


def test_seccomp_numbers_match_kernel_headers():
    headers = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
               "aarch64": "/usr/include/asm-generic/unistd.h"}
    checked = 0
    for column, (machine, header) in enumerate(headers.items()):
        if not os.path.exists(header):
            continue
        text = Path(header).read_text()
        for name, numbers in seccomp._NUMBERS.items():
            match = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)", text)
            assert match and int(match.group(1)) == numbers[column], (machine, name)
            checked += 1
    if not checked:
        pytest.skip("kernel headers not installed (linux-libc-dev)")


# -- rootless -------------------------------------------------------------------------------------------

ROOTLESS_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    from qtbuild.runtime.sandbox import Bind, SandboxError, SandboxSpec, start_sandbox
    root, name = sys.argv[1], sys.argv[2]
    out = {"euid": os.geteuid()}
    try:
        start_sandbox(SandboxSpec(root=root, argv=["true"], env=["PATH=/bin"], name=name))
        out["limits_error"] = None
    except SandboxError as exc:
        out["limits_error"] = str(exc)
    with tempfile.TemporaryFile() as stdout:
        spec = SandboxSpec(root=root, argv=["sh", "-c", "id -u; echo $$; hostname; sbtool vsock; "
                           "grep CapEff /proc/self/status; tail -n +3 /proc/net/dev | cut -d: -f1"],
                           env=["PATH=/bin"], no_limits=True, stdout=stdout.fileno(), name=name)
        result = start_sandbox(spec).wait(20)
        stdout.seek(0)
        out["stdout"] = stdout.read().decode()
        out["code"] = result.code
    with tempfile.TemporaryFile() as stdout:
        spec = SandboxSpec(root=root, argv=["sh", "-c", "id -u; id -g; cat /mnt/group | head -1; "
                           "echo x >> /mnt/group 2>/dev/null || echo bind-ro; touch /home/x && echo home-rw"],
                           env=["PATH=/bin"], uid=1000, gid=1000, no_limits=True, stdout=stdout.fileno(),
                           binds=[Bind(root + "/etc/group", "/mnt/group")], name=name)
        result = start_sandbox(spec).wait(20)
        stdout.seek(0)
        out["stdout_uid"] = stdout.read().decode()
    print(json.dumps(out))
""")


def _nobody_env(base: str) -> dict[str, str]:
    """helper_env() for a Python without this venv: ``base/pkg`` holds the installed layout
    (qtbuild/ with runtime/ and formats/ inside) as symlinks into the source tree."""
    import qtbuild
    import qtbuild.formats
    import qtbuild.runtime

    package = Path(base) / "pkg" / "qtbuild"
    package.mkdir(parents=True, exist_ok=True)
    for name, module in (("__init__.py", qtbuild), ("runtime", qtbuild.runtime), ("formats", qtbuild.formats)):
        source = Path(module.__file__)
        target = source if name == "__init__.py" else source.parent
        if not (package / name).exists():
            (package / name).symlink_to(target)
    return {**helper_env(), "PYTHONPATH": str(package.parent)}


def _unprivileged_python(env: dict[str, str]) -> list[str] | None:
    """A ``setpriv`` command prefix running as nobody, and a Python ≥ 3.11 that nobody can run."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    for python in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not python:
            continue
        check = subprocess.run([*prefix, python, "-c", "import os, sys; assert sys.version_info >= (3, 11); "
                                "assert os.access(sys.executable, os.X_OK)"],
                               capture_output=True, env=env, cwd="/", check=False)
        if check.returncode == 0:
            return [*prefix, python]
    return None


def test_rootless_as_nobody(tool):
    base = tempfile.mkdtemp(prefix="qtbuild-sandbox-rootless-")
    env = _nobody_env(base)
    command = _unprivileged_python(env)
    if command is None:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip("no setpriv, or no Python >= 3.11 that the 'nobody' user can execute")
    try:
        os.chmod(base, 0o755)
        image = build_busybox_root(Path(base) / "root")
        install_file(image, tool, "/bin/sbtool")
        for directory, _, files in os.walk(base):
            for entry in [directory, *(os.path.join(directory, f) for f in files)]:
                os.chown(entry, 65534, 65534, follow_symlinks=False)
        probe_run = subprocess.run([*command, "-c", "import json; from qtbuild.runtime.sandbox import probe; "
                                    "print(json.dumps(probe()))"], capture_output=True, text=True,
                                   env=env, cwd="/", timeout=60, check=False)
        report = json.loads(probe_run.stdout)
        assert not str(report["userns"]).startswith("probe failed"), report
        if report["userns"] is not None:
            pytest.skip(f"unprivileged user namespaces are disabled here: {report['userns']}")
        done = subprocess.run([*command, "-c", ROOTLESS_SCRIPT, str(image), f"qtbt-rootless-{os.getpid()}"],
                              capture_output=True, text=True, env=env, cwd="/", timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert out["euid"] == 65534
    assert report["rootless"] and report["cgroup"]["limits"] is not None
    assert "resource limits" in out["limits_error"] and "no_limits=True" in out["limits_error"]
    assert out["code"] == 0
    assert [line.strip() for line in out["stdout"].splitlines()] == ["0", "2", "enclave", f"vsock errno={errno.EPERM}",
                                          "CapEff:\t0000000000000000", "lo"], out["stdout"]
    assert out["stdout_uid"].splitlines() == ["1000", "1000", "root:x:0:", "bind-ro", "home-rw"], out["stdout_uid"]


# -- cgroup v2 files (a fake hierarchy: this code path runs for real only on v2 hosts) ------------------

def test_cgroup_v2_layout_with_a_fake_hierarchy(tmp_path):
    from qtbuild.runtime.sandbox.cgroups import Limits, create

    fake = tmp_path / "v2"
    (fake / "qtbuild").mkdir(parents=True)
    (fake / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (fake / "cgroup.subtree_control").write_text("")
    (fake / "qtbuild" / "cgroup.subtree_control").write_text("")
    cgroup = create("enc", Limits(memory_bytes=64 * MiB, cpus=2, pids_max=100), str(fake))
    path = fake / "qtbuild" / "enc"
    assert cgroup.version == 2 and cgroup.directories() == [str(path)]
    assert cgroup.procs_files() == [str(path / "cgroup.procs")]
    assert (path / "memory.max").read_text() == str(64 * MiB)
    assert (path / "cpu.max").read_text() == "200000 100000"
    assert (path / "pids.max").read_text() == "100"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cgroup.oom_kills() == 1
    with pytest.raises(SandboxError, match="already exists"):
        create("enc", Limits(None, None, 10), str(fake))


def test_a_v1_parent_nests_under_the_callers_cgroup_of_that_controller():
    """cgroups.v1_parent (create and probe both place sandboxes with it): v1 sandboxes stay
    accounted wherever the caller is."""
    from qtbuild.runtime.sandbox.cgroups import v1_parent

    lines = Path("/proc/self/cgroup").read_text().splitlines()
    own = {controller: path for _, controllers, path in (line.split(":", 2) for line in lines)
           for controller in controllers.split(",")}
    assert v1_parent("/h/memory", "memory") == os.path.normpath(f"/h/memory/{own.get('memory', '/')}/qtbuild")
    assert v1_parent("/h/none", "no-such-controller") == "/h/none/qtbuild"


def test_no_host_path_in_mountinfo_or_the_command_line_of_pid_1(root, tmp_path):
    """Regression (issue 12): inside, /proc/self/mountinfo and /proc/1/cmdline must not name
    host paths (the helper's interpreter and module; with a root and bind sources on
    filesystems of their own, as enclaves have, no host directory either)."""
    memory = tmp_path / "memory"
    memory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(memory)], check=True)
    try:
        shutil.copytree(root, memory / "rootfs", symlinks=True)
        shift_owners(memory / "rootfs")
        run = sh(memory / "rootfs", "cat /proc/self/mountinfo; echo; tr '\\0' '|' < /proc/1/cmdline; echo; "
                 "cat /proc/1/comm")
    finally:
        subprocess.run(["umount", "-l", str(memory)], check=True)
    *mounts, cmdline, comm = [line for line in run.stdout.splitlines() if line]
    host_paths = [str(tmp_path), sys.prefix, os.path.dirname(os.__file__), "/tmp/", "/work", "/usr/"]
    for line in mounts:
        for path in host_paths:
            assert path not in line, line
    roots = {line.split()[3] for line in mounts}
    assert roots <= {"/", "/rootfs", "/null", "/zero", "/full", "/random", "/urandom", "/tty", "/sys",
                     "/sysrq-trigger", "/irq", "/bus"}, roots
    assert cmdline.rstrip("|") == "init" and comm == "init"
def test_step_names_the_protection_in_os_errors():
    from qtbuild.runtime.sandbox.spec import step

    with pytest.raises(SandboxError, match=r"^mounting /tmp failed: No such file or directory$"), step("mounting /tmp"):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
    with pytest.raises(ValueError), step("not an OS error"):
        raise ValueError("passes through")


# -- a helper spawned ahead of its plan --------------------------------------------------------------

def test_a_helper_spawned_ahead_runs_the_sandbox_it_is_given(root):
    with tempfile.TemporaryFile() as out:
        helper = spawn_helper(None, out.fileno(), out.fileno())
        time.sleep(0.2)  # it waits for its plan: nothing is set up yet
        assert helper.process.poll() is None
        spec = make_spec(root, "sh", "-c", "echo from a spawned helper; exit 4", stdout=out.fileno(),
                         stderr=out.fileno())
        sandbox = start_sandbox(spec, helper=helper)
        result = sandbox.wait(30)
        out.seek(0)
        assert out.read() == b"from a spawned helper\n"
    assert result is not None and result.code == 4
    assert not any(os.path.exists(path) for path in sandbox.cgroup.directories())


def test_a_helper_spawned_with_other_stdio_is_refused_and_ended(root):
    helper = spawn_helper(None, None, None)
    with tempfile.TemporaryFile() as out, pytest.raises(ValueError, match="other stdio"):
        start_sandbox(make_spec(root, "true", stdout=out.fileno()), helper=helper)
    assert helper.process.returncode is not None


def test_an_unused_helper_is_discarded_without_a_trace():
    helper = spawn_helper(None, None, None)
    helper.discard()
    helper.discard()  # idempotent
    assert helper.process.returncode is not None and helper.status.closed
