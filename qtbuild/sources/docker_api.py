"""The Docker Engine API spoken over the daemon's socket with the standard library: one HTTP/1.1 GET
per connection, its status, headers and body (``Content-Length``, chunked, or up to the close).

Importing the Docker SDK (docker, requests, urllib3) costs 0.16-0.25 s, and the save request of
``docker://`` should leave as early as the command allows (docs/images.md, "Sources"), so the
requests this needs are sent here.  Only what a plain socket can reach is handled:
``DOCKER_HOST`` unset (``/var/run/docker.sock``), ``unix://PATH``, or ``tcp://HOST:PORT`` without
TLS; :func:`socket_address` returns None for anything else (TLS, ``ssh://``), which goes through
the SDK.

Contract: :func:`get` connects, sends the request (:func:`send`) and reads the status line and
headers (:func:`receive`; each
line at most :data:`MAX_HEADER_LINE` bytes, at most :data:`MAX_HEADERS` lines); connection errors
are ``OSError`` (``FileNotFoundError`` for a missing socket, ``PermissionError``,
``ConnectionRefusedError``), a malformed answer is :class:`ProtocolError`.  A
:class:`Response`'s body is read once, by :meth:`Response.read` (bounded) or
:meth:`Response.chunks`; a body cut short is a :class:`ProtocolError`.  Paths are sent without an
API version prefix: the daemon then answers at its own current version, which it names in the
``Api-Version`` header of every answer (moby ``api/server/server.go`` registers every route with
and without the ``/v1.xx`` prefix; ``api/server/middleware/version.go`` sets the header).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

DEFAULT_SOCKET = "/var/run/docker.sock"
DEFAULT_TCP_PORT = 2375
MAX_HEADER_LINE = 8192
MAX_HEADERS = 100
#: An error body is a short JSON document ({"message": ...}).
MAX_ERROR_BODY = 64 * 1024
CONNECT_TIMEOUT = 10.0


class ProtocolError(Exception):
    """The daemon's answer is not the HTTP it should be (or it ended early)."""


@dataclass(frozen=True)
class SocketAddress:
    """Where the daemon listens: ``family`` and ``target`` as :func:`socket.socket` and ``connect`` take them."""

    url: str
    family: int
    target: str | tuple[str, int]


def socket_address(environ: Mapping[str, str] | None = None) -> SocketAddress | None:
    """``DOCKER_HOST`` (the docker CLI's default socket when unset) as a plain socket; None when reaching it
    needs more than a socket (TLS for ``tcp://`` with ``DOCKER_TLS_VERIFY`` or ``DOCKER_CERT_PATH``; ``ssh://``)."""
    if environ is None:
        environ = os.environ
    url = environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    scheme, _, rest = url.partition("://")
    if scheme == "unix" and rest:
        return SocketAddress(url, socket.AF_UNIX, rest)
    if scheme in ("tcp", "http") and not (environ.get("DOCKER_TLS_VERIFY") or environ.get("DOCKER_CERT_PATH")):
        parsed = urllib.parse.urlsplit(f"http://{rest}")
        try:
            port = parsed.port or DEFAULT_TCP_PORT
        except ValueError:
            return None
        if parsed.hostname and parsed.path in ("", "/"):
            return SocketAddress(url, socket.AF_INET6 if ":" in parsed.hostname else socket.AF_INET,
                                 (parsed.hostname, port))
    return None


def api_path(template: str, *names: str, query: dict[str, str] | None = None) -> str:
    """``template`` with ``names`` quoted into it as the Docker SDK quotes them (``/`` and ``:`` kept)."""
    path = template.format(*(urllib.parse.quote(name, safe="/:") for name in names))
    return path + ("?" + urllib.parse.urlencode(query) if query else "")


