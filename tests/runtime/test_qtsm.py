"""The local security module: PKI, PCR state machine, documents, and the socket server."""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import struct
import threading
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given
from hypothesis import strategies as st

import qtbuild.runtime.qtsm.pki as pki_module
from qtbuild.formats.attestation import PAYLOAD_KEYS, read_document
from qtbuild.formats.cose import verify1
from qtbuild.formats.measure import ZERO_PCR, Measurements
from qtbuild.runtime.qtsm.device import SecurityModule, boot_pcrs, make_module_id
from qtbuild.runtime.qtsm.pki import LocalPki, PkiError, default_state_dir
from qtbuild.runtime.qtsm.server import request, serve_device
from qtbuild.runtime.verifier.attestation import verify_document

IMAGE = Measurements(pcr0=b"\x10" * 48, pcr1=b"\x11" * 48, pcr2=b"\x12" * 48, pcr8=b"\x18" * 48)
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"


@pytest.fixture(scope="module")
def shared_pki(tmp_path_factory) -> LocalPki:
    return LocalPki.init(tmp_path_factory.mktemp("state"))


def make_device(pki: LocalPki, *, debug: bool = False, clock=None, **boot) -> SecurityModule:
    options = {"clock": clock} if clock else {}
    return SecurityModule(boot_pcrs(IMAGE, **boot), debug=debug, signer=pki.signer("enc-1"),
                          module_id=MODULE_ID, **options)


def call(device: SecurityModule, request_obj) -> object:
    data = request_obj if isinstance(request_obj, bytes) else cbor2.dumps(request_obj)
    return cbor2.loads(device.handle(data))


# --------------------------------------------------------------------------- PKI


def test_init_lays_out_private_state(tmp_path):
    pki = LocalPki.init(tmp_path / "state")
    directory = tmp_path / "state" / "pki"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "root.key").stat().st_mode) == 0o600
    pki.issue_leaf("enc-1")
    for level in ("region", "grid", "instance"):
        assert stat.S_IMODE((directory / "qingtian" / f"{level}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "qingtian" / "leaves" / "enc-1.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "qingtian" / "leaves").stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "qingtian").stat().st_mode) == 0o700


def test_init_is_idempotent_and_force_replaces(tmp_path):
    first = LocalPki.init(tmp_path)
    assert LocalPki.is_initialised(tmp_path)
    assert LocalPki.init(tmp_path).root_fingerprint() == first.root_fingerprint()
    assert LocalPki.load(tmp_path).root_fingerprint() == first.root_fingerprint()
    assert LocalPki.init(tmp_path, force=True).root_fingerprint() != first.root_fingerprint()


def test_load_without_pki_and_partial_pki_fail(tmp_path):
    with pytest.raises(PkiError, match="pki init"):
        LocalPki.load(tmp_path)
    LocalPki.init(tmp_path)
    (tmp_path / "pki" / "root.key").unlink()
    with pytest.raises(PkiError, match="incomplete"):
        LocalPki.init(tmp_path)


def test_load_detects_a_key_that_does_not_match(tmp_path):
    LocalPki.init(tmp_path)
    other = LocalPki.init(tmp_path / "other")
    (tmp_path / "pki" / "root.key").write_bytes((other.directory / "root.key").read_bytes())
    with pytest.raises(PkiError, match="does not match"):
        LocalPki.load(tmp_path)


def _ed25519_certificate_pem() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not an EC authority")])
    now = pki_module._now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .sign(key, None))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_load_refuses_a_certificate_without_an_ec_key(tmp_path):
    LocalPki.init(tmp_path)
    (tmp_path / "pki" / "root.crt").write_bytes(_ed25519_certificate_pem())
    with pytest.raises(PkiError, match="does not match"):  # was AttributeError (no public_numbers)
        LocalPki.load(tmp_path)


def test_a_damaged_leaf_on_disk_is_replaced(tmp_path):
    pki = LocalPki.init(tmp_path)
    key, _ = pki.issue_leaf("enclave-1")
    leaf_file = tmp_path / "pki" / "qingtian" / "leaves" / "enclave-1.pem"  # the default cloud
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    leaf_file.write_bytes(key_pem + _ed25519_certificate_pem())  # an EC key with a foreign certificate
    fresh_key, cert = LocalPki.load(tmp_path).issue_leaf("enclave-1")  # was AttributeError
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert fresh_key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(tmp_path))
    assert default_state_dir() == tmp_path
    monkeypatch.delenv("QTBUILD_STATE_DIR")
    home = os.path.expanduser("~/.local/share/qtbuild")
    expected = "/var/lib/qtbuild" if os.geteuid() == 0 else home
    assert str(default_state_dir()) == expected


