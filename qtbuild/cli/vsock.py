"""``qtbuild vsock listen PORT`` / ``qtbuild vsock send PORT``: talk to enclaves over vsock by hand.

For development: see what an enclave app sends the parent, or poke an enclave's port, without
writing a client.  Emulated or native vsock, chosen like ``qtbuild proxy`` does (see
``docs/sdk.md``, "vsock variables"): with no ``QTBUILD_VSOCK_*`` variable set, the local
runtime's vsock root — where ``qtbuild run`` puts enclaves — is used.
"""

from __future__ import annotations

import socket
import sys

import click

from qtbuild.cli.command import QtbuildGroup
from qtbuild.cli.output import say
from qtbuild.cli.parent_vsock import parent_vsock_config
from qtbuild.runtime.sdk import vsock

CHUNK = 64 * 1024


def _transport_options(function):
    function = click.option("--vsock-dir", type=click.Path(file_okay=False),
                            help=f"Emulated vsock socket root (default: ${vsock.ENV_DIR}, else the "
                                 "local runtime's).")(function)
    return click.option("--transport", type=click.Choice(vsock.TRANSPORTS),
                        help=f"vsock transport (default: ${vsock.ENV_TRANSPORT} or auto).")(function)


@click.group("vsock", cls=QtbuildGroup)
def command() -> None:
    """Listen on or send to vsock ports by hand (development; emulated or native vsock)."""


@command.command("listen")
@click.argument("port", type=click.IntRange(0, vsock.VMADDR_PORT_ANY - 1))
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Connections to accept before exiting.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Give up (exit 1) when no connection arrives within this many seconds.")
@_transport_options
def listen_command(port, count, timeout, transport, vsock_dir) -> None:
    """Accept connections on vsock PORT (as the parent, CID 3, by default) and copy what each
    peer sends to stdout, until it closes; the peer's CID and port go to stderr."""
    config = parent_vsock_config(transport, vsock_dir)
    listener = vsock.listen(port, config=config)
    say(f"qtbuild vsock: listening on port {port} (cid {listener.cid}, {config.transport})")
    try:
        for _ in range(count):
            try:
                connection, (cid, peer_port) = listener.accept(timeout=timeout)
            except TimeoutError:
                say(f"qtbuild vsock: no connection within {timeout:g} s")
                raise click.exceptions.Exit(1) from None
            say(f"qtbuild vsock: connection from cid {cid} port {peer_port}")
            with connection:
                _copy(connection, sys.stdout.buffer)
            say(f"qtbuild vsock: cid {cid} port {peer_port} closed")
    finally:
        listener.close()


@command.command("send")
@click.argument("port", type=click.IntRange(0, vsock.VMADDR_PORT_ANY - 1))
@click.option("--cid", type=click.IntRange(0, vsock.VMADDR_CID_ANY - 1), default=vsock.PARENT_CID,
              show_default=True, help="The CID to connect to (an enclave's EnclaveCID, or 3: the parent).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds to connect and for each read.")
@_transport_options
def send_command(port, cid, timeout, transport, vsock_dir) -> None:
    """Connect to CID:PORT, send stdin, then copy the peer's answer to stdout until it closes."""
    config = parent_vsock_config(transport, vsock_dir)
    with vsock.connect(cid, port, timeout=timeout, config=config) as connection:
        source = sys.stdin.buffer
        while chunk := (source.read1(CHUNK) if hasattr(source, "read1") else source.read(CHUNK)):
            connection.sendall(chunk)
        connection.shutdown(socket.SHUT_WR)
        _copy(connection, sys.stdout.buffer)


def _copy(connection, out) -> None:
    while data := connection.recv(CHUNK):
        out.write(data)
        out.flush()
