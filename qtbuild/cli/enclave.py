"""``qtbuild run EIF`` and ``qtbuild enclave start|query|stop|console``: local enclaves, in the
shapes ``qt enclave`` prints (see :mod:`qtbuild.runtime.enclave`).

``run`` / ``enclave start --eif`` print ``{"EnclaveID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB",
"LaunchMode", "ProcessID", "Status"}`` once the application runs; with ``--attach-console``
(implies ``--debug-mode``) the console follows on stdout and the command exits with the
application's exit status when the enclave stops (Ctrl-C detaches with exit 130 and says how to
stop the enclave, which keeps running).
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
import threading

import click

import qtbuild.runtime.enclave.shapes as shapes  # a submodule (the package resolves its own names lazily)
from qtbuild.cli.command import QtbuildCommand, QtbuildGroup
from qtbuild.cli.errors import EXIT_CHECK_FAILED, CheckFailed, InputError, Interrupted
from qtbuild.cli.inputs import read_bounded
from qtbuild.cli.output import emit_json
from qtbuild.formats.bounded_input import load_json_object
from qtbuild.runtime.enclave import EnclaveError, Manager, RunOptions
from qtbuild.runtime.enclave.errors import E_INVALID_ARGUMENT
from qtbuild.runtime.enclave.rules import DEFAULT_CPUS, DEFAULT_MEMORY_MIB
from qtbuild.runtime.qtsm.cloud_names import CLOUDS, DEFAULT_CLOUD

__all__ = ["enclave_group", "run_command"]

_COPY_CHUNK = 64 * 1024
#: nitro-cli run-enclave --config files larger than this are not one.
MAX_CONFIG_FILE = 64 * 1024


def _errors(function):
    """Turn EnclaveError into the CLI's one-line errors, with the selected tool's error code."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except EnclaveError as exc:
            fmt = kwargs.get("output_format") or kwargs.get("cloud") or DEFAULT_CLOUD
            error = shapes.in_format(exc, fmt)
            raise (CheckFailed if error.check_failed else InputError)(str(error)) from None

    return wrapper


_FORMAT = click.option("--format", "output_format", type=click.Choice(shapes.FORMATS), default=None,
                       help="JSON shapes: qt's (qingtian) or nitro-cli's (nitro)  [default: the enclave's --cloud].")
#: run-enclave --config keys (nitro-cli's JSON) → our option names.
_CONFIG_KEYS = {"eif_path": "eif", "cpu_count": "cpus", "cpu_ids": "cpu_ids", "memory_mib": "mem",
                "enclave_cid": "cid", "debug_mode": "debug_mode", "attach_console": "attach_console",
                "enclave_name": "enclave_name"}


def _run_options(function):
    options = [
        click.option("--cpus", "--cpu-count", "cpus", type=int, default=DEFAULT_CPUS, show_default=True,
                     help="vCPUs (even; a CPU quota locally)."),
        click.option("--cpu-ids", "cpu_ids", multiple=True, metavar="ID[,ID…]",
                     help="nitro-cli's explicit CPU list (recorded and reported; sets the vCPU count)."),
        click.option("--mem", "--memory", "mem", type=int, default=DEFAULT_MEMORY_MIB, show_default=True,
                     help="Memory in MiB (≥ 128 and ≥ 4 × the image size); holds the unpacked image too."),
        click.option("--cid", "--enclave-cid", "cid", type=int, help="Enclave CID (default: the first free from 4)."),
        click.option("--enclave-name", metavar="NAME", help="A name for the enclave (default: the image file's name)."),
        click.option("--debug-mode", is_flag=True, help="Keep the console (and attest with zero PCRs)."),
        click.option("--attach-console", is_flag=True,
                     help="Follow the console on stdout and exit with the application's status "
                          "(implies --debug-mode)."),
        click.option("--parent-role", metavar="NAME", help="Parent role name measured into PCR3."),
        click.option("--instance-id", metavar="ID",
                     help="Parent instance id measured into PCR4 (QingTian: a UUID; Nitro: i-<17 hex>)."),
        click.option("--no-limits", is_flag=True, help="Run without memory/CPU/pids cgroup limits (rootless hosts)."),
        click.option("--cloud", type=click.Choice(CLOUDS), default=DEFAULT_CLOUD, show_default=True,
                     help="The cloud to rehearse: security-module device, document shape, chain, PCRs."),
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                     help="nitro-cli run-enclave JSON (eif_path, cpu_count, cpu_ids, memory_mib, enclave_cid, "
                          "debug_mode, attach_console, enclave_name) instead of those options."),
        _FORMAT,
    ]
    for option in reversed(options):
        function = option(function)
    return function


