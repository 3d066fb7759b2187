"""Tests for qtbuild.runtime.sdk.vsock: emulated transport over real Unix sockets, transport choice, heartbeat."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import termios
import threading
import time

import pytest

from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.sdk.vsock import EMULATED, NATIVE, VsockConfig, VsockConfigError


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "vs"
    path.mkdir()
    return str(path)


def cid(root: str, number: int) -> VsockConfig:
    return VsockConfig(EMULATED, number, root)


def in_thread(function, *args, **kwargs):
    """Start ``function`` in a thread; return a callable joining it (≤ 10 s) and giving its result."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join():
        thread.join(10)
        assert not thread.is_alive(), "thread did not finish"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join


# --- emulated connect / listen / accept ----------------------------------------------------------

def test_accept_reports_peer_cid_and_port_and_bytes_flow_both_ways(root):
    with vsock.listen(5000, config=cid(root, 3)) as listener:
        assert listener.path == os.path.join(root, "3", "5000.sock")
        assert (listener.cid, listener.port) == (3, 5000)
        with vsock.connect(3, 5000, config=cid(root, 4), timeout=5) as client:
            conn, (peer_cid, peer_port) = listener.accept(timeout=5)
            with conn:
                assert peer_cid == 4
                assert vsock.FIRST_EPHEMERAL_PORT <= peer_port < vsock.VMADDR_PORT_ANY
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(4) == b"pong"
                assert conn.gettimeout() is None and client.gettimeout() == 5


def test_two_cids_share_a_port_number_and_reach_the_parent(root):
    parent, four, five = cid(root, 3), cid(root, 4), cid(root, 5)
    with (
        vsock.listen(7000, config=four) as l4,
        vsock.listen(7000, config=five) as l5,
        vsock.listen(7000, config=parent) as l3,
    ):
        sockets, peers = [], []
        for target, listener in ((4, l4), (5, l5)):
            sockets.append(vsock.connect(target, 7000, config=parent, timeout=5))
            conn, peer = listener.accept(timeout=5)
            sockets.append(conn)
            peers.append(peer)
        for source in (four, five):
            sockets.append(vsock.connect(3, 7000, config=source, timeout=5))
            conn, peer = l3.accept(timeout=5)
            sockets.append(conn)
            peers.append(peer)
        for sock in sockets:
            sock.close()
    assert [peer[0] for peer in peers] == [3, 3, 4, 5]
    assert len({peer[1] for peer in peers}) == 4


def test_enclave_view_reaches_itself_and_the_parent_only(tmp_path, root):
    """The manager's bind mounts, imitated by symlinks: <enclave root>/{4,3} → <root>/{4,3}."""
    for number in (3, 4, 5):
        os.makedirs(os.path.join(root, str(number)))
    view = tmp_path / "enclave-vs"
    view.mkdir()
    for number in (3, 4):
        os.symlink(os.path.join(root, str(number)), view / str(number))
    enclave = cid(str(view), 4)
    with vsock.listen(8000, config=cid(root, 3)) as parent_listener, vsock.listen(8001, config=enclave) as own:
        with vsock.connect(3, 8000, config=enclave, timeout=5):
            assert parent_listener.accept(timeout=5)[1][0] == 4
        with vsock.connect(4, 8001, config=cid(root, 3), timeout=5):
            assert own.accept(timeout=5)[1][0] == 3
        with vsock.listen(8000, config=cid(root, 5)), pytest.raises(ConnectionRefusedError):
            vsock.connect(5, 8000, config=enclave, timeout=5)


def test_connect_without_listener_is_refused(root):
    with pytest.raises(ConnectionRefusedError):
        vsock.connect(3, 1234, config=cid(root, 4), timeout=1)
    os.makedirs(os.path.join(root, "3"))
    with pytest.raises(ConnectionRefusedError):
        vsock.connect(3, 1234, config=cid(root, 4), timeout=1)


def test_accept_timeout(root):
    with vsock.listen(5000, config=cid(root, 3)) as listener:
        begin = time.monotonic()
        with pytest.raises(TimeoutError):
            listener.accept(timeout=0.2)
        assert 0.15 < time.monotonic() - begin < 2


def test_connect_timeout_stays_on_the_socket(root):
    with (
        vsock.listen(5000, config=cid(root, 3)) as listener,
        vsock.connect(3, 5000, config=cid(root, 4), timeout=0.2) as client,
    ):
        conn, _ = listener.accept(timeout=5)
        with conn, pytest.raises(TimeoutError):
            client.recv(1)


