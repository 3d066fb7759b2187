"""``convert --provenance`` and ``verify --provenance``: in-toto Statement + SLSA Provenance v1,
DSSE-signed when a key is given; deterministic; checked against the very file."""

from __future__ import annotations

import base64
import json

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from qtbuild.cli.app import cli
from qtbuild.formats.dsse import pae

from helpers.certs import make_signer
from helpers.imagefactory import default_config, file, make_tar, write_oci_layout


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"SOURCE_DATE_EPOCH": "1700000000", **(env or {})})


def write_image(directory, text: bytes) -> str:
    layer = make_tar([file("bin/app", b"#!/bin/sh\necho " + text + b"\n", mode=0o755)])
    write_oci_layout(directory, [layer], default_config(cmd=["/bin/app"]), tag="v1")
    return f"oci:{directory}:v1"


@pytest.fixture
def keys(tmp_path):
    for name, curve in (("key", "P-384"), ("other", "P-256")):
        key, cert = make_signer(curve)
        (tmp_path / f"{name}.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}-cert.pem").write_bytes(cert)
    return tmp_path


def convert(source, out, provenance, *extra):
    result = invoke("convert", source, "-o", out, "--provenance", provenance, "-q", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def verify(eif, provenance, *extra):
    result = invoke("verify", eif, "--provenance", provenance, "--json", *extra)
    return result.exit_code, {check["check"]: check for check in json.loads(result.stdout)["Checks"]}


def test_unsigned_statement_describes_the_build_and_is_deterministic(tmp_path):
    source = write_image(tmp_path / "image", b"one")
    pcrs = convert(source, tmp_path / "a.eif", tmp_path / "a.json")
    convert(source, tmp_path / "b.eif", tmp_path / "b.json")
    statement = json.loads((tmp_path / "a.json").read_bytes())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subject = statement["subject"][0]
    assert subject["name"] == "a.eif" and set(subject["digest"]) == {"sha256", "sha384"}
    assert subject["annotations"] == {name: pcrs[name] for name in ("PCR0", "PCR1", "PCR2")}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["source"] == source
    assert definition["internalParameters"] == {"sourceDateEpoch": 1700000000, "launchLayoutVersion": 2}
    names = [dependency["name"] for dependency in definition["resolvedDependencies"]]
    assert names == ["manifest", "config", "layer 0"]
    assert definition["resolvedDependencies"][2]["annotations"]["diffId"].startswith("sha256:")
    assert statement["predicate"]["runDetails"]["builder"]["version"]["qtbuild"]
    # same build, same bytes (only the subject's file name differs between a and b)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes().replace(b'"b.eif"', b'"a.eif"')
    status, checks = verify(tmp_path / "a.eif", tmp_path / "a.json")
    assert status == 0, checks
    assert checks["provenance signature"]["ok"] is None
    assert checks["provenance subject"]["ok"] and checks["provenance PCRs"]["ok"]


def test_tampered_eif_and_another_images_statement_fail(tmp_path):
    convert(write_image(tmp_path / "one", b"one"), tmp_path / "one.eif", tmp_path / "one.json")
    convert(write_image(tmp_path / "two", b"two"), tmp_path / "two.eif", tmp_path / "two.json")
    status, checks = verify(tmp_path / "one.eif", tmp_path / "two.json")
    assert status == 1
    assert checks["provenance subject"]["ok"] is False and "another image" in checks["provenance subject"]["detail"]
    assert checks["provenance PCRs"]["ok"] is False
    data = bytearray((tmp_path / "one.eif").read_bytes())
    data[-100] ^= 1  # inside the customer ramdisk
    (tmp_path / "one.eif").write_bytes(bytes(data))
    status, checks = verify(tmp_path / "one.eif", tmp_path / "one.json")
    assert status == 1 and checks["provenance subject"]["ok"] is False and checks["provenance PCRs"]["ok"] is False


def test_signed_build_is_a_dsse_envelope_checked_with_the_key(tmp_path, keys):
    source = write_image(tmp_path / "image", b"signed")
    signing = ["--private-key", keys / "key.pem", "--signing-certificate", keys / "key-cert.pem"]
    convert(source, tmp_path / "a.eif", tmp_path / "a.json", *signing)
    convert(source, tmp_path / "b.eif", tmp_path / "b.json", *signing)
    assert (tmp_path / "a.eif").read_bytes() == (tmp_path / "b.eif").read_bytes()  # RFC 6979: signed EIFs reproduce
    envelope = json.loads((tmp_path / "a.json").read_bytes())
    assert envelope["payloadType"] == "application/vnd.in-toto+json" and len(envelope["signatures"]) == 1
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert "PCR8" in statement["subject"][0]["annotations"]
    status, checks = verify(tmp_path / "a.eif", tmp_path / "a.json", "--signing-certificate", keys / "key-cert.pem")
    assert status == 0, checks
    status, checks = verify(tmp_path / "a.eif", tmp_path / "a.json")  # the image's own certificate checks it
    assert status == 0 and "image's signing certificate" in checks["provenance signature"]["detail"]
    status, checks = verify(tmp_path / "a.eif", tmp_path / "a.json", "--signing-certificate", keys / "other-cert.pem")
    assert status == 1 and checks["provenance signature"]["ok"] is False
    envelope["payload"] = base64.b64encode(json.dumps({**statement, "predicateType": "x"}).encode()).decode()
    (tmp_path / "forged.json").write_text(json.dumps(envelope))
    status, checks = verify(tmp_path / "a.eif", tmp_path / "forged.json",
                            "--signing-certificate", keys / "key-cert.pem")
    assert status == 1 and checks["provenance signature"]["ok"] is False


def test_unsigned_statement_with_a_certificate_fails_and_bad_files_are_input_errors(tmp_path, keys):
    source = write_image(tmp_path / "image", b"plain")
    signing = ["--private-key", keys / "key.pem", "--signing-certificate", keys / "key-cert.pem"]
    convert(source, tmp_path / "signed.eif", tmp_path / "signed.json", *signing)
    (tmp_path / "plain.json").write_text(base64.b64decode(json.loads((tmp_path / "signed.json").read_text())["payload"])
                                         .decode())
    status, checks = verify(tmp_path / "signed.eif", tmp_path / "plain.json", "--signing-certificate",
                            keys / "key-cert.pem")
    assert status == 1 and "not signed" in checks["provenance signature"]["detail"]
    (tmp_path / "junk.json").write_text("[1, 2")
    result = invoke("verify", tmp_path / "signed.eif", "--provenance", tmp_path / "junk.json")
    assert result.exit_code == 2 and "not valid JSON" in result.output
    refused = invoke("convert", source, "--provenance", tmp_path / "p.json", "--check", tmp_path / "signed.eif")
    assert refused.exit_code == 2 and "add -o" in refused.output


def test_dsse_pae_matches_the_specification_example():
    # github.com/secure-systems-lab/dsse protocol.md: PAE of "hello world" with type http://example.com/HelloWorld
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("http://example.com/HelloWorld", b"hello world") == expected
