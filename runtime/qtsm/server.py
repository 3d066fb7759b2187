"""A SecurityModule served on a Unix stream socket: the transport behind an enclave's /dev/qtsm.

The manager binds the socket into the sandbox at ``/dev/qtsm`` and ``/dev/nsm``; only that
enclave can reach it (the socket is created mode 0600 in its final place by an atomic rename,
and ``allowed_uids`` can further restrict peers by SO_PEERCRED).

Framing, both directions: a 4-byte big-endian length, then that many bytes of CBOR.  One
response per request, in order; a connection may carry any number of requests.

* A request length over 4096 bytes is answered ``{"Error": "InputTooLarge"}`` without reading
  the body, and the connection is closed (the stream cannot be resynchronised).
* A connection idle (or stalled mid-frame) for ``idle_timeout`` seconds is closed.
* At most ``max_connections`` connections are served at once; further ones are closed at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import threading
from pathlib import Path

import cbor2

from qtbuild.formats.attestation import (
    MAX_REQUEST_SIZE,
    ErrorCode,
    ModuleError,
    encode_error,
)
from qtbuild.formats.cose import loads_strict
from qtbuild.formats.errors import FormatError
from qtbuild.runtime.qtsm.clouds import PROFILES
from qtbuild.runtime.qtsm.device import SecurityModule

HEADER = struct.Struct(">I")
#: The largest response any cloud profile's device returns.
LARGEST_RESPONSE = max(profile.max_response for profile in PROFILES.values())
_ACCEPT_POLL = 0.2
_PEERCRED = struct.Struct("3i")


class Server:
    """A running device server; :meth:`close` (or ``with``) stops it and removes the socket."""

    def __init__(
        self,
        device: SecurityModule,
        socket_path: str | os.PathLike,
        *,
        mode: int = 0o600,
        max_connections: int = 16,
        idle_timeout: float = 60.0,
        allowed_uids: set[int] | None = None,
    ) -> None:
        self.device, self.path = device, Path(socket_path)
        self.max_connections, self.idle_timeout = max_connections, idle_timeout
        self.allowed_uids = allowed_uids
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._guard = threading.Lock()
        self._listener, self._inode = _listen(self.path, mode)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"qtsm {self.path}",
                                          daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, end open connections, wait for handlers, unlink our socket file."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._acceptor.join()
        self._listener.close()
        with self._guard:
            connections, handlers = list(self._connections), list(self._handlers)
        for connection in connections:
            _shutdown(connection)
        for handler in handlers:
            handler.join(timeout=5)
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._admit(connection):
                connection.close()
                continue
            handler = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            with self._guard:
                self._connections.add(connection)
                self._handlers.add(handler)
            handler.start()

    def _admit(self, connection: socket.socket) -> bool:
        with self._guard:
            if len(self._connections) >= self.max_connections:
                return False
        if self.allowed_uids is None:
            return True
        try:
            credentials = connection.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
            )
        except OSError:
            return False
        _, uid, _ = _PEERCRED.unpack(credentials)
        return uid in self.allowed_uids

    def _serve(self, connection: socket.socket) -> None:
        connection.settimeout(self.idle_timeout)
        try:
            while not self._closing.is_set() and self._serve_one(connection):
                pass
        except OSError:
            pass  # peer went away, timed out, or close() shut the socket
        finally:
            connection.close()
            with self._guard:
                self._connections.discard(connection)
                self._handlers.discard(threading.current_thread())

    def _serve_one(self, connection: socket.socket) -> bool:
        """Answer one framed request; False when the connection should end."""
        header = _recv_exact(connection, HEADER.size)
        if header is None:
            return False
        (length,) = HEADER.unpack(header)
        if length > MAX_REQUEST_SIZE:
            connection.sendall(_frame(encode_error(ErrorCode.INPUT_TOO_LARGE)))
            return False
        body = _recv_exact(connection, length)
        if body is None:
            return False
        connection.sendall(_frame(self.device.handle(body)))
        return True


def serve_device(device: SecurityModule, socket_path: str | os.PathLike, **options) -> Server:
    """Start serving ``device`` at ``socket_path`` (options: see :class:`Server`)."""
    return Server(device, socket_path, **options)


def request(socket_path: str | os.PathLike, request_obj: object, *, timeout: float = 10.0):
    """Send one request (a CBOR-able object, or raw bytes as-is) and return the decoded response.

    ModuleError(InvalidResponse) when the answer is not one bounded CBOR item.
    """
    payload = request_obj if isinstance(request_obj, bytes) else cbor2.dumps(request_obj)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        connection.connect(os.fspath(socket_path))
        connection.sendall(_frame(payload))
        header = _recv_exact(connection, HEADER.size)
        if header is None:
            raise ModuleError(ErrorCode.INVALID_RESPONSE, "connection closed without a response")
        (length,) = HEADER.unpack(header)
        if length > LARGEST_RESPONSE:
            raise ModuleError(ErrorCode.INVALID_RESPONSE, f"response of {length} bytes")
        body = _recv_exact(connection, length)
    if body is None:
        raise ModuleError(ErrorCode.INVALID_RESPONSE, "truncated response")
    try:
        return loads_strict(body, what="response", max_size=LARGEST_RESPONSE)
    except FormatError as exc:
        raise ModuleError(ErrorCode.INVALID_RESPONSE, str(exc)) from None


def _listen(path: Path, mode: int) -> tuple[socket.socket, int]:
    """Bind a listening socket at ``path`` with ``mode``, replacing only a stale socket file.

    The socket is bound under a temporary name, chmod-ed, then renamed into place, so it is
    never reachable with wider permissions.  Returns the socket and the file's inode.
    """
    if len(os.fsencode(path)) >= 108:
        raise ValueError(f"socket path too long for AF_UNIX (≥ 108 bytes): {path}")
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        temporary.unlink(missing_ok=True)
        listener.bind(os.fspath(temporary))
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        listener.listen(16)
        listener.settimeout(_ACCEPT_POLL)
        return listener, os.stat(path).st_ino
    except BaseException:
        listener.close()
        temporary.unlink(missing_ok=True)
        raise


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def _recv_exact(connection: socket.socket, size: int) -> bytes | None:
    """Exactly ``size`` bytes, or None when the peer closes first."""
    chunks, remaining = [], size
    while remaining:
        chunk = connection.recv(min(remaining, 65536))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _shutdown(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
