"""The Docker daemon's side of ``docker://REF``: connect, inspect the image, request its save — early.

Docker (20.10 and later, ``image/tarexport/save.go``) exports every layer of a saved image into a
temporary directory before it sends the first byte, and the HTTP response headers come with that
byte: 5-6 s for a 1 GiB image, during which the client can only wait.  So the request should leave
as soon as the command line is parsed, and the rest of the convert (importing the pipeline, loading
a signing key, the boot profile) be done meanwhile.

:class:`SaveRequest` inspects the image on the calling thread, then sends ``GET /images/{id}/get``
(what ``docker save`` does; by ID, so a tag moved meanwhile cannot swap the image) from a worker
thread, which waits there for the first chunk and then receives up to :data:`READ_AHEAD` chunks
ahead of the reader (the early layer spilled to disk, or the tree built from a live one, is then
not stalled by every receive).  The daemon is the one ``DOCKER_HOST`` names (the
docker CLI's default socket when unset); a Unix socket or a plain ``tcp://`` one is spoken to with
the standard library (:mod:`qtbuild.sources.docker_api`: no SDK import, a tenth to a quarter of a
second before the request can leave), anything else (TLS, ``ssh://``) through the Docker SDK
(``docker.from_env()``, as before).  Errors are not raised where they happen but by
:meth:`SaveRequest.inspected` and the iterator of :meth:`SaveRequest.chunks`, so a request sent
early fails at the same point of the command, with the same one-line message, as one sent late:
an image the daemon does not hold, a daemon that cannot be reached (with what to do, also for a
socket the user may not open), or the daemon's own explanation.  With Engine API >= 1.48 a
requested platform is passed to the save.

:func:`sent_early` is for the CLI: it sends the request and parks it, and the first
:class:`~qtbuild.sources.daemon.DaemonImage` opened for the same reference and platform in this
process takes it over (:func:`take_early`); one never taken is closed when the block ends.  This module
imports nothing heavy (the Docker SDK only when it is needed), so the CLI can import it before the
convert pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Generator, Iterator
from typing import Protocol

from qtbuild.convert.handoff import Handoff
from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json
from qtbuild.sources import docker_api
from qtbuild.sources.base import KNOWN_PREFIXES, MAX_JSON_DOCUMENT, Platform, check_digest

CHUNK = 1 << 20
PLATFORM_SAVE_API = (1, 48)
#: Seconds an inspect may go without a byte.
INSPECT_TIMEOUT = 60.0
#: Seconds the save may go without a byte: the daemon exports the whole image before the first one
#: (about 6 s per GiB measured; Docker 20.10), so this bounds a hung daemon, not a slow one.
SAVE_TIMEOUT = 600.0
#: Chunks received ahead of the reader (each CHUNK bytes).
READ_AHEAD = 8


class SaveRequest:
    """The inspect and save of image ``ref`` (see the module docstring); :meth:`close` it unless
    :meth:`chunks` was read to its end."""

    def __init__(self, ref: str, platform: Platform | None = None):
        self.ref = ref
        self.platform = platform
        self._attrs: dict = {}
        self._error: ImageError | None = None
        self._closed = False
        self._ahead: Handoff[bytes] = Handoff(READ_AHEAD)
        self.platform_in_save = False
        daemon = None
        try:
            daemon = _daemon()
            self._attrs = daemon.inspect(ref)
            #: Whether the save names ``platform`` (Engine API >= 1.48): the daemon then picks that platform's
            #: image, which the inspect (of the default platform's) may not describe.
            self.platform_in_save = platform is not None and daemon.api_version() >= PLATFORM_SAVE_API
            # sent here where it can be: the worker would wait for the GIL while this thread imports the converter
            image_id = check_digest(self._attrs.get("Id"), f"docker://{ref}: image ID")
            chunks = daemon.save(image_id, ref, platform if self.platform_in_save else None)
        except ImageError as exc:
            self._error = exc
            if daemon is not None:
                daemon.close()
            return
        threading.Thread(target=self._read_ahead, args=(chunks,), name="docker-save", daemon=True).start()

    def _read_ahead(self, chunks: Generator[bytes]) -> None:
        """On the worker: the save's chunks (the first after the daemon's export), up to READ_AHEAD ahead of
        the reader, so receiving overlaps with what the reader does with them.  The chunks close the daemon."""
        try:
            for chunk in chunks:
                if not self._ahead.put(chunk):
                    return  # closed by the reader
            self._ahead.end()
        except ImageError as exc:
            self._ahead.fail(exc)
        except BaseException as exc:  # never lost on a thread: raised where the chunks are read
            self._ahead.fail(ImageError(f"Docker daemon failed to save {self.ref!r}: {type(exc).__name__}"))
        finally:
            chunks.close()

    def inspected(self) -> dict:
        """The daemon's image inspect (``Id``, ``RootFS``, ``RepoDigests``, ...); ImageError if the daemon
        could not be reached or has no such image."""
        if not self._attrs and self._error is not None:
            raise self._error
        return self._attrs

    def chunks(self) -> Iterator[bytes]:
        """The save stream's chunks as the daemon sends them; a daemon or connection error is an ImageError."""
        try:
            if self._error is not None:
                raise self._error
            while (chunk := self._ahead.get()) is not None:
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Drop the connection (idempotent; a save still being exported is dropped when it answers)."""
        self._closed = True
        self._ahead.stop()


_EARLY: dict[tuple[str, Platform | None], SaveRequest] = {}


@contextlib.contextmanager
def sent_early(ref: str | None, platform: Platform | None = None) -> Iterator[None]:
    """Send the save of ``ref`` now (when given), for the first DaemonImage of ``ref`` and ``platform`` opened in
    the block; at its end, drop every request sent early in it (:func:`send_early` too) and never taken."""
    if ref is not None:
        send_early(ref, platform)
    try:
        yield
    finally:
        while _EARLY:
            _EARLY.popitem()[1].close()


def send_early(ref: str, platform: Platform | None = None) -> None:
    """Send the save of ``ref`` now, inside a :func:`sent_early` block (once an image was built, say)."""
    previous = _EARLY.pop((ref, platform), None)
    if previous is not None:
        previous.close()
    _EARLY[(ref, platform)] = SaveRequest(ref, platform)


def take_early(ref: str, platform: Platform | None) -> SaveRequest | None:
    """The request :func:`sent_early` sent for ``ref`` and ``platform``, once; else None."""
    return _EARLY.pop((ref, platform), None)


class _Daemon(Protocol):
    """A connection to the daemon: the inspect, then the save (whose generator closes it)."""

    def inspect(self, ref: str) -> dict: ...

    def api_version(self) -> tuple[int, ...]: ...

    def save(self, image_id: str, ref: str, platform: Platform | None) -> Generator[bytes]:
        """The save's chunks (the request is sent now, or when they are first asked for)."""
        ...

    def close(self) -> None: ...


