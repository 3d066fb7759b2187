"""Short-lived credentials as Huawei Cloud hands them out: temporary AK/SK + security token
(issued by ``qtbuild kms principal create --temporary``) and IAM tokens (``X-Auth-Token``), used
by the official SDK; every authentication failure is the gateway's 401 APIGW.0301."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkkms.v2 import KmsClient, ListKeysRequest, ListKeysRequestBody
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtbuild.cli import kms as kms_cli
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state, read_credentials, write_credentials
from qtbuild.runtime.sdk.kms_client import Credentials, KmsClientError, tcp_transport
from qtbuild.runtime.sdk.kms_client import KmsClient as LocalClient

LIST_ONLY = {"Version": "1.1", "Statement": [{"Effect": "Allow", "Action": ["kms:cmk:list"]}]}


class Clock:
    """The service's clock, movable forward (request dates still use the real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture()
def kms(tmp_path):
    clock = Clock()
    state = open_state(StatePaths.under(tmp_path / "kms"), clock=clock)
    server = KmsHttpServer(("127.0.0.1", 0), KmsService(state.env, RecipientVerifier(roots=())))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    admin_file = tmp_path / "admin.json"
    write_credentials(admin_file, f"http://127.0.0.1:{server.server_address[1]}", state.admin)
    admin = LocalClient(tcp_transport("127.0.0.1", server.server_address[1]), state.admin)
    admin.call("admin/create-principal", {"name": "enclave"})
    admin.call("admin/put-policy", {"name": "enclave", "policy": LIST_ONLY})
    yield state, server.server_address[1], admin_file, clock
    server.shutdown()
    server.server_close()


def cli(admin_file, *args) -> dict:
    result = CliRunner().invoke(kms_cli.command, [*args, "--credentials", str(admin_file)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def sdk(port: int, credentials: BasicCredentials) -> KmsClient:
    config = HttpConfig.get_default_config()
    config.timeout = (5, 10)
    return KmsClient.new_builder().with_http_config(config).with_credentials(credentials) \
        .with_endpoints([f"http://127.0.0.1:{port}"]).build()


def refused_401(call) -> ClientRequestException:
    with pytest.raises(ClientRequestException) as caught:
        call()
    assert (caught.value.status_code, caught.value.error_code) == (401, "APIGW.0301"), caught.value
    return caught.value


def test_temporary_credentials_work_with_the_sdk_until_they_expire(kms, tmp_path):
    state, port, admin_file, clock = kms
    reply = cli(admin_file, "principal", "create", "enclave", "--temporary", "--duration",
                "15m", "--out", str(tmp_path / "enclave.json"))
    credential = reply["credential"]
    assert set(credential) == {"access", "secret", "securitytoken", "expires_at"}
    stored = json.loads((tmp_path / "enclave.json").read_text())
    assert stored["security_token"] == credential["securitytoken"]
    _, from_file = read_credentials(tmp_path / "enclave.json")     # the file works with the SDK's client
    with LocalClient(tcp_transport("127.0.0.1", port), from_file) as client:
        assert client.call("list-keys", {})["total"] == 0
    good = BasicCredentials(credential["access"], credential["secret"], state.project_id) \
        .with_security_token(credential["securitytoken"])
    assert sdk(port, good).list_keys(ListKeysRequest(body=ListKeysRequestBody())).total == 0
    # the policy of the principal applies: enclave may only list
    records = state.env.store.audit(limit=1000)
    assert records[-1].principal == "enclave" and records[-1].decision == "allow"
    # without the token, or with another one: refused by "the gateway"
    bare = BasicCredentials(credential["access"], credential["secret"], state.project_id)
    refused_401(lambda: sdk(port, bare).list_keys(ListKeysRequest(body=ListKeysRequestBody())))
    wrong = BasicCredentials(credential["access"], credential["secret"], state.project_id) \
        .with_security_token("x" + credential["securitytoken"][1:])
    refused_401(lambda: sdk(port, wrong).list_keys(ListKeysRequest(body=ListKeysRequestBody())))
    # 16 minutes later they have expired
    clock.offset = 16 * 60
    error = refused_401(lambda: sdk(port, good).list_keys(ListKeysRequest(body=ListKeysRequestBody())))
    assert "expired" in error.error_msg


def test_iam_token(kms):
    state, port, admin_file, clock = kms
    token = cli(admin_file, "token", "create", "enclave", "--duration", "1h")["token"]

    def post(value: str) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", f"/v1.0/{state.project_id}/kms/list-keys", body=b"{}",
                           headers={"X-Auth-Token": value, "Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    assert post(token)[0] == 200
    for bad in ("qtkms.unknown", "not-a-token", token[:-1] + ("A" if token[-1] != "A" else "B")):
        status, reply = post(bad)
        assert (status, reply["error_code"]) == (401, "APIGW.0301")
        assert set(reply) == {"error_msg", "error_code", "request_id"}
    clock.offset = 3600 + 1
    status, reply = post(token)
    assert (status, reply["error_code"]) == (401, "APIGW.0301") and "expired" in reply["error_msg"]


def test_tokens_cannot_make_admin_changes(kms):
    state, port, admin_file, _ = kms
    token = cli(admin_file, "token", "create", "admin")["token"]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", f"/v1.0/{state.project_id}/kms/admin/put-policy",
                       body=json.dumps({"name": "enclave", "policy": LIST_ONLY}).encode(),
                       headers={"X-Auth-Token": token, "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 403 and json.loads(response.read())["error"]["error_code"] == "KMS.0307"


def test_unknown_access_key_and_wrong_secret(kms):
    state, port, _, _ = kms
    for access_key, secret in (("UNKNOWNACCESSKEY0000", "x" * 40), (state.admin.access_key, "y" * 40)):
        refused_401(lambda a=access_key, s=secret: sdk(port, BasicCredentials(a, s, state.project_id))
                    .list_keys(ListKeysRequest(body=ListKeysRequestBody())))
    client = LocalClient(tcp_transport("127.0.0.1", port), Credentials("UNKNOWNACCESSKEY0000", "x" * 40,
                                                                       state.project_id))
    with pytest.raises(KmsClientError) as caught:
        client.call("list-keys", {})
    assert (caught.value.status, caught.value.code) == (401, "APIGW.0301")


def test_cli_refuses_a_bad_duration(kms):
    _, _, admin_file, _ = kms
    result = CliRunner().invoke(kms_cli.command, ["principal", "create", "enclave", "--temporary",
                                                  "--duration", "soon", "--credentials", str(admin_file)])
    assert result.exit_code == 2 and "--duration" in result.output
    result = CliRunner().invoke(kms_cli.command, ["principal", "create", "enclave", "--temporary",
                                                  "--duration", "5m", "--credentials", str(admin_file)])
    assert result.exit_code == 1 and "KMS.1601" not in result.output and "duration_seconds" in result.output


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=120)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["Authorization", "X-Auth-Token", "X-Security-Token", "X-Sdk-Date",
                                        "Host"]), _HEADER_TEXT, max_size=4))
