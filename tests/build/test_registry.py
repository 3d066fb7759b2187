"""RegistryImage against a real registry (Debian's docker-registry) over real HTTP.

Fronts (tests/helpers/registry_server.py) stand between client and registry where a test needs
auth, redirects or hostile answers.  The ``registry`` fixture comes from tests/build/conftest.py.
"""

from __future__ import annotations

import base64
import json
import socket
import tarfile
import uuid

import pytest

from qtbuild.errors import ImageError
from qtbuild.sources.auth import Credentials, lookup_credentials, parse_challenges
from qtbuild.sources.base import Platform
from qtbuild.sources.registry import RegistryImage, parse_reference
from qtbuild.sources.select import DOCKER_MANIFEST_LIST, OCI_INDEX

from helpers.registry_server import (
    Front,
    Reply,
    build_image,
    server_tls_context,
    sha256,
    tls_files,
)

DIGEST = "sha256:" + "ab" * 32


def unique_repo(prefix: str = "test") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def tar_contents(stream) -> dict[str, bytes]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.fixture
def no_docker_config(tmp_path, monkeypatch):
    """An empty DOCKER_CONFIG so the developer's own credentials never leak into a test."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    return tmp_path / "docker-config"


def write_docker_config(directory, document: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(document))


# -- references ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, host, repo, tag, digest",
    [
        ("registry://127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None),
        ("localhost/a/b-c/d_e:v1.2", "localhost", "a/b-c/d_e", "v1.2", None),
        (f"registry://r.example.com/app@{DIGEST}", "r.example.com", "app", None, DIGEST),
        (f"r.example.com:443/app:v1@{DIGEST}", "r.example.com:443", "app", "v1", DIGEST),
        ("registry://docker.io/alpine:3.19", "docker.io", "library/alpine", "3.19", None),
        ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ],
)
def test_parse_reference(text, host, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, digest)
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("registry://hostonly", "HOST[:PORT]/REPOSITORY"),
        ("registry://h/App", "not a valid repository name"),
        ("registry://h/a/../b", "not a valid repository name"),
        ("registry://h/a//b", "not a valid repository name"),
        ("registry://h/app:-bad", "not a valid tag"),
        ("registry://h/app@sha256:abc", "not a valid sha256 digest"),
        ("registry://h/app@sha512:" + "a" * 128, "not a valid sha256 digest"),
        ("registry://bad_host!/app", "not a valid registry host"),
    ],
)
def test_parse_reference_rejects(text, fragment):
    with pytest.raises(ImageError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_reference(text)


# -- pulls -----------------------------------------------------------------------------------------


def test_pull_by_tag(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"hello.txt": b"hello"})
    digest = registry.push_image(repo, "v1", image)

    with RegistryImage(f"registry://{registry.host}/{repo}:v1") as pulled:
        assert pulled.manifest_bytes() == image.manifest
        assert pulled.config_bytes() == image.config
        assert pulled.image_id == sha256(image.config)
        assert pulled.repo_digests == [f"{registry.host}/{repo}@{digest}"]
        [layer] = pulled.layers()
        assert layer.open_blob().read() == image.layers[0]
        assert tar_contents(layer.open_uncompressed()) == {"hello.txt": b"hello"}


def test_default_tag_and_docker_media_types(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"a": b"docker"}, docker=True)
    registry.push_image(repo, "latest", image)
    pulled = RegistryImage(f"{registry.host}/{repo}")  # no scheme, no tag
    assert pulled.manifest_bytes() == image.manifest
    assert tar_contents(pulled.layers()[0].open_uncompressed()) == {"a": b"docker"}


def test_config_fetched_once(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"a": b"1"})
    registry.push_image(repo, "v1", image)
    with Front(upstream=registry.host) as front:
        pulled = RegistryImage(f"{front.host}/{repo}:v1")
        pulled.config_bytes(), pulled.layers(), pulled.config(), pulled.image_id
        assert len(front.paths(sha256(image.config))) == 1


def test_pull_by_digest(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"d": b"by digest"})
    digest = registry.push_image(repo, None, image)
    pulled = RegistryImage(f"registry://{registry.host}/{repo}@{digest}")
    assert pulled.manifest_bytes() == image.manifest
    assert pulled.repo_digests == [f"{registry.host}/{repo}@{digest}"]


def test_pull_by_digest_detects_substituted_manifest(registry, no_docker_config):
    repo = unique_repo()
    wanted = registry.push_image(repo, None, build_image({"x": b"wanted"}))
    other = build_image({"x": b"other"})
    registry.push_image(repo, "other", other)

    def substitute(front, seen):
        return front.forward(seen) if "/manifests/" not in seen.path else Reply(
            200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, other.manifest)

    with Front(substitute, upstream=registry.host) as front, pytest.raises(ImageError, match="digest mismatch"):
        RegistryImage(f"{front.host}/{repo}@{wanted}")


def push_index(registry, repo, tag, media_type=OCI_INDEX, extra_entries=()):
    """Push amd64 and arm64 images and an index over them; returns (index digest, {arch: image})."""
    images = {arch: build_image({"arch": arch.encode()}, architecture=arch) for arch in ("amd64", "arm64")}
    entries = list(extra_entries)
    for arch, image in images.items():
        digest = registry.push_image(repo, None, image)
        entries.append({"mediaType": image.manifest_type, "digest": digest, "size": len(image.manifest),
                        "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()
    return registry.push_manifest(repo, tag, index, media_type), images


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_MANIFEST_LIST])
def test_multi_platform_index(registry, no_docker_config, media_type):
    repo = unique_repo()
    index_digest, images = push_index(registry, repo, "multi", media_type)
    for arch in ("amd64", "arm64"):
        pulled = RegistryImage(f"{registry.host}/{repo}:multi", platform=Platform.parse(f"linux/{arch}"))
        assert pulled.manifest_bytes() == images[arch].manifest
        assert pulled.config()["architecture"] == arch
        assert tar_contents(pulled.layers()[0].open_uncompressed()) == {"arch": arch.encode()}
        assert pulled.repo_digests == [f"{registry.host}/{repo}@{index_digest}"]
    with pytest.raises(ImageError, match="s390x"):
        RegistryImage(f"{registry.host}/{repo}:multi", platform=Platform.parse("linux/s390x"))


def test_index_without_platform_fields(registry, no_docker_config):
    """Entries without ``platform`` are judged by their config (fetched from /blobs/)."""
    repo = unique_repo()
    images = {arch: build_image({"arch": arch.encode()}, architecture=arch) for arch in ("amd64", "arm64")}
    entries = []
    for image in images.values():
        digest = registry.push_image(repo, None, image)
        entries.append({"mediaType": image.manifest_type, "digest": digest, "size": len(image.manifest)})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    registry.push_manifest(repo, "noplat", index, OCI_INDEX)
    pulled = RegistryImage(f"{registry.host}/{repo}:noplat", platform=Platform.parse("arm64"))
    assert pulled.manifest_bytes() == images["arm64"].manifest


def test_index_entry_digest_mismatch(registry, no_docker_config):
    """An index entry whose size/digest does not match the manifest served for it."""
    repo = unique_repo()
    image = build_image({"a": b"1"})
    digest = registry.push_image(repo, None, image)
    entry = {"mediaType": image.manifest_type, "digest": digest, "size": len(image.manifest) + 1,
             "platform": {"os": "linux", "architecture": "amd64"}}
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}).encode()
    registry.push_manifest(repo, "bad", index, OCI_INDEX)
    with pytest.raises(ImageError, match="truncated|size"):
        RegistryImage(f"{registry.host}/{repo}:bad")


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_repo_and_tag(registry, no_docker_config):
    with pytest.raises(ImageError, match="not found in registry"):
        RegistryImage(f"{registry.host}/no/such-repo:v1")
    repo = unique_repo()
    registry.push_image(repo, "v1", build_image({"a": b""}))
    with pytest.raises(ImageError, match=rf"{repo}:v2 not found in registry"):
        RegistryImage(f"{registry.host}/{repo}:v2")


def test_connection_refused(no_docker_config):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens once closed
    with pytest.raises(ImageError, match="connection refused"):
        RegistryImage(f"127.0.0.1:{port}/app")


def test_timeout(no_docker_config):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with pytest.raises(ImageError, match="did not answer"):
            RegistryImage(f"127.0.0.1:{silent.getsockname()[1]}/app", timeout=0.5)


def test_tls_error_against_plain_http_server(registry, no_docker_config):
    with pytest.raises(ImageError, match="TLS"):
        RegistryImage(f"{registry.host}/app", plain_http=False)


@pytest.fixture
def https_front(registry, tmp_path):
    """An HTTPS front (certificate from a test CA) to the registry; returns (front, ca.pem)."""
    ca, certificate, key = tls_files(tmp_path)
    with Front(upstream=registry.host, tls=server_tls_context(certificate, key)) as front:
        yield front, ca


def test_https_pull(registry, https_front, monkeypatch, no_docker_config):
    front, ca = https_front
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    repo = unique_repo()
    registry.push_image(repo, "v1", build_image({"tls": b"yes"}))
    pulled = RegistryImage(f"{front.host}/{repo}:v1", plain_http=False)
    assert tar_contents(pulled.layers()[0].open_uncompressed()) == {"tls": b"yes"}


def test_https_untrusted_certificate(https_front, no_docker_config):
    front, _ = https_front
    with pytest.raises(ImageError, match="TLS certificate verification failed for 127.0.0.1"):
        RegistryImage(f"{front.host}/app:v1", plain_http=False)


def test_https_redirect_to_plain_http_refused(registry, tmp_path, monkeypatch, no_docker_config):
    """Even a loopback http:// target is refused once the registry speaks HTTPS."""
    ca, certificate, key = tls_files(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    repo = unique_repo()
    registry.push_image(repo, "v1", build_image({"r": b"r"}))

    def redirect(front, seen):
        if "/blobs/" in seen.path:
            return Reply(307, {"Location": f"http://{registry.host}{seen.path}"})
        return front.forward(seen)

    with (
        Front(redirect, upstream=registry.host, tls=server_tls_context(certificate, key)) as front,
        pytest.raises(ImageError, match="refusing to downgrade from HTTPS"),
    ):
        RegistryImage(f"{front.host}/{repo}:v1", plain_http=False)


def test_plain_http_refused_for_non_loopback_without_connecting(monkeypatch, no_docker_config):
    def no_connections(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connections)
    monkeypatch.setattr(socket, "getaddrinfo", no_connections)
    with pytest.raises(ImageError, match="refusing plain HTTP to registry registry.example.com"):
        RegistryImage("registry://registry.example.com/app:v1", plain_http=True)


def test_blob_tampering_detected(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"f": b"x" * 1000})
    registry.push_image(repo, "v1", image)
    layer_digest = sha256(image.layers[0])

    def flip_one_byte(front, seen):
        reply = front.forward(seen)
        if layer_digest in seen.path:
            body = bytearray(reply.body)
            body[len(body) // 2] ^= 0x01
            reply.body = bytes(body)
        return reply

    with Front(flip_one_byte, upstream=registry.host) as front:
        pulled = RegistryImage(f"{front.host}/{repo}:v1")
        [layer] = pulled.layers()
        with pytest.raises(ImageError, match="digest mismatch"):
            layer.open_blob().read()
        with pytest.raises(ImageError, match="digest mismatch|corrupt"):
            layer.open_uncompressed().read()


def test_config_tampering_detected(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"f": b"x"})
    registry.push_image(repo, "v1", image)

    def swap_config(front, seen):
        reply = front.forward(seen)
        if sha256(image.config) in seen.path:
            reply.body = reply.body.replace(b"amd64", b"arm64")
        return reply

    with Front(swap_config, upstream=registry.host) as front, pytest.raises(ImageError, match="digest mismatch"):
        RegistryImage(f"{front.host}/{repo}:v1").config_bytes()


