"""`qtbuild verify --repair`: rewrite an image's header from the sections it holds.

Every section, the signature included, is copied byte for byte in its order; the header
(num_sections, section offsets and sizes, CRC) is computed afresh, which fixes the stale
signature-section size entry nitro-cli's ``sign-eif`` leaves, and drops bytes no section covers.
PCR0/1/2 and PCR8 cannot move: they depend only on section bytes.
"""

from __future__ import annotations

import os

from qtbuild.formats.eif import EifReader, SectionType
from qtbuild.formats.eif_writer import HeaderFields, SectionSource, WriteResult, write_sections


def repair_eif(reader: EifReader, output: str | os.PathLike) -> WriteResult:
    """Write ``reader``'s sections with a fresh header to ``output`` (atomically; it may be the
    input path)."""
    header = reader.header
    sections: list[tuple[SectionType, SectionSource]] = [(s.type, reader.section_source(s)) for s in reader.sections]
    fields = HeaderFields(header.version, header.flags, header.default_mem, header.default_cpus)
    return write_sections(output, sections, fields)


def repairs_needed(reader: EifReader) -> tuple[list[str], list[str]]:
    """(what a rewrite fixes, what it must not touch).  A ``num_sections`` that disagrees with the
    section table is not repaired: which sections belong to the image is exactly what is in doubt."""
    fixable = [note for note in reader.notes if "is stale" in note]
    unsafe: list[str] = []
    for defect in reader.defects:
        (unsafe if defect.startswith("num_sections") else fixable).append(defect)
    return fixable, unsafe
