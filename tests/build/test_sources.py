"""Image sources: docker-archive (3 layouts), OCI layout, daemon, and open_image dispatch.

Images are synthesised with imagefactory; cross-checks use real tools where installed (skopeo,
the Docker daemon).  Daemon tests skip when no daemon answers, unless CI is set: then they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid

import pytest

from qtbuild.errors import ImageError
from qtbuild.sources.archive import ArchiveImage, TarIndex
from qtbuild.sources.base import Platform
from qtbuild.sources.layout import LayoutImage
from qtbuild.sources.open import open_image
from qtbuild.sources.select import normalize_reference

from helpers.imagefactory import (
    ImageSpec,
    TarMember,
    default_config,
    directory,
    file,
    hardlink,
    image_contents,
    make_layer,
    make_tar,
    sha256_digest,
    symlink,
    write_docker_archive,
    write_docker_archive_images,
    write_oci_layout,
)

LAYER_A = make_layer([directory("etc"), file("etc/hostname", b"enclave\n"),
                      file("bin/app", os.urandom(40_000), mode=0o755)])
LAYER_B = make_layer([file("data/big", bytes(300_000)), symlink("data/link", "big")])
LAYERS = [LAYER_A, LAYER_B, LAYER_A]  # a repeated layer, as `COPY` of identical content makes
CONFIG = default_config(cmd=["/bin/app"], env=["PATH=/bin", "A=1"], workdir="/data", user="1000:1000")
ARM64 = Platform.parse("linux/arm64")
AMD64 = Platform.parse("linux/amd64")


contents = image_contents


def read_all(image) -> None:
    for layer in image.layers():
        with layer.open_uncompressed() as stream:
            while stream.read(1 << 20):
                pass


# -- docker-archive ---------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["legacy", "oci", "containerd"])
def test_archive_layouts_yield_config_and_layers(tmp_path, layout):
    path = tmp_path / "app.tar"
    written = write_docker_archive(path, LAYERS, CONFIG, layout=layout)
    with ArchiveImage(path) as image:
        config_bytes, diff_ids, layers = contents(image)
        assert config_bytes == written.config_bytes
        assert diff_ids == written.diff_ids == [sha256_digest(layer) for layer in LAYERS]
        assert layers == LAYERS
        assert image.image_id == written.config_digest
        assert image.config()["config"]["WorkingDir"] == "/data"
        if written.manifest_bytes is not None:
            assert image.manifest_bytes() == written.manifest_bytes
        assert image.reference == f"docker-archive:{path}"


def test_legacy_archive_synthesises_a_deterministic_manifest(tmp_path):
    written = write_docker_archive(tmp_path / "a.tar", LAYERS, CONFIG, layout="legacy")
    with ArchiveImage(tmp_path / "a.tar") as first, ArchiveImage(tmp_path / "a.tar") as second:
        manifest = json.loads(first.manifest_bytes())
        assert first.manifest_bytes() == second.manifest_bytes()
    assert manifest["config"] == {"mediaType": "application/vnd.oci.image.config.v1+json",
                                  "digest": written.config_digest, "size": len(written.config_bytes)}
    assert [layer["digest"] for layer in manifest["layers"]] == written.diff_ids
    assert {layer["mediaType"] for layer in manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar"}


def test_legacy_archive_duplicate_layer_is_a_symlink_member(tmp_path):
    path = tmp_path / "a.tar"
    write_docker_archive(path, LAYERS, CONFIG, layout="legacy", symlink_duplicates=True)
    kinds = {m.name: m.kind for m in TarIndex(path).members.values()}
    assert sorted(kinds.values()).count("symlink") == 1
    with ArchiveImage(path) as image:
        assert contents(image)[2][2] == LAYER_A


def test_legacy_archive_with_compressed_layer_members(tmp_path):
    """docker load accepts gzip layer.tar members; their digest is then hashed from the member."""
    from helpers.imagefactory import compress

    path = tmp_path / "a.tar"
    config_bytes = json.dumps(dict(CONFIG, rootfs={"type": "layers", "diff_ids": [sha256_digest(LAYER_A)]})).encode()
    make = [file("l1/layer.tar", compress(LAYER_A, "gzip")), file("c.json", config_bytes),
            file("manifest.json",
                 json.dumps([{"Config": "c.json", "RepoTags": None, "Layers": ["l1/layer.tar"]}]).encode())]
    path.write_bytes(make_tar(make))
    with ArchiveImage(path) as image:
        assert contents(image)[2] == [LAYER_A]
        assert image.layers()[0].descriptor.digest == sha256_digest(compress(LAYER_A, "gzip"))
        assert image.layers()[0].range_opener() is None


@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_archive_range_opener_reads_uncompressed_layers_in_place(tmp_path, layout):
    path = tmp_path / "a.tar"
    write_docker_archive(path, LAYERS, CONFIG, layout=layout)
    with ArchiveImage(path) as image:
        layer = image.layers()[1]
        read_all(image)
        opener = layer.range_opener()
        with opener(512, 100) as f:
            assert f.read() == LAYER_B[512:612]


def test_containerd_archive_platforms(tmp_path):
    path = tmp_path / "a.tar"
    written = write_docker_archive(path, LAYERS, CONFIG, layout="containerd")
    with ArchiveImage(path, platform=AMD64) as image:  # skips the attestation manifest
        assert image.config_bytes() == written.config_bytes
    # The nested index also names linux/s390x, whose blobs the archive does not hold:
    wanted = r"no image for linux/s390x; available: linux/amd64 \(not included: linux/s390x\)"
    with pytest.raises(ImageError, match=wanted):
        ArchiveImage(path, platform=Platform.parse("linux/s390x"))
    with pytest.raises(ImageError, match="no image for linux/arm64; available: linux/amd64"):
        ArchiveImage(path, platform=ARM64)


def test_containerd_archive_without_platform_takes_the_image_it_holds(tmp_path):
    """An arm64 machine's `docker save`: the index names amd64 too, but only arm64 is there."""
    path = tmp_path / "a.tar"
    written = write_docker_archive(path, LAYERS, default_config(arch="arm64"), layout="containerd")
    with ArchiveImage(path) as image:
        assert image.config_bytes() == written.config_bytes


