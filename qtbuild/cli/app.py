"""The top-level ``qtbuild`` group: a lazy command table and the console-script entry point.

A command's module is imported only when that command runs (or its ``--help`` is shown), like
pip's ``commands_dict``: ``qtbuild --help`` lists the commands from the summaries in
:data:`COMMANDS` without importing them, so it does not pay for the KMS server, the enclave
manager or x509.  A test checks that each summary is the command's own short help.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

import click

from qtbuild import __version__
from qtbuild.cli.command import QtbuildGroup
from qtbuild.cli.errors import EXIT_CHECK_FAILED, EXIT_INPUT_ERROR, InputError, Interrupted

# Re-exported for code written before the exit codes and errors moved to qtbuild.cli.errors
# (new code imports them from there).
__all__ = ["COMMANDS", "EXIT_CHECK_FAILED", "EXIT_INPUT_ERROR", "CommandTable", "InputError", "cli", "main"]


class CommandEntry(NamedTuple):
    """Where a command lives and the one-line summary ``qtbuild --help`` shows for it."""

    module: str
    attribute: str
    summary: str


COMMANDS: dict[str, CommandEntry] = {
    "attest": CommandEntry("qtbuild.cli.attest", "command",
                           "Attestation documents (AWS Nitro NSM, Huawei QingTian QTSM, local)."),
    "build-eif": CommandEntry("qtbuild.cli.build_eif", "command",
                              "Build an EIF from files and print its measurements (BuildTime from SOURCE_DATE_EPOCH)."),
    "convert": CommandEntry("qtbuild.cli.convert", "convert_command",
                            "Convert a container image into an enclave image file and print its measurements."),
    "demo": CommandEntry("qtbuild.cli.demo", "command",
                         "Run a sample end to end with step-by-step output; everything started is stopped again."),
    "describe": CommandEntry("qtbuild.cli.describe", "command",
                             "Describe an enclave image: PCRs recomputed from its bytes, CRC, signature, metadata."),
    "diff": CommandEntry("qtbuild.cli.diff", "command",
                         "Explain the differences between two images: header, sections (and the PCRs they move), "
                         "metadata, and each ramdisk file by file."),
    "enclave": CommandEntry("qtbuild.cli.enclave", "enclave_group",
                            "Local enclaves: start, query, stop, console (like `qt enclave` / nitro-cli)."),
    "extract": CommandEntry("qtbuild.cli.extract", "command",
                            "Write an image's sections to DIR: kernel, cmdline, metadata.json, signature, and each "
                            "ramdisk as raw .cpio and safely unpacked (no path escapes, no device nodes, no setuid "
                            "bits; owners kept when run as root, setgid bits kept)."),
    "handoff": CommandEntry("qtbuild.cli.handoff", "command",
                            "Hand enclave CID its job and short-lived credentials after it attests; print its result."),
    "kms": CommandEntry("qtbuild.cli.kms", "command",
                        "A local KMS (Huawei KMS REST shapes) with attested-recipient decryption."),
    "measure": CommandEntry("qtbuild.cli.convert", "measure_command",
                            "Print the measurements `convert` would produce, without writing a file."),
    "pcr": CommandEntry("qtbuild.cli.pcr", "command",
                        "Print the PCR value of a file (extend(SHA384(bytes))) or PCR8 of a signing certificate."),
    "pki": CommandEntry("qtbuild.cli.pki", "command",
                        "The local attestation PKI: one root CA, each cloud's intermediates, per-enclave leaves."),
    "proxy": CommandEntry("qtbuild.cli.proxy", "command",
                          "Forward vsock connections from enclaves to TCP endpoints (runs on the parent, CID 3)."),
    "run": CommandEntry("qtbuild.cli.enclave", "run_command",
                        "Run the enclave image EIF locally "
                        "(local or hardware boot profile: the same file you deploy)."),
    "sdk": CommandEntry("qtbuild.cli.sdk", "command",
                        "The enclave SDK (security module, vsock, KMS recipient helpers) for use inside images."),
    "sign": CommandEntry("qtbuild.cli.sign", "command",
                         "Add or replace an image's signature (PCR0 signed; PCR8 from the certificate)."),
    "vsock": CommandEntry("qtbuild.cli.vsock", "command",
                          "Listen on or send to vsock ports by hand (development; emulated or native vsock)."),
    "verify": CommandEntry("qtbuild.cli.verify", "command",
                           "Check structure, CRC and signature, and compare PCRs with expected values."),
}


class CommandTable(QtbuildGroup):
    """A group whose commands are imported from :data:`COMMANDS` when first used.

    Commands added with ``add_command`` are served as usual and take precedence.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        return getattr(importlib.import_module(entry.module), entry.attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """click's listing, with summaries from the table instead of imported commands."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))
        rows = []
        for name in names:
            if name in self.commands:
                if not self.commands[name].hidden:
                    rows.append((name, self.commands[name].get_short_help_str(limit)))
            else:  # click's own shortening, applied to the summary
                rows.append((name, click.Command(name, help=COMMANDS[name].summary).get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=CommandTable, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qtbuild")
def cli() -> None:
    """Build, measure, sign, inspect and run enclave image files (EIF)."""


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="qtbuild", standalone_mode=True)
    except KeyboardInterrupt:  # Ctrl-C outside a command (while click starts): the same report
        error = Interrupted()
        error.show()
        sys.exit(error.exit_code)
