"""COSE_Sign1: external vectors, round trips, independent verification, strict decoding."""

from __future__ import annotations

import contextlib
import dataclasses

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from qtbuild.formats.cose import (
    ALG_BY_CURVE,
    CoseSign1,
    decode_sign1,
    der_to_raw,
    loads_strict,
    raw_to_der,
    sig_structure,
    sign1,
    verify1,
)
from qtbuild.formats.errors import CoseError, SignatureError

from helpers import mutated
from helpers.certs import make_key

CURVES = ["P-256", "P-384", "P-521"]

# --- Vectors from awslabs/aws-nitro-enclaves-cose src/sign.rs ("validated against COSE-C") -----

TEXT = (
    b"It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    b"must be in want of a wife."
)
#: Static test keys of that file, as (curve, x, y) in hex.
STATIC_KEYS = {
    "P-256": (
        ec.SECP256R1(),
        "9ff7423a1aace5f3e33dfaeda2c7744e3d15c2a4f6382386c93fa60c1bdb260c",
        "3489e6b132f36e5ece948e73bd44231a1c3d0dacf566712a44fe8a9835d5b6fe",
    ),
    "P-384": (
        ec.SECP384R1(),
        "5a829f62f2f4f095c0e922719285b4b981c677912870a413137a5d7319916fa8"
        "584a6036951d06ffeae99ca73ab1a2dc",
        "e1b76e08cb20d6afcea7423f8b49ec841dde6f210a6174750bf8136a315494224"
        "df153184557a6c29a1d7994804f604c",
    ),
    "P-521": (
        ec.SECP521R1(),
        "004365ee31a93b6e69b2c895890aaae14194cd84601bbb59587ad08ab59605227"
        "dc7b34288e6471b0f06050763b88b4fb017f279c86030b0069100401e4016a3be8a",
        "00792d772bf93cd965027df2df02d3f99ea1c4ecd18c20738ebae66854fd3afcd"
        "2ea4e902bcd37a4d2a5c639caee71513acaf7d8f7ffa11042257c5d8c6974095713",
    ),
}
#: (prefix before the payload, signature r ‖ s) per curve; P-256 carries tag 18 as d9 0012.
VECTORS = {
    "P-256": (
        "d90012" "84" "43a10126" "a104423131" "5875",
        "6e6df65489ea3b018833f5fc4f84f81b4d5efd5a09d5c62f2e92385dce31e2d1"
        "5a53a9f075e8fb39669fcd4eb522c85c9277452fa857f5fe379eddef0fab3cdd",
    ),
    "P-384": (
        "84" "44a1013822" "a104423131" "5875",
        "cd42d27632d5414e4b545c95fde6e3505b93580f4b7731d14a86523175266cde"
        "b24aff2de3364e9ceee9f9f795a01515"
        "5bc712aa2863e2aaf6078a819093fdfc7059a3f1467f64ec7e221fd163d80b3b"
        "552625cf379d1cbb9e5138ccd07a1931",
    ),
    "P-521": (
        "84" "44a1013823" "a104423131" "5875",
        "01e5ae6ae6e2e3c0b51dd162741cf99da688195cd90e65fbbee2388381323cae"
        "c91b3d0e3ac14d0b8b29a8562eb217659f27beb430a1d74f42353a2c0ac51fc23648"
        "000089eaf70950f84583a7c4792fadc696c30333f2df19488393abae316a2e17"
        "1d588765c436a2a205ad8151f3973ec0b4a7b897e4908c796f852484ae3926b3b81b",
    ),
}


def static_public_key(curve: str) -> ec.EllipticCurvePublicKey:
    ec_curve, x, y = STATIC_KEYS[curve]
    return ec.EllipticCurvePublicNumbers(int(x, 16), int(y, 16), ec_curve).public_key()


def vector_bytes(curve: str) -> bytes:
    prefix, signature = VECTORS[curve]
    size = len(signature) // 2
    return bytes.fromhex(prefix) + TEXT + bytes([0x58, size]) + bytes.fromhex(signature)


@pytest.fixture(scope="module")
def keys() -> dict[str, ec.EllipticCurvePrivateKey]:
    return {curve: make_key(curve) for curve in CURVES}


