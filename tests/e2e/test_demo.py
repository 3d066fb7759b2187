"""The samples end to end, as a new user runs them: `qtbuild demo hello` and `qtbuild demo bank-card`.

bank-card is the seed workflow with every role (KMS, object store, signed image, PCR policy,
qt-proxy, attested decryption in a normal-mode enclave) and its refusals.  Needs root, the
Docker daemon and the local debian:bookworm-slim base (samples/base-images.sh: the module
fixture creates it when missing, as CI needs; the demo itself only names the fix).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

QTBUILD = [sys.executable, "-m", "qtbuild"]
SAMPLES = Path(__file__).resolve().parents[2] / "samples"

pytestmark = pytest.mark.root  # the demos run local enclaves


@pytest.fixture(autouse=True)
def needs_docker(docker_client):
    """The demos build their images with the Docker daemon."""


@pytest.fixture(scope="module")
def base_image(docker_client):
    done = subprocess.run(["bash", str(SAMPLES / "base-images.sh")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr


def demo(name: str, *options: str, env: dict | None = None, timeout: float = 1200
         ) -> subprocess.CompletedProcess:
    return subprocess.run([*QTBUILD, "demo", name, *options], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_a_missing_base_image_is_named_at_once_with_its_fix():
    result = demo("bank-card", env={**os.environ, "BASE": "qtbuild-test/no-such-base:1"}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("qtbuild: error: demo bank-card cannot start; it needs the base image "
                             "qtbuild-test/no-such-base:1 in the Docker daemon: create it with "
                             f"`bash {SAMPLES / 'base-images.sh'}` (debootstrap, a few minutes) or "
                             "`docker pull qtbuild-test/no-such-base:1`\n")


def test_an_unreachable_docker_daemon_is_named_at_once():
    result = demo("hello", env={**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("qtbuild: error: demo hello cannot start; it needs a running Docker daemon "
                                    "(none answers at unix:///nonexistent/docker.sock")
    assert result.stderr.endswith("start dockerd (systemctl start docker) or set DOCKER_HOST to its socket\n")


def test_demo_hello():
    result = demo("hello")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[enclave] hello enclave!" in result.stdout
    assert "demo hello: all steps passed" in result.stdout


@pytest.mark.parametrize("cloud", ["qingtian", "nitro"])
def test_demo_bank_card_seed_workflow_and_refusals(base_image, cloud):
    # The demo's own TMPDIR, so what it leaves behind is visible (and only its own); short, since
    # its vsock sockets live below it and AF_UNIX paths are limited to 107 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="qtd-", dir="/tmp"))
    try:
        result = demo("bank-card", "--cloud", cloud, env={**os.environ, "TMPDIR": str(scratch)})
        leftovers = [path.name for path in scratch.glob("qtbuild-demo-*")]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "decrypted 5 records with an attested KMS call, 4 valid" in out
    assert "Dave Chen    411111******1112     INVALID" in out
    assert "411111111111" not in out.replace("411111******1111", "").replace("411111******1112", "")
    if cloud == "nitro":    # the AWS-shaped flow: AWS's exception names
        assert "refused the changed image: KmsClientError: 400 AccessDeniedException" in out
        assert "refused the same image in debug mode" in out and "ValidationException" in out
        assert "the enclave calls the KMS with AWS KMS's protocol (SigV4, Recipient)" in out
        assert "kms:RecipientAttestation:ImageSha384 = " in out
    else:
        assert "refused the changed image: KmsClientError: 403 KMS.0306" in out
        assert "refused the same image in debug mode" in out and "KMS.4007" in out
        assert "the enclave calls the KMS with Huawei KMS's API" in out
    assert "refused an enclave without proxy routes" in out
    assert f"rehearsing for {cloud}" in out
    assert "local KMS running at https://127.0.0.1:" in out        # kms serve --tls
    assert "issued temporary credentials acting as bank-card-enclave" in out
    assert f"({cloud} document)" in out     # the audit names the document encoding that verified
    assert "demo bank-card: all steps passed" in out
    assert not leftovers  # the demo removed its working directory
