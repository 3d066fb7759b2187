"""EIF container: writer, reader, measurements and CRC, checked against an independent model."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtbuild.formats.crc32 import crc32_combine
from qtbuild.formats.eif import HEADER_SIZE, EifReader, SectionType
from qtbuild.formats.eif_metadata import BuildInfo, EifMetadata, parse_metadata
from qtbuild.formats.eif_writer import BytesSource, FileSource, write_eif
from qtbuild.formats.errors import EifFormatError
from qtbuild.formats.measure import EMPTY_PCR2, Measurements, PcrHashers, extend

SPEC_EMPTY_PCR2 = (
    "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c"
    "10edb30948c90ba67310f7b964fc500a"
)


# -- an independent model of the format (struct + hashlib + zlib only) -------------------------


def model_parse(data: bytes) -> list[tuple[int, bytes]]:
    """Walk sections sequentially from offset 548, as aws-nitro-enclaves-image-format does."""
    sections, position = [], 548
    while position < len(data):
        kind, _flags, size = struct.unpack_from(">HHQ", data, position)
        sections.append((kind, data[position + 12 : position + 12 + size]))
        position += 12 + size
    return sections


def model_pcrs(data: bytes) -> dict[str, str]:
    image, boot, app = hashlib.sha384(), hashlib.sha384(), hashlib.sha384()
    ramdisks = 0
    for kind, payload in model_parse(data):
        if kind in (1, 2):
            image.update(payload)
            boot.update(payload)
        elif kind == 3:
            image.update(payload)
            (boot if ramdisks == 0 else app).update(payload)
            ramdisks += 1

    def ext(h) -> str:
        return hashlib.sha384(b"\0" * 48 + h.digest()).hexdigest()

    return {"PCR0": ext(image), "PCR1": ext(boot), "PCR2": ext(app)}


def model_crc(data: bytes) -> int:
    return zlib.crc32(data[:544] + data[548:])


def build(tmp_path, **overrides) -> tuple[bytes, object]:
    args = dict(
        kernel=b"\x7fELF-kernel" * 37,
        cmdline="  reboot=k console=ttyS0  ",
        ramdisks=[b"bootstrap" * 50, os.urandom(700_000)],
        metadata=b'{"ImageName":"t"}',
    )
    args.update(overrides)
    path = tmp_path / "out.eif"
    result = write_eif(path, **args)
    return path.read_bytes(), result


# -- measurements ------------------------------------------------------------------------------


def test_empty_pcr2_matches_spec_constant():
    assert EMPTY_PCR2.hex() == SPEC_EMPTY_PCR2


def test_extend_is_sha384_of_zero_pcr_and_digest():
    digest = hashlib.sha384(b"abc").digest()
    assert extend(digest) == hashlib.sha384(bytes(48) + digest).digest()


def test_output_shapes():
    m = Measurements(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48)
    assert m.nitro() == {
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "01" * 48, "PCR1": "02" * 48, "PCR2": "03" * 48}
    }
    assert m.qingtian() == {"digest": "SHA384", "PCR0": "01" * 48, "PCR8": "0" * 96}
    assert list(m.qingtian(with_pcr1_pcr2=True)) == ["digest", "PCR0", "PCR1", "PCR2", "PCR8"]


def test_single_ramdisk_gives_empty_pcr2(tmp_path):
    data, result = build(tmp_path, ramdisks=[b"only-bootstrap"])
    assert result.measurements.pcr2.hex() == SPEC_EMPTY_PCR2
    assert model_pcrs(data)["PCR2"] == SPEC_EMPTY_PCR2


# -- writer ------------------------------------------------------------------------------------


def test_writer_matches_independent_model(tmp_path):
    data, result = build(tmp_path)
    assert result.measurements.as_hex() == model_pcrs(data)
    assert result.crc32 == model_crc(data) == struct.unpack_from(">I", data, 544)[0]
    assert result.size == len(data)
    kinds = [kind for kind, _ in model_parse(data)]
    assert kinds == [1, 2, 5, 3, 3]  # nitro-cli order: kernel, cmdline, metadata, ramdisks
    magic, version, flags, mem, cpus, _reserved, count = struct.unpack_from(">4sHHQQHH", data)
    assert (magic, version, flags, mem, cpus, count) == (b".eif", 4, 0, 1 << 30, 2, 5)


def test_cmdline_trimmed_without_nul(tmp_path):
    data, _ = build(tmp_path)
    assert model_parse(data)[1] == (2, b"reboot=k console=ttyS0")


def test_header_offsets_and_sizes(tmp_path):
    data, result = build(tmp_path)
    offsets = struct.unpack_from(">32Q", data, 28)
    sizes = struct.unpack_from(">32Q", data, 284)
    assert list(offsets[:5]) == [s.offset for s in result.sections]
    assert list(sizes[:5]) == [s.size for s in result.sections]
    assert offsets[0] == HEADER_SIZE and not any(offsets[5:]) and not any(sizes[5:])


def test_aarch64_flag(tmp_path):
    data, _ = build(tmp_path, arch="arm64")
    assert struct.unpack_from(">H", data, 6)[0] == 1
    with EifReader.from_bytes(data) as reader:
        assert reader.arch == "aarch64"


def test_same_input_same_bytes(tmp_path):
    ramdisk = os.urandom(300_000)
    first, _ = build(tmp_path, ramdisks=[b"b", ramdisk])
    second, _ = build(tmp_path, ramdisks=[b"b", ramdisk])
    assert first == second


def test_streaming_file_source_equals_bytes(tmp_path):
    payload = os.urandom(3 * (1 << 20) + 12345)  # several chunks, parallel path
    (tmp_path / "rd").write_bytes(payload)
    from_file, a = build(tmp_path, ramdisks=[b"b", FileSource.from_path(tmp_path / "rd")])
    from_bytes, b = build(tmp_path, ramdisks=[b"b", payload])
    assert from_file == from_bytes and a.measurements == b.measurements
    assert a.measurements.as_hex() == model_pcrs(from_file)


class _FailingSource:
    size = 10 << 20

    def chunks(self):
        yield bytes(1 << 20)
        raise OSError("disk on fire")


class _InterruptingSource(_FailingSource):
    def chunks(self):
        yield bytes(1 << 20)
        raise KeyboardInterrupt


class _ShortSource(_FailingSource):
    def chunks(self):
        yield bytes(1 << 20)


@pytest.mark.parametrize("source, error", [
    (_FailingSource(), OSError), (_InterruptingSource(), KeyboardInterrupt), (_ShortSource(), EifFormatError),
])
def test_failed_write_leaves_nothing_behind(tmp_path, source, error):
    target = tmp_path / "app.eif"
    target.write_bytes(b"previous image")
    with pytest.raises(error):
        write_eif(target, kernel=b"k", cmdline="c", ramdisks=[b"b", source], metadata=b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.eif"]
    assert target.read_bytes() == b"previous image"


def test_write_requires_a_ramdisk(tmp_path):
    with pytest.raises(EifFormatError):
        write_eif(tmp_path / "x.eif", kernel=b"k", cmdline="c", ramdisks=[], metadata=b"{}")
    assert not list(tmp_path.iterdir())


# -- reader ------------------------------------------------------------------------------------


def test_reader_round_trip(tmp_path):
    data, result = build(tmp_path)
    with EifReader.open(tmp_path / "out.eif") as reader:
        assert [s.type for s in reader.sections] == [
            SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA, SectionType.RAMDISK, SectionType.RAMDISK,
        ]
        assert reader.contiguous and reader.notes == []
        check = reader.check_stream()
        assert check.crc_ok and check.measurements == result.measurements
        assert check.section_sha384 == [hashlib.sha384(payload).digest() for _, payload in model_parse(data)]
        assert reader.read_section(reader.ramdisks[0], max_size=1 << 20) == b"bootstrap" * 50
        assert b"".join(bytes(c) for c in reader.iter_section(reader.ramdisks[1], 4096)) == model_parse(data)[4][1]
        window = reader.section_reader(reader.sections[0])
        assert window.read() == b"\x7fELF-kernel" * 37


def test_reader_detects_bad_crc(tmp_path):
    data, _ = build(tmp_path)
    corrupted = bytearray(data)
    corrupted[-1] ^= 0xFF
    check = EifReader.from_bytes(bytes(corrupted)).check_stream()
    assert not check.crc_ok


def test_read_section_refuses_large_sections(tmp_path):
    data, _ = build(tmp_path)
    reader = EifReader.from_bytes(data)
    with pytest.raises(EifFormatError, match="refusing to load"):
        reader.read_section(reader.ramdisks[1], max_size=1024)


def _duplicate_slot(data: bytes, source: int, target: int) -> bytes:
    """Point table slot ``target`` at the same section as slot ``source``."""
    offset = struct.unpack_from(">Q", data, 28 + 8 * source)[0]
    size = struct.unpack_from(">Q", data, 284 + 8 * source)[0]
    return _patch(_patch(data, 28 + 8 * target, ">Q", offset), 284 + 8 * target, ">Q", size)


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[:100], "needs 548"),
        (lambda d: b"EIF." + d[4:], "magic"),
        (lambda d: _patch(d, 4, ">H", 2), "version"),
        (lambda d: _patch(d, 26, ">H", 1), "num_sections"),
        (lambda d: _patch(d, 26, ">H", 33), "num_sections"),
        (lambda d: _patch(d, 28, ">Q", 10), "header"),
        (lambda d: _patch(d, 284, ">Q", 2**63), "section_sizes"),
        (lambda d: _patch(d, 548, ">H", 9), "type 9"),
        (lambda d: _patch(d, 548, ">H", 0), "type 0"),
        (lambda d: d[:-10], "beyond the end"),
        (lambda d: _duplicate_slot(d, source=1, target=2), "overlaps"),
    ],
)
def test_reader_rejects_malformed(tmp_path, mutate, message):
    data, _ = build(tmp_path)
    with pytest.raises(EifFormatError, match=message):
        EifReader.from_bytes(mutate(data))


def test_huge_declared_section_rejected_without_allocating(tmp_path):
    data, _ = build(tmp_path)
    ramdisk_slot = 4
    offset = struct.unpack_from(">Q", data, 28 + 8 * ramdisk_slot)[0]
    patched = _patch(_patch(data, 284 + 8 * ramdisk_slot, ">Q", 2**63), offset + 4, ">Q", 2**63)
    with pytest.raises(EifFormatError, match="beyond the end"):
        EifReader.from_bytes(patched)


def _hand_made(sections: list[tuple[int, bytes]], gap: int = 0) -> bytes:
    """Build an EIF by hand (independent of the writer), optionally with a gap before section 1."""
    body, records, offsets, position = b"", b"", [], 548
    for index, (kind, payload) in enumerate(sections):
        if index == 1:
            body += b"\0" * gap
            position += gap
        offsets.append(position)
        record = struct.pack(">HHQ", kind, 0, len(payload)) + payload
        body += record
        records += record
        position += len(record)
    header = struct.pack(
        ">4sHHQQHH32Q32QI", b".eif", 4, 0, 1 << 30, 2, 0, len(sections),
        *(offsets + [0] * (32 - len(offsets))),
        *([len(p) for _, p in sections] + [0] * (32 - len(sections))), 0,
    )
    return header + struct.pack(">I", zlib.crc32(header + records)) + body


def test_reader_counts_and_order():
    with pytest.raises(EifFormatError, match="2 kernel"):
        EifReader.from_bytes(_hand_made([(1, b"k"), (1, b"k"), (2, b"c")]))
    with pytest.raises(EifFormatError, match="0 cmdline"):
        EifReader.from_bytes(_hand_made([(1, b"k"), (3, b"r")]))
    with pytest.raises(EifFormatError, match="before the kernel"):
        EifReader.from_bytes(_hand_made([(3, b"r"), (1, b"k"), (2, b"c")]))
    with pytest.raises(EifFormatError, match="2 signature"):
        EifReader.from_bytes(_hand_made([(1, b"k"), (2, b"c"), (4, b"s"), (4, b"s")]))
    with pytest.raises(EifFormatError, match="signature section"):
        EifReader.from_bytes(_hand_made([(1, b"k"), (2, b"c"), (4, b"s" * 40000)]))


def test_reader_reports_non_contiguous_file():
    data = _hand_made([(1, b"kernel"), (2, b"cmd"), (3, b"ramdisk")], gap=7)
    reader = EifReader.from_bytes(data)
    assert not reader.contiguous
    assert any("7 unused bytes" in note for note in reader.notes)
    check = reader.check_stream()
    assert check.crc_ok  # CRC covers headers and data in file order, not the gap
    assert check.measurements.pcr0 == extend(hashlib.sha384(b"kernelcmdramdisk").digest())


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture is a factory
@given(st.data())
def test_mutated_images_only_raise_format_errors(tmp_path_factory, data):
    base = _hand_made([(1, b"K" * 20), (2, b"console"), (5, b"{}"), (3, b"R" * 30), (3, b"A" * 25)])
    mutated = bytearray(base)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    candidate = bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated)
    try:
        reader = EifReader.from_bytes(candidate)
        reader.check_stream()
        for section in reader.sections:
            reader.read_section(section, max_size=1 << 16)
    except EifFormatError:
        pass


@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_format_errors(blob):
    with contextlib.suppress(EifFormatError):
        EifReader.from_bytes(blob).check_stream()


# -- metadata ----------------------------------------------------------------------------------


def test_metadata_serialised_like_serde_json():
    metadata = EifMetadata(
        image_name="hello",
        image_version="1.0",
        build=BuildInfo("2024-01-01T00:00:00+00:00", "qtbuild", "0.1.0", "Linux", "local"),
        docker_info={"b": {"z": 1, "a": [True, None]}, "a": "ü\n"},
        custom={"y": 1, "x": 2},
    )
    assert metadata.to_bytes() == (
        '{"ImageName":"hello","ImageVersion":"1.0","BuildMetadata":{"BuildTime":"2024-01-01T00:00:00+00:00",'
        '"BuildTool":"qtbuild","BuildToolVersion":"0.1.0","OperatingSystem":"Linux","KernelVersion":"local"},'
        '"DockerInfo":{"a":"ü\\n","b":{"a":[true,null],"z":1}},"CustomMetadata":{"x":2,"y":1}}'
    ).encode()
    encoded = EifMetadata("a", "b", BuildInfo("t", "x", "1", "os", "k")).to_bytes()
    assert encoded.endswith(b',"DockerInfo":{},"CustomMetadata":null}')


@pytest.mark.parametrize("blob", [b"\xff", b"[1]", b"{" * 100000, b'{"ImageName": 3}', b"x" * (2 << 20)])
def test_metadata_parse_errors(blob):
    with pytest.raises(EifFormatError):
        parse_metadata(blob)


# -- crc32_combine -----------------------------------------------------------------------------


@given(st.binary(max_size=300), st.binary(max_size=3000))
def test_crc32_combine(a, b):
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_pcr_hashers_targets():
    hashers = PcrHashers()
    assert hashers.targets("metadata") == [] and hashers.targets("signature") == []
    assert hashers.targets("ramdisk")[1] is hashers.bootstrap
    assert hashers.targets("ramdisk")[1] is hashers.application


def test_bytes_source_chunks_cover_data():
    data = os.urandom((1 << 20) * 2 + 5)
    assert b"".join(bytes(c) for c in BytesSource(data).chunks()) == data
    assert b"".join(bytes(c) for c in FileSource(io.BytesIO(data), len(data)).chunks()) == data


def test_section_digests_with_several_customer_ramdisks(tmp_path):
    big = os.urandom(600_000)  # above the parallel threshold
    data, result = build(tmp_path, ramdisks=[b"boot", big, big[::-1], b"tail"])
    check = EifReader.from_bytes(data).check_stream()
    assert check.measurements == result.measurements
    assert check.measurements.as_hex() == model_pcrs(data)
    assert check.section_sha384 == [hashlib.sha384(payload).digest() for _, payload in model_parse(data)]


def test_a_pcr_value_with_blanks_inside_is_refused_not_read_as_fewer_bytes():
    # bytes.fromhex skips blanks: 96 characters with 32 of them blanks used to parse as 32 bytes
    from qtbuild.formats.errors import FormatError
    from qtbuild.formats.measure import parse_pcr_hex

    assert parse_pcr_hex(" " + "Ab" * 48 + "\n") == b"\xab" * 48
    for bad in ("ab" * 16 + " " * 32 + "ab" * 16, "ab" * 47 + "\tb", "zz" * 48):
        with pytest.raises(FormatError, match="--pcr0 is not hexadecimal"):
            parse_pcr_hex(bad, "--pcr0")
