"""qt-proxy: on the parent, forward vsock connections from enclaves to TCP endpoints (outbound)
and TCP connections from the parent's network to enclaves' vsock ports (inbound).

Each route listens on a vsock port of this process's CID (3 on a parent) through
``qtbuild.runtime.sdk.vsock`` and forwards every connection to ``host:port`` over TCP.  asyncio, one handler
task per connection; the bytes move zero-copy on one splicing thread for all connections
(``qtbuild.runtime.sdk.splice``; copied by two pump tasks where the kernel cannot splice) — no
worker pool, so no fixed cap on concurrency (unlike nitro's vsock-proxy, issue #413).

Per connection
    1. Refused (closed at once, logged) when ``max_connections`` connections are already open
       across all routes, or when shutting down.
    2. The route's host is resolved afresh (no stale DNS).  With an allowlist, the destination
       passes if ``(host, port)`` equals an entry exactly; otherwise only those resolved
       addresses that are also resolved addresses of an entry with the same port are kept
       (entries are re-resolved every time, too).  Nothing left → refused and logged.  Without an
       allowlist, the configured routes are trusted as they are.
    3. The permitted addresses are tried in order within ``connect_timeout``; an unreachable
       upstream closes that client connection and logs a warning — the proxy keeps serving.
    4. Bytes are relayed both ways; EOF is passed on as a half-close.  A connection on which no
       byte moved in either direction for ``idle_timeout`` seconds is closed.

Shutdown (``Proxy.shutdown``; SIGTERM/SIGINT in ``run``): stop accepting and remove the socket
files, let open streams finish for up to ``drain_timeout`` seconds, then cut the rest.  A stream
on which nothing moves for ``QUIET_CUT`` seconds meanwhile (a kept-alive connection between
requests) is cut at once, so an idle proxy stops within about a second.  A second signal cuts
them all at once.  The log says when it stops.

Configuration file (TOML)::

    max_connections = 1024      # optional, all routes together
    idle_timeout = 300          # seconds, optional
    connect_timeout = 10        # seconds, optional
    drain_timeout = 10          # seconds, optional

    [[routes]]
    vsock_port = 8000
    host = "kms.example.com"
    port = 443

    [allowlist]                 # optional; also accepted: allowlist = [{...}, ...]
    entries = [{ host = "kms.example.com", port = 443 }]   # "address" works for "host" (nitro)

    [[inbound]]                 # parent TCP listener -> enclave vsock port
    tcp_port = 8443
    cid = 16
    vsock_port = 5005
    listen_host = "127.0.0.1"   # optional (default 127.0.0.1)

    inbound_allowlist = [{ cid = 16, port = 5005 }]   # optional: enclave ports that may be reached

QingTian qproxy's ``[[outbound_connections]] hostname, vsock_port, tcp_port`` tables are accepted
as routes too.  Inbound connections are checked against ``inbound_allowlist`` (when given) on
every connection, like outbound ones against ``allowlist``; the enclave side (the SDK's
``python -m qtbuild_sdk.proxy``) keeps its own allowlist of peers.  Unknown keys, wrong types,
out-of-range values and duplicate vsock ports are errors (``ProxyConfigError``, naming the file
and the key).

Logs go to the ``qtbuild.proxy`` logger (the CLI sends them to stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import select
import signal
import socket
import time
import tomllib
from dataclasses import dataclass

from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.sdk.relay import CHUNK, Activity, hold, relay

log = logging.getLogger("qtbuild.proxy")

# Shutting down, a connection quiet this long is idle (kept alive between requests) and is cut
# without waiting for the drain period; QUIET_POLL is how often the drain looks.
QUIET_CUT = 0.5
QUIET_POLL = 0.1
_TCP_PORT_MAX = 65535
_LIMITS = {"max_connections": int, "idle_timeout": float, "connect_timeout": float, "drain_timeout": float}


class ProxyConfigError(ValueError):
    """The proxy configuration is invalid; the message names the file and key."""


@dataclass(frozen=True)
class Route:
    """Connections to ``vsock_port`` go to TCP ``host:port``."""

    vsock_port: int
    host: str
    port: int


@dataclass(frozen=True)
class AllowEntry:
    """A permitted destination: exactly ``host`` (string) and ``port``, or its resolved addresses."""

    host: str
    port: int


@dataclass(frozen=True)
class InboundRoute:
    """TCP connections to ``listen_host:tcp_port`` on the parent go to enclave ``cid``'s
    ``vsock_port``."""

    tcp_port: int
    cid: int
    vsock_port: int
    listen_host: str = "127.0.0.1"


@dataclass(frozen=True)
class InboundAllow:
    """An enclave port inbound connections may reach."""

    cid: int
    port: int


@dataclass(frozen=True)
class ProxyConfig:
    """Routes, optional allowlists (None: routes trusted as given) and limits."""

    routes: tuple[Route, ...]
    allowlist: tuple[AllowEntry, ...] | None = None
    max_connections: int = 1024
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    drain_timeout: float = 10.0
    inbound: tuple[InboundRoute, ...] = ()
    inbound_allowlist: tuple[InboundAllow, ...] | None = None

    def __post_init__(self) -> None:
        if not self.routes and not self.inbound:
            raise ProxyConfigError("no routes: give [[routes]] / [[inbound]] in the config, -l/-a/-p or --inbound")
        listeners = [(route.listen_host, route.tcp_port) for route in self.inbound]
        if len(set(listeners)) != len(listeners):
            raise ProxyConfigError("an inbound TCP port is given twice")
        ports = [route.vsock_port for route in self.routes]
        duplicates = sorted({port for port in ports if ports.count(port) > 1})
        if duplicates:
            raise ProxyConfigError(f"vsock port(s) routed twice: {', '.join(map(str, duplicates))}")
        if self.max_connections < 1:
            raise ProxyConfigError("max_connections must be at least 1")
        if min(self.idle_timeout, self.connect_timeout) <= 0 or self.drain_timeout < 0:
            raise ProxyConfigError("timeouts must be positive (drain_timeout may be 0)")


# --- configuration file --------------------------------------------------------------------------

def load_config(path) -> ProxyConfig:
    """Read and validate a TOML proxy configuration."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ProxyConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ProxyConfigError(f"{path}: {exc.strerror or exc}") from None
    return parse_config(data, source=str(path))


