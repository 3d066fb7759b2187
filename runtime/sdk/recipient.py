"""The enclave's KMS "recipient" key pair: RSA-2048 whose public half goes into an attestation
document (``public_key`` = DER SubjectPublicKeyInfo) and whose private half opens the CMS
envelope KMS returns (``CiphertextForRecipient`` / ``ciphertext_recipient``).

Uses only ``cryptography`` APIs present in 38.0 (Debian bookworm's python3-cryptography).  The
key lives in memory only; generate a fresh one per enclave boot (or per request).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_SIZE = 2048
PUBLIC_EXPONENT = 65537


class RecipientKey:
    """An RSA private key (≥ 2048 bits) and its DER SubjectPublicKeyInfo.

    ``RecipientKey(private_key)`` wraps an existing ``rsa.RSAPrivateKey`` (TypeError for any
    other key, ValueError below 2048 bits); :meth:`generate` makes a new RSA-2048 key.
    """

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise TypeError(f"a recipient key is RSA, not {type(private_key).__name__}")
        if private_key.key_size < KEY_SIZE:
            raise ValueError(f"a recipient key needs ≥ {KEY_SIZE} bits, not {private_key.key_size}")
        self.private_key = private_key
        self.public_key_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls) -> RecipientKey:
        """A fresh RSA-2048 (e = 65537) key pair."""
        return cls(rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_SIZE))

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def __repr__(self) -> str:
        return f"<RecipientKey RSA-{self.private_key.key_size}>"
