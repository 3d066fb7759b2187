"""The KMS's HTTP/1.1 transport: a threaded server that frames requests for ``KmsService``.

Bounds: request bodies need a ``Content-Length`` of at most MAX_BODY bytes (no chunked
encoding, no repeated header names: 400 / 413 otherwise, and the connection closes); each socket read waits at most
``io_timeout`` seconds and a whole request at most REQUEST_DEADLINE; at most
``max_connections`` connections are served at once (one thread each) — the next ones get
``503 KMS.0102`` and are closed.  Keep-alive is supported.  Errors of the HTTP layer itself
(malformed request line, oversized headers) also answer with a KMS error body.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.kms.service import KmsService, Request, Response

log = logging.getLogger("qtbuild.kms")

MAX_BODY = 64 * 1024
REQUEST_DEADLINE = 60.0
DEFAULT_IO_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 256
_CHUNK = 16 * 1024


class KmsHttpServer(ThreadingHTTPServer):
    """``KmsHttpServer((host, port), service)``; ``serve_forever`` / ``shutdown`` as usual."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: KmsService, *,
                 io_timeout: float = DEFAULT_IO_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.service, self.io_timeout = service, io_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    @property
    def endpoint(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _refuse_busy(sock) -> None:
    body = json.dumps(KmsError("KMS.0102").body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.settimeout(1.0)
        sock.sendall(head + body)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "qtbuild-kms"
    sys_version = ""
    #: Buffered writes: head and body leave in one segment (no Nagle / delayed-ACK stalls);
    #: http.server flushes after every request.
    wbufsize = 64 * 1024
    server: KmsHttpServer

    def setup(self) -> None:
        self.request.settimeout(self.server.io_timeout)  # what StreamRequestHandler does with .timeout
        if self.request.family in (socket.AF_INET, socket.AF_INET6):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().setup()

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except KmsError as error:
            self.close_connection = True
            self._send(self.server.service.refuse(error, self._request(b"")))
            return
        self._send(self.server.service.serve(self._request(body)))

    def _other_method(self) -> None:
        self._send(self.server.service.serve(self._request(b"")))

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _other_method

    def _request(self, body: bytes) -> Request:
        url = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        return Request(self.command, url.path, url.query, headers, body,
                       f"{self.client_address[0]}:{self.client_address[1]}")

    def _read_body(self) -> bytes:
        names = [name.lower() for name in self.headers]
        if len(names) != len(set(names)):
            raise KmsError("KMS.0308", "Invalid headers: a header name is repeated.")
        if self.headers.get("Transfer-Encoding"):
            raise KmsError("KMS.0204", "Chunked request bodies are not accepted; "
                                       "send Content-Length.")
        text = self.headers.get("Content-Length")
        if text is None or not text.isdigit() or len(text) > 12:
            raise KmsError("KMS.0204", "The request needs a valid Content-Length.")
        length = int(text)
        if length > MAX_BODY:
            raise KmsError("KMS.0203", f"The request body exceeds {MAX_BODY} bytes.")
        return self._read_exactly(length)

    def _read_exactly(self, length: int) -> bytes:
        deadline, chunks, remaining = time.monotonic() + REQUEST_DEADLINE, [], length
        while remaining:
            chunk = self.rfile.read1(min(remaining, _CHUNK))
            if not chunk or time.monotonic() > deadline:
                raise KmsError("KMS.0204", "The request body ended early or arrived too slowly.")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _send(self, response: Response) -> None:
        data = json.dumps(response.body, separators=(",", ":")).encode()
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Request-Id", response.request_id)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None
                   ) -> None:
        """http.server's own errors (bad request line, headers too long…) as KMS errors."""
        error = KmsError("KMS.0202", f"HTTP {code}: {message or 'bad request'}.")
        data = json.dumps(error.body()).encode()
        self.close_connection = True
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(data)
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def serve_until_signalled(server: KmsHttpServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, let running requests finish
    (threads are daemons: at most ``io_timeout`` more) and close the listening socket."""
    stop = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop.set())
                for number in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=server.serve_forever, name="kms-http", daemon=True)
    worker.start()
    try:
        while not stop.wait(0.5) and worker.is_alive():
            pass
    finally:
        server.shutdown()
        server.server_close()
        for number, handler in previous.items():
            signal.signal(number, handler)
