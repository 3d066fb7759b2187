"""Build the CMS (RFC 5652) EnvelopedData that carries a plaintext to an attested recipient.

AWS KMS's ``CiphertextForRecipient`` shape, which Huawei's ``ciphertext_recipient`` mirrors
(Huawei does not publish its format): one KeyTransRecipientInfo (version 2, rid =
subjectKeyIdentifier = SHA-256 of the recipient's SubjectPublicKeyInfo DER) whose key is
RSAES-OAEP with SHA-256 and MGF1-SHA-256 (empty label), wrapping a fresh AES-256 content key;
the content is AES-256-CBC with PKCS#7 padding and a random IV.  ``qtbuild.runtime.sdk.envelope``
opens it.

The bytes are BER exactly as AWS KMS writes them (AWS's published CMS test vector,
``test_cms_parsing_correctness`` in aws-nitro-enclaves-sdk-c, docs/kms.md)::

    30 80  ContentInfo                          indefinite
      06 09  id-envelopedData
      a0 80  [0] EXPLICIT                       indefinite
        30 80  EnvelopedData                    indefinite
          02 01 02  version 2
          31 82 ….  RecipientInfos SET          definite (2-byte length)
            30 82 ….  KeyTransRecipientInfo     definite (2-byte length)
              02 01 02  version 2
              80 20 …   [0] subjectKeyIdentifier (32 bytes)
              30 3c …   rsaesOAEP { [0] sha256 NULL, [1] mgf1 { sha256 NULL } }
              04 82 ….  encryptedKey            (modulus-size bytes)
          30 80  EncryptedContentInfo           indefinite
            06 09  id-data
            30 1d  { aes256-CBC, 04 10 IV }
            a0 80  [0] IMPLICIT encryptedContent, constructed, indefinite
              04 …   one OCTET STRING segment   definite (minimal length)
            00 00
          00 00
        00 00
      00 00
    00 00

Everything but the four variable fields is a fixed template, so building an envelope is two
AES/RSA operations and a few byte joins (an ASN.1 library took ~0.3 ms per reply on the
decrypt path).  AWS's vectors show contents of at most 48 bytes in one segment; larger
contents are written the same way (one segment), which any BER reader accepts.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CONTENT_KEY_SIZE = 32
IV_SIZE = 16
SUBJECT_KEY_IDENTIFIER_SIZE = 32

_OAEP = asymmetric_padding.OAEP(
    mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)
_END = b"\x00\x00"      # end-of-contents of an indefinite length
#: ContentInfo { id-envelopedData, [0] { EnvelopedData { version 2, …   (all indefinite)
_HEAD = bytes.fromhex("3080" "06092a864886f70d010703" "a080" "3080" "020102")
#: KeyTransRecipientInfo: version 2, then the [0] IMPLICIT subjectKeyIdentifier's tag and length
_KTRI_HEAD = bytes.fromhex("020102" "8020")
#: keyEncryptionAlgorithm rsaesOAEP(hashAlgorithm sha256, maskGenAlgorithm mgf1(sha256)), the
#: SHA-256 identifiers with NULL parameters as AWS writes them
_KEY_ENCRYPTION_ALGORITHM = bytes.fromhex(
    "303c" "06092a864886f70d010107" "302f"
    "a00f" "300d" "0609608648016503040201" "0500"
    "a11c" "301a" "06092a864886f70d010108" "300d" "0609608648016503040201" "0500")
#: EncryptedContentInfo { id-data, { aes256-CBC, then the IV's tag and length
_CONTENT_HEAD = bytes.fromhex("3080" "06092a864886f70d010701" "301d" "060960864801650304012a" "0410")
_CONTENT_OPEN = bytes.fromhex("a080")       # [0] IMPLICIT, constructed, indefinite


def envelope(plaintext: bytes, public_key: rsa.RSAPublicKey) -> bytes:
    """The BER ContentInfo enveloping ``plaintext`` to ``public_key`` (module docstring)."""
    content_key, iv = os.urandom(CONTENT_KEY_SIZE), os.urandom(IV_SIZE)
    return assemble(subject_key_identifier(public_key), public_key.encrypt(content_key, _OAEP), iv,
                    _encrypt_content(content_key, iv, plaintext))


def assemble(key_identifier: bytes, encrypted_key: bytes, iv: bytes, encrypted_content: bytes) -> bytes:
    """The envelope's bytes around its four variable fields (the template, no cryptography)."""
    if len(key_identifier) != SUBJECT_KEY_IDENTIFIER_SIZE or len(iv) != IV_SIZE:
        raise ValueError("the subject key identifier must be 32 bytes and the IV 16")
    if not 0x100 <= len(encrypted_key) <= 0x1000:     # RSA-2048 … RSA-32768: 2-byte lengths
        raise ValueError("the encrypted key must be an RSA block of 2048 to 32768 bits")
    recipient = b"".join((_KTRI_HEAD, key_identifier, _KEY_ENCRYPTION_ALGORITHM,
                          b"\x04\x82", len(encrypted_key).to_bytes(2, "big"), encrypted_key))
    recipient = b"\x30\x82" + len(recipient).to_bytes(2, "big") + recipient
    return b"".join((
        _HEAD, b"\x31\x82", len(recipient).to_bytes(2, "big"), recipient,
        _CONTENT_HEAD, iv, _CONTENT_OPEN, b"\x04", _length(len(encrypted_content)), encrypted_content,
        _END, _END, _END, _END, _END))


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the key's DER SubjectPublicKeyInfo (the envelope's recipient id)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def _length(size: int) -> bytes:
    """A definite length in its shortest form."""
    if size < 0x80:
        return bytes([size])
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _encrypt_content(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    pad = IV_SIZE - len(plaintext) % IV_SIZE        # PKCS#7 to the AES block (= IV) size
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(plaintext + bytes([pad]) * pad) + encryptor.finalize()
