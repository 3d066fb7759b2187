"""The tree builder's shortcuts give exactly what the plain code gives (issue 16, the first pass's
per-member cost and the hand-over to the write).

The batch apply (``_TreeBuilder.apply_all``) gives what applying each member on its own gives:
the same tree, the same counts, the same refusal for the same member.  ``data_ranges``,
``find_paths``, ``with_xattrs`` and the hardlink groups (gathered in C between flatten and the
write) give what a walk over every path gives.

Differential: random layers of members whose names repeat a few directories (so the shortcut for
a file next to the member before it is taken often) mixed with every kind of name the general path
treats specially (``.``, ``..``, empty components, whiteouts, opaque markers, long components,
replacements, symlinked parents, hardlinks), applied once through ``apply_all`` in batches and once
member by member through ``apply``.
"""

from __future__ import annotations

import random
import re
import stat
from collections import Counter

import pytest

from qtbuild.convert import flatten as flatten_module
from qtbuild.convert.credential_scan import _CREDENTIAL_FILES, CANDIDATE_DIRECTORIES, CANDIDATE_NAMES
from qtbuild.convert.flatten import FlattenLimits
from qtbuild.convert.tarscan import DIRECTORY, HARDLINK, REGULAR, SYMLINK, TarMember

DIRECTORIES = [b"", b"a", b"a/b", b"./a/b", b"a//b", b"c", b"a/b/c", b"link", b"link/x", b"file", b"a/.wh..wh.plnk"]
BASES = [b"f", b"g", b"h", b".hidden", b"b", b"c", b"link", b"file"]
SYMLINK_TARGETS = (b"a", b"../c", b"/a/b", b"link", b"a/b", b"c", b"a/b/c/..", b"c/../a")
#: Names the general path treats specially (some of them refused): one member in ten.
SPECIAL_BASES = [b"", b".", b"..", b".wh.f", b".wh.g", b".wh..wh..opq", b".wh.", b".wh.b", b"x" * 256]


def _member(rng: random.Random, offset: int) -> TarMember:
    directory, base = rng.choice(DIRECTORIES), rng.choice(SPECIAL_BASES if rng.random() < 0.1 else BASES)
    name = base if not directory else directory + b"/" + base
    roll = rng.random()
    kind, size, linkname = REGULAR, rng.choice((0, 5, 700)), b""
    if roll < 0.1:
        kind, size = DIRECTORY, 0
        name += rng.choice((b"", b"/"))
    elif roll < 0.15:
        kind, size, linkname = SYMLINK, 0, rng.choice(SYMLINK_TARGETS)
    elif roll < 0.2:
        kind, size, linkname = HARDLINK, 0, rng.choice((b"a/b/f", b"c/g", b"f", b"missing"))
    if rng.random() < 0.003:
        name = b"/" + name
    mtime = rng.choice((0, 1_700_000_000, -5, 1 << 33))
    xattrs = ("user.x",) if rng.random() < 0.05 else ()
    return TarMember(name, kind, rng.choice((0o644, 0o755)), rng.choice((0, 1000)), 0, mtime, size, linkname, 0, 0,
                     xattrs, offset, offset + 512)


def _random_layers(rng: random.Random) -> list[list[TarMember]]:
    offset, layers = 0, []
    for _layer in range(rng.choice((1, 2, 3))):
        members = []
        for _ in range(rng.randrange(1, 40)):
            members.append(_member(rng, offset))
            offset += 1024
        layers.append(members)
    return layers


def _snapshot(builder) -> tuple:
    """Everything the output depends on, node by node in path order, and the counters."""
    rows = []
    for path, node in builder.walk_sorted():
        inode = builder.inode(node)
        rows.append((path, inode == node, builder._mode[inode], builder._uid[inode], builder._gid[inode],
                     builder._mtime[inode], builder._size[inode], builder._offset[inode], builder._layer_of[inode],
                     builder._placed[node], builder._targets.get(inode), builder.xattrs(node)))
    return rows, builder._entries, builder._steps, len(builder._mode)


