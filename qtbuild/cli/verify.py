"""``qtbuild verify EIF [--pcrN HEX …] [--expect FILE] [--signing-certificate CERT] [--json]``."""

from __future__ import annotations

import sys

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.eif_path import chosen_eif, eif_argument
from qtbuild.cli.errors import EXIT_CHECK_FAILED, InputError
from qtbuild.cli.inputs import read_bounded
from qtbuild.cli.output import emit_json, say
from qtbuild.formats.eif import EifReader
from qtbuild.formats.measure import parse_pcr_hex
from qtbuild.inspect.provenance import MAX_PROVENANCE_FILE, check_provenance, parse_provenance
from qtbuild.inspect.verify import PCR_NAMES, load_certificate, load_expected, verify_eif


@click.command("verify", cls=QtbuildCommand)
@eif_argument
@click.option("--pcr0", help="Expected PCR0 (96 hex digits).")
@click.option("--pcr1", help="Expected PCR1.")
@click.option("--pcr2", help="Expected PCR2.")
@click.option("--pcr8", help="Expected PCR8 (96 zeros: expect an unsigned image).")
@click.option("--expect", "expect_path", type=click.Path(exists=True, dir_okay=False),
              help="Measurements JSON printed earlier by convert/measure/describe, nitro-cli or qt.")
@click.option("--signing-certificate", type=click.Path(exists=True, dir_okay=False),
              help="The image must be signed by this certificate.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
@click.option("--provenance", "provenance_path", type=click.Path(exists=True, dir_okay=False),
              help="A provenance statement (or DSSE envelope) from `convert --provenance`: it must describe this file "
                   "(digests, PCRs) and, when signed, verify with --signing-certificate or the image's certificate.")
@click.option("--repair", is_flag=True,
              help="First rewrite the header from the sections present (fixes the stale signature size nitro-cli's "
                   "sign-eif leaves, drops bytes after the last section); PCRs cannot change.")
def command(eif, eif_path, pcr0, pcr1, pcr2, pcr8, expect_path, signing_certificate, as_json, provenance_path,
            repair) -> None:
    """Check structure, CRC and signature, and compare PCRs with expected values.

    Exit 0 when every check holds, 1 with a per-check report when one fails, 2 on bad input.
    Options override values from --expect.
    """
    eif = chosen_eif(eif, eif_path)
    if repair:
        _repair(eif)
    expected = load_expected(expect_path) if expect_path else {}
    for name, value in zip(PCR_NAMES, (pcr0, pcr1, pcr2, pcr8), strict=True):
        if value is not None:
            expected[name] = parse_pcr_hex(value, f"--{name.lower()}")
    certificate = load_certificate(signing_certificate) if signing_certificate else None
    provenance = None
    if provenance_path:
        raw = read_bounded(provenance_path, MAX_PROVENANCE_FILE, "not a provenance statement")
        provenance = parse_provenance(raw, provenance_path)
    with EifReader.open(eif) as reader:
        report = verify_eif(reader, expected=expected, certificate=certificate)
    if provenance is not None:
        report.checks += check_provenance(eif, provenance, report.measurements, certificate=certificate,
                                          image_certificate=report.signing_certificate)
    for warning in report.warnings:
        say(f"warning: {warning}")
    if as_json:
        emit_json(report.as_json())
    else:
        for check in report.checks:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[check.ok]
            click.echo(f"{mark} {check.name}: {check.detail}")
        click.echo("verified" if report.valid else "verification FAILED")
    if not report.valid:
        sys.exit(EXIT_CHECK_FAILED)


def _repair(eif: str) -> None:
    from qtbuild.inspect.repair import repair_eif, repairs_needed

    with EifReader.open(eif) as reader:
        needed, unsafe = repairs_needed(reader)
        if unsafe:
            raise InputError(f"{eif}: not repaired: {'; '.join(unsafe)} — rebuild the image")
        if needed:
            repair_eif(reader, eif)
    for item in needed:
        say(f"repaired {eif}: {item}")
    if not needed:
        say(f"{eif}: nothing to repair")