def test_close_wakes_a_blocked_accept(root):
    listener = vsock.listen(5000, config=cid(root, 3))
    join = in_thread(listener.accept)
    time.sleep(0.1)
    listener.close()
    with pytest.raises(OSError):
        join()


def test_silent_or_malformed_clients_are_dropped_not_returned(root):
    with vsock.listen(5000, header_timeout=0.2, config=cid(root, 3)) as listener:
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(listener.path)
        garbage = socket.socket(socket.AF_UNIX)
        garbage.connect(listener.path)
        garbage.sendall(b"GET / HTTP/1")  # header-sized, wrong magic
        with vsock.connect(3, 5000, config=cid(root, 9), timeout=5):
            conn, peer = listener.accept(timeout=5)
            conn.close()
        assert peer[0] == 9
        assert silent.recv(1) == b"" and garbage.recv(1) == b""
        silent.close()
        garbage.close()


def test_asyncio_server_drops_silent_short_or_malformed_clients(root):
    """start_server: a client silent past header_timeout, one that closes mid-header and one with
    a wrong magic are closed without reaching the callback; a valid client after them is served."""
    async def scenario():
        listener = vsock.listen(5000, header_timeout=0.2, config=cid(root, 3))
        peers = []

        async def served(reader, writer, peer):
            peers.append(peer)
            writer.close()

        server = await vsock.start_server(served, listener)
        loop = asyncio.get_running_loop()
        clients = [socket.socket(socket.AF_UNIX) for _ in range(3)]
        try:
            for client in clients:
                client.setblocking(False)
                await loop.sock_connect(client, listener.path)
            clients[1].sendall(b"QTv1\0\0")  # half a header, then EOF
            clients[1].shutdown(socket.SHUT_WR)
            clients[2].sendall(b"GET / HTTP/1")  # header-sized, wrong magic
            ends = [await asyncio.wait_for(loop.sock_recv(client, 1), 5) for client in clients]
            _reader, writer = await vsock.open_connection(3, 5000, config=cid(root, 9), timeout=5)
            await asyncio.wait_for(_reader.read(), 5)
            writer.close()
        finally:
            for client in clients:
                client.close()
            server.close()
            listener.close()
        return ends, [peer[0] for peer in peers]

    assert asyncio.run(scenario()) == ([b"", b"", b""], [9])


def test_close_unlinks_the_socket_file(root):
    listener = vsock.listen(5000, config=cid(root, 3))
    assert os.path.exists(listener.path)
    listener.close()
    listener.close()
    assert not os.path.exists(listener.path)


def test_close_leaves_a_successors_socket_alone(root):
    first = vsock.listen(5000, config=cid(root, 3))
    os.unlink(first.path)
    with vsock.listen(5000, config=cid(root, 3)) as second:
        first.close()
        assert os.path.exists(second.path)


def test_listen_replaces_a_stale_socket_file(root):
    path = vsock.socket_path(root, 3, 5000)
    os.makedirs(os.path.dirname(path))
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)
    leftover.close()
    assert os.path.exists(path)
    with vsock.listen(5000, config=cid(root, 3)) as listener, vsock.connect(3, 5000, config=cid(root, 4), timeout=5):
        assert listener.accept(timeout=5)[1][0] == 4


def test_listen_refuses_a_live_listener_and_non_socket_files(root):
    with vsock.listen(5000, config=cid(root, 3)):
        with pytest.raises(OSError) as caught:
            vsock.listen(5000, config=cid(root, 3))
        assert caught.value.errno == errno.EADDRINUSE
    path = vsock.socket_path(root, 3, 6000)
    with open(path, "w") as handle:
        handle.write("precious")
    with pytest.raises(FileExistsError):
        vsock.listen(6000, config=cid(root, 3))
    with open(path) as handle:
        assert handle.read() == "precious"


def test_the_port_file_appears_only_once_it_listens(root, monkeypatch):
    """A client (or a second listener probing for a stale file) never finds the port's file
    refusing connections: it is linked into place after listen().  Bound in place, the file
    existed between bind() and listen(), and a connect then was refused."""
    seen = []
    real_listen = socket.socket.listen

    def listen_and_look(sock, *args):
        seen.append(os.path.exists(vsock.socket_path(root, 3, 5000)))
        return real_listen(sock, *args)

    monkeypatch.setattr(socket.socket, "listen", listen_and_look)
    with vsock.listen(5000, config=cid(root, 3)) as listener:
        assert seen == [False]
        assert os.listdir(os.path.dirname(listener.path)) == ["5000.sock"]
        with vsock.connect(3, 5000, config=cid(root, 4), timeout=5):
            assert listener.accept(timeout=5)[1][0] == 4


