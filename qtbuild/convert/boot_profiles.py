"""Boot profiles: the kernel, cmdline and bootstrap ramdisk placed before the customer ramdisk.

``local`` (the default) targets qtbuild's own runtime (``qtbuild run``).  Its kernel section is
not a Linux kernel but a small descriptor of the local runtime ABI (:mod:`qtbuild.formats.local_abi`), and
its bootstrap ramdisk holds only ``dev/`` and an ``init`` stub: the runtime performs init's
job itself (read cmd/env/launch.json, pivot into rootfs, exec).  Such an image boots only under
``qtbuild run``; ``describe`` says so.

A *blobs* profile (``--blobs DIR``) builds a hardware-bootable image from a real blob set in
nitro-cli's layout: ``bzImage`` (x86_64) or ``Image`` (aarch64), ``cmdline``, ``init`` and the
security-module driver(s) ``*.ko`` (``nsm.ko`` on Nitro; a QingTian bootstrap directory has the
same shape).  Bootstrap ramdisk = ``dev/`` (0755), ``init`` (0755), drivers (0644), root-owned,
mtime 0.  The kernel's architecture is read from its header and must match the image's.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioArchive, CpioEntry
from qtbuild.formats.eif import arch_from_flags, flags_for_arch
from qtbuild.formats.eif_writer import FileSource, SectionSource
from qtbuild.formats.local_abi import LOCAL_ABI, make_local_kernel

NITRO_CMDLINES = {
    "x86_64": "reboot=k panic=30 pci=off nomodules console=ttyS0 "
              "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd random.trust_cpu=on",
    "aarch64": "reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on root=/dev/ram0",
}
LOCAL_INIT = (b"#!/bin/false\n"
              b"# qtbuild local profile: the qtbuild runtime performs init's job; see `qtbuild describe`.\n")
KERNEL_NAMES = {"x86_64": "bzImage", "aarch64": "Image"}
MAX_BLOB_TEXT = 64 * 1024


@dataclass
class BootProfile:
    """What precedes the customer ramdisk in an EIF."""

    name: str
    arch: str
    kernel: bytes | SectionSource
    cmdline: str
    bootstrap: CpioArchive
    kernel_version: str


def normalise_arch(arch: str) -> str:
    """x86_64/amd64 → x86_64, aarch64/arm64 → aarch64 (ImageError otherwise)."""
    try:
        return arch_from_flags(flags_for_arch(arch))
    except ValueError as exc:
        raise ImageError(str(exc)) from None


def local_profile(arch: str) -> BootProfile:
    """The built-in profile for ``qtbuild run``."""
    arch = normalise_arch(arch)
    bootstrap = CpioArchive([
        CpioEntry(b"dev", stat.S_IFDIR | 0o755),
        CpioEntry(b"init", stat.S_IFREG | 0o755, size=len(LOCAL_INIT), data=LOCAL_INIT),
    ])
    cmdline = f"{NITRO_CMDLINES[arch]} qtbuild.abi={LOCAL_ABI}"
    return BootProfile("local", arch, make_local_kernel(arch), cmdline, bootstrap, LOCAL_ABI)


def kernel_arch(header: bytes) -> str | None:
    """Architecture of a kernel image from its first bytes: bzImage has "HdrS" at 0x202, an arm64
    Image has "ARM\\x64" at offset 56.  None when neither."""
    if len(header) >= 0x206 and header[0x202:0x206] == b"HdrS":
        return "x86_64"
    if len(header) >= 60 and header[56:60] == b"ARM\x64":
        return "aarch64"
    return None


def blobs_profile(directory: str | os.PathLike, arch: str) -> BootProfile:
    """A hardware-bootable profile from a nitro-cli style blob directory."""
    arch = normalise_arch(arch)
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ImageError(f"--blobs {directory}: not a directory")
    kernel_path = _find_kernel(directory, arch)
    with open(kernel_path, "rb") as handle:
        detected = kernel_arch(handle.read(0x206))
    if detected is not None and detected != arch:
        raise ImageError(f"--blobs {directory}: the kernel {os.path.basename(kernel_path)} is {detected} "
                         f"but the image is {arch}; use blobs for {arch}")
    cmdline = _read_text(directory, "cmdline") or NITRO_CMDLINES[arch]
    init_path = os.path.join(directory, "init")
    if not os.path.isfile(init_path):
        raise ImageError(f"--blobs {directory}: no 'init' program (the enclave's init binary is required)")
    entries = [CpioEntry(b"dev", stat.S_IFDIR | 0o755), _blob_entry(init_path, b"init", 0o755)]
    for name in sorted(os.listdir(directory)):
        if name.endswith(".ko"):
            entries.append(_blob_entry(os.path.join(directory, name), name.encode(), 0o644))
    version = _read_text(directory, "kernel.version") or os.path.basename(kernel_path)
    return BootProfile("blobs", arch, FileSource.from_path(kernel_path), cmdline, CpioArchive(entries), version)


def _find_kernel(directory: str, arch: str) -> str:
    path = os.path.join(directory, KERNEL_NAMES[arch])
    if os.path.isfile(path):
        return path
    other = KERNEL_NAMES["aarch64" if arch == "x86_64" else "x86_64"]
    if os.path.isfile(os.path.join(directory, other)):
        raise ImageError(f"--blobs {directory}: has {other} (the other architecture) but the image is {arch}; "
                         f"it needs {KERNEL_NAMES[arch]}")
    raise ImageError(f"--blobs {directory}: no kernel {KERNEL_NAMES[arch]} for {arch}")


def _blob_entry(path: str, name: bytes, mode: int) -> CpioEntry:
    size = os.stat(path).st_size
    return CpioEntry(name, stat.S_IFREG | mode, size=size, data=lambda: open(path, "rb"))


def _read_text(directory: str, name: str) -> str | None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return handle.read(MAX_BLOB_TEXT).decode("utf-8", "replace").strip() or None


def load_profile(blobs: str | os.PathLike | None, arch: str) -> BootProfile:
    """``--blobs DIR`` if given, else the built-in local profile."""
    return blobs_profile(blobs, arch) if blobs else local_profile(arch)
