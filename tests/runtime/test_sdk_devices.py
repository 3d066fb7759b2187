"""The SDK finds the security module the way it must on hardware: QingTian's character device
/dev/qtsm (through libqtsm when it loads, else the driver's ioctl), then Nitro's /dev/nsm, then the
local emulation's socket — each driven through the same code path as on hardware (an injected
ioctl answering from a real local device; a compiled stand-in libqtsm.so)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.formats.attestation import read_document
from qtbuild.formats.measure import Measurements
from qtbuild.runtime.qtsm.clouds import QINGTIAN_PROFILE
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.server import serve_device
from qtbuild.runtime.sdk import Qtsm, QtsmError
from qtbuild.runtime.sdk import qtsm as qtsm_module
from qtbuild.runtime.sdk.libqtsm import DescribeQtsm, LibQtsmTransport, load
from qtbuild.runtime.sdk.qtsm import NitroTransport, QingTianTransport, SocketTransport

IMAGE = Measurements(pcr0=b"\x10" * 48, pcr1=b"\x11" * 48, pcr2=b"\x12" * 48)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating a character device needs root")


@pytest.fixture(scope="module")
def device() -> SecurityModule:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdk device test")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1)).sign(key, hashes.SHA384()))
    bundle = [cert.public_bytes(serialization.Encoding.DER)]
    parent = QINGTIAN_PROFILE.parent_id(None, b"test")
    return SecurityModule(QINGTIAN_PROFILE.boot_pcrs(IMAGE, parent_id=parent), debug=False,
                          signer=lambda: (key, cert, bundle), module_id=QINGTIAN_PROFILE.module_id("e", parent))


@pytest.fixture
def paths(monkeypatch):
    directory = Path(tempfile.mkdtemp(prefix="dev", dir="/tmp"))
    qtsm_path, nsm_path = directory / "qtsm", directory / "nsm"
    monkeypatch.setattr(qtsm_module, "DEFAULT_PATHS", (str(qtsm_path), str(nsm_path)))
    yield qtsm_path, nsm_path
    shutil.rmtree(directory, ignore_errors=True)


def character_device(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers: opening it is harmless


class Driver:
    """The driver's side of the ioctl: reads the message as raw memory, answers from ``device``."""

    def __init__(self, device: SecurityModule) -> None:
        self.device, self.calls = device, []

    def __call__(self, fd, request_code, message, mutate) -> int:
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), request_code))
        request_at, request_len, response_at, response_cap = struct.unpack("=QQQQ", bytes(message))
        answer = self.device.handle(ctypes.string_at(request_at, request_len))
        assert len(answer) <= response_cap
        ctypes.memmove(response_at, answer, len(answer))
        ctypes.memmove(ctypes.addressof(message) + 24, struct.pack("=Q", len(answer)), 8)
        return 0


def no_library():
    return None


@needs_root
def test_qingtian_character_device_comes_first(paths, device):
    qtsm_path, nsm_path = paths
    character_device(qtsm_path)
    character_device(nsm_path)
    driver = Driver(device)
    with Qtsm(ioctl=driver, load_library=no_library) as client:
        assert isinstance(client.transport, QingTianTransport)
        assert client.transport.response_size == 0x6000
        assert client.describe_pcr(0) == (True, IMAGE.pcr0)
        message, doc = read_document(client.attestation(nonce=b"n" * 32))
        assert doc.nonce == b"n" * 32 and doc.user_data == b""
    assert {call for call in driver.calls} == {(str(qtsm_path), qtsm_module.QTSM_IOCTL_REQUEST)}


@needs_root
def test_nitro_character_device_is_second(paths, device):
    qtsm_path, nsm_path = paths
    character_device(nsm_path)
    driver = Driver(device)
    with Qtsm(ioctl=driver, load_library=no_library) as client:
        assert isinstance(client.transport, NitroTransport) and client.get_random()
    assert driver.calls == [(str(nsm_path), qtsm_module.NSM_IOCTL_REQUEST)]


