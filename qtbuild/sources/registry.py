"""Daemonless pull from a registry (OCI distribution spec), as :class:`RegistryImage`.

Contract:
- References: ``registry://HOST[:PORT]/REPO[:TAG][@sha256:…]`` (the ``registry://`` prefix is
  optional); the tag defaults to ``latest``; repository names, tags and digests are validated
  against the distribution grammar before any request.  ``docker.io`` maps to Docker Hub's API
  host, and one-component Hub names get ``library/``.
- Transport: HTTPS, certificates verified.  Plain HTTP only to loopback registries (127.0.0.0/8,
  ::1, ``localhost``), which use it by default; refused elsewhere before any connection.  The same
  rule applies to redirect targets and token realms, and an HTTPS registry is never followed to
  http://.  Every request has a timeout; redirects are followed by hand (at most
  :data:`MAX_REDIRECTS`) and the Authorization header goes only to the origin it is meant for,
  never to a redirect target on another host (blob storage).  Environment proxies are used,
  except for loopback addresses.
- Manifests: fetched with Accept for OCI and Docker (schema 2) types; the raw bytes are hashed and
  checked against the requested digest; bodies over ``MAX_JSON_DOCUMENT`` are refused; indexes
  are resolved with the shared platform selection; schema 1 and foreign layers (``urls``) are
  refused.
- Blobs: ``GET /v2/<name>/blobs/<digest>`` streamed through
  :class:`~qtbuild.sources.blobs.VerifyingReader` (size, then digest); one GET per
  ``open_blob()``; the config is fetched once and cached.
- Auth: see :mod:`qtbuild.sources.auth` (Bearer tokens and Basic, credentials from config.json).
- Every failure is an ImageError with a message naming the registry and, where known, the fix.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import re
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, cast

from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json_object, read_bounded
from qtbuild.sources.auth import MAX_TOKEN_RESPONSE, Authenticator
from qtbuild.sources.base import (
    MAX_JSON_DOCUMENT,
    Descriptor,
    Platform,
    check_digest,
    parse_json_document,
)
from qtbuild.sources.blobs import BlobStore, read_document
from qtbuild.sources.select import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    StoreImage,
    select_manifest,
)
from qtbuild.sources.select import MANIFEST_ACCEPT as _ACCEPTED_TYPES

SCHEME = "registry://"
DEFAULT_TAG = "latest"
#: Seconds to wait for a connection or for any single read.
DEFAULT_TIMEOUT = 60.0
MAX_REDIRECTS = 5
#: Error bodies are read up to this many bytes (for the message only).
MAX_ERROR_BODY = 64 * 1024
DOCKER_HUB_API_HOST = "registry-1.docker.io"

# distribution/reference grammar
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"^(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?$")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_MAX_REPO_NAME = 255
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MANIFEST_ACCEPT = ", ".join(_ACCEPTED_TYPES)


@dataclass(frozen=True)
class RegistryReference:
    """A parsed registry reference.  ``digest`` wins over ``tag`` when both are given."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host the HTTP API is reached at (Docker Hub's differs from ``docker.io``)."""
        return DOCKER_HUB_API_HOST if self.host in ("docker.io", "index.docker.io") else self.host

    @property
    def scope(self) -> str:
        """The token scope a pull needs."""
        return f"repository:{self.repository}:pull"

    def __str__(self) -> str:
        text = f"{SCHEME}{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        return text + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> RegistryReference:
    """Parse ``[registry://]HOST[:PORT]/REPO[:TAG][@sha256:…]`` (ImageError if malformed)."""
    rest = text.removeprefix(SCHEME)
    host, slash, path = rest.partition("/")
    if not slash or not path:
        raise ImageError(f"registry reference {text!r} must be HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")
    if not _HOST_RE.match(host):
        raise ImageError(f"registry reference {text!r}: {host!r} is not a valid registry host[:port]")
    path, at, digest = path.partition("@")
    if at:
        check_digest(digest, f"registry reference {text!r}")
    repository, tag = path, None
    if ":" in path.rsplit("/", 1)[-1]:
        repository, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise ImageError(f"registry reference {text!r}: {tag!r} is not a valid tag")
    if not _REPO_RE.match(repository) or len(repository) > _MAX_REPO_NAME:
        raise ImageError(
            f"registry reference {text!r}: {repository!r} is not a valid repository name"
            " (lower-case letters, digits, and . _ - separators between / components)"
        )
    host = host.lower()
    if host in ("docker.io", "index.docker.io") and "/" not in repository:
        repository = "library/" + repository
    if not at and tag is None:
        tag = DEFAULT_TAG
    return RegistryReference(host, repository, tag, digest if at else None)


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (``host`` may carry a port and IPv6 brackets)."""
    name = host
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _plain_http_refusal(target: str) -> str:
    return (f"refusing plain HTTP to {target}: "
            "only loopback registries (127.0.0.0/8, ::1, localhost) may be reached without TLS")


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hand every 3xx back to the caller, which follows redirects itself."""

    def redirect_request(self, *args, **kwargs):
        return None


