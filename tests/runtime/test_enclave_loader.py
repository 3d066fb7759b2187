"""EIF → enclave memory: checks, PCRs of the loaded bytes, safe unpack, launch description.

Rootless-style loading (a plain directory, no tmpfs, owners not applied), so no root needed;
the tmpfs path is covered by tests/e2e/test_run_enclave.py.
"""

from __future__ import annotations

import json
import os
import platform
import stat
from datetime import UTC, datetime, timedelta

import pytest

from qtbuild.formats.cpio import CpioArchive, CpioEntry
from qtbuild.formats.eif import EifReader
from qtbuild.formats.eif_writer import write_eif
from qtbuild.formats.launch_record import DEFAULT_PATH
from qtbuild.formats.local_abi import make_local_kernel
from qtbuild.runtime.enclave.errors import EnclaveError
from qtbuild.runtime.enclave.loader import HARDWARE_BOOT, LOCAL_BOOT, load_image
from qtbuild.signing_keys import Pcr0Signer

from helpers.certs import make_certificate, make_key, to_pem
from helpers.eif_inputs import newc

ARCH = platform.machine()
LAUNCH = {"argv": ["/bin/app", "--flag"], "env": ["PATH=/bin", "A=1"], "cwd": "/srv", "uid": 1000, "gid": 1000,
          "groups": [10], "user": "app"}


def directory(path: bytes, mode: int = 0o755) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | mode)


def regular(path: bytes, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | mode, size=len(data), data=data)


def archive(entries: list[CpioEntry]) -> bytes:
    return b"".join(CpioArchive(entries).chunks())


def customer(launch: dict | None = LAUNCH, extra: tuple[CpioEntry, ...] = ()) -> bytes:
    entries = [directory(b"rootfs"), directory(b"rootfs/bin"), regular(b"rootfs/bin/app", b"#!app", 0o4755),
               regular(b"cmd", b"/bin/app\n--cmd\n"), regular(b"env", b"B=2\n"), *extra]
    if launch is not None:
        entries.append(regular(b"launch.json", json.dumps(launch).encode()))
    return archive(entries)


def bootstrap() -> bytes:
    return archive([directory(b"dev"), regular(b"init", b"#!/bin/false\n", 0o755)])


def write(tmp_path, *, kernel: bytes | None = None, ramdisk: bytes | None = None, signer=None) -> str:
    path = tmp_path / "image.eif"
    write_eif(path, kernel=kernel or make_local_kernel(ARCH), cmdline="console=ttyS0",
              ramdisks=[bootstrap(), ramdisk if ramdisk is not None else customer()], metadata=None, arch=ARCH,
              signer=signer)
    return str(path)


def load(eif: str, dest, **options):
    return load_image(eif, dest, memory_bytes=256 << 20, use_tmpfs=False, preserve_owner=False, **options)


def test_load_measures_the_loaded_bytes_and_reads_launch_json(tmp_path):
    eif = write(tmp_path)
    dest = tmp_path / "memory"
    image = load(eif, dest)
    with EifReader.open(eif) as reader:
        assert image.measurements == reader.check_stream().measurements
        assert image.ramdisk_bytes == sum(section.size for section in reader.ramdisks)
    assert image.launch.argv == ["/bin/app", "--flag"] and image.launch.cwd == "/srv"
    assert (image.launch.uid, image.launch.gid, image.launch.groups) == (1000, 1000, [10])
    assert image.launch.version == 1  # a launch.json without a version field: the first layout
    assert image.rootfs == str(dest / "rootfs")
    assert (dest / "init").exists() and (dest / "dev").is_dir()  # every ramdisk overlays one tree
    assert not os.stat(dest / "rootfs" / "bin" / "app").st_mode & stat.S_ISUID


def test_cmd_and_env_are_the_fallback(tmp_path):
    image = load(write(tmp_path, ramdisk=customer(launch=None)), tmp_path / "memory")
    assert image.launch.argv == ["/bin/app", "--cmd"]
    assert image.launch.env == [f"PATH={DEFAULT_PATH}", "B=2"] and image.launch.cwd == "/" and image.launch.uid == 0


def test_a_signed_image_gets_pcr8(tmp_path):
    key = make_key()
    image = load(write(tmp_path, signer=Pcr0Signer(key, to_pem(make_certificate(key)))), tmp_path / "memory")
    assert image.measurements.pcr8 is not None


