"""Streaming, atomic EIF v4 writer.

Sections are written in nitro-cli's order: kernel, cmdline, metadata, ramdisks in the order given
(bootstrap first, then customer), and the signature last when a signer is given.  Section data is
given as :class:`SectionSource` objects, so a multi-gigabyte ramdisk (a file, or a cpio archive
generated on the fly) passes through once: each chunk is written, hashed into the PCRs and
checksummed, never held whole in memory.  A source may not know its size before it is produced
(a cpio archive written in one pass): its section header is then written with size 0 and
rewritten once the section ends, and the stream's CRC corrected with ``crc32_replace`` (the PCRs
hash section data only, so they need no correction).  The header, which holds every section's
size and the CRC, is written last; its CRC is joined to the section stream's with ``crc32_combine``.

The output appears atomically: data goes to a temporary file beside the target, which is renamed
over it only when complete; on any error (or KeyboardInterrupt) the temporary file is removed and
the target is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from qtbuild.formats.crc32 import crc32_combine, crc32_replace
from qtbuild.formats.double_buffer import double_buffered_chunks
from qtbuild.formats.eif import (
    CHUNK_SIZE,
    CRC_OFFSET,
    CURRENT_VERSION,
    DEFAULT_CPUS,
    DEFAULT_MEM,
    HEADER_SIZE,
    MAX_SECTIONS,
    MAX_SIGNATURE_SIZE,
    SECTION_HEADER_SIZE,
    EifHeader,
    SectionType,
    flags_for_arch,
)
from qtbuild.formats.eif_stream import SECTION_HEADER, SectionStreamDigest
from qtbuild.formats.errors import EifFormatError
from qtbuild.formats.measure import Measurements


class SectionSource(Protocol):
    """Section data produced as a stream of chunks.

    ``chunks()`` may reuse buffers, but a chunk must stay unchanged until the chunk after the next
    one has been requested (alternate two buffers): the digest's worker thread may still be
    hashing it.  It must yield exactly ``size`` bytes in total; ``size`` None means the size is
    known only once the chunks end (the writer then rewrites the section header).
    """

    @property
    def size(self) -> int | None: ...

    def chunks(self) -> Iterator[bytes | bytearray | memoryview]: ...


class RingSource(SectionSource, Protocol):
    """A section source that can also yield its data from a ring of more than two buffers, so
    it runs further ahead of the hashing threads (:class:`~qtbuild.formats.cpio.CpioStream`).

    ``ring_chunks(buffers, chunk_size)`` yields exactly ``size`` bytes as views of at most
    ``chunk_size`` bytes into ``buffers`` buffers taken in turn, or views of immutable ``bytes``: a
    view into a buffer must stay unchanged until ``buffers - 1`` more views into the buffers have
    been requested.  The writer prefers it to ``chunks()``.
    """

    def ring_chunks(self, buffers: int, chunk_size: int) -> Iterator[memoryview]: ...


#: Buffers a :class:`RingSource` is asked to take in turn: up to three chunks are then in the
#: hashing lanes while the fourth is filled.
RING_BUFFERS = 4
#: The size of each of those buffers.  Every chunk costs each hashing lane a wait for the GIL
#: after its hash (up to the switch interval while the producer or a re-read worker runs Python),
#: so the lanes hash 2 MiB per wait, not 1 MiB; 8 MiB of buffers in all.  Not 4 MiB: on the
#: development VM, 4 MiB ``write()`` calls made the kernel's copy into the page cache five times as
#: costly (convert from an OCI layout: 2.4 s of system time against 1.0 s at 1 or 2 MiB), while
#: measure's time was the same at 2 and 4 MiB.
RING_CHUNK = 2 << 20


class BytesSource:
    """Section data held in memory (kernel, cmdline, metadata, small ramdisks)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self.size = len(self._data)

    def chunks(self) -> Iterator[memoryview]:
        view = memoryview(self._data)
        for start in range(0, self.size, CHUNK_SIZE):
            yield view[start:start + CHUNK_SIZE]


class FileSource:
    """Section data read from a binary file object, from its current position, ``size`` bytes."""

    def __init__(self, fileobj: io.BufferedIOBase, size: int, chunk_size: int = CHUNK_SIZE) -> None:
        self._file = fileobj
        self.size = size
        self._chunk_size = chunk_size

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> FileSource:
        """Source over a whole file; the file is opened lazily, when chunks are requested."""
        return _PathSource(os.fspath(path))

    def chunks(self) -> Iterator[memoryview]:
        return double_buffered_chunks(self._file, self.size, _ended_early, self._chunk_size)


