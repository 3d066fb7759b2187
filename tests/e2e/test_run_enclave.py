"""``qtbuild run`` / ``qtbuild enclave``: real local enclaves built by ``qtbuild convert`` from a
static busybox image (an OCI layout written in-process, no daemon needed), as root.

The image holds busybox, the sandbox tests' multi-tool (``sbtool``: tcp, vsock, memhog, forks)
and ``qttool`` (below): an emulated-vsock client and a security-module client in C, since the
image has no Python.  Each test builds its own tiny ``/app.sh`` layer on a shared base layer.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest

from qtbuild.convert.pipeline import ConvertOptions, convert
from qtbuild.formats.cpio import CpioArchive, CpioEntry, iter_archive
from qtbuild.formats.eif import EifReader, SectionType
from qtbuild.formats.eif_writer import write_eif
from qtbuild.formats.measure import ZERO_PCR, extend
from qtbuild.inspect.describe import inspect_image
from qtbuild.runtime.enclave import Manager, RuntimeDir
from qtbuild.runtime.proxy import AllowEntry, InboundAllow, InboundRoute, Proxy, ProxyConfig, Route
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.verifier.attestation import verify_document
from qtbuild.signing_keys import Pcr0Signer

from helpers.certs import make_certificate, make_key, to_pem
from helpers.enclave_runtime import directory_layer, temporary_runtime
from helpers.imagefactory import default_config, write_oci_layout
from helpers.sandbox_helpers import build_busybox_root, build_tool, compile_static

pytestmark = pytest.mark.root  # local enclaves mount a tmpfs and create cgroups

QTTOOL_SOURCE = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int unix_connect(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof addr.sun_path - 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        printf("connect %s errno=%d\n", path, errno);
        exit(3);
    }
    return fd;
}

static void write_all(int fd, const unsigned char *data, size_t size) {
    while (size) {
        ssize_t n = write(fd, data, size);
        if (n <= 0) exit(4);
        data += n; size -= n;
    }
}

static size_t read_full(int fd, unsigned char *data, size_t size) {
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, data + got, size - got);
        if (n <= 0) break;
        got += n;
    }
    return got;
}

/* vsock CID PORT: emulated connect (unix socket + 12-byte source header "QTv1", own CID, own
   port), stdin to the peer, half-close, the reply to stdout. */
static int vsock_pipe(const char *cid, const char *port) {
    const char *root = getenv("QTBUILD_VSOCK_DIR"), *own = getenv("QTBUILD_VSOCK_CID");
    if (!root || !own) { printf("vsock env missing\n"); return 2; }
    char path[108];
    snprintf(path, sizeof path, "%s/%s/%s.sock", root, cid, port);
    int fd = unix_connect(path);
    unsigned char header[12] = {'Q', 'T', 'v', '1'};
    uint32_t own_cid = htonl((uint32_t)strtoul(own, 0, 10)), own_port = htonl(50000 + getpid() % 10000);
    memcpy(header + 4, &own_cid, 4);
    memcpy(header + 8, &own_port, 4);
    write_all(fd, header, sizeof header);
    unsigned char buffer[65536];
    ssize_t n;
    while ((n = read(0, buffer, sizeof buffer)) > 0) write_all(fd, buffer, n);
    shutdown(fd, SHUT_WR);
    while ((n = read(fd, buffer, sizeof buffer)) > 0) write_all(1, buffer, n);
    return 0;
}

/* qtsm DEVICE HEX: one length-framed CBOR request to the security module; the response in hex. */
static int qtsm(const char *device, const char *hex) {
    size_t size = strlen(hex) / 2;
    unsigned char *request = malloc(size + 4);
    uint32_t length = htonl(size);
    memcpy(request, &length, 4);
    for (size_t i = 0; i < size; i++) sscanf(hex + 2 * i, "%2hhx", &request[4 + i]);
    int fd = unix_connect(device);
    write_all(fd, request, size + 4);
    unsigned char header[4];
    if (read_full(fd, header, 4) != 4) { printf("qtsm no response\n"); return 5; }
    memcpy(&length, header, 4);
    size = ntohl(length);
    unsigned char *response = malloc(size);
    if (read_full(fd, response, size) != size) { printf("qtsm short response\n"); return 5; }
    for (size_t i = 0; i < size; i++) printf("%02x", response[i]);
    printf("\n");
    return 0;
}

/* serve PORT: listen on the enclave's emulated vsock PORT; answer each connection's HTTP request
   with "hello from the enclave <path>" (HTTP/1.0), forever. */
static int serve(const char *port) {
    const char *root = getenv("QTBUILD_VSOCK_DIR"), *own = getenv("QTBUILD_VSOCK_CID");
    if (!root || !own) { printf("vsock env missing\n"); return 2; }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s/%s.sock", root, own, port);
    unlink(addr.sun_path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 16) < 0) {
        printf("listen errno=%d\n", errno);
        return 3;
    }
    printf("serving\n");
    for (;;) {
        int c = accept(fd, 0, 0);
        if (c < 0) continue;
        unsigned char header[12];
        char request[4096] = {0}, target[256] = "/", body[512], response[1024];
        if (read_full(c, header, 12) != 12 || memcmp(header, "QTv1", 4)) { close(c); continue; }
        size_t got = 0;
        while (got < sizeof request - 1 && !strstr(request, "\r\n\r\n")) {
            ssize_t n = read(c, request + got, sizeof request - 1 - got);
            if (n <= 0) break;
            got += n;
        }
        sscanf(request, "GET %255s", target);
        int length = snprintf(body, sizeof body, "hello from the enclave %s", target);
        int size = snprintf(response, sizeof response,
                            "HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", length, body);
        write_all(c, (const unsigned char *)response, size);
        close(c);
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && !strcmp(argv[1], "serve")) return serve(argv[2]);
    if (argc == 4 && !strcmp(argv[1], "vsock")) return vsock_pipe(argv[2], argv[3]);
    if (argc == 4 && !strcmp(argv[1], "qtsm")) return qtsm(argv[2], argv[3]);
    fprintf(stderr, "usage: qttool vsock CID PORT | qtsm DEVICE HEX | serve PORT\n");
    return 64;
}
"""

