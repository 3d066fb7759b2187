"""Small compressed layers kept in memory from the first pass (measure): same bytes, bounded memory."""

from __future__ import annotations

import gzip
import os

import pytest

from qtbuild.convert import kept_layers, reread
from qtbuild.convert.flatten import flatten
from qtbuild.convert.kept_layers import KeptLayer, gzip_size_hint, plan_kept
from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioStream
from qtbuild.runtime.sandbox import cgroups
from qtbuild.sources.open import open_image


def _ramdisk(tree) -> bytes:
    return b"".join(CpioStream(tree.iter_entries).chunks())


def _two_layers(tmp_path, compression: str = "gzip") -> str:
    from helpers.imagefactory import default_config, file, hardlink, make_tar, write_oci_layout

    lower = make_tar([file("usr/lib/a.py", b"x" * 5000), file("usr/lib/big", os.urandom(3 << 20)),
                      file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), file("gone", b"g" * 70000)]
                     + [file(f"many/{index}", os.urandom(index * 37)) for index in range(200)])
    upper = make_tar([file("usr/lib/a.py", b"new"), file(".wh.gone"), hardlink("link", "etc/passwd"),
                      file("b", os.urandom(300_000))])
    write_oci_layout(tmp_path / "img", [lower, upper], default_config(), compression=compression)
    return f"oci:{tmp_path / 'img'}"


def _spilled_ramdisk(source: str, tmp_path) -> bytes:
    with open_image(source, platform=None) as image, flatten(image.layers(), spill_dir=str(tmp_path)) as tree:
        return _ramdisk(tree)


class _NoReinflate:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a kept layer was inflated again")


def test_small_layers_are_served_from_memory_not_inflated_again(tmp_path, monkeypatch):
    source = _two_layers(tmp_path)
    expected = _spilled_ramdisk(source, tmp_path)
    with open_image(source, platform=None) as image, flatten(image.layers(), reread=True) as tree:
        assert tree._rereaders == [] and tree.spill_bytes == 0
        monkeypatch.setattr(reread, "BlobTarStream", _NoReinflate)
        monkeypatch.setattr(reread, "_VerifiedStream", _NoReinflate)
        for layer in image.layers():  # the blobs are not read again: what is written is what was verified
            blob = tmp_path / "img" / "blobs" / "sha256" / layer.descriptor.digest.split(":")[1]
            blob.write_bytes(b"changed")
        assert _ramdisk(tree) == expected
        assert _ramdisk(tree) == expected  # a second pass too
        tree.verify_rereads()
    assert os.listdir(tmp_path) == ["img"]


def test_layers_are_kept_bottom_first_while_they_fit_the_budget(tmp_path, monkeypatch):
    source = _two_layers(tmp_path)
    expected = _spilled_ramdisk(source, tmp_path)
    with open_image(source, platform=None) as image:
        lower, upper = image.layers()
        sizes = [gzip_size_hint(layer.reread_opener()) for layer in (lower, upper)]
        assert all(sizes) and sizes[0] > sizes[1]
        monkeypatch.setattr(kept_layers, "KEEP_BUDGET", sizes[0])  # room for the bottom layer only
        with flatten([lower, upper], reread=True) as tree:
            [rereader] = tree._rereaders
            assert rereader._what.startswith("layer 2")
            assert _ramdisk(tree) == expected
            tree.verify_rereads()


def test_a_layer_longer_than_its_gzip_trailer_says_is_re_read(tmp_path, monkeypatch):
    """The trailer is only a hint (a multi-member gzip states its last member's length): a layer
    that outgrows its reservation drops what it kept, and is inflated again."""
    source = _two_layers(tmp_path)
    expected = _spilled_ramdisk(source, tmp_path)
    monkeypatch.setattr(kept_layers, "gzip_size_hint", lambda blob: 100_000)
    with open_image(source, platform=None) as image, flatten(image.layers(), reread=True) as tree:
        assert len(tree._rereaders) == 2
        assert _ramdisk(tree) == expected
        tree.verify_rereads()


def test_layers_not_in_gzip_are_re_read(tmp_path):
    source = _two_layers(tmp_path, compression="zstd")
    with open_image(source, platform=None) as image:
        assert [gzip_size_hint(layer.reread_opener()) for layer in image.layers()] == [None, None]
        with flatten(image.layers(), reread=True) as tree:
            assert len(tree._rereaders) == 2


