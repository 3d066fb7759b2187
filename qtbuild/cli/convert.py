"""``qtbuild convert`` and ``qtbuild measure``: container image → EIF / measurements."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import TYPE_CHECKING

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.errors import EXIT_CHECK_FAILED, InputError
from qtbuild.cli.output import emit_json, say
from qtbuild.cli.signing_options import KEY_METAVAR, kms_credentials_option
from qtbuild.errors import ImageError

if TYPE_CHECKING:  # pragma: no cover
    from qtbuild.convert.pipeline import ConvertOptions

SOURCE_HELP = """SOURCE is docker://REF (or a bare REF) for the Docker daemon, docker-archive:PATH for a
`docker save` tarball, oci:DIR[:TAG] for an OCI image layout, oci-archive:PATH[:TAG] for a tar of one
(skopeo, podman save --format oci-archive), registry://HOST/REPO:TAG|@DIGEST for a daemonless
registry pull."""


def _image_options(function):
    """Options shared by convert and measure."""
    decorators = [
        click.argument("source", required=False),
        click.option("--docker-uri", "docker_uri", help="Alias of SOURCE (qt enclave make-img / nitro-cli spelling)."),
        click.option("--docker-dir", "docker_dir", type=click.Path(exists=True, file_okay=False),
                     help="Build this Dockerfile directory through the Docker daemon first, tagged as --docker-uri "
                          "(nitro-cli build-enclave --docker-dir)."),
        click.option("--source", "source_kind",
                     type=click.Choice(["daemon", "archive", "oci", "oci-archive", "registry"]),
                     help="Where a SOURCE without a prefix comes from (default: the Docker daemon)."),
        click.option("--platform", help="linux/amd64 or linux/arm64: which image of a multi-platform index."),
        click.option("--blobs", type=click.Path(exists=True, file_okay=False),
                     help="Real blob directory (bzImage|Image, cmdline, init, *.ko) for a hardware-bootable image; "
                          "default: the local runtime profile."),
        click.option("--cmdline", help="Kernel command line (default: the profile's)."),
        click.option("--cmd-semantics", type=click.Choice(["oci", "nitro"]), default="oci", show_default=True,
                     help="oci: argv = ENTRYPOINT + CMD; "
                          "nitro: CMD if present else ENTRYPOINT (nitro-cli's behaviour)."),
        click.option("--name", "--image-name", "name", help="ImageName in the metadata (default: enclave)."),
        click.option("--version", "--image-version", "image_version",
                     help="ImageVersion in the metadata (default: the image ID)."),
        click.option("--metadata", "metadata_path", type=click.Path(exists=True, dir_okay=False),
                     help="Custom metadata JSON file (<= 4096 bytes)."),
        click.option("--private-key", metavar=KEY_METAVAR,
                     help="EC private key to sign PCR0 (and the provenance) with: a PEM file, a pkcs11: URI "
                          "or a kms:// URI."),
        click.option("--signing-certificate", type=click.Path(exists=True, dir_okay=False),
                     help="Signing certificate (PEM); PCR8 is its hash."),
        kms_credentials_option,
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
    if params["docker_dir"]:
        source = _build_docker_dir(params["docker_dir"], source, params["quiet"], params)
    private_key, certificate = params["private_key"], params["signing_certificate"]
    if (private_key is None) != (certificate is None):
        raise InputError("--private-key and --signing-certificate go together: give both to sign, or neither")
    signer = None
    if private_key:
        from qtbuild.signing_keys import load_signer  # deferred, like the imports below: start-up time

        signer = load_signer(private_key, certificate, kms_credentials=params["kms_credentials"])
    from qtbuild.convert.pipeline import ConvertOptions  # deferred: keeps `qtbuild --help` fast
    from qtbuild.sources.open import with_source_kind

    options = ConvertOptions(output=output, platform=params["platform"], blobs=params["blobs"],
                             cmdline=params["cmdline"], name=params["name"], version=params["image_version"],
                             metadata_path=params["metadata_path"], cmd_semantics=params["cmd_semantics"],
                             signer=signer, quiet=params["quiet"])
    return with_source_kind(source, params["source_kind"]), options


def _build_docker_dir(directory: str, source: str, quiet: bool, params: dict) -> str:
    """Build ``directory`` as the image ``source`` names (a daemon reference) and return the source; the
    built image's save is requested at once (see _save_sent_early)."""
    from qtbuild.sources.docker_build import build_image
    from qtbuild.sources.open import daemon_reference

    tag = daemon_reference(source)
    if tag is None:
        raise InputError(f"--docker-dir builds through the Docker daemon: give --docker-uri a tag such as app:1.0, "
                         f"not {source!r}")
    build_image(directory, tag, log=lambda line: say(line, quiet=quiet))
    from qtbuild.sources.daemon_request import send_early

    with contextlib.suppress(ImageError):  # a --platform the pipeline refuses: it says why
        send_early(tag, _early_platform(params))
    return f"docker://{tag}"


def _print(result, style: str) -> None:
    measurements = result.result.measurements
    if style == "nitro":
        emit_json(measurements.nitro(), sort_keys=True)
    else:
        emit_json(measurements.qingtian(with_pcr1_pcr2=True))


@click.command("convert", cls=QtbuildCommand, epilog=SOURCE_HELP)
@_image_options
@click.option("-o", "--output", "--eif", "--output-file", "output", type=click.Path(dir_okay=False),
              help="EIF file to write (atomically).")
