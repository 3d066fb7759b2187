"""The Docker daemon's side of ``docker://REF``: connect, inspect the image, request its save — early.

Docker (20.10 and later, ``image/tarexport/save.go``) exports every layer of a saved image into a
temporary directory before it sends the first byte, and the HTTP response headers come with that
byte: 5-6 s for a 1 GiB image, during which the client can only wait.  So the request should leave
as soon as the command line is parsed, and the rest of the convert (importing the pipeline, loading
a signing key, the boot profile) be done meanwhile.

:class:`SaveRequest` connects (``docker.from_env()``: ``DOCKER_HOST``, ``DOCKER_TLS_VERIFY``,
``DOCKER_CERT_PATH``, as the docker CLI does), pings and inspects the image on the calling thread,
then sends ``GET /images/{id}/get`` (what ``docker save`` does; by ID, so a tag moved meanwhile cannot
swap the image) from a worker thread, which waits there for the first chunk.  Errors are not raised
where they happen but by :meth:`SaveRequest.inspected` and the iterator of :meth:`SaveRequest.chunks`,
so a request sent early fails at the same point of the command, with the same message, as one sent
late.  With Engine API >= 1.48 a requested platform is passed to the save.

:func:`sent_early` is for the CLI: it sends the request and parks it, and the first
:class:`~qtbuild.sources.daemon.DaemonImage` opened for the same reference and platform in this
process takes it over (:func:`take_early`); one never taken is closed when the block ends.  This module
imports nothing heavy at import time (the Docker SDK is imported when a request is made), so the CLI
can import it before the convert pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Generator, Iterator

from qtbuild.errors import ImageError
from qtbuild.sources.base import KNOWN_PREFIXES, Platform

CHUNK = 1 << 20
PLATFORM_SAVE_API = (1, 48)


class SaveRequest:
    """The inspect and save of image ``ref`` (see the module docstring); :meth:`close` it unless
    :meth:`chunks` was read to its end."""

    def __init__(self, ref: str, platform: Platform | None = None):
        self.ref = ref
        self.platform = platform
        self._client = None
        self._attrs: dict = {}
        self._error: ImageError | None = None
        self._closed = False
        self._answered = threading.Event()
        self._lock = threading.Lock()
        self._first: bytes = b""
        self._rest: Iterator[bytes] = iter(())
        self.platform_in_save = False
        try:
            self._client = _connect()
            self._attrs = _inspect(self._client, ref)
        except ImageError as exc:
            self._fail(exc)
            return
        #: Whether the save names ``platform`` (Engine API >= 1.48): the daemon then picks that platform's image,
        #: which the inspect (of the default platform's) may not describe.
        self.platform_in_save = platform is not None and _api_version(self._client) >= PLATFORM_SAVE_API
        threading.Thread(target=self._save, args=(self._client,), name="docker-save", daemon=True).start()

    def _fail(self, error: ImageError) -> None:
        self._error = error
        self._answered.set()
        self.close()

    def _save(self, client) -> None:
        """On the worker: send the save and wait for its first chunk (the daemon's export time).
        ``client`` is closed by the chunks, also when :meth:`close` came first."""
        chunks = _daemon_chunks(client, self._attrs["Id"], self.ref, self.platform)
        try:
            first = next(chunks, b"")
        except ImageError as exc:
            self._fail(exc)
            return
        except BaseException as exc:  # never lost on a thread: raised where the chunks are read
            self._fail(ImageError(f"Docker daemon failed to save {self.ref!r}: {type(exc).__name__}"))
            return
        with self._lock:
            if self._closed:
                chunks.close()
            else:
                self._first, self._rest = first, chunks
        self._answered.set()

    def inspected(self) -> dict:
        """The daemon's image inspect (``Id``, ``RootFS``, ``RepoDigests``, ...); ImageError if the daemon
        could not be reached or has no such image."""
        if not self._attrs and self._error is not None:
            raise self._error
        return self._attrs

    def chunks(self) -> Iterator[bytes]:
        """The save stream's chunks as the daemon sends them; a daemon or connection error is an ImageError."""
        try:
            self._answered.wait()
            if self._error is not None:
                raise self._error
            if self._first:
                yield self._first
            yield from self._rest
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection (idempotent; a save still being exported is dropped when it answers)."""
        with self._lock:
            self._closed = True
            rest, self._rest = self._rest, iter(())
            client, self._client = self._client, None
        close_rest = getattr(rest, "close", None)
        if close_rest is not None:
            close_rest()  # _daemon_chunks closes the client
        elif client is not None and self._answered.is_set():
            client.close()


_EARLY: dict[tuple[str, Platform | None], SaveRequest] = {}


@contextlib.contextmanager
def sent_early(ref: str, platform: Platform | None = None) -> Iterator[None]:
    """Send the save of ``ref`` now, for the first DaemonImage of ``ref`` and ``platform`` opened in the block."""
    request = SaveRequest(ref, platform)
    _EARLY[(ref, platform)] = request
    try:
        yield
    finally:
        if _EARLY.get((ref, platform)) is request:
            del _EARLY[(ref, platform)]
            request.close()


def take_early(ref: str, platform: Platform | None) -> SaveRequest | None:
    """The request :func:`sent_early` sent for ``ref`` and ``platform``, once; else None."""
    return _EARLY.pop((ref, platform), None)


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


def _inspect(client, ref: str) -> dict:
    """``GET /images/{ref}/json``; the client is closed when it fails."""
    import docker

    try:
        return client.api.inspect_image(ref)
    except docker.errors.ImageNotFound:
        hint = ""
        if ":" in ref and "/" not in ref.partition(":")[0]:
            hint = f" (if {ref.partition(':')[0]}: was meant as a source prefix: the prefixes are {KNOWN_PREFIXES})"
        client.close()
        raise ImageError(f"image {ref!r} not found in the Docker daemon; docker pull/build it first{hint}") from None
    except docker.errors.DockerException as exc:
        client.close()
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


def _daemon_chunks(client, image_id: str, ref: str, platform: Platform | None) -> Generator[bytes]:
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
