"""``qtbuild describe EIF``."""

from __future__ import annotations

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.eif_path import chosen_eif, eif_argument
from qtbuild.cli.output import emit_json


@click.command("describe", cls=QtbuildCommand)
@eif_argument
@click.option(
    "--format", "style", type=click.Choice(["full", "nitro", "qingtian"]), default="full", show_default=True,
    help="full: nitro-cli describe-eif's document plus Architecture, BootProfile, Sections, Defects, Notes; "
         "nitro: exactly nitro-cli describe-eif's document; qingtian: {digest, PCR0, PCR8} as qt prints it.",
)
def command(eif: str | None, eif_path: str | None, style: str) -> None:
    """Describe an enclave image: PCRs recomputed from its bytes, CRC, signature, metadata.

    Prints JSON on stdout.  Exit 0 when the image could be read (the checks are reported in the
    document: CheckCRC, SignatureCheck), 2 when it is not a readable EIF.
    """
    # deferred: the reader and its x509 checks cost more than `qtbuild describe --help` may
    from qtbuild.formats.eif import EifReader
    from qtbuild.inspect.describe import describe_eif, nitro_describe, qingtian_measurements

    with EifReader.open(chosen_eif(eif, eif_path)) as reader:
        if style == "qingtian":
            document = qingtian_measurements(reader)
        else:
            document = describe_eif(reader)
            if style == "nitro":
                document = nitro_describe(document)
    emit_json(document)
