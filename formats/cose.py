"""COSE_Sign1 (RFC 9052 §4.2) with ECDSA on P-256 / P-384 / P-521, and a strict CBOR reader.

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

import io
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
    outermost item (returned as a ``cbor2.CBORTag``).  A structural pre-scan enforces all this
    before cbor2 sees the bytes, so declared lengths can never exceed the input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CoseError(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise CoseError(f"{what}: {len(data)} bytes exceeds the limit of {max_size} bytes")
    body = _Scanner(data, what, top_tag).scan()
    # The tag is stripped before cbor2 decodes: inside tags cbor2 builds tuples/frozendicts.
    stream = io.BytesIO(data[body:])
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises many types (ValueError, RecursionError, ...)
        raise CoseError(f"{what}: invalid CBOR ({type(exc).__name__}: {exc})") from exc
    if body + stream.tell() != len(data):
        raise CoseError(f"{what}: trailing bytes at offset {body + stream.tell()}")
    return cbor2.CBORTag(top_tag, value) if body and top_tag is not None else value


class _Frame:
    """An open container during a scan: how many items it still holds; map keys seen so far."""

    __slots__ = ("remaining", "keys", "key_next")

    def __init__(self, remaining: int, is_map: bool = False) -> None:
        self.remaining = remaining
        self.keys: set | None = set() if is_map else None
        self.key_next = is_map  # map items alternate key, value, key, ...

    def next_is_key(self) -> bool:
        """Account for one item; return whether it is a map key."""
        self.remaining -= 1
        if self.keys is None:
            return False
        self.key_next = not self.key_next
        return not self.key_next


class _Scanner:
    """Walks CBOR heads without building values; see :func:`loads_strict` for the rules."""

    def __init__(self, data: bytes, what: str, top_tag: int | None) -> None:
        self.data, self.what, self.top_tag = data, what, top_tag
        self.pos = self.tag_end = 0

    def fail(self, problem: str, offset: int) -> CoseError:
        return CoseError(f"{self.what}: {problem} at offset {offset}")

    def scan(self) -> int:
        """Validate the whole input; return the offset of the item inside a top-level tag (or 0)."""
        if not self.data:
            raise CoseError(f"{self.what}: empty input")
        stack = [_Frame(1)]
        while stack:
            frame = stack[-1]
            if frame.remaining == 0:
                stack.pop()
                continue
            start = self.pos
            child = self.item(frame.keys if frame.next_is_key() else None)
            if child is not None:
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(f"nesting deeper than {MAX_DEPTH}", start)
                stack.append(child)
        if self.pos != len(self.data):
            raise self.fail("trailing bytes", self.pos)
        return self.tag_end

    def item(self, keys: set | None) -> _Frame | None:
        """Consume one head (and string body), recording it in ``keys`` when it is a map key.

        Returns a frame for a container's children, None for a complete item.
        """
        start = self.pos
        major, arg = self.head()
        remaining = len(self.data) - self.pos
        if major in (2, 3) and arg > remaining:
            raise self.fail(f"string of {arg} bytes overruns the input", start)
        if keys is not None:
            self.record_key(major, arg, keys, start)
        if major in (2, 3):
            self.pos += arg
        elif major == 4:
            if arg > remaining:
                raise self.fail(f"array of {arg} items overruns the input", start)
            return _Frame(arg)
        elif major == 5:
            if 2 * arg > remaining:
                raise self.fail(f"map of {arg} pairs overruns the input", start)
            return _Frame(2 * arg, is_map=True)
        elif major == 6:
            if start != 0 or arg != self.top_tag:  # only the outermost item may be tagged
                raise self.fail(f"unexpected tag {arg}", start)
            self.tag_end = self.pos
            return _Frame(1)
        return None

    def head(self) -> tuple[int, int]:
        """Read an initial byte and its argument; reject reserved and indefinite-length forms."""
        start = self.pos
        if start >= len(self.data):
            raise self.fail("truncated input", start)
        initial = self.data[start]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            self.pos += 1
            return major, info
        if info > 27:
            problem = "indefinite length (not accepted)" if info == 31 else "reserved initial byte"
            raise self.fail(f"{problem} 0x{initial:02x}", start)
        end = start + 1 + (1 << (info - 24))
        if end > len(self.data):
            raise self.fail("truncated input", start)
        self.pos = end
        return major, int.from_bytes(self.data[start + 1 : end], "big")

    def record_key(self, major: int, arg: int, keys: set, start: int) -> None:
        """Map keys must be integers or text strings (COSE labels), each at most once per map."""
        if major == 0:
            key: object = arg
        elif major == 1:
            key = -1 - arg
        elif major == 3:
            key = self.data[self.pos : self.pos + arg].decode("utf-8", "replace")
        else:
            raise self.fail("map key is not an integer or text string", start)
        if key in keys:
            raise self.fail(f"duplicate map key {key!r}", start)
        keys.add(key)


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
