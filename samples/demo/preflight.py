"""What a demo needs, checked in a second before it starts rather than discovered minutes in.

:func:`missing` returns one sentence per missing piece, each naming its fix; ``qtbuild demo``
does not start while the list is not empty.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1]
#: The base the bank-card image builds FROM (build.sh's ``BASE`` overrides it, as here).
BASE_IMAGE = "debian:bookworm-slim"
#: The bank-card demo's object store (moto's server mode, which runs on flask) and its S3 client.
OBJECT_STORE_MODULES = ("moto", "boto3", "flask", "flask_cors")
DOCKER_TIMEOUT = 15


def missing(name: str) -> list[str]:
    """What demo ``name`` (hello or bank-card) lacks on this machine; empty when it can run."""
    problems = _sample_files(name)
    if name == "bank-card":
        problems += _python_modules()
    if not (shutil.which("busybox") or os.access("/bin/busybox", os.X_OK)):
        problems.append("busybox, which the sample images are built with: apt-get install busybox-static")
    daemon = _docker_daemon()
    if daemon:
        problems.append(daemon)
    elif name == "bank-card":
        problems += _base_image()
    return problems


def _sample_files(name: str) -> list[str]:
    wanted = [SAMPLES / "build.sh", SAMPLES / name / "Dockerfile"]
    absent = [str(path) for path in wanted if not path.is_file()]
    if not absent:
        return []
    return [f"{', '.join(absent)}: use the whole samples/ directory of a qtbuild source checkout"]


def _python_modules() -> list[str]:
    absent = [module for module in OBJECT_STORE_MODULES if importlib.util.find_spec(module) is None]
    if not absent:
        return []
    return [f"the Python packages {', '.join(absent)} for the object store (moto's server mode) and its "
            "S3 client, in the Python that runs qtbuild: pip install 'qtbuild[demo]'"]


def _docker_daemon() -> str | None:
    """None when the docker CLI reaches a daemon, else what is wrong and how to fix it."""
    if shutil.which("docker") is None:
        return "the docker command (the samples are built with `docker build`): apt-get install docker.io"
    try:
        answer = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                                text=True, timeout=DOCKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        answer = None
    if answer is not None and answer.returncode == 0:
        return None
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    reason = answer.stderr.strip().splitlines()[-1] if answer is not None and answer.stderr.strip() else "no answer"
    return (f"a running Docker daemon (none answers at {where}: {reason}): start dockerd "
            "(systemctl start docker) or set DOCKER_HOST to its socket")


def _base_image() -> list[str]:
    base = os.environ.get("BASE") or BASE_IMAGE
    found = subprocess.run(["docker", "image", "inspect", base], capture_output=True, timeout=DOCKER_TIMEOUT)
    if found.returncode == 0:
        return []
    return [f"the base image {base} in the Docker daemon: create it with `bash {SAMPLES / 'base-images.sh'}` "
            f"(debootstrap, a few minutes) or `docker pull {base}`"]
