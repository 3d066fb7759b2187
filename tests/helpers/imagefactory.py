"""Synthetic container images for tests: layers, configs, docker-archives and OCI layouts.

Everything is deterministic (mtime 0, root ownership unless asked, fixed key order), so the same
arguments give the same bytes.  Typical use::

    from helpers.imagefactory import default_config, file, directory, make_layer, write_docker_archive

    layer = make_layer([directory("etc"), file("etc/hello", b"hi\\n", mode=0o644)])
    config = default_config(cmd=["/bin/sh"], env=["A=1"])          # diff_ids filled in by writers
    info = write_docker_archive(tmp_path / "app.tar", [layer], config, layout="oci")
    info.config_bytes, info.diff_ids, info.manifest_digest         # what a source must yield

API
---
- :class:`TarMember` (+ shortcuts :func:`file`, :func:`directory`, :func:`symlink`,
  :func:`hardlink`); :func:`make_layer` / :func:`make_tar` turn members into tar bytes.
- :func:`compress` (``None``/``"gzip"``/``"zstd"``, ``parts`` > 1 for multi-member gzip or
  multi-frame zstd); :func:`sha256_digest`.
- :func:`default_config`, :func:`finalize_config` (fills ``rootfs.diff_ids`` when None).
- :func:`write_docker_archive` (one image) and :func:`write_docker_archive_images` (several, as
  :class:`ImageSpec`), ``layout`` = ``"legacy"`` (Docker < 25), ``"oci"`` (Docker ≥ 25,
  graphdriver: OCI layout in the tar, uncompressed layers) or ``"containerd"`` (Docker ≥ 25,
  containerd store: gzip blobs, nested index with an attestation manifest and an entry for a
  platform whose blobs are missing).
- :func:`write_oci_layout`: an OCI layout directory; ``compression``, ``parts``, ``tag``,
  ``platforms`` (multi-platform index), ``nested`` (index.json → index → manifests),
  ``attestation``; ``mutate_manifest`` / ``mutate_index`` hooks edit documents before they are
  hashed (for hostile-input tests).  Calling it again on the same directory adds to index.json.
- Every writer returns a :class:`WrittenImage` with the bytes and digests a source must yield;
  :func:`image_contents` reads what an opened source yields, for comparing with it.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_MEDIA_TYPES = {None: OCI_LAYER, "gzip": OCI_LAYER + "+gzip", "zstd": OCI_LAYER + "+zstd"}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- tar members and layers -------------------------------------------------------------------

@dataclass(frozen=True)
class TarMember:
    """One tar entry.  ``type``: file, dir, symlink, hardlink, fifo, chardev or blockdev.
    ``mode`` None means 0o644 for files, 0o755 for directories, 0o777 for symlinks."""

    name: str
    data: bytes = b""
    type: str = "file"
    mode: int | None = None
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    devmajor: int = 0
    devminor: int = 0
    pax_headers: dict = field(default_factory=dict)


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "chardev": tarfile.CHRTYPE,
          "blockdev": tarfile.BLKTYPE}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw) -> TarMember:
    return TarMember(name, data, "file", mode, **kw)


def directory(name: str, mode: int = 0o755, **kw) -> TarMember:
    return TarMember(name, b"", "dir", mode, **kw)


def symlink(name: str, target: str, **kw) -> TarMember:
    return TarMember(name, b"", "symlink", 0o777, target, **kw)


def hardlink(name: str, target: str, **kw) -> TarMember:
    return TarMember(name, b"", "hardlink", 0o644, target, **kw)


def make_tar(members: Iterable[TarMember], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    """Tar bytes of ``members`` in the given order (names verbatim: hostile ones too)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.type]
            info.mode = m.mode if m.mode is not None else _DEFAULT_MODES.get(m.type, 0o644)
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.uname = info.gname = ""
            info.linkname = m.linkname
            info.devmajor, info.devminor = m.devmajor, m.devminor
            info.pax_headers = dict(m.pax_headers)
            info.size = len(m.data) if m.type == "file" else 0
            tar.addfile(info, io.BytesIO(m.data) if m.type == "file" else None)
    return out.getvalue()


#: A layer is just a tar; the name says what the bytes are for.
make_layer = make_tar


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, compression: str | None, *, parts: int = 1) -> bytes:
    """``data`` as a blob: plain, gzip (``parts`` members) or zstd (``parts`` frames)."""
    if compression is None:
        return data
    pieces = _split(data, parts)
    if compression == "gzip":
        return b"".join(gzip.compress(p, mtime=0) for p in pieces)
    if compression == "zstd":
        import zstandard

        compressor = zstandard.ZstdCompressor(level=3)
        return b"".join(compressor.compress(p) for p in pieces)
    raise ValueError(f"unknown compression {compression!r}")