def test_compressed_archive_is_refused_with_advice(tmp_path):
    import gzip

    path = tmp_path / "a.tar.gz"
    write_docker_archive(tmp_path / "a.tar", LAYERS, CONFIG)
    path.write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    with pytest.raises(ImageError, match="gzip-compressed; .*decompress it first"):
        ArchiveImage(path)


@pytest.mark.parametrize("layout", ["legacy", "oci", "containerd"])
def test_archive_with_several_images_needs_a_name(tmp_path, layout):
    path = tmp_path / "multi.tar"
    other = default_config(cmd=["/other"])
    written = write_docker_archive_images(path, [ImageSpec(LAYERS, CONFIG, ["app:1"]),
                                                 ImageSpec([LAYER_B], other, ["registry.example/team/other:2"])],
                                          layout=layout)
    with pytest.raises(ImageError, match=r"several images|holds 2 images") as info:
        ArchiveImage(path)
    assert "app:1" in str(info.value) and "other:2" in str(info.value)
    with ArchiveImage(path, reference_hint="docker.io/library/app:1") as image:
        assert image.config_bytes() == written[0].config_bytes
    with ArchiveImage(path, reference_hint="registry.example/team/other:2") as image:
        assert image.config_bytes() == written[1].config_bytes
    with pytest.raises(ImageError, match="no image named 'app:2'"):
        ArchiveImage(path, reference_hint="app:2")


def test_archive_platform_is_checked_against_the_config(tmp_path):
    path = tmp_path / "a.tar"
    write_docker_archive(path, LAYERS, default_config(arch="arm64", variant="v8"), layout="legacy")
    with ArchiveImage(path, platform=ARM64):
        pass
    with pytest.raises(ImageError, match="is linux/arm64, but linux/amd64 was requested"):
        ArchiveImage(path, platform=AMD64)


# -- OCI layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("compression,parts", [("gzip", 1), ("gzip", 4), ("zstd", 1), ("zstd", 3), (None, 1)])
def test_layout_compressions(tmp_path, compression, parts):
    written = write_oci_layout(tmp_path, LAYERS, CONFIG, compression=compression, parts=parts)
    with LayoutImage(tmp_path) as image:
        config_bytes, diff_ids, layers = contents(image)
        assert (config_bytes, diff_ids, layers) == (written.config_bytes, written.diff_ids, LAYERS)
        assert image.manifest_bytes() == written.manifest_bytes
        assert [layer.descriptor.digest for layer in image.layers()] == written.layer_digests
        assert (image.layers()[0].range_opener() is None) == (compression is not None)