def test_blob_length_mismatch(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"f": b"y" * 100})
    registry.push_image(repo, "v1", image)

    def extend(front, seen):
        reply = front.forward(seen)
        if sha256(image.layers[0]) in seen.path:
            reply.body += b"extra"
        return reply

    with Front(extend, upstream=registry.host) as front:
        [layer] = RegistryImage(f"{front.host}/{repo}:v1").layers()
        with pytest.raises(ImageError, match="size mismatch"):
            layer.open_blob()


@pytest.mark.parametrize("declare_length", [True, False])
def test_oversized_manifest_refused(declare_length, no_docker_config):
    huge = b'{"schemaVersion": 2, "x": "' + b"a" * (8 * 1024 * 1024) + b'"}'
    def app(front, seen):
        return Reply(200, {"Content-Type": "application/json"}, huge, length=declare_length)
    with Front(app) as front, pytest.raises(ImageError, match="refusing documents over"):
        RegistryImage(f"{front.host}/big:v1")


def test_schema1_refused(no_docker_config):
    schema1 = json.dumps({"schemaVersion": 1, "name": "app", "tag": "v1", "fsLayers": []}).encode()
    def app(front, seen):
        return Reply(200, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                     schema1)
    with Front(app) as front, pytest.raises(ImageError, match="(?i)schema 1"):
        RegistryImage(f"{front.host}/app:v1")


