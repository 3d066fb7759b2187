"""The EIF signature section (v3+): a COSE_Sign1 over PCR0 plus the signing certificate.

Byte layout, as ``aws-nitro-enclaves-image-format`` writes it with serde_cbor
(``defs::PcrSignature`` / ``defs::PcrInfo``; ``EifSigner::generate_eif_signature``)::

    section = [ {"signing_certificate": [u8, ...], "signature": [u8, ...]} ]   # one entry: PCR0
    payload = {"register_index": 0, "register_value": [u8, ...]}             # signed by COSE

Every ``Vec<u8>`` is a CBOR *array of unsigned integers*, not a byte string.  The certificate is
the PEM file's bytes as given; readers use its first certificate (``X509::from_pem``).
PCR8 = extend(SHA384(DER(first certificate))).

A verifier (``EifReader::get_certificate_info``) re-encodes ``PcrInfo{0, PCR0 recomputed from
the image}`` and compares it byte for byte with the verified COSE payload; :func:`verify_signature`
does the same and also enforces the certificate's validity window, as the enclave loader does.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import cbor2
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qtbuild.formats.cose import (
    CoseSign1,
    algorithm_for_key,
    decode_sign1,
    loads_strict,
    sign1,
    verify1,
)
from qtbuild.formats.errors import CoseError, SignatureError
from qtbuild.formats.measure import extend

#: Largest signature section accepted or written, in bytes.
MAX_SIGNATURE_SECTION = 32768
PCR0_SIZE = 48
_CERT_KEY, _SIG_KEY = "signing_certificate", "signature"
_INDEX_KEY, _VALUE_KEY = "register_index", "register_value"
_I32 = range(-(2**31), 2**31)
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)


@dataclass(frozen=True)
class SignatureInfo:
    """A parsed (not yet verified) signature section: its first entry, decoded.

    ``pcr8`` is the lower-case hex PCR8 of ``certificate``; ``register_index`` and
    ``register_value`` are what the COSE payload claims; ``message`` is the COSE_Sign1 itself.
    """

    certificate: x509.Certificate
    certificate_pem: bytes
    pcr8: str
    register_index: int
    register_value: bytes
    alg: int
    message: CoseSign1


# --------------------------------------------------------------------------- encoding


def pcr_info_payload(register_index: int, register_value: bytes) -> bytes:
    """serde_cbor's bytes for ``PcrInfo{register_index, register_value}`` (the signed payload)."""
    if type(register_index) is not int or register_index not in _I32:
        raise ValueError(f"register_index must be a 32-bit signed integer, got {register_index!r}")
    return cbor2.dumps({_INDEX_KEY: register_index, _VALUE_KEY: list(bytes(register_value))})


def encode_signature_section(entries: list[tuple[bytes, bytes]]) -> bytes:
    """Encode ``[(certificate_pem, cose_sign1), ...]`` as serde_cbor encodes ``Vec<PcrSignature>``.

    Raises CoseError when ``entries`` is empty or the result exceeds MAX_SIGNATURE_SECTION.
    """
    if not entries:
        raise CoseError("signature section: needs at least one entry")
    section = cbor2.dumps(
        [{_CERT_KEY: list(bytes(cert)), _SIG_KEY: list(bytes(sig))} for cert, sig in entries]
    )
    if len(section) > MAX_SIGNATURE_SECTION:
        raise CoseError(
            f"signature section: {len(section)} bytes exceeds the limit of "
            f"{MAX_SIGNATURE_SECTION} bytes (is the certificate file a long chain?)"
        )
    return section


def sign_pcr0(pcr0: bytes, private_key: ec.EllipticCurvePrivateKey, certificate_pem: bytes) -> bytes:
    """Sign PCR0 with ``private_key``; return the signature section bytes.

    ``certificate_pem`` is stored exactly as given (like nitro-cli, which stores the file), so a
    chain file is kept whole; its first certificate is the signing certificate and must hold the
    public key of ``private_key``.  Raises SignatureError for a non-EC key, an unsupported curve or
    a key/certificate mismatch, CoseError when the PEM holds no parseable certificate.
    """
    if len(pcr0) != PCR0_SIZE:
        raise ValueError(f"PCR0 must be {PCR0_SIZE} bytes, got {len(pcr0)}")
    algorithm_for_key(private_key)  # refuses non-EC keys and unsupported curves
    certificate = first_certificate(certificate_pem)
    if _spki(private_key.public_key()) != _spki(certificate_public_key(certificate)):
        raise SignatureError("the private key does not match the signing certificate's public key")
    cose = sign1(pcr_info_payload(0, pcr0), private_key)
    return encode_signature_section([(bytes(certificate_pem), cose)])


