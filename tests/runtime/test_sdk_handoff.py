"""The SDK's application-facing helpers: ``parse_attestation`` (fields of a document), the nonce
on every KMS call that attests, and the hand-off (job and credentials over vsock after
attesting), on both sides — the enclave side also under Debian bookworm's packages."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import pytest

from qtbuild.formats.attestation import read_document
from qtbuild.runtime.handoff import HandoffRefused, Trust, hand_off
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk import (
    DocumentError,
    HandoffError,
    KmsClient,
    parse_attestation,
    receive_job,
    tcp_transport,
    vsock,
)
from qtbuild.runtime.sdk.kms_client import Credentials

PCRS = {index: bytes([0x40 + index]) * 48 for index in range(16)}
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
ENCLAVE_CID = 16
COMPAT_PYTHON = os.environ.get(
    "QTBUILD_SDK_COMPAT_PYTHON", str(Path(__file__).resolve().parents[2] / ".venv-bookworm" / "bin" / "python"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPki:
    return LocalPki.init(tmp_path_factory.mktemp("qtbuild-state"))


def device(pki: LocalPki, pcrs=PCRS, *, debug: bool = False) -> SecurityModule:
    return SecurityModule(pcrs, debug=debug, signer=pki.signer("handoff"), module_id=MODULE_ID)


@pytest.fixture
def vsock_root():
    path = tempfile.mkdtemp(prefix="ho", dir="/tmp")  # AF_UNIX paths must fit 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- parse_attestation


def test_parse_attestation_gives_the_fields_the_host_parser_reads(pki):
    document = device(pki).attestation(user_data=b"u", nonce=b"n" * 32, public_key=b"k")
    fields = parse_attestation(document)
    _, reference = read_document(document)
    assert (fields.module_id, fields.digest, fields.timestamp) == (MODULE_ID, "SHA384", reference.timestamp)
    assert fields.pcrs == reference.pcrs and fields.pcr(0) == PCRS[0].hex()
    assert (fields.user_data, fields.nonce, fields.public_key) == (b"u", b"n" * 32, b"k")
    assert fields.certificate == reference.certificate and fields.cabundle == reference.cabundle
    assert not fields.is_debug and abs(fields.time.timestamp() - time.time()) < 60
    assert parse_attestation(device(pki, debug=True).attestation()).is_debug


@pytest.mark.parametrize("data, message", [
    (b"", "1..32768 bytes"),
    (b"\xff\xff", "not CBOR"),
    (cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"", b""])), "tag 17"),
    (cbor2.dumps([b"", {}, b""]), "not a COSE_Sign1"),
    (cbor2.dumps([b"", {}, cbor2.dumps([1]), b""]), "payload: not a map"),
    (cbor2.dumps([b"", {}, cbor2.dumps({"module_id": "x"}), b""]), "missing digest"),
])
def test_parse_attestation_names_what_is_wrong(data, message):
    with pytest.raises(DocumentError, match=message):
        parse_attestation(data)


# --------------------------------------------------------------------------- nonce on KMS calls


class Recording:
    """An attestor that records the documents it produced."""

    def __init__(self, inner: SecurityModule) -> None:
        self.inner, self.documents = inner, []

    def attestation(self, user_data=None, nonce=None, public_key=None) -> bytes:
        document = self.inner.attestation(user_data=user_data, nonce=nonce, public_key=public_key)
        self.documents.append(document)
        return document


def test_every_attesting_kms_call_carries_the_nonce(pki, tmp_path):
    state = open_state(StatePaths.under(tmp_path / "kms"))
    server = KmsHttpServer(("127.0.0.1", 0), KmsService(state.env, RecipientVerifier(roots=(pki.root_certificate,))))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        admin = KmsClient(tcp_transport("127.0.0.1", server.server_address[1]), state.admin)
        key = admin.call("create-key", {"key_alias": "nonce"})["key_info"]["key_id"]
        cipher_text = admin.encrypt_data(key, b"secret")
        attestor = Recording(device(pki))
        client = KmsClient(tcp_transport("127.0.0.1", server.server_address[1]), state.admin, attestor=attestor)
        assert client.decrypt_data(cipher_text, nonce=b"\x01" * 16) == b"secret"
        datakey, wrapped = client.create_datakey(key, nonce=b"\x02" * 16)
        assert client.decrypt_datakey(key, wrapped, nonce=b"\x03" * 16) == datakey
        assert len(client.gen_random(256, nonce=b"\x04" * 16)) == 32
        client.decrypt_data(cipher_text)
        nonces = [parse_attestation(document).nonce for document in attestor.documents]
        assert nonces == [b"\x01" * 16, b"\x02" * 16, b"\x03" * 16, b"\x04" * 16, None]
        with pytest.raises(ValueError, match="needs an attestor"):
            admin.decrypt_data(cipher_text, nonce=b"x")
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the hand-off


def enclave_side(root: str, attestor, outcome: dict, *, result=None) -> threading.Thread:
    """receive_job in a thread, as the enclave app would; records the job or the error."""
    def run() -> None:
        config = vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, root)
        try:
            with receive_job(5000, attestor=attestor, timeout=20, config=config) as job:
                outcome["job"] = job.payload
                outcome["credentials"] = job.credentials if "credentials" in job.payload else None
                job.reply(result if result is not None else {"echo": job["input"]})
        except HandoffError as error:
            outcome["error"] = str(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def parent_config(root: str) -> vsock.VsockConfig:
    return vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, root)


def test_hand_off_delivers_the_sealed_job_and_returns_the_result(pki, vsock_root):
    outcome: dict = {}
    thread = enclave_side(vsock_root, device(pki), outcome)
    job = {"input": "card batch 7", "credentials": {"access_key": "AK", "secret_key": "SK", "project_id": "p"}}
    trust = Trust(roots=(pki.root_certificate,), expect_pcrs={0: PCRS[0]})
    done = hand_off(ENCLAVE_CID, job, trust, timeout=20, config=parent_config(vsock_root))
    thread.join(10)
    assert done.result == {"echo": "card batch 7"}
    assert outcome["job"] == job and outcome["credentials"] == Credentials("AK", "SK", "p")
    assert done.document.pcrs[0] == PCRS[0] and len(done.document.nonce) == 32


@pytest.mark.parametrize("case, check", [("pcr0", "pcrs"), ("root", "root"), ("debug", "debug")])
def test_hand_off_refuses_the_wrong_enclave_and_tells_it(pki, vsock_root, tmp_path, case, check):
    outcome: dict = {}
    attestor = device(pki, debug=case == "debug")
    roots = (pki.root_certificate,)
    if case == "root":
        roots = (LocalPki.init(tmp_path / "other").root_certificate,)
    thread = enclave_side(vsock_root, attestor, outcome)
    expect = {0: b"\x99" * 48} if case == "pcr0" else {}
    with pytest.raises(HandoffRefused) as refused:
        hand_off(ENCLAVE_CID, {"input": "x"}, Trust(roots=roots, expect_pcrs=expect), timeout=20,
                 config=parent_config(vsock_root))
    thread.join(10)
    assert refused.value.check == check
    assert "job" not in outcome and outcome["error"].startswith("the parent refused")


def test_hand_off_waits_for_a_booting_enclave_then_gives_up(pki, vsock_root):
    begin = time.monotonic()
    with pytest.raises(ConnectionRefusedError, match="receive_job"):
        hand_off(ENCLAVE_CID, {}, Trust(roots=(pki.root_certificate,)), timeout=0.5,
                 config=parent_config(vsock_root))
    assert 0.5 <= time.monotonic() - begin < 3


# --------------------------------------------------------------------------- bookworm


ENCLAVE_CHILD = r"""
import base64, json, sys
from qtbuild_sdk import parse_attestation, receive_job
from qtbuild_sdk.vsock import VsockConfig, EMULATED

