"""The enclave-side envelope opener (runtime/sdk/envelope.py): round trips, and refusal of every
structural deviation — with envelopes built here by a tiny DER writer, so these tests also run
where only the SDK's own dependencies exist (Debian bookworm: cryptography 38, cbor2 5.4):

    python3 -m venv /tmp/kmsvenv
    /tmp/kmsvenv/bin/pip install cryptography==38.0.4 cbor2==5.4.6 pytest
    /tmp/kmsvenv/bin/python -m pytest -p no:cacheprovider \\
        tests/runtime/test_kms_envelope.py tests/runtime/test_kms_signing.py

The round trip with the service's builder (runtime/kms/cms.py, asn1crypto) is skipped there.
"""

from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qtbuild.runtime.sdk.envelope import (
    MAX_ENVELOPE_SIZE,
    EnvelopeError,
    decode_oid,
    open_envelope,
)

SDK = Path(__file__).resolve().parents[2] / "runtime" / "sdk"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --------------------------------------------------------------------------- a tiny DER writer


def tlv(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def oid(text: str) -> bytes:
    arcs = [int(part) for part in text.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


SHA256 = tlv(0x30, oid("2.16.840.1.101.3.4.2.1") + tlv(0x05, b""))
OAEP_PARAMS = tlv(0x30, tlv(0xA0, SHA256) + tlv(0xA1, tlv(0x30, oid("1.2.840.113549.1.1.8")
                                                          + SHA256)))


def build(key: rsa.RSAPrivateKey, plaintext: bytes, **change) -> bytes:
    """An envelope of ``plaintext``; ``change`` swaps one part for a deviation."""
    content_key = change.get("content_key", os.urandom(32))
    iv = change.get("iv", os.urandom(16))
    oaep = asymmetric_padding.OAEP(mgf=asymmetric_padding.MGF1(hashes.SHA256()),
                                   algorithm=hashes.SHA256(), label=None)
    encrypted_key = key.public_key().encrypt(content_key, oaep)
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    content = encryptor.update(padder.update(plaintext) + padder.finalize()) + encryptor.finalize()
    key_algorithm = change.get("key_algorithm",
                               tlv(0x30, oid("1.2.840.113549.1.1.7") + OAEP_PARAMS))
    recipient = tlv(0x30, tlv(0x02, b"\x02") + tlv(0x80, b"\x11" * 32) + key_algorithm
                    + tlv(0x04, encrypted_key))
    recipients = tlv(0x31, change.get("recipients", recipient))
    content_algorithm = change.get("content_algorithm",
                                   tlv(0x30, oid("2.16.840.1.101.3.4.1.42") + tlv(0x04, iv)))
    encrypted_content = tlv(0x30, oid("1.2.840.113549.1.7.1") + content_algorithm
                            + tlv(0x80, change.get("content", content)))
    enveloped = tlv(0x30, change.get("version", tlv(0x02, b"\x02")) + recipients
                    + encrypted_content + change.get("extra", b""))
    return tlv(0x30, oid(change.get("content_type", "1.2.840.113549.1.7.3"))
               + tlv(0xA0, enveloped)) + change.get("trailing", b"")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096])
def test_round_trip(key, size):
    plaintext = os.urandom(size)
    assert open_envelope(build(key, plaintext), key) == plaintext


def test_round_trip_with_the_service_builder(key):
    pytest.importorskip("asn1crypto")
    from qtbuild.runtime.kms.cms import envelope

    for size in (0, 1, 100, 4096):
        plaintext = os.urandom(size)
        assert open_envelope(envelope(plaintext, key.public_key()), key) == plaintext


