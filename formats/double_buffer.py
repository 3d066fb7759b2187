"""One chunker for streaming section data into a digest that hashes on another thread.

:func:`double_buffered_chunks` reads ``size`` bytes with ``readinto`` into two buffers taken in
turn, so a yielded chunk stays unchanged until the chunk after the next one is requested — the
contract of :class:`~qtbuild.formats.eif_writer.SectionSource`, which lets the digest's worker
hash one chunk while the next is being read, without copying.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

#: Chunk size for streaming section data: large enough that per-chunk overhead vanishes.
CHUNK_SIZE = 1 << 20


class ReadInto(Protocol):
    def readinto(self, buffer, /) -> int | None: ...


def double_buffered_chunks(stream: ReadInto, size: int, ended_early: Callable[[int], Exception],
                           chunk_size: int = CHUNK_SIZE) -> Iterator[memoryview]:
    """Exactly ``size`` bytes of ``stream`` as views alternating between two buffers.

    Raises ``ended_early(remaining)`` if the stream ends with ``remaining`` bytes still wanted.
    Copy a chunk (``bytes(view)``) to keep it beyond the next one.
    """
    length = min(chunk_size, max(size, 1))
    views = [memoryview(bytearray(length)), memoryview(bytearray(length))]
    remaining = size
    turn = 0
    while remaining:
        view = views[turn]
        turn ^= 1
        got = stream.readinto(view[:min(remaining, length)])
        if not got:
            raise ended_early(remaining)
        yield view[:got]
        remaining -= got
