"""EIF signature section: the vectors of docs/pcrs.md, sign/verify of PCR0, failure modes, strict decoding."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from qtbuild.formats.cose import decode_sign1, sign1
from qtbuild.formats.eif_signature import (
    MAX_SIGNATURE_SECTION,
    SignatureInfo,
    decode_signature_section,
    encode_signature_section,
    load_signature,
    pcr8_from_certificate,
    pcr_info_payload,
    sign_pcr0,
    verify_signature,
)
from qtbuild.formats.errors import CoseError, SignatureError

from helpers import mutated
from helpers.certs import make_certificate, make_key, make_signer, to_pem

PCR0 = bytes(range(48))
OTHER_PCR0 = bytes(48)
NOW = datetime.now(UTC)


def cbor_byte_array(data: bytes) -> str:
    """Hex of serde_cbor's Vec<u8>: a definite array head then one shortest uint per byte."""
    head = f"98{len(data):02x}" if len(data) < 256 else f"99{len(data):04x}"
    return head + "".join(f"{b:02x}" if b < 24 else f"18{b:02x}" for b in data)


@pytest.fixture(scope="module")
def signer():
    return make_signer("P-384")


@pytest.fixture(scope="module")
def section(signer):
    key, pem = signer
    return sign_pcr0(PCR0, key, pem)


# --------------------------------------------------------------------------- vectors (docs/pcrs.md)


def test_pcr_info_payload_matches_spec_vector():
    payload = pcr_info_payload(0, PCR0)
    spec_prefix = "a26e72656769737465725f696e646578006e72656769737465725f76616c75659830000102"
    assert payload.hex().startswith(spec_prefix)
    assert payload.hex().endswith("182f")
    expected = (
        "a2" "6e" + b"register_index".hex() + "00"
        "6e" + b"register_value".hex() + "9830"
        + "".join(f"{b:02x}" for b in range(24))
        + "".join(f"18{b:02x}" for b in range(24, 48))
    )
    assert payload.hex() == expected


def test_pcr_info_payload_index_encoding():
    assert pcr_info_payload(1, b"").hex().endswith("01" "6e" + b"register_value".hex() + "80")
    assert pcr_info_payload(-1, b"").hex().startswith("a26e" + b"register_index".hex() + "20")
    for bad in (2**31, -(2**31) - 1, True):
        with pytest.raises(ValueError):
            pcr_info_payload(bad, PCR0)


SPEC_CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SPEC_SIGNATURE = bytes.fromhex("d28444a1013822a04040")


def test_signature_section_matches_spec_vector():
    section = encode_signature_section([(SPEC_CERT, SPEC_SIGNATURE)]).hex()
    assert section.startswith("81a2737369676e696e675f6365727469666963617465983b182d")
    assert section.endswith(
        "0a697369676e61747572658a18d21884184418a1011838182218a018401840"
    )
    expected = (
        "81a2" "73" + b"signing_certificate".hex() + cbor_byte_array(SPEC_CERT)
        + "69" + b"signature".hex() + "8a" "18d21884184418a1011838182218a018401840"
    )
    assert section == expected
    assert decode_signature_section(bytes.fromhex(section)) == [(SPEC_CERT, SPEC_SIGNATURE)]


def test_signature_section_layout_by_hand(signer, section):
    """Decode sign_pcr0's output with cbor2 only and check every field."""
    _, pem = signer
    [entry] = cbor2.loads(section)
    assert list(entry) == ["signing_certificate", "signature"]
    assert bytes(entry["signing_certificate"]) == pem
    protected, unprotected, payload, signature = cbor2.loads(bytes(entry["signature"]))
    assert protected == bytes.fromhex("a1013822") and unprotected == {} and len(signature) == 96
    assert payload == pcr_info_payload(0, PCR0)


# --------------------------------------------------------------------------- sign / verify


@pytest.mark.parametrize("curve, alg", [("P-256", -7), ("P-384", -35), ("P-521", -36)])
def test_sign_and_verify_round_trip(curve, alg):
    key, pem = make_signer(curve)
    info = load_signature(sign_pcr0(PCR0, key, pem))
    assert (info.register_index, info.register_value, info.alg) == (0, PCR0, alg)
    assert info.certificate_pem == pem
    verify_signature(info, PCR0)


def test_pcr8_is_extend_of_certificate_der(signer, section):
    _, pem = signer
    der = load_signature(section).certificate.public_bytes(serialization.Encoding.DER)
    expected = hashlib.sha384(bytes(48) + hashlib.sha384(der).digest()).hexdigest()
    assert load_signature(section).pcr8 == expected
    assert pcr8_from_certificate(pem) == expected
    assert pcr8_from_certificate(der) == expected