# --------------------------------------------------------------------------- external vectors


@pytest.mark.parametrize("curve", CURVES)
def test_cose_c_vectors_decode_and_verify(curve):
    msg = decode_sign1(vector_bytes(curve))
    assert msg.payload == TEXT
    assert msg.unprotected == {4: b"11"}
    assert msg.tagged == (curve == "P-256")
    assert msg.alg == {"P-256": -7, "P-384": -35, "P-521": -36}[curve]
    verify1(msg, static_public_key(curve))


def test_cose_c_vector_tampered_content_fails():
    data = bytearray(vector_bytes("P-256"))
    data[data.index(b"universally")] ^= 0x01  # 'u' -> 't', like the crate's tampered test
    with pytest.raises(SignatureError, match="does not verify"):
        verify1(decode_sign1(bytes(data)), static_public_key("P-256"))


def test_cose_c_vector_tampered_signature_fails():
    data = bytearray(vector_bytes("P-256"))
    data[-40] ^= 0x01
    with pytest.raises(SignatureError, match="does not verify"):
        verify1(decode_sign1(bytes(data)), static_public_key("P-256"))


def test_protected_header_bytes_match_the_crate():
    # aws-nitro-enclaves-cose map_serialization(): ES256/ES384/ES512 protected buckets.
    assert cbor2.dumps({1: ALG_BY_CURVE["secp256r1"]}).hex() == "a10126"
    assert cbor2.dumps({1: ALG_BY_CURVE["secp384r1"]}).hex() == "a1013822"
    assert cbor2.dumps({1: ALG_BY_CURVE["secp521r1"]}).hex() == "a1013823"


def test_sig_structure_matches_the_crate_vector():
    head = bytes.fromhex("84" "6a") + b"Signature1"
    assert sig_structure(b"", TEXT) == head + bytes.fromhex("40" "40" "5875") + TEXT
    assert sig_structure(bytes.fromhex("a10126"), TEXT) == (
        head + bytes.fromhex("43a10126" "40" "5875") + TEXT
    )


# --------------------------------------------------------------------------- sign / verify


@pytest.mark.parametrize("curve", CURVES)
def test_round_trip(keys, curve):
    data = sign1(b"payload", keys[curve])
    msg = decode_sign1(data)
    assert msg.payload == b"payload" and not msg.tagged and msg.unprotected == {}
    verify1(msg, keys[curve].public_key())


@pytest.mark.parametrize(
    "curve, protected, size",
    [("P-256", "a10126", 32), ("P-384", "a1013822", 48), ("P-521", "a1013823", 66)],
)
def test_wire_form(keys, curve, protected, size):
    data = sign1(b"xyz", keys[curve])
    header = "84" + f"{len(protected) // 2 + 0x40:02x}" + protected + "a0" + "43" + b"xyz".hex()
    assert data.hex().startswith(header)
    assert len(decode_sign1(data).signature) == 2 * size


def test_tagged_input_is_accepted(keys):
    untagged = sign1(b"payload", keys["P-384"])
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(untagged)))
    assert tagged[0] == 0xD2
    msg = decode_sign1(tagged)
    assert msg.tagged
    verify1(msg, keys["P-384"].public_key())


def test_independent_verification(keys):
    """Check sign1's output with cbor2 + cryptography only (no code under test in the check)."""
    key = keys["P-384"]
    protected, unprotected, payload, signature = cbor2.loads(sign1(b"independent", key))
    assert cbor2.loads(protected) == {1: -35} and unprotected == {} and payload == b"independent"
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    key.public_key().verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))


def test_tampered_payload_fails(keys):
    msg = decode_sign1(sign1(b"payload", keys["P-256"]))
    with pytest.raises(SignatureError, match="does not verify"):
        verify1(dataclasses.replace(msg, payload=b"payloaD"), keys["P-256"].public_key())


def test_tampered_signature_fails(keys):
    msg = decode_sign1(sign1(b"payload", keys["P-256"]))
    bad = bytes([msg.signature[0] ^ 1]) + msg.signature[1:]
    with pytest.raises(SignatureError, match="does not verify"):
        verify1(dataclasses.replace(msg, signature=bad), keys["P-256"].public_key())


