"""Attestation-document verification: the procedure of AWS "Verifying the root of trust" and
Huawei ecs_03_1412, as a library (the KMS calls :func:`verify_document`) and for the CLI.

Checks, in order; the first failure raises :class:`AttestationError` naming it:

    input       bounded size (32 KiB), one COSE_Sign1 (tag 18 or untagged), no trailing bytes
    alg         the protected header's alg is ES384 (-35)
    syntax      payload keys, types and the platform's size limits
    root        the bundle's first certificate is a pinned root (never trusted from the bundle)
    chain       [leaf, INTERM_N, …, INTERM_1, root]: names and signatures link, CAs have
                basicConstraints CA (pathLen respected) and keyCertSign, the leaf is no CA and
                may sign, no unknown critical extension
    validity    every certificate is valid at the check time (``at``, default now)
    signature   the COSE signature verifies with the leaf key; QingTian documents may store r and
                s little-endian, which is tried second for that platform only
    pcrs, nonce, public_key, age, debug   the caller's policy

The platform ("auto" by default) is the one whose well-known root the bundle starts with, else
"local"; it selects the syntax limits and the accepted signature encodings.  A "local" document
(the local security module's) is held to the limits of the cloud whose byte shape it has
(:func:`qtbuild.formats.attestation_encoding.identify`) and may use either signature form.  The
result names the shape (``encoding``: qingtian, nitro or generic) and the signature form that
verified.  With neither ``roots`` nor ``root_fingerprints`` the well-known Nitro and QingTian roots
are pinned.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from qtbuild.formats.attestation import (
    ES384,
    MAX_DOCUMENT_SIZE,
    NITRO_LIMITS,
    QINGTIAN_LIMITS,
    AttestationDocument,
    DocumentSyntaxError,
    SyntaxLimits,
    check_limits,
    read_document,
)
from qtbuild.formats.attestation_encoding import identify
from qtbuild.formats.cose import CoseSign1, verify1
from qtbuild.formats.errors import CoseError, SignatureError

#: SHA-256 fingerprints of the public hardware roots (docs/attestation.md, "Chains").
KNOWN_ROOTS = {
    "nitro": "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b",
    "qingtian": "f23443b4eb52a70719df49bdda0e57bb25f1c04530885dbecdbde241c8c4f581",
}
PLATFORMS = ("auto", "qingtian", "nitro", "local")
LIMITS = {"nitro": NITRO_LIMITS, "qingtian": QINGTIAN_LIMITS, "local": QINGTIAN_LIMITS}
#: Signature encodings tried, in order, per platform.
ENCODINGS: dict[str, tuple[Literal["big", "little"], ...]] = {
    "nitro": ("big",), "qingtian": ("big", "little"), "local": ("big", "little")
}
#: How far in the future a timestamp may be (clock skew) when an age limit applies.
CLOCK_SKEW = timedelta(minutes=5)
CHECKS = (
    "input", "alg", "syntax", "root", "chain", "validity", "signature",
    "pcrs", "nonce", "public_key", "age", "debug",
)


class AttestationError(Exception):
    """The document is not valid: ``check`` names the failing step (one of CHECKS)."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"{check}: {message}")
        self.check, self.message = check, message


@dataclass(frozen=True)
class VerifiedDocument:
    """A document that passed every check.  ``timestamp`` is an aware UTC datetime."""

    module_id: str
    timestamp: datetime
    pcrs: dict[int, bytes]
    user_data: bytes | None
    nonce: bytes | None
    public_key: bytes | None
    certificate: x509.Certificate
    platform: str
    signature_encoding: str
    encoding: str
    is_debug: bool
    root_fingerprint: str
    tagged: bool
    checked_at: datetime
    document: AttestationDocument

    def as_json(self) -> dict:
        """A JSON-ready summary (bytes as lower-case hex)."""

        def hexed(value: bytes | None) -> str | None:
            return None if value is None else value.hex()

        return {
            "valid": True,
            "platform": self.platform,
            "module_id": self.module_id,
            "timestamp": _iso(self.timestamp, "milliseconds"),
            "checked_at": _iso(self.checked_at, "milliseconds"),
            "encoding": self.encoding,
            "signature_encoding": self.signature_encoding,
            "tagged": self.tagged,
            "debug": self.is_debug,
            "root_fingerprint": self.root_fingerprint,
            "certificate_subject": self.certificate.subject.rfc4514_string(),
            "pcrs": {str(index): value.hex() for index, value in sorted(self.pcrs.items())},
            "user_data": hexed(self.user_data),
            "nonce": hexed(self.nonce),
            "public_key": hexed(self.public_key),
        }


