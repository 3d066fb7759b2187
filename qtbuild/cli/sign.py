"""``qtbuild sign EIF --private-key KEY --signing-certificate CERT [-o OUT]``."""

from __future__ import annotations

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.eif_path import chosen_eif, eif_argument
from qtbuild.cli.output import emit_json, say
from qtbuild.cli.signing_options import KEY_METAVAR, kms_credentials_option
from qtbuild.formats.eif import EifReader
from qtbuild.inspect.sign import sign_eif
from qtbuild.signing_keys import load_signer


@click.command("sign", cls=QtbuildCommand)
@eif_argument
@click.option("--private-key", required=True, metavar=KEY_METAVAR,
              help="EC private key: a PEM file, a pkcs11: URI or a kms:// URI.")
@click.option("--signing-certificate", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Certificate (PEM) of that key.")
@kms_credentials_option
@click.option("-o", "--output", "--output-file", "output", type=click.Path(dir_okay=False),
              help="Write the signed image here (default: replace EIF atomically).")
@click.option("--format", "style", type=click.Choice(["qingtian", "nitro"]), default="qingtian", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def command(eif, eif_path, private_key, signing_certificate, kms_credentials, output, style, quiet) -> None:
    """Add or replace an image's signature (PCR0 signed; PCR8 from the certificate).

    Every other section is kept byte for byte; the header (section table, CRC) is rebuilt.
    """
    eif = chosen_eif(eif, eif_path)
    signer = load_signer(private_key, signing_certificate, kms_credentials=kms_credentials)
    with EifReader.open(eif) as reader:
        replaced = reader.is_signed
        result = sign_eif(reader, output or eif, signer)
    measurements = result.measurements
    emit_json(measurements.nitro() if style == "nitro" else measurements.qingtian(with_pcr1_pcr2=True),
              sort_keys=style == "nitro")
    say(f"{'replaced the signature of' if replaced else 'signed'} {eif} -> {output or eif}", quiet=quiet)
