"""Pick the image source from a source string.

- ``docker://REF`` or ``docker-daemon:REF``: an image in the Docker/podman daemon;
- a bare ``REF`` (``busybox:1.36``): the same as ``docker://REF``;
- ``docker-archive:PATH[:REF]``: a ``docker save`` tarball; REF picks one of several images;
- ``oci:DIR[:TAG]``: an OCI image layout directory; TAG is a ``ref.name`` annotation;
- ``oci-archive:PATH[:TAG]``: a tar of an OCI image layout (skopeo, ``podman save --format
  oci-archive``); TAG as for ``oci:``;
- ``registry://HOST/REPO:TAG`` or ``registry://HOST/REPO@DIGEST``: a registry (distribution API).

``PATH[:REF]`` is split as skopeo does (at the first ``:``), unless the whole text names an
existing path.
"""

from __future__ import annotations

import os
import re

from qtbuild.errors import ImageError
from qtbuild.sources.base import KNOWN_PREFIXES, Image, Platform

_DAEMON_PREFIXES = ("docker://", "docker-daemon:")
#: containers-image transports (skopeo, podman) qtbuild does not read.
_UNSUPPORTED_TRANSPORTS = ("containers-storage:", "dir:", "ostree:", "sif:", "tarball:")
#: A Docker image reference (distribution/reference's grammar) or an image ID.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@{_DIGEST})?"
    r"|(?:sha256:)?[0-9a-f]{12,64}"
)


def split_path_and_name(text: str) -> tuple[str, str | None]:
    """``a/b.tar:app:1`` → (``a/b.tar``, ``app:1``); a whole existing path is never split."""
    if os.path.exists(text) or ":" not in text:
        return text, None
    path, _, name = text.partition(":")
    return path, name or None


def daemon_reference(source: str) -> str | None:
    """The image reference when ``source`` names a daemon image (``docker://REF``, a bare REF), else None."""
    for prefix in _DAEMON_PREFIXES:
        if source.startswith(prefix):
            return source[len(prefix):] or None
    if "://" in source or any(source.startswith(p) for p in (*SOURCE_PREFIXES.values(), *_UNSUPPORTED_TRANSPORTS)):
        return None
    return source if _REFERENCE.fullmatch(source) else None


def daemon_source_reference(source: str) -> str | None:
    """The reference :func:`open_image` hands the Docker daemon for ``source``; None when it opens another
    source or refuses ``source``."""
    for prefix in _DAEMON_PREFIXES:
        if source.startswith(prefix):
            named = source[len(prefix):]
            return named if _REFERENCE.fullmatch(named) else None
    ref = daemon_reference(source)
    if ref is None or os.path.isfile(source) or os.path.isfile(os.path.join(source, "oci-layout")):
        return None
    return ref


def open_image(source: str, *, platform: Platform | None, scratch_dir: str | None = None) -> Image:
    """Open ``source`` (see the module docstring); the caller closes the returned image.

    ``scratch_dir``: where a daemon source spills layers that arrive before their turn (the
    output's directory when converting; default: the system temp dir).
    """
    for prefix in _DAEMON_PREFIXES:
        if source.startswith(prefix):
            return _daemon(source[len(prefix):], platform, scratch_dir)
    if source.startswith("docker-archive:"):
        from qtbuild.sources.archive import ArchiveImage

        path, name = split_path_and_name(_required(source, "docker-archive:"))
        return ArchiveImage(path, reference_hint=name, platform=platform)
    if source.startswith("oci-archive:"):
        from qtbuild.sources.oci_archive import OciArchiveImage

        path, tag = split_path_and_name(_required(source, "oci-archive:"))
        return OciArchiveImage(path, tag, platform)
    if source.startswith("oci:"):
        from qtbuild.sources.layout import LayoutImage

        directory, tag = split_path_and_name(_required(source, "oci:"))
        return LayoutImage(directory, tag, platform)
    if source.startswith("registry://"):
        from qtbuild.sources.registry import RegistryImage

        _required(source, "registry://")
        return RegistryImage(source, platform=platform)
    if "://" in source:
        raise ImageError(f"unknown image source {source!r}; use {KNOWN_PREFIXES}")
    for transport in _UNSUPPORTED_TRANSPORTS:
        if source.startswith(transport):
            raise ImageError(f"{source!r}: the {transport} source is not supported; use {KNOWN_PREFIXES} "
                             "(skopeo copy can convert it to oci:DIR)")
    if os.path.isfile(source) or os.path.isfile(os.path.join(source, "oci-layout")):
        raise ImageError(f"{source!r} is a local path, not an image name; write docker-archive:{source} "
                         f"or oci:{source} (or docker://{source} for a daemon image of that name)")
    return _daemon(source, platform, scratch_dir)


SOURCE_PREFIXES = {"daemon": "docker://", "archive": "docker-archive:", "oci": "oci:", "oci-archive": "oci-archive:",
                   "registry": "registry://"}


def with_source_kind(source: str, kind: str | None) -> str:
    """``source`` with the prefix of ``kind`` (``--source daemon|archive|oci|oci-archive|registry``) when it
    has none yet; ImageError when it already names another kind."""
    if kind is None:
        return source
    prefix = SOURCE_PREFIXES[kind]
    if source.startswith(prefix):
        return source
    if any(source.startswith(other) for other in SOURCE_PREFIXES.values()) or source.startswith("docker:"):
        raise ImageError(f"--source {kind} does not match {source!r}; drop --source or the prefix")
    return prefix + source


def _required(source: str, prefix: str) -> str:
    rest = source[len(prefix):]
    if not rest:
        raise ImageError(f"{source!r}: nothing after {prefix}")
    return rest


def _daemon(ref: str, platform: Platform | None, scratch_dir: str | None) -> Image:
    from qtbuild.sources.daemon import DaemonImage

    if not ref:
        raise ImageError("empty image reference")
    if not _REFERENCE.fullmatch(ref):
        prefix = ref.partition(":")[0]
        raise ImageError(f"{ref!r} is not an image reference (and {prefix}: is not a source prefix); "
                         f"use {KNOWN_PREFIXES}, or an image name such as app:1.0")
    return DaemonImage(ref, platform=platform, scratch_dir=scratch_dir)
