"""Signing with a key that stays in a KMS (``--private-key kms://…``) against a real
``qtbuild kms serve`` process: convert (PCR0 and the DSSE provenance), sign, build-eif; the
principal's policy, a wrong certificate and bad URIs give one-line errors without secrets."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.cli import kms as kms_cli
from qtbuild.cli.app import cli
from qtbuild.formats.eif_signature import pcr8_from_certificate
from qtbuild.kms_keys import KmsKeyUri
from qtbuild.runtime.kms.state import read_credentials, write_credentials
from qtbuild.runtime.sdk.kms_client import Credentials, KmsClient, tcp_transport

from helpers.imagefactory import default_config, file, make_tar, write_oci_layout
from helpers.registry_server import server_tls_context, tls_files

SERVE = "from qtbuild.cli.kms import command; command(prog_name='qtbuild kms')"


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def certificate_for(public_key, tmp: Path, name: str) -> Path:
    """A certificate for the KMS key's public key, issued by a throwaway release CA."""
    ca = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    subject = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    certificate = (x509.CertificateBuilder().subject_name(subject("kms release signer"))
                   .issuer_name(subject("release CA")).public_key(public_key).serial_number(11)
                   .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
                   .sign(ca, hashes.SHA384()))
    path = tmp / name
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    """A served KMS with EC_P384 and EC_P256 signing keys, a principal allowed to sign
    ('signer.json') and one only allowed to read public keys ('reader.json')."""
    tmp = tmp_path_factory.mktemp("kms-keys")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--state-dir", str(tmp / "state"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "QTBUILD_STATE_DIR": str(tmp / "qt")})
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else b""
        if not line:
            process.kill()
            raise AssertionError(f"kms serve did not start: {process.stderr.read().decode()}")
        info = json.loads(line)
        port = int(info["endpoint"].rsplit(":", 1)[1])
        _, admin_credentials = read_credentials(info["credentials"])
        admin = KmsClient(tcp_transport("127.0.0.1", port, timeout=10), admin_credentials)
        keys = {spec: admin.call("create-key", {"key_alias": f"release-{spec}", "key_spec": spec,
                                                "key_usage": "SIGN_VERIFY"})["key_info"]["key_id"]
                for spec in ("EC_P384", "EC_P256")}
        keys["AES_256"] = admin.call("create-key", {"key_alias": "release-aes"})["key_info"]["key_id"]
        public = {spec: serialization.load_pem_public_key(
            admin.call("get-publickey", {"key_id": keys[spec]})["public_key"].encode())
            for spec in ("EC_P384", "EC_P256")}
        for name, actions in (("signer", ["kms:cmk:sign", "kms:cmk:getPublicKey"]),
                              ("reader", ["kms:cmk:getPublicKey"])):
            created = admin.call("admin/create-principal", {"name": name, "admin": False})
            write_credentials(tmp / f"{name}.json", info["endpoint"],
                              Credentials(created["access_key"], created["secret_key"], info["project_id"]))
            admin.call("admin/put-policy", {"name": name, "policy": {
                "Version": "1.1", "Statement": [{"Effect": "Allow", "Action": actions}]}})
        admin.close()
        yield {"tmp": tmp, "port": port, "project": info["project_id"], "keys": keys, "public": public,
               "admin": info["credentials"], "process": process}
    finally:
        process.terminate()
        process.wait(20)
        process.stdout.close()
        process.stderr.close()


def key_uri(kms, spec: str = "EC_P384", **parts) -> str:
    where = {"scheme": "kms+http", "host": f"127.0.0.1:{kms['port']}", "project": kms["project"],
             "key": kms["keys"][spec], **parts}
    return f"{where['scheme']}://{where['host']}/{where['project']}/{where['key']}"


@pytest.fixture
def layout(tmp_path):
    write_oci_layout(tmp_path / "image", [make_tar([file("bin/app", b"#!/bin/sh\necho kms\n", mode=0o755)])],
                     default_config(cmd=["/bin/app"]))
    return f"oci:{tmp_path / 'image'}"


