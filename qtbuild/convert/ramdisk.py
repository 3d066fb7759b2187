"""The customer ramdisk: the flattened image under ``rootfs/`` plus what the init reads.

Archive layout (nitro-cli's convention, see docs/format.md, "Ramdisk conventions")::

    cmd, env, launch.json   the launch record (:mod:`qtbuild.formats.launch_record`): nitro's init reads cmd
                            and env, ``qtbuild run`` reads launch.json
    rootfs/        the image filesystem
    rootfs/{dev,proc,run,sys,tmp,var}   mount points, added when the image lacks them

Synthesised entries are root-owned with mtime 0.  Everything is deterministic: entries are
written in bytewise path order and inodes numbered in that order.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from qtbuild.formats.cpio import HEADER_SIZE, CpioArchive, CpioEntry, CpioStream
from qtbuild.formats.launch_record import Launch

if TYPE_CHECKING:
    from qtbuild.convert.flatten import FlatTree

ROOTFS = b"rootfs"
#: Mount points the init expects, with the modes a Linux root uses for them.
MOUNT_POINTS = {b"dev": 0o755, b"proc": 0o555, b"run": 0o755, b"sys": 0o555, b"tmp": 0o1777, b"var": 0o755}


@runtime_checkable
class ImageTree(Protocol):
    """What the customer ramdisk reads of a flattened image (:class:`~qtbuild.convert.flatten.FlatTree`)."""

    hardlink_groups: int

    def iter_entries(self, prefix: bytes = b"") -> Iterator[CpioEntry]: ...

    def get(self, path: bytes) -> CpioEntry | None: ...

    def top_directories(self) -> int: ...


def _file(path: bytes, data: bytes, mode: int = 0o644) -> CpioEntry:
    return CpioEntry(path, stat.S_IFREG | mode, size=len(data), data=data)


def _dir(path: bytes, mode: int = 0o755, nlink: int | None = None) -> CpioEntry:
    return CpioEntry(path, stat.S_IFDIR | mode, nlink=nlink)


def launch_files(launch: Launch) -> list[CpioEntry]:
    """The ``cmd``, ``env`` and ``launch.json`` files at the archive root."""
    return [_file(b"cmd", launch.cmd_file()), _file(b"env", launch.env_file()), _file(b"launch.json", launch.to_json())]


def customer_entries(image_entries: Iterable[CpioEntry], launch: Launch, *,
                     rootfs_nlink: int | None = None) -> Iterator[CpioEntry]:
    """The launch files, ``rootfs/``, and the image's entries — given in bytewise path order,
    paths already under ``rootfs/`` — with the missing mount points merged in: the archive's
    order, streamed.  ``rootfs_nlink``: the nlink of ``rootfs`` (None: left for
    :class:`~qtbuild.formats.cpio.CpioArchive` to count)."""
    yield from launch_files(launch)
    yield _dir(ROOTFS, nlink=rootfs_nlink)
    missing = [ROOTFS + b"/" + name for name in sorted(MOUNT_POINTS)]
    for entry in image_entries:
        while missing and missing[0] < entry.path:
            yield _mount_point(missing.pop(0))
        if missing and missing[0] == entry.path:
            missing.pop(0)  # the image has its own
        yield entry
    for path in missing:
        yield _mount_point(path)


def _mount_point(path: bytes) -> CpioEntry:
    return _dir(path, MOUNT_POINTS[path.rpartition(b"/")[2]], nlink=2)


def customer_ramdisk(image: ImageTree | Iterable[CpioEntry], launch: Launch) -> CpioStream:
    """The customer ramdisk as a streamable archive.

    ``image``: the flattened tree (the archive is then streamed from it in one pass, never held
    whole in memory, its size known once written; the tree's hardlink keys are dense group
    numbers, see :class:`~qtbuild.formats.cpio.CpioStream`), or any iterable of the image's
    entries (sorted, prefixed and sized here, as a :class:`~qtbuild.formats.cpio.CpioArchive`).
    """
    prefix = ROOTFS + b"/"
    if not isinstance(image, ImageTree):
        ordered = sorted((entry._replace(path=prefix + entry.path) for entry in image), key=lambda entry: entry.path)
        return CpioArchive(customer_entries(ordered, launch))
    tree = image
    added = sum(tree.get(name) is None for name in MOUNT_POINTS)  # each a directory more in rootfs
    rootfs_nlink = 2 + tree.top_directories() + added
    return CpioStream(lambda: customer_entries(tree.iter_entries(prefix), launch, rootfs_nlink=rootfs_nlink),
                      hardlink_groups=tree.hardlink_groups)


def estimated_size(tree: FlatTree, launch: Launch) -> int:
    """The size of ``customer_ramdisk(tree, launch)`` without writing it (which alone tells it
    exactly): from :meth:`~qtbuild.convert.flatten.FlatTree.totals`, each image entry's name and
    data padding counted as their mean (1.5 bytes each), so within 3 bytes an image entry of the
    truth (beyond the rare cases ``totals`` names); the synthesised entries exactly."""
    totals = tree.totals()
    prefix = len(ROOTFS) + 1
    image = totals.entries * (HEADER_SIZE + prefix + 1 + 3) + totals.path_bytes + totals.data_bytes
    own_mount_points = {ROOTFS + b"/" + name for name in MOUNT_POINTS if tree.get(name) is not None}
    synthesised = CpioArchive(entry for entry in customer_entries((), launch) if entry.path not in own_mount_points)
    assert synthesised.size is not None  # a CpioArchive is sized when made
    return image + synthesised.size  # the trailer included
