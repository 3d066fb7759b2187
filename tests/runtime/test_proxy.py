"""Tests for qtbuild.runtime.proxy and ``qtbuild proxy``: real emulated vsock sockets, TCP on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

import qtbuild.runtime.proxy as proxy_module
from qtbuild.runtime.proxy import (
    AllowEntry,
    Proxy,
    ProxyConfig,
    ProxyConfigError,
    Route,
    load_config,
    parse_config,
)
from qtbuild.runtime.sdk import vsock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "vs"
    path.mkdir()
    return str(path)


def run(coroutine, timeout: float = 20):
    """Run one async scenario, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def parent(root: str) -> vsock.VsockConfig:
    return vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, root)


async def enclave_connect(root: str, port: int, enclave_cid: int = 4):
    config = vsock.VsockConfig(vsock.EMULATED, enclave_cid, root)
    return await vsock.open_connection(vsock.PARENT_CID, port, config=config, timeout=5)


@contextlib.asynccontextmanager
async def echo_server(greeting: bytes = b""):
    """A TCP echo server on 127.0.0.1 (port yielded); it first sends ``greeting``."""

    async def echo(reader, writer):
        writer.write(greeting)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(*routes, **options) -> ProxyConfig:
    return ProxyConfig(tuple(Route(*route) for route in routes), **options)


async def is_closed_by_peer(reader, timeout: float = 5) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


# --- forwarding ----------------------------------------------------------------------------------

def test_bytes_flow_both_ways_with_half_close(root):
    async def scenario():
        async with (
            echo_server(greeting=b"hello ") as port,
            Proxy(config((8000, "127.0.0.1", port)), vsock_config=parent(root)),
        ):
            reader, writer = await enclave_connect(root, 8000)
            writer.write(b"x" * 300_000)
            writer.write_eof()
            data = await reader.read()
            writer.close()
            return data

    assert run(scenario()) == b"hello " + b"x" * 300_000


def test_fifty_concurrent_streams(root):
    async def stream(index: int) -> bool:
        reader, writer = await enclave_connect(root, 8000, enclave_cid=4 + index % 2)
        payload = bytes([index]) * 200_000
        writer.write(payload)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        return data == payload

    async def scenario():
        async with echo_server() as port, Proxy(config((8000, "127.0.0.1", port)), vsock_config=parent(root)):
            return await asyncio.gather(*(stream(i) for i in range(50)))

    results = run(scenario())
    assert all(results) and len(results) == 50


def test_unreachable_upstream_closes_only_that_client(root, caplog):
    async def scenario():
        async with echo_server() as port:
            routes = config((8000, "127.0.0.1", closed_port()), (8001, "127.0.0.1", port))
            async with Proxy(routes, vsock_config=parent(root)):
                alive_reader, alive_writer = await enclave_connect(root, 8001)
                for _ in range(3):
                    reader, writer = await enclave_connect(root, 8000)
                    assert await is_closed_by_peer(reader)
                    writer.close()
                alive_writer.write(b"still here")
                assert await alive_reader.readexactly(10) == b"still here"
                reader, writer = await enclave_connect(root, 8001)
                writer.write(b"new")
                assert await reader.readexactly(3) == b"new"
                writer.close()
                alive_writer.close()

    caplog.set_level(logging.WARNING, logger="qtbuild.proxy")
    run(scenario())
    assert sum("upstream unreachable" in message for message in caplog.messages) == 3


def test_allowlist_refuses_unlisted_destinations(root, caplog):
    async def scenario():
        async with echo_server() as port:
            routes = config((8000, "127.0.0.1", port), allowlist=(AllowEntry("127.0.0.1", port + 1),))
            async with Proxy(routes, vsock_config=parent(root)):
                reader, writer = await enclave_connect(root, 8000)
                closed = await is_closed_by_peer(reader)
                writer.close()
                return closed

    caplog.set_level(logging.WARNING, logger="qtbuild.proxy")
    assert run(scenario())
    assert any("not in the allowlist" in message for message in caplog.messages)


@pytest.mark.parametrize("entry_host", ["127.0.0.1", "localhost"])
def test_allowlist_admits_exact_and_resolved_matches(root, entry_host):
    async def scenario():
        async with echo_server() as port:
            routes = config((8000, "127.0.0.1", port), allowlist=(AllowEntry(entry_host, port),))
            async with Proxy(routes, vsock_config=parent(root)):
                reader, writer = await enclave_connect(root, 8000)
                writer.write(b"ok")
                data = await reader.readexactly(2)
                writer.close()
                return data

    assert run(scenario()) == b"ok"


