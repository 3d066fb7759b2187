"""The ``recipient`` of decrypt-data, decrypt-datakey, create-datakey and gen-random: verify its
attestation document, expose its PCRs to the policy engine, and seal the plaintext to it.

``recipient = {"attestation_document": base64 COSE_Sign1,
               "key_encryption_algorithm": "RSAES_OAEP_SHA_256"}``

The document must pass every check of ``qtbuild.runtime.verifier.attestation.verify_document`` against the
configured roots (never the ones the bundle brings), be at most ``max_age`` seconds old, not
come from a debug-mode enclave (unless allowed), and carry an RSA public key of 2048–4096 bits
(DER SubjectPublicKeyInfo).  Each failed check has its own code:

    KMS.4001  recipient malformed or key_encryption_algorithm unsupported
    KMS.4002  document undecodable or of invalid syntax (input, alg, syntax)
    KMS.4003  not chained to a trusted root (root, chain)
    KMS.4004  a certificate not valid now (validity)
    KMS.4005  COSE signature does not verify (signature)
    KMS.4006  older than max_age, or from the future (age)
    KMS.4007  debug-mode enclave (debug)
    KMS.4008  no public key, or not RSA 2048–4096 bits
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from qtbuild.formats.attestation import MAX_DOCUMENT_SIZE
from qtbuild.runtime.kms import cms
from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.verifier.attestation import AttestationError, VerifiedDocument, verify_document

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096
DEFAULT_MAX_AGE = 300.0
CHECK_CODES = {
    "input": "KMS.4002", "alg": "KMS.4002", "syntax": "KMS.4002",
    "root": "KMS.4003", "chain": "KMS.4003", "validity": "KMS.4004",
    "signature": "KMS.4005", "age": "KMS.4006", "debug": "KMS.4007",
}
_RECIPIENT_KEYS = {"attestation_document", "key_encryption_algorithm"}


@dataclass(frozen=True)
class Recipient:
    """A verified recipient: its document and RSA public key."""

    document: VerifiedDocument
    public_key: rsa.RSAPublicKey

    def pcr_hex(self, index: int) -> str | None:
        value = self.document.pcrs.get(index)
        return None if value is None else value.hex()

    def conditions(self) -> Mapping[str, str | bool]:
        """Policy condition keys: Huawei ``kms:RecipientAttestation/PCR<n>``, AWS
        ``kms:RecipientAttestation:PCR<n>`` and ``:ImageSha384`` (= PCR0), lower-case hex.
        Computed once per recipient (a cached one serves many requests): read-only."""
        return self._conditions

    @functools.cached_property
    def _conditions(self) -> Mapping[str, str | bool]:
        context: dict[str, str | bool] = {}
        for index, value in self.document.pcrs.items():
            context[f"kms:RecipientAttestation/PCR{index}"] = value.hex()
            context[f"kms:RecipientAttestation:PCR{index}"] = value.hex()
        if 0 in self.document.pcrs:
            context["kms:RecipientAttestation:ImageSha384"] = self.document.pcrs[0].hex()
        return MappingProxyType(context)

    def seal(self, plaintext: bytes) -> str:
        """``ciphertext_recipient``: base64 of the CMS envelope of ``plaintext``."""
        return base64.b64encode(cms.envelope(plaintext, self.public_key)).decode("ascii")


@dataclass(frozen=True)
class RecipientVerifier:
    """How documents are checked: pinned roots (certificates and/or SHA-256 fingerprints),
    maximum age in seconds, and whether debug-mode documents are accepted."""

    roots: tuple[x509.Certificate, ...] = ()
    root_fingerprints: tuple[str, ...] = ()
    max_age: float = DEFAULT_MAX_AGE
    allow_debug: bool = False
    platform: str = "auto"

    cache: VerifiedCache = field(default_factory=lambda: VerifiedCache(), compare=False, repr=False)

    def verify(self, value: object) -> Recipient:
        """The verified recipient of a request's ``recipient`` field, or KmsError."""
        document = _document_bytes(value)
        cached = self.cache.get(document)
        if cached is not None:
            return cached
        try:
            verified = verify_document(
                document, roots=list(self.roots), root_fingerprints=list(self.root_fingerprints),
                platform=self.platform, max_age=self.max_age, allow_debug=self.allow_debug)
        except AttestationError as error:
            raise KmsError(CHECK_CODES.get(error.check, "KMS.4002"),
                           f"Attestation document refused ({error.check}): {error.message}"
                           ) from None
        recipient = Recipient(verified, _rsa_key(verified.public_key))
        self.cache.put(document, recipient, _valid_until(verified, self.max_age))
        return recipient


def _valid_until(verified: VerifiedDocument, max_age: float) -> float:
    """Until when (Unix seconds) the checks that passed now still pass: the document stays
    within max_age and every certificate of its chain within its validity."""
    bounds = [verified.timestamp.timestamp() + max_age, verified.certificate.not_valid_after_utc.timestamp()]
    for der in verified.document.cabundle:
        bounds.append(x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp())
    return min(bounds)


class VerifiedCache:
    """Documents that passed every check, by their SHA-256, until a time-dependent check
    (age, certificate validity) would fail.  The other checks (chain to the pinned roots,
    signature, debug mode, the RSA key) depend only on the bytes, so an identical document —
    an enclave reusing its document for a few minutes, as the SDK may — is not verified again.
    Thread-safe; at most ``size`` entries (the oldest go first)."""

    def __init__(self, size: int = 1024, clock=time.time) -> None:
        self.size, self.clock = size, clock
        self._entries: OrderedDict[bytes, tuple[Recipient, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, document: bytes) -> Recipient | None:
        digest = hashlib.sha256(document).digest()
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if self.clock() >= entry[1]:
                del self._entries[digest]
                return None
            return entry[0]

    def put(self, document: bytes, recipient: Recipient, until: float) -> None:
        digest = hashlib.sha256(document).digest()
        with self._lock:
            self._entries[digest] = (recipient, until)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _document_bytes(value: object) -> bytes:
    if not isinstance(value, dict) or set(value) - _RECIPIENT_KEYS:
        raise KmsError("KMS.4001", "recipient must be an object with attestation_document "
                                   "and key_encryption_algorithm.")
    algorithm = value.get("key_encryption_algorithm", KEY_ENCRYPTION_ALGORITHM)
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise KmsError("KMS.4001", f"key_encryption_algorithm must be {KEY_ENCRYPTION_ALGORITHM}.")
    text = value.get("attestation_document")
    if not isinstance(text, str) or not 0 < len(text) <= 4 * (MAX_DOCUMENT_SIZE + 2) // 3:
        raise KmsError("KMS.4001", "attestation_document must be base64 text of a document.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KmsError("KMS.4001", "attestation_document is not base64.") from None


def _rsa_key(der: bytes | None) -> rsa.RSAPublicKey:
    if not der:
        raise KmsError("KMS.4008", "The attestation document carries no public key.")
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        raise KmsError("KMS.4008", "The document's public_key is not a DER "
                                   "SubjectPublicKeyInfo.") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KmsError("KMS.4008", f"The document's public key is {_kind(key)}, not RSA.")
    exponent = key.public_numbers().e
    if exponent < 3 or exponent % 2 == 0:
        raise KmsError("KMS.4008", f"The document's RSA key has the public exponent {exponent}.")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise KmsError("KMS.4008", f"The document's RSA key has {key.key_size} bits "
                                   f"(accepted: {MIN_RSA_BITS}..{MAX_RSA_BITS}).")
    return key


def _kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").replace("PublicKey", "") or "unknown"