@click.command("run", cls=QtbuildCommand)
@click.argument("eif", type=click.Path(dir_okay=False), required=False)
@click.option("--eif-path", "eif_path", type=click.Path(dir_okay=False), help="The image (nitro-cli's spelling).")
@_run_options
@click.pass_context
def run_command(ctx: click.Context, eif: str | None, eif_path: str | None, **options) -> None:
    """Run the enclave image EIF locally (local or hardware boot profile: the same file you deploy).

    Parent-side tools reach local enclaves through the emulated vsock root <runtime dir>/vsock,
    e.g. QTBUILD_VSOCK_DIR=/run/qtbuild/vsock QTBUILD_VSOCK_TRANSPORT=emulated qtbuild proxy ...
    """
    if eif and eif_path and eif != eif_path:
        raise InputError("give the image once: EIF or --eif-path")
    _run(ctx, eif or eif_path, **options)


@click.group("enclave", cls=QtbuildGroup)
def enclave_group() -> None:
    """Local enclaves: start, query, stop, console (like `qt enclave` / nitro-cli)."""


@enclave_group.command("start")
@click.option("--eif", "--eif-path", "eif", type=click.Path(dir_okay=False), help="The image to run.")
@_run_options
@click.pass_context
def start_command(ctx: click.Context, eif: str | None, **options) -> None:
    """Start an enclave (the same as `qtbuild run EIF`)."""
    _run(ctx, eif, **options)


_ENCLAVE_ID = click.option("--enclave-id", metavar="ID",
                           help="The enclave: qt's number or nitro-cli's EnclaveID (i-…-enc…).")
_ENCLAVE_NAME = click.option("--enclave-name", metavar="NAME", help="The enclave, by the name it was started with.")


@enclave_group.command("query")
@_ENCLAVE_ID
@_ENCLAVE_NAME
@_FORMAT
@_errors
def query_command(enclave_id: str | None, enclave_name: str | None, output_format: str | None) -> None:
    """Describe enclaves: a JSON array with Status (Running, Stopped + ExitCode, OOM, Crashed)
    (nitro: describe-enclaves' State and Flags)."""
    manager = Manager()
    wanted = _resolve(manager, enclave_id, enclave_name)
    emit_json([shapes.describe_shape(record, output_format or record.cloud, status)
               for record, status in manager.records() if wanted in (None, record.enclave_id)])


@enclave_group.command("stop")
@_ENCLAVE_ID
@_ENCLAVE_NAME
@click.option("--all", "stop_all", is_flag=True, help="Stop every enclave.")
@_FORMAT
@_errors
def stop_command(enclave_id: str | None, enclave_name: str | None, stop_all: bool, output_format: str | None) -> None:
    """Stop an enclave (or all) and forget it; also cleans up after a crashed one."""
    if (enclave_id is None and enclave_name is None) == (not stop_all):
        raise InputError("give exactly one of --enclave-id N (or --enclave-name) and --all")
    manager = Manager()
    if stop_all:
        targets = [record for record, _ in manager.records()]
    else:
        wanted = _resolve(manager, enclave_id, enclave_name)
        assert wanted is not None  # an id or a name was given (checked above)
        targets = [manager.record(wanted)]
    results = []
    for record in targets:
        manager.stop(record.enclave_id)
        results.append(shapes.terminate_shape(record, output_format or record.cloud))
    emit_json(results if stop_all else results[0])


@enclave_group.command("console")
@_ENCLAVE_ID
@_ENCLAVE_NAME
@click.option("--disconnect-timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop following after this many seconds (nitro-cli's spelling).")
@_errors
def console_command(enclave_id: str | None, enclave_name: str | None, disconnect_timeout: float | None) -> None:
    """Follow a debug-mode enclave's console (one reader at a time) until it stops or Ctrl-C."""
    manager = Manager()
    target = _resolve(manager, enclave_id, enclave_name)
    if target is None:
        raise InputError("give --enclave-id or --enclave-name")
    if disconnect_timeout is None:
        manager.console(target, sys.stdout.buffer)
    else:
        _console_for(manager, target, disconnect_timeout)
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `console | head`: stdout is gone; don't let the exit-time flush complain
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _console_for(manager: Manager, enclave_id: int, seconds: float) -> None:
    """The console for at most ``seconds`` (the reader thread is left behind at exit)."""
    failure: list[EnclaveError] = []

    def follow() -> None:
        try:
            manager.console(enclave_id, sys.stdout.buffer)
        except EnclaveError as exc:
            failure.append(exc)

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    reader.join(seconds)
    if failure:
        raise failure[0]


