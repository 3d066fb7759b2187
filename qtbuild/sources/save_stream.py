"""A ``docker save`` stream read as it arrives: layers are served to the flatten step while the
daemon is still sending, instead of after a full copy of the archive.

:class:`SaveStreamImage` takes the save stream as an iterator of byte chunks (the daemon's
``GET /images/{id}/get`` response) and the image ID (the config digest, from the daemon's inspect).

Legacy layout (Docker < 25 and podman's Docker API: ``<id>/layer.tar`` or ``<diff_id hex>.tar``,
``<config hex>.json``, ``manifest.json``; see docs/images.md, "Sources"), the fast path:

- The stream is parsed member by member (a minimal sequential tar reader: bounded header payloads,
  bounded member count, bounded total size).  Given the diff_ids the daemon reported before the
  save (its image inspect), the constructor reads only the first member, layers are served at
  once and the config (kept in memory, verified against the image ID) is taken when it passes or
  when asked for; its ``rootfs.diff_ids`` must equal the reported ones.  Without them the
  constructor reads up to the config member; layer members met before it are spilled.
- A layer member is *live* when it is the next layer the consumer needs and its diff_id occurs
  once in the image's list: its bytes go straight to the reader of :meth:`Layer.open_uncompressed`
  (which hashes them and checks the diff_id at the end).  Which layer a member is, is known before
  its data: ``<diff_id hex>.tar`` names it; for ``<id>/layer.tar`` the ``<id>/json`` member, which
  Docker writes just before it, names the parent layer's ``<id>`` (the chain of parents gives the
  order).  Anything else with layer data is *spilled*: copied to a private scratch file while its
  SHA-256 is computed, and served from there (in place, through :meth:`Layer.range_opener`) when
  its turn comes, matched by that SHA-256 (hashed on a worker thread while this one writes) — so a
  member is only ever trusted for the diff_id its own bytes hash to.
- After the top layer, the rest of the stream is read (no more spilling): its end must be a
  proper end of archive and ``manifest.json`` must name the config and as many layers.
- The manifest is synthesised exactly as :class:`~qtbuild.sources.archive.ArchiveImage` does for a
  saved legacy archive, so both sources give the same bytes.

OCI layout (Docker >= 25: ``blobs/sha256/…``, ``index.json``; recognised by the first member):
the whole stream is copied to the scratch file, which is then read as a docker-archive (every
layout that source supports, including containerd's compressed blobs and multi-platform indexes).

The scratch file is a :class:`~qtbuild.convert.spill.SpillStore` created on first use in
``scratch_dir`` (the output's directory, so a large image is not duplicated into ``$TMPDIR``):
private, and unlinked at once in the fast path (its descriptors keep it alive); the OCI layout's
copy keeps its name (the archive reader opens it) until :meth:`close`.  Memory is bounded by one
chunk plus one JSON document.  Every problem — truncated stream, diff_id mismatch, daemon error
raised by the chunk iterator as ImageError, malformed tar — is an :class:`ImageError`.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from qtbuild.convert.spill import SpillStore
from qtbuild.convert.tarscan import parse_pax_records
from qtbuild.errors import ImageError
from qtbuild.formats.bounded_input import load_json
from qtbuild.sources.archive import MAX_HEADER_READ, MAX_IMAGES, MAX_MEMBERS, ArchiveImage, clean_member_path
from qtbuild.sources.base import MAX_JSON_DOCUMENT, Descriptor, Image, Layer, Platform, check_digest
from qtbuild.sources.hash_behind import HashBehind
from qtbuild.sources.select import (
    MAX_LAYERS,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    canonical_json,
    check_config_platform,
)

BLOCK = 512
CHUNK = 1 << 20
#: Chunks smaller than this are gathered into larger reads (see _ChunkReader.read).
GATHER = 256 * 1024
#: Largest save stream read (the flatten step's cap on uncompressed layer bytes).
MAX_STREAM_BYTES = 64 << 30
_HEX64 = re.compile(r"[0-9a-f]{64}")
_OCI_FIRST_MEMBERS = ("blobs", "index.json", "oci-layout")


class _ChunkReader:
    """``read(n)`` over an iterator of byte chunks; counts and caps what it reads."""

    def __init__(self, chunks: Iterator[bytes], what: str):
        self._chunks = chunks
        self._what = what
        self._chunk = b""  # the chunk _buffer is a view of
        self._buffer = memoryview(b"")
        self.consumed = 0
        self.recording: bytearray | None = bytearray()  # everything read, until the layout is known

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, none only at the end of the stream.  Small chunks (the Docker SDK yields the
        daemon's 32 KiB HTTP chunks) are gathered up to ``n``: one copy that saves a hash update and a
        write call per chunk downstream.  From a large chunk (qtbuild's own client regroups them into
        1 MiB) the read takes only what that chunk holds, and a whole chunk is returned without a copy."""
        if not self._buffer:
            self._chunk = next(self._chunks, b"")
            self._buffer = memoryview(self._chunk)
        buffer = self._buffer
        if len(buffer) >= min(n, GATHER):
            whole = len(buffer) <= n and len(buffer) == len(self._chunk) and isinstance(self._chunk, bytes)
            data = self._chunk if whole else bytes(buffer[:n])
            self._buffer = buffer[len(data):]
        else:
            data = self._gather(n)
        self.consumed += len(data)
        if self.consumed > MAX_STREAM_BYTES:
            raise ImageError(f"{self._what}: the save stream exceeds {MAX_STREAM_BYTES} bytes")
        if self.recording is not None:
            self.recording += data
        return data

    def _gather(self, n: int) -> bytes:
        parts, size = [], 0
        while size < n:
            if not self._buffer:
                self._chunk = next(self._chunks, b"")
                if not self._chunk:
                    break
                self._buffer = memoryview(self._chunk)
            part = self._buffer[:n - size]
            self._buffer = self._buffer[len(part):]
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        parts, missing = [], n
        while missing:
            data = self.read(missing)
            if not data:
                raise ImageError(f"{self._what}: the save stream ended early (in {what}, after "
                                 f"{self.consumed} bytes); the daemon stopped sending — is it still running?")
            parts.append(data)
            missing -= len(data)
        return b"".join(parts)

    def rest(self) -> Iterator[bytes]:
        """The unread bytes, in chunks (for copying the whole remainder)."""
        while data := self.read(CHUNK):
            yield data