def parse_config(data: dict, *, source: str = "config") -> ProxyConfig:
    """Validate an already parsed configuration document (see the module docstring)."""
    try:
        return _parse(data)
    except ProxyConfigError as exc:
        raise ProxyConfigError(f"{source}: {exc}") from None


def _parse(data: dict) -> ProxyConfig:
    _check_keys(data, {"routes", "outbound_connections", "allowlist", "inbound", "inbound_allowlist", *_LIMITS},
                "top level", required=set())
    routes = [_route(table, f"routes[{i}]") for i, table in enumerate(_tables(data.get("routes", []), "routes"))]
    outbound = _tables(data.get("outbound_connections", []), "outbound_connections")
    routes += [_qproxy_route(table, f"outbound_connections[{i}]") for i, table in enumerate(outbound)]
    allowlist = _allowlist(data["allowlist"]) if "allowlist" in data else None
    limits = {key: _limit(data[key], key, kind) for key, kind in _LIMITS.items() if key in data}
    inbound_tables = _tables(data.get("inbound", []), "inbound")
    inbound = tuple(_inbound(table, f"inbound[{i}]") for i, table in enumerate(inbound_tables))
    inbound_allowlist = None
    if "inbound_allowlist" in data:
        tables = _tables(data["inbound_allowlist"], "inbound_allowlist")
        inbound_allowlist = tuple(_inbound_allow(table, f"inbound_allowlist[{i}]") for i, table in enumerate(tables))
    return ProxyConfig(tuple(routes), allowlist, **limits, inbound=inbound, inbound_allowlist=inbound_allowlist)