def test_chain_shape_mirrors_the_real_ones(shared_pki):
    chain = [x509.load_der_x509_certificate(der) for der in shared_pki.cabundle()]
    root, region, grid, instance = chain  # per-cloud shapes: tests/runtime/test_clouds.py
    assert hashlib.sha256(shared_pki.cabundle()[0]).hexdigest() == shared_pki.root_fingerprint()
    assert root.subject == root.issuer and region.issuer == root.subject
    assert grid.issuer == region.subject and instance.issuer == grid.subject
    assert root.not_valid_after_utc - root.not_valid_before_utc > timedelta(days=29 * 365)
    key, leaf = shared_pki.issue_leaf("enc-1")
    assert leaf.issuer == instance.subject and key.curve.name == "secp384r1"
    assert timedelta(hours=3) <= leaf.not_valid_after_utc - leaf.not_valid_before_utc \
        <= timedelta(hours=3, minutes=5)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


def test_leaf_is_cached_across_instances_and_renewed(tmp_path, monkeypatch):
    pki = LocalPki.init(tmp_path)
    _, leaf = pki.issue_leaf("enc-1")
    assert pki.issue_leaf("enc-1")[1] == leaf
    assert LocalPki.load(tmp_path).issue_leaf("enc-1")[1] == leaf
    assert pki.issue_leaf("enc-2")[1] != leaf
    monkeypatch.setattr(pki_module, "LEAF_RENEW_BEFORE", timedelta(hours=4))
    short = pki.issue_leaf("enc-3")[1]
    assert pki.issue_leaf("enc-3")[1] != short  # < 4 hours left: replaced at once
    monkeypatch.setattr(pki_module, "LEAF_RENEW_BEFORE", timedelta(minutes=30))
    pki.forget_leaf("enc-1")
    assert not (tmp_path / "pki" / "qingtian" / "leaves" / "enc-1.pem").exists()
    assert pki.issue_leaf("enc-1")[1] != leaf


def test_instance_ca_is_renewed_before_it_expires(tmp_path):
    start = datetime.now(UTC)
    now = [start]
    LocalPki.init(tmp_path)
    pki = LocalPki.load(tmp_path, clock=lambda: now[0])
    old_instance = pki.cabundle()[3]
    now[0] = start + timedelta(hours=22)  # the instance CA (1 day) has < 3 hours (a leaf's life) left
    _, leaf = pki.issue_leaf("enc-1")
    new_instance = pki.cabundle()[3]
    assert new_instance != old_instance
    assert LocalPki.load(tmp_path, clock=lambda: now[0]).cabundle()[3] == new_instance
    assert leaf.issuer == x509.load_der_x509_certificate(new_instance).subject


@pytest.mark.parametrize("enclave_id", ["", "../x", ".hidden", "a/b", "x" * 129])
def test_invalid_enclave_ids_are_refused(shared_pki, enclave_id):
    with pytest.raises(PkiError, match="invalid enclave id"):
        shared_pki.issue_leaf(enclave_id)


def test_concurrent_leaf_requests_agree(tmp_path):
    pki = LocalPki.init(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pki.issue_leaf("enc-1")[1]))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1


# --------------------------------------------------------------------------- PCR state machine


def test_boot_pcrs():
    pcrs = boot_pcrs(IMAGE, parent_role="arn:aws:iam::1:role/x", instance_id="i-0abc")
    assert pcrs[0] == IMAGE.pcr0 and pcrs[1] == IMAGE.pcr1 and pcrs[2] == IMAGE.pcr2
    assert pcrs[8] == IMAGE.pcr8
    assert pcrs[3] == hashlib.sha384(ZERO_PCR + b"arn:aws:iam::1:role/x").digest()
    assert pcrs[4] == hashlib.sha384(ZERO_PCR + b"i-0abc").digest()
    unsigned = boot_pcrs(Measurements(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48))
    assert sorted(unsigned) == [0, 1, 2]


def test_initial_state(shared_pki):
    device = make_device(shared_pki, instance_id="i-0abc")
    described = call(device, "DescribeNSM")["DescribeNSM"]
    assert described == {
        "version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": MODULE_ID,
        "max_pcrs": 32, "locked_pcrs": list(range(16)), "digest": "SHA384",
    }
    for index in range(32):
        answer = call(device, {"DescribePCR": {"index": index}})["DescribePCR"]
        assert answer["lock"] is (index < 16)
        expected = {0: IMAGE.pcr0, 1: IMAGE.pcr1, 2: IMAGE.pcr2, 8: IMAGE.pcr8,
                    4: hashlib.sha384(ZERO_PCR + b"i-0abc").digest()}.get(index, ZERO_PCR)
        assert answer["data"] == expected