def _build(layers: list[list[TarMember]], limits: FlattenLimits, batched: bool) -> tuple:
    builder = flatten_module._TreeBuilder(limits, 0)
    try:
        for index, members in enumerate(layers):
            builder.begin_layer(index, 1000 * index)
            if batched:
                for start in range(0, len(members), 7):
                    builder.apply_all(members[start:start + 7])
            else:
                for member in members:
                    try:
                        builder.apply(member)
                    except flatten_module._Refusal as exc:
                        exc.member = member
                        raise
    except flatten_module._Refusal as exc:
        return "refused", index, exc.member, str(exc), _snapshot(builder)
    return "built", _snapshot(builder)


@pytest.mark.parametrize("limits", [FlattenLimits(), FlattenLimits(max_entries=40), FlattenLimits(max_path_steps=90)],
                         ids=["default", "max_entries", "max_path_steps"])
def test_apply_all_builds_what_apply_builds(limits):
    rng = random.Random(16)
    refused = built = 0
    for _ in range(300):
        layers = _random_layers(rng)
        batched, single = _build(layers, limits, True), _build(layers, limits, False)
        assert batched == single, layers
        refused += batched[0] == "refused"
        built += batched[0] == "built"
    assert refused > 20 and built > 20  # both outcomes were compared


def test_the_shortcut_is_taken_for_files_next_to_each_other(monkeypatch):
    calls = []
    real = flatten_module._TreeBuilder.apply
    monkeypatch.setattr(flatten_module._TreeBuilder, "apply", lambda self, member: calls.append(member) or
                        real(self, member))
    builder = flatten_module._TreeBuilder(FlattenLimits(), 0)
    builder.begin_layer(0, 0)
    members = [TarMember(b"usr/share/f%d" % i, REGULAR, 0o644, 0, 0, 0, 10, b"", 0, 0, (), 1024 * i, 1024 * i + 512)
               for i in range(100)]
    builder.apply_all(members)
    assert calls == members[:1]  # the first resolves the directory; the others reuse it
    assert [path for path, _node in builder.walk_sorted()][-1] == b"usr/share/f99"


def test_a_file_replacing_a_directory_the_last_walk_went_through_is_seen():
    """``link -> a/b/c/..`` resolves through ``a/b/c``: once ``link/c`` replaces that directory with
    a file, ``link/g`` must be refused, not placed in the directory the walk before found."""
    def file(name: bytes) -> TarMember:
        return TarMember(name, REGULAR, 0o644, 0, 0, 0, 1, b"", 0, 0, (), 0, 512)

    members = [TarMember(b"a/b/c/", DIRECTORY, 0o755, 0, 0, 0, 0, b"", 0, 0, (), 0, 512),
               TarMember(b"link", SYMLINK, 0o777, 0, 0, 0, 0, b"a/b/c/..", 0, 0, (), 0, 512),
               file(b"link/f"), file(b"link/c"), file(b"link/g")]
    batched, single = _build([members], FlattenLimits(), True), _build([members], FlattenLimits(), False)
    assert batched == single
    assert batched[:4] == ("refused", 0, members[-1], "parent 'a/b/c' is not a directory")


def _built(layers: list[list[TarMember]]):
    """The builder after ``layers`` (or after the members before the first refusal)."""
    builder = flatten_module._TreeBuilder(FlattenLimits(), 0)
    for index, members in enumerate(layers):
        builder.begin_layer(index, 0)
        for member in members:
            try:
                builder.apply(member)
            except flatten_module._Refusal:
                return builder
    return builder


def test_data_ranges_are_every_surviving_file_of_the_layers_in_offset_order():
    rng = random.Random(17)
    compared = 0
    for _ in range(300):
        builder = _built(_random_layers(rng))
        expected: dict[int, set[tuple[int, int]]] = {}
        for _path, node in builder.walk_sorted():
            inode = builder.inode(node)
            if builder._layer_of[inode] >= 0 and builder._size[inode]:
                expected.setdefault(builder._layer_of[inode], set()).add((builder._offset[inode], builder._size[inode]))
        for layers in ({0}, {1, 2}, {0, 1, 2}, {5}):
            ranges = builder.data_ranges(layers)
            assert ranges == {layer: sorted(found) for layer, found in expected.items() if layer in layers}
            compared += sum(map(len, ranges.values()))
    assert compared > 1000


