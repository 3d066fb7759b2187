"""A throwaway local-enclave runtime for tests: short paths (socket paths must fit sun_path), the
environment pointing at it, and everything released afterwards."""

from __future__ import annotations

import contextlib
import io
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qtbuild.runtime.enclave import Manager, RuntimeDir


@contextlib.contextmanager
def temporary_runtime(prefix: str) -> Iterator[RuntimeDir]:
    """``QTBUILD_RUNTIME_DIR`` and ``QTBUILD_STATE_DIR`` under a fresh ``/tmp/<prefix>…``; on exit
    every enclave is stopped, the runtime's mounts undone and the directory removed."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QTBUILD_RUNTIME_DIR", str(base / "rt"))
        patch.setenv("QTBUILD_STATE_DIR", str(base / "state"))
        patch.delenv("QTBUILD_MAX_ENCLAVES", raising=False)
        try:
            yield RuntimeDir(base / "rt")
        finally:
            Manager().stop_all()
    RuntimeDir(base / "rt").unmount()
    shutil.rmtree(base, ignore_errors=True)


def directory_layer(directory: Path) -> bytes:
    """An uncompressed image layer (tar) of everything under ``directory``, in sorted order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buffer.getvalue()
