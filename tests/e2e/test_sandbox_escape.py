"""The sandbox-escape suite: a hostile application, root in its image, tries every way out of a
real ``qtbuild run`` enclave, and the host checks that none worked and that every limit held.

Each vector is one line of a static C probe (built here with ``gcc -static``), run inside the
enclave through the real CLI and runtime path; the host side then checks what the probe left in
the one place on the host it can write (its vsock directory): a planted symlink to a host socket
must not be followed, a setuid binary must not run, and the space is bounded.  Host device
nodes must be unchanged after the suite.  Runs as root (as CI does).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qtbuild.convert.pipeline import ConvertOptions, convert
from qtbuild.runtime.enclave import Manager, RuntimeDir
from qtbuild.runtime.enclave.resources import VSOCK_SIZE
from qtbuild.runtime.sandbox.subids import enclave_ids
from qtbuild.runtime.sdk import vsock

from helpers.enclave_runtime import directory_layer, temporary_runtime
from helpers.imagefactory import default_config, write_oci_layout
from helpers.sandbox_helpers import build_busybox_root, build_tool, compile_static

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the escape suite runs enclaves as root (as CI does)")

MiB = 1 << 20
MEM_MIB = 128
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

PROBE_SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

static void report(const char *name, long rc) {
    if (rc < 0) printf("%s errno=%d\n", name, errno);
    else printf("%s ok\n", name);
}
#define TRY(name, expr) do { errno = 0; report(name, (long)(expr)); } while (0)

static long tcp(const char *ip, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, ip, &a.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    long rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    int e = errno; close(fd); errno = e;
    return rc;
}

static long unix_connect(const char *name, int abstract) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    socklen_t len = sizeof a;
    if (abstract) {
        strncpy(a.sun_path + 1, name, sizeof a.sun_path - 2);
        len = offsetof(struct sockaddr_un, sun_path) + 1 + strlen(name);
    } else {
        strncpy(a.sun_path, name, sizeof a.sun_path - 1);
    }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    long rc = connect(fd, (struct sockaddr *)&a, len);
    int e = errno; close(fd); errno = e;
    return rc;
}

static long open_close(const char *path, int flags) {
    int fd = open(path, flags);
    if (fd >= 0) close(fd);
    return fd;
}

static long copy(const char *from, const char *to) {
    int in = open(from, O_RDONLY), out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0755);
    if (in < 0 || out < 0) return -1;
    char buf[65536]; ssize_t n;
    while ((n = read(in, buf, sizeof buf)) > 0)
        if (write(out, buf, n) != n) return -1;
    close(in); close(out);
    return 0;
}

static long fill(const char *path, long limit, long *written) {
    static char buf[65536];
    memset(buf, 'x', sizeof buf);
    *written = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return -1;
    while (*written < limit) {
        ssize_t n = write(fd, buf, sizeof buf);
        if (n <= 0) { int e = errno; close(fd); errno = e; return -1; }
        *written += n;
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 4 && !strcmp(argv[1], "fill")) {            /* fill PATH LIMIT */
        long written;
        TRY("fill", fill(argv[2], atol(argv[3]), &written));
        printf("fill_bytes %ld\n", written);
        return 0;
    }
    if (argc != 9 || strcmp(argv[1], "all")) {
        fprintf(stderr, "usage: probe all CID SECRET PORT ABSTRACT HOSTSOCK HOSTIP PAYLOAD | fill PATH LIMIT\n");
        return 64;
    }
    const char *cid = argv[2], *secret = argv[3], *abstract = argv[5], *hostsock = argv[6], *hostip = argv[7];
    int port = atoi(argv[4]);
    char dir[64], path[128], buf[256];
    snprintf(dir, sizeof dir, "/run/vsock/%s", cid);

    /* host files */
    TRY("read_host_file", open_close(secret, O_RDONLY));
    TRY("proc1_root", open_close("/proc/1/root/etc/passwd", O_RDONLY));
    TRY("proc1_environ", open_close("/proc/1/environ", O_RDONLY));
    TRY("proc1_exe", readlink("/proc/1/exe", buf, sizeof buf));
    TRY("open_by_handle_at", syscall(SYS_open_by_handle_at, AT_FDCWD, NULL, 0));
    TRY("chroot", chroot("/tmp"));
    /* network */
    TRY("tcp_host_loopback", tcp("127.0.0.1", port));
    TRY("tcp_host_address", tcp(hostip, port));
    TRY("packet_socket", socket(AF_PACKET, SOCK_RAW, 0));
    TRY("raw_ip_socket", socket(AF_INET, SOCK_RAW, IPPROTO_ICMP));
    /* foreign sockets */
    TRY("abstract_host_socket", unix_connect(abstract, 1));
    TRY("host_socket_path", unix_connect(hostsock, 0));
    TRY("vsock_socket", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    snprintf(path, sizeof path, "%s/7777.sock", dir);
    TRY("plant_symlink", symlink(hostsock, path));
    /* namespaces, ptrace, bpf, io_uring, modules */
    TRY("unshare_user", unshare(CLONE_NEWUSER));
    TRY("unshare_mount", unshare(CLONE_NEWNS));
    TRY("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
    TRY("clone3", syscall(435, NULL, 0));
    TRY("setns", setns(0, 0));
    TRY("mount", mount("none", "/tmp", "tmpfs", 0, NULL));
    TRY("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp"));
    TRY("ptrace_init", syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0));
    TRY("process_vm_readv", syscall(SYS_process_vm_readv, 1, 0, 0, 0, 0, 0));
    TRY("bpf", syscall(SYS_bpf, 0, 0, 0));
    TRY("perf_event_open", syscall(SYS_perf_event_open, 0, 0, 0, 0, 0));
    TRY("userfaultfd", syscall(SYS_userfaultfd, 0));
    TRY("keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
    TRY("io_uring_setup", syscall(425, 1, 0));
    TRY("init_module", syscall(SYS_init_module, 0, 0, ""));
    TRY("kexec_load", syscall(SYS_kexec_load, 0, 0, 0, 0));
#ifdef __x86_64__
    TRY("x32_syscall", syscall(0x40000000 + 39));
#endif
    /* device inodes */
    const char *devices[] = {"null", "zero", "full", "random", "urandom", "tty"};
    for (int i = 0; i < 6; i++) {
        char name[64], dev[64];
        snprintf(dev, sizeof dev, "/dev/%s", devices[i]);
        snprintf(name, sizeof name, "chmod_dev_%s", devices[i]);
        TRY(name, chmod(dev, 0));
    }
    TRY("chown_dev_null", chown("/dev/null", 0, 0));
    struct timespec times[2] = {{1, 0}, {1, 0}};
    TRY("utimes_dev_zero", utimensat(AT_FDCWD, "/dev/zero", times, 0));
    TRY("mknod_tmp", mknod("/tmp/null2", S_IFCHR | 0666, makedev(1, 3)));
    snprintf(path, sizeof path, "%s/null2", dir);
    TRY("mknod_vsock_dir", mknod(path, S_IFCHR | 0666, makedev(1, 3)));
    TRY("chmod_dev_qtsm", chmod("/dev/qtsm", 0777));
    TRY("write_proc_sys", open_close("/proc/sys/kernel/hostname", O_WRONLY));
    /* a setuid binary in the host-visible directory */
    snprintf(path, sizeof path, "%s/suid", dir);
    TRY("drop_binary", copy(argv[8], path));
    TRY("chmod_setuid", chmod(path, 04755));
    /* filling the host-visible directory */
    long written;
    snprintf(path, sizeof path, "%s/fill", dir);
    TRY("fill_vsock_dir", fill(path, 64L << 20, &written));
    printf("fill_vsock_dir_bytes %ld\n", written);
    unlink(path);
    printf("READY\n");
    return 0;
}
"""

