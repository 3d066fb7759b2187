"""``docker-archive:PATH[:REF]``: a ``docker save`` tarball, read in place.

Three layouts occur (see docs/images.md, "Sources"):

(a) legacy: ``manifest.json`` → ``<id>.json`` config and ``<dir>/layer.tar`` layers.  There is no
    real manifest, so a deterministic OCI manifest is synthesised: config digest/size from the
    config member; each layer's digest is its ``diff_id`` when the member is a plain tar (the
    common case, verified when read), else the SHA-256 of the member (hashed at open).
(b) Docker ≥ 25, graphdriver store: an OCI layout inside the tar (``index.json``, ``blobs/``),
    plus ``manifest.json``; layers uncompressed.
(c) Docker ≥ 25, containerd store: ``index.json`` → nested index → per-platform manifests,
    original (gzip) blobs, blobs of other platforms possibly missing.

When ``index.json`` is present it is followed (b, c); otherwise ``manifest.json`` (a).  The tar
is never extracted: it is indexed once (member name → data offset and size, with bounded member
count and header sizes), then blobs are read as byte ranges of the file.  Symlink and hardlink
members (how ``docker save`` stores duplicate layers) are resolved inside the archive with a hop
limit; paths with ``..`` or absolute paths are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, cast

from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json
from qtbuild.sources.base import MAX_JSON_DOCUMENT, Descriptor, Platform, check_digest
from qtbuild.sources.blobs import BlobStore, open_file_range, sniff_compression
from qtbuild.sources.select import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    StoreImage,
    canonical_json,
    choose_named_entries,
    open_from_index,
    parse_index,
    references_match,
)

MAX_MEMBERS = 100_000
#: Largest read tarfile may make while indexing (PAX / GNU long-name payloads; CPython reads
#: them whole, with no cap of its own).
MAX_HEADER_READ = 1 << 20
MAX_LINK_HOPS = 40
MAX_IMAGES = 1000

_LAYER_TYPE_BY_COMPRESSION = {None: OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}


@dataclass(frozen=True)
class _Member:
    name: str
    kind: str  # "file", "symlink", "hardlink", "other"
    offset: int
    size: int
    linkname: str


class _BoundedFile:
    """The archive file as tarfile sees it while indexing: refuses oversized single reads."""

    def __init__(self, file: BinaryIO, what: str):
        self._file = file
        self._what = what

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_HEADER_READ:
            raise ImageError(f"{self._what}: tar header payload over {MAX_HEADER_READ} bytes (PAX/long name)")
        return self._file.read(size)

    def seek(self, *args):
        return self._file.seek(*args)

    def tell(self):
        return self._file.tell()


def clean_member_path(name: object, what: str) -> str:
    """A member path from a manifest or descriptor, normalised; ImageError if absolute, with
    ``..`` components or NUL, or not a string."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ImageError(f"{what}: invalid archive path {name!r}")
    if name.startswith("/") or ".." in name.split("/"):
        raise ImageError(f"{what}: archive path {name!r} escapes the archive")
    return posixpath.normpath(name).lstrip("/")


