"""Attestation documents and the security-module (NSM / QTSM) request schema.

Document (AWS ``attestation_process.md``, Huawei ECS "Attestation Document"): an untagged
COSE_Sign1 (ES384; tag 18 accepted when reading) whose payload is a CBOR map with exactly these
keys.  :func:`encode_payload` writes them in QingTian's order::

    module_id   text            non-empty
    timestamp   uint            milliseconds since the epoch, always in the 8-byte form (0x1b)
    digest      text            "SHA384"
    pcrs        {uint => bstr}  the locked PCRs (normally 0..15), ascending
    certificate bstr            DER leaf certificate
    cabundle    [bstr]          DER chain, root first: [ROOT, INTERM_1, ..., INTERM_N]
    user_data   bstr / null
    nonce       bstr / null
    public_key  bstr / null

Nitro writes the same keys in the order module_id, digest, timestamp, pcrs, certificate,
cabundle, public_key, user_data, nonce, and (since 2026) as an indefinite-length map; the reader
accepts any order and definite or indefinite arrays and maps, but nothing else loose: no tags,
no floats, no indefinite strings, no duplicate or unknown keys, no trailing bytes.

Size rules differ by platform and live in :class:`SyntaxLimits` (:data:`QINGTIAN_LIMITS` are
``qtsm_lib_comm.h``'s, also used by the local security module; :data:`NITRO_LIMITS` accept
what a real Nitro NSM emits).

Request schema (``aws-nitro-enclaves-nsm-api`` ``src/api/mod.rs``; QTSM uses the same CBOR):
a request is a text ``"DescribeNSM"`` / ``"GetRandom"`` or a one-entry map ``{Name: {fields}}``;
a response is a text (``"LockPCR"``, ``"LockPCRs"``), ``{Name: {fields}}`` or
``{"Error": ErrorCode}``.  :func:`decode_request` raises :class:`ModuleError` carrying the error
variant a device returns for a bad request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from qtbuild.formats import cbor
from qtbuild.formats.cose import CoseSign1, decode_sign1, loads_strict, sign1
from qtbuild.formats.errors import FormatError, SignatureError

# --------------------------------------------------------------------------- document model

#: Payload keys in the order QingTian (and :func:`encode_payload`) writes them.
PAYLOAD_KEYS = (
    "module_id", "timestamp", "digest", "pcrs", "certificate", "cabundle",
    "user_data", "nonce", "public_key",
)
#: The order a Nitro NSM writes them.
NITRO_KEY_ORDER = (
    "module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
    "public_key", "user_data", "nonce",
)
MANDATORY_KEYS = PAYLOAD_KEYS[:6]
DIGEST = "SHA384"
MAX_PCRS = 32
PCR_SIZES = (32, 48, 64)
#: Bound on a whole COSE document (the largest legal QingTian document is about 25 KiB).
MAX_DOCUMENT_SIZE = 32 * 1024
#: Latest representable timestamp (9999-12-31T23:59:59.999Z), in milliseconds.
MAX_TIMESTAMP = 253402300799999
#: Deepest container nesting accepted in a payload (real documents need 2).
MAX_PAYLOAD_DEPTH = 4
ES384 = -35


class DocumentSyntaxError(FormatError):
    """The payload is not CBOR of the document schema, or breaks a size limit; names the field."""


@dataclass(frozen=True)
class AttestationDocument:
    """The payload of an attestation document (field meanings: module docstring).

    ``key_order`` is the order the keys had on the wire (informational: which platform wrote it).
    """

    module_id: str
    timestamp: int
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None
    digest: str = DIGEST
    key_order: tuple[str, ...] = field(default=PAYLOAD_KEYS, compare=False)


@dataclass(frozen=True)
class SyntaxLimits:
    """Per-platform size limits of a document's fields (bytes, or entries for ``cabundle``)."""

    name: str
    max_module_id: int
    max_certificate: int
    max_cabundle: int
    max_user_data: int
    max_nonce: int
    max_public_key: int


#: ``qtsm_lib_comm.h``: module id < 128, certificates ≤ 4096, chain depth 4, user data and nonce
#: ≤ 512, public key ≤ 1024.  The local security module enforces the same.
QINGTIAN_LIMITS = SyntaxLimits("qingtian", 127, 4096, 4, 512, 512, 1024)
#: AWS: certificates 1..1024 bytes; the NSM accepts 1024-byte user data / nonce (nsm-check).
NITRO_LIMITS = SyntaxLimits("nitro", 255, 1024, 8, 1024, 1024, 1024)


