"""The enclave image file (EIF) container: header, section table and a validating reader.

Byte layout (aws-nitro-enclaves-image-format ``src/defs/mod.rs``): a 548-byte big-endian header
``magic ".eif", version u16, flags u16, default_mem u64, default_cpus u64, reserved u16,
num_sections u16, section_offsets[32] u64, section_sizes[32] u64, unused u32, crc32 u32`` followed
by sections, each a 12-byte header ``type u16, flags u16, size u64`` and its data.  The CRC-32
covers header bytes [0:544] and then every section header and its data, in file order.

:class:`EifReader` validates the whole table up front (reading only headers) and raises
:class:`~qtbuild.formats.errors.EifFormatError` naming the field and offset for anything malformed.  The
writer lives in :mod:`qtbuild.formats.eif_writer`.

Leniency follows the reference implementation where real files need it, strictness stays where
it protects:

- a stale ``section_sizes`` entry for the signature section is read (with a note, and
  ``stale_signature_size`` set): the crate's signer (``nitro-cli sign-eif``) updates the section
  header when it replaces a signature but not the table entry, and the crate's reader walks
  section headers, so nitro-cli reads such files.  Rewriting the header (``qtbuild sign``,
  ``verify --repair``) fixes them.
- bytes after the last section and a ``num_sections`` that disagrees with the filled slots of the
  section table are *defects* (``defects``): the image is readable and measured from the sections
  the header lists, and ``verify`` fails naming the defect.
"""

from __future__ import annotations

import enum
import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from qtbuild.formats.crc32 import crc32_combine
from qtbuild.formats.double_buffer import CHUNK_SIZE, double_buffered_chunks
from qtbuild.formats.eif_stream import SECTION_HEADER, SectionStreamDigest
from qtbuild.formats.errors import EifFormatError
from qtbuild.formats.file_window import FileWindow
from qtbuild.formats.measure import Measurements

MAGIC = b".eif"
CURRENT_VERSION = 4
SUPPORTED_VERSIONS = (3, 4)
MAX_SECTIONS = 32
MIN_SECTIONS = 2
HEADER = struct.Struct(">4sHHQQHH32Q32QII")
HEADER_SIZE = HEADER.size  # 548
CRC_OFFSET = HEADER_SIZE - 4  # 544: the CRC covers the header up to here
SECTION_HEADER_SIZE = SECTION_HEADER.size  # 12
ARCH_FLAG_AARCH64 = 0x1
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2
#: nitro-cli refuses larger signature sections; so do we (the reader bounds its allocation).
MAX_SIGNATURE_SIZE = 32768


class SectionType(enum.IntEnum):
    """EIF section types; 0 and values above 5 are invalid."""

    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5

    @property
    def label(self) -> str:
        """Lower-case name used in reports and by :class:`~qtbuild.formats.measure.PcrHashers`."""
        return self.name.lower()


def arch_from_flags(flags: int) -> str:
    """``"aarch64"`` when the architecture bit is set, else ``"x86_64"``."""
    return "aarch64" if flags & ARCH_FLAG_AARCH64 else "x86_64"


def flags_for_arch(arch: str) -> int:
    """Header flags for an architecture name (x86_64/amd64 or aarch64/arm64)."""
    normalised = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
    if arch not in normalised:
        raise ValueError(f"unsupported architecture {arch!r}: use x86_64 or aarch64")
    return ARCH_FLAG_AARCH64 if normalised[arch] == "aarch64" else 0


