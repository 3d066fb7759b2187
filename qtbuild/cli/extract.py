"""``qtbuild extract EIF -o DIR``."""

from __future__ import annotations

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.output import emit_json, say
from qtbuild.formats.eif import EifReader
from qtbuild.inspect.extract import extract_eif


@click.command("extract", cls=QtbuildCommand)
@click.argument("eif", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(file_okay=False),
              help="New (or empty) directory to create.")
@click.option("--no-unpack", is_flag=True, help="Only write the raw sections; do not unpack ramdisks.")
@click.option("--json", "as_json", is_flag=True, help="Print the extraction report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
def command(eif: str, output_dir: str, no_unpack: bool, as_json: bool, quiet: bool) -> None:
    """Write an image's sections to DIR: kernel, cmdline, metadata.json, signature, and each
    ramdisk as raw .cpio and safely unpacked (no path escapes, no device nodes, no setuid bits;
    owners kept when run as root, setgid bits kept).
    """
    with EifReader.open(eif) as reader:
        report = extract_eif(reader, output_dir, unpack=not no_unpack)
    if as_json:
        emit_json(report)
    unpacked = sum(1 for ramdisk in report["ramdisks"] if ramdisk.get("unpacked"))
    say(f"extracted {len(report['files'])} files and {unpacked} unpacked ramdisks into {output_dir}", quiet=quiet)
    for ramdisk in report["ramdisks"]:
        if ramdisk.get("skipped_devices"):
            say(f"{ramdisk['name']}: {len(ramdisk['skipped_devices'])} device nodes/FIFOs not created", quiet=quiet)
        if ramdisk.get("stripped_setid"):
            say(f"{ramdisk['name']}: setuid bits stripped from {len(ramdisk['stripped_setid'])} files", quiet=quiet)
        if ramdisk.get("unpacked") and not ramdisk.get("owners_kept"):
            say(f"{ramdisk['name']}: file owners not kept (run as root to keep them; the .cpio has them)", quiet=quiet)
        if not ramdisk.get("unpacked"):
            say(f"{ramdisk['name']}: {ramdisk['reason']}", quiet=quiet)
