"""Attestation documents: payload encoding, the strict payload reader, size limits, and the
NSM/QTSM request/response schema."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtbuild.formats.attestation import (
    MAX_REQUEST_SIZE,
    NITRO_KEY_ORDER,
    NITRO_LIMITS,
    PAYLOAD_KEYS,
    QINGTIAN_LIMITS,
    Attestation,
    AttestationDocument,
    DescribeNSM,
    DescribePCR,
    DocumentSyntaxError,
    ErrorCode,
    ExtendPCR,
    GetRandom,
    LockPCR,
    LockPCRs,
    ModuleError,
    check_limits,
    decode_payload,
    decode_request,
    decode_response,
    encode_error,
    encode_payload,
    encode_request,
    encode_response,
    read_document,
    sign_document,
)
from qtbuild.formats.cose import verify1
from qtbuild.formats.errors import SignatureError

from helpers import mutated
from helpers.certs import make_key

FIXTURE = Path(__file__).parent.parent / "fixtures" / "nitro-attestation-2026-02.cose.b64"


def fixture_bytes() -> bytes:
    return base64.b64decode(FIXTURE.read_text())


def sample(**changes) -> AttestationDocument:
    doc = AttestationDocument(
        module_id="i-0123456789abcdef0-enc0123456789abcdef",
        timestamp=1_770_366_258_452,
        pcrs={index: bytes([index]) * 48 for index in range(16)},
        certificate=b"\x30" * 600,
        cabundle=(b"\x31" * 500, b"\x32" * 500, b"\x33" * 500),
        user_data=b"user",
        nonce=b"\x00" * 32,
        public_key=None,
    )
    return dataclasses.replace(doc, **changes)


# --------------------------------------------------------------------------- payload encoding


def test_payload_round_trips_in_qingtian_order():
    doc = sample()
    payload = encode_payload(doc)
    assert payload[0] == 0xA9  # a definite map of exactly nine entries
    assert list(cbor2.loads(payload)) == list(PAYLOAD_KEYS)
    assert decode_payload(payload) == doc
    assert decode_payload(payload).key_order == PAYLOAD_KEYS


def test_timestamp_is_always_in_the_8_byte_form():
    payload = encode_payload(sample(timestamp=5))
    assert cbor2.dumps("timestamp") + b"\x1b" + (5).to_bytes(8, "big") in payload
    assert decode_payload(payload).timestamp == 5


def test_absent_optional_fields_are_present_as_null_and_empty_stays_empty():
    payload = cbor2.loads(encode_payload(sample(user_data=None, nonce=b"", public_key=None)))
    assert payload["user_data"] is None and payload["public_key"] is None
    assert payload["nonce"] == b""


def test_real_nitro_payload_with_indefinite_map_decodes():
    message, doc = read_document(fixture_bytes())
    assert message.payload[0] == 0xBF  # Nitro's indefinite-length map
    assert doc.key_order == NITRO_KEY_ORDER
    assert doc.module_id == "i-0761a4cbcc7632aef-enc019c320cb32f6b7a"
    assert doc.timestamp == 1_770_366_258_452
    assert sorted(doc.pcrs) == list(range(16))
    assert len(doc.cabundle) == 4 and doc.public_key is None and len(doc.nonce) == 32
    check_limits(doc, NITRO_LIMITS)


def test_indefinite_arrays_and_maps_are_accepted_anywhere():
    entries = b"".join(
        cbor2.dumps(key) + cbor2.dumps(value)
        for key, value in cbor2.loads(encode_payload(sample())).items()
        if key not in ("pcrs", "cabundle")
    )
    pairs = b"".join(cbor2.dumps(i) + cbor2.dumps(b"\x01" * 48) for i in range(2))
    pcrs = b"\xbf" + pairs + b"\xff"
    bundle = b"\x9f" + cbor2.dumps(b"\x30" * 10) + b"\xff"
    payload = (b"\xbf" + entries + cbor2.dumps("pcrs") + pcrs + cbor2.dumps("cabundle") + bundle
               + b"\xff")
    doc = decode_payload(payload)
    assert doc.pcrs == {0: b"\x01" * 48, 1: b"\x01" * 48} and doc.cabundle == (b"\x30" * 10,)


def _with(key: str, raw_value: bytes) -> bytes:
    """A payload whose ``key`` maps to the raw CBOR ``raw_value``."""
    entries = cbor2.loads(encode_payload(sample()))
    parts = [cbor2.dumps(k) + (raw_value if k == key else cbor2.dumps(v))
             for k, v in entries.items()]
    return bytes([0xA9]) + b"".join(parts)


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"", "empty"),
        (cbor2.dumps([1, 2]), "not a map"),
        (encode_payload(sample()) + b"\x00", "trailing"),
        (encode_payload(sample())[:-5], "overruns"),
        (encode_payload(sample())[:-1], "truncated"),
        (_with("module_id", b"\x7f\x61a\xff"), "unsupported initial byte"),  # indefinite text
        (_with("module_id", b"\x62\xff\xfe"), "UTF-8"),
        (_with("timestamp", b"\xc1\x1a\x00\x00\x00\x01"), "tag"),
        (_with("timestamp", b"\xf9\x3c\x00"), "initial byte"),  # half float
        (_with("timestamp", b"\xf5"), "timestamp: expected int"),  # true is no integer
        (_with("digest", cbor2.dumps(384)), "digest: expected str"),
        (_with("pcrs", cbor2.dumps({"0": b"\x00" * 48})), "pcrs"),
        (_with("cabundle", cbor2.dumps([b"x", "y"])), "cabundle"),
        (_with("nonce", cbor2.dumps("text")), "nonce: expected bytes"),
        (_with("pcrs", b"\x81" * 8 + b"\x00"), "nesting"),
        (_with("pcrs", b"\x9b" + b"\xff" * 8), "truncated"),
        (_with("certificate", b"\x5a\xff\xff\xff\xff"), "overruns"),
        (bytes([0xAA]) + encode_payload(sample())[1:] + cbor2.dumps("extra") + b"\x00",
         "unexpected key"),
        (bytes([0xA9]) + encode_payload(sample())[1:].replace(
            cbor2.dumps("digest"), cbor2.dumps("module_id"), 1), "duplicate map key"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_payload_reader_rejects(payload, problem):
    with pytest.raises(DocumentSyntaxError, match=problem):
        decode_payload(payload)


def test_missing_mandatory_key_is_named():
    entries = cbor2.loads(encode_payload(sample()))
    del entries["certificate"]
    with pytest.raises(DocumentSyntaxError, match="missing mandatory key 'certificate'"):
        decode_payload(cbor2.dumps(entries))


def test_optional_keys_may_be_absent():
    entries = cbor2.loads(encode_payload(sample()))
    for key in ("user_data", "nonce", "public_key"):
        del entries[key]
    doc = decode_payload(cbor2.dumps(entries))
    assert doc.user_data is doc.nonce is doc.public_key is None


@given(mutated([encode_payload(sample()), fixture_bytes()]))
def test_payload_reader_only_raises_its_error(data):
    with contextlib.suppress(DocumentSyntaxError):
        decode_payload(data)


# --------------------------------------------------------------------------- limits


def test_limits_accept_the_boundaries():
    check_limits(sample(user_data=b"u" * 512, nonce=b"n" * 512, public_key=b"k" * 1024,
                        cabundle=(b"c" * 4096,) * 4, certificate=b"c" * 4096,
                        module_id="m" * 127))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"user_data": b"u" * 513}, "user_data"),
        ({"nonce": b"n" * 513}, "nonce"),
        ({"public_key": b"k" * 1025}, "public_key"),
        ({"certificate": b"c" * 4097}, "certificate"),
        ({"certificate": b""}, "certificate"),
        ({"cabundle": ()}, "cabundle"),
        ({"cabundle": (b"c",) * 5}, "cabundle"),
        ({"cabundle": (b"c", b"")}, r"cabundle\[1\]"),
        ({"module_id": ""}, "module_id"),
        ({"module_id": "m" * 128}, "module_id"),
        ({"digest": "SHA256"}, "digest"),
        ({"timestamp": 0}, "timestamp"),
        ({"timestamp": 1 << 63}, "timestamp"),
        ({"pcrs": {}}, "pcrs"),
        ({"pcrs": {32: b"\x00" * 48}}, "index 32"),
        ({"pcrs": {0: b"\x00" * 47}}, "PCR0 has 47 bytes"),
    ],
)
def test_limits_reject(changes, field):
    with pytest.raises(DocumentSyntaxError, match=field):
        check_limits(sample(**changes), QINGTIAN_LIMITS)


def test_nitro_limits_differ_where_nitro_does():
    nitro_sized = sample(user_data=b"u" * 1024, nonce=b"n" * 1024, cabundle=(b"c" * 900,) * 6)
    check_limits(nitro_sized, NITRO_LIMITS)
    with pytest.raises(DocumentSyntaxError):
        check_limits(nitro_sized, QINGTIAN_LIMITS)
    with pytest.raises(DocumentSyntaxError, match="certificate"):
        check_limits(sample(certificate=b"c" * 1025), NITRO_LIMITS)


def test_sign_document_uses_es384_and_refuses_other_keys():
    key = make_key("P-384")
    message, doc = read_document(sign_document(sample(), key))
    assert message.alg == -35 and not message.tagged and doc == sample()
    verify1(message, key.public_key())
    with pytest.raises(SignatureError):
        sign_document(sample(), make_key("P-256"))


# --------------------------------------------------------------------------- request schema


@pytest.mark.parametrize(
    "request_obj, expected",
    [
        ("DescribeNSM", DescribeNSM()),
        ("GetRandom", GetRandom()),
        ({"DescribePCR": {"index": 3}}, DescribePCR(3)),
        ({"ExtendPCR": {"index": 16, "data": b"abc"}}, ExtendPCR(16, b"abc")),
        ({"LockPCR": {"index": 20}}, LockPCR(20)),
        ({"LockPCRs": {"range": 18}}, LockPCRs(tuple(range(18)))),
        ({"LockPCRs": {"range": [16, 20]}}, LockPCRs((16, 20))),
        ({"Attestation": {}}, Attestation()),
        ({"Attestation": {"user_data": b"u", "nonce": None, "public_key": b"k", "x": 1}},
         Attestation(b"u", None, b"k")),
    ],
)
def test_decode_request(request_obj, expected):
    assert decode_request(cbor2.dumps(request_obj)) == expected


@pytest.mark.parametrize(
    "request_obj, code",
    [
        (b"\xff", ErrorCode.INVALID_OPERATION),
        ("Attestation", ErrorCode.INVALID_OPERATION),
        ({"Reboot": {}}, ErrorCode.INVALID_OPERATION),
        ({"DescribePCR": {"index": 1}, "LockPCR": {"index": 1}}, ErrorCode.INVALID_OPERATION),
        ([1], ErrorCode.INVALID_OPERATION),
        ({"DescribePCR": 1}, ErrorCode.INVALID_ARGUMENT),
        ({"DescribePCR": {}}, ErrorCode.INVALID_ARGUMENT),
        ({"DescribePCR": {"index": True}}, ErrorCode.INVALID_ARGUMENT),
        ({"DescribePCR": {"index": 70000}}, ErrorCode.INVALID_ARGUMENT),
        ({"DescribePCR": {"index": 32}}, ErrorCode.INVALID_INDEX),
        ({"ExtendPCR": {"index": 16}}, ErrorCode.INVALID_ARGUMENT),
        ({"ExtendPCR": {"index": 16, "data": "text"}}, ErrorCode.INVALID_ARGUMENT),
        ({"LockPCRs": {"range": 33}}, ErrorCode.INVALID_INDEX),
        ({"LockPCRs": {"range": [1, 40]}}, ErrorCode.INVALID_INDEX),
        ({"LockPCRs": {"range": "all"}}, ErrorCode.INVALID_ARGUMENT),
        ({"Attestation": {"nonce": "text"}}, ErrorCode.INVALID_ARGUMENT),
    ],
)
def test_decode_request_errors(request_obj, code):
    data = request_obj if isinstance(request_obj, bytes) else cbor2.dumps(request_obj)
    with pytest.raises(ModuleError) as caught:
        decode_request(data)
    assert caught.value.code is code


def test_oversized_request_is_input_too_large():
    data = cbor2.dumps({"ExtendPCR": {"index": 16, "data": b"x" * MAX_REQUEST_SIZE}})
    with pytest.raises(ModuleError) as caught:
        decode_request(data)
    assert caught.value.code is ErrorCode.INPUT_TOO_LARGE


@pytest.mark.parametrize(
    "request_obj",
    [DescribeNSM(), GetRandom(), DescribePCR(5), ExtendPCR(17, b"d"), LockPCR(17),
     LockPCRs(tuple(range(32))), LockPCRs((17, 19)), Attestation(b"u", b"n", None)],
)
def test_encode_request_round_trips(request_obj):
    assert decode_request(encode_request(request_obj)) == request_obj


def test_responses():
    assert decode_response(encode_response("LockPCR")) == ("LockPCR", None)
    assert decode_response(encode_response("ExtendPCR", {"data": b"x"})) == (
        "ExtendPCR", {"data": b"x"})
    assert cbor2.loads(encode_error(ErrorCode.READ_ONLY_INDEX)) == {"Error": "ReadOnlyIndex"}
    assert decode_response(encode_error(ErrorCode.INPUT_TOO_LARGE)) == (
        "Error", {"code": ErrorCode.INPUT_TOO_LARGE})
    for bad in (b"\xff", cbor2.dumps({"Error": {"x": 1}}), cbor2.dumps([1])):
        with pytest.raises(ModuleError) as caught:
            decode_response(bad)
        assert caught.value.code is ErrorCode.INVALID_RESPONSE


@given(st.binary(max_size=64))
def test_decode_request_only_raises_module_errors(data):
    with contextlib.suppress(ModuleError):
        decode_request(data)
