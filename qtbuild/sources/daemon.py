"""``docker://REF``: an image in a Docker (or podman) daemon, through the Docker SDK.

The daemon is reached the way the docker CLI does it (``docker.from_env()``: ``DOCKER_HOST``,
``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``).  The image is inspected, then saved by its ID
(``GET /images/{id}/get``, what ``docker save`` does; never ``docker run``/``export``) in 1 MiB
chunks into a temporary file (in ``TMPDIR``), which is read as a docker-archive
(:class:`ArchiveImage`) and removed on :meth:`close`.  Saving by ID rather than by name means a tag
moved meanwhile cannot swap the image.  With Engine API ≥ 1.48 a requested platform is passed to the save; with older
daemons the saved image's config is checked against it instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

from qtbuild.errors import ImageError, naming_path
from qtbuild.sources.archive import ArchiveImage
from qtbuild.sources.base import KNOWN_PREFIXES, Platform

CHUNK = 1 << 20
PLATFORM_SAVE_API = (1, 48)


def _api_version(client) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(client.api.api_version).split("."))
    except ValueError:
        return (0,)


def _connect():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        host = os.environ.get("DOCKER_HOST", "the default socket")
        raise ImageError(f"cannot reach the Docker daemon at {host}: {exc}; is dockerd running? "
                         "set DOCKER_HOST to its socket") from None
    return client


def _inspect(client, ref: str):
    import docker

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        hint = ""
        if ":" in ref and "/" not in ref.partition(":")[0]:
            hint = f" (if {ref.partition(':')[0]}: was meant as a source prefix: the prefixes are {KNOWN_PREFIXES})"
        raise ImageError(f"image {ref!r} not found in the Docker daemon; docker pull/build it first{hint}") from None
    except docker.errors.DockerException as exc:
        raise ImageError(f"Docker daemon error inspecting {ref!r}: {_daemon_reason(exc)}") from None


def _daemon_reason(exc) -> str:
    """The daemon's own explanation, without the request URL the Docker SDK puts in str(exc)."""
    explanation = getattr(exc, "explanation", None)
    if explanation:
        return str(explanation)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP status {status}" if status else type(exc).__name__


def _save_chunks(client, image_id: str, platform: Platform | None):
    """The archive stream of ``GET /images/{id}/get``, platform-specific where the API allows."""
    api = client.api
    if platform is None or _api_version(client) < PLATFORM_SAVE_API:
        return api.get_image(image_id, chunk_size=CHUNK)
    wanted = {"os": platform.os, "architecture": platform.architecture}
    if platform.variant:
        wanted["variant"] = platform.variant
    response = api._get(api._url("/images/{0}/get", image_id), params={"platform": json.dumps(wanted)}, stream=True)
    return api._stream_raw_result(response, CHUNK, False)


def _save_to_temp(client, image_id: str, ref: str, platform: Platform | None) -> str:
    import docker
    import requests

    with naming_path(tempfile.gettempdir()):
        fd, path = tempfile.mkstemp(prefix="qtbuild-daemon-", suffix=".tar")
    try:
        with naming_path(path), os.fdopen(fd, "wb") as out:
            for chunk in _save_chunks(client, image_id, platform):
                out.write(chunk)
    except (docker.errors.DockerException, requests.RequestException) as exc:
        os.unlink(path)
        raise ImageError(f"Docker daemon failed to save {ref!r}: {_daemon_reason(exc)}") from None
    except BaseException:
        os.unlink(path)
        raise
    return path


class DaemonImage(ArchiveImage):
    """An image held by the Docker daemon, saved to a temporary archive for the duration."""

    def __init__(self, ref: str, *, platform: Platform | None = None):
        client = _connect()
        try:
            image = _inspect(client, ref)
            self._inspect = image.attrs
            saved = _save_to_temp(client, image.id, ref, platform)
            self._temp_path: str | None = saved
        finally:
            client.close()
        try:
            super().__init__(saved, platform=platform, reference=f"docker://{ref}")
        except BaseException:
            self.close()
            raise

    @property
    def repo_digests(self) -> list[str]:
        return list(self._inspect.get("RepoDigests") or [])

    def close(self) -> None:
        path = getattr(self, "_temp_path", None)
        self._temp_path = None
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
