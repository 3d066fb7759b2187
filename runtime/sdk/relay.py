"""Copying bytes both ways between two asyncio streams: the core of every forwarder (the
parent's ``qtbuild proxy`` and the SDK's enclave-side :mod:`.proxy`).  Between two plain sockets on
Linux the bytes move zero-copy (:mod:`.splice`); otherwise they are copied through Python.
Standard library only."""

from __future__ import annotations

import asyncio
import time
import weakref

from . import splice

CHUNK = 256 * 1024


class Activity:
    """When a byte last moved on a connection."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def remaining(self, timeout: float) -> float:
        return max(0.0, self.last + timeout - time.monotonic())


_held: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()


def hold(writer: asyncio.StreamWriter) -> None:
    """Stop reading a freshly accepted stream until :func:`relay` takes it over: what the peer
    sends meanwhile (while the other side is being connected) waits in the kernel, to be spliced
    rather than copied through Python; relay reads it again if it ends up copying."""
    transport = writer.transport
    if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing() and transport.is_reading():
        transport.pause_reading()
        _held.add(transport)


def _release(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        transport = writer.transport
        if transport in _held:
            _held.discard(transport)
            if isinstance(transport, asyncio.ReadTransport) and not transport.is_closing():
                transport.resume_reading()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, activity: Activity) -> None:
    while data := await reader.read(CHUNK):
        activity.touch()
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _splice_or_copy(spliced: asyncio.Future, source: splice.SpliceEnd, target: splice.SpliceEnd,
                          copy) -> None:
    """One direction zero-copy, then its EOF passed on; if the kernel refuses these sockets
    before a byte moved, by copying."""
    try:
        await spliced
    except splice.SpliceUnsupported:
        splice.resume(source)
        await copy()
        return
    if target.writer.can_write_eof():
        target.writer.write_eof()


async def relay(a_reader, a_writer, b_reader, b_writer, idle_timeout: float,
                activity: Activity | None = None) -> str:
    """Copy a→b and b→a until both end (``"closed"``), one fails (``"error: …"``) or nothing
    moved for ``idle_timeout`` seconds (``"idle"``); EOF is passed on as a half-close.  Does not
    close the writers.  ``activity`` (if given) is touched whenever a byte moves, so an owner can
    tell a quiet connection from a busy one."""
    activity = activity or Activity()
    ends = await splice.splice_ends(a_reader, a_writer, b_reader, b_writer)
    pair = None
    if ends is None:
        _release(a_writer, b_writer)
        pumps = {asyncio.create_task(_pump(a_reader, b_writer, activity)),
                 asyncio.create_task(_pump(b_reader, a_writer, activity))}
    else:
        _held.difference_update((a_writer.transport, b_writer.transport))
        a, b = ends
        try:
            pair = splice.splicer().add(a, b, activity)
        except BaseException:
            a.close()
            b.close()
            raise
        pumps = {asyncio.create_task(_splice_or_copy(pair.forward, a, b, lambda: _pump(a_reader, b_writer, activity))),
                 asyncio.create_task(_splice_or_copy(pair.backward, b, a, lambda: _pump(b_reader, a_writer, activity)))}
    pending = set(pumps)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=activity.remaining(idle_timeout),
                                               return_when=asyncio.FIRST_COMPLETED)
            failed = [task.exception() for task in done if task.exception() is not None]
            if failed:
                return f"error: {failed[0]!r}"
            if not done and activity.remaining(idle_timeout) <= 0:
                return "idle"
        return "closed"
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if pair is not None:
            splice.splicer().remove(pair)
        for end in ends or ():
            end.close()
