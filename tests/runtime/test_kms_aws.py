"""AWS KMS's JSON protocol on the local KMS, driven by boto3's ``kms`` client unchanged over
plain HTTP on loopback: SigV4, Encrypt/Decrypt/GenerateDataKey/GenerateRandom (with
``Recipient`` → ``CiphertextForRecipient``), CreateKey (symmetric and asymmetric)/DescribeKey/
GetPublicKey/Sign/ListKeys/CreateAlias, AWS actions and condition keys in policies, AWS-shaped errors."""

from __future__ import annotations

import http.client
import json
import threading

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.envelope import open_envelope
from qtbuild.runtime.sdk.kms_client import KmsClient, tcp_transport
from qtbuild.runtime.sdk.recipient import RecipientKey

PCRS = {index: bytes([index + 0x61]) * 48 for index in range(16)}
OTHER = {index: bytes([index + 0x11]) * 48 for index in range(16)}
#: ContentInfo, [0] and EnvelopedData with indefinite lengths (tests/runtime/test_kms_cms_ber.py)
AWS_BER_HEAD = bytes.fromhex("308006092a864886f70d010703a0803080020102")


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    pki = LocalPki.init(tmp_path_factory.mktemp("qtbuild-state"))
    state = open_state(StatePaths.under(tmp_path_factory.mktemp("kms")))
    server = KmsHttpServer(("127.0.0.1", 0), KmsService(state.env, RecipientVerifier(roots=(pki.root_certificate,))))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    admin = KmsClient(tcp_transport("127.0.0.1", server.server_address[1]), state.admin)
    enclave = admin.call("admin/create-principal", {"name": "nitro-enclave"})
    admin.call("admin/put-policy", {"name": "nitro-enclave", "policy": {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"],
        "Resource": "*", "Condition": {"StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:ImageSha384": PCRS[0].hex(),
            "kms:RecipientAttestation:PCR8": PCRS[8].hex()}}}]}})
    yield state, server.server_address[1], pki, enclave
    server.shutdown()
    server.server_close()


