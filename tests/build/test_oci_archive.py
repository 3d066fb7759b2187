"""``oci-archive:PATH[:TAG]``: a tar of an OCI layout gives the same image, and the same EIF bytes,
as the other sources; archives come from skopeo (installed by scripts/install-system.sh) and from
the test image factory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile

import pytest
from click.testing import CliRunner

from qtbuild.cli.app import cli
from qtbuild.errors import ImageError
from qtbuild.sources.layout import LayoutImage
from qtbuild.sources.oci_archive import OciArchiveImage
from qtbuild.sources.open import open_image

from helpers.imagefactory import default_config, file, make_layer, symlink, write_docker_archive, write_oci_layout

LAYERS = [
    make_layer([file("etc/hostname", b"enclave\n"), file("bin/app", os.urandom(30_000), mode=0o755)]),
    make_layer([file("data/big", bytes(200_000)), symlink("data/link", "big")]),
]
CONFIG = default_config(cmd=["/bin/app"], env=["PATH=/bin"], workdir="/data")


def tar_directory(directory, archive) -> None:
    """A plain tar of an OCI layout directory, members relative to it (as skopeo writes them)."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(directory)):
            tar.add(os.path.join(directory, name), arcname=name)


def skopeo(*args: str) -> None:
    result = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


def convert(source: str, output) -> bytes:
    result = CliRunner().invoke(cli, ["convert", source, "-o", str(output), "-q"], env={"SOURCE_DATE_EPOCH": "0"})
    assert result.exit_code == 0, result.output
    return output.read_bytes()


def test_same_image_and_same_eif_as_the_layout_directory(tmp_path):
    write_oci_layout(tmp_path / "layout", LAYERS, CONFIG, tag="v1")
    tar_directory(tmp_path / "layout", tmp_path / "image.tar")
    with LayoutImage(tmp_path / "layout", "v1") as layout, OciArchiveImage(tmp_path / "image.tar", "v1") as archive:
        assert archive.config_bytes() == layout.config_bytes()
        assert archive.image_id == layout.image_id
    eif = convert(f"oci-archive:{tmp_path / 'image.tar'}:v1", tmp_path / "a.eif")
    assert eif == convert(f"oci:{tmp_path / 'layout'}:v1", tmp_path / "b.eif")


def test_skopeo_written_archive_gives_the_bytes_of_every_other_source(tmp_path):
    """docker-archive → (skopeo) → oci:DIR and oci-archive: of the same image → identical EIFs."""
    write_docker_archive(tmp_path / "docker.tar", LAYERS, CONFIG, layout="oci", repo_tags=["example.com/app:1"])
    skopeo(f"docker-archive:{tmp_path / 'docker.tar'}", f"oci:{tmp_path / 'layout'}:app")
    skopeo(f"oci:{tmp_path / 'layout'}:app", f"oci-archive:{tmp_path / 'image.tar'}:app")
    with tarfile.open(tmp_path / "image.tar") as written:
        names = written.getnames()
    assert "oci-layout" in names and "index.json" in names
    from_archive = convert(f"oci-archive:{tmp_path / 'image.tar'}", tmp_path / "a.eif")  # one image: no tag needed
    assert from_archive == convert(f"oci-archive:{tmp_path / 'image.tar'}:app", tmp_path / "b.eif")
    assert from_archive == convert(f"oci:{tmp_path / 'layout'}:app", tmp_path / "c.eif")
    # docker-archive holds the Docker-format config skopeo rewrote: same file system, same PCRs
    convert(f"docker-archive:{tmp_path / 'docker.tar'}", tmp_path / "d.eif")
    assert pcrs(tmp_path / "a.eif") == pcrs(tmp_path / "d.eif")


def pcrs(path) -> dict:
    return json.loads(CliRunner().invoke(cli, ["describe", str(path)]).stdout)["Measurements"]


def test_tags_select_and_several_images_need_one(tmp_path):
    write_oci_layout(tmp_path / "layout", LAYERS, CONFIG, tag="v1")
    write_oci_layout(tmp_path / "layout", LAYERS[:1], CONFIG, tag="v2")
    tar_directory(tmp_path / "layout", tmp_path / "image.tar")
    with pytest.raises(ImageError, match=r"several images \(v1, v2\); name one: oci-archive:PATH:TAG"):
        open_image(f"oci-archive:{tmp_path / 'image.tar'}", platform=None)
    with pytest.raises(ImageError, match="no image named 'v3'"):
        open_image(f"oci-archive:{tmp_path / 'image.tar'}:v3", platform=None)
    with open_image(f"oci-archive:{tmp_path / 'image.tar'}:v2", platform=None) as image:
        assert len(list(image.layers())) == 1


def test_tampered_blob_is_refused(tmp_path):
    write_oci_layout(tmp_path / "layout", LAYERS, CONFIG, compression=None)
    blobs = tmp_path / "layout" / "blobs" / "sha256"
    layer_digest = hashlib.sha256(LAYERS[1]).hexdigest()
    data = bytearray((blobs / layer_digest).read_bytes())
    data[600] ^= 1
    (blobs / layer_digest).write_bytes(bytes(data))
    tar_directory(tmp_path / "layout", tmp_path / "image.tar")
    result = CliRunner().invoke(cli, ["measure", f"oci-archive:{tmp_path / 'image.tar'}", "-q"])
    assert result.exit_code == 2 and "digest" in result.output
    assert result.output.count("\n") == 1


def test_not_an_oci_archive(tmp_path):
    write_docker_archive(tmp_path / "docker.tar", LAYERS, CONFIG, layout="legacy")
    with pytest.raises(ImageError, match="no oci-layout member.*use docker-archive:"):
        open_image(f"oci-archive:{tmp_path / 'docker.tar'}", platform=None)
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(ImageError, match="oci-archive .*gzip-compressed"):
        open_image(f"oci-archive:{tmp_path / 'junk.tar'}", platform=None)