@dataclass(frozen=True)
class _Member:
    name: str  # normalised, relative; "" for names never used (absolute, "..")
    kind: str  # "file", "dir", "link", "other"
    size: int


class _OuterTar:
    """The members of the save stream, in order; :meth:`read` reads the current member's data."""

    def __init__(self, reader: _ChunkReader, what: str):
        self._reader = reader
        self._what = what
        self._left = 0  # unread data of the current member
        self._padding = 0
        self._count = 0
        self.ended = False

    def read(self, n: int) -> bytes:
        data = self._reader.read(min(n, self._left)) if self._left else b""
        if self._left and not data:
            self._reader.read_exact(self._left, "member data")  # raises the truncation error
        self._left -= len(data)
        return data

    def next(self) -> _Member | None:
        """The next member (the previous one's unread data is skipped); None at the end."""
        while self._left:
            self.read(CHUNK)
        self._reader.read_exact(self._padding, "member padding")
        self._padding = 0
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        while True:
            block = self._reader.read_exact(BLOCK, "a tar header")
            if block == bytes(BLOCK):
                self._reader.read_exact(BLOCK, "the end-of-archive marker")
                self.ended = True
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise ImageError(f"{self._what}: not a tar stream at byte {self._reader.consumed - BLOCK}: "
                                 f"{exc}") from None
            size = info.size
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                payload = self._header_payload(size)
                if info.type == tarfile.XHDTYPE:
                    pax = parse_pax_records(payload, self._reader.consumed)
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = payload.split(b"\0", 1)[0]
                continue
            return self._member(info, pax, long_name)

    def _header_payload(self, size: int) -> bytes:
        if size > MAX_HEADER_READ:
            raise ImageError(f"{self._what}: tar header payload over {MAX_HEADER_READ} bytes (PAX/long name)")
        data = self._reader.read_exact(size, "an extended tar header")
        self._reader.read_exact(-size % BLOCK, "tar header padding")
        return data

    def _member(self, info: tarfile.TarInfo, pax: dict[bytes, bytes], long_name: bytes | None) -> _Member:
        self._count += 1
        if self._count > MAX_MEMBERS:
            raise ImageError(f"{self._what}: more than {MAX_MEMBERS} members")
        raw_name = pax.get(b"path") or long_name
        name = raw_name.decode("utf-8", "surrogateescape") if raw_name is not None else info.name
        size = info.size
        if b"size" in pax:
            if not pax[b"size"].isdigit():
                raise ImageError(f"{self._what}: malformed PAX size {pax[b'size'][:40]!r}")
            size = int(pax[b"size"])
        has_data = info.type in tarfile.REGULAR_TYPES or info.type not in tarfile.SUPPORTED_TYPES
        self._left = size if has_data else 0
        self._padding = -self._left % BLOCK
        kind = ("dir" if info.isdir() else "file" if info.isreg() and not info.issparse()
                else "link" if info.issym() or info.islnk() else "other")
        try:
            name = clean_member_path(name, self._what)
        except ImageError:
            name = ""  # never used, as the archive source ignores such members
        return _Member(name, kind, self._left)


