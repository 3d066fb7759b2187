"""``qtbuild describe EIF``."""

from __future__ import annotations

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.output import emit_json


@click.command("describe", cls=QtbuildCommand)
@click.argument("eif", type=click.Path(dir_okay=False))
@click.option(
    "--format", "style", type=click.Choice(["nitro", "qingtian"]), default="nitro", show_default=True,
    help="nitro: nitro-cli describe-eif's document plus Sections; qingtian: {digest, PCR0, PCR8}.",
)
def command(eif: str, style: str) -> None:
    """Describe an enclave image: PCRs recomputed from its bytes, CRC, signature, metadata.

    Prints JSON on stdout.  Exit 0 when the image could be read (the checks are reported in the
    document: CheckCRC, SignatureCheck), 2 when it is not a readable EIF.
    """
    # deferred: the reader and its x509 checks cost more than `qtbuild describe --help` may
    from qtbuild.formats.eif import EifReader
    from qtbuild.inspect.describe import describe_eif, qingtian_measurements

    with EifReader.open(eif) as reader:
        document = qingtian_measurements(reader) if style == "qingtian" else describe_eif(reader)
    emit_json(document)
