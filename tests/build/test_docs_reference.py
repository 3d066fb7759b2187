"""The application developer's docs cover what they use: every public SDK name is in docs/sdk.md,
and every qtbuild command and flag the walkthrough runs exists and is in that command's --help."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click

from qtbuild.cli.app import cli
from qtbuild.runtime import sdk

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_public_sdk_name_is_documented():
    reference = (DOCS / "sdk.md").read_text()
    missing = [name for name in sdk.__all__ if f"`{name}" not in reference and f"## {name}" not in reference]
    assert missing == []


def walkthrough_commands() -> list[list[str]]:
    text = (DOCS / "first-enclave-app.md").read_text()
    commands = []
    for body in re.findall(r"^```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        for line in body.replace("\\\n", " ").splitlines():
            commands.extend(shlex.split(match, comments=True)
                            for match in re.findall(r"(?:^|\$\(|\|)\s*qtbuild\s+([^|;)>]*)", line))
    return commands


def test_every_command_and_flag_the_walkthrough_uses_exists_and_is_documented():
    commands = walkthrough_commands()
    assert len(commands) >= 12
    for words in commands:
        command: click.Command = cli
        # with each command's context_settings, as click's make_context applies them: a bare Context
        # makes click cache a help option without -h on the shared command objects
        context = click.Context(cli, info_name="qtbuild", **cli.context_settings)
        while isinstance(command, click.Group) and words and not words[0].startswith("-"):
            name, words = words[0], words[1:]
            found = command.get_command(context, name)
            assert found is not None, f"qtbuild … {name}: no such command"
            command, context = found, click.Context(found, info_name=name, parent=context, **found.context_settings)
        help_text = command.get_help(context)
        for word in words:
            if word.startswith("--"):
                assert word.split("=")[0] in help_text, f"{context.command_path}: {word} not in --help"
