"""The envelope opener reads BER as AWS KMS writes it: AWS's published CMS vectors
(aws-nitro-enclaves-sdk-c, tests/fixtures/aws-sdk-c-cms-vectors.json, used unchanged; they carry
no private key, so they are parse tests) and BER envelopes of our own, which must decrypt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from test_kms_envelope import build

from qtbuild.runtime.sdk.envelope import EnvelopeError, open_envelope, parse_envelope

VECTORS = json.loads((Path(__file__).parent.parent / "fixtures" / "aws-sdk-c-cms-vectors.json").read_text())["vectors"]


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["test"] for vector in VECTORS])
def test_aws_published_vectors_parse(vector):
    envelope = parse_envelope(bytes.fromhex(vector["input_ber"]))
    assert envelope.encrypted_key == bytes.fromhex(vector["encrypted_key"])
    assert envelope.iv == bytes.fromhex(vector["iv"])
    assert envelope.encrypted_content == bytes.fromhex(vector["ciphertext"])


def test_aws_vector_does_not_open_with_another_key(key):
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        open_envelope(bytes.fromhex(VECTORS[0]["input_ber"]), key)


def _elements(data: bytes):
    """(tag, content) of each DER element in ``data`` (test helper: trusted input)."""
    offset = 0
    while offset < len(data):
        tag, first = data[offset], data[offset + 1]
        offset += 2
        if first & 0x80:
            count = first & 0x7F
            length = int.from_bytes(data[offset:offset + count], "big")
            offset += count
        else:
            length = first
        yield tag, data[offset:offset + length]
        offset += length


def to_ber(der: bytes, *, segment: int = 7, long_lengths: bool = False) -> bytes:
    """The same envelope in BER: every constructed element with an indefinite length, every
    octet string (and [0] IMPLICIT string) split into constructed ``segment``-byte pieces, and
    optionally non-minimal 4-byte definite lengths on primitives."""
    out = b""
    for tag, content in _elements(der):
        if tag & 0x20:
            out += bytes([tag, 0x80]) + to_ber(content, segment=segment, long_lengths=long_lengths) + b"\x00\x00"
        elif tag in (0x04, 0x80) and len(content) > segment:
            pieces = b"".join(_primitive(0x04, content[i:i + segment], long_lengths)
                              for i in range(0, len(content), segment))
            out += bytes([tag | 0x20, 0x80]) + pieces + b"\x00\x00"
        else:
            out += _primitive(tag, content, long_lengths)
    return out


def _primitive(tag: int, content: bytes, long_lengths: bool) -> bytes:
    if long_lengths:
        return bytes([tag, 0x84]) + len(content).to_bytes(4, "big") + content
    return bytes([tag, len(content)]) + content if len(content) < 0x80 else \
        bytes([tag, 0x82]) + len(content).to_bytes(2, "big") + content


@pytest.mark.parametrize("size", [0, 1, 16, 100, 4096])
@pytest.mark.parametrize("long_lengths", [False, True])
def test_ber_envelopes_of_our_own_decrypt(key, size, long_lengths):
    plaintext = os.urandom(size)
    der = build(key, plaintext)
    ber = to_ber(der, long_lengths=long_lengths)
    assert ber != der and b"\x30\x80" in ber
    assert open_envelope(ber, key) == plaintext


@pytest.mark.parametrize("mutate, message", [
    (lambda ber: ber[:-2], "end-of-contents|truncated"),
    (lambda ber: ber + b"\x00", "unexpected data|truncated"),
    (lambda ber: b"\x30\x80" * 20 + ber, "nested deeper|unexpected|truncated|OBJECT"),
    (lambda ber: b"\x04\x80" + ber, "primitive"),
])
def test_malformed_ber_is_refused(key, mutate, message):
    with pytest.raises(EnvelopeError, match=message):
        open_envelope(mutate(to_ber(build(key, b"x"))), key)