@pytest.mark.parametrize("nested", [False, True])
def test_layout_multi_platform(tmp_path, nested):
    written = write_oci_layout(tmp_path, LAYERS, CONFIG, platforms=["linux/arm64/v8", "linux/amd64"],
                               nested=nested, attestation=True)
    with LayoutImage(tmp_path, "latest", ARM64) as image:
        assert image.config_bytes() == written.by_platform["linux/arm64/v8"].config_bytes
    with LayoutImage(tmp_path, "latest", Platform.parse("linux/aarch64")) as image:
        assert image.config()["architecture"] == "arm64"
    with LayoutImage(tmp_path, "latest", None) as image:  # several platforms, none asked: linux/amd64
        assert image.config_bytes() == written.by_platform["linux/amd64"].config_bytes
    with pytest.raises(ImageError, match=r"no image for linux/riscv64; available: linux/arm64, linux/amd64$"):
        LayoutImage(tmp_path, "latest", Platform.parse("linux/riscv64"))


def test_layout_entry_without_platform_is_judged_by_its_config(tmp_path):
    write_oci_layout(tmp_path, LAYERS, default_config(arch="arm64"))
    with LayoutImage(tmp_path, platform=ARM64):
        pass
    with pytest.raises(ImageError, match="no image for linux/amd64; available: linux/arm64"):
        LayoutImage(tmp_path, platform=AMD64)


def test_layout_tags(tmp_path):
    one = write_oci_layout(tmp_path, LAYERS, CONFIG, tag="v1")
    two = write_oci_layout(tmp_path, [LAYER_B], default_config(cmd=["/two"]), tag="v2")
    with LayoutImage(tmp_path, "v2") as image:
        assert image.config_bytes() == two.config_bytes
    with LayoutImage(tmp_path, "v1") as image:
        assert image.config_bytes() == one.config_bytes
    with pytest.raises(ImageError, match=r"several images \(v1, v2\); name one: oci:DIR:TAG"):
        LayoutImage(tmp_path)
    with pytest.raises(ImageError, match="no image named 'v3'; available: v1, v2"):
        LayoutImage(tmp_path, "v3")


def test_all_sources_agree(tmp_path):
    """Same image content → same config bytes and diff_ids, whatever the container format."""
    images = []
    for layout in ["legacy", "oci", "containerd"]:
        write_docker_archive(tmp_path / f"{layout}.tar", LAYERS, CONFIG, layout=layout)
        images.append(ArchiveImage(tmp_path / f"{layout}.tar"))
    for compression in [None, "gzip", "zstd"]:
        write_oci_layout(tmp_path / f"oci-{compression}", LAYERS, CONFIG, compression=compression)
        images.append(LayoutImage(tmp_path / f"oci-{compression}"))
    results = {(config, tuple(diff_ids), tuple(layers)) for config, diff_ids, layers in map(contents, images)}
    assert len(results) == 1
    for image in images:
        image.close()


# -- hostile and broken input -----------------------------------------------------------------

def blob_path(root, digest: str):
    return root / "blobs" / "sha256" / digest.split(":")[1]


def test_layer_digest_mismatch(tmp_path):
    written = write_oci_layout(tmp_path, LAYERS, CONFIG)
    path = blob_path(tmp_path, written.layer_digests[1])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with LayoutImage(tmp_path) as image, pytest.raises(ImageError, match="digest mismatch"):
        read_all(image)


@pytest.mark.parametrize("change,message", [(lambda d: d[:-1], "truncated"), (lambda d: d + b"\0", "longer than")])
def test_layer_size_mismatch(tmp_path, change, message):
    written = write_oci_layout(tmp_path, LAYERS, CONFIG)
    path = blob_path(tmp_path, written.layer_digests[0])
    path.write_bytes(change(path.read_bytes()))
    with LayoutImage(tmp_path) as image, pytest.raises(ImageError, match=message):
        read_all(image)


def test_config_digest_mismatch(tmp_path):
    written = write_oci_layout(tmp_path, LAYERS, CONFIG)
    path = blob_path(tmp_path, written.config_digest)
    path.write_bytes(path.read_bytes().replace(b"/data", b"/evil"))
    with pytest.raises(ImageError, match="image config: digest mismatch"):
        LayoutImage(tmp_path)


def test_diff_id_mismatch(tmp_path):
    bad = default_config(cmd=["/bin/app"])
    bad["rootfs"]["diff_ids"] = [sha256_digest(LAYER_B), sha256_digest(LAYER_B), sha256_digest(LAYER_A)]
    write_oci_layout(tmp_path, LAYERS, bad)
    with LayoutImage(tmp_path) as image, pytest.raises(ImageError, match="diff_id mismatch"):
        read_all(image)