def test_listen_on_any_port_picks_an_ephemeral_one(root):
    with vsock.listen(vsock.VMADDR_PORT_ANY, config=cid(root, 3)) as listener:
        assert vsock.FIRST_EPHEMERAL_PORT <= listener.port < vsock.VMADDR_PORT_ANY
        assert listener.path == vsock.socket_path(root, 3, listener.port)


def test_addresses_and_paths_are_validated(root, tmp_path):
    with pytest.raises(VsockConfigError):
        vsock.connect(-1, 5000, config=cid(root, 3))
    with pytest.raises(VsockConfigError):
        vsock.connect(3, vsock.VMADDR_PORT_ANY, config=cid(root, 3))
    with pytest.raises(VsockConfigError, match="too long"):
        vsock.listen(5000, config=cid(str(tmp_path / ("x" * 120)), 3))


def test_asyncio_server_and_connection_report_the_peer(root):
    async def scenario():
        listener = vsock.listen(5000, config=cid(root, 3))

        async def greet(reader, writer, peer):
            writer.write(f"{peer[0]} {peer[1]} ".encode() + await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await vsock.start_server(greet, listener)
        try:
            reader, writer = await vsock.open_connection(3, 5000, config=cid(root, 6), timeout=5)
            writer.write(b"hello")
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
        finally:
            server.close()
            listener.close()
        return reply

    peer_cid, peer_port, text = asyncio.run(scenario()).split()
    assert (peer_cid, text) == (b"6", b"hello") and int(peer_port) >= vsock.FIRST_EPHEMERAL_PORT


def test_asyncio_server_reads_no_byte_past_the_header(root):
    """What a client sends right after its header stays in the kernel until the callback's stream
    reads it: a callback that pauses reading at once (the proxy's relay.hold, to splice rather
    than copy) finds every byte still unread, then reads them all in order."""
    payload = os.urandom(100_000)

    async def scenario():
        listener = vsock.listen(5002, config=cid(root, 3))

        async def held(reader, writer, peer):
            writer.transport.pause_reading()
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            unread = int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
            writer.transport.resume_reading()
            writer.write(b"%d " % unread + hashlib.sha256(await reader.readexactly(len(payload))).digest())
            await writer.drain()
            writer.close()

        server = await vsock.start_server(held, listener)
        client = vsock.connect(3, 5002, config=cid(root, 4), timeout=5)
        try:
            client.sendall(payload)  # header and payload queued before the server accepts
            client.setblocking(False)
            reply = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 1024), 5)
        finally:
            client.close()
            server.close()
            listener.close()
        return reply

    unread, digest = asyncio.run(scenario()).split(b" ", 1)
    assert (int(unread), digest) == (len(payload), hashlib.sha256(payload).digest())


def test_emulated_sockets_hold_a_virtio_vsock_buffer_in_flight(root):
    """Both ends, blocking and asyncio: a large write is not split into many waits for the reader
    by the Unix default send buffer (the kernel reports SO_SNDBUF doubled, for overhead)."""
    def send_buffer(sock) -> int:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    with vsock.listen(5000, config=cid(root, 3)) as listener:
        joined = in_thread(listener.accept, timeout=5)
        client = vsock.connect(3, 5000, config=cid(root, 4), timeout=5)
        accepted, _peer = joined()
        sizes = [send_buffer(client), send_buffer(accepted)]
        client.close()
        accepted.close()

    async def scenario():
        listener = vsock.listen(5001, config=cid(root, 3))
        served: asyncio.Future = asyncio.get_running_loop().create_future()

        async def report(reader, writer, peer):
            served.set_result(send_buffer(writer.get_extra_info("socket")))
            writer.close()

        server = await vsock.start_server(report, listener)
        try:
            _reader, writer = await vsock.open_connection(3, 5001, config=cid(root, 4), timeout=5)
            sizes.extend([send_buffer(writer.get_extra_info("socket")), await asyncio.wait_for(served, 5)])
            writer.close()
        finally:
            server.close()
            listener.close()

    asyncio.run(scenario())
    with open("/proc/sys/net/core/wmem_max") as limit:  # the kernel caps SO_SNDBUF there
        assert sizes == [2 * min(vsock.EMULATED_BUFFER, int(limit.read()))] * 4


def test_asyncio_connection_refused_and_timeout(root):
    async def refused():
        await vsock.open_connection(3, 5000, config=cid(root, 4), timeout=1)

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(refused())


