"""`qtbuild build-eif`, `describe`, `extract` and `pcr` through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from qtbuild.cli import main
from qtbuild.cli.app import cli

from helpers.certs import make_certificate, make_key, to_pem
from helpers.eif_inputs import newc, write_inputs


def run(*args: str) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would (a real process, real exit code)."""
    return subprocess.run([sys.executable, "-c", "from qtbuild.cli import main; main()", *args],
                          capture_output=True, text=True)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def files(tmp_path):
    return write_inputs(tmp_path)


def build(files, *extra: str, out: str = "app.eif"):
    return invoke(
        "build-eif", "--kernel", str(files / "kernel"), "--cmdline", "console=ttyS0",
        "--ramdisk", str(files / "boot.cpio"), "--ramdisk", str(files / "app.cpio"), "-o", str(files / out), *extra,
    )


def expected_pcrs(files) -> dict:
    kernel, boot, app = ((files / name).read_bytes() for name in ("kernel", "boot.cpio", "app.cpio"))

    def ext(data: bytes) -> str:
        return hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).hexdigest()

    return {"PCR0": ext(kernel + b"console=ttyS0" + boot + app), "PCR1": ext(kernel + b"console=ttyS0" + boot),
            "PCR2": ext(app)}


def signing_args(files) -> list[str]:
    return ["--private-key", str(files / "key.pem"), "--signing-certificate", str(files / "cert.pem")]


# -- build-eif ---------------------------------------------------------------------------------