def test_diff_id_count_mismatch(tmp_path):
    bad = default_config()
    bad["rootfs"]["diff_ids"] = [sha256_digest(LAYER_A)]
    write_docker_archive(tmp_path / "a.tar", LAYERS, bad, layout="oci")
    with pytest.raises(ImageError, match="manifest lists 3 layers but config rootfs.diff_ids has 1"):
        ArchiveImage(tmp_path / "a.tar")


def test_legacy_diff_id_mismatch(tmp_path):
    bad = default_config()
    bad["rootfs"]["diff_ids"] = [sha256_digest(LAYER_B)] * 3
    write_docker_archive(tmp_path / "a.tar", LAYERS, bad, layout="legacy")
    with ArchiveImage(tmp_path / "a.tar") as image, pytest.raises(ImageError, match="digest mismatch"):
        read_all(image)


def test_manifest_over_the_size_cap_is_not_read(tmp_path):
    write_oci_layout(tmp_path, LAYERS, CONFIG,
                     mutate_index=lambda index: index["manifests"][0].update(size=64 << 20))
    with pytest.raises(ImageError, match="refusing documents over"):
        LayoutImage(tmp_path)


@pytest.mark.parametrize("digest", ["sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "md5:abc", 7])
def test_digest_strings_that_are_not_digests(tmp_path, digest):
    write_oci_layout(tmp_path, LAYERS, CONFIG, mutate_index=lambda index: index["manifests"][0].update(digest=digest))
    with pytest.raises(ImageError, match="is not a valid sha256 digest"):
        LayoutImage(tmp_path)


def test_layer_digest_path_traversal_in_manifest(tmp_path):
    def evil(manifest):
        manifest["layers"][0]["digest"] = "sha256:../../../../../../etc/passwd"

    write_oci_layout(tmp_path, LAYERS, CONFIG, mutate_manifest=evil)
    with pytest.raises(ImageError, match="not a valid sha256 digest"):
        LayoutImage(tmp_path)


def test_foreign_layer_urls_refused(tmp_path):
    def foreign(manifest):
        manifest["layers"][1]["urls"] = ["https://evil.example/layer.tar.gz"]

    write_oci_layout(tmp_path, LAYERS, CONFIG, mutate_manifest=foreign)
    with pytest.raises(ImageError, match="foreign layer sha256:.* refused"):
        LayoutImage(tmp_path)


def test_foreign_layer_media_type_refused(tmp_path):
    def foreign(manifest):
        manifest["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

    write_oci_layout(tmp_path, LAYERS, CONFIG, mutate_manifest=foreign)
    with pytest.raises(ImageError, match="foreign layer"):
        LayoutImage(tmp_path)


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m.update(schemaVersion=1), "schema 1"),
    (lambda m: m.update(layers="nope"), "layers is not a list"),
    (lambda m: m["config"].update(mediaType="application/vnd.cncf.helm.config.v1+json"), "not a container image"),
    (lambda m: m["layers"][0].update(size=-1), "invalid size"),
    (lambda m: m.pop("config"), "not a JSON object"),
])
def test_malformed_manifests(tmp_path, mutate, message):
    write_oci_layout(tmp_path, LAYERS, CONFIG, mutate_manifest=mutate)
    with pytest.raises(ImageError, match=message):
        LayoutImage(tmp_path)


def test_indexes_nested_too_deep(tmp_path):
    write_oci_layout(tmp_path, LAYERS, CONFIG, nested=True)
    index = json.loads((tmp_path / "index.json").read_text())
    entry = index["manifests"][0]
    for _ in range(6):
        data = json.dumps({"schemaVersion": 2, "mediaType": entry["mediaType"], "manifests": [entry]}).encode()
        blob_path(tmp_path, sha256_digest(data)).write_bytes(data)
        entry = dict(entry, digest=sha256_digest(data), size=len(data), annotations={})
    index["manifests"] = [entry]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="nested deeper than"):
        LayoutImage(tmp_path)


def test_layout_requires_oci_layout_marker_and_regular_blobs(tmp_path):
    written = write_oci_layout(tmp_path, LAYERS, CONFIG)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(ImageError, match="imageLayoutVersion 1.x"):
        LayoutImage(tmp_path)
    (tmp_path / "oci-layout").unlink()
    with pytest.raises(ImageError, match="oci-layout is missing"):
        LayoutImage(tmp_path)
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    path = blob_path(tmp_path, written.layer_digests[0])
    path.unlink()
    os.mkfifo(path)  # reading it would hang
    with LayoutImage(tmp_path) as image, pytest.raises(ImageError, match="not a regular file"):
        read_all(image)
    path.unlink()
    with LayoutImage(tmp_path) as image, pytest.raises(ImageError, match="is missing"):
        read_all(image)