DESCRIBE_PCR0 = cbor2.dumps({"DescribePCR": {"index": 0}}).hex()
NONCE = b"enclave-e2e-nonce"
ATTEST = cbor2.dumps({"Attestation": {"nonce": NONCE}}).hex()
SLEEPER = "exec sleep 120"


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime_dir():
    """A short-path runtime and state directory for the module (socket paths must fit sun_path)."""
    with temporary_runtime("qte") as runtime:
        yield runtime


@pytest.fixture(autouse=True)
def _stop_leftovers(runtime_dir):
    yield
    Manager().stop_all()


@pytest.fixture(scope="module")
def base_layer(tmp_path_factory) -> bytes:
    root = build_busybox_root(tmp_path_factory.mktemp("image") / "root")
    build_tool(root / "bin")
    compile_static(QTTOOL_SOURCE, root / "bin" / "qttool")
    return directory_layer(root)


@pytest.fixture(scope="module")
def make_eif(base_layer, tmp_path_factory):
    """``make_eif(name, script, signer=None)``: an EIF running ``/bin/sh /app.sh``."""
    workdir = tmp_path_factory.mktemp("eifs")

    def make(name: str, script: str, *, signer=None, blobs: str | None = None) -> str:
        app = tmp_path_factory.mktemp("app")
        (app / "app.sh").write_text(script + "\n")
        layout = workdir / f"{name}-layout"
        config = default_config(cmd=["/bin/sh", "/app.sh"], env=["PATH=/bin", "FOO=bar"])
        write_oci_layout(layout, [base_layer, directory_layer(app)], config, compression=None)
        output = workdir / f"{name}.eif"
        convert(f"oci:{layout}:latest", ConvertOptions(output=str(output), quiet=True, signer=signer, blobs=blobs))
        return str(output)

    return make


# -- helpers -------------------------------------------------------------------------------------