def test_certificate_chain_is_stored_whole_and_first_certificate_is_used(signer):
    key, pem = signer
    other = to_pem(make_certificate(make_key("P-256")))
    info = load_signature(sign_pcr0(PCR0, key, pem + other))
    assert info.certificate_pem == pem + other
    assert info.pcr8 == pcr8_from_certificate(pem)
    verify_signature(info, PCR0)


def test_signature_is_deterministic_and_verifies(signer):
    key, pem = signer
    first, second = sign_pcr0(PCR0, key, pem), sign_pcr0(PCR0, key, pem)
    assert first == second  # RFC 6979: same key, same PCR0, same bytes
    verify_signature(load_signature(first), PCR0)
    assert sign_pcr0(bytes(48), key, pem) != first


def _section_with(signer, *, payload: bytes | None = None, cert: bytes | None = None) -> bytes:
    key, pem = signer
    cose = sign1(payload if payload is not None else pcr_info_payload(0, PCR0), key)
    return encode_signature_section([(cert or pem, cose)])


def test_wrong_pcr0_fails(section):
    with pytest.raises(SignatureError, match="does not match the image's PCR0"):
        verify_signature(load_signature(section), OTHER_PCR0)


def test_tampered_payload_fails(section):
    info = load_signature(section)
    message = dataclasses.replace(info.message, payload=pcr_info_payload(0, OTHER_PCR0))
    tampered = dataclasses.replace(info, message=message, register_value=OTHER_PCR0)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(tampered, OTHER_PCR0)


def test_tampered_signature_fails(signer, section):
    _, pem = signer
    [(_, cose)] = decode_signature_section(section)
    cose = cose[:-1] + bytes([cose[-1] ^ 0x80])
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(load_signature(encode_signature_section([(pem, cose)])), PCR0)


def test_certificate_of_another_key_fails(signer):
    _, other_pem = make_signer("P-384")
    info = load_signature(_section_with(signer, cert=other_pem))
    with pytest.raises(SignatureError, match="does not verify under the signing certificate"):
        verify_signature(info, PCR0)


def test_certificate_on_another_curve_fails(signer):
    _, other_pem = make_signer("P-256")
    info = load_signature(_section_with(signer, cert=other_pem))
    with pytest.raises(SignatureError, match="does not match the message's alg ES384"):
        verify_signature(info, PCR0)


def test_other_register_index_fails(signer):
    info = load_signature(_section_with(signer, payload=pcr_info_payload(1, PCR0)))
    with pytest.raises(SignatureError, match="covers PCR1, expected PCR0"):
        verify_signature(info, PCR0)


def test_payload_not_encoded_like_nitro_fails(signer):
    reordered = cbor2.dumps({"register_value": list(PCR0), "register_index": 0})
    info = load_signature(_section_with(signer, payload=reordered))
    assert (info.register_index, info.register_value) == (0, PCR0)
    with pytest.raises(SignatureError, match="not encoded as nitro-cli encodes PcrInfo"):
        verify_signature(info, PCR0)


@pytest.mark.parametrize(
    "not_before, not_after, problem",
    [
        (NOW - timedelta(days=30), NOW - timedelta(days=1), "has expired"),
        (NOW + timedelta(days=1), NOW + timedelta(days=30), "is not yet valid"),
    ],
)
def test_certificate_outside_validity_fails(not_before, not_after, problem):
    key, pem = make_signer("P-384", not_before=not_before, not_after=not_after)
    info = load_signature(sign_pcr0(PCR0, key, pem))
    with pytest.raises(SignatureError, match=problem) as excinfo:
        verify_signature(info, PCR0)
    assert not_before.strftime("%Y-%m-%dT%H:%M:%S") in str(excinfo.value)
    assert not_after.strftime("%Y-%m-%dT%H:%M:%S") in str(excinfo.value)
    verify_signature(info, PCR0, check_validity=False)
    verify_signature(info, PCR0, at=not_before + (not_after - not_before) / 2)


def test_validity_instant_may_be_naive_utc(signer, section):
    info = load_signature(section)
    with pytest.raises(SignatureError, match="has expired"):
        verify_signature(info, PCR0, at=datetime(2999, 1, 1))
    verify_signature(info, PCR0, at=datetime.now(UTC).replace(tzinfo=None))


def test_rsa_key_is_refused():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = to_pem(make_certificate(key))
    with pytest.raises(SignatureError, match="must be an EC private key"):
        sign_pcr0(PCR0, key, pem)


def test_key_certificate_mismatch_is_refused(signer):
    _, pem = signer
    with pytest.raises(SignatureError, match="does not match the signing certificate"):
        sign_pcr0(PCR0, make_key("P-384"), pem)


def test_certificate_must_be_pem(signer):
    key, pem = signer
    with pytest.raises(CoseError, match="no PEM CERTIFICATE"):
        sign_pcr0(PCR0, key, b"not a certificate")
    broken = pem.replace(pem.splitlines()[3], b"A" * 64)
    with pytest.raises(CoseError, match="cannot parse"):
        sign_pcr0(PCR0, key, broken)


