"""`qtbuild sign`: add or replace an image's signature section.

The new file keeps every other section byte for byte and in its original order, drops any
existing signature, appends the new one, and gets a freshly computed header: num_sections,
section offsets and sizes, and the CRC all describe the new layout (aws-nitro-enclaves-image-format
issue #54 was a replace that left them stale).  PCR0 is recomputed from the bytes while copying
and must not change; PCR8 becomes the new certificate's.
"""

from __future__ import annotations

import os

from qtbuild.formats.eif import EifReader, SectionType
from qtbuild.formats.eif_writer import HeaderFields, SectionSource, Signer, WriteResult, write_sections


def sign_eif(reader: EifReader, output: str | os.PathLike, signer: Signer, *, progress=None) -> WriteResult:
    """Write a signed copy of ``reader``'s image to ``output`` (which may be the input path:
    the new file replaces it atomically once complete)."""
    header = reader.header
    sections: list[tuple[SectionType, SectionSource]] = [
        (s.type, reader.section_source(s)) for s in reader.sections if s.type != SectionType.SIGNATURE
    ]
    fields = HeaderFields(header.version, header.flags, header.default_mem, header.default_cpus)
    return write_sections(output, sections, fields, signer=signer, progress=progress)
