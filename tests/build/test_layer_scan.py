"""Layers scanned at once: LayerScan hand-over, the byte budget's per-layer shares, spill
segments, and the tree builder's parent-walk shortcut (issue 16, flatten phase)."""

from __future__ import annotations

import io
import os
import threading
import time

import pytest
from test_flatten import BytesLayer, M, build_tar, flat
from test_hostile_layers import END, header

from qtbuild.convert.flatten import FlattenLimits, flatten
from qtbuild.convert.layer_scan import BATCH_MEMBERS, LayerScan
from qtbuild.convert.spill import SpillStore
from qtbuild.convert.tarscan import ByteBudget, TarFormatError, TarLimits, TarScanner, _byte_sum
from qtbuild.convert.verify_ahead import VerifyAhead
from qtbuild.errors import ImageError

# --------------------------------------------------------------------------------------------
# ByteBudget shares: the layer refused does not depend on which thread reads first
# --------------------------------------------------------------------------------------------


def _in_thread(call) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            call()
            outcome.append("ok")
        except TarFormatError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _higher_waits_then_fails(higher_call, lower_bytes: int) -> None:
    """``higher_call(higher)`` must wait while layer 1 is being read, and fail once layer 1 was
    read with ``lower_bytes`` (under the limit of 100 on its own: never layer 1's fault)."""
    budget = ByteBudget(100)
    lower, higher = budget.share(0), budget.share(1)
    thread, outcome = _in_thread(lambda: higher_call(higher))
    time.sleep(0.2)
    assert outcome == []  # the lower layer may still fail first: wait for it
    lower.charge(lower_bytes)
    lower.finish(read=True)
    thread.join(5)
    assert outcome and "more than 100 bytes" in outcome[0]


def test_a_higher_layer_over_the_limit_waits_for_the_lower_layers_then_fails():
    _higher_waits_then_fails(lambda higher: higher.charge(150), 10)


def test_a_higher_layer_read_early_is_refused_at_its_end_when_the_lower_layers_grow():
    def read_early(higher):
        higher.charge(60)  # 60 of 100 so far: passes
        higher.finish(read=True)  # layers 1..2 end with 110 bytes: refused, as one after another

    _higher_waits_then_fails(read_early, 50)


def test_a_failed_lower_layer_releases_the_higher_ones():
    budget = ByteBudget(100)
    lower, higher = budget.share(0), budget.share(1)
    thread, outcome = _in_thread(lambda: higher.check(500, "member 'x'"))
    lower.finish(read=False)
    thread.join(5)
    assert outcome and "would exceed the limit of 100 bytes" in outcome[0]


def test_the_budget_used_directly_counts_streams_one_after_another():
    budget = ByteBudget(100)
    budget.charge(60)
    assert budget.fits(40) and not budget.fits(41)
    with pytest.raises(TarFormatError, match="would exceed"):
        budget.check(41, "member 'x'")
    with pytest.raises(TarFormatError, match="more than 100 bytes"):
        budget.charge(41)


# --------------------------------------------------------------------------------------------
# LayerScan
# --------------------------------------------------------------------------------------------


def _scan(tar: bytes, budget: ByteBudget | None = None, **kw) -> LayerScan:
    return LayerScan(lambda: io.BytesIO(tar), limits=TarLimits(), budget=(budget or ByteBudget(1 << 30)).share(0),
                     **kw)


def test_members_come_in_order_in_batches_with_every_byte_counted():
    count = BATCH_MEMBERS * 2 + 7
    tar = build_tar([M(f"f{i:05d}", data=b"x" * (i % 3)) for i in range(count)])
    scan = _scan(tar)
    batches = list(scan.batches())
    names = [member.name for members, _ in batches for member in members]
    assert names == [f"f{i:05d}".encode() for i in range(count)]
    assert max(len(members) for members, _ in batches) == BATCH_MEMBERS
    assert sum(read for _, read in batches) == len(tar)
    assert scan.length == len(tar)  # one read took it all: the end marker's chunk counts whole
    scan.close()


