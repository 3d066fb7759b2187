"""The Docker daemon's save stream read as it arrives (qtbuild.sources.save_stream).

Crafted ``docker save`` streams, in the orders a daemon may send them (Docker 20.10 sorts members
by name, so layers come in a random order; podman names layers by diff_id), give the same config,
layers, manifest and flattened tree as the docker-archive source reading the same bytes from a
file; layers that arrive on time are not spilled; errors (diff_id mismatch, truncation, a daemon
error, Ctrl-C) leave no scratch file; nothing is written to $TMPDIR.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile

import pytest

from qtbuild.convert.flatten import flatten
from qtbuild.errors import ImageError
from qtbuild.sources import save_stream
from qtbuild.sources.archive import ArchiveImage
from qtbuild.sources.save_stream import SaveStreamImage

from helpers.imagefactory import (
    default_config,
    directory,
    file,
    image_contents,
    make_layer,
    symlink,
    write_docker_archive,
)

BOTTOM = make_layer([directory("etc"), file("etc/hostname", b"enclave\n"), file("etc/remove-me", b"x")])
MIDDLE = make_layer([file("data/big", bytes(range(256)) * 1200), symlink("data/link", "big"),
                     file("etc/.wh.remove-me")])
TOP = make_layer([file("etc/motd", b"hello\n", mode=0o600)])
LAYERS = [BOTTOM, MIDDLE, TOP]
CONFIG = default_config(cmd=["/bin/app"], workdir="/data")


def members_of(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(info, tar.extractfile(info).read() if info.isreg() else b"") for info in tar]  # type: ignore[union-attr]


def tar_of(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _layer_group(name: str, layer_dirs: list[str]) -> int:
    top = name.split("/")[0]
    return layer_dirs.index(top) if top in layer_dirs else len(layer_dirs)


def save_stream_bytes(tmp_path, order: str, layers=LAYERS) -> tuple[bytes, str]:
    """A legacy ``docker save`` of ``layers`` with its members in ``order``; returns (bytes, image ID).

    ``written``: layers bottom to top, then config, manifest.json; ``on-time``: config first, then
    the layers bottom to top (each arrives when it is needed); ``sorted``: by name,
    as Docker 20.10 sends it; ``reversed``: top layer first; ``config-last``: sorted, config at the
    very end; ``podman``: ``<diff_id hex>.tar`` layers, top first, config last.
    """
    path = tmp_path / f"written-{order}.tar"
    written = write_docker_archive(path, layers, CONFIG, layout="legacy", repo_tags=["app:1"])
    members = members_of(path.read_bytes())
    config_name = written.config_digest.removeprefix("sha256:") + ".json"
    layer_dirs = list(dict.fromkeys(info.name.split("/")[0] for info, _ in members if "/" in info.name))
    if order == "on-time":
        members.sort(key=lambda m: m[0].name != config_name)
    elif order == "sorted":
        members.sort(key=lambda m: m[0].name)
    elif order == "reversed":
        members.sort(key=lambda m: -_layer_group(m[0].name, layer_dirs))
    elif order == "config-last":
        members.sort(key=lambda m: (m[0].name == config_name, m[0].name))
    elif order == "podman":
        members = _podman(members, config_name)
    return tar_of(members), written.config_digest


def _podman(members, config_name: str):
    """containers/image's docker-archive: ``<diff_id hex>.tar`` layers, the manifest naming them."""
    import json

    layers, rest = [], []
    for info, data in members:
        if info.name.endswith("/layer.tar") and info.isreg():
            renamed = tarfile.TarInfo(hashlib.sha256(data).hexdigest() + ".tar")
            renamed.size = len(data)
            layers.append((renamed, data))
        elif info.name == "manifest.json":
            entry = json.loads(data)[0]
            entry["Layers"] = [hashlib.sha256(layer).hexdigest() + ".tar" for layer in LAYERS]
            manifest = json.dumps([entry]).encode()
            renamed = tarfile.TarInfo("manifest.json")
            renamed.size = len(manifest)
            rest.append((renamed, manifest))
        elif info.name == config_name:
            rest.insert(0, (info, data))
    return layers[::-1] + rest


