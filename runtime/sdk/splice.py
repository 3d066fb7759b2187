"""Zero-copy forwarding of a socket pair with ``os.splice`` (Linux).

Bytes move socket → pipe → socket inside the kernel: never copied into Python objects, no
Python call per chunk beyond the ``splice`` system calls.  It applies when both ends are plain
stream sockets served by asyncio's selector transports (TCP, AF_UNIX — the emulated vsock);
:func:`splice_ends` says whether a pair of asyncio streams qualifies and prepares it, and
``splicer().add(a, b, activity)`` moves both directions on the process's splicing thread (one
edge-triggered epoll set for all pairs: see :class:`Splicer`).  Where the kernel cannot splice a
socket (``EINVAL``: e.g. a socket family without splice support) nothing has moved yet and the
caller falls back to copying.  Standard library only (the enclave SDK uses it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import sys
import termios
import threading
import time

#: Bytes a pipe holds between the two splices (fs.pipe-max-size permitting; else the default 64 KiB).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_FIONREAD = getattr(termios, "FIONREAD", 0x541B)
_INT_ZERO = bytes(4)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class SpliceUnsupported(Exception):
    """The kernel cannot splice this socket; nothing has been moved."""


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "splice")


class SpliceEnd:
    """One stream's socket, taken over from its asyncio transport for splicing.

    The transport stays the socket's owner (its writer still half-closes and closes it); its
    reading is paused, so bytes stay in the kernel until the splicer moves them.  ``fd`` is a
    duplicate of the socket's descriptor, the splicer's own: it stays valid (and its epoll
    registration stays the splicer's) whatever the transport does with its descriptor."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.fd = os.dup(writer.get_extra_info("socket").fileno())

    def close(self) -> None:
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


class _Flow:
    """One direction of a spliced pair: source socket → pipe → target socket.  Touched by the
    splicer's thread only (under its lock).

    ``readable``: the source may hold bytes we have not taken.  A read that comes back short
    (the socket had fewer bytes than the pipe has room for) clears it without the read that
    would only say ``EAGAIN``: with edge-triggered epoll every later arrival, and the peer's
    half-close, is an event of its own.  Two cases keep it set: the peer has half-closed
    (``hangup``: read on to the EOF) and a short read that the pipe's pages cut short, not the
    socket (many small socket buffers fill every page of the pipe before its bytes): the socket
    says how many bytes it still holds (``FIONREAD``)."""

    __slots__ = ("source", "target", "pipe_out", "pipe_in", "capacity", "pages", "held", "eof", "moved",
                 "readable", "writable", "hangup", "pipe_blocked", "future", "finished")

    def __init__(self, source: int, target: int, future: asyncio.Future) -> None:
        self.source, self.target, self.future = source, target, future
        self.pipe_out, self.pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pipe_in, _F_SETPIPE_SZ, PIPE_SIZE)
        self.capacity = fcntl.fcntl(self.pipe_in, _F_GETPIPE_SZ)
        self.pages = self.capacity // _PAGE
        self.held, self.eof, self.moved, self.finished = 0, False, False, False
        self.readable = self.writable = True  # until a splice says otherwise
        self.hangup = self.pipe_blocked = False

    def close(self) -> None:
        os.close(self.pipe_out)
        os.close(self.pipe_in)

    def run(self, budget: int) -> int:
        """Splice until both ends would block, EOF has been passed through or ``budget`` bytes
        have moved; returns the bytes moved.  Raises SpliceUnsupported / OSError."""
        splice = os.splice  # looked up per call: tests may wrap it
        moved = 0
        while moved < budget:
            progress = False
            if self.readable and not self.eof and self.held < self.capacity:  # fill, then one big send
                progress = self._fill(splice)
            if self.held and self.writable:
                try:
                    sent = splice(self.pipe_out, self.target, self.held, None, None, _FLAGS)
                except BlockingIOError:
                    self.writable = False
                else:
                    self.held -= sent
                    moved += sent
                    progress = True
                    if self.pipe_blocked:  # pages freed: the read the full pipe refused
                        self.readable, self.pipe_blocked = True, False
            if not progress or not (self.held or self.readable) or (self.eof and not self.held):
                return moved
        return moved

    def _fill(self, splice) -> bool:
        """One read into the pipe; whether bytes (or the EOF) came."""
        room = self.capacity - self.held
        try:
            got = splice(self.source, self.pipe_in, room, None, None, _FLAGS)
        except BlockingIOError:  # an empty socket, or a pipe whose pages are all taken
            self.readable, self.pipe_blocked = False, self.held > 0
            return False
        except OSError as error:
            if not self.moved and error.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise SpliceUnsupported(str(error)) from error
            raise
        self.moved = True
        if got == 0:
            self.eof = True
        elif got < room and not self.hangup:
            # Short: the socket is empty — unless the pipe's pages ran out first, which cannot be
            # when it started empty and took fewer bytes than it has pages (a page holds ≥ 1 byte).
            self.readable = not (self.held == 0 and got < self.pages) and _unread(self.source) != 0
        self.held += got
        return True

    @property
    def runnable(self) -> bool:
        return not self.finished and ((self.readable and not self.eof and self.held < self.capacity)
                                      or (self.writable and self.held > 0) or (self.eof and not self.held))


