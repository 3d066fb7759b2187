"""A Docker daemon stand-in on a real Unix socket, for the error paths a real daemon will not produce
on demand (an error in the middle of a save, a body cut short, a newer API version).

``FakeDocker(path, handler)`` accepts connections on ``path`` on a thread; for each request it calls
``handler(path_and_query)``, which returns the raw bytes of the whole answer (status line, headers,
body) or an iterable of byte strings sent one after another (a generator may block, e.g. on an
Event, to play a daemon still exporting).  ``requests`` lists the request targets received;
``closed`` is set when a client closed its connection before the answer was sent in full.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable


def answer(status: int, body: bytes = b"", *, api_version: str = "1.41", reason: str = "X",
           content_type: str = "application/json") -> bytes:
    """A complete answer with a Content-Length body."""
    return (f"HTTP/1.1 {status} {reason}\r\nApi-Version: {api_version}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def error(status: int, message: str, *, api_version: str = "1.41") -> bytes:
    """moby's error answer: ``{"message": ...}``."""
    return answer(status, json.dumps({"message": message}).encode(), api_version=api_version)


def chunked_head(*, api_version: str = "1.41") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nApi-Version: {api_version}\r\nContent-Type: application/x-tar\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class FakeDocker:
    """See the module docstring; use as a context manager."""

    def __init__(self, path: str, handler: Callable[[str], bytes | Iterable[bytes]]):
        self.path = path
        self.handler = handler
        self.requests: list[str] = []
        self.closed = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                data = connection.recv(65536)
                if not data:
                    return
                request += data
            target = request.split(b" ", 2)[1].decode()
            self.requests.append(target)
            reply = self.handler(target)
            try:
                for part in [reply] if isinstance(reply, bytes) else reply:
                    connection.sendall(part)
            except OSError:
                self.closed.set()

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> FakeDocker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