@needs_root
def test_hardware_devices_win_over_local_sockets(paths, device):
    qtsm_path, nsm_path = paths
    character_device(nsm_path)
    # an emulation socket at /dev/qtsm, a Nitro device at /dev/nsm
    with serve_device(device, qtsm_path), Qtsm(ioctl=Driver(device), load_library=no_library) as client:
        assert isinstance(client.transport, NitroTransport)


def test_local_emulation_is_last(paths, device):
    qtsm_path, _ = paths
    with serve_device(device, qtsm_path), Qtsm(load_library=no_library) as client:
        assert isinstance(client.transport, SocketTransport) and client.describe_pcr(1)[0]


def test_nothing_found_names_every_place(paths):
    qtsm_path, nsm_path = paths
    nsm_path.write_bytes(b"")
    with pytest.raises(FileNotFoundError) as caught:
        Qtsm(load_library=no_library)
    message = str(caught.value)
    assert "/dev/qtsm" in message and "/dev/nsm" in message and "local emulation" in message
    assert f"{qtsm_path}: absent" in message and f"{nsm_path}: another kind of file" in message


# --------------------------------------------------------------------------- libqtsm through ctypes

FAKE_LIBQTSM = r"""
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
struct describe_qtsm { uint16_t version_major, version_minor, version_patch; uint32_t module_id_len;
    char module_id[128]; uint16_t max_pcrs; uint32_t locked_pcrs_num; uint16_t locked_pcrs[32]; int digest; };
static int exited = 0;
int qtsm_lib_init(void) { return 42; }
void qtsm_lib_exit(int fd) { exited = fd; }
int qtsm_exited(void) { return exited; }
int qtsm_describe_pcr(int fd, uint16_t index, bool *locked, uint8_t *data, uint32_t *len) {
    if (fd != 42) return 8; if (index >= 32) return 1;
    *locked = index < 16; memset(data, index, 48); *len = 48; return 0; }
int qtsm_extend_pcr(int fd, uint16_t index, const uint8_t *in, uint32_t in_len, uint8_t *out, uint32_t *len) {
    if (index < 16) return 4; memset(out, 0, 48); memcpy(out, in, in_len < 48 ? in_len : 48); *len = 48; return 0; }
int qtsm_lock_pcr(int fd, uint16_t index, bool *locked) { *locked = true; return index < 16 ? 4 : 0; }
int qtsm_lock_pcrs(int fd, uint32_t count, const uint16_t *range, bool *locked) {
    for (uint32_t i = 0; i < count; i++) if (range[i] >= 32) return 1; *locked = true; return 0; }
int qtsm_get_describe(int fd, struct describe_qtsm *d) {
    memset(d, 0, sizeof *d); d->version_major = 1; d->version_patch = 3; d->module_id_len = 4;
    memcpy(d->module_id, "m-id", 4); d->max_pcrs = 32; d->locked_pcrs_num = 2; d->locked_pcrs[0] = 0;
    d->locked_pcrs[1] = 5; d->digest = 1; return 0; }
int qtsm_get_attestation(int fd, const uint8_t *ud, uint32_t ud_len, const uint8_t *nonce, uint32_t nonce_len,
                         const uint8_t *pk, uint32_t pk_len, uint8_t *doc, uint32_t *doc_len) {
    if (ud_len > 512 || nonce_len > 512) return 7;
    uint32_t n = 0; doc[n++] = ud ? 'U' : '-'; memcpy(doc + n, ud, ud_len); n += ud_len;
    doc[n++] = nonce ? 'N' : '-'; memcpy(doc + n, nonce, nonce_len); n += nonce_len;
    doc[n++] = pk ? 'K' : '-'; memcpy(doc + n, pk, pk_len); n += pk_len; *doc_len = n; return 0; }
"""