# --- heartbeat -----------------------------------------------------------------------------------

def test_heartbeat_round_trip_returns_the_enclave_cid(root):
    with vsock.listen(vsock.HEARTBEAT_PORT, config=cid(root, 3)) as listener:
        join = in_thread(vsock.heartbeat_listen, timeout=5, listener=listener)
        vsock.send_heartbeat(timeout=5, config=cid(root, 16))
        assert join() == 16


def test_heartbeat_ignores_wrong_bytes_and_times_out(root):
    with vsock.listen(vsock.HEARTBEAT_PORT, config=cid(root, 3)) as listener:
        join = in_thread(vsock.heartbeat_listen, timeout=5, listener=listener)
        with vsock.connect(3, vsock.HEARTBEAT_PORT, config=cid(root, 5), timeout=5) as impostor:
            impostor.sendall(b"\x00")
            assert impostor.recv(1) == b""
        vsock.send_heartbeat(timeout=5, config=cid(root, 4))
        assert join() == 4
        begin = time.monotonic()
        with pytest.raises(TimeoutError):
            vsock.heartbeat_listen(timeout=0.2, listener=listener)
        assert time.monotonic() - begin < 2


def test_heartbeat_without_parent_fails(root):
    with pytest.raises(ConnectionError):
        vsock.send_heartbeat(timeout=1, config=cid(root, 4))


# --- transport selection -------------------------------------------------------------------------

@pytest.mark.parametrize("requested, family, device, dir_set, expected", [
    ("auto", True, True, False, NATIVE),
    ("auto", True, True, True, EMULATED),
    ("auto", False, True, False, EMULATED),
    ("auto", True, False, False, EMULATED),
    ("emulated", True, True, False, EMULATED),
    ("native", False, False, True, NATIVE),
])
def test_choose_transport(requested, family, device, dir_set, expected):
    chosen = vsock.choose_transport(requested, family_available=family, device_present=device, dir_set=dir_set)
    assert chosen == expected


def test_choose_transport_rejects_unknown_names():
    with pytest.raises(VsockConfigError, match="QTBUILD_VSOCK_TRANSPORT"):
        vsock.choose_transport("tcp", family_available=True, device_present=True, dir_set=False)


def test_config_from_environment(root):
    config = VsockConfig.from_env({vsock.ENV_DIR: root, vsock.ENV_CID: "7"})
    assert config == VsockConfig(EMULATED, 7, root)
    assert VsockConfig.from_env({vsock.ENV_DIR: root}).cid == vsock.PARENT_CID
    with pytest.raises(VsockConfigError, match="decimal"):
        VsockConfig.from_env({vsock.ENV_DIR: root, vsock.ENV_CID: "four"})
    with pytest.raises(VsockConfigError, match=vsock.ENV_DIR):
        VsockConfig.from_env({vsock.ENV_TRANSPORT: "emulated"})


