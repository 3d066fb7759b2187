"""Issue 12, "Why" 7: what ``convert`` accepted or crashed on is refused at build time with a
typed error (the CLI makes it one line, exit 2: see test_corpus.py for the CLI side)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from test_corpus import CORPUS

from qtbuild.convert.metadata import MetadataError, make_metadata
from qtbuild.convert.pipeline import _created
from qtbuild.errors import ImageError
from qtbuild.formats.eif import MAX_SIGNATURE_SIZE, EifReader
from qtbuild.formats.eif_metadata import MAX_METADATA_SIZE, parse_metadata
from qtbuild.formats.eif_signature import decode_signature_section, first_certificate, load_signature
from qtbuild.formats.errors import CoseError
from qtbuild.formats.launch_record import MAX_ID, Launch, LaunchFormatError


def metadata(docker_info: object) -> bytes:
    return make_metadata(name="enclave", version="v", kernel_version="k", docker_info=docker_info)


def test_config_too_large_for_the_metadata_section_is_refused_at_build_time():
    with pytest.raises(MetadataError, match="make them smaller"):
        metadata({"Config": {"Labels": {"big": "x" * MAX_METADATA_SIZE}}})
    parse_metadata(metadata({"Config": {"Labels": {"big": "x" * (MAX_METADATA_SIZE // 2)}}}))


def test_config_nested_deeper_than_describe_reads_is_refused_at_build_time():
    def nested(depth):
        value: object = "leaf"
        for _ in range(depth):
            value = {"n": value}
        return value

    parse_metadata(metadata(nested(60)))
    with pytest.raises(MetadataError, match="nests deeper than 64"):
        metadata(nested(64))
    with pytest.raises(MetadataError):
        metadata(nested(100_000))  # deeper than json.dumps can recurse


def test_created_near_the_date_limits():
    with pytest.raises(ImageError, match="outside the dates UTC can represent"):
        _created({"created": "0001-01-01T00:00:00+01:00"})
    assert _created({"created": "9999-12-31T23:59:59-00:00"}) == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert _created({"created": "2024-01-01T01:00:00.123456789+01:00"}) == \
        datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    assert _created({"created": "garbage"}) is None


@pytest.mark.parametrize("fields, problem", [
    ({"uid": 2**64}, "uid"), ({"gid": -1}, "gid"), ({"groups": [MAX_ID + 1]}, "groups"), ({"uid": True}, "uid"),
    ({"cwd": "relative"}, "working directory"), ({"cwd": "/a\0b"}, "working directory"),
    ({"cwd": "/a/../b"}, "normalised"), ({"env": ["NOVALUE"]}, "NAME=value"), ({"env": ["=x"]}, "NAME=value"),
    ({"argv": [""]}, "program"), ({"argv": ["/a", "b\0"]}, "NUL"),
])
def test_launch_record_refuses_what_the_runtime_would(fields, problem):
    with pytest.raises(LaunchFormatError, match=problem):
        Launch(**({"argv": ["/app"], "env": ["PATH=/bin"]} | fields))
    Launch(["/app"], ["PATH=/bin", "EMPTY="], "/srv", MAX_ID, MAX_ID, [0, MAX_ID])


def test_certificate_with_an_unusual_issuer_string_tag_is_a_cose_error():
    with EifReader.open(CORPUS / "eifs" / "eif-issuer-videotex-string.eif") as reader:
        section = reader.read_section(reader.signature_section, max_size=MAX_SIGNATURE_SIZE)
    pem = decode_signature_section(section)[0][0]
    with pytest.raises(CoseError, match="cannot parse"):
        load_signature(section)
    with pytest.raises(CoseError, match="cannot parse"):
        first_certificate(pem)
    with pytest.raises(CoseError):
        load_signature(b"\x81\xa2" + b"")  # truncated: still a CoseError, never IndexError