@pytest.mark.parametrize("spec", ["EC_P384", "EC_P256"])
def test_convert_and_provenance_signed_in_the_kms_verify_with_the_certificate(kms, layout, tmp_path, spec):
    cert = certificate_for(kms["public"][spec], tmp_path, "cert.pem")
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", key_uri(kms, spec),
                    "--signing-certificate", cert, "--kms-credentials", kms["tmp"] / "signer.json",
                    "--provenance", tmp_path / "app.intoto.json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["PCR8"] == pcr8_from_certificate(cert.read_bytes())
    verified = invoke("verify", tmp_path / "app.eif", "--signing-certificate", cert,
                      "--provenance", tmp_path / "app.intoto.json", "--json")
    assert verified.exit_code == 0, verified.output
    checks = {c["check"]: c["ok"] for c in json.loads(verified.stdout)["Checks"]}
    assert checks["signature"] and checks["certificate"] and checks["provenance signature"]
    # the same EIF unsigned differs only by the signature: PCR0 is the same, PCR8 appears
    plain = invoke("convert", layout, "-o", tmp_path / "plain.eif", "-q")
    assert json.loads(plain.stdout)["PCR0"] == json.loads(result.stdout)["PCR0"]
    # the signatures were made by the KMS, as the signer principal (the audit log says so)
    audit = CliRunner().invoke(kms_cli.command, ["audit", "--principal", "signer", "--key-id", kms["keys"][spec],
                                                 "--json", "--credentials", kms["admin"]])
    apis = [record["api"] for record in json.loads(audit.stdout)["records"] if record["decision"] == "allow"]
    assert apis.count("get-publickey") >= 1 and apis.count("sign") >= 3   # the early check, PCR0, DSSE


def test_sign_and_build_eif_take_credentials_from_the_environment(kms, layout, tmp_path):
    cert = certificate_for(kms["public"]["EC_P384"], tmp_path, "cert.pem")
    _, signer = read_credentials(kms["tmp"] / "signer.json")
    env = {"KMS_ACCESS_KEY": signer.access_key, "KMS_SECRET_KEY": signer.secret_key,
           "QTBUILD_KMS_CREDENTIALS": None}
    assert invoke("convert", layout, "-o", tmp_path / "app.eif", "-q").exit_code == 0
    signed = invoke("sign", tmp_path / "app.eif", "--private-key", key_uri(kms), "--signing-certificate", cert,
                    "-q", env=env)
    assert signed.exit_code == 0, signed.output
    assert invoke("verify", tmp_path / "app.eif", "--signing-certificate", cert).exit_code == 0
    for name in ("kernel", "ramdisk"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    built = invoke("build-eif", "--kernel", tmp_path / "kernel", "--cmdline", "console=ttyS0",
                   "--ramdisk", tmp_path / "ramdisk", "-o", tmp_path / "files.eif", "--private-key", key_uri(kms),
                   "--signing-certificate", cert, "-q", env=env)
    assert built.exit_code == 0, built.output
    assert invoke("verify", tmp_path / "files.eif", "--signing-certificate", cert).exit_code == 0


def test_a_principal_without_sign_permission_is_refused_before_anything_is_written(kms, layout, tmp_path):
    cert = certificate_for(kms["public"]["EC_P384"], tmp_path, "cert.pem")
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", key_uri(kms),
                    "--signing-certificate", cert, "--kms-credentials", kms["tmp"] / "reader.json", "-q")
    assert result.exit_code == 2 and "the KMS refused sign" in result.output, result.output
    assert result.output.count("\n") == 1
    _, reader = read_credentials(kms["tmp"] / "reader.json")
    assert reader.secret_key not in result.output
    assert not (tmp_path / "app.eif").exists()


def test_a_kms_key_that_is_not_the_certificates_is_refused(kms, layout, tmp_path):
    cert = certificate_for(kms["public"]["EC_P256"], tmp_path, "cert.pem")
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", key_uri(kms, "EC_P384"),
                    "--signing-certificate", cert, "--kms-credentials", kms["tmp"] / "signer.json", "-q")
    assert result.exit_code == 2 and "does not match the signing certificate" in result.output, result.output


@pytest.mark.parametrize(("key", "message"), [
    (lambda kms: key_uri(kms, "AES_256"), "symmetric key"),
    (lambda kms: key_uri(kms, key="00000000-0000-4000-8000-000000000000"), "the KMS refused get-publickey"),
    (lambda kms: key_uri(kms, project="0" * 32), "the KMS refused get-publickey"),
    (lambda kms: key_uri(kms, host="127.0.0.1:1"), "cannot reach the KMS at http://127.0.0.1:1"),
    (lambda kms: key_uri(kms, host="kms.example.com"), "plain HTTP only to a loopback address"),
    (lambda kms: f"kms+http://127.0.0.1:{kms['port']}/{kms['project']}", "expected kms://HOST[:PORT]/PROJECT_ID/KEY_ID"),
    (lambda kms: key_uri(kms, host=f"ak:sk@127.0.0.1:{kms['port']}"), "credentials do not go in the URI"),
    (lambda kms: "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
     "AWS KMS key ARNs are not supported yet"),
])
def test_bad_kms_keys_are_one_line_errors(kms, layout, tmp_path, key, message):
    cert = certificate_for(kms["public"]["EC_P384"], tmp_path, "cert.pem")
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", key(kms),
                    "--signing-certificate", cert, "--kms-credentials", kms["tmp"] / "signer.json", "-q")
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "app.eif").exists()


