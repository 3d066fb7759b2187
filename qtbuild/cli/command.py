"""The click classes every ``qtbuild`` command uses: one error format, one exit-code mapping.

Whatever a command raises while its arguments are parsed or while it runs is reported the same
way — also when a command group is invoked on its own, as tests do:

* a :class:`~qtbuild.cli.errors.CliError`: as it is (``qtbuild: error: <message>``);
* click's usage errors: the same one line plus ``see 'qtbuild X --help'`` (never click's
  three-line usage block); like other click exceptions (a click.File that cannot be opened),
  exit code 2;
* a domain error or OSError: converted by :func:`qtbuild.cli.domain_errors.as_cli_error`;
* Ctrl-C: :class:`~qtbuild.cli.errors.Interrupted` (exit 130, not click's "Aborted!" with 1).

Use ``@click.command(name, cls=QtbuildCommand)`` and ``@click.group(name, cls=QtbuildGroup)``;
commands and groups declared on a QtbuildGroup get these classes automatically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import click

from qtbuild.cli.domain_errors import as_cli_error
from qtbuild.cli.errors import CliError, InputError, Interrupted


class UsageFailure(InputError):
    """A click usage error in the one-line format, with where to look for help."""

    def __init__(self, error: click.UsageError) -> None:
        message = error.format_message().rstrip(".")
        if error.ctx is not None:
            message += f"; see '{error.ctx.command_path} --help'"
        super().__init__(message)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn whatever the body raises into the CLI's errors (see the module docstring)."""
    try:
        yield
    except (CliError, click.exceptions.NoArgsIsHelpError, click.exceptions.Exit, BrokenPipeError):
        # already in shape; NoArgsIsHelpError prints the help, Exit is --help/--version, and click
        # ends quietly when stdout is gone (`qtbuild describe X | head -1`)
        raise
    except click.UsageError as exc:
        raise UsageFailure(exc) from None
    except click.ClickException as exc:
        raise InputError(exc.format_message()) from None
    except (KeyboardInterrupt, click.Abort):
        raise Interrupted() from None
    except Exception as exc:
        error = as_cli_error(exc)
        if error is None:
            raise
        raise error from None


class _ReportedErrors:
    """Mixin: parse and invoke under :func:`reported_errors`."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with reported_errors():
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]

    def invoke(self, ctx: click.Context) -> Any:
        with reported_errors():
            return super().invoke(ctx)  # type: ignore[misc]


class QtbuildCommand(_ReportedErrors, click.Command):
    """A ``qtbuild`` command (see the module docstring)."""


class QtbuildGroup(_ReportedErrors, click.Group):
    """A ``qtbuild`` command group; its subcommands and subgroups are Qtbuild classes too."""

    command_class = QtbuildCommand
    group_class = type  # subgroups: the same class as their parent