def test_foreign_layer_urls_refused(registry, no_docker_config):
    repo = unique_repo()
    image = build_image({"f": b"foreign"}, layer_extra={"urls": ["https://example.com/layer.tar.gz"]})
    registry.push_image(repo, "v1", image)  # the real registry accepts it (allow-listed in its config)
    with pytest.raises(ImageError, match="(?i)foreign|urls"):
        RegistryImage(f"{registry.host}/{repo}:v1")


# -- auth ------------------------------------------------------------------------------------------


class AuthSetup:
    """A Bearer-token front on 127.0.0.1 (with its token endpoint) that redirects blob GETs to a
    storage front on 127.0.0.2, both forwarding to the real registry."""

    def __init__(self, registry, username="alice", password="s3cret", challenge="bearer"):
        self.credentials = (username, password)
        self.tokens: dict[str, str] = {}  # token -> scope
        self.token_requests: list = []
        self.storage = Front(upstream=registry.host, address="127.0.0.2")
        self.front = Front(self.app, upstream=registry.host)
        self.challenge = challenge

    def app(self, front, seen):
        if seen.path.startswith("/token"):
            return self.issue_token(seen)
        if not self.authorized(seen):
            realm = f"http://{front.host}/token"
            header = (f'Bearer realm="{realm}",service="test-registry",scope="repository:app:pull"'
                      if self.challenge == "bearer" else 'Basic realm="test"')
            if "/manifests/" in seen.path or "/blobs/" in seen.path:
                repo = seen.path.split("/v2/", 1)[1].rsplit("/", 2)[0]
                header = header.replace("repository:app:pull", f"repository:{repo}:pull")
            return Reply(401, {"WWW-Authenticate": header}, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
        if "/blobs/" in seen.path:
            return Reply(307, {"Location": f"http://{self.storage.host}{seen.path}"})
        return front.forward(seen)

    def basic(self) -> str:
        return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()

    def authorized(self, seen) -> bool:
        header = seen.headers.get("authorization", "")
        if self.challenge == "basic":
            return header == self.basic()
        scope = self.tokens.get(header.removeprefix("Bearer "))
        return scope is not None and seen.path.startswith(f"/v2/{scope.split(':')[1]}/")

    def issue_token(self, seen):
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(seen.path).query)
        self.token_requests.append((query, seen.headers.get("authorization")))
        if seen.headers.get("authorization") != self.basic():
            return Reply(401, {}, b"{}")
        token = uuid.uuid4().hex
        self.tokens[token] = query["scope"][0]
        return Reply(200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode())

    def close(self):
        self.front.close()
        self.storage.close()


