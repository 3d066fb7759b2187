"""Issue 15 correctness gaps found in acceptance testing, through the real CLI entry point."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qtbuild.cli.app import cli
from qtbuild.formats.eif import EifReader
from qtbuild.formats.eif_metadata import parse_metadata
from qtbuild.formats.eif_signature import pcr8_from_certificate

from helpers.certs import make_signer
from helpers.eif_inputs import write_inputs
from helpers.nitro_signer import crate_sign


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


@pytest.fixture
def files(tmp_path):
    return write_inputs(tmp_path)


def build(files, *extra: str, out: str = "app.eif", env: dict | None = None):
    return invoke(
        "build-eif", "--kernel", str(files / "kernel"), "--cmdline", "console=ttyS0",
        "--ramdisk", str(files / "boot.cpio"), "--ramdisk", str(files / "app.cpio"), "-o", str(files / out), *extra,
        env=env,
    )


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a real process (for what is read once per process, such as TMPDIR)."""
    return subprocess.run([sys.executable, "-c", "from qtbuild.cli import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def metadata_bytes(path) -> bytes:
    with EifReader.open(path) as reader:
        return reader.read_section(reader.metadata_section, max_size=1 << 20)


# -- metadata bytes as eif_build writes them -------------------------------------------------------


def test_build_eif_metadata_bytes_match_eif_build(files):
    (files / "custom.json").write_text('{"small": 1.5e-7, "big": 1e100, "huge": 100000000000000000000, "n": 3}')
    result = build(files, "--metadata", str(files / "custom.json"))
    assert result.exit_code == 0, result.output
    data = metadata_bytes(files / "app.eif")
    assert b'"DockerInfo":null,' in data
    assert data.endswith(b'"CustomMetadata":{"big":1e100,"huge":1e20,"n":3,"small":1.5e-7}}')
    assert parse_metadata(data)["DockerInfo"] is None


@pytest.mark.parametrize("text", ['{"x": NaN}', '{"x": Infinity}', '{"x": 1e400}', '{"x": 1' + "0" * 400 + "}"])
def test_custom_metadata_serde_json_refuses_is_refused(files, text):
    (files / "custom.json").write_text(text)
    result = build(files, "--metadata", str(files / "custom.json"))
    assert result.exit_code == 2
    assert "custom metadata is not valid JSON" in result.output
    assert not (files / "app.eif").exists()


# -- files signed by nitro-cli (the crate's signer leaves a stale signature size entry) ------------


def crate_signed_twice(files):
    """An EIF signed by the crate's signer with a P-384 key, then re-signed with a P-256 key."""
    assert build(files).exit_code == 0
    path = files / "app.eif"
    with EifReader.open(path) as reader:
        pcr0 = reader.check_stream().measurements.pcr0
    first, first_cert = make_signer("P-384")
    crate_sign(path, pcr0, first, first_cert)
    second, second_cert = make_signer("P-256")
    crate_sign(path, pcr0, second, second_cert)
    (files / "second.pem").write_bytes(second_cert)
    return path


def test_crate_resigned_file_has_a_stale_entry_and_is_read_with_a_note(files):
    path = crate_signed_twice(files)
    raw = path.read_bytes()
    table_size = struct.unpack_from(">Q", raw, 284 + 8 * 5)[0]
    signature_offset = struct.unpack_from(">Q", raw, 28 + 8 * 5)[0]
    assert struct.unpack_from(">H", raw, signature_offset)[0] == 4
    header_size = struct.unpack_from(">Q", raw, signature_offset + 4)[0]
    assert table_size != header_size  # the crate's signer left the table entry stale
    with EifReader.open(path) as reader:
        assert reader.stale_signature_size == table_size
        assert reader.signature_section.size == header_size
        check = reader.check_stream()
        assert check.crc_ok  # the crate's CRC (header with the stale entry, then the sections)
    described = invoke("describe", str(path))
    assert described.exit_code == 0, described.output
    document = json.loads(described.stdout)
    assert document["SignatureCheck"] is True and document["CheckCRC"] is True
    assert any("is stale" in note for note in document["Notes"])
    pcr8 = pcr8_from_certificate((files / "second.pem").read_bytes())
    verified = invoke("verify", str(path), "--pcr8", pcr8)
    assert verified.exit_code == 0, verified.output
    assert "warning: section_sizes[5]" in verified.stderr


def test_verify_repair_and_sign_rewrite_the_stale_entry(files):
    path = crate_signed_twice(files)
    before = json.loads(invoke("describe", str(path)).stdout)["Measurements"]
    repaired = invoke("verify", "--repair", str(path))
    assert repaired.exit_code == 0, repaired.output
    assert f"repaired {path}: section_sizes[5]" in repaired.stderr
    with EifReader.open(path) as reader:
        assert reader.stale_signature_size is None and not reader.notes and not reader.defects
    assert json.loads(invoke("describe", str(path)).stdout)["Measurements"] == before
    assert "nothing to repair" in invoke("verify", "--repair", str(path)).stderr

    again = crate_signed_twice(files)
    signed = invoke("sign", str(again), *signing_args(files))
    assert signed.exit_code == 0, signed.output
    with EifReader.open(again) as reader:
        assert reader.stale_signature_size is None and reader.check_stream().crc_ok


def test_diff_reads_a_crate_resigned_file(files):
    path = crate_signed_twice(files)
    assert build(files, out="plain.eif").exit_code == 0
    result = invoke("diff", str(files / "plain.eif"), str(path), "--json")
    assert result.exit_code in (0, 1), result.output
    report = json.loads(result.stdout)
    assert report["Measurements"]["Moved"] == ["PCR8"]


# -- malformed files: readable, reported, and verify fails naming the reason -----------------------


def patched(path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


def test_trailing_bytes_fail_verify_and_describe_reports_them(files):
    assert build(files).exit_code == 0
    path = files / "app.eif"
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b"appended junk")
    described = invoke("describe", str(path))
    assert described.exit_code == 0
    assert json.loads(described.stdout)["Defects"] == [
        f"trailing data: 13 bytes after the last section (offsets {size}..{size + 12}) that no section covers"]
    verified = invoke("verify", str(path))
    assert verified.exit_code == 1
    assert "FAIL structure" in verified.stdout and "trailing data: 13 bytes" in verified.stdout
    assert invoke("verify", "--repair", str(path)).exit_code == 0
    assert path.stat().st_size == size


@pytest.mark.parametrize(("count", "message"), [
    (5, "num_sections at offset 26 is 5 but the section table lists 6 sections (slots 5..5 are filled"),
    (7, "num_sections at offset 26 is 7 but the section table lists 6 sections (slots 6..6 are empty)"),
])
def test_num_sections_disagreeing_with_the_table_is_reported(files, count, message):
    assert build(files, *signing_args(files)).exit_code == 0  # 6 sections: kernel cmdline metadata 2×ramdisk sig
    path = files / "app.eif"
    with EifReader.open(path) as reader:
        assert reader.header.num_sections == 6
    patched(path, 26, ">H", count)
    described = invoke("describe", str(path))
    assert described.exit_code == 0, described.output
    assert any(defect.startswith(message) for defect in json.loads(described.stdout)["Defects"])
    verified = invoke("verify", str(path), "--json")
    assert verified.exit_code == 1
    structure = json.loads(verified.stdout)["Checks"][0]
    assert structure["ok"] is False and message in structure["detail"]
    refused = invoke("verify", "--repair", str(path))
    assert refused.exit_code == 2 and "not repaired" in refused.output


def signing_args(files) -> list[str]:
    return ["--private-key", str(files / "key.pem"), "--signing-certificate", str(files / "cert.pem")]


# -- convert --check: the reference is read first and never overwritten ----------------------------


@pytest.fixture
def layout(tmp_path):
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    layer = make_tar([file("bin/app", b"#!/bin/sh\necho hi\n", mode=0o755)])
    write_oci_layout(tmp_path / "layout", [layer], default_config(cmd=["/bin/app"]))
    return f"oci:{tmp_path / 'layout'}"


def convert(*args: str):
    return invoke("convert", *args, "-q")


def test_check_refuses_an_output_that_is_the_reference(layout, tmp_path):
    assert convert(layout, "-o", str(tmp_path / "ref.eif")).exit_code == 0
    reference = (tmp_path / "ref.eif").read_bytes()
    (tmp_path / "link.eif").symlink_to(tmp_path / "ref.eif")
    os.link(tmp_path / "ref.eif", tmp_path / "hard.eif")
    for output in ("ref.eif", "link.eif", "hard.eif"):
        result = convert(layout, "-o", str(tmp_path / output), "--check", str(tmp_path / "ref.eif"))
        assert result.exit_code == 2, result.output
        assert "is the --check reference" in result.output
    assert (tmp_path / "ref.eif").read_bytes() == reference


def test_check_reference_is_validated_before_anything_is_written(layout, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    result = convert(layout, "-o", str(tmp_path / "new.eif"), "--check", str(tmp_path / "bad.json"))
    assert result.exit_code == 2 and "not valid JSON" in result.output
    assert not (tmp_path / "new.eif").exists()
    (tmp_path / "bad.eif").write_bytes(b".eif" + b"\0" * 10)
    result = convert(layout, "-o", str(tmp_path / "new.eif"), "--check", str(tmp_path / "bad.eif"))
    assert result.exit_code == 2 and "truncated or not an EIF" in result.output
    assert not (tmp_path / "new.eif").exists()


# -- SOURCE_DATE_EPOCH outside 0..2**32-1: one line, exit 2, nothing written -----------------------


@pytest.mark.parametrize("epoch", ["-1", str(1 << 32), "99999999999999999999", "soon"])
def test_source_date_epoch_out_of_range_is_one_line_exit_2(files, layout, epoch):
    env = {"SOURCE_DATE_EPOCH": epoch}
    outcomes = [
        build(files, env=env),
        invoke("convert", layout, "-o", str(files / "c.eif"), "-q", env=env),
        invoke("measure", layout, "-q", env=env),
    ]
    for result in outcomes:
        assert result.exit_code == 2, result.output
        assert result.output.count("\n") == 1 and "SOURCE_DATE_EPOCH" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (files / "app.eif").exists() and not (files / "c.eif").exists()


def test_source_date_epoch_edges_are_accepted(files):
    for epoch in ("0", str((1 << 32) - 1)):
        assert build(files, env={"SOURCE_DATE_EPOCH": epoch}).exit_code == 0


# -- sources: unknown prefixes and platforms are refused in one line -------------------------------


@pytest.mark.parametrize(("source", "message"), [
    ("containers-storage:app", "the containers-storage: source is not supported"),
    ("oci-archive:/nonexistent/x.tar", "oci-archive:/nonexistent/x.tar: no such file"),
    ("Foo:/x.tar", "is not an image reference (and Foo: is not a source prefix)"),
    ("foo:/x.tar", "is not an image reference (and foo: is not a source prefix)"),
])
def test_unknown_source_prefix_never_reaches_the_daemon(source, message):
    result = invoke("measure", source, "-q", env={"DOCKER_HOST": "tcp://127.0.0.1:9"})  # no daemon there
    assert result.exit_code == 2
    assert message in result.output and "http" not in result.output.lower()


def test_daemon_errors_carry_no_request_url():
    """The real daemon's 400 for a malformed reference, met without the reference check."""
    from qtbuild.errors import ImageError
    from qtbuild.sources.daemon_request import SaveRequest

    with pytest.raises(ImageError) as raised:
        SaveRequest("oci-archive:/tmp/x.tar").inspected()
    assert "invalid reference format" in str(raised.value) and "http" not in str(raised.value)


@pytest.mark.parametrize("platform", ["garbage", "windows/amd64", "linux/s390x", "linux/arm/v7", "linux/"])
def test_platform_that_is_not_an_enclave_platform_is_refused(layout, platform):
    result = invoke("measure", layout, "--platform", platform, "-q")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "platform" in result.output


@pytest.mark.parametrize("platform", ["linux/amd64", "amd64", "x86_64", "linux/x86_64"])
def test_enclave_platform_spellings_are_accepted(layout, platform):
    assert invoke("measure", layout, "--platform", platform, "-q").exit_code == 0


# -- extract keeps owners (as root) and setgid bits; its summary counts unpacked ramdisks ----------


def test_extract_keeps_owners_and_setgid_and_counts_unpacked_ramdisks(files):
    import stat

    from qtbuild.formats.cpio import CpioArchive, CpioEntry

    entries = [
        CpioEntry(b"rootfs", stat.S_IFDIR | 0o755),
        CpioEntry(b"rootfs/shared", stat.S_IFDIR | 0o2775, uid=1000, gid=50),
        CpioEntry(b"rootfs/shared/tool", stat.S_IFREG | 0o6755, uid=0, gid=50, size=2, data=b"hi"),
        CpioEntry(b"rootfs/home", stat.S_IFREG | 0o600, uid=1000, gid=1000, size=1, data=b"x"),
    ]
    (files / "app.cpio").write_bytes(b"".join(CpioArchive(entries).chunks()))
    (files / "raw.bin").write_bytes(b"not a cpio archive")
    ramdisks = [arg for name in ("boot.cpio", "app.cpio", "raw.bin") for arg in ("--ramdisk", str(files / name))]
    result = invoke("build-eif", "--kernel", str(files / "kernel"), "--cmdline", "x", *ramdisks,
                    "-o", str(files / "app.eif"))
    assert result.exit_code == 0, result.output
    out = files / "out"
    result = invoke("extract", str(files / "app.eif"), "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    root = out / "ramdisk1" / "rootfs"
    shared, tool, home = (root / "shared").stat(), (root / "shared" / "tool").stat(), (root / "home").stat()
    assert stat.S_IMODE(shared.st_mode) == 0o2775 and stat.S_IMODE(tool.st_mode) == 0o2755  # only setuid stripped
    if os.geteuid() == 0:
        assert (shared.st_uid, shared.st_gid, tool.st_gid, home.st_uid, home.st_gid) == (1000, 50, 50, 1000, 1000)
    report = json.loads(result.stdout)
    assert report["ramdisks"][1]["stripped_setid"] == ["rootfs/shared/tool"]
    assert report["ramdisks"][1]["owners_kept"] is (os.geteuid() == 0)
    assert report["ramdisks"][2]["unpacked"] is False
    assert "and 2 unpacked ramdisks" in result.stderr  # three ramdisks, the last one is not cpio
    assert "ramdisk1: setuid bits stripped from 1 files" in result.stderr


# -- a full TMPDIR is reported naming the path ----------------------------------------------------


@pytest.fixture
def full_tmpdir(tmp_path):
    """A 64 KiB tmpfs as TMPDIR (root only: mount)."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)], check=True)
    try:
        yield tiny
    finally:
        subprocess.run(["umount", str(tiny)], check=True)


def test_full_tmpdir_while_spilling_layers_names_the_path(tmp_path, full_tmpdir):
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    layer = make_tar([file("data/blob", os.urandom(512 * 1024))])  # gzip: read through the spill store
    write_oci_layout(tmp_path / "big", [layer], default_config(cmd=["/bin/app"]), compression="gzip")
    result = run_cli("convert", f"oci:{tmp_path / 'big'}", "-q", "-o", str(tmp_path / "big.eif"),
                     env={"TMPDIR": str(full_tmpdir)})
    assert result.returncode == 2
    assert f"No space left on device: {full_tmpdir}/.qtbuild-spill-" in result.stderr
    assert os.listdir(full_tmpdir) == []
    assert not (tmp_path / "big.eif").exists()


def test_measure_of_gzip_layers_needs_no_scratch_space(tmp_path, full_tmpdir):
    """measure inflates local gzip layers again instead of spilling them: a full TMPDIR does not
    matter, and the PCRs are convert's."""
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    layers = [make_tar([file("data/blob", os.urandom(512 * 1024)), file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")]),
              make_tar([file("data/other", os.urandom(300 * 1024)), file("data/blob", b"replaced")])]
    write_oci_layout(tmp_path / "big", layers, default_config(cmd=["/bin/app"]), compression="gzip")
    measured = run_cli("measure", f"oci:{tmp_path / 'big'}", "-q", env={"TMPDIR": str(full_tmpdir)})
    assert measured.returncode == 0, measured.stderr
    assert os.listdir(full_tmpdir) == []
    converted = run_cli("convert", f"oci:{tmp_path / 'big'}", "-q", "-o", str(tmp_path / "big.eif"))
    assert converted.returncode == 0, converted.stderr
    assert json.loads(measured.stdout) == json.loads(converted.stdout)


def test_full_tmpdir_while_saving_from_the_daemon_names_the_path(full_tmpdir):
    # measure has no output directory: the save stream's scratch file (layers that arrive early) and
    # the spill store (layers read from the stream) go to TMPDIR; whichever fills it first is named
    result = run_cli("measure", "qtbuild-samples/hello:latest", "-q", env={"TMPDIR": str(full_tmpdir)})
    assert result.returncode == 2
    assert re.search(f"No space left on device: {re.escape(str(full_tmpdir))}/\\.qtbuild-spill-",
                     result.stderr), result.stderr
    assert os.listdir(full_tmpdir) == []


# -- measurement compatibility: a launch layout change is named by diff and convert --check --------


def as_layout_1(source, target) -> None:
    """``source`` as a qtbuild of launch layout 1 built it: launch.json without version, no HOME."""
    import io

    from qtbuild.formats.cpio import CpioArchive, CpioEntry, iter_archive
    from qtbuild.formats.eif import SectionType
    from qtbuild.formats.eif_writer import write_eif

    with EifReader.open(source) as reader:
        read = lambda section: reader.read_section(section, max_size=1 << 26)  # noqa: E731
        kernel = read(reader.sections_of(SectionType.KERNEL)[0])
        cmdline = read(reader.sections_of(SectionType.CMDLINE)[0])
        metadata = read(reader.metadata_section)
        bootstrap, customer = read(reader.ramdisks[0]), read(reader.ramdisks[1])
    entries = []
    for member, data in iter_archive(io.BytesIO(customer)):
        content = b"".join(bytes(chunk) for chunk in data) if member.is_file else None
        if member.path == b"launch.json":
            launch = json.loads(content)
            del launch["version"]
            launch["env"] = [item for item in launch["env"] if not item.startswith("HOME=")]
            content = (json.dumps(launch, sort_keys=True, separators=(",", ":")) + "\n").encode()
        elif member.path == b"env":
            content = b"".join(line + b"\n" for line in content.splitlines() if not line.startswith(b"HOME="))
        entries.append(CpioEntry(member.path, member.mode, member.uid, member.gid, member.mtime,
                                 len(content) if content is not None else 0, member.link_target, member.rdev, content))
    old = b"".join(CpioArchive(entries).chunks())
    write_eif(target, kernel=kernel, cmdline=cmdline, ramdisks=[bootstrap, old], metadata=metadata)


def test_diff_and_check_name_a_launch_layout_change(layout, tmp_path):
    assert convert(layout, "-o", str(tmp_path / "new.eif")).exit_code == 0
    as_layout_1(tmp_path / "new.eif", tmp_path / "old.eif")
    result = invoke("diff", str(tmp_path / "old.eif"), str(tmp_path / "new.eif"), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["LaunchLayout"] == {"A": 1, "B": 2}
    assert {"PCR0", "PCR2"} <= set(report["Measurements"]["Moved"])
    text = invoke("diff", str(tmp_path / "old.eif"), str(tmp_path / "new.eif")).stdout
    assert "launch layout version 1 -> version 2" in text
    checked = invoke("convert", layout, "--check", str(tmp_path / "old.eif"), "-q")
    assert checked.exit_code == 1
    assert "note: launch layout version 1 -> version 2" in checked.stderr
    same = invoke("diff", str(tmp_path / "new.eif"), str(tmp_path / "new.eif"), "--json")
    assert "LaunchLayout" not in json.loads(same.stdout)
    (tmp_path / "old.json").write_text(invoke("describe", str(tmp_path / "old.eif")).stdout)
    checked = invoke("convert", layout, "--check", str(tmp_path / "old.json"), "-q")
    assert checked.exit_code == 1
    assert "the rebuild uses launch layout version 2; a reference built with an earlier layout" in checked.stderr
