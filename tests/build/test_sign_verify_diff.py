"""`qtbuild sign`, `verify` and `diff` on images built from files."""

from __future__ import annotations

import json
import stat
import struct
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from qtbuild.cli.app import cli
from qtbuild.formats.cpio import CpioEntry
from qtbuild.formats.eif import EifReader

from helpers.certs import make_signer
from helpers.eif_inputs import customer_ramdisk, write_inputs


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def files(tmp_path):
    return write_inputs(tmp_path)


def build(files, out="app.eif", *extra):
    result = invoke("build-eif", "--kernel", files / "kernel", "--cmdline", "console=ttyS0",
                    "--ramdisk", files / "boot.cpio", "--ramdisk", files / "app.cpio", "-o", files / out, "-q", *extra)
    assert result.exit_code == 0, result.stderr
    (files / (out + ".json")).write_text(result.stdout)
    return json.loads(result.stdout)


def key_files(files, name, curve="P-384", **validity):
    key, pem = make_signer(curve, **validity)
    (files / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (files / f"{name}.pem").write_bytes(pem)
    return files / f"{name}.key", files / f"{name}.pem"


# -- sign --------------------------------------------------------------------------------------


def test_sign_adds_then_replaces_signature_keeping_pcr0(files):
    unsigned = build(files)
    result = invoke("sign", files / "app.eif", "--private-key", files / "key.pem",
                    "--signing-certificate", files / "cert.pem", "-o", files / "s1.eif")
    assert result.exit_code == 0, result.stderr
    first = json.loads(result.stdout)
    assert first["PCR0"] == unsigned["PCR0"] and first["PCR8"] != "0" * 96
    other_key, other_cert = key_files(files, "other", "P-256")
    # in place:
    result = invoke("sign", files / "s1.eif", "--private-key", other_key, "--signing-certificate", other_cert)
    assert result.exit_code == 0, result.stderr
    second = json.loads(result.stdout)
    assert second["PCR0"] == unsigned["PCR0"] and second["PCR8"] not in (first["PCR8"], "0" * 96)
    with EifReader.open(files / "s1.eif") as reader:
        # issue #54: after a replace the header must describe exactly one signature, CRC valid
        assert [s.type.label for s in reader.sections].count("signature") == 1
        assert reader.header.num_sections == 6 and reader.contiguous
        assert reader.check_stream().crc_ok
    described = json.loads(invoke("describe", files / "s1.eif").stdout)
    assert described["SignatureCheck"] is True and described["Measurements"]["PCR8"] == second["PCR8"]


def test_signed_files_differ_only_in_signature(files):
    build(files)
    for name in ("a", "b"):
        signed = invoke("sign", files / "app.eif", "--private-key", files / "key.pem",
                        "--signing-certificate", files / "cert.pem", "-o", files / f"{name}.eif")
        assert signed.exit_code == 0
    a, b = (files / "a.eif").read_bytes(), (files / "b.eif").read_bytes()
    with EifReader.open(files / "a.eif") as reader:
        signature_offset = reader.signature_section.offset
    assert a[548:signature_offset] == b[548:signature_offset]
    assert a == b  # deterministic ECDSA (RFC 6979): signing twice gives the same file


def test_sign_refuses_rsa_and_mismatch_and_expired(files):
    build(files)
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (files / "rsa.key").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    result = invoke("sign", files / "app.eif", "--private-key", files / "rsa.key",
                    "--signing-certificate", files / "cert.pem")
    assert result.exit_code == 2 and "EC key" in result.stderr
    other_key, _ = key_files(files, "other")
    result = invoke("sign", files / "app.eif", "--private-key", other_key, "--signing-certificate", files / "cert.pem")
    assert result.exit_code == 2 and "does not match" in result.stderr
    future = datetime.now(UTC) + timedelta(days=3)
    key, cert = key_files(files, "future", not_before=future, not_after=future + timedelta(days=3))
    result = invoke("sign", files / "app.eif", "--private-key", key, "--signing-certificate", cert)
    assert result.exit_code == 2 and "not yet valid" in result.stderr
    assert not invoke("describe", files / "app.eif").stdout.count('"IsSigned": true')


# -- verify ------------------------------------------------------------------------------------


def test_verify_against_expect_files_of_every_shape(files):
    unsigned = build(files)
    assert invoke("verify", files / "app.eif", "--expect", files / "app.eif.json").exit_code == 0
    nitro = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", **{k: unsigned[k] for k in ("PCR0", "PCR1", "PCR2")}}}
    (files / "nitro.json").write_text(json.dumps(nitro))
    assert invoke("verify", files / "app.eif", "--expect", files / "nitro.json").exit_code == 0
    (files / "describe.json").write_text(invoke("describe", files / "app.eif").stdout)
    assert invoke("verify", files / "app.eif", "--expect", files / "describe.json").exit_code == 0


def test_verify_reports_each_failing_check(files):
    build(files, "app.eif", "--private-key", files / "key.pem", "--signing-certificate", files / "cert.pem")
    _, other_cert = key_files(files, "other")
    result = invoke("verify", files / "app.eif", "--pcr2", "ab" * 48, "--signing-certificate", other_cert, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    failed = {c["check"] for c in report["Checks"] if c["ok"] is False}
    assert failed == {"PCR2", "certificate"}
    assert report["Valid"] is False


def test_verify_detects_corruption(files):
    build(files, "app.eif", "--private-key", files / "key.pem", "--signing-certificate", files / "cert.pem")
    data = bytearray((files / "app.eif").read_bytes())
    offset = struct.unpack_from(">Q", data, 28 + 8 * 4)[0]
    data[offset + 12 + 3] ^= 0xFF
    (files / "bad.eif").write_bytes(bytes(data))
    result = invoke("verify", files / "bad.eif", "--json")
    assert result.exit_code == 1
    failed = {c["check"]: c["detail"] for c in json.loads(result.stdout)["Checks"] if c["ok"] is False}
    assert set(failed) == {"crc", "signature"} and "does not match" in failed["signature"]


def test_verify_unsigned_image_when_signature_expected(files):
    build(files)
    result = invoke("verify", files / "app.eif", "--signing-certificate", files / "cert.pem")
    assert result.exit_code == 1 and "not signed" in result.stdout


@pytest.mark.parametrize("content", ["{", "[]", '{"foo": 1}', '{"PCR0": "xyz"}'])
def test_verify_bad_expect_file_is_input_error(files, content):
    build(files)
    (files / "e.json").write_text(content)
    result = invoke("verify", files / "app.eif", "--expect", files / "e.json")
    assert result.exit_code == 2


def test_verify_bad_signature_section_is_a_failed_check(files):
    build(files, "app.eif", "--private-key", files / "key.pem", "--signing-certificate", files / "cert.pem")
    data = bytearray((files / "app.eif").read_bytes())
    with EifReader.open(files / "app.eif") as reader:
        section = reader.signature_section
    data[section.data_offset] = 0xFF  # no longer a CBOR array
    (files / "bad.eif").write_bytes(bytes(data))
    result = invoke("verify", files / "bad.eif", "--json")
    assert result.exit_code == 1
    signature = next(c for c in json.loads(result.stdout)["Checks"] if c["check"] == "signature")
    assert signature["ok"] is False and "malformed" in signature["detail"]


# -- diff --------------------------------------------------------------------------------------


def test_diff_identical_images(files):
    build(files, "a.eif")
    build(files, "b.eif")
    result = invoke("diff", files / "a.eif", files / "b.eif")
    assert result.exit_code == 0 and "identical" in result.stdout


def test_diff_names_the_changed_file_and_pcrs(files):
    build(files, "a.eif")
    added = CpioEntry(b"rootfs/new", stat.S_IFREG | 0o600, size=1, data=b"n")
    (files / "app.cpio").write_bytes(customer_ramdisk(app=b"HELLO", extra=(added,)))
    build(files, "b.eif")
    result = invoke("diff", files / "a.eif", files / "b.eif", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["Measurements"]["Moved"] == ["PCR0", "PCR2"]
    assert [s["Section"] for s in report["Sections"]] == ["ramdisk 1"]
    assert report["Sections"][0]["Moves"] == ["PCR0", "PCR2"]
    ramdisk = report["Ramdisks"][1]
    assert ramdisk["Added"] == ["rootfs/new"] and ramdisk["Removed"] == []
    [change] = ramdisk["Changed"]
    assert change["Path"] == "rootfs/bin/app" and set(change) == {"Path", "sha256"}
    text = invoke("diff", files / "a.eif", files / "b.eif").stdout
    assert "~ rootfs/bin/app: sha256" in text and "+ rootfs/new" in text


def test_diff_metadata_only(files, monkeypatch):
    build(files, "a.eif")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    build(files, "b.eif")
    report = json.loads(invoke("diff", files / "a.eif", files / "b.eif", "--json").stdout)
    assert report["Measurements"]["Moved"] == []
    assert [m["Key"] for m in report["Metadata"]] == ["BuildMetadata.BuildTime"]
    assert [s["Moves"] for s in report["Sections"]] == [[]]


def test_certificate_file_with_several_certificates_signs_with_the_first(files):
    build(files)
    _, second = key_files(files, "second")
    chain = files / "chain.pem"
    chain.write_bytes((files / "cert.pem").read_bytes() + second.read_bytes())
    result = invoke("sign", files / "app.eif", "--private-key", files / "key.pem", "--signing-certificate", chain,
                    "-o", files / "s.eif")
    assert result.exit_code == 0, result.stderr
    assert "several certificates; the first one signs" in result.stderr
    pcr8 = json.loads(invoke("pcr", "--signing-certificate", files / "cert.pem").stdout)["PCR8"]
    assert json.loads(result.stdout)["PCR8"] == pcr8
    assert invoke("verify", files / "s.eif", "--signing-certificate", files / "cert.pem").exit_code == 0
