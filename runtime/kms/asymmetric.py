"""Asymmetric customer keys (Huawei KMS key specs RSA_2048/3072/4096, EC_P256/EC_P384): key
generation, signing and verification, RSA-OAEP encryption, the public key — via `cryptography`.

The private key is kept as PKCS#8 DER, sealed under the master key in the store like symmetric
material.  Signing algorithms (Huawei's names): ``RSASSA_PSS_SHA_{256,384,512}``,
``RSASSA_PKCS1_V1_5_SHA_{256,384,512}`` for RSA keys, ``ECDSA_SHA_{256,384,512}`` for EC keys
(DER-encoded signatures); ``message_type`` ``DIGEST`` (the message is the hash) or ``RAW``.
Encryption (RSA keys of usage ENCRYPT_DECRYPT): ``RSAES_OAEP_SHA_1`` / ``RSAES_OAEP_SHA_256``.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from qtbuild.runtime.kms.errors import KmsError, invalid

RSA_SPECS = {"RSA_2048": 2048, "RSA_3072": 3072, "RSA_4096": 4096}
EC_SPECS = {"EC_P256": ec.SECP256R1(), "EC_P384": ec.SECP384R1()}
SPECS = (*RSA_SPECS, *EC_SPECS)
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"256": hashes.SHA256, "384": hashes.SHA384,
                                                          "512": hashes.SHA512}
SIGNING_ALGORITHMS = tuple(f"{family}_SHA_{bits}" for family in ("RSASSA_PSS", "RSASSA_PKCS1_V1_5", "ECDSA")
                           for bits in _HASHES)
ENCRYPTION_ALGORITHMS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "RSAES_OAEP_SHA_1": hashes.SHA1, "RSAES_OAEP_SHA_256": hashes.SHA256}


def is_asymmetric(spec: str) -> bool:
    return spec in RSA_SPECS or spec in EC_SPECS


def generate(spec: str) -> bytes:
    """A new private key of ``spec`` as PKCS#8 DER."""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if spec in RSA_SPECS:
        key = rsa.generate_private_key(65537, RSA_SPECS[spec])
    else:
        key = ec.generate_private_key(EC_SPECS[spec])
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private(der: bytes):
    return serialization.load_der_private_key(der, password=None)


def public_pem(der: bytes) -> str:
    """The public key as PEM SubjectPublicKeyInfo."""
    return _private(der).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def _scheme(spec: str, algorithm: str):
    family, _, bits = algorithm.rpartition("_SHA_")
    if (family == "ECDSA") != (spec in EC_SPECS):
        raise invalid("signing_algorithm", f"{algorithm} does not apply to a {spec} key")
    return family, _HASHES[bits]()


def _prepared(message: bytes, digest: hashes.HashAlgorithm, message_type: str):
    if message_type == "RAW":
        return message, digest
    if len(message) != digest.digest_size:
        raise invalid("message", f"a {digest.name} DIGEST is {digest.digest_size} bytes, not {len(message)}")
    return message, utils.Prehashed(digest)


def _rsa_padding(family: str, digest: hashes.HashAlgorithm):
    if family == "RSASSA_PSS":
        return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    return padding.PKCS1v15()


def sign(der: bytes, spec: str, algorithm: str, message: bytes, message_type: str) -> bytes:
    family, digest = _scheme(spec, algorithm)
    data, hashing = _prepared(message, digest, message_type)
    key = _private(der)
    if family == "ECDSA":
        return key.sign(data, ec.ECDSA(hashing))
    return key.sign(data, _rsa_padding(family, digest), hashing)


def verify(der: bytes, spec: str, algorithm: str, message: bytes, message_type: str, signature: bytes) -> bool:
    family, digest = _scheme(spec, algorithm)
    data, hashing = _prepared(message, digest, message_type)
    public = _private(der).public_key()
    try:
        if family == "ECDSA":
            public.verify(signature, data, ec.ECDSA(hashing))
        else:
            public.verify(signature, data, _rsa_padding(family, digest), hashing)
    except InvalidSignature:
        return False
    return True


def _oaep(algorithm: str) -> padding.OAEP:
    digest = ENCRYPTION_ALGORITHMS[algorithm]()
    return padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)


def encrypt(der: bytes, algorithm: str, plaintext: bytes) -> bytes:
    public = _private(der).public_key()
    limit = public.key_size // 8 - 2 * ENCRYPTION_ALGORITHMS[algorithm]().digest_size - 2
    if len(plaintext) > limit:
        raise invalid("plain_text", f"{algorithm} with this key takes at most {limit} bytes")
    return public.encrypt(plaintext, _oaep(algorithm))


def decrypt(der: bytes, algorithm: str, ciphertext: bytes) -> bytes:
    try:
        return _private(der).decrypt(ciphertext, _oaep(algorithm))
    except ValueError:
        raise KmsError("KMS.2201", "Invalid cipher_text: it does not decrypt with this key.") from None
