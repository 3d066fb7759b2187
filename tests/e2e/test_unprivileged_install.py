"""The build side from a plain ``pip install`` of the wheel, as an unprivileged user: no root, no
apt, no Docker daemon, no writable home.

As root: build the wheel and a wheelhouse of its dependencies (``pip wheel``, readable by all).
As ``nobody`` (``setpriv``): create a venv with Debian's /usr/bin/python3, ``pip install
--no-index`` qtbuild from the wheelhouse, then run samples/ci/release.sh's release and reproduce
jobs with that qtbuild on PATH, HOME=/nonexistent (nobody's), cwd / (not writable) and no
daemon socket — for registry, OCI, oci-archive and docker-archive sources.  Each published EIF
must be byte-identical to the one root builds from the same source with the work tree's qtbuild.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from qtbuild.cli.app import cli

from helpers.certs import make_signer
from helpers.imagefactory import default_config, file, make_tar, write_docker_archive, write_oci_layout
from helpers.registry_server import BuiltImage, build_image
from helpers.wheel_build import build_wheel

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "samples" / "ci" / "release.sh"
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
EPOCH = "1700000000"
FILES = {"bin/app": b"#!/bin/sh\necho release\n", "etc/app.conf": b"mode=release\n"}


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "switching to nobody needs root"
    if not shutil.which("setpriv"):
        return "setpriv (util-linux) is not installed"
    if subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
        return f"{SYSTEM_PYTHON} has no venv/ensurepip (apt-get install python3-venv)"
    return None


@pytest.fixture(scope="module")
def work():
    """A directory every user can read (pytest's tmp dirs are root's 0700), with ``home/``
    owned by nobody; removed afterwards."""
    reason = _unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    directory = Path(tempfile.mkdtemp(prefix="qtbuild-unprivileged-"))
    try:
        directory.chmod(0o755)
        for name in ("home", "home/tmp"):
            (directory / name).mkdir()
            os.chown(directory / name, NOBODY, NOBODY)
        yield directory
    finally:
        shutil.rmtree(directory)


def as_nobody(args: list[str], work: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``args`` as nobody with a clean environment: nobody's own HOME (which does not
    exist), cwd /, the venv's qtbuild first on PATH, no Docker daemon."""
    env = {"PATH": f"{work}/home/venv/bin:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
           "TMPDIR": f"{work}/home/tmp", "SOURCE_DATE_EPOCH": EPOCH,
           "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args],
                          capture_output=True, text=True, env=env, cwd="/", timeout=timeout)


@pytest.fixture(scope="module")
def installed(work):
    """nobody's venv with qtbuild pip-installed from root's wheelhouse (no index, no network)."""
    wheel = build_wheel(ROOT, work / "build")
    wheelhouse = work / "wheelhouse"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheelhouse), str(wheel)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    subprocess.run(["chmod", "-R", "a+rX", str(wheelhouse)], check=True)
    created = as_nobody([SYSTEM_PYTHON, "-m", "venv", f"{work}/home/venv"], work)
    assert created.returncode == 0, created.stderr
    pip = as_nobody([f"{work}/home/venv/bin/pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse),
                     "qtbuild"], work, timeout=600)
    assert pip.returncode == 0, pip.stderr
    location = as_nobody(["qtbuild", "--help"], work)
    assert location.returncode == 0, location.stderr
    return work


@pytest.fixture(scope="module")
def sources(installed, registry):
    """The same image as a registry tag, an OCI layout, an oci-archive and a docker-archive."""
    inputs = installed / "inputs"
    inputs.mkdir()
    layer = make_tar([file(name, data, mode=0o755) for name, data in sorted(FILES.items())])
    config = default_config(cmd=["/bin/app"])
    write_oci_layout(inputs / "layout", [layer], config)
    with tarfile.open(inputs / "image.oci.tar", "w") as archive:
        archive.add(inputs / "layout", arcname=".")
    write_docker_archive(inputs / "image.docker.tar", [layer], config)
    image: BuiltImage = build_image(FILES)
    registry.push_image("ci/unprivileged", "release", image)
    key, cert = make_signer("P-384")
    (inputs / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (inputs / "cert.pem").write_bytes(cert)
    subprocess.run(["chmod", "-R", "a+rX", str(inputs)], check=True)
    return {"registry": f"registry://{registry.host}/ci/unprivileged:release",
            "oci": f"oci:{inputs / 'layout'}",
            "oci-archive": f"oci-archive:{inputs / 'image.oci.tar'}",
            "docker-archive": f"docker-archive:{inputs / 'image.docker.tar'}"}


@pytest.mark.parametrize("kind", ["registry", "oci", "oci-archive", "docker-archive"])
def test_release_and_reproduce_as_nobody_match_roots_build(installed, sources, kind):
    work, source = installed, sources[kind]
    inputs, dist = work / "inputs", f"{work}/home/dist-{kind}"
    released = as_nobody(["bash", str(SCRIPT), "release", source, str(inputs / "key.pem"), str(inputs / "cert.pem"),
                          dist], work)
    assert released.returncode == 0, released.stderr
    reproduced = as_nobody(["bash", str(SCRIPT), "reproduce", source, dist], work)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "check passed" in reproduced.stderr

    by_root = CliRunner().invoke(cli, ["convert", source, "-o", str(work / f"root-{kind}.eif"), "--private-key",
                                       str(inputs / "key.pem"), "--signing-certificate", str(inputs / "cert.pem"),
                                       "-q"], env={"SOURCE_DATE_EPOCH": EPOCH})
    assert by_root.exit_code == 0, by_root.output
    assert (work / f"root-{kind}.eif").read_bytes() == Path(dist, "app.eif").read_bytes()
    assert json.loads(Path(dist, "measurements.json").read_text()) == json.loads(by_root.stdout)
    # nothing left behind in nobody's temporary directory, nothing owned by nobody outside home/
    assert list((work / "home" / "tmp").iterdir()) == []
    assert [p for p in work.rglob("*") if p.lstat().st_uid == NOBODY and "home" not in p.relative_to(work).parts] == []
