"""The strict CBOR reader against RFC 8949's own examples, and its bounds and rules."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtbuild.formats.cbor import DEFINITE_ONLY, INDEFINITE_ANY, INDEFINITE_CONTAINERS, Major, decode
from qtbuild.formats.errors import CborError, CoseError

VECTORS = json.loads((Path(__file__).parent / "data" / "rfc8949_examples.json").read_text())
MALFORMED = [(label, hex_data) for label, items in VECTORS["malformed"].items() for hex_data in items]
GENERIC = {"what": "item", "max_size": 1024, "indefinite": INDEFINITE_ANY, "any_tag": True}


def expected_value(spec: object) -> object:
    """The Python value a typed JSON expectation (see the data file's "format") stands for."""
    if isinstance(spec, list):
        return [expected_value(item) for item in spec]
    if not isinstance(spec, dict):
        return spec
    if "bytes" in spec:
        return bytes.fromhex(spec["bytes"])
    if "float" in spec:
        return float(spec["float"])
    if "map" in spec:
        return {key: expected_value(value) for key, value in spec["map"]}
    if "tag" in spec:
        return cbor2.CBORTag(spec["tag"], expected_value(spec["value"]))
    if "simple" in spec:
        return cbor2.CBORSimpleValue(spec["simple"])
    assert spec == {"undefined": True}
    return cbor2.undefined


def same(actual: object, expected: object) -> bool:
    """Equality that also tells types apart (1 vs 1.0 vs True), NaN from NaN and -0.0 from 0.0."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, float):
        if math.isnan(expected):
            return math.isnan(actual)  # type: ignore[arg-type]
        return actual == expected and math.copysign(1, actual) == math.copysign(1, expected)  # type: ignore[arg-type]
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(same, actual, expected))  # type: ignore[arg-type]
    if isinstance(expected, dict):
        return list(actual) == list(expected) and all(same(actual[k], v) for k, v in expected.items())  # type: ignore[index]
    if isinstance(expected, cbor2.CBORTag):
        return actual.tag == expected.tag and same(actual.value, expected.value)  # type: ignore[attr-defined]
    return actual == expected


def test_the_vector_file_is_complete():
    assert len(VECTORS["well_formed"]) == 81  # Appendix A without RFC 7049's f818
    assert len(MALFORMED) == 94  # every item listed in Appendix F.1


@pytest.mark.parametrize("hex_data, spec", VECTORS["well_formed"], ids=[h for h, _ in VECTORS["well_formed"]])
def test_appendix_a_examples_decode_to_their_values(hex_data, spec):
    value = decode(bytes.fromhex(hex_data), **GENERIC)
    assert same(value, expected_value(spec)), value


@pytest.mark.parametrize("label, hex_data", MALFORMED, ids=[f"{h}" for _, h in MALFORMED])
def test_appendix_f_examples_are_rejected_with_an_offset(label, hex_data):
    with pytest.raises(CborError, match=r"^item: .+ at offset \d+$"):
        decode(bytes.fromhex(hex_data), **GENERIC)


@pytest.mark.parametrize(
    "hex_data, problem",
    [
        ("", "empty input"),
        ("0000", "trailing bytes at offset 1"),
        ("1c", "reserved initial byte 0x1c at offset 0"),
        ("19 01", "truncated input at offset 0"),
        ("82 01 5a ffffffff 00", "string of 4294967295 bytes overruns the input at offset 2"),
        ("9b ffffffffffffffff 00", "array of 18446744073709551615 items overruns the input at offset 0"),
        ("a1 41 00 00", "map key is not an integer or text string at offset 1"),
        ("a2 01 00 01 00", "duplicate map key 1 at offset 3"),
        ("bf 00 ff", "break in a map value position at offset 2"),
        ("81 ff", "break outside an indefinite-length item at offset 1"),
        ("9f 00", "truncated input: missing break at offset 2"),
        ("5f 61 00 ff", "not a definite string of the same type at offset 1"),
        ("62 c3 28", "text string is not UTF-8 at offset 0"),
        ("1f", "indefinite length not defined"),
        ("f8 18", "reserved two-byte simple value 24"),
    ],
)
def test_problems_are_named_with_their_offset(hex_data, problem):
    with pytest.raises(CborError, match=problem):
        decode(bytes.fromhex(hex_data.replace(" ", "")), **GENERIC)


def test_non_minimal_heads_are_well_formed():
    """QingTian documents encode small map keys as 0x19 00 01; RFC 8949 calls that well-formed."""
    data = bytes.fromhex("a2 1900 01 41 aa 1b0000000000000002 5a00000001 bb".replace(" ", ""))
    assert decode(data, what="x", max_size=64) == {1: b"\xaa", 2: b"\xbb"}
    assert decode(bytes.fromhex("3a00000000"), what="x", max_size=64) == -1


def test_size_bound_is_checked_before_decoding():
    with pytest.raises(CborError, match="x: 5 bytes exceeds the limit of 4 bytes"):
        decode(bytes.fromhex("4400000000"), what="x", max_size=4)
    with pytest.raises(CborError, match="expected bytes, got str"):
        decode("00", what="x", max_size=4)  # type: ignore[arg-type]


@pytest.mark.parametrize("major, head", [(Major.ARRAY, 0x81), (Major.MAP, None), (Major.TAG, 0xC1)])
def test_depth_counts_arrays_maps_and_tags(major, head):
    def nested(levels: int) -> bytes:
        if major is Major.MAP:
            return b"\xa1\x00" * levels + b"\x00"
        return bytes([head]) * levels + b"\x00"

    assert decode(nested(3), what="x", max_size=64, max_depth=3, any_tag=True) is not None
    with pytest.raises(CborError, match="nesting deeper than 3 at offset"):
        decode(nested(4), what="x", max_size=64, max_depth=3, any_tag=True)


def test_indefinite_lengths_are_accepted_only_for_the_named_major_types():
    array, text = bytes.fromhex("9f01ff"), bytes.fromhex("7f6161ff")
    assert decode(array, what="x", max_size=9, indefinite=INDEFINITE_CONTAINERS) == [1]
    assert decode(text, what="x", max_size=9, indefinite=INDEFINITE_ANY) == "a"
    with pytest.raises(CborError, match=r"unsupported initial byte 0x7f \(indefinite length not accepted\)"):
        decode(text, what="x", max_size=9, indefinite=INDEFINITE_CONTAINERS)
    with pytest.raises(CborError, match=r"unsupported initial byte 0x9f \(indefinite length not accepted\)"):
        decode(array, what="x", max_size=9, indefinite=DEFINITE_ONLY)


def test_tags_only_where_allowed():
    tagged = bytes.fromhex("d28100")
    assert decode(tagged, what="x", max_size=9, top_tag=18) == cbor2.CBORTag(18, [0])
    with pytest.raises(CborError, match="unexpected tag 18 at offset 0"):
        decode(tagged, what="x", max_size=9)
    with pytest.raises(CborError, match="unexpected tag 18 at offset 1"):
        decode(bytes.fromhex("81d200"), what="x", max_size=9, top_tag=18)


def test_floats_and_simple_values_can_be_refused():
    assert decode(bytes.fromhex("83f4f5f6"), what="x", max_size=9, floats_and_simple=False) == [False, True, None]
    for hex_data in ("f93c00", "f7", "f0", "f8ff"):
        with pytest.raises(CborError, match="unsupported initial byte 0x.. \\(float or simple value\\)"):
            decode(bytes.fromhex(hex_data), what="x", max_size=9, floats_and_simple=False)


def test_the_caller_chooses_the_error_type():
    with pytest.raises(CoseError, match="^thing: trailing bytes at offset 1$"):
        decode(b"\x00\x00", what="thing", max_size=9, error=CoseError)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=20) | st.text(max_size=10)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.integers(-(2**64), 2**64 - 1) | st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_the_typed_error(data):
    with contextlib.suppress(CborError):
        decode(data, **GENERIC)


@FUZZ
@given(VALUES)
def test_what_cbor2_encodes_decodes_to_the_same_value(value):
    data = cbor2.dumps(value)
    assert same(decode(data, what="x", max_size=1 << 16, max_depth=32), value)


def test_qingtian_style_wide_pcr_keys_still_parse_as_an_attestation_payload():
    """A QingTian payload writes PCR indexes as 0x19 00 NN; the document reader must keep reading it."""
    from qtbuild.formats.attestation import AttestationDocument, decode_payload, encode_payload

    doc = AttestationDocument(module_id="i-0123-enc", timestamp=1_770_366_258_452,
                              pcrs={index: bytes([index]) * 48 for index in range(3)},
                              certificate=b"\x30" * 10, cabundle=(b"\x31" * 10,))
    narrow = b"".join(cbor2.dumps(index) + cbor2.dumps(pcr) for index, pcr in doc.pcrs.items())
    wide = b"".join(b"\x19" + index.to_bytes(2, "big") + cbor2.dumps(pcr) for index, pcr in doc.pcrs.items())
    payload = encode_payload(doc)
    assert narrow in payload
    assert decode_payload(payload.replace(narrow, wide)) == doc


def test_qingtian_style_protected_header_with_4_byte_heads_is_read():
    """QingTian writes the protected header {1: -35} as a1 1a00000001 3a00000022 (11 bytes)."""
    from qtbuild.formats.cose import decode_sign1

    protected = bytes.fromhex("a11a000000013a00000022")
    signature = b"\x01" * 96
    message = b"\x84" + cbor2.dumps(protected) + b"\xa0" + cbor2.dumps(b"payload") + cbor2.dumps(signature)
    decoded = decode_sign1(message)
    assert decoded.alg == -35 and decoded.protected == protected and decoded.payload == b"payload"