def boto(port: int, access_key: str, secret_key: str):
    return boto3.client("kms", endpoint_url=f"http://127.0.0.1:{port}", region_name="eu-west-1",
                        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        config=Config(retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def admin(kms):
    state, port, _, _ = kms
    return boto(port, state.admin.access_key, state.admin.secret_key)


@pytest.fixture(scope="module")
def key_id(admin) -> str:
    metadata = admin.create_key(Description="for the nitro demo")["KeyMetadata"]
    assert (metadata["KeyState"], metadata["KeySpec"], metadata["Enabled"]) == ("Enabled", "SYMMETRIC_DEFAULT", True)
    assert metadata["Arn"].endswith(f":key/{metadata['KeyId']}")
    return metadata["KeyId"]


def recipient(pki: LocalPki, pcrs=PCRS) -> tuple[RecipientKey, dict]:
    key = RecipientKey.generate()
    device = SecurityModule(pcrs, debug=False, signer=pki.signer("nitro-enclave"),
                            module_id="i-0123456789abcdef0-enc0123456789abcdef")
    return key, {"AttestationDocument": device.attestation(public_key=key.public_key_der),
                 "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}


def test_keys_aliases_encrypt_decrypt(admin, key_id):
    assert key_id in [entry["KeyId"] for entry in admin.list_keys()["Keys"]]
    admin.create_alias(AliasName="alias/nitro-demo", TargetKeyId=key_id)
    sealed = admin.encrypt(KeyId="alias/nitro-demo", Plaintext=b"card 4111", EncryptionContext={"app": "bank"})
    assert sealed["KeyId"].endswith(key_id)
    opened = admin.decrypt(CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext={"app": "bank"})
    assert opened["Plaintext"] == b"card 4111"
    with pytest.raises(ClientError) as caught:
        admin.decrypt(CiphertextBlob=sealed["CiphertextBlob"], EncryptionContext={"app": "other"})
    assert caught.value.response["Error"]["Code"] == "InvalidCiphertextException"
    with pytest.raises(ClientError) as caught:
        admin.encrypt(KeyId="00000000-0000-4000-8000-000000000000", Plaintext=b"x")
    assert caught.value.response["Error"]["Code"] == "NotFoundException"


def test_recipient_flow_under_aws_condition_keys(kms, admin, key_id):
    state, port, pki, enclave = kms
    sealed = admin.encrypt(KeyId=key_id, Plaintext=b"seed secret")["CiphertextBlob"]
    client = boto(port, enclave["access_key"], enclave["secret_key"])
    private, document = recipient(pki)
    reply = client.decrypt(CiphertextBlob=sealed, Recipient=document)
    assert "Plaintext" not in reply
    assert reply["CiphertextForRecipient"].startswith(AWS_BER_HEAD)     # BER as AWS KMS writes it
    assert open_envelope(reply["CiphertextForRecipient"], private.private_key) == b"seed secret"
    data_key = client.generate_data_key(KeyId=key_id, KeySpec="AES_256", Recipient=document)
    plain = open_envelope(data_key["CiphertextForRecipient"], private.private_key)
    assert len(plain) == 32 and "Plaintext" not in data_key
    assert admin.decrypt(CiphertextBlob=sealed)["Plaintext"] == b"seed secret"
    random = client.generate_random(NumberOfBytes=48, Recipient=document)
    assert len(open_envelope(random["CiphertextForRecipient"], private.private_key)) == 48
    # another image (PCR0) or no attestation at all: denied by the condition keys
    _, other = recipient(pki, OTHER)
    for call in (lambda: client.decrypt(CiphertextBlob=sealed, Recipient=other),
                 lambda: client.decrypt(CiphertextBlob=sealed)):
        with pytest.raises(ClientError) as caught:
            call()
        assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    # the enclave's policy grants no Encrypt
    with pytest.raises(ClientError) as caught:
        client.encrypt(KeyId=key_id, Plaintext=b"x")
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    audit = state.env.audit().records(limit=1000, principal="nitro-enclave")
    assert audit[-1].decision == "deny" and audit[0].pcr0 == PCRS[0].hex()


def test_generate_data_key_and_random_without_recipient(admin, key_id):
    data_key = admin.generate_data_key(KeyId=key_id, NumberOfBytes=16)
    assert len(data_key["Plaintext"]) == 16
    # Decrypt opens GenerateDataKey's ciphertext too, as on AWS
    assert admin.decrypt(CiphertextBlob=data_key["CiphertextBlob"])["Plaintext"] == data_key["Plaintext"]
    assert len(admin.generate_random(NumberOfBytes=32)["Plaintext"]) == 32


def test_wrong_secret_and_unknown_operation(kms):
    state, port, _, _ = kms
    with pytest.raises(ClientError) as caught:
        boto(port, state.admin.access_key, "y" * 40).list_keys()
    assert caught.value.response["Error"]["Code"] == "InvalidSignatureException"
    with pytest.raises(ClientError) as caught:
        boto(port, state.admin.access_key, state.admin.secret_key).get_key_rotation_status(KeyId="x")
    assert caught.value.response["Error"]["Code"] == "UnknownOperationException"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["Encrypt", "Decrypt", "GenerateDataKey", "GenerateRandom", "CreateKey", "ListKeys",
                        "CreateAlias", "DescribeKey", "GetPublicKey", "Sign", "Nope"]),
       st.dictionaries(st.sampled_from(["KeyId", "Plaintext", "CiphertextBlob", "Recipient", "NumberOfBytes",
                                        "KeySpec", "EncryptionContext", "AliasName", "TargetKeyId", "Limit"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                                    lambda children: st.lists(children, max_size=3)
                                    | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=6),
                       max_size=4))
def test_signed_hostile_bodies_never_cause_a_5xx(kms, operation, body):
    state, port, _, _ = kms
    request = AWSRequest(method="POST", url=f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(),
                         headers={"X-Amz-Target": f"TrentService.{operation}",
                                  "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials(state.admin.access_key, state.admin.secret_key), "kms", "eu-west-1").add_auth(request)
    prepared = request.prepare()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/", body=prepared.body, headers=dict(prepared.headers))
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    assert response.status < 500, reply
    assert response.status == 200 or reply["__type"].endswith("Exception")


def test_temporary_credentials_as_an_aws_session(kms, key_id):
    state, port, _, _ = kms
    admin = KmsClient(tcp_transport("127.0.0.1", port), state.admin)
    credential = admin.call("admin/create-temporary-credentials", {"name": "admin"})["credential"]
    session = boto3.client("kms", endpoint_url=f"http://127.0.0.1:{port}", region_name="eu-west-1",
                           aws_access_key_id=credential["access"], aws_secret_access_key=credential["secret"],
                           aws_session_token=credential["securitytoken"], config=Config(retries={"max_attempts": 1}))
    assert key_id in [entry["KeyId"] for entry in session.list_keys()["Keys"]]
    without = boto(port, credential["access"], credential["secret"])
    with pytest.raises(ClientError) as caught:
        without.list_keys()
    assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"


def test_describe_key(admin, key_id):
    metadata = admin.describe_key(KeyId=key_id)["KeyMetadata"]
    assert (metadata["KeyId"], metadata["KeyState"], metadata["KeySpec"], metadata["KeyUsage"]) == (
        key_id, "Enabled", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    assert metadata["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"] and "SigningAlgorithms" not in metadata
    with pytest.raises(ClientError) as caught:
        admin.describe_key(KeyId="00000000-0000-4000-8000-000000000000")
    assert caught.value.response["Error"]["Code"] == "NotFoundException"


@pytest.mark.parametrize("spec, algorithm, curve", [
    ("RSA_2048", "RSASSA_PSS_SHA_256", None), ("RSA_3072", "RSASSA_PKCS1_V1_5_SHA_384", None),
    ("ECC_NIST_P256", "ECDSA_SHA_256", "secp256r1"), ("ECC_NIST_P384", "ECDSA_SHA_384", "secp384r1")])
def test_sign_and_get_public_key(admin, spec, algorithm, curve):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    metadata = admin.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert (metadata["KeySpec"], metadata["KeyUsage"]) == (spec, "SIGN_VERIFY")
    assert algorithm in metadata["SigningAlgorithms"]
    described = admin.describe_key(KeyId=metadata["Arn"])["KeyMetadata"]
    assert described["SigningAlgorithms"] == metadata["SigningAlgorithms"]
    public = admin.get_public_key(KeyId=metadata["KeyId"])
    assert (public["KeySpec"], public["KeyUsage"], public["KeyId"]) == (spec, "SIGN_VERIFY", metadata["Arn"])
    key = serialization.load_der_public_key(public["PublicKey"])
    digest = hashes.SHA256() if algorithm.endswith("256") else hashes.SHA384()
    signed = admin.sign(KeyId=metadata["KeyId"], Message=b"release v1", MessageType="RAW", SigningAlgorithm=algorithm)
    assert signed["SigningAlgorithm"] == algorithm and signed["KeyId"] == metadata["Arn"]
    if curve:
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == curve
        key.verify(signed["Signature"], b"release v1", ec.ECDSA(digest))
    elif algorithm.startswith("RSASSA_PSS"):
        key.verify(signed["Signature"], b"release v1", padding.PSS(padding.MGF1(digest), digest.digest_size), digest)
    else:
        key.verify(signed["Signature"], b"release v1", padding.PKCS1v15(), digest)
    hashed = hashes.Hash(digest)
    hashed.update(b"release v1")
    by_digest = admin.sign(KeyId=metadata["KeyId"], Message=hashed.finalize(), MessageType="DIGEST",
                           SigningAlgorithm=algorithm)["Signature"]
    assert by_digest     # (signatures are randomized, except PKCS#1 v1.5's)
    wrong = "ECDSA_SHA_512" if curve else "ECDSA_SHA_256"
    with pytest.raises(ClientError) as caught:
        admin.sign(KeyId=metadata["KeyId"], Message=b"x", SigningAlgorithm=wrong)
    assert caught.value.response["Error"]["Code"] == "ValidationException"


def test_sign_needs_a_signing_key_and_the_right_to_sign(kms, admin, key_id):
    _, port, _, enclave = kms
    with pytest.raises(ClientError) as caught:
        admin.sign(KeyId=key_id, Message=b"x", SigningAlgorithm="RSASSA_PSS_SHA_256")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    with pytest.raises(ClientError) as caught:
        admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="ENCRYPT_DECRYPT")
    assert caught.value.response["Error"]["Code"] == "ValidationException"
    signing = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    client = boto(port, enclave["access_key"], enclave["secret_key"])   # its policy grants no kms:Sign
    with pytest.raises(ClientError) as caught:
        client.sign(KeyId=signing, Message=b"x", SigningAlgorithm="ECDSA_SHA_256")
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
