"""The total of ``convert``'s write-phase progress bar, known before the phase starts.

``write_eif``'s ``progress`` counts every byte after the file header: each section's 12-byte
header and data.  All sections but the customer ramdisk have their size up front; the ramdisk
is written in one pass and knows its own only at the end, so it is estimated from the tree
(:func:`qtbuild.convert.ramdisk.estimated_size`).  The signature section, when signing, is not
counted (a few KiB).  An estimate a little off only moves where the bar ends.
"""

from __future__ import annotations

from qtbuild.convert.boot_profiles import BootProfile
from qtbuild.convert.flatten import FlatTree
from qtbuild.convert.ramdisk import estimated_size
from qtbuild.formats.eif import SECTION_HEADER_SIZE
from qtbuild.formats.eif_writer import as_source, normalise_cmdline
from qtbuild.formats.launch_record import Launch


def estimated_write_total(profile: BootProfile, cmdline: str, metadata: bytes | None, tree: FlatTree,
                          launch: Launch) -> int:
    """Bytes ``write_eif`` reports writing for ``profile``'s kernel and bootstrap ramdisk,
    ``cmdline``, ``metadata`` (None: no section) and the customer ramdisk of ``tree`` and ``launch``."""
    known = [as_source(profile.kernel).size, len(normalise_cmdline(cmdline)), profile.bootstrap.size]
    if metadata is not None:
        known.append(len(metadata))
    sizes = [size or 0 for size in known] + [estimated_size(tree, launch)]
    return sum(sizes) + SECTION_HEADER_SIZE * len(sizes)