class SaveStreamImage(Image):
    """An image read from a ``docker save`` stream as it arrives (see the module docstring).

    ``image_id`` is the config digest the daemon reported; ``scratch_dir`` is where out-of-order
    layers are spilled (default: the system temp dir).  ``diff_ids``: the layers' diff_ids as the
    daemon reported them before the save (its image inspect's ``RootFS.Layers``); with them a legacy
    stream's layers are served before its config arrived, which must then list the same diff_ids
    (else the config is read first and layers before it are spilled).  The caller must
    :meth:`close` it (which closes ``chunks`` if it is a generator).
    """

    def __init__(self, chunks: Iterator[bytes], *, image_id: str, reference: str, scratch_dir: str | None = None,
                 platform: Platform | None = None, repo_digests: list[str] | None = None,
                 diff_ids: list[str] | None = None):
        self.reference = reference
        self._chunks = chunks
        self._image_id = check_digest(image_id, f"{reference}: image ID")
        #: Where this image keeps scratch data; the converter puts its spill store there too.
        self.scratch_dir = scratch_dir
        self._repo_digests = list(repo_digests or [])
        self._reader = _ChunkReader(chunks, reference)
        self._tar = _OuterTar(self._reader, reference)
        self._scratch: SpillStore | None = None
        self._archive: ArchiveImage | None = None
        self._spilled: dict[str, tuple[int, int]] = {}  # sha256 digest → (offset, size) in the scratch file
        self._parents: dict[str, str | None] = {}  # <id>/json: layer directory → its parent's directory
        self._config: bytes | None = None
        self._manifest_json: bytes | None = None
        self._diff_ids: list[str] = []
        self._sizes: dict[int, int] = {}
        self._layers: list[Layer] = []
        self._next = 0  # the lowest layer not yet handed out
        self._live: tuple[int, _Member] | None = None
        self._platform = platform
        self._reported_diff_ids = diff_ids
        self._unhandled: _Member | None = None  # the first member, read to tell the layout, not yet handled
        try:
            self._start(platform)
        except BaseException:
            self.close()
            raise

    # -- the Image interface ------------------------------------------------------------------

    def manifest_bytes(self) -> bytes:
        if self._archive is not None:
            return self._archive.manifest_bytes()
        self._read_to_end(spill=True)
        layers = [{"mediaType": OCI_LAYER, "digest": d, "size": self._layer_size(i)}
                  for i, d in enumerate(self._diff_ids)]
        config = {"mediaType": OCI_CONFIG, "digest": self._image_id, "size": len(self.config_bytes())}
        return canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers})

    def config_bytes(self) -> bytes:
        if self._archive is not None:
            return self._archive.config_bytes()
        while self._config is None:  # layers on the way are spilled: read the config after the layers
            if self._live is not None:
                raise ImageError(f"{self.reference}: layer {self._live[0] + 1} is being read")
            self._take(self._next_member())
        return self._config

    def layers(self) -> list[Layer]:
        return self._archive.layers() if self._archive is not None else list(self._layers)

    @property
    def repo_digests(self) -> list[str]:
        return list(self._repo_digests)

    def close(self) -> None:
        close_chunks = getattr(self._chunks, "close", None)
        if close_chunks is not None:
            close_chunks()
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            scratch.close()

    # -- reading the stream ---------------------------------------------------------------------

    def _start(self, platform: Platform | None) -> None:
        first = self._tar.next()
        if first is not None and first.name.split("/")[0] in _OCI_FIRST_MEMBERS:
            self._copy_whole(platform)
            return
        self._reader.recording = None
        self.manifest_synthesised = True
        if first is None:
            raise ImageError(f"{self.reference}: the save stream has no config {self._config_name}")
        if self._reported_diff_ids is not None:  # layers can go live at once; the config is checked when it comes
            self._diff_ids = list(self._reported_diff_ids)
            self._layers = [_StreamedLayer(self, i, d) for i, d in enumerate(self._diff_ids)]
            self._unhandled = first
            return
        member: _Member | None = first
        while member is not None:  # up to the config: what comes before it is spilled
            self._take(member)
            if self._config is not None:
                return
            member = self._next_member()
        raise ImageError(f"{self.reference}: the save stream has no config {self._config_name}")

    def _accept_config(self) -> None:
        """The config just read: its platform and diff_ids (which must be the ones the layers are served by)."""
        assert self._config is not None
        config = load_json(self._config, what=f"{self.reference}: image config", error=ImageError)
        if not isinstance(config, dict):
            raise ImageError(f"{self.reference}: image config is not a JSON object")
        check_config_platform(config, self._platform, self.reference)
        diff_ids = _diff_ids(config, self.reference)
        if self._reported_diff_ids is None:
            self._diff_ids = diff_ids
            self._layers = [_StreamedLayer(self, i, d) for i, d in enumerate(self._diff_ids)]
        elif diff_ids != self._diff_ids:
            raise ImageError(f"{self.reference}: the saved config's rootfs.diff_ids are not the layers the daemon's "
                             f"image inspect reported ({len(diff_ids)} and {len(self._diff_ids)} layers, "
                             f"{sum(a != b for a, b in zip(diff_ids, self._diff_ids, strict=False))} differing); "
                             "the daemon saved another image than it described: convert again")

    def _copy_whole(self, platform: Platform | None) -> None:
        """OCI layout: the whole stream into the scratch file, read as a docker-archive."""
        recorded, self._reader.recording = bytes(self._reader.recording or b""), None
        self._scratch = SpillStore(self.scratch_dir)
        scratch = self._scratch.segment(named=True)
        scratch.append(recorded)
        tail = recorded[-2 * BLOCK:]
        for data in self._reader.rest():
            scratch.append(data)
            tail = (tail + data)[-2 * BLOCK:]
        if tail != bytes(2 * BLOCK):  # a tar stream ends with two zero blocks; a cut one (almost) never does
            raise ImageError(f"{self.reference}: the save stream ended early (after {self._reader.consumed} bytes, "
                             "with no end-of-archive marker); the daemon stopped sending — is it still running?")
        scratch.flush()
        assert scratch.path is not None
        self._archive = ArchiveImage(scratch.path, platform=platform, reference=self.reference)

    @property
    def _config_name(self) -> str:
        return self._image_id.removeprefix("sha256:") + ".json"

    def _next_member(self) -> _Member | None:
        unhandled, self._unhandled = self._unhandled, None
        if unhandled is not None:
            return unhandled
        member = self._tar.next()
        if member is None:
            self._check_end()
        return member

    def _take(self, member: _Member | None, *, spill: bool = True) -> None:
        """Handle a member that is not the live layer: keep documents, spill layer data."""
        if member is None or member.kind != "file" or not member.name:
            return
        name = member.name
        if name == self._config_name:
            self._config = self._read_document(member, "image config")
            actual = "sha256:" + hashlib.sha256(self._config).hexdigest()
            if actual != self._image_id:
                raise ImageError(f"{self.reference}: config {name} has digest {actual}, not the image ID "
                                 f"{self._image_id} the daemon reported")
            self._accept_config()
        elif name == "manifest.json":
            self._manifest_json = self._read_document(member, "manifest.json")
        elif _layer_directory(name, "json") is not None:
            self._parents[_layer_directory(name, "json") or ""] = self._parent_of(member)
        elif spill and _is_layer_member(name):
            self._spill(member)

    def _read_document(self, member: _Member, what: str) -> bytes:
        if member.size > MAX_JSON_DOCUMENT:
            raise ImageError(f"{self.reference}: {what} is {member.size} bytes; refusing documents over "
                             f"{MAX_JSON_DOCUMENT} bytes")
        return self._reader_exact(member.size)

    def _reader_exact(self, size: int) -> bytes:
        parts = []
        while size:
            data = self._tar.read(size)
            parts.append(data)
            size -= len(data)
        return b"".join(parts)

    def _parent_of(self, member: _Member) -> str | None:
        """The ``parent`` of a legacy ``<id>/json`` (only a hint for going live; never trusted)."""
        try:
            document = load_json(self._read_document(member, "layer json"), what="layer json", error=ImageError)
        except ImageError:
            return "?"
        parent = document.get("parent") if isinstance(document, dict) else "?"
        return parent if parent is None or isinstance(parent, str) else "?"

    def _spill(self, member: _Member) -> None:
        if self._scratch is None:
            self._scratch = SpillStore(self.scratch_dir)
        # hashed on a worker while this thread receives and writes: the spill keeps up with the daemon
        scratch, digest, start = self._scratch, HashBehind("sha256"), self._scratch.size
        try:
            while data := self._tar.read(CHUNK):
                digest.update(data)
                scratch.append(data)
            scratch.flush()
        finally:
            digest.close()
        self._spilled.setdefault("sha256:" + digest.hexdigest(), (start, member.size))

    def _check_end(self) -> None:
        """At the end of the archive: manifest.json must describe what was read."""
        what = f"{self.reference}: manifest.json"
        if self._manifest_json is None:
            raise ImageError(f"{self.reference}: the save stream has no manifest.json; not a docker save stream")
        document = load_json(self._manifest_json, what=what, error=ImageError)
        if not isinstance(document, list) or not 1 <= len(document) <= MAX_IMAGES:
            raise ImageError(f"{what} is not a list of images")
        entry = document[0]
        if len(document) != 1 or not isinstance(entry, dict) or entry.get("Config") != self._config_name:
            raise ImageError(f"{what} does not describe the one image {self._image_id} that was saved")
        if self._config is None:
            raise ImageError(f"{self.reference}: the save stream has no config {self._config_name}")
        if entry.get("LayerSources"):
            raise ImageError(f"{what}: foreign layers (LayerSources) refused")
        layers = entry.get("Layers")
        if self._config is not None and (not isinstance(layers, list) or len(layers) != len(self._diff_ids)):
            raise ImageError(f"{what} lists {len(layers) if isinstance(layers, list) else 'no'} layers but "
                             f"config rootfs.diff_ids has {len(self._diff_ids)}")

    def _read_to_end(self, *, spill: bool) -> None:
        while not self._tar.ended:
            if self._live is not None:
                raise ImageError(f"{self.reference}: layer {self._live[0] + 1} is being read")
            self._take(self._next_member(), spill=spill)

    # -- serving layers -------------------------------------------------------------------------

    def _locate(self, index: int) -> tuple[int, int] | _Member:
        """Where layer ``index`` is: ``(offset, size)`` in the scratch file, or the live member."""
        diff_id = self._diff_ids[index]
        if self._live is not None and self._live[0] == index:
            return self._live[1]
        if index < self._next and diff_id not in self._spilled:
            raise ImageError(f"{self.reference}: layer {index + 1} was read once already; a save stream "
                             "cannot be read twice")
        self._next = max(self._next, index)
        while diff_id not in self._spilled:
            if self._tar.ended:
                raise ImageError(f"{self.reference}: the save stream holds no layer with diff_id {diff_id} "
                                 f"(layer {index + 1}): a layer's content does not match the image config")
            member = self._next_member()
            if member is not None and self._is_live(member, index):
                self._live = (index, member)
                return member
            self._take(member)
        self._next = index + 1
        if self._next == len(self._diff_ids):
            self._read_to_end(spill=False)
        return self._spilled[diff_id]

    def _is_live(self, member: _Member, index: int) -> bool:
        """Whether ``member`` is layer ``index`` (judged from names; its bytes are verified later)."""
        if member.kind != "file" or self._diff_ids.count(self._diff_ids[index]) != 1:
            return False
        name = member.name
        if "/" not in name and name.endswith(".tar"):  # podman: <diff_id hex>.tar
            return "sha256:" + name.removesuffix(".tar") == self._diff_ids[index]
        directory = _layer_directory(name, "layer.tar")
        if directory is None or directory not in self._parents:
            return False
        return self._parents[directory] == self._layer_directory_of(index - 1)

    def _layer_directory_of(self, index: int) -> str | None:
        """The legacy directory holding layer ``index`` by the chain of parents (None below layer 0)."""
        directory = None
        for _ in range(index + 1):
            children = [d for d, parent in self._parents.items() if parent == directory]
            if len(children) != 1:
                return "?"
            directory = children[0]
        return directory

    def _open_live(self, index: int, member: _Member) -> BinaryIO:
        return cast(BinaryIO, _LiveLayer(self, index, member))  # a RawIOBase whose read() copies nothing

    def _live_finished(self, index: int, size: int) -> None:
        self._live = None
        self._sizes[index] = size
        self._next = index + 1
        if self._next == len(self._diff_ids):
            self._read_to_end(spill=False)

    def _layer_size(self, index: int) -> int:
        if index in self._sizes:
            return self._sizes[index]
        return self._spilled[self._diff_ids[index]][1]

    def _open_spilled(self, location: tuple[int, int]) -> BinaryIO:
        assert self._scratch is not None
        return self._scratch.open_range(*location)

    def _spilled_opener(self, location: tuple[int, int]):
        start, size = location

        def open_range(offset: int, length: int) -> BinaryIO:
            if offset < 0 or length < 0 or offset + length > size:
                raise ImageError(f"range {offset}+{length} lies outside a layer of {size} bytes")
            return self._open_spilled((start + offset, length))

        return open_range


