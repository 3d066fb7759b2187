"""DSSE envelopes (Dead Simple Signing Envelope, secure-systems-lab/dsse v1) with ECDSA keys.

    {"payload": base64(payload), "payloadType": TYPE, "signatures": [{"keyid": ID, "sig": base64(sig)}]}

The signature covers the pre-authentication encoding ``PAE(type, payload) = "DSSEv1" SP
LEN(type) SP type SP LEN(payload) SP payload`` (lengths as ASCII decimals), never the JSON.
``sig`` is an ASN.1 DER ECDSA signature with the curve's hash (SHA-256/384/512 for
P-256/384/521), deterministic (RFC 6979) so the same payload and key give the same envelope;
``keyid`` is the hex SHA-256 of the signer's SubjectPublicKeyInfo (a hint, not trusted).

Parsing is bounded and raises :class:`~qtbuild.formats.errors.FormatError`; a signature that does
not verify raises :class:`~qtbuild.formats.errors.SignatureError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qtbuild.formats.errors import FormatError, SignatureError

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE = 4 << 20
_HASH_BY_CURVE: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256, "secp384r1": hashes.SHA384, "secp521r1": hashes.SHA512,
}


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: list[tuple[str, bytes]]  # (keyid, DER signature)

    def to_json(self) -> bytes:
        """The envelope as compact JSON with sorted keys and a final newline (deterministic)."""
        document = {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [{"keyid": keyid, "sig": base64.b64encode(sig).decode()} for keyid, sig in self.signatures],
        }
        return (json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n").encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of ``payload``."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _hash_for(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> hashes.HashAlgorithm:
    try:
        return _HASH_BY_CURVE[key.curve.name]()
    except KeyError:
        raise SignatureError(f"unsupported curve {key.curve.name}: use P-256, P-384 or P-521") from None


def sign_envelope(payload: bytes, private_key: ec.EllipticCurvePrivateKey,
                  payload_type: str = IN_TOTO_PAYLOAD_TYPE) -> Envelope:
    """An envelope holding ``payload`` signed once with ``private_key`` (deterministic ECDSA)."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"a DSSE signing key must be an EC key, got {type(private_key).__name__}")
    algorithm = ec.ECDSA(_hash_for(private_key), deterministic_signing=True)
    signature = private_key.sign(pae(payload_type, payload), algorithm)
    return Envelope(payload_type, bytes(payload), [(key_id(private_key.public_key()), signature)])


def is_envelope(document: object) -> bool:
    return isinstance(document, dict) and "payloadType" in document and "signatures" in document


def parse_envelope(document: dict) -> Envelope:
    """An envelope from its decoded JSON (FormatError when a field is missing or malformed)."""
    payload_type, payload, signatures = document.get("payloadType"), document.get("payload"), document.get("signatures")
    if not isinstance(payload_type, str) or not isinstance(payload, str) or not isinstance(signatures, list):
        raise FormatError("DSSE envelope: payloadType and payload must be strings, signatures a list")
    if not signatures or len(signatures) > 16:
        raise FormatError(f"DSSE envelope: {len(signatures)} signatures; expected 1..16")
    parsed = []
    for entry in signatures:
        if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
            raise FormatError("DSSE envelope: each signature needs a base64 'sig' string")
        keyid = entry.get("keyid", "")
        parsed.append((keyid if isinstance(keyid, str) else "", _b64(entry["sig"], "sig")))
    return Envelope(payload_type, _b64(payload, "payload"), parsed)


def verify_envelope(envelope: Envelope, public_key: object) -> None:
    """SignatureError unless one of the envelope's signatures verifies with ``public_key``."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"the certificate's key must be an EC key, got {type(public_key).__name__}")
    message = pae(envelope.payload_type, envelope.payload)
    for _, signature in envelope.signatures:
        try:
            public_key.verify(signature, message, ec.ECDSA(_hash_for(public_key)))
            return
        except (InvalidSignature, ValueError):
            continue
    raise SignatureError("the DSSE envelope's signature does not verify with the given certificate's key")


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"DSSE envelope: {what} is not valid base64") from None