def test_malformed_authentication_never_causes_a_5xx(kms, headers):
    state, port, _, _ = kms
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", f"/v1.0/{state.project_id}/kms/list-keys", body=b"{}",
                       headers={name: value.strip() for name, value in headers.items()})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    assert 400 <= response.status < 500
    assert reply.get("error", reply)["error_code"].startswith(("KMS.", "APIGW."))


# --------------------------------------------------------------------------- the enclave SDK's client


def _recorded_request(client_credentials: Credentials) -> dict[str, str]:
    """The headers the SDK's KmsClient sends for one list-keys call (answered ``{}``)."""
    ours, theirs = socket.socketpair()
    received: list[bytes] = []

    def answer() -> None:
        with theirs:
            data = b""
            while not data.endswith(b"\r\n\r\n{}"):     # the head and the body "{}"
                data += theirs.recv(65536)
            received.append(data)
            theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                           b"Connection: close\r\n\r\n{}")

    threading.Thread(target=answer, daemon=True).start()
    with LocalClient(lambda: ours, client_credentials, host="kms.cn-north-4.myhuaweicloud.com") as client:
        client.call("list-keys", {})
    head = received[0].split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in head)


def test_the_sdk_client_signs_the_security_token_as_huaweis_sdk_does():
    credentials = Credentials("TEMPAK00000000000000", "temporary-secret", "0" * 32, security_token="token-value")
    sent = _recorded_request(credentials)
    assert sent["X-Security-Token"] == "token-value"
    path = f"/v1.0/{'0' * 32}/kms/list-keys"
    request = SdkRequest(method="POST", schema="https", host="kms.cn-north-4.myhuaweicloud.com", resource_path=path,
                         uri=path, query_params=[], body=b"{}",
                         header_params={name: sent[name] for name in ("Host", "Content-Type", "X-Sdk-Date")})
    # (no project id here: BasicCredentials would add an X-Project-Id header, which ours leaves out)
    official = BasicCredentials("TEMPAK00000000000000", "temporary-secret") \
        .with_security_token("token-value").sign_request(request)
    assert sent["Authorization"] == official.header_params["Authorization"]
    assert "x-security-token" in sent["Authorization"]
    # long-lived credentials send no token
    assert "X-Security-Token" not in _recorded_request(Credentials("AK", "SK", "0" * 32))


def test_temporary_credentials_work_with_the_enclave_sdk(kms, tmp_path):
    state, port, admin_file, _ = kms
    credential = cli(admin_file, "principal", "create", "enclave", "--temporary", "--duration", "15m")["credential"]
    temporary = Credentials(credential["access"], credential["secret"], state.project_id,
                            security_token=credential["securitytoken"])
    with LocalClient(tcp_transport("127.0.0.1", port), temporary) as client:
        assert client.call("list-keys", {})["total"] == 0
    assert state.env.store.audit(limit=1000)[-1].principal == "enclave"
    environ = {"KMS_ENDPOINT": f"http://127.0.0.1:{port}", "KMS_PROJECT_ID": state.project_id,
               "HUAWEICLOUD_SDK_AK": credential["access"], "HUAWEICLOUD_SDK_SK": credential["secret"],
               "HUAWEICLOUD_SDK_SECURITY_TOKEN": credential["securitytoken"]}
    with LocalClient.from_config(environ=environ) as client:
        assert client.call("list-keys", {})["total"] == 0
    bare = Credentials(credential["access"], credential["secret"], state.project_id)
    with LocalClient(tcp_transport("127.0.0.1", port), bare) as client, pytest.raises(KmsClientError) as caught:
        client.call("list-keys", {})
    assert (caught.value.status, caught.value.code) == (401, "APIGW.0301")
