"""The image interface every source implements.

Contract for implementers:
- ``config_bytes()`` returns the raw config JSON, already verified against the manifest's config
  digest (``image_id`` is that digest).  ``config()`` is it parsed.
- ``layers()`` lists the layers bottom to top, each paired with its ``diff_id`` from the config's
  ``rootfs.diff_ids`` (same count, or ImageError).
- ``Layer.open_blob()`` returns the stored (possibly compressed) blob as a readable binary
  stream; reading it to EOF verifies its size and digest against the descriptor and raises
  ImageError on mismatch.  ``Layer.open_uncompressed()`` returns the decompressed tar stream
  (compression sniffed from the bytes: gzip multi-member, zstd multi-frame, or none); reading it to
  EOF also verifies the uncompressed SHA-256 against ``diff_id``; total output is capped (size and
  ratio) against decompression bombs.
- Everything untrusted (JSON documents, digests used in paths) is bounded and validated; every
  problem is an :class:`~qtbuild.errors.ImageError` with a clear message.
- ``close()`` releases temporary files; images are context managers.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import BinaryIO

from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json_object

DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
#: Manifests, indexes and configs larger than this are refused (go-containerregistry uses 4 MiB
#: for manifests; configs with long histories stay well under 8 MiB).
MAX_JSON_DOCUMENT = 8 * 1024 * 1024
#: The source prefixes qtbuild.sources.open understands, for error messages.
KNOWN_PREFIXES = "docker://, docker-archive:, oci:, oci-archive:, registry://"


def check_digest(value: object, what: str) -> str:
    """Return ``value`` if it is a well-formed ``sha256:<64 hex>`` digest, else raise ImageError.

    Call it before a digest is used in a path or URL.
    """
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise ImageError(f"{what}: {value!r} is not a valid sha256 digest")
    return value


def parse_json_document(raw: bytes, what: str) -> dict:
    """Decode a bounded JSON object (manifest, index, config), raising ImageError if it is not one."""
    return load_json_object(raw, what=what, limit=MAX_JSON_DOCUMENT, error=ImageError)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest says about a blob."""

    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()
    annotations: dict = field(default_factory=dict)
    platform: dict | None = None


@dataclass(frozen=True)
class Platform:
    """os/architecture[/variant], normalised (amd64, arm64)."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``linux/amd64``, ``linux/arm64/v8``, ``amd64`` ... (ImageError if malformed)."""
        parts = text.strip().split("/")
        if len(parts) == 1:
            parts = ["linux"] + parts
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"platform {text!r} is not of the form os/arch[/variant], e.g. linux/amd64")
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 else None
        if arch == "arm64" and variant == "v8":
            variant = None
        return cls(parts[0], arch, variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def enclave_platform(text: str) -> Platform:
    """``--platform`` as an enclave platform (linux/amd64 or linux/arm64, aliases allowed); else ImageError."""
    platform = Platform.parse(text)
    if platform.os != "linux" or platform.architecture not in ("amd64", "arm64") or platform.variant is not None:
        raise ImageError(f"--platform {text!r} is not an enclave platform: use linux/amd64 or linux/arm64")
    return platform


class Layer(abc.ABC):
    """One filesystem layer of an image."""

    descriptor: Descriptor
    diff_id: str
    #: True when the layer's bytes come from one stream shared with the image's other layers (a
    #: daemon's save stream): its methods may then be called only when its turn comes, bottom to
    #: top, since even :meth:`range_opener` reads the stream up to the layer.
    in_stream_order: bool = False

    @abc.abstractmethod
    def open_blob(self) -> BinaryIO:
        """The stored blob; reading to EOF verifies size and digest (ImageError on mismatch)."""

    def range_opener(self):
        """For a blob stored *uncompressed* in a seekable local file: a callable
        ``(offset, size) -> BinaryIO`` reading that byte range of the blob, so file data can be
        read in place instead of spilled.  None (the default) when that is not possible.
        """
        return None

    @abc.abstractmethod
    def open_uncompressed(self) -> BinaryIO:
        """The layer's tar stream, decompressed; reading to EOF verifies blob digest and diff_id."""

    def reread_opener(self):
        """For a blob stored in a local file, whatever its compression: a callable returning the
        decompressed tar stream afresh (its blob digest is verified again at EOF; the diff_id is
        not), so file data can be re-read instead of spilled.  None (the default) otherwise.
        Use it only for a layer already read to the end through :meth:`open_uncompressed`."""
        return None


class Image(abc.ABC):
    """A single-platform container image."""

    #: Human-readable source reference, e.g. ``docker-archive:app.tar`` or ``registry://h/r:t``.
    reference: str
    #: True when the source stores no manifest and ``manifest_bytes`` is synthesised (legacy
    #: ``docker save``): its digest then names no registry object.
    manifest_synthesised: bool = False

    @abc.abstractmethod
    def manifest_bytes(self) -> bytes:
        """The raw image manifest (for archives without one, a synthesised deterministic one)."""

    @abc.abstractmethod
    def config_bytes(self) -> bytes:
        """The raw config JSON, verified against its digest."""

    @abc.abstractmethod
    def layers(self) -> list[Layer]:
        """Layers bottom to top."""

    @property
    def image_id(self) -> str:
        """The config digest (``sha256:…``): what ``docker images --no-trunc`` shows as the ID."""
        import hashlib

        return "sha256:" + hashlib.sha256(self.config_bytes()).hexdigest()

    @property
    def repo_digests(self) -> list[str]:
        """``name@sha256:…`` references known for this image (may be empty)."""
        return []

    def config(self) -> dict:
        return parse_json_document(self.config_bytes(), "image config")

    def close(self) -> None:  # noqa: B027 -- a no-op default: sources without temporary files keep it
        """Release temporary files or connections."""

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