def test_config_from_environment_auto_follows_the_machine(monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/vsock")
    assert VsockConfig.from_env({vsock.ENV_CID: "3"}).transport == NATIVE
    monkeypatch.delattr(socket, "AF_VSOCK")
    with pytest.raises(VsockConfigError):
        VsockConfig.from_env({vsock.ENV_TRANSPORT: "native"})


def test_environment_is_the_default_configuration(root, monkeypatch):
    monkeypatch.setenv(vsock.ENV_DIR, root)
    monkeypatch.setenv(vsock.ENV_CID, "3")
    monkeypatch.delenv(vsock.ENV_TRANSPORT, raising=False)
    with vsock.listen(5000) as listener:
        monkeypatch.setenv(vsock.ENV_CID, "11")
        with vsock.connect(3, 5000, timeout=5):
            assert listener.accept(timeout=5)[1][0] == 11


def test_native_loopback():
    if not hasattr(socket, "AF_VSOCK") or not os.path.exists("/dev/vsock"):
        pytest.skip("no AF_VSOCK socket family or no /dev/vsock on this machine")
    native = VsockConfig(NATIVE, vsock.local_cid() or vsock.PARENT_CID)
    try:
        listener = vsock.listen(vsock.VMADDR_PORT_ANY, config=native)
    except OSError as exc:
        pytest.skip(f"cannot bind AF_VSOCK: {exc}")
    with listener:
        try:
            client = vsock.connect(vsock.VMADDR_CID_LOCAL, listener.port, config=native, timeout=1)
        except OSError as exc:
            pytest.skip(f"AF_VSOCK loopback to CID 1 does not work here (vsock_loopback not loaded?): {exc!r}")
        with client:
            conn, peer = listener.accept(timeout=5)
            with conn:
                client.sendall(b"native")
                assert conn.recv(6) == b"native"
                assert peer[0] in (vsock.VMADDR_CID_LOCAL, native.cid)


# --- peer identity -------------------------------------------------------------------------------

CLIENT = """
import sys
import termios
from qtbuild.runtime.sdk import vsock
config = vsock.VsockConfig("emulated", int(sys.argv[2]), sys.argv[1])
print("ready", flush=True)
for _line in sys.stdin:
    with vsock.connect(3, 5000, config=config, timeout=5) as sock:
        sock.recv(1)
    print("done", flush=True)
"""


def _client_in_new_netns(root: str, claimed_cid: int) -> subprocess.Popen:
    """A python client in a fresh network namespace (same pid: unshare execs); it connects once
    per line on its stdin."""
    client = subprocess.Popen(["unshare", "--net", sys.executable, "-c", CLIENT, root, str(claimed_cid)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{client.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        assert time.monotonic() < deadline, "client never entered its network namespace"
        time.sleep(0.01)
    # The listener waits only 1 s per connection: start counting once the client has imported.
    assert client.stdout.readline().strip() == "ready"
    return client


def _peer_seen(client: subprocess.Popen, listener):
    """Let ``client`` connect once; the peer ``listener`` accepted, or None if it was dropped."""
    client.stdin.write("go\n")
    client.stdin.flush()
    try:
        conn, peer = listener.accept(timeout=1)
        conn.close()
    except TimeoutError:
        peer = None
    assert client.stdout.readline().strip() == "done"
    return peer


def _skip_without_netns() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not available")
    probe = subprocess.run(["unshare", "--net", "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")


def test_registered_enclave_identity_is_checked(root):
    _skip_without_netns()
    parent = cid(root, 3)
    honest, liar, other = (_client_in_new_netns(root, claimed) for claimed in (4, 4, 3))
    try:
        with vsock.listen(5000, config=parent) as listener:
            vsock.register_enclave(4, honest.pid, config=parent)
            assert _peer_seen(honest, listener)[0] == 4
            assert _peer_seen(liar, listener) is None  # another namespace claiming CID 4
            assert _peer_seen(other, listener)[0] == 3  # unregistered namespace: not an enclave
            with vsock.connect(3, 5000, config=parent, timeout=5):  # the test's namespace, unregistered
                assert listener.accept(timeout=5)[1][0] == 3
            vsock.register_enclave(5, os.getpid(), config=parent)  # now the test's namespace is CID 5
            # enclave 5 claiming CID 3:
            with vsock.connect(3, 5000, config=parent, timeout=5), pytest.raises(TimeoutError):
                listener.accept(timeout=0.3)
            vsock.unregister_enclave(5, config=parent)
            with vsock.connect(3, 5000, config=parent, timeout=5):
                assert listener.accept(timeout=5)[1][0] == 3
    finally:
        for client in (honest, liar, other):
            client.stdin.close()
            client.wait(10)


def test_a_link_planted_in_a_cid_directory_is_not_followed(tmp_path, root):
    """Regression (issue 12): AF_UNIX connect follows symlinks; an enclave that plants
    ``<its dir>/<port>.sock -> <a host socket>`` must not get the parent connected there."""
    host = tmp_path / "host.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(host))
    server.listen(1)
    server.setblocking(False)
    os.makedirs(os.path.join(root, "4"))
    os.symlink(host, os.path.join(root, "4", "7777.sock"))
    os.mkdir(os.path.join(root, "4", "7778.sock"))
    try:
        with pytest.raises(ConnectionRefusedError, match="not a socket"):
            vsock.connect(4, 7777, config=cid(root, 3), timeout=1)
        with pytest.raises(ConnectionRefusedError, match="not a socket"):
            asyncio.run(vsock.open_connection(4, 7777, config=cid(root, 3), timeout=1))
        with pytest.raises(ConnectionRefusedError, match="not a socket"):
            vsock.connect(4, 7778, config=cid(root, 3), timeout=1)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the host socket
    finally:
        server.close()


def test_a_socket_of_another_owner_is_refused_and_listeners_are_mode_0666(root):
    with vsock.listen(7000, config=cid(root, 4)) as listener:
        assert os.stat(listener.path).st_mode & 0o777 == 0o666
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.chown(listener.path, 12345, 12345)
        with pytest.raises(ConnectionRefusedError, match="owned by uid 12345"):
            vsock.connect(4, 7000, config=cid(root, 3), timeout=1)
