"""``docker://REF``: an image in a Docker (or podman) daemon, through the Docker SDK.

The daemon is reached the way the docker CLI does it (``docker.from_env()``: ``DOCKER_HOST``,
``DOCKER_TLS_VERIFY``, ``DOCKER_CERT_PATH``).  The image is inspected, then saved by its ID
(``GET /images/{id}/get``, what ``docker save`` does; never ``docker run``/``export``) and the
stream is read in 1 MiB chunks as it arrives (:class:`~qtbuild.sources.save_stream.SaveStreamImage`):
layers are handed to the converter while the daemon is still sending, and only what arrives before
its turn goes to a scratch file next to the output.  Saving by ID rather than by name means a tag
moved meanwhile cannot swap the image.  With Engine API ≥ 1.48 a requested platform is passed to the save; with older
daemons the saved image's config is checked against it instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from qtbuild.errors import ImageError
from qtbuild.sources.base import KNOWN_PREFIXES, Platform
from qtbuild.sources.save_stream import SaveStreamImage

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


def _daemon_chunks(client, image_id: str, ref: str, platform: Platform | None) -> Iterator[bytes]:
    """The save stream's chunks; a daemon or connection error while it flows is an ImageError."""
    import docker
    import requests
    import urllib3

    try:
        yield from _save_chunks(client, image_id, platform)
    except (docker.errors.DockerException, requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise ImageError(f"Docker daemon failed to save {ref!r}: {_daemon_reason(exc)}") from None
    finally:
        client.close()


class DaemonImage(SaveStreamImage):
    """An image held by the Docker daemon, read from its save stream as the daemon sends it.

    ``scratch_dir`` receives the scratch file for layers that arrive before their turn (the
    output's directory when converting; default: the system temp dir).
    """

    def __init__(self, ref: str, *, platform: Platform | None = None, scratch_dir: str | None = None):
        client = _connect()
        try:
            image = _inspect(client, ref)
        except BaseException:
            client.close()
            raise
        self._inspect = image.attrs
        super().__init__(_daemon_chunks(client, image.id, ref, platform), image_id=image.id,
                         reference=f"docker://{ref}", scratch_dir=scratch_dir, platform=platform,
                         repo_digests=list(self._inspect.get("RepoDigests") or []))
