"""AWS KMS for code inside a Nitro enclave (``--cloud nitro``): SigV4-signed JSON 1.1 calls with
the attested ``Recipient``.  Standard library plus ``cryptography`` ≥ 38 (through the envelope
opener), like the rest of the SDK.

Wire form (AWS KMS API, botocore's ``kms`` service model)::

    POST / HTTP/1.1
    Host: kms.<region>.amazonaws.com
    Content-Type: application/x-amz-json-1.1
    X-Amz-Target: TrentService.<Operation>
    X-Amz-Date: YYYYMMDDTHHMMSSZ            (X-Amz-Security-Token with temporary credentials)
    Authorization: AWS4-HMAC-SHA256 Credential=<AKID>/<date>/<region>/kms/aws4_request,
                   SignedHeaders=<names>, Signature=<hex>

Signature Version 4: canonical request = method, URI, query, the signed headers (every header
sent, lower-case, sorted), their names, hex SHA-256 of the body; string to sign =
``AWS4-HMAC-SHA256``, the date, the scope, hex SHA-256 of the canonical request; key =
HMAC-SHA256 chain of ``"AWS4" + secret`` over date, region, ``kms``, ``aws4_request``.

With an ``attestor`` (``Qtsm`` or anything with ``attestation(public_key=…)``), Decrypt,
GenerateDataKey and GenerateRandom carry ``"Recipient": {"AttestationDocument": b64,
"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}``; AWS answers ``CiphertextForRecipient`` (BER
CMS, opened here with the client's RSA key) instead of ``Plaintext``.

Endpoint and settings: parameters, else ``AWS_ENDPOINT_URL_KMS`` / ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` / ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``; default endpoint ``https://kms.<region>.amazonaws.com``.  The signed Host
and TLS name are the endpoint's whatever transport carries the bytes (the vsock proxy).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .envelope import EnvelopeError, open_envelope
from .kms_client import (
    DEFAULT_TIMEOUT,
    MAX_RESPONSE_SIZE,
    ConnectedClient,
    Endpoint,
    KmsClientError,
    KmsProtocolError,
    Transport,
    canonical_query,
    tcp_transport,
)
from .recipient import RecipientKey

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "kms"
TARGET_PREFIX = "TrentService"
CONTENT_TYPE = "application/x-amz-json-1.1"
REGIONAL_ENDPOINT = "https://kms.{region}.amazonaws.com"
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"


@dataclass(frozen=True)
class AwsCredentials:
    """An access key pair, with the session token of temporary credentials."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"AwsCredentials(access_key_id={self.access_key_id!r})"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sigv4_sign(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
               credentials: AwsCredentials, region: str, *, service: str = SERVICE,
               now: datetime | None = None) -> dict:
    """``headers`` (which must include Host) plus X-Amz-Date, the session token and
    Authorization; every given header is signed."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date, day = moment.strftime("%Y%m%dT%H%M%SZ"), moment.strftime("%Y%m%d")
    signed = dict(headers)
    signed["X-Amz-Date"] = amz_date
    if credentials.session_token:
        signed["X-Amz-Security-Token"] = credentials.session_token
    lowered = {name.lower(): " ".join(str(value).split()) for name, value in signed.items()}
    if "host" not in lowered:
        raise ValueError("a signed request needs a Host header")
    names = sorted(lowered)
    canonical = "\n".join((method.upper(), path or "/", canonical_query(query),
                           "".join(f"{name}:{lowered[name]}\n" for name in names), ";".join(names), _sha256(body)))
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join((ALGORITHM, amz_date, scope, _sha256(canonical.encode())))
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    signed["Authorization"] = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                               f"SignedHeaders={';'.join(names)}, Signature={signature}")
    return signed


class AwsKmsClient(ConnectedClient):
    """AWS KMS calls over one kept-alive connection (see the module docstring)."""

    def __init__(self, credentials: AwsCredentials, region: str, *, endpoint: str | None = None,
                 transport: Transport | None = None, attestor=None, recipient_key: RecipientKey | None = None,
                 ssl_context: ssl.SSLContext | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        where = Endpoint.parse(endpoint or REGIONAL_ENDPOINT.format(region=region))
        if where.scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        super().__init__(where.host_header, transport or tcp_transport(where.hostname, where.port), timeout=timeout,
                         ssl_context=ssl_context if where.scheme == "https" else None, recipient_key=recipient_key)
        self.credentials, self.region, self.attestor = credentials, region, attestor

    @classmethod
    def from_config(cls, *, region: str | None = None, endpoint: str | None = None,
                    credentials: AwsCredentials | None = None, environ: Mapping[str, str] | None = None,
                    **options) -> AwsKmsClient:
        """Settings from the parameters, else the AWS environment variables; ValueError naming
        what is missing."""
        environ = os.environ if environ is None else environ
        region = region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ValueError("no AWS region: pass region= or set AWS_REGION")
        if credentials is None:
            access, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
            if not access or not secret:
                raise ValueError("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            credentials = AwsCredentials(access, secret, environ.get("AWS_SESSION_TOKEN") or None)
        return cls(credentials, region, endpoint=endpoint or environ.get("AWS_ENDPOINT_URL_KMS"), **options)

    # ------------------------------------------------------------------ operations

    def encrypt(self, key_id: str, plaintext: bytes) -> bytes:
        """Encrypt: the ``CiphertextBlob`` (1–4096 bytes of plaintext)."""
        reply = self.call("Encrypt", {"KeyId": key_id, "Plaintext": _b64(plaintext)})
        return _blob(reply, "CiphertextBlob")

    def decrypt(self, ciphertext_blob: bytes, *, key_id: str | None = None,
                encryption_context: dict[str, str] | None = None) -> bytes:
        """Decrypt: the plaintext (opened from the recipient envelope with an attestor)."""
        body: dict = {"CiphertextBlob": _b64(ciphertext_blob)}
        if key_id is not None:
            body["KeyId"] = key_id
        if encryption_context is not None:
            body["EncryptionContext"] = dict(encryption_context)
        return self._plaintext(self._recipient_call("Decrypt", body))

    def generate_data_key(self, key_id: str, key_spec: str = "AES_256") -> tuple[bytes, bytes]:
        """GenerateDataKey: (data key, its ``CiphertextBlob`` to store beside the data)."""
        reply = self._recipient_call("GenerateDataKey", {"KeyId": key_id, "KeySpec": key_spec})
        return self._plaintext(reply), _blob(reply, "CiphertextBlob")

    def generate_random(self, number_of_bytes: int = 32) -> bytes:
        """GenerateRandom: ``number_of_bytes`` random bytes (1–1024)."""
        return self._plaintext(self._recipient_call("GenerateRandom", {"NumberOfBytes": number_of_bytes}))

    # ------------------------------------------------------------------ plumbing

    def recipient(self) -> dict:
        """The ``Recipient`` request member: a fresh document over this client's public key."""
        document = self.attestor.attestation(public_key=self.recipient_key.public_key_der)
        return {"AttestationDocument": _b64(document), "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM}

    def _recipient_call(self, operation: str, body: dict) -> dict:
        if self.attestor is not None:
            body = {**body, "Recipient": self.recipient()}
        return self.call(operation, body)

    def _plaintext(self, reply: dict) -> bytes:
        if self.attestor is None:
            return _blob(reply, "Plaintext")
        try:
            return open_envelope(_blob(reply, "CiphertextForRecipient"), self.recipient_key.private_key)
        except EnvelopeError as exc:
            raise KmsProtocolError(f"CiphertextForRecipient: {exc}") from None

    def call(self, operation: str, body: dict) -> dict:
        """POST one operation; the decoded JSON reply, or KmsClientError(status, __type, message)."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Host": self._connection.header_host, "Content-Type": CONTENT_TYPE,
                   "X-Amz-Target": f"{TARGET_PREFIX}.{operation}"}
        with self._lock:
            headers = sigv4_sign("POST", "/", "", headers, payload, self.credentials, self.region)
            try:
                self._connection.request("POST", "/", body=payload, headers=headers)
                response = self._connection.getresponse()
                data = response.read(MAX_RESPONSE_SIZE + 1)
            except BaseException:
                self._connection.close()
                raise
            if len(data) > MAX_RESPONSE_SIZE or response.will_close:
                self._connection.close()
        if len(data) > MAX_RESPONSE_SIZE:
            raise KmsProtocolError(f"reply larger than {MAX_RESPONSE_SIZE} bytes")
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            reply = None
        if 200 <= response.status < 300 and isinstance(reply, dict):
            return reply
        if isinstance(reply, dict):
            kind = str(reply.get("__type", "")).rsplit("#", 1)[-1]
            raise KmsClientError(response.status, kind, str(reply.get("message") or reply.get("Message") or ""))
        raise KmsClientError(response.status, "", data[:200].decode("utf-8", "replace"))


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _blob(reply: dict, name: str) -> bytes:
    value = reply.get(name)
    if not isinstance(value, str):
        raise KmsProtocolError(f"reply lacks {name!r}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise KmsProtocolError(f"{name} is not base64") from None
