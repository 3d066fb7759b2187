"""podman's Docker-compatible API socket as a ``docker://`` source (through ``DOCKER_HOST``).

A private podman (its own storage root and run root, vfs driver, API service on a socket in the
test's directory) loads an OCI archive; converting the image through podman's socket must give
the bytes of converting the archive itself.  Requires Debian's ``podman`` (scripts/install-system.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from helpers import imagefactory as f

pytestmark = pytest.mark.skipif(shutil.which("podman") is None and not os.environ.get("CI"),
                                reason="podman is not installed (scripts/install-system.sh installs it)")


def qtbuild(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from qtbuild.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "SOURCE_DATE_EPOCH": "0", **(env or {})})


@pytest.fixture
def podman_socket(tmp_path):
    """(podman command prefix, DOCKER_HOST) of a private podman API service, stopped afterwards."""
    short = tempfile.mkdtemp(prefix="qtb-pm-", dir="/tmp")  # podman refuses a runroot over 50 characters
    podman = ["podman", "--root", str(tmp_path / "root"), "--runroot", f"{short}/run", "--storage-driver", "vfs"]
    socket = tmp_path / "api.sock"
    service = subprocess.Popen([*podman, "system", "service", "--time=0", f"unix://{socket}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert service.poll() is None, service.stderr.read().decode()
            assert time.monotonic() < deadline, "podman system service did not create its socket in 30 s"
            time.sleep(0.1)
        yield podman, f"unix://{socket}"
    finally:
        service.terminate()
        service.wait(timeout=30)
        subprocess.run([*podman, "system", "reset", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(short, ignore_errors=True)


def test_podman_socket_gives_the_bytes_of_the_archive(tmp_path, podman_socket):
    podman, docker_host = podman_socket
    layer = f.make_layer([f.directory("bin"), f.file("bin/app", b"#!/bin/sh\necho hi\n", mode=0o755),
                          f.directory("etc"), f.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")])
    f.write_oci_layout(tmp_path / "layout", [layer], f.default_config(cmd=["/bin/app"]), compression=None,
                       tag="localhost/qtbuild-e2e:podman")
    with tarfile.open(tmp_path / "image.tar", "w") as tar:
        for name in sorted(os.listdir(tmp_path / "layout")):
            tar.add(tmp_path / "layout" / name, arcname=name)
    loaded = subprocess.run([*podman, "load", "-i", str(tmp_path / "image.tar")], capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    via_archive = qtbuild("convert", f"oci-archive:{tmp_path / 'image.tar'}", "-o", str(tmp_path / "a.eif"), "-q")
    assert via_archive.returncode == 0, via_archive.stderr
    via_podman = qtbuild("convert", "docker://localhost/qtbuild-e2e:podman", "-o", str(tmp_path / "p.eif"), "-q",
                         env={"DOCKER_HOST": docker_host})
    assert via_podman.returncode == 0, via_podman.stderr
    assert (tmp_path / "p.eif").read_bytes() == (tmp_path / "a.eif").read_bytes()
    missing = qtbuild("measure", "docker://localhost/not-there:1", "-q", env={"DOCKER_HOST": docker_host})
    assert missing.returncode == 2 and "not found in the Docker daemon" in missing.stderr
