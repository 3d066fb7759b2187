"""Registry credentials and the token flow (distribution "token authentication").

Contract:
- :func:`lookup_credentials` reads Docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else
  ``~/.docker/config.json``) and returns the ``auths`` entry for a registry host: ``auth``
  (base64 ``user:password``) or ``username``/``password``.  Credential helpers (``credsStore``,
  ``credHelpers``) and identity tokens are not supported; the lookup names the helper so the caller
  can say so, and the pull continues anonymously.
- :func:`parse_challenges` parses ``WWW-Authenticate`` headers (RFC 7235 syntax).
- :class:`Authenticator` turns a 401 challenge into an ``Authorization`` header value: ``Basic``
  with the stored credentials, or ``Bearer`` with a token fetched from the challenge's realm
  (``GET realm?service=…&scope=…``, Basic credentials attached when there are any).  Tokens are
  cached per (realm, service, scope).  It does no HTTP itself: the caller hands it a ``fetch``
  callable that applies the transport policy (HTTPS, timeouts, redirects, body caps).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json_object, read_bounded

log = logging.getLogger(__name__)

#: Token responses larger than this are refused.
MAX_TOKEN_RESPONSE = 1024 * 1024
#: config.json files larger than this are refused.
MAX_DOCKER_CONFIG = 4 * 1024 * 1024
#: Key Docker uses in ``auths`` for Docker Hub.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# An Authorization header value must be visible ASCII (no CR/LF: header injection).
_HEADER_SAFE_RE = re.compile(r"^[\x21-\x7e]+$")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        """The ``Authorization`` value for HTTP Basic."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


@dataclass(frozen=True)
class CredentialLookup:
    """What ``config.json`` says about one registry host.

    ``credentials`` is None when there is no usable ``auths`` entry; ``unsupported`` then names why
    (a credential helper or identity token), or is None when nothing is configured at all.
    """

    config_path: Path
    credentials: Credentials | None = None
    unsupported: str | None = None

    def hint(self) -> str:
        """A sentence telling the user where credentials come from (for 401 messages)."""
        if self.credentials is not None:
            return f"the credentials from {self.config_path} were refused; check {self.config_path}"
        if self.unsupported:
            return (
                f"{self.unsupported}, which qtbuild does not support; add an \"auths\" entry with"
                f" \"auth\" or \"username\"/\"password\" to {self.config_path}"
            )
        return f"no credentials for this registry in {self.config_path} (check ~/.docker/config.json or DOCKER_CONFIG)"


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json`` if DOCKER_CONFIG is set, else ``~/.docker/config.json``."""
    directory = os.environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    return Path.home() / ".docker" / "config.json"


def load_docker_config(path: Path) -> dict:
    """The parsed config file; ``{}`` if it does not exist; ImageError if unreadable or malformed."""
    too_large = ImageError(f"Docker credentials file {path} is larger than {MAX_DOCKER_CONFIG} bytes")
    try:
        with open(path, "rb") as f:
            raw = read_bounded(f, MAX_DOCKER_CONFIG, too_large)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ImageError(f"cannot read Docker credentials file {path}: {exc.strerror or exc}") from None
    return load_json_object(raw, what=f"Docker credentials file {path}", error=ImageError)


def _auth_key_host(key: str) -> str:
    """``https://host:port/v1/`` → ``host:port`` (config keys may carry a scheme and a path)."""
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def _entry_for(auths: dict, host: str) -> dict | None:
    host = host.lower()
    wanted = {"index.docker.io"} if host in DOCKER_HUB_HOSTS else {host}
    for key, entry in auths.items():
        if isinstance(key, str) and isinstance(entry, dict) and _auth_key_host(key) in wanted:
            return entry
    return None


def _decode_entry(entry: dict, path: Path, host: str) -> Credentials | None:
    """Credentials from one ``auths`` entry, None if it holds none (e.g. ``{}`` left by a helper)."""
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ImageError(f"{path}: the \"auth\" entry for {host} is not base64 of user:password") from None
        if not sep:
            raise ImageError(f"{path}: the \"auth\" entry for {host} is not base64 of user:password")
        return Credentials(username, password)
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return Credentials(user, secret)
    return None


def _helper_for(config: dict, host: str) -> str | None:
    helpers = config.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if isinstance(key, str) and _auth_key_host(key) == host.lower() and isinstance(name, str):
                return name
    store = config.get("credsStore")
    return store if isinstance(store, str) and store else None


