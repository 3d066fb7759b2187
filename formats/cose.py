"""COSE_Sign1 (RFC 9052 §4.2) with ECDSA on P-256 / P-384 / P-521.

Wire form written by :func:`sign1` (identical to ``aws-nitro-enclaves-cose``
``CoseSign1::new(payload, &HeaderMap::new(), key).as_bytes(false)``)::

    [ bstr(protected = {1: alg}), {}, bstr(payload), bstr(signature = r ‖ s) ]

untagged; ``alg`` is chosen by the key's curve (ES256 = -7, ES384 = -35, ES512 = -36) and r, s are
big-endian, each left-padded to the curve size (32, 48, 66 bytes).  The signed bytes are the
Sig_structure ``["Signature1", bstr(protected), bstr(external_aad = h''), bstr(payload)]`` hashed
with SHA-256 / SHA-384 / SHA-512 respectively.

Readers never raise anything but :class:`~qtbuild.formats.errors.CoseError` for malformed input;
:func:`verify1` raises :class:`~qtbuild.formats.errors.SignatureError` for well-formed messages that do not
verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from qtbuild.formats import cbor
from qtbuild.formats.errors import CoseError, SignatureError

#: COSE algorithm identifier for each supported curve (cryptography's ``curve.name``).
ALG_BY_CURVE = {"secp256r1": -7, "secp384r1": -35, "secp521r1": -36}

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
DEFAULT_MAX_SIZE = 64 * 1024
#: Deepest container nesting the strict reader accepts (our structures need 3).
MAX_DEPTH = 16


@dataclass(frozen=True)
class _Algorithm:
    name: str
    curve: str
    hash: type[hashes.HashAlgorithm]
    size: int  # bytes per signature component (r or s)


_ALGORITHMS = {
    -7: _Algorithm("ES256", "secp256r1", hashes.SHA256, 32),
    -35: _Algorithm("ES384", "secp384r1", hashes.SHA384, 48),
    -36: _Algorithm("ES512", "secp521r1", hashes.SHA512, 66),
}


@dataclass(frozen=True)
class CoseSign1:
    """A decoded COSE_Sign1 message (not yet verified).

    ``protected`` is the serialized protected-header bucket exactly as received (it is signed
    byte for byte); ``alg`` the algorithm read from it; ``tagged`` whether tag 18 was present.
    """

    protected: bytes
    unprotected: dict
    payload: bytes
    signature: bytes
    alg: int
    tagged: bool


# --------------------------------------------------------------------------- strict CBOR reading


def loads_strict(
    data: bytes, *, what: str, max_size: int = DEFAULT_MAX_SIZE, top_tag: int | None = None
) -> object:
    """Decode one CBOR data item from untrusted ``data``; raise CoseError naming ``what`` otherwise.

    Accepted: exactly one well-formed item filling ``data`` (no trailing bytes), at most
    ``max_size`` bytes, definite lengths only, nesting depth ≤ MAX_DEPTH, map keys that are
    integers or text strings and unique within their map, and no tags except ``top_tag`` on the
    outermost item (returned as a ``cbor2.CBORTag``).  The reader is :func:`qtbuild.formats.cbor.decode`.
    """
    return cbor.decode(data, what=what, max_size=max_size, max_depth=MAX_DEPTH, indefinite=cbor.DEFINITE_ONLY,
                       top_tag=top_tag, error=CoseError)


# --------------------------------------------------------------------------- COSE_Sign1


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """The bytes a COSE_Sign1 signature covers: CBOR ``["Signature1", protected, aad, payload]``."""
    return cbor2.dumps(["Signature1", bytes(protected), bytes(external_aad), bytes(payload)])


def raw_to_der(raw: bytes) -> bytes:
    """Convert a COSE signature ``r ‖ s`` (big-endian, equal halves) to an ASN.1 DER ECDSA value."""
    if not raw or len(raw) % 2:
        raise ValueError(f"raw ECDSA signature must have two equal halves, got {len(raw)} bytes")
    half = len(raw) // 2
    r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    return encode_dss_signature(r, s)


def der_to_raw(der: bytes, size: int) -> bytes:
    """Convert an ASN.1 DER ECDSA signature to ``r ‖ s``, each left-padded to ``size`` bytes."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def algorithm_for_key(private_key: object) -> int:
    """The COSE alg for ``private_key``; SignatureError unless it is EC on a supported curve."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise SignatureError(
            "the signing key must be an EC private key (P-256, P-384 or P-521), "
            f"got {type(private_key).__name__}"
        )
    try:
        return ALG_BY_CURVE[private_key.curve.name]
    except KeyError:
        raise SignatureError(
            f"unsupported curve {private_key.curve.name}: use P-256, P-384 or P-521"
        ) from None


def sign1(payload: bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Sign ``payload``; return an untagged COSE_Sign1 ``[{1: alg}, {}, payload, r ‖ s]``.

    Raises SignatureError for a key that is not EC on P-256/P-384/P-521.  ECDSA is deterministic
    (RFC 6979: the nonce derives from the key and the message), so the same key and payload give
    the same bytes: a signed EIF is reproducible byte for byte.  Verifiers cannot tell the
    difference from randomized ECDSA.
    """
    alg_id = algorithm_for_key(private_key)
    alg = _ALGORITHMS[alg_id]
    protected = cbor2.dumps({HEADER_ALG: alg_id})
    der = private_key.sign(sig_structure(protected, payload), ec.ECDSA(alg.hash(), deterministic_signing=True))
    return cbor2.dumps([protected, {}, bytes(payload), der_to_raw(der, alg.size)])