@pytest.fixture
def auth_setup(registry):
    setups = []

    def make(**kwargs):
        setups.append(AuthSetup(registry, **kwargs))
        return setups[-1]

    yield make
    for setup in setups:
        setup.close()


def test_bearer_token_flow(registry, auth_setup, no_docker_config):
    setup = auth_setup()
    auth = base64.b64encode(b"alice:s3cret").decode()
    write_docker_config(no_docker_config, {"auths": {setup.front.host: {"auth": auth}}})
    repo = unique_repo()
    image = build_image({"secret": b"data"})
    registry.push_image(repo, "v1", image)

    pulled = RegistryImage(f"registry://{setup.front.host}/{repo}:v1")
    [layer] = pulled.layers()
    assert tar_contents(layer.open_uncompressed()) == {"secret": b"data"}
    assert layer.open_blob().read() == image.layers[0]

    # one token, for exactly the pull scope, obtained with the Basic credentials
    requested = [(q["scope"], q["service"]) for q, _ in setup.token_requests]
    assert requested == [([f"repository:{repo}:pull"], ["test-registry"])]
    assert setup.token_requests[0][1] == setup.basic()
    # blobs went to the storage host, without the registry's Authorization header
    blob_requests = setup.storage.paths("/blobs/")
    assert len(blob_requests) == 3  # config + two layer opens
    assert all("authorization" not in s.headers for s in blob_requests)
    # the registry itself saw the token on every request after the first challenge
    assert all(s.headers.get("authorization", "").startswith("Bearer ") for s in setup.front.paths("/v2/")[1:])


