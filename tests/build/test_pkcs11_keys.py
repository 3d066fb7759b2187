"""Signing with a key that stays in a PKCS#11 token (Debian's SoftHSM2): convert, sign and the
provenance envelope, with errors that name the problem and never the PIN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.cli.app import cli
from qtbuild.formats.eif_signature import pcr8_from_certificate

from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "4321"

pytestmark = pytest.mark.skipif(not os.path.exists(MODULE) and not os.environ.get("CI"),
                                reason="softhsm2 is not installed (scripts/install-system.sh installs it)")


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    """A SoftHSM2 token 'qtbuild-release' holding a P-384 key pair 'signer', and a certificate for it."""
    import pkcs11
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    config = directory / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(config)  # read by the module when it is first loaded
    subprocess.run([shutil.which("softhsm2-util") or "softhsm2-util", "--init-token", "--free", "--label",
                    "qtbuild-release", "--pin", PIN, "--so-pin", "87654321"], check=True, capture_output=True)
    with pkcs11.lib(MODULE).get_token(token_label="qtbuild-release").open(user_pin=PIN, rw=True) as session:
        parameters = session.create_domain_parameters(
            pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")}, local=True)
        public, _ = parameters.generate_keypair(store=True, label="signer")
        public_key = serialization.load_der_public_key(encode_ec_public_key(public))
    ca = ec.generate_private_key(ec.SECP384R1())
    now = datetime.now(UTC)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    certificate = (x509.CertificateBuilder().subject_name(name("release signer")).issuer_name(name("release CA"))
                   .public_key(public_key).serial_number(7).not_valid_before(now - timedelta(days=1))
                   .not_valid_after(now + timedelta(days=30)).sign(ca, hashes.SHA384()))
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    yield directory
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


def uri(**overrides) -> str:
    query = {"module-path": MODULE, "pin-value": PIN, **overrides.pop("query", {})}
    attributes = {"token": "qtbuild-release", "object": "signer", **overrides}
    path = ";".join(f"{k}={v}" for k, v in attributes.items() if v is not None)
    return f"pkcs11:{path}?" + "&".join(f"{k}={v}" for k, v in query.items() if v is not None)


@pytest.fixture
def layout(tmp_path):
    write_oci_layout(tmp_path / "image", [make_tar([file("bin/app", b"#!/bin/sh\necho hsm\n", mode=0o755)])],
                     default_config(cmd=["/bin/app"]))
    return f"oci:{tmp_path / 'image'}"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_convert_sign_and_provenance_with_a_token_key(token, layout, tmp_path):
    cert = token / "cert.pem"
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", uri(),
                    "--signing-certificate", cert, "--provenance", tmp_path / "app.json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["PCR8"] == pcr8_from_certificate(cert.read_bytes())
    verified = invoke("verify", tmp_path / "app.eif", "--signing-certificate", cert,
                      "--provenance", tmp_path / "app.json", "--json")
    assert verified.exit_code == 0, verified.output
    checks = {c["check"]: c["ok"] for c in json.loads(verified.stdout)["Checks"]}
    assert checks["signature"] and checks["certificate"] and checks["provenance signature"]
    invoke("convert", layout, "-o", tmp_path / "plain.eif", "-q")
    signed = invoke("sign", tmp_path / "plain.eif", "--private-key", uri(), "--signing-certificate", cert, "-q")
    assert signed.exit_code == 0, signed.output
    assert invoke("verify", tmp_path / "plain.eif", "--signing-certificate", cert).exit_code == 0


@pytest.mark.parametrize(("key", "message"), [
    (uri(query={"pin-value": "0000"}), "the token refused the PIN"),
    (uri(token="nope"), "no token labelled 'nope'"),
    (uri(object="missing"), "no EC key pair with that label"),
    (uri(query={"module-path": None}), "no module-path"),
    (uri(object=None), "no object=LABEL or id="),
])
def test_token_errors_are_one_line_without_the_pin(token, layout, tmp_path, key, message, monkeypatch):
    monkeypatch.delenv("QTBUILD_PKCS11_MODULE", raising=False)
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", key,
                    "--signing-certificate", token / "cert.pem", "-q")
    assert result.exit_code == 2 and message in result.output
    assert result.output.count("\n") == 1 and PIN not in result.output and "0000" not in result.output
    assert not (tmp_path / "app.eif").exists()


def test_a_token_key_that_is_not_the_certificates_is_refused(token, layout, tmp_path):
    from helpers.certs import make_signer

    _, other = make_signer("P-384")
    (tmp_path / "other.pem").write_bytes(other)
    result = invoke("convert", layout, "-o", tmp_path / "app.eif", "--private-key", uri(),
                    "--signing-certificate", tmp_path / "other.pem", "-q")
    assert result.exit_code == 2 and "does not match the signing certificate" in result.output