def test_the_error_comes_after_the_members_read_before_it():
    good = build_tar([M("a", data=b"1"), M("b", data=b"2")])
    truncated = good[:1024] + b"\x01" + good[1025:]  # member b's header is corrupt
    scan = _scan(truncated)
    names = []
    with pytest.raises(TarFormatError, match="checksum mismatch"):
        for members, _ in scan.batches():
            names += [member.name for member in members]
    assert names == [b"a"]
    scan.close()


def test_tee_gets_the_stream_and_close_stops_a_worker_nobody_reads_from():
    tar = build_tar([M(f"d/f{i}", data=os.urandom(100)) for i in range(BATCH_MEMBERS * 40)])
    copied = bytearray()
    scan = _scan(tar, tee=copied.extend, depth=1)
    deadline = time.monotonic() + 10
    while not copied and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the worker fills its queue and waits
    scan.close()
    assert not scan._worker.is_alive()
    assert 0 < len(copied) < len(tar)


# --------------------------------------------------------------------------------------------
# Spill segments
# --------------------------------------------------------------------------------------------


class _EndSeen(io.BytesIO):
    """A stream read 8 KiB at a time that records when its reader reached the end."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.at_end = threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(8192 if size is None or size < 0 else min(size, 8192))
        if not chunk:
            self.at_end.set()
        return chunk


def test_progress_alone_does_not_stop_a_layer_read_ahead(monkeypatch):
    # Large files, few members: before, every BATCH_BYTES read was a batch that waited for room,
    # so a layer above the one being applied stopped after `depth` of them (layer 3 of the
    # benchmark image: 32 MiB of 644) and was inflated only once its turn came.
    monkeypatch.setattr("qtbuild.convert.layer_scan.BATCH_BYTES", 4096)
    tar = build_tar([M(f"big{i}", data=os.urandom(20_000)) for i in range(20)])
    stream = _EndSeen(tar)
    scan = LayerScan(lambda: stream, limits=TarLimits(), budget=ByteBudget(1 << 30).share(0), depth=2)
    try:
        assert stream.at_end.wait(10), "the worker stopped before the end of the layer"
        batches = list(scan.batches())
        assert [m.name for members, _ in batches for m in members] == [f"big{i}".encode() for i in range(20)]
        assert sum(read for _, read in batches) == len(tar)
    finally:
        scan.close()


def test_a_layer_ahead_still_stops_at_depth_full_batches_of_members():
    tar = build_tar([M(f"f{i:05d}") for i in range(BATCH_MEMBERS * 3 + 1)])
    stream = _EndSeen(tar)
    scan = LayerScan(lambda: stream, limits=TarLimits(), budget=ByteBudget(1 << 30).share(0), depth=1)
    try:
        assert not stream.at_end.wait(0.5), "the worker read past its bound of members"
        assert sum(len(members) for members, _ in scan.batches()) == BATCH_MEMBERS * 3 + 1
    finally:
        scan.close()


def test_segments_have_their_own_offsets_and_go_with_the_store(tmp_path):
    store = SpillStore(str(tmp_path))
    first, second = store.segment(), store.segment()
    assert os.listdir(tmp_path) == []  # nothing on disk before the first append
    first.append(b"first")
    second.append(b"second!")
    first.flush()
    second.flush()
    assert first.open_range(0, 5).read() == b"first"
    assert second.open_range(0, 7).read() == b"second!"
    assert store.total_size == 12 and store.size == 0
    with pytest.raises(ValueError, match="outside the spill store"):
        first.open_range(1, 5)
    store.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="spill store is closed"):
        second.append(b"late")


# --------------------------------------------------------------------------------------------
# flatten with layers scanned at once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["spill", "in-place"])
def test_budget_attribution_does_not_depend_on_the_layer_read_first(in_place):
    # The small bottom layer is read slowly; the big second layer alone exceeds the limit.
    class Slow(BytesLayer):
        def open_uncompressed(self):
            time.sleep(0.3)
            return super().open_uncompressed()

    layers = [Slow(build_tar([M("ok", data=b"ok")])), BytesLayer(build_tar([M("big", data=bytes(3 << 20))]), in_place)]
    with pytest.raises(ImageError) as caught:
        flatten(layers, limits=FlattenLimits(max_total_bytes=2 << 20)).close()
    assert str(caught.value).startswith("layer 2 ")


def test_a_parent_replaced_by_a_symlink_is_walked_again():
    # d/x creates directory d; d then becomes a symlink to e: d/y goes to e/y, not the old d.
    tree = flat([M("e/"), M("d/x", data=b"1"), M("d", kind="symlink", target="e"), M("d/y", data=b"2")])
    assert tree["e/y"] == ("file", 0o644, b"2")
    assert tree["d"] == ("symlink", "e") and "d/x" not in tree


def test_a_parent_replaced_by_a_file_is_not_a_directory_any_more():
    with pytest.raises(ImageError, match="parent 'p' is not a directory"):
        flat([M("p/x"), M("p", data=b"file"), M("p/y")])


def test_a_parent_removed_by_a_whiteout_is_created_again():
    tree = flat([M("d/old", data=b"0")], [M("d/.wh..wh..opq"), M("d/new", data=b"1")])
    assert "d/old" not in tree and tree["d/new"] == ("file", 0o644, b"1")


def test_layers_read_in_place_are_verified_largest_first():
    opened = []

    class Recording(BytesLayer):
        def open_uncompressed(self):
            opened.append(len(self._tar))
            return super().open_uncompressed()

    layers = {index: Recording(build_tar([M("f", data=bytes(size))])) for index, size in enumerate([10, 50000, 3000])}
    with VerifyAhead(layers, workers=1) as verifier:
        for index in layers:
            verifier.result(index)
    assert opened == sorted(opened, reverse=True)


# --------------------------------------------------------------------------------------------
# Header fast paths refuse exactly what the general rules refuse
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", [b"0 00644\0", b"+0000644", b"0000_644", b"0o000644", b"00006\t44", b"000064 4"])
def test_octal_fields_with_anything_but_padded_digits_are_refused(field):
    block = bytearray(header(b"a"))
    block[100:108] = field  # mode
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    with pytest.raises(TarFormatError, match="field mode is not an octal number"):
        list(TarScanner(io.BytesIO(bytes(block) + END)))


@pytest.mark.parametrize("field, value", [(b"0000644\0", 0o644), (b"  644 \0\0", 0o644), (b"\0\0\0\0\0\0\0\0", 0),
                                          (b"\x80\0\0\0\0\0\x01\xa4", 0o644)])
def test_octal_and_base_256_fields_accepted(field, value):
    block = bytearray(header(b"a"))
    block[100:108] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    (member,) = TarScanner(io.BytesIO(bytes(block) + END))
    assert member.mode == value & 0o7777


def test_the_header_byte_sum_is_exact_for_any_bytes():
    for block in [bytes(512), b"\xff" * 512, os.urandom(512), bytes(range(256)) * 2]:
        assert _byte_sum(block) == sum(block)


# The tree builder reuses the last parent walk while members share their parent path; a member
# that replaces or removes an entry on that walk (here the symlink d/s -> ".", walked through by
# d/s/...) must make the next member walk again.


def test_a_symlink_on_the_parent_walk_replaced_by_a_directory():
    tree = flat([M("d/"), M("d/s", kind="symlink", target="."), M("d/s/a", data=b"1"),
                 M("d/s/s/"), M("d/s/z", data=b"2")])
    assert tree["d/a"] == ("file", 0o644, b"1")  # through the symlink, before it was replaced
    assert tree["d/s"] == ("dir", 0o755) and tree["d/s/z"] == ("file", 0o644, b"2")
    assert "d/z" not in tree


def test_a_symlink_on_the_parent_walk_removed_by_a_whiteout():
    tree = flat([M("d/"), M("d/s", kind="symlink", target=".")],
                [M("d/s/a", data=b"1"), M("d/s/.wh.s"), M("d/s/z", data=b"2")])
    assert tree["d/a"] == ("file", 0o644, b"1")
    assert tree["d/s"] == ("dir", 0o755) and tree["d/s/z"] == ("file", 0o644, b"2")