def qtbuild(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from qtbuild.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_attached(eif: str, *options: str) -> tuple[int, dict, str]:
    """``run --attach-console``: (exit status, the summary JSON, the console output)."""
    done = qtbuild("run", eif, "--attach-console", "--mem", "128", *options)
    summary, end = json.JSONDecoder().raw_decode(done.stdout)
    return done.returncode, summary, done.stdout[end:]


def start(eif: str, *options: str) -> dict:
    done = qtbuild("run", eif, "--mem", "128", *options)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def query(enclave_id: int) -> dict:
    return Manager().query(enclave_id)[0]


def wait_ended(enclave_id: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (entry := query(enclave_id))["Status"] == "Running":
        assert time.monotonic() < deadline, "the enclave did not stop"
        time.sleep(0.05)
    return entry


def image_pcrs(eif: str):
    with EifReader.open(eif) as reader:
        return inspect_image(reader).check.measurements


def private_record(runtime: RuntimeDir, enclave_id: int) -> dict:
    return json.loads(runtime.enclave(enclave_id).record.read_text())


def assert_released(runtime: RuntimeDir, record: dict) -> None:
    """Nothing of the enclave is left on the host."""
    assert not _alive(record["sandbox_pid"], record["sandbox_start"])
    for path in (record.get("cgroup") or {}).get("paths", {}).values():
        assert not os.path.exists(path)
    assert not (runtime.vsock_root / str(record["cid"])).exists()
    assert not (runtime.vsock_root / ".enclaves" / str(record["cid"])).exists()
    assert not runtime.enclave(record["enclave_id"]).path.exists()
    assert not (Path(record["pki_state_dir"]) / "pki" / "leaves" / f"{record['leaf_name']}.pem").exists()
    mount_points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    # only the parent's vsock directory (shared by all enclaves) stays mounted
    assert [point for point in mount_points if point.startswith(str(runtime.path))] == [str(runtime.parent_vsock)]


def _alive(pid: int, start_time: int) -> bool:
    """Whether the process that started at ``start_time`` still runs (a zombie does not: the
    sandbox's PID 1 may wait a moment for the host's init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[0] not in (b"Z", b"X") and int(fields[19]) == start_time


# -- running an application ----------------------------------------------------------------------

def test_app_prints_reads_env_and_exit_status_is_reported(make_eif, runtime_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(tmp_path / "fresh-state"))
    eif = make_eif("hello", 'echo "hello from the enclave"; echo "FOO=$FOO"; echo "CID=$QTBUILD_VSOCK_CID"; '
                            'echo "host=$(hostname)"; exit 7')
    done = qtbuild("run", eif, "--attach-console", "--mem", "128")
    assert done.returncode == 7, done.stderr
    summary, end = json.JSONDecoder().raw_decode(done.stdout)
    assert "created the local attestation PKI" in done.stderr
    assert list(summary) == ["EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB", "LaunchMode", "ProcessID",
                             "Status"]
    assert summary["Status"] == "Running" and summary["LaunchMode"] == "debug" and summary["EnclaveCID"] == 4
    output = done.stdout[end:]
    assert "hello from the enclave\nFOO=bar\nCID=4\nhost=enclave\n" in output

    listed = json.loads(qtbuild("enclave", "query").stdout)
    assert len(listed) == 1 and listed[0]["Status"] == "Stopped" and listed[0]["ExitCode"] == 7
    assert listed[0]["Measurements"]["PCR0"] == image_pcrs(eif).pcr0.hex()
    assert json.loads(qtbuild("enclave", "stop", "--enclave-id", str(summary["EnclaveID"])).stdout) == {
        "EnclaveID": summary["EnclaveID"], "Terminated": True}
    assert json.loads(qtbuild("enclave", "query").stdout) == []


def test_the_enclave_is_isolated_from_the_host(make_eif, runtime_dir, tmp_path):
    neighbour = start(make_eif("neighbour", SLEEPER))  # another enclave, running meanwhile
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    with socket.create_server(("127.0.0.1", 0)) as service:
        port = service.getsockname()[1]
        eif = make_eif("isolated", "\n".join([
            f"sbtool tcp 127.0.0.1 {port}",
            "sbtool vsock",
            f"cat {secret} || echo hostfile refused",
            f"ls {runtime_dir.path} || echo runtime dir invisible",
            "mount -t tmpfs none /mnt || echo mount refused",
            "echo processes $(ls /proc | grep -c '^[0-9]')",
            "echo vsock dirs $(ls /run/vsock)",
            "test -S /dev/qtsm && ! test -e /dev/nsm && echo devices present",  # the QingTian profile's
        ]))
        status, summary, output = run_attached(eif)
    assert status == 0
    assert "tcp errno=111" in output          # the host's listener is not reachable: own network namespace
    assert "vsock errno=1" in output          # socket(AF_VSOCK) denied by seccomp
    assert "hostfile refused" in output and "host only" not in output
    assert "runtime dir invisible" in output  # no path to the neighbour's security module or console
    assert "mount refused" in output
    processes = int(output.split("processes ")[1].split()[0])
    assert processes <= 5                     # init, sh, the command substitution's ls/grep
    assert f"vsock dirs 3 {summary['EnclaveCID']}\n" in output  # the parent's and its own, not the neighbour's
    assert neighbour["EnclaveCID"] != summary["EnclaveCID"]
    assert "devices present" in output


def test_fork_bomb_stops_at_the_pids_limit(make_eif, runtime_dir):
    status, _, output = run_attached(make_eif("forks", "exec sbtool forks 5000"))
    assert status == 0, output
    created = int(output.split("forks failed after ")[1].split()[0])
    assert 100 < created < 1024


def test_allocating_beyond_mem_is_killed_and_reported_oom(make_eif, runtime_dir):
    summary = start(make_eif("memhog", "exec sbtool memhog 400"))
    assert summary["LaunchMode"] == "normal"
    ended = wait_ended(summary["EnclaveID"])
    assert ended["Status"] == "OOM" and ended["Signal"] == signal.SIGKILL


# -- vsock, proxy, heartbeat ---------------------------------------------------------------------

class EchoServer:
    """A TCP echo server on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)

    def close(self) -> None:
        self.socket.close()


class ProxyThread:
    """``qtbuild.runtime.proxy`` on the parent's emulated vsock, in a thread with its own event loop."""

    def __init__(self, config: ProxyConfig, vsock_config: vsock.VsockConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxy = Proxy(config, vsock_config=vsock_config)
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.proxy.start())
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.shutdown(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def parent_config(runtime: RuntimeDir) -> vsock.VsockConfig:
    runtime.ensure()
    return vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, str(runtime.vsock_root))


def test_parent_services_only_through_vsock_proxy_and_allowlist(make_eif, runtime_dir):
    allowed, other = EchoServer(), EchoServer()
    parent = parent_config(runtime_dir)
    routes = (Route(8000, "127.0.0.1", allowed.port), Route(8001, "127.0.0.1", other.port))
    proxy = ProxyThread(ProxyConfig(routes, allowlist=(AllowEntry("127.0.0.1", allowed.port),)), parent)
    heartbeat = vsock.listen(vsock.HEARTBEAT_PORT, config=parent)
    said_hello: list[int] = []
    def listen() -> None:
        said_hello.append(vsock.heartbeat_listen(timeout=20, listener=heartbeat))

    listener = threading.Thread(target=listen)
    listener.start()
    try:
        status, summary, output = run_attached(make_eif("proxied", "\n".join([
            "echo ping-allowed | qttool vsock 3 8000; echo allowed done",
            "echo ping-denied | qttool vsock 3 8001; echo denied done",
            f"sbtool tcp 127.0.0.1 {allowed.port}",
        ])))
        listener.join(20)
    finally:
        heartbeat.close()
        proxy.close()
        allowed.close()
        other.close()
    assert status == 0
    assert "ping-allowed\nallowed done\n" in output
    assert "denied done" in output and "ping-denied" not in output
    assert "tcp errno=111" in output  # the same service, directly: unreachable
    assert said_hello == [summary["EnclaveCID"]]


def test_a_parent_client_reaches_a_server_inside_a_running_enclave(make_eif, runtime_dir):
    """Inbound: parent TCP listener (qtbuild proxy --inbound) → the enclave's vsock port → a
    server inside the running enclave; the inbound allowlist refuses an unlisted port."""
    summary = start(make_eif("inbound", "exec qttool serve 5005"))
    cid = summary["EnclaveCID"]
    port, denied_port = free_tcp_port(), free_tcp_port()
    config = ProxyConfig((), inbound=(InboundRoute(port, cid, 5005), InboundRoute(denied_port, cid, 5006)),
                         inbound_allowlist=(InboundAllow(cid, 5005),))
    proxy = ProxyThread(config, parent_config(runtime_dir))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/accounts", timeout=10) as response:
                    answer = response.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the enclave's server never answered"
                time.sleep(0.1)
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{denied_port}/", timeout=10)
    finally:
        proxy.close()
    assert answer == "hello from the enclave /accounts"
    assert query(summary["EnclaveID"])["Status"] == "Running"


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the security module -------------------------------------------------------------------------

def receive(listener: vsock.Listener) -> bytes:
    connection, _ = listener.accept(timeout=20)
    with connection:
        chunks = []
        while data := connection.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@pytest.mark.parametrize("cloud, device, instance_id", [
    ("nitro", "/dev/nsm", "i-0123456789abcdef0"),
    ("qingtian", "/dev/qtsm", "6c9c1a4e-0d3b-4c59-9f83-6f0b5d1b2a77"),
])
def test_security_module_answers_and_its_document_verifies(make_eif, runtime_dir, cloud, device, instance_id):
    key = make_key()
    signer = Pcr0Signer(key, to_pem(make_certificate(key)))
    eif = make_eif(f"attest-{cloud}", "\n".join([
        f"qttool qtsm {device} {DESCRIBE_PCR0} | qttool vsock 3 7000",
        f"qttool qtsm {device} {ATTEST} | qttool vsock 3 7000",
    ]), signer=signer)
    with vsock.listen(7000, config=parent_config(runtime_dir)) as listener:
        summary = start(eif, "--parent-role", "bank-role", "--instance-id", instance_id, "--cloud", cloud,
                        "--format", "qingtian")
        describe = cbor2.loads(bytes.fromhex(receive(listener).decode()))
        attestation = cbor2.loads(bytes.fromhex(receive(listener).decode()))
    assert summary["LaunchMode"] == "normal"
    pcrs = image_pcrs(eif)
    assert describe == {"DescribePCR": {"lock": True, "data": pcrs.pcr0}}
    pki = LocalPki.load(os.environ["QTBUILD_STATE_DIR"])
    image = {1: pcrs.pcr1, 2: pcrs.pcr2} if cloud == "nitro" else {1: ZERO_PCR, 2: ZERO_PCR}  # QingTian: zero
    verified = verify_document(attestation["Attestation"]["document"], roots=[pki.root_certificate], nonce=NONCE,
                               expect_pcrs={0: pcrs.pcr0, 8: pcrs.pcr8, **image,
                                            3: extend(b"bank-role"), 4: extend(instance_id.encode())})
    assert verified.encoding == cloud
    separator = "-enc" if cloud == "nitro" else ".enc-"
    assert verified.module_id.startswith(instance_id + separator)
    assert wait_ended(summary["EnclaveID"])["ExitCode"] == 0


def fake_blobs(directory: Path) -> Path:
    """A blob set shaped like nitro-cli's (bzImage, cmdline, init, nsm.ko): never executed here."""
    directory.mkdir(exist_ok=True)
    (directory / "bzImage").write_bytes(b"\0" * 0x202 + b"HdrS" + b"not a bootable kernel" * 64)
    (directory / "cmdline").write_text("reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on\n")
    (directory / "init").write_bytes(b"\x7fELF bootstrap init, never run locally")
    (directory / "nsm.ko").write_bytes(b"\x7fELF nsm module")
    return directory


def nitro_cli_layout(source_eif: str, output: Path) -> str:
    """The image nitro-cli would make of the same files: linuxkit-style customer ramdisk with
    rootfs/, cmd and env but no launch.json, after the blobs' bootstrap ramdisk."""
    with EifReader.open(source_eif) as reader:
        kernel = reader.read_section(reader.sections_of(SectionType.KERNEL)[0], max_size=1 << 20)
        cmdline = reader.read_section(reader.sections_of(SectionType.CMDLINE)[0], max_size=4096)
        bootstrap, customer = (reader.read_section(section, max_size=64 << 20) for section in reader.ramdisks)
    entries = []
    for member, data in iter_archive(io.BytesIO(customer)):
        if member.path == b"launch.json":
            continue
        content = data.read() if member.is_file else None
        entries.append(CpioEntry(member.path, member.mode, member.uid, member.gid, member.mtime,
                                 size=len(content) if content is not None else 0, data=content,
                                 link_target=member.link_target, rdev=member.rdev))
    assert {entry.path for entry in entries} >= {b"cmd", b"env", b"rootfs"}
    write_eif(output, kernel=kernel, cmdline=cmdline, ramdisks=[bootstrap, b"".join(CpioArchive(entries).chunks())],
              metadata=None, arch="x86_64")
    return str(output)


@pytest.mark.parametrize("cloud", ["nitro", "qingtian"])
def test_hardware_profile_images_run_and_attest_the_files_pcrs(make_eif, runtime_dir, tmp_path, cloud):
    """`convert --blobs` images and nitro-cli-layout images run; a document requested inside
    carries the file's measurements as `describe` prints them, per cloud."""
    if os.uname().machine != "x86_64":
        pytest.skip("the fake blob set is an x86_64 bzImage")
    device = "/dev/nsm" if cloud == "nitro" else "/dev/qtsm"
    script = f"qttool qtsm {device} {ATTEST} | qttool vsock 3 7000"
    ours = make_eif(f"hw-{cloud}", script, blobs=str(fake_blobs(tmp_path / "blobs")))
    theirs = nitro_cli_layout(ours, tmp_path / "nitro-cli.eif")
    for eif in (ours, theirs):
        described = json.loads(qtbuild("describe", eif).stdout)["Measurements"]
        with vsock.listen(7000, config=parent_config(runtime_dir)) as listener:
            done = qtbuild("run", eif, "--mem", "128", "--cloud", cloud, "--format", "qingtian")
            assert done.returncode == 0, done.stderr
            assert "hardware-profile image" in done.stderr
            attestation = cbor2.loads(bytes.fromhex(receive(listener).decode()))
        pki = LocalPki.load(os.environ["QTBUILD_STATE_DIR"])
        verified = verify_document(attestation["Attestation"]["document"], roots=[pki.root_certificate])
        reported = {index: verified.pcrs[index].hex() for index in (0, 1, 2)}
        if cloud == "nitro":
            assert reported == {index: described[f"PCR{index}"] for index in (0, 1, 2)}
        else:
            assert reported == {0: described["PCR0"], 1: ZERO_PCR.hex(), 2: ZERO_PCR.hex()}
        assert verified.pcrs[4] != ZERO_PCR and verified.encoding == cloud
        wait_ended(json.loads(done.stdout)["EnclaveID"])


def test_debug_mode_attests_zero_pcrs(make_eif, runtime_dir):
    status, _, output = run_attached(make_eif("attest-debug", f"qttool qtsm /dev/qtsm {ATTEST}"))
    assert status == 0, output
    response = cbor2.loads(bytes.fromhex(output.strip().splitlines()[-1]))
    pki = LocalPki.load(os.environ["QTBUILD_STATE_DIR"])
    verify_document(response["Attestation"]["document"], roots=[pki.root_certificate], allow_debug=True,
                    expect_pcrs={0: ZERO_PCR, 8: ZERO_PCR})


def test_nitro_cli_spellings_and_shapes(make_eif, runtime_dir, tmp_path):
    """--cloud nitro: nitro-cli's option names, run-enclave / describe-enclaves /
    terminate-enclave JSON, lookups by nitro EnclaveID and name, console --disconnect-timeout,
    run-enclave --config JSON, and nitro-cli's error codes."""
    eif = make_eif("nitro-shapes", "echo console-line; exec sleep 120")
    done = qtbuild("run", "--eif-path", eif, "--cloud", "nitro", "--memory", "128", "--cpu-ids", "0,1",
                   "--enclave-name", "bank", "--debug-mode", "--instance-id", "i-0761a4cbcc7632aef")
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert list(run) == ["EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs", "CPUIDs", "MemoryMiB"]
    assert run["EnclaveName"] == "bank" and run["CPUIDs"] == [0, 1] and run["NumberOfCPUs"] == 2
    assert run["EnclaveID"].startswith("i-0761a4cbcc7632aef-enc")
    described = json.loads(qtbuild("enclave", "query", "--enclave-id", run["EnclaveID"]).stdout)
    assert len(described) == 1 and described[0]["State"] == "RUNNING" and described[0]["Flags"] == "DEBUG_MODE"
    assert described[0]["Measurements"]["PCR0"] == image_pcrs(eif).pcr0.hex()
    qt_view = json.loads(qtbuild("enclave", "query", "--enclave-name", "bank", "--format", "qingtian").stdout)
    assert qt_view[0]["Cloud"] == "nitro" and isinstance(qt_view[0]["EnclaveID"], int)
    console = qtbuild("enclave", "console", "--enclave-name", "bank", "--disconnect-timeout", "1")
    assert console.returncode == 0 and "console-line" in console.stdout
    stopped = json.loads(qtbuild("enclave", "stop", "--enclave-id", run["EnclaveID"]).stdout)
    assert stopped == {"EnclaveName": "bank", "EnclaveID": run["EnclaveID"], "Terminated": True}
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"eif_path": eif, "cpu_count": 2, "memory_mib": 1, "enclave_name": "x"}))
    refused = qtbuild("run", "--config", str(config), "--cloud", "nitro")
    assert refused.returncode == 2 and refused.stderr.startswith("qtbuild: error: [E26] ")
    assert qtbuild("run", "--config", str(config)).stderr.startswith("qtbuild: error: [E10] ")
    clash = qtbuild("run", "--config", str(config), "--memory", "256")
    assert clash.returncode == 2 and "--config replaces" in clash.stderr


