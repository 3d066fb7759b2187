"""serde_json's number layout (what nitro-cli/eif_build write into the metadata section)."""

from __future__ import annotations

import pytest

from qtbuild.formats.eif_metadata import BuildInfo, EifMetadata
from qtbuild.formats.serde_json_text import NotSerdeJsonError, dumps

# Each pair: the Python value json.loads gives, and the text serde_json::to_string writes for the
# value serde_json parses from the same JSON text (ryu's layout; integers beyond u64 become f64).
SERDE_CASES = [
    (1.5e-7, "1.5e-7"),
    (1e100, "1e100"),
    (10**20, "1e20"),
    (1e20, "1e20"),
    (1e16, "1e16"),
    (1e15, "1000000000000000.0"),
    (123.45, "123.45"),
    (1.0, "1.0"),
    (0.1, "0.1"),
    (1e-5, "0.00001"),
    (1e-6, "1e-6"),
    (-2.5e-10, "-2.5e-10"),
    (-0.0, "-0.0"),
    (0.0, "0.0"),
    (1.7976931348623157e308, "1.7976931348623157e308"),
    (5e-324, "5e-324"),
    (123456789012345680.0, "1.2345678901234568e17"),
    (2**64 - 1, "18446744073709551615"),
    (-(2**63), "-9223372036854775808"),
    (-(2**63) - 1, "-9.223372036854776e18"),
    (2**64, "1.8446744073709552e19"),
]


@pytest.mark.parametrize(("value", "text"), SERDE_CASES)
def test_numbers_written_as_serde_json_does(value, text):
    assert dumps(value) == text


def test_nested_documents_sorted_and_compact():
    document = {"b": [1, 2.5e-7, None, True], "a": {"z": "ü\n", "y": False}}
    assert dumps(document) == '{"a":{"y":false,"z":"ü\\n"},"b":[1,2.5e-7,null,true]}'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1: 2}, object()])
def test_values_serde_json_cannot_write_are_refused(value):
    with pytest.raises(NotSerdeJsonError):
        dumps(value)


def test_metadata_section_custom_numbers_like_eif_build():
    build = BuildInfo("2024-01-01T00:00:00+00:00", "qtbuild", "0.1.0", "Linux", "local")
    data = EifMetadata("a", "b", build, None, {"small": 1.5e-7, "big": 1e100, "huge": 10**20}).to_bytes()
    assert data.endswith(b'"DockerInfo":null,"CustomMetadata":{"big":1e100,"huge":1e20,"small":1.5e-7}}')
