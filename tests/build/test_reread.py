"""Re-reading compressed layers instead of spilling them (measure): same bytes, bounded cost."""

from __future__ import annotations

import io
import os
import time

import pytest

from qtbuild.convert import kept_layers, reread
from qtbuild.convert.flatten import flatten
from qtbuild.convert.reread import LayerRereader, Stash
from qtbuild.convert.spill import SpillStore
from qtbuild.errors import ImageError
from qtbuild.formats.cpio import CpioStream
from qtbuild.sources.open import open_image


@pytest.fixture(autouse=True)
def _no_kept_layers(monkeypatch):
    """These tests are about re-reading: no layer is kept from the first pass (tests/build/test_kept_layers.py)."""
    monkeypatch.setattr(kept_layers, "KEEP_BUDGET", 0)


class _Source:
    """A layer stream to re-read: counts how often it was opened."""

    def __init__(self, data: bytes):
        self.data, self.opened = data, 0

    def __call__(self):
        self.opened += 1
        return io.BytesIO(self.data)


def _reader(source: _Source, needed, tmp_path, stash_limit: int = 32 << 20) -> LayerRereader:
    return LayerRereader(source, len(source.data), sorted(needed), Stash(stash_limit), SpillStore(str(tmp_path)),
                         "layer 1")


def _read(reader: LayerRereader, offset: int, size: int) -> bytes:
    with reader.open_range(offset, size) as stream:
        return stream.read(size + 1)


def test_out_of_order_files_come_from_the_stash_without_reopening(tmp_path):
    data = os.urandom(3 << 20)
    files = [(0, 1000), (1 << 20, 5000), (2 << 20, 7000)]
    source = _Source(data)
    reader = _reader(source, files, tmp_path)
    for offset, size in (files[2], files[0], files[1]):  # a member archived after its successors
        assert _read(reader, offset, size) == data[offset:offset + size]
    assert source.opened == 1
    reader.finish()


def test_a_file_behind_every_cursor_opens_a_new_one_when_not_stashed(tmp_path):
    data = os.urandom(2 << 20)
    source = _Source(data)
    reader = _reader(source, [(100, 10), (1 << 20, 10)], tmp_path, stash_limit=0)
    assert _read(reader, 1 << 20, 10) == data[1 << 20:(1 << 20) + 10]
    assert _read(reader, 100, 10) == data[100:110]  # nothing stashed (no room): a second decompression
    assert source.opened == 2
    reader.close_cursors()


def test_an_adversarial_order_falls_back_to_the_spill_store(tmp_path, monkeypatch):
    monkeypatch.setattr(reread, "REINFLATE_FACTOR", 1)
    monkeypatch.setattr(reread, "REINFLATE_ALLOWANCE", 0)
    data = os.urandom(4 << 20)
    files = [(i << 19, 100) for i in range(8)]
    source = _Source(data)
    spill = SpillStore(str(tmp_path))
    reader = LayerRereader(source, len(data), files, Stash(0), spill, "layer 1")
    for offset, size in reversed(files * 40):
        assert _read(reader, offset, size) == data[offset:offset + size]
    assert spill.size == len(data)  # spilled once, then served from there
    assert source.opened <= 3
    spill.close()


def test_a_blob_shorter_on_the_second_read_is_an_error(tmp_path):
    source = _Source(os.urandom(1000))
    reader = _reader(source, [], tmp_path)
    source.data = source.data[:500]
    with pytest.raises(ImageError, match="second read of the layer ended at 500"):
        reader.open_range(800, 100)


def _ramdisk(tree) -> bytes:
    return b"".join(CpioStream(tree.iter_entries).chunks())


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_reread_gives_the_bytes_the_spill_gives(tmp_path, compression):
    """Members archived out of bytewise order, a whiteout, a hardlink, a replaced file."""
    from helpers.imagefactory import default_config, file, hardlink, make_tar, write_oci_layout

    big = os.urandom(3 << 20)
    lower = make_tar([file("usr/lib/python3/x.py", b"x" * 5000), file("usr/lib/python3-dev/y", big),
                      file("usr/lib/python3.11", b"z" * 100), file("etc/passwd", b"root:x:0:0::/:/bin/sh\n"),
                      file("gone", b"g" * 70000)])
    upper = make_tar([file("usr/lib/python3/x.py", b"new"), file(".wh.gone"), hardlink("link", "etc/passwd"),
                      file("b", os.urandom(300_000)), file("a", os.urandom(200_000))])
    write_oci_layout(tmp_path / "img", [lower, upper], default_config(), compression=compression)
    with open_image(f"oci:{tmp_path / 'img'}", platform=None) as image:
        with flatten(image.layers(), spill_dir=str(tmp_path)) as spilled:
            assert spilled.spill_bytes > 0
            expected = _ramdisk(spilled)
        with flatten(image.layers(), spill_dir=str(tmp_path), reread=True) as reread_tree:
            assert reread_tree.spill_bytes == 0
            assert _ramdisk(reread_tree) == expected
            assert _ramdisk(reread_tree) == expected  # a second pass re-reads again
            reread_tree.verify_rereads()
    assert os.listdir(tmp_path) == ["img"]