def test_pcr0_must_be_48_bytes(signer):
    key, pem = signer
    with pytest.raises(ValueError, match="48 bytes"):
        sign_pcr0(PCR0[:32], key, pem)


def test_pcr8_from_garbage_is_a_cose_error():
    with pytest.raises(CoseError):
        pcr8_from_certificate(b"\x30\x03\x02\x01\x01")


def test_signature_info_is_a_value_object(section):
    info = load_signature(section)
    assert isinstance(info, SignatureInfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.alg = -7  # type: ignore[misc]


# --------------------------------------------------------------------------- strict decoding

ENTRY_KEYS = "73" + b"signing_certificate".hex(), "69" + b"signature".hex()


def entry(cert: str = "8101", sig: str = "8102", extra: str = "", pairs: int = 2) -> str:
    return f"a{pairs}" + ENTRY_KEYS[0] + cert + ENTRY_KEYS[1] + sig + extra


@pytest.mark.parametrize(
    "hex_data, problem",
    [
        ("", "empty input"),
        ("ff", "reserved initial byte|indefinite"),
        ("81" + entry() + "00", "trailing bytes"),
        ("80", "non-empty array"),
        ("a0", "non-empty array"),
        ("8100", "expected a map"),
        ("81a1" + ENTRY_KEYS[0] + "8101", r"missing keys \['signature'\]"),
        ("81" + entry(extra="6178" "00", pairs=3), r"unexpected keys \['x'\]"),
        ("81" + entry(cert="4101"), "signing_certificate: expected an array"),
        ("81" + entry(sig="811901ff"), "signature: array element is not an integer 0..255"),
        ("81" + entry(sig="8120"), "not an integer 0..255"),
        ("81" + entry(sig="81f5"), "not an integer 0..255"),
        ("81" + entry(sig="8181"), "overruns|truncated"),
        ("d81281" + entry(), "unexpected tag 18"),
        ("81a2" + ENTRY_KEYS[0] + "80" + ENTRY_KEYS[0] + "80", "duplicate map key"),
        ("9f" + entry() + "ff", "indefinite"),
    ],
)
def test_malformed_sections_raise_cose_error(hex_data, problem):
    with pytest.raises(CoseError, match=problem):
        decode_signature_section(bytes.fromhex(hex_data))


def test_section_size_is_bounded():
    too_big = encode_signature_section([(b"x", b"y")])[:-1] + b"\x00" * MAX_SIGNATURE_SECTION
    with pytest.raises(CoseError, match="exceeds the limit of 32768 bytes"):
        decode_signature_section(too_big)
    with pytest.raises(CoseError, match="exceeds the limit of 32768 bytes"):
        encode_signature_section([(b"\xff" * 20000, b"")])
    with pytest.raises(CoseError, match="at least one entry"):
        encode_signature_section([])


def test_multiple_entries_decode_and_first_is_loaded(signer, section):
    _, pem = signer
    [(cert, cose)] = decode_signature_section(section)
    both = encode_signature_section([(cert, cose), (b"second", b"entry")])
    assert decode_signature_section(both)[1] == (b"second", b"entry")
    assert load_signature(both).certificate_pem == pem


@pytest.mark.parametrize(
    "payload, problem",
    [
        (cbor2.dumps({"register_index": 0, "register_value": PCR0}), "expected an array"),
        (cbor2.dumps({"register_index": 0}), "missing keys"),
        (cbor2.dumps({"register_index": 2**31, "register_value": []}), "32-bit integer"),
        (cbor2.dumps({"register_index": "0", "register_value": []}), "32-bit integer"),
        (cbor2.dumps([0, list(PCR0)]), "expected a map"),
    ],
)
def test_malformed_payload_is_a_cose_error(signer, payload, problem):
    with pytest.raises(CoseError, match=problem):
        load_signature(_section_with(signer, payload=payload))


def test_malformed_cose_inside_section_is_a_cose_error(signer):
    _, pem = signer
    with pytest.raises(CoseError, match="COSE_Sign1"):
        load_signature(encode_signature_section([(pem, b"\x84\x40\xa0\x40\x40")]))


def test_unverified_fields_come_from_the_cose_payload(section):
    info = load_signature(section)
    assert decode_sign1(decode_signature_section(section)[0][1]).payload == info.message.payload


# --------------------------------------------------------------------------- fuzzing

_KEY, _PEM = make_signer("P-256")
SEED = sign_pcr0(PCR0, _KEY, _PEM)


def _only_cose_errors(function, data: bytes) -> None:
    with contextlib.suppress(CoseError):
        function(data)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_cose_error(data):
    _only_cose_errors(decode_signature_section, data)
    _only_cose_errors(load_signature, data)


@given(mutated([SEED]))
def test_mutated_sections_only_raise_cose_error(data):
    _only_cose_errors(decode_signature_section, data)
    _only_cose_errors(load_signature, data)
