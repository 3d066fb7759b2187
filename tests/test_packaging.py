"""The wheel owns the ``qtbuild`` import name only and ships every module of the three folders.

pyproject.toml lists packages explicitly (formats/ and runtime/ install as qtbuild.formats and
qtbuild.runtime), so a new subpackage missing from that list would silently be left out of the
wheel: building one here (offline, no build isolation) and comparing it with the tree catches it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from helpers.wheel_build import build_wheel, copy_project

ROOT = Path(__file__).resolve().parent.parent
#: Folder in the repository → where its files land in the wheel.
FOLDERS = {"qtbuild": "qtbuild", "formats": "qtbuild/formats", "runtime": "qtbuild/runtime"}
DATA_FILES = ["runtime/sdk/README.md"]


def wheel_problems(wheel: Path, tree: Path) -> list[str]:
    """What is wrong with ``wheel`` as the build of ``tree``, one line each."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = next((archive.read(n).decode().split() for n in names if n.endswith(".dist-info/top_level.txt")),
                         None)
    problems = []
    installed = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    if installed != {"qtbuild"}:
        problems.append(f"the wheel installs top-level names {sorted(installed)}, not only 'qtbuild'")
    if top_level not in (None, ["qtbuild"]):
        problems.append(f"top_level.txt names {top_level}, not only 'qtbuild'")
    sources = [path for folder in FOLDERS for path in (tree / folder).rglob("*.py") if "__pycache__" not in path.parts]
    expected = {_in_wheel(path.relative_to(tree)): path for path in [*sources, *(tree / data for data in DATA_FILES)]}
    for name, path in sorted(expected.items()):
        if name not in names:
            problems.append(f"{path.relative_to(tree)} is not in the wheel (as {name}): "
                            "is its package in pyproject.toml's packages list?")
    return problems


def _in_wheel(relative: Path) -> str:
    folder, *rest = relative.parts
    return "/".join([FOLDERS[folder], *rest])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_the_wheel_installs_only_qtbuild_and_every_module(wheel):
    problems = wheel_problems(wheel, ROOT)
    assert not problems, "\n".join(problems)


def test_a_subpackage_missing_from_the_packages_list_is_caught(tmp_path):
    tree = tmp_path / "tree"
    copy_project(ROOT, tree)
    (tree / "runtime" / "newpart").mkdir()
    (tree / "runtime" / "newpart" / "__init__.py").write_text("")
    (tree / "runtime" / "newpart" / "thing.py").write_text("VALUE = 1\n")
    problems = wheel_problems(build_wheel(tree, tmp_path / "build"), tree)
    assert problems == [
        "runtime/newpart/__init__.py is not in the wheel (as qtbuild/runtime/newpart/__init__.py): "
        "is its package in pyproject.toml's packages list?",
        "runtime/newpart/thing.py is not in the wheel (as qtbuild/runtime/newpart/thing.py): "
        "is its package in pyproject.toml's packages list?",
    ]
