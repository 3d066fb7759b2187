"""The enclave's side of the hand-off: receive a job and short-lived credentials from the parent
over vsock, after proving what it is; send the result back the same way.

Why: an image's bytes are public to anyone holding the EIF, so nothing secret may be baked into
it.  Access keys, ciphertexts and inputs arrive at run time, from the parent, and only after the
enclave has attested — the parent checks the document (its chain, PCR0 …) and seals the job to
the RSA key inside it, so only this enclave, in this boot, can open it.  In normal mode (the
only mode the KMS accepts) there is no console either: the result goes back on the same
connection.  The parent side is ``qtbuild handoff`` / ``qtbuild.runtime.handoff.hand_off``.

Protocol (one vsock connection, the parent connects to the enclave's port; each message one
line of JSON ≤ 64 KiB)::

    parent  → enclave  {"handoff": "qtbuild-handoff/1", "nonce": "<64 hex digits>"}
    enclave → parent   {"attestation_document": "<base64>"}   nonce, public_key = RSA-2048 SPKI,
                                                               user_data = b"qtbuild-handoff/1"
    parent  → enclave  {"job": "<base64 CMS EnvelopedData>"}  (or {"error": "..."}: refused)
    enclave → parent   {"result": <any JSON>}                 Job.reply(...)

Usage, inside the enclave::

    from qtbuild_sdk import Qtsm, receive_job

    with Qtsm() as qtsm, receive_job(5000, attestor=qtsm) as job:
        kms = job.kms_client(vsock_port=8000, attestor=qtsm)   # job["credentials"] inside
        job.reply({"status": "ok", ...})
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import socket

from .envelope import EnvelopeError, open_envelope
from .kms_client import Credentials, KmsClient, vsock_transport
from .recipient import RecipientKey
from .vsock import listen

PROTOCOL = "qtbuild-handoff/1"
USER_DATA = PROTOCOL.encode()
DEFAULT_PORT = 5000
NONCE_SIZE = 32
MAX_MESSAGE = 64 * 1024
DEFAULT_TIMEOUT = 60.0


class HandoffError(Exception):
    """The hand-off failed: the parent refused the document, or a message was malformed."""


def send_message(connection: socket.socket, message: dict) -> None:
    """One line of JSON (≤ MAX_MESSAGE bytes)."""
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE:
        raise HandoffError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    connection.sendall(data)


def read_message(connection: socket.socket, buffer: bytearray) -> dict:
    """The next line of JSON from ``connection``; ``buffer`` keeps bytes read past it."""
    while b"\n" not in buffer:
        if len(buffer) > MAX_MESSAGE:
            raise HandoffError(f"message longer than {MAX_MESSAGE} bytes")
        chunk = connection.recv(MAX_MESSAGE)
        if not chunk:
            raise HandoffError("the peer closed the connection mid-hand-off")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    try:
        message = json.loads(line)
    except ValueError:
        raise HandoffError("a hand-off message is not JSON") from None
    if not isinstance(message, dict):
        raise HandoffError("a hand-off message is not a JSON object")
    return message


class Job:
    """A job the parent handed over: ``job.payload`` (dict), ``job["name"]``, :meth:`reply`.

    A context manager: leaving it closes the connection.  If the block raises before
    :meth:`reply`, the parent gets ``{"status": "error", "error": "<exception type>"}`` — the
    type only, since a message may quote secret data."""

    def __init__(self, payload: dict, connection: socket.socket) -> None:
        self.payload = payload
        self._connection = connection
        self.replied = False

    def __getitem__(self, name: str):
        return self.payload[name]

    def get(self, name: str, default=None):
        return self.payload.get(name, default)

    @property
    def credentials(self) -> Credentials:
        """The KMS credentials the parent put in the job (``"credentials"``: access_key,
        secret_key, project_id, and the security_token of short-lived ones)."""
        fields = self.payload.get("credentials")
        if not isinstance(fields, dict):
            raise HandoffError("the job carries no credentials")
        try:
            token = fields.get("security_token")
            return Credentials(str(fields["access_key"]), str(fields["secret_key"]), str(fields["project_id"]),
                               security_token=str(token) if token else None)
        except KeyError as exc:
            raise HandoffError(f"the job's credentials lack {exc.args[0]}") from None

    def kms_client(self, vsock_port: int, *, attestor, host: str = "kms", **options) -> KmsClient:
        """A KmsClient signing with :attr:`credentials`, through the parent's proxy on
        ``vsock_port`` (CID 3), attesting with ``attestor``."""
        return KmsClient(vsock_transport(vsock_port), self.credentials, host=host, attestor=attestor, **options)

    def reply(self, result: object) -> None:
        """Send ``result`` (anything JSON can encode, ≤ 64 KiB) back to the parent."""
        send_message(self._connection, {"result": result})
        self.replied = True

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is not None and not self.replied and not issubclass(exc_type, SystemExit):
                with contextlib.suppress(OSError, HandoffError):
                    self.reply({"status": "error", "error": exc_type.__name__})
        finally:
            self.close()


def receive_job(port: int = DEFAULT_PORT, *, attestor, timeout: float | None = None,
                recipient_key: RecipientKey | None = None, config=None) -> Job:
    """Listen on vsock ``port``, accept the parent, attest (its nonce, a fresh RSA key) and
    return the job it sealed to that key.  ``timeout`` bounds the wait for the parent (None:
    forever) and each message after it (DEFAULT_TIMEOUT when None).  HandoffError when the
    parent refuses the document or breaks the protocol."""
    listener = listen(port, config=config)
    try:
        connection, _peer = listener.accept(timeout=timeout)
    finally:
        listener.close()
    try:
        connection.settimeout(timeout or DEFAULT_TIMEOUT)
        return Job(_exchange(connection, attestor, recipient_key or RecipientKey.generate()), connection)
    except BaseException:
        connection.close()
        raise


def _exchange(connection: socket.socket, attestor, key: RecipientKey) -> dict:
    buffer = bytearray()
    hello = read_message(connection, buffer)
    if hello.get("handoff") != PROTOCOL:
        raise HandoffError(f"not a {PROTOCOL} parent")
    nonce = _unhex(hello.get("nonce"), "nonce")
    document = attestor.attestation(user_data=USER_DATA, nonce=nonce, public_key=key.public_key_der)
    send_message(connection, {"attestation_document": base64.b64encode(document).decode()})
    answer = read_message(connection, buffer)
    if "error" in answer:
        raise HandoffError(f"the parent refused: {str(answer['error'])[:300]}")
    try:
        sealed = base64.b64decode(str(answer.get("job", "")), validate=True)
        payload = json.loads(open_envelope(sealed, key.private_key))
    except (binascii.Error, ValueError, EnvelopeError) as exc:
        raise HandoffError(f"the job is not a sealed JSON object: {exc}") from None
    if not isinstance(payload, dict):
        raise HandoffError("the job is not a JSON object")
    return payload


def _unhex(value: object, name: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * NONCE_SIZE:
        raise HandoffError(f"{name}: expected {2 * NONCE_SIZE} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise HandoffError(f"{name}: not hex") from None


def new_nonce() -> bytes:
    """A fresh hand-off nonce."""
    return os.urandom(NONCE_SIZE)