def _daemon() -> _Daemon:
    """The daemon ``DOCKER_HOST`` names: over a plain socket with the standard library when it can be
    reached so (no SDK import), else (TLS, ``ssh://``) through the Docker SDK."""
    address = docker_api.socket_address()
    return _SocketDaemon(address) if address is not None else _SdkDaemon()


def not_found(ref: str) -> ImageError:
    """The error for an image the daemon does not hold."""
    hint = ""
    if ":" in ref and "/" not in ref.partition(":")[0]:
        hint = f" (if {ref.partition(':')[0]}: was meant as a source prefix: the prefixes are {KNOWN_PREFIXES})"
    return ImageError(f"image {ref!r} not found in the Docker daemon; docker pull/build it first{hint}")


def unreachable(url: str, reason: str) -> ImageError:
    """The error for a daemon that cannot be reached, with what to do about it."""
    if "permission denied" in reason.lower():
        return ImageError(f"cannot reach the Docker daemon at {url}: permission denied; run as root, add your user "
                          "to the docker group, or set DOCKER_HOST to a socket you may use")
    return ImageError(f"cannot reach the Docker daemon at {url}: {reason}; is dockerd running? "
                      "set DOCKER_HOST to its socket")


class _SocketDaemon:
    """The daemon over a plain socket (:mod:`qtbuild.sources.docker_api`)."""

    def __init__(self, address: docker_api.SocketAddress):
        self._address = address
        self._version: tuple[int, ...] = (0,)

    def inspect(self, ref: str) -> dict:
        response = self._get(docker_api.api_path("/images/{0}/json", ref), INSPECT_TIMEOUT,
                             lambda reason: unreachable(self._address.url, reason))
        self._version = response.api_version
        try:
            if response.status == 404:
                raise not_found(ref)
            if response.status != 200:
                raise ImageError(f"Docker daemon error inspecting {ref!r}: {response.error_message()}")
            body = response.read(MAX_JSON_DOCUMENT)
        except (OSError, docker_api.ProtocolError) as exc:
            raise unreachable(self._address.url, _reason(exc)) from None
        finally:
            response.close()
        inspect = load_json(body, what=f"the Docker daemon's inspect of {ref!r}", error=ImageError)
        if not isinstance(inspect, dict):
            raise ImageError(f"the Docker daemon's inspect of {ref!r} is not a JSON object")
        return inspect

    def api_version(self) -> tuple[int, ...]:
        return self._version

    def save(self, image_id: str, ref: str, platform: Platform | None) -> Generator[bytes]:
        """Send ``GET /images/{id}/get`` (with ``platform`` when given: API >= 1.48) now; its body in CHUNK pieces."""
        query = {"platform": _platform_json(platform)} if platform is not None else None
        path = docker_api.api_path("/images/{0}/get", image_id, query=query)
        try:
            sock = docker_api.send(self._address, path, timeout=SAVE_TIMEOUT)
        except (OSError, docker_api.ProtocolError) as exc:
            raise _save_failed(ref, _reason(exc)) from None
        return _saved(sock, ref)

    def _get(self, path: str, timeout: float, error) -> docker_api.Response:
        try:
            return docker_api.get(self._address, path, timeout=timeout)
        except (OSError, docker_api.ProtocolError) as exc:
            raise error(_reason(exc)) from None

    def close(self) -> None:
        """Nothing to drop: every request has its own connection, closed with its answer."""


