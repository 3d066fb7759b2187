"""flatten(): layer semantics (whiteouts, replacement, hardlinks, metadata) and data read-back.

Layers are tar bytes written with :mod:`tarfile` and served by :class:`BytesLayer`, with
(``in_place=True``) or without range access, so both the in-place and the spill paths run.
The property test compares flatten() with a small reference model of the final tree.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtbuild.convert.flatten import FlatTree, flatten
from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioArchive, iter_archive
from qtbuild.sources.base import Descriptor, Layer

from helpers.open_files import open_files_under

# --------------------------------------------------------------------------------------------
# Helpers (also used by test_hostile_layers.py)
# --------------------------------------------------------------------------------------------


class BytesLayer(Layer):
    """A layer over uncompressed tar bytes; ``in_place`` offers range access like a local blob."""

    def __init__(self, tar: bytes, in_place: bool = False):
        digest = "sha256:" + hashlib.sha256(tar).hexdigest()
        self.descriptor = Descriptor("application/vnd.oci.image.layer.v1.tar", digest, len(tar))
        self.diff_id = digest
        self._tar = tar
        self._in_place = in_place

    def open_blob(self):
        return io.BytesIO(self._tar)

    def open_uncompressed(self):
        return io.BytesIO(self._tar)

    def range_opener(self):
        if not self._in_place:
            return None
        return lambda offset, size: io.BytesIO(self._tar[offset:offset + size])


@dataclass
class M:
    """One tar member to write: kind is file/dir/symlink/hardlink/char/block/fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    dev: tuple[int, int] = (0, 0)
    pax: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name.endswith("/") and self.kind == "file":
            self.kind = "dir"


_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
          "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
          "fifo": tarfile.FIFOTYPE}