def test_wrong_private_key_is_refused(key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        open_envelope(build(key, b"secret"), other)


def test_only_rsa_keys_open(key):
    with pytest.raises(TypeError):
        open_envelope(build(key, b"x"), ec.generate_private_key(ec.SECP384R1()))


# --------------------------------------------------------------------------- refusals


OTHER_OID = tlv(0x30, oid("1.2.840.113549.1.1.1") + tlv(0x05, b""))


@pytest.mark.parametrize("change, message", [
    ({"content_type": "1.2.840.113549.1.7.2"}, "ContentInfo.contentType"),
    ({"version": tlv(0x02, b"\x03")}, "EnvelopedData.version"),
    ({"key_algorithm": OTHER_OID}, "keyEncryptionAlgorithm"),
    ({"key_algorithm": tlv(0x30, oid("1.2.840.113549.1.1.7") + tlv(0x30, tlv(0xA0, tlv(
        0x30, oid("1.3.14.3.2.26"))) + tlv(0xA1, tlv(0x30, oid("1.2.840.113549.1.1.8")
                                                     + SHA256))))}, "hashAlgorithm"),
    ({"content_algorithm": tlv(0x30, oid("2.16.840.1.101.3.4.1.2") + tlv(0x04, b"i" * 16))},
     "contentEncryptionAlgorithm"),
    ({"content_algorithm": tlv(0x30, oid("2.16.840.1.101.3.4.1.42") + tlv(0x04, b"short"))},
     "IV"),
    ({"content": b"x" * 15}, "whole AES blocks"),
    ({"extra": tlv(0xA1, b"")}, "unexpected data"),
    ({"trailing": b"\x00"}, "unexpected data"),
    ({"recipients": b""}, "truncated"),
    ({"content_key": os.urandom(16)}, "content key of 16 bytes"),
])
def test_structural_deviations(key, change, message):
    with pytest.raises(EnvelopeError, match=message):
        open_envelope(build(key, b"plaintext", **change), key)


def test_two_recipients_are_refused(key):
    one = tlv(0x30, tlv(0x02, b"\x02"))
    with pytest.raises(EnvelopeError, match="unexpected data"):
        open_envelope(build(key, b"x", recipients=one + one), key)


def test_ber_lengths_are_accepted(key):
    """BER, as AWS KMS writes it (more: test_sdk_envelope_ber.py)."""
    good = build(key, b"x")
    assert good[1] == 0x82
    indefinite = b"\x30\x80" + good[4:] + b"\x00\x00"
    assert open_envelope(indefinite, key) == b"x"
    padded = b"\x30\x83\x00" + good[2:]    # 3-byte length with a leading zero
    assert open_envelope(padded, key) == b"x"
    with pytest.raises(EnvelopeError):
        open_envelope(b"\x30\x81\x05" + b"\x00" * 5, key)


def test_bad_padding_is_refused(key):
    content_key, iv = os.urandom(32), os.urandom(16)
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    unpadded = encryptor.update(b"\x00" * 16) + encryptor.finalize()
    with pytest.raises(EnvelopeError, match="padding"):
        open_envelope(build(key, b"", content_key=content_key, iv=iv, content=unpadded), key)


def test_size_and_type_bounds(key):
    with pytest.raises(EnvelopeError, match="exceeds"):
        open_envelope(b"\x30" + b"\x00" * MAX_ENVELOPE_SIZE, key)
    with pytest.raises(EnvelopeError, match="bytes"):
        open_envelope("text", key)
    for garbage in (b"", b"\x30", b"\x30\x05\x00", b"\x1f\x01\x00", b"\x04\x00"):
        with pytest.raises(EnvelopeError):
            open_envelope(garbage, key)


def test_every_truncation_and_byte_flip_raises_only_envelope_errors(key):
    good = build(key, b"attested plaintext")
    for end in range(len(good)):
        with pytest.raises(EnvelopeError):
            open_envelope(good[:end], key)
    for position in range(0, len(good), 7):
        damaged = bytearray(good)
        damaged[position] ^= 0x41
        with contextlib.suppress(EnvelopeError):
            open_envelope(bytes(damaged), key)


def test_oid_decoding():
    assert decode_oid(oid("1.2.840.113549.1.7.3")[2:]) == "1.2.840.113549.1.7.3"
    assert decode_oid(oid("2.16.840.1.101.3.4.1.42")[2:]) == "2.16.840.1.101.3.4.1.42"
    for bad in (b"", b"\x86", b"\x80\x01"):
        with pytest.raises(EnvelopeError):
            decode_oid(bad)


# --------------------------------------------------------------------------- import hygiene


@pytest.mark.parametrize("module", ["envelope.py", "kms_client.py"])
def test_sdk_modules_import_only_what_bookworm_has(module):
    """Standard library, cryptography, and relative imports of the SDK (qtbuild.runtime.sdk.vsock too)."""
    tree = ast.parse((SDK / module).read_text())
    allowed_top = {"base64", "binascii", "hashlib", "hmac", "http", "json", "os", "re", "socket", "ssl",
                   "threading", "collections", "dataclasses", "datetime", "typing", "urllib",
                   "__future__", "cryptography"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: siblings, or ..vsock
                assert node.level == 1 or node.module == "vsock", ast.dump(node)
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed_top, f"{module} imports {name}"
