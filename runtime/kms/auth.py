"""Request authentication: the ``SDK-HMAC-SHA256`` access-key signature of every request.

The canonical request and signature are computed by the same functions the client signs
with (``qtbuild.runtime.sdk.kms_client``); this module parses the ``Authorization`` header, checks the
``X-Sdk-Date`` window (15 minutes either way) and compares signatures in constant time.

Refusals (HTTP 401): ``KMS.0301`` no or malformed authorization (or ``host`` / ``x-sdk-date``
not signed), ``KMS.0302`` unknown access key or wrong signature, ``KMS.0303`` date outside
the window.  Replays inside the window are not detected (as with Huawei's gateway).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.sdk.kms_client import (
    ALGORITHM,
    canonical_request,
    signature,
    string_to_sign,
)

WINDOW = timedelta(minutes=15)
REQUIRED_SIGNED = ("host", "x-sdk-date")
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z", re.ASCII)     # X-Sdk-Date, DATE_FORMAT
_AUTHORIZATION = re.compile(
    rf"{ALGORITHM} Access=([A-Za-z0-9]{{1,64}}), ?SignedHeaders=([a-z0-9;_-]{{1,512}}), ?"
    r"Signature=([0-9a-f]{64})"
)


@dataclass(frozen=True)
class Authorization:
    access_key: str
    signed_headers: list[str]
    signature: str


def parse_authorization(value: str | None) -> Authorization:
    """The parts of an ``Authorization`` header; KMS.0301 when absent or malformed."""
    match = _AUTHORIZATION.fullmatch((value or "").strip())
    if match is None:
        raise KmsError("KMS.0301")
    access_key, names, mac = match.groups()
    signed = names.split(";")
    if signed != sorted(set(signed)) or not all(signed):
        raise KmsError("KMS.0301", "SignedHeaders must be sorted, distinct names.")
    missing = [name for name in REQUIRED_SIGNED if name not in signed]
    if missing:
        raise KmsError("KMS.0301", f"The header {missing[0]} must be signed.")
    return Authorization(access_key, signed, mac)


def authenticate(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
                 secret_of: Callable[[str], str | None], *, now: datetime | None = None) -> str:
    """The access key that signed this request, or KmsError (401).

    ``headers`` maps lower-case names to values (one value each); ``secret_of(access_key)``
    gives the principal's secret key or None when there is no such principal.
    """
    authorization = parse_authorization(headers.get("authorization"))
    date = headers.get("x-sdk-date", "")
    _check_date(date, now or datetime.now(UTC))
    if any(name not in headers for name in authorization.signed_headers):
        raise KmsError("KMS.0301", "A signed header is missing from the request.")
    canonical = canonical_request(method, path, query, headers, authorization.signed_headers,
                                  body)
    secret = secret_of(authorization.access_key)
    expected = signature(secret or "", string_to_sign(date, canonical))
    if secret is None or not hmac.compare_digest(expected, authorization.signature):
        raise KmsError("KMS.0302")
    return authorization.access_key


def _check_date(text: str, now: datetime) -> None:
    match = _DATE.fullmatch(text)       # DATE_FORMAT (strptime costs ~10 times as much)
    try:
        if match is None:
            raise ValueError(text)
        year, month, day, hour, minute, second = map(int, match.groups())
        date = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise KmsError("KMS.0301", "X-Sdk-Date is missing or not YYYYMMDDTHHMMSSZ.") from None
    if abs(now - date) > WINDOW:
        raise KmsError("KMS.0303", f"X-Sdk-Date {text} is more than 15 minutes from now.")