def _split(data: bytes, parts: int) -> list[bytes]:
    step = max(1, -(-len(data) // parts))
    return [data[i:i + step] for i in range(0, len(data), step)] or [b""]


# -- configs ----------------------------------------------------------------------------------

def default_config(*, cmd: Sequence[str] | None = ("/bin/sh",), entrypoint: Sequence[str] | None = None,
                   env: Sequence[str] | None = (DEFAULT_PATH,), workdir: str | None = None,
                   user: str | None = None, arch: str = "amd64", os: str = "linux",
                   variant: str | None = None, layers: Sequence[bytes] | None = None) -> dict:
    """An image config like ``docker build`` writes.  ``rootfs.diff_ids`` is computed from the
    uncompressed ``layers`` if given, else left None for the writers to fill in."""
    container = {"Env": list(env) if env is not None else None,
                 "Cmd": list(cmd) if cmd is not None else None,
                 "Entrypoint": list(entrypoint) if entrypoint is not None else None,
                 "WorkingDir": workdir or "", "User": user or ""}
    config = {"architecture": arch, "os": os}
    if variant:
        config["variant"] = variant
    config.update({
        "created": "1970-01-01T00:00:00Z",
        "config": {k: v for k, v in container.items() if v is not None},
        "rootfs": {"type": "layers",
                   "diff_ids": [sha256_digest(layer) for layer in layers] if layers is not None else None},
        "history": [],
    })
    return config


def finalize_config(config: dict, layers: Sequence[bytes]) -> bytes:
    """The config's JSON bytes, with ``rootfs.diff_ids`` (and history) filled in where None/empty."""
    config = copy.deepcopy(config)
    rootfs = config.setdefault("rootfs", {"type": "layers"})
    if rootfs.get("diff_ids") is None:
        rootfs["diff_ids"] = [sha256_digest(layer) for layer in layers]
    if config.get("history") == []:
        config["history"] = [{"created": "1970-01-01T00:00:00Z", "created_by": f"layer {i}"}
                             for i in range(len(layers))]
    return json.dumps(config, separators=(",", ":")).encode()


# -- results ----------------------------------------------------------------------------------

@dataclass
class WrittenImage:
    """What a source reading the written image must yield."""

    config_bytes: bytes
    diff_ids: list[str]
    layer_digests: list[str]          # digests of the layer blobs as stored
    manifest_bytes: bytes | None      # None for legacy archives (no manifest stored)
    platform: str = "linux/amd64"
    by_platform: dict[str, WrittenImage] = field(default_factory=dict)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes)

    @property
    def manifest_digest(self) -> str | None:
        return sha256_digest(self.manifest_bytes) if self.manifest_bytes is not None else None

    @property
    def config(self) -> dict:
        return json.loads(self.config_bytes)


@dataclass
class ImageSpec:
    """One image for :func:`write_docker_archive_images`."""

    layers: list[bytes]
    config: dict
    repo_tags: list[str] = field(default_factory=lambda: ["example.com/app:latest"])


class _Blobs:
    """Content-addressed blobs in insertion order."""

    def __init__(self):
        self.blobs: dict[str, bytes] = {}

    def put(self, data: bytes, media_type: str, **extra) -> dict:
        digest = sha256_digest(data)
        self.blobs.setdefault(digest, data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def put_json(self, document: dict, media_type: str, **extra) -> dict:
        return self.put(json.dumps(document, separators=(",", ":")).encode(), media_type, **extra)


def _manifest(blobs: _Blobs, layers: Sequence[bytes], config_bytes: bytes, compression: str | None,
              parts: int, mutate: Callable[[dict], None] | None) -> tuple[dict, WrittenImage]:
    """Store config and layer blobs, then the manifest; return (descriptor, WrittenImage)."""
    layer_descs = [blobs.put(compress(layer, compression, parts=parts), LAYER_MEDIA_TYPES[compression])
                   for layer in layers]
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": blobs.put(config_bytes, OCI_CONFIG), "layers": layer_descs}
    if mutate:
        mutate(manifest)
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    config = json.loads(config_bytes)
    platform = "/".join(p for p in (config.get("os"), config.get("architecture"), config.get("variant")) if p)
    written = WrittenImage(config_bytes, list(config["rootfs"]["diff_ids"]), [d["digest"] for d in layer_descs],
                           manifest_bytes, platform)
    written.by_platform[platform] = written
    desc = blobs.put(manifest_bytes, OCI_MANIFEST)
    return desc, written


def _platform_dict(platform: str) -> dict:
    parts = platform.split("/")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) > 2:
        out["variant"] = parts[2]
    return out


def _attestation(blobs: _Blobs, subject: dict) -> dict:
    statement = blobs.put(b'{"_type":"https://in-toto.io/Statement/v0.1"}', "application/vnd.in-toto+json")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": blobs.put(b"{}", OCI_CONFIG), "layers": [statement]}
    return blobs.put_json(manifest, OCI_MANIFEST, platform={"architecture": "unknown", "os": "unknown"},
                          annotations={"vnd.docker.reference.type": "attestation-manifest",
                                       "vnd.docker.reference.digest": subject["digest"]})


# -- OCI layout directories ---------------------------------------------------------------------

def write_oci_layout(directory: str | os.PathLike, layers: Sequence[bytes], config: dict, *,
                     compression: str | None = "gzip", parts: int = 1, tag: str | None = "latest",
                     platforms: Sequence[str] | None = None, nested: bool = False,
                     attestation: bool = False,
                     mutate_manifest: Callable[[dict], None] | None = None,
                     mutate_index: Callable[[dict], None] | None = None) -> WrittenImage:
    """Write (or add to) an OCI image layout.

    ``platforms`` (e.g. ``["linux/amd64", "linux/arm64/v8"]``) writes one manifest per platform
    (config copies with that os/architecture/variant, same layers) behind an index; the result
    is the first platform's image with all of them in ``by_platform``.  ``nested`` puts them in
    an index blob referenced from index.json (as buildx/containerd do) instead of listing them
    in index.json directly.  ``tag`` becomes the ref.name annotation of the index.json entries.
    """
    root = Path(directory)
    blobs = _Blobs()
    entries, written = _image_entries(blobs, layers, config, compression, parts, platforms, attestation,
                                      mutate_manifest)
    annotations = {REF_NAME: tag} if tag else {}
    if nested or (platforms and len(entries) > 1 and not tag):
        entries = [blobs.put_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX)]
    entries = [dict(e, annotations={**e.get("annotations", {}), **annotations}) if annotations else e for e in entries]
    index_path = root / "index.json"
    empty_index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index = json.loads(index_path.read_bytes()) if index_path.exists() else empty_index
    index["manifests"].extend(entries)
    if mutate_index:
        mutate_index(index)
    for digest, data in blobs.blobs.items():
        blob = root / "blobs" / "sha256" / digest.split(":")[1]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index_path.write_text(json.dumps(index, separators=(",", ":")))
    return written