def _resolve(manager: Manager, enclave_id: str | None, enclave_name: str | None) -> int | None:
    """The local id of the enclave named by qt's number, nitro-cli's EnclaveID or its name."""
    if enclave_id is None and enclave_name is None:
        return None
    if enclave_id is not None and enclave_id.isdigit():
        manager.record(int(enclave_id))  # unknown → error
        return int(enclave_id)
    for record, _ in manager.records():
        if enclave_id is not None and shapes.nitro_enclave_id(record) == enclave_id:
            return record.enclave_id
        if enclave_id is None and shapes.enclave_name(record) == enclave_name:
            return record.enclave_id
    what = f"id {enclave_id}" if enclave_id is not None else f"name {enclave_name!r}"
    raise EnclaveError(f"no enclave with {what}", code=E_INVALID_ARGUMENT)


def _from_config(ctx: click.Context, options: dict) -> dict:
    """``options`` with nitro-cli run-enclave JSON values (which may not be combined with the
    same options on the command line)."""
    path = options.pop("config_path")
    if path is None:
        return options
    given = [name for name in _CONFIG_KEYS.values()
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise InputError(f"--config replaces the run options: drop --{given[0].replace('_', '-')}")
    data = read_bounded(path, MAX_CONFIG_FILE, "not a run-enclave configuration")
    document = load_json_object(data, what=f"--config {path}", error=InputError)
    unknown = sorted(set(document) - set(_CONFIG_KEYS))
    if unknown:
        raise InputError(f"--config {path}: unknown key {unknown[0]!r} (known: {', '.join(_CONFIG_KEYS)})")
    for key, value in document.items():
        options[_CONFIG_KEYS[key]] = value
    return options


def _cpu_ids(values) -> tuple[int, ...] | None:
    if not values:
        return None
    items = values if isinstance(values, list) else ",".join(values).replace(" ", ",").split(",")
    try:
        return tuple(int(item) for item in items if str(item).strip() != "")
    except (TypeError, ValueError):
        raise InputError(f"--cpu-ids: expected CPU numbers, got {values!r}") from None


@_errors
def _run(ctx: click.Context, eif: str | None, **options) -> None:
    options = _from_config(ctx, options)
    eif = options.pop("eif", None) or eif
    if not eif:
        raise InputError("no image: give EIF, --eif-path or eif_path in --config")
    cpu_ids = _cpu_ids(options.pop("cpu_ids"))
    if cpu_ids is not None:
        explicit = ctx.get_parameter_source("cpus") == click.core.ParameterSource.COMMANDLINE
        if explicit and options["cpus"] != len(cpu_ids):
            raise InputError("--cpu-count and --cpu-ids disagree: give one of them")
        options["cpus"] = len(cpu_ids)
    fmt = options.pop("output_format") or options["cloud"]
    attach = bool(options["attach_console"])
    run = RunOptions(eif, cpus=options["cpus"], memory_mib=options["mem"], cid=options["cid"],
                     debug=bool(options["debug_mode"]) or attach, attach_console=attach,
                     parent_role=options["parent_role"], instance_id=options["instance_id"],
                     no_limits=options["no_limits"], cloud=options["cloud"],
                     name=options["enclave_name"] or os.path.splitext(os.path.basename(eif))[0], cpu_ids=cpu_ids)
    manager = Manager()
    try:
        started = manager.start(run)
    except KeyboardInterrupt:  # the supervisor runs in its own session: it may finish starting
        raise Interrupted("the enclave may still be starting: see 'qtbuild enclave query', "
                          "stop it with 'qtbuild enclave stop --enclave-id N'") from None
    emit_json(shapes.run_shape(manager.record(started.summary["EnclaveID"]), fmt, started.summary["Status"]))
    if not attach:
        started.close()
        return
    sys.stdout.flush()
    try:
        result = _follow_console(started)
    except KeyboardInterrupt:
        enclave_id = started.summary["EnclaveID"]
        raise Interrupted(f"detached from the console; enclave {enclave_id} keeps running "
                          f"(stop it with: qtbuild enclave stop --enclave-id {enclave_id})") from None
    sys.exit(result["code"] if result["code"] is not None else EXIT_CHECK_FAILED)


def _follow_console(started) -> dict:
    """Copy the console to stdout until the enclave ends; its exit status."""
    output = sys.stdout.buffer
    assert started.console is not None  # attach mode
    try:
        while data := started.console.read(_COPY_CHUNK):
            output.write(data)
            output.flush()
        return started.wait()
    finally:
        started.close()