def test_an_expired_certificate_is_refused_and_memory_released(tmp_path):
    key = make_key()
    now = datetime.now(UTC)
    certificate = make_certificate(key, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
    eif = write(tmp_path, signer=Pcr0Signer(key, to_pem(certificate)))
    with pytest.raises(EnclaveError, match="signing certificate has expired") as caught:
        load(eif, tmp_path / "memory")
    assert caught.value.check_failed
    assert not (tmp_path / "memory").exists()
    load(eif, tmp_path / "memory", at=now - timedelta(days=5))  # valid then


def test_a_hardware_profile_image_loads_with_the_files_own_pcrs(tmp_path):
    """A nitro-cli-style image (real kernel, bootstrap ramdisk, linuxkit customer ramdisk with
    rootfs/, cmd, env and no launch.json) loads: its PCRs are the file's, its launch cmd/env."""
    eif = write(tmp_path, kernel=b"\0" * 0x202 + b"HdrS" + b"bzImage" * 100, ramdisk=customer(launch=None))
    image = load(eif, tmp_path / "memory")
    with EifReader.open(eif) as reader:
        assert image.measurements == reader.check_stream().measurements
    assert image.boot == HARDWARE_BOOT and image.launch.argv == ["/bin/app", "--cmd"]
    assert load(write(tmp_path), tmp_path / "memory2").boot == LOCAL_BOOT


def test_a_corrupt_image_fails_the_crc(tmp_path):
    eif = write(tmp_path)
    with open(eif, "r+b") as handle:
        data = handle.read()
        handle.seek(data.index(b"#!app"))
        handle.write(b"$")
    with pytest.raises(EnclaveError, match="CRC mismatch") as caught:
        load(eif, tmp_path / "memory")
    assert caught.value.check_failed and not (tmp_path / "memory").exists()


def test_a_hostile_ramdisk_is_refused_without_escaping(tmp_path):
    hostile = newc([(b"rootfs", stat.S_IFDIR | 0o755, b""), (b"rootfs/../../escape", stat.S_IFREG | 0o644, b"x")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(EnclaveError, match="ramdisk section"):
        load(write(tmp_path, ramdisk=hostile), tmp_path / "sub" / "memory")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "sub" / "memory").exists()


def test_rootfs_must_be_a_real_directory(tmp_path):
    ramdisk = archive([CpioEntry(b"rootfs", stat.S_IFLNK | 0o777, link_target=b"/"), regular(b"cmd", b"/bin/sh\n")])
    with pytest.raises(EnclaveError, match="no rootfs/ directory"):
        load(write(tmp_path, ramdisk=ramdisk), tmp_path / "memory")


@pytest.mark.parametrize("launch, message", [
    ({**LAUNCH, "argv": []}, "empty argv"),
    ({**LAUNCH, "uid": "0"}, "'uid' must be int"),
    ({**LAUNCH, "env": [1]}, "'env' must be a list of str"),
    ({**LAUNCH, "groups": [True]}, "'groups' must be a list of int"),
    ({**LAUNCH, "version": 99}, "layout version 99; this qtbuild reads versions 1..2"),
    ({**LAUNCH, "version": "2"}, "'version' must be int"),
])
def test_a_malformed_launch_json_is_refused(tmp_path, launch, message):
    with pytest.raises(EnclaveError, match=message):
        load(write(tmp_path, ramdisk=customer(launch=launch)), tmp_path / "memory")


def test_a_symlinked_launch_file_is_not_followed(tmp_path):
    ramdisk = archive([directory(b"rootfs"), CpioEntry(b"cmd", stat.S_IFLNK | 0o777, link_target=b"/etc/hostname")])
    with pytest.raises(EnclaveError, match="cmd cannot be read"):
        load(write(tmp_path, ramdisk=ramdisk), tmp_path / "memory")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(EnclaveError, match=r"^\[E03\] cannot open the image"):
        load(str(tmp_path / "missing.eif"), tmp_path / "memory")
    (tmp_path / "junk.eif").write_bytes(b"not an eif" * 100)
    with pytest.raises(EnclaveError, match="is not a valid EIF"):
        load(str(tmp_path / "junk.eif"), tmp_path / "memory")