@dataclass(frozen=True)
class EifHeader:
    """The fixed 548-byte header."""

    version: int
    flags: int
    default_mem: int
    default_cpus: int
    num_sections: int
    section_offsets: tuple[int, ...]
    section_sizes: tuple[int, ...]
    crc32: int
    reserved: int = 0
    unused: int = 0

    @property
    def arch(self) -> str:
        return arch_from_flags(self.flags)

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, self.version, self.flags, self.default_mem, self.default_cpus, self.reserved,
            self.num_sections, *self.section_offsets, *self.section_sizes, self.unused, self.crc32,
        )

    @classmethod
    def unpack(cls, data: bytes) -> EifHeader:
        """Parse header bytes; validates magic, version and section count only."""
        if len(data) < HEADER_SIZE:
            raise EifFormatError(
                f"file is {len(data)} bytes long; an EIF header needs {HEADER_SIZE} (truncated or not an EIF)"
            )
        fields = HEADER.unpack_from(data)
        magic, version, flags, mem, cpus, reserved, count = fields[:7]
        if magic != MAGIC:
            raise EifFormatError(f"magic at offset 0 is {magic!r}, expected {MAGIC!r}: not an enclave image file")
        if version not in SUPPORTED_VERSIONS:
            raise EifFormatError(
                f"version at offset 4 is {version}; supported versions are 3 and 4"
                + (" (v2 and older use a different byte order)" if version < 3 else "")
            )
        if not MIN_SECTIONS <= count <= MAX_SECTIONS:
            raise EifFormatError(f"num_sections at offset 26 is {count}; it must be {MIN_SECTIONS}..{MAX_SECTIONS}")
        return cls(
            version=version, flags=flags, default_mem=mem, default_cpus=cpus, num_sections=count,
            section_offsets=tuple(fields[7:39]), section_sizes=tuple(fields[39:71]),
            unused=fields[71], crc32=fields[72], reserved=reserved,
        )


@dataclass(frozen=True)
class Section:
    """One section as located by the reader: ``offset`` is its 12-byte header's file offset."""

    index: int
    type: SectionType
    offset: int
    size: int
    flags: int = 0

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE

    @property
    def end(self) -> int:
        return self.data_offset + self.size


@dataclass(frozen=True)
class StreamCheck:
    """Result of one pass over all section data: recomputed PCRs and CRC."""

    measurements: Measurements
    computed_crc: int
    header_crc: int
    section_sha384: list[bytes]

    @property
    def crc_ok(self) -> bool:
        return self.computed_crc == self.header_crc