# A few hundred bytes of code: exits 42 if it runs with euid 0 (what a setuid-root drop would give), 7 otherwise.
PAYLOAD_SOURCE = r"""
void _start(void) {
    long euid, code;
#if defined(__x86_64__)
    __asm__ volatile("syscall" : "=a"(euid) : "a"(107L) : "rcx", "r11", "memory");
    code = euid == 0 ? 42 : 7;
    __asm__ volatile("syscall" : : "a"(60L), "D"(code) : "rcx", "r11", "memory");
#elif defined(__aarch64__)
    register long x8 __asm__("x8") = 175, x0 __asm__("x0");
    __asm__ volatile("svc #0" : "=r"(x0) : "r"(x8) : "memory");
    euid = x0;
    code = euid == 0 ? 42 : 7;
    register long e8 __asm__("x8") = 93, e0 __asm__("x0") = code;
    __asm__ volatile("svc #0" : : "r"(e8), "r"(e0) : "memory");
#endif
    for (;;) {}
}
"""

EPERM, EACCES, ENOENT = f"errno={errno.EPERM}", f"errno={errno.EACCES}", f"errno={errno.ENOENT}"
EXPECTED = {
    "read_host_file": ENOENT, "proc1_root": EACCES, "proc1_environ": EACCES, "proc1_exe": EACCES,
    "open_by_handle_at": EPERM, "chroot": EPERM,
    "tcp_host_loopback": f"errno={errno.ECONNREFUSED}", "tcp_host_address": f"errno={errno.ENETUNREACH}",
    "packet_socket": EPERM, "raw_ip_socket": EPERM,
    "abstract_host_socket": f"errno={errno.ECONNREFUSED}", "host_socket_path": ENOENT, "vsock_socket": EPERM,
    "plant_symlink": "ok",  # allowed: the host side must refuse to follow it (checked below)
    "unshare_user": EPERM, "unshare_mount": EPERM, "clone_newuser": EPERM, "clone3": f"errno={errno.ENOSYS}",
    "setns": EPERM, "mount": EPERM, "pivot_root": EPERM, "ptrace_init": EPERM, "process_vm_readv": EPERM,
    "bpf": EPERM, "perf_event_open": EPERM, "userfaultfd": EPERM, "keyctl": EPERM, "io_uring_setup": EPERM,
    "init_module": EPERM, "kexec_load": EPERM,
    **{f"chmod_dev_{name}": EPERM for name in DEVICES},
    "chown_dev_null": EPERM, "utimes_dev_zero": EPERM, "mknod_tmp": EPERM, "mknod_vsock_dir": EPERM,
    "chmod_dev_qtsm": f"errno={errno.EROFS}", "write_proc_sys": EACCES,
    "drop_binary": "ok", "chmod_setuid": "ok",  # allowed: it must be harmless on the host (checked below)
    "fill_vsock_dir": f"errno={errno.ENOSPC}",
}
if os.uname().machine == "x86_64":
    EXPECTED["x32_syscall"] = f"errno={errno.ENOSYS}"


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime_dir():
    with temporary_runtime("qtx") as runtime:
        yield runtime