def test_a_blob_changed_after_the_first_pass_fails_verify_rereads(tmp_path):
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    # files read one by one (not with the blocks read to the stream's end): the changed byte is found
    # by the digest, not by the inflater
    layer = make_tar([file("a", os.urandom(reread.SMALL + 100_000)), file("z", os.urandom(reread.SMALL + 100_000))])
    write_oci_layout(tmp_path / "img", [layer], default_config(), compression="gzip")
    with open_image(f"oci:{tmp_path / 'img'}", platform=None) as image:
        [stored] = image.layers()
        with flatten([stored], reread=True) as tree:
            blob = tmp_path / "img" / "blobs" / "sha256" / stored.descriptor.digest.split(":")[1]
            content = bytearray(blob.read_bytes())
            content[-9] ^= 1  # the gzip trailer: the data still inflates, the digest differs
            blob.write_bytes(bytes(content))
            with pytest.raises(ImageError, match="digest mismatch"):  # during the pass or after it
                _ramdisk(tree)
                tree.verify_rereads()


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_layer_read_in_place_is_still_verified(tmp_path, where):
    """Uncompressed layers are scanned from the blob while a worker verifies them: a tampered blob
    fails with its digest error, also when the tampering breaks the tar headers first."""
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    layer = make_tar([file("a", b"A" * 4096), file("b", b"B" * 4096)])
    write_oci_layout(tmp_path / "img", [layer, make_tar([file("c", b"c")])], default_config(), compression=None)
    with open_image(f"oci:{tmp_path / 'img'}", platform=None) as image:
        stored = image.layers()[0]
        assert stored.range_opener() is not None
        blob = tmp_path / "img" / "blobs" / "sha256" / stored.descriptor.digest.split(":")[1]
        content = bytearray(blob.read_bytes())
        content[1024 if where == "data" else 4608] ^= 1  # a's data, or b's name (its header checksum)
        blob.write_bytes(bytes(content))
        with pytest.raises(ImageError, match="digest mismatch"):
            flatten(image.layers())


# -- local blobs: re-inflated by a worker, proven unchanged by the file's identity when settled ---------


def _gzip_layout(tmp_path, files):
    from helpers.imagefactory import default_config, file, make_tar, write_oci_layout

    write_oci_layout(tmp_path / "img", [make_tar([file(name, data) for name, data in files])], default_config(),
                     compression="gzip")
    return f"oci:{tmp_path / 'img'}"


def _blob_path(tmp_path, layer):
    return tmp_path / "img" / "blobs" / "sha256" / layer.descriptor.digest.split(":")[1]


@pytest.fixture
def settled(monkeypatch):
    """Blobs count as settled however recently written (the tests write them just before)."""
    from qtbuild.sources import local_blob

    monkeypatch.setattr(local_blob, "SETTLE_NS", -(10**12))


def test_a_settled_blob_is_read_again_without_hashing_it(tmp_path, settled, monkeypatch):
    from qtbuild.convert import reinflate

    data = {"a": os.urandom(300_000), "b": os.urandom(200_000)}
    source = _gzip_layout(tmp_path, data.items())

    def no_sha256(*args):
        raise AssertionError("a settled blob was hashed again")

    with open_image(source, platform=None) as image:
        [layer] = image.layers()
        with flatten([layer], reread=True) as tree:
            monkeypatch.setattr(reinflate.hashlib, "sha256", no_sha256)
            for name, content in data.items():
                with tree.get(name.encode()).data() as stream:
                    assert stream.read(len(content) + 1) == content
            tree.verify_rereads()