def _image_entries(blobs: _Blobs, layers, config, compression, parts, platforms, attestation, mutate):
    """Manifest descriptors (with platforms when ``platforms`` is given) and the first image."""
    first = None
    entries = []
    for platform in platforms or [None]:
        cfg = copy.deepcopy(config)
        if platform:
            cfg.pop("variant", None)
            cfg.update(_platform_dict(platform))
        desc, written = _manifest(blobs, layers, finalize_config(cfg, layers), compression, parts, mutate)
        if platform:
            desc["platform"] = _platform_dict(platform)
        entries.append(desc)
        if attestation:
            entries.append(_attestation(blobs, desc))
        if first is None:
            first = written
        first.by_platform[written.platform] = written
    return entries, first


# -- docker save archives -------------------------------------------------------------------------

def write_docker_archive(path: str | os.PathLike, layers: Sequence[bytes], config: dict, *,
                         layout: str = "legacy", repo_tags: Sequence[str] = ("example.com/app:latest",),
                         symlink_duplicates: bool = True) -> WrittenImage:
    """Write a ``docker save``-style tarball of one image (see :func:`write_docker_archive_images`)."""
    return write_docker_archive_images(path, [ImageSpec(list(layers), config, list(repo_tags))],
                                       layout=layout, symlink_duplicates=symlink_duplicates)[0]


def write_docker_archive_images(path: str | os.PathLike, images: Sequence[ImageSpec], *,
                                layout: str = "legacy", symlink_duplicates: bool = True) -> list[WrittenImage]:
    """Write a ``docker save``-style tarball holding ``images``.

    ``layout``: ``"legacy"`` (``<id>/layer.tar``, ``<config hex>.json``, repeated layers as
    symlink members when ``symlink_duplicates``), ``"oci"`` (Docker ≥ 25 graphdriver) or
    ``"containerd"`` (Docker ≥ 25 containerd store).  Blobs precede the JSON files, as in Docker.
    """
    writer = {"legacy": _legacy_archive, "oci": _oci_archive, "containerd": _containerd_archive}[layout]
    members, written = writer(images, symlink_duplicates)
    Path(path).write_bytes(make_tar(members))
    return written