def verify_document(
    data: bytes,
    *,
    roots: list[x509.Certificate] | None = None,
    root_fingerprints: list[str] | None = None,
    platform: str = "auto",
    expect_pcrs: dict[int, bytes] | None = None,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    max_age: float | None = None,
    at: datetime | None = None,
    allow_debug: bool = False,
) -> VerifiedDocument:
    """Run every check on ``data``; return the verified content or raise AttestationError.

    ``max_age`` (seconds) bounds ``at - timestamp`` and then also rejects timestamps more than
    CLOCK_SKEW ahead; ``at`` (default now; naive means UTC) is the time certificates must be
    valid at and ages are measured from — pass the document's own time for archived documents.
    ValueError for a bad argument (unknown platform, malformed fingerprint).
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}: {platform!r}")
    checked_at = _utc(at) if at is not None else datetime.now(UTC)
    pins = _pins(roots, root_fingerprints)
    message, doc = _decode(data)
    if platform == "auto":
        platform = _detect_platform(doc)
    shape = identify(message)
    _check(doc, _limits(platform, shape))
    _pinned_root(doc, pins)
    leaf, root = _verify_chain(doc, checked_at)
    encoding = _verify_signature(message, leaf, platform, shape)
    is_debug = _check_policy(
        doc, expect_pcrs or {}, nonce, public_key, max_age, checked_at, allow_debug
    )
    return VerifiedDocument(
        module_id=doc.module_id,
        timestamp=_from_ms(doc.timestamp),
        pcrs=dict(doc.pcrs),
        user_data=doc.user_data,
        nonce=doc.nonce,
        public_key=doc.public_key,
        certificate=leaf,
        platform=platform,
        signature_encoding=encoding,
        encoding=shape,
        is_debug=is_debug,
        root_fingerprint=fingerprint(root),
        tagged=message.tagged,
        checked_at=checked_at,
        document=doc,
    )


# --------------------------------------------------------------------------- decoding, syntax


def _decode(data: bytes) -> tuple[CoseSign1, AttestationDocument]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AttestationError("input", f"expected bytes, got {type(data).__name__}")
    try:
        message, doc = read_document(bytes(data), max_size=MAX_DOCUMENT_SIZE)
    except CoseError as exc:
        raise AttestationError("input", str(exc)) from None
    except DocumentSyntaxError as exc:
        raise AttestationError("syntax", str(exc)) from None
    if message.alg != ES384:
        raise AttestationError(
            "alg", f"protected header alg is {message.alg}, expected ES384 (-35)"
        )
    return message, doc


def _check(doc: AttestationDocument, limits: SyntaxLimits) -> None:
    try:
        check_limits(doc, limits)
    except DocumentSyntaxError as exc:
        raise AttestationError("syntax", f"{exc} [{limits.name} limits]") from None


def _limits(platform: str, shape: str) -> SyntaxLimits:
    """The platform's limits; a local document gets those of the cloud it is shaped like."""
    if platform == "local" and shape in LIMITS:
        return LIMITS[shape]
    return LIMITS[platform]


def _detect_platform(doc: AttestationDocument) -> str:
    """The platform whose well-known root DER opens the bundle, else "local" (no trust implied)."""
    first = hashlib.sha256(doc.cabundle[0]).hexdigest() if doc.cabundle else ""
    return next((name for name, known in KNOWN_ROOTS.items() if known == first), "local")


