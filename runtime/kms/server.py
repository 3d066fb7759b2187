"""The KMS's HTTP/1.1 transport: uvicorn (with the llhttp parser) framing requests for ``KmsService``.

Why uvicorn: a maintained production server whose parser (llhttp, Node's) rejects malformed
framing with a proper ``400`` status line, whose event loop holds thousands of idle connections
without a thread each, and which handles keep-alive, pipelining and client resets (no tracebacks).
What it lacks for a service facing hostile clients is added by :class:`_KmsProtocol`:

* **header size** — request line and headers within MAX_HEAD bytes (431), which llhttp does
  not bound by itself;
* **header deadline** — a request's line and headers must be complete within ``header_timeout``
  seconds of the connection opening (or of the previous response): a client trickling one
  header line every few seconds is answered ``408`` and cut off, however active it looks;
* **body deadline** — the body must arrive within ``body_timeout`` (``408``);
* **connection limits** — at most ``max_connections`` at once (the next get ``503 KMS.0102``:
  overload) and at most ``max_per_client`` from one IP address (the next get ``429``), so one
  client cannot take every slot.

Status lines: every answer has one.  Malformed request lines or headers, unsupported protocol
versions (``HTTP/2.0`` …) → 400; methods other than POST, GET and DELETE (TRACE, CONNECT …)
→ 405 (llhttp refuses unknown tokens with 400); GET/DELETE reach the service, which routes the
alias APIs and refuses them elsewhere; bodies over MAX_BODY → 413; chunked or length-less
bodies → 400; an over-long URL → 414.
5xx only for the server's own conditions (503 overload, 500 unexpected).  Every refusal of the
transport is reported to ``KmsService.count_refusal`` (counted and sampled in the audit log).

The KMS work runs on a thread pool of ``threads`` threads, except the data-plane cryptographic
APIs (``KmsService.runs_inline``: store reads and ~0.3 ms of CPU), which run on the event loop
itself — handing them to a thread cost more CPU than the work.  Either way the reply is sent
only once the request's audit record is committed (fsynced) by the audit log's writer thread,
which the loop awaits without blocking.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import signal
import socket
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.kms.service import KmsService, Request

log = logging.getLogger("qtbuild.kms")

MAX_BODY = 64 * 1024
MAX_HEAD = 64 * 1024        # request line and headers (llhttp itself sets no bound)
MAX_URL = 8 * 1024
DEFAULT_IO_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_PER_CLIENT = 64
DEFAULT_THREADS = 16
_JSON = (b"content-type", b"application/json;charset=UTF-8")


@dataclass(frozen=True)
class Limits:
    """The transport's bounds (seconds and connection counts)."""

    io_timeout: float = DEFAULT_IO_TIMEOUT          # an idle kept-alive connection closes
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # request line + headers complete within
    body_timeout: float = DEFAULT_BODY_TIMEOUT      # the body complete within
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_client: int = DEFAULT_MAX_PER_CLIENT


def _error_bytes(code: str, message: str | None = None) -> bytes:
    return json.dumps(KmsError(code, message).body(), separators=(",", ":")).encode()