def test_zero_signature_fails(keys):
    msg = decode_sign1(sign1(b"payload", keys["P-256"]))
    with pytest.raises(SignatureError, match="does not verify"):
        verify1(dataclasses.replace(msg, signature=bytes(64)), keys["P-256"].public_key())


def test_wrong_key_fails(keys):
    msg = decode_sign1(sign1(b"payload", keys["P-384"]))
    with pytest.raises(SignatureError, match="does not verify"):
        verify1(msg, make_key("P-384").public_key())


def test_key_curve_must_match_alg(keys):
    msg = decode_sign1(sign1(b"payload", keys["P-384"]))
    with pytest.raises(SignatureError, match="secp256r1 does not match .*ES384"):
        verify1(msg, keys["P-256"].public_key())


def test_non_ec_keys_are_refused():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(SignatureError, match="EC private key"):
        sign1(b"payload", rsa_key)
    msg = decode_sign1(vector_bytes("P-256"))
    with pytest.raises(SignatureError, match="needs an EC public key"):
        verify1(msg, rsa_key.public_key())


def test_unsupported_curve_is_refused():
    with pytest.raises(SignatureError, match="unsupported curve secp256k1"):
        sign1(b"payload", ec.generate_private_key(ec.SECP256K1()))


def test_little_endian_signature_encoding(keys):
    msg = decode_sign1(sign1(b"payload", keys["P-256"]))
    little = msg.signature[:32][::-1] + msg.signature[32:][::-1]
    reversed_msg = dataclasses.replace(msg, signature=little)
    verify1(reversed_msg, keys["P-256"].public_key(), signature_encoding="little")
    with pytest.raises(SignatureError):
        verify1(reversed_msg, keys["P-256"].public_key())
    with pytest.raises(ValueError):
        verify1(msg, keys["P-256"].public_key(), signature_encoding="middle")


def test_der_raw_conversions_pad_short_components():
    der = encode_dss_signature(1, 2**255)
    raw = der_to_raw(der, 32)
    assert raw == (1).to_bytes(32, "big") + (2**255).to_bytes(32, "big")
    assert raw_to_der(raw) == der
    with pytest.raises(ValueError):
        raw_to_der(b"\x01\x02\x03")


# --------------------------------------------------------------------------- strict decoding

GOOD_P256 = vector_bytes("P-256")[3:]  # untagged
PROTECTED = "43a10126"
SIG64 = "5840" + "11" * 64


