"""Build the CMS (RFC 5652) EnvelopedData that carries a plaintext to an attested recipient.

AWS KMS's ``CiphertextForRecipient`` shape, which Huawei's ``ciphertext_recipient`` mirrors:
one KeyTransRecipientInfo (version 2, rid = subjectKeyIdentifier = SHA-256 of the recipient's
SubjectPublicKeyInfo DER) whose key is RSAES-OAEP with SHA-256 and MGF1-SHA-256 (empty label),
wrapping a fresh AES-256 content key; the content is AES-256-CBC with PKCS#7 padding and a
random IV.  DER-encoded ``ContentInfo``; ``qtbuild.runtime.sdk.envelope`` opens it.

``asn1crypto`` provides the structures: ``cryptography``'s PKCS7 envelope builder can only do
PKCS#1 v1.5 key transport and wants a certificate, and the recipient has neither.  Sequences
that hold nested structures are assembled from their children's DER (``contents=``): built
field by field, asn1crypto re-encodes the nested algorithm identifiers on every assignment,
which costs ~3 ms an envelope instead of ~0.1 ms.
"""

from __future__ import annotations

import hashlib
import os

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CONTENT_KEY_SIZE = 32
IV_SIZE = 16

_OAEP = asymmetric_padding.OAEP(
    mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)
#: KeyEncryptionAlgorithm rsaes-oaep(sha-256, mgf1(sha-256)), encoded once.
_KEY_ENCRYPTION_ALGORITHM = cms.KeyEncryptionAlgorithm({
    "algorithm": "rsaes_oaep",
    "parameters": algos.RSAESOAEPParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
    }),
}).dump()
_VERSION_2 = core.Integer(2).dump()


def envelope(plaintext: bytes, public_key: rsa.RSAPublicKey) -> bytes:
    """The DER ContentInfo enveloping ``plaintext`` to ``public_key``."""
    content_key, iv = os.urandom(CONTENT_KEY_SIZE), os.urandom(IV_SIZE)
    content = cms.EncryptedContentInfo({
        "content_type": "data",
        "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
        "encrypted_content": _encrypt_content(content_key, iv, plaintext),
    })
    recipients = cms.RecipientInfos([_recipient_info(public_key, content_key)])
    enveloped = cms.EnvelopedData(contents=_VERSION_2 + recipients.dump() + content.dump())
    return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the key's DER SubjectPublicKeyInfo (the envelope's recipient id)."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def _recipient_info(public_key: rsa.RSAPublicKey, content_key: bytes) -> cms.RecipientInfo:
    rid = cms.RecipientIdentifier(name="subject_key_identifier",
                                  value=subject_key_identifier(public_key))
    encrypted_key = core.OctetString(public_key.encrypt(content_key, _OAEP))
    info = cms.KeyTransRecipientInfo(
        contents=_VERSION_2 + rid.dump() + _KEY_ENCRYPTION_ALGORITHM + encrypted_key.dump())
    return cms.RecipientInfo(name="ktri", value=info)


def _encrypt_content(key: bytes, iv: bytes, plaintext: bytes) -> bytes:
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(padded) + encryptor.finalize()
