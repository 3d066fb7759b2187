"""``qtbuild diff A.eif B.eif [--json]``."""

from __future__ import annotations

import sys

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.errors import EXIT_CHECK_FAILED
from qtbuild.cli.output import emit_json
from qtbuild.formats.eif import EifReader
from qtbuild.inspect.diff import diff_eifs, summary_lines


@click.command("diff", cls=QtbuildCommand)
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def command(a, b, as_json) -> None:
    """Explain the differences between two images: header, sections (and the PCRs they move),
    metadata, and each ramdisk file by file.  Exit 0 identical, 1 different, 2 bad input."""
    with EifReader.open(a) as left, EifReader.open(b) as right:
        report = diff_eifs(left, right)
    if as_json:
        emit_json(report)
    else:
        for line in summary_lines(report):
            click.echo(line)
    if not report["Identical"]:
        sys.exit(EXIT_CHECK_FAILED)