def write_raw_archive(path, members: list[TarMember], manifest: list[dict]) -> None:
    manifest_member = file("manifest.json", json.dumps(manifest).encode())
    path.write_bytes(make_tar(members + [manifest_member]))


def config_for(*layers: bytes) -> bytes:
    return json.dumps(default_config(layers=list(layers))).encode()


@pytest.mark.parametrize("layer_path", ["../outside/layer.tar", "/etc/passwd", "a/../../b", "x\0y"])
def test_archive_paths_escaping_the_archive(tmp_path, layer_path):
    members = [file("c.json", config_for(LAYER_A)), file("l/layer.tar", LAYER_A)]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": [layer_path]}])
    with pytest.raises(ImageError, match="escapes the archive|invalid archive path"):
        ArchiveImage(tmp_path / "a.tar")


@pytest.mark.parametrize("target,message", [
    ("../../etc/passwd", "leaves the archive"),
    ("/etc/passwd", "leaves the archive"),
    ("layer.tar", "too many levels of links"),  # points at itself
])
def test_archive_symlink_members_stay_inside(tmp_path, target, message):
    members = [file("c.json", config_for(LAYER_A)), symlink("l/layer.tar", target)]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": ["l/layer.tar"]}])
    with pytest.raises(ImageError, match=message):
        ArchiveImage(tmp_path / "a.tar")


def test_archive_symlink_loop_between_two_members(tmp_path):
    members = [file("c.json", config_for(LAYER_A)), symlink("a/layer.tar", "../b/layer.tar"),
               symlink("b/layer.tar", "../a/layer.tar")]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": ["a/layer.tar"]}])
    with pytest.raises(ImageError, match="too many levels of links"):
        ArchiveImage(tmp_path / "a.tar")


def test_archive_hardlink_member(tmp_path):
    members = [file("c.json", config_for(LAYER_A, LAYER_A)), file("a/layer.tar", LAYER_A),
               hardlink("b/layer.tar", "a/layer.tar")]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": ["a/layer.tar", "b/layer.tar"]}])
    with ArchiveImage(tmp_path / "a.tar") as image:
        assert contents(image)[2] == [LAYER_A, LAYER_A]


def test_archive_duplicate_members_refused(tmp_path):
    members = [file("c.json", config_for(LAYER_A)), file("l/layer.tar", LAYER_A), file("l/layer.tar", LAYER_B)]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": ["l/layer.tar"]}])
    with pytest.raises(ImageError, match="appears twice"):
        ArchiveImage(tmp_path / "a.tar")


def test_archive_oversized_pax_header_refused(tmp_path):
    huge = TarMember("x", b"", pax_headers={"comment": "A" * (2 << 20)})
    write_raw_archive(tmp_path / "a.tar", [huge], [])
    with pytest.raises(ImageError, match="tar header payload over"):
        ArchiveImage(tmp_path / "a.tar")


def test_archive_member_count_is_bounded(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(make_tar([file(f"f{i}") for i in range(20)]))
    assert len(TarIndex(path, max_members=20).members) == 20
    with pytest.raises(ImageError, match="more than 19 members"):
        TarIndex(path, max_members=19)


@pytest.mark.parametrize("data,message", [
    (b"", "not a valid tar archive"),
    (b"garbage" * 200, "not a valid tar archive"),
    (make_tar([file("hello")]), "neither index.json nor manifest.json"),
])
def test_not_an_archive(tmp_path, data, message):
    (tmp_path / "a.tar").write_bytes(data)
    with pytest.raises(ImageError, match=message):
        ArchiveImage(tmp_path / "a.tar")


def test_archive_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        ArchiveImage(tmp_path / "absent.tar")


def test_truncated_archive(tmp_path):
    path = tmp_path / "a.tar"
    write_docker_archive(path, LAYERS, CONFIG, layout="oci")
    data = path.read_bytes()
    # cut inside the last (largest) layer blob: indexing may still work, reading must fail
    cut = data.index(LAYER_B[:4096]) + 1000
    path.write_bytes(data[:cut])
    with pytest.raises(ImageError), ArchiveImage(path) as image:
        read_all(image)


def test_legacy_foreign_layer_sources_refused(tmp_path):
    members = [file("c.json", config_for(LAYER_A)), file("l/layer.tar", LAYER_A)]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": ["l/layer.tar"],
                                                      "LayerSources": {"sha256:" + "1" * 64: {"urls": ["http://x"]}}}])
    with pytest.raises(ImageError, match="foreign layers"):
        ArchiveImage(tmp_path / "a.tar")


