"""Build qtbuild's wheel from a copy of the work tree (offline, no build isolation)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

#: What the build reads besides pyproject.toml and README.md.
FOLDERS = ("qtbuild", "formats", "runtime")


def build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of a copy of the project at ``source`` (the copy keeps build/ and
    *.egg-info out of the work tree); return its path."""
    work = out / "src"
    copy_project(source, work)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(out / "dist"), str(work)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (out / "dist").glob("qtbuild-*.whl")
    return wheel


def copy_project(source: Path, target: Path) -> None:
    """What the build reads: pyproject.toml, README.md and the three folders (no caches)."""
    target.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(source / name, target / name)
    for folder in FOLDERS:
        shutil.copytree(source / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
