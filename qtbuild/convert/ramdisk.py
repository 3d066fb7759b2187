"""The customer ramdisk: the flattened image under ``rootfs/`` plus what the init reads.

Archive layout (nitro-cli's convention, see docs/format.md, "Ramdisk conventions")::

    cmd, env, launch.json   the launch record (:mod:`qtbuild.formats.launch_record`): nitro's init reads cmd
                            and env, ``qtbuild run`` reads launch.json
    rootfs/        the image filesystem
    rootfs/{dev,proc,run,sys,tmp,var}   mount points, added when the image lacks them

Synthesised entries are root-owned with mtime 0.  Everything is deterministic: the cpio writer
sorts by path and numbers inodes in that order.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterable

from qtbuild.formats.cpio import CpioArchive, CpioEntry
from qtbuild.formats.launch_record import Launch

ROOTFS = b"rootfs"
#: Mount points the init expects, with the modes a Linux root uses for them.
MOUNT_POINTS = {b"dev": 0o755, b"proc": 0o555, b"run": 0o755, b"sys": 0o555, b"tmp": 0o1777, b"var": 0o755}


def _file(path: bytes, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | mode, size=len(data), data=data)


def _dir(path: bytes, mode: int = 0o755) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | mode)


def launch_files(launch: Launch) -> list[CpioEntry]:
    """The ``cmd``, ``env`` and ``launch.json`` files at the archive root."""
    return [_file(b"cmd", launch.cmd_file()), _file(b"env", launch.env_file()), _file(b"launch.json", launch.to_json())]


def customer_entries(image_entries: Iterable[CpioEntry], launch: Launch) -> list[CpioEntry]:
    """Prefix the image's entries with ``rootfs/`` and add mount points and launch files."""
    entries = [_dir(ROOTFS)]
    present = set()
    for entry in image_entries:
        present.add(entry.path)
        entries.append(dataclasses.replace(entry, path=ROOTFS + b"/" + entry.path))
    for name, mode in MOUNT_POINTS.items():
        if name not in present:
            entries.append(_dir(ROOTFS + b"/" + name, mode))
    return entries + launch_files(launch)


def customer_ramdisk(image_entries: Iterable[CpioEntry], launch: Launch) -> CpioArchive:
    """The customer ramdisk as a streamable archive of known size."""
    return CpioArchive(customer_entries(image_entries, launch))
