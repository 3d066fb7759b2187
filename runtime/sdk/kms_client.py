"""A KMS client for code inside an enclave (and for the parent side and the admin CLI).

Standard library plus ``cryptography`` ≥ 38 only.  It speaks Huawei KMS's REST shapes
(``POST /v1.0/{project_id}/kms/<api>``, JSON bodies) over HTTP/1.1 with stdlib ``http.client``
on a socket a *transport* hands it — :func:`tcp_transport` (tests, parent side) or
:func:`vsock_transport` (inside an enclave: the parent's qt-proxy at CID 3, which forwards to
the KMS).  Give ``ssl_context`` when the far end speaks TLS (a real KMS behind the proxy).

Request signing (the ``SDK-HMAC-SHA256`` scheme of Huawei's API gateway), shared with the
server's verifier::

    CanonicalRequest = METHOD \\n CanonicalURI \\n CanonicalQuery \\n CanonicalHeaders \\n
                       SignedHeaders \\n hex(SHA256(body))
    CanonicalURI     = each path segment percent-encoded (RFC 3986 unreserved kept), ending in "/"
    CanonicalQuery   = key=value pairs, percent-encoded, sorted, joined by "&"
    CanonicalHeaders = "name:value\\n" per signed header (lower-case name, trimmed value), sorted
    SignedHeaders    = the signed names joined by ";" (always host, x-sdk-date)
    StringToSign     = "SDK-HMAC-SHA256" \\n X-Sdk-Date \\n hex(SHA256(CanonicalRequest))
    Authorization: SDK-HMAC-SHA256 Access=<AK>, SignedHeaders=<names>, Signature=hex(HMAC-SHA256(SK, StringToSign))
    X-Sdk-Date:    YYYYMMDDTHHMMSSZ (UTC; the server accepts 15 minutes either way)

Recipient flow: with an ``attestor`` (``qtbuild.runtime.sdk.Qtsm`` or anything with
``attestation(user_data=None, nonce=None, public_key=None) -> bytes``), decrypt-data,
decrypt-datakey, create-datakey and gen-random send ``recipient`` = a fresh attestation document
carrying the client's RSA public key (and the call's ``nonce=``, when given); KMS answers
``ciphertext_recipient`` (a CMS envelope) and the client opens it with the private key, so
plaintext never crosses the proxy in the clear.  Without an attestor the same calls return KMS's plaintext fields.

Reaching the real service: :meth:`KmsClient.from_config` takes the endpoint, region and project
from its parameters or the environment (``KMS_ENDPOINT``, ``KMS_REGION``, ``KMS_PROJECT_ID``,
``KMS_ACCESS_KEY`` / ``KMS_SECRET_KEY`` [/ ``KMS_SECURITY_TOKEN``]; Huawei's ``HUAWEICLOUD_SDK_REGION``,
``HUAWEICLOUD_SDK_PROJECT_ID``, ``HUAWEICLOUD_SDK_AK`` / ``HUAWEICLOUD_SDK_SK`` /
``HUAWEICLOUD_SDK_SECURITY_TOKEN`` also work) and
defaults to HTTPS at the regional endpoint ``https://kms.<region>.myhuaweicloud.com``.  The
signed ``Host`` and the TLS server name are always the endpoint's, whatever transport carries the
bytes (inside an enclave: the vsock proxy), so the same code runs locally and in the cloud.

Temporary credentials (AK/SK + security token, what an enclave should be handed): give
``Credentials(..., security_token=...)``; every request then carries ``X-Security-Token``, signed.

Only fields the real APIs define are sent (encrypt-data: ``key_id``, ``plain_text``,
``additional_authenticated_data``).

Errors: a KMS error reply raises :class:`KmsClientError` (HTTP status, ``KMS.xxxx`` code,
message); a malformed reply or envelope raises :class:`KmsProtocolError`; socket failures stay
``OSError``.  A client holds one kept-alive connection and is safe to share between threads
(requests are serialised); use one client per thread for parallelism.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import http.client
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .envelope import EnvelopeError, open_envelope
from .recipient import RecipientKey

ALGORITHM = "SDK-HMAC-SHA256"
DATE_HEADER = "X-Sdk-Date"
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
API_PREFIX = "/v1.0/{project_id}/kms/"
_UNRESERVED_PATH = re.compile(r"[A-Za-z0-9._~/-]*")     # characters quote() leaves as they are
MAX_RESPONSE_SIZE = 1024 * 1024
DEFAULT_TIMEOUT = 30.0
#: Data-key ciphertexts end in a trailer of this many bytes (``runtime/kms/crypto.py``); the
#: rest is what decrypt-datakey calls ``datakey_cipher_length``.
DATAKEY_TRAILER = 100
#: Huawei Cloud's regional KMS endpoint.
REGIONAL_ENDPOINT = "https://kms.{region}.myhuaweicloud.com"
#: Environment variables read by :meth:`KmsClient.from_config`, first match wins.
ENV = {
    "endpoint": ("KMS_ENDPOINT",),
    "region": ("KMS_REGION", "HUAWEICLOUD_SDK_REGION"),
    "project_id": ("KMS_PROJECT_ID", "HUAWEICLOUD_SDK_PROJECT_ID"),
    "access_key": ("KMS_ACCESS_KEY", "HUAWEICLOUD_SDK_AK"),
    "secret_key": ("KMS_SECRET_KEY", "HUAWEICLOUD_SDK_SK"),
    "security_token": ("KMS_SECURITY_TOKEN", "HUAWEICLOUD_SDK_SECURITY_TOKEN"),
}
#: Carries the security token of temporary credentials; signed like every other header
#: (huaweicloudsdkcore's ``Credentials.sign_request`` adds it before its signer signs all headers).
SECURITY_TOKEN_HEADER = "X-Security-Token"

Transport = Callable[[], socket.socket]


class KmsClientError(Exception):
    """KMS refused the request: ``status`` (HTTP), ``code`` ("KMS.xxxx") and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class KmsProtocolError(Exception):
    """The reply is not what the protocol promises (bad JSON, missing field, bad envelope)."""


