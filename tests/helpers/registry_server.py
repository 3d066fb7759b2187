"""Test helpers: a real registry (Debian's ``docker-registry``, distribution 2.8) on loopback, a
tiny push client for it, and :class:`Front`, a loopback HTTP server that forwards to it with hooks
(auth, redirects, tampering) — real HTTP everywhere, no protocol mocks.

The ``registry`` session fixture skips when ``docker-registry`` is missing, unless ``CI`` is set
(CI installs it: ``apt-get install -y docker-registry``), where it fails instead.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import Self

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.sources.select import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)

from . import imagefactory

sha256 = imagefactory.sha256_digest


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def _http(host: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One plain-HTTP exchange: (status, headers, body)."""
    conn = http.client.HTTPConnection(host, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


# -- images to push, built with imagefactory ------------------------------------------------------


@dataclass
class BuiltImage:
    """The blobs and manifest of a single-platform image, ready to push."""

    manifest: bytes
    manifest_type: str
    config: bytes
    layers: list[bytes]


def build_image(files: dict[str, bytes], *, architecture: str = "amd64", docker: bool = False,
                layer_extra: dict | None = None) -> BuiltImage:
    """One gzip layer holding ``files``; OCI media types, or Docker schema 2 ones with ``docker``.
    ``layer_extra`` adds fields to the layer descriptor (e.g. ``urls``)."""
    tar = imagefactory.make_layer([imagefactory.file(name, data) for name, data in sorted(files.items())])
    layer = imagefactory.compress(tar, "gzip")
    config = imagefactory.finalize_config(imagefactory.default_config(arch=architecture), [tar])
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": DOCKER_LAYER if docker else OCI_LAYER_GZIP, "digest": sha256(layer),
                    "size": len(layer), **(layer_extra or {})}],
    }
    return BuiltImage(json.dumps(manifest).encode(), manifest["mediaType"], config, [layer])


class RegistryServer:
    """A running ``docker-registry`` on 127.0.0.1 with filesystem storage, plus a push client."""

    def __init__(self, exe: str, workdir: Path):
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = workdir / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log: {level: error, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {workdir / 'data'}}}}}\n"
            f"http: {{addr: '{self.host}'}}\n"
            # allow foreign-layer URLs so the client's refusal of them is what gets tested
            "validation: {manifests: {urls: {allow: ['^https?://']}}}\n"
        )
        with open(workdir / "registry.log", "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(workdir)

    def _wait_ready(self, workdir: Path) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(workdir / 'registry.log').read_text()}")
            try:
                if _http(self.host, "GET", "/v2/")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.close()
        raise RuntimeError("docker-registry did not answer /v2/ within 15 s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # -- push client (distribution spec: monolithic upload, then manifest PUT) --------------------

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload ``data`` as a blob of ``repo``; returns its digest."""
        digest = sha256(data)
        status, headers, body = _http(self.host, "POST", f"/v2/{repo}/blobs/uploads/", b"")
        assert status == 202, (status, body)
        location = urllib.parse.urlsplit(headers["Location"])
        target = location.path + "?" + (location.query + "&" if location.query else "") + "digest=" + digest
        status, _, body = _http(
            self.host, "PUT", target, data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
        )
        assert status == 201, (status, body)
        return digest

    def push_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        """Store manifest/index ``raw`` under tag or digest ``ref``; returns its digest."""
        status, headers, body = _http(self.host, "PUT", f"/v2/{repo}/manifests/{ref}", raw,
                                      {"Content-Type": media_type})
        assert status == 201, (status, body)
        assert headers["Docker-Content-Digest"] == sha256(raw)
        return sha256(raw)

    def push_image(self, repo: str, tag: str | None, image: BuiltImage) -> str:
        """Push a single-platform image's blobs and manifest (under ``tag``, else by digest);
        returns the manifest digest."""
        for blob in [image.config, *image.layers]:
            self.push_blob(repo, blob)
        return self.push_manifest(repo, tag or sha256(image.manifest), image.manifest, image.manifest_type)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A real registry on 127.0.0.1:<free port> for the whole test session."""
    exe = shutil.which("docker-registry") or shutil.which("registry")
    if exe is None:
        message = "docker-registry is not installed (apt-get install -y docker-registry)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RegistryServer(exe, tmp_path_factory.mktemp("registry"))
    yield server
    server.close()


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost signed by it:
    (ca.pem, server.pem, server-key.pem) written under ``directory``."""
    now = datetime.now(UTC)

    def build(subject, issuer, public_key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qtbuild test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key,
               [(x509.BasicConstraints(ca=True, path_length=None), True)])
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))])
    server = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                   server_key.public_key(), ca_key, [(san, False)])
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


def server_tls_context(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    return context


# -- a loopback HTTP front with hooks ---------------------------------------------------------------


@dataclass
class Seen:
    """A request a :class:`Front` received (header names lower-case)."""

    method: str
    path: str
    headers: dict


@dataclass
class Reply:
    """What a :class:`Front` app answers; ``length=False`` omits Content-Length (body until close)."""

    status: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    length: bool = True


App = Callable[["Front", Seen], Reply]


class Front:
    """A threaded HTTP/1.0 server on ``address`` answering with ``app(front, seen)``.

    The default app forwards GETs to ``upstream`` (a ``host:port``).  Every request is recorded
    in ``seen``.  Use as a context manager.  With ``tls`` (see :func:`server_tls_context`) it
    speaks HTTPS.
    """

    _FORWARDED = ("content-type", "docker-content-digest", "www-authenticate", "location")

    def __init__(self, app: App | None = None, *, upstream: str | None = None, address: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None):
        self.app = app or Front.forward
        self.upstream = upstream
        self.seen: list[Seen] = []
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                front.seen.append(seen)
                reply = front.app(front, seen)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.length:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(reply.body)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.host = f"{address}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def forward(self, seen: Seen) -> Reply:
        """Forward ``seen`` to the upstream registry (Accept only; never Authorization)."""
        headers = {"Accept": seen.headers["accept"]} if "accept" in seen.headers else {}
        status, upstream_headers, body = _http(self.upstream, seen.method, seen.path, headers=headers)
        kept = {k: v for k, v in upstream_headers.items() if k.lower() in self._FORWARDED}
        return Reply(status, kept, body)

    def paths(self, fragment: str = "") -> list[Seen]:
        """The recorded requests whose path contains ``fragment``."""
        return [s for s in self.seen if fragment in s.path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