def certificate_public_key(certificate: x509.Certificate) -> object:
    """The certificate's public key; SignatureError if cryptography cannot load it."""
    try:
        return certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"cannot use the signing certificate's public key: {exc}") from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --------------------------------------------------------------------------- decoding


def decode_signature_section(data: bytes) -> list[tuple[bytes, bytes]]:
    """Parse a signature section into ``[(certificate_pem, cose_sign1), ...]``; CoseError if bad.

    Strict: at most MAX_SIGNATURE_SECTION bytes of one CBOR array (no trailing bytes) holding at
    least one map with exactly the keys ``signing_certificate`` and ``signature``, each an array
    of integers 0..255.  (serde_cbor would ignore unknown keys; nitro-cli never writes any, so an
    extra key is treated as tampering.)
    """
    value = loads_strict(data, what="signature section", max_size=MAX_SIGNATURE_SECTION)
    if not isinstance(value, list) or not value:
        raise CoseError("signature section: expected a non-empty array of entries")
    return [_decode_entry(entry, i) for i, entry in enumerate(value)]


def _decode_entry(entry: object, index: int) -> tuple[bytes, bytes]:
    where = f"signature section entry {index}"
    fields = _exact_map(entry, (_CERT_KEY, _SIG_KEY), where)
    return (
        _byte_array(fields[_CERT_KEY], f"{where} {_CERT_KEY}"),
        _byte_array(fields[_SIG_KEY], f"{where} {_SIG_KEY}"),
    )


def _exact_map(value: object, keys: tuple[str, ...], where: str) -> dict:
    """``value`` if it is a map with exactly ``keys``; CoseError naming what differs otherwise."""
    if not isinstance(value, dict):
        raise CoseError(f"{where}: expected a map, got {type(value).__name__}")
    missing = [k for k in keys if k not in value]
    extra = [k for k in value if k not in keys]
    if missing or extra:
        raise CoseError(f"{where}: missing keys {missing}, unexpected keys {extra}")
    return value


def _byte_array(value: object, where: str) -> bytes:
    """serde_cbor's ``Vec<u8>``: an array of integers 0..255 → bytes; CoseError otherwise."""
    if not isinstance(value, list):
        raise CoseError(f"{where}: expected an array of bytes, got {type(value).__name__}")
    if not all(type(b) is int and 0 <= b <= 255 for b in value):
        raise CoseError(f"{where}: array element is not an integer 0..255")
    return bytes(value)


def decode_pcr_info(payload: bytes) -> tuple[int, bytes]:
    """``(register_index, register_value)`` from a PcrInfo payload; CoseError if malformed."""
    value = loads_strict(payload, what="PCR payload")
    fields = _exact_map(value, (_INDEX_KEY, _VALUE_KEY), "PCR payload")
    index = fields[_INDEX_KEY]
    if type(index) is not int or index not in _I32:
        raise CoseError(f"PCR payload: {_INDEX_KEY} must be a 32-bit integer, got {index!r}")
    return index, _byte_array(fields[_VALUE_KEY], f"PCR payload {_VALUE_KEY}")


def first_certificate(pem: bytes) -> x509.Certificate:
    """The first ``CERTIFICATE`` block of ``pem``, parsed; CoseError if none or unparseable."""
    match = _PEM_CERTIFICATE.search(bytes(pem))
    if match is None:
        raise CoseError("signing certificate: no PEM CERTIFICATE block found")
    try:
        return _decoded(x509.load_pem_x509_certificate(match.group(0)))
    except Exception as exc:  # noqa: BLE001 - ValueError, KeyError on odd names, InvalidVersion on < 42
        raise CoseError(f"signing certificate: cannot parse ({str(exc)[:300] or type(exc).__name__})") from None