# --------------------------------------------------------------------------- signing


def canonical_uri(path: str) -> str:
    """The path with each segment percent-encoded and a trailing "/" (Huawei's signer)."""
    if _UNRESERVED_PATH.fullmatch(path):      # nothing to decode or encode (the usual case)
        encoded = path
    else:
        encoded = "/".join(quote(segment, safe="~") for segment in unquote(path).split("/"))
    return encoded if encoded.endswith("/") else encoded + "/"


def canonical_query(query: str) -> str:
    """``key=value`` pairs of the query string, percent-encoded and sorted."""
    pairs = parse_qsl(query, keep_blank_values=True)
    encoded = sorted((quote(key, safe="~"), quote(value, safe="~")) for key, value in pairs)
    return "&".join(f"{key}={value}" for key, value in encoded)


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str],
                      signed_headers: list[str], body: bytes) -> str:
    """The canonical request over ``signed_headers`` (lower-case names, present in headers).

    ``headers`` maps lower-case names to values; KeyError when a signed header is missing.
    """
    lines = "".join(f"{name}:{headers[name].strip()}\n" for name in signed_headers)
    return "\n".join((
        method.upper(), canonical_uri(path), canonical_query(query), lines,
        ";".join(signed_headers), hashlib.sha256(body).hexdigest(),
    ))


def string_to_sign(date: str, canonical: str) -> str:
    return f"{ALGORITHM}\n{date}\n{hashlib.sha256(canonical.encode()).hexdigest()}"


