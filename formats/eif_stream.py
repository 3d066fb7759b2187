"""One streaming pass over an EIF's sections: PCR hashers and CRC-32 fed chunk by chunk.

Shared by the writer (which also writes each chunk) and the reader (which only checks).  A
ramdisk byte is hashed twice (PCR0 and PCR1 or PCR2) and checksummed once: two SHA-384 passes
cost far more than producing the data (reading it, building the cpio archive).  hashlib, zlib
and file writes release the GIL on large buffers, so every chunk goes to two worker "lanes":
one hashes the first PCR and updates the CRC, the other hashes the second PCR and runs the
caller's ``sink`` (e.g. the file write).  The caller's thread only produces data, a few chunks
ahead of the lanes, so on two cores both stay busy with hashing the whole time.

Chunk lifetime (the contract of :class:`~qtbuild.formats.eif_writer.SectionSource`): a chunk in
a reused buffer (anything but ``bytes``) must stay unchanged until ``buffers - 1`` more chunks
in reused buffers have been passed in (``bytes`` chunks between them take no buffer's turn),
``buffers`` being the number of buffers the section's source takes in turn
(:meth:`SectionStreamDigest.begin_section`; 2 by default, a ring of more lets the source run
further ahead); immutable ``bytes`` chunks are queued up to :data:`DEPTH` deep.  :meth:`update`
may return before the lanes processed the chunk.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from _thread import LockType, allocate_lock
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue

from qtbuild.formats.crc32 import crc32
from qtbuild.formats.measure import Measurements, PcrHashers

SECTION_HEADER = struct.Struct(">HHQ")
#: Chunks queued for the lanes at most: the caller runs this far ahead of the hashing.
DEPTH = 8
#: A chunk in a reused buffer below this size is copied, so it can be queued like ``bytes``.
COPY_BELOW = 256 * 1024


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
        self._buffers = 2  # buffers the current section's source takes in turn
        self._reused_inflight = 0
        #: (each lane's lock for the chunk, whether the chunk is in a reused buffer), oldest first
        self._inflight: deque[tuple[tuple[LockType, LockType], bool]] = deque()
        # One thread per lane: each lane runs its work in the order submitted.
        self._lanes = (_Lane("eif-digest-a"), _Lane("eif-digest-b"))

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
            for lane in self._lanes:
                lane.close()

    def _drain(self) -> None:
        """Wait for the lanes to finish every chunk passed in (re-raising their first error)."""
        while self._inflight:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        done, reused = self._inflight.popleft()
        self._reused_inflight -= reused
        done[0].acquire()
        done[1].acquire()
        for lane in self._lanes:
            if lane.error is not None:
                raise lane.error

    def begin_section(self, kind: str, type_code: int, size: int, flags: int = 0, *, buffers: int = 2) -> bytes:
        """Start a section; returns (and feeds to the CRC and sink) its 12-byte header.

        ``buffers``: how many buffers the section's chunks (those not ``bytes``) are taken from
        in turn, so how many of them may be in the lanes at once (``buffers - 1``)."""
        if buffers < 2:
            raise ValueError("a source whose chunks share one buffer cannot run ahead of the lanes")
        header = SECTION_HEADER.pack(type_code, flags, size)
        self._drain()
        self._buffers = buffers
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
        """Feed one chunk of the current section's data (see the module docstring for its lifetime)."""
        view = memoryview(chunk).cast("B")
        if not view:
            return
        reused = not isinstance(view.obj, bytes)
        if reused and len(view) < COPY_BELOW:
            # The copy may be queued like bytes, but it still took its buffer's turn: the source
            # refills the buffer ``buffers - 1`` chunks back counting it, so it keeps counting here.
            view = memoryview(bytes(view))
        while len(self._inflight) >= DEPTH:
            self._wait_oldest()
        first, second, others = self._targets[:1], self._targets[1:2], self._targets[2:]
        self.length += len(view)
        done = (self._lanes[0].submit(self._lane_a, first + others, view),
                self._lanes[1].submit(self._lane_b, second, view))
        self._inflight.append((done, reused))
        self._reused_inflight += reused
        # Once this returns the source refills the buffer of the chunk ``buffers - 1`` back: at
        # most the newest ``buffers - 1`` reused chunks may still be in the lanes.
        while self._reused_inflight > self._buffers - 1:
            self._wait_oldest()

    def _lane_a(self, hashers: list, view: memoryview) -> None:
        # The CRC is ordered: only this lane touches it until the caller's next _drain().
        for hasher in hashers:
            hasher.update(view)
        self._crc = crc32(view, self._crc)

    def _lane_b(self, hashers: list, view: memoryview) -> None:
        for hasher in hashers:
            hasher.update(view)
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


class _Lane:
    """A worker thread that runs the calls submitted to it one by one, in order.

    :meth:`submit` returns a lock, held until that call has returned.  The first call that raises
    leaves its error in :attr:`error` and the lane skips every later call (a hasher that failed
    part-way holds no meaningful state), still releasing their locks.  Leaner than a
    ``ThreadPoolExecutor`` of one thread (no future, no condition: a few microseconds a chunk
    instead of about fifteen, on both threads, with the GIL held)."""

    def __init__(self, name: str) -> None:
        self.error: BaseException | None = None
        self._calls: SimpleQueue[tuple[Callable[..., object], tuple, LockType] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[..., object], *args) -> LockType:
        done = allocate_lock()
        done.acquire()
        self._calls.put((call, args, done))
        return done

    def _run(self) -> None:
        get = self._calls.get
        while (item := get()) is not None:
            call, args, done = item
            if self.error is None:
                try:
                    call(*args)
                except BaseException as exc:  # handed to the caller, raised where it waits for this call
                    self.error = exc
            done.release()

    def close(self) -> None:
        """Let the calls submitted so far run, then end the thread."""
        self._calls.put(None)
        self._thread.join()
