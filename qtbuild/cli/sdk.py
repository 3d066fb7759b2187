"""``qtbuild sdk export DIR``: copy the enclave SDK into DIR as the package ``qtbuild_sdk/``.

The package is ``runtime/sdk/*.py`` (+ its README.md) and ``runtime/vsock.py``, with imports
rewritten so it is self-contained: ``qtbuild.runtime.sdk.X`` → ``.X``, ``qtbuild.runtime.sdk.vsock`` / ``..vsock``
→ ``.vsock``.  Any other import of qtbuild, formats or runtime is an :class:`ExportError`, so
an export never silently depends on the rest of qtbuild.  It needs only the standard library,
``cbor2`` and ``cryptography`` at run time (Debian bookworm: python3-cbor2, python3-cryptography).

``DIR`` is created if missing, but not its parents: a mistyped path is an :class:`ExportError`,
not a new directory tree.  An existing ``DIR/qtbuild_sdk`` is replaced only if it is a
previous export (it holds the :data:`MARKER` file); anything else there is an ExportError.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import click

import qtbuild.runtime.sdk as sdk_package
from qtbuild import __version__
from qtbuild.cli.command import QtbuildGroup
from qtbuild.cli.output import say

PACKAGE = "qtbuild_sdk"
MARKER = ".qtbuild-sdk-export"
#: Top-level packages of this project: an exported module may not import them.
PROJECT_PACKAGES = frozenset({"qtbuild"})


class ExportError(Exception):
    """The SDK cannot be exported (an import outside the SDK, or DIR is unsuitable)."""


@click.group("sdk", cls=QtbuildGroup)
def command() -> None:
    """The enclave SDK (security module, vsock, KMS recipient helpers) for use inside images."""


@command.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
def export(directory: str) -> None:
    """Write the SDK into DIRECTORY/qtbuild_sdk/ (self-contained; prints its path).

    DIRECTORY is created when missing; its parent must exist.
    """
    package = export_sdk(Path(directory))
    say(f"SDK exported to {package} (import qtbuild_sdk with {package.parent} on sys.path)")
    click.echo(str(package))


# --------------------------------------------------------------------------- export


def sdk_sources() -> list[Path]:
    """The SDK's modules: every ``.py`` file of :mod:`qtbuild.runtime.sdk`."""
    return sorted(Path(sdk_package.__file__).resolve().parent.glob("*.py"))


def export_sdk(directory: Path) -> Path:
    """Write ``directory/qtbuild_sdk`` (replacing a previous export); return its path.

    ``directory`` itself is created when missing (and removed again if the export fails or is
    interrupted); its parent must exist."""
    created = _make_directory(directory)
    try:
        return _export_into(directory)
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise


def _make_directory(directory: Path) -> bool:
    """Create ``directory`` but not its parents; whether it was created here."""
    try:
        directory.mkdir()
    except FileExistsError:
        return False
    except FileNotFoundError:
        raise ExportError(f"{directory}: its parent directory {directory.parent} does not exist "
                          "(only DIR itself is created; create the parent first)") from None
    return True


def _export_into(directory: Path) -> Path:
    final = directory / PACKAGE
    if final.exists() and not (final / MARKER).is_file():
        raise ExportError(f"{final} exists and is not a qtbuild SDK export; remove it first")
    staging = directory / f".{PACKAGE}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_package(staging)
        _swap_in(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _write_package(target: Path) -> None:
    """A plain copy: the SDK imports only its own modules, relatively (checked here)."""
    for path in sdk_sources():
        source = path.read_bytes()
        check_self_contained(source, filename=str(path))
        (target / path.name).write_bytes(source)
    readme = Path(sdk_package.__file__).resolve().parent / "README.md"
    if readme.is_file():
        shutil.copyfile(readme, target / "README.md")
    (target / MARKER).write_text(f"exported by qtbuild {__version__}\n", encoding="utf-8")


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` (if any) by ``staging`` with two renames."""
    retired = final.with_name(f".{PACKAGE}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def check_self_contained(source: bytes, *, filename: str = "<sdk>") -> None:
    """ExportError when ``source`` imports the project absolutely or reaches above the SDK
    package with a relative import: the exported copy could not resolve either."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
            if node.level > 1:
                raise ExportError(f"{filename}:{node.lineno}: relative import above the SDK package")
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if getattr(node, "level", 0) == 0 and name.split(".")[0] in PROJECT_PACKAGES:
                raise ExportError(f"{filename}:{node.lineno}: imports {name!r}, which is outside the SDK")