def chunks_of(data: bytes, size: int = 8191):
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.fixture
def out(tmp_path, monkeypatch):
    """The output directory (scratch and spill go there) and an empty TMPDIR that must stay empty."""
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    directory = tmp_path / "out"
    directory.mkdir()
    yield directory
    assert not os.listdir(temp), "something was written to $TMPDIR"


def open_stream(data: bytes, image_id: str, out, chunks=None, **kwargs) -> SaveStreamImage:
    return SaveStreamImage(chunks if chunks is not None else chunks_of(data), image_id=image_id,
                           reference="docker://app:1", scratch_dir=str(out), **kwargs)


contents = image_contents


def flattened(image, spill_dir) -> list[tuple]:
    """Every entry of the flattened tree with its data (through flatten's own read paths)."""
    with flatten(image.layers(), spill_dir=str(spill_dir)) as tree:
        entries = []
        for entry in tree.iter_entries():
            data = entry.data
            if callable(data):
                with data() as stream:
                    data = stream.read()
            entries.append((entry.path, entry.mode, entry.size, entry.link_target, data))
        return entries


#: The diff_ids of LAYERS as the daemon's image inspect reports them (RootFS.Layers), before the save.
INSPECTED = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in LAYERS]


@pytest.mark.parametrize("inspected", [None, INSPECTED], ids=["config-first", "inspected-diff-ids"])
@pytest.mark.parametrize("order", ["written", "on-time", "sorted", "reversed", "config-last", "podman"])
def test_stream_gives_what_the_archive_gives(tmp_path, out, order, inspected):
    data, image_id = save_stream_bytes(tmp_path, order)
    (tmp_path / "saved.tar").write_bytes(data)
    with ArchiveImage(tmp_path / "saved.tar") as archive:
        expected = contents(archive), archive.manifest_bytes(), flattened(archive, tmp_path)
    with open_stream(data, image_id, out, diff_ids=inspected) as image:
        assert contents(image) == expected[0]
        assert image.manifest_bytes() == expected[1]
        assert image.manifest_synthesised
    with open_stream(data, image_id, out, diff_ids=inspected) as image:
        assert flattened(image, out) == expected[2]
        assert image.manifest_bytes() == expected[1]
        assert image.config_bytes() == expected[0][0]
    assert not os.listdir(out)


def test_layers_on_time_are_not_spilled_and_late_ones_are(tmp_path, out):
    data, image_id = save_stream_bytes(tmp_path, "on-time")
    with open_stream(data, image_id, out) as image:
        flattened(image, out)
        assert image._scratch is None  # every layer went straight from the stream to flatten
    data, image_id = save_stream_bytes(tmp_path, "reversed")
    with open_stream(data, image_id, out) as image:
        flattened(image, out)
        assert image._scratch is not None and image._scratch.size == len(BOTTOM) + len(MIDDLE)


def test_with_the_inspected_diff_ids_layers_before_the_config_are_not_spilled(tmp_path, out):
    data, image_id = save_stream_bytes(tmp_path, "written")  # the layers bottom to top, then the config
    with open_stream(data, image_id, out, diff_ids=INSPECTED) as image:
        flattened(image, out)
        assert image._scratch is None
    with open_stream(data, image_id, out) as image:  # without them, all comes before the config: all spilled
        flattened(image, out)
        assert image._scratch is not None and image._scratch.size == sum(map(len, LAYERS))