def test_max_connections(root, caplog):
    async def scenario():
        async with echo_server() as port, Proxy(config((8000, "127.0.0.1", port), max_connections=2),
                                                vsock_config=parent(root)) as proxy:
            streams = [await enclave_connect(root, 8000) for _ in range(2)]
            for reader, writer in streams:
                writer.write(b"1")
                assert await reader.readexactly(1) == b"1"
            assert proxy.active == 2
            reader, writer = await enclave_connect(root, 8000)
            refused = await is_closed_by_peer(reader)
            writer.close()
            streams[0][1].close()
            for _ in range(100):
                if proxy.active < 2:
                    break
                await asyncio.sleep(0.02)
            reader, writer = await enclave_connect(root, 8000)
            writer.write(b"2")
            accepted_again = await reader.readexactly(1) == b"2"
            writer.close()
            streams[1][1].close()
            return refused, accepted_again

    caplog.set_level(logging.WARNING, logger="qtbuild.proxy")
    assert run(scenario()) == (True, True)
    assert any("max_connections (2) reached" in message for message in caplog.messages)


def test_idle_timeout_closes_only_idle_connections(root):
    async def scenario():
        async with echo_server() as port, Proxy(config((8000, "127.0.0.1", port), idle_timeout=0.3),
                                                vsock_config=parent(root)):
            idle_reader, idle_writer = await enclave_connect(root, 8000)
            busy_reader, busy_writer = await enclave_connect(root, 8000)
            begin = time.monotonic()
            for _ in range(8):  # 0.8 s of traffic every 0.1 s
                busy_writer.write(b"b")
                assert await busy_reader.readexactly(1) == b"b"
                await asyncio.sleep(0.1)
            idle_closed = await is_closed_by_peer(idle_reader, timeout=0.1)
            busy_writer.write(b"c")
            busy_alive = await busy_reader.readexactly(1) == b"c"
            idle_writer.close()
            busy_writer.close()
            return idle_closed, busy_alive, time.monotonic() - begin

    idle_closed, busy_alive, elapsed = run(scenario())
    assert idle_closed and busy_alive and elapsed < 3


def test_graceful_shutdown_drains_then_cuts(root):
    async def scenario():
        async with echo_server() as port:
            proxy = Proxy(config((8000, "127.0.0.1", port)), vsock_config=parent(root))
            await proxy.start()
            path = proxy.listeners[0].path
            reader, writer = await enclave_connect(root, 8000)
            writer.write(b"a")
            await reader.readexactly(1)
            shutdown = asyncio.create_task(proxy.shutdown(drain_timeout=5))
            await asyncio.sleep(0.1)
            listening_after = os.path.exists(path)
            with pytest.raises(ConnectionRefusedError):
                await enclave_connect(root, 8000)
            writer.write(b"b")  # the open stream still works while draining
            still_works = await reader.readexactly(1) == b"b"
            writer.close()  # client done → drain completes early
            await asyncio.wait_for(shutdown, 3)

            proxy = Proxy(config((8000, "127.0.0.1", port)), vsock_config=parent(root))
            await proxy.start()
            reader, writer = await enclave_connect(root, 8000)
            writer.write(b"c")
            await reader.readexactly(1)
            begin = time.monotonic()
            await proxy.shutdown(drain_timeout=0.2)  # the client never finishes: cut
            cut = await is_closed_by_peer(reader)
            writer.close()
            return listening_after, still_works, cut, time.monotonic() - begin

    listening_after, still_works, cut, elapsed = run(scenario())
    assert not listening_after and still_works and cut and elapsed < 2


# --- configuration -------------------------------------------------------------------------------

def write(tmp_path, text: str):
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path


def test_config_file_full_shape(tmp_path):
    path = write(tmp_path, """
        max_connections = 64
        idle_timeout = 30
        drain_timeout = 0
        [[routes]]
        vsock_port = 8000
        host = "127.0.0.1"
        port = 8443
        [[routes]]
        vsock_port = 8001
        host = "localhost"
        port = 9000
        [allowlist]
        entries = [{ host = "127.0.0.1", port = 8443 }, { address = "localhost", port = 9000 }]
    """)
    loaded = load_config(path)
    assert loaded.routes == (Route(8000, "127.0.0.1", 8443), Route(8001, "localhost", 9000))
    assert loaded.allowlist == (AllowEntry("127.0.0.1", 8443), AllowEntry("localhost", 9000))
    assert (loaded.max_connections, loaded.idle_timeout, loaded.drain_timeout) == (64, 30.0, 0.0)
    assert loaded.connect_timeout == ProxyConfig.connect_timeout