@pytest.mark.parametrize(
    "hex_data, problem",
    [
        ("", "empty input"),
        ("d3" + GOOD_P256.hex(), "unexpected tag 19"),
        ("d2d2" + GOOD_P256.hex(), "unexpected tag 18 at offset 1"),
        (GOOD_P256.hex() + "00", "trailing bytes"),
        (GOOD_P256.hex()[:-2], "overruns the input"),
        ("9f" + GOOD_P256.hex()[2:] + "ff", "indefinite length"),
        ("83" + PROTECTED + "a0" + "40", "array of 4 elements"),
        ("85" + PROTECTED + "a0" + "40" + SIG64 + "40", "array of 4 elements"),
        ("a0", "array of 4 elements"),
        ("84" + "a10126" + "a0" + "40" + SIG64, "protected header must be bytes"),
        ("84" + PROTECTED + "80" + "40" + SIG64, "unprotected header must be dict"),
        ("84" + PROTECTED + "a0" + "f6" + SIG64, "payload must be bytes"),
        ("84" + PROTECTED + "a0" + "60" + SIG64, "payload must be bytes"),
        ("84" + PROTECTED + "a0" + "40" + "f6", "signature must be bytes"),
        ("84" + "40" + "a0" + "40" + SIG64, "empty protected header"),
        ("84" + "41a0" + "a0" + "40" + SIG64, "missing alg"),
        ("84" + "43a10127" + "a0" + "40" + SIG64, "unsupported or missing alg -8"),
        ("84" + "48a101654553323536" + "a0" + "40" + SIG64, "unsupported or missing alg 'ES256'"),
        ("84" + "4aa1016545533235362020" + "a0" + "40" + SIG64, "protected header: trailing"),
        ("84" + "43a1fb00" + "a0" + "40" + SIG64, "COSE_Sign1 protected header"),
        ("84" + "42a101" + "a0" + "40" + SIG64, "map of 1 pairs overruns"),
        ("84" + PROTECTED + "a0" + "40" + "19", "truncated input at offset 7"),
        ("84" + PROTECTED + "a0" + "40" + "5820" + "11" * 32, "must be 64 bytes"),
        ("84" + PROTECTED + "a20401" "0402" + "40" + SIG64, "duplicate map key 4"),
        ("84" + PROTECTED + "a1" "4104" "01" + "40" + SIG64, "not an integer or text string"),
        ("84" + PROTECTED + "a1" "01" "c11a00000000" + "40" + SIG64, "unexpected tag 1"),
        ("84" + PROTECTED + "a1" "01" + "81" * 20 + "00" + "40" + SIG64, "nesting deeper"),
        ("84" + PROTECTED + "a1" "01" "7bffffffffffffffff" + "40" + SIG64, "overruns"),
        ("84" + PROTECTED + "a1" "01" "9bffffffffffffffff" + "40" + SIG64, "overruns"),
        ("84" + PROTECTED + "a1" "01" "bbffffffffffffffff" + "40" + SIG64, "overruns"),
        ("84" + PROTECTED + "a1" "01" "62c328" + "40" + SIG64, "invalid CBOR"),
        ("84" + PROTECTED + "a1" "01" "fc" + "40" + SIG64, "reserved initial byte"),
    ],
)
def test_malformed_messages_raise_cose_error(hex_data, problem):
    with pytest.raises(CoseError, match=problem):
        decode_sign1(bytes.fromhex(hex_data))


def test_size_is_bounded():
    with pytest.raises(CoseError, match="exceeds the limit of 100 bytes"):
        decode_sign1(vector_bytes("P-256"), max_size=100)


def test_non_bytes_input_is_refused():
    with pytest.raises(CoseError, match="expected bytes"):
        decode_sign1("84")  # type: ignore[arg-type]


def test_loads_strict_accepts_ordinary_items():
    assert loads_strict(bytes.fromhex("a2616101616202"), what="x") == {"a": 1, "b": 2}
    assert loads_strict(bytes.fromhex("83f4f5f6"), what="x") == [False, True, None]
    # Integer/length heads wider than necessary are still well-formed CBOR.
    assert loads_strict(bytes.fromhex("1b0000000000000001"), what="x") == 1


def test_decoded_message_is_a_value_object():
    msg = decode_sign1(vector_bytes("P-384"))
    assert isinstance(msg, CoseSign1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.alg = -7  # type: ignore[misc]


# --------------------------------------------------------------------------- fuzzing

SEEDS = [vector_bytes(curve) for curve in CURVES]


def _decode_or_cose_error(data: bytes) -> None:
    with contextlib.suppress(CoseError):
        decode_sign1(data)


@given(st.binary(max_size=300))
def test_random_bytes_only_raise_cose_error(data):
    _decode_or_cose_error(data)


@given(mutated(SEEDS))
def test_mutated_messages_only_raise_cose_error(data):
    _decode_or_cose_error(data)


# RFC 6979 appendix A.2.5: P-256, SHA-256, message "sample".
RFC6979_P256_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC6979_P256_SHA256_SAMPLE = (0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
                              0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8)


def test_sign1_is_rfc6979_deterministic_ecdsa():
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = ec.derive_private_key(RFC6979_P256_KEY, ec.SECP256R1())
    vector = key.sign(b"sample", ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    assert decode_dss_signature(vector) == RFC6979_P256_SHA256_SAMPLE  # the mode sign1 uses is RFC 6979's
    message = sign1(b"payload", key)
    assert message == sign1(b"payload", key)
    protected, _, payload, signature = cbor2.loads(message)
    expected = key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    r, s = decode_dss_signature(expected)
    assert signature == r.to_bytes(32, "big") + s.to_bytes(32, "big")