@dataclass
class EifReader:
    """A validated view of an EIF file object; only headers are read until data is asked for.

    Construct with :meth:`open` (a path) or directly with a seekable binary file object.  After
    construction the header and section table are known to be consistent: every section lies
    inside the file, sections do not overlap, types are valid, section headers agree with the
    table, there is exactly one kernel and one cmdline, at most one metadata and one signature
    section.  ``notes`` lists tolerated oddities (e.g. a gap between sections), ``defects`` what
    makes the file invalid without hiding its content (see the module docstring).
    """

    fileobj: io.BufferedIOBase  # read, readinto and seek: a file opened "rb" or a BytesIO
    file_size: int
    header: EifHeader = field(init=False)
    sections: list[Section] = field(init=False)
    notes: list[str] = field(init=False, default_factory=list)
    defects: list[str] = field(init=False, default_factory=list)
    #: The stale table entry when section_sizes disagrees with the signature section's header.
    stale_signature_size: int | None = field(init=False, default=None)
    _owns_file: bool = False

    def __post_init__(self) -> None:
        self.fileobj.seek(0)
        self.header = EifHeader.unpack(_read_exact(self.fileobj, min(self.file_size, HEADER_SIZE), 0))
        self.sections = self._read_section_table()
        self._check_layout()

    @classmethod
    def open(cls, path: str | os.PathLike) -> EifReader:
        """Open and validate the EIF at ``path`` (close with :meth:`close` or ``with``)."""
        handle = open(path, "rb")  # noqa: SIM115 -- the reader owns it and closes it in close()
        try:
            size = os.fstat(handle.fileno()).st_size
            return cls(handle, size, _owns_file=True)
        except BaseException:
            handle.close()
            raise

    @classmethod
    def from_bytes(cls, data: bytes) -> EifReader:
        return cls(io.BytesIO(data), len(data))

    def __enter__(self) -> EifReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_file:
            self.fileobj.close()

    # -- structure -------------------------------------------------------------------------

    def _listed_sections(self) -> int:
        """How many sections to read: num_sections, or the filled slots when fewer are filled."""
        count = self.header.num_sections
        offsets, sizes = self.header.section_offsets, self.header.section_sizes
        filled = max((i + 1 for i in range(MAX_SECTIONS) if offsets[i] or sizes[i]), default=0)
        if filled < count:
            self.defects.append(
                f"num_sections at offset 26 is {count} but the section table lists {filled} sections "
                f"(slots {filled}..{count - 1} are empty)"
            )
            return max(filled, MIN_SECTIONS)
        if filled > count:
            self.defects.append(
                f"num_sections at offset 26 is {count} but the section table lists {filled} sections "
                f"(slots {count}..{filled - 1} are filled; nitro-cli's reader would read every section in the file)"
            )
        return count

    def _read_section_table(self) -> list[Section]:
        sections = []
        for index in range(self._listed_sections()):
            offset = self.header.section_offsets[index]
            size = self.header.section_sizes[index]
            where = f"section {index} (section_offsets[{index}] = {offset})"
            if offset < HEADER_SIZE:
                raise EifFormatError(f"{where} points into the {HEADER_SIZE}-byte header")
            if offset + SECTION_HEADER_SIZE > self.file_size:
                raise EifFormatError(
                    f"{where}: its header lies beyond the end of the {self.file_size}-byte file (truncated?)"
                )
            self.fileobj.seek(offset)
            header_bytes = _read_exact(self.fileobj, SECTION_HEADER_SIZE, offset)
            type_code, flags, header_size = SECTION_HEADER.unpack(header_bytes)
            try:
                section_type = SectionType(type_code)
            except ValueError:
                raise EifFormatError(
                    f"{where}: section type {type_code} at offset {offset} is invalid (valid: 1..5)"
                ) from None
            if header_size != size and section_type == SectionType.SIGNATURE and header_size <= MAX_SIGNATURE_SIZE:
                self.stale_signature_size = size
                self.notes.append(
                    f"section_sizes[{index}] = {size} is stale: the signature section header says {header_size} bytes "
                    "(nitro-cli sign-eif leaves it so; `qtbuild sign` or `qtbuild verify --repair` rewrites the header)"
                )
                size = header_size
            if header_size != size:
                raise EifFormatError(
                    f"{where}: section header at offset {offset} says {header_size} bytes "
                    f"but section_sizes[{index}] says {size}"
                )
            section = Section(index, section_type, offset, size, flags)
            if section.end > self.file_size:
                raise EifFormatError(
                    f"{where}: {section_type.label} data ends at {section.end}, beyond the end of the "
                    f"{self.file_size}-byte file (truncated?)"
                )
            if flags:
                self.notes.append(f"section {index} ({section_type.label}) has non-zero flags 0x{flags:04x}")
            sections.append(section)
        return sections

    def _check_layout(self) -> None:
        previous_end = HEADER_SIZE
        for section in self.sections:
            if section.offset < previous_end:
                raise EifFormatError(
                    f"section {section.index} at offset {section.offset} overlaps the previous section "
                    f"(which ends at {previous_end}) or is out of file order"
                )
            if section.offset != previous_end:
                self.notes.append(
                    f"non-contiguous file: {section.offset - previous_end} unused bytes "
                    f"before section {section.index} at offset {previous_end}"
                )
            previous_end = section.end
        if previous_end != self.file_size:
            self.defects.append(
                f"trailing data: {self.file_size - previous_end} bytes after the last section "
                f"(offsets {previous_end}..{self.file_size - 1}) that no section covers"
            )
        self._check_counts()

    def _check_counts(self) -> None:
        counts = {kind: 0 for kind in SectionType}
        for section in self.sections:
            counts[section.type] += 1
        for kind in (SectionType.KERNEL, SectionType.CMDLINE):
            if counts[kind] != 1:
                raise EifFormatError(f"the image has {counts[kind]} {kind.label} sections; exactly one is required")
        for kind in (SectionType.METADATA, SectionType.SIGNATURE):
            if counts[kind] > 1:
                raise EifFormatError(f"the image has {counts[kind]} {kind.label} sections; at most one is allowed")
        kernel_index = self.sections_of(SectionType.KERNEL)[0].index
        for ramdisk in self.sections_of(SectionType.RAMDISK):
            if ramdisk.index < kernel_index:
                raise EifFormatError(f"ramdisk section {ramdisk.index} comes before the kernel section")
        signature = self.signature_section
        if signature is not None and signature.size > MAX_SIGNATURE_SIZE:
            raise EifFormatError(
                f"signature section {signature.index} is {signature.size} bytes; the limit is {MAX_SIGNATURE_SIZE}"
            )
        if self.header.version >= 4 and counts[SectionType.METADATA] == 0:
            self.notes.append("version 4 image without a metadata section")

    # -- access ----------------------------------------------------------------------------

    @property
    def arch(self) -> str:
        return self.header.arch

    @property
    def contiguous(self) -> bool:
        return not self.defects and not any(note.startswith("non-contiguous") for note in self.notes)

    def sections_of(self, kind: SectionType) -> list[Section]:
        return [section for section in self.sections if section.type == kind]

    @property
    def ramdisks(self) -> list[Section]:
        return self.sections_of(SectionType.RAMDISK)

    @property
    def signature_section(self) -> Section | None:
        found = self.sections_of(SectionType.SIGNATURE)
        return found[0] if found else None

    @property
    def metadata_section(self) -> Section | None:
        found = self.sections_of(SectionType.METADATA)
        return found[0] if found else None

    @property
    def is_signed(self) -> bool:
        return self.signature_section is not None

    def read_section(self, section: Section, *, max_size: int) -> bytes:
        """The whole data of a section, refusing sections larger than ``max_size``."""
        if section.size > max_size:
            raise EifFormatError(
                f"{section.type.label} section {section.index} is {section.size} bytes; "
                f"refusing to load more than {max_size} into memory"
            )
        self.fileobj.seek(section.data_offset)
        return _read_exact(self.fileobj, section.size, section.data_offset)

    def iter_section(self, section: Section, chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
        """Stream a section's data.

        Yielded views alternate between two buffers (see :class:`~qtbuild.formats.eif_writer.SectionSource`):
        copy a chunk to keep it beyond the next one.
        """
        def ended_early(remaining: int) -> EifFormatError:
            return _truncated(section)(section.data_offset + section.size - remaining)

        yield from double_buffered_chunks(self._window(section), section.size, ended_early, chunk_size)

    def section_source(self, section: Section) -> ReaderSectionSource:
        """The section as a :class:`~qtbuild.formats.eif_writer.SectionSource` (to copy it into a new image)."""
        return ReaderSectionSource(self, section)

    def section_reader(self, section: Section) -> BinaryIO:
        """A read-only, seekable, buffered file object over one section's data (for cpio readers etc.)."""
        return FileWindow.buffered(self.fileobj, section.data_offset, section.size, truncated=_truncated(section))

    def _window(self, section: Section) -> FileWindow:
        return FileWindow(self.fileobj, section.data_offset, section.size, truncated=_truncated(section))

    def check_stream(self, *, certificate_der: bytes | None = None, chunk_size: int = CHUNK_SIZE) -> StreamCheck:
        """Read every section once: recompute PCR0/1/2 (PCR8 from ``certificate_der``) and the CRC.

        Measurements come from the bytes only, never from metadata.  Each section's own SHA-384
        is recorded too (``section_sha384``, in table order).
        """
        with SectionStreamDigest(section_digests=True) as digest:
            for section in self.sections:
                digest.begin_section(section.type.label, section.type, section.size, section.flags)
                for chunk in self.iter_section(section, chunk_size):
                    digest.update(chunk)
            self.fileobj.seek(0)
            header_bytes = _read_exact(self.fileobj, CRC_OFFSET, 0)
            crc = crc32_combine(zlib.crc32(header_bytes), digest.crc, digest.length)
            return StreamCheck(digest.measurements(certificate_der), crc, self.header.crc32, digest.section_digests())


@dataclass(frozen=True)
class ReaderSectionSource:
    """A section of an open image, streamed in chunks (see :meth:`EifReader.section_source`)."""

    reader: EifReader
    section: Section

    @property
    def size(self) -> int:
        return self.section.size

    def chunks(self) -> Iterator[memoryview]:
        return self.reader.iter_section(self.section)


def _truncated(section: Section) -> Callable[[int], EifFormatError]:
    def error(offset: int) -> EifFormatError:
        where = f"{section.type.label} section {section.index}"
        return EifFormatError(f"unexpected end of file at offset {offset} inside {where}")

    return error


def _read_exact(fileobj: io.BufferedIOBase, size: int, offset: int) -> bytes:
    data = fileobj.read(size)
    if len(data) != size:
        raise EifFormatError(f"unexpected end of file: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data
