"""The flattened tree supplies the link counts the one-pass ramdisk writer needs up front: every
directory's subdirectories and every hardlink group's size, after whiteouts, replacements and
implicit parents.  The archive written from them must equal the one whose counts are counted
from its own entries."""

from __future__ import annotations

import stat

from test_flatten import M, layers_of

from qtbuild.convert.flatten import flatten
from qtbuild.convert.ramdisk import customer_ramdisk
from qtbuild.formats.launch_record import Launch

LAUNCH = Launch(["/bin/app"], ["PATH=/bin"])


def written(archive) -> bytes:
    return b"".join(archive.chunks())


def test_the_trees_link_counts_give_the_counted_archive():
    lower = [M("etc/", "dir"), M("etc/a/", "dir"), M("etc/a/b/", "dir"), M("etc/a-b/", "dir"), M("etc/a.c", data=b"x"),
             M("usr/lib/x/y/z", data=b"implicit parents"), M("gone/", "dir"), M("gone/sub/", "dir"),
             M("dev", data=b"a file where a mount point goes"), M("tmp/", "dir", mode=0o1777),
             M("data/one", data=b"linked"), M("data/two", "hardlink", target="data/one"),
             M("etc/three", "hardlink", target="data/one"), M("old", data=b"old"), M("old2", "hardlink", target="old")]
    upper = [M(".wh.gone"), M("etc/a/.wh.b"), M("etc/a/new/", "dir"), M("usr/.wh..wh..opq"), M("usr/bin/", "dir"),
             M("old", data=b"replaced: old2 keeps the old inode alone"), M("more/", "dir"),
             M("more/four", "hardlink", target="data/two")]
    with flatten(layers_of(lower, upper, in_place=True)) as tree:
        assert tree.hardlink_groups == 1
        one_pass = customer_ramdisk(tree, LAUNCH)
        assert one_pass.size is None
        data = written(one_pass)
        # The same entries with no counts given: CpioArchive counts them from the whole list.
        counted = customer_ramdisk([entry._replace(nlink=None) for entry in tree.entries()], LAUNCH)
        assert data == written(counted)
        assert one_pass.size == counted.size == len(data)
        entries = {entry.path: entry for entry in tree.entries()}
    assert entries[b"etc"].nlink == 2 + 2  # etc/a, etc/a-b
    assert entries[b"etc/a"].nlink == 2 + 1  # b whited out, new added
    assert entries[b"usr"].nlink == 2 + 1  # opaque: only bin is left
    assert entries[b"data/one"].nlink == entries[b"more/four"].nlink == 4
    assert entries[b"old2"].nlink is None and stat.S_ISREG(entries[b"old2"].mode)  # no longer a group


def test_rootfs_counts_the_mount_points_it_adds():
    with flatten(layers_of([M("tmp/", "dir"), M("run", data=b"not a directory"), M("srv/", "dir")],
                           in_place=True)) as tree:
        assert tree.top_directories() == 2
        data = written(customer_ramdisk(tree, LAUNCH))
        assert data == written(customer_ramdisk([entry._replace(nlink=None) for entry in tree.entries()], LAUNCH))
