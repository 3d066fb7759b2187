"""The recipient envelope the KMS writes (runtime/kms/cms.py) is BER shaped as AWS KMS writes
``CiphertextForRecipient`` — AWS's published vector (tests/fixtures/aws-sdk-c-cms-vectors.json)
byte for byte but for the variable fields — and opens with the SDK's opener, asn1crypto and
``openssl cms``.  (The replies of both protocols carry it: test_kms_aws.py, test_kms_huawei_sdk.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qtbuild.runtime.kms.cms import assemble, envelope, subject_key_identifier
from qtbuild.runtime.sdk.envelope import open_envelope

VECTORS = json.loads((Path(__file__).parent.parent / "fixtures" / "aws-sdk-c-cms-vectors.json").read_text())["vectors"]
AWS = VECTORS[0]    # test_cms_parsing_correctness: the reply shape KMS returns (content in a constructed [0])


@pytest.fixture(scope="module", params=[2048, 3072, 4096])
def key(request) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=request.param)


def shape(data: bytes, offset: int = 0, end: int | None = None, depth: int = 0) -> list[tuple]:
    """Each element as (depth, tag, length form, content of primitives): the length form is
    "indefinite" or the number of length octets (0: the short form).  Trusted input."""
    end = len(data) if end is None else end
    elements: list[tuple] = []
    while offset < end:
        tag, first = data[offset], data[offset + 1]
        offset += 2
        if tag == 0 and first == 0:
            elements.append((depth, "end-of-contents"))
            return elements + shape(data, offset, end, depth - 1) if depth else elements
        if first == 0x80:
            elements.append((depth, tag, "indefinite", None))
            depth += 1
            continue
        count = first & 0x7F if first & 0x80 else 0
        length = int.from_bytes(data[offset:offset + count], "big") if count else first
        offset += count
        content = data[offset:offset + length]
        elements.append((depth, tag, count, None if tag & 0x20 else content))
        if tag & 0x20:
            elements += shape(data, offset, offset + length, depth + 1)
        offset += length
    return elements


def _fields_of_the_vector() -> tuple[bytes, bytes, bytes, bytes]:
    ber = bytes.fromhex(AWS["input_ber"])
    identifier = ber[ber.index(bytes.fromhex("8020")) + 2:][:32]
    return identifier, bytes.fromhex(AWS["encrypted_key"]), bytes.fromhex(AWS["iv"]), bytes.fromhex(AWS["ciphertext"])


def test_the_template_around_aws_fields_is_aws_bytes():
    assert assemble(*_fields_of_the_vector()) == bytes.fromhex(AWS["input_ber"])


def test_envelopes_have_aws_shape_but_for_the_variable_fields():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ours = shape(envelope(os.urandom(40), key.public_key()))     # 48 bytes of content, as in the vector
    theirs = shape(bytes.fromhex(AWS["input_ber"]))
    variable = {bytes.fromhex(hex_) for hex_ in (AWS["encrypted_key"], AWS["iv"], AWS["ciphertext"])}
    variable.add(_fields_of_the_vector()[0])
    assert len(ours) == len(theirs) and ours[0][2] == "indefinite"
    for mine, aws in zip(ours, theirs, strict=True):
        if len(aws) == 4 and aws[3] in variable:
            assert mine[:3] == aws[:3] and len(mine[3]) == len(aws[3])
        else:
            assert mine == aws


def test_larger_keys_and_contents_change_only_lengths(key):
    plaintext = os.urandom(1000)
    ours = shape(envelope(plaintext, key.public_key()))
    theirs = shape(bytes.fromhex(AWS["input_ber"]))
    assert [element[:2] for element in ours] == [element[:2] for element in theirs]
    assert [element[2] for element in ours if len(element) == 4 and element[2] == "indefinite"] == ["indefinite"] * 5
    encrypted_key = [element for element in ours if element[1] == 0x04 and element[2] == 2][0][3]
    assert len(encrypted_key) == key.key_size // 8


@pytest.mark.parametrize("size", [0, 1, 16, 47, 200, 4096])
def test_the_sdk_opener_opens_it(key, size):
    plaintext = os.urandom(size)
    assert open_envelope(envelope(plaintext, key.public_key()), key) == plaintext


def test_asn1crypto_reads_it_and_its_fields_decrypt(key):
    plaintext = os.urandom(100)
    info = asn1_cms.ContentInfo.load(envelope(plaintext, key.public_key()))
    enveloped = info["content"]
    recipient = enveloped["recipient_infos"][0].chosen
    assert info["content_type"].native == "enveloped_data" and enveloped["version"].native == "v2"
    assert recipient["rid"].chosen.native == subject_key_identifier(key.public_key())
    algorithm = recipient["key_encryption_algorithm"]
    assert algorithm["algorithm"].native == "rsaes_oaep"
    assert algorithm["parameters"]["hash_algorithm"]["algorithm"].native == "sha256"
    assert algorithm["parameters"]["mask_gen_algorithm"]["parameters"]["algorithm"].native == "sha256"
    content = enveloped["encrypted_content_info"]
    assert content["content_encryption_algorithm"]["algorithm"].native == "aes256_cbc"
    content_key = key.decrypt(recipient["encrypted_key"].native, asymmetric_padding.OAEP(
        mgf=asymmetric_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(content["content_encryption_algorithm"]
                                                               ["parameters"].native)).decryptor()
    padded = decryptor.update(content["encrypted_content"].native) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    assert unpadder.update(padded) + unpadder.finalize() == plaintext


def test_openssl_cms_decrypts_it(key, tmp_path):
    plaintext = os.urandom(300)
    (tmp_path / "envelope.ber").write_bytes(envelope(plaintext, key.public_key()))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    openssl = shutil.which("openssl")       # scripts/install-system.sh installs it
    assert openssl is not None
    command = [openssl, "cms", "-decrypt", "-inform", "DER", "-binary",     # "DER" reads BER too
               "-in", str(tmp_path / "envelope.ber"), "-inkey", str(tmp_path / "key.pem")]
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == plaintext