def test_gzip_size_hint_reads_the_trailer_of_a_blob_inside_a_bigger_file(tmp_path):
    from qtbuild.sources.local_blob import LocalBlob

    data = os.urandom(5000)
    blob = gzip.compress(data)
    path = tmp_path / "archive"
    path.write_bytes(b"head" + blob + b"tail")
    local = LocalBlob(str(path), 4, len(blob), "sha256:x", "layer 1", lambda: None)  # type: ignore[arg-type,return-value]
    assert gzip_size_hint(local) == len(data)
    plan = plan_kept({0: local, 1: local}, budget=len(data) + 10)
    assert list(plan) == [0]


def test_a_kept_layer_serves_ranges_across_its_chunks():
    data = os.urandom(10_000)
    kept = KeptLayer(len(data))
    for start in range(0, len(data), 999):
        kept.append(data[start:start + 999])
    assert kept.whole and kept.length == len(data)
    for offset, size in ((0, 0), (0, 999), (998, 2), (500, 5000), (9000, 1000), (0, 10_000)):
        with kept.open_range(offset, size) as stream:
            assert stream.read(size + 1) == data[offset:offset + size]
            assert stream.read(1) == b""
        buffer = bytearray(size + 7)
        with kept.open_range(offset, size) as stream:
            filled = 0
            while got := stream.readinto(memoryview(buffer)[filled:filled + 300]):
                filled += got
        assert bytes(buffer[:filled]) == data[offset:offset + size]
        with kept.open_range(offset, size) as stream:  # the writer's one-step read: the rest, no copy
            assert stream.read(3) == data[offset:offset + min(size, 3)]
            rest = stream.read_view()
            assert isinstance(rest, memoryview) and rest == data[offset + 3:offset + size]
            assert stream.read() == b"" and stream.read_view() == b""
        with pytest.raises(ValueError, match="closed"):
            stream.read_view()
    with pytest.raises(ImageError, match="outside"):
        kept.open_range(9000, 1001)


def test_a_kept_layers_files_are_written_from_views_of_its_chunks(tmp_path, monkeypatch):
    """measure's small files reach the archive in one read_view each, never through readinto."""
    from qtbuild.convert.kept_layers import _ViewStream

    source = _two_layers(tmp_path)
    expected = _spilled_ramdisk(source, tmp_path)
    views = []
    read_view = _ViewStream.read_view
    monkeypatch.setattr(_ViewStream, "read_view", lambda stream: views.append(1) or read_view(stream))
    monkeypatch.setattr(_ViewStream, "readinto", None)
    with open_image(source, platform=None) as image, flatten(image.layers(), reread=True) as tree:
        assert _ramdisk(tree) == expected
    assert len(views) > 200


def test_a_kept_layer_over_its_limit_keeps_nothing_but_counts_the_stream():
    kept = KeptLayer(1000)
    kept.append(b"a" * 600)
    kept.append(b"b" * 600)
    kept.append(b"c" * 10)
    assert not kept.whole and kept.length == 1210 and kept._chunks == []
    with pytest.raises(ImageError):
        kept.open_range(0, 10)


def test_the_budget_is_a_share_of_the_machine_memory_at_most(monkeypatch):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(kept_layers, "cgroup_memory_limit", lambda: None)
    assert kept_layers.keep_budget() == min(kept_layers.KEEP_BUDGET, physical // kept_layers.KEEP_SHARE)
    monkeypatch.setattr(kept_layers, "KEEP_SHARE", physical)  # a machine of 1 byte per 16 ...
    assert kept_layers.keep_budget() == 1
    assert plan_kept({0: object()}) == {}  # ... and a layer whose blob is no local file is never kept


@pytest.mark.parametrize("version", [1, 2])
def test_the_budget_is_a_share_of_the_cgroup_memory_limit_at_most(tmp_path, monkeypatch, version):
    """In a container limited to 1 GiB on a large machine, 64 MiB are kept at most, not 128."""
    proc = tmp_path / "cgroup"
    if version == 1:
        proc.write_text("5:devices:/\n4:memory:/box/one\n1:cpu:/\n")
        limit = tmp_path / "memory" / "box" / "one" / "memory.limit_in_bytes"
    else:
        proc.write_text("0::/box/one\n")
        limit = tmp_path / "box" / "one" / "memory.max"
    limit.parent.mkdir(parents=True)
    limit.write_text(f"{1 << 30}\n")
    monkeypatch.setattr(cgroups, "PROC_SELF_CGROUP", str(proc))
    monkeypatch.setattr(kept_layers, "_CGROUP_ROOT", str(tmp_path))
    assert kept_layers.cgroup_memory_limit() == 1 << 30
    assert kept_layers.keep_budget() == min(kept_layers.KEEP_BUDGET, (1 << 30) // 16)
    limit.write_text("max\n")  # no limit: the machine's memory decides
    assert kept_layers.cgroup_memory_limit() is None
