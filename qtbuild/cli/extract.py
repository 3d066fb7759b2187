"""``qtbuild extract EIF -o DIR``."""

from __future__ import annotations

import click

from qtbuild.cli.output import emit_json, say
from qtbuild.formats.eif import EifReader
from qtbuild.inspect.extract import extract_eif


@click.command("extract")
@click.argument("eif", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False),
              help="New (or empty) directory to create.")
@click.option("--no-unpack", is_flag=True, help="Only write the raw sections; do not unpack ramdisks.")
@click.option("--json", "as_json", is_flag=True, help="Print the extraction report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def command(eif: str, output_dir: str, no_unpack: bool, as_json: bool, quiet: bool) -> None:
    """Write an image's sections to DIR: kernel, cmdline, metadata.json, signature, and each
    ramdisk as raw .cpio and safely unpacked (no path escapes, no device nodes, no setuid bits).
    """
    with EifReader.open(eif) as reader:
        report = extract_eif(reader, output_dir, unpack=not no_unpack)
    if as_json:
        emit_json(report)
    say(f"extracted {len(report['files'])} files and {len(report['ramdisks'])} unpacked ramdisks into {output_dir}",
        quiet=quiet)
    for ramdisk in report["ramdisks"]:
        if ramdisk.get("skipped_devices"):
            say(f"{ramdisk['name']}: {len(ramdisk['skipped_devices'])} device nodes/FIFOs not created", quiet=quiet)
        if ramdisk.get("stripped_setid"):
            say(f"{ramdisk['name']}: setuid/setgid bits stripped from {len(ramdisk['stripped_setid'])} files",
                quiet=quiet)
        if not ramdisk.get("unpacked"):
            say(f"{ramdisk['name']}: {ramdisk['reason']}", quiet=quiet)