@pytest.fixture(autouse=True)
def _stop_leftovers(runtime_dir):
    yield
    Manager().stop_all()


@pytest.fixture(scope="module")
def base_root(tmp_path_factory) -> Path:
    root = build_busybox_root(tmp_path_factory.mktemp("image") / "root")
    build_tool(root / "bin")
    compile_static(PROBE_SOURCE, root / "bin" / "probe")
    compile_static(PAYLOAD_SOURCE, root / "bin" / "payload", "-nostdlib", "-Os", "-Wl,--build-id=none", "-s")
    return root


@pytest.fixture(scope="module")
def make_eif(base_root, tmp_path_factory):
    """``make_eif(name, script, extra=None)``: an EIF running ``/bin/sh /app.sh`` as root, with
    ``extra`` (a directory) as one more layer."""
    base_layer = directory_layer(base_root)
    workdir = tmp_path_factory.mktemp("eifs")

    def make(name: str, script: str, extra: Path | None = None) -> str:
        app = tmp_path_factory.mktemp("app")
        (app / "app.sh").write_text(script + "\n")
        layers = [base_layer, directory_layer(app), *([directory_layer(extra)] if extra else [])]
        layout = workdir / f"{name}-layout"
        write_oci_layout(layout, layers, default_config(cmd=["/bin/sh", "/app.sh"], env=["PATH=/bin"]),
                         compression=None)
        output = workdir / f"{name}.eif"
        convert(f"oci:{layout}:latest", ConvertOptions(output=str(output), quiet=True))
        return str(output)

    return make