def _decoded(certificate: x509.Certificate) -> x509.Certificate:
    """``certificate`` after touching every field readers show.  cryptography decodes names and
    times lazily, and an issuer using an unusual string tag (VideotexString, an odd-length
    BMPString...) raises ValueError or KeyError on first access: in ``describe``, long after
    parsing.  Touching them here makes such a certificate a CoseError for every caller."""
    _ = (certificate.subject.rfc4514_string(), certificate.issuer.rfc4514_string(),
         [attribute.value for attribute in certificate.issuer], certificate.signature_algorithm_oid,
         certificate.signature, _validity(certificate))
    return certificate


def pcr8_from_certificate(cert_pem_or_der: bytes) -> str:
    """PCR8 (hex) for a signing certificate given as PEM (first certificate) or DER."""
    data = bytes(cert_pem_or_der)
    if b"-----BEGIN" in data:
        certificate = first_certificate(data)
    else:
        try:
            certificate = _decoded(x509.load_der_x509_certificate(data))
        except Exception as exc:  # noqa: BLE001 - as in first_certificate
            reason = str(exc)[:300] or type(exc).__name__
            raise CoseError(f"signing certificate: not PEM and not valid DER ({reason})") from None
    return _pcr8(certificate)


def _pcr8(certificate: x509.Certificate) -> str:
    der = certificate.public_bytes(serialization.Encoding.DER)
    return extend(hashlib.sha384(der).digest()).hex()


def load_signature(data: bytes) -> SignatureInfo:
    """Decode a signature section's first entry: certificate, PCR8, COSE message and its payload.

    Nothing is verified here (see :func:`verify_signature`); CoseError if anything is malformed.
    Entries after the first are ignored, as nitro-cli ignores them.
    """
    certificate_pem, cose_bytes = decode_signature_section(data)[0]
    certificate = first_certificate(certificate_pem)
    message = decode_sign1(cose_bytes)
    register_index, register_value = decode_pcr_info(message.payload)
    return SignatureInfo(
        certificate=certificate,
        certificate_pem=certificate_pem,
        pcr8=_pcr8(certificate),
        register_index=register_index,
        register_value=register_value,
        alg=message.alg,
        message=message,
    )


# --------------------------------------------------------------------------- verification


def verify_signature(
    info: SignatureInfo,
    pcr0: bytes,
    *,
    at: datetime | None = None,
    check_validity: bool = True,
) -> None:
    """Check a loaded signature against ``pcr0`` recomputed from the image; raise SignatureError.

    In order: the COSE signature must verify under the certificate's public key; the payload must
    sign register 0 with value ``pcr0``, encoded exactly as nitro-cli encodes it; and (unless
    ``check_validity`` is false) the certificate must be valid at ``at`` (default: now; a naive
    datetime is taken as UTC).
    """
    try:
        verify1(info.message, certificate_public_key(info.certificate))
    except SignatureError as exc:
        raise SignatureError(
            f"signature does not verify under the signing certificate: {exc}"
        ) from None
    if info.register_index != 0:
        raise SignatureError(f"the signature covers PCR{info.register_index}, expected PCR0")
    if info.register_value != bytes(pcr0):
        raise SignatureError(
            f"the signed PCR0 {info.register_value.hex()} does not match the image's PCR0 "
            f"{bytes(pcr0).hex()}"
        )
    if info.message.payload != pcr_info_payload(0, pcr0):
        raise SignatureError("the signed payload is not encoded as nitro-cli encodes PcrInfo")
    if check_validity:
        check_certificate_validity(info.certificate, at)


def check_certificate_validity(certificate: x509.Certificate, at: datetime | None = None) -> None:
    """Raise SignatureError unless ``certificate`` is valid at ``at`` (default now, UTC)."""
    when = _as_utc(at or datetime.now(UTC))
    not_before, not_after = _validity(certificate)
    if when < not_before:
        raise SignatureError(
            f"signing certificate is not yet valid: valid from {not_before.isoformat()} "
            f"until {not_after.isoformat()}, checked at {when.isoformat()}"
        )
    if when > not_after:
        raise SignatureError(
            f"signing certificate has expired: valid from {not_before.isoformat()} "
            f"until {not_after.isoformat()}, checked at {when.isoformat()}"
        )


def _validity(certificate: x509.Certificate) -> tuple[datetime, datetime]:
    """(not_before, not_after) as aware UTC datetimes on cryptography ≥ 38 (``*_utc`` is 42+)."""
    if hasattr(certificate, "not_valid_before_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return _as_utc(certificate.not_valid_before), _as_utc(certificate.not_valid_after)


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)
