"""``qtbuild demo [hello|bank-card] [--samples DIR] [--keep]``: the samples end to end.

The demo is sample code that lives with the samples (``SAMPLES/demo/``), not in this package.
This command finds the samples directory (``--samples``, ``$QTBUILD_SAMPLES``, else the
checkout's ``samples/`` when qtbuild runs from a source tree), imports the demo from there, asks
it what is missing (Python packages, the Docker daemon, the base image, ...) and refuses at once,
naming each fix, before anything starts.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click

import qtbuild
from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.errors import CheckFailed, InputError, Interrupted

#: The name the samples' demo package is imported under (it is not on sys.path).
DEMO_PACKAGE = "qtbuild_samples_demo"
GET_SAMPLES = "pass --samples DIR (or set QTBUILD_SAMPLES) with the samples/ directory of a qtbuild source checkout"


@click.command("demo", cls=QtbuildCommand)
@click.argument("name", type=click.Choice(["hello", "bank-card"]), default="bank-card")
@click.option("--samples", "samples_dir", type=click.Path(file_okay=False), envvar="QTBUILD_SAMPLES",
              help="The samples directory of a qtbuild checkout [the checkout's samples/ when qtbuild runs from one].")
@click.option("--keep", is_flag=True, help="Keep the demo's working directory (logs, images, keys).")
@click.option("--cloud", type=click.Choice(["qingtian", "nitro"]), default="qingtian", show_default=True,
              help="The cloud profile the enclaves rehearse (security module, document shape, chain).")
def command(name: str, samples_dir: str | None, keep: bool, cloud: str) -> None:
    """Run a sample end to end with step-by-step output; everything started is stopped again.

    hello: build, convert, run in debug mode, read the console, stop.  bank-card: the seed
    workflow — KMS, object store, signed image, PCR policy, proxy, attested decryption — and
    the refusals (changed image, debug mode, no proxy route).  Needs the samples directory, the
    Docker daemon, busybox-static, and for bank-card the `demo` extra (pip install
    'qtbuild[demo]') and the debian:bookworm-slim base image; what is missing is named at once.
    """
    demo = load_demo(samples_directory(samples_dir))
    problems = demo.missing(name)
    if problems:
        raise InputError(f"demo {name} cannot start; it needs " + "; and ".join(problems))
    try:
        demo.DEMOS[name](keep=keep, cloud=cloud)
    except demo.DemoError as exc:
        raise CheckFailed(f"demo {name} failed: {exc}") from None
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        raise CheckFailed(f"demo {name} failed: {type(exc).__name__}: {exc}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"demo {name} stopped everything it had started") from None
    click.echo(f"demo {name}: all steps passed")


def samples_directory(option: str | None) -> Path:
    """The samples directory to use: ``option``, else the source checkout's; InputError if none."""
    if option is None:
        found = source_tree_samples()
        if found is None:
            raise InputError(f"the demo lives with the samples, which this installation of qtbuild does not "
                             f"include: {GET_SAMPLES}")
        return found
    path = Path(option)
    if not (path / "demo" / "__init__.py").is_file():
        raise InputError(f"{path}: not a qtbuild samples directory (no demo/__init__.py): {GET_SAMPLES}")
    return path


def source_tree_samples() -> Path | None:
    """``samples/`` of the source checkout qtbuild runs from (an editable install), else None."""
    root = Path(qtbuild.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "samples" / "demo" / "__init__.py").is_file():
        return root / "samples"
    return None


def load_demo(samples: Path) -> ModuleType:
    """Import ``samples/demo`` (a package) from its files under :data:`DEMO_PACKAGE`."""
    directory = samples.resolve() / "demo"
    for name in [name for name in sys.modules if name == DEMO_PACKAGE or name.startswith(DEMO_PACKAGE + ".")]:
        del sys.modules[name]  # another samples directory may have been loaded before
    spec = importlib.util.spec_from_file_location(DEMO_PACKAGE, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    assert spec is not None and spec.loader is not None  # a .py file always has a spec and a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[DEMO_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[DEMO_PACKAGE]
        raise
    return module
