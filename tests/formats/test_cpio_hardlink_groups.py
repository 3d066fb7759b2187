"""CpioStream's ``hardlink_groups``: hardlink keys that are dense group numbers, kept in arrays.

The output must not depend on how the groups are keyed, and every refusal of the keyed form
still holds (with the first link named, though its path is no longer kept)."""

from __future__ import annotations

import stat

import pytest

from qtbuild.formats.cpio import CpioArchive, CpioEntry, CpioStream, _with_link_counts
from qtbuild.formats.errors import CpioFormatError

REG, DIR = stat.S_IFREG, stat.S_IFDIR


def f(path: bytes, data: bytes = b"", *, key=None, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(path, REG | perm, size=len(data), data=data, hardlink_key=key)


def stream(entries: list[CpioEntry], groups: int) -> CpioStream:
    """The entries sorted, with the link counts a one-pass writer needs declared."""
    ordered = _with_link_counts(sorted(entries, key=lambda entry: entry.path))
    return CpioStream(lambda: iter(ordered), hardlink_groups=groups)


def written(entries: list[CpioEntry], groups: int) -> bytes:
    return b"".join(stream(entries, groups).chunks())


def keyed(keys: dict) -> list[CpioEntry]:
    return [CpioEntry(b"d", DIR | 0o755), f(b"d/a", b"one", key=keys["one"]), f(b"d/b", b"two", key=keys["two"]),
            f(b"c", b"plain"), f(b"z", b"one", key=keys["one"]), f(b"d/y", b"two", key=keys["two"]),
            f(b"d/x", b"one", key=keys["one"])]


def test_dense_groups_write_the_same_bytes_as_any_keys():
    by_name = b"".join(CpioArchive(keyed({"one": "first", "two": ("second",)})).chunks())
    dense = stream(keyed({"one": 1, "two": 0}), 2)
    assert b"".join(dense.chunks()) == by_name
    assert b"".join(dense.chunks()) == by_name  # a second pass rewinds the groups
    assert dense.size == len(by_name)


def test_unused_dense_group_numbers_are_fine():
    assert b"".join(stream(keyed({"one": 7, "two": 3}), 10).chunks()) == \
        b"".join(CpioArchive(keyed({"one": 1, "two": 2})).chunks())


@pytest.mark.parametrize("key", [2, -1, "0", True, 1.0])
def test_keys_outside_the_declared_groups_are_refused(key):
    with pytest.raises(CpioFormatError, match=r"cpio entry b'd/b': hardlink_key .* is not an int in range\(2\)"):
        written([CpioEntry(b"d", DIR | 0o755), f(b"d/a", b"x", key=0), f(b"d/b", b"x", key=key)], 2)


@pytest.mark.parametrize("groups", [-1, "3", 1.5])
def test_a_bad_group_count_is_refused(groups):
    with pytest.raises(CpioFormatError, match="hardlink_groups .* must be a non-negative integer"):
        stream([f(b"a")], groups)


@pytest.mark.parametrize("groups", [None, 1])
def test_an_inconsistent_group_still_names_its_first_link(groups):
    entries = [f(b"a", b"x", key=0), f(b"b", b"x", key=0), f(b"c", b"x", key=0, perm=0o600)]
    with pytest.raises(CpioFormatError, match=r"cpio entry b'c': hardlink of b'a' with a different mode"):
        written(entries, groups) if groups is not None else CpioArchive(entries)
