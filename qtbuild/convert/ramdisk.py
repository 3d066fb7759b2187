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

import dataclasses
import stat
from collections.abc import Callable, Iterable, Iterator

from qtbuild.formats.cpio import CpioEntry, CpioStream
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


def customer_entries(image_entries: Iterable[CpioEntry], launch: Launch) -> Iterator[CpioEntry]:
    """The launch files, ``rootfs/``, and the image's entries — given in bytewise path order,
    paths already under ``rootfs/`` — with the missing mount points merged in: the archive's
    order, streamed."""
    yield from launch_files(launch)
    yield _dir(ROOTFS)
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
    return _dir(path, MOUNT_POINTS[path.rpartition(b"/")[2]])


def customer_ramdisk(image_entries: Iterable[CpioEntry] | Callable[[bytes], Iterable[CpioEntry]],
                     launch: Launch, *, hardlink_groups: int | None = None) -> CpioStream:
    """The customer ramdisk as a streamable archive of known size.

    ``image_entries``: a callable that, given the path prefix ``b"rootfs/"``, returns the image's
    entries under it in bytewise path order, afresh on each call (``FlatTree.iter_entries``: the
    archive is then streamed, never held whole in memory); or any iterable of the image's
    entries (sorted and prefixed here).  ``hardlink_groups``: ``FlatTree.hardlink_groups`` when the
    entries come from a tree (their hardlink keys are then dense group numbers; see
    :class:`~qtbuild.formats.cpio.CpioStream`).
    """
    prefix = ROOTFS + b"/"
    if callable(image_entries):
        source = image_entries
    else:
        ordered = sorted((dataclasses.replace(entry, path=prefix + entry.path) for entry in image_entries),
                         key=lambda entry: entry.path)
        source = lambda _prefix: iter(ordered)  # noqa: E731
    return CpioStream(lambda: customer_entries(source(prefix), launch), hardlink_groups=hardlink_groups)
