"""Manifests, indexes and platform selection, shared by every manifest-based source.

- Media-type constants (OCI and Docker v2) and validating parsers: :func:`parse_descriptor`,
  :func:`parse_manifest`, :func:`parse_index`.
- :func:`choose_named_entries`: pick one image among an index's top-level entries by name
  (``org.opencontainers.image.ref.name`` tag, ``io.containerd.image.name``, ``RepoTags``).
- :func:`select_manifest`: walk (nested) indexes to the manifest for a platform.
- :func:`pair_layers` and :func:`check_config_platform`: tie a manifest to its config.
- :class:`StoreImage`: the :class:`~qtbuild.sources.base.Image` every manifest-based source
  (OCI layout, docker-archive, registry) is, given a :class:`~qtbuild.sources.blobs.BlobStore`
  and verified manifest bytes.

Platform rule (the same for every source): ``os`` and ``architecture`` must be equal (after
normalising x86_64→amd64, aarch64→arm64, arm64/v8→arm64); a requested variant must be equal too;
the first matching entry wins; buildx attestation manifests are skipped.  With no platform
requested, an index holding a single image gives that image, and one with several gives
:data:`DEFAULT_PLATFORM` (linux/amd64) — never the host's architecture, so results do not depend
on the machine that builds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from qtbuild.errors import ImageError
from qtbuild.sources.base import (
    Descriptor,
    Image,
    Layer,
    Platform,
    check_digest,
    parse_json_document,
)
from qtbuild.sources.blobs import BlobStore, StoredLayer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_NONDISTRIBUTABLE = (
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_UNCOMPRESSED = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset({OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER, DOCKER_LAYER_UNCOMPRESSED})
FOREIGN_LAYER_TYPES = frozenset({DOCKER_FOREIGN_LAYER, *OCI_LAYER_NONDISTRIBUTABLE})
#: What a registry client puts in its Accept header for manifests.
MANIFEST_ACCEPT = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REFERENCE_TYPE = "vnd.docker.reference.type"

DEFAULT_PLATFORM = Platform()
MAX_INDEX_DEPTH = 4
MAX_INDEX_ENTRIES = 1024
MAX_LAYERS = 1000

#: ``fetch(descriptor) -> bytes``: the document a descriptor points at, verified against it
#: (e.g. :meth:`BlobStore.read_document`).  :func:`select_manifest` calls it for nested indexes
#: and manifests and, for index entries without a ``platform`` field, for their configs: a
#: registry, which serves manifests and blobs from different endpoints, dispatches on
#: ``descriptor.media_type`` (:data:`CONFIG_TYPES` are blobs).
Fetch = Callable[[Descriptor], bytes]


# -- descriptors and documents ----------------------------------------------------------------

def parse_descriptor(obj: object, what: str) -> Descriptor:
    """Validate one descriptor object; ImageError on a bad digest, size or type, or on ``urls``
    (foreign layers are fetched from arbitrary URLs: refused, CVE-2020-15157)."""
    if not isinstance(obj, dict):
        raise ImageError(f"{what}: descriptor is not a JSON object")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ImageError(f"{what}: descriptor has no mediaType")
    digest = check_digest(obj.get("digest"), what)
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: descriptor {digest} has invalid size {size!r}")
    urls = obj.get("urls")
    if urls:
        raise ImageError(f"{what}: foreign layer {digest} with urls {urls!r} refused (only content "
                         "carried by the image itself is used)")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ImageError(f"{what}: descriptor {digest} has malformed annotations")
    platform = obj.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise ImageError(f"{what}: descriptor {digest} has malformed platform")
    return Descriptor(media_type, digest, size, (), annotations, platform)


@dataclass(frozen=True)
class Manifest:
    """A validated image manifest."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict


def _check_schema(document: dict, what: str) -> None:
    media_type = document.get("mediaType")
    if media_type is not None and not isinstance(media_type, str):
        raise ImageError(f"{what}: mediaType is not a string")
    if media_type in DOCKER_MANIFEST_SCHEMA1 or document.get("schemaVersion") == 1:
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported; re-push the image "
                         "with a current Docker or skopeo")
    if document.get("schemaVersion") != 2:
        raise ImageError(f"{what}: schemaVersion is {document.get('schemaVersion')!r}, expected 2")


def parse_manifest(raw: bytes, what: str = "image manifest") -> Manifest:
    """Parse and validate an OCI or Docker v2 image manifest (ImageError if it is anything else)."""
    document = parse_json_document(raw, what)
    _check_schema(document, what)
    media_type = document.get("mediaType", OCI_MANIFEST)
    if media_type in INDEX_TYPES or "manifests" in document:
        raise ImageError(f"{what} is an index, not an image manifest")
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"{what}: unsupported manifest media type {media_type!r}")
    config = parse_descriptor(document.get("config"), f"{what} config")
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(f"{what}: config media type {config.media_type!r} is not a container image "
                         "config (an OCI artifact?)")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{what}: layers is not a list")
    if len(layers) > MAX_LAYERS:
        raise ImageError(f"{what}: {len(layers)} layers; refusing more than {MAX_LAYERS}")
    descriptors = tuple(parse_descriptor(item, f"{what} layer {i}") for i, item in enumerate(layers))
    for d in descriptors:
        _check_layer_type(d, what)
    return Manifest(media_type, config, descriptors, document.get("annotations") or {})


def _check_layer_type(d: Descriptor, what: str) -> None:
    if d.media_type in FOREIGN_LAYER_TYPES:
        raise ImageError(f"{what}: foreign layer {d.digest} ({d.media_type}) refused")
    if d.media_type not in LAYER_TYPES:
        raise ImageError(f"{what}: layer {d.digest} has unsupported media type {d.media_type!r}")


def parse_index(raw: bytes, what: str = "image index") -> list[Descriptor]:
    """Parse an OCI index / Docker manifest list; returns its ``manifests`` descriptors."""
    return index_entries(parse_json_document(raw, what), what)


def index_entries(document: dict, what: str) -> list[Descriptor]:
    """The validated ``manifests`` descriptors of an already decoded index document."""
    _check_schema(document, what)
    media_type = document.get("mediaType", OCI_INDEX)
    if media_type not in INDEX_TYPES:
        raise ImageError(f"{what}: media type {media_type!r} is not an image index")
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{what}: manifests is not a list")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise ImageError(f"{what}: {len(entries)} entries; refusing more than {MAX_INDEX_ENTRIES}")
    return [parse_descriptor(item, f"{what} entry {i}") for i, item in enumerate(entries)]


# -- platforms --------------------------------------------------------------------------------

def make_platform(os_name: object, architecture: object, variant: object, what: str) -> Platform:
    """A normalised Platform from the fields of a descriptor's ``platform`` or a config."""
    fields = [os_name, architecture] + ([variant] if variant else [])
    if not all(isinstance(f, str) and f and "/" not in f for f in fields):
        raise ImageError(f"{what}: malformed platform {fields!r}")
    return Platform.parse("/".join(map(str, fields)))


def descriptor_platform(d: Descriptor, what: str) -> Platform | None:
    if d.platform is None:
        return None
    p = d.platform
    return make_platform(p.get("os"), p.get("architecture"), p.get("variant"), what)


def config_platform(config: dict, what: str = "image config") -> Platform:
    return make_platform(config.get("os"), config.get("architecture"), config.get("variant"), what)


def platform_matches(have: Platform, want: Platform) -> bool:
    return (have.os, have.architecture) == (want.os, want.architecture) and (
        want.variant is None or have.variant == want.variant
    )


def check_config_platform(config: dict, platform: Platform | None, what: str) -> None:
    """ImageError if a platform was requested and the config says the image is another one."""
    if platform is None:
        return
    have = config_platform(config, f"{what} config")
    if not platform_matches(have, platform):
        raise ImageError(f"{what} is {have}, but {platform} was requested")