def test_config_accepts_qproxy_outbound_connections_and_a_plain_allowlist_array():
    loaded = parse_config({
        "outbound_connections": [{"hostname": "127.0.0.1", "vsock_port": 8000, "tcp_port": 443}],
        "allowlist": [{"host": "127.0.0.1", "port": 443}],
    })
    assert loaded.routes == (Route(8000, "127.0.0.1", 443),)
    assert loaded.allowlist == (AllowEntry("127.0.0.1", 443),)
    assert parse_config({"routes": [{"vsock_port": 1, "host": "h", "port": 2}]}).allowlist is None


@pytest.mark.parametrize("text, message", [
    ("max_connections = 3", "no routes"),
    ("[[routes]]\nvsock_port = 8000\nhost = '127.0.0.1'\nport = 'https'",
     "routes[0].port: expected an integer in 1..65535"),
    ("[[routes]]\nvsock_port = 8000\nhost = '127.0.0.1'", "routes[0]: missing key(s) port"),
    ("[[routes]]\nvsock_port = 8000\nhost = '127.0.0.1'\nport = 1\nwhat = 2", "routes[0]: unknown key(s) what"),
    ("[[routes]]\nvsock_port = -1\nhost = 'h'\nport = 1", "routes[0].vsock_port"),
    ("[[routes]]\nvsock_port = 1\nhost = ''\nport = 1", "routes[0].host"),
    ("[[routes]]\nvsock_port = 1\nhost = 'a'\nport = 1\n[[routes]]\nvsock_port = 1\nhost = 'b'\nport = 2",
     "vsock port(s) routed twice: 1"),
    ("routes = 5", "routes: expected an array of tables"),
    ("[[routes]]\nvsock_port = 1\nhost = 'a'\nport = 1\n[allowlist]\nentries = [{ host = 'a' }]",
     "allowlist.entries[0]: missing key(s) port"),
    ("idle_timeout = 'long'\n[[routes]]\nvsock_port = 1\nhost = 'a'\nport = 1", "idle_timeout: expected a number"),
    ("idle_timeout = 0\n[[routes]]\nvsock_port = 1\nhost = 'a'\nport = 1", "timeouts must be positive"),
    ("[[routes]\n", "not valid TOML"),
    ("proxy = 1", "top level: unknown key(s) proxy"),
])
def test_bad_config_files_give_clear_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ProxyConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ProxyConfigError, match="No such file"):
        load_config(tmp_path / "absent.toml")


# --- command line --------------------------------------------------------------------------------

