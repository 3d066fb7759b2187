"""The debug console: a bounded ring buffer of the application's output and the socket that
serves it to one reader at a time.

:class:`RingBuffer` keeps the last ``capacity`` bytes (1 MiB by default) at absolute
positions; :meth:`RingBuffer.follow` yields what is buffered from a position on, then waits for
more, and ends once the buffer is closed and drained.  A follower that falls more than
``capacity`` behind skips what was overwritten (output is never blocked by a slow reader).

:class:`ConsoleServer` listens on a Unix socket (mode 0600).  Protocol: the server sends one
line, ``OK`` (then the buffered output and everything after it, until the enclave stops: EOF)
or ``BUSY`` (another reader is attached; the connection is closed).  Readers never send; a
reader that hangs up frees the console within ``HANGUP_POLL`` seconds.  :func:`read_console` is
the client: it copies the stream to a binary file and raises :class:`ConsoleBusy`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DEFAULT_CAPACITY", "ConsoleBusy", "ConsoleServer", "RingBuffer", "pump", "read_console"]

DEFAULT_CAPACITY = 1 << 20
OK, BUSY = b"OK\n", b"BUSY\n"
_CHUNK = 64 * 1024
HANGUP_POLL = 0.5


class RingBuffer:
    """Thread-safe bounded byte log with followers (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        self._start = 0      # absolute position of the first buffered byte
        self._end = 0        # absolute position after the last byte
        self._closed = False
        self._changed = threading.Condition()

    @property
    def start(self) -> int:
        return self._start

    def append(self, data: bytes) -> None:
        if not data:
            return
        with self._changed:
            self._chunks.append((self._end, bytes(data)))
            self._end += len(data)
            self._trim()
            self._changed.notify_all()

    def close(self) -> None:
        """No more output: followers end once they have read everything."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def read(self, position: int, timeout: float | None = None) -> tuple[int, bytes] | None:
        """``(next position, bytes from position on)``, waiting up to ``timeout`` for data
        (``b""`` on timeout); None at the end (closed and drained)."""
        with self._changed:
            if position >= self._end and not self._closed:
                self._changed.wait(timeout)
            position = max(position, self._start)
            if position >= self._end:
                return None if self._closed else (position, b"")
            data = b"".join(chunk[max(0, position - offset):] for offset, chunk in self._chunks
                            if offset + len(chunk) > position)
            return self._end, data

    def follow(self, position: int | None = None) -> Iterator[bytes]:
        """Everything from ``position`` (default: the oldest buffered byte) until the end."""
        position = self._start if position is None else position
        while (result := self.read(position)) is not None:
            position, data = result
            if data:
                yield data

    def _trim(self) -> None:
        excess = (self._end - self._start) - self.capacity
        while excess > 0:
            offset, chunk = self._chunks[0]
            if len(chunk) <= excess:
                self._chunks.popleft()
                cut = len(chunk)
            else:
                self._chunks[0] = (offset + excess, chunk[excess:])
                cut = excess
            self._start += cut
            excess -= cut


def pump(fd: int, ring: RingBuffer) -> None:
    """Copy ``fd`` into ``ring`` until EOF, then close both (run it in a thread)."""
    try:
        while data := os.read(fd, _CHUNK):
            ring.append(data)
    finally:
        os.close(fd)
        ring.close()


class ConsoleServer:
    """Serves ``ring`` on the Unix socket ``path`` to one reader at a time."""

    def __init__(self, ring: RingBuffer, path: str | os.PathLike) -> None:
        self.ring = ring
        self.path = Path(path)
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)
        self._listener.bind(os.fspath(self.path))
        # Owner-only before listen(): until then a connect() is refused whatever the mode, so the
        # process umask (shared by every thread) need not be changed to create it private.
        os.chmod(self.path, 0o600)
        self._listener.listen(4)
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="console", daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        """Stop accepting and remove the socket (a connected reader ends with the ring)."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                busy = self._reader is not None and self._reader.is_alive()
                if not busy:
                    self._reader = threading.Thread(target=self._serve, args=(connection,), daemon=True)
                    self._reader.start()
            if busy:
                _send_and_close(connection, BUSY)

    def _serve(self, connection: socket.socket) -> None:
        """Stream the ring to one reader; a reader that hangs up frees the console within
        ``HANGUP_POLL`` seconds even when there is no output to fail on."""
        try:
            connection.sendall(OK)
            position = self.ring.start
            while (result := self.ring.read(position, timeout=HANGUP_POLL)) is not None:
                position, data = result
                if data:
                    connection.sendall(data)
                elif _hung_up(connection):
                    return
        except OSError:
            pass  # the reader went away
        finally:
            connection.close()


def _hung_up(connection: socket.socket) -> bool:
    """Readers never send: readable means EOF (or an error)."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except OSError:
        return True


def _send_and_close(connection: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(data)
    connection.close()


class ConsoleBusy(Exception):
    """Another reader is attached to the console."""


def read_console(path: str | os.PathLike, output) -> None:
    """Copy the console at ``path`` to the binary file ``output`` until the enclave stops.

    ConnectionError when nobody serves ``path``; :class:`ConsoleBusy` when another reader is
    attached.  Returns quietly when ``output`` is closed by its reader (``console | head``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.connect(os.fspath(path))
        except FileNotFoundError:
            raise ConnectionRefusedError(f"no console at {path}") from None
        stream = connection.makefile("rb", buffering=0)
        greeting = _read_line(stream)
        if greeting == BUSY:
            raise ConsoleBusy("another reader is attached to this console (one reader at a time)")
        if greeting != OK:
            raise ConnectionError(f"unexpected console greeting {greeting!r}")
        while data := stream.read(_CHUNK):
            try:
                output.write(data)
                output.flush()
            except BrokenPipeError:  # the reader of our output went away: not the enclave's fault
                return


def _read_line(stream) -> bytes:
    line = b""
    while not line.endswith(b"\n") and len(line) < 16:
        byte = stream.read(1)
        if not byte:
            break
        line += byte
    return line
