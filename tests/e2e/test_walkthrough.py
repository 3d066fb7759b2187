"""docs/first-enclave-app.md, run as written: its ``file=`` blocks are written and its ``sh`` blocks
run in order in one bash (``set -euo pipefail``), from an empty directory, with qtbuild's state,
runtime directory and KMS isolated in that directory — so the walkthrough cannot rot.

Needs root and the Docker daemon, like the demos (tests/e2e/test_demo.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qtbuild.runtime.enclave.state import RuntimeDir

REPO = Path(__file__).resolve().parents[2]
WALKTHROUGH = REPO / "docs" / "first-enclave-app.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TAGS = ("my-first-enclave:1", "my-first-enclave:2")


def blocks(text: str) -> tuple[dict[str, str], list[str]]:
    """({path: content} of the ``file=PATH`` blocks, [the ``sh`` blocks in order])."""
    files, scripts = {}, []
    for info, body in FENCE.findall(text):
        words = info.split()
        attributes = dict(word.split("=", 1) for word in words[1:] if "=" in word)
        if "file" in attributes:
            files[attributes["file"]] = body
        elif words == ["sh"]:
            scripts.append(body)
    return files, scripts


def test_the_walkthrough_has_its_parts():
    text = WALKTHROUGH.read_text()
    files, scripts = blocks(text)
    assert set(files) == {"app/app.py", "app/Dockerfile"}
    assert len(files["app/app.py"].splitlines()) <= 25
    assert "Never bake a secret into an image" in text
    assert any("qtbuild handoff" in script for script in scripts)
    assert any("kms policy put" in script and "--pcr0-from" in script for script in scripts)


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="walk", dir="/tmp"))  # vsock socket paths must stay short
    yield path
    RuntimeDir(path / "run").unmount()  # as root the runtime mounts a tmpfs for the parent's listeners
    shutil.rmtree(path, ignore_errors=True)


def test_first_enclave_app_walkthrough_runs_as_written(docker_client, workdir):
    if os.geteuid() != 0:
        pytest.skip("the local enclave runtime's e2e flows run as root (CI runs as root)")
    files, scripts = blocks(WALKTHROUGH.read_text())
    for name, content in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(content)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("QTBUILD_VSOCK_") and key != "QTBUILD_KMS_CREDENTIALS"}
    env.update(QTBUILD_STATE_DIR=str(workdir / "state"), QTBUILD_RUNTIME_DIR=str(workdir / "run"),
               QTBUILD_SRC=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    script = "set -euo pipefail\n" + "\n".join(scripts)
    begin = time.monotonic()
    transcript = workdir / "transcript.txt"  # a file, not a pipe: the background KMS and proxy inherit it
    with open(transcript, "wb") as out:
        process = subprocess.Popen(["bash", "-c", script], cwd=workdir, env=env, start_new_session=True,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=1500)
    finally:
        elapsed = time.monotonic() - begin
        if process.poll() is None:
            process.kill()
        subprocess.run([sys.executable, "-m", "qtbuild", "enclave", "stop", "--all"], env=env,
                       capture_output=True, timeout=120, check=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the KMS and proxy, if a step failed before cleanup
        subprocess.run(["docker", "rmi", *TAGS], capture_output=True, timeout=120, check=False)
    logs = "".join(f"\n--- {log.name}\n{log.read_text()[-2000:]}" for log in workdir.glob("*.log"))
    assert process.returncode == 0, transcript.read_text()[-6000:] + logs
    print(f"walkthrough ran in {elapsed:.0f} s")
