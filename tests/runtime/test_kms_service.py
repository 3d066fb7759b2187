"""The KMS over HTTP: the seed workflow (admin encrypts → an attested enclave decrypts) and each
refusal with its error code, the other APIs, request bounds, the audit log, the proxy path."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qtbuild.runtime.qtsm.pki as pki_module
from qtbuild.formats.attestation import AttestationDocument, sign_document
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import MAX_BODY, KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state
from qtbuild.runtime.proxy import Proxy, ProxyConfig, Route
from qtbuild.runtime.qtsm.clouds import profile
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.sdk.kms_client import (
    Credentials,
    KmsClient,
    KmsClientError,
    sign_request,
    tcp_transport,
    vsock_transport,
)
from qtbuild.runtime.sdk.recipient import RecipientKey

PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}
OTHER_PCRS = {index: bytes([0xA0 + index]) * 48 for index in range(16)}
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
CARD = b"4111 1111 1111 1111"


def pcr_policy(actions=("kms:cmk:decrypt", "kms:dek:*", "kms:cmk:generate"), pcr0=PCRS[0]):
    return {"Version": "1.1", "Statement": [{
        "Effect": "Allow", "Action": list(actions), "Resource": ["*"],
        "Condition": {"StringEqualsIgnoreCase": {
            "kms:RecipientAttestation/PCR0": [pcr0.hex()],
            "kms:RecipientAttestation/PCR8": [PCRS[8].hex()]}}}]}


class Kms:
    """A running KMS (127.0.0.1, ephemeral port) and its admin client."""

    def __init__(self, state_dir, pki: LocalPki, **verifier_options) -> None:
        self.pki = pki
        self.state = open_state(StatePaths.under(state_dir))
        verifier = RecipientVerifier(roots=(pki.root_certificate,), **verifier_options)
        self.server = KmsHttpServer(("127.0.0.1", 0), KmsService(self.state.env, verifier),
                                    io_timeout=5.0)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.admin = self.client(self.state.admin)

    def client(self, credentials: Credentials, **options) -> KmsClient:
        return KmsClient(tcp_transport("127.0.0.1", self.port, timeout=10), credentials,
                         **options)

    def principal(self, name: str, policy: dict | None) -> Credentials:
        reply = self.admin.call("admin/create-principal", {"name": name})
        if policy is not None:
            self.admin.call("admin/put-policy", {"name": name, "policy": policy})
        return Credentials(reply["access_key"], reply["secret_key"], self.state.project_id)

    def key(self, alias: str) -> str:
        return self.admin.call("create-key", {"key_alias": alias})["key_info"]["key_id"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPki:
    return LocalPki.init(tmp_path_factory.mktemp("qtbuild-state"))


@pytest.fixture(scope="module")
def kms(tmp_path_factory, pki):
    service = Kms(tmp_path_factory.mktemp("kms"), pki)
    yield service
    service.close()


@pytest.fixture(scope="module")
def enclave(kms) -> Credentials:
    return kms.principal("enclave", pcr_policy())


@pytest.fixture(scope="module")
def key(kms) -> str:
    return kms.key("seed-key")


@pytest.fixture(scope="module")
def ciphertext(kms, key) -> str:
    return kms.admin.encrypt_data(key, CARD, aad=b"bank-card")


def device(pcrs=PCRS, *, debug=False, clock=time.time, pki=None, kms=None) -> SecurityModule:
    pki = pki or kms.pki
    return SecurityModule(pcrs, debug=debug, signer=pki.signer("enc-test"), module_id=MODULE_ID,
                          clock=clock)


def refused(call, code: str, status: int) -> KmsClientError:
    with pytest.raises(KmsClientError) as caught:
        call()
    assert (caught.value.code, caught.value.status) == (code, status), caught.value
    return caught.value


class FixedDocument:
    """An attestor that returns a prepared document (forged, tampered, …)."""

    def __init__(self, make) -> None:
        self.make = make

    def attestation(self, user_data=None, nonce=None, public_key=None) -> bytes:
        return self.make(public_key)


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def mint(pki: LocalPki, public_key: bytes, *, leaf=None, cabundle=None, pcrs=PCRS) -> bytes:
    key, certificate = leaf or pki.issue_leaf("enc-mint")
    document = AttestationDocument(
        module_id=MODULE_ID, timestamp=int(time.time() * 1000), pcrs=pcrs,
        certificate=certificate.public_bytes(serialization.Encoding.DER),
        cabundle=tuple(cabundle or pki.cabundle()), user_data=None, nonce=None,
        public_key=public_key)
    return sign_document(document, key)


# --------------------------------------------------------------------------- the seed workflow


def test_seed_flow_attested_enclave_gets_the_plaintext(kms, enclave, key, ciphertext):
    client = kms.client(enclave, attestor=device(kms=kms))
    assert client.decrypt_data(ciphertext, aad=b"bank-card") == CARD
    datakey, cipher_text = client.create_datakey(key, bits=256)
    assert len(datakey) == 32
    assert client.decrypt_datakey(key, cipher_text) == datakey
    assert len(client.gen_random(512)) == 64
    records = kms.admin.call("admin/list-audit", {"principal": "enclave", "limit": 1000})
    last = records["records"][-1]
    assert last["api"] == "gen-random" and last["decision"] == "allow"
    assert (last["pcr0"], last["pcr8"]) == (PCRS[0].hex(), PCRS[8].hex())


def test_reply_carries_only_the_envelope(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(kms=kms))
    body = {"cipher_text": ciphertext, "additional_authenticated_data": "bank-card",
            "recipient": client.recipient()}
    reply = client.call("decrypt-data", body)
    assert set(reply) == {"key_id", "ciphertext_recipient"}
    assert CARD.decode() not in json.dumps(reply)


def test_admin_gets_plaintext_without_recipient(kms, key, ciphertext):
    reply = kms.admin.call("decrypt-data", {"cipher_text": ciphertext,
                                            "additional_authenticated_data": "bank-card"})
    assert reply["plain_text"] == CARD.decode()
    assert base64.b64decode(reply["plain_text_base64"]) == CARD


# --------------------------------------------------------------------------- refusals


def test_pcr0_not_matching_the_policy(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(OTHER_PCRS, kms=kms))
    error = refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.0306", 403)
    assert "PCR0" in error.message.upper()


def test_missing_document_under_a_pcr_policy(kms, enclave, ciphertext):
    client = kms.client(enclave)
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.0306", 403)


def test_debug_document(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(debug=True, kms=kms))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4007", 400)


def test_debug_document_when_debug_is_allowed_still_fails_a_pcr_policy(
        tmp_path, pki, ciphertext):
    lenient = Kms(tmp_path, pki, allow_debug=True)
    try:
        key = lenient.key("debug-key")
        sealed = lenient.admin.encrypt_data(key, CARD)
        client = lenient.client(lenient.principal("debug", pcr_policy()),
                                attestor=device(debug=True, kms=lenient))
        refused(lambda: client.decrypt_data(sealed), "KMS.0306", 403)
    finally:
        lenient.close()


def test_forged_chain(kms, enclave, ciphertext, tmp_path):
    forger = LocalPki.init(tmp_path / "forger")
    client = kms.client(enclave, attestor=device(pki=forger))
    error = refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4003", 400)
    assert "not a pinned root" in error.message


def test_self_signed_leaf(kms, enclave, ciphertext):
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    name = pki_module._name("self-signed.enclave")
    authority = pki_module._issue(name, None, now, timedelta(hours=1), ca=False)
    def make(public_key):
        return mint(kms.pki, public_key, leaf=(authority.key, authority.cert),
                    cabundle=[authority.cert.public_bytes(serialization.Encoding.DER)])
    client = kms.client(enclave, attestor=FixedDocument(make))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4003", 400)
    del key


def test_expired_leaf(kms, enclave, ciphertext, monkeypatch):
    long_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=5)
    monkeypatch.setattr(pki_module, "_now", lambda: long_ago)
    expired = kms.pki.issue_leaf("expired-enclave")
    monkeypatch.undo()
    client = kms.client(enclave, attestor=FixedDocument(
        lambda public_key: mint(kms.pki, public_key, leaf=expired)))
    error = refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4004", 400)
    assert "expired" in error.message


def test_stale_timestamp(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(clock=lambda: time.time() - 3600, kms=kms))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4006", 400)


def test_tampered_payload(kms, enclave, ciphertext):
    real = device(kms=kms)

    def tampered(public_key: bytes) -> bytes:
        message = cbor2.loads(real.attestation(public_key=public_key))
        payload = bytearray(message[2])
        at = payload.find(PCRS[0])
        payload[at] ^= 0x01
        message[2] = bytes(payload)
        return cbor2.dumps(message)

    client = kms.client(enclave, attestor=FixedDocument(tampered))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4005", 400)


def test_ec_public_key_in_the_document(kms, enclave, ciphertext):
    ec_key = spki(ec.generate_private_key(ec.SECP256R1()))
    client = kms.client(enclave, attestor=FixedDocument(
        lambda _: device(kms=kms).attestation(public_key=ec_key)))
    error = refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4008", 400)
    assert "not RSA" in error.message


def test_short_rsa_key(kms, enclave, ciphertext):
    short = spki(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    client = kms.client(enclave, attestor=FixedDocument(
        lambda _: device(kms=kms).attestation(public_key=short)))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4008", 400)


def test_document_without_public_key(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=FixedDocument(
        lambda _: device(kms=kms).attestation()))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.4008", 400)


@pytest.mark.parametrize("recipient, code", [
    ("text", "KMS.4001"),
    ({"attestation_document": "!!", "key_encryption_algorithm": "RSAES_OAEP_SHA_256"},
     "KMS.4001"),
    ({"attestation_document": "AAAA", "key_encryption_algorithm": "RSAES_OAEP_SHA_1"},
     "KMS.4001"),
    ({"attestation_document": "AAAA"}, "KMS.4002"),
    ({"attestation_document": "AAAA", "extra": 1}, "KMS.4001"),
])
def test_malformed_recipients(kms, enclave, ciphertext, recipient, code):
    client = kms.client(enclave)
    refused(lambda: client.call("decrypt-data", {"cipher_text": ciphertext,
                                                 "recipient": recipient}), code, 400)


def test_wrong_request_signature(kms, enclave, ciphertext):
    forged = dataclasses.replace(enclave, secret_key="x" * 40)
    client = kms.client(forged, attestor=device(kms=kms))
    error = refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "APIGW.0301", 401)
    assert "signature" in error.message


def raw_post(kms, path: str, body: bytes, headers: dict | None = None,
             credentials: Credentials | None = None, now=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=10)
    credentials = credentials or kms.state.admin
    base = {"Host": f"127.0.0.1:{kms.port}", "Content-Type": "application/json"}
    signed = sign_request("POST", path, "", base, body, credentials.access_key,
                          credentials.secret_key, now=now)
    connection.request("POST", path, body=body, headers={**signed, **(headers or {})})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


def api(kms, name: str) -> str:
    return f"/v1.0/{kms.state.project_id}/kms/{name}"


def test_expired_request_date(kms, enclave, ciphertext):
    old = datetime.now(UTC) - timedelta(minutes=20)
    status, reply = raw_post(kms, api(kms, "decrypt-data"),
                             json.dumps({"cipher_text": ciphertext}).encode(),
                             credentials=enclave, now=old)
    assert (status, reply["error_code"]) == (401, "APIGW.0301")       # the gateway's flat body
    assert "15 minutes" in reply["error_msg"] and len(reply["request_id"]) == 32


def test_unsigned_request(kms):
    connection = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=10)
    connection.request("POST", api(kms, "list-keys"), body=b"{}")
    response = connection.getresponse()
    assert response.status == 401
    reply = json.loads(response.read())
    assert set(reply) == {"error_msg", "error_code", "request_id"} and reply["error_code"] == "APIGW.0301"


def test_disabled_key(kms, enclave):
    key = kms.key("to-disable")
    sealed = kms.admin.encrypt_data(key, CARD)
    client = kms.client(enclave, attestor=device(kms=kms))
    assert kms.admin.call("disable-key", {"key_id": key})["key_info"]["key_state"] == "3"
    refused(lambda: client.decrypt_data(sealed), "KMS.0209", 400)
    refused(lambda: kms.admin.call("disable-key", {"key_id": key}), "KMS.1301", 400)
    assert kms.admin.call("enable-key", {"key_id": key})["key_info"]["key_state"] == "2"
    assert client.decrypt_data(sealed) == CARD


def test_aad_mismatch(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(kms=kms))
    refused(lambda: client.decrypt_data(ciphertext, aad=b"other-card"), "KMS.2201", 400)
    refused(lambda: client.decrypt_data(ciphertext), "KMS.2201", 400)


def test_tampered_ciphertext(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(kms=kms))
    raw = bytearray(base64.b64decode(ciphertext))
    for position in (0, len(raw) - 100 + 50, len(raw) - 1):   # sealed, key id, padding
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        text = base64.b64encode(damaged).decode()
        refused(lambda text=text: client.decrypt_data(text, aad=b"bank-card"), "KMS.2201", 400)


def test_explicit_deny_wins(kms, ciphertext):
    policy = pcr_policy()
    policy["Statement"].append({"Effect": "Deny", "Action": ["kms:cmk:decrypt"]})
    client = kms.client(kms.principal("denied", policy), attestor=device(kms=kms))
    error = refused(lambda: client.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.0306", 403)
    assert "explicitly denied" in error.message


def test_aws_condition_keys(kms, ciphertext):
    policy = {"Version": "5.0", "Statement": [{
        "Effect": "Allow", "Action": "kms:cmk:decrypt",
        "Condition": {"StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:ImageSha384": PCRS[0].hex().upper(),
            "kms:RecipientAttestation:PCR1": PCRS[1].hex()}}}]}
    client = kms.client(kms.principal("aws-style", policy), attestor=device(kms=kms))
    assert client.decrypt_data(ciphertext, aad=b"bank-card") == CARD
    other = kms.client(kms.principal("aws-style-2", policy),
                       attestor=device(OTHER_PCRS, kms=kms))
    refused(lambda: other.decrypt_data(ciphertext, aad=b"bank-card"), "KMS.0306", 403)


def test_principal_without_policy_and_admin_apis(kms, key):
    nobody = kms.client(kms.principal("nobody", None))
    refused(lambda: nobody.call("describe-key", {"key_id": key}), "KMS.0306", 403)
    refused(lambda: nobody.call("list-keys", {}), "KMS.0307", 403)
    refused(lambda: nobody.call("admin/list-audit", {}), "KMS.0307", 403)


# --------------------------------------------------------------------------- the other APIs


def test_key_lifecycle(kms):
    key = kms.key("lifecycle")
    kms.key("lifecycle-2")
    info = kms.admin.call("describe-key", {"key_id": key})["key_info"]
    assert (info["key_alias"], info["key_state"], info["key_spec"]) == ("lifecycle", "2",
                                                                          "AES_256")
    refused(lambda: kms.admin.call("create-key", {"key_alias": "lifecycle"}), "KMS.1104", 400)
    listed = kms.admin.call("list-keys", {"limit": "1000"})
    assert key in listed["keys"] and listed["truncated"] == "false"
    page = kms.admin.call("list-keys", {"limit": 1})
    assert len(page["keys"]) == 1 and page["truncated"] == "true" and page["next_marker"] == "1"
    refused(lambda: kms.admin.call("schedule-key-deletion", {"key_id": key,
                                                             "pending_days": "6"}),
            "KMS.1401", 400)
    reply = kms.admin.call("schedule-key-deletion", {"key_id": key, "pending_days": "7"})
    assert reply == {"key_id": key, "key_state": "4"}
    refused(lambda: kms.admin.encrypt_data(key, b"x"), "KMS.0210", 400)
    refused(lambda: kms.admin.call("schedule-key-deletion", {"key_id": key,
                                                             "pending_days": 7}),
            "KMS.1402", 400)
    assert kms.admin.call("cancel-key-deletion", {"key_id": key})["key_state"] == "3"
    refused(lambda: kms.admin.call("cancel-key-deletion", {"key_id": key}), "KMS.1501", 400)
    refused(lambda: kms.admin.call("describe-key", {"key_id": "0" * 8 + "-0000-4000-8000-"
                                                              + "0" * 12}), "KMS.0207", 404)


def test_datakey_apis(kms, key):
    admin = kms.admin
    reply = admin.call("create-datakey", {"key_id": key, "key_spec": "AES_128"})
    datakey = bytes.fromhex(reply["plain_text"])
    assert len(datakey) == 16
    cipher = reply["cipher_text"]
    decrypted = admin.call("decrypt-datakey", {"key_id": key, "cipher_text": cipher,
                                               "datakey_cipher_length": str(16 + 16)})
    assert decrypted["data_key"] == datakey.hex() and decrypted["datakey_length"] == "16"
    # Huawei documents datakey_cipher_length as "64"; any value in 1..1024 is accepted
    assert admin.call("decrypt-datakey", {"key_id": key, "cipher_text": cipher,
                                          "datakey_cipher_length": "64"})["data_key"] == datakey.hex()
    refused(lambda: admin.call("decrypt-datakey", {"key_id": key, "cipher_text": cipher,
                                                   "datakey_cipher_length": "1025"}),
            "KMS.2202", 400)
    without = admin.call("create-datakey-without-plaintext", {"key_id": key,
                                                              "datakey_length": 512})
    assert set(without) == {"key_id", "cipher_text"}
    refused(lambda: admin.call("create-datakey", {"key_id": key, "datakey_length": "12"}),
            "KMS.1901", 400)
    # datakey_length wins over key_spec (Huawei's API reference)
    assert len(bytes.fromhex(admin.call("create-datakey", {"key_id": key, "datakey_length": 512,
                                                           "key_spec": "AES_256"})["plain_text"])) == 64
    # encrypt-datakey: Huawei's plain_text is the key followed by its SHA-256
    import hashlib
    own = bytes(range(32))
    encrypted = admin.call("encrypt-datakey", {
        "key_id": key, "plain_text": (own + hashlib.sha256(own).digest()).hex(),
        "datakey_plain_length": "32"})
    back = admin.call("decrypt-datakey", {"key_id": key, "cipher_text": encrypted["cipher_text"],
                                          "datakey_cipher_length": "48"})
    assert back["data_key"] == own.hex()
    assert back["datakey_dgst"] == hashlib.sha256(own).hexdigest()
    refused(lambda: admin.call("encrypt-datakey", {
        "key_id": key, "plain_text": (own + bytes(32)).hex(), "datakey_plain_length": "32"}),
        "KMS.2103", 400)
    # a data-key ciphertext is not a decrypt-data ciphertext, and the other way round
    refused(lambda: admin.call("decrypt-data", {
        "cipher_text": base64.b64encode(bytes.fromhex(cipher)).decode()}), "KMS.2201", 400)
    other = kms.key("other-datakey-key")
    refused(lambda: admin.call("decrypt-datakey", {"key_id": other, "cipher_text": cipher,
                                                   "datakey_cipher_length": "32"}),
            "KMS.2201", 400)


def test_gen_random_bounds(kms):
    assert len(bytes.fromhex(kms.admin.call("gen-random", {"random_data_length": "8192"})
                             ["random_data"])) == 1024
    for bad in ("0", "12", "8200", -8, "ten"):
        refused(lambda bad=bad: kms.admin.call("gen-random", {"random_data_length": bad}),
                "KMS.1801", 400)


def test_plaintext_limits(kms, key):
    assert kms.admin.encrypt_data(key, b"x" * 4096)
    refused(lambda: kms.admin.encrypt_data(key, b"x" * 4097), "KMS.0308", 400)
    refused(lambda: kms.admin.encrypt_data(key, b""), "KMS.0308", 400)
    refused(lambda: kms.admin.call("encrypt-data", {"key_id": key, "plain_text": "x",
                                                    "additional_authenticated_data": "a" * 129}),
            "KMS.0308", 400)
    text = kms.admin.call("encrypt-data", {"key_id": key, "plain_text": "héllo"})
    assert kms.admin.call("decrypt-data", {"cipher_text": text["cipher_text"]})["plain_text"] \
        == "héllo"


# --------------------------------------------------------------------------- request bounds


@pytest.mark.parametrize("body, code", [
    (b"{not json", "KMS.0202"),
    (b"[]", "KMS.0202"),
    (b'{"key_id": "a", "key_id": "b"}', "KMS.0202"),
    (b'{"random_data_length": NaN}', "KMS.0202"),
    (b'{"a":' * 20 + b"1" + b"}" * 20, "KMS.0202"),
    (b"[" * 100000 + b"]" * 100000, "KMS.0203"),
    (b'{"key_id": 5}', "KMS.0205"),
    (b'{"key_id": "' + b"a" * 5000 + b'"}', "KMS.0205"),
    (b'{"key_id": "not-a-key"}', "KMS.0205"),
    (b'{"key_id": "00000000-0000-4000-8000-000000000000", "typo": 1}', "KMS.0308"),
    (b'{"key_id": "00000000-0000-4000-8000-000000000000", "sequence": "bad sequence!"}',
     "KMS.0206"),
    (b'\xff\xfe\x00', "KMS.0202"),
])
def test_bad_bodies_get_400_with_a_code(kms, body, code):
    status, reply = raw_post(kms, api(kms, "describe-key"), body)
    assert reply["error"]["error_code"] == code
    assert status in (400, 413)


def test_oversized_body_and_framing(kms):
    connection = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=10)
    connection.putrequest("POST", api(kms, "list-keys"))
    connection.putheader("Content-Length", str(MAX_BODY + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["error_code"] == "KMS.0203"
    connection.close()
    for headers in ({"Transfer-Encoding": "chunked"}, {}):
        connection = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=10)
        connection.putrequest("POST", api(kms, "list-keys"), skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 400
        assert json.loads(response.read())["error"]["error_code"] == "KMS.0204"
        connection.close()


def test_urls_and_methods(kms):
    status, reply = raw_post(kms, api(kms, "no-such-api"), b"{}")
    assert (status, reply["error"]["error_code"]) == (400, "KMS.0201")    # 400 as in Huawei's table
    status, reply = raw_post(kms, "/v2/other", b"{}")
    assert (status, reply["error"]["error_code"]) == (400, "KMS.0201")
    connection = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=10)
    connection.request("GET", api(kms, "list-keys"))
    response = connection.getresponse()
    assert response.status == 400             # GET serves only list-aliases
    assert json.loads(response.read())["error"]["error_code"] == "KMS.0201"
    connection.request("POST", "/" + "x" * 70000, body=b"{}")
    response = connection.getresponse()
    assert response.status in (400, 414) and "error" in json.loads(response.read())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(
    st.sampled_from(["cipher_text", "key_id", "recipient", "additional_authenticated_data",
                     "datakey_length", "random_data_length", "plain_text", "x"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=40),
                 lambda children: st.lists(children, max_size=3)
                 | st.dictionaries(st.text(max_size=5), children, max_size=3), max_leaves=8),
    max_size=4),
    st.sampled_from(["decrypt-data", "create-datakey", "decrypt-datakey", "gen-random",
                     "encrypt-data", "admin/put-policy", "list-keys"]))
def test_random_bodies_never_cause_a_500(kms, body, name):
    status, reply = raw_post(kms, api(kms, name), json.dumps(body).encode())
    assert status < 500, reply
    assert status == 200 or reply.get("error", reply)["error_code"].startswith(("KMS.", "APIGW."))


def test_connection_limit_and_idle_timeout(kms):
    server = KmsHttpServer(("127.0.0.1", 0), kms.server.service, io_timeout=0.5,
                           header_timeout=1.0, max_connections=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        idle.sendall(b"POST /v1.0/p/kms/list-keys HTTP/1.1\r\n")   # and then nothing
        time.sleep(0.1)
        busy = socket.create_connection(("127.0.0.1", port), timeout=5)
        answer = b""
        while chunk := busy.recv(4096):     # answered at once, before any request is read
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert json.loads(body)["error"]["error_code"] == "KMS.0102"
        busy.close()
        started = time.monotonic()
        answer = b""
        while chunk := idle.recv(4096):     # the silent client is cut off at the header deadline
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 3
        idle.close()
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- audit, proxy


def test_audit_records_refusals_with_reasons(kms, enclave, ciphertext):
    client = kms.client(enclave, attestor=device(OTHER_PCRS, kms=kms))
    with pytest.raises(KmsClientError):
        client.decrypt_data(ciphertext, aad=b"bank-card")
    records = kms.admin.call("admin/list-audit", {"decision": "deny", "limit": 1000})["records"]
    last = [record for record in records if record["principal"] == "enclave"][-1]
    assert last["api"] == "decrypt-data" and last["status"] == 403
    assert last["error_code"] == "KMS.0306" and "PCR0" in last["reason"].upper()
    assert last["pcr0"] == OTHER_PCRS[0].hex()
    unauthenticated = kms.admin.call("admin/list-audit", {"limit": 1000})["records"]
    assert any(record["status"] == 401 and record["principal"] is None
               for record in unauthenticated)


@pytest.mark.parametrize("cloud", ["qingtian", "nitro"])
def test_audit_records_which_document_encoding_verified(kms, enclave, ciphertext, cloud):
    spec = profile(cloud)
    module = SecurityModule(PCRS, debug=False, signer=kms.pki.signer(f"enc-{cloud}", cloud),
                            module_id=spec.module_id(f"enc-{cloud}", spec.parent_id(None, b"audit-test")), profile=spec)
    client = kms.client(enclave, attestor=module)
    assert client.decrypt_data(ciphertext, aad=b"bank-card") == CARD
    last = kms.admin.call("admin/list-audit", {"principal": "enclave", "limit": 1000})["records"][-1]
    assert (last["api"], last["decision"], last["encoding"]) == ("decrypt-data", "allow", cloud)
    with pytest.raises(KmsClientError):    # not attested (and not allowed): no encoding
        client.call("list-keys", {})
    last = kms.admin.call("admin/list-audit", {"principal": "enclave", "limit": 1000})["records"][-1]
    assert (last["api"], last["encoding"]) == ("list-keys", None)


def test_through_qt_proxy_over_vsock(kms, enclave, ciphertext, tmp_path):
    """The enclave side connects to CID 3 over (emulated) vsock; qt-proxy forwards to KMS."""
    root = str(tmp_path / "vsock")
    parent = vsock.VsockConfig(vsock.EMULATED, vsock.PARENT_CID, root)
    ready, stop = threading.Event(), threading.Event()

    async def run_proxy():
        async with Proxy(ProxyConfig((Route(8000, "127.0.0.1", kms.port),)),
                         vsock_config=parent):
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(run_proxy(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        enclave_side = vsock.VsockConfig(vsock.EMULATED, 4, root)
        client = KmsClient(vsock_transport(8000, config=enclave_side, timeout=10), enclave,
                           attestor=device(kms=kms), recipient_key=RecipientKey.generate())
        for _ in range(3):   # one kept-alive connection through the proxy
            assert client.decrypt_data(ciphertext, aad=b"bank-card") == CARD
        client.close()
    finally:
        stop.set()
        thread.join(10)


SDK_CHILD = """
import base64, json, sys
from cryptography.hazmat.primitives import serialization
from qtbuild_sdk.kms_client import Credentials, KmsClient, tcp_transport
from qtbuild_sdk.recipient import RecipientKey

