"""Zero-copy forwarding of one direction of a socket pair with ``os.splice`` (Linux).

Bytes move socket → pipe → socket inside the kernel: never copied into Python objects, no
Python call per chunk beyond two ``splice`` system calls.  It applies when both ends are plain
stream sockets served by asyncio's selector transports (TCP, AF_UNIX — the emulated vsock);
:func:`splice_ends` says whether a pair of asyncio streams qualifies and prepares it, and
:func:`splice_pump` moves one direction.  Where the kernel cannot splice a socket (``EINVAL``:
e.g. a socket family without splice support) nothing has moved yet and the caller falls back to
copying.  Standard library only (the enclave SDK uses it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import sys
from collections.abc import Callable

#: Bytes a pipe holds between the two splices (fs.pipe-max-size permitting; else the default 64 KiB).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class SpliceUnsupported(Exception):
    """The kernel cannot splice this socket; nothing has been moved."""


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "splice")


class SpliceEnd:
    """One stream's socket, taken over from its asyncio transport for splicing.

    The transport stays the socket's owner (its writer still half-closes and closes it); its
    reading is paused, so bytes stay in the kernel until a pump splices them.  ``fd`` is a
    duplicate of the socket's descriptor: the event loop refuses to watch a transport's own."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.fd = os.dup(writer.get_extra_info("socket").fileno())

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.fd)
        loop.remove_writer(self.fd)
        os.close(self.fd)


def _spliceable(writer: asyncio.StreamWriter) -> bool:
    transport = writer.transport
    sock = writer.get_extra_info("socket")
    return (sock is not None and writer.get_extra_info("sslcontext") is None
            and hasattr(transport, "pause_reading") and not transport.is_closing())


def _buffered(reader: asyncio.StreamReader) -> bytes | None:
    """Bytes the stream has read but not handed out (None: unknown, so do not splice)."""
    buffer = getattr(reader, "_buffer", None)  # asyncio keeps them here; no public accessor exists
    return bytes(buffer) if isinstance(buffer, bytearray) else None


async def splice_ends(a_reader, a_writer, b_reader, b_writer) -> tuple[SpliceEnd, SpliceEnd] | None:
    """Take both streams over for splicing, or None (then copy): not Linux, not plain sockets,
    or a stream already at EOF.  Bytes a stream had already buffered are passed on first."""
    if not (available() and _spliceable(a_writer) and _spliceable(b_writer)):
        return None
    if a_reader.at_eof() or b_reader.at_eof():
        return None
    if _buffered(a_reader) is None or _buffered(b_reader) is None:
        return None
    for reader, writer, target in ((a_reader, a_writer, b_writer), (b_reader, b_writer, a_writer)):
        writer.transport.pause_reading()
        while data := _buffered(reader):  # taking them may resume a transport the reader had paused
            await reader.readexactly(len(data))
            target.write(data)
            writer.transport.pause_reading()
    for writer in (a_writer, b_writer):
        while writer.transport.get_write_buffer_size():  # our own writes must follow the transport's
            await writer.drain()
            await asyncio.sleep(0)
    return SpliceEnd(a_reader, a_writer), SpliceEnd(b_reader, b_writer)


def resume(end: SpliceEnd) -> None:
    """Give a socket's reading back to its transport (the copy fallback reads through it again)."""
    transport = end.writer.transport
    if not transport.is_closing() and isinstance(transport, asyncio.ReadTransport):
        transport.resume_reading()


async def _ready(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    add(fd, _waker(future))
    try:
        await future
    finally:
        remove(fd)


def _waker(future: asyncio.Future) -> Callable[[], None]:
    def wake() -> None:
        if not future.done():
            future.set_result(None)

    return wake


async def _either_ready(read_fd: int, write_fd: int) -> None:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    wake = _waker(future)
    loop.add_reader(read_fd, wake)
    loop.add_writer(write_fd, wake)
    try:
        await future
    finally:
        loop.remove_reader(read_fd)
        loop.remove_writer(write_fd)


async def splice_pump(source: SpliceEnd, target: SpliceEnd, touch: Callable[[], None]) -> None:
    """Move source's bytes to target until source's EOF, then half-close target.

    Raises :class:`SpliceUnsupported` if the very first splice is refused (nothing moved),
    ``OSError`` for a failed connection."""
    pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_in, _F_SETPIPE_SZ, PIPE_SIZE)
        capacity = fcntl.fcntl(pipe_in, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        held, eof, moved, turns = 0, False, False, 0
        while not eof or held:
            progress = False
            turns += 1
            if turns % 16 == 0:
                await asyncio.sleep(0)  # a connection that never blocks must not starve the others
            if not eof and held < capacity:
                try:
                    got = os.splice(source.fd, pipe_in, capacity - held, flags=_FLAGS)
                except BlockingIOError:
                    got = -1
                except OSError as error:
                    if not moved and error.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise SpliceUnsupported(str(error)) from error
                    raise
                if got == 0:
                    eof = progress = True
                elif got > 0:
                    held, moved, progress = held + got, True, True
                    touch()
            if held:
                try:
                    sent = os.splice(pipe_out, target.fd, held, flags=_FLAGS)
                except BlockingIOError:
                    sent = 0
                if sent:
                    held -= sent
                    progress = True
                    touch()
            if progress:
                continue
            if held and (eof or held >= capacity):
                await _ready(target.fd, write=True)
            elif held:
                await _either_ready(source.fd, target.fd)
            else:
                await _ready(source.fd, write=False)
    finally:
        os.close(pipe_out)
        os.close(pipe_in)
    if target.writer.can_write_eof():
        target.writer.write_eof()
