"""EIF → enclave memory: check the image and unpack its ramdisks, measuring the bytes loaded.

:func:`load_image` does what the hypervisor and the enclave's init do together:

1. open the EIF (structure: header, section table, layout — :class:`qtbuild.formats.eif.EifReader`);
2. tell the boot profile from the kernel section: qtbuild's local-runtime descriptor ("local"),
   or a Linux kernel ("hardware": built with ``convert --blobs``, nitro-cli or
   ``qt enclave make-img``).  A hardware image's kernel and bootstrap init do not execute here:
   the application is started the way that init would (chroot into ``rootfs/``, ``cmd``/``env``),
   and the PCRs are still those of the file as loaded, so they equal what the hardware reports.
   An image for another architecture is refused;
3. create the enclave memory (:func:`~qtbuild.runtime.enclave.resources.prepare_memory`: a tmpfs of
   ``memory_bytes`` as root, a directory rootless);
4. read every section **once**, in order: kernel, cmdline, metadata and signature are hashed,
   ramdisks are hashed *while* :func:`qtbuild.runtime.unpack.unpack_archive` extracts them into the
   memory (all ramdisks overlay one tree, as the kernel does) — so the PCRs describe exactly
   the bytes that were loaded, whatever happens to the file meanwhile;
5. compare the CRC, then verify the signature (if any) against PCR0 and refuse a certificate
   that is expired or not yet valid, as ``nitro-cli run-enclave`` does;
6. read the launch description (:mod:`qtbuild.runtime.enclave.launch_reader`) and check that ``rootfs`` is a
   real directory.

Contract: returns a :class:`LoadedImage`, or raises :class:`~qtbuild.runtime.enclave.errors.EnclaveError`
(``check_failed`` for CRC and signature failures) after releasing the memory.
"""

from __future__ import annotations

import errno
import io
import os
import platform
import stat
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from qtbuild.formats.crc32 import crc32_combine
from qtbuild.formats.eif import CRC_OFFSET, MAX_SIGNATURE_SIZE, EifReader, Section, SectionType
from qtbuild.formats.eif_stream import SectionStreamDigest
from qtbuild.formats.errors import FormatError, SignatureError
from qtbuild.formats.launch_record import Launch
from qtbuild.formats.local_abi import MAX_DESCRIPTOR, parse_local_kernel
from qtbuild.formats.measure import Measurements
from qtbuild.runtime.sandbox.subids import IdRange
from qtbuild.runtime.unpack import unpack_archive

from .errors import E_FILE, E_MEMORY, EnclaveError
from .launch_reader import read_launch
from .resources import prepare_memory, release_memory

if TYPE_CHECKING:
    from qtbuild.formats.eif_signature import SignatureInfo

__all__ = ["LoadedImage", "load_image"]

_READ_CHUNK = 1 << 20
LOCAL_BOOT, HARDWARE_BOOT = "local", "hardware"
HARDWARE_NOTE = ("hardware-profile image: its kernel and bootstrap init do not execute locally; the application "
                 "starts as the platform's init would start it, and the PCRs are the file's own")


@dataclass(frozen=True)
class LoadedImage:
    """An image in enclave memory: its PCRs, what to run, and where its root filesystem is."""

    measurements: Measurements
    launch: Launch
    rootfs: str
    ramdisk_bytes: int
    #: LOCAL_BOOT or HARDWARE_BOOT (see the module docstring).
    boot: str = LOCAL_BOOT


def load_image(eif_path: str, dest: Path, *, memory_bytes: int, use_tmpfs: bool, preserve_owner: bool,
               at: datetime | None = None, ids: IdRange | None = None) -> LoadedImage:
    """Load ``eif_path`` into ``dest`` (see the module docstring); ``at`` is when the signing
    certificate must be valid (default now); ``ids``: with ``preserve_owner``, the subordinate
    range the files' owners are shifted into (the enclave's ids as the host sees them)."""
    with _open(eif_path) as reader:
        boot = _boot_profile(reader)
        signature = _load_signature(reader)
        prepare_memory(dest, memory_bytes, use_tmpfs=use_tmpfs)
        try:
            measurements = _unpack_measured(reader, dest, signature, preserve_owner, ids)
            if signature is not None:
                _verify(signature, measurements, at)
            launch, rootfs = _launch(dest)
        except BaseException:
            release_memory(dest)
            raise
        ramdisk_bytes = sum(section.size for section in reader.ramdisks)
    return LoadedImage(measurements, launch, rootfs, ramdisk_bytes, boot)