job = json.loads(sys.stdin.read())
key = RecipientKey(serialization.load_pem_private_key(job["key"].encode(), None))

class Document:
    def attestation(self, user_data=None, nonce=None, public_key=None):
        assert public_key == key.public_key_der
        return base64.b64decode(job["document"])

client = KmsClient(tcp_transport("127.0.0.1", job["port"]), Credentials(*job["credentials"]),
                   attestor=Document(), recipient_key=key)
sys.stdout.write(client.decrypt_data(job["cipher_text"], aad=b"bank-card").decode())
"""
COMPAT_PYTHON = os.environ.get(
    "QTBUILD_SDK_COMPAT_PYTHON",
    str(Path(__file__).resolve().parents[2] / ".venv-bookworm" / "bin" / "python"))


def test_exported_sdk_client_under_bookworm_versions(kms, enclave, ciphertext, tmp_path):
    """``qtbuild sdk export``'s KmsClient (with temporary credentials) and envelope opener under
    cryptography 38 / cbor2 5.4 (scripts/install.sh creates that interpreter, .venv-bookworm)
    against this server."""
    if not os.access(COMPAT_PYTHON, os.X_OK):
        message = f"no bookworm-compatibility interpreter at {COMPAT_PYTHON}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from qtbuild.cli.sdk import export_sdk

    export_sdk(tmp_path)
    key = RecipientKey.generate()
    # temporary credentials, as the demo hands an enclave: the token travels as X-Security-Token
    temporary = kms.admin.call("admin/create-temporary-credentials",
                               {"name": "enclave", "duration_seconds": 900})["credential"]
    job = {
        "port": kms.port, "cipher_text": ciphertext,
        "credentials": [temporary["access"], temporary["secret"], enclave.project_id, temporary["securitytoken"]],
        "key": key.private_key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode(),
        "document": base64.b64encode(device(kms=kms).attestation(
            public_key=key.public_key_der)).decode(),
    }
    result = subprocess.run([COMPAT_PYTHON, "-c", SDK_CHILD], input=json.dumps(job),
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == CARD.decode()