def _ended_early(remaining: int) -> EifFormatError:
    return EifFormatError(f"section source ended {remaining} bytes early")


class _PathSource(FileSource):
    def __init__(self, path: str) -> None:
        self._path = path
        super().__init__(None, os.stat(path).st_size)  # type: ignore[arg-type]

    def chunks(self) -> Iterator[memoryview]:
        with open(self._path, "rb") as handle:
            self._file = handle
            yield from super().chunks()


class Signer(Protocol):
    """Makes the signature section once PCR0 is known (see :mod:`qtbuild.formats.eif_signature`)."""

    certificate_der: bytes

    def signature_section(self, pcr0: bytes) -> bytes: ...


@dataclass(frozen=True)
class WrittenSection:
    type: SectionType
    offset: int
    size: int


@dataclass(frozen=True)
class WriteResult:
    """What was written: measurements, CRC, total size and the section layout."""

    measurements: Measurements
    crc32: int
    size: int
    sections: list[WrittenSection]


def as_source(data: bytes | SectionSource) -> SectionSource:
    return BytesSource(data) if isinstance(data, (bytes, bytearray, memoryview)) else data


def normalise_cmdline(cmdline: str | bytes) -> bytes:
    """The cmdline section's bytes: surrounding whitespace trimmed, no NUL terminator."""
    raw = cmdline.encode("utf-8") if isinstance(cmdline, str) else bytes(cmdline)
    raw = raw.strip()
    if b"\0" in raw:
        raise EifFormatError("the kernel command line contains a NUL byte")
    return raw


def write_eif(
    path: str | os.PathLike | None,
    *,
    kernel: bytes | SectionSource,
    cmdline: str | bytes,
    ramdisks: list[bytes | SectionSource],
    metadata: bytes | None,
    arch: str = "x86_64",
    signer: Signer | None = None,
    default_mem: int = DEFAULT_MEM,
    default_cpus: int = DEFAULT_CPUS,
    progress=None,
) -> WriteResult:
    """Write an EIF v4 to ``path`` atomically and return its measurements.

    ``metadata`` is the metadata section's bytes (see :mod:`qtbuild.formats.eif_metadata`); None omits
    the section (and the file is then marked version 3).  ``progress``, if given, is called with
    the number of bytes produced after each chunk.  With ``path=None`` nothing is written: the
    image is only measured (same result, same cost minus the I/O).
    """
    if not ramdisks:
        raise EifFormatError("an enclave image needs at least one ramdisk")
    planned = [(SectionType.KERNEL, as_source(kernel)), (SectionType.CMDLINE, BytesSource(normalise_cmdline(cmdline)))]
    if metadata is not None:
        planned.append((SectionType.METADATA, BytesSource(metadata)))
    planned += [(SectionType.RAMDISK, as_source(ramdisk)) for ramdisk in ramdisks]
    version = CURRENT_VERSION if metadata is not None else 3
    layout = HeaderFields(version, flags_for_arch(arch), default_mem, default_cpus)
    return write_sections(path, planned, layout, signer=signer, progress=progress)


@dataclass(frozen=True)
class HeaderFields:
    """The header fields a caller chooses (the rest are derived from the sections)."""

    version: int = CURRENT_VERSION
    flags: int = 0
    default_mem: int = DEFAULT_MEM
    default_cpus: int = DEFAULT_CPUS


def write_sections(
    path: str | os.PathLike | None,
    sections: list[tuple[SectionType, SectionSource]],
    header: HeaderFields,
    *,
    signer: Signer | None = None,
    progress=None,
) -> WriteResult:
    """Write ``sections`` in the given order (plus a signature section last when ``signer`` is
    given) atomically to ``path``, or only measure them when ``path`` is None.

    The low-level entry point: :func:`write_eif` uses nitro-cli's order; ``qtbuild sign`` keeps
    an existing image's order.  The caller must not pass a signature section with a signer.
    """
    if len(sections) + (signer is not None) > MAX_SECTIONS:
        raise EifFormatError(f"too many sections: an EIF holds at most {MAX_SECTIONS}")
    if signer is not None and any(kind == SectionType.SIGNATURE for kind, _ in sections):
        raise EifFormatError("the sections already include a signature; drop it before signing again")

    def body(out):
        return _write_body(out, sections, signer, header, progress)

    if path is None:
        return body(_Discard())
    return _write_atomically(path, body)


