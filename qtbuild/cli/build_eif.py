"""``qtbuild build-eif``: assemble an EIF from a kernel, a cmdline and ramdisk files.

The low-level tool (like aws-nitro-enclaves-image-format's ``eif_build``) for users who bring
their own blobs; ``qtbuild convert`` builds from container images.
"""

from __future__ import annotations

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.errors import InputError
from qtbuild.cli.output import emit_json, say
from qtbuild.cli.signing_options import KEY_METAVAR, kms_credentials_option
from qtbuild.convert.metadata import load_custom_metadata, make_metadata
from qtbuild.formats.eif_writer import FileSource, write_eif
from qtbuild.signing_keys import load_signer


@click.command("build-eif", cls=QtbuildCommand)
@click.option("--kernel", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Kernel image (bzImage or Image).")
@click.option("--cmdline", required=True, help="Kernel command line.")
@click.option("--ramdisk", "ramdisks", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Ramdisk file (cpio newc); repeat: the first is the bootstrap ramdisk (PCR1), "
                   "the rest the application (PCR2).")
@click.option("-o", "--output", "--output-file", "output", required=True, type=click.Path(dir_okay=False),
              help="EIF file to write (atomically).")
@click.option("--arch", type=click.Choice(["x86_64", "aarch64"]), default="x86_64", show_default=True)
@click.option("--private-key", metavar=KEY_METAVAR,
              help="EC private key to sign PCR0 with: a PEM file, a pkcs11: URI or a kms:// URI.")
@click.option("--signing-certificate", type=click.Path(exists=True, dir_okay=False),
              help="Certificate (PEM) of the signing key; its hash is PCR8.")
@kms_credentials_option
@click.option("--name", "--image-name", "name", default="enclave", show_default=True, help="ImageName in the metadata.")
@click.option("--version", "--image-version", "image_version", default="0.0.0", show_default=True,
              help="ImageVersion in the metadata.")
@click.option("--kernel-version", default="unknown", show_default=True, help="KernelVersion in the metadata.")
@click.option("--metadata", "metadata_path", type=click.Path(exists=True, dir_okay=False),
              help="Custom metadata JSON file (<= 4096 bytes).")
@click.option("--format", "style", type=click.Choice(["qingtian", "nitro"]), default="qingtian", show_default=True,
              help="Shape of the measurements printed on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def command(kernel, cmdline, ramdisks, output, arch, private_key, signing_certificate, kms_credentials, name,
            image_version, kernel_version, metadata_path, style, quiet) -> None:
    """Build an EIF from files and print its measurements (BuildTime from SOURCE_DATE_EPOCH)."""
    if (private_key is None) != (signing_certificate is None):
        raise InputError("--private-key and --signing-certificate go together: give both to sign, or neither")
    metadata = make_metadata(name=name, version=image_version, kernel_version=kernel_version,
                             custom=load_custom_metadata(metadata_path))
    signer = load_signer(private_key, signing_certificate, kms_credentials=kms_credentials) if private_key else None
    with open(kernel, "rb") as handle:
        kernel_bytes = handle.read()
    result = write_eif(
        output, kernel=kernel_bytes, cmdline=cmdline, ramdisks=[FileSource.from_path(path) for path in ramdisks],
        metadata=metadata, arch=arch, signer=signer,
    )
    measurements = result.measurements
    emit_json(measurements.nitro() if style == "nitro" else measurements.qingtian(with_pcr1_pcr2=True),
              sort_keys=style == "nitro")
    signed = ", signed" if signer else ""
    say(f"wrote {output}: {result.size} bytes, {len(result.sections)} sections{signed}", quiet=quiet)