class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def tcp_echo():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def cli(*args, root: str | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, vsock.ENV_TRANSPORT: "emulated", vsock.ENV_CID: "3"}
    if root:
        env[vsock.ENV_DIR] = root
    code = "from qtbuild.cli.proxy import command; command()"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def wait_for(path: str, process: subprocess.Popen, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _out, err = process.communicate(timeout=5)
            pytest.fail(f"proxy did not start (rc {process.returncode}): {err}")
        time.sleep(0.02)


def test_cli_help():
    process = cli("--help")
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    for option in ("-l, --vsock-port", "-a, --remote-addr", "-p, --remote-port", "--config", "--max-connections"):
        assert option in out


def test_cli_qt_proxy_mode_forwards_and_stops_on_sigterm(root, tcp_echo):
    process = cli("-l", "8000", "-a", "127.0.0.1", "-p", str(tcp_echo), "--drain-timeout", "1", root=root)
    path = vsock.socket_path(root, 3, 8000)
    try:
        wait_for(path, process)
        with vsock.connect(3, 8000, config=vsock.VsockConfig(vsock.EMULATED, 4, root), timeout=5) as sock:
            sock.sendall(b"through the proxy")
            received = b""
            while len(received) < 17:
                received += sock.recv(64)
        assert received == b"through the proxy"
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert process.returncode == 0, err
    assert not os.path.exists(path)
    assert f"vsock port 8000 (cid 3, emulated) -> 127.0.0.1:{tcp_echo}" in err
    assert "shutting down" in err


def test_cli_config_file_mode(root, tcp_echo, tmp_path):
    path = write(tmp_path, f"[[routes]]\nvsock_port = 8100\nhost = '127.0.0.1'\nport = {tcp_echo}\n")
    process = cli("--config", str(path), root=root)
    try:
        wait_for(vsock.socket_path(root, 3, 8100), process)
        with vsock.connect(3, 8100, config=vsock.VsockConfig(vsock.EMULATED, 4, root), timeout=5) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert process.returncode == 0


@pytest.mark.parametrize("args, message", [
    (("-l", "8000", "-a", "127.0.0.1"), "-l, -a and -p go together"),
    ((), "no routes"),
    (("--config", "/nonexistent/proxy.toml"), "No such file"),
])
def test_cli_usage_errors(root, args, message):
    process = cli(*args, root=root)
    _out, err = process.communicate(timeout=20)
    assert process.returncode == 2
    assert message in err and "Traceback" not in err


def test_cli_reports_a_port_in_use(root, tcp_echo):
    with vsock.listen(8000, config=parent(root)):
        process = cli("-l", "8000", "-a", "127.0.0.1", "-p", str(tcp_echo), root=root)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == 2  # an address that cannot be used is an input error, as in every command
    assert err.startswith("qtbuild: error: ") and "already in use" in err and "Traceback" not in err


def test_a_refused_upstream_fails_as_asyncio_says_it():
    """The proxy connects upstream itself (taking an already established loopback connection
    without a round of the event loop); a refusal still reads as asyncio's, in the log too."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(ConnectionRefusedError, match=rf"Connect call failed \('127.0.0.1', {port}\)"):
        asyncio.run(proxy_module._connect_first(["127.0.0.1"], port))


def test_connecting_to_no_address_is_an_os_error():
    # Was `raise None` (TypeError), which the upstream handler does not catch.
    with pytest.raises(OSError, match="no address to connect to"):
        asyncio.run(proxy_module._connect_first([], 80))
def test_shutdown_cuts_quiet_kept_alive_connections_at_once(root):
    """Regression: an idle kept-alive connection (an HTTP client between requests) held SIGTERM
    for the whole drain period; a busy one is still drained."""
    async def scenario():
        async with echo_server() as port:
            proxy = Proxy(config((8000, "127.0.0.1", port)), vsock_config=parent(root))
            await proxy.start()
            idle_reader, idle_writer = await enclave_connect(root, 8000)
            idle_writer.write(b"a")
            await idle_reader.readexactly(1)
            busy_reader, busy_writer = await enclave_connect(root, 8000)
            busy_writer.write(b"b")
            await busy_reader.readexactly(1)  # accepted and forwarding before the shutdown

            async def keep_busy():
                for _ in range(12):
                    busy_writer.write(b"b")
                    await busy_reader.readexactly(1)
                    await asyncio.sleep(0.1)
                busy_writer.close()

            talker = asyncio.create_task(keep_busy())
            begin = time.monotonic()
            await proxy.shutdown(drain_timeout=10)
            elapsed = time.monotonic() - begin
            idle_cut = await is_closed_by_peer(idle_reader)
            await talker
            idle_writer.close()
            return elapsed, idle_cut

    elapsed, idle_cut = run(scenario())
    # the busy stream (about 1.2 s of traffic) was drained; the idle one did not hold the stop
    assert idle_cut and 1.0 < elapsed < 3


def test_an_ipv4_literal_resolves_to_itself_without_the_resolver(monkeypatch):
    """The route of nearly every local proxy is 127.0.0.1: no executor round trip per connection,
    and the same answer the resolver gives (so allowlist matching is unchanged)."""
    async def scenario():
        loop = asyncio.get_running_loop()
        asked = []
        real = loop.getaddrinfo

        async def counting(host, *args, **kwargs):
            asked.append(host)
            return await real(host, *args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", counting)
        literal = [await proxy_module.resolve(host, 443) for host in ("127.0.0.1", "10.1.2.3")]
        named = await proxy_module.resolve("localhost", 443)
        odd = await proxy_module.resolve("127.1", 443)  # not canonical: the resolver decides
        return literal, named, odd, asked

    literal, named, odd, asked = run(scenario())
    assert literal == [["127.0.0.1"], ["10.1.2.3"]]
    for host in ("127.0.0.1", "10.1.2.3"):
        assert {info[4][0] for info in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)} == {host}
    assert "127.0.0.1" in named and odd == ["127.0.0.1"]
    assert asked == ["localhost", "127.1"]