class TarIndex:
    """Member name → location of the data of a tar file, without extracting anything."""

    def __init__(self, path: str | os.PathLike, *, max_members: int = MAX_MEMBERS, kind: str = "docker-archive"):
        self.path = os.fspath(path)
        self._what = f"{kind} {self.path}"
        self.members: dict[str, _Member] = {}
        try:
            with open(self.path, "rb") as f:
                self._index(f, max_members)
        except OSError as exc:
            raise ImageError(f"{self._what}: cannot read: {exc.strerror or exc}") from None
        except (tarfile.TarError, EOFError, UnicodeError, ValueError) as exc:
            raise ImageError(f"{self._what}: not a valid tar archive: {exc}") from None

    def _index(self, f: BinaryIO, max_members: int) -> None:
        compression = sniff_compression(f.read(4))
        if compression:
            raise ImageError(f"{self._what} is {compression}-compressed; random access needs the plain tar: "
                             "decompress it first (docker save, skopeo and podman write it uncompressed)")
        f.seek(0)
        with tarfile.open(fileobj=cast(BinaryIO, _BoundedFile(f, self._what)), mode="r:") as tar:
            while (info := tar.next()) is not None:
                if len(self.members) >= max_members:
                    raise ImageError(f"{self._what}: more than {max_members} members")
                tar.members.clear()  # type: ignore[attr-defined]  # not in typeshed; the index below is all we keep
                self._add(info)

    def _add(self, info: tarfile.TarInfo) -> None:
        if (info.isdir() or not info.name or info.name.startswith("/") or "\0" in info.name
                or ".." in info.name.split("/")):
            return  # absolute and ".." names are never used: such a blob path is then "missing"
        name = posixpath.normpath(info.name)  # "./manifest.json" → "manifest.json"
        kind = ("file" if info.isreg() and not info.issparse() else "symlink" if info.issym()
                else "hardlink" if info.islnk() else "other")
        if name in self.members:
            raise ImageError(f"{self._what}: member {name!r} appears twice")
        self.members[name] = _Member(name, kind, info.offset_data, info.size, info.linkname)

    def resolve(self, name: str, what: str) -> _Member:
        """The regular-file member that ``name`` is or links to (ImageError if none)."""
        current = clean_member_path(name, what)
        for _ in range(MAX_LINK_HOPS):
            member = self.members.get(current)
            if member is None:
                raise ImageError(f"{what}: {current!r} is missing from {self._what}")
            if member.kind == "file":
                return member
            if member.kind == "other":
                raise ImageError(f"{what}: {current!r} is not a regular file in {self._what}")
            target = member.linkname
            if member.kind == "symlink":
                target = posixpath.join(posixpath.dirname(current), target)
            current = _inside_archive(target, what)
        raise ImageError(f"{what}: too many levels of links at {name!r} (more than {MAX_LINK_HOPS})")

    def read_small(self, name: str, what: str, limit: int = MAX_JSON_DOCUMENT) -> bytes:
        member = self.resolve(name, what)
        if member.size > limit:
            raise ImageError(f"{what} is {member.size} bytes; refusing documents over {limit} bytes")
        with self.open(member) as f:
            return f.read()

    def open(self, member: _Member) -> BinaryIO:
        return open_file_range(self.path, member.offset, member.size)


def _inside_archive(target: str, what: str) -> str:
    """Normalise a link target relative to the archive root; refuse escapes and absolute links."""
    if target.startswith("/") or "\0" in target:
        raise ImageError(f"{what}: link to {target!r} leaves the archive")
    normal = posixpath.normpath(target)
    if normal == ".." or normal.startswith("../"):
        raise ImageError(f"{what}: link to {target!r} leaves the archive")
    return normal


class ArchiveStore(BlobStore):
    """Blobs of an archive: explicit digest→member paths, else ``blobs/<alg>/<hex>``."""

    def __init__(self, index: TarIndex, paths: dict[str, str] | None = None):
        self._index = index
        self._paths = dict(paths or {})

    def _member(self, d: Descriptor):
        algorithm, _, hexdigest = check_digest(d.digest, "blob").partition(":")
        name = self._paths.get(d.digest, f"blobs/{algorithm}/{hexdigest}")
        return self._index.resolve(name, f"blob {d.digest}")

    def open_raw(self, d: Descriptor) -> BinaryIO:
        return self._index.open(self._member(d))

    def has(self, d: Descriptor) -> bool:
        try:
            self._member(d)
        except ImageError:
            return False
        return True

    def local_range(self, d: Descriptor) -> tuple[str, int, int] | None:
        member = self._member(d)
        return self._index.path, member.offset, member.size


class ArchiveImage(StoreImage):
    """An image in a ``docker save`` tarball (any of the three layouts).

    ``reference_hint`` picks one image out of a multi-image archive (matched against RepoTags
    and ``io.containerd.image.name`` after normalisation, e.g. ``busybox`` =
    ``docker.io/library/busybox:latest``); without it, an archive with several images is refused
    with a message listing them.  ``platform`` selects in multi-platform archives and is checked
    against the config.  ``reference`` names the image in messages (default
    ``docker-archive:PATH[:HINT]``).
    """

    def __init__(self, path: str | os.PathLike, *, reference_hint: str | None = None,
                 platform: Platform | None = None, reference: str | None = None):
        self.path = os.fspath(path)
        if reference is None:
            reference = f"docker-archive:{self.path}" + (f":{reference_hint}" if reference_hint else "")
        index = TarIndex(self.path)
        if "index.json" in index.members:
            store, manifest_bytes, digests = _open_oci(index, reference_hint, platform, reference)
        elif "manifest.json" in index.members:
            store, manifest_bytes, digests = _open_legacy(index, reference_hint, reference)
            self.manifest_synthesised = True
        else:
            raise ImageError(f"{reference}: neither index.json nor manifest.json found; not a docker save archive")
        super().__init__(store, manifest_bytes, reference=reference, platform=platform, repo_digests=digests)


# -- OCI-in-tar (Docker >= 25) ----------------------------------------------------------------

def _archive_label(d: Descriptor) -> str | None:
    return d.annotations.get(ANNOTATION_CONTAINERD_NAME) or d.annotations.get(ANNOTATION_REF_NAME)


