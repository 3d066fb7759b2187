"""``qtbuild verify EIF [--pcrN HEX …] [--expect FILE] [--signing-certificate CERT] [--json]``."""

from __future__ import annotations

import sys

import click

from qtbuild.cli.app import EXIT_CHECK_FAILED
from qtbuild.cli.output import emit_json
from qtbuild.formats.eif import EifReader
from qtbuild.formats.measure import parse_pcr_hex
from qtbuild.inspect.verify import PCR_NAMES, load_certificate, load_expected, verify_eif


@click.command("verify")
@click.argument("eif", type=click.Path(dir_okay=False))
@click.option("--pcr0", help="Expected PCR0 (96 hex digits).")
@click.option("--pcr1", help="Expected PCR1.")
@click.option("--pcr2", help="Expected PCR2.")
@click.option("--pcr8", help="Expected PCR8 (96 zeros: expect an unsigned image).")
@click.option("--expect", "expect_path", type=click.Path(exists=True, dir_okay=False),
              help="Measurements JSON printed earlier by convert/measure/describe, nitro-cli or qt.")
@click.option("--signing-certificate", type=click.Path(exists=True, dir_okay=False),
              help="The image must be signed by this certificate.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def command(eif, pcr0, pcr1, pcr2, pcr8, expect_path, signing_certificate, as_json) -> None:
    """Check structure, CRC and signature, and compare PCRs with expected values.

    Exit 0 when every check holds, 1 with a per-check report when one fails, 2 on bad input.
    Options override values from --expect.
    """
    expected = load_expected(expect_path) if expect_path else {}
    for name, value in zip(PCR_NAMES, (pcr0, pcr1, pcr2, pcr8), strict=True):
        if value is not None:
            expected[name] = parse_pcr_hex(value, f"--{name.lower()}")
    certificate = load_certificate(signing_certificate) if signing_certificate else None
    with EifReader.open(eif) as reader:
        report = verify_eif(reader, expected=expected, certificate=certificate)
    if as_json:
        emit_json(report.as_json())
    else:
        for check in report.checks:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[check.ok]
            click.echo(f"{mark} {check.name}: {check.detail}")
        click.echo("verified" if report.valid else "verification FAILED")
    if not report.valid:
        sys.exit(EXIT_CHECK_FAILED)