@pytest.mark.parametrize("change", ["rewrite", "replace", "chmod"])
def test_a_settled_blob_changed_between_the_passes_is_an_error(tmp_path, settled, change):
    """In place, by rename, or only its metadata: the file is no longer the one the first pass
    verified, and nothing hashes it again to tell (ImageError from the read or from verify_rereads)."""
    source = _gzip_layout(tmp_path, [("a", os.urandom(100_000)), ("z", os.urandom(100_000))])
    with open_image(source, platform=None) as image:
        [layer] = image.layers()
        with flatten([layer], reread=True) as tree:
            blob = _blob_path(tmp_path, layer)
            content = blob.read_bytes()
            if change == "rewrite":
                blob.write_bytes(content)  # the same bytes: still a write
            elif change == "replace":
                (tmp_path / "copy").write_bytes(content)
                os.replace(tmp_path / "copy", blob)
            else:
                blob.chmod(0o600)
            with pytest.raises(ImageError, match="was modified or replaced between the passes"):
                _ramdisk(tree)
                tree.verify_rereads()


def test_a_blob_changed_during_the_second_pass_fails_verify_rereads(tmp_path, settled):
    source = _gzip_layout(tmp_path, [("a", os.urandom(100_000)), ("z", os.urandom(100_000))])
    with open_image(source, platform=None) as image:
        [layer] = image.layers()
        with flatten([layer], reread=True) as tree:
            with tree.get(b"a").data() as stream:
                stream.read()
            blob = _blob_path(tmp_path, layer)
            blob.write_bytes(blob.read_bytes())
            with pytest.raises(ImageError, match="was modified or replaced between the passes"):
                tree.verify_rereads()