def test_expired_token_is_renewed(registry, auth_setup, no_docker_config):
    setup = auth_setup()
    write_docker_config(no_docker_config, {"auths": {setup.front.host: {"username": "alice", "password": "s3cret"}}})
    repo = unique_repo()
    image = build_image({"t": b"token"})
    registry.push_image(repo, "v1", image)
    [layer] = RegistryImage(f"{setup.front.host}/{repo}:v1").layers()
    setup.tokens.clear()  # every issued token expires
    assert layer.open_blob().read() == image.layers[0]
    assert len(setup.token_requests) == 2


def test_username_password_entry_and_basic_challenge(registry, auth_setup, no_docker_config):
    setup = auth_setup(challenge="basic")
    entry = {"username": "alice", "password": "s3cret"}
    write_docker_config(no_docker_config, {"auths": {f"http://{setup.front.host}/v1/": entry}})
    repo = unique_repo()
    registry.push_image(repo, "v1", build_image({"b": b"basic"}))
    pulled = RegistryImage(f"{setup.front.host}/{repo}:v1")
    assert tar_contents(pulled.layers()[0].open_uncompressed()) == {"b": b"basic"}
    assert all("authorization" not in s.headers for s in setup.storage.seen)


def test_wrong_credentials(registry, auth_setup, no_docker_config):
    setup = auth_setup()
    write_docker_config(no_docker_config, {"auths": {setup.front.host: {"username": "alice", "password": "wrong"}}})
    with pytest.raises(ImageError, match="refused.*check .*config.json"):
        RegistryImage(f"{setup.front.host}/app:v1")


def test_no_credentials(registry, auth_setup, no_docker_config):
    setup = auth_setup(challenge="basic")
    with pytest.raises(ImageError, match="401.*no credentials for this registry"):
        RegistryImage(f"{setup.front.host}/app:v1")


def test_credential_helper_reported(registry, auth_setup, no_docker_config, caplog):
    setup = auth_setup()
    write_docker_config(no_docker_config, {"auths": {setup.front.host: {}}, "credsStore": "desktop"})
    with pytest.raises(ImageError, match="docker-credential-desktop, which qtbuild does not support"):
        RegistryImage(f"{setup.front.host}/app:v1")
    assert "docker-credential-desktop" in caplog.text


def test_token_realm_must_not_be_plain_http_elsewhere(no_docker_config):
    def app(front, seen):
        return Reply(401, {"WWW-Authenticate": 'Bearer realm="http://auth.example.com/token"'})
    with Front(app) as front, pytest.raises(ImageError, match="refusing plain HTTP to 'auth.example.com'"):
        RegistryImage(f"{front.host}/app:v1")


def test_redirect_to_plain_http_elsewhere_refused(registry, no_docker_config):
    repo = unique_repo()
    registry.push_image(repo, "v1", build_image({"r": b"r"}))

    def redirect(front, seen):
        if "/blobs/" in seen.path:
            return Reply(302, {"Location": "http://storage.example.com" + seen.path})
        return front.forward(seen)

    with (
        Front(redirect, upstream=registry.host) as front,
        pytest.raises(ImageError, match="refusing plain HTTP to 'storage.example.com'"),
    ):
        RegistryImage(f"{front.host}/{repo}:v1").config_bytes()


# -- auth.py units -----------------------------------------------------------------------------------


def test_parse_challenges():
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/alpine:pull,push"')
    [bearer] = parse_challenges([header])
    assert bearer.scheme == "bearer"
    assert bearer.params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                             "scope": "repository:library/alpine:pull,push"}
    basic, token = parse_challenges(['Basic realm="a \\"q\\"", Bearer realm=x'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'a "q"'})
    assert (token.scheme, token.params) == ("bearer", {"realm": "x"})


def test_lookup_credentials(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "auths": {
            "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw:with:colons").decode()},
            "r.example.com:5000": {"username": "u", "password": "p"},
            "bad.example.com": {"auth": "!!!"},
        },
        "credHelpers": {"ecr.example.com": "ecr-login"},
    }))
    assert lookup_credentials("docker.io", path).credentials == Credentials("hub", "pw:with:colons")
    assert lookup_credentials("registry-1.docker.io", path).credentials == Credentials("hub", "pw:with:colons")
    assert lookup_credentials("r.example.com:5000", path).credentials == Credentials("u", "p")
    assert lookup_credentials("r.example.com", path).credentials is None
    assert "docker-credential-ecr-login" in lookup_credentials("ecr.example.com", path).unsupported
    with pytest.raises(ImageError, match="not base64"):
        lookup_credentials("bad.example.com", path)
    assert lookup_credentials("x", tmp_path / "missing.json").credentials is None
