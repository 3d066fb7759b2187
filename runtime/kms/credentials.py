"""Short-lived credentials, as Huawei Cloud IAM hands them out: temporary AK/SK with a security
token, and IAM tokens.

* **Temporary credentials** (IAM's ``securitytokens``): an access key, a secret key and a
  security token, valid 15 minutes to 24 hours, acting as one principal (its policy applies).
  A request signs with the AK/SK as usual (SDK-HMAC-SHA256) and carries the token in
  ``X-Security-Token``, which the official SDK adds and signs.  What an enclave should be given
  instead of a long-lived AK/SK.
* **Tokens** (``X-Auth-Token``): a bearer string valid up to 24 hours, acting as one principal.

Secrets are sealed under the master key like principals' secrets; the store keeps only the
SHA-256 of security tokens and tokens.  Expired, unknown or mismatched ones are refused with
KMS.0305 (the gateway's 401 ``APIGW.0301`` on the wire).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.kms.store import Conflict, PrincipalRecord, TemporaryCredential

if TYPE_CHECKING:   # operations imports this module for its admin APIs
    from qtbuild.runtime.kms.environment import Environment

MIN_SECONDS, MAX_SECONDS = 900, 86_400      # IAM: temporary credentials 15 min .. 24 h
MIN_TOKEN_SECONDS = 60
TOKEN_PREFIX = "qtkms."


def temporary_context(access_key: str) -> str:
    return f"temporary:{access_key}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _expires_at(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def issue_temporary(env: Environment, principal: PrincipalRecord, seconds: int) -> dict:
    """New temporary credentials for ``principal``: IAM's ``{"credential": {access, secret,
    securitytoken, expires_at}}``."""
    now_ms = env.now_ms()
    expires_ms = now_ms + seconds * 1000
    secret_key = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    token = secrets.token_urlsafe(96)
    while True:
        access_key = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20))
        if env.store.principal(access_key) is not None:
            continue
        sealed = env.master_key.seal(secret_key.encode(), temporary_context(access_key))
        try:
            env.store.add_temporary_credential(
                TemporaryCredential(access_key, principal.access_key, sealed, _sha256(token), expires_ms), now_ms)
            break
        except Conflict:
            continue
    return {"credential": {"access": access_key, "secret": secret_key, "securitytoken": token,
                           "expires_at": _expires_at(expires_ms)}}


def issue_token(env: Environment, principal: PrincipalRecord, seconds: int) -> dict:
    """A new token for ``principal``: ``{"token", "expires_at"}``."""
    now_ms = env.now_ms()
    expires_ms = now_ms + seconds * 1000
    token = TOKEN_PREFIX + secrets.token_urlsafe(96)
    env.store.add_token(_sha256(token), principal.access_key, expires_ms, now_ms)
    return {"token": token, "expires_at": _expires_at(expires_ms)}


def temporary_secret(env: Environment, record: TemporaryCredential) -> str:
    return env.master_key.open(record.secret, temporary_context(record.access_key)).decode()


def check_temporary(env: Environment, record: TemporaryCredential, security_token: str | None) -> None:
    """A correctly signed request with temporary credentials: the security token must match
    and the credentials must not have expired; KMS.0305 otherwise."""
    if security_token is None:
        raise KmsError("KMS.0305", "temporary credentials need their X-Security-Token")
    if not hmac.compare_digest(_sha256(security_token), record.token_sha256):
        raise KmsError("KMS.0305", "the X-Security-Token does not belong to this access key")
    if record.expires_ms <= env.now_ms():
        raise KmsError("KMS.0305", f"the temporary credentials expired at {_expires_at(record.expires_ms)}")


def token_principal(env: Environment, token: str) -> PrincipalRecord:
    """The principal an ``X-Auth-Token`` acts as; KMS.0305 when unknown or expired."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 512:
        raise KmsError("KMS.0305", "the X-Auth-Token is not a token of this service")
    found = env.store.token(_sha256(token))
    if found is None:
        raise KmsError("KMS.0305", "the X-Auth-Token is unknown")
    access_key, expires_ms = found
    if expires_ms <= env.now_ms():
        raise KmsError("KMS.0305", f"the X-Auth-Token expired at {_expires_at(expires_ms)}")
    principal = env.store.principal(access_key)
    if principal is None:
        raise KmsError("KMS.0305", "the X-Auth-Token's principal no longer exists")
    return principal