# -- refusals ------------------------------------------------------------------------------------

def test_an_expired_signing_certificate_is_refused(make_eif, runtime_dir):
    key = make_key()
    now = datetime.now(UTC)
    certificate = make_certificate(key, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    eif = make_eif("expired", "echo should not run", signer=Pcr0Signer(key, to_pem(certificate)))
    done = qtbuild("run", eif, "--mem", "128")
    assert done.returncode == 1
    assert "signing certificate has expired" in done.stderr and done.stderr.count("\n") == 1
    assert json.loads(qtbuild("enclave", "query").stdout) == []


@pytest.mark.parametrize("options, message", [
    (["--cid", "3"], "[E02] --cid 3"),
    (["--cid", "4294967295"], "[E02] --cid 4294967295"),
    (["--mem", "64"], "[E10] --mem 64 MiB is too small"),
    (["--cpus", "3"], "[E02] --cpus 3"),
    (["--cpus", "4096"], "[E02] --cpus 4096: only"),
    (["--cpu-ids", "0,4095"], "[E02] --cpu-ids: CPU 4095 is not available to this process"),
    (["--cpu-ids", "0,0"], "[E02] --cpu-ids: CPU 0 is given twice"),
])
def test_platform_rules_are_enforced(make_eif, runtime_dir, options, message):
    done = qtbuild("run", make_eif("rules", "echo hi"), *options)
    assert done.returncode == 2
    assert done.stderr == f"qtbuild: error: {message}" + done.stderr.split(message, 1)[1]
    assert done.stderr.count("\n") == 1


def test_cid_in_use_console_in_normal_mode_and_the_enclave_limit(make_eif, runtime_dir):
    eif = make_eif("sleeper", SLEEPER)
    first = start(eif, "--cid", "4")
    clash = qtbuild("run", eif, "--mem", "128", "--cid", "4")
    assert clash.returncode == 2 and "[E43] CID 4 is already used by enclave" in clash.stderr
    console = qtbuild("enclave", "console", "--enclave-id", str(first["EnclaveID"]))
    assert console.returncode == 2 and "[E32]" in console.stderr
    second = start(eif)
    assert second["EnclaveCID"] == 5
    third = qtbuild("run", eif, "--mem", "128")
    assert third.returncode == 2 and "at most 2 enclaves" in third.stderr
    stopped = json.loads(qtbuild("enclave", "stop", "--all").stdout)
    assert sorted(entry["EnclaveID"] for entry in stopped) == sorted([first["EnclaveID"], second["EnclaveID"]])


# -- lifecycle -----------------------------------------------------------------------------------

def test_console_follows_one_reader_and_stop_releases_everything(make_eif, runtime_dir):
    summary = start(make_eif("ticker", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"), "--debug-mode")
    enclave_id = str(summary["EnclaveID"])
    record = private_record(runtime_dir, summary["EnclaveID"])
    host_mounts = [line.split(" - ")[0].split()[4:6] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if str(runtime_dir.path) in line]
    # the memory is a private mount; the enclave's vsock directory is the one host-visible place it can write,
    # a nosuid,nodev,noexec tmpfs (as is the parent's, shared by all enclaves)
    assert sorted(point for point, _ in host_mounts) == [
        str(runtime_dir.parent_vsock), str(runtime_dir.vsock_root / str(summary["EnclaveCID"]))]
    assert all({"nosuid", "nodev", "noexec"} <= set(options.split(",")) for _, options in host_mounts)
    reader = subprocess.Popen([sys.executable, "-c", "from qtbuild.cli import main; main()", "enclave", "console",
                               "--enclave-id", enclave_id], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "tick 0\n"  # the buffered output comes first
        assert reader.stdout.readline() == "tick 1\n"
        busy = qtbuild("enclave", "console", "--enclave-id", enclave_id)
        assert busy.returncode == 2 and "one reader at a time" in busy.stderr
        assert json.loads(qtbuild("enclave", "stop", "--enclave-id", enclave_id).stdout)["Terminated"] is True
        reader.stdout.read()
        assert reader.wait(10) == 0  # the console ends with the enclave
    finally:
        reader.kill()
    assert_released(runtime_dir, record)


def test_ctrl_c_on_an_attached_console_detaches_and_says_how_to_stop_the_enclave(make_eif, runtime_dir):
    eif = make_eif("attached-ticker", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done")
    process = subprocess.Popen([sys.executable, "-c", "from qtbuild.cli import main; main()", "run", eif,
                                "--attach-console", "--mem", "128"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        head = ""
        while "tick 1\n" not in head:  # the summary, then the console
            line = process.stdout.readline()
            assert line, process.communicate(timeout=10)
            head += line
        process.send_signal(signal.SIGINT)
        _rest, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    summary, _end = json.JSONDecoder().raw_decode(head)
    enclave_id = summary["EnclaveID"]
    assert process.returncode == 130
    assert stderr == (f"qtbuild: interrupted\nqtbuild: detached from the console; enclave {enclave_id} keeps running "
                      f"(stop it with: qtbuild enclave stop --enclave-id {enclave_id})\n")
    assert query(enclave_id)["Status"] == "Running"  # the enclave did not go down with the console
    stopped = qtbuild("enclave", "stop", "--enclave-id", str(enclave_id))
    assert json.loads(stopped.stdout) == {"EnclaveID": enclave_id, "Terminated": True}


def test_a_crashed_supervisor_is_reported_and_stop_cleans_up(make_eif, runtime_dir):
    summary = start(make_eif("crash", SLEEPER))
    record = private_record(runtime_dir, summary["EnclaveID"])
    assert record["cgroup"] and record["sandbox_pid"]
    os.kill(summary["ProcessID"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while query(summary["EnclaveID"])["Status"] != "Crashed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _alive(record["sandbox_pid"], record["sandbox_start"])  # the application outlived it
    listed = json.loads(qtbuild("enclave", "query", "--enclave-id", str(summary["EnclaveID"])).stdout)
    assert listed[0]["Status"] == "Crashed"
    assert json.loads(qtbuild("enclave", "stop", "--enclave-id", str(summary["EnclaveID"])).stdout)["Terminated"]
    assert_released(runtime_dir, record)