def test_an_unsettled_blob_is_hashed_again_and_its_corruption_reported(tmp_path):
    """A blob changed within a timestamp tick of the stamp could keep its identity: it is hashed."""
    source = _gzip_layout(tmp_path, [("a", os.urandom(100_000)), ("z", os.urandom(100_000))])
    with open_image(source, platform=None) as image:
        [layer] = image.layers()
        with flatten([layer], reread=True) as tree:
            assert not layer.reread_opener().settled  # written just now
            blob = _blob_path(tmp_path, layer)
            content = bytearray(blob.read_bytes())
            content[len(content) // 2] ^= 0xFF  # inside the deflate data
            blob.write_bytes(bytes(content))
            with pytest.raises(ImageError, match="corrupt gzip data|digest mismatch"):
                _ramdisk(tree)
                tree.verify_rereads()


def test_the_worker_runs_a_bounded_distance_ahead(tmp_path):
    """However big the layer, a cursor's worker inflates at most DEPTH batches ahead of the reader."""
    data = os.urandom(64 << 20)
    files = [(i << 20, 1 << 20) for i in range(64)]
    reader = _reader(_Source(data), files, tmp_path, stash_limit=0)
    with reader.open_range(0, 1 << 20) as stream:
        assert stream.read(10) == data[:10]
        import time
        time.sleep(0.3)
        assert reader.inflated <= (reread.DEPTH + 2) * max(reread.BATCH, reread.CHUNK)
    reader.close_cursors()


def test_a_stream_closed_early_leaves_the_next_files_intact(tmp_path):
    data = os.urandom(3 << 20)
    files = [(0, 2 << 20), ((2 << 20) + 512, 4096), ((2 << 20) + 8192, 100_000)]
    source = _Source(data)
    reader = _reader(source, files, tmp_path, stash_limit=0)
    with reader.open_range(*files[0]) as stream:
        assert stream.read(5) == data[:5]  # the rest of this file is left unread
    buffer = bytearray(4096)
    with reader.open_range(*files[1]) as stream:
        assert stream.readinto(buffer) == 4096
    assert bytes(buffer) == data[files[1][0]:files[1][0] + 4096]
    with reader.open_range(*files[2]) as stream:
        assert stream.read() == data[files[2][0]:files[2][0] + 100_000]
        assert stream.read(1) == b""
    assert source.opened == 1
    assert _read(reader, *files[0]) == data[:2 << 20]  # read again: a new decompression
    assert source.opened == 2
    reader.finish()


def test_one_read_returns_the_whole_file_however_it_was_cut(tmp_path):
    """read(n) is not short before the end (launch_config reads /etc/passwd with one read): a file
    larger than the worker's pieces is joined, a smaller request is cut."""
    data = os.urandom(3 << 20)
    files = [(512, (2 << 20) + 4096), ((2 << 20) + 5120, 70_000)]
    reader = _reader(_Source(data), files, tmp_path)
    with reader.open_range(*files[0]) as stream:
        assert stream.read(100) == data[512:612]
        assert stream.read((2 << 20) + 4096) == data[612:512 + (2 << 20) + 4096]
        assert stream.read(1) == b""
    with reader.open_range(*files[1]) as stream:
        assert stream.read(None) == data[files[1][0]:files[1][0] + 70_000]
    with pytest.raises(ValueError):
        stream.read(1)
    reader.finish()


@pytest.mark.parametrize("compression", ["gzip", "zstd", None])
@pytest.mark.parametrize("is_settled", [True, False])
def test_a_blob_inside_a_bigger_file_reads_as_its_tar_stream(tmp_path, monkeypatch, compression, is_settled):
    """As in a docker-archive: the blob lies at an offset of the file (multi-member gzip here)."""
    import hashlib

    from qtbuild.convert.reinflate import BlobTarStream
    from qtbuild.sources import local_blob
    from qtbuild.sources.local_blob import LocalBlob

    from helpers.imagefactory import compress

    monkeypatch.setattr(local_blob, "SETTLE_NS", -(10**12) if is_settled else 10**12)
    tar = os.urandom(3 << 20)
    blob = compress(tar, compression, parts=2)
    path = tmp_path / "archive.tar"
    path.write_bytes(b"h" * 1536 + blob + b"t" * 1024)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    stamped = LocalBlob(str(path), 1536, len(blob), digest, "layer 1", lambda: io.BytesIO(tar))
    assert stamped.settled is is_settled
    stream = BlobTarStream(stamped)
    try:
        assert stream.read(100) == tar[:100]
        assert stream.read(5 << 20) == tar[100:]
        assert stream.read(1) == b""
        stream.finish(lambda: False)
    finally:
        stream.close()


def test_readinto_fills_buffers_of_any_size_across_pieces(tmp_path):
    """How the cpio writer reads: readinto slices of a ring buffer, not aligned to the pieces."""
    data = os.urandom(4 << 20)
    files = [(1000, (2 << 20) + 500_000), ((3 << 20), 12345)]
    reader = _reader(_Source(data), files, tmp_path)
    for offset, size in files:
        out = bytearray()
        buffer = memoryview(bytearray(700_001))
        with reader.open_range(offset, size) as stream:
            while got := stream.readinto(buffer[:700_001 - len(out) % 3]):
                out += buffer[:got]
        assert bytes(out) == data[offset:offset + size]
    reader.finish()


@pytest.mark.parametrize("seed", range(4))
def test_small_files_cut_from_blocks_and_large_ones_read_as_pieces_give_every_byte(tmp_path, seed):
    """Ranges of every size around SMALL, BLOCK and CHUNK, close together or far apart, starting in
    the block read ahead or beyond it: each file's bytes, in the pieces the reader expects."""
    import random

    rng = random.Random(seed)
    sizes = [1, 511, 4096, reread.SMALL - 1, reread.SMALL, reread.BLOCK - 700, reread.BLOCK + 3, reread.CHUNK + 9]
    gaps = [0, 512, 1024, reread.BLOCK - 1, reread.BLOCK, reread.BLOCK + 512, reread.CHUNK + 1]
    files, position = [], rng.choice(gaps)
    for _ in range(60):
        size = rng.choice(sizes)
        files.append((position, size))
        position += size + rng.choice(gaps)
    data = os.urandom(position + 1024)
    source = _Source(data)
    reader = _reader(source, files, tmp_path, stash_limit=0)
    pieces: list[int] = []
    for offset, size in files:
        with reader.open_range(offset, size) as stream:
            got = b""
            while chunk := stream.read(reread.CHUNK):
                got += chunk
                pieces.append(len(chunk))
        assert got == data[offset:offset + size], (offset, size)
    assert source.opened == 1
    assert max(pieces) <= reread.CHUNK
    reader.finish()


def test_a_blob_shorter_on_the_second_read_within_a_block_is_an_error(tmp_path):
    source = _Source(os.urandom(10_000))
    reader = _reader(source, [(100, 50), (9_000, 500)], tmp_path)
    source.data = source.data[:9_200]
    with pytest.raises(ImageError, match="second read of the layer ended at 9200 bytes, before offset 9500"):
        _read(reader, 100, 50)
        _read(reader, 9_000, 500)
    reader.close_cursors()


def test_mid_sized_files_are_inflated_in_reads_of_a_block_not_one_read_each(tmp_path):
    """Files of some tens of KiB (most of the benchmark's middle layer) come from reads of BLOCK
    bytes: each read waits for the GIL once, so a read per file made the worker wait more than work."""

    class CountingSource(_Source):
        def __call__(self):
            self.opened += 1
            stream = io.BytesIO(self.data)
            original = stream.read

            def read(n=-1):
                reads.append(n)
                return original(n)

            stream.read = read  # type: ignore[method-assign]
            return stream

    reads: list[int] = []
    size, step = 80_000, 80_000 + 512
    data = os.urandom(step * 40)
    files = [(i * step + 512, size) for i in range(40)]
    reader = _reader(CountingSource(data), files, tmp_path)
    for offset, length in files:
        assert _read(reader, offset, length) == data[offset:offset + length]
    reader.close_cursors()
    assert len(reads) <= len(data) // reread.BLOCK + 2, reads


def test_a_settled_layer_inflates_before_its_first_file_is_asked_for(tmp_path, settled):
    """flatten(reread=True) starts every settled layer's worker at once, so a layer whose files come
    last in the archive inflates while the others are written; what it read ahead is served."""
    data = {"a": os.urandom(300_000), "b": os.urandom(2_000)}
    source = _gzip_layout(tmp_path, data.items())
    with open_image(source, platform=None) as image:
        [layer] = image.layers()
        with flatten([layer], reread=True) as tree:
            [rereader] = tree._rereaders
            deadline = time.monotonic() + 10
            while rereader.inflated < 300_000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert rereader.inflated >= 300_000  # no file asked for yet
            for name, content in data.items():
                with tree.get(name.encode()).data() as stream:
                    assert stream.read(len(content) + 1) == content
            tree.verify_rereads()


def test_an_unsettled_layer_is_not_read_before_its_files_are_asked_for(tmp_path):
    """Its second read is proven by hashing what it reads: read at once, a change made before the
    files are asked for would go unnoticed (test_an_unsettled_blob_is_hashed_again_...)."""
    source = _gzip_layout(tmp_path, [("a", os.urandom(100_000))])
    with open_image(source, platform=None) as image, flatten(image.layers(), reread=True) as tree:
        time.sleep(0.1)
        assert [rereader.inflated for rereader in tree._rereaders] == [0]


def test_small_files_are_handed_over_as_views_of_their_block_and_read_as_bytes(tmp_path):
    """The worker cuts files under SMALL out of its blocks without copying them (the cpio writer
    copies each once, into its ring); ``read`` still returns ``bytes``, ``readinto`` fills from the view."""
    data = os.urandom(3 << 20)
    files = [(512 + i * 80_384, 79_872) for i in range(30)]
    reader = _reader(_Source(data), files, tmp_path)
    with reader.open_range(*files[0]) as stream:
        cursor = reader._cursors[0]
        assert cursor.peek() == 0
        assert type(cursor._batch[cursor._taken][1]) is memoryview
        assert type(stream.read()) is bytes
    buffer = bytearray(files[1][1])
    with reader.open_range(*files[1]) as stream:
        assert stream.readinto(buffer) == len(buffer)
    assert bytes(buffer) == data[files[1][0]:files[1][0] + files[1][1]]
    for offset, size in files[2:]:
        assert _read(reader, offset, size) == data[offset:offset + size]
    reader.finish()


def test_views_count_the_blocks_they_keep_so_sparse_small_files_stay_bounded(tmp_path):
    """One tiny file in each block read: a batch of views holds a whole block per file, so it is
    handed over (and the worker stops DEPTH batches ahead) by the blocks held, not the files' bytes."""
    step = reread.BLOCK + 4096
    data = os.urandom(48 * step)
    files = [(i * step, 100) for i in range(48)]
    reader = _reader(_Source(data), files, tmp_path, stash_limit=0)
    with reader.open_range(*files[0]) as stream:
        assert stream.read(10) == data[:10]
        time.sleep(0.3)
        assert reader.inflated <= (reread.DEPTH + 3) * step
    reader.close_cursors()


def test_stashed_files_do_not_keep_their_blocks(tmp_path):
    data = os.urandom(2 << 20)
    files = [(1000, 5000), (9000, 7000), (20_000, 3000)]
    stash = Stash()
    reader = LayerRereader(_Source(data), len(data), files, stash, SpillStore(str(tmp_path)), "layer 1")
    assert _read(reader, *files[2]) == data[20_000:23_000]  # the two before are stashed on the way
    assert [type(kept) for kept in stash._data.values()] == [bytes, bytes]
    for offset, size in files[:2]:
        assert _read(reader, offset, size) == data[offset:offset + size]
    reader.finish()