# -- references and dispatch ------------------------------------------------------------------

@pytest.mark.parametrize("ref,normal", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("team/app", "docker.io/team/app:latest"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    ("registry.example/a/b:c", "registry.example/a/b:c"),
    ("app@sha256:" + "a" * 64, "docker.io/library/app@sha256:" + "a" * 64),
])
def test_normalize_reference(ref, normal):
    assert normalize_reference(ref) == normal


def test_open_image_dispatch(tmp_path, monkeypatch):
    archive = write_docker_archive_images(tmp_path / "m.tar", [ImageSpec(LAYERS, CONFIG, ["app:1"]),
                                                               ImageSpec([LAYER_B], CONFIG, ["app:2"])])
    with open_image(f"docker-archive:{tmp_path}/m.tar:app:2", platform=None) as image:
        assert isinstance(image, ArchiveImage) and image.config_bytes() == archive[1].config_bytes
    layout = write_oci_layout(tmp_path / "oci", LAYERS, CONFIG, tag="v1")
    with open_image(f"oci:{tmp_path}/oci:v1", platform=AMD64) as image:
        assert isinstance(image, LayoutImage) and image.config_bytes() == layout.config_bytes
    with open_image(f"oci:{tmp_path}/oci", platform=None) as image:
        assert image.config_bytes() == layout.config_bytes

    calls = []

    class FakeRegistryImage:
        def __init__(self, reference, *, platform):
            calls.append((reference, platform))

    import qtbuild.sources.registry as registry
    monkeypatch.setattr(registry, "RegistryImage", FakeRegistryImage)
    open_image("registry://127.0.0.1:5000/a/b:c", platform=ARM64)
    assert calls == [("registry://127.0.0.1:5000/a/b:c", ARM64)]

    with pytest.raises(ImageError, match="unknown image source"):
        open_image("ftp://x/y", platform=None)
    with pytest.raises(ImageError, match="is a local path.*docker-archive:"):
        open_image(f"{tmp_path}/m.tar", platform=None)


# -- independent cross-check: skopeo ----------------------------------------------------------

@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install skopeo)")
@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_skopeo_conversion_agrees(tmp_path, layout):
    archive = tmp_path / "a.tar"
    write_docker_archive(archive, LAYERS, CONFIG, layout=layout, repo_tags=["example.com/app:latest"])
    result = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", f"docker-archive:{archive}",
                             f"oci:{tmp_path}/oci:copied"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with ArchiveImage(archive) as ours, LayoutImage(tmp_path / "oci", "copied") as theirs:
        our_config, our_diff_ids, our_layers = contents(ours)
        their_config, their_diff_ids, their_layers = contents(theirs)
    # skopeo gzips the layers itself (an independent gzip writer) and re-serialises the config
    # while converting Docker → OCI (new key order, so a new image ID): compare the content.
    assert {layer.descriptor.media_type for layer in theirs.layers()} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    assert (our_diff_ids, our_layers) == (their_diff_ids, their_layers)
    assert json.loads(our_config) == json.loads(their_config)


