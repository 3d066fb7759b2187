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
  regular files with several paths share a ``hardlink_key`` (a dense group number below
  ``FlatTree.hardlink_groups``); other hardlinked kinds (symlinks, devices, fifos) become
  independent copies, since newc hardlinks only carry regular files.
* Kept verbatim: numeric uid/gid, the 12 permission bits, device numbers, symlink targets.  mtime
  is brought into 0..2**32-1, then clamped to ``clamp_mtime``.  xattrs cannot travel in newc:
  surviving entries with ``security.capability`` get one warning each, other xattrs one warning
  per name (warnings are capped at :data:`MAX_WARNINGS` lines).
* File data is not held in memory (but for ``reread``'s kept layers): it is read in place from the blob when
  ``layer.range_opener()`` is available (the blob is then verified on a worker thread,
  :mod:`qtbuild.convert.verify_ahead`), with ``reread`` from a fresh decompression of a local
  blob (:mod:`qtbuild.convert.reread`) or, for small gzip layers, from the chunks the first pass
  read, kept in memory within a bound (:mod:`qtbuild.convert.kept_layers`), else from the spill
  store (:mod:`qtbuild.convert.spill`),
  to which the whole decompressed tar stream of such layers is copied while it is scanned.
* Caps (:class:`FlattenLimits`): members + synthesised directories across all layers, total
  uncompressed tar bytes read, PAX and GNU long-name header sizes, and the path components walked
  while resolving (40 hops of 2048-component symlink targets cost ~80k steps per member; the cap
  bounds such a CPU bomb to seconds while leaving normal images orders of magnitude below it).
* Every problem is an :class:`~qtbuild.errors.ImageError` naming the layer (1-based, bottom
  first) and, where there is one, the member.  On any error the spill store is removed.
"""

from __future__ import annotations

import re
import stat
from array import array
from collections.abc import Callable, Collection, Iterator, Sequence, ValuesView
from dataclasses import dataclass
from itertools import compress
from operator import ne
from typing import BinaryIO, NamedTuple, cast

from qtbuild.convert.kept_layers import KeptLayer, plan_kept
from qtbuild.convert.layer_scan import LayerScan
from qtbuild.convert.readahead import ReadAhead
from qtbuild.convert.reread import LayerRereader, Stash
from qtbuild.convert.spill import SpillFile, SpillStore
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
)
from qtbuild.convert.verify_ahead import VerifyAhead
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
    """A member cannot be applied; flatten() adds the layer and member to the message.

    :meth:`_TreeBuilder.apply_all` sets ``member``: the member refused."""

    member: TarMember | None = None


# --------------------------------------------------------------------------------------------
# The virtual tree
# --------------------------------------------------------------------------------------------


def _split(name: bytes, what: str) -> list[bytes]:
    """The components of a member name or hardlink target (refusing absolute names and ``..``)."""
    if not name:
        raise _Refusal(f"empty {what}")
    if name.startswith(b"/"):
        raise _Refusal(f"absolute {what} (archives must be relative to the image root)")
    components = name.split(b"/")
    if b"" in components or b"." in components:
        components = [c for c in components if c and c != b"."]
    if b".." in components:
        raise _Refusal(f"'..' component in {what} (it would escape the image root)")
    return components


def _mtime(value: int) -> int:
    return min(max(value, 0), U32_MAX)


_ROOT = 0
_S_IFMT = 0o170000
_NO_RDEV = (0, 0)


class _TreeBuilder:
    """Applies members layer by layer; see the module docstring for the rules.

    The tree is stored in columns indexed by node id, not as one object per node: arrays of
    machine integers for the attributes, one ``{name: id}`` dict per directory, and side tables
    for the few nodes that need more (symlink targets, device numbers, xattrs).  A file costs
    about 110 bytes plus its name, whatever its path length; full paths exist only while the
    output is streamed.  Nodes unlinked by later members stay in the columns (they are counted by
    ``max_entries`` anyway).  A hardlink is a node of its own whose attributes are those of its
    target's node (the ``_inode_of`` column; other nodes are their own inode), so replacing the
    target later leaves the link on the old node, as with ``link(2)``.  A column, not a dict of
    the links: in an image whose files are half hardlinks the dict cost 26 bytes a file.
    """

    def __init__(self, limits: FlattenLimits, implicit_mtime: int):
        self._limits = limits
        self._implicit_mtime = implicit_mtime
        self._entries = 0
        self._steps = 0
        self._layer = -1
        self._data_base = 0
        self._mode, self._uid, self._gid, self._mtime = array("I"), array("I"), array("I"), array("I")
        self._size, self._offset, self._layer_of = array("Q"), array("Q"), array("i")
        self._placed = array("i")  # the layer that placed the node (whiteouts spare the current layer's)
        self._children: dict[int, dict[bytes, int]] = {}
        self._targets: dict[int, bytes] = {}
        self._rdev: dict[int, tuple[int, int]] = {}
        self._xattrs: dict[int, tuple[str, ...]] = {}
        self._inode_of = array("I")
        self._links = 0  # hardlink nodes created
        self._last_parents: list[bytes] | None = None  # _walk_parents' shortcut
        self._last_parent_name: bytes | None = None  # the name's bytes before its last "/" (apply_all's shortcut)
        self._last_walk = (_ROOT, 0)
        self._last_steps = 0
        self._new_dir(stat.S_IFDIR | 0o755, 0, 0, implicit_mtime, ())

    # -- nodes -----------------------------------------------------------------------------

    def _new_node(self, mode: int, uid: int, gid: int, mtime: int, xattrs: tuple[str, ...]) -> int:
        node = len(self._mode)
        self._mode.append(mode)
        self._uid.append(uid)
        self._gid.append(gid)
        self._mtime.append(mtime)
        self._size.append(0)
        self._offset.append(0)
        self._layer_of.append(-1)
        self._placed.append(self._layer)
        self._inode_of.append(node)
        if xattrs:
            self._xattrs[node] = xattrs
        return node

    def _new_dir(self, mode: int, uid: int, gid: int, mtime: int, xattrs: tuple[str, ...]) -> int:
        node = self._new_node(mode, uid, gid, mtime, xattrs)
        self._children[node] = {}
        return node

    def _is_dir(self, node: int) -> bool:
        return stat.S_ISDIR(self._mode[node])

    def _inode(self, node: int) -> int:
        return self._inode_of[node]

    def begin_layer(self, index: int, data_base: int) -> None:
        """Start applying layer ``index``; its data offsets are shifted by ``data_base``."""
        self._layer, self._data_base = index, data_base

    def end_layer(self) -> None:
        pass

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

    def _walk(self, components: list[bytes], create: bool) -> tuple[int, list[bytes]] | None:
        """Resolve directory ``components`` from the root with chroot semantics.

        Returns the directory and its resolved path components.  Missing components are created
        when ``create``; otherwise (and for non-directories) the result is None.  A non-directory,
        non-symlink component with ``create`` is an error, as are more than 40 symlinks.
        """
        dirs: list[int] = [_ROOT]
        names: list[bytes] = []
        pending = components[::-1]
        self._charge_steps(len(pending))
        hops = 0
        children = self._children
        while pending:
            component = pending.pop()
            if component in (b"", b"."):
                continue
            if component == b"..":
                if names:
                    dirs.pop()
                    names.pop()
                continue
            child = children[dirs[-1]].get(component)
            if child is None:
                if not create:
                    return None
                child = self._implicit_dir(dirs[-1], component, names)
            elif child not in children:
                inode = self._inode(child)
                if not stat.S_ISLNK(self._mode[inode]):
                    if not create:
                        return None
                    raise _Refusal(f"parent {b'/'.join(names + [component]).decode('utf-8', 'backslashreplace')!r} "
                                   f"is not a directory")
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise _Refusal(f"too many levels of symbolic links (more than {MAX_SYMLINK_HOPS}) "
                                   f"resolving the parent path (ELOOP)")
                target = self._targets[inode]
                if target.startswith(b"/"):
                    del dirs[1:], names[:]
                expansion = target.split(b"/")
                self._charge_steps(len(expansion))
                pending.extend(reversed(expansion))
                continue
            dirs.append(child)
            names.append(component)
        return dirs[-1], names

    def _implicit_dir(self, parent: int, name: bytes, names: list[bytes]) -> int:
        if len(name) > MAX_COMPONENT:
            raise _Refusal(f"path component of {len(name)} bytes exceeds {MAX_COMPONENT}")
        if sum(map(len, names)) + len(names) + len(name) > MAX_PATH:
            raise _Refusal(f"resolved path exceeds {MAX_PATH} bytes")
        self._count()
        node = self._new_dir(stat.S_IFDIR | 0o755, 0, 0, self._implicit_mtime, ())
        self._children[parent][name] = node
        return node

    # -- members ---------------------------------------------------------------------------

    def apply(self, member: TarMember) -> None:
        """Apply one member of the current layer."""
        self._count()
        name = member.name
        components = _split(name, "member name")
        if not components:
            if member.kind != DIRECTORY:
                raise _Refusal(f"the root entry is a {member.kind}, not a directory")
            return  # the image root: its attributes are not part of the output
        base, parents = components[-1], components[:-1]
        if WHITEOUT_PREFIX in name:
            for component in parents:
                if component.startswith(WHITEOUT_META_PREFIX):
                    return  # aufs metadata directories (.wh..wh.plnk, .wh..wh.orph)
                if component.startswith(WHITEOUT_PREFIX):
                    raise _Refusal("a whiteout name is used as a directory")
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parents, base)
                return
        if len(name) > MAX_COMPONENT:  # else no component can be longer
            for component in components:
                if len(component) > MAX_COMPONENT:
                    raise _Refusal(f"path component of {len(component)} bytes exceeds {MAX_COMPONENT}")
        inode = self._hardlink_target(member) if member.kind == HARDLINK else None
        parent, parent_length = self._walk_parents(parents)
        parent_name, _, last = name.rpartition(b"/")
        self._last_parent_name = parent_name if last == base else None
        if parent_length + len(base) > MAX_PATH:
            raise _Refusal(f"resolved path exceeds {MAX_PATH} bytes")
        self._place(parent, base, member, inode)

    def apply_all(self, members: list[TarMember]) -> None:
        """:meth:`apply` each of ``members`` in order; a refusal carries the member refused.

        A regular file new to the directory of the member before it (a layer lists a directory's
        files one after another) takes a shortcut with :meth:`apply`'s outcome: its parent path
        is the same bytes as that member's, so it splits into the same components, passed the same
        checks and resolves to the same directory (the walk :meth:`_walk_parents` keeps, charged
        the same steps), and only its last component is checked here.  Anything else, and a name
        already present (a replacement), takes :meth:`apply`.
        """
        member = None
        try:
            apply, limits, layer = self.apply, self._limits, self._layer
            max_entries, max_steps = limits.max_entries, limits.max_path_steps
            children, data_base, xattrs_of = self._children, self._data_base, self._xattrs
            columns = (self._mode.append, self._uid.append, self._gid.append, self._mtime.append, self._size.append,
                       self._offset.append, self._layer_of.append, self._placed.append, self._inode_of.append)
            add_mode, add_uid, add_gid, add_mtime, add_size, add_offset, add_layer, add_placed, add_inode = columns
            for member in members:
                name, kind, mode, uid, gid, mtime, size, _link, _major, _minor, xattrs, _h, data_offset = member
                parent_name, _, base = name.rpartition(b"/")
                if (kind is not REGULAR or parent_name != self._last_parent_name or len(base) > MAX_COMPONENT
                        or base.startswith(b".") and (base in (b".", b"..") or base.startswith(WHITEOUT_PREFIX))
                        or not base):
                    apply(member)
                    continue
                directory, parent_length = self._last_walk
                siblings = children[directory]
                if base in siblings or parent_length + len(base) > MAX_PATH:
                    apply(member)  # a replacement, or the refusal with its message
                    continue
                self._entries += 1
                self._steps += self._last_steps
                if self._entries > max_entries or self._steps > max_steps:
                    self._entries -= 1
                    self._steps -= self._last_steps
                    apply(member)  # the refusal with its message
                    continue
                node = len(self._mode)
                add_mode(stat.S_IFREG | mode)
                add_uid(uid)
                add_gid(gid)
                add_mtime(mtime if 0 <= mtime <= U32_MAX else _mtime(mtime))
                add_size(size)
                add_offset(data_base + data_offset)
                add_layer(layer)
                add_placed(layer)
                add_inode(node)
                if xattrs:
                    xattrs_of[node] = xattrs
                siblings[base] = node
        except _Refusal as exc:
            exc.member = member
            raise

    def _walk_parents(self, parents: list[bytes]) -> tuple[int, int]:
        """:meth:`_walk` (creating) for a member's parent ``parents``: the directory and the length
        of its resolved path plus one (for the ``/`` before the member's name).

        Members come directory by directory, so the last answer is kept: it stays true until a
        member replaces or removes an entry (which could be one of the directories or symlinks
        it went through; see :meth:`_forget_walk`).  A repeated walk is charged the steps it took
        the first time, so ``max_path_steps`` counts exactly as without the shortcut.
        """
        if parents == self._last_parents:
            self._charge_steps(self._last_steps)
            return self._last_walk
        before = self._steps
        walked = self._walk(parents, create=True)
        assert walked is not None  # create=True never answers None
        directory, names = walked
        self._last_walk = directory, sum(map(len, names)) + len(names)
        self._last_parents, self._last_steps = parents, self._steps - before
        return self._last_walk

    def _forget_walk(self) -> None:
        """An entry was replaced or removed: the last walk may have gone through it."""
        self._last_parents = self._last_parent_name = None

    def _place(self, parent: int, base: bytes, member: TarMember, inode: int | None) -> None:
        siblings = self._children[parent]
        existing = siblings.get(base)
        if existing is not None and not (member.kind == DIRECTORY and existing in self._children):
            self._forget_walk()  # replaced below
        if member.kind == DIRECTORY:
            if existing is not None and existing in self._children:
                self._mode[existing] = stat.S_IFDIR | member.mode
                self._uid[existing], self._gid[existing] = member.uid, member.gid
                self._mtime[existing] = _mtime(member.mtime)
                self._placed[existing] = self._layer
                self._xattrs.pop(existing, None)
                if member.xattrs:
                    self._xattrs[existing] = member.xattrs
                return
            siblings[base] = self._new_dir(stat.S_IFDIR | member.mode, member.uid, member.gid,
                                           _mtime(member.mtime), member.xattrs)
            return
        if inode is not None:
            node = self._new_node(self._mode[inode], 0, 0, 0, ())
            self._inode_of[node] = inode
            self._links += 1
            siblings[base] = node
            return
        siblings[base] = self._file_node(member)

    def _file_node(self, member: TarMember) -> int:
        node = self._new_node(_FILE_TYPE[member.kind] | member.mode, member.uid, member.gid,
                              _mtime(member.mtime), member.xattrs)
        if member.kind == REGULAR:
            self._size[node], self._layer_of[node] = member.size, self._layer
            self._offset[node] = self._data_base + member.data_offset
        elif member.kind == SYMLINK:
            if not member.linkname:
                raise _Refusal("symlink with an empty target")
            self._targets[node] = member.linkname
        elif member.kind in (CHAR_DEVICE, BLOCK_DEVICE):
            self._rdev[node] = (member.devmajor, member.devminor)
        return node

    def _hardlink_target(self, member: TarMember) -> int:
        target = member.linkname
        shown = target[:200].decode("utf-8", "backslashreplace")
        components = _split(target, "hardlink target")
        found = self._walk(components[:-1], create=False) if components else None
        node = self._children[found[0]].get(components[-1]) if found else None
        if node is None:
            raise _Refusal(f"hardlink target {shown!r} does not exist (at this point of the layers)")
        if node in self._children:
            raise _Refusal(f"hardlink target {shown!r} is a directory")
        return self._inode(node)

    def _whiteout(self, parents: list[bytes], base: bytes) -> None:
        if base == OPAQUE_MARKER:
            found = self._walk(parents, create=False)
            if found is not None:
                directory = found[0]
                for name in list(self._children[directory]):
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
        if found is not None and name in self._children[found[0]]:
            self._prune(found[0], name)

    def _prune(self, parent: int, name: bytes) -> None:
        """Remove what lower layers put at ``parent/name``, keeping what this layer placed there.

        Iterative post-order walk: non-directories not placed by this layer are removed; a
        directory not placed by this layer is removed if nothing placed by this layer remains in it.
        """
        self._forget_walk()
        children, placed, layer = self._children, self._placed, self._layer
        stack: list[tuple[int, bytes, bool]] = [(parent, name, False)]
        while stack:
            directory, child_name, children_done = stack.pop()
            node = children[directory].get(child_name)
            if node is None:
                continue
            kept = placed[node] == layer
            if node in children:
                if not children_done:
                    stack.append((directory, child_name, True))
                    stack.extend((node, grandchild, False) for grandchild in children[node])
                elif not kept and not children[node]:
                    del children[directory][child_name]
            elif not kept:
                del children[directory][child_name]

    # -- output ----------------------------------------------------------------------------

    def lookup(self, path: bytes) -> int | None:
        """The node at ``path`` (no symlinks followed), or None."""
        node: int | None = _ROOT
        for component in path.split(b"/"):
            if not component:
                continue
            siblings = self._children.get(node) if node is not None else None
            node = siblings.get(component) if siblings is not None else None
            if node is None:
                return None
        return node if node != _ROOT else None

    def walk_sorted(self, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """Every (prefix + path, node) below the root, sorted bytewise by path, paths built on the fly.

        Within a directory a subdirectory ``d`` sorts as two keys: ``d`` (its own entry) and
        ``d/`` (everything below it); no name contains ``/``, so sorting the keys of each
        directory gives exactly the bytewise order of the full paths.
        """
        children = self._children
        stack: list[tuple[bytes, dict[bytes, int], Iterator[bytes]]] = [(prefix, children[_ROOT], self._keys(_ROOT))]
        while stack:
            prefix, siblings, keys = stack[-1]
            key = next(keys, None)
            if key is None:
                stack.pop()
            elif key.endswith(b"/"):
                node = siblings[key[:-1]]
                stack.append((prefix + key, children[node], self._keys(node)))
            else:
                yield prefix + key, siblings[key]

    def _keys(self, directory: int) -> Iterator[bytes]:
        children = self._children
        siblings = children[directory]
        keys = list(siblings)
        keys.extend(name + b"/" for name, node in siblings.items() if node in children and children[node])
        keys.sort()
        return iter(keys)

    def hardlink_groups(self) -> tuple[array, int]:
        """The hardlink groups, numbered densely: per node, the group number of its inode (-1 for
        none), and the number of groups.  A group is the inode of a regular file reachable under
        more than one path.  With no hardlink in the tree, the array is empty.

        Numbers in an array, not a set or dict of node ids: an image whose files are half hardlinks
        has one group per two files, and a set (with the counter that built it) cost ~370 bytes a
        group at the peak; the dense numbers also let the archive writer keep its per-group
        records in arrays (:class:`~qtbuild.formats.cpio.CpioStream`'s ``hardlink_groups``).
        """
        numbers = array("i")
        if not self._links:
            return numbers, 0
        reached = bytearray(len(self._mode))  # per inode: reached under 0, 1, or 2 paths or more
        inode_of = self._inode_of
        for node in self._linked_nodes():
            inode = inode_of[node]
            if reached[inode] < 2:
                reached[inode] += 1
        numbers = array("i", [-1]) * len(reached)
        count, inode, mode = 0, reached.find(2), self._mode
        while inode >= 0:
            if stat.S_ISREG(mode[inode]):
                numbers[inode], count = count, count + 1
            inode = reached.find(2, inode + 1)
        return numbers, count

    def link_counts(self, group_of: array, groups: int) -> array:
        """Per hardlink group of :meth:`hardlink_groups` (``group_of``, ``groups``): its number of
        paths, the nlink its links carry in the archive."""
        counts = array("I", [0]) * groups
        if groups:
            inode_of = self._inode_of
            for node in self._linked_nodes():
                group = group_of[inode_of[node]]
                if group >= 0:
                    counts[group] += 1
        return counts

    def _linked_nodes(self) -> list[int]:
        """The nodes in the tree that are hardlinks or the inodes hardlinks share: the only ones an
        inode reached under two paths can be reached through.  Picked a directory at a time in C
        (``compress`` over a byte a node), so the other nodes cost no Python step."""
        inode_of = self._inode_of
        linked = bytearray(len(inode_of))
        for node in compress(range(len(inode_of)), map(ne, inode_of, range(len(inode_of)))):  # the links
            linked[node] = linked[inode_of[node]] = 1
        flagged = linked.__getitem__
        found: list[int] = []
        for siblings in self._directory_contents():
            found += compress(siblings, map(flagged, siblings))
        return found

    def subdirectory_count(self, node: int) -> int:
        """How many of directory ``node``'s children are directories (its nlink is 2 more)."""
        children = self._children
        return sum(map(children.__contains__, children[node].values()))

    def totals(self) -> TreeTotals:
        """See :meth:`FlatTree.totals`.  The sums over a directory's children are ``map``s in C:
        one comprehension step a file is the only Python-level work per file."""
        children, size = self._children, self._size
        entries = path_bytes = 0
        data_bytes = sum(map(len, self._targets.values()))
        stack = [(_ROOT, -1)]  # (directory, its path's length; the root's children have no "/" before them)
        while stack:
            directory, length = stack.pop()
            siblings = children[directory]
            entries += len(siblings)
            path_bytes += len(siblings) * (length + 1) + sum(map(len, siblings))
            data_bytes += sum(map(size.__getitem__, siblings.values()))  # hardlink nodes hold 0
            stack += [(node, length + 1 + len(name)) for name, node in siblings.items() if node in children]
        return TreeTotals(entries, path_bytes, data_bytes)

    def data_ranges(self, layers: set[int]) -> dict[int, list[tuple[int, int]]]:
        """``(offset, size)`` of the data of every regular file in the tree from ``layers``, per
        layer in offset order, each once.

        Run between flatten and the first byte written, on one thread: the nodes are gathered a
        directory at a time and filtered with ``map``/``compress`` in C, not one Python step each.
        Only regular files have a layer (``_layer_of``, -1 for any other node), and a layer's
        files were numbered in stream order, so their node order is their data's order.
        """
        nodes = self._nodes()  # references to the ids the directories hold: 8 bytes a node
        inodes = list(map(self._inode_of.__getitem__, nodes)) if self._links else nodes
        layer_of = list(map(self._layer_of.__getitem__, inodes))
        ranges: dict[int, list[tuple[int, int]]] = {}
        for layer in sorted(layers):
            mine = sorted(set(compress(inodes, map(layer.__eq__, layer_of))))  # hardlinks share an inode
            sizes = list(map(self._size.__getitem__, mine))
            found = list(compress(zip(map(self._offset.__getitem__, mine), sizes, strict=True), sizes))
            if found:
                ranges[layer] = found
        return ranges

    def _nodes(self) -> list[int]:
        """Every node in the tree (the root excepted), in no particular order."""
        nodes: list[int] = []
        for siblings in self._directory_contents():
            nodes += siblings
        return nodes

    def _directory_contents(self) -> Iterator[ValuesView[int]]:
        """Each directory's child nodes, a directory at a time, in no particular order; which
        children are directories is picked out in C, so a node costs no Python step."""
        children = self._children
        directories = [_ROOT]
        while directories:
            siblings = children[directories.pop()].values()
            yield siblings
            directories += filter(children.__contains__, siblings)

    def with_xattrs(self) -> list[tuple[bytes, int]]:
        """``(path, node)`` of the entries with xattrs, in :meth:`walk_sorted`'s order: which ones
        is asked a directory at a time in C (``compress``), so only they cost a Python step."""
        children, xattrs, inode_of, links = self._children, self._xattrs, self._inode_of, self._links
        found: list[tuple[bytes, int]] = []
        stack: list[tuple[bytes, int]] = [(b"", _ROOT)]  # (path up to "/", directory)
        while stack:
            prefix, directory = stack.pop()
            siblings = children[directory]
            inodes = map(inode_of.__getitem__, siblings.values()) if links else siblings.values()
            found += [(prefix + name, siblings[name]) for name in compress(siblings, map(xattrs.__contains__, inodes))]
            stack += [(prefix + name + b"/", siblings[name])
                      for name in compress(siblings, map(children.__contains__, siblings.values()))]
        found.sort()
        return found

    def find_paths(self, names: re.Pattern[bytes], directories: Collection[bytes] = ()) -> list[bytes]:
        """See :meth:`FlatTree.find_paths`.  A directory none of whose names ``names`` finds (one
        search over its names joined by ``/``: a match across two names only costs a closer look)
        is passed over without a Python step per entry; subdirectories are picked out in C."""
        children = self._children
        found: list[bytes] = []
        stack: list[tuple[bytes, bytes, int]] = [(b"", b"", _ROOT)]  # (path up to "/", name, directory)
        while stack:
            prefix, own_name, directory = stack.pop()
            siblings = children[directory]
            if own_name in directories:
                found += [prefix + name for name in siblings]
            elif names.search(b"/".join(siblings)):
                found += [prefix + name for name in siblings if names.search(name)]
            stack += [(prefix + name + b"/", name, siblings[name])
                      for name in compress(siblings, map(children.__contains__, siblings.values()))]
        found.sort()
        return found

    def entry(self, path: bytes, node: int, clamp_mtime: int | None, openers: list, group_of: array,
              link_counts: array) -> CpioEntry:
        """The archive entry for ``node`` at ``path``; ``group_of``: see :meth:`hardlink_groups`,
        ``link_counts``: :meth:`link_counts`.  Directories and hardlinks carry their nlink.

        Called once per output file (twice per ``convert``): attribute lookups are kept inline.
        """
        inode = self._inode_of[node]
        mode = self._mode[inode]
        mtime = self._mtime[inode]
        if clamp_mtime is not None and mtime > clamp_mtime:
            mtime = clamp_mtime
        if mode & _S_IFMT == stat.S_IFDIR:
            return CpioEntry(path, mode, self._uid[inode], self._gid[inode], mtime,
                             nlink=2 + self.subdirectory_count(node))
        size = self._size[inode]
        data = _DataRef(openers[self._layer_of[inode]], self._offset[inode], size) if size else None
        group = group_of[inode] if group_of else -1
        return CpioEntry(path, mode, self._uid[inode], self._gid[inode], mtime, size,  # positional: half the cost
                         self._targets.get(inode), self._rdev.get(inode, _NO_RDEV), data,
                         group if group >= 0 else None, link_counts[group] if group >= 0 else None)

    def xattrs(self, node: int) -> tuple[str, ...]:
        return self._xattrs.get(self._inode(node), ())

    def has_xattrs(self) -> bool:
        return bool(self._xattrs)

    def inode(self, node: int) -> int:
        """The node whose attributes ``node`` has (itself unless it is a hardlink)."""
        return self._inode(node)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


class TreeTotals(NamedTuple):
    """Sums over a tree's entries (:meth:`FlatTree.totals`)."""

    entries: int
    #: The length of every entry's path (as :meth:`FlatTree.iter_entries` gives it with no prefix).
    path_bytes: int
    #: Regular files' data (a hardlink group's once) plus symlink targets: the archive's data bytes.
    data_bytes: int


class FlatTree:
    """The flattened image: its entries in bytewise path order, warnings, and the spill store.

    The tree stays in its compact form; :meth:`iter_entries` builds each :class:`CpioEntry` (and
    its path) as it is consumed, so a pass over millions of files holds one path at a time.
    Regular-file ``data`` callables read from the source blobs (layers with range access: keep
    the image open until the data is written) or from the spill store (valid until
    :meth:`close`).  Use as a context manager.
    """

    def __init__(self, builder: _TreeBuilder, range_openers: list, spill: SpillStore, clamp_mtime: int | None,
                 rereaders: Sequence[LayerRereader] = ()):
        self._builder = builder
        self._rereaders = list(rereaders)
        self._openers = [opener or spill.open_range for opener in range_openers]
        self._clamp_mtime = clamp_mtime
        self._spill = spill
        self._group_of, self.hardlink_groups = builder.hardlink_groups()
        self._link_counts = builder.link_counts(self._group_of, self.hardlink_groups)
        self.warnings = self._xattr_warnings()

    def iter_entries(self, prefix: bytes = b"") -> Iterator[CpioEntry]:
        """Every entry, sorted bytewise by path (the root directory is not one), each path
        starting with ``prefix``; each call walks the tree again and yields the same entries."""
        entry, clamp_mtime, openers, group_of = self._builder.entry, self._clamp_mtime, self._openers, self._group_of
        link_counts = self._link_counts
        for path, node in self._builder.walk_sorted(prefix):
            yield entry(path, node, clamp_mtime, openers, group_of, link_counts)

    def top_directories(self) -> int:
        """How many directories the tree's root holds (the root is not an entry, so no entry says)."""
        return self._builder.subdirectory_count(_ROOT)

    def totals(self) -> TreeTotals:
        """Sums over the entries, cheaply (no entry or path is built; a few ms for 20,000 files).

        ``entries`` and ``path_bytes`` are exact; ``data_bytes`` is but for rare cases: the
        targets of symlinks a later layer replaced are still counted, while a hardlink group whose
        first path a later layer replaced, and hardlinks to symlinks, are not.
        """
        return self._builder.totals()

    def find_paths(self, names: re.Pattern[bytes], directories: Collection[bytes] = ()) -> list[bytes]:
        """The paths of :meth:`iter_paths`, in the same order, of the entries whose name (last
        component) ``names`` finds (``search``) or whose parent directory's name is in
        ``directories``: much cheaper than a pass over every path when few entries match."""
        return self._builder.find_paths(names, directories)

    def iter_paths(self, prefix: bytes = b"") -> Iterator[bytes]:
        """The paths of :meth:`iter_entries`, in the same order, without building the entries
        (a pass that needs only the paths costs a third as much)."""
        for path, _node in self._builder.walk_sorted(prefix):
            yield path

    def entries(self) -> list[CpioEntry]:
        """:meth:`iter_entries` as a list (for small trees: it holds every path)."""
        return list(self.iter_entries())

    def get(self, path: bytes) -> CpioEntry | None:
        """The entry at ``path`` (relative, no symlinks followed), or None."""
        node = self._builder.lookup(path)
        return None if node is None else self._entry(path.strip(b"/"), node)

    def _entry(self, path: bytes, node: int) -> CpioEntry:
        return self._builder.entry(path, node, self._clamp_mtime, self._openers, self._group_of, self._link_counts)

    def _xattr_warnings(self) -> list[str]:
        warnings = _Warnings()
        if not self._builder.has_xattrs():
            return warnings.lines()
        warned_links: set[int] = set()
        for path, node in self._builder.with_xattrs():
            names = self._builder.xattrs(node)
            inode = self._builder.inode(node)
            if names and inode not in warned_links:
                warnings.xattrs(path, names)
                if self._group_of and self._group_of[inode] >= 0:
                    warned_links.add(inode)
        return warnings.lines()

    @property
    def spill_bytes(self) -> int:
        """Bytes held in the spill store (0 when every layer was read in place)."""
        return self._spill.total_size

    def verify_rereads(self) -> None:
        """Check that layers re-read from their blobs (``flatten(reread=True)``) still have the
        digest the first pass verified, by reading them to the end (ImageError if not).  Call it
        after the data was read, before trusting what was computed from it."""
        for rereader in self._rereaders:
            rereader.finish()

    def close(self) -> None:
        """Remove the spill store (idempotent); entry data can no longer be read."""
        for rereader in self._rereaders:
            rereader.close_cursors()
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


class _Scans(dict[int, tuple[LayerScan, object]]):
    """The layer scans started (index → (scan, data opener)); closes them all on exit."""

    def __enter__(self) -> _Scans:
        return self

    def __exit__(self, *exc) -> None:
        for scan, _opener in self.values():
            scan.stop()
        for scan, _opener in self.values():
            scan.close()


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


def _rereaders(builder: _TreeBuilder, layers: Sequence[Layer], reopeners: dict, lengths: dict[int, int],
               spill: SpillStore) -> dict[int, LayerRereader]:
    """A :class:`LayerRereader` per re-read layer, told which of its files the tree can output."""
    if not reopeners:
        return {}
    needed = builder.data_ranges(set(reopeners))
    stash = Stash()
    return {index: LayerRereader(reopen, lengths[index], needed.get(index, []), stash, spill,
                                 _layer_label(index, layers[index]))
            for index, reopen in reopeners.items()}


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _layer_label(index: int, layer: Layer) -> str:
    digest = getattr(getattr(layer, "descriptor", None), "digest", None) or getattr(layer, "diff_id", "?")
    short = digest[:19] + "…" if isinstance(digest, str) and len(digest) > 19 else digest
    return f"layer {index + 1} ({short})"


#: Layers scanned at once (the one being applied included): the next layers are inflated, hashed
#: and parsed while the tree is built.  Each costs a few MiB (read-ahead, hash and batch queues).
LOOKAHEAD = 3


def _start_scan(index: int, layer: Layer, opener, spill: SpillStore, verifier: VerifyAhead,
                limits: FlattenLimits, budget: ByteBudget, kept: KeptLayer | None = None) -> tuple[LayerScan, object]:
    """Start scanning layer ``index`` on a worker thread; return the scan and the layer's data
    opener once scanned (the spill segment's for a spilled layer, else ``opener``).

    A layer with a range ``opener`` is scanned straight from its blob while ``verifier`` checks
    it on another thread; any other layer is read through its verifying stream, and spilled into
    a segment of its own unless it has an ``opener`` (:data:`_REREAD`: its data will be re-read
    from the blob, or served from ``kept`` if the stream fits there).
    """
    tar_limits = TarLimits(max_long_name=limits.max_long_name, max_pax_header=limits.max_pax_header)
    name = f"scan-layer-{index + 1}"
    if index in verifier:
        # In place, file data is seeked over: the verifier reads the blob anyway, the ramdisk later.
        size = layer.descriptor.size
        return LayerScan(lambda: opener(0, size), limits=tar_limits, budget=budget.share(index),
                         seek_over_data=True, name=name), opener

    segment = spill.segment() if opener is None else None

    def open_stream() -> BinaryIO:
        return cast(BinaryIO, ReadAhead(layer.open_uncompressed()))  # a RawIOBase: it reads as BinaryIO

    tee = segment.append if segment is not None else kept.append if kept is not None else None
    return LayerScan(open_stream, limits=tar_limits, budget=budget.share(index), name=name,
                     tee=tee), segment or opener


def _apply_layer(builder: _TreeBuilder, index: int, layer: Layer, scan: LayerScan, verifier: VerifyAhead,
                 progress) -> None:
    """Apply the members of layer ``index``, as ``scan`` hands them over, to the tree."""
    label = _layer_label(index, layer)
    builder.begin_layer(index, 0)
    try:
        for members, read in scan.batches():
            try:
                builder.apply_all(members)
            except _Refusal as exc:
                assert exc.member is not None
                name = exc.member.name[:200].decode("utf-8", "backslashreplace")
                raise ImageError(f"{label}: member {name!r}: {exc}") from None
            if progress is not None and read:
                progress(read)
    except ImageError as exc:
        # A blob that fails verification is reported as such, not as whatever its bytes parse to.
        failure = verifier.failed(index) if index in verifier else None
        if failure is not None:
            raise failure from None
        if isinstance(exc, TarFormatError):
            raise ImageError(f"{label}: {exc}") from None
        raise
    builder.end_layer()


#: The opener of a layer whose data is re-read from its blob (flatten's ``reread``).
_REREAD = object()


def flatten(layers: Sequence[Layer], *, spill_dir: str | None = None,
            limits: FlattenLimits = FlattenLimits(), clamp_mtime: int | None = None,
            progress: Callable[[int], object] | None = None, reread: bool = False) -> FlatTree:
    """Apply ``layers`` bottom to top and return the resulting tree (see the module docstring).

    ``spill_dir``: where the spill store's files are made, unlinked at once (default: the system temp dir).
    ``clamp_mtime``: SOURCE_DATE_EPOCH; every mtime becomes ``min(mtime, clamp_mtime)`` and
    synthesised directories get ``clamp_mtime`` (else 0).  ``progress`` is called with the byte
    count of every chunk of uncompressed tar read.  ``reread``: compressed layers whose blob is a
    local file are not spilled; their data is inflated again when read
    (:mod:`qtbuild.convert.reread`: costs CPU, saves the disk — for ``measure``).  Raises
    :class:`ImageError`; the caller must :meth:`FlatTree.close` the result (and should call
    :meth:`FlatTree.verify_rereads` once the data was read).
    """
    if clamp_mtime is not None and not 0 <= clamp_mtime <= U32_MAX:
        raise ValueError(f"clamp_mtime {clamp_mtime} is outside 0..{U32_MAX}")
    spill = SpillStore(spill_dir)
    try:
        builder = _TreeBuilder(limits, clamp_mtime if clamp_mtime is not None else 0)
        budget = ByteBudget(limits.max_total_bytes)
        # A layer read in stream order is located only when its turn comes (in the loop below).
        openers: list = [None if layer.in_stream_order else layer.range_opener() for layer in layers]
        in_place = {index: layer for index, layer in enumerate(layers)
                    if openers[index] is not None and getattr(layer, "descriptor", None) is not None}
        reopeners = {index: layer.reread_opener() for index, layer in enumerate(layers)
                     if reread and openers[index] is None and not layer.in_stream_order}
        reopeners = {index: reopen for index, reopen in reopeners.items() if reopen is not None}
        kept = plan_kept(reopeners)  # small layers served from memory, not inflated again
        lengths: dict[int, int] = {}
        with VerifyAhead(in_place) as verifier, _Scans() as scans:
            for index, layer in enumerate(layers):
                if layer.in_stream_order:
                    openers[index] = layer.range_opener()
                for ahead in range(index, min(index + LOOKAHEAD, len(layers))):
                    # A layer read in stream order may only be opened once the layers below it were read.
                    if ahead not in scans and (ahead == index or not layers[ahead].in_stream_order):
                        opener = _REREAD if ahead in reopeners else openers[ahead]
                        scans[ahead] = _start_scan(ahead, layers[ahead], opener, spill, verifier, limits, budget,
                                                   kept.get(ahead))
                scan, data_opener = scans[index]
                _apply_layer(builder, index, layer, scan, verifier, progress)
                keeper = kept.get(index)
                lengths[index] = scan.length if keeper is None else keeper.length
                if keeper is not None and keeper.whole:
                    openers[index] = keeper.open_range
                    del reopeners[index]
                if isinstance(data_opener, SpillFile):
                    data_opener.flush()
                    openers[index] = data_opener.open_range
            for index in in_place:
                verifier.result(index)
        spill.flush()
        rereaders = _rereaders(builder, layers, reopeners, lengths, spill)
        for index, rereader in rereaders.items():
            openers[index] = rereader.open_range
        tree = FlatTree(builder, openers, spill, clamp_mtime, rereaders=list(rereaders.values()))
        try:
            for rereader in rereaders.values():
                rereader.start()  # layers needed later inflate while the first ones are written
        except BaseException:
            tree.close()
            raise
        return tree
    except BaseException:
        spill.close()
        raise