def _saved(sock, ref: str) -> Generator[bytes]:
    """The answer to the save sent on ``sock``, in CHUNK pieces."""
    response = None
    try:
        response = docker_api.receive(sock)
        if response.status != 200:
            raise _save_failed(ref, response.error_message())
        yield from response.chunks(CHUNK)
    except (OSError, docker_api.ProtocolError) as exc:
        raise _save_failed(ref, _reason(exc)) from None
    finally:
        if response is not None:
            response.close()
        sock.close()


def _save_failed(ref: str, reason: str) -> ImageError:
    return ImageError(f"Docker daemon failed to save {ref!r}: {reason}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _platform_json(platform: Platform) -> str:
    wanted = {"os": platform.os, "architecture": platform.architecture}
    if platform.variant:
        wanted["variant"] = platform.variant
    return json.dumps(wanted)


class _SdkDaemon:
    """The daemon through the Docker SDK (``docker.from_env()``: TLS, ``ssh://``)."""

    def __init__(self):
        self._client = sdk_client()

    def inspect(self, ref: str) -> dict:
        import docker

        try:
            return self._client.api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            self.close()
            raise not_found(ref) from None
        except docker.errors.DockerException as exc:
            self.close()
            raise ImageError(f"Docker daemon error inspecting {ref!r}: {daemon_reason(exc)}") from None

    def api_version(self) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in str(self._client.api.api_version).split("."))
        except ValueError:
            return (0,)

    def save(self, image_id: str, ref: str, platform: Platform | None) -> Generator[bytes]:
        import docker
        import requests
        import urllib3

        api = self._client.api
        try:
            if platform is None:
                yield from api.get_image(image_id, chunk_size=CHUNK)
            else:
                params = {"platform": _platform_json(platform)}
                response = api._get(api._url("/images/{0}/get", image_id), params=params, stream=True)
                yield from api._stream_raw_result(response, CHUNK, False)
        except (docker.errors.DockerException, requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise _save_failed(ref, daemon_reason(exc)) from None
        finally:
            self.close()

    def close(self) -> None:
        self._client.close()


def sdk_client():
    """A pinged Docker SDK client for the daemon of ``DOCKER_HOST`` (as the docker CLI finds it); ImageError
    (one line, with what to do) when it cannot be reached."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise unreachable(os.environ.get("DOCKER_HOST", "the default socket"), str(exc)) from None
    return client


def daemon_reason(exc) -> str:
    """The daemon's own explanation in a Docker SDK error, without the request URL the SDK puts in str(exc)."""
    explanation = getattr(exc, "explanation", None)
    if explanation:
        return " ".join(str(explanation).split())
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP status {status}" if status else type(exc).__name__
