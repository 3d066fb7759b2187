"""The KMS's HTTP transport against hostile clients: slow headers and bodies, connection limits
per client, a status line for every method and protocol version, client resets, sampled
unauthenticated refusals, and replayed admin requests (also across two serving processes)."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.refusals import SAMPLE_NOTE
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state, read_credentials
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.kms_client import KmsClient, sign_request, tcp_transport

SERVE = "from qtbuild.cli.kms import command; command(prog_name='qtbuild kms')"


class Served:
    """A KmsHttpServer on 127.0.0.1 in a thread, over its own state directory."""

    def __init__(self, state_dir: Path, **options) -> None:
        self.state = open_state(StatePaths.under(state_dir))
        self.server = KmsHttpServer(("127.0.0.1", 0), KmsService(self.state.env, RecipientVerifier(roots=())),
                                    **options)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def admin(self) -> KmsClient:
        return KmsClient(tcp_transport("127.0.0.1", self.port, timeout=10), self.state.admin)

    def path(self, api: str) -> str:
        return f"/v1.0/{self.state.project_id}/kms/{api}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture()
def served(tmp_path):
    instance = Served(tmp_path / "kms", header_timeout=3.0, body_timeout=2.0, max_connections=16,
                      max_per_client=4)
    yield instance
    instance.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def exchange(port: int, raw: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(raw)
        return read_all(sock)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    return int(answer[9:12])


def signed_raw(served: Served, api: str, body: dict, *, close: bool = True) -> bytes:
    """A signed request; with ``close`` it asks the server to close the connection after it."""
    data = json.dumps(body).encode()
    path = served.path(api)
    headers = sign_request("POST", path, "", {"Host": f"127.0.0.1:{served.port}",
                                              "Content-Type": "application/json"},
                           data, served.state.admin.access_key, served.state.admin.secret_key)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if close:
        head += "Connection: close\r\n"
    return (f"POST {path} HTTP/1.1\r\n{head}Content-Length: {len(data)}\r\n\r\n").encode() + data


# --------------------------------------------------------------------------- deadlines, limits


def trickle(sockets: list[socket.socket], rounds: int, every: float) -> None:
    """Send one more header line on each socket every ``every`` seconds."""
    for round_ in range(rounds):
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.sendall(f"X-Slow-{round_}: 1\r\n".encode())
        time.sleep(every)


def open_attackers(port: int, count: int, sources: int) -> list[socket.socket]:
    attackers = []
    for index in range(count):
        sock = connect(port, f"127.0.0.{2 + index % sources}")
        sock.sendall(b"POST /v1.0/p/kms/list-keys HTTP/1.1\r\n")
        attackers.append(sock)
    time.sleep(0.2)
    return attackers


def test_slow_headers_from_one_client_hold_only_its_share(served):
    """One address opening 24 connections that trickle a header every 2 s: it gets
    max_per_client (4) of them, the rest 429; a real client is served at once; the trickling
    four are cut off with 408 at the 3 s header deadline, not after 6 s of trickling."""
    started = time.monotonic()
    attackers = open_attackers(served.port, 24, sources=1)
    admin = served.admin()
    assert "keys" in admin.call("list-keys", {})
    assert time.monotonic() - started < 2.5
    trickle(attackers, rounds=3, every=2.0)
    statuses = sorted(status_of(read_all(sock)) for sock in attackers)
    assert statuses == [408] * 4 + [429] * 20
    assert "keys" in admin.call("list-keys", {})
    admin.close()


def test_slow_headers_from_many_clients_release_the_slots_at_the_deadline(served):
    """16 addresses take all 16 slots and trickle: real requests meanwhile get 503 (overload,
    with a status line) and are served as soon as the header deadline has cut the attackers."""
    started = time.monotonic()
    attackers = open_attackers(served.port, 16, sources=16)
    assert status_of(read_all(connect(served.port))) == 503
    stop = threading.Event()
    feeder = threading.Thread(target=lambda: [trickle(attackers, 1, 2.0) for _ in range(3)
                                              if not stop.is_set()])
    feeder.start()
    served_at = None
    admin = served.admin()
    while time.monotonic() - started < 6 and served_at is None:
        try:
            admin.call("list-keys", {})
            served_at = time.monotonic() - started
        except Exception:
            admin.close()
            time.sleep(0.2)
    stop.set()
    feeder.join()
    admin.close()
    assert served_at is not None and 2.5 < served_at < 5.0     # trickling goes on until 6 s
    assert all(status_of(read_all(sock)) == 408 for sock in attackers)


def test_one_client_cannot_take_every_slot(served):
    held = [connect(served.port, "127.0.0.9") for _ in range(4)]
    for sock in held:
        sock.sendall(b"POST / HTTP/1.1\r\n")
    extra = connect(served.port, "127.0.0.9")
    answer = read_all(extra)
    assert status_of(answer) == 429                        # as the API gateway throttles
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error_code"] == "APIGW.0308"
    admin = served.admin()                                # another client is unaffected
    assert "keys" in admin.call("list-keys", {})
    admin.close()
    for sock in held:
        sock.close()


def test_overload_answers_503(tmp_path):
    instance = Served(tmp_path / "kms", max_connections=2, header_timeout=5.0)
    try:
        held = [connect(instance.port, f"127.0.0.{2 + index}") for index in range(2)]
        time.sleep(0.2)
        answer = read_all(connect(instance.port, "127.0.0.5"))
        assert status_of(answer) == 503
        for sock in held:
            sock.close()
    finally:
        instance.close()


def test_an_idle_kept_alive_connection_closes_without_a_stray_answer(tmp_path):
    """Cut off at the header deadline, an idle connection gets no 408 (a client would read it
    as the reply to its next request); the SDK client reconnects transparently."""
    instance = Served(tmp_path / "kms", header_timeout=1.0)
    try:
        with connect(instance.port) as sock:
            sock.sendall(signed_raw(instance, "list-keys", {}, close=False))
            time.sleep(0.3)
            first = sock.recv(65536)
            assert status_of(first) == 200
            time.sleep(1.5)
            assert read_all(sock) == b""                   # closed, nothing written
        admin = instance.admin()
        admin.call("list-keys", {})
        time.sleep(1.5)
        assert "keys" in admin.call("list-keys", {})     # on a fresh connection
        admin.close()
    finally:
        instance.close()


def test_endless_headers_are_cut_off_by_size(served):
    with connect(served.port) as sock:
        sock.sendall(b"POST /v1.0/p/kms/list-keys HTTP/1.1\r\n")
        with contextlib.suppress(OSError):
            for index in range(400):                       # up to ~200 KB of headers, quickly,
                block = "".join(f"X-Filler-{index}-{line}: {'a' * 40}\r\n" for line in range(10))
                sock.sendall(block.encode())
                if select.select([sock], [], [], 0)[0]:    # until the server answers
                    break
        answer = read_all(sock)
    assert status_of(answer) == 431


def test_slow_body_gets_408(served):
    with connect(served.port) as sock:
        sock.sendall(f"POST {served.path('list-keys')} HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n{{"
                     .encode())
        started = time.monotonic()
        answer = read_all(sock)
    assert status_of(answer) == 408
    assert 1.5 < time.monotonic() - started < 5


@pytest.mark.parametrize("close", [False, True])
def test_head_and_body_leave_in_one_write(served, monkeypatch, close):
    """uvicorn writes a response's head and body separately; the server joins them (one TCP
    segment), also when the response closes the connection."""
    import asyncio.selector_events

    writes: list[bytes] = []
    original = asyncio.selector_events._SelectorSocketTransport.write

    def recording(transport, data):
        writes.append(bytes(data))
        return original(transport, data)

    monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport, "write", recording)
    headers = "Connection: close\r\n" if close else ""
    answer = exchange(served.port, f"POST {served.path('list-keys')} HTTP/1.1\r\nHost: a\r\n{headers}"
                                   "Content-Length: 2\r\n\r\n{}".encode())
    assert status_of(answer) == 401 and answer.endswith(b"}")
    assert writes == [answer]


def test_keep_alive_serves_several_requests_on_one_connection(served):
    with connect(served.port) as sock:
        for _ in range(3):
            sock.sendall(signed_raw(served, "list-keys", {}, close=False))
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += sock.recv(65536)
            assert status_of(head) == 200 and "keys" in json.loads(body)
            assert b"connection: close" not in head.lower()


# --------------------------------------------------------------------------- status lines


@pytest.mark.parametrize("raw, status", [
    (b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    (b"GET /v1.0/p/kms/list-keys HTTP/1.0\r\n\r\n", 400),
    (b"DELETE /v1.0/p/kms/list-keys HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 400),
    (b"PUT /v1.0/p/kms/list-keys HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", 405),
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 400),
    (b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    (b"POST /v1.0/p/kms/list-keys HTTP/2.0\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"GET / HTTP/3.0\r\n\r\n", 400),
    (b"GET / HTTP/0.9\r\n\r\n", 400),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40), 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
])
def test_every_answer_has_a_status_line_and_a_4xx_for_bad_requests(served, raw, status):
    answer = exchange(served.port, raw)
    assert status_of(answer) == status
    reply = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert reply.get("error", reply)["error_code"].startswith(("KMS.", "APIGW."))


def test_client_resets_leave_no_traceback(tmp_path):
    qtbuild_state = tmp_path / "qtbuild"
    LocalPki.init(qtbuild_state)
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--state-dir", str(tmp_path / "kms"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"QTBUILD_STATE_DIR": str(qtbuild_state),
                                                             "PATH": "/usr/bin:/bin"})
    try:
        info = json.loads(process.stdout.readline())
        port = int(info["endpoint"].rsplit(":", 1)[1])
        _, credentials = read_credentials(info["credentials"])
        linger = struct.pack("ii", 1, 0)                  # close() sends RST
        for raw in (b"", b"POST /v1.0/p/kms/list-keys HTTP/1.1\r\n",
                    b"POST /v1.0/p/kms/list-keys HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
                    b"GARBAGE\r\n\r\n"):
            sock = connect(port)
            sock.sendall(raw)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sock.close()
        client = KmsClient(tcp_transport("127.0.0.1", port, timeout=10), credentials)
        assert "keys" in client.call("list-keys", {})
        client.close()
        time.sleep(0.5)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0
    assert b"Traceback" not in stderr and b"Exception" not in stderr, stderr.decode()


# --------------------------------------------------------------------------- audit sampling, replay


def test_unauthenticated_refusals_are_counted_and_sampled(tmp_path):
    instance = Served(tmp_path / "kms", max_per_client=256)
    store = instance.state.env.store
    before = len(store.audit(limit=1000))
    try:
        for _ in range(200):
            answer = exchange(instance.port, f"POST {instance.path('list-keys')} HTTP/1.1\r\nHost: a\r\n"
                                             f"Connection: close\r\nContent-Length: 2\r\n\r\n{{}}".encode())
            assert status_of(answer) == 401
    finally:
        instance.close()                                   # flushes the pending sample
    rows = [record for record in store.audit(limit=1000)[before:] if record.principal is None]
    assert 1 <= len(rows) <= 20                            # ~1 row per second, not 200
    counts = [int(row.reason.rsplit("[sample of ", 1)[1].split()[0]) for row in rows]
    assert sum(counts) == 200
    assert all(row.status == 401 and row.error_code == "APIGW.0301" and row.reason.startswith("KMS.0301")
               for row in rows)
    assert SAMPLE_NOTE.split("{")[0] in rows[0].reason


def test_replayed_admin_request_is_refused_even_by_another_process(tmp_path):
    first = Served(tmp_path / "kms")
    second = Served(tmp_path / "kms")                      # same database, its own Store
    try:
        admin = first.admin()
        admin.call("admin/create-principal", {"name": "enclave"})
        tight = {"Version": "1.1", "Statement": [{"Effect": "Deny", "Action": ["kms:*"]}]}
        admin.close()
        request = signed_raw(first, "admin/put-policy", {"name": "enclave", "policy": tight})
        assert status_of(exchange(first.port, request)) == 200
        for port in (first.port, second.port):
            answer = exchange(port, request)
            assert status_of(answer) == 401
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["error_code"] == "KMS.0304"
        # reads are not replay-guarded; a freshly signed write is served
        assert status_of(exchange(second.port, signed_raw(second, "list-keys", {}))) == 200
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("api, body", [("list-keys", {}), ("gen-random", {"random_data_length": "64"})])
def test_no_reply_leaves_before_its_audit_record_is_committed(served, monkeypatch, api, body):
    """On a thread (list-keys) or on the event loop (gen-random: a data-plane API), the reply
    waits for the audit log's commit."""
    assert served.server.service.runs_inline(
        type("R", (), {"path": served.path(api), "method": "POST", "headers": {}})()) == (api == "gen-random")
    store = served.state.env.store
    release, entered = threading.Event(), threading.Event()
    original = store.add_audits

    def held_commit(records):
        entered.set()
        release.wait(10)
        original(records)

    monkeypatch.setattr(store, "add_audits", held_commit)
    replies: list[dict] = []
    client = served.admin()
    caller = threading.Thread(target=lambda: replies.append(client.call(api, body)))
    caller.start()
    assert entered.wait(10)
    time.sleep(0.3)
    assert replies == []                        # held back while the record is not durable
    release.set()
    caller.join(10)
    assert len(replies) == 1
    assert store.audit(after=0, limit=1000)[-1].api == api
    client.close()
