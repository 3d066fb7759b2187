"""Read the fields of an attestation document (the COSE_Sign1 ``Qtsm.attestation`` returns).

``parse_attestation(data) -> AttestationFields`` decodes, it does NOT verify: the signature,
the certificate chain and the freshness are checked by whoever *relies* on the document (the
KMS, or ``qtbuild attest verify`` / the parent's hand-off on the parent side).  Inside the
enclave it is for looking at your own document — logging your PCR0, checking that the nonce
you passed came back — never for trusting a document someone sent you.

Standard library plus cbor2 ≥ 5.4 (Debian bookworm's python3-cbor2); the SDK does not import
qtbuild, so this is a small reader of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import cbor2

MAX_DOCUMENT_SIZE = 32 * 1024
_COSE_SIGN1_TAG = 18
_MANDATORY = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")


class DocumentError(ValueError):
    """Not an attestation document; the message names the problem."""


@dataclass(frozen=True)
class AttestationFields:
    """The payload of an attestation document.

    ``timestamp`` is milliseconds since the Unix epoch (UTC); ``pcrs`` maps index → raw digest
    (48 bytes for SHA-384); ``certificate`` and ``cabundle`` are DER; ``public_key``,
    ``user_data`` and ``nonce`` are what the attestation request passed (None when absent).
    """

    module_id: str
    digest: str
    timestamp: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    def pcr(self, index: int) -> str:
        """PCR ``index`` as lower-case hex — the form KMS policies and ``convert`` use."""
        return self.pcrs[index].hex()

    @property
    def time(self) -> datetime:
        """``timestamp`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp / 1000, tz=UTC)

    @property
    def is_debug(self) -> bool:
        """True when PCR0 is all zeros: a debug-mode enclave (the KMS refuses those)."""
        return not any(self.pcrs.get(0, b"\0"))


def parse_attestation(data: bytes) -> AttestationFields:
    """The fields of a document (COSE_Sign1, tagged or not); DocumentError if it is not one.

    Does not check the signature or the chain (see the module docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"an attestation document is bytes, not {type(data).__name__}")
    if not 0 < len(data) <= MAX_DOCUMENT_SIZE:
        raise DocumentError(f"an attestation document is 1..{MAX_DOCUMENT_SIZE} bytes, not {len(data)}")
    envelope = _loads(bytes(data), "document")
    if isinstance(envelope, cbor2.CBORTag):
        if envelope.tag != _COSE_SIGN1_TAG:
            raise DocumentError(f"document: CBOR tag {envelope.tag}, expected {_COSE_SIGN1_TAG} (COSE_Sign1)")
        envelope = envelope.value
    if not isinstance(envelope, list) or len(envelope) != 4 or not isinstance(envelope[2], bytes):
        raise DocumentError("document: not a COSE_Sign1 array [protected, unprotected, payload, signature]")
    payload = _loads(envelope[2], "payload")
    if not isinstance(payload, dict):
        raise DocumentError("payload: not a map")
    missing = [key for key in _MANDATORY if key not in payload]
    if missing:
        raise DocumentError(f"payload: missing {missing[0]}")
    return AttestationFields(
        module_id=_typed(payload, "module_id", str), digest=_typed(payload, "digest", str),
        timestamp=_typed(payload, "timestamp", int), pcrs=_pcrs(payload["pcrs"]),
        certificate=_typed(payload, "certificate", bytes), cabundle=_cabundle(payload["cabundle"]),
        public_key=_optional(payload, "public_key"), user_data=_optional(payload, "user_data"),
        nonce=_optional(payload, "nonce"))


def _loads(data: bytes, what: str) -> object:
    try:
        return cbor2.loads(data)
    except Exception as exc:  # noqa: BLE001 - cbor2 5.4 and 6 raise different types
        raise DocumentError(f"{what}: not CBOR ({exc})") from None


def _typed(payload: dict, key: str, kind: type):
    value = payload[key]
    if type(value) is not kind:
        raise DocumentError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _optional(payload: dict, key: str) -> bytes | None:
    value = payload.get(key)
    if value is not None and type(value) is not bytes:
        raise DocumentError(f"{key}: expected bytes or null, got {type(value).__name__}")
    return value


def _pcrs(value: object) -> dict[int, bytes]:
    if not isinstance(value, dict) or not all(type(k) is int and type(v) is bytes for k, v in value.items()):
        raise DocumentError("pcrs: expected a map of index → bytes")
    return dict(value)


def _cabundle(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not all(type(item) is bytes for item in value):
        raise DocumentError("cabundle: expected an array of byte strings")
    return tuple(value)
