"""Exit codes and the error classes of the ``qtbuild`` command line.

A leaf module: it imports click and nothing of the project, so every command module (and the
top-level group) can import it without importing each other.

Every error the CLI reports is one line on stderr, ``qtbuild: error: <message>``, and the exit
code says what kind of failure it was: 1 a check failed, 2 usage or input error, 130 interrupted.
"""

from __future__ import annotations

import sys

import click

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_INPUT_ERROR = 2
#: 128 + SIGINT: what a shell reports for a command ended by Ctrl-C.
EXIT_INTERRUPTED = 130

PREFIX = "qtbuild"


def error_line(message: str) -> str:
    """The one-line form of an error message (line breaks inside it become spaces)."""
    return f"{PREFIX}: error: {' '.join(message.splitlines())}"


class CliError(click.ClickException):
    """Base class of the CLI's errors: printed as :func:`error_line`, exit code ``exit_code``."""

    exit_code = EXIT_INPUT_ERROR

    def show(self, file=None) -> None:
        click.echo(error_line(self.format_message()), err=True)


class InputError(CliError):
    """Bad input or usage: exit code 2."""

    exit_code = EXIT_INPUT_ERROR


class CheckFailed(CliError):
    """A readable input failed a check (or the thing checked failed): exit code 1."""

    exit_code = EXIT_CHECK_FAILED


class Interrupted(CliError):
    """Ctrl-C (SIGINT): ``qtbuild: interrupted`` plus an optional note, exit code 130."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, note: str = "") -> None:
        super().__init__(note)

    def show(self, file=None) -> None:
        if sys.stderr.isatty():
            click.echo(err=True)  # end the terminal's "^C" line first
        click.echo(f"{PREFIX}: interrupted", err=True)
        if self.message:
            click.echo(f"{PREFIX}: {self.message}", err=True)