class _HttpBody:
    """A response body whose network errors become ImageError (read/close only)."""

    def __init__(self, response, what: str):
        self._response = response
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._response.read(n)
        except (OSError, http.client.HTTPException) as exc:
            raise ImageError(f"{self._what}: download failed: {exc}") from None

    def close(self) -> None:
        self._response.close()


def _read_bounded(response, limit: int, what: str) -> bytes:
    """The whole body of ``response``, refusing more than ``limit`` bytes (before reading if the
    Content-Length says so)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > limit:
        response.close()
        raise ImageError(f"{what} is {int(declared)} bytes; refusing documents over {limit} bytes")
    body = _HttpBody(response, what)
    too_large = ImageError(f"{what} is over {limit} bytes; refusing documents over {limit} bytes")
    try:
        return read_bounded(body, limit, too_large)
    finally:
        body.close()


class Transport:
    """HTTP(S) under the transport policy (see the module contract) for one registry origin."""

    def __init__(self, base_url: str, *, timeout: float):
        self.base_url = base_url
        self.timeout = timeout
        self._origin = _origin(base_url)
        context = ssl.create_default_context()
        https = urllib.request.HTTPSHandler(context=context)
        self._direct = urllib.request.build_opener(_NoRedirects, https, urllib.request.ProxyHandler({}))
        self._proxied = urllib.request.build_opener(_NoRedirects, https)

    @staticmethod
    def check_url(url: str, what: str) -> None:
        """ImageError unless ``url`` is https, or http to a loopback host."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return
        if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
            return
        if parts.scheme == "http":
            raise ImageError(f"{what}: {_plain_http_refusal(repr(parts.netloc))}")
        raise ImageError(f"{what}: refusing URL {url[:200]!r}: only https:// (or http:// to loopback) is allowed")

    def get(self, url: str, *, accept: str | None = None, authorization: str | None = None, what: str):
        """GET ``url``, following redirects; the final response, whatever its status.

        ``authorization`` is sent to ``url``'s own origin only, never to a redirect target on
        another origin.  Every URL must pass :meth:`check_url`; an HTTPS transport refuses http://.
        """
        origin = _origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            self.check_url(url, what)
            if self._origin[0] == "https" and _origin(url)[0] != "https":
                raise ImageError(f"{what}: refusing to downgrade from HTTPS to {url[:200]!r}")
            request = urllib.request.Request(url, method="GET")
            if accept:
                request.add_header("Accept", accept)
            if authorization and _origin(url) == origin:
                request.add_unredirected_header("Authorization", authorization)
            response = self._send(request, what)
            if response.getcode() not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise ImageError(f"{what}: redirect (HTTP {response.getcode()}) without a Location")
            url = urllib.parse.urljoin(url, location)
        raise ImageError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def get_small(self, url: str, authorization: str | None, limit: int, what: str) -> tuple[int, bytes]:
        """GET a small document: (status, body), the body capped at ``limit`` bytes."""
        response = self.get(url, accept="application/json", authorization=authorization, what=what)
        return response.getcode(), _read_bounded(response, limit, what)

    def _send(self, request: urllib.request.Request, what: str):
        loopback = is_loopback(urllib.parse.urlsplit(request.full_url).hostname or "")
        opener = self._direct if loopback else self._proxied  # proxies never see loopback traffic
        try:
            return opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as response:  # 4xx/5xx/3xx: the caller decides
            return response
        except urllib.error.URLError as exc:
            raise _connection_error(exc.reason, request.full_url, what) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _connection_error(exc, request.full_url, what) from None


