"""Printing helpers shared by commands: JSON on stdout, messages on stderr."""

from __future__ import annotations

import json

import click


def emit_json(document, *, sort_keys: bool = False) -> None:
    """Print a JSON document on stdout, 2-space indented (nitro-cli's style)."""
    click.echo(json.dumps(document, indent=2, sort_keys=sort_keys, ensure_ascii=False))


def say(message: str, *, quiet: bool = False) -> None:
    """A human-readable line on stderr, unless ``quiet``."""
    if not quiet:
        click.echo(message, err=True)
