"""Signing keys held by a KMS (Huawei KMS's asymmetric EC keys, or ``qtbuild kms serve``):
``--private-key kms://…``.

The key is named by a URI::

    kms://HOST[:PORT]/PROJECT_ID/KEY_ID          HTTPS (the system trust store checks the server)
    kms+http://127.0.0.1:PORT/PROJECT_ID/KEY_ID  plain HTTP, accepted only to a loopback address

The request-signing keys (SDK-HMAC-SHA256 access key / secret key) come from ``--kms-credentials
FILE`` (a JSON file with ``access_key`` and ``secret_key``, as ``qtbuild kms principal create
--out`` writes it; its ``endpoint`` and ``project_id`` are ignored: the URI names both) or from
the environment (``KMS_ACCESS_KEY`` / ``KMS_SECRET_KEY``, or Huawei's ``HUAWEICLOUD_SDK_AK`` /
``HUAWEICLOUD_SDK_SK``).  They never appear in the URI, so the URI can be logged.

:class:`KmsPrivateKey` fetches the public key once (``get-publickey``; the signer then checks it
against the signing certificate) and signs each digest with ``sign`` (``message_type`` DIGEST,
``signing_algorithm`` ``ECDSA_SHA_<bits>`` of the digest: SHA-384 for P-384, SHA-256 for P-256,
as COSE and DSSE choose by curve).  The KMS's signature (DER, as Huawei and AWS return it; raw
``r ‖ s`` is accepted too) is checked against the public key before use and handed on as DER,
which the COSE writer turns into COSE's raw ``r ‖ s``.  The KMS's principal needs the policy
actions ``kms:cmk:getPublicKey`` and ``kms:cmk:sign`` on the key.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from qtbuild.formats.errors import SignatureError
from qtbuild.remote_keys import RemoteEcPrivateKey

SCHEMES = {"kms": "https", "kms+http": "http"}
#: The ECDSA signing algorithm (Huawei's names) for each digest length.
ALGORITHMS: dict[int, tuple[str, hashes.HashAlgorithm]] = {
    32: ("ECDSA_SHA_256", hashes.SHA256()), 48: ("ECDSA_SHA_384", hashes.SHA384()),
    64: ("ECDSA_SHA_512", hashes.SHA512())}
TIMEOUT = 30.0
#: nitro-cli's (aws-nitro-enclaves-image-format's eif_signer) pattern for a KMS key ARN in --private-key.
AWS_KMS_KEY_ARN = re.compile(r"arn:aws(?:[-a-z]+)?:kms:[a-z0-9-]+:\d{12}:key[:/][A-Za-z0-9-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FORM = "kms://HOST[:PORT]/PROJECT_ID/KEY_ID"


def is_kms_uri(text: object) -> bool:
    return isinstance(text, str) and text.split("://", 1)[0] in SCHEMES and "://" in text


def refuse_aws_kms_arn(text: object) -> None:
    """SignatureError for an AWS KMS key ARN (what nitro-cli's --private-key accepts), which
    qtbuild cannot sign with yet, instead of "no such file"."""
    if isinstance(text, str) and AWS_KMS_KEY_ARN.fullmatch(text):
        raise SignatureError(f"{text}: AWS KMS key ARNs are not supported yet (the local KMS's AWS protocol has no "
                             "Sign); use a kms:// key (Huawei KMS API), a pkcs11: URI or a PEM file")


@dataclass(frozen=True)
class KmsKeyUri:
    """Where the key is: the endpoint URL (``https://host[:port]``), the project and the key id."""

    endpoint: str
    project_id: str
    key_id: str

    @classmethod
    def parse(cls, uri: str) -> KmsKeyUri:
        """Parse ``uri``; SignatureError naming what is wrong and the expected form."""
        parts = urlsplit(uri)
        if parts.scheme not in SCHEMES:
            raise SignatureError(f"{uri!r} is not a KMS key URI ({_FORM})")
        if parts.username is not None or parts.password is not None:
            raise SignatureError(f"{parts.scheme}://…: credentials do not go in the URI; "
                                 "use --kms-credentials FILE or KMS_ACCESS_KEY/KMS_SECRET_KEY")
        try:
            hostname, _ = parts.hostname, parts.port
        except ValueError:
            raise SignatureError(f"{uri}: the port is not a number 1-65535 ({_FORM})") from None
        segments = parts.path.strip("/").split("/")
        if (not hostname or parts.query or parts.fragment or len(segments) != 2
                or not all(_SEGMENT.fullmatch(segment) for segment in segments)):
            raise SignatureError(f"{uri}: expected {_FORM}")
        scheme = SCHEMES[parts.scheme]
        if scheme == "http" and not _is_loopback(hostname):
            raise SignatureError(f"{uri}: plain HTTP only to a loopback address (127.0.0.1, ::1); "
                                 f"use kms://{parts.netloc}/… (HTTPS)")
        return cls(f"{scheme}://{parts.netloc}", segments[0], segments[1])


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def kms_credentials(path: str | None):
    """The request-signing credentials from ``path`` (see the module docstring), or None to
    take them from the environment.  SignatureError for an unreadable or malformed file."""
    if path is None:
        return None
    from qtbuild.runtime.kms.state import read_credentials

    try:
        return read_credentials(path)[1]
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the KMS credentials file ({exc.strerror})") from None
    except ValueError as exc:
        raise SignatureError(f"{exc} (expected JSON with endpoint, access_key, secret_key, project_id)") from None


class KmsPrivateKey(RemoteEcPrivateKey):
    """An EC private key in a KMS, usable where qtbuild takes a cryptography EC key."""

    holder = "a KMS"

    def __init__(self, uri: str, credentials=None, *, ssl_context=None) -> None:
        """Connect and fetch the public key; SignatureError naming the problem when the KMS
        cannot be reached, refuses, or the key is not an EC signing key."""
        from qtbuild.runtime.sdk.kms_client import Credentials, KmsClient

        self.uri = KmsKeyUri.parse(uri)
        self._where = uri
        if credentials is not None:
            credentials = Credentials(credentials.access_key, credentials.secret_key, self.uri.project_id)
        try:
            self._client = KmsClient.from_config(credentials, endpoint=self.uri.endpoint,
                                                 project_id=self.uri.project_id, ssl_context=ssl_context,
                                                 environ=None, timeout=TIMEOUT)
        except ValueError as exc:
            raise SignatureError(f"{self._where}: {exc}; or give --kms-credentials FILE") from None
        reply = self._call("get-publickey", {"key_id": self.uri.key_id})
        try:
            public = serialization.load_pem_public_key(str(reply.get("public_key", "")).encode())
        except ValueError:
            raise SignatureError(f"{self._where}: the KMS's public_key is not a PEM public key") from None
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SignatureError(f"{self._where}: the key is not an EC key (create it with key_spec EC_P384 "
                                 "or EC_P256 and key_usage SIGN_VERIFY)")
        self._public = public

    def _call(self, api: str, body: dict) -> dict:
        from qtbuild.runtime.sdk.kms_client import KmsClientError, KmsProtocolError

        try:
            return self._client.call(api, body)
        except KmsClientError as exc:
            raise SignatureError(f"{self._where}: the KMS refused {api}: HTTP {exc.status} {exc.code} "
                                 f"{exc.message}".rstrip()) from None
        except KmsProtocolError as exc:
            raise SignatureError(f"{self._where}: unexpected reply to {api}: {exc}") from None
        except ssl.SSLError as exc:
            raise SignatureError(f"{self._where}: TLS with the KMS at {self.uri.endpoint} failed: {exc.reason or exc} "
                                 "(is its CA in the system trust store, or in SSL_CERT_FILE?)") from None
        except OSError as exc:
            raise SignatureError(f"{self._where}: cannot reach the KMS at {self.uri.endpoint}: "
                                 f"{exc.strerror or exc}") from None

    def _sign_digest(self, digest: bytes) -> bytes:
        import base64
        import binascii

        if len(digest) not in ALGORITHMS:
            raise SignatureError(f"{self._where}: no ECDSA algorithm for a {len(digest)}-byte digest")
        name, algorithm = ALGORITHMS[len(digest)]
        reply = self._call("sign", {"key_id": self.uri.key_id, "message": base64.b64encode(digest).decode(),
                                    "signing_algorithm": name, "message_type": "DIGEST"})
        try:
            signature = base64.b64decode(str(reply.get("signature", "")), validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError(f"{self._where}: the KMS's signature is not base64") from None
        der = self._as_der(signature)
        try:
            self._public.verify(der, digest, ec.ECDSA(Prehashed(algorithm)))
        except InvalidSignature:
            raise SignatureError(f"{self._where}: the KMS's signature does not verify with its public key") from None
        return der

    def _as_der(self, signature: bytes) -> bytes:
        """DER as is; raw ``r ‖ s`` of the curve's size re-encoded as DER."""
        size = (self._public.curve.key_size + 7) // 8
        try:
            decode_dss_signature(signature)
            return signature
        except ValueError:
            if len(signature) != 2 * size:
                raise SignatureError(f"{self._where}: the KMS's signature is neither DER nor raw r||s") from None
        return encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))

    def close(self) -> None:
        self._client.close()
