"""An EC private key held elsewhere (a PKCS#11 token, a KMS), usable where qtbuild takes a
cryptography EC key: :func:`qtbuild.formats.eif_signature.sign_pcr0` (PCR0 → PCR8) and
:func:`qtbuild.formats.dsse.sign_envelope` (provenance).

Subclasses give the public key and :meth:`RemoteEcPrivateKey._sign_digest`; this class hashes
the data locally (the holder signs a digest) and refuses what a key that never leaves its holder
cannot do.  A holder chooses its own ECDSA nonces: its signatures are valid but not
deterministic, even when the caller asks for RFC 6979.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from qtbuild.formats.errors import SignatureError


class RemoteEcPrivateKey(ec.EllipticCurvePrivateKey):
    """The parts shared by keys that stay with their holder; ``_public`` is set by subclasses."""

    _public: ec.EllipticCurvePublicKey
    #: How messages name the key's kind ("a PKCS#11", "a KMS").
    holder = "a remote"

    def _sign_digest(self, digest: bytes) -> bytes:
        """The DER ECDSA signature of ``digest`` (SHA-256/384/512, told apart by length) by the holder."""
        raise NotImplementedError

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """DER ECDSA signature of ``data`` made by the holder (the digest is computed here)."""
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            return self._sign_digest(bytes(data))
        hasher = hashes.Hash(algorithm)
        hasher.update(data)
        return self._sign_digest(hasher.finalize())

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise SignatureError(f"{self.holder} signing key is not used for key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise SignatureError(f"{self.holder} private key cannot be exported")

    def private_bytes(self, encoding, format, encryption_algorithm) -> bytes:
        raise SignatureError(f"{self.holder} private key cannot be exported")

    def __copy__(self) -> RemoteEcPrivateKey:
        return self

    def __deepcopy__(self, memo: dict) -> RemoteEcPrivateKey:
        return self