@pytest.mark.parametrize("inspected, message", [
    (INSPECTED[:2], "the saved config's rootfs.diff_ids are not the layers the daemon's image inspect reported "
                    "\\(3 and 2 layers, 0 differing\\)"),
    (INSPECTED[:2] + INSPECTED[1:2], "the saved config's rootfs.diff_ids are not the layers the daemon's image "
                                     "inspect reported \\(3 and 3 layers, 1 differing\\)"),
])
def test_config_disagreeing_with_the_inspected_diff_ids_is_refused(tmp_path, out, inspected, message):
    data, image_id = save_stream_bytes(tmp_path, "written")
    with pytest.raises(ImageError, match=message), open_stream(data, image_id, out, diff_ids=inspected) as image:
        flattened(image, out)
    assert not os.listdir(out)


def test_a_stream_without_its_config_is_refused_after_its_layers(tmp_path, out):
    data, image_id = save_stream_bytes(tmp_path, "written")
    config = image_id.removeprefix("sha256:") + ".json"
    members = [(info, body) for info, body in members_of(data) if info.name != config]
    with pytest.raises(ImageError, match=f"the save stream has no config {config}"), \
            open_stream(tar_of(members), image_id, out, diff_ids=INSPECTED) as image:
        flattened(image, out)
    assert not os.listdir(out)


def test_repeated_layer_is_served_each_time(tmp_path, out):
    layers = [BOTTOM, MIDDLE, BOTTOM]  # docker save stores the repeat as a symlink member
    for order in ("on-time", "sorted"):
        data, image_id = save_stream_bytes(tmp_path, order, layers)
        with open_stream(data, image_id, out) as image:
            assert contents(image)[2] == layers


def _corrupt_layer(data: bytes, layer: bytes) -> bytes:
    """The stream with one byte of ``layer``'s data changed (same size: only its digest is wrong)."""
    start = data.index(layer)
    return data[:start + 600] + bytes([data[start + 600] ^ 1]) + data[start + 601:]


@pytest.mark.parametrize("order, message", [
    ("on-time", "layer 2: diff_id mismatch, config says sha256:"),  # read live
    ("reversed", "the save stream holds no layer with diff_id sha256:.* \\(layer 2\\)"),  # spilled first
])
def test_diff_id_mismatch_is_an_error_and_leaves_nothing(tmp_path, out, order, message):
    data, image_id = save_stream_bytes(tmp_path, order)
    with pytest.raises(ImageError, match=message), open_stream(_corrupt_layer(data, MIDDLE), image_id, out) as image:
        flattened(image, out)
    assert not os.listdir(out)


def test_config_not_matching_the_image_id_is_refused(tmp_path, out):
    data, image_id = save_stream_bytes(tmp_path, "written")
    other = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match="manifest.json does not describe the one image sha256:0{64} that was saved"):
        open_stream(data, other, out)
    assert not os.listdir(out)


@pytest.mark.parametrize("order", ["on-time", "sorted"])
def test_truncated_stream_is_an_error_wherever_it_stops(tmp_path, out, order):
    data, image_id = save_stream_bytes(tmp_path, order)
    end = data.index(b"\0" * 1024, data.index(b"manifest.json"))  # the end-of-archive marker
    for cut in (700, data.index(MIDDLE) + 5000, data.index(TOP) + 10, end):
        with pytest.raises(ImageError, match="the save stream ended early"), \
                open_stream(data[:cut], image_id, out) as image:
            flattened(image, out)
        assert not os.listdir(out)


