"""Two-way proxy: a parent-side client reaches an HTTP server inside an enclave (parent
``qtbuild proxy`` inbound route → enclave vsock port → the SDK's enclave-side forwarder → the
server on the enclave's loopback), the enclave-side outbound mapping reaches a parent-side
service, and the allowlists of both directions refuse what they do not list."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtbuild.cli import proxy as proxy_cli
from qtbuild.runtime.proxy import InboundAllow, InboundRoute, Proxy, ProxyConfig, ProxyConfigError, Route, parse_config
from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.sdk.proxy import EnclaveProxy, Mapping, main

ENCLAVE_CID = 16


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = f"hello from {self.server.label} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def start(label: str) -> int:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
        server.label = label
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def configs():
    root = tempfile.mkdtemp(prefix="vsin", dir="/tmp")
    yield (vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, root),
           vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, root))
    shutil.rmtree(root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def test_a_parent_client_gets_an_answer_from_a_server_inside_the_enclave(configs, http_server):
    parent, enclave = configs
    server_port, parent_port = http_server("enclave"), free_port()

    async def scenario():
        inside = EnclaveProxy([Mapping(5005, server_port)], config=enclave)
        outside = Proxy(ProxyConfig((), inbound=(InboundRoute(parent_port, ENCLAVE_CID, 5005),),
                                    inbound_allowlist=(InboundAllow(ENCLAVE_CID, 5005),)), vsock_config=parent)
        await inside.start()
        await outside.start()
        try:
            return await asyncio.to_thread(get, parent_port, "/balance")
        finally:
            await outside.shutdown(drain_timeout=0)
            inside.close()

    assert asyncio.run(scenario()) == "hello from enclave /balance"


def test_the_enclave_reaches_a_parent_service_through_a_local_tcp_port(configs, http_server):
    parent, enclave = configs
    service_port, inside_port = http_server("parent"), free_port()

    async def scenario():
        outside = Proxy(ProxyConfig((Route(8000, "127.0.0.1", service_port),)), vsock_config=parent)
        inside = EnclaveProxy(outbound=[Mapping(8000, inside_port)], config=enclave)
        await outside.start()
        await inside.start()
        try:
            return await asyncio.to_thread(get, inside_port, "/kms")
        finally:
            inside.close()
            await outside.shutdown(drain_timeout=0)

    assert asyncio.run(scenario()) == "hello from parent /kms"


@pytest.mark.parametrize("refuse", ["parent allowlist", "enclave peers"])
def test_allowlists_refuse_in_both_directions(configs, http_server, refuse):
    parent, enclave = configs
    server_port, parent_port = http_server("enclave"), free_port()
    allow = (InboundAllow(ENCLAVE_CID, 6000),) if refuse == "parent allowlist" else None
    peers = (vsock.PARENT_CID,) if refuse == "parent allowlist" else (7,)

    async def scenario():
        inside = EnclaveProxy([Mapping(5005, server_port)], allowed_peers=peers, config=enclave)
        outside = Proxy(ProxyConfig((), inbound=(InboundRoute(parent_port, ENCLAVE_CID, 5005),),
                                    inbound_allowlist=allow), vsock_config=parent)
        await inside.start()
        await outside.start()
        try:
            return await asyncio.to_thread(get, parent_port)
        finally:
            await outside.shutdown(drain_timeout=0)
            inside.close()

    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        asyncio.run(scenario())


def test_inbound_configuration_file_and_flags(tmp_path):
    config = parse_config({"inbound": [{"tcp_port": 8443, "cid": 16, "vsock_port": 5005}],
                           "inbound_allowlist": [{"cid": 16, "port": 5005}]})
    assert config.inbound == (InboundRoute(8443, 16, 5005, "127.0.0.1"),) and not config.routes
    assert config.inbound_allowlist == (InboundAllow(16, 5005),)
    for bad, message in (({"inbound": [{"tcp_port": 0, "cid": 16, "vsock_port": 1}]}, "tcp_port"),
                         ({"inbound": [{"tcp_port": 1, "cid": 2, "vsock_port": 1}]}, "cid"),
                         ({"inbound": [{"tcp_port": 1, "cid": 16}]}, "vsock_port"),
                         ({"inbound_allowlist": [{"cid": 16}], "routes": []}, "port")):
        with pytest.raises(ProxyConfigError, match=message):
            parse_config(bad)
    built = proxy_cli._proxy_config(None, None, {}, ("0.0.0.0:8443:16:5005", "9000:17:80"), ("16:5005",))
    assert built.inbound == (InboundRoute(8443, 16, 5005, "0.0.0.0"), InboundRoute(9000, 17, 80, "127.0.0.1"))
    assert built.inbound_allowlist == (InboundAllow(16, 5005),)
    result = CliRunner().invoke(proxy_cli.command, ["--inbound", "8443:16"])
    assert result.exit_code == 2 and "TCP_PORT:CID:VSOCK_PORT" in result.output


def test_enclave_side_command_line_is_checked(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2 and "--inbound or --outbound" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--inbound", "5005:70000"])
    assert "TCP port 1..65535" in capsys.readouterr().err


def test_sdk_export_carries_the_forwarder():
    sdk_dir = Path(vsock.__file__).parent
    assert (sdk_dir / "proxy.py").exists() and (sdk_dir / "relay.py").exists()