def is_attestation(d: Descriptor) -> bool:
    """buildx attestation manifests (and anything else whose platform is unknown/unknown)."""
    if d.annotations.get(ANNOTATION_REFERENCE_TYPE) == "attestation-manifest":
        return True
    return d.platform is not None and d.platform.get("os") == "unknown"


# -- choosing an image ------------------------------------------------------------------------

def choose_named_entries(entries: Sequence[Descriptor], wanted: str | None, *,
                         label: Callable[[Descriptor], str | None],
                         matches: Callable[[str, str], bool], what: str, how: str) -> list[Descriptor]:
    """The top-level entries that make up one image.

    ``label(entry)`` names an entry (None: untagged; untagged entries count as one image, e.g.
    the platform variants of an unnamed index).  With ``wanted``, the entries whose label
    ``matches(label, wanted)``; without, all entries if they share one label or all point at the
    same manifest (one image, several tags), else ImageError listing the names (``how`` tells
    the user how to pick one).
    """
    names = _unique(label(e) or "<untagged>" for e in entries)
    available = ", ".join(names) or "none"
    if wanted is not None:
        chosen = [e for e in entries if (name := label(e)) is not None and matches(name, wanted)]
        if not chosen:
            raise ImageError(f"{what} has no image named {wanted!r}; available: {available}")
        return chosen
    if len(names) > 1 and len({e.digest for e in entries}) > 1:
        raise ImageError(f"{what} holds several images ({available}); {how}")
    return list(entries)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def select_manifest(index: dict | Sequence[Descriptor], platform: Platform | None, fetch: Fetch,
                    *, what: str = "image index",
                    present: Callable[[Descriptor], bool] | None = None) -> tuple[Descriptor, bytes]:
    """Walk an index (a decoded document or its entries) down to one image manifest.

    Nested indexes are followed (depth ≤ MAX_INDEX_DEPTH); attestation manifests and unknown
    media types are skipped, and so are manifests for which ``present`` (if given) is false:
    archives may hold an index naming platforms whose blobs were not saved.  An entry without a
    ``platform`` field is judged by its config.  Returns the manifest's descriptor and its
    verified bytes; ImageError (listing the available platforms) if nothing matches.
    """
    entries = index_entries(index, what) if isinstance(index, dict) else list(index)
    candidates = _flatten(entries, fetch, what, depth=0)
    absent = [d for d in candidates if present is not None and not present(d)]
    candidates = [d for d in candidates if d not in absent]
    if not candidates:
        raise ImageError(f"{what} contains no image manifest" + _absent_note(absent, what))
    wanted = platform or DEFAULT_PLATFORM
    if platform is None and len(candidates) == 1:
        return candidates[0], fetch(candidates[0])
    seen = []
    for d in candidates:
        have, manifest_bytes = _platform_of(d, fetch, what)
        if platform_matches(have, wanted):
            return d, manifest_bytes if manifest_bytes is not None else fetch(d)
        seen.append(str(have))
    default = "" if platform else " (the default; choose another platform explicitly)"
    raise ImageError(f"{what} has no image for {wanted}{default}; available: {', '.join(_unique(seen))}"
                     + _absent_note(absent, what))


def _absent_note(absent: list[Descriptor], what: str) -> str:
    if not absent:
        return ""
    names = _unique(str(p) if (p := descriptor_platform(d, what)) else d.digest for d in absent)
    return f" (not included: {', '.join(names)})"


def _flatten(entries: list[Descriptor], fetch: Fetch, what: str, depth: int) -> list[Descriptor]:
    if depth > MAX_INDEX_DEPTH:
        raise ImageError(f"{what}: indexes nested deeper than {MAX_INDEX_DEPTH} levels")
    out: list[Descriptor] = []
    for d in entries:
        if is_attestation(d):
            continue
        if d.media_type in INDEX_TYPES:
            nested = parse_index(fetch(d), f"{what} → index {d.digest}")
            out.extend(_flatten(nested, fetch, what, depth + 1))
        elif d.media_type in MANIFEST_TYPES:
            out.append(d)
        if len(out) > MAX_INDEX_ENTRIES:
            raise ImageError(f"{what}: more than {MAX_INDEX_ENTRIES} manifests")
    return out


