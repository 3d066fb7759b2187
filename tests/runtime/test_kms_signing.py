"""SDK-HMAC-SHA256 request signing (runtime/sdk/kms_client.py) and its verification
(runtime/kms/auth.py).  Runs under the SDK's bookworm dependencies too (see
test_kms_envelope.py for the command)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from qtbuild.runtime.kms.auth import authenticate, parse_authorization
from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.sdk.kms_client import (
    canonical_query,
    canonical_request,
    canonical_uri,
    sign_request,
    string_to_sign,
)

AK, SK = "AKIDEXAMPLE000000000", "secret-key-of-forty-characters-00000000"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
PATH = "/v1.0/0123456789abcdef0123456789abcdef/kms/decrypt-data"
BODY = b'{"cipher_text":"AAAA"}'


def signed(body: bytes = BODY, *, now: datetime = NOW, path: str = PATH, query: str = "",
           secret: str = SK) -> dict[str, str]:
    headers = sign_request("POST", path, query, {"Host": "kms.local:8443",
                                                 "Content-Type": "application/json"},
                           body, AK, secret, now=now)
    return {name.lower(): value for name, value in headers.items()}


def verify(headers: dict, body: bytes = BODY, *, path: str = PATH, query: str = "",
           now: datetime = NOW, method: str = "POST") -> str:
    return authenticate(method, path, query, headers, body,
                        lambda key: SK if key == AK else None, now=now)


def test_canonical_forms():
    assert canonical_uri("/v1.0/p/kms/create-key") == "/v1.0/p/kms/create-key/"
    assert canonical_uri("/a b/c%2Fd/") == "/a%20b/c/d/"
    assert canonical_query("b=2&a=1&a=0&c=") == "a=0&a=1&b=2&c="
    assert canonical_query("k=a b&x=~") == "k=a%20b&x=~"
    text = canonical_request("post", "/x", "", {"host": "h", "x-sdk-date": "d"},
                             ["host", "x-sdk-date"], b"")
    assert text == ("POST\n/x/\n\nhost:h\nx-sdk-date:d\n\nhost;x-sdk-date\n"
                    + hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize("path", ["/v1.0/0123abcd/kms/decrypt-data", "/a.b_c~d-e/", "/", "", "/a%41/", "/a+b/",
                                  "/ä/", "/a%7e/", "/a//b"])
def test_canonical_uri_fast_path_agrees_with_the_encoder(path):
    from urllib.parse import quote, unquote

    encoded = "/".join(quote(segment, safe="~") for segment in unquote(path).split("/"))
    assert canonical_uri(path) == (encoded if encoded.endswith("/") else encoded + "/")


def test_signature_is_hmac_of_the_string_to_sign():
    headers = signed()
    assert headers["x-sdk-date"] == "20260301T120000Z"
    auth = parse_authorization(headers["authorization"])
    assert auth.access_key == AK
    assert auth.signed_headers == ["content-type", "host", "x-sdk-date"]
    canonical = canonical_request("POST", PATH, "", headers, auth.signed_headers, BODY)
    expected = hmac.new(SK.encode(), string_to_sign("20260301T120000Z", canonical).encode(),
                        hashlib.sha256).hexdigest()
    assert auth.signature == expected


def test_signed_request_verifies():
    assert verify(signed()) == AK
    assert verify(signed(now=NOW - timedelta(minutes=14)), now=NOW) == AK


@pytest.mark.parametrize("tamper", [
    lambda h, b: (h, b + b" "),
    lambda h, b: ({**h, "content-type": "text/plain"}, b),
    lambda h, b: ({**h, "host": "elsewhere"}, b),
])
def test_any_change_breaks_the_signature(tamper):
    headers, body = tamper(signed(), BODY)
    with pytest.raises(KmsError) as caught:
        verify(headers, body)
    assert (caught.value.code, caught.value.status) == ("KMS.0302", 401)


def test_path_query_and_method_are_signed():
    for options in ({"path": PATH.replace("decrypt", "encrypt")}, {"query": "a=1"},
                    {"method": "PUT"}):
        with pytest.raises(KmsError, match="KMS.0302"):
            verify(signed(), **options)


def test_wrong_secret_and_unknown_access_key():
    with pytest.raises(KmsError, match="KMS.0302"):
        verify(signed(secret="another secret"))
    headers = signed()
    headers["authorization"] = headers["authorization"].replace(AK, "UNKNOWNACCESSKEY0000")
    with pytest.raises(KmsError, match="KMS.0302"):
        verify(headers)


@pytest.mark.parametrize("skew", [timedelta(minutes=16), -timedelta(minutes=16),
                                  timedelta(days=3)])
def test_dates_outside_the_window(skew):
    with pytest.raises(KmsError) as caught:
        verify(signed(now=NOW - skew), now=NOW)
    assert (caught.value.code, caught.value.status) == ("KMS.0303", 401)


@pytest.mark.parametrize("authorization", [
    None, "", "Basic abc", "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=00",
    "SDK-HMAC-SHA256 Access=AK, SignedHeaders=host, Signature=" + "0" * 64,
    "SDK-HMAC-SHA256 Access=AK, SignedHeaders=x-sdk-date;host, Signature=" + "0" * 64,
    "SDK-HMAC-SHA256 Access=A K, SignedHeaders=host;x-sdk-date, Signature=" + "0" * 64,
])
def test_malformed_authorization(authorization):
    headers = signed()
    if authorization is None:
        del headers["authorization"]
    else:
        headers["authorization"] = authorization
    with pytest.raises(KmsError) as caught:
        verify(headers)
    assert (caught.value.code, caught.value.status) == ("KMS.0301", 401)


def test_missing_or_malformed_date():
    for date in (None, "yesterday", "2026-03-01T12:00:00Z"):
        headers = signed()
        if date is None:
            del headers["x-sdk-date"]
        else:
            headers["x-sdk-date"] = date
        with pytest.raises(KmsError, match="KMS.0301"):
            verify(headers)


def test_a_signed_header_missing_from_the_request():
    headers = signed()
    del headers["content-type"]
    with pytest.raises(KmsError, match="KMS.0301"):
        verify(headers)


def test_signing_needs_a_host():
    with pytest.raises(ValueError):
        sign_request("POST", PATH, "", {}, b"", AK, SK)
