"""The parent's side of the hand-off (protocol: :mod:`qtbuild.runtime.sdk.handoff`): connect to
an enclave, verify the attestation document it answers with, seal the job to the key in it,
and wait for its result.

The document must chain to a trusted root, carry the nonce the parent just sent and the
protocol's user_data, be fresh, not come from a debug-mode enclave (unless allowed), and match
every expected PCR; otherwise the enclave gets ``{"error": …}`` and nothing else, and
:class:`HandoffRefused` says which check failed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from qtbuild.runtime.kms import cms
from qtbuild.runtime.sdk import vsock
from qtbuild.runtime.sdk.handoff import (
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    MAX_MESSAGE,
    PROTOCOL,
    USER_DATA,
    HandoffError,
    new_nonce,
    read_message,
    send_message,
)
from qtbuild.runtime.verifier.attestation import AttestationError, VerifiedDocument, verify_document

# The enclave's whole job, sealed, must fit one message once base64-encoded.
MAX_JOB = 40 * 1024


class HandoffRefused(HandoffError):
    """The enclave's attestation document failed a check; ``check`` names it."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"attestation document refused ({check}): {message}")
        self.check = check


@dataclass(frozen=True)
class Trust:
    """What the parent accepts: roots (certificates or SHA-256 fingerprints), expected PCRs
    (index → raw bytes), the oldest document in seconds, and whether debug mode is allowed."""

    roots: tuple[x509.Certificate, ...] = ()
    root_fingerprints: tuple[str, ...] = ()
    expect_pcrs: dict[int, bytes] = field(default_factory=dict)
    max_age: float = 60.0
    allow_debug: bool = False


@dataclass(frozen=True)
class Outcome:
    """The enclave's result, the document it attested with, and that document's bytes (for
    ``qtbuild kms policy check --document``)."""

    result: object
    document: VerifiedDocument
    document_bytes: bytes


def hand_off(cid: int, job: dict, trust: Trust, *, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT,
             result_timeout: float | None = None, config: vsock.VsockConfig | None = None) -> Outcome:
    """Give enclave ``cid`` (listening on ``port``) its ``job`` once it has attested, and
    return its result.  ``timeout`` bounds connecting and each hand-off message;
    ``result_timeout`` (default ``timeout``) the wait for the result.  Raises HandoffRefused,
    HandoffError, OSError."""
    payload = json.dumps(job, separators=(",", ":")).encode()
    if len(payload) > MAX_JOB:
        raise HandoffError(f"the job is {len(payload)} bytes; at most {MAX_JOB} go through the hand-off")
    with _connect_when_listening(cid, port, timeout, config) as connection:
        buffer = bytearray()
        document, document_bytes = _attested(connection, buffer, trust)
        sealed = cms.envelope(payload, _rsa_key(connection, document))
        send_message(connection, {"job": base64.b64encode(sealed).decode()})
        connection.settimeout(result_timeout or timeout)
        try:
            answer = read_message(connection, buffer)
        except HandoffError:
            raise HandoffError("the enclave took the job but closed the connection without a result (did the "
                               "app fail? run it with --attach-console to see its output)") from None
    if "result" not in answer:
        raise HandoffError("the enclave answered without a result")
    return Outcome(answer["result"], document, document_bytes)


def _connect_when_listening(cid: int, port: int, timeout: float, config: vsock.VsockConfig | None) -> socket.socket:
    """Connect, retrying while nobody listens yet (the enclave is still booting) for ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return vsock.connect(cid, port, timeout=timeout, config=config)
        except ConnectionError:
            if time.monotonic() >= deadline:
                raise ConnectionRefusedError(f"nothing listens on vsock {cid}:{port} after {timeout:g} s "
                                             f"(is the enclave running, and does it call receive_job({port})?)"
                                             ) from None
            time.sleep(0.1)


def _attested(connection: socket.socket, buffer: bytearray, trust: Trust) -> tuple[VerifiedDocument, bytes]:
    nonce = new_nonce()
    send_message(connection, {"handoff": PROTOCOL, "nonce": nonce.hex()})
    message = read_message(connection, buffer)
    try:
        data = base64.b64decode(str(message.get("attestation_document", "")), validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if not 0 < len(data) <= MAX_MESSAGE:
        _refuse(connection, HandoffRefused("input", "no attestation_document"))
    try:
        document = verify_document(
            data, roots=list(trust.roots), root_fingerprints=list(trust.root_fingerprints),
            expect_pcrs=trust.expect_pcrs or None, nonce=nonce, max_age=trust.max_age,
            allow_debug=trust.allow_debug)
    except AttestationError as error:
        _refuse(connection, HandoffRefused(error.check, error.message))
    if document.user_data != USER_DATA:
        _refuse(connection, HandoffRefused("user_data", f"expected {USER_DATA!r}"))
    if not document.public_key:
        _refuse(connection, HandoffRefused("public_key", "the document carries no public key"))
    return document, data


def _rsa_key(connection: socket.socket, document: VerifiedDocument) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(document.public_key or b"")
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        _refuse(connection, HandoffRefused("public_key", "not an RSA key of 2048 bits or more"))
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def _refuse(connection: socket.socket, error: HandoffRefused) -> NoReturn:
    """Tell the enclave why, then raise ``error``."""
    with contextlib.suppress(OSError):
        send_message(connection, {"error": str(error)})
    raise error