class _Discard:
    """A write-only sink that keeps nothing (for measuring without writing)."""

    def write(self, data) -> int:
        return len(data)

    def seek(self, offset: int) -> int:
        return offset


def _write_body(out, planned, signer, fields: HeaderFields, progress) -> WriteResult:
    out.write(bytes(HEADER_SIZE))  # placeholder: the header is known only at the end
    position = HEADER_SIZE
    written: list[WrittenSection] = []

    def sink(view: memoryview) -> None:
        out.write(view)
        if progress is not None:
            progress(len(view))

    rewrites: list[tuple[int, bytes, bytes]] = []  # (file offset, section header written, true header)
    with SectionStreamDigest(sink=sink) as digest:
        for section_type, source in planned:
            declared = source.size
            placeholder, size = _stream_section(digest, section_type, source)
            if declared is None:
                rewrites.append((position, placeholder, SECTION_HEADER.pack(section_type, 0, size)))
            written.append(WrittenSection(section_type, position, size))
            position += SECTION_HEADER_SIZE + size
        certificate_der = None
        if signer is not None:
            pcr0 = digest.measurements().pcr0
            signature = signer.signature_section(pcr0)
            if len(signature) > MAX_SIGNATURE_SIZE:
                raise EifFormatError(f"signature section is {len(signature)} bytes; the limit is {MAX_SIGNATURE_SIZE}")
            written.append(WrittenSection(SectionType.SIGNATURE, position, len(signature)))
            _stream_section(digest, SectionType.SIGNATURE, BytesSource(signature))
            position += SECTION_HEADER_SIZE + len(signature)
            certificate_der = signer.certificate_der
        measurements = digest.measurements(certificate_der)
        stream_crc, stream_length = digest.crc, digest.length
    for offset, placeholder, section_header in rewrites:  # the lanes are done: every chunk is written
        stream_crc = crc32_replace(stream_crc, stream_length, offset - HEADER_SIZE, placeholder, section_header)
        out.seek(offset)
        out.write(section_header)

    offsets = [section.offset for section in written] + [0] * (MAX_SECTIONS - len(written))
    sizes = [section.size for section in written] + [0] * (MAX_SECTIONS - len(written))
    header = EifHeader(
        fields.version, fields.flags, fields.default_mem, fields.default_cpus,
        len(written), tuple(offsets), tuple(sizes), 0,
    )
    crc = crc32_combine(zlib.crc32(header.pack()[:CRC_OFFSET]), stream_crc, stream_length)
    out.seek(0)
    out.write(dataclasses.replace(header, crc32=crc).pack())
    return WriteResult(measurements, crc, position, written)


def _stream_section(digest: SectionStreamDigest, section_type: SectionType,
                    source: SectionSource) -> tuple[bytes, int]:
    """Feed one section; return the section header fed (size 0 when the source did not know its
    size) and the section's size."""
    declared = source.size
    ring_chunks = getattr(source, "ring_chunks", None)
    if ring_chunks is not None:
        header = digest.begin_section(section_type.label, section_type, declared or 0, buffers=RING_BUFFERS)
        chunks = ring_chunks(RING_BUFFERS, RING_CHUNK)
    else:
        header = digest.begin_section(section_type.label, section_type, declared or 0)
        chunks = source.chunks()
    produced = 0
    for chunk in chunks:
        produced += len(chunk)
        if declared is not None and produced > declared:
            break
        digest.update(chunk)
    if declared is not None and produced != declared:
        raise EifFormatError(
            f"{section_type.label} section source produced {produced} bytes but declared {declared}"
        )
    return header, produced


def _write_atomically(path: str | os.PathLike, body):
    """Run ``body(fileobj)`` on a temporary file beside ``path`` and rename it into place.

    The file is created with mode 0644, which the kernel narrows by the process umask (as for
    any new file); the umask is read by no one and changed by no one.
    """
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            descriptor = os.open(temporary, flags, 0o644)
        except FileExistsError:
            continue
        except BaseException:
            # Ctrl-C lands as the open returns (CPython checks for signals after a call): the name
            # exists only if this O_EXCL open made it, so it is ours to remove.
            _remove_quietly(temporary)
            raise
        break
    else:
        raise FileExistsError(f"no free temporary name beside {target}")
    try:
        with os.fdopen(descriptor, "w+b") as handle:
            result = body(handle)
        os.replace(temporary, target)
        return result
    except BaseException:
        _remove_quietly(temporary)
        raise


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
