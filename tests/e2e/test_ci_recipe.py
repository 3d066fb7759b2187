"""samples/ci/release.sh end to end: the release job against a real registry with only the
installed qtbuild on PATH and no Docker daemon reachable, and the reproduce job passing, then
failing when the tag moves to another image.

(The jobs run as the test's user; test_unprivileged_install.py runs them as nobody from a
pip-installed wheel.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from helpers.certs import make_signer
from helpers.registry_server import build_image

SCRIPT = Path(__file__).resolve().parents[2] / "samples" / "ci" / "release.sh"


def run_job(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "SOURCE_DATE_EPOCH": "1700000000",
           "TMPDIR": str(home), "DOCKER_HOST": f"unix://{home}/no-docker.sock"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_release_then_reproduce_from_the_registry(tmp_path, registry):
    work = tmp_path
    key, cert = make_signer("P-384")
    (work / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (work / "cert.pem").write_bytes(cert)
    registry.push_image("ci/app", "release", build_image({"bin/app": b"#!/bin/sh\necho release\n"}))
    source = f"registry://{registry.host}/ci/app:release"

    released = run_job("release", source, str(work / "key.pem"), str(work / "cert.pem"), str(work / "dist"), home=work)
    assert released.returncode == 0, released.stderr
    dist = work / "dist"
    assert {p.name for p in dist.iterdir()} == {"app.eif", "measurements.json", "describe.json", "app.intoto.json",
                                                "signing-cert.pem"}
    reproduced = run_job("reproduce", source, str(dist), home=work)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "check passed" in reproduced.stderr

    registry.push_image("ci/app", "release", build_image({"bin/app": b"#!/bin/sh\necho tampered\n"}))
    moved = run_job("reproduce", source, str(dist), home=work)
    assert moved.returncode == 1
    assert "check FAILED" in moved.stderr and "bin/app" in moved.stderr