def lookup_credentials(host: str, path: Path | None = None) -> CredentialLookup:
    """Credentials for registry ``host`` (``name[:port]``) from Docker's config file."""
    path = path or docker_config_path()
    config = load_docker_config(path)
    auths = config.get("auths")
    entry = _entry_for(auths, host) if isinstance(auths, dict) else None
    credentials = _decode_entry(entry, path, host) if entry else None
    if credentials is not None:
        return CredentialLookup(path, credentials)
    helper = _helper_for(config, host)
    if helper:
        return CredentialLookup(
            path, None, f"{path} stores credentials for {host} in credential helper docker-credential-{helper}"
        )
    if entry and entry.get("identitytoken"):
        return CredentialLookup(path, None, f"{path} holds an identity token for {host}")
    return CredentialLookup(path)


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: scheme (lower-case) and its parameters (keys lower-case)."""

    scheme: str
    params: dict


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN}=*)\s*(?:,|$)')
_SCHEME_RE = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")


def parse_challenges(headers: Iterable[str]) -> list[Challenge]:
    """Parse ``WWW-Authenticate`` header values into challenges (malformed tails are ignored)."""
    challenges = []
    for header in headers:
        pos = 0
        while pos < len(header):
            scheme = _SCHEME_RE.match(header, pos)
            if not scheme:
                break
            pos, params = scheme.end(), {}
            while (param := _PARAM_RE.match(header, pos)) is not None:
                value = param.group(2)
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[param.group(1).lower()] = value
                pos = param.end()
            challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


#: ``fetch(url, authorization) -> (status, body)``: one GET under the caller's transport policy,
#: ``authorization`` (or None) sent as the Authorization header to that URL's host only, the body
#: read up to ``MAX_TOKEN_RESPONSE`` bytes (ImageError beyond).
Fetch = Callable[[str, "str | None"], "tuple[int, bytes]"]


class Authenticator:
    """Answers 401 challenges for one registry host; caches Bearer tokens per scope.

    ``host`` is the registry as the user named it (credentials are looked up for it, lazily, at the
    first challenge, so a pull that needs none never reads config.json).
    """

    def __init__(self, host: str, fetch: Fetch, *, config_path: Path | None = None):
        self.host = host
        self._fetch = fetch
        self._config_path = config_path
        self._lookup: CredentialLookup | None = None
        self._tokens: dict[tuple[str, str, str], str] = {}
        self._current: dict[str, str] = {}

    @property
    def lookup(self) -> CredentialLookup:
        """The credentials for ``host`` (read from config.json once)."""
        if self._lookup is None:
            self._lookup = lookup_credentials(self.host, self._config_path)
            if self._lookup.unsupported:
                log.warning("%s; continuing without credentials", self._lookup.unsupported)
        return self._lookup

    def cached_header(self, scope: str) -> str | None:
        """The Authorization value that last worked for ``scope`` (sent pre-emptively), if any."""
        return self._current.get(scope)

    def respond(self, www_authenticate: list[str], scope: str, *, failed: str | None) -> str:
        """The Authorization value answering a 401 carrying ``www_authenticate``.

        ``failed`` is the value that was just refused (None if the request carried none): a cached
        token that was refused is dropped and fetched anew once.  ImageError when the challenge
        cannot be answered.
        """
        for challenge in parse_challenges(www_authenticate):
            if challenge.scheme == "bearer" and challenge.params.get("realm"):
                header = self._bearer(challenge, scope, failed)
            elif challenge.scheme == "basic" and self.lookup.credentials is not None:
                header = self.lookup.credentials.basic_header()
            else:
                continue
            if header == failed:
                break
            self._current[scope] = header
            return header
        raise self.denied()

    def denied(self) -> ImageError:
        """The error for a request still refused with 401 after (or without) authenticating."""
        return ImageError(f"registry {self.host} refused access (HTTP 401 Unauthorized): {self.lookup.hint()}")

    def _bearer(self, challenge: Challenge, scope: str, failed: str | None) -> str:
        realm = challenge.params["realm"]
        service = challenge.params.get("service", "")
        scope = challenge.params.get("scope") or scope
        key = (realm, service, scope)
        cached = self._tokens.get(key)
        if cached is not None and cached != failed:
            return cached
        header = "Bearer " + self._fetch_token(realm, service, scope)
        self._tokens[key] = header
        return header

    def _fetch_token(self, realm: str, service: str, scope: str) -> str:
        query = urllib.parse.urlencode([(k, v) for k, v in (("service", service), ("scope", scope)) if v])
        url = realm + ("&" if "?" in realm else "?") + query if query else realm
        credentials = self.lookup.credentials
        status, body = self._fetch(url, credentials.basic_header() if credentials else None)
        if status == 401 or status == 403:
            raise ImageError(
                f"token server {_origin(realm)} for registry {self.host} refused the request"
                f" (HTTP {status}): {self.lookup.hint()}"
            )
        if status != 200:
            raise ImageError(f"token server {_origin(realm)} for registry {self.host} answered HTTP {status}")
        return _token_from(body, realm)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _token_from(body: bytes, realm: str) -> str:
    """The token of a token-server response (``token`` or ``access_token``), checked header-safe."""
    try:
        document = load_json_object(body, what="token response", error=ValueError)
    except ValueError:
        raise ImageError(f"token server {_origin(realm)} did not answer a JSON object") from None
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not _HEADER_SAFE_RE.match(token):
        raise ImageError(f"token server {_origin(realm)} answered no usable token")
    return token
