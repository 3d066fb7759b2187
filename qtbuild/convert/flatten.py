"""Flatten image layers (bottom → top) into one in-memory file tree, without touching the host fs.

``flatten(layers)`` scans each layer's verified tar stream once (:mod:`qtbuild.convert.tarscan`), applies
its members to a virtual tree, and returns a :class:`FlatTree` whose :meth:`~FlatTree.entries`
are :class:`~qtbuild.formats.cpio.CpioEntry` objects ready for :class:`~qtbuild.formats.cpio.CpioArchive`.

Semantics (docs/images.md, "Applying layers" and "Hostile input")
-----------------------------------------------------------------
* Member names: leading ``/`` (absolute) and ``..`` components are refused; ``.`` and empty
  components (``./a``, ``a//b``, ``a/``) are dropped; ``.``/``./`` (the root) are ignored if they
  are directories.  Components are at most 255 bytes, resolved paths at most 4095 bytes.
* Parent components are resolved through the tree's symlinks with chroot semantics, like
  containerd's ``fs.RootPath``: absolute targets restart at the root, ``..`` at the root stays
  there, more than 40 symlinks → error (ELOOP).  A member is placed at its *resolved* path, so
  ``a -> ../../..`` followed by ``a/etc/passwd`` creates ``etc/passwd``; nothing can leave the
  tree.  Missing parents are created (0755, uid/gid 0, mtime 0 or ``clamp_mtime``); a parent that
  is neither a directory nor a symlink is an error.  The last component is never followed.
* Whiteouts ``.wh.<name>`` and opaque markers ``.wh..wh..opq`` remove content of *lower* layers
  only: an entry the current layer already placed (and the directories holding such entries)
  survives, whatever the order of members within the layer — containerd's "unpacked paths" rule.
  A whiteout whose directory does not exist (or is not a directory) is a no-op; it never creates
  anything.  Other ``.wh..wh.*`` members, and members inside a ``.wh..wh.*`` directory (aufs
  metadata), are skipped; a bare ``.wh.``, ``.wh..``/``.wh...`` and ``.wh.`` directories in a
  member's parent path are errors.
* Replacement: a directory over a directory replaces its attributes and keeps its children;
  anything else unlinks the old entry (a whole subtree for a directory) and creates the new one.
  Within a layer the last duplicate wins.
* Hardlinks (possibly across layers) share the target's node, which must exist at that moment
  and not be a directory; the target path may not be absolute or contain ``..`` and its parents
  resolve like member parents.  As with ``link(2)``, the link member's own mode/owner/mtime are
  ignored.  Replacing the target later leaves existing links on the old node.  In the output,
  regular files with several paths share a ``hardlink_key``; other hardlinked kinds (symlinks,
  devices, fifos) become independent copies, since newc hardlinks only carry regular files.
* Kept verbatim: numeric uid/gid, the 12 permission bits, device numbers, symlink targets.  mtime
  is brought into 0..2**32-1, then clamped to ``clamp_mtime``.  xattrs cannot travel in newc:
  surviving entries with ``security.capability`` get one warning each, other xattrs one warning
  per name (warnings are capped at :data:`MAX_WARNINGS` lines).
* File data is never held in memory: it is read in place from the blob when
  ``layer.range_opener()`` is available, else from the spill store (:mod:`qtbuild.convert.spill`), to
  which the whole decompressed tar stream of such layers is copied while it is scanned.
* Caps (:class:`FlattenLimits`): members + synthesised directories across all layers, total
  uncompressed tar bytes read, PAX and GNU long-name header sizes, and the path components walked
  while resolving (40 hops of 2048-component symlink targets cost ~80k steps per member; the cap
  bounds such a CPU bomb to seconds while leaving normal images orders of magnitude below it).
* Every problem is an :class:`~qtbuild.errors.ImageError` naming the layer (1-based, bottom
  first) and, where there is one, the member.  On any error the spill store is removed.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal, cast, overload

from qtbuild.convert.readahead import ReadAhead
from qtbuild.convert.spill import SpillStore
from qtbuild.convert.tarscan import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    U32_MAX,
    ByteBudget,
    TarFormatError,
    TarLimits,
    TarMember,
    TarScanner,
)
from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioEntry
from qtbuild.sources.base import Layer

__all__ = ["FlatTree", "FlattenLimits", "flatten"]

MAX_SYMLINK_HOPS = 40
MAX_PATH = 4095
MAX_COMPONENT = 255
MAX_WARNINGS = 1000
WHITEOUT_PREFIX = b".wh."
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_MARKER = b".wh..wh..opq"

_FILE_TYPE = {
    REGULAR: stat.S_IFREG, SYMLINK: stat.S_IFLNK, CHAR_DEVICE: stat.S_IFCHR,
    BLOCK_DEVICE: stat.S_IFBLK, FIFO: stat.S_IFIFO, DIRECTORY: stat.S_IFDIR,
}


@dataclass(frozen=True)
class FlattenLimits:
    """Caps against hostile layers (tar bombs, unbounded headers)."""

    max_entries: int = 2_000_000  # tar members + synthesised directories, all layers together
    max_total_bytes: int = 64 << 30  # uncompressed tar bytes read, all layers together
    max_pax_header: int = 1 << 20
    max_long_name: int = 8 << 10
    max_path_steps: int = 1 << 28  # path components walked, symlink expansions included


class _Refusal(Exception):
    """A member cannot be applied; flatten() adds the layer and member to the message."""


# --------------------------------------------------------------------------------------------
# The virtual tree
# --------------------------------------------------------------------------------------------


class _Dir:
    """A directory node; ``children`` maps one name component to a node."""

    __slots__ = ("mode", "uid", "gid", "mtime", "xattrs", "children")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int, xattrs: tuple[str, ...] = ()):
        self.mode, self.uid, self.gid, self.mtime, self.xattrs = mode, uid, gid, mtime, xattrs
        self.children: dict[bytes, _Dir | _Node] = {}


class _Node:
    """A non-directory inode, shared by all its hardlinks.

    Regular files locate their data by ``layer`` (index) and ``offset`` (in the layer's blob when
    it has range access, else in the spill store).
    """

    __slots__ = ("mode", "uid", "gid", "mtime", "xattrs", "size", "target", "rdev", "layer", "offset")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int, xattrs: tuple[str, ...]):
        self.mode, self.uid, self.gid, self.mtime, self.xattrs = mode, uid, gid, mtime, xattrs
        self.size = 0
        self.target: bytes | None = None
        self.rdev = (0, 0)
        self.layer = -1
        self.offset = 0


def _split(name: bytes, what: str) -> list[bytes]:
    """The components of a member name or hardlink target (refusing absolute names and ``..``)."""
    if not name:
        raise _Refusal(f"empty {what}")
    if name.startswith(b"/"):
        raise _Refusal(f"absolute {what} (archives must be relative to the image root)")
    components = [c for c in name.split(b"/") if c and c != b"."]
    if b".." in components:
        raise _Refusal(f"'..' component in {what} (it would escape the image root)")
    return components


def _mtime(value: int) -> int:
    return min(max(value, 0), U32_MAX)


class _TreeBuilder:
    """Applies members layer by layer; see the module docstring for the rules."""

    def __init__(self, limits: FlattenLimits, implicit_mtime: int):
        self._root = _Dir(stat.S_IFDIR | 0o755, 0, 0, implicit_mtime)
        self._limits = limits
        self._implicit_mtime = implicit_mtime
        self._entries = 0
        self._steps = 0
        self._layer = -1
        self._data_base = 0
        self._touched: set[tuple[_Dir, bytes]] = set()  # placed by the current layer

    def begin_layer(self, index: int, data_base: int) -> None:
        """Start applying layer ``index``; its data offsets are shifted by ``data_base``."""
        self._layer, self._data_base = index, data_base
        self._touched = set()

    def end_layer(self) -> None:
        self._touched = set()

    def _count(self) -> None:
        self._entries += 1
        if self._entries > self._limits.max_entries:
            raise _Refusal(f"more than {self._limits.max_entries} entries in the image "
                           f"(max_entries; possible tar bomb)")

    def _charge_steps(self, n: int) -> None:
        self._steps += n
        if self._steps > self._limits.max_path_steps:
            raise _Refusal(f"resolving paths took more than {self._limits.max_path_steps} steps "
                           f"(max_path_steps; symlink chains built to exhaust the CPU?)")

    # -- path resolution -------------------------------------------------------------------

    @overload
    def _walk(self, components: list[bytes], create: Literal[True]) -> tuple[_Dir, list[bytes]]: ...

    @overload
    def _walk(self, components: list[bytes], create: bool) -> tuple[_Dir, list[bytes]] | None: ...

    def _walk(self, components: list[bytes], create: bool) -> tuple[_Dir, list[bytes]] | None:
        """Resolve directory ``components`` from the root with chroot semantics.

        Returns the directory and its resolved path components.  Missing components are created
        when ``create``; otherwise (and for non-directories) the result is None.  A non-directory,
        non-symlink component with ``create`` is an error, as are more than 40 symlinks.
        """
        dirs: list[_Dir] = [self._root]
        names: list[bytes] = []
        pending = components[::-1]
        self._charge_steps(len(pending))
        hops = 0
        while pending:
            component = pending.pop()
            if component in (b"", b"."):
                continue
            if component == b"..":
                if names:
                    dirs.pop()
                    names.pop()
                continue
            child = dirs[-1].children.get(component)
            if child is None:
                if not create:
                    return None
                child = self._implicit_dir(dirs[-1], component, names)
            elif isinstance(child, _Node):
                if not stat.S_ISLNK(child.mode):
                    if not create:
                        return None
                    raise _Refusal(f"parent {b'/'.join(names + [component]).decode('utf-8', 'backslashreplace')!r} "
                                   f"is not a directory")
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise _Refusal(f"too many levels of symbolic links (more than {MAX_SYMLINK_HOPS}) "
                                   f"resolving the parent path (ELOOP)")
                target = child.target
                assert target is not None  # _place gives every symlink node its target
                if target.startswith(b"/"):
                    del dirs[1:], names[:]
                expansion = target.split(b"/")
                self._charge_steps(len(expansion))
                pending.extend(reversed(expansion))
                continue
            dirs.append(child)
            names.append(component)
        return dirs[-1], names

    def _implicit_dir(self, parent: _Dir, name: bytes, names: list[bytes]) -> _Dir:
        if len(name) > MAX_COMPONENT:
            raise _Refusal(f"path component of {len(name)} bytes exceeds {MAX_COMPONENT}")
        if sum(map(len, names)) + len(names) + len(name) > MAX_PATH:
            raise _Refusal(f"resolved path exceeds {MAX_PATH} bytes")
        self._count()
        node = _Dir(stat.S_IFDIR | 0o755, 0, 0, self._implicit_mtime)
        parent.children[name] = node
        self._touched.add((parent, name))
        return node

    # -- members ---------------------------------------------------------------------------

    def apply(self, member: TarMember) -> None:
        """Apply one member of the current layer."""
        self._count()
        components = _split(member.name, "member name")
        if not components:
            if member.kind != DIRECTORY:
                raise _Refusal(f"the root entry is a {member.kind}, not a directory")
            return  # the image root: its attributes are not part of the output
        base, parents = components[-1], components[:-1]
        for component in parents:
            if component.startswith(WHITEOUT_META_PREFIX):
                return  # aufs metadata directories (.wh..wh.plnk, .wh..wh.orph)
            if component.startswith(WHITEOUT_PREFIX):
                raise _Refusal("a whiteout name is used as a directory")
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parents, base)
            return
        for component in components:
            if len(component) > MAX_COMPONENT:
                raise _Refusal(f"path component of {len(component)} bytes exceeds {MAX_COMPONENT}")
        node = self._hardlink_target(member) if member.kind == HARDLINK else None
        parent, names = self._walk(parents, create=True)
        if sum(map(len, names)) + len(names) + len(base) > MAX_PATH:
            raise _Refusal(f"resolved path exceeds {MAX_PATH} bytes")
        self._place(parent, base, member, node)

    def _place(self, parent: _Dir, base: bytes, member: TarMember, node: _Node | None) -> None:
        existing = parent.children.get(base)
        self._touched.add((parent, base))
        if member.kind == DIRECTORY:
            if type(existing) is _Dir:
                existing.mode = stat.S_IFDIR | member.mode
                existing.uid, existing.gid = member.uid, member.gid
                existing.mtime, existing.xattrs = _mtime(member.mtime), member.xattrs
                return
            parent.children[base] = _Dir(stat.S_IFDIR | member.mode, member.uid, member.gid,
                                         _mtime(member.mtime), member.xattrs)
            return
        parent.children[base] = node if node is not None else self._new_node(member)

    def _new_node(self, member: TarMember) -> _Node:
        node = _Node(_FILE_TYPE[member.kind] | member.mode, member.uid, member.gid,
                     _mtime(member.mtime), member.xattrs)
        if member.kind == REGULAR:
            node.size, node.layer = member.size, self._layer
            node.offset = self._data_base + member.data_offset
        elif member.kind == SYMLINK:
            if not member.linkname:
                raise _Refusal("symlink with an empty target")
            node.target = member.linkname
        elif member.kind in (CHAR_DEVICE, BLOCK_DEVICE):
            node.rdev = (member.devmajor, member.devminor)
        return node

    def _hardlink_target(self, member: TarMember) -> _Node:
        target = member.linkname
        shown = target[:200].decode("utf-8", "backslashreplace")
        components = _split(target, "hardlink target")
        found = self._walk(components[:-1], create=False) if components else None
        node = found[0].children.get(components[-1]) if found else None
        if node is None:
            raise _Refusal(f"hardlink target {shown!r} does not exist (at this point of the layers)")
        if isinstance(node, _Dir):
            raise _Refusal(f"hardlink target {shown!r} is a directory")
        return node

    def _whiteout(self, parents: list[bytes], base: bytes) -> None:
        if base == OPAQUE_MARKER:
            found = self._walk(parents, create=False)
            if found is not None:
                directory = found[0]
                for name in list(directory.children):
                    self._prune(directory, name)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # other overlay/aufs metadata: skipped
        name = base[len(WHITEOUT_PREFIX):]
        if not name:
            raise _Refusal("bare whiteout '.wh.' names nothing")
        if name in (b".", b".."):
            raise _Refusal(f"whiteout of {name.decode()!r} escapes its directory")
        found = self._walk(parents, create=False)
        if found is not None and name in found[0].children:
            self._prune(found[0], name)

    def _prune(self, parent: _Dir, name: bytes) -> None:
        """Remove what lower layers put at ``parent/name``, keeping what this layer placed there.

        Iterative post-order walk: non-directories not placed by this layer are removed; a
        directory not placed by this layer is removed if nothing placed by this layer remains in it.
        """
        touched = self._touched
        stack: list[tuple[_Dir, bytes, bool]] = [(parent, name, False)]
        while stack:
            directory, child_name, children_done = stack.pop()
            node = directory.children.get(child_name)
            kept = (directory, child_name) in touched
            if type(node) is _Dir:
                if not children_done:
                    stack.append((directory, child_name, True))
                    stack.extend((node, grandchild, False) for grandchild in node.children)
                elif not kept and not node.children:
                    del directory.children[child_name]
            elif node is not None and not kept:
                del directory.children[child_name]

    # -- output ----------------------------------------------------------------------------

    def release(self) -> None:
        """Drop the tree (after :meth:`walk`), so its nodes can be freed."""
        self._root = _Dir(stat.S_IFDIR | 0o755, 0, 0, 0)
        self._touched = set()

    def walk(self) -> Iterator[tuple[bytes, _Dir | _Node]]:
        """Every (path, node) of the tree below the root, in no particular order."""
        stack = [(self._root, b"")]
        while stack:
            directory, prefix = stack.pop()
            for name, node in directory.children.items():
                path = prefix + name
                yield path, node
                if type(node) is _Dir:
                    stack.append((node, path + b"/"))


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


class FlatTree:
    """The flattened image: bytewise-sorted :class:`CpioEntry` list, warnings, and the spill store.

    Regular-file ``data`` callables read from the source blobs (layers with range access: keep
    the image open until the data is written) or from the spill store (valid until
    :meth:`close`).  Use as a context manager.
    """

    def __init__(self, entries: list[CpioEntry], warnings: list[str], spill: SpillStore):
        self._entries = entries
        self.warnings = warnings
        self._spill = spill

    def entries(self) -> list[CpioEntry]:
        """All entries, sorted bytewise by path (the root directory is not one)."""
        return list(self._entries)

    @property
    def spill_bytes(self) -> int:
        """Bytes held in the spill store (0 when every layer was read in place)."""
        return self._spill.size

    def close(self) -> None:
        """Remove the spill store (idempotent); entry data can no longer be read."""
        self._spill.close()

    def __enter__(self) -> FlatTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _DataRef:
    """``CpioEntry.data`` for a regular file: opens ``(offset, size)`` through a range opener.

    A slotted object rather than a closure: one exists per file, so its size matters.
    """

    __slots__ = ("_open", "_offset", "_size")

    def __init__(self, open_range: Callable[[int, int], BinaryIO], offset: int, size: int):
        self._open, self._offset, self._size = open_range, offset, size

    def __call__(self) -> BinaryIO:
        return self._open(self._offset, self._size)


def _build_entries(builder: _TreeBuilder, range_openers: list, spill: SpillStore,
                   clamp_mtime: int | None) -> tuple[list[CpioEntry], list[str]]:
    """The tree as sorted entries, and the xattr warnings.  Empties the builder: nodes are
    released while entries are built, so peak memory stays near the larger of the two."""
    items: list = sorted(builder.walk(), key=lambda item: item[0])
    builder.release()
    link_counts = Counter(id(node) for _, node in items if type(node) is _Node and stat.S_ISREG(node.mode))
    linked = {node_id for node_id, count in link_counts.items() if count > 1}
    del link_counts
    openers = [opener or spill.open_range for opener in range_openers]
    keys: dict[int, int] = {}
    entries = []
    warnings = _Warnings()
    for index in range(len(items)):
        path, node = items[index]
        items[index] = None
        mtime = node.mtime if clamp_mtime is None else min(node.mtime, clamp_mtime)
        if node.xattrs and id(node) not in keys:
            warnings.xattrs(path, node.xattrs)
        if type(node) is _Dir:
            entries.append(CpioEntry(path, node.mode, node.uid, node.gid, mtime))
            continue
        key = keys.setdefault(id(node), len(keys) + 1) if id(node) in linked else None
        data = _DataRef(openers[node.layer], node.offset, node.size) if node.size else None
        entries.append(CpioEntry(path, node.mode, node.uid, node.gid, mtime, size=node.size,
                                 link_target=node.target, rdev=node.rdev, data=data, hardlink_key=key))
    return entries, warnings.lines()


class _Warnings:
    """xattr warnings: one per security.capability, one per other xattr name; capped."""

    def __init__(self):
        self._capabilities: list[str] = []
        self._capability_count = 0
        self._others: dict[str, tuple[int, bytes]] = {}

    def xattrs(self, path: bytes, names: tuple[str, ...]) -> None:
        shown = path.decode("utf-8", "backslashreplace")
        for name in names:
            if name == "security.capability":
                self._capability_count += 1
                if len(self._capabilities) < MAX_WARNINGS:
                    self._capabilities.append(f"dropped xattr security.capability on {shown} "
                                              f"(newc cannot carry file capabilities)")
            else:
                count, first = self._others.get(name, (0, path))
                self._others[name] = (count + 1, first)

    def lines(self) -> list[str]:
        lines = list(self._capabilities)
        if self._capability_count > len(lines):
            lines.append(f"... and security.capability dropped on "
                         f"{self._capability_count - len(lines)} more paths")
        for name, (count, first) in sorted(self._others.items())[:MAX_WARNINGS]:
            where = first.decode("utf-8", "backslashreplace")
            lines.append(f"dropped xattr {name} on {where}" if count == 1 else
                         f"dropped xattr {name} on {count} paths (first: {where})")
        return lines


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _layer_label(index: int, layer: Layer) -> str:
    digest = getattr(getattr(layer, "descriptor", None), "digest", None) or getattr(layer, "diff_id", "?")
    short = digest[:19] + "…" if isinstance(digest, str) and len(digest) > 19 else digest
    return f"layer {index + 1} ({short})"


def _apply_layer(builder: _TreeBuilder, index: int, layer: Layer, spill: SpillStore,
                 limits: FlattenLimits, budget: ByteBudget, progress) -> object:
    """Scan one layer into the tree; return its range opener (None: data is in the spill store)."""
    label = _layer_label(index, layer)
    opener = layer.range_opener()
    tar_limits = TarLimits(max_long_name=limits.max_long_name, max_pax_header=limits.max_pax_header)
    builder.begin_layer(index, 0 if opener is not None else spill.size)
    stream = ReadAhead(layer.open_uncompressed())
    try:
        scanner = TarScanner(cast(BinaryIO, stream), limits=tar_limits,  # ReadAhead: a RawIOBase
                             tee=None if opener is not None else spill.append,
                             budget=budget, progress=progress)
        for member in scanner:
            try:
                builder.apply(member)
            except _Refusal as exc:
                name = member.name[:200].decode("utf-8", "backslashreplace")
                raise ImageError(f"{label}: member {name!r}: {exc}") from None
        scanner.drain()
    except TarFormatError as exc:
        raise ImageError(f"{label}: {exc}") from None
    finally:
        stream.close()
    builder.end_layer()
    return opener


def flatten(layers: Sequence[Layer], *, spill_dir: str | None = None,
            limits: FlattenLimits = FlattenLimits(), clamp_mtime: int | None = None,
            progress: Callable[[int], object] | None = None) -> FlatTree:
    """Apply ``layers`` bottom to top and return the resulting tree (see the module docstring).

    ``spill_dir``: where the spill store's private directory goes (default: the system temp dir).
    ``clamp_mtime``: SOURCE_DATE_EPOCH; every mtime becomes ``min(mtime, clamp_mtime)`` and
    synthesised directories get ``clamp_mtime`` (else 0).  ``progress`` is called with the byte
    count of every chunk of uncompressed tar read.  Raises :class:`ImageError`; the caller must
    :meth:`FlatTree.close` the result.
    """
    if clamp_mtime is not None and not 0 <= clamp_mtime <= U32_MAX:
        raise ValueError(f"clamp_mtime {clamp_mtime} is outside 0..{U32_MAX}")
    spill = SpillStore(spill_dir)
    try:
        builder = _TreeBuilder(limits, clamp_mtime if clamp_mtime is not None else 0)
        budget = ByteBudget(limits.max_total_bytes)
        openers = [_apply_layer(builder, index, layer, spill, limits, budget, progress)
                   for index, layer in enumerate(layers)]
        spill.flush()
        entries, warnings = _build_entries(builder, openers, spill, clamp_mtime)
        return FlatTree(entries, warnings, spill)
    except BaseException:
        spill.close()
        raise