def test_extend_and_lock_semantics(shared_pki):
    device = make_device(shared_pki)
    first = call(device, {"ExtendPCR": {"index": 16, "data": b"abc"}})["ExtendPCR"]["data"]
    assert first == hashlib.sha384(ZERO_PCR + b"abc").digest()
    second = call(device, {"ExtendPCR": {"index": 16, "data": b"def"}})["ExtendPCR"]["data"]
    assert second == hashlib.sha384(first + b"def").digest()
    assert call(device, {"LockPCR": {"index": 16}}) == "LockPCR"
    assert call(device, {"ExtendPCR": {"index": 16, "data": b"x"}}) == {"Error": "ReadOnlyIndex"}
    assert call(device, {"LockPCR": {"index": 16}}) == {"Error": "ReadOnlyIndex"}
    assert call(device, {"DescribePCR": {"index": 16}})["DescribePCR"] == {"lock": True,
                                                                          "data": second}
    for index in (0, 3, 15):
        assert call(device, {"ExtendPCR": {"index": index, "data": b"x"}}) == {
            "Error": "ReadOnlyIndex"}
        assert call(device, {"LockPCR": {"index": index}}) == {"Error": "ReadOnlyIndex"}
    for bad in ({"DescribePCR": {"index": 32}}, {"ExtendPCR": {"index": 40, "data": b""}},
                {"LockPCR": {"index": 32}}, {"LockPCRs": {"range": 33}}):
        assert call(device, bad) == {"Error": "InvalidIndex"}
    assert call(device, {"LockPCRs": {"range": 20}}) == "LockPCRs"
    assert call(device, "DescribeNSM")["DescribeNSM"]["locked_pcrs"] == list(range(20))
    assert call(device, {"LockPCRs": {"range": [25, 30]}}) == "LockPCRs"
    assert call(device, {"LockPCRs": {"range": 32}}) == "LockPCRs"
    assert call(device, "DescribeNSM")["DescribeNSM"]["locked_pcrs"] == list(range(32))


def test_documents_carry_boot_and_locked_user_pcrs(shared_pki):
    device = make_device(shared_pki)
    call(device, {"ExtendPCR": {"index": 20, "data": b"app"}})
    call(device, {"ExtendPCR": {"index": 21, "data": b"other"}})
    call(device, {"LockPCR": {"index": 20}})
    document = call(device, {"Attestation": {"nonce": b"n"}})["Attestation"]["document"]
    _, doc = read_document(document)
    assert sorted(doc.pcrs) == list(range(16)) + [20]
    assert doc.pcrs[20] == hashlib.sha384(ZERO_PCR + b"app").digest()


def test_document_layout(shared_pki):
    device = make_device(shared_pki, clock=lambda: 1_800_000_000.25)
    document = device.attestation(user_data=b"", nonce=b"\x01" * 32, public_key=None)
    message, doc = read_document(document)
    assert document[0] == 0x84 and not message.tagged and message.alg == -35
    assert doc.key_order == PAYLOAD_KEYS
    assert doc.module_id == MODULE_ID and doc.timestamp == 1_800_000_000_250
    assert b"\x1b" + (1_800_000_000_250).to_bytes(8, "big") in message.payload
    assert doc.user_data == b"" and doc.nonce == b"\x01" * 32 and doc.public_key is None
    assert list(doc.cabundle) == shared_pki.cabundle()
    _, leaf = shared_pki.issue_leaf("enc-1")
    assert x509.load_der_x509_certificate(doc.certificate) == leaf
    verify1(message, leaf.public_key(), signature_encoding="little")  # the QingTian profile's r ‖ s


def test_attestation_limits(shared_pki):
    device = make_device(shared_pki)
    ok = {"user_data": b"u" * 512, "nonce": b"n" * 512, "public_key": b"k" * 1024}
    assert "Attestation" in call(device, {"Attestation": ok})
    for field, size in (("user_data", 513), ("nonce", 513), ("public_key", 1025)):
        assert call(device, {"Attestation": {**ok, field: b"x" * size}}) == {
            "Error": "InputTooLarge"}
    assert call(device, b"\xa0" * 4097) == {"Error": "InputTooLarge"}


def test_debug_mode_attests_zero_boot_pcrs(shared_pki):
    device = make_device(shared_pki, debug=True, instance_id="i-0abc")
    assert all(call(device, {"DescribePCR": {"index": i}})["DescribePCR"]["data"] == ZERO_PCR
               for i in range(16))
    _, doc = read_document(device.attestation())
    assert all(doc.pcrs[i] == ZERO_PCR for i in range(16))
    verified = verify_document(device.attestation(), allow_debug=True,
                               root_fingerprints=[shared_pki.root_fingerprint()])
    assert verified.is_debug