def _archive_name_matches(label: str, wanted: str) -> bool:
    return label == wanted or references_match(label, wanted)


def _open_oci(index: TarIndex, hint: str | None, platform: Platform | None, reference: str):
    store = ArchiveStore(index)
    entries = parse_index(index.read_small("index.json", f"{reference}: index.json"), f"{reference}: index.json")
    chosen = choose_named_entries(entries, hint, label=_archive_label, matches=_archive_name_matches,
                                  what=reference, how="name one: docker-archive:PATH:NAME")
    _, manifest_bytes = open_from_index(store, chosen, platform=platform, what=reference)
    names = (d.annotations.get(ANNOTATION_CONTAINERD_NAME, "") for d in chosen)
    return store, manifest_bytes, sorted({n for n in names if "@sha256:" in n})


# -- legacy manifest.json ---------------------------------------------------------------------

def _read_manifest_json(index: TarIndex, what: str) -> list[dict]:
    document = load_json(index.read_small("manifest.json", what), what=what, error=ImageError)
    if not isinstance(document, list) or not document or not all(isinstance(e, dict) for e in document):
        raise ImageError(f"{what} is not a non-empty list of objects")
    if len(document) > MAX_IMAGES:
        raise ImageError(f"{what} lists {len(document)} images; refusing more than {MAX_IMAGES}")
    return document


def _repo_tags(entry: dict, what: str) -> list[str]:
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ImageError(f"{what}: RepoTags is not a list of strings")
    return tags


def _choose_legacy_entry(entries: list[dict], hint: str | None, what: str) -> dict:
    tagged = [(e, _repo_tags(e, what)) for e in entries]
    available = ", ".join(t for _, tags in tagged for t in tags) or "untagged images only"
    if hint is not None:
        for entry, tags in tagged:
            if any(t == hint or references_match(t, hint) for t in tags):
                return entry
        raise ImageError(f"{what} has no image named {hint!r}; available: {available}")
    if len(entries) > 1:
        raise ImageError(f"{what} holds {len(entries)} images ({available}); name one: docker-archive:PATH:NAME")
    return entries[0]


def _open_legacy(index: TarIndex, hint: str | None, reference: str):
    what = f"{reference}: manifest.json"
    entry = _choose_legacy_entry(_read_manifest_json(index, what), hint, what)
    if entry.get("LayerSources"):
        raise ImageError(f"{what}: foreign layers (LayerSources) refused")
    config_path = clean_member_path(entry.get("Config"), f"{what} Config")
    layer_paths = entry.get("Layers")
    if not isinstance(layer_paths, list):
        raise ImageError(f"{what}: Layers is not a list")
    config_bytes = index.read_small(config_path, f"{reference}: config {config_path}")
    config_desc = _describe(config_bytes, OCI_CONFIG)
    paths = {config_desc.digest: config_path}
    diff_ids = _legacy_diff_ids(config_bytes, len(layer_paths), reference)
    layers = []
    for i, raw_path in enumerate(layer_paths):
        layer_path = clean_member_path(raw_path, f"{what} layer {i}")
        layer = _describe_layer(index, layer_path, diff_ids[i], f"{reference}: layer {layer_path}")
        paths.setdefault(layer.digest, layer_path)
        layers.append(layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor_json(config_desc),
        "layers": [_descriptor_json(d) for d in layers],
    }
    return ArchiveStore(index, paths), canonical_json(manifest), []  # legacy archives record no digests


def _legacy_diff_ids(config_bytes: bytes, count: int, reference: str) -> list[str | None]:
    """The config's diff_ids if there are ``count`` well-formed ones (for digest shortcuts);
    otherwise Nones — StoreImage then reports the mismatch with its usual message."""
    try:
        diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
        if isinstance(diff_ids, list) and len(diff_ids) == count:
            return [d if isinstance(d, str) else None for d in diff_ids]
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    return [None] * count


def _describe(data: bytes, media_type: str) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def _descriptor_json(d: Descriptor) -> dict:
    return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}


def _describe_layer(index: TarIndex, path: str, diff_id: str | None, what: str) -> Descriptor:
    """A descriptor for a legacy layer member: a plain tar's digest is its diff_id (checked when
    the blob is read); a compressed member is hashed now."""
    member = index.resolve(path, what)
    with index.open(member) as f:
        compression = sniff_compression(f.read(4))
    media_type = _LAYER_TYPE_BY_COMPRESSION[compression]
    if compression is None and diff_id is not None:
        return Descriptor(media_type, check_digest(diff_id, f"{what} diff_id"), member.size)
    digest = hashlib.sha256()
    with index.open(member) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Descriptor(media_type, "sha256:" + digest.hexdigest(), member.size)