def test_find_paths_gives_every_path_the_credential_scan_looks_at():
    rng = random.Random(18)
    names = [b"credentials", b".env", b"id_rsa", b"k.pem", b"x.key", b"a.p12", b"b.pfx", b".pem", b"f", b"env",
             b"credentials.json", b"id", b".env\n", b"tls.pem\n", b"\xff.key", b"credentials.jsonx", b"x.pems"]
    dirs = [b"", b"root/.aws", b"root/.ssh", b".huaweicloud", b"home/u/.hcloud", b"app", b"a/.aws/b", b".hcloud/x"]
    for _ in range(100):
        members, offset = [], 0
        for _ in range(rng.randrange(1, 60)):
            directory, name = rng.choice(dirs), rng.choice(names)
            path = name if not directory else directory + b"/" + name
            members.append(TarMember(path, REGULAR, 0o644, 0, 0, 0, 1, b"", 0, 0, (), offset, offset + 512))
            offset += 1024
        builder = _built([members])
        every = [path for path, _node in builder.walk_sorted()]
        matched = [path for path in every if _CREDENTIAL_FILES.search(path.decode("utf-8", "replace"))]
        found = builder.find_paths(CANDIDATE_NAMES, CANDIDATE_DIRECTORIES)
        assert [path for path in found if _CREDENTIAL_FILES.search(path.decode("utf-8", "replace"))] == matched
        assert found == [path for path in every if path in set(found)]  # the tree's (bytewise) order
        assert builder.find_paths(re.compile(b"."), ()) == every


def test_with_xattrs_gives_the_entries_with_xattrs_in_path_order():
    rng = random.Random(19)
    found = 0
    for _ in range(300):
        builder = _built(_random_layers(rng))
        expected = [(path, node) for path, node in builder.walk_sorted() if builder.xattrs(node)]
        assert builder.with_xattrs() == expected
        found += len(expected)
    assert found > 50
    linked = _built([[TarMember(b"bin/ping", REGULAR, 0o755, 0, 0, 0, 1, b"", 0, 0, ("security.capability",), 0, 512),
                      TarMember(b"sbin/ping", HARDLINK, 0o755, 0, 0, 0, 0, b"bin/ping", 0, 0, (), 1024, 1536)]])
    assert [path for path, _node in linked.with_xattrs()] == [b"bin/ping", b"sbin/ping"]  # the link has its xattrs


def _linked_layers(rng: random.Random) -> list[list[TarMember]]:
    """Files and hardlinks to them (and to other links); above, replaced targets, whiteouts, more links."""
    def member(name: bytes, kind: str = REGULAR, target: bytes = b"") -> TarMember:
        return TarMember(name, kind, 0o644, 0, 0, 0, 0 if target else 1, target, 0, 0, (), 0, 512)

    layers = []
    for _layer in range(rng.choice((1, 2))):
        members, made = [], []
        for _ in range(rng.randrange(2, 20)):
            roll = rng.random()
            if made and roll < 0.4:
                name = b"h%d/l%d" % (rng.randrange(3), rng.randrange(30))
                members.append(member(name, HARDLINK, rng.choice(made)))
            elif layers and roll < 0.5:
                members.append(member(b"d%d/.wh.f%d" % (rng.randrange(3), rng.randrange(5))))
                continue
            else:
                name = b"d%d/f%d" % (rng.randrange(3), rng.randrange(5))
                kind = SYMLINK if rng.random() < 0.2 else REGULAR
                members.append(member(name, kind, b"x" if kind is SYMLINK else b""))
            made.append(name)
        layers.append(members)
    return layers


def test_hardlink_groups_and_their_counts_are_those_of_every_path():
    rng = random.Random(20)
    groups_seen = 0
    for _ in range(400):
        builder = _built(_linked_layers(rng))
        reached = Counter(builder.inode(node) for _path, node in builder.walk_sorted())
        groups = sorted(inode for inode, paths in reached.items() if paths > 1 and stat.S_ISREG(builder._mode[inode]))
        group_of, count = builder.hardlink_groups()
        assert count == len(groups)
        if builder._links:
            assert [group for group in group_of if group >= 0] == list(range(count))
            assert [inode for inode, group in enumerate(group_of) if group >= 0] == groups
        assert list(builder.link_counts(group_of, count)) == [reached[inode] for inode in groups]
        groups_seen += count
    assert groups_seen > 200