# -- Docker daemon ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docker_client():
    """A reachable Docker daemon; skipped without one, except under CI (CI starts dockerd)."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but no Docker daemon answers: {exc}")
        pytest.skip(f"no Docker daemon reachable (start dockerd or set DOCKER_HOST): {exc}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def loaded_image(docker_client, tmp_path_factory):
    """An imagefactory image `docker load`ed into the daemon under a unique tag (config kept)."""
    tag = f"qtbuild-test/{uuid.uuid4().hex[:12]}:loaded"
    archive = tmp_path_factory.mktemp("daemon") / "image.tar"
    written = write_docker_archive(archive, LAYERS, CONFIG, layout="legacy", repo_tags=[tag])
    docker_client.images.load(archive.read_bytes())
    yield tag, written
    docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def imported_image(docker_client):
    """A layer `docker import`ed: the daemon writes the config itself."""
    repository = f"qtbuild-test/{uuid.uuid4().hex[:12]}"
    docker_client.api.import_image_from_data(LAYER_A, repository=repository, tag="imported")
    yield f"{repository}:imported"
    docker_client.images.remove(f"{repository}:imported", force=True)


def test_daemon_image_matches_the_loaded_content(loaded_image, tmp_path):
    from qtbuild.sources.daemon import DaemonImage

    tag, written = loaded_image
    with DaemonImage(tag, scratch_dir=str(tmp_path)) as image:
        config_bytes, diff_ids, layers = contents(image)
        assert image.reference == f"docker://{tag}"
        assert image.image_id == written.config_digest
    assert (config_bytes, diff_ids, layers) == (written.config_bytes, written.diff_ids, LAYERS)
    assert not os.listdir(tmp_path)  # the scratch file is gone once the image is closed


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
@pytest.mark.parametrize("which", ["loaded", "imported"])
def test_daemon_image_agrees_with_docker_save(request, which, tmp_path):
    from qtbuild.sources.daemon import DaemonImage

    tag = request.getfixturevalue("loaded_image")[0] if which == "loaded" else request.getfixturevalue("imported_image")
    subprocess.run(["docker", "save", "-o", str(tmp_path / "saved.tar"), tag], check=True, timeout=60)
    with DaemonImage(tag) as daemon, ArchiveImage(tmp_path / "saved.tar") as saved:
        ours, theirs = contents(daemon), contents(saved)
        assert ours == theirs
        assert daemon.manifest_bytes() == saved.manifest_bytes()
        assert daemon.image_id == daemon_image_id(tag)
    if which == "imported":
        assert ours[2] == [LAYER_A]


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker CLI not installed")
def test_daemon_convert_streams_beside_the_output_and_matches_the_saved_archive(loaded_image, tmp_path):
    """qtbuild convert docker://TAG: the same EIF as docker-archive: of `docker save TAG`, with
    nothing written to $TMPDIR and nothing but the EIF left in the output directory."""
    import sys

    tag, _ = loaded_image
    temp, out = tmp_path / "tmpdir", tmp_path / "out"
    temp.mkdir()
    out.mkdir()
    subprocess.run(["docker", "save", "-o", str(tmp_path / "saved.tar"), tag], check=True, timeout=60)

    def convert(source: str, output) -> None:
        command = [sys.executable, "-c", "from qtbuild.cli import main; main()", "convert", source, "-o", str(output),
                   "-q"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "TMPDIR": str(temp)})
        while process.poll() is None:  # watched while it runs: a temporary file removed at the end counts too
            assert not os.listdir(temp), f"{source} wrote to $TMPDIR"
        assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""

    convert(f"docker://{tag}", out / "daemon.eif")
    convert(f"docker-archive:{tmp_path / 'saved.tar'}", tmp_path / "archive.eif")
    assert (out / "daemon.eif").read_bytes() == (tmp_path / "archive.eif").read_bytes()
    assert os.listdir(out) == ["daemon.eif"]
    assert not os.listdir(temp)


def daemon_image_id(tag: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def test_daemon_image_platform_mismatch(loaded_image):
    from qtbuild.sources.daemon import DaemonImage

    tag, _ = loaded_image
    with pytest.raises(ImageError, match=f"docker://{tag} is linux/amd64, but linux/arm64 was requested"):
        DaemonImage(tag, platform=ARM64)


def test_daemon_missing_image(docker_client):
    from qtbuild.sources.daemon import DaemonImage

    with pytest.raises(ImageError, match="not found in the Docker daemon; docker pull/build it first"):
        DaemonImage(f"qtbuild-test/absent-{uuid.uuid4().hex[:8]}:none")


def test_daemon_unreachable(monkeypatch, tmp_path):
    from qtbuild.sources.daemon import DaemonImage

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(ImageError, match="is dockerd running\\? set DOCKER_HOST"):
        DaemonImage("busybox")


def test_save_sent_early_is_taken_by_the_image_opened_for_it(loaded_image, tmp_path):
    from qtbuild.sources import daemon_request
    from qtbuild.sources.daemon import DaemonImage

    tag, written = loaded_image
    with daemon_request.sent_early(tag):
        request = daemon_request._EARLY[(tag, None)]
        with DaemonImage(tag, scratch_dir=str(tmp_path)) as image:
            assert daemon_request.take_early(tag, None) is None  # taken, once
            assert contents(image) == (written.config_bytes, written.diff_ids, LAYERS)
        assert request._closed
    assert not daemon_request._EARLY and not os.listdir(tmp_path)


def test_save_sent_early_and_never_taken_is_dropped(loaded_image):
    from qtbuild.sources import daemon_request

    tag, _ = loaded_image
    with daemon_request.sent_early(tag):
        request = daemon_request._EARLY[(tag, None)]
        assert daemon_request.take_early(tag, ARM64) is None  # another platform's image is not this request's
    assert request._closed and not daemon_request._EARLY


def test_errors_of_a_save_sent_early_are_raised_when_the_image_is_opened(docker_client, monkeypatch, tmp_path):
    from qtbuild.sources.daemon import DaemonImage
    from qtbuild.sources.daemon_request import sent_early

    missing = f"qtbuild-test/absent-{uuid.uuid4().hex[:8]}:none"
    with sent_early(missing), pytest.raises(ImageError, match="not found in the Docker daemon"):
        DaemonImage(missing)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with sent_early("busybox"), pytest.raises(ImageError, match="is dockerd running\\? set DOCKER_HOST"):
        DaemonImage("busybox")


WATCH_SAVE_REQUESTS = """if True:
    import sys
    from qtbuild.sources import daemon_request
    send = daemon_request.SaveRequest.__init__
    def watched(self, *args, **kwargs):
        print("save requested; pipeline imported:", "qtbuild.convert.pipeline" in sys.modules, file=sys.stderr)
        send(self, *args, **kwargs)
    daemon_request.SaveRequest.__init__ = watched
    from qtbuild.cli import main
    main()