def _platform_of(d: Descriptor, fetch: Fetch, what: str) -> tuple[Platform, bytes | None]:
    """The descriptor's platform, or (when it has none) the platform its config declares."""
    declared = descriptor_platform(d, f"{what} entry {d.digest}")
    if declared is not None:
        return declared, None
    manifest_bytes = fetch(d)
    manifest = parse_manifest(manifest_bytes, f"manifest {d.digest}")
    config = parse_json_document(fetch(manifest.config), f"config {manifest.config.digest}")
    return config_platform(config, f"config {manifest.config.digest}"), manifest_bytes


# -- references -------------------------------------------------------------------------------

def normalize_reference(reference: str) -> str:
    """``busybox`` → ``docker.io/library/busybox:latest``, the form Docker records names in."""
    name, sep, digest = reference.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not sep:
        name += ":latest"
    first, slash, _rest = name.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        name = "docker.io/" + name
    domain, _, path = name.partition("/")
    if domain == "docker.io" and "/" not in path:
        name = f"docker.io/library/{path}"
    return name + sep + digest


def references_match(a: str, b: str) -> bool:
    return normalize_reference(a) == normalize_reference(b)


# -- images built from a manifest -------------------------------------------------------------

def pair_layers(manifest: Manifest, config: dict, what: str) -> list[tuple[Descriptor, str]]:
    """Each manifest layer with its ``rootfs.diff_ids`` entry (ImageError if counts differ)."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"{what}: config has no rootfs.diff_ids list")
    if len(diff_ids) != len(manifest.layers):
        raise ImageError(f"{what}: manifest lists {len(manifest.layers)} layers but config "
                         f"rootfs.diff_ids has {len(diff_ids)}")
    return [(d, check_digest(diff_id, f"{what} diff_id {i}"))
            for i, (d, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True))]


def canonical_json(document: object) -> bytes:
    """Deterministic compact JSON (used for synthesised manifests)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class StoreImage(Image):
    """An image given verified manifest bytes and the :class:`BlobStore` holding its blobs.

    The config is read and verified at construction; a requested ``platform`` is checked
    against it; layers are paired with ``rootfs.diff_ids``.
    """

    def __init__(self, store: BlobStore, manifest_bytes: bytes, *, reference: str,
                 platform: Platform | None = None, repo_digests: Sequence[str] = ()):
        self.reference = reference
        self._store = store
        self._manifest_bytes = manifest_bytes
        self._repo_digests = list(repo_digests)
        manifest = parse_manifest(manifest_bytes, f"{reference}: image manifest")
        self._config_bytes = store.read_document(manifest.config, f"{reference}: image config")
        config = parse_json_document(self._config_bytes, f"{reference}: image config")
        check_config_platform(config, platform, reference)
        self._layers = [StoredLayer(store, d, diff_id) for d, diff_id in pair_layers(manifest, config, reference)]

    def manifest_bytes(self) -> bytes:
        return self._manifest_bytes

    def config_bytes(self) -> bytes:
        return self._config_bytes

    def layers(self) -> list[Layer]:
        return list(self._layers)

    @property
    def repo_digests(self) -> list[str]:
        return list(self._repo_digests)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reference!r})"


def open_from_index(store: BlobStore, entries: Sequence[Descriptor], *, platform: Platform | None,
                    what: str) -> tuple[Descriptor, bytes]:
    """Select the manifest for ``platform`` among ``entries``, reading blobs from ``store``
    (manifests whose blob the store lacks are not candidates)."""
    return select_manifest(entries, platform, lambda d: store.read_document(d, f"{what}: blob {d.digest}"),
                           what=what, present=store.has)