def encode_payload(doc: AttestationDocument) -> bytes:
    """The payload bytes: a definite 9-entry map in QingTian order (``doc.key_order`` ignored)."""
    if not 0 <= doc.timestamp < 1 << 64:
        raise ValueError(f"timestamp out of range: {doc.timestamp}")
    values = {
        "module_id": cbor2.dumps(doc.module_id),
        "timestamp": b"\x1b" + doc.timestamp.to_bytes(8, "big"),
        "digest": cbor2.dumps(doc.digest),
        "pcrs": cbor2.dumps(dict(sorted(doc.pcrs.items()))),
        "certificate": cbor2.dumps(bytes(doc.certificate)),
        "cabundle": cbor2.dumps([bytes(cert) for cert in doc.cabundle]),
        "user_data": cbor2.dumps(doc.user_data),
        "nonce": cbor2.dumps(doc.nonce),
        "public_key": cbor2.dumps(doc.public_key),
    }
    return bytes([0xA0 + len(PAYLOAD_KEYS)]) + b"".join(
        cbor2.dumps(key) + values[key] for key in PAYLOAD_KEYS
    )


def sign_document(doc: AttestationDocument, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The untagged COSE_Sign1 ES384 document for ``doc``, signed with a P-384 ``private_key``.

    Signatures are standard big-endian r ‖ s.  SignatureError for any other kind of key.
    """
    if getattr(getattr(private_key, "curve", None), "name", None) != "secp384r1":
        raise SignatureError("attestation documents are signed with a P-384 (ES384) key")
    return sign1(encode_payload(doc), private_key)


def read_document(
    data: bytes, *, max_size: int = MAX_DOCUMENT_SIZE
) -> tuple[CoseSign1, AttestationDocument]:
    """Parse (not verify) a document.

    CoseError for the envelope, DocumentSyntaxError for the payload.

    Types and mandatory keys are checked here; sizes are :func:`check_limits`'s job.
    """
    message = decode_sign1(data, max_size=max_size)
    return message, decode_payload(message.payload, max_size=max_size)


def decode_payload(payload: bytes, *, max_size: int = MAX_DOCUMENT_SIZE) -> AttestationDocument:
    """Decode payload bytes into an AttestationDocument; DocumentSyntaxError names what is wrong.

    The payload CBOR is read by :func:`qtbuild.formats.cbor.decode` with the rules of the module
    docstring: indefinite arrays and maps allowed, no tags, floats or indefinite strings, at most
    MAX_PAYLOAD_DEPTH nested containers.
    """
    value = cbor.decode(payload, what="payload", max_size=max_size, max_depth=MAX_PAYLOAD_DEPTH,
                        indefinite=cbor.INDEFINITE_CONTAINERS, floats_and_simple=False,
                        error=DocumentSyntaxError)
    if type(value) is not dict:
        raise DocumentSyntaxError("payload: not a map")
    unknown = [key for key in value if key not in PAYLOAD_KEYS]
    if unknown:
        raise DocumentSyntaxError(f"payload: unexpected key {unknown[0]!r}")
    missing = [key for key in MANDATORY_KEYS if key not in value]
    if missing:
        raise DocumentSyntaxError(f"payload: missing mandatory key {missing[0]!r}")
    return AttestationDocument(
        module_id=_typed(value, "module_id", str),
        timestamp=_typed(value, "timestamp", int),
        digest=_typed(value, "digest", str),
        pcrs=_pcrs(value["pcrs"]),
        certificate=_typed(value, "certificate", bytes),
        cabundle=_cabundle(value["cabundle"]),
        user_data=_typed(value, "user_data", bytes, optional=True),
        nonce=_typed(value, "nonce", bytes, optional=True),
        public_key=_typed(value, "public_key", bytes, optional=True),
        key_order=tuple(value),
    )


def _typed(value: dict, key: str, kind: type, *, optional: bool = False):
    item = value.get(key)
    if item is None and optional:
        return None
    if type(item) is not kind:
        raise DocumentSyntaxError(f"{key}: expected {kind.__name__}, got {type(item).__name__}")
    return item


def _pcrs(value: object) -> dict[int, bytes]:
    if type(value) is not dict:
        raise DocumentSyntaxError(f"pcrs: expected a map, got {type(value).__name__}")
    for index, pcr in value.items():
        if type(index) is not int or type(pcr) is not bytes:
            raise DocumentSyntaxError(f"pcrs: entry {index!r} is not uint => bstr")
    return dict(value)


def _cabundle(value: object) -> tuple[bytes, ...]:
    if type(value) is not list or any(type(cert) is not bytes for cert in value):
        raise DocumentSyntaxError("cabundle: expected an array of byte strings")
    return tuple(value)


def check_limits(doc: AttestationDocument, limits: SyntaxLimits = QINGTIAN_LIMITS) -> None:
    """Raise DocumentSyntaxError unless every field of ``doc`` is within ``limits``.

    module_id non-empty; digest "SHA384"; timestamp in 1..MAX_TIMESTAMP; 1..32 PCRs with
    indexes < 32 and values of 32, 48 or 64 bytes; certificate and each cabundle entry 1..max_certificate bytes;
    1..max_cabundle bundle entries; user_data, nonce, public_key within their maxima.
    """
    _check_range("module_id", len(doc.module_id.encode()), 1, limits.max_module_id)
    if doc.digest != DIGEST:
        raise DocumentSyntaxError(f"digest: expected {DIGEST!r}, got {doc.digest!r}")
    if not 0 < doc.timestamp <= MAX_TIMESTAMP:
        raise DocumentSyntaxError(f"timestamp: {doc.timestamp} ms is not in 1..{MAX_TIMESTAMP}")
    _check_range("pcrs", len(doc.pcrs), 1, MAX_PCRS, unit="entries")
    for index, pcr in doc.pcrs.items():
        if not 0 <= index < MAX_PCRS:
            raise DocumentSyntaxError(f"pcrs: index {index} is not in 0..{MAX_PCRS - 1}")
        if len(pcr) not in PCR_SIZES:
            raise DocumentSyntaxError(f"pcrs: PCR{index} has {len(pcr)} bytes, not 32/48/64")
    _check_range("certificate", len(doc.certificate), 1, limits.max_certificate)
    _check_range("cabundle", len(doc.cabundle), 1, limits.max_cabundle, unit="entries")
    for position, cert in enumerate(doc.cabundle):
        _check_range(f"cabundle[{position}]", len(cert), 1, limits.max_certificate)
    for name, maximum in (
        ("user_data", limits.max_user_data),
        ("nonce", limits.max_nonce),
        ("public_key", limits.max_public_key),
    ):
        value = getattr(doc, name)
        if value is not None:
            _check_range(name, len(value), 0, maximum)


def _check_range(name: str, size: int, low: int, high: int, unit: str = "bytes") -> None:
    if not low <= size <= high:
        raise DocumentSyntaxError(f"{name}: {size} {unit}, allowed {low}..{high} ({unit})")


# --------------------------------------------------------------------------- request schema

#: Largest request a device reads (NSM_REQUEST_MAX_SIZE); larger ones get InputTooLarge.
MAX_REQUEST_SIZE = 4096
#: Largest response a device writes (NSM_RESPONSE_MAX_SIZE); larger ones get BufferTooSmall.
MAX_RESPONSE_SIZE = 0x3000


class ErrorCode(StrEnum):
    """The ``{"Error": …}`` variants of the NSM/QTSM response schema."""

    INVALID_ARGUMENT = "InvalidArgument"
    INVALID_INDEX = "InvalidIndex"
    INVALID_RESPONSE = "InvalidResponse"
    READ_ONLY_INDEX = "ReadOnlyIndex"
    INVALID_OPERATION = "InvalidOperation"
    BUFFER_TOO_SMALL = "BufferTooSmall"
    INPUT_TOO_LARGE = "InputTooLarge"
    INTERNAL_ERROR = "InternalError"


class ModuleError(Exception):
    """A request the security module refuses: ``code`` is the Error variant to answer with."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(f"{code.value}: {message}" if message else code.value)
        self.code = code


@dataclass(frozen=True)
class DescribePCR:
    index: int


@dataclass(frozen=True)
class ExtendPCR:
    index: int
    data: bytes


@dataclass(frozen=True)
class LockPCR:
    index: int


@dataclass(frozen=True)
class LockPCRs:
    """NSM sends ``{"range": n}`` (PCRs 0..n-1); QTSM's ``qtsm_lock_pcrs`` a list of indexes."""

    indexes: tuple[int, ...]


@dataclass(frozen=True)
class DescribeNSM:
    pass


@dataclass(frozen=True)
class Attestation:
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


@dataclass(frozen=True)
class GetRandom:
    pass


Request = DescribePCR | ExtendPCR | LockPCR | LockPCRs | DescribeNSM | Attestation | GetRandom
_UNIT_REQUESTS: dict[str, Callable[[], Request]] = {"DescribeNSM": DescribeNSM, "GetRandom": GetRandom}
_U16 = 0xFFFF


def decode_request(data: bytes) -> Request:
    """Parse one request; ModuleError with the device's answer when it is not a valid one.

    Over MAX_REQUEST_SIZE → InputTooLarge; not CBOR, or no known operation → InvalidOperation;
    a known operation with missing or mistyped fields → InvalidArgument; an index ≥ 32 (or a
    LockPCRs range > 32) → InvalidIndex.  Unknown extra fields are ignored, as serde does.
    """
    if len(data) > MAX_REQUEST_SIZE:
        raise ModuleError(ErrorCode.INPUT_TOO_LARGE, f"request of {len(data)} bytes")
    try:
        value = loads_strict(data, what="request", max_size=MAX_REQUEST_SIZE)
    except FormatError as exc:
        raise ModuleError(ErrorCode.INVALID_OPERATION, str(exc)) from None
    if type(value) is str and value in _UNIT_REQUESTS:
        return _UNIT_REQUESTS[value]()
    if type(value) is not dict or len(value) != 1:
        raise ModuleError(ErrorCode.INVALID_OPERATION, "not a request")
    ((name, body),) = value.items()
    parser = _REQUEST_PARSERS.get(name)
    if parser is None:
        raise ModuleError(ErrorCode.INVALID_OPERATION, f"unknown request {name!r}")
    if type(body) is not dict:
        raise ModuleError(ErrorCode.INVALID_ARGUMENT, f"{name}: arguments must be a map")
    return parser(body)


def _index(body: dict, key: str = "index") -> int:
    index = body.get(key)
    if type(index) is not int or not 0 <= index <= _U16:
        raise ModuleError(ErrorCode.INVALID_ARGUMENT, f"{key} must be a u16")
    if index >= MAX_PCRS:
        raise ModuleError(ErrorCode.INVALID_INDEX, f"PCR index {index} ≥ {MAX_PCRS}")
    return index


def _optional_bytes(body: dict, key: str) -> bytes | None:
    value = body.get(key)
    if value is not None and type(value) is not bytes:
        raise ModuleError(ErrorCode.INVALID_ARGUMENT, f"{key} must be a byte string or null")
    return value


def _lock_pcrs(body: dict) -> LockPCRs:
    span = body.get("range")
    if type(span) is list:
        return LockPCRs(tuple(_index({"range": item}, "range") for item in span))
    if type(span) is not int or not 0 <= span <= _U16:
        raise ModuleError(ErrorCode.INVALID_ARGUMENT, "range must be a u16 or a list of indexes")
    if span > MAX_PCRS:
        raise ModuleError(ErrorCode.INVALID_INDEX, f"range {span} > {MAX_PCRS}")
    return LockPCRs(tuple(range(span)))


def _extend_pcr(body: dict) -> ExtendPCR:
    data = _optional_bytes(body, "data")
    if data is None:
        raise ModuleError(ErrorCode.INVALID_ARGUMENT, "data must be a byte string")
    return ExtendPCR(_index(body), data)


_REQUEST_PARSERS: dict[str, Callable[[dict], Request]] = {
    "DescribePCR": lambda body: DescribePCR(_index(body)),
    "ExtendPCR": _extend_pcr,
    "LockPCR": lambda body: LockPCR(_index(body)),
    "LockPCRs": _lock_pcrs,
    "Attestation": lambda body: Attestation(
        *(_optional_bytes(body, key) for key in ("user_data", "nonce", "public_key"))
    ),
}


def encode_request(request: Request) -> bytes:
    """The CBOR a client sends for ``request`` (LockPCRs as NSM's ``range`` when contiguous)."""
    if isinstance(request, (DescribeNSM, GetRandom)):
        return cbor2.dumps(type(request).__name__)
    if isinstance(request, LockPCRs):
        contiguous = request.indexes == tuple(range(len(request.indexes)))
        body: dict = {"range": len(request.indexes) if contiguous else list(request.indexes)}
    else:
        body = dict(request.__dict__)
    return cbor2.dumps({type(request).__name__: body})


def encode_response(name: str, body: dict | None = None) -> bytes:
    """A success response: the bare text ``name`` when ``body`` is None, else ``{name: body}``."""
    return cbor2.dumps(name if body is None else {name: body})


def encode_error(code: ErrorCode) -> bytes:
    """The error response ``{"Error": code}``."""
    return cbor2.dumps({"Error": code.value})


_ERROR_NAMES = frozenset(code.value for code in ErrorCode)


def decode_response(data: bytes) -> tuple[str, dict | None]:
    """(name, body) of a response; ``("Error", {"code": …})`` for errors.

    ModuleError(InvalidResponse) when the bytes are not a response of the schema.
    """
    try:
        value = loads_strict(data, what="response", max_size=MAX_RESPONSE_SIZE)
    except FormatError as exc:
        raise ModuleError(ErrorCode.INVALID_RESPONSE, str(exc)) from None
    if type(value) is str:
        return value, None
    if type(value) is dict and len(value) == 1:
        ((name, body),) = value.items()
        if name == "Error":
            if type(body) is str and body in _ERROR_NAMES:
                return name, {"code": ErrorCode(body)}
        elif type(name) is str and type(body) is dict:
            return name, body
    raise ModuleError(ErrorCode.INVALID_RESPONSE, "not a response of the NSM/QTSM schema")