"""


@pytest.mark.parametrize("options", [[], ["--platform", "x86_64"]])
def test_convert_requests_the_save_before_it_imports_the_pipeline(loaded_image, tmp_path, options):
    """The daemon exports the image for seconds before its first byte: the request leaves first, once, and
    is the one the convert reads (also with a --platform, spelt as the pipeline would not)."""
    import sys

    tag, _ = loaded_image
    result = subprocess.run([sys.executable, "-c", WATCH_SAVE_REQUESTS, "convert", f"docker://{tag}", *options,
                             "-o", str(tmp_path / "a.eif")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("save requested; pipeline imported: False") == 1, result.stderr
    assert "save requested; pipeline imported: True" not in result.stderr
    assert os.listdir(tmp_path) == ["a.eif"]


def test_docker_dir_requests_the_save_as_soon_as_the_image_is_built(docker_client, tmp_path):
    import sys

    from helpers.docker_context import script_context

    context = script_context(tmp_path)
    tag = f"qtbuild-test/{uuid.uuid4().hex[:12]}:built"
    try:
        result = subprocess.run([sys.executable, "-c", WATCH_SAVE_REQUESTS, "convert", "--docker-dir", str(context),
                                 "--docker-uri", tag, "--platform", "linux/amd64", "-q", "-o", str(tmp_path / "a.eif")],
                                capture_output=True, text=True, timeout=120)
    finally:
        import docker

        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(tag, force=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "save requested; pipeline imported: False\n"


@pytest.mark.parametrize("name", ["../l/layer.tar", "/l/layer.tar", "x/../l/layer.tar"])
def test_archive_members_with_escaping_names_are_never_used(tmp_path, name):
    members = [file("c.json", config_for(LAYER_A)), file(name, LAYER_A)]
    write_raw_archive(tmp_path / "a.tar", members, [{"Config": "c.json", "Layers": ["l/layer.tar"]}])
    with pytest.raises(ImageError, match="'l/layer.tar' is missing"):
        ArchiveImage(tmp_path / "a.tar")


def test_archive_members_with_dot_slash_names(tmp_path):
    members = [file("./c.json", config_for(LAYER_A)), file("./l/layer.tar", LAYER_A)]
    path = tmp_path / "a.tar"
    path.write_bytes(make_tar(members + [file("./manifest.json", json.dumps(
        [{"Config": "c.json", "Layers": ["./l/layer.tar"]}]).encode())]))
    with ArchiveImage(path) as image:
        assert contents(image)[2] == [LAYER_A]


@pytest.mark.parametrize("layout", ["legacy", "oci", "containerd"])
def test_one_image_with_several_tags_is_not_ambiguous(tmp_path, layout):
    path = tmp_path / "a.tar"
    written = write_docker_archive(path, LAYERS, CONFIG, layout=layout, repo_tags=["app:1", "app:latest"])
    with ArchiveImage(path) as image, ArchiveImage(path, reference_hint="app") as by_name:
        assert image.config_bytes() == by_name.config_bytes() == written.config_bytes
