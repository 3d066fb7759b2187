"""The security-module state machine behind ``/dev/qtsm`` and ``/dev/nsm`` of one local enclave.

32 PCRs of 48 bytes.  PCRs 0–15 are decided by the runtime before the enclave starts and are
locked from the first request: PCR0/1/2/8 from the loaded image, PCR3 / PCR4 extended with the
parent role / instance id when given (:func:`boot_pcrs`), the rest zero.  In a debug-mode
enclave they are all zeros, as on hardware.  PCRs 16–31 start at zero; the enclave extends
(``new = SHA384(old ‖ data)``) and locks them.  Semantics and error variants follow the Nitro
NSM (nsm-check, QEMU ``virtio-nsm``):

    DescribePCR  index ≥ 32 → InvalidIndex
    ExtendPCR    index ≥ 32 → InvalidIndex; locked → ReadOnlyIndex
    LockPCR      index ≥ 32 → InvalidIndex; already locked (0–15 always) → ReadOnlyIndex
    LockPCRs     any index ≥ 32 (range > 32) → InvalidIndex; already-locked ones are fine
    Attestation  user_data / nonce > 512 or public_key > 1024 bytes → InputTooLarge
    GetRandom    256 random bytes
    anything malformed: see :func:`qtbuild.formats.attestation.decode_request`

Attestation documents carry PCRs 0–15 plus every locked user PCR, are signed by the leaf the
``signer`` returns, keep user_data / nonce / public_key as requested, and are written in the cloud
profile's encoding with its size limits (:mod:`qtbuild.runtime.qtsm.clouds`; QingTian by default).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qtbuild.formats.attestation import (
    MAX_PCRS,
    MAX_REQUEST_SIZE,
    Attestation,
    AttestationDocument,
    DescribeNSM,
    DescribePCR,
    ErrorCode,
    ExtendPCR,
    GetRandom,
    LockPCR,
    LockPCRs,
    ModuleError,
    Request,
    decode_request,
    encode_error,
    encode_response,
)
from qtbuild.formats.measure import HASH_ALGORITHM, PCR_SIZE, ZERO_PCR, Measurements, extend
from qtbuild.runtime.qtsm.clouds import QINGTIAN_PROFILE, CloudProfile

log = logging.getLogger(__name__)

#: PCRs 0..BOOT_PCRS-1 belong to the runtime and are locked from the start.
BOOT_PCRS = 16
RANDOM_SIZE = 256
VERSION = (1, 0, 0)

Signer = Callable[[], tuple["ec.EllipticCurvePrivateKey", "x509.Certificate | bytes", list[bytes]]]


def boot_pcrs(
    measurements: Measurements, *, parent_role: str | None = None, instance_id: str | None = None
) -> dict[int, bytes]:
    """The runtime-decided PCRs: 0/1/2/8 of the image, 3 = extend(role), 4 = extend(instance id).

    PCR3 / PCR4 are computed as AWS documents them, SHA384(48 zero bytes ‖ UTF-8 text), and are
    left out (zero) when not given; PCR8 is left out for an unsigned image.
    """
    pcrs = {0: measurements.pcr0, 1: measurements.pcr1, 2: measurements.pcr2}
    if measurements.pcr8 is not None:
        pcrs[8] = measurements.pcr8
    if parent_role:
        pcrs[3] = extend(parent_role.encode())
    if instance_id:
        pcrs[4] = extend(instance_id.encode())
    return pcrs


def make_module_id(enclave_id: str, parent_id: str) -> str:
    """A module id shaped like the platforms' ``<parent instance id>-enc<16 hex digits>``.

    The suffix is derived from ``enclave_id`` so it is stable for the enclave's lifetime.
    """
    suffix = hashlib.sha256(enclave_id.encode()).hexdigest()[:16]
    module_id = f"{parent_id}-enc{suffix}"
    if len(module_id.encode()) > QINGTIAN_PROFILE.limits.max_module_id:
        raise ValueError(f"module id longer than {QINGTIAN_PROFILE.limits.max_module_id} bytes")
    return module_id


class SecurityModule:
    """One enclave's security module.  Thread-safe; :meth:`handle` never raises."""

    def __init__(
        self,
        pcrs: dict[int, bytes],
        *,
        debug: bool,
        signer: Signer,
        module_id: str,
        clock: Callable[[], float] = time.time,
        profile: CloudProfile = QINGTIAN_PROFILE,
    ) -> None:
        """``pcrs`` gives PCRs 0–15 (others zero); ``signer()`` -> (P-384 key, leaf, cabundle).

        ValueError for a PCR index outside 0–15, a value that is not 48 bytes, or a module id
        that is empty or longer than the profile allows.
        """
        maximum = profile.limits.max_module_id
        if not 0 < len(module_id.encode()) <= maximum:
            raise ValueError(f"module id must be 1..{maximum} bytes")
        self.profile = profile
        self._pcrs = [ZERO_PCR] * MAX_PCRS
        for index, value in pcrs.items():
            if not 0 <= index < BOOT_PCRS or len(value) != PCR_SIZE:
                raise ValueError(f"boot PCR {index}: index must be 0..15 and value 48 bytes")
            if not debug:
                self._pcrs[index] = bytes(value)
        self._locked = [index < BOOT_PCRS for index in range(MAX_PCRS)]
        self._lock = threading.Lock()
        self.debug, self.module_id = debug, module_id
        self._signer, self._clock = signer, clock

    # ------------------------------------------------------------------ wire interface

    def handle(self, request: bytes) -> bytes:
        """Answer one CBOR request with one CBOR response (an Error variant for bad input)."""
        try:
            response = self._dispatch(decode_request(request))
        except ModuleError as exc:
            return encode_error(exc.code)
        except Exception:  # a device answers, it never crashes
            log.exception("security module %s: internal error", self.module_id)
            return encode_error(ErrorCode.INTERNAL_ERROR)
        if len(response) > self.profile.max_response:
            return encode_error(ErrorCode.BUFFER_TOO_SMALL)
        return response

    def _dispatch(self, request: Request) -> bytes:
        match request:
            case DescribePCR(index=index):
                lock, data = self.describe_pcr(index)
                return encode_response("DescribePCR", {"lock": lock, "data": data})
            case ExtendPCR(index=index, data=data):
                return encode_response("ExtendPCR", {"data": self.extend_pcr(index, data)})
            case LockPCR(index=index):
                self.lock_pcr(index)
                return encode_response("LockPCR")
            case LockPCRs(indexes=indexes):
                self.lock_pcrs(indexes)
                return encode_response("LockPCRs")
            case DescribeNSM():
                return encode_response("DescribeNSM", self.describe())
            case Attestation(user_data=user_data, nonce=nonce, public_key=public_key):
                document = self.attestation(user_data, nonce, public_key)
                return encode_response("Attestation", {"document": document})
            case GetRandom():
                return encode_response("GetRandom", {"random": self.get_random()})
        raise ModuleError(ErrorCode.INVALID_OPERATION, f"unsupported request {request!r}")

    # ------------------------------------------------------------------ typed operations

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """(locked, value) of PCR ``index``."""
        _check_index(index)
        with self._lock:
            return self._locked[index], self._pcrs[index]

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend an unlocked PCR with ``data``; return its new value."""
        _check_index(index)
        if len(data) > MAX_REQUEST_SIZE:
            raise ModuleError(ErrorCode.INPUT_TOO_LARGE, f"{len(data)} bytes of extend data")
        with self._lock:
            if self._locked[index]:
                raise ModuleError(ErrorCode.READ_ONLY_INDEX, f"PCR{index} is locked")
            self._pcrs[index] = extend(bytes(data), self._pcrs[index])
            return self._pcrs[index]

    def lock_pcr(self, index: int) -> None:
        """Lock one PCR; ReadOnlyIndex when it already is (PCRs 0–15 always are)."""
        _check_index(index)
        with self._lock:
            if self._locked[index]:
                raise ModuleError(ErrorCode.READ_ONLY_INDEX, f"PCR{index} is already locked")
            self._locked[index] = True

    def lock_pcrs(self, indexes: tuple[int, ...] | list[int]) -> None:
        """Lock every PCR in ``indexes`` (NSM's LockPCRs{range: n} is indexes 0..n-1)."""
        for index in indexes:
            _check_index(index)
        with self._lock:
            for index in indexes:
                self._locked[index] = True

    def describe(self) -> dict:
        """The DescribeNSM fields."""
        major, minor, patch = VERSION
        with self._lock:
            locked = [index for index in range(MAX_PCRS) if self._locked[index]]
        return {
            "version_major": major,
            "version_minor": minor,
            "version_patch": patch,
            "module_id": self.module_id,
            "max_pcrs": MAX_PCRS,
            "locked_pcrs": locked,
            "digest": HASH_ALGORITHM,
        }

    def attestation(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes) over the current locked PCRs, in the
        profile's encoding; InputTooLarge for a field over the profile's limit."""
        limits = self.profile.limits
        for name, value, maximum in (
            ("user_data", user_data, limits.max_user_data),
            ("nonce", nonce, limits.max_nonce),
            ("public_key", public_key, limits.max_public_key),
        ):
            if value is not None and len(value) > maximum:
                raise ModuleError(ErrorCode.INPUT_TOO_LARGE, f"{name} over {maximum} bytes")
        with self._lock:
            pcrs = {i: self._pcrs[i] for i in range(MAX_PCRS) if self._locked[i]}
        fields = AttestationFields(self.module_id, int(self._clock() * 1000), pcrs, user_data, nonce, public_key)
        return sign_fields(self.profile, self._signer, fields)

    def get_random(self) -> bytes:
        """256 bytes from the operating system's CSPRNG."""
        return os.urandom(RANDOM_SIZE)


@dataclass(frozen=True)
class AttestationFields:
    """A document's content apart from its certificates."""

    module_id: str
    timestamp_ms: int
    pcrs: dict[int, bytes]
    user_data: bytes | None = None
    nonce: bytes | None = None
    public_key: bytes | None = None


def sign_fields(profile: CloudProfile, signer: Signer, fields: AttestationFields) -> bytes:
    """The document carrying ``fields`` and the signer's chain, signed by its leaf in the
    profile's encoding."""
    key, certificate, cabundle = signer()
    if isinstance(certificate, x509.Certificate):
        certificate = certificate.public_bytes(serialization.Encoding.DER)
    document = AttestationDocument(
        module_id=fields.module_id,
        timestamp=fields.timestamp_ms,
        pcrs=fields.pcrs,
        certificate=certificate,
        cabundle=tuple(cabundle),
        user_data=fields.user_data,
        nonce=fields.nonce,
        public_key=fields.public_key,
    )
    return profile.encoding.sign(document, key)


def _check_index(index: int) -> None:
    if not 0 <= index < MAX_PCRS:
        raise ModuleError(ErrorCode.INVALID_INDEX, f"PCR index {index} is not in 0..31")