def _unread(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (``FIONREAD``; -1 if it cannot say: read on)."""
    try:
        return int.from_bytes(fcntl.ioctl(fd, _FIONREAD, _INT_ZERO), sys.byteorder, signed=True)
    except OSError:
        return -1


class SplicePair:
    """Both directions of one relayed connection, spliced by the :class:`Splicer`'s thread.

    ``forward`` (a → b) and ``backward`` (b → a) are futures of the relay's event loop: None once
    the direction's EOF has been passed through the pipe (the caller then half-closes the
    target), :class:`SpliceUnsupported` if the kernel refused the very first splice, ``OSError``
    for a failed connection.  ``activity.last`` is set to ``time.monotonic()`` whenever bytes move."""

    __slots__ = ("a", "b", "loop", "activity", "flows", "forward", "backward")

    def __init__(self, a: SpliceEnd, b: SpliceEnd, activity) -> None:
        self.a, self.b, self.activity = a, b, activity
        self.loop = asyncio.get_running_loop()
        self.forward, self.backward = self.loop.create_future(), self.loop.create_future()
        self.flows = (_Flow(a.fd, b.fd, self.forward), _Flow(b.fd, a.fd, self.backward))


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Splicer:
    """One thread splicing every registered pair, driven by one edge-triggered epoll set: each
    socket is registered once for its whole life, and a round of events costs one ``epoll_wait``
    plus the splices themselves — no per-chunk futures, tasks or (un)registrations on the
    asyncio loop, whose thread stays free for accepting and connecting.  ``os.splice`` and
    ``epoll_wait`` release the GIL."""

    #: Bytes one direction may move before the others get their turn (fairness): a pipeful.
    BUDGET = PIPE_SIZE

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._ends: dict[int, tuple[_Flow, _Flow]] = {}  # fd → (the flow reading it, the flow writing it)
        self._pairs: dict[int, SplicePair] = {}  # by id: the pair of each flow
        self._thread = threading.Thread(target=self._serve, name="qtbuild-splice", daemon=True)
        self._thread.start()

    def add(self, a: SpliceEnd, b: SpliceEnd, activity) -> SplicePair:
        """Start splicing a ↔ b (both ends' transports already paused)."""
        pair = SplicePair(a, b, activity)
        with self._lock:
            forward, backward = pair.flows
            self._pairs[id(forward)] = self._pairs[id(backward)] = pair
            self._ends[a.fd], self._ends[b.fd] = (forward, backward), (backward, forward)
        try:
            for fd in (a.fd, b.fd):
                self._epoll.register(fd, _EVENTS)  # the thread's next epoll_wait sees them
        except BaseException:
            self.remove(pair)
            raise
        return pair

    def remove(self, pair: SplicePair) -> None:
        """Stop splicing ``pair``; once this returns the thread no longer touches its sockets."""
        with self._lock:
            for fd in (pair.a.fd, pair.b.fd):
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
                self._ends.pop(fd, None)
            for flow in pair.flows:
                self._pairs.pop(id(flow), None)
                flow.finished = True
                flow.close()

    def _serve(self) -> None:
        pending: list[_Flow] = []
        while True:
            events = self._epoll.poll(0 if pending else -1)
            pending = self._turn(events, pending)

    def _turn(self, events: list[tuple[int, int]], pending: list[_Flow]) -> list[_Flow]:
        """One round: mark what the events made ready, then run each ready flow once.  The lock
        is taken per flow, so ``add``/``remove`` (on an event loop's thread) wait for at most
        one flow's budget, not a whole round."""
        with self._lock:
            ready = {flow for flow in pending if not flow.finished}
            for fd, mask in events:
                ends = self._ends.get(fd)
                if ends is None:
                    continue
                reading, writing = ends
                if mask & _READABLE:
                    reading.readable = True
                    if mask & _HANGUP:
                        reading.hangup = True
                    ready.add(reading)
                if mask & _WRITABLE:
                    writing.writable = True
                    if writing.held:  # room to send into matters only with bytes to send
                        ready.add(writing)
        now = time.monotonic()
        for flow in ready:
            with self._lock:
                self._step(flow, now)
        return [flow for flow in ready if flow.runnable]

    def _step(self, flow: _Flow, now: float) -> None:
        pair = self._pairs.get(id(flow))
        if pair is None or flow.finished:
            return
        try:
            if flow.run(self.BUDGET):
                pair.activity.last = now
        except Exception as error:  # noqa: BLE001 - the relay reports it; the thread serves on
            self._finish(pair, flow, error)
            return
        if flow.eof and not flow.held:
            self._finish(pair, flow, None)

    @staticmethod
    def _finish(pair: SplicePair, flow: _Flow, error: BaseException | None) -> None:
        flow.finished = True
        with contextlib.suppress(RuntimeError):  # the relay's loop is closed: nobody is waiting
            pair.loop.call_soon_threadsafe(_settle, flow.future, error)


_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_splicer: Splicer | None = None
_splicer_lock = threading.Lock()


def splicer() -> Splicer:
    """This process's splicer (started on first use)."""
    global _splicer
    with _splicer_lock:
        if _splicer is None:
            _splicer = Splicer()
        return _splicer


def _forget_splicer() -> None:
    global _splicer, _splicer_lock
    _splicer, _splicer_lock = None, threading.Lock()  # the thread did not survive the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_splicer)
