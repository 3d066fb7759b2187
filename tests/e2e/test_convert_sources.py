"""The same image through all four sources gives byte-identical EIFs (the determinism promise).

One image (three layers: files, a hardlink, a whiteout, a symlink) is written by
imagefactory as a docker-archive; the daemon loads that archive; the same layers and config are
written as an OCI layout (gzip) and pushed to a real registry (gzip).  Each is converted; the
outputs must be identical, also under a different umask, TZ, LANG, temp dir and hash seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from helpers import imagefactory as f
from helpers.registry_server import BuiltImage

REPO = "qtbuild-e2e/app"


def layers() -> list[bytes]:
    base = f.make_layer([
        f.directory("bin"), f.file("bin/app", b"#!/bin/sh\necho hi\n", mode=0o755),
        f.directory("etc"), f.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n"),
        f.file("etc/remove-me", b"gone"), f.directory("data"), f.file("data/big", bytes(range(256)) * 4096),
        f.hardlink("data/link", "data/big"),
    ])
    middle = f.make_layer([f.directory("etc"), f.file("etc/.wh.remove-me"), f.symlink("bin/sh", "/bin/app")])
    top = f.make_layer([f.file("etc/motd", b"hello\n", mode=0o600, uid=1000, gid=1000, mtime=1_700_000_000)])
    return [base, middle, top]


@pytest.fixture(scope="module")
def image(tmp_path_factory, docker_client, registry):
    """The one image in every form: {source string: ...}."""
    work = tmp_path_factory.mktemp("sources")
    tars = layers()
    config = f.default_config(cmd=["/bin/app"], entrypoint=None, user="app", workdir="/data")
    archive = work / "app.tar"
    written = f.write_docker_archive(archive, tars, config, layout="legacy", repo_tags=[f"{REPO}:v1"])
    subprocess.run(["docker", "load", "-q", "-i", str(archive)], check=True, capture_output=True)
    f.write_oci_layout(work / "layout", tars, json.loads(written.config_bytes), compression="gzip", tag="v1")
    gzipped = [f.compress(t, "gzip") for t in tars]
    manifest = {
        "schemaVersion": 2, "mediaType": f.OCI_MANIFEST,
        "config": {"mediaType": f.OCI_CONFIG, "digest": f.sha256_digest(written.config_bytes),
                   "size": len(written.config_bytes)},
        "layers": [{"mediaType": f.LAYER_MEDIA_TYPES["gzip"], "digest": f.sha256_digest(g), "size": len(g)}
                   for g in gzipped],
    }
    built = BuiltImage(json.dumps(manifest).encode(), f.OCI_MANIFEST, written.config_bytes, gzipped)
    registry.push_image(REPO, "v1", built)
    yield {
        "daemon": f"docker://{REPO}:v1",
        "archive": f"docker-archive:{archive}",
        "layout": f"oci:{work / 'layout'}:v1",
        "registry": f"registry://{registry.host}/{REPO}:v1",
    }
    docker_client.images.remove(f"{REPO}:v1", force=True)


def convert(source: str, out, env: dict | None = None, cwd=None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", "from qtbuild.cli import main; main()", "convert", source, "-o", str(out), "-q"],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_all_sources_give_identical_bytes(image, tmp_path):
    digests, measurements = {}, {}
    for name, source in image.items():
        measurements[name] = convert(source, tmp_path / f"{name}.eif")
        digests[name] = hashlib.sha256((tmp_path / f"{name}.eif").read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests
    assert len({json.dumps(m, sort_keys=True) for m in measurements.values()}) == 1


def test_measure_prints_convert_pcrs_from_every_source(image, tmp_path):
    """measure reads file data differently (local gzip layers are inflated again, not spilled):
    its PCRs must still be convert's, from every source."""
    expected = convert(image["archive"], tmp_path / "app.eif")
    for name, source in image.items():
        result = subprocess.run([sys.executable, "-c", "from qtbuild.cli import main; main()", "measure", source, "-q"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected, name


def test_environment_does_not_change_the_bytes(image, tmp_path):
    convert(image["layout"], tmp_path / "plain.eif")
    odd_tmp = tmp_path / "elsewhere"
    odd_tmp.mkdir()
    env = {"TZ": "Asia/Shanghai", "LANG": "zh_CN.UTF-8", "LC_ALL": "C", "TMPDIR": str(odd_tmp),
           "PYTHONHASHSEED": "12345"}
    old = os.umask(0o077)
    try:
        convert(image["layout"], tmp_path / "odd.eif", env, cwd=odd_tmp.parent)
    finally:
        os.umask(old)
    assert (tmp_path / "plain.eif").read_bytes() == (tmp_path / "odd.eif").read_bytes()
    assert os.listdir(odd_tmp) == []  # spill files were removed


def test_converted_ramdisk_has_the_flattened_tree(image, tmp_path):
    convert(image["archive"], tmp_path / "app.eif")
    out = tmp_path / "x"
    subprocess.run([sys.executable, "-c", "from qtbuild.cli import main; main()",
                    "extract", str(tmp_path / "app.eif"), "-o", str(out), "-q"], check=True)
    root = out / "ramdisk1" / "rootfs"
    assert not (root / "etc" / "remove-me").exists()  # whiteout applied
    assert (root / "data" / "link").read_bytes() == (root / "data" / "big").read_bytes()
    assert os.readlink(root / "bin" / "sh") == "/bin/app"
    launch = json.loads((out / "ramdisk1" / "launch.json").read_text())
    assert (launch["argv"], launch["uid"], launch["gid"], launch["cwd"]) == (["/bin/app"], 1000, 1000, "/data")
    assert (out / "ramdisk1" / "cmd").read_text() == "/bin/app\n"
