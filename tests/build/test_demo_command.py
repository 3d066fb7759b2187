"""`qtbuild demo`: the demo lives with the samples and says at once what it needs.

The demos themselves run in tests/e2e/test_demo.py (root, Docker); these tests stop before
anything starts.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtbuild.cli import demo as demo_cli
from qtbuild.cli.app import cli

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def invoke(*args: str):
    return CliRunner().invoke(cli, ["demo", *args])


@pytest.fixture(autouse=True)
def no_samples_from_the_environment(monkeypatch):
    monkeypatch.delenv("QTBUILD_SAMPLES", raising=False)


def test_the_demo_is_not_part_of_the_package():
    assert importlib.util.find_spec("qtbuild.demo") is None
    assert (SAMPLES / "demo" / "demo.py").is_file()


def test_from_a_source_tree_the_checkout_samples_are_the_default():
    assert demo_cli.source_tree_samples() == SAMPLES


def test_an_installation_without_samples_says_how_to_give_them(monkeypatch):
    monkeypatch.setattr(demo_cli, "source_tree_samples", lambda: None)  # as from a wheel
    result = invoke("hello")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == ("qtbuild: error: the demo lives with the samples, which this installation of qtbuild "
                             "does not include: pass --samples DIR (or set QTBUILD_SAMPLES) with the samples/ "
                             "directory of a qtbuild source checkout\n")


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_directory_that_is_not_the_samples_is_refused(tmp_path, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("QTBUILD_SAMPLES", str(tmp_path))
        result = invoke("hello")
    else:
        result = invoke("hello", "--samples", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"qtbuild: error: {tmp_path}: not a qtbuild samples directory "
                                    "(no demo/__init__.py)")


def test_missing_python_packages_are_named_with_the_extra_that_brings_them(monkeypatch):
    for module in ("moto", "boto3"):
        monkeypatch.setitem(sys.modules, module, None)  # importlib finds nothing, as when not installed
    result = invoke("bank-card")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("qtbuild: error: demo bank-card cannot start; it needs the Python packages moto, "
                                    "boto3 for the object store (moto's server mode) and its S3 client, in the Python "
                                    "that runs qtbuild: pip install 'qtbuild[demo]'")
    assert result.stderr.count("\n") == 1


def test_the_demo_is_loaded_from_the_samples_directory_given(tmp_path, monkeypatch):
    copy = tmp_path / "samples"
    shutil.copytree(SAMPLES, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "build.sh").unlink()
    result = invoke("hello", "--samples", str(copy))
    assert result.exit_code == 2
    assert f"it needs {copy.resolve() / 'build.sh'}: use the whole samples/ directory" in result.stderr
    assert sys.modules["qtbuild_samples_demo"].__file__ == str(copy.resolve() / "demo" / "__init__.py")