# --------------------------------------------------------------------------- chain


def _pins(roots: list[x509.Certificate] | None, fingerprints: list[str] | None) -> set[str]:
    """The pinned roots as a set of lower-case hex SHA-256 fingerprints."""
    if roots is None and fingerprints is None:
        return set(KNOWN_ROOTS.values())
    pins = {fingerprint(root) for root in roots or ()}
    for value in fingerprints or ():
        pins.add(normalize_fingerprint(value))
    return pins


def normalize_fingerprint(value: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and spaces dropped)."""
    cleaned = value.replace(":", "").replace(" ", "").lower()
    if len(cleaned) != 64 or any(c not in "0123456789abcdef" for c in cleaned):
        raise ValueError(f"not a SHA-256 fingerprint (64 hex digits): {value!r}")
    return cleaned


def _pinned_root(doc: AttestationDocument, pins: set[str]) -> None:
    first = hashlib.sha256(doc.cabundle[0]).hexdigest()
    if first not in pins:
        raise AttestationError(
            "root", f"the bundle's root (SHA-256 {first}) is not a pinned root"
        )


def _verify_chain(
    doc: AttestationDocument, at: datetime
) -> tuple[x509.Certificate, x509.Certificate]:
    """Check [leaf, INTERM_N, …, INTERM_1, root]; return the parsed leaf and root."""
    ders = [doc.certificate, *reversed(doc.cabundle[1:]), doc.cabundle[0]]
    names = ["leaf", *(f"cabundle[{i}]" for i in range(len(doc.cabundle) - 1, 0, -1)), "root"]
    chain = [_load_certificate(der, name) for der, name in zip(ders, names, strict=True)]
    for position in range(len(chain) - 1):
        _check_link(ders[position], ders[position + 1])
    for below, authority in enumerate(chain[1:]):
        _check_authority(authority, below)
    _check_leaf(chain[0])
    for cert in chain:
        _check_validity(cert, at)
    return chain[0], chain[-1]


def _load_certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return _parse_certificate(der)
    except Exception as exc:  # noqa: BLE001 - cryptography raises even KeyError on bad names
        reason = str(exc) or type(exc).__name__
        raise AttestationError("chain", f"{what} is not a valid certificate: {reason}") from None


@functools.lru_cache(maxsize=256)
def _parse_certificate(der: bytes) -> x509.Certificate:
    """Parse every part the checks use (cryptography parses lazily), cached by DER since chains
    repeat across documents; raises on any malformation."""
    cert = x509.load_der_x509_certificate(der)
    _ = (cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.extensions,
         cert.public_key(), cert.not_valid_before_utc, cert.not_valid_after_utc)
    return cert


def _describe(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string())


def _check_link(child_der: bytes, parent_der: bytes) -> None:
    try:
        _issued_by(child_der, parent_der)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        child, parent = _parse_certificate(child_der), _parse_certificate(parent_der)
        reason = str(exc) or type(exc).__name__
        raise AttestationError(
            "chain", f"{_describe(child)} is not issued by {_describe(parent)}: {reason}"
        ) from None


@functools.lru_cache(maxsize=256)
def _issued_by(child_der: bytes, parent_der: bytes) -> bool:
    """Whether ``child`` names ``parent`` as issuer and carries its signature (raises if not).

    Only successes are cached: a pure function of the two encodings, so it is safe to reuse;
    validity and constraints are still checked on every verification.
    """
    _parse_certificate(child_der).verify_directly_issued_by(_parse_certificate(parent_der))
    return True


def _extension(cert: x509.Certificate, kind: type):
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_common(cert: x509.Certificate) -> None:
    for extension in cert.extensions:
        if extension.critical and isinstance(extension.value, x509.UnrecognizedExtension):
            raise AttestationError(
                "chain", f"{_describe(cert)} has an unknown critical extension {extension.oid}"
            )


def _check_authority(cert: x509.Certificate, below: int) -> None:
    """An issuing certificate with ``below`` intermediate CAs under it (leaf not counted)."""
    _check_common(cert)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise AttestationError("chain", f"{_describe(cert)} issues certificates but is not a CA")
    if constraints.path_length is not None and below > constraints.path_length:
        raise AttestationError(
            "chain",
            f"{_describe(cert)} has pathLen {constraints.path_length} "
            f"but {below} CA certificates below it",
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise AttestationError("chain", f"{_describe(cert)} lacks the keyCertSign key usage")


def _check_leaf(cert: x509.Certificate) -> None:
    _check_common(cert)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise AttestationError("chain", f"the signing certificate {_describe(cert)} is a CA")
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise AttestationError(
            "chain", f"the signing certificate {_describe(cert)} lacks digitalSignature"
        )


def _check_validity(cert: x509.Certificate, at: datetime) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= at <= end:
        state = "not yet valid" if at < start else "expired"
        raise AttestationError(
            "validity",
            f"{_describe(cert)} is {state} at {_iso(at)} (valid {_iso(start)} .. {_iso(end)})",
        )


# --------------------------------------------------------------------------- signature, policy


def _verify_signature(message: CoseSign1, leaf: x509.Certificate, platform: str, shape: str) -> str:
    """The signature encoding that verified ("big" or "little"); a QingTian-shaped document's
    little-endian form is tried first."""
    key = leaf.public_key()
    encodings = ENCODINGS[platform]
    if shape == "qingtian":
        encodings = tuple(sorted(encodings, key=lambda encoding: encoding != "little"))
    for encoding in encodings:
        try:
            verify1(message, key, signature_encoding=encoding)
            return encoding
        except SignatureError:
            continue
    tried = " or ".join(f"{encoding}-endian r‖s" for encoding in ENCODINGS[platform])
    raise AttestationError(
        "signature", f"COSE signature does not verify with the leaf key ({tried})"
    )


def _check_policy(
    doc: AttestationDocument,
    expect_pcrs: dict[int, bytes],
    nonce: bytes | None,
    public_key: bytes | None,
    max_age: float | None,
    at: datetime,
    allow_debug: bool,
) -> bool:
    """Apply the caller's policy (docs/attestation.md, "Verification", step 5); return whether the
    document is debug."""
    for index, expected in sorted(expect_pcrs.items()):
        actual = doc.pcrs.get(index)
        if actual != expected:
            shown = "absent" if actual is None else actual.hex()
            raise AttestationError("pcrs", f"PCR{index} is {shown}, expected {expected.hex()}")
    _check_equal("nonce", doc.nonce, nonce)
    _check_equal("public_key", doc.public_key, public_key)
    if max_age is not None:
        _check_age(_from_ms(doc.timestamp), at, max_age)
    pcr0 = doc.pcrs.get(0)
    is_debug = pcr0 is not None and not any(pcr0)
    if is_debug and not allow_debug:
        raise AttestationError("debug", "PCR0 is all zeros: a debug-mode enclave")
    return is_debug


def _check_equal(check: str, actual: bytes | None, expected: bytes | None) -> None:
    if expected is None:
        return
    if actual is None or not hmac.compare_digest(actual, expected):
        raise AttestationError(check, f"the document's {check} is not the expected one")


def _check_age(timestamp: datetime, at: datetime, max_age: float) -> None:
    age = at - timestamp
    if age > timedelta(seconds=max_age):
        raise AttestationError(
            "age",
            f"issued {_iso(timestamp)}, {age.total_seconds():.0f} s before {_iso(at)} "
            f"(max {max_age:g} s)",
        )
    if -age > CLOCK_SKEW:
        raise AttestationError("age", f"issued {_iso(timestamp)}, in the future of {_iso(at)}")


# --------------------------------------------------------------------------- small helpers


def fingerprint(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of a certificate's DER encoding (what verifiers pin)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _from_ms(milliseconds: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=milliseconds)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _iso(moment: datetime, timespec: str = "seconds") -> str:
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")
