"""``qtbuild sdk export DIR``: copy the enclave SDK into DIR as the package ``qtbuild_sdk/``.

The package is ``runtime/sdk/*.py`` (+ its README.md) and ``runtime/vsock.py``, with imports
rewritten so it is self-contained: ``runtime.sdk.X`` → ``.X``, ``runtime.vsock`` / ``..vsock``
→ ``.vsock``.  Any other import of qtbuild, formats or runtime is an :class:`ExportError`, so
an export never silently depends on the rest of qtbuild.  It needs only the standard library,
``cbor2`` and ``cryptography`` at run time (Debian bookworm: python3-cbor2, python3-cryptography).

``DIR`` is created if missing.  An existing ``DIR/qtbuild_sdk`` is replaced only if it is a
previous export (it holds the :data:`MARKER` file); anything else there is an ExportError.
"""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import click

import runtime
from qtbuild import __version__
from qtbuild.cli.app import InputError
from qtbuild.cli.output import say

PACKAGE = "qtbuild_sdk"
MARKER = ".qtbuild-sdk-export"
#: Top-level packages of this project: an exported module may not import them.
PROJECT_PACKAGES = frozenset({"runtime", "formats", "qtbuild"})


class ExportError(Exception):
    """The SDK cannot be exported (an import outside the SDK, or DIR is unsuitable)."""


@click.group("sdk")
def command() -> None:
    """The enclave SDK (security module, vsock, KMS recipient helpers) for use inside images."""


@command.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
def export(directory: str) -> None:
    """Write the SDK into DIRECTORY/qtbuild_sdk/ (self-contained; prints its path)."""
    try:
        package = export_sdk(Path(directory))
    except ExportError as exc:
        raise InputError(str(exc)) from None
    say(f"SDK exported to {package} (import qtbuild_sdk with {package.parent} on sys.path)")
    click.echo(str(package))


# --------------------------------------------------------------------------- export


def sdk_sources() -> list[tuple[Path, str]]:
    """(source file, package it lives in: "sdk" or "runtime") of everything exported."""
    runtime_dir = Path(runtime.__file__).resolve().parent
    modules = sorted((runtime_dir / "sdk").glob("*.py"))
    return [(path, "sdk") for path in modules] + [(runtime_dir / "vsock.py", "runtime")]


def export_sdk(directory: Path) -> Path:
    """Write ``directory/qtbuild_sdk`` (replacing a previous export); return its path."""
    directory.mkdir(parents=True, exist_ok=True)
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
    for path, home in sdk_sources():
        source = path.read_bytes()
        rewritten = rewrite_imports(source, home=home, filename=str(path))
        compile(rewritten, str(path), "exec", dont_inherit=True)
        (target / path.name).write_bytes(rewritten)
    readme = Path(runtime.__file__).resolve().parent / "sdk" / "README.md"
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


# --------------------------------------------------------------------------- import rewriting


def rewrite_imports(source: bytes, *, home: str, filename: str = "<sdk>") -> bytes:
    """``source`` with its SDK-internal imports made relative to the flat exported package.

    ``home`` is the package the file lives in ("sdk" for runtime/sdk, "runtime" for
    runtime/vsock.py), which gives relative imports their meaning.  ExportError for an import
    of the project outside the SDK.
    """
    tree = ast.parse(source, filename)
    offsets = _line_offsets(source)
    edits = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            replacement = _rewritten(node, home, filename)
            if replacement is not None:
                start = offsets[node.lineno - 1] + node.col_offset
                end = offsets[node.end_lineno - 1] + node.end_col_offset
                edits.append((start, end, replacement.encode()))
    for start, end, text in sorted(edits, reverse=True):
        source = source[:start] + text + source[end:]
    return source


def _line_offsets(source: bytes) -> list[int]:
    """Byte offset of the start of each line (ast column offsets are UTF-8 bytes)."""
    offsets, position = [], 0
    for line in source.splitlines(keepends=True):
        offsets.append(position)
        position += len(line)
    return offsets + [position]


def _rewritten(node: ast.Import | ast.ImportFrom, home: str, filename: str) -> str | None:
    """The replacement statement for ``node``, None to keep it; ExportError if not exportable."""
    if isinstance(node, ast.Import):
        return _rewritten_import(node, filename)
    target = _resolve(node.module, node.level, home)
    local = _local_module(target, [alias.name for alias in node.names])
    if local is None:
        _refuse_if_project(target, node, filename)
        return None
    if node.level == 1 and (node.module or "") == local:
        return None  # already a sibling import
    return ast.unparse(ast.ImportFrom(module=local or None, names=node.names, level=1))


def _resolve(module: str | None, level: int, home: str) -> str:
    """The absolute dotted name a (possibly relative) ``from`` import refers to."""
    if level == 0:
        return module or ""
    package = {"sdk": ["runtime", "sdk"], "runtime": ["runtime"]}[home]
    if level > len(package):
        return "." * level + (module or "")  # beyond the project: refused below
    base = package[: len(package) - level + 1]
    return ".".join(base + ([module] if module else []))


def _local_module(target: str, names: list[str]) -> str | None:
    """For ``from target import names``: the module within the export ("" for the package
    itself), or None when ``target`` is not part of the SDK."""
    if target == "runtime.vsock":
        return "vsock"
    if target.startswith("runtime.sdk."):
        return target.removeprefix("runtime.sdk.")
    if target == "runtime.sdk" or (target == "runtime" and names == ["vsock"]):
        return ""
    return None


def _refuse_if_project(target: str, node: ast.AST, filename: str) -> None:
    """ExportError if ``target`` is in the project (or above it) but not in the SDK."""
    if target.startswith(".") or target.split(".")[0] in PROJECT_PACKAGES:
        raise ExportError(f"{filename}:{node.lineno}: imports {target!r}, which is outside the SDK")


def _rewritten_import(node: ast.Import, filename: str) -> str | None:
    """``import runtime.vsock as v`` → ``from . import vsock as v``; other project imports fail."""
    statements, changed = [], False
    for alias in node.names:
        local = _local_module(alias.name, [])
        if not local:
            _refuse_if_project(alias.name, node, filename)
            statements.append(ast.unparse(ast.Import(names=[alias])))
        elif alias.asname is None:
            raise ExportError(f"{filename}:{node.lineno}: write 'import {alias.name} as NAME' "
                              f"or 'from ... import' for SDK modules")
        else:
            statements.append(f"from . import {local} as {alias.asname}")
            changed = True
    return "; ".join(statements) if changed else None
