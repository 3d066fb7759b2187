"""Hostile layers: every one is refused with an ImageError naming the problem, or (symlinked
parents) confined to the tree; nothing is written outside the spill directory, which is removed.

Malicious headers are hand-crafted (``header``/``pax``/``member`` below) where tarfile would not
write them.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from hypothesis import given
from test_flatten import BytesLayer, M, build_tar, flat, layers_of

from qtbuild.convert.flatten import FlattenLimits, flatten
from qtbuild.convert.tarscan import TarLimits, TarScanner
from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioArchive

from helpers import mutated

POSIX = b"ustar\x0000"
GNU = b"ustar  \x00"
END = bytes(1024)


def header(name: bytes = b"f", size: int = 0, typeflag: bytes = b"0", *, linkname: bytes = b"",
           mode: int = 0o644, magic: bytes = POSIX, prefix: bytes = b"", size_field: bytes | None = None,
           uid: int = 0, checksum: int | None = None, devmajor: int = 0) -> bytes:
    """One 512-byte header with a correct checksum (unless ``checksum`` is given)."""
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"%07o\0" % uid
    block[116:124] = b"%07o\0" % 0
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_600_000_000
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157:257] = linkname[:100].ljust(100, b"\0")
    block[257:265] = magic
    block[329:337] = b"%07o\0" % devmajor
    block[345:500] = prefix.ljust(155, b"\0")
    total = sum(block) if checksum is None else checksum
    block[148:156] = b"%06o\0 " % total
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", **kw) -> bytes:
    return header(name, len(data), typeflag, **kw) + pad(data)


def pax_records(records: dict[bytes, bytes]) -> bytes:
    out = b""
    for key, value in records.items():
        body = b" " + key + b"=" + value + b"\n"
        length = len(body) + 1
        while length != len(body) + len(str(length)):
            length = len(body) + len(str(length))
        out += str(length).encode() + body
    return out


def pax(records: dict[bytes, bytes], typeflag: bytes = b"x") -> bytes:
    return member(b"PaxHeader", pax_records(records), typeflag)


def refused(tar: bytes, *match: str, limits: FlattenLimits | None = None, tmp_path=None,
            in_place: bool = False) -> str:
    """Flatten a spilled layer holding ``tar`` after a harmless one; return the error message."""
    layers = [BytesLayer(build_tar([M("ok", data=b"ok" * 100)])), BytesLayer(tar, in_place)]
    with pytest.raises(ImageError) as caught:
        flatten(layers, limits=limits or FlattenLimits(), spill_dir=str(tmp_path) if tmp_path else None).close()
    message = str(caught.value)
    assert message.startswith("layer 2 (sha256:"), message
    for fragment in match:
        assert fragment in message, message
    if tmp_path is not None:
        assert os.listdir(tmp_path) == []
    return message


def test_pax_record_helper_round_trips():
    from qtbuild.convert.tarscan import parse_pax_records

    records = {b"path": b"a" * 5, b"size": b"1" * 95, b"k": b"v" * 1000}
    assert parse_pax_records(pax_records(records), 0) == records


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, problem", [
    (b"../x", "'..' component"),
    (b"a/../../x", "'..' component"),
    (b"a/..", "'..' component"),
    (b"/etc/passwd", "absolute member name"),
    (b"/", "absolute member name"),
])
def test_escaping_member_names(name, problem, tmp_path):
    message = refused(member(name, b"evil") + END, problem, tmp_path=tmp_path)
    assert f"member {name.decode()!r}" in message


def test_nul_in_name(tmp_path):
    refused(pax({b"path": b"a\0b"}) + member(b"a", b"x") + END, "NUL byte in the member name", tmp_path=tmp_path)


def test_name_and_link_target_over_4095_bytes(tmp_path):
    refused(pax({b"path": b"a/" * 2048}) + member(b"x") + END, "name of 4096 bytes exceeds 4095", tmp_path=tmp_path)
    refused(pax({b"linkpath": b"t" * 4096}) + member(b"s", typeflag=b"2") + END, "link target of 4096 bytes")


def test_component_over_255_bytes():
    refused(pax({b"path": b"d/" + b"n" * 256}) + member(b"x") + END, "component of 256 bytes exceeds 255")


def test_4095_byte_name_is_accepted():
    name = b"/".join([b"d" * 255] * 16)[:4095]
    tar = pax({b"path": name}) + member(b"x", b"ok") + END
    with flatten([BytesLayer(tar)]) as tree:
        assert tree.entries()[-1].path == name


# --------------------------------------------------------------------------------------------
# Symlinked parents, loops, hardlinks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "../../..", "../../../../../../../../etc/..", "/../../..//"])
def test_parent_symlink_escape_lands_inside_the_tree(target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = flat([M("a", kind="symlink", target=target)],
                  [M("a/etc/passwd", data=b"pwned"), M("a/a/tmp/x", data=b"x")], spill_dir=str(tmp_path))
    assert result["etc/passwd"] == ("file", 0o644, b"pwned")
    assert result["tmp/x"] == ("file", 0o644, b"x")
    assert os.listdir(tmp_path) == []


def test_parent_symlink_in_same_layer():
    result = flat([M("a", kind="symlink", target="../x"), M("a/f", data=b"f")])
    assert result["x/f"] == ("file", 0o644, b"f")


def test_symlink_loops(tmp_path):
    refused(build_tar([M("a", kind="symlink", target="b"), M("b", kind="symlink", target="a"),
                       M("a/x", data=b"x")]), "too many levels of symbolic links", "'a/x'", tmp_path=tmp_path)
    refused(build_tar([M("s", kind="symlink", target="./s"), M("s/x", data=b"x")]), "ELOOP")


def test_symlink_hop_limit_is_40():
    chain = [M("d/"), M("l40", kind="symlink", target="d")]
    chain += [M(f"l{i}", kind="symlink", target=f"l{i + 1}") for i in range(40)]
    result = flat(chain + [M("l1/ok", data=b"")])  # 40 hops
    assert "d/ok" in result
    refused(build_tar(chain + [M("l0/x", data=b"")]), "too many levels")  # 41 hops


@pytest.mark.parametrize("target, problem", [
    ("missing", "does not exist"),
    ("dir/missing", "does not exist"),
    ("dir", "is a directory"),
    ("../etc/passwd", "'..' component in hardlink target"),
    ("/etc/passwd", "absolute hardlink target"),
    ("file/x", "does not exist"),
    ("later", "does not exist"),
])
def test_bad_hardlinks(target, problem, tmp_path):
    tar = build_tar([M("dir/"), M("file", data=b"f"), M("h", kind="hardlink", target=target), M("later", data=b"")])
    refused(tar, problem, "'h'", tmp_path=tmp_path)


def test_hardlink_through_symlinked_parent_stays_inside():
    result = flat([M("etc/passwd", data=b"p"), M("up", kind="symlink", target="../../..")],
                  [M("h", kind="hardlink", target="up/etc/passwd")])
    assert result["h"] == ("file", 0o644, b"p")


# --------------------------------------------------------------------------------------------
# Whiteouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, problem", [
    (b".wh.", "bare whiteout"),
    (b"a/.wh.", "bare whiteout"),
    (b".wh..", "escapes its directory"),
    (b".wh...", "escapes its directory"),
    (b"a/.wh...", "escapes its directory"),
    (b"a/.wh.../x", "whiteout name is used as a directory"),
    (b".wh.a/b", "whiteout name is used as a directory"),
])
def test_whiteouts_escaping_their_directory(name, problem, tmp_path):
    refused(member(name) + END, problem, tmp_path=tmp_path)


def test_whiteout_through_symlinked_parent_stays_inside():
    result = flat([M("etc/passwd", data=b"p"), M("etc/group", data=b"g"), M("up", kind="symlink", target="/")],
                  [M("up/etc/.wh.passwd")])
    assert "etc/passwd" not in result and "etc/group" in result


# --------------------------------------------------------------------------------------------
# Bombs and caps
# --------------------------------------------------------------------------------------------


def test_entry_cap(tmp_path):
    tar = build_tar([M(f"f{i}", data=b"") for i in range(20)])
    refused(tar, "more than 10 entries", limits=FlattenLimits(max_entries=10), tmp_path=tmp_path)


def test_implicit_directories_count_towards_the_entry_cap():
    tar = build_tar([M("a/" * 30 + "f", data=b"")])
    refused(tar, "more than 10 entries", limits=FlattenLimits(max_entries=10))


def test_path_resolution_work_cap():
    deep = "/".join(["a"] * 100)
    tar = build_tar([M(deep + "/"), M("s", kind="symlink", target=deep)] + [M(f"s/f{i}", data=b"") for i in range(50)])
    refused(tar, "more than 2000 steps", limits=FlattenLimits(max_path_steps=2000))


def test_total_bytes_cap_refuses_declared_size_before_reading(tmp_path):
    tar = header(b"big", 10 << 20) + bytes(10 << 20) + END
    refused(tar, "would exceed the limit of 4194304 bytes", limits=FlattenLimits(max_total_bytes=4 << 20),
            tmp_path=tmp_path)


def test_total_bytes_cap_counts_trailing_garbage():
    tar = member(b"small", b"x") + END + bytes(3 << 20)
    refused(tar, "more than 2097152 bytes", limits=FlattenLimits(max_total_bytes=2 << 20))


def test_file_of_4_gib_is_refused_before_reading():
    tar = header(b"huge", size_field=b"%011o\0" % (1 << 32))
    refused(tar, "file of 4294967296 bytes is too large")


def test_oversized_pax_header(tmp_path):
    refused(header(b"PaxHeader", 2 << 20, b"x") + bytes(512), "PAX extended header", "declares 2097152 bytes",
            tmp_path=tmp_path)
    refused(header(b"PaxHeader", 5000, b"g") + bytes(5120), "PAX global header",
            limits=FlattenLimits(max_pax_header=4096))


def test_oversized_gnu_long_name(tmp_path):
    refused(header(b"././@LongLink", 9000, b"L", magic=GNU) + bytes(9216), "GNU long name", "declares 9000",
            tmp_path=tmp_path)
    refused(header(b"././@LongLink", 9000, b"K", magic=GNU) + bytes(9216), "GNU long link name")


def test_huge_meta_header_is_refused_before_reading_it():
    stream = io.BytesIO(header(b"PaxHeader", size_field=b"\x80" + (1 << 80).to_bytes(11, "big"), typeflag=b"x"))
    with pytest.raises(ImageError, match="declares 1208925819614629174706176 bytes"):
        list(TarScanner(stream, limits=TarLimits()))
    assert stream.tell() == 512


# --------------------------------------------------------------------------------------------
# Parser disagreements (CVE-2025-62518 family)
# --------------------------------------------------------------------------------------------


def test_pax_size_disagreeing_with_ustar_size(tmp_path):
    smuggled = member(b"etc/shadow", b"smuggled")
    outer = header(b"innocent", len(smuggled)) + smuggled
    refused(pax({b"size": b"0"}) + outer + END, "PAX size 0 disagrees with the ustar size field 1024",
            tmp_path=tmp_path)
    refused(pax({b"size": b"1024"}) + header(b"innocent", 0) + smuggled + END, "disagrees")


def test_pax_size_equal_to_ustar_size_is_fine():
    tar = pax({b"size": b"3"}) + member(b"f", b"abc") + END
    with flatten([BytesLayer(tar)]) as tree:
        [entry] = tree.entries()
        assert entry.data().read() == b"abc"


@pytest.mark.parametrize("tar, problem", [
    (pax({b"path": b"a"}) + pax({b"path": b"b"}) + member(b"c") + END, "follows another extended header"),
    (member(b"././@LongLink", b"a\0", b"L", magic=GNU) + pax({b"path": b"b"}) + member(b"c") + END,
     "follows another extended header"),
    (pax({b"path": b"b"}) + member(b"././@LongLink", b"a\0", b"L", magic=GNU) + member(b"c") + END,
     "mixes with a PAX header"),
    (member(b"././@LongLink", b"a\0", b"L", magic=GNU) * 2 + member(b"c") + END, "repeats"),
    (member(b"././@LongLink", b"a\0b\0", b"L", magic=GNU) + member(b"c") + END, "NUL byte inside the name"),
    (pax({b"path": b"evil"}, b"g") + member(b"c") + END, "sets 'path'"),
    (pax({b"size": b"0"}, b"g") + member(b"c") + END, "sets 'size'"),
    (pax({b"size": b"+3"}) + member(b"f", b"abc") + END, "not a non-negative decimal"),
    (member(b"PaxHeader", b"5 a=b\nxx", b"x") + member(b"c") + END, "PAX header"),
    (member(b"PaxHeader", b"6 a=b\n6 a=c\n", b"x") + member(b"c") + END, "duplicate key"),
    (member(b"f", b"", prefix=b"evil", magic=b"\0" * 8) + END, "non-empty prefix field"),
    (member(b"a", b"x") + bytes(512) + member(b"b", b"y") + END, "followed by a non-zero block"),
    (member(b"h", b"data", b"1", linkname=b"a") + END, "declares 4 data bytes"),
    (member(b"d/", b"data", b"5") + END, "declares 4 data bytes"),
], ids=["pax-pax", "gnu-pax", "pax-gnu", "gnu-gnu", "gnu-nul", "global-path", "global-size", "pax-number",
        "pax-record", "pax-duplicate", "v7-prefix", "lone-zero-block", "hardlink-data", "dir-data"])
def test_ambiguous_headers_are_refused(tar, problem, tmp_path):
    refused(tar, problem, tmp_path=tmp_path)


def test_global_header_without_structural_keys_is_ignored():
    tar = pax({b"comment": b"git commit", b"mtime": b"5"}, b"g") + member(b"f", b"x") + END
    with flatten([BytesLayer(tar)]) as tree:
        assert [e.mtime for e in tree.entries()] == [1_600_000_000]


def test_gnu_long_link_and_ustar_prefix_are_honoured():
    tar = (member(b"././@LongLink", b"t" * 300 + b"\0", b"K", magic=GNU)
           + member(b"s", typeflag=b"2", magic=GNU)
           + member(b"name", b"x", prefix=b"some/prefix") + END)
    with flatten([BytesLayer(tar)]) as tree:
        by_path = {e.path: e for e in tree.entries()}
    assert by_path[b"s"].link_target == b"t" * 300
    assert b"some/prefix/name" in by_path


# --------------------------------------------------------------------------------------------
# Malformed streams
# --------------------------------------------------------------------------------------------


def test_sparse_members(tmp_path):
    refused(member(b"sparse", b"", b"S", magic=GNU) + END, "sparse files are not supported", tmp_path=tmp_path)
    refused(pax({b"GNU.sparse.major": b"1", b"GNU.sparse.minor": b"0"}) + member(b"f") + END, "sparse")


@pytest.mark.parametrize("cut", [100, 600, 1000, 1536 + 10])
def test_truncated_tar(cut, tmp_path):
    tar = member(b"a", b"x" * 1000) + member(b"b", b"y") + END
    refused(tar[:cut], "truncated archive", tmp_path=tmp_path)


def test_truncated_after_extended_header():
    refused(pax({b"path": b"a"}), "right after extended headers")


def test_bad_checksum_number_and_typeflag(tmp_path):
    refused(header(b"a", checksum=12345) + END, "checksum mismatch", tmp_path=tmp_path)
    refused(header(b"a", size_field=b"12345678901\0".replace(b"9", b"z")) + END, "not an octal number")
    refused(header(b"a", 0, b"V") + END, "unsupported tar typeflag b'V'")


def test_device_number_out_of_range():
    block = bytearray(header(b"dev", 0, b"3"))
    block[329:337] = b"\x80" + (1 << 40).to_bytes(7, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    refused(bytes(block) + END, "devmajor 1099511627776 does not fit 32 bits")


def test_end_markers_and_trailing_garbage_are_fine():
    for tail in (END + b"garbage" * 1000, bytes(512), b""):
        with flatten([BytesLayer(member(b"f", b"x") + tail)]) as tree:
            assert [e.path for e in tree.entries()] == [b"f"]


def test_refusal_in_later_layer_removes_the_spill_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spill = tmp_path / "spill"
    spill.mkdir()
    layers = layers_of([M("a", data=os.urandom(100_000))], [M("b", kind="hardlink", target="nope")])
    with pytest.raises(ImageError, match="layer 2 .*member 'b'"):
        flatten(layers, spill_dir=str(spill))
    assert os.listdir(spill) == []
    assert sorted(os.listdir(tmp_path)) == ["spill"]


@given(mutated([
    build_tar([M("d/"), M("d/f", data=b"x" * 700), M("l", kind="symlink", target="d"),
               M("h", kind="hardlink", target="d/f"), M("l/.wh.f")]),
    build_tar([M("a" * 120 + "/b", data=b"long", pax={"SCHILY.xattr.user.x": "1"})], tarfile.GNU_FORMAT),
    pax({b"path": b"p", b"mtime": b"1.5"}) + member(b"x", b"abc") + END,
]))
def test_mutated_layers_flatten_or_raise_image_error(tar):
    try:
        with flatten([BytesLayer(tar)]) as tree:
            for entry in tree.entries():
                if entry.data is not None:
                    assert len(entry.data().read()) == entry.size
            CpioArchive(tree.entries())  # whatever flatten accepts, the cpio writer accepts
    except ImageError:
        pass
