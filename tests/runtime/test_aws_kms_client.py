"""The SDK's AWS KMS client (the Nitro profile's): SigV4 signatures identical to botocore's,
request bodies valid for botocore's KMS service model (only defined members, Recipient included),
and calls that work against moto's KMS server (a real implementation of the JSON 1.1 API)."""

from __future__ import annotations

import base64
import json
import socket
import threading
from datetime import UTC, datetime
from unittest import mock

import boto3
import botocore.auth
import botocore.session
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.validate import validate_parameters
from moto.server import ThreadedMotoServer

from qtbuild.runtime.sdk.aws_kms import AwsCredentials, AwsKmsClient, sigv4_sign
from qtbuild.runtime.sdk.kms_client import KmsClientError

MOMENT = datetime(2026, 2, 6, 8, 24, 18, tzinfo=UTC)
KMS_MODEL = botocore.session.get_session().get_service_model("kms")


@pytest.mark.parametrize("token", [None, "session-token-value"])
def test_signature_is_botocores(token):
    body = b'{"KeyId":"alias/x","NumberOfBytes":32}'
    headers = {"Host": "kms.eu-west-1.amazonaws.com", "Content-Type": "application/x-amz-json-1.1",
               "X-Amz-Target": "TrentService.GenerateRandom"}
    ours = sigv4_sign("POST", "/", "", headers, body, AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token),
                      "eu-west-1", now=MOMENT)
    request = AWSRequest(method="POST", url="https://kms.eu-west-1.amazonaws.com/", data=body, headers=dict(headers))
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=MOMENT.replace(tzinfo=None)):
        botocore.auth.SigV4Auth(BotoCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "kms",
                                "eu-west-1").add_auth(request)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Date"] == request.headers["X-Amz-Date"]


class Recorder:
    """A transport (one end of a socketpair per connection) whose other end records the request
    and answers it with ``reply``."""

    def __init__(self, reply: dict) -> None:
        self.reply, self.requests = reply, []

    def __call__(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        threading.Thread(target=self._serve, args=(theirs,), daemon=True).start()
        return ours

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            while len(body) < length:
                body += connection.recv(65536)
            self.requests.append((head.decode(), json.loads(body)))
            reply = json.dumps(self.reply).encode()
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: "
                               + str(len(reply)).encode() + b"\r\n\r\n" + reply)


class StubAttestor:
    def attestation(self, user_data=None, nonce=None, public_key=None) -> bytes:
        return b"document over " + public_key[:8]


def _as_params(body: dict, shape) -> dict:
    """The JSON body as botocore parameters (blob members base64-decoded)."""
    params = {}
    for name, value in body.items():
        member = shape.members[name]
        if member.type_name == "blob":
            value = base64.b64decode(value)
        elif member.type_name == "structure":
            value = _as_params(value, member)
        params[name] = value
    return params


@pytest.mark.parametrize("operation, call", [
    ("Decrypt", lambda client: client.decrypt(b"blob", encryption_context={"app": "bank"})),
    ("GenerateDataKey", lambda client: client.generate_data_key("alias/bank")),
    ("GenerateRandom", lambda client: client.generate_random(16)),
])
def test_requests_carry_only_the_models_members_and_the_recipient(operation, call):
    transport = Recorder({"CiphertextForRecipient": base64.b64encode(b"not cms").decode(),
                          "CiphertextBlob": base64.b64encode(b"c").decode()})
    client = AwsKmsClient(AwsCredentials("AKID", "secret"), "eu-west-1", transport=transport,
                          attestor=StubAttestor(), ssl_context=None, endpoint="http://kms.eu-west-1.amazonaws.com")
    with pytest.raises(Exception, match="CiphertextForRecipient"):
        call(client)  # the stub's envelope is not CMS: refused after the request was sent
    head, body = transport.requests[0]
    assert f"X-Amz-Target: TrentService.{operation}" in head and "Host: kms.eu-west-1.amazonaws.com" in head
    assert body["Recipient"]["KeyEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    validate_parameters(_as_params(body, KMS_MODEL.operation_model(operation).input_shape),
                        KMS_MODEL.operation_model(operation).input_shape)


@pytest.fixture(scope="module")
def moto_kms():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_calls_work_against_moto(moto_kms):
    boto = boto3.client("kms", region_name="eu-west-1", endpoint_url=moto_kms, aws_access_key_id="AKID",
                        aws_secret_access_key="secret")
    key_id = boto.create_key()["KeyMetadata"]["KeyId"]
    sealed = boto.encrypt(KeyId=key_id, Plaintext=b"4111 1111 1111 1111")["CiphertextBlob"]
    environ = {"AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "secret",
               "AWS_ENDPOINT_URL_KMS": moto_kms}
    with AwsKmsClient.from_config(environ=environ) as client:
        assert client.decrypt(sealed) == b"4111 1111 1111 1111"
        assert boto.decrypt(CiphertextBlob=client.encrypt(key_id, b"from the sdk"))["Plaintext"] == b"from the sdk"
        key, blob = client.generate_data_key(key_id)
        assert len(key) == 32 and client.decrypt(blob) == key
        assert len(client.generate_random(24)) == 24
        with pytest.raises(KmsClientError) as caught:
            client.generate_data_key("alias/missing")
        assert caught.value.status == 400 and caught.value.code == "NotFoundException"


def test_missing_settings_are_named():
    with pytest.raises(ValueError, match="AWS_REGION"):
        AwsKmsClient.from_config(environ={})
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID"):
        AwsKmsClient.from_config(environ={"AWS_REGION": "eu-west-1"})
