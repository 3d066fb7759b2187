"""``qtbuild pcr --input FILE | --signing-certificate CERT.pem`` (like ``nitro-cli pcr``)."""

from __future__ import annotations

import hashlib

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.errors import InputError
from qtbuild.cli.inputs import read_bounded
from qtbuild.cli.output import emit_json
from qtbuild.formats.eif_signature import pcr8_from_certificate
from qtbuild.formats.measure import HASH_ALGORITHM, extend

MAX_CERTIFICATE_FILE = 1 << 20


@click.command("pcr", cls=QtbuildCommand)
@click.option("--format", "style", type=click.Choice(["nitro", "qingtian"]), default="nitro", show_default=True,
              help='nitro: {"PCR": …} / {"PCR8": …} as nitro-cli pcr prints it; qingtian: with "digest": "SHA384" '
                   "as qt's measurement documents have.")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="File whose bytes are measured: prints {\"PCR\": …}.")
@click.option("--signing-certificate", "certificate_path", type=click.Path(dir_okay=False),
              help="PEM certificate: prints the PCR8 an image signed with it has.")
def command(style: str, input_path: str | None, certificate_path: str | None) -> None:
    """Print the PCR value of a file (extend(SHA384(bytes))) or PCR8 of a signing certificate."""
    if (input_path is None) == (certificate_path is None):
        raise InputError("give exactly one of --input FILE or --signing-certificate CERT.pem")
    prefix = {"digest": HASH_ALGORITHM} if style == "qingtian" else {}
    if input_path is not None:
        emit_json({**prefix, "PCR": _file_pcr(input_path)})
        return
    assert certificate_path is not None  # exactly one of the two was given (checked above)
    data = read_bounded(certificate_path, MAX_CERTIFICATE_FILE, "not a certificate file")
    emit_json({**prefix, "PCR8": pcr8_from_certificate(data)})


def _file_pcr(path: str) -> str:
    hasher = hashlib.sha384()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while got := handle.readinto(buffer):
            hasher.update(view[:got])
    return extend(hasher.digest()).hex()