class Response:
    """An answer's status and headers; its body is read once (see the module docstring)."""

    def __init__(self, sock: socket.socket, reader, status: int, headers: dict[str, str]):
        self._sock = sock
        self._reader = reader
        self.status = status
        self.headers = headers  # names in lower case

    @property
    def api_version(self) -> tuple[int, ...]:
        """The daemon's API version from its ``Api-Version`` header; (0,) when it names none."""
        try:
            return tuple(int(part) for part in self.headers.get("api-version", "").split("."))
        except ValueError:
            return (0,)

    def read(self, limit: int) -> bytes:
        """The whole body; ProtocolError if it exceeds ``limit`` bytes."""
        parts, size = [], 0
        for chunk in self.chunks(min(limit + 1, 1 << 20)):
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"answer larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def error_message(self) -> str:
        """An error answer's ``message`` (moby's ``{"message": ...}``) on one line, else its status."""
        try:
            document = json.loads(self.read(MAX_ERROR_BODY))
        except (ProtocolError, OSError, ValueError):
            document = None
        message = document.get("message") if isinstance(document, dict) else None
        if not isinstance(message, str) or not message.strip():
            return f"HTTP status {self.status}"
        return " ".join(message.split())[:500]

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """The body in pieces of ``size`` bytes (the last may be shorter); closes the connection at its end."""
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                yield from _dechunked(self._reader, size)
            elif "content-length" in self.headers:
                length = self.headers["content-length"]
                if not length.isdigit():
                    raise ProtocolError(f"malformed Content-Length {length[:40]!r}")
                yield from _exactly(self._reader, int(length), size)
            else:
                while data := self._reader.read(size):
                    yield data
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        self._reader.close()
        self._sock.close()


def get(address: SocketAddress, path: str, *, timeout: float | None) -> Response:
    """``GET path`` on a new connection to ``address``; ``timeout`` bounds each receive (None: wait)."""
    return receive(send(address, path, timeout=timeout))


def send(address: SocketAddress, path: str, *, timeout: float | None) -> socket.socket:
    """Connect to ``address`` and send ``GET path``; :func:`receive` reads the answer (the caller closes the
    socket if it never does)."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(address.target)
        sock.settimeout(timeout)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: qtbuild\r\n"
                     "Connection: close\r\n\r\n".encode("ascii"))
    except BaseException:
        sock.close()
        raise
    return sock


def receive(sock: socket.socket) -> Response:
    """The answer to the request :func:`send` sent on ``sock`` (which it now owns): status and headers."""
    try:
        reader = sock.makefile("rb", buffering=1 << 20)
        try:
            status, headers = _head(reader)
        except BaseException:
            reader.close()
            raise
    except BaseException:
        sock.close()
        raise
    return Response(sock, reader, status, headers)


def _line(reader, what: str) -> bytes:
    line = reader.readline(MAX_HEADER_LINE + 1)
    if not line:
        raise ProtocolError(f"the daemon closed the connection in {what}")
    if len(line) > MAX_HEADER_LINE or not line.endswith(b"\n"):
        raise ProtocolError(f"{what} line over {MAX_HEADER_LINE} bytes")
    return line.rstrip(b"\r\n")


def _head(reader) -> tuple[int, dict[str, str]]:
    version, _, rest = _line(reader, "the status").partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise ProtocolError("not an HTTP answer")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = _line(reader, "the headers")
        if not line:
            return int(code), headers
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise ProtocolError(f"malformed header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    raise ProtocolError(f"more than {MAX_HEADERS} header lines")


def _exactly(reader, length: int, size: int) -> Iterator[bytes]:
    while length:
        data = reader.read(min(size, length))
        if not data:
            raise ProtocolError(f"the answer ended {length} bytes early")
        length -= len(data)
        yield data


def _dechunked(reader, size: int) -> Iterator[bytes]:
    """A chunked body regrouped into pieces of ``size`` bytes.  The daemon flushes every write of its save
    (moby's ``ioutils.NewWriteFlusher``): 32 KiB chunks, which regrouped cost one hash update and one write
    call per MiB downstream instead of thirty-two."""
    buffer = memoryview(bytearray(size))
    filled = 0
    while True:
        header = _line(reader, "a chunk size")
        try:
            left = int(header.split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolError(f"malformed chunk size {header[:40]!r}") from None
        if left < 0:
            raise ProtocolError(f"malformed chunk size {header[:40]!r}")
        if left == 0:
            while _line(reader, "the trailer"):
                pass
            if filled:
                yield bytes(buffer[:filled])
            return
        while left:
            take = min(left, size - filled)
            got = reader.readinto(buffer[filled:filled + take])
            if got != take:
                raise ProtocolError("the answer ended inside a chunk")
            filled += take
            left -= take
            if filled == size:
                yield bytes(buffer)
                filled = 0
        if _line(reader, "a chunk end"):
            raise ProtocolError("a chunk is longer than its size")
