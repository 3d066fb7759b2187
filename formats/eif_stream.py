"""One streaming pass over an EIF's sections: PCR hashers and CRC-32 fed chunk by chunk.

Shared by the writer (which also writes each chunk) and the reader (which only checks).  A
ramdisk byte is hashed twice (PCR0 and PCR1 or PCR2) and checksummed once; hashlib and zlib both
release the GIL on large buffers, so large chunks are split over two threads: this thread hashes
PCR0 (while its caller also produces the data) while a worker hashes the second PCR, updates the
CRC and runs the caller's ``sink`` (e.g. the file write), which balances the two threads' work.
The worker's share of a chunk may still be running when :meth:`update` returns, so the caller
can fetch the next chunk meanwhile: a chunk must stay unchanged until the chunk after the next
one is passed in (sources alternate two buffers).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from qtbuild.formats.crc32 import crc32
from qtbuild.formats.measure import Measurements, PcrHashers

SECTION_HEADER = struct.Struct(">HHQ")
#: Below this a chunk is processed inline: handing it to the worker would cost more than it saves.
PARALLEL_THRESHOLD = 256 * 1024


class SectionStreamDigest:
    """Accumulates the CRC of "section header ‖ data" records and the PCRs of measured data.

    Use as a context manager (it owns a worker thread).  For each section call
    :meth:`begin_section` with its kind name and size, then :meth:`update` with its data chunks.
    :attr:`crc` is the CRC-32 over everything fed so far (section headers included),
    :attr:`length` the number of those bytes.

    With ``section_digests=True`` it also records each section's own SHA-384
    (:meth:`section_digests`).  That usually costs nothing extra: a PCR hasher that had seen no
    data when the section began holds exactly that section's hash when it ends (the kernel in
    PCR1's, the first customer ramdisk in PCR2's); only other sections get a hasher of their own.
    """

    def __init__(self, *, sink: Callable[[memoryview], object] | None = None, section_digests: bool = False) -> None:
        self.pcrs = PcrHashers()
        self._track_sections = section_digests
        self._fed: set[int] = set()
        self._own = None
        self._digests: list[bytes] = []
        self.length = 0
        self._crc = 0
        self._sink = sink
        self._targets: list = []
        self._pending: Future[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eif-digest")

    @property
    def crc(self) -> int:
        self._drain()
        return self._crc

    def __enter__(self) -> SectionStreamDigest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._drain()
        finally:
            self._pool.shutdown(wait=True)

    def _drain(self) -> None:
        """Wait for the worker's share of the previous chunk (re-raising its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def begin_section(self, kind: str, type_code: int, size: int, flags: int = 0) -> bytes:
        """Start a section; returns (and feeds to the CRC and sink) its 12-byte header."""
        header = SECTION_HEADER.pack(type_code, flags, size)
        self._drain()
        self._feed_unmeasured(header)
        self._targets = self.pcrs.targets(kind)
        if self._track_sections:
            self._close_section()
            self._own = self._section_hasher()
        return header

    def _section_hasher(self):
        """A hasher that will hold this section's own SHA-384, reusing a fresh PCR hasher."""
        fresh = [hasher for hasher in self._targets if id(hasher) not in self._fed]
        self._fed.update(id(hasher) for hasher in self._targets)
        if fresh:
            return fresh[0]
        own = hashlib.sha384()
        self._targets = self._targets + [own]
        return own

    def _close_section(self) -> None:
        if self._own is not None:
            self._digests.append(self._own.digest())
            self._own = None

    def section_digests(self) -> list[bytes]:
        """SHA-384 of each section's data, in the order sections were begun."""
        self._drain()
        self._close_section()
        return list(self._digests)

    def update(self, chunk) -> None:
        """Feed one chunk of the current section's data."""
        view = memoryview(chunk).cast("B")
        if not view:
            return
        self._drain()
        if len(view) < PARALLEL_THRESHOLD or len(self._targets) < 2:
            for hasher in self._targets:
                hasher.update(view)
            self._feed_unmeasured(view)
            return
        first, second, *others = self._targets
        self.length += len(view)
        self._pending = self._pool.submit(self._worker_part, second, view)
        first.update(view)
        for hasher in others:
            hasher.update(view)

    def _worker_part(self, hasher, view: memoryview) -> None:
        # The CRC is ordered: only the worker touches it until the caller's next _drain().
        hasher.update(view)
        self._crc = crc32(view, self._crc)
        if self._sink is not None:
            self._sink(view)

    def _feed_unmeasured(self, data) -> None:
        self._crc = crc32(data, self._crc)
        self.length += len(data)
        if self._sink is not None:
            self._sink(memoryview(data))

    def measurements(self, certificate_der: bytes | None = None) -> Measurements:
        self._drain()
        return self.pcrs.finish(certificate_der)