@click.option("--check", "--expect", "expected", type=click.Path(exists=True, dir_okay=False),
              help="Rebuild and compare with an earlier EIF or measurements JSON: "
                   "exit 1 with the differences when the PCRs moved.")
@click.option("--provenance", "provenance_path", type=click.Path(dir_okay=False),
              help="Write an in-toto Statement with SLSA Provenance v1 for the EIF here (a DSSE envelope signed with "
                   "--private-key when one is given); check it later with `qtbuild verify EIF --provenance FILE`.")
def convert_command(output, expected, provenance_path, **params) -> None:
    """Convert a container image into an enclave image file and print its measurements."""
    if not output and not expected:
        raise InputError("no output file: add -o app.eif (or use `qtbuild measure` to only compute PCRs)")
    if provenance_path and not output:
        raise InputError("--provenance describes the written EIF: add -o app.eif")
    with _save_sent_early(params):
        if provenance_path or expected:
            _refuse_overwrites(output, expected, provenance_path)
        # a directory in $TMPDIR only for a --check rebuild with no -o: a convert to -o writes nothing there
        with contextlib.nullcontext(None) if output else tempfile.TemporaryDirectory(prefix="qtbuild-check-") as tmp:
            target = output or os.path.join(str(tmp), "rebuilt.eif")
            source, options = _options(params, target)
            result = _convert(source, options)
            _print(result, params["style"])
            _summary(source, result, params["quiet"], output)
            if provenance_path:
                _write_provenance(provenance_path, target, source, options, result)
                say(f"wrote provenance {provenance_path}" + (" (DSSE, signed)" if options.signer else ""),
                    quiet=params["quiet"])
            if expected and not _rebuild_matches(target, expected):
                sys.exit(EXIT_CHECK_FAILED)


def _refuse_overwrites(output: str | None, expected: str | None, provenance_path: str | None) -> None:
    """Refuse, before any work, an output that would overwrite the ``--check`` reference or another output,
    and a reference that cannot be read."""
    # deferred, and only with --check or --provenance: inspect.check pulls in cryptography.x509, a tenth of a
    # second that a plain convert never needs
    from qtbuild.inspect.check import is_same_file, validate_reference

    if provenance_path and any(is_same_file(provenance_path, other) for other in (output, expected) if other):
        raise InputError(f"--provenance {provenance_path} would overwrite the EIF or the --check reference")
    if expected:
        if output and is_same_file(output, expected):
            raise InputError(f"-o {output} is the --check reference {expected}: writing it would destroy the "
                             "reference; write the rebuild elsewhere (or omit -o)")
        validate_reference(expected)


def _rebuild_matches(rebuilt: str, expected: str) -> bool:
    """Whether the rebuilt EIF has the reference's PCRs (the differences are printed when not)."""
    from qtbuild.inspect.check import check_rebuild

    return check_rebuild(rebuilt, expected)


def _save_sent_early(params: dict) -> contextlib.AbstractContextManager:
    """For an image in the Docker daemon: its save requested now, before the convert pipeline is imported
    (the daemon exports the image for seconds before it sends a byte; see qtbuild.sources.daemon_request),
    and dropped at the end of the block if the convert never got to it.  With --docker-dir the request
    leaves once the image is built (_build_docker_dir).  A null context for other sources."""
    source = params["source"] or params["docker_uri"]
    if not source or params["source_kind"] not in (None, "daemon"):
        return contextlib.nullcontext()
    from qtbuild.sources.open import daemon_source_reference

    ref = daemon_source_reference(source)
    if ref is None:
        return contextlib.nullcontext()
    from qtbuild.sources.daemon_request import sent_early

    try:
        platform = _early_platform(params)
    except ImageError:
        return contextlib.nullcontext()  # the pipeline refuses it, and says why
    return sent_early(None if params["docker_dir"] else ref, platform)


def _early_platform(params: dict):
    """``--platform`` as the pipeline passes it to the daemon source, so that source takes the request sent
    early; None without one; ImageError for one the pipeline refuses."""
    from qtbuild.sources.base import enclave_platform

    return enclave_platform(params["platform"]) if params["platform"] else None


def _write_provenance(path: str, eif: str, source: str, options: ConvertOptions, result) -> None:
    from qtbuild.convert.metadata import source_date_epoch
    from qtbuild.convert.provenance import file_digests, provenance_statement, write_provenance

    epoch = source_date_epoch()
    parameters = {
        "platform": options.platform, "cmdSemantics": options.cmd_semantics, "name": options.name,
        "version": options.version, "cmdline": options.cmdline, "bootProfile": result.profile,
        "customMetadata": file_digests(options.metadata_path) if options.metadata_path else None,
    }
    statement = provenance_statement(
        eif_path=eif, pcrs=result.result.measurements.as_hex(), source=source, parameters=parameters,
        dependencies=result.dependencies, source_date_epoch=int(epoch.timestamp()) if epoch else None,
    )
    write_provenance(path, statement, getattr(options.signer, "private_key", None))


def _convert(source, options):
    from qtbuild.convert.pipeline import convert

    return convert(source, options)


@click.command("measure", cls=QtbuildCommand, epilog=SOURCE_HELP)
@_image_options
def measure_command(**params) -> None:
    """Print the measurements `convert` would produce, without writing a file."""
    with _save_sent_early(params):
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