def _diff_ids(config: dict, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ImageError(f"{what}: config has no rootfs.diff_ids list")
    if len(diff_ids) > MAX_LAYERS:
        raise ImageError(f"{what}: {len(diff_ids)} layers; refusing more than {MAX_LAYERS}")
    return [check_digest(d, f"{what} diff_id {i}") for i, d in enumerate(diff_ids)]


def _layer_directory(name: str, leaf: str) -> str | None:
    """``<64 hex>/<leaf>`` → the directory name; else None."""
    directory, slash, rest = name.partition("/")
    return directory if slash and rest == leaf and _HEX64.fullmatch(directory) else None


def _is_layer_member(name: str) -> bool:
    return _layer_directory(name, "layer.tar") is not None or (
        "/" not in name and name.endswith(".tar") and _HEX64.fullmatch(name.removesuffix(".tar")) is not None)


class _LiveLayer(io.RawIOBase):
    """The data of the live layer member as it arrives; SHA-256 checked against the diff_id at its end."""

    def __init__(self, image: SaveStreamImage, index: int, member: _Member):
        super().__init__()
        self._image = image
        self._index = index
        self._left = member.size
        self._size = member.size
        self._hash = hashlib.sha256()
        self._done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if self._done:
            return b""
        data = self._image._tar.read(min(size, self._left)) if self._left else b""
        if not data:
            self._finish()
            return b""
        self._hash.update(data)
        self._left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _finish(self) -> None:
        self._done = True
        diff_id = self._image._diff_ids[self._index]
        actual = "sha256:" + self._hash.hexdigest()
        if actual != diff_id:
            raise ImageError(f"{self._image.reference}: layer {self._index + 1}: diff_id mismatch, config says "
                             f"{diff_id}, layer content is {actual}")
        self._image._live_finished(self._index, self._size)


class _StreamedLayer(Layer):
    """Layer ``index`` of a :class:`SaveStreamImage`: live from the stream or from the scratch file."""

    in_stream_order = True

    def __init__(self, image: SaveStreamImage, index: int, diff_id: str):
        self._image = image
        self._index = index
        self.diff_id = diff_id
        self.descriptor = Descriptor(OCI_LAYER, diff_id, -1)  # the size is known once the layer was read

    def range_opener(self):
        location = self._image._locate(self._index)
        return self._image._spilled_opener(location) if isinstance(location, tuple) else None

    def open_blob(self) -> BinaryIO:
        return self.open_uncompressed()  # legacy saves hold plain tars: the blob is the layer tar

    def open_uncompressed(self) -> BinaryIO:
        location = self._image._locate(self._index)
        if isinstance(location, tuple):
            return self._image._open_spilled(location)  # hashed to this diff_id while it was spilled
        return self._image._open_live(self._index, location)

    def __repr__(self) -> str:
        return f"_StreamedLayer({self._index}, diff_id={self.diff_id})"
