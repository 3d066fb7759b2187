"""The samples end to end, as a new user runs them: `qtbuild demo hello` and `qtbuild demo bank-card`.

bank-card is the seed workflow with every role (KMS, object store, signed image, PCR policy,
qt-proxy, attested decryption in a normal-mode enclave) and its refusals.  Needs root, the
Docker daemon and the local debian:bookworm-slim base (scripts/base-images.sh, which the sample
build runs when the base is missing).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

QTBUILD = [sys.executable, "-m", "qtbuild"]


@pytest.fixture(autouse=True)
def needs_root(docker_client):
    if os.geteuid() != 0:
        pytest.skip("the local enclave runtime's e2e demos run as root (CI runs as root)")


def demo(name: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QTBUILD, "demo", name, *options], capture_output=True, text=True, timeout=1200)


def test_demo_hello():
    result = demo("hello")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[enclave] hello enclave!" in result.stdout
    assert "demo hello: all steps passed" in result.stdout


@pytest.mark.parametrize("cloud", ["qingtian", "nitro"])
def test_demo_bank_card_seed_workflow_and_refusals(cloud):
    result = demo("bank-card", "--cloud", cloud)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "decrypted 5 records with an attested KMS call, 4 valid" in out
    assert "Dave Chen    411111******1112     INVALID" in out
    assert "411111111111" not in out.replace("411111******1111", "").replace("411111******1112", "")
    assert "refused the changed image: KmsClientError: 403 KMS.0306" in out
    assert "refused the same image in debug mode" in out and "KMS.4007" in out
    assert "refused an enclave without proxy routes" in out
    assert f"rehearsing for {cloud}" in out
    assert "demo bank-card: all steps passed" in out
    leftovers = subprocess.run(["bash", "-c", "ls -d /tmp/qtbuild-demo-* 2>/dev/null | wc -l"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "0"  # the demo removed its working directory
