"""The top-level click group and the error handling every command shares."""

from __future__ import annotations

import errno
import sys

import click

from qtbuild import __version__
from qtbuild.convert.metadata import MetadataError
from qtbuild.errors import ImageError
from qtbuild.formats.errors import FormatError, SignatureError
from qtbuild.inspect.extract import ExtractError

EXIT_CHECK_FAILED = 1
EXIT_INPUT_ERROR = 2


class InputError(click.ClickException):
    """Bad input or usage: printed as one line, exit code 2."""

    exit_code = EXIT_INPUT_ERROR

    def show(self, file=None) -> None:
        click.echo(f"qtbuild: error: {self.format_message()}", err=True)


class QtbuildGroup(click.Group):
    """A click group that turns the project's typed errors into one-line messages and exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (FormatError, SignatureError, ExtractError, ImageError, MetadataError) as exc:
            raise InputError(str(exc)) from None
        except OSError as exc:
            raise InputError(_describe_os_error(exc)) from None


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno == errno.ENOENT:
        hint = " (check the path)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = " (check permissions)"
    elif exc.errno == errno.ENOSPC:
        hint = " (free some disk space)"
    return f"{reason}{where}{hint}"


@click.group(cls=QtbuildGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtbuild")
def cli() -> None:
    """Build, measure, sign, inspect and run enclave image files (EIF)."""


def _register_commands() -> None:
    from qtbuild.cli import (
        attest,
        build_eif,
        convert,
        demo,
        describe,
        diff,
        enclave,
        extract,
        kms,
        pcr,
        pki,
        proxy,
        sdk,
        sign,
        verify,
    )

    for module in (attest, build_eif, demo, describe, diff, extract, kms, pcr, pki, proxy, sdk, sign, verify):
        cli.add_command(module.command)
    cli.add_command(convert.convert_command)
    cli.add_command(convert.measure_command)
    cli.add_command(enclave.run_command)
    cli.add_command(enclave.enclave_group)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="qtbuild", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - interactive
        click.echo("qtbuild: interrupted", err=True)
        sys.exit(130)
