"""``--docker-dir DIR``: build a Dockerfile directory through the Docker daemon, as nitro-cli's
``build-enclave --docker-dir DIR --docker-uri TAG`` does, and tag the result TAG.

The build runs in the daemon (``POST /build`` via the Docker SDK, the same context the docker CLI
sends); the image is then converted like any ``docker://TAG``.  Only the daemon's own build log
reaches the user, on stderr, and a failed build is an ImageError naming the step that failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from qtbuild.errors import ImageError


def build_image(directory: str | os.PathLike, tag: str, *, log: Callable[[str], None]) -> str:
    """Build ``directory`` (which holds a Dockerfile) as ``tag`` in the daemon; returns the image ID."""
    import docker

    from qtbuild.sources.daemon_request import daemon_reason, sdk_client

    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "Dockerfile")):
        raise ImageError(f"--docker-dir {directory}: no Dockerfile in that directory")
    client = sdk_client()
    try:
        image, output = client.images.build(path=directory, tag=tag, rm=True)
        for line in output:
            text = line.get("stream", "").rstrip("\n") if isinstance(line, dict) else ""
            if text:
                log(text)
        return image.id
    except docker.errors.BuildError as exc:
        raise ImageError(f"docker build of {directory} as {tag!r} failed: {exc.msg}") from None
    except docker.errors.DockerException as exc:
        raise ImageError(f"docker build of {directory} as {tag!r} failed: {daemon_reason(exc)}") from None
    finally:
        client.close()
