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
from qtbuild.formats.launch_record import LAUNCH_LAYOUT_VERSION
from qtbuild.formats.measure import ZERO_PCR
from qtbuild.inspect.diff import diff_eifs, launch_layout_line, summary_lines
from qtbuild.inspect.verify import load_expected

MEASURED = ("PCR0", "PCR1", "PCR2")


def validate_reference(expected: str | os.PathLike) -> None:
    """Read and validate the expectation before anything is built (FormatError when unusable)."""
    if _is_eif(expected):
        with EifReader.open(expected) as reader:
            reader.check_stream()
    else:
        load_expected(expected)


def is_same_file(output: str | os.PathLike, expected: str | os.PathLike) -> bool:
    """True when writing ``output`` would replace ``expected`` (same path, a symlink or a hard link to it)."""
    if os.path.realpath(output) == os.path.realpath(expected):
        return True
    try:
        return os.path.samefile(output, expected)
    except OSError:  # output does not exist yet
        return False


def _is_eif(path: str | os.PathLike) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def check_rebuild(rebuilt: str | os.PathLike, expected: str | os.PathLike) -> bool:
    """True when the rebuilt image reproduces ``expected``; the differences go to stderr."""
    if _is_eif(expected):
        with EifReader.open(expected) as old, EifReader.open(rebuilt) as new:
            report = diff_eifs(old, new)
        moved = [name for name in report["Measurements"]["Moved"] if name in MEASURED or _signed_both(report)]
        lines = summary_lines(report) if moved else []
        if moved and "LaunchLayout" in report:
            layouts = report["LaunchLayout"]
            click.echo(f"note: {launch_layout_line(layouts['A'], layouts['B'])}", err=True)
    else:
        wanted = load_expected(expected)
        with EifReader.open(rebuilt) as new:
            actual = new.check_stream().measurements.as_hex()
        moved = [name for name, value in wanted.items()
                 if (name in MEASURED or value != ZERO_PCR) and actual.get(name, ZERO_PCR.hex()) != value.hex()]
        lines = [f"{name} differs: expected {wanted[name].hex()}, rebuilt {actual.get(name, ZERO_PCR.hex())}"
                 for name in moved]
        if {"PCR0", "PCR2"} & set(moved):
            lines.append(f"the rebuild uses launch layout version {LAUNCH_LAYOUT_VERSION}; a reference built with an "
                         "earlier layout moves PCR0/PCR2 for the same image (CHANGELOG.md); compare with the "
                         "reference EIF to tell")
    if moved:
        click.echo(f"check FAILED: the rebuild does not reproduce {expected} ({', '.join(moved)} moved)", err=True)
        for line in lines:
            click.echo(f"  {line}", err=True)
        return False
    click.echo(f"check passed: the rebuild reproduces the measurements of {expected}", err=True)
    return True


def _signed_both(report: dict) -> bool:
    return "PCR8" in report["Measurements"]["A"] and "PCR8" in report["Measurements"]["B"]