def test_daemon_error_mid_stream_is_reported_and_leaves_nothing(tmp_path, out):
    data, image_id = save_stream_bytes(tmp_path, "sorted")

    def failing():
        yield data[:len(data) // 2]
        raise ImageError("Docker daemon failed to save 'app:1': connection reset")

    with pytest.raises(ImageError, match="failed to save 'app:1': connection reset"), \
            open_stream(data, image_id, out, chunks=failing()) as image:
        flattened(image, out)
    assert not os.listdir(out)


def test_sdk_errors_while_streaming_become_image_errors():
    """The save through the Docker SDK (DOCKER_HOST with TLS or ssh://; the stdlib path is in test_docker_api)."""
    from urllib3.exceptions import ProtocolError

    from qtbuild.sources.daemon_request import _SdkDaemon

    class Api:
        def get_image(self, image_id, chunk_size):
            yield b"x" * 10
            raise ProtocolError("Connection broken: IncompleteRead(0 bytes read)")

    class Client:
        api = Api()
        closed = False

        def close(self):
            self.closed = True

    daemon = _SdkDaemon.__new__(_SdkDaemon)  # without connecting: the client is the stand-in
    daemon._client = client = Client()
    chunks = daemon.save("sha256:" + "1" * 64, "app:1", None)
    assert next(chunks) == b"x" * 10
    with pytest.raises(ImageError, match="Docker daemon failed to save 'app:1': ProtocolError"):
        next(chunks)
    assert client.closed


@pytest.mark.parametrize("interrupt_in", ["a spilled layer", "a live layer"])
def test_ctrl_c_leaves_no_scratch_or_spill_file(tmp_path, out, interrupt_in):
    data, image_id = save_stream_bytes(tmp_path, "reversed")  # config, top, middle (spilled), bottom (live)
    stop_at = data.index(BOTTOM if interrupt_in == "a live layer" else TOP) + 3000
    seen: list[list[str]] = []

    def interrupted():
        for start, chunk in zip(range(0, len(data), 1000), chunks_of(data, 1000), strict=True):
            seen.append(os.listdir(out))
            if start > stop_at:
                raise KeyboardInterrupt
            yield chunk

    with pytest.raises(KeyboardInterrupt), open_stream(data, image_id, out, chunks=interrupted()) as image:
        flattened(image, out)
    assert not os.listdir(out)
    assert seen and not any(seen[:3])  # interrupted while streaming, after the config


@pytest.mark.parametrize("layout", ["oci", "containerd"])
def test_oci_layout_streams_are_read_like_the_archive(tmp_path, out, layout):
    path = tmp_path / "saved.tar"
    written = write_docker_archive(path, LAYERS, CONFIG, layout=layout, repo_tags=["app:1"])
    image_id = written.config_digest
    with ArchiveImage(path) as archive:
        expected = contents(archive), archive.manifest_bytes()
    with open_stream(path.read_bytes(), image_id, out) as image:
        assert (contents(image), image.manifest_bytes()) == expected
        assert not image.manifest_synthesised
        assert len(os.listdir(out)) == 1  # the copy of the stream is beside the output
    assert not os.listdir(out)


def test_member_count_and_header_sizes_are_capped(tmp_path, out, monkeypatch):
    data, image_id = save_stream_bytes(tmp_path, "sorted")
    monkeypatch.setattr(save_stream, "MAX_MEMBERS", 5)
    with pytest.raises(ImageError, match="more than 5 members"), open_stream(data, image_id, out) as image:
        flattened(image, out)
    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "c" * (2 << 20)}
    huge = tar_of([(info, b"")])
    with pytest.raises(ImageError, match="tar header payload over"):
        open_stream(huge, image_id, out)
    assert not os.listdir(out)


def test_truncated_oci_layout_stream_leaves_nothing(tmp_path, out):
    path = tmp_path / "saved.tar"
    written = write_docker_archive(path, LAYERS, CONFIG, layout="oci", repo_tags=["app:1"])
    data = path.read_bytes()
    with pytest.raises(ImageError, match="the save stream ended early .* no end-of-archive marker"):
        open_stream(data[:len(data) // 2], written.config_digest, out)
    assert not os.listdir(out)


def test_config_whose_bytes_do_not_match_its_name_is_refused(tmp_path, out):
    data, image_id = save_stream_bytes(tmp_path, "on-time")
    start = data.index(b'"architecture"')
    tampered = data[:start] + b'"Architecture"' + data[start + len(b'"architecture"'):]
    with pytest.raises(ImageError, match=f"json has digest sha256:[0-9a-f]{{64}}, not the image ID {image_id}"):
        open_stream(tampered, image_id, out)
    assert not os.listdir(out)