def _connection_error(reason: object, url: str, what: str) -> ImageError:
    """A clear ImageError for a failure to talk to ``url`` at all."""
    netloc = urllib.parse.urlsplit(url).netloc
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ImageError(
            f"{what}: TLS certificate verification failed for {netloc}: {reason.verify_message or reason}"
        )
    if isinstance(reason, ssl.SSLError):
        return ImageError(f"{what}: TLS error talking to {netloc}: {reason}")
    if isinstance(reason, ConnectionRefusedError):
        return ImageError(f"{what}: cannot connect to {netloc}: connection refused (is the registry running?)")
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return ImageError(f"{what}: {netloc} did not answer within the timeout")
    if isinstance(reason, socket.gaierror):
        return ImageError(f"{what}: cannot resolve host {netloc}: {reason}")
    return ImageError(f"{what}: cannot talk to {netloc}: {reason}")


def _error_detail(response) -> str:
    """``: CODE message; …`` from a distribution error body, or ``""``."""
    try:
        body = _read_bounded(response, MAX_ERROR_BODY, "error body")
        errors = load_json_object(body, what="error body", error=ImageError).get("errors") or []
        parts = [f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors if isinstance(e, dict)]
    except (ImageError, ValueError, AttributeError, TypeError):
        return ""
    text = "; ".join(p for p in parts if p)[:500]
    return f" ({text})" if text else ""


def _use_plain_http(ref: RegistryReference, plain_http: bool | None) -> bool:
    """Resolve the ``plain_http`` choice: None means "loopback registries only"."""
    loopback = is_loopback(ref.api_host)
    if plain_http and not loopback:
        raise ImageError(_plain_http_refusal(f"registry {ref.host}"))
    return loopback if plain_http is None else plain_http


def _check_document_size(descriptor: Descriptor, what: str) -> None:
    if descriptor.size > MAX_JSON_DOCUMENT:
        raise ImageError(f"{what} is {descriptor.size} bytes; refusing documents over {MAX_JSON_DOCUMENT} bytes")