def _inbound(table: dict, where: str) -> InboundRoute:
    _check_keys(table, {"tcp_port", "cid", "vsock_port", "listen_host"}, where,
                required={"tcp_port", "cid", "vsock_port"})
    return InboundRoute(_tcp_port(table["tcp_port"], f"{where}.tcp_port"), _cid(table["cid"], f"{where}.cid"),
                        _vsock_port(table["vsock_port"], f"{where}.vsock_port"),
                        _host(table.get("listen_host", "127.0.0.1"), f"{where}.listen_host"))


def _inbound_allow(table: dict, where: str) -> InboundAllow:
    _check_keys(table, {"cid", "port"}, where)
    return InboundAllow(_cid(table["cid"], f"{where}.cid"), _vsock_port(table["port"], f"{where}.port"))


def _cid(value, where: str) -> int:
    return _integer(value, where, 3, vsock.VMADDR_PORT_ANY - 1)


def _route(table: dict, where: str) -> Route:
    _check_keys(table, {"vsock_port", "host", "port"}, where)
    return Route(_vsock_port(table["vsock_port"], f"{where}.vsock_port"), _host(table["host"], f"{where}.host"),
                 _tcp_port(table["port"], f"{where}.port"))


def _qproxy_route(table: dict, where: str) -> Route:
    _check_keys(table, {"hostname", "vsock_port", "tcp_port"}, where)
    return Route(_vsock_port(table["vsock_port"], f"{where}.vsock_port"),
                 _host(table["hostname"], f"{where}.hostname"), _tcp_port(table["tcp_port"], f"{where}.tcp_port"))


def _allowlist(value) -> tuple[AllowEntry, ...]:
    if isinstance(value, dict):
        _check_keys(value, {"entries"}, "allowlist")
        value = value["entries"]
    tables = _tables(value, "allowlist.entries")
    return tuple(_allow_entry(table, f"allowlist.entries[{i}]") for i, table in enumerate(tables))


def _allow_entry(table: dict, where: str) -> AllowEntry:
    host_key = "address" if "address" in table and "host" not in table else "host"
    _check_keys(table, {host_key, "port"}, where)
    return AllowEntry(_host(table[host_key], f"{where}.{host_key}"), _tcp_port(table["port"], f"{where}.port"))


def _tables(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ProxyConfigError(f"{where}: expected an array of tables")
    return value


def _check_keys(table: dict, expected: set, where: str, *, required: set | None = None) -> None:
    unknown = sorted(set(table) - expected)
    missing = sorted((expected if required is None else required) - set(table))
    if unknown:
        raise ProxyConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)} (expected: {', '.join(sorted(expected))})"
        )
    if missing:
        raise ProxyConfigError(f"{where}: missing key(s) {', '.join(missing)}")


def _integer(value, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProxyConfigError(f"{where}: expected an integer in {low}..{high}, got {value!r}")
    return value


def _tcp_port(value, where: str) -> int:
    return _integer(value, where, 1, _TCP_PORT_MAX)


def _vsock_port(value, where: str) -> int:
    return _integer(value, where, 0, vsock.VMADDR_PORT_ANY - 1)


def _host(value, where: str) -> str:
    if not isinstance(value, str) or not value or any(char.isspace() for char in value):
        raise ProxyConfigError(f"{where}: expected a host name or address, got {value!r}")
    return value


def _limit(value, where: str, kind: type):
    if kind is int:
        return _integer(value, where, 1, 2**31 - 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ProxyConfigError(f"{where}: expected a number of seconds ≥ 0, got {value!r}")
    return float(value)


# --- destination checks --------------------------------------------------------------------------

async def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now (duplicates removed, resolver order kept).

    A canonical IPv4 literal is its own resolution, as the resolver would say, without its
    round trip through the executor's threads (a visible part of a new connection's latency)."""
    with contextlib.suppress(ValueError):
        if str(ipaddress.IPv4Address(host)) == host:
            return [host]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def permitted_addresses(route: Route, allowlist: tuple[AllowEntry, ...] | None) -> list[str]:
    """The addresses ``route`` may be connected to right now (empty: refused by the allowlist)."""
    addresses = await resolve(route.host, route.port)
    if allowlist is None or AllowEntry(route.host, route.port) in allowlist:
        return addresses
    allowed: set[str] = set()
    for entry in allowlist:
        if entry.port == route.port:
            with contextlib.suppress(OSError):
                allowed.update(await resolve(entry.host, entry.port))
    return [address for address in addresses if address in allowed]


async def _connect_first(addresses: list[str], port: int):
    """The first of ``addresses`` that accepts; the last OSError when none does (or none is given)."""
    error = OSError(errno.EDESTADDRREQ, "no address to connect to")
    for address in addresses:
        try:
            return await _open_tcp(address, port)
        except OSError as exc:
            error = exc
    raise error


async def _open_tcp(address: str, port: int):
    """asyncio streams over a new TCP connection to the numeric ``address``.

    A connection to this host is usually established before ``connect()`` returns (it still
    says ``EINPROGRESS``): a zero-timeout poll takes it at once instead of waiting a round of the
    event loop for the writable event, a visible part of a new connection's latency."""
    family, kind, proto, _name, target = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_NUMERICHOST)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        try:
            sock.connect(target)
        except BlockingIOError:
            if not _connected(sock, target):
                await asyncio.get_running_loop().sock_connect(sock, target)
        return await asyncio.open_connection(sock=sock, limit=CHUNK)
    except BaseException:
        sock.close()
        raise


