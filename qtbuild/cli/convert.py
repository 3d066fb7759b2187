"""``qtbuild convert`` and ``qtbuild measure``: container image → EIF / measurements."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TYPE_CHECKING

import click

from qtbuild.cli.app import EXIT_CHECK_FAILED, InputError
from qtbuild.cli.output import emit_json, say
from qtbuild.inspect.check import check_rebuild
from qtbuild.signing_keys import load_signer

if TYPE_CHECKING:  # pragma: no cover
    from qtbuild.convert.pipeline import ConvertOptions

SOURCE_HELP = """SOURCE is docker://REF (or a bare REF) for the Docker daemon, docker-archive:PATH for a
`docker save` tarball, oci:DIR[:TAG] for an OCI image layout, registry://HOST/REPO:TAG|@DIGEST
for a daemonless registry pull."""


def _image_options(function):
    """Options shared by convert and measure."""
    decorators = [
        click.argument("source", required=False),
        click.option("--docker-uri", "docker_uri", help="Alias of SOURCE (qt enclave make-img / nitro-cli spelling)."),
        click.option("--source", "source_kind", type=click.Choice(["daemon", "archive", "oci", "registry"]),
                     help="Where a SOURCE without a prefix comes from (default: the Docker daemon)."),
        click.option("--platform", help="linux/amd64 or linux/arm64: which image of a multi-platform index."),
        click.option("--blobs", type=click.Path(exists=True, file_okay=False),
                     help="Real blob directory (bzImage|Image, cmdline, init, *.ko) for a hardware-bootable image; "
                          "default: the local runtime profile."),
        click.option("--cmdline", help="Kernel command line (default: the profile's)."),
        click.option("--cmd-semantics", type=click.Choice(["oci", "nitro"]), default="oci", show_default=True,
                     help="oci: argv = ENTRYPOINT + CMD; "
                          "nitro: CMD if present else ENTRYPOINT (nitro-cli's behaviour)."),
        click.option("--name", help="ImageName in the metadata (default: enclave)."),
        click.option("--version", "image_version", help="ImageVersion in the metadata (default: the image ID)."),
        click.option("--metadata", "metadata_path", type=click.Path(exists=True, dir_okay=False),
                     help="Custom metadata JSON file (<= 4096 bytes)."),
        click.option("--private-key", type=click.Path(exists=True, dir_okay=False),
                     help="EC private key (PEM) to sign PCR0 with."),
        click.option("--signing-certificate", type=click.Path(exists=True, dir_okay=False),
                     help="Signing certificate (PEM); PCR8 is its hash."),
        click.option("--format", "style", type=click.Choice(["qingtian", "nitro"]), default="qingtian",
                     show_default=True,
                     help="qingtian: {digest, PCR0, PCR1, PCR2, PCR8}; nitro: nitro-cli's {\"Measurements\": …}."),
        click.option("-q", "--quiet", is_flag=True, help="No progress or summary on stderr."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _options(params: dict, output: str | None) -> tuple[str, ConvertOptions]:
    """The source string and ConvertOptions from the shared options (see _image_options)."""
    source, docker_uri = params["source"], params["docker_uri"]
    if source and docker_uri and source != docker_uri:
        raise InputError("give the image either as SOURCE or as --docker-uri, not both")
    source = source or docker_uri
    if not source:
        raise InputError("no image given: qtbuild convert SOURCE -o app.eif (see --help)")
    private_key, certificate = params["private_key"], params["signing_certificate"]
    if (private_key is None) != (certificate is None):
        raise InputError("--private-key and --signing-certificate go together: give both to sign, or neither")
    signer = load_signer(private_key, certificate) if private_key else None
    from qtbuild.convert.pipeline import ConvertOptions  # deferred: keeps `qtbuild --help` fast
    from qtbuild.sources.open import with_source_kind

    options = ConvertOptions(output=output, platform=params["platform"], blobs=params["blobs"],
                             cmdline=params["cmdline"], name=params["name"], version=params["image_version"],
                             metadata_path=params["metadata_path"], cmd_semantics=params["cmd_semantics"],
                             signer=signer, quiet=params["quiet"])
    return with_source_kind(source, params["source_kind"]), options


def _print(result, style: str) -> None:
    measurements = result.result.measurements
    if style == "nitro":
        emit_json(measurements.nitro(), sort_keys=True)
    else:
        emit_json(measurements.qingtian(with_pcr1_pcr2=True))


@click.command("convert", epilog=SOURCE_HELP)
@_image_options
@click.option("-o", "--output", "--eif", "--output-file", "output", type=click.Path(dir_okay=False),
              help="EIF file to write (atomically).")
@click.option("--check", "--expect", "expected", type=click.Path(exists=True, dir_okay=False),
              help="Rebuild and compare with an earlier EIF or measurements JSON: "
                   "exit 1 with the differences when the PCRs moved.")
def convert_command(output, expected, **params) -> None:
    """Convert a container image into an enclave image file and print its measurements."""
    if not output and not expected:
        raise InputError("no output file: add -o app.eif (or use `qtbuild measure` to only compute PCRs)")
    with tempfile.TemporaryDirectory(prefix="qtbuild-check-") as scratch:
        target = output or os.path.join(scratch, "rebuilt.eif")
        source, options = _options(params, target)
        result = _convert(source, options)
        _print(result, params["style"])
        _summary(source, result, params["quiet"], output)
        if expected and not check_rebuild(target, expected):
            sys.exit(EXIT_CHECK_FAILED)


def _convert(source, options):
    from qtbuild.convert.pipeline import convert

    return convert(source, options)


@click.command("measure", epilog=SOURCE_HELP)
@_image_options
def measure_command(**params) -> None:
    """Print the measurements `convert` would produce, without writing a file."""
    source, options = _options(params, None)
    result = _convert(source, options)
    _print(result, params["style"])
    _summary(source, result, params["quiet"])


def _summary(source: str, result, quiet: bool, output: str | None = None) -> None:
    for warning in result.warnings:
        say(f"warning: {warning}", quiet=quiet)
    done = f"wrote {output} ({result.result.size} bytes)" if output else f"measured {result.result.size} bytes"
    say(f"{source}: {result.arch}, image {result.image_id[:19]}, profile {result.profile}, "
        f"argv {result.launch.argv!r}; {done}", quiet=quiet)