class RegistryClient(BlobStore):
    """The pull half of the distribution API for one repository, with authentication.

    As a :class:`~qtbuild.sources.blobs.BlobStore` it serves blobs by descriptor (one streamed GET
    per call, unverified: callers wrap it, e.g. ``open_verified``).
    """

    def __init__(self, ref: RegistryReference, *, plain_http: bool | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.ref = ref
        scheme = "http" if _use_plain_http(ref, plain_http) else "https"
        self.transport = Transport(f"{scheme}://{ref.api_host}", timeout=timeout)
        self.auth = Authenticator(ref.host, self._fetch_token)

    def _fetch_token(self, url: str, authorization: str | None) -> tuple[int, bytes]:
        what = f"token for registry {self.ref.host}"
        return self.transport.get_small(url, authorization, MAX_TOKEN_RESPONSE, what)

    def get(self, path: str, *, what: str, accept: str | None = None):
        """GET ``path`` (under ``/v2/``), answering one auth challenge; the 200 response or ImageError."""
        url = self.transport.base_url + path
        scope = self.ref.scope
        sent = self.auth.cached_header(scope)
        response = self.transport.get(url, accept=accept, authorization=sent, what=what)
        if response.getcode() == 401:
            challenges = response.headers.get_all("WWW-Authenticate") or []
            response.close()
            sent = self.auth.respond(challenges, scope, failed=sent)
            response = self.transport.get(url, accept=accept, authorization=sent, what=what)
        if response.getcode() == 200:
            return response
        raise self._status_error(response, what)

    def _status_error(self, response, what: str) -> ImageError:
        status = response.getcode()
        detail = _error_detail(response)
        host = self.ref.host
        if status == 401:
            return self.auth.denied()
        if status == 404:
            return ImageError(f"{what} not found in registry {host}{detail}")
        if status == 403:
            return ImageError(f"{what}: registry {host} denied access (HTTP 403){detail}; {self.auth.lookup.hint()}")
        if status == 429:
            return ImageError(f"{what}: registry {host} is rate limiting requests (HTTP 429){detail}; try again later")
        return ImageError(f"{what}: registry {host} answered HTTP {status}{detail}")

    def fetch_manifest(self, reference: str, what: str) -> tuple[bytes, str]:
        """The raw manifest or index at tag/digest ``reference`` (bounded) and its Content-Type."""
        response = self.get(f"/v2/{self.ref.repository}/manifests/{reference}", what=what, accept=MANIFEST_ACCEPT)
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return _read_bounded(response, MAX_JSON_DOCUMENT, what), content_type

    def read_manifest(self, descriptor: Descriptor, what: str) -> bytes:
        """The manifest or index ``descriptor`` points at, verified against its size and digest."""
        check_digest(descriptor.digest, what)
        _check_document_size(descriptor, what)
        path = f"/v2/{self.ref.repository}/manifests/{descriptor.digest}"
        response = self.get(path, what=what, accept=MANIFEST_ACCEPT)
        return read_document(cast(BinaryIO, _HttpBody(response, what)), descriptor, what)  # read/close only

    def read_document(self, descriptor: Descriptor, what: str) -> bytes:
        """A small blob (config), verified; an oversized one is refused before it is requested."""
        _check_document_size(descriptor, what)
        return super().read_document(descriptor, what)

    def read_document_any(self, descriptor: Descriptor) -> bytes:
        """A verified manifest, index (``/manifests/``) or config (``/blobs/``) by descriptor:
        the ``fetch`` that :func:`~qtbuild.sources.select.select_manifest` needs."""
        what = f"{self.ref.host}/{self.ref.repository}: {descriptor.media_type} {descriptor.digest}"
        if descriptor.media_type in INDEX_TYPES or descriptor.media_type in MANIFEST_TYPES:
            return self.read_manifest(descriptor, what)
        return self.read_document(descriptor, what)

    def open_raw(self, descriptor: Descriptor) -> BinaryIO:
        """The blob's bytes as streamed by the registry (or its redirect target), unverified."""
        what = f"blob {check_digest(descriptor.digest, 'blob descriptor')} of {self.ref.host}/{self.ref.repository}"
        response = self.get(f"/v2/{self.ref.repository}/blobs/{descriptor.digest}", what=what)
        declared = response.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) != descriptor.size:
            response.close()
            raise ImageError(
                f"{what}: size mismatch, registry sends {int(declared)} bytes, manifest says {descriptor.size}"
            )
        return cast(BinaryIO, _HttpBody(response, what))  # its readers use read/close only


class RegistryImage(StoreImage):
    """An image pulled from a registry without a daemon (see the module contract).

    The constructor resolves the manifest (following an index with ``platform``, see
    :func:`~qtbuild.sources.select.select_manifest`) and fetches and verifies the config once;
    each ``Layer.open_blob()`` is one streamed GET.  ``digest`` is the digest of what the
    reference names (the index for a multi-platform tag); ``repo_digests`` is
    ``[HOST/REPO@digest]``, as ``docker pull`` records it.

    ``plain_http``: None (default) uses HTTP for loopback registries and HTTPS elsewhere; True
    forces HTTP (refused unless loopback); False forces HTTPS.
    """

    def __init__(self, reference: str, *, platform: Platform | None = None,
                 plain_http: bool | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.ref = parse_reference(reference)
        client = RegistryClient(self.ref, plain_http=plain_http, timeout=timeout)
        self.digest, manifest_bytes = _resolve(client, platform)
        super().__init__(client, manifest_bytes, reference=str(self.ref), platform=platform,
                         repo_digests=[f"{self.ref.host}/{self.ref.repository}@{self.digest}"])


def _resolve(client: RegistryClient, platform: Platform | None) -> tuple[str, bytes]:
    """(digest of what the reference names, raw bytes of the image manifest for ``platform``)."""
    ref = client.ref
    what = f"{ref.host}/{ref.repository}" + (f"@{ref.digest}" if ref.digest else f":{ref.tag}")
    raw, content_type = client.fetch_manifest(ref.reference, what)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if ref.digest and digest != ref.digest:
        raise ImageError(f"{what}: digest mismatch, the registry sent a manifest with digest {digest}")
    document = parse_json_document(raw, f"{what}: manifest")
    if (document.get("mediaType") or content_type) in INDEX_TYPES or "manifests" in document:
        _, raw = select_manifest(document, platform, client.read_document_any, what=f"{what}: index")
    return digest, raw