def _docker_name(tag: str) -> str:
    """``app:1`` → ``docker.io/library/app:1`` (how Docker ≥ 25 annotates index.json)."""
    first, slash, _ = tag.partition("/")
    name = tag if slash and ("." in first or ":" in first or first == "localhost") else "docker.io/" + (
        tag if slash else "library/" + tag)
    return name


def _json_member(name: str, document) -> TarMember:
    return file(name, json.dumps(document, separators=(",", ":")).encode())


def _legacy_archive(images: Sequence[ImageSpec], symlink_duplicates: bool):
    members: list[TarMember] = []
    manifest, repositories, results = [], {}, []
    for spec in images:
        config_bytes = finalize_config(spec.config, spec.layers)
        layer_paths, parent, first_path = [], "", {}
        for layer in spec.layers:
            layer_id = hashlib.sha256((parent + "\n" + sha256_digest(layer)).encode()).hexdigest()
            path = f"{layer_id}/layer.tar"
            members += [directory(layer_id), file(f"{layer_id}/VERSION", b"1.0"),
                        _json_member(f"{layer_id}/json", {"id": layer_id, "parent": parent or None})]
            digest = sha256_digest(layer)
            if symlink_duplicates and digest in first_path:
                members.append(symlink(path, "../" + first_path[digest]))
            else:
                members.append(file(path, layer))
                first_path[digest] = path
            layer_paths.append(path)
            parent = layer_id
        config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
        members.append(file(config_name, config_bytes))
        manifest.append({"Config": config_name, "RepoTags": list(spec.repo_tags) or None, "Layers": layer_paths})
        for tag in spec.repo_tags:
            repo, _, t = tag.rpartition(":")
            repositories.setdefault(repo, {})[t] = parent
        diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
        results.append(WrittenImage(config_bytes, diff_ids, [sha256_digest(layer) for layer in spec.layers], None))
    members += [_json_member("manifest.json", manifest), _json_member("repositories", repositories)]
    return members, results


def _oci_archive_common(images: Sequence[ImageSpec], compression: str | None, containerd: bool):
    blobs = _Blobs()
    index_entries, manifest_json, results = [], [], []
    for spec in images:
        config_bytes = finalize_config(spec.config, spec.layers)
        desc, written = _manifest(blobs, spec.layers, config_bytes, compression, 1, None)
        results.append(written)
        top = desc
        if containerd:
            missing = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(b"missing " + desc["digest"].encode()),
                       "size": 1234, "platform": _platform_dict("linux/s390x")}
            nested = [dict(desc, platform=_platform_dict(written.platform)), _attestation(blobs, desc), missing]
            top = blobs.put_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": nested}, OCI_INDEX)
        for tag in spec.repo_tags or [None]:
            annotations = {CONTAINERD_NAME: _docker_name(tag), REF_NAME: tag.rpartition(":")[2]} if tag else {}
            index_entries.append(dict(top, annotations=annotations) if annotations else top)
        manifest_json.append({"Config": "blobs/sha256/" + written.config_digest.split(":")[1],
                              "RepoTags": list(spec.repo_tags) or None,
                              "Layers": ["blobs/sha256/" + d.split(":")[1] for d in written.layer_digests]})
    members = [directory("blobs"), directory("blobs/sha256")]
    members += [file("blobs/sha256/" + d.split(":")[1], data) for d, data in blobs.blobs.items()]
    members += [_json_member("index.json", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}),
                _json_member("manifest.json", manifest_json), file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')]
    return members, results


def _oci_archive(images, _symlink_duplicates):
    return _oci_archive_common(images, None, containerd=False)


def _containerd_archive(images, _symlink_duplicates):
    return _oci_archive_common(images, "gzip", containerd=True)


def image_contents(image) -> tuple[bytes, list[str], list[bytes]]:
    """(config bytes, diff_ids, decompressed layers) of an opened image source, reading every
    layer to EOF (which verifies it)."""
    layers = []
    for layer in image.layers():
        with layer.open_uncompressed() as stream:
            layers.append(stream.read())
    return image.config_bytes(), [layer.diff_id for layer in image.layers()], layers
