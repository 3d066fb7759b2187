"""`convert --check`: compare a rebuilt image with what was built before.

The expectation is either an earlier EIF (then a full :mod:`qtbuild.inspect.diff` report names the files
that moved the PCRs) or a measurements document (then the PCR values are compared).  PCR8 is
compared only when the expectation has a non-zero PCR8 (an unsigned rebuild of a signed release
still reproduces PCR0-2).
"""

from __future__ import annotations

import os

import click

from qtbuild.formats.eif import MAGIC, EifReader
from qtbuild.formats.measure import ZERO_PCR
from qtbuild.inspect.diff import diff_eifs, summary_lines
from qtbuild.inspect.verify import load_expected

MEASURED = ("PCR0", "PCR1", "PCR2")


def check_rebuild(rebuilt: str | os.PathLike, expected: str | os.PathLike) -> bool:
    """True when the rebuilt image reproduces ``expected``; the differences go to stderr."""
    with open(expected, "rb") as handle:
        is_eif = handle.read(len(MAGIC)) == MAGIC
    if is_eif:
        with EifReader.open(expected) as old, EifReader.open(rebuilt) as new:
            report = diff_eifs(old, new)
        moved = [name for name in report["Measurements"]["Moved"] if name in MEASURED or _signed_both(report)]
        lines = summary_lines(report) if moved else []
    else:
        wanted = load_expected(expected)
        with EifReader.open(rebuilt) as new:
            actual = new.check_stream().measurements.as_hex()
        moved = [name for name, value in wanted.items()
                 if (name in MEASURED or value != ZERO_PCR) and actual.get(name, ZERO_PCR.hex()) != value.hex()]
        lines = [f"{name} differs: expected {wanted[name].hex()}, rebuilt {actual.get(name, ZERO_PCR.hex())}"
                 for name in moved]
    if moved:
        click.echo(f"check FAILED: the rebuild does not reproduce {expected} ({', '.join(moved)} moved)", err=True)
        for line in lines:
            click.echo(f"  {line}", err=True)
        return False
    click.echo(f"check passed: the rebuild reproduces the measurements of {expected}", err=True)
    return True


def _signed_both(report: dict) -> bool:
    return "PCR8" in report["Measurements"]["A"] and "PCR8" in report["Measurements"]["B"]