def _connected(sock: socket.socket, target) -> bool:
    """Whether a non-blocking connect to ``target`` has finished by now; the OSError asyncio's
    ``sock_connect`` would raise (same message) if it failed."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if not poller.poll(0):
        return False
    failure = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if failure:
        raise OSError(failure, f"Connect call failed {target}")
    return True


# --- the proxy -----------------------------------------------------------------------------------

class Proxy:
    """The forwarder for one ``ProxyConfig``: ``await start()``, then ``await shutdown()``.

    Also an async context manager (exit = shutdown without draining)."""

    def __init__(self, config: ProxyConfig, *, vsock_config: vsock.VsockConfig | None = None):
        self.config = config
        self.vsock_config = vsock_config
        self.listeners: list[vsock.Listener] = []
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task] = set()
        self._activity: dict[asyncio.Task, Activity] = {}
        self._closing = False

    @property
    def active(self) -> int:
        """Connections currently being forwarded."""
        return len(self._handlers)

    async def start(self) -> None:
        """Listen on every route's vsock port and every inbound TCP port (all or none: a failure
        closes those opened)."""
        try:
            for inbound in self.config.inbound:
                handler = functools.partial(self._handle_inbound, inbound)
                self._servers.append(await asyncio.start_server(handler, inbound.listen_host, inbound.tcp_port,
                                                                limit=CHUNK))
                log.info("tcp %s:%d -> cid %d vsock port %d", inbound.listen_host, inbound.tcp_port, inbound.cid,
                         inbound.vsock_port)
            for route in self.config.routes:
                listener = vsock.listen(route.vsock_port, config=self.vsock_config)
                self.listeners.append(listener)
                handler = functools.partial(self._handle, route)
                self._servers.append(await vsock.start_server(handler, listener, limit=CHUNK))
                log.info("vsock port %d (cid %d, %s) -> %s:%d", route.vsock_port, listener.cid,
                         listener.config.transport, route.host, route.port)
        except BaseException:
            self._stop_listening()
            raise

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, wait up to ``drain_timeout`` (default: the config's) for open
        connections, then cut the remaining ones.  While draining, a connection on which no
        byte has moved for ``QUIET_CUT`` seconds is cut at once: it is a kept-alive connection
        between requests (an HTTP client's), not a stream in flight."""
        self._closing = True
        self._stop_listening()
        wait = self.config.drain_timeout if drain_timeout is None else drain_timeout
        handlers = set(self._handlers)
        deadline = time.monotonic() + wait
        while handlers and (left := deadline - time.monotonic()) > 0:
            _done, handlers = await asyncio.wait(handlers, timeout=min(left, QUIET_POLL))
            quiet = {task for task in handlers if self._quiet(task)}
            if quiet:
                log.info("closing %d idle connection(s)", len(quiet))
            for task in quiet:
                task.cancel()
        if handlers:
            log.warning("cutting %d connection(s) still open after the drain period", len(handlers))
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    def _quiet(self, task: asyncio.Task) -> bool:
        activity = self._activity.get(task)
        return activity is not None and activity.remaining(QUIET_CUT) <= 0

    def abort(self) -> None:
        """Cut every open connection now."""
        for task in set(self._handlers):
            task.cancel()

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown(drain_timeout=0)

    def _stop_listening(self) -> None:
        for server in self._servers:
            server.close()
        for listener in self.listeners:
            listener.close()

    async def _handle(self, route: Route, reader, writer, peer: tuple[int, int]) -> None:
        label = f"cid {peer[0]} port {peer[1]} -> vsock {route.vsock_port} -> {route.host}:{route.port}"
        await self._serve(label, reader, writer, lambda: self._open_upstream(route, label))

    async def _handle_inbound(self, route: InboundRoute, reader, writer) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        label = (f"tcp {peer[0]}:{peer[1]} -> {route.listen_host}:{route.tcp_port} -> cid {route.cid} "
                 f"port {route.vsock_port}")
        allowlist = self.config.inbound_allowlist
        if allowlist is not None and InboundAllow(route.cid, route.vsock_port) not in allowlist:
            log.warning("%s: refused, enclave port not in the inbound allowlist", label)
            writer.close()
            return
        await self._serve(label, reader, writer, lambda: self._open_enclave(route, label))

    async def _serve(self, label: str, reader, writer, open_upstream) -> None:
        """Admit one connection (both directions), track it for shutdown, and relay it to what
        ``open_upstream()`` opens (None: refused or unreachable, already logged)."""
        if self._closing or len(self._handlers) >= self.config.max_connections:
            reason = "shutting down" if self._closing else f"max_connections ({self.config.max_connections}) reached"
            log.warning("%s: refused, %s", label, reason)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None  # a connection handler always runs in a task
        self._handlers.add(task)
        activity = self._activity[task] = Activity()
        hold(writer)
        try:
            upstream = await open_upstream()
            if upstream is None:
                return
            up_reader, up_writer = upstream
            log.debug("%s: open", label)
            try:
                outcome = await relay(reader, writer, up_reader, up_writer, self.config.idle_timeout, activity)
            finally:
                up_writer.close()
            (log.info if outcome == "idle" else log.debug)("%s: %s", label, outcome)
        finally:
            self._handlers.discard(task)
            self._activity.pop(task, None)
            writer.close()

    async def _open_enclave(self, route: InboundRoute, label: str):
        """(reader, writer) to the enclave's vsock port, or None (logged) when it cannot be reached."""
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                return await vsock.open_connection(route.cid, route.vsock_port, config=self.vsock_config)
        except (OSError, TimeoutError) as exc:
            log.warning("%s: enclave unreachable (%s); closed this connection", label, exc or "timed out")
            return None

    async def _open_upstream(self, route: Route, label: str):
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                addresses = await permitted_addresses(route, self.config.allowlist)
                if not addresses:
                    log.warning("%s: refused, destination not in the allowlist", label)
                    return None
                return await _connect_first(addresses, route.port)
        except (OSError, TimeoutError) as exc:
            log.warning("%s: upstream unreachable (%s); closed this connection", label, exc or "timed out")
            return None


def run(config: ProxyConfig, *, vsock_config: vsock.VsockConfig | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (a second signal cuts at once).

    Startup errors (e.g. a vsock port in use) propagate as ``OSError``."""
    asyncio.run(_serve_until_signalled(Proxy(config, vsock_config=vsock_config)))


async def _serve_until_signalled(proxy: Proxy) -> None:
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: %d connection(s) open, draining for up to %g s",
                 proxy.active, proxy.config.drain_timeout)
        for signum in signals:
            loop.add_signal_handler(signum, proxy.abort)
        await proxy.shutdown()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
    log.info("stopped")