def decode_sign1(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> CoseSign1:
    """Parse a COSE_Sign1 (tag 18 or untagged) without verifying it; CoseError if malformed.

    Requires exactly four elements of types (bstr, map, bstr, bstr) — a detached (nil) payload is
    not supported — a protected header carrying a supported ``alg`` (label 1), and a signature of
    exactly twice the curve size for that alg.
    """
    value = loads_strict(data, what="COSE_Sign1", max_size=max_size, top_tag=COSE_SIGN1_TAG)
    tagged = isinstance(value, cbor2.CBORTag)
    if isinstance(value, cbor2.CBORTag):
        value = value.value
    if not isinstance(value, list) or len(value) != 4:
        raise CoseError("COSE_Sign1: expected an array of 4 elements")
    protected, unprotected, payload, signature = value
    _expect_type(protected, bytes, "protected header")
    _expect_type(unprotected, dict, "unprotected header")
    _expect_type(payload, bytes, "payload")
    _expect_type(signature, bytes, "signature")
    alg = _protected_alg(protected)
    expected = 2 * _ALGORITHMS[alg].size
    if len(signature) != expected:
        raise CoseError(
            f"COSE_Sign1: {_ALGORITHMS[alg].name} signature must be {expected} bytes, "
            f"got {len(signature)}"
        )
    return CoseSign1(protected, unprotected, payload, signature, alg, tagged)


def _expect_type(value: object, kind: type, field: str) -> None:
    if type(value) is not kind:
        raise CoseError(f"COSE_Sign1: {field} must be {kind.__name__}, got {type(value).__name__}")


def _protected_alg(protected: bytes) -> int:
    """The supported ``alg`` from a serialized protected header; CoseError otherwise."""
    if not protected:
        raise CoseError("COSE_Sign1: empty protected header (no alg)")
    header = loads_strict(protected, what="COSE_Sign1 protected header")
    if not isinstance(header, dict):
        raise CoseError("COSE_Sign1: protected header is not a map")
    alg = header.get(HEADER_ALG)
    if type(alg) is not int or alg not in _ALGORITHMS:
        raise CoseError(f"COSE_Sign1: unsupported or missing alg {alg!r} in protected header")
    return alg


def verify1(
    msg: CoseSign1,
    public_key: object,
    *,
    signature_encoding: Literal["big", "little"] = "big",
) -> None:
    """Check ``msg``'s signature with ``public_key``; return None or raise SignatureError.

    Fails when the key is not EC, its curve does not match ``msg.alg``, or the signature does not
    verify.  ``signature_encoding="little"`` reads r and s as little-endian integers (each half
    byte-reversed), as QingTian documents store them.
    """
    if signature_encoding not in ("big", "little"):
        raise ValueError(f"signature_encoding must be 'big' or 'little': {signature_encoding!r}")
    alg = _ALGORITHMS[msg.alg]
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"{alg.name} needs an EC public key, got {type(public_key).__name__}")
    if public_key.curve.name != alg.curve:
        raise SignatureError(
            f"key curve {public_key.curve.name} does not match the message's alg "
            f"{alg.name} ({alg.curve})"
        )
    raw = msg.signature
    if signature_encoding == "little":
        half = len(raw) // 2
        raw = raw[:half][::-1] + raw[half:][::-1]
    try:
        public_key.verify(
            raw_to_der(raw), sig_structure(msg.protected, msg.payload), ec.ECDSA(alg.hash())
        )
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"COSE_Sign1 {alg.name} signature does not verify with the given key"
        ) from None