def test_get_random(shared_pki):
    device = make_device(shared_pki)
    first = call(device, "GetRandom")["GetRandom"]["random"]
    second = call(device, "GetRandom")["GetRandom"]["random"]
    assert len(first) == len(second) == 256 and first != second


def test_signer_failure_is_an_internal_error(shared_pki):
    def broken():
        raise RuntimeError("no key")

    device = SecurityModule({}, debug=False, signer=broken, module_id=MODULE_ID)
    assert call(device, {"Attestation": {}}) == {"Error": "InternalError"}
    assert call(device, "DescribeNSM")["DescribeNSM"]["module_id"] == MODULE_ID


@pytest.mark.parametrize("pcrs, module_id", [({16: ZERO_PCR}, "m"), ({0: b"x"}, "m"),
                                             ({}, ""), ({}, "m" * 128)])
def test_constructor_validates(pcrs, module_id):
    with pytest.raises(ValueError):
        SecurityModule(pcrs, debug=False, signer=lambda: None, module_id=module_id)


def test_make_module_id():
    module_id = make_module_id("enclave-7", "i-0761a4cbcc7632aef")
    assert module_id.startswith("i-0761a4cbcc7632aef-enc") and len(module_id) == 39
    assert make_module_id("enclave-7", "i-0761a4cbcc7632aef") == module_id
    with pytest.raises(ValueError):
        make_module_id("e", "p" * 120)


@given(st.binary(max_size=300))
def test_handle_never_raises(data):
    device = SecurityModule({}, debug=False, signer=lambda: None, module_id=MODULE_ID)
    answer = cbor2.loads(device.handle(data))
    assert isinstance(answer, (dict, str))


# --------------------------------------------------------------------------- server


@pytest.fixture
def served(shared_pki, tmp_path):
    path = tmp_path / "qtsm.sock"
    with serve_device(make_device(shared_pki), path, idle_timeout=5) as server:
        yield server


def test_server_round_trip(served, shared_pki):
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    assert request(served.path, "DescribeNSM")["DescribeNSM"]["module_id"] == MODULE_ID
    answer = request(served.path, {"Attestation": {"nonce": b"abc"}})
    verified = verify_document(answer["Attestation"]["document"],
                               root_fingerprints=[shared_pki.root_fingerprint()], nonce=b"abc")
    assert verified.module_id == MODULE_ID
    assert request(served.path, b"\xff") == {"Error": "InvalidOperation"}


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _read_frame(connection: socket.socket) -> bytes:
    header = connection.recv(4, socket.MSG_WAITALL)
    (length,) = struct.unpack(">I", header)
    return connection.recv(length, socket.MSG_WAITALL)


def test_server_keeps_a_connection_for_many_requests(served):
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(str(served.path))
        connection.sendall(_frame(cbor2.dumps({"ExtendPCR": {"index": 17, "data": b"a"}})))
        first = cbor2.loads(_read_frame(connection))
        connection.sendall(_frame(cbor2.dumps({"DescribePCR": {"index": 17}})))
        assert cbor2.loads(_read_frame(connection))["DescribePCR"]["data"] == \
            first["ExtendPCR"]["data"]


def test_server_answers_an_oversized_frame_and_closes(served):
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(5)
        connection.connect(str(served.path))
        connection.sendall(struct.pack(">I", 4097))
        assert cbor2.loads(_read_frame(connection)) == {"Error": "InputTooLarge"}
        assert connection.recv(1) == b""


def test_server_limits_connections(shared_pki, tmp_path):
    path = tmp_path / "limited.sock"
    device = make_device(shared_pki)
    with serve_device(device, path, max_connections=1, idle_timeout=5), \
            socket.socket(socket.AF_UNIX) as held, socket.socket(socket.AF_UNIX) as extra:
        held.connect(str(path))
        held.sendall(_frame(cbor2.dumps("GetRandom")))
        _read_frame(held)  # the first connection is being served
        extra.settimeout(5)
        extra.connect(str(path))
        assert extra.recv(1) == b""  # closed at once


def test_server_peer_uid_filter(shared_pki, tmp_path):
    path = tmp_path / "filtered.sock"
    device = make_device(shared_pki)
    with serve_device(device, path, allowed_uids={os.getuid() + 1}), \
            socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(5)
        connection.connect(str(path))
        assert connection.recv(1) == b""


def test_server_close_removes_the_socket_and_replaces_stale_ones(shared_pki, tmp_path):
    path = tmp_path / "qtsm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    server = serve_device(make_device(shared_pki), path)
    assert request(path, "GetRandom")
    server.close()
    server.close()  # idempotent
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        serve_device(make_device(shared_pki), path)
