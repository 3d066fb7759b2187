"""The SDK's KMS client reaches a real endpoint by configuration alone: HTTPS by default at the
regional endpoint, the endpoint's Host signed (not the transport's address), TLS verified against
the endpoint's name, settings from parameters or the environment, and only fields the real
encrypt-data API defines (huaweicloudsdkkms's EncryptDataRequestBody)."""

from __future__ import annotations

import json
import ssl
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.runtime.kms.auth import authenticate
from qtbuild.runtime.sdk.kms_client import Credentials, Endpoint, KmsClient, tcp_transport

ENDPOINT_HOST = "kms.xx-test-1.myhuaweicloud.com"
CREDENTIALS = Credentials("AKTEST0123", "secret-key", "project-1")
#: The request body fields huaweicloudsdkkms v2 defines for encrypt-data.
ENCRYPT_DATA_FIELDS = {"key_id", "plain_text", "encryption_algorithm", "sequence", "additional_authenticated_data"}


def _certificate(subject: str, key, issuer_key, issuer_name, *, ca: bool) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_kms(tmp_path_factory):
    """A TLS server on 127.0.0.1 holding a certificate for ENDPOINT_HOST; records requests and
    checks each signature with the KMS service's own verifier."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = _certificate("test CA", ca_key, ca_key, ca_name, ca=True)
    leaf = _certificate(ENDPOINT_HOST, leaf_key, ca_key, ca_name, ca=False)
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = {name.lower(): value for name, value in self.headers.items()}
            signer = authenticate("POST", self.path, "", headers, body,
                                  lambda key: CREDENTIALS.secret_key if key == CREDENTIALS.access_key else None)
            seen.append({"path": self.path, "host": headers["host"], "signer": signer, "body": json.loads(body)})
            reply = json.dumps({"key_id": "k", "cipher_text": "c2VhbGVk"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"port": server.server_address[1], "ca": str(directory / "ca.pem"), "seen": seen}
    server.shutdown()
    server.server_close()


def test_regional_https_endpoint_is_the_default():
    where = Endpoint.resolve(region="cn-north-4", environ={})
    assert (where.scheme, where.hostname, where.port) == ("https", "kms.cn-north-4.myhuaweicloud.com", 443)
    assert where.host_header == "kms.cn-north-4.myhuaweicloud.com"
    assert Endpoint.resolve(environ={"HUAWEICLOUD_SDK_REGION": "ap-southeast-1"}).url == \
        "https://kms.ap-southeast-1.myhuaweicloud.com"
    assert Endpoint.resolve(environ={"KMS_ENDPOINT": "http://127.0.0.1:8000", "KMS_REGION": "x"}).host_header == \
        "127.0.0.1:8000"
    with pytest.raises(ValueError, match="KMS_ENDPOINT or KMS_REGION"):
        Endpoint.resolve(environ={})
    with pytest.raises(ValueError, match="endpoint URL"):
        Endpoint.parse("ftp://kms/x")


def test_missing_settings_are_named():
    with pytest.raises(ValueError, match="KMS_ACCESS_KEY and KMS_SECRET_KEY"):
        KmsClient.from_config(environ={"KMS_REGION": "r"})
    with pytest.raises(ValueError, match="KMS_PROJECT_ID"):
        KmsClient.from_config(environ={"KMS_REGION": "r", "KMS_ACCESS_KEY": "a", "KMS_SECRET_KEY": "s"})


def test_signs_the_endpoint_host_over_tls_through_another_transport(tls_kms):
    """The bytes go to 127.0.0.1 (as through the enclave's proxy); Host, signature and the TLS
    name are the endpoint's, and the certificate is verified for that name."""
    context = ssl.create_default_context(cafile=tls_kms["ca"])
    environ = {"KMS_REGION": "xx-test-1", "KMS_ACCESS_KEY": CREDENTIALS.access_key,
               "KMS_SECRET_KEY": CREDENTIALS.secret_key, "KMS_PROJECT_ID": CREDENTIALS.project_id}
    with KmsClient.from_config(environ=environ, ssl_context=context,
                               transport=tcp_transport("127.0.0.1", tls_kms["port"])) as client:
        assert client.encrypt_data("k", b"4111 1111 1111 1111", aad=b"bank") == "c2VhbGVk"
    request = tls_kms["seen"][-1]
    assert request["host"] == ENDPOINT_HOST and request["signer"] == CREDENTIALS.access_key
    assert request["path"] == "/v1.0/project-1/kms/encrypt-data"
    assert set(request["body"]) <= ENCRYPT_DATA_FIELDS and request["body"]["plain_text"] == "4111 1111 1111 1111"


def test_tls_is_verified_against_the_endpoint_name(tls_kms):
    context = ssl.create_default_context(cafile=tls_kms["ca"])
    with KmsClient.from_config(CREDENTIALS, endpoint="https://kms.other-region.myhuaweicloud.com",
                               ssl_context=context, transport=tcp_transport("127.0.0.1", tls_kms["port"]),
                               environ={}) as client, pytest.raises(ssl.SSLCertVerificationError):
        client.encrypt_data("k", "x")


def test_binary_plaintext_is_refused_before_sending():
    client = KmsClient(lambda: pytest.fail("nothing is sent"), CREDENTIALS)
    with pytest.raises(ValueError, match="base64"):
        client.encrypt_data("k", b"\xff\xfe")