def _raw_response(status: int, phrase: str, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json;charset=UTF-8\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


class _KmsProtocol(HttpToolsProtocol):
    """uvicorn's llhttp protocol plus connection limits and header deadlines (module docstring)."""

    kms: KmsHttpServer      # set on the subclass KmsHttpServer makes for itself

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._peer: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._started = False       # bytes of a new request arrived since the deadline was armed
        self._head_bytes = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = _CoalescingTransport(transport)  # type: ignore[assignment]  # the cycles write to it
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = self.client[0] if self.client else "?"
        limits, counts = self.kms.limits, self.kms.per_client
        if len(self.connections) > limits.max_connections:
            self._refuse_now(503, "Service Unavailable", "KMS.0102", None)
            return
        if counts[peer] >= limits.max_per_client:
            self._refuse_now(429, "Too Many Requests", "APIGW.0308",
                             f"More than {limits.max_per_client} connections from {peer}.")
            return
        counts[peer] += 1
        self._peer = peer
        self._arm_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_deadline()
        if self._peer is not None:
            counts = self.kms.per_client
            counts[self._peer] -= 1
            if counts[self._peer] <= 0:
                del counts[self._peer]
            self._peer = None
        super().connection_lost(exc)

    def _refuse_now(self, status: int, phrase: str, code: str, message: str | None) -> None:
        self.connections.discard(self)      # a refused connection holds no slot while it closes
        self.kms.report_refusal(KmsError(code, message), self.client)
        self.transport.write(_raw_response(status, phrase, _error_bytes(code, message)))
        self.transport.close()

    # -------------------------------------------------------------- the header deadline

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._started, self._head_bytes = False, 0
        self._deadline = self.loop.call_later(self.kms.limits.header_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        self._started = True
        if self._deadline is not None:      # still reading a request line and headers
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD + MAX_BODY:     # (a body may share the last segment)
                self._disarm_deadline()
                self._refuse_now(431, "Request Header Fields Too Large", "KMS.0203",
                                 f"The request line and headers exceed {MAX_HEAD} bytes.")
                return
        super().data_received(data)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if not self._started:
            # An idle (kept-alive) connection: close it without an answer, which a client
            # would otherwise read as the reply to the next request it sends.
            self.connections.discard(self)
            self.transport.close()
            return
        message = f"The request headers did not arrive within {self.kms.limits.header_timeout:g} s."
        self._refuse_now(408, "Request Timeout", "KMS.0204", message)

    def on_headers_complete(self) -> None:
        self._disarm_deadline()
        self.scope["extensions"] = {"qtbuild.transport": self.transport}  # type: ignore[dict-item]  # for _send
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm_deadline()

    def send_400_response(self, msg: str) -> None:
        """llhttp refused the request line or headers (bad syntax, HTTP/2.0, …)."""
        self._disarm_deadline()
        self._refuse_now(400, "Bad Request", "KMS.0202", f"Malformed HTTP request: {msg}")


class KmsApp:
    """The ASGI application: frame one request, run it on the thread pool, reply."""

    def __init__(self, server: KmsHttpServer) -> None:
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            body = await self._framed_body(scope, receive)
        except _Refused as refused:
            self.server.report_refusal(refused.error, scope.get("client"))
            await _send(send, scope, refused.status, _error_bytes(refused.error.code, refused.error.message),
                        close=True, extra=refused.headers)
            return
        request = Request(scope["method"], scope["path"], scope["query_string"].decode("latin-1"),
                          _headers(scope), body, _remote(scope.get("client")))
        service = self.server.service
        if service.runs_inline(request):    # quick: a thread hand-off would cost more than the work
            response, durable = service.handle(request)
        else:
            response, durable = await asyncio.get_running_loop().run_in_executor(
                self.server.executor, service.handle, request)
        if durable is not None:     # the audit record is durable before the reply leaves
            with contextlib.suppress(Exception):    # (a lost record is logged; the reply stands)
                await asyncio.wrap_future(durable)
        data = json.dumps(response.body, separators=(",", ":")).encode()
        await _send(send, scope, response.status, data, extra=((b"x-request-id", response.request_id.encode()),))

    async def _framed_body(self, scope, receive) -> bytes:
        """The request body, or _Refused naming why the transport will not pass it on."""
        if scope["http_version"] not in ("1.0", "1.1"):
            raise _Refused(400, "KMS.0202", f"HTTP/{scope['http_version']} is not supported; use HTTP/1.1.")
        if scope["method"] not in ("POST", "GET", "DELETE"):
            raise _Refused(405, "KMS.0201", f"The method {scope['method'][:16]} is not allowed; use POST.",
                           headers=((b"allow", b"POST, GET, DELETE"),))
        if len(scope["raw_path"]) + len(scope["query_string"]) > MAX_URL:
            raise _Refused(414, "KMS.0201", f"The request URL exceeds {MAX_URL} bytes.")
        names = [name for name, _ in scope["headers"]]
        if len(names) != len(set(names)):
            raise _Refused(400, "KMS.0308", "Invalid headers: a header name is repeated.")
        headers = dict(scope["headers"])
        if b"transfer-encoding" in headers:
            raise _Refused(400, "KMS.0204", "Chunked request bodies are not accepted; send Content-Length.")
        text = headers.get(b"content-length")
        if text is None and scope["method"] in ("GET", "DELETE"):
            text = b"0"     # no body
        if text is None or not text.isdigit() or len(text) > 12:
            raise _Refused(400, "KMS.0204", "The request needs a valid Content-Length.")
        if int(text) > MAX_BODY:
            raise _Refused(413, "KMS.0203", f"The request body exceeds {MAX_BODY} bytes.")
        try:
            async with asyncio.timeout(self.server.limits.body_timeout):
                return await _read_body(receive)
        except TimeoutError:
            raise _Refused(408, "KMS.0204", "The request body arrived too slowly.") from None


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, headers: tuple = ()) -> None:
        super().__init__(message)
        self.status, self.error, self.headers = status, KmsError(code, message), headers


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(400, "KMS.0204", "The client closed the connection.")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send, scope, status: int, data: bytes, *, close: bool = False, extra: tuple = ()) -> None:
    """One response; head and body leave in one write, so in one TCP segment (uvicorn writes
    them separately: a client would see a 200 head without its body if the process died
    between the two)."""
    headers = [_JSON, (b"content-length", str(len(data)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    transport = scope["extensions"]["qtbuild.transport"]      # _KmsProtocol.on_headers_complete
    transport.hold()
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
    finally:
        transport.release()


class _CoalescingTransport:
    """A connection's transport whose writes (and a close) between :meth:`hold` and
    :meth:`release` take effect at the release, the writes as one.  (It replaced TCP_CORK:
    uncorking sends the data inside ``setsockopt``, which holds the GIL, while a transport's
    ``send`` releases it.)  Everything else is the transport's."""

    def __init__(self, transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None
        self._close_held = False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def write(self, data) -> None:
        if self._held is None:
            self._transport.write(data)
        else:
            self._held.append(bytes(data))

    def close(self) -> None:
        if self._held is None:
            self._transport.close()
        else:
            self._close_held = True

    def hold(self) -> None:
        self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        if held:
            self._transport.write(b"".join(held))
        if self._close_held:
            self._close_held = False
            self._transport.close()


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _headers(scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}


def _remote(client) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


class KmsHttpServer:
    """``KmsHttpServer((host, port), service)``: bound at once; ``serve_forever`` (blocking, any
    thread) until ``shutdown``; ``server_close`` releases the socket."""

    def __init__(self, address: tuple[str, int], service: KmsService, *,
                 io_timeout: float = DEFAULT_IO_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_per_client: int = DEFAULT_MAX_PER_CLIENT,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT,
                 threads: int = DEFAULT_THREADS, tls: tuple[Path, Path] | None = None) -> None:
        """``tls`` = (certificate chain PEM file, private key PEM file): serve HTTPS."""
        self.service = service
        self.tls = tls
        self.limits = Limits(io_timeout, header_timeout, body_timeout, max_connections, max_per_client)
        self.per_client: Counter[str] = Counter()
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kms")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(1024)
        self.server_address = self.socket.getsockname()
        self._config = uvicorn.Config(
            KmsApp(self), http=type("KmsProtocol", (_KmsProtocol,), {"kms": self}), lifespan="off",
            log_config=None, access_log=False, server_header=False, timeout_keep_alive=int(max(1, io_timeout)),
            timeout_graceful_shutdown=5, h11_max_incomplete_event_size=16 * 1024, backlog=1024,
            ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None)
        self._uvicorn = uvicorn.Server(self._config)
        self._stopped = threading.Event()

    @property
    def endpoint(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def report_refusal(self, error: KmsError, client) -> None:
        """A refusal of the transport itself (no request reached the service)."""
        self.service.count_refusal(error, _remote(client))

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._uvicorn.serve(sockets=[self.socket]))
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._stopped.wait(30)

    def server_close(self) -> None:
        self.socket.close()
        self.executor.shutdown(wait=False)
        self.service.flush()


def quiet_parser_warnings(verbose: bool) -> None:
    """uvicorn logs every unparseable request as a warning; hostile clients would flood the
    service's stderr with them (they are counted in the audit log instead)."""
    logging.getLogger("uvicorn.error").setLevel(logging.DEBUG if verbose else logging.ERROR)


def serve_until_signalled(server: KmsHttpServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, let running requests finish (at most
    5 s) and close the listening socket."""
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