# -- helpers -------------------------------------------------------------------------------------

QTBUILD = [sys.executable, "-c", "from qtbuild.cli import main; main()"]


def qtbuild(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*QTBUILD, *args], capture_output=True, text=True, timeout=timeout, check=False)


def run_attached(eif: str, *options: str) -> tuple[int, dict, str]:
    done = qtbuild("run", eif, "--attach-console", "--mem", str(MEM_MIB), *options)
    summary, end = json.JSONDecoder().raw_decode(done.stdout)
    return done.returncode, summary, done.stdout[end:]


def record_of(runtime: RuntimeDir, enclave_id: int) -> dict:
    return json.loads(runtime.enclave(enclave_id).record.read_text())


def device_state() -> dict:
    fields = ("st_mode", "st_uid", "st_gid", "st_rdev", "st_ino", "st_ctime_ns")
    return {name: tuple(getattr(os.stat(f"/dev/{name}"), f) for f in fields) for name in DEVICES}


def host_address() -> str:
    """A non-loopback address of this host (a route lookup, nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            return probe.getsockname()[0]
        except OSError:
            return "192.0.2.1"


def mount_options(path: Path) -> set[str]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return set(fields[5].split(","))
    return set()


def cgroup_value(record: dict, controller: str, *names: str) -> str:
    directory = Path(record["cgroup"]["paths"][controller])
    for name in names:
        if (directory / name).exists():
            return (directory / name).read_text().split()[0]
    raise AssertionError(f"none of {names} in {directory}")


# -- the suite -----------------------------------------------------------------------------------

def test_every_escape_vector_fails_and_the_host_is_unchanged(make_eif, runtime_dir, tmp_path):
    devices_before = device_state()
    ids = enclave_ids()
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    host_socket_path = f"/tmp/qtx-host-{os.getpid()}.sock"
    abstract = f"qtbuild-escape-{os.getpid()}"
    with socket.create_server(("0.0.0.0", 0)) as tcp_listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host_listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract_listener:
        host_listener.bind(host_socket_path)
        os.chmod(host_socket_path, 0o666)
        host_listener.listen(4)
        abstract_listener.bind("\0" + abstract)
        abstract_listener.listen(4)
        for listener in (tcp_listener, host_listener, abstract_listener):
            listener.setblocking(False)
        port = tcp_listener.getsockname()[1]
        eif = make_eif("escape", f'/bin/probe all "$QTBUILD_VSOCK_CID" {secret} {port} {abstract} '
                                 f"{host_socket_path} {host_address()} /bin/payload; exec sleep 120")
        process = subprocess.Popen([*QTBUILD, "run", eif, "--attach-console", "--mem", str(MEM_MIB)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        summary: dict = {}
        try:
            output = _read_until_ready(process)
            summary, end = json.JSONDecoder().raw_decode(output)
            results = dict(line.split(" ", 1) for line in output[end:].splitlines() if " " in line)
            cid, enclave_id = summary["EnclaveCID"], summary["EnclaveID"]
            vsock_dir = runtime_dir.vsock_root / str(cid)
            _check_host_side(runtime_dir, record_of(runtime_dir, enclave_id), vsock_dir, ids)
            for listener in (tcp_listener, host_listener, abstract_listener):
                with pytest.raises(BlockingIOError):
                    listener.accept()  # nothing reached the host's listeners
        finally:
            if summary:
                qtbuild("enclave", "stop", "--enclave-id", str(summary["EnclaveID"]))
            process.kill()
            process.wait(30)
            os.unlink(host_socket_path)
    fill_bytes = int(results.pop("fill_vsock_dir_bytes"))
    assert results == EXPECTED
    assert fill_bytes <= VSOCK_SIZE  # the host disk is never reached: a tmpfs of 1 MiB, charged to the enclave
    assert not os.path.ismount(vsock_dir) and not vsock_dir.exists()
    assert device_state() == devices_before


def _read_until_ready(process: subprocess.Popen, timeout: float = 60) -> str:
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if line == "READY\n":
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"the probe did not finish: {''.join(lines)}{process.stderr.read()}")


def _check_host_side(runtime: RuntimeDir, record: dict, vsock_dir: Path, ids) -> None:
    """What the enclave left in its host-visible directory, and its limits, seen from the host."""
    parent = vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, str(runtime.vsock_root))
    assert (vsock_dir / "7777.sock").is_symlink()
    with pytest.raises(ConnectionRefusedError, match="not a socket"):
        vsock.connect(record["cid"], 7777, config=parent, timeout=2)  # the planted link is not followed
    suid = vsock_dir / "suid"
    st = suid.lstat()
    assert st.st_mode & 0o4000 and st.st_uid == ids.uid != 0  # setuid, but to the range's first id, not root
    assert {"nosuid", "nodev", "noexec"} <= mount_options(vsock_dir)
    with pytest.raises(PermissionError):  # an unprivileged host user cannot even run it (noexec)
        subprocess.run([str(suid)], user=65534, group=65534, extra_groups=[], timeout=10, check=False)
    assert cgroup_value(record, "memory", "memory.max", "memory.limit_in_bytes") == str(MEM_MIB * MiB)
    assert cgroup_value(record, "pids", "pids.max") == "1024"
    assert cgroup_value(record, "cpu", "cpu.max", "cpu.cfs_quota_us") == str(2 * 100_000)


def test_memory_and_tmpfs_filling_end_in_oom_and_the_host_is_unaffected(make_eif, runtime_dir):
    neighbour = json.loads(qtbuild("run", make_eif("neighbour", "exec sleep 120"), "--mem", str(MEM_MIB)).stdout)
    for name, script in (("memhog", "exec sbtool memhog 400"), ("tmpfill", f"exec probe fill /tmp/fill {512 * MiB}")):
        status, summary, output = run_attached(make_eif(name, script))
        ended = Manager().query(summary["EnclaveID"])[0]
        if ended["Status"] == "OOM":
            assert ended["Signal"] == signal.SIGKILL
        else:  # the tmpfs write failed first: the charge was refused before any kill
            assert name == "tmpfill" and "fill errno=" in output, output
        assert "memhog done" not in output and "fill ok" not in output
    assert Manager().query(neighbour["EnclaveID"])[0]["Status"] == "Running"  # the host and its other enclaves


def test_a_fork_bomb_stops_at_the_pids_limit(make_eif, runtime_dir):
    status, _, output = run_attached(make_eif("forks", "exec sbtool forks 5000"))
    assert status == 0, output
    assert 100 < int(output.split("forks failed after ")[1].split()[0]) < 1024


def test_the_unpacked_image_is_charged_to_the_enclave(make_eif, runtime_dir, tmp_path):
    """Regression (issue 12): 300k empty files cost ~300 MiB of host memory while the enclave's
    cgroup showed 2.4 MiB.  At 20k files: the cgroup must account at least 500 bytes per file
    more than for the same image without them."""
    files = tmp_path / "files"
    (files / "many").mkdir(parents=True)
    for index in range(20_000):
        (files / "many" / f"{index:05d}").touch()
    usage = {}
    for name, extra in (("few-files", None), ("many-files", files)):
        summary = json.loads(qtbuild("run", make_eif(name, "exec sleep 120", extra), "--mem", "256").stdout)
        record = record_of(runtime_dir, summary["EnclaveID"])
        usage[name] = int(cgroup_value(record, "memory", "memory.current", "memory.usage_in_bytes"))
        qtbuild("enclave", "stop", "--enclave-id", str(summary["EnclaveID"]))
    assert usage["many-files"] - usage["few-files"] >= 20_000 * 500, usage


def test_no_host_path_in_mountinfo_or_the_command_line_of_pid_1(make_eif, runtime_dir):
    status, _, output = run_attached(make_eif("paths", "cat /proc/self/mountinfo; tr '\\0' '|' < /proc/1/cmdline"))
    assert status == 0
    for fragment in (str(runtime_dir.path), "/tmp/", "/run/qtbuild", sys.prefix, "/work", "enclaves"):
        assert fragment not in output, output
    assert "init|" in output
