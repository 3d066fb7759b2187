"""``qtbuild kms serve --tls``: HTTPS with a server certificate from the local TLS CA
(runtime/qtsm/tls_ca.py), verified by the SDK's client in a real TLS handshake; clients that do
not trust the CA, or expect another name, are refused by their own verification."""

from __future__ import annotations

import http.client
import json
import ssl
import threading

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_kms_cli import Served

from qtbuild.cli import pki as pki_cli
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state, read_credentials
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.qtsm.tls_ca import LocalTlsCa
from qtbuild.runtime.sdk.kms_client import KmsClient, tcp_transport


def test_the_tls_ca_is_made_once_and_is_not_the_attestation_root(tmp_path):
    ca = LocalTlsCa.open(tmp_path)
    assert LocalTlsCa.open(tmp_path).certificate == ca.certificate          # kept, not re-made
    assert (tmp_path / "pki" / "tls" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert ca.certificate != LocalPki.init(tmp_path).root_certificate
    issued = ca.issue_server(["127.0.0.1", "kms.local"])
    leaf, issuer = x509.load_pem_x509_certificates(issued.chain_pem)
    assert issuer == ca.certificate
    leaf.verify_directly_issued_by(ca.certificate)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["kms.local"]
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.fixture()
def tls_kms(tmp_path):
    ca = LocalTlsCa.open(tmp_path / "qtbuild")
    issued = ca.issue_server(["127.0.0.1", "localhost"])
    chain, key = tmp_path / "server.crt", tmp_path / "server.key"
    chain.write_bytes(issued.chain_pem)
    key.write_bytes(issued.key_pem)
    state = open_state(StatePaths.under(tmp_path / "kms"))
    server = KmsHttpServer(("127.0.0.1", 0), KmsService(state.env, RecipientVerifier(roots=())), tls=(chain, key))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, state, ca
    server.shutdown()
    server.server_close()


def trusting(ca: LocalTlsCa) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=ca.certificate_pem.decode())
    return context


def test_the_sdk_client_verifies_the_kms_over_a_real_tls_handshake(tls_kms):
    server, state, ca = tls_kms
    port = server.server_address[1]
    assert server.endpoint == f"https://127.0.0.1:{port}"
    with KmsClient.from_config(state.admin, endpoint=server.endpoint, ssl_context=trusting(ca)) as client:
        assert client.call("list-keys", {})["total"] == 0
        assert client._connection.sock.version() in ("TLSv1.2", "TLSv1.3")
    # the system trust store alone does not know the local CA
    with KmsClient.from_config(state.admin, endpoint=server.endpoint) as client, \
            pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        client.call("list-keys", {})
    # a name the certificate does not carry (the Host/TLS name is the endpoint's, not the transport's)
    with KmsClient.from_config(state.admin, endpoint="https://kms.cn-north-4.myhuaweicloud.com",
                               transport=tcp_transport("127.0.0.1", port), ssl_context=trusting(ca)) as client, \
            pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        client.call("list-keys", {})
    # plain HTTP to the TLS port: the handshake fails and the server closes without an answer
    with KmsClient.from_config(state.admin, endpoint=f"http://127.0.0.1:{port}") as client, \
            pytest.raises(http.client.RemoteDisconnected):
        client.call("list-keys", {})


def test_kms_serve_tls_and_the_admin_cli(tmp_path, monkeypatch):
    qtbuild_state = tmp_path / "qtbuild"
    LocalPki.init(qtbuild_state)
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(qtbuild_state))   # the admin CLI trusts this state's TLS CA
    served = Served(tmp_path / "kms", qtbuild_state, "--tls", "--tls-name", "kms.local")
    try:
        assert served.endpoint.startswith("https://127.0.0.1:")
        exported = CliRunner().invoke(pki_cli.command, ["export-tls-ca", "--state-dir", str(qtbuild_state)])
        assert exported.exit_code == 0
        ca = x509.load_pem_x509_certificate(exported.stdout_bytes)
        assert ca == LocalTlsCa.open(qtbuild_state).certificate
        key_id = json.loads(served.cli("create-key", "--alias", "over-tls"))["key_id"]
        leaf = x509.load_pem_x509_certificates((tmp_path / "kms" / "tls" / "server.crt").read_bytes())[0]
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == ["localhost", "kms.local"]
        context = ssl.create_default_context(cadata=exported.stdout)
        _, admin = read_credentials(served.credentials_file)
        with KmsClient.from_config(admin, endpoint=served.endpoint, ssl_context=context) as client:
            assert [key_id] == client.call("list-keys", {})["keys"]
    finally:
        assert served.stop() == 0