def build_tar(members: list[M], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """Tar bytes holding ``members`` in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            info.uid, info.gid, info.mtime = m.uid, m.gid, m.mtime
            info.uname = info.gname = "ignored"
            info.linkname = m.target
            info.devmajor, info.devminor = m.dev
            info.pax_headers = dict(m.pax)
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def layers_of(*member_lists: list[M], in_place: bool = False) -> list[BytesLayer]:
    return [BytesLayer(build_tar(members), in_place) for members in member_lists]


def read(entry) -> bytes:
    if entry.data is None:
        return b""
    with entry.data() as stream:
        return stream.read()


def tree_of(tree: FlatTree) -> dict[str, object]:
    """path → ('dir', mode) | ('file', mode, content) | ('symlink', target) | (kind, rdev)."""
    result = {}
    assert list(tree.iter_paths(b"p/")) == [b"p/" + e.path for e in tree.entries()]  # the cheaper walk agrees
    for e in tree.entries():
        path = e.path.decode()
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFDIR:
            result[path] = ("dir", stat.S_IMODE(e.mode))
        elif kind == stat.S_IFREG:
            result[path] = ("file", stat.S_IMODE(e.mode), read(e))
        elif kind == stat.S_IFLNK:
            result[path] = ("symlink", e.link_target.decode())
        else:
            result[path] = (stat.filemode(e.mode)[0], e.rdev)
    return result


def flat(*member_lists: list[M], in_place: bool = False, **kwargs) -> dict[str, object]:
    with flatten(layers_of(*member_lists, in_place=in_place), **kwargs) as tree:
        return tree_of(tree)


both = pytest.mark.parametrize("in_place", [False, True], ids=["spill", "in-place"])

# --------------------------------------------------------------------------------------------
# Whiteouts and opaque directories
# --------------------------------------------------------------------------------------------


@both
def test_whiteout_deletes_file_and_directory_from_lower_layers(in_place):
    lower = [M("etc/"), M("etc/a", data=b"a"), M("etc/b", data=b"b"), M("opt/d/x", data=b"x")]
    upper = [M("etc/.wh.a"), M("opt/.wh.d")]
    result = flat(lower, upper, in_place=in_place)
    assert set(result) == {"etc", "etc/b", "opt"}


@pytest.mark.parametrize("order", ["entry-first", "whiteout-first"])
def test_whiteout_only_affects_lower_layers(order):
    lower = [M("a", data=b"old"), M("d/old", data=b"o")]
    own = [M("a", data=b"new"), M("d/", mode=0o700), M("d/new", data=b"n")]
    whiteouts = [M(".wh.a"), M(".wh.d")]
    upper = own + whiteouts if order == "entry-first" else whiteouts + own
    result = flat(lower, upper)
    assert result["a"] == ("file", 0o644, b"new")
    assert result["d"] == ("dir", 0o700)
    assert "d/new" in result and "d/old" not in result


@pytest.mark.parametrize("order", ["marker-first", "marker-last"])
def test_opaque_directory_hides_lower_contents_regardless_of_order(order):
    lower = [M("d/"), M("d/a", data=b"a"), M("d/sub/b", data=b"b"), M("d/keep/c", data=b"c"), M("e", data=b"e")]
    entries = [M("d/", mode=0o750), M("d/new", data=b"n"), M("d/keep/", mode=0o700)]
    marker = [M("d/.wh..wh..opq")]
    upper = [entries[0]] + (marker + entries[1:] if order == "marker-first" else entries[1:] + marker)
    result = flat(lower, upper)
    assert set(result) == {"d", "d/new", "d/keep", "e"}
    assert result["d"] == ("dir", 0o750)


def test_whiteouts_never_appear_and_meta_whiteouts_are_skipped():
    result = flat([M("a", data=b"a")], [M(".wh..wh.plnk/"), M(".wh..wh.plnk/1.2", data=b"x"),
                                         M(".wh..wh.aufs"), M(".wh.missing"), M("nodir/.wh.x")])
    assert result == {"a": ("file", 0o644, b"a")}


def test_whiteout_of_one_hardlink_keeps_the_other():
    result = flat([M("a", data=b"data"), M("b", kind="hardlink", target="a")], [M(".wh.a")])
    assert result == {"b": ("file", 0o644, b"data")}


# --------------------------------------------------------------------------------------------
# Replacement and duplicates
# --------------------------------------------------------------------------------------------


def test_file_replaced_by_directory_and_back():
    result = flat([M("x", data=b"file")], [M("x/"), M("x/y", data=b"y")], [M("x", data=b"again")])
    assert result == {"x": ("file", 0o644, b"again")}


def test_directory_over_directory_replaces_attributes_keeps_children():
    result = flat([M("d/", mode=0o755, uid=1), M("d/f", data=b"f")], [M("d/", mode=0o1777, uid=2)])
    assert result == {"d": ("dir", 0o1777), "d/f": ("file", 0o644, b"f")}


def test_symlink_replaced_by_directory_is_not_followed():
    result = flat([M("real/"), M("real/f", data=b"f"), M("link", kind="symlink", target="real")],
                  [M("link/"), M("link/g", data=b"g")])
    assert result["link"] == ("dir", 0o755)
    assert "link/g" in result and "real/g" not in result and "real/f" in result


def test_file_replaced_by_symlink_and_symlink_by_file():
    result = flat([M("a", data=b"a"), M("s", kind="symlink", target="/x")],
                  [M("a", kind="symlink", target="b"), M("s", data=b"now a file")])
    assert result == {"a": ("symlink", "b"), "s": ("file", 0o644, b"now a file")}


def test_duplicate_entries_last_wins():
    result = flat([M("f", data=b"first"), M("f", data=b"second", mode=0o600), M("g/"), M("g", data=b"g")])
    assert result == {"f": ("file", 0o600, b"second"), "g": ("file", 0o644, b"g")}


# --------------------------------------------------------------------------------------------
# Hardlinks
# --------------------------------------------------------------------------------------------


@both
def test_cross_layer_hardlink_shares_inode(in_place):
    layers = layers_of([M("bin/busybox", data=b"BB" * 1000, mode=0o755)],
                       [M("bin/sh", kind="hardlink", target="bin/busybox")], in_place=in_place)
    with flatten(layers) as tree:
        by_path = {e.path: e for e in tree.entries()}
        assert by_path[b"bin/sh"].hardlink_key == by_path[b"bin/busybox"].hardlink_key is not None
        assert read(by_path[b"bin/sh"]) == b"BB" * 1000
        CpioArchive(tree.entries())  # hardlink groups are consistent


def test_hardlink_keeps_old_content_when_target_is_replaced():
    layers = layers_of([M("a", data=b"old"), M("b", kind="hardlink", target="./a")], [M("a", data=b"new")])
    with flatten(layers) as tree:
        by_path = {e.path: e for e in tree.entries()}
        assert read(by_path[b"a"]) == b"new" and read(by_path[b"b"]) == b"old"
        assert by_path[b"a"].hardlink_key is None and by_path[b"b"].hardlink_key is None


def test_hardlink_to_symlink_becomes_a_copy():
    result = flat([M("s", kind="symlink", target="/etc"), M("t", kind="hardlink", target="s")])
    assert result == {"s": ("symlink", "/etc"), "t": ("symlink", "/etc")}


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def test_implicit_parents_are_synthesised():
    with flatten(layers_of([M("a/b/c", data=b"c", mtime=5)])) as tree:
        dirs = [e for e in tree.entries() if stat.S_ISDIR(e.mode)]
        assert [(e.path, e.mode, e.uid, e.gid, e.mtime) for e in dirs] == [
            (b"a", stat.S_IFDIR | 0o755, 0, 0, 0), (b"a/b", stat.S_IFDIR | 0o755, 0, 0, 0)]
    with flatten(layers_of([M("a/b/c", data=b"c", mtime=5)]), clamp_mtime=3) as tree:
        assert [e.mtime for e in tree.entries()] == [3, 3, 3]


def test_ownership_modes_devices_and_symlinks_kept_verbatim():
    layer = [
        M("usr/bin/passwd", data=b"p", mode=0o4755, uid=0, gid=0),
        M("usr/bin/wall", data=b"w", mode=0o2755, gid=5),
        M("tmp/", mode=0o1777),
        M("home/u/f", data=b"u", uid=100_000, gid=200_000, mode=0o600),
        M("dev/null", kind="char", dev=(1, 3), mode=0o666),
        M("dev/sda", kind="block", dev=(8, 0), mode=0o660, gid=6),
        M("run/fifo", kind="fifo", mode=0o600),
        M("lib64", kind="symlink", target="usr/lib64", mode=0o777),
        M("abs", kind="symlink", target="/usr/lib/../bin//x", mode=0o777),
    ]
    with flatten(layers_of(layer)) as tree:
        by_path = {e.path: e for e in tree.entries()}
    assert by_path[b"usr/bin/passwd"].mode == stat.S_IFREG | 0o4755
    assert by_path[b"usr/bin/wall"].mode == stat.S_IFREG | 0o2755 and by_path[b"usr/bin/wall"].gid == 5
    assert by_path[b"tmp"].mode == stat.S_IFDIR | 0o1777
    assert (by_path[b"home/u/f"].uid, by_path[b"home/u/f"].gid) == (100_000, 200_000)
    assert by_path[b"dev/null"].mode == stat.S_IFCHR | 0o666 and by_path[b"dev/null"].rdev == (1, 3)
    assert by_path[b"dev/sda"].mode == stat.S_IFBLK | 0o660 and by_path[b"dev/sda"].rdev == (8, 0)
    assert by_path[b"run/fifo"].mode == stat.S_IFIFO | 0o600
    assert by_path[b"lib64"].link_target == b"usr/lib64"
    assert by_path[b"abs"].link_target == b"/usr/lib/../bin//x"
    assert by_path[b"usr/bin/passwd"].mtime == 1_600_000_000


def test_mtime_clamp():
    result = {}
    with flatten(layers_of([M("old", data=b"", mtime=10), M("new", data=b"", mtime=2_000_000_000)]),
                 clamp_mtime=1_000_000_000) as tree:
        result = {e.path: e.mtime for e in tree.entries()}
    assert result == {b"new": 1_000_000_000, b"old": 10}


def test_pax_fractional_and_huge_mtimes():
    members = [M("a", data=b"", pax={"mtime": "1234.999"}), M("b", data=b"", pax={"mtime": "-5.5"})]
    with flatten(layers_of(members)) as tree:
        assert {e.path: e.mtime for e in tree.entries()} == {b"a": 1234, b"b": 0}


def test_xattrs_dropped_with_warnings_for_surviving_entries():
    layers = layers_of(
        [M("usr/bin/ping", data=b"p", pax={"SCHILY.xattr.security.capability": "\x01\x00"}),
         M("gone", data=b"g", pax={"SCHILY.xattr.security.capability": "x"}),
         M("a", data=b"", pax={"SCHILY.xattr.user.foo": "1"}),
         M("b", data=b"", pax={"SCHILY.xattr.user.foo": "2", "LIBARCHIVE.xattr.user.bar%21": "eA=="})],
        [M(".wh.gone")])
    with flatten(layers) as tree:
        assert tree.warnings == [
            "dropped xattr security.capability on usr/bin/ping (newc cannot carry file capabilities)",
            "dropped xattr user.bar! on b",
            "dropped xattr user.foo on 2 paths (first: a)",
        ]


def test_root_entries_and_dot_prefixes_are_normalised():
    result = flat([M("./"), M(".", kind="dir"), M("./a/", mode=0o700), M("./a//b/./c", data=b"c"), M("d/")])
    assert result == {"a": ("dir", 0o700), "a/b": ("dir", 0o755), "a/b/c": ("file", 0o644, b"c"),
                      "d": ("dir", 0o755)}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_in_every_format(fmt):
    name = "/".join(["d" * 70] * 3) + "/file"  # 217 bytes: prefix (ustar), L (gnu), path (pax)
    target = "t" * 200 if fmt != tarfile.USTAR_FORMAT else "t" * 90
    members = [M(name, data=b"x"), M("link", kind="symlink", target=target)]
    with flatten([BytesLayer(build_tar(members, fmt))]) as tree:
        by_path = {e.path: e for e in tree.entries()}
    assert by_path[name.encode()].size == 1 and by_path[b"link"].link_target == target.encode()


# --------------------------------------------------------------------------------------------
# Symlinked parents (chroot semantics)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "../../..", "/../..", ".", "./../"])
def test_parent_symlink_to_root_stays_inside(target):
    result = flat([M("a", kind="symlink", target=target)], [M("a/etc/passwd", data=b"root")])
    assert result["etc/passwd"] == ("file", 0o644, b"root")
    assert result["a"] == ("symlink", target)


def test_relative_and_absolute_parent_symlinks_resolve_in_tree():
    result = flat([M("usr/lib/"), M("lib", kind="symlink", target="usr/lib"),
                   M("usr/lib64", kind="symlink", target="/usr/lib")],
                  [M("lib/x", data=b"x"), M("usr/lib64/y", data=b"y")])
    assert result["usr/lib/x"][2] == b"x" and result["usr/lib/y"][2] == b"y"
    assert "lib/x" not in result


# --------------------------------------------------------------------------------------------
# Data, spill store, cpio
# --------------------------------------------------------------------------------------------


@both
def test_data_read_back_and_archive_round_trip(in_place, tmp_path):
    big = os.urandom(3 * (1 << 20) + 7)
    layers = layers_of([M("big", data=big), M("small", data=b"s" * 513), M("empty", data=b"")],
                       [M("small", data=b"replaced"), M("d/x", data=b"x" * 511)], in_place=in_place)
    seen = []
    with flatten(layers, spill_dir=str(tmp_path), progress=seen.append) as tree:
        assert sum(seen) == sum(len(layer._tar) for layer in layers)
        assert (tree.spill_bytes > 0) == (not in_place)
        assert bool(open_files_under(tmp_path)) == (not in_place)  # spilled there, unlinked at once
        by_path = {e.path: e for e in tree.entries()}
        assert read(by_path[b"big"]) == big
        assert read(by_path[b"small"]) == b"replaced"
        assert read(by_path[b"d/x"]) == b"x" * 511
        assert by_path[b"empty"].size == 0
        out = io.BytesIO()
        CpioArchive(tree.entries()).write_to(out)
    assert os.listdir(tmp_path) == []
    out.seek(0)
    members = {m.path: data.read() for m, data in iter_archive(out)}
    assert members[b"big"] == big and members[b"small"] == b"replaced"


def test_entries_sorted_bytewise():
    with flatten(layers_of([M("a-b", data=b""), M("a/b", data=b""), M("B", data=b""), M("a.c/d", data=b"")])) as tree:
        paths = [e.path for e in tree.entries()]
    assert paths == sorted(paths) == [b"B", b"a", b"a-b", b"a.c", b"a.c/d", b"a/b"]


def test_empty_layer_list_and_empty_layers():
    with flatten([]) as tree:
        assert tree.entries() == []
    assert flat([], []) == {}
    with flatten([BytesLayer(b"")]) as tree:
        assert tree.entries() == []


# --------------------------------------------------------------------------------------------
# Property test against a reference model
# --------------------------------------------------------------------------------------------


class ModelError(Exception):
    pass


class _MFile:
    """A regular file inode of the model (hardlinks share it)."""

    def __init__(self, content: bytes):
        self.content = content


def _is_dir(node) -> bool:
    return isinstance(node, tuple) and node[0] == "dir"


class Model:
    """Flat dict path-tuple → node; a second, deliberately different implementation of the rules."""

    def __init__(self):
        self.tree: dict[tuple, object] = {}
        self.touched: set[tuple] = set()

    def new_layer(self):
        self.touched = set()

    def resolve(self, components, create):
        cur, pending, hops = (), list(reversed(components)), 0
        while pending:
            c = pending.pop()
            if c in ("", "."):
                continue
            if c == "..":
                cur = cur[:-1]
                continue
            p = cur + (c,)
            node = self.tree.get(p)
            if node is None:
                if not create:
                    return None
                self.tree[p] = ("dir", 0o755)
                self.touched.add(p)
                cur = p
            elif isinstance(node, tuple) and node[0] == "symlink":
                hops += 1
                if hops > 40:
                    raise ModelError("ELOOP")
                if node[1].startswith("/"):
                    cur = ()
                pending.extend(reversed(node[1].split("/")))
            elif isinstance(node, tuple) and node[0] == "dir":
                cur = p
            elif create:
                raise ModelError("not a directory")
            else:
                return None
        return cur

    def remove_subtree(self, p):
        for key in [k for k in self.tree if k[:len(p)] == p]:
            del self.tree[key]

    def prune(self, p):
        live_touched = [t for t in self.touched if t in self.tree]
        for key in [k for k in self.tree if k[:len(p)] == p]:
            if not any(t[:len(key)] == key for t in live_touched):
                del self.tree[key]

    def place(self, path, node):
        parent = self.resolve(path[:-1], True)
        p = parent + (path[-1],)
        existing = self.tree.get(p)
        self.touched.add(p)
        if _is_dir(node) and _is_dir(existing):
            self.tree[p] = node
            return
        self.remove_subtree(p)
        self.tree[p] = node

    def check_hardlink(self, target):
        parent = self.resolve(target[:-1], False)
        node = None if parent is None else self.tree.get(parent + (target[-1],))
        if node is None or _is_dir(node):
            raise ModelError("bad hardlink")
        return node

    def apply(self, op):
        kind, path, arg = op
        if kind == "file":
            self.place(path, _MFile(arg))
        elif kind == "dir":
            self.place(path, ("dir", arg))
        elif kind == "symlink":
            self.place(path, ("symlink", arg))
        elif kind == "hardlink":
            self.place(path, self.check_hardlink(arg))
        elif kind == "whiteout":
            parent = self.resolve(path[:-1], False)
            if parent is not None and parent + (path[-1],) in self.tree:
                self.prune(parent + (path[-1],))
        elif kind == "opaque":
            parent = self.resolve(path, False)
            if parent is not None:
                for key in [k for k in self.tree if len(k) == len(parent) + 1 and k[:-1] == parent]:
                    self.prune(key)

    def final(self):
        result = {}
        for key, node in self.tree.items():
            path = "/".join(key)
            if isinstance(node, _MFile):
                result[path] = ("file", 0o644, node.content)
            else:
                result[path] = node
        return result

    def link_groups(self):
        groups = {}
        for key, node in self.tree.items():
            if isinstance(node, _MFile):
                groups.setdefault(id(node), set()).add("/".join(key))
        return {frozenset(g) for g in groups.values() if len(g) > 1}


_NAMES = st.sampled_from(["a", "b", "c"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=3).map(tuple)
_FILE_OP = st.tuples(st.just("file"), _PATHS, st.sampled_from([b"", b"1", b"22" * 300]))
_DIR_OP = st.tuples(st.just("dir"), _PATHS, st.sampled_from([0o755, 0o700]))
_OPS = st.one_of(
    _FILE_OP, _FILE_OP, _FILE_OP, _DIR_OP, _DIR_OP,
    st.tuples(st.just("symlink"), _PATHS, st.sampled_from(["/a", "b", "../c", "/", "a/..", "/b/a", "x/y"])),
    st.tuples(st.just("hardlink"), _PATHS, st.sampled_from([("a",), ("b",), ("a", "b"), ("b", "a", "c")])),
    st.tuples(st.just("whiteout"), _PATHS, st.none()),
    st.tuples(st.just("opaque"), _PATHS, st.none()),
)


def _member(op) -> M:
    kind, path, arg = op
    name = "/".join(path)
    if kind == "file":
        return M(name, data=arg)
    if kind == "dir":
        return M(name, kind="dir", mode=arg)
    if kind == "symlink":
        return M(name, kind="symlink", target=arg)
    if kind == "hardlink":
        return M(name, kind="hardlink", target="/".join(arg))
    if kind == "whiteout":
        return M("/".join(path[:-1] + (".wh." + path[-1],)))
    return M(name + "/.wh..wh..opq")


def _fix_hardlink(model: Model, op):
    """Retarget a hardlink op whose target would be invalid to an existing file (None: drop it)."""
    if op[0] != "hardlink":
        return op
    try:
        model.check_hardlink(op[2])
        return op
    except ModelError:
        files = sorted(k for k, node in model.tree.items() if isinstance(node, _MFile))
        return ("hardlink", op[1], files[len(op[1]) % len(files)]) if files else None


@given(st.lists(st.lists(_OPS, max_size=10), min_size=1, max_size=4), st.booleans())
def test_flatten_matches_reference_model(layer_ops, in_place):
    model = Model()
    expected_error = False
    applied: list[list] = []
    try:
        for ops in layer_ops:
            model.new_layer()
            applied.append([])
            for op in ops:
                op = _fix_hardlink(model, op)
                if op is not None:
                    applied[-1].append(op)
                    model.apply(op)
    except ModelError:
        expected_error = True
    layers = layers_of(*[[_member(op) for op in ops] for ops in applied], in_place=in_place)
    if expected_error:
        with pytest.raises(ImageError):
            flatten(layers).close()
        return
    with flatten(layers) as tree:
        assert tree_of(tree) == model.final()
        groups = {}
        for e in tree.entries():
            if e.hardlink_key is not None:
                groups.setdefault(e.hardlink_key, set()).add(e.path.decode())
        assert {frozenset(g) for g in groups.values()} == model.link_groups()
        CpioArchive(tree.entries())
