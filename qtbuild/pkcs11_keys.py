"""Signing keys held in a PKCS#11 token (an HSM, or SoftHSM2 in tests): ``--private-key pkcs11:…``.

The key is named by an RFC 7512 PKCS#11 URI; qtbuild reads these attributes::

    pkcs11:token=LABEL;object=KEY-LABEL[;id=%01]?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234

``module-path`` may instead come from ``QTBUILD_PKCS11_MODULE``, the user PIN from ``pin-value``,
``pin-source=file:PATH`` (first line of the file) or ``QTBUILD_PKCS11_PIN``.  The private key
never leaves the token: :class:`Pkcs11PrivateKey` hashes locally and has the token sign the
digest with ``CKM_ECDSA`` (raw ``r ‖ s``, re-encoded as DER as cryptography returns it), so it
stands in for a cryptography EC key wherever qtbuild signs (EIF PCR0, DSSE provenance).  Tokens
choose their own ECDSA nonces: signatures made in a token are valid but not deterministic.

Needs the ``python-pkcs11`` package (``pip install 'qtbuild[pkcs11]'``).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from qtbuild.formats.errors import SignatureError
from qtbuild.remote_keys import RemoteEcPrivateKey

URI_SCHEME = "pkcs11:"


def is_pkcs11_uri(text: object) -> bool:
    return isinstance(text, str) and text.startswith(URI_SCHEME)


@dataclass(frozen=True)
class Pkcs11Uri:
    """The attributes of an RFC 7512 URI qtbuild uses."""

    token: str
    object: str | None
    id: bytes | None
    module_path: str
    pin: str | None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        """Parse ``uri``; SignatureError naming what is missing (token, key, module)."""
        if not is_pkcs11_uri(uri):
            raise SignatureError(f"{uri!r} is not a pkcs11: URI")
        path, _, query = uri[len(URI_SCHEME):].partition("?")
        attributes = _attributes(path, ";")
        options = _attributes(query, "&")
        token = attributes.get("token")
        if not token:
            raise SignatureError(f"{_redacted(uri)}: no token=LABEL attribute: name the token holding the key")
        if "object" not in attributes and "id" not in attributes:
            raise SignatureError(f"{_redacted(uri)}: no object=LABEL or id=… attribute: name the private key")
        module = options.get("module-path") or os.environ.get("QTBUILD_PKCS11_MODULE")
        if not module:
            raise SignatureError(f"{_redacted(uri)}: no module-path: add ?module-path=/path/to/pkcs11-module.so "
                                 "or set QTBUILD_PKCS11_MODULE")
        identifier = urllib.parse.unquote_to_bytes(attributes["id"]) if "id" in attributes else None
        return cls(token, attributes.get("object"), identifier, module, _pin(options))


def _attributes(text: str, separator: str) -> dict[str, str]:
    attributes = {}
    for item in filter(None, text.split(separator)):
        name, _, value = item.partition("=")
        attributes[name] = urllib.parse.unquote(value) if name != "id" else value
    return attributes


def _pin(options: dict[str, str]) -> str | None:
    if "pin-value" in options:
        return options["pin-value"]
    source = options.get("pin-source")
    if source:
        path = source.removeprefix("file:")
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\n")
    return os.environ.get("QTBUILD_PKCS11_PIN")


def _redacted(uri: str) -> str:
    """The URI without its PIN, for messages."""
    path, _, query = uri.partition("?")
    kept = [item for item in query.split("&") if item and not item.startswith("pin-value=")]
    return path + ("?" + "&".join(kept) if kept else "")


class Pkcs11PrivateKey(RemoteEcPrivateKey):
    """An EC private key in a PKCS#11 token, usable where qtbuild takes a cryptography EC key."""

    holder = "a PKCS#11"

    def __init__(self, uri: str) -> None:
        try:
            import pkcs11
            from pkcs11.util.ec import encode_ec_public_key
        except ImportError:
            raise SignatureError("pkcs11: keys need the python-pkcs11 package: pip install 'qtbuild[pkcs11]'") from None
        self._uri = Pkcs11Uri.parse(uri)
        self._where = _redacted(uri)
        encoded = self._with_session(
            lambda session: encode_ec_public_key(self._find(session, pkcs11.ObjectClass.PUBLIC_KEY)))
        public = serialization.load_der_public_key(encoded)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SignatureError(f"{self._where}: the key is not an EC key")
        self._public: ec.EllipticCurvePublicKey = public

    def _with_session(self, action):
        """Run ``action(session)`` in a logged-in session that is closed (logging out) afterwards:
        no login outlives one operation."""
        import pkcs11

        uri = self._uri
        try:
            token = pkcs11.lib(uri.module_path).get_token(token_label=uri.token)
            with token.open(user_pin=uri.pin) as session:
                return action(session)
        except pkcs11.exceptions.NoSuchToken:
            raise SignatureError(f"{self._where}: no token labelled {uri.token!r} in {uri.module_path}") from None
        except pkcs11.exceptions.NoSuchKey:
            raise SignatureError(f"{self._where}: the token has no EC key pair with that label/id") from None
        except pkcs11.exceptions.PinIncorrect:
            raise SignatureError(f"{self._where}: the token refused the PIN") from None
        except (pkcs11.exceptions.PKCS11Error, OSError, RuntimeError) as exc:
            raise SignatureError(f"{self._where}: PKCS#11 error: {type(exc).__name__} {exc}".rstrip()) from None

    def _find(self, session, object_class):
        import pkcs11

        selector: dict = {"label": self._uri.object} if self._uri.object else {}
        if self._uri.id is not None:
            selector["id"] = self._uri.id
        return session.get_key(object_class=object_class, key_type=pkcs11.KeyType.EC, **selector)

    def _sign_digest(self, digest: bytes) -> bytes:
        import pkcs11

        def sign_in_token(session) -> bytes:
            return self._find(session, pkcs11.ObjectClass.PRIVATE_KEY).sign(digest, mechanism=pkcs11.Mechanism.ECDSA)

        raw = self._with_session(sign_in_token)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