class Replayed:
    # stands in for /dev/qtsm: asks the parent test for a document over stdin/stdout
    def attestation(self, user_data=None, nonce=None, public_key=None):
        print(json.dumps({"nonce": nonce.hex(), "public_key": base64.b64encode(public_key).decode()}), flush=True)
        self.last = base64.b64decode(sys.stdin.readline())
        return self.last

root, cid = sys.argv[1], int(sys.argv[2])
attestor = Replayed()
with receive_job(5000, attestor=attestor, timeout=30, config=VsockConfig(EMULATED, cid, root)) as job:
    job.reply({"got": job["input"], "credentials": repr(job.credentials),
               "pcr0": parse_attestation(attestor.last).pcr(0)})
"""


def test_enclave_side_runs_on_bookworm_packages(pki, vsock_root, tmp_path):
    if not os.access(COMPAT_PYTHON, os.X_OK):
        message = f"no bookworm-compatibility interpreter at {COMPAT_PYTHON}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from qtbuild.cli.sdk import export_sdk

    export_sdk(tmp_path / "sdk")
    child = subprocess.Popen([COMPAT_PYTHON, "-c", ENCLAVE_CHILD, vsock_root, str(ENCLAVE_CID)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path / "sdk")
    module = device(pki)

    def answer_attestation() -> None:
        request = json.loads(child.stdout.readline())
        document = module.attestation(user_data=b"qtbuild-handoff/1", nonce=bytes.fromhex(request["nonce"]),
                                      public_key=base64.b64decode(request["public_key"]))
        child.stdin.write(base64.b64encode(document).decode() + "\n")
        child.stdin.flush()

    helper = threading.Thread(target=answer_attestation, daemon=True)
    helper.start()
    try:
        job = {"input": "hello", "credentials": {"access_key": "AK", "secret_key": "SK", "project_id": "p"}}
        done = hand_off(ENCLAVE_CID, job, Trust(roots=(pki.root_certificate,)), timeout=30,
                        config=parent_config(vsock_root))
        assert child.wait(30) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
    assert done.result == {"got": "hello", "credentials": "Credentials(access_key='AK', project_id='p')",
                           "pcr0": PCRS[0].hex()}


def test_an_app_that_fails_reports_the_exception_type_only(pki, vsock_root):
    def run() -> None:
        config = vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, vsock_root)
        with receive_job(5000, attestor=device(pki), timeout=20, config=config) as job:
            raise ValueError(f"bad input {job['secret']}")

    thread = threading.Thread(target=lambda: pytest.raises(ValueError, run), daemon=True)
    thread.start()
    done = hand_off(ENCLAVE_CID, {"secret": "swordfish"}, Trust(roots=(pki.root_certificate,)), timeout=20,
                    config=parent_config(vsock_root))
    thread.join(10)
    assert done.result == {"status": "error", "error": "ValueError"}


def test_an_app_that_closes_without_a_result_is_named(pki, vsock_root):
    def run() -> None:
        config = vsock.VsockConfig(vsock.EMULATED, ENCLAVE_CID, vsock_root)
        receive_job(5000, attestor=device(pki), timeout=20, config=config).close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    with pytest.raises(HandoffError, match="took the job but closed the connection without a result"):
        hand_off(ENCLAVE_CID, {}, Trust(roots=(pki.root_certificate,)), timeout=20, config=parent_config(vsock_root))
    thread.join(10)