def test_missing_credentials_say_where_to_put_them(kms, layout, tmp_path):
    cert = certificate_for(kms["public"]["EC_P384"], tmp_path, "cert.pem")
    env = {"KMS_ACCESS_KEY": None, "KMS_SECRET_KEY": None, "HUAWEICLOUD_SDK_AK": None, "HUAWEICLOUD_SDK_SK": None,
           "QTBUILD_KMS_CREDENTIALS": None}
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", key_uri(kms),
                    "--signing-certificate", cert, "-q", env=env)
    assert result.exit_code == 2 and "KMS_ACCESS_KEY" in result.output and "--kms-credentials" in result.output


def test_the_uri_forms():
    assert KmsKeyUri.parse("kms://kms.cn-north-4.myhuaweicloud.com/p1/k-1") == KmsKeyUri(
        "https://kms.cn-north-4.myhuaweicloud.com", "p1", "k-1")
    assert KmsKeyUri.parse("kms+http://[::1]:8080/p/k").endpoint == "http://[::1]:8080"
    assert KmsKeyUri.parse("kms+http://localhost:8080/p/k").endpoint == "http://localhost:8080"


@pytest.fixture
def tls_front(kms, tmp_path):
    """A TLS endpoint on 127.0.0.1 (certificate for localhost/127.0.0.1 from a test CA) relaying
    each connection's bytes to the served KMS: what a KMS behind HTTPS looks like.
    Yields (port, ca.pem)."""
    ca, certificate, key = tls_files(tmp_path)
    context = server_tls_context(certificate, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def pump(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def serve():
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                secured = context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", kms["port"]))
            for source, target in ((secured, upstream), (upstream, secured)):
                threading.Thread(target=pump, args=(source, target), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], ca
    stopping.set()
    listener.close()


def test_kms_uris_speak_https_and_check_the_servers_certificate(kms, tls_front, layout, tmp_path):
    port, ca = tls_front
    cert = certificate_for(kms["public"]["EC_P384"], tmp_path, "cert.pem")
    uri = key_uri(kms, scheme="kms", host=f"localhost:{port}")
    args = ["convert", layout, "-o", tmp_path / "app.eif", "--private-key", uri, "--signing-certificate", cert,
            "--kms-credentials", kms["tmp"] / "signer.json", "-q"]
    untrusted = invoke(*args, env={"SSL_CERT_FILE": str(tmp_path / "no-such-ca.pem"), "SSL_CERT_DIR": str(tmp_path)})
    assert untrusted.exit_code == 2 and "TLS with the KMS at https://localhost" in untrusted.output, untrusted.output
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.output and "SSL_CERT_FILE" in untrusted.output
    assert not (tmp_path / "app.eif").exists()
    trusted = invoke(*args, env={"SSL_CERT_FILE": str(ca)})
    assert trusted.exit_code == 0, trusted.output
    assert invoke("verify", tmp_path / "app.eif", "--signing-certificate", cert).exit_code == 0


def test_the_release_recipe_signs_with_a_kms_key(kms, layout, tmp_path):
    """samples/ci/release.sh with KEY = a kms:// URI and the credentials in the environment."""
    cert = certificate_for(kms["public"]["EC_P384"], tmp_path, "cert.pem")
    script = Path(__file__).resolve().parents[2] / "samples" / "ci" / "release.sh"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path), "SOURCE_DATE_EPOCH": "1",
           "QTBUILD_KMS_CREDENTIALS": str(kms["tmp"] / "signer.json")}
    for job in (["release", layout, key_uri(kms), str(cert), str(tmp_path / "dist")],
                ["reproduce", layout, str(tmp_path / "dist")]):
        done = subprocess.run(["bash", str(script), *job], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    measurements = json.loads((tmp_path / "dist" / "measurements.json").read_text())
    assert measurements["PCR8"] == pcr8_from_certificate(cert.read_bytes())
