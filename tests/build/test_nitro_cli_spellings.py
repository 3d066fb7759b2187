"""nitro-cli / qt / eif_build flag spellings and JSON shapes, through the real CLI entry point.

The JSON shapes are nitro-cli's own (``EnclaveBuildInfo``, ``EifDescribeInfo``, ``pcr``'s
``{"PCR": …}``) and qt's (``{"digest": "SHA384", …}``); the README maps every nitro-cli/qt command and flag.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid

import pytest
from click.testing import CliRunner

from qtbuild.cli.app import cli
from qtbuild.formats.eif import EifReader
from qtbuild.formats.eif_metadata import parse_metadata

from helpers.eif_inputs import write_inputs

NITRO_DESCRIBE_KEYS = ["EifVersion", "Measurements", "IsSigned", "SigningCertificate", "CheckCRC", "SignatureCheck",
                       "ImageName", "ImageVersion", "Metadata"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def files(tmp_path):
    return write_inputs(tmp_path)


@pytest.fixture
def layout(tmp_path):
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    layer = make_tar([file("bin/app", b"#!/bin/sh\necho hi\n", mode=0o755)])
    write_oci_layout(tmp_path / "layout", [layer], default_config(cmd=["/bin/app"]))
    return f"oci:{tmp_path / 'layout'}"


def metadata(path) -> dict:
    with EifReader.open(path) as reader:
        return parse_metadata(reader.read_section(reader.metadata_section, max_size=1 << 20))


def test_build_enclave_spellings_on_convert(files, layout):
    (files / "custom.json").write_text('{"team": "payments"}')
    result = invoke("convert", "--docker-uri", layout, "--output-file", str(files / "app.eif"),
                    "--image-name", "payments", "--image-version", "2.1", "--metadata", str(files / "custom.json"),
                    "--private-key", str(files / "key.pem"), "--signing-certificate", str(files / "cert.pem"),
                    "--format", "nitro", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert list(document) == ["Measurements"]
    assert list(document["Measurements"]) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert document["Measurements"]["HashAlgorithm"] == "Sha384 { ... }"
    identity = metadata(files / "app.eif")
    assert (identity["ImageName"], identity["ImageVersion"], identity["CustomMetadata"]) == ("payments", "2.1",
                                                                                            {"team": "payments"})


def test_eif_build_spellings_on_build_eif(files):
    result = invoke("build-eif", "--kernel", str(files / "kernel"), "--cmdline", "x",
                    "--ramdisk", str(files / "boot.cpio"), "--ramdisk", str(files / "app.cpio"),
                    "--output-file", str(files / "app.eif"),
                    "--image-name", "n", "--image-version", "v")
    assert result.exit_code == 0, result.output
    assert (metadata(files / "app.eif")["ImageName"], metadata(files / "app.eif")["ImageVersion"]) == ("n", "v")


def test_describe_eif_and_sign_eif_spellings(files, layout):
    assert invoke("convert", layout, "-o", str(files / "app.eif"), "-q").exit_code == 0
    signed = invoke("sign", "--eif-path", str(files / "app.eif"), "--private-key", str(files / "key.pem"),
                    "--signing-certificate", str(files / "cert.pem"), "--output-file", str(files / "signed.eif"), "-q")
    assert signed.exit_code == 0, signed.output
    described = invoke("describe", "--eif-path", str(files / "signed.eif"), "--format", "nitro")
    assert described.exit_code == 0, described.output
    document = json.loads(described.stdout)
    assert list(document) == NITRO_DESCRIBE_KEYS  # nothing of qtbuild's own (Sections, Notes, ...)
    assert document["SignatureCheck"] is True
    assert "Sections" in json.loads(invoke("describe", str(files / "signed.eif")).stdout)  # the default: full
    assert invoke("verify", "--eif-path", str(files / "signed.eif")).exit_code == 0
    both = invoke("describe", str(files / "app.eif"), "--eif-path", str(files / "signed.eif"))
    assert both.exit_code == 2 and "not both" in both.output


def test_pcr_shapes(files):
    data = (files / "kernel").read_bytes()
    expected = hashlib.sha384(bytes(48) + hashlib.sha384(data).digest()).hexdigest()
    nitro = json.loads(invoke("pcr", "--input", str(files / "kernel")).stdout)
    assert nitro == {"PCR": expected}
    qingtian = json.loads(invoke("pcr", "--input", str(files / "kernel"), "--format", "qingtian").stdout)
    assert qingtian == {"digest": "SHA384", "PCR": expected}
    assert list(json.loads(invoke("pcr", "--signing-certificate", str(files / "cert.pem")).stdout)) == ["PCR8"]


def test_docker_dir_builds_through_the_daemon(tmp_path, files):
    from helpers.docker_context import script_context

    context = script_context(tmp_path)
    tag = f"qtbuild-test/docker-dir:{uuid.uuid4().hex[:12]}"
    try:
        result = invoke("convert", "--docker-dir", str(context), "--docker-uri", tag, "--output-file",
                        str(files / "built.eif"), "-q")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["PCR0"]
        again = invoke("measure", f"docker://{tag}", "-q")
        assert json.loads(again.stdout)["PCR0"] == json.loads(result.stdout)["PCR0"]
    finally:
        import docker

        client = docker.from_env()
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)
        client.close()
    (context / "Dockerfile").write_text("FROM scratch\nRUN false\n")
    failed = invoke("convert", "--docker-dir", str(context), "--docker-uri", f"{tag}-bad", "-o", str(files / "x.eif"))
    assert failed.exit_code == 2 and "docker build" in failed.output
    assert not (files / "x.eif").exists()
    archive = invoke("convert", "--docker-dir", str(context), "--docker-uri", "oci:/x", "-o", str(files / "x.eif"))
    assert archive.exit_code == 2 and "--docker-dir builds through the Docker daemon" in archive.output
