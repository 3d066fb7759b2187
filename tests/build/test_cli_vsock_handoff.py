"""``qtbuild vsock listen|send`` and ``qtbuild handoff`` as real processes over emulated vsock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from qtbuild.runtime.enclave.state import RuntimeDir
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk import HandoffError, parse_attestation, receive_job, vsock

PCRS = {index: bytes([0x50 + index]) * 48 for index in range(16)}
ENCLAVE_CID = 17


@pytest.fixture
def root():
    path = tempfile.mkdtemp(prefix="cv", dir="/tmp")  # AF_UNIX paths must fit 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def qtbuild(*args: str, root: str, state: Path | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, vsock.ENV_TRANSPORT: "emulated", vsock.ENV_DIR: root}
    env.pop(vsock.ENV_CID, None)
    if state:
        env["QTBUILD_STATE_DIR"] = str(state)
    return subprocess.Popen([sys.executable, "-m", "qtbuild", *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_listen_prints_what_an_enclave_sends(root):
    listener = qtbuild("vsock", "listen", "6000", "--timeout", "30", root=root)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(vsock.socket_path(root, 3, 6000)):
            assert time.monotonic() < deadline and listener.poll() is None, listener.stderr.read()
            time.sleep(0.05)
        with vsock.connect(3, 6000, config=vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, root), timeout=5) as sock:
            sock.sendall(b'{"status": "ok"}\n')
        out, err = listener.communicate(timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert listener.returncode == 0 and out == b'{"status": "ok"}\n'
    assert f"connection from cid {ENCLAVE_CID}".encode() in err


def test_send_writes_stdin_and_prints_the_answer(root):
    config = vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, root)
    server = vsock.listen(7000, config=config)

    def echo_upper() -> None:
        connection, _ = server.accept(timeout=20)
        with connection:
            data = b""
            while chunk := connection.recv(4096):
                data += chunk
            connection.sendall(data.upper())

    thread = threading.Thread(target=echo_upper, daemon=True)
    thread.start()
    try:
        sender = qtbuild("vsock", "send", "7000", "--cid", str(ENCLAVE_CID), root=root)
        out, err = sender.communicate(b"hello enclave", timeout=30)
    finally:
        server.close()
    assert sender.returncode == 0, err
    assert out == b"HELLO ENCLAVE"


def test_send_to_nobody_is_a_one_line_error(root):
    sender = qtbuild("vsock", "send", "7001", "--cid", str(ENCLAVE_CID), "--timeout", "2", root=root)
    _out, err = sender.communicate(b"x", timeout=30)
    assert sender.returncode != 0 and err.decode().startswith("qtbuild: error: ") and err.count(b"\n") == 1


@pytest.mark.parametrize("expected_pcr0, allowed", [(PCRS[0], True), (b"\x99" * 48, False)])
def test_handoff_gives_the_job_and_credentials_only_to_the_measured_enclave(root, tmp_path, expected_pcr0, allowed):
    state = tmp_path / "qtbuild"
    pki = LocalPki.init(state)
    module = SecurityModule(PCRS, debug=False, signer=pki.signer("handoff-cli"),
                            module_id="i-0123456789abcdef0-enc0123456789abcdef")
    outcome: dict = {}

    def enclave() -> None:
        try:
            config = vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, root)
            with receive_job(5000, attestor=module, timeout=30, config=config) as job:
                outcome["job"] = job.payload
                job.reply({"records": len(job["records"]), "access_key": job.credentials.access_key})
        except HandoffError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=enclave, daemon=True)
    thread.start()
    (tmp_path / "job.json").write_text(json.dumps({"records": ["a", "b"]}))
    (tmp_path / "app.json").write_text(json.dumps({
        "endpoint": "http://127.0.0.1:1", "access_key": "AK1", "secret_key": "SK1", "project_id": "p1"}))
    (tmp_path / "measurements.json").write_text(json.dumps({"PCR0": expected_pcr0.hex(), "PCR8": "00" * 48}))
    parent = qtbuild("handoff", str(ENCLAVE_CID), "--job", str(tmp_path / "job.json"),
                     "--kms-credentials", str(tmp_path / "app.json"),
                     "--pcr0-from", str(tmp_path / "measurements.json"), "--timeout", "30",
                     "--save-document", str(tmp_path / "doc.cose"), root=root, state=state)
    out, err = parent.communicate(timeout=60)
    thread.join(10)
    if allowed:
        assert parent.returncode == 0, err
        assert json.loads(out) == {"records": 2, "access_key": "AK1"}
        assert outcome["job"]["credentials"]["secret_key"] == "SK1"
        assert parse_attestation((tmp_path / "doc.cose").read_bytes()).pcrs[0] == PCRS[0]
    else:
        assert parent.returncode == 1 and out == b""
        assert b"(pcrs)" in err and err.count(b"\n") == 1
        assert "job" not in outcome and "refused" in outcome["error"]
        assert not (tmp_path / "doc.cose").exists()


def test_transport_emulated_alone_means_the_local_runtime_root(tmp_path):
    """Regression: a proxy started before the first `qtbuild run` bound native vsock on a host with
    /dev/vsock, and enclaves never reached it; `--transport emulated` now means the local runtime's
    socket root (created if missing)."""
    runtime = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        env = {key: value for key, value in os.environ.items() if not key.startswith("QTBUILD_VSOCK_")}
        env["QTBUILD_RUNTIME_DIR"] = str(runtime / "run")
        listener = subprocess.Popen([sys.executable, "-m", "qtbuild", "vsock", "listen", "6100", "--transport",
                                     "emulated", "--timeout", "30"], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        path = runtime / "run" / "vsock" / "3" / "6100.sock"
        deadline = time.monotonic() + 20
        while not path.exists():
            assert time.monotonic() < deadline and listener.poll() is None, listener.stderr.read()
            time.sleep(0.05)
        config = vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, str(runtime / "run" / "vsock"))
        with vsock.connect(3, 6100, config=config, timeout=5) as sock:
            sock.sendall(b"found")
        out, err = listener.communicate(timeout=20)
        assert listener.returncode == 0 and out == b"found", err
        assert b"(cid 3, emulated)" in err
    finally:
        if listener.poll() is None:
            listener.kill()
        RuntimeDir(runtime / "run").unmount()  # as root, the parent's vsock directory is a tmpfs
        shutil.rmtree(runtime, ignore_errors=True)


def test_handoff_carries_the_security_token_of_short_lived_credentials(tmp_path):
    """Temporary credentials (kms principal create --temporary --out) reach the enclave whole:
    the job carries their security token and the SDK's Job.credentials hands it to the client."""
    import socket

    from qtbuild.cli.handoff import _job, _long_lived
    from qtbuild.runtime.sdk.handoff import Job

    job_file, temporary, long_lived = tmp_path / "job.json", tmp_path / "temp.json", tmp_path / "app.json"
    job_file.write_text('{"input": 1}')
    fields = {"endpoint": "http://127.0.0.1:1", "access_key": "AK", "secret_key": "SK", "project_id": "p"}
    temporary.write_text(json.dumps({**fields, "security_token": "TOKEN", "expires_at": "2026-12-03T13:30:00Z"}))
    long_lived.write_text(json.dumps(fields))

    job = _job(str(job_file), str(temporary))
    assert job["credentials"]["security_token"] == "TOKEN" and not _long_lived(job)
    assert _long_lived(_job(str(job_file), str(long_lived)))
    left, right = socket.socketpair()
    with left, right:
        credentials = Job(job, left).credentials
    assert (credentials.access_key, credentials.security_token) == ("AK", "TOKEN")


def test_the_parent_reaches_an_existing_local_runtime_root_unless_told_otherwise(tmp_path, monkeypatch):
    """parent_vsock_config (proxy, vsock, handoff): no option and no variable means the local
    runtime's socket root once it exists; --vsock-dir wins over it."""
    from qtbuild.cli.parent_vsock import parent_vsock_config

    for name in (vsock.ENV_TRANSPORT, vsock.ENV_DIR, vsock.ENV_CID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QTBUILD_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run" / "vsock").mkdir(parents=True)
    assert parent_vsock_config(None, None) == vsock.VsockConfig(vsock.EMULATED, 3, str(tmp_path / "run" / "vsock"))
    assert parent_vsock_config(None, str(tmp_path / "other")).root == str(tmp_path / "other")
