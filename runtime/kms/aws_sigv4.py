"""AWS Signature Version 4 verification (``AWS4-HMAC-SHA256``) of a request, as AWS KMS's
front end does it; the same principals' AK/SK sign (service name ``kms``, any region).

Refusals are KMS.0301 (no or malformed authorization, headers not signed), KMS.0302 (unknown
access key, wrong signature), KMS.0303 (``X-Amz-Date`` more than 15 minutes away): the AWS
front end's ``IncompleteSignatureException`` / ``UnrecognizedClientException`` /
``InvalidSignatureException`` on the wire (``aws``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote

from qtbuild.runtime.kms.errors import KmsError

WINDOW = timedelta(minutes=15)
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([A-Za-z0-9]{1,128})/(\d{8})/([a-z0-9-]{1,32})/([a-z0-9-]{1,32})/aws4_request,"
    r" ?SignedHeaders=([a-z0-9;_.-]{1,1024}), ?Signature=([0-9a-f]{64})")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _canonical_query(query: str) -> str:
    pairs = sorted((quote(name, safe="-_.~"), quote(value, safe="-_.~"))
                   for name, value in parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{name}={value}" for name, value in pairs)


def authenticate(method: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
                 secret_of: Callable[[str], str | None], *, now: datetime | None = None) -> str:
    """The access key that signed this request, or KmsError (401 family)."""
    match = _AUTHORIZATION.fullmatch((headers.get("authorization") or "").strip())
    if match is None:
        raise KmsError("KMS.0301", "Authorization is not an AWS4-HMAC-SHA256 signature.")
    access_key, day, region, service, signed_text, given = match.groups()
    signed = signed_text.split(";")
    if "host" not in signed or "x-amz-date" not in signed or any(name not in headers for name in signed):
        raise KmsError("KMS.0301", "host and x-amz-date must be signed, and every signed header present.")
    amz_date = headers["x-amz-date"]
    try:
        moment = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise KmsError("KMS.0301", "X-Amz-Date is not YYYYMMDDTHHMMSSZ.") from None
    if abs((now or datetime.now(UTC)) - moment) > WINDOW or not amz_date.startswith(day):
        raise KmsError("KMS.0303", f"X-Amz-Date {amz_date} is more than 15 minutes from now.")
    canonical_headers = "".join(f"{name}:{' '.join(headers[name].strip().split())}\n" for name in signed)
    canonical = "\n".join([method, quote(path, safe="/-_.~"), _canonical_query(query), canonical_headers,
                           signed_text, hashlib.sha256(body).hexdigest()])
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    secret = secret_of(access_key)
    key = _hmac(("AWS4" + (secret or "")).encode(), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if secret is None or not hmac.compare_digest(expected, given):
        raise KmsError("KMS.0302", "The request signature we calculated does not match the signature you provided.")
    return access_key
