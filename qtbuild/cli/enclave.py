"""``qtbuild run EIF`` and ``qtbuild enclave start|query|stop|console``: local enclaves, in the
shapes ``qt enclave`` prints (see :mod:`qtbuild.runtime.enclave`).

``run`` / ``enclave start --eif`` print ``{"EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB",
"LaunchMode", "ProcessID", "Status"}`` once the application runs; with ``--attach-console``
(implies ``--debug-mode``) the console follows on stdout and the command exits with the
application's exit status when the enclave stops (Ctrl-C detaches; the enclave keeps running).
``query`` prints a JSON array (``[]`` when none), ``stop`` ``{"EnclaveID", "Terminated"}``
(an array with ``--all``), ``console`` the debug console until the enclave stops or Ctrl-C.

Errors are one line, with qt's error code when there is one (``[E43] CID 4 is already used…``):
exit 2 for refused requests (rules, bad image), 1 when a check or the enclave failed
(CRC, signature, expired certificate, sandbox start).
"""

from __future__ import annotations

import functools
import os
import sys

import click

from qtbuild.cli.app import EXIT_CHECK_FAILED, InputError
from qtbuild.cli.output import emit_json
from qtbuild.runtime.enclave import EnclaveError, Manager, RunOptions
from qtbuild.runtime.enclave.rules import DEFAULT_CPUS, DEFAULT_MEMORY_MIB
from qtbuild.runtime.qtsm.clouds import CLOUDS, DEFAULT_CLOUD

__all__ = ["enclave_group", "run_command"]

_COPY_CHUNK = 64 * 1024


class EnclaveFailed(click.ClickException):
    """A check or the enclave itself failed: one line, exit code 1."""

    exit_code = EXIT_CHECK_FAILED

    def show(self, file=None) -> None:
        click.echo(f"qtbuild: error: {self.format_message()}", err=True)


def _errors(function):
    """Turn EnclaveError into the CLI's one-line errors."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except EnclaveError as exc:
            raise (EnclaveFailed if exc.check_failed else InputError)(str(exc)) from None

    return wrapper


def _run_options(function):
    options = [
        click.option("--cpus", "--cpu-count", "cpus", type=int, default=DEFAULT_CPUS, show_default=True,
                     help="vCPUs (even; a CPU quota locally)."),
        click.option("--mem", "--memory", "mem", type=int, default=DEFAULT_MEMORY_MIB, show_default=True,
                     help="Memory in MiB (≥ 128 and ≥ 4 × the image size); holds the unpacked image too."),
        click.option("--cid", "--enclave-cid", "cid", type=int, help="Enclave CID (default: the first free from 4)."),
        click.option("--debug-mode", is_flag=True, help="Keep the console (and attest with zero PCRs)."),
        click.option("--attach-console", is_flag=True,
                     help="Follow the console on stdout and exit with the application's status (implies --debug-mode)."),
        click.option("--parent-role", metavar="NAME", help="Parent role name measured into PCR3."),
        click.option("--instance-id", metavar="ID", help="Parent instance id measured into PCR4."),
        click.option("--no-limits", is_flag=True, help="Run without memory/CPU/pids cgroup limits (rootless hosts)."),
        click.option("--cloud", type=click.Choice(CLOUDS), default=DEFAULT_CLOUD, show_default=True,
                     help="The cloud to rehearse: security-module device, document shape, chain, PCRs."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command("run")
@click.argument("eif", type=click.Path(dir_okay=False))
@_run_options
def run_command(eif: str, **options) -> None:
    """Run the enclave image EIF locally (local or hardware boot profile: the same file you deploy).

    Parent-side tools reach local enclaves through the emulated vsock root <runtime dir>/vsock,
    e.g. QTBUILD_VSOCK_DIR=/run/qtbuild/vsock QTBUILD_VSOCK_TRANSPORT=emulated qtbuild proxy ...
    """
    _run(eif, **options)


@click.group("enclave")
def enclave_group() -> None:
    """Local enclaves: start, query, stop, console (like `qt enclave`)."""


@enclave_group.command("start")
@click.option("--eif", "--eif-path", "eif", required=True, type=click.Path(dir_okay=False), help="The image to run.")
@_run_options
def start_command(eif: str, **options) -> None:
    """Start an enclave (the same as `qtbuild run EIF`)."""
    _run(eif, **options)


@enclave_group.command("query")
@click.option("--enclave-id", type=int, help="Only this enclave.")
@_errors
def query_command(enclave_id: int | None) -> None:
    """Describe enclaves: a JSON array with Status (Running, Stopped + ExitCode, OOM, Crashed)."""
    emit_json(Manager().query(enclave_id))


@enclave_group.command("stop")
@click.option("--enclave-id", type=int, help="The enclave to stop.")
@click.option("--all", "stop_all", is_flag=True, help="Stop every enclave.")
@_errors
def stop_command(enclave_id: int | None, stop_all: bool) -> None:
    """Stop an enclave (or all) and forget it; also cleans up after a crashed one."""
    if (enclave_id is None) == (not stop_all):
        raise InputError("give exactly one of --enclave-id N and --all")
    manager = Manager()
    emit_json(manager.stop_all() if stop_all else manager.stop(enclave_id))


@enclave_group.command("console")
@click.option("--enclave-id", type=int, required=True, help="The enclave (debug mode only).")
@_errors
def console_command(enclave_id: int) -> None:
    """Follow a debug-mode enclave's console (one reader at a time) until it stops or Ctrl-C."""
    Manager().console(enclave_id, sys.stdout.buffer)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `console | head`: stdout is gone; don't let the exit-time flush complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@_errors
def _run(eif: str, *, cpus: int, mem: int, cid: int | None, debug_mode: bool, attach_console: bool,
         parent_role: str | None, instance_id: str | None, no_limits: bool, cloud: str) -> None:
    options = RunOptions(eif, cpus=cpus, memory_mib=mem, cid=cid, debug=debug_mode or attach_console,
                         attach_console=attach_console, parent_role=parent_role, instance_id=instance_id,
                         no_limits=no_limits, cloud=cloud)
    started = Manager().start(options)
    emit_json(started.summary)
    if not attach_console:
        started.close()
        return
    sys.stdout.flush()
    output = click.get_binary_stream("stdout")
    try:
        while data := started.console.read(_COPY_CHUNK):
            output.write(data)
            output.flush()
        result = started.wait()
    finally:
        started.close()
    sys.exit(result["code"] if result["code"] is not None else EXIT_CHECK_FAILED)