def signature(secret_key: str, text: str) -> str:
    """Lower-case hex HMAC-SHA256 of ``text`` under the secret key."""
    return hmac.new(secret_key.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign_request(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
                 access_key: str, secret_key: str, *, now: datetime | None = None) -> dict:
    """``headers`` plus ``X-Sdk-Date`` and ``Authorization``; every given header is signed.

    ``headers`` must include ``Host``.
    """
    moment = now or datetime.now(UTC)
    signed = dict(headers)
    signed[DATE_HEADER] = moment.astimezone(UTC).strftime(DATE_FORMAT)
    lowered = {name.lower(): value for name, value in signed.items()}
    if "host" not in lowered:
        raise ValueError("a signed request needs a Host header")
    names = sorted(lowered)
    canonical = canonical_request(method, path, query, lowered, names, body)
    mac = signature(secret_key, string_to_sign(signed[DATE_HEADER], canonical))
    signed["Authorization"] = (
        f"{ALGORITHM} Access={access_key}, SignedHeaders={';'.join(names)}, Signature={mac}"
    )
    return signed


# --------------------------------------------------------------------------- transports


def tcp_transport(host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> Transport:
    """Connect over TCP (tests, and parent-side callers)."""

    def connect() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return connect


def vsock_transport(port: int, *, cid: int = 3, timeout: float = DEFAULT_TIMEOUT,
                    config=None) -> Transport:
    """Connect to ``(cid, port)`` over vsock — the parent's qt-proxy by default.

    ``config`` is a ``VsockConfig`` (default: from the environment, see ``runtime/vsock.py``).
    """
    from .vsock import connect

    return lambda: connect(cid, port, timeout=timeout, config=config)


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection whose socket comes from a transport (optionally wrapped in TLS,
    verified against ``host``'s name, not the transport's address)."""

    def __init__(self, host: str, transport: Transport, timeout: float,
                 ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(host, timeout=timeout)
        self.header_host = host
        self._transport, self._ssl_context = transport, ssl_context

    def connect(self) -> None:
        sock = self._transport()
        sock.settimeout(self.timeout)
        if self._ssl_context is not None:
            sock = self._ssl_context.wrap_socket(sock, server_hostname=urlsplit(f"//{self.header_host}").hostname)
        self.sock = sock


@dataclass(frozen=True)
class Endpoint:
    """Where the KMS is: ``https://kms.cn-north-4.myhuaweicloud.com`` → scheme, host, port.

    ``host_header`` is what requests carry and sign (the port only when it is not the default).
    """

    scheme: str
    hostname: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"not a KMS endpoint URL (https://host[:port]): {url!r}")
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))

    @classmethod
    def resolve(cls, endpoint: str | None = None, region: str | None = None,
                environ: Mapping[str, str] | None = None) -> Endpoint:
        """``endpoint``, else ``$KMS_ENDPOINT``, else the regional endpoint of ``region`` /
        ``$KMS_REGION`` / ``$HUAWEICLOUD_SDK_REGION``; ValueError naming what to set."""
        environ = os.environ if environ is None else environ
        endpoint = endpoint or _env(environ, "endpoint")
        if endpoint:
            return cls.parse(endpoint)
        region = region or _env(environ, "region")
        if not region:
            raise ValueError("no KMS endpoint: give endpoint= or region=, or set KMS_ENDPOINT or KMS_REGION")
        return cls.parse(REGIONAL_ENDPOINT.format(region=region))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.hostname if self.port == default else f"{self.hostname}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_header}"


def _env(environ: Mapping[str, str], name: str) -> str | None:
    return next((environ[key] for key in ENV[name] if environ.get(key)), None)


# --------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class Credentials:
    """An access key / secret key pair and the project its requests address; temporary
    credentials also carry their ``security_token`` (sent as ``X-Security-Token``)."""

    access_key: str
    secret_key: str
    project_id: str
    security_token: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(access_key={self.access_key!r}, project_id={self.project_id!r})"


class ConnectedClient:
    """What the SDK's KMS clients share: one kept-alive connection (``_connection``), a lock,
    and the recipient RSA key, generated on first use unless given (``_recipient_key``)."""

    def __init__(self, host: str, transport: Transport, *, timeout: float, ssl_context: ssl.SSLContext | None,
                 recipient_key: RecipientKey | None) -> None:
        """``host`` is the Host header requests carry (and, with ``ssl_context``, the name the
        server's certificate must have); ``transport`` opens the socket to whatever carries them."""
        self._recipient_key = recipient_key
        self._connection = _Connection(host, transport, timeout, ssl_context)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def recipient_key(self) -> RecipientKey:
        with self._lock:
            if self._recipient_key is None:
                self._recipient_key = RecipientKey.generate()
            return self._recipient_key


class KmsClient(ConnectedClient):
    """Signed KMS calls over one kept-alive connection (see the module docstring)."""

    def __init__(self, transport: Transport, credentials: Credentials, *, host: str = "kms",
                 attestor=None, recipient_key: RecipientKey | None = None,
                 timeout: float = DEFAULT_TIMEOUT, ssl_context: ssl.SSLContext | None = None,
                 ) -> None:
        """``host`` is the Host header (the KMS's name); ``recipient_key`` defaults to a
        fresh RSA-2048 key, generated on the first recipient request."""
        super().__init__(host, transport, timeout=timeout, ssl_context=ssl_context, recipient_key=recipient_key)
        self.credentials = credentials
        self.attestor = attestor

    @classmethod
    def from_config(cls, credentials: Credentials | None = None, *, endpoint: str | None = None,
                    region: str | None = None, project_id: str | None = None,
                    transport: Transport | None = None, ssl_context: ssl.SSLContext | None = None,
                    environ: Mapping[str, str] | None = None, **options) -> KmsClient:
        """A client for the configured endpoint (module docstring): HTTPS by default, ``Host``
        and TLS name from the endpoint.  ``transport`` (e.g. :func:`vsock_transport` to the
        parent's proxy) carries the bytes; default: TCP to the endpoint.  ``ssl_context``
        defaults to the system's trust store.  ValueError naming a missing setting."""
        environ = os.environ if environ is None else environ
        where = Endpoint.resolve(endpoint, region, environ)
        if credentials is None:
            values = {name: _env(environ, name) for name in ("access_key", "secret_key")}
            missing = [ENV[name][0] for name, value in values.items() if not value]
            if missing:
                raise ValueError(f"no KMS credentials: set {' and '.join(missing)} (or pass credentials=)")
            credentials = Credentials(values["access_key"] or "", values["secret_key"] or "", "",
                                      _env(environ, "security_token"))
        project = project_id or credentials.project_id or _env(environ, "project_id")
        if not project:
            raise ValueError("no project id: pass project_id= or set KMS_PROJECT_ID")
        credentials = dataclasses.replace(credentials, project_id=project)
        if where.scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        if where.scheme == "http":
            ssl_context = None
        transport = transport or tcp_transport(where.hostname, where.port)
        return cls(transport, credentials, host=where.host_header, ssl_context=ssl_context, **options)

    # ------------------------------------------------------------------ data-plane calls

    def encrypt_data(self, key_id: str, plaintext: bytes | str, aad: bytes | None = None) -> str:
        """encrypt-data: the base64 ``cipher_text`` of 1–4096 bytes of UTF-8 text (the API's
        ``plain_text`` is text: base64-encode binary data first; ValueError otherwise)."""
        if isinstance(plaintext, (bytes, bytearray, memoryview)):
            try:
                plaintext = bytes(plaintext).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("encrypt-data carries UTF-8 text (plain_text): base64-encode binary data") from None
        body = {"key_id": key_id, "plain_text": plaintext}
        if aad is not None:
            body["additional_authenticated_data"] = _text(aad)
        return _field(self.call("encrypt-data", body), "cipher_text", str)

    def decrypt_data(self, cipher_text: str, aad: bytes | str | None = None, *,
                     nonce: bytes | None = None) -> bytes:
        """decrypt-data: the plaintext (opened from the recipient envelope with an attestor;
        ``nonce`` goes into that attestation document)."""
        body = {"cipher_text": cipher_text}
        if aad is not None:
            body["additional_authenticated_data"] = _text(aad)
        plaintext, reply = self._recipient_call("decrypt-data", body, nonce)
        if plaintext is None:
            if isinstance(reply.get("plain_text_base64"), str):
                plaintext = _unbase64(reply["plain_text_base64"], "plain_text_base64")
            else:
                plaintext = _field(reply, "plain_text", str).encode("utf-8")
        return plaintext

    def decrypt_datakey(self, key_id: str, cipher_text: str, *, nonce: bytes | None = None) -> bytes:
        """decrypt-datakey: the data key, from a create-datakey ``cipher_text`` (hex)."""
        body = {"key_id": key_id, "cipher_text": cipher_text,
                "datakey_cipher_length": str(max(len(cipher_text) // 2 - DATAKEY_TRAILER, 0))}
        plaintext, reply = self._recipient_call("decrypt-datakey", body, nonce)
        if plaintext is None:
            plaintext = _unhex(_field(reply, "data_key", str), "data_key")
        return plaintext

    def create_datakey(self, key_id: str, bits: int = 256, *, nonce: bytes | None = None) -> tuple[bytes, str]:
        """create-datakey: (data key, its ``cipher_text`` hex to store beside the data)."""
        body = {"key_id": key_id, "datakey_length": str(bits)}
        plaintext, reply = self._recipient_call("create-datakey", body, nonce)
        if plaintext is None:
            plaintext = _unhex(_field(reply, "plain_text", str), "plain_text")
        return plaintext, _field(reply, "cipher_text", str)

    def gen_random(self, bits: int = 256, *, nonce: bytes | None = None) -> bytes:
        """gen-random: ``bits`` / 8 random bytes (8–8192 bits, a multiple of 8)."""
        plaintext, reply = self._recipient_call("gen-random", {"random_data_length": str(bits)}, nonce)
        if plaintext is None:
            plaintext = _unhex(_field(reply, "random_data", str), "random_data")
        return plaintext

    # ------------------------------------------------------------------ plumbing

    def recipient(self, nonce: bytes | None = None) -> dict:
        """The ``recipient`` request field: a fresh document over this client's public key
        (and ``nonce``, when given: the attestor is called with ``nonce=`` only then)."""
        key = self.recipient_key
        extra = {} if nonce is None else {"nonce": nonce}
        document = self.attestor.attestation(public_key=key.public_key_der, **extra)
        return {"attestation_document": _b64(document),
                "key_encryption_algorithm": KEY_ENCRYPTION_ALGORITHM}

    def _recipient_call(self, api: str, body: dict, nonce: bytes | None = None) -> tuple[bytes | None, dict]:
        """(opened plaintext, reply) with an attestor; (None, reply) without one."""
        if self.attestor is None:
            if nonce is not None:
                raise ValueError("nonce= needs an attestor: without one no attestation document is sent")
            return None, self.call(api, body)
        reply = self.call(api, {**body, "recipient": self.recipient(nonce)})
        envelope = _unbase64(_field(reply, "ciphertext_recipient", str), "ciphertext_recipient")
        try:
            return open_envelope(envelope, self.recipient_key.private_key), reply
        except EnvelopeError as exc:
            raise KmsProtocolError(f"ciphertext_recipient: {exc}") from None

    def call(self, api: str, body: dict) -> dict:
        """POST ``body`` to ``/v1.0/{project_id}/kms/<api>``; the decoded JSON reply."""
        path = API_PREFIX.format(project_id=self.credentials.project_id) + api
        payload = json.dumps(body, separators=(",", ":")).encode()
        with self._lock:
            status, data = self._exchange(path, payload)
        return _decode_reply(status, data)

    def _exchange(self, path: str, payload: bytes) -> tuple[int, bytes]:
        """One request; retried once on a fresh connection if a kept-alive one was closed."""
        for attempt in (1, 2):
            reused = self._connection.sock is not None
            try:
                return self._send(path, payload)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._connection.close()
                if attempt == 2 or not reused:
                    raise
            except BaseException:
                self._connection.close()
                raise
        raise AssertionError("unreachable")

    def _send(self, path: str, payload: bytes) -> tuple[int, bytes]:
        headers = {"Host": self._connection.header_host, "Content-Type": "application/json"}
        if self.credentials.security_token:
            headers[SECURITY_TOKEN_HEADER] = self.credentials.security_token
        headers = sign_request("POST", path, "", headers, payload,
                               self.credentials.access_key, self.credentials.secret_key)
        self._connection.request("POST", path, body=payload, headers=headers)
        response = self._connection.getresponse()
        data = response.read(MAX_RESPONSE_SIZE + 1)
        if len(data) > MAX_RESPONSE_SIZE:
            self._connection.close()
            raise KmsProtocolError(f"reply larger than {MAX_RESPONSE_SIZE} bytes")
        if response.will_close:
            self._connection.close()
        return response.status, data


def _decode_reply(status: int, data: bytes) -> dict:
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if 200 <= status < 300:
        if not isinstance(reply, dict):
            raise KmsProtocolError(f"HTTP {status} with a body that is not a JSON object")
        return reply
    error = reply.get("error") if isinstance(reply, dict) else None
    if isinstance(reply, dict) and "error_code" in reply:     # the API gateway's flat body
        error = reply
    if isinstance(error, dict):
        raise KmsClientError(status, str(error.get("error_code", "")), str(error.get("error_msg", "")))
    raise KmsClientError(status, "", data[:200].decode("utf-8", "replace"))


def _field(reply: dict, name: str, kind: type):
    value = reply.get(name)
    if not isinstance(value, kind):
        raise KmsProtocolError(f"reply lacks {name!r} ({kind.__name__})")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text(data: bytes | str) -> str:
    return data if isinstance(data, str) else data.decode("utf-8")


def _unbase64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KmsProtocolError(f"{name} is not base64") from None


def _unhex(text: str, name: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KmsProtocolError(f"{name} is not hex") from None