def test_build_eif_prints_qingtian_measurements(files):
    result = build(files)
    assert result.exit_code == 0, result.stderr
    output = json.loads(result.stdout)
    assert list(output) == ["digest", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert {k: output[k] for k in ("PCR0", "PCR1", "PCR2")} == expected_pcrs(files)
    assert output["PCR8"] == "0" * 96


def test_build_eif_signed_nitro_format(files):
    result = build(files, *signing_args(files), "--format", "nitro")
    assert result.exit_code == 0, result.stderr
    measurements = json.loads(result.stdout)["Measurements"]
    cert_der = make_der(files / "cert.pem")
    assert measurements["PCR8"] == hashlib.sha384(bytes(48) + hashlib.sha384(cert_der).digest()).hexdigest()
    assert measurements["PCR0"] == expected_pcrs(files)["PCR0"]  # signing never moves PCR0


def make_der(path) -> bytes:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_build_eif_refuses_mismatched_key_and_leaves_nothing(files):
    other = make_key("P-384")
    (files / "other.pem").write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    result = build(files, "--private-key", str(files / "other.pem"), "--signing-certificate", str(files / "cert.pem"))
    assert result.exit_code == 2
    assert "does not match" in result.stderr
    assert not (files / "app.eif").exists()


def test_build_eif_refuses_expired_certificate(files):
    key = make_key("P-256")
    past = datetime.now(UTC) - timedelta(days=10)
    (files / "old.pem").write_bytes(to_pem(make_certificate(key, not_before=past - timedelta(days=5), not_after=past)))
    (files / "oldkey.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    result = build(files, "--private-key", str(files / "oldkey.pem"), "--signing-certificate", str(files / "old.pem"))
    assert result.exit_code == 2 and "expired" in result.stderr


def test_build_eif_needs_key_and_certificate_together(files):
    result = build(files, "--private-key", str(files / "key.pem"))
    assert result.exit_code == 2 and "go together" in result.stderr


def test_build_eif_is_deterministic(files):
    assert build(files, out="a.eif").exit_code == 0
    assert build(files, out="b.eif").exit_code == 0
    assert (files / "a.eif").read_bytes() == (files / "b.eif").read_bytes()


def test_source_date_epoch_sets_build_time(files, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert build(files).exit_code == 0
    described = json.loads(invoke("describe", str(files / "app.eif")).stdout)
    assert described["Metadata"]["BuildTime"] == "2023-11-14T22:13:20+00:00"


# -- describe ----------------------------------------------------------------------------------


def test_describe_unsigned(files):
    build(files)
    result = invoke("describe", str(files / "app.eif"))
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert list(document)[:4] == ["EifVersion", "Measurements", "IsSigned", "CheckCRC"]
    assert document["EifVersion"] == 4 and document["IsSigned"] is False and document["CheckCRC"] is True
    assert "SignatureCheck" not in document
    measurements = document["Measurements"]
    assert measurements.pop("HashAlgorithm") == "Sha384 { ... }"
    assert measurements == expected_pcrs(files)
    assert [s["Type"] for s in document["Sections"]] == ["kernel", "cmdline", "metadata", "ramdisk", "ramdisk"]
    assert document["Sections"][4]["Sha384"] == hashlib.sha384((files / "app.cpio").read_bytes()).hexdigest()
    assert document["Metadata"]["BuildTool"] == "qtbuild"


def test_describe_signed(files):
    build(files, *signing_args(files))
    document = json.loads(invoke("describe", str(files / "app.eif")).stdout)
    assert document["IsSigned"] is True and document["SignatureCheck"] is True
    assert document["SigningCertificate"]["IssuerName"] == {"commonName": "qtbuild test signer"}
    assert document["SigningCertificate"]["Algorithm"] == "ecdsa-with-SHA384"
    assert document["SigningCertificate"]["NotAfter"].endswith(" GMT")
    assert "PCR8" in document["Measurements"]


def test_describe_reports_bad_crc_and_bad_signature(files):
    build(files, *signing_args(files))
    data = bytearray((files / "app.eif").read_bytes())
    reader_offset = struct.unpack_from(">Q", data, 28 + 8 * 4)[0]  # customer ramdisk section
    data[reader_offset + 12 + 200] ^= 0x01  # flip one byte of the ramdisk: PCR0 moves
    (files / "bad.eif").write_bytes(bytes(data))
    result = invoke("describe", str(files / "bad.eif"))
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["CheckCRC"] is False
    assert document["SignatureCheck"] is False and "does not match" in document["SignatureError"]


def test_describe_qingtian_format(files):
    build(files)
    document = json.loads(invoke("describe", "--format", "qingtian", str(files / "app.eif")).stdout)
    assert document == {"digest": "SHA384", "PCR0": expected_pcrs(files)["PCR0"], "PCR8": "0" * 96}


@pytest.mark.parametrize("content", [b"", b"not an eif at all", b".eif" + b"\0" * 600])
def test_describe_bad_input_is_one_line_exit_2(tmp_path, content):
    (tmp_path / "x.eif").write_bytes(content)
    result = run("describe", str(tmp_path / "x.eif"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("qtbuild: error:")
    assert "Traceback" not in result.stderr


def test_missing_file_and_help():
    result = run("describe", "/nonexistent/app.eif")
    assert result.returncode == 2 and "No such file" in result.stderr
    for command in ("build-eif", "describe", "extract", "pcr"):
        assert run(command, "--help").returncode == 0


# -- extract -----------------------------------------------------------------------------------


def test_extract_writes_sections_and_unpacks_safely(files):
    build(files, *signing_args(files))
    out = files / "out"
    result = invoke("extract", str(files / "app.eif"), "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert (out / "kernel").read_bytes() == (files / "kernel").read_bytes()
    assert (out / "cmdline").read_bytes() == b"console=ttyS0"
    assert json.loads((out / "metadata.json").read_bytes())["ImageName"] == "enclave"
    assert (out / "signing-certificate.pem").read_bytes() == (files / "cert.pem").read_bytes()
    assert (out / "ramdisk1.cpio").read_bytes() == (files / "app.cpio").read_bytes()
    app = out / "ramdisk1" / "rootfs" / "bin" / "app"
    assert app.read_bytes() == b"hello"
    assert not app.stat().st_mode & stat.S_ISUID
    assert os.readlink(out / "ramdisk1" / "rootfs" / "bin" / "link") == "/bin/app"
    assert not (out / "ramdisk1" / "rootfs" / "null").exists()
    report = json.loads(result.stdout)
    assert report["ramdisks"][1]["skipped_devices"] == ["rootfs/null"]
    assert report["ramdisks"][1]["stripped_setid"] == ["rootfs/bin/app"]


def test_extract_refuses_non_empty_directory(files):
    build(files)
    (files / "busy").mkdir()
    (files / "busy" / "keep").write_text("x")
    result = invoke("extract", str(files / "app.eif"), "-o", str(files / "busy"))
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert os.listdir(files / "busy") == ["keep"]


def test_extract_hostile_ramdisk_leaves_nothing(files):
    (files / "app.cpio").write_bytes(newc([(b"../escape", stat.S_IFREG | 0o644, b"pwned")]))
    build(files)
    before = set(os.listdir(files))
    result = invoke("extract", str(files / "app.eif"), "-o", str(files / "out"))
    assert result.exit_code == 2 and ".." in result.stderr
    assert set(os.listdir(files)) == before  # no output dir, no staging dir
    assert not (files.parent / "escape").exists()


# -- pcr ---------------------------------------------------------------------------------------


def test_pcr_of_file_and_certificate(files):
    data = (files / "kernel").read_bytes()
    result = invoke("pcr", "--input", str(files / "kernel"))
    assert json.loads(result.stdout) == {"PCR": hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).hexdigest()}
    result = invoke("pcr", "--signing-certificate", str(files / "cert.pem"))
    der = make_der(files / "cert.pem")
    assert json.loads(result.stdout) == {"PCR8": hashlib.sha384(bytes(48) + hashlib.sha384(der).digest()).hexdigest()}


def test_pcr_needs_exactly_one_input(files):
    assert invoke("pcr").exit_code == 2
    both = invoke("pcr", "--input", str(files / "kernel"), "--signing-certificate", str(files / "cert.pem"))
    assert both.exit_code == 2


def test_pcr_certificate_garbage_is_input_error(files):
    (files / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    result = run("pcr", "--signing-certificate", str(files / "junk.pem"))
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_main_entry_point_is_importable():
    assert callable(main)