def _open(eif_path: str) -> EifReader:
    try:
        return EifReader.open(eif_path)
    except OSError as exc:
        raise EnclaveError(f"cannot open the image {eif_path}: {exc.strerror or exc}", code=E_FILE) from None
    except FormatError as exc:
        raise EnclaveError(f"{eif_path} is not a valid EIF: {exc}") from None


def _boot_profile(reader: EifReader) -> str:
    """LOCAL_BOOT or HARDWARE_BOOT; EnclaveError for an image of another architecture."""
    if reader.arch != platform.machine():
        raise EnclaveError(f"the image is built for {reader.arch}, this machine is {platform.machine()}")
    kernel = reader.sections_of(SectionType.KERNEL)[0]
    descriptor = None
    if kernel.size <= MAX_DESCRIPTOR:
        descriptor = parse_local_kernel(reader.read_section(kernel, max_size=MAX_DESCRIPTOR))
    return LOCAL_BOOT if descriptor is not None else HARDWARE_BOOT


def _load_signature(reader: EifReader) -> SignatureInfo | None:
    section = reader.signature_section
    if section is None:
        return None
    # x509, COSE: imported only for a signed image (most local runs are not), off `run`'s start path
    from qtbuild.formats.eif_signature import load_signature

    try:
        return load_signature(reader.read_section(section, max_size=MAX_SIGNATURE_SIZE))
    except FormatError as exc:
        raise EnclaveError(f"the image's signature section is malformed: {exc}", check_failed=True) from None


def _unpack_measured(reader: EifReader, dest: Path, signature: SignatureInfo | None,
                     preserve_owner: bool, ids: IdRange | None) -> Measurements:
    """One pass over all sections (step 4); returns the PCRs, raises on a CRC mismatch."""
    certificate_der = None
    if signature is not None:
        from cryptography.hazmat.primitives import serialization  # loaded with the signature already

        certificate_der = signature.certificate.public_bytes(serialization.Encoding.DER)
    with SectionStreamDigest() as digest:
        for section in reader.sections:
            digest.begin_section(section.type.label, section.type, section.size, section.flags)
            if section.type == SectionType.RAMDISK:
                _unpack_section(reader, section, dest, digest.update, preserve_owner, ids)
            else:
                for chunk in reader.iter_section(section):
                    digest.update(chunk)
        header = os.pread(reader.fileobj.fileno(), CRC_OFFSET, 0)
        crc = crc32_combine(zlib.crc32(header), digest.crc, digest.length)
        if crc != reader.header.crc32:
            raise EnclaveError(f"CRC mismatch: the header says {reader.header.crc32:#010x}, the image's bytes give "
                               f"{crc:#010x}; the file is corrupt", check_failed=True)
        return digest.measurements(certificate_der)


def _unpack_section(reader: EifReader, section: Section, dest: Path, feed, preserve_owner: bool,
                    ids: IdRange | None) -> None:
    stream = io.BufferedReader(_Measured(reader.section_reader(section), feed), _READ_CHUNK)
    try:
        unpack_archive(stream, dest, archive_size=section.size, preserve_owner=preserve_owner, ids=ids)
    except FormatError as exc:
        if not reader.check_stream().crc_ok:
            raise EnclaveError("CRC mismatch: the file is corrupt", check_failed=True) from None
        raise EnclaveError(f"ramdisk section {section.index} cannot be unpacked: {exc}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise EnclaveError("the unpacked image does not fit in the enclave memory; give more --mem",
                               code=E_MEMORY) from None
        raise
    while stream.read(_READ_CHUNK):  # the section's bytes after the cpio trailer are measured too
        pass


class _Measured(io.RawIOBase):
    """Sequential, non-seekable view of a section that passes every byte read to ``feed``
    (as an immutable copy: the digest may still be hashing it when the next read comes)."""

    def __init__(self, source, feed) -> None:
        super().__init__()
        self._source, self._feed = source, feed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._source.readinto(buffer)
        if count:
            self._feed(bytes(memoryview(buffer)[:count]))
        return count


def _verify(signature: SignatureInfo, measurements: Measurements, at: datetime | None) -> None:
    from qtbuild.formats.eif_signature import verify_signature

    try:
        verify_signature(signature, measurements.pcr0, at=at)
    except SignatureError as exc:
        raise EnclaveError(f"signature check failed: {exc}", check_failed=True) from None


def _launch(dest: Path) -> tuple[Launch, str]:
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        launch = read_launch(root_fd)
        try:
            mode = os.stat("rootfs", dir_fd=root_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            mode = 0
    finally:
        os.close(root_fd)
    if not stat.S_ISDIR(mode):
        raise EnclaveError("the image's ramdisk has no rootfs/ directory (or it is not a real directory)")
    return launch, os.fspath(dest / "rootfs")