@pytest.fixture(scope="module")
def fake_library(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the stand-in libqtsm.so")
    directory = tmp_path_factory.mktemp("libqtsm")
    (directory / "fake.c").write_text(FAKE_LIBQTSM)
    subprocess.run([gcc, "-shared", "-fPIC", "-O1", "-w", "-o", str(directory / "libqtsm.so"),
                    str(directory / "fake.c")], check=True)
    return str(directory / "libqtsm.so")


def test_describe_struct_layout_follows_the_header():
    assert DescribeQtsm.module_id.offset == 12 and DescribeQtsm.max_pcrs.offset == 140
    assert DescribeQtsm.locked_pcrs_num.offset == 144 and ctypes.sizeof(DescribeQtsm) == 216


@needs_root
def test_libqtsm_is_used_when_it_loads(paths, fake_library, monkeypatch):
    qtsm_path, _ = paths
    character_device(qtsm_path)
    monkeypatch.setenv("QTBUILD_LIBQTSM", fake_library)
    client = Qtsm(ioctl=lambda *args: pytest.fail("the driver must not be called directly"))
    assert isinstance(client.transport, LibQtsmTransport)
    assert client.describe_pcr(3) == (True, b"\x03" * 48)
    assert client.extend_pcr(20, b"abc") == b"abc" + bytes(45)
    assert client.attestation(user_data=b"u", public_key=b"k") == b"Uu-Kk"
    described = client.describe()
    assert (described["module_id"], described["locked_pcrs"], described["digest"]) == ("m-id", [0, 5], "SHA384")
    client.lock_pcrs(range(20))
    for call, variant in ((lambda: client.lock_pcr(3), "ReadOnlyIndex"),
                          (lambda: client.describe_pcr(40), "InvalidIndex"),
                          (lambda: client.attestation(nonce=b"n" * 513), "InputTooLarge"),
                          (client.get_random, "InvalidOperation")):
        with pytest.raises(QtsmError) as caught:
            call()
        assert caught.value.variant == variant
    library = load(fake_library)
    client.close()
    assert library.qtsm_exited() == 42


# --------------------------------------------------------------------------- under bookworm's versions

DETECTION_SCRIPT = r"""
import ctypes, importlib.metadata, json, struct, sys
import cbor2
from qtbuild_sdk import Qtsm
from qtbuild_sdk import qtsm as module

module.DEFAULT_PATHS = (sys.argv[1], sys.argv[2])
answer = cbor2.dumps({"GetRandom": {"random": b"r" * 256}})
seen = []

def ioctl(fd, code, message, mutate):
    seen.append(code)
    _, _, response_at, capacity = struct.unpack("=QQQQ", bytes(message))
    ctypes.memmove(response_at, answer, len(answer))
    ctypes.memmove(ctypes.addressof(message) + 24, struct.pack("=Q", len(answer)), 8)
    return 0

with Qtsm(ioctl=ioctl, load_library=lambda: None) as client:
    kind, data = type(client.transport).__name__, client.get_random()
print(json.dumps({"transport": kind, "random": len(data), "codes": seen,
                  "versions": [importlib.metadata.version(n) for n in ("cryptography", "cbor2")]}))
"""


@needs_root
def test_detection_under_bookworm_versions(paths, tmp_path):
    """The exported SDK on cryptography 38 / cbor2 5.4 picks QingTian's character device and
    drives it through the ioctl code path."""
    from click.testing import CliRunner

    from qtbuild.cli.sdk import command

    compat = Path(__file__).resolve().parents[2] / ".venv-bookworm" / "bin" / "python"
    if not compat.exists():
        pytest.skip("no .venv-bookworm (bash scripts/install.sh creates it)")
    assert CliRunner().invoke(command, ["export", str(tmp_path / "out")]).exit_code == 0
    qtsm_path, nsm_path = paths
    character_device(qtsm_path)
    character_device(nsm_path)
    done = subprocess.run([str(compat), "-c", DETECTION_SCRIPT, str(qtsm_path), str(nsm_path)], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(tmp_path / "out")}, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["transport"] == "QingTianTransport" and report["random"] == 256
    assert report["codes"] == [qtsm_module.QTSM_IOCTL_REQUEST]
    assert report["versions"][0].startswith("38.") and report["versions"][1].startswith("5.4.")
