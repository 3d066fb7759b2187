"""Reusable pieces for tests that run things in :mod:`qtbuild.runtime.sandbox`: a static busybox root,
a static C multi-tool (vsock, tcp, unix, memhog, forks, escape checks) and a runner that
captures the application's output.

Everything that needs a host tool (busybox-static, gcc with a static libc) skips the calling
test with the package to install when the tool is missing.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from qtbuild.runtime.sandbox import SandboxExit, SandboxSpec, start_sandbox
from qtbuild.runtime.sandbox.subids import IdRange, enclave_ids

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
TOOL_NAME = "sbtool"
TOOL_SOURCE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

static int report(const char *what, long rc) {
    if (rc < 0) printf("%s errno=%d\n", what, errno);
    else printf("%s ok\n", what);
    return rc < 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc >= 2 && !strcmp(argv[1], "vsock")) {            /* vsock */
        return !report("vsock", socket(40 /* AF_VSOCK */, SOCK_STREAM, 0));
    }
    if (argc >= 4 && !strcmp(argv[1], "tcp")) {              /* tcp HOST PORT */
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &addr.sin_addr);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        return !report("tcp", connect(fd, (struct sockaddr *)&addr, sizeof addr));
    }
    if (argc >= 4 && !strcmp(argv[1], "unix")) {             /* unix PATH MESSAGE */
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        strncpy(addr.sun_path, argv[2], sizeof addr.sun_path - 1);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (report("unix", connect(fd, (struct sockaddr *)&addr, sizeof addr))) return 1;
        write(fd, argv[3], strlen(argv[3]));
        shutdown(fd, SHUT_WR);
        char buf[256]; ssize_t n = read(fd, buf, sizeof buf - 1);
        buf[n > 0 ? n : 0] = 0;
        printf("reply=%s\n", buf);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "memhog")) {           /* memhog MIB */
        for (int i = 0; i < atoi(argv[2]); i++) {
            char *p = malloc(1 << 20);
            if (!p) { printf("memhog malloc failed at %d MiB\n", i); return 2; }
            memset(p, i + 1, 1 << 20);
        }
        printf("memhog done\n");
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "forks")) {            /* forks MAX */
        int count = 0, max = atoi(argv[2]);
        for (; count < max; count++) {
            pid_t pid = fork();
            if (pid == 0) { pause(); _exit(0); }
            if (pid < 0) { printf("forks failed after %d errno=%d\n", count, errno); return 0; }
        }
        printf("forks all %d\n", count);
        return 1;
    }
    if (argc >= 2 && !strcmp(argv[1], "escape")) {           /* escape: each must fail */
        report("unshare", unshare(CLONE_NEWUSER));
        report("clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0));
        report("setns", setns(0, 0));
        report("ptrace", syscall(SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0));
        report("bpf", syscall(SYS_bpf, 0, 0, 0));
        report("keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
        report("io_uring_setup", syscall(425, 1, 0));
        report("x32_getpid", syscall(0x40000000 + 39));
        return 0;
    }
    fprintf(stderr, "usage: sbtool vsock|tcp H P|unix PATH MSG|memhog MIB|forks MAX|escape\n");
    return 64;
}
"""


def find_busybox() -> str:
    """Path of a statically linked busybox, or skip (``apt-get install busybox-static``)."""
    for candidate in (*BUSYBOX_CANDIDATES, shutil.which("busybox")):
        if candidate and os.path.exists(candidate) and is_static_elf(candidate):
            return candidate
    pytest.skip("a static busybox is needed: apt-get install busybox-static")


def is_static_elf(path: str) -> bool:
    """True for an ELF executable without a PT_INTERP program header (no dynamic loader)."""
    with open(path, "rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def build_busybox_root(path: str | os.PathLike, *, applets: list[str] | None = None) -> Path:
    """A minimal root at ``path``: ``/bin/busybox`` with a symlink per applet (all of them by
    default), empty ``/proc``, ``/dev``, ``/tmp``, ``/etc`` and ``/home``; every directory 0755."""
    root = Path(path)
    busybox = find_busybox()
    for directory in ("bin", "proc", "dev", "tmp", "etc", "home"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in _all_applets(busybox) if applets is None else applets:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    return root


@functools.cache
def _all_applets(busybox: str) -> tuple[str, ...]:
    listed = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    return tuple(name for name in listed.split() if name != "busybox")


def shift_owners(root: str | os.PathLike, ids: IdRange | None = None) -> IdRange:
    """Shift every owner under ``root`` into ``ids`` (default: the enclave range), as a root
    filesystem for a sandbox started by root must be (uid N inside is host uid ``ids.uid + N``);
    returns the range."""
    ids = ids or enclave_ids()
    for directory, dirs, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, name) for name in dirs + files)]:
            st = os.lstat(path)
            if not ids.uid <= st.st_uid < ids.uid + ids.count:
                os.lchown(path, ids.host_uid(st.st_uid), ids.host_gid(st.st_gid))
    return ids


def compile_static(source: str, output: str | os.PathLike, *flags: str) -> Path:
    """Compile C ``source`` into a static executable at ``output`` (extra gcc ``flags``), or
    skip the test."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc with a static libc is needed: apt-get install gcc libc6-dev")
    output = Path(output)
    with tempfile.TemporaryDirectory() as workdir:
        source_path = Path(workdir) / "tool.c"
        source_path.write_text(source)
        done = subprocess.run([gcc, "-static", "-O1", "-w", *flags, "-o", str(output), str(source_path)],
                              capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"static C compilation failed (apt-get install libc6-dev?): {done.stderr.strip()[:300]}")
    return output


def build_tool(directory: str | os.PathLike) -> Path:
    """The static multi-tool (see ``TOOL_SOURCE``) compiled into ``directory``."""
    return compile_static(TOOL_SOURCE, Path(directory) / TOOL_NAME)


def install_file(root: Path, source: Path, target: str, mode: int = 0o755) -> None:
    """Copy ``source`` to ``target`` (absolute, inside ``root``)."""
    destination = root / target.lstrip("/")
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, destination)
    os.chmod(destination, mode)


@dataclass
class Run:
    exit: SandboxExit
    stdout: str
    stderr: str


def run_in_sandbox(spec: SandboxSpec, timeout: float = 30) -> Run:
    """Start ``spec`` (its stdout/stderr replaced by temporary files), wait, return the output.
    Kills the sandbox and fails the test if it outlives ``timeout``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        spec.stdout, spec.stderr = out.fileno(), err.fileno()
        sandbox = start_sandbox(spec)
        result = sandbox.wait(timeout)
        if result is None:
            sandbox.kill()
            pytest.fail(f"sandbox still running after {timeout}s")
        out.seek(0)
        err.seek(0)
        return Run(result, out.read().decode(errors="replace"), err.read().decode(errors="replace"))
