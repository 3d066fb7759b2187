"""Huawei Cloud's official Python SDK (huaweicloudsdkkms.v2.KmsClient, unchanged) against the
local KMS over plain HTTP on loopback: every implemented API, the documented field semantics,
pagination, error statuses — and the recipient flow, signed by the SDK core's own signer in a
raw request because the SDK's models have no ``recipient`` field."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer
from huaweicloudsdkkms.v2 import (
    AssociateAliasRequest,
    AssociateAliasRequestBody,
    CancelKeyDeletionRequest,
    CreateAliasRequest,
    CreateAliasRequestBody,
    CreateDatakeyRequest,
    CreateDatakeyRequestBody,
    CreateDatakeyWithoutPlaintextRequest,
    CreateEcDatakeyPairRequest,
    CreateEcDatakeyPairRequestBody,
    CreateKeyRequest,
    CreateKeyRequestBody,
    CreateRandomRequest,
    CreateRsaDatakeyPairRequest,
    CreateRsaDatakeyPairRequestBody,
    DecryptDatakeyRequest,
    DecryptDatakeyRequestBody,
    DecryptDataRequest,
    DecryptDataRequestBody,
    DeleteAliasRequest,
    DeleteAliasRequestBody,
    DeleteKeyRequest,
    DisableKeyRequest,
    EnableKeyRequest,
    EncryptDatakeyRequest,
    EncryptDatakeyRequestBody,
    EncryptDataRequest,
    EncryptDataRequestBody,
    GenRandomRequestBody,
    KmsClient,
    ListAliasesRequest,
    ListKeyDetailRequest,
    ListKeysRequest,
    ListKeysRequestBody,
    OperateKeyRequestBody,
    ScheduleKeyDeletionRequestBody,
    ShowPublicKeyRequest,
    SignRequest,
    SignRequestBody,
    UpdateKeyAliasRequest,
    UpdateKeyAliasRequestBody,
    ValidateSignatureRequest,
    VerifyRequestBody,
)

from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.envelope import open_envelope
from qtbuild.runtime.sdk.recipient import RecipientKey

PCRS = {index: bytes([index + 0x41]) * 48 for index in range(16)}
MISSING_KEY = "00000000-0000-4000-8000-000000000000"


class Local:
    """The KMS on 127.0.0.1 and SDK clients for it."""

    def __init__(self, state_dir, pki: LocalPki) -> None:
        self.pki = pki
        self.state = open_state(StatePaths.under(state_dir))
        verifier = RecipientVerifier(roots=(pki.root_certificate,))
        self.server = KmsHttpServer(("127.0.0.1", 0), KmsService(self.state.env, verifier))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def credentials(self, access_key=None, secret_key=None) -> BasicCredentials:
        return BasicCredentials(access_key or self.state.admin.access_key,
                                secret_key or self.state.admin.secret_key, self.state.project_id)

    def sdk(self, credentials: BasicCredentials | None = None) -> KmsClient:
        config = HttpConfig.get_default_config()
        config.timeout = (5, 10)
        return (KmsClient.new_builder().with_http_config(config)
                .with_credentials(credentials or self.credentials())
                .with_endpoints([self.endpoint]).build())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    pki = LocalPki.init(tmp_path_factory.mktemp("qtbuild-state"))
    instance = Local(tmp_path_factory.mktemp("kms"), pki)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def sdk(local) -> KmsClient:
    return local.sdk()


@pytest.fixture(scope="module")
def key_id(sdk) -> str:
    return create_key(sdk, "sdk-key")


def create_key(sdk: KmsClient, alias: str) -> str:
    reply = sdk.create_key(CreateKeyRequest(body=CreateKeyRequestBody(
        key_alias=alias, key_spec="AES_256", key_usage="ENCRYPT_DECRYPT", key_description="from the SDK")))
    return reply.key_info.key_id


def refused(call) -> ClientRequestException:
    with pytest.raises(ClientRequestException) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------- key management


def test_create_key_answers_huaweis_key_info(local, sdk):
    reply = sdk.create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias="shape")))
    info = reply.key_info.to_dict()
    assert set(info) == {"key_id", "domain_id", "region_id"}
    assert all(info.values()), info
    assert info["domain_id"] == local.state.env.domain_id


def test_describe_key_fields(sdk, key_id):
    info = sdk.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=key_id))).key_info
    assert (info.key_id, info.key_alias, info.key_state, info.key_spec, info.key_usage, info.origin) == \
        (key_id, "sdk-key", "2", "AES_256", "ENCRYPT_DECRYPT", "kms")
    assert info.key_description == "from the SDK" and info.creation_date.isdigit()
    error = refused(lambda: sdk.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(
        key_id=MISSING_KEY))))
    assert (error.status_code, error.error_code) == (404, "KMS.0207")


def test_list_keys_with_an_empty_body_and_pagination(sdk, key_id):
    for index in range(3):
        create_key(sdk, f"page-{index}")
    everything = sdk.list_keys(ListKeysRequest())          # the SDK sends no body at all
    assert everything.truncated == "false" and everything.next_marker in ("", None)
    assert everything.total == len(everything.keys) >= 4 and key_id in everything.keys
    seen, marker = [], None
    while True:
        page = sdk.list_keys(ListKeysRequest(body=ListKeysRequestBody(limit="2", marker=marker)))
        assert len(page.keys) <= 2 and [detail.key_id for detail in page.key_details] == page.keys
        seen += page.keys
        if page.truncated == "false":
            break
        marker = page.next_marker
    assert seen == everything.keys
    enabled = sdk.list_keys(ListKeysRequest(body=ListKeysRequestBody(key_state="2")))
    assert key_id in enabled.keys


def test_key_state_changes(sdk):
    key = create_key(sdk, "states")
    body = OperateKeyRequestBody(key_id=key)
    assert sdk.disable_key(DisableKeyRequest(body=body)).key_info.key_state == "3"
    assert sdk.enable_key(EnableKeyRequest(body=body)).key_info.key_state == "2"
    scheduled = sdk.delete_key(DeleteKeyRequest(body=ScheduleKeyDeletionRequestBody(key_id=key, pending_days="7")))
    assert (scheduled.key_id, scheduled.key_state) == (key, "4")
    assert sdk.cancel_key_deletion(CancelKeyDeletionRequest(body=body)).key_state == "3"
    error = refused(lambda: sdk.disable_key(DisableKeyRequest(body=body)))
    assert (error.status_code, error.error_code) == (400, "KMS.1301")


# --------------------------------------------------------------------------- data and data keys


def test_encrypt_and_decrypt_data_with_aad(sdk, key_id):
    cipher = sdk.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=key_id, plain_text="4111 1111", encryption_algorithm="SYMMETRIC_DEFAULT",
        additional_authenticated_data="card"))).cipher_text
    plain = sdk.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=cipher, additional_authenticated_data="card")))
    assert (plain.key_id, plain.plain_text) == (key_id, "4111 1111")
    assert base64.b64decode(plain.plain_text_base64) == b"4111 1111"
    error = refused(lambda: sdk.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=cipher, additional_authenticated_data="other"))))
    assert (error.status_code, error.error_code) == (400, "KMS.2201")


def test_datakeys_with_aad_and_the_documented_cipher_length(sdk, key_id):
    created = sdk.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(
        key_id=key_id, key_spec="AES_256", additional_authenticated_data="dek-aad")))
    assert created.key_id == key_id and len(bytes.fromhex(created.plain_text)) == 32
    back = sdk.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=key_id, cipher_text=created.cipher_text, datakey_cipher_length="64",
        additional_authenticated_data="dek-aad")))
    assert back.data_key == created.plain_text and back.datakey_length == "32"
    assert back.datakey_dgst == hashlib.sha256(bytes.fromhex(created.plain_text)).hexdigest()
    error = refused(lambda: sdk.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=key_id, cipher_text=created.cipher_text, datakey_cipher_length="64"))))
    assert error.error_code == "KMS.2201"                  # the AAD is bound to the data key


def test_datakey_length_wins_over_key_spec(sdk, key_id):
    created = sdk.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(
        key_id=key_id, key_spec="AES_256", datakey_length="512")))
    assert len(bytes.fromhex(created.plain_text)) == 64
    without = sdk.create_datakey_without_plaintext(CreateDatakeyWithoutPlaintextRequest(
        body=CreateDatakeyRequestBody(key_id=key_id, key_spec="AES_128", additional_authenticated_data="x")))
    assert without.key_id == key_id and without.cipher_text
    back = sdk.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=key_id, cipher_text=without.cipher_text, datakey_cipher_length="64",
        additional_authenticated_data="x")))
    assert back.datakey_length == "16"


def test_encrypt_datakey(sdk, key_id):
    own = bytes(range(32))
    encrypted = sdk.encrypt_datakey(EncryptDatakeyRequest(body=EncryptDatakeyRequestBody(
        key_id=key_id, plain_text=(own + hashlib.sha256(own).digest()).hex(), datakey_plain_length="32",
        additional_authenticated_data="wrapped")))
    assert (encrypted.key_id, encrypted.datakey_length) == (key_id, "32")
    back = sdk.decrypt_datakey(DecryptDatakeyRequest(body=DecryptDatakeyRequestBody(
        key_id=key_id, cipher_text=encrypted.cipher_text, datakey_cipher_length="64",
        additional_authenticated_data="wrapped")))
    assert back.data_key == own.hex()


def test_gen_random(sdk):
    reply = sdk.create_random(CreateRandomRequest(body=GenRandomRequestBody(random_data_length="512")))
    assert len(bytes.fromhex(reply.random_data)) == 64
    error = refused(lambda: sdk.create_random(CreateRandomRequest(body=GenRandomRequestBody(
        random_data_length="12"))))
    assert (error.status_code, error.error_code) == (400, "KMS.1801")


# --------------------------------------------------------------------------- authentication


def test_wrong_secret_key_is_refused(local):
    bad = local.sdk(local.credentials(secret_key="x" * 40))
    error = refused(lambda: bad.list_keys(ListKeysRequest(body=ListKeysRequestBody())))
    assert error.status_code == 401


# --------------------------------------------------------------------------- recipient flow


def signed_raw(local: Local, api: str, body: dict) -> tuple[int, dict]:
    """POST ``body`` signed by the SDK core's own Signer (the SDK's models have no recipient)."""
    path = f"/v1.0/{local.state.project_id}/kms/{api}"
    request = SdkRequest(method="POST", schema="http", host=f"127.0.0.1:{local.port}", resource_path=path,
                         uri=path, query_params=[], header_params={"Content-Type": "application/json"},
                         body=json.dumps(body).encode())
    signed = Signer(local.credentials()).sign(request)
    connection = http.client.HTTPConnection("127.0.0.1", local.port, timeout=10)
    connection.request("POST", signed.uri, body=signed.body, headers=signed.header_params)
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


@pytest.mark.parametrize("api, body, field", [
    ("decrypt-data", None, "plain_text"),
    ("create-datakey", {"datakey_length": "256"}, "plain_text"),
    ("decrypt-datakey", None, "data_key"),
    ("gen-random", {"random_data_length": "256"}, "random_data"),
])
def test_recipient_flow_signed_by_the_sdk_core(local, sdk, key_id, api, body, field):
    recipient_key = RecipientKey.generate()
    device = SecurityModule(PCRS, debug=False, signer=local.pki.signer("sdk-enclave"),
                            module_id="i-0123456789abcdef0-enc0123456789abcdef")
    document = device.attestation(public_key=recipient_key.public_key_der)
    expected = None
    if api == "decrypt-data":
        cipher = sdk.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
            key_id=key_id, plain_text="seed"))).cipher_text
        body, expected = {"cipher_text": cipher}, b"seed"
    elif api == "decrypt-datakey":
        created = sdk.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=key_id)))
        body = {"key_id": key_id, "cipher_text": created.cipher_text, "datakey_cipher_length": "64"}
        expected = bytes.fromhex(created.plain_text)
    elif api == "create-datakey":
        body = {**body, "key_id": key_id}
    status, reply = signed_raw(local, api, {**body, "recipient": {
        "attestation_document": base64.b64encode(document).decode(),
        "key_encryption_algorithm": "RSAES_OAEP_SHA_256"}})
    assert status == 200, reply
    assert field not in reply                                # plaintext only inside the envelope
    envelope = base64.b64decode(reply["ciphertext_recipient"])
    assert envelope.startswith(bytes.fromhex("308006092a864886f70d010703a080"))     # BER, AWS's shape
    opened = open_envelope(envelope, recipient_key.private_key)
    assert len(opened) == 32 if expected is None else opened == expected


# --------------------------------------------------------------------------- asymmetric keys


def asymmetric_key(sdk: KmsClient, alias: str, spec: str, usage: str | None = None) -> str:
    reply = sdk.create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias=alias, key_spec=spec,
                                                                      key_usage=usage)))
    return reply.key_info.key_id


@pytest.mark.parametrize("spec, algorithm, digest", [
    ("RSA_2048", "RSASSA_PSS_SHA_256", hashes.SHA256()),
    ("RSA_3072", "RSASSA_PKCS1_V1_5_SHA_384", hashes.SHA384()),
    ("EC_P256", "ECDSA_SHA_256", hashes.SHA256()),
    ("EC_P384", "ECDSA_SHA_384", hashes.SHA384()),
])
def test_sign_verify_and_the_public_key(sdk, spec, algorithm, digest):
    key = asymmetric_key(sdk, f"sign-{spec}-{algorithm}", spec)
    info = sdk.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=key))).key_info
    assert (info.key_spec, info.key_usage) == (spec, "SIGN_VERIFY")
    message = b"release 1.2.3"
    hasher = hashes.Hash(digest)
    hasher.update(message)
    prehashed = hasher.finalize()
    for message_type, data in (("DIGEST", prehashed), ("RAW", message)):
        signature = sdk.sign(SignRequest(body=SignRequestBody(
            key_id=key, message=base64.b64encode(data).decode(), signing_algorithm=algorithm,
            message_type=message_type))).signature
        valid = sdk.validate_signature(ValidateSignatureRequest(body=VerifyRequestBody(
            key_id=key, message=base64.b64encode(data).decode(), signature=signature,
            signing_algorithm=algorithm, message_type=message_type)))
        assert valid.signature_valid == "true"
        # the published public key verifies it with plain `cryptography`
        pem = sdk.show_public_key(ShowPublicKeyRequest(body=OperateKeyRequestBody(key_id=key))).public_key
        public = serialization.load_pem_public_key(pem.encode())
        raw = base64.b64decode(signature)
        if spec.startswith("EC"):
            public.verify(raw, message, ec.ECDSA(digest))
        elif algorithm.startswith("RSASSA_PSS"):
            public.verify(raw, message, padding.PSS(padding.MGF1(digest), digest.digest_size), digest)
        else:
            public.verify(raw, message, padding.PKCS1v15(), digest)
    tampered = sdk.validate_signature(ValidateSignatureRequest(body=VerifyRequestBody(
        key_id=key, message=base64.b64encode(b"release 1.2.4").decode(), signature=signature,
        signing_algorithm=algorithm, message_type="RAW")))
    assert tampered.signature_valid == "false"


def test_asymmetric_encryption_and_misuse(sdk, key_id):
    key = asymmetric_key(sdk, "rsa-encrypt", "RSA_4096", "ENCRYPT_DECRYPT")
    pem = sdk.show_public_key(ShowPublicKeyRequest(body=OperateKeyRequestBody(key_id=key))).public_key
    public = serialization.load_pem_public_key(pem.encode())
    assert public.key_size == 4096
    cipher = sdk.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(
        key_id=key, plain_text="rsa secret", encryption_algorithm="RSAES_OAEP_SHA_256"))).cipher_text
    plain = sdk.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        key_id=key, cipher_text=cipher, encryption_algorithm="RSAES_OAEP_SHA_256")))
    assert plain.plain_text == "rsa secret"
    # a ciphertext made with the public key alone decrypts too
    outside = public.encrypt(b"from outside", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    plain = sdk.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        key_id=key, cipher_text=base64.b64encode(outside).decode(), encryption_algorithm="RSAES_OAEP_SHA_1")))
    assert plain.plain_text == "from outside"
    for call in (
        lambda: sdk.create_datakey(CreateDatakeyRequest(body=CreateDatakeyRequestBody(key_id=key))),
        lambda: sdk.encrypt_data(EncryptDataRequest(body=EncryptDataRequestBody(key_id=key, plain_text="x"))),
        lambda: sdk.show_public_key(ShowPublicKeyRequest(body=OperateKeyRequestBody(key_id=key_id))),
        lambda: sdk.sign(SignRequest(body=SignRequestBody(key_id=key, message="eA==",
                                                          signing_algorithm="RSASSA_PSS_SHA_256"))),
        lambda: sdk.create_key(CreateKeyRequest(body=CreateKeyRequestBody(key_alias="bad-ec", key_spec="EC_P256",
                                                                          key_usage="ENCRYPT_DECRYPT"))),
    ):
        error = refused(call)
        assert (error.status_code, error.error_code) == (400, "KMS.0308"), error


# --------------------------------------------------------------------------- aliases


def test_aliases(sdk, key_id):
    other = create_key(sdk, "alias-target")
    created = sdk.create_alias(CreateAliasRequest(body=CreateAliasRequestBody(key_id=key_id, alias="alias/app")))
    assert (created.key_id, created.alias) == (key_id, "alias/app") and created.alias_urn.endswith(":alias/app")
    assert created.domain_id and created.create_time.isdigit()
    sdk.create_alias(CreateAliasRequest(body=CreateAliasRequestBody(key_id=key_id, alias="alias/second")))
    error = refused(lambda: sdk.create_alias(CreateAliasRequest(body=CreateAliasRequestBody(
        key_id=other, alias="alias/app"))))
    assert (error.status_code, error.error_code) == (400, "KMS.1104")
    listed = sdk.list_aliases(ListAliasesRequest(key_id=key_id, limit="1"))
    pages = listed.body if isinstance(listed.body, list) else [listed.body]
    assert [entry.alias for page in pages for entry in page.aliases] == ["alias/app"]
    assert pages[0].page_info.next_marker == "1" and pages[0].page_info.current_count == 1
    moved = sdk.associate_alias(AssociateAliasRequest(body=AssociateAliasRequestBody(alias="alias/app",
                                                                                     target_key_id=other)))
    assert moved.key_id == other
    listed = sdk.list_aliases(ListAliasesRequest(key_id=other))
    pages = listed.body if isinstance(listed.body, list) else [listed.body]
    assert [entry.alias for page in pages for entry in page.aliases] == ["alias/app"]
    sdk.delete_alias(DeleteAliasRequest(body=DeleteAliasRequestBody(aliases=["alias/app"], key_id=other)))
    error = refused(lambda: sdk.delete_alias(DeleteAliasRequest(body=DeleteAliasRequestBody(
        aliases=["alias/app"], key_id=other))))
    assert error.error_code == "KMS.1101"
    renamed = sdk.update_key_alias(UpdateKeyAliasRequest(body=UpdateKeyAliasRequestBody(
        key_id=other, key_alias="renamed-target")))
    assert renamed.key_info.key_alias == "renamed-target"
    info = sdk.list_key_detail(ListKeyDetailRequest(body=OperateKeyRequestBody(key_id=other))).key_info
    assert info.key_alias == "renamed-target"


# --------------------------------------------------------------------------- data key pairs


@pytest.mark.parametrize("kind, spec", [("rsa", "RSA_2048"), ("ec", "EC_P384")])
def test_datakey_pairs(sdk, key_id, kind, spec):
    if kind == "rsa":
        reply = sdk.create_rsa_datakey_pair(CreateRsaDatakeyPairRequest(body=CreateRsaDatakeyPairRequestBody(
            key_id=key_id, key_spec=spec, additional_authenticated_data="pair")))
    else:
        reply = sdk.create_ec_datakey_pair(CreateEcDatakeyPairRequest(body=CreateEcDatakeyPairRequestBody(
            key_id=key_id, key_spec=spec, additional_authenticated_data="pair")))
    private = serialization.load_der_private_key(base64.b64decode(reply.private_key_plain_text), None)
    public = serialization.load_pem_public_key(reply.public_key.encode())
    assert private.public_key().public_numbers() == public.public_numbers()
    opened = sdk.decrypt_data(DecryptDataRequest(body=DecryptDataRequestBody(
        cipher_text=reply.private_key_cipher_text, additional_authenticated_data="pair")))
    assert base64.b64decode(opened.plain_text_base64) == base64.b64decode(reply.private_key_plain_text)
    without = sdk.create_rsa_datakey_pair(CreateRsaDatakeyPairRequest(body=CreateRsaDatakeyPairRequestBody(
        key_id=key_id, key_spec="RSA_2048", with_plain_text=False)))
    assert without.private_key_plain_text is None and without.private_key_cipher_text


def test_datakey_pair_for_a_recipient(local, key_id):
    recipient_key = RecipientKey.generate()
    device = SecurityModule(PCRS, debug=False, signer=local.pki.signer("pair-enclave"),
                            module_id="i-0123456789abcdef0-enc0123456789abcdef")
    document = device.attestation(public_key=recipient_key.public_key_der)
    status, reply = signed_raw(local, "create-ec-datakey-pair", {"key_id": key_id, "key_spec": "EC_P256", "recipient": {
        "attestation_document": base64.b64encode(document).decode(), "key_encryption_algorithm": "RSAES_OAEP_SHA_256"}})
    assert status == 200 and "private_key_plain_text" not in reply
    private = serialization.load_der_private_key(
        open_envelope(base64.b64decode(reply["ciphertext_recipient"]), recipient_key.private_key), None)
    assert private.public_key().public_numbers() == \
        serialization.load_pem_public_key(reply["public_key"].encode()).public_numbers()
