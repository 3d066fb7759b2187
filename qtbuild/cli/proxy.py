"""``qtbuild proxy -l VSOCK_PORT -a HOST -p PORT`` / ``qtbuild proxy --config proxy.toml`` /
``qtbuild proxy --inbound [HOST:]TCP_PORT:CID:VSOCK_PORT [--allow-inbound CID:PORT]``."""

from __future__ import annotations

import dataclasses
import logging
import sys

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.cli.parent_vsock import parent_vsock_config
from qtbuild.runtime.proxy import (
    InboundAllow,
    InboundRoute,
    ProxyConfig,
    ProxyConfigError,
    Route,
    load_config,
    parse_config,
    run,
)
from qtbuild.runtime.sdk import vsock


@click.command("proxy", cls=QtbuildCommand)
@click.option("-l", "--vsock-port", type=click.IntRange(0, vsock.VMADDR_PORT_ANY - 1),
              help="vsock port to listen on (qt_proxy -l).")
@click.option("-a", "--remote-addr", "host", help="Remote host to forward to (qt_proxy -a).")
@click.option("-p", "--remote-port", type=click.IntRange(1, 65535), help="Remote TCP port (qt_proxy -p).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML file: [[routes]], [[inbound]], [allowlist], limits.")
@click.option("--max-connections", type=click.IntRange(min=1),
              help="Open connections allowed, all routes together [1024].")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Close a connection idle this many seconds [300].")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to reach the upstream [10].")
@click.option("--drain-timeout", type=click.FloatRange(min=0),
              help="On SIGTERM/SIGINT, seconds open streams may finish [10].")
@click.option("--transport", type=click.Choice(vsock.TRANSPORTS),
              help=f"vsock transport (default: ${vsock.ENV_TRANSPORT} or auto).")
@click.option("--vsock-dir", type=click.Path(file_okay=False),
              help=f"Emulated vsock socket root (default: ${vsock.ENV_DIR}).")
@click.option("--inbound", "inbound", multiple=True, metavar="[HOST:]TCP_PORT:CID:VSOCK_PORT",
              help="Listen on TCP (default host 127.0.0.1) and forward to an enclave's vsock port; repeatable.")
@click.option("--allow-inbound", "allow_inbound", multiple=True, metavar="CID:PORT",
              help="Enclave ports inbound connections may reach (an allowlist); repeatable.")
@click.option("-v", "--verbose", is_flag=True, help="Log every connection.")
def command(vsock_port, host, remote_port, config_path, max_connections, idle_timeout, connect_timeout,
            drain_timeout, transport, vsock_dir, inbound, allow_inbound, verbose) -> None:
    """Forward vsock connections from enclaves to TCP endpoints (runs on the parent, CID 3).

    With --inbound, also TCP connections to enclaves (the enclave runs `python -m qtbuild_sdk.proxy
    --inbound VSOCK_PORT:TCP_PORT`, or listens on vsock itself).

    qt_proxy style: one route from -l/-a/-p.  With --config: the file's routes (plus -l/-a/-p if
    given), its allowlists and limits; command-line limits win.  Stops on SIGTERM/SIGINT after
    draining open streams.  Logs go to stderr.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="qtbuild proxy: %(levelname)s: %(message)s")
    limits = {"max_connections": max_connections, "idle_timeout": idle_timeout,
              "connect_timeout": connect_timeout, "drain_timeout": drain_timeout}
    config = _proxy_config(config_path, _cli_route(vsock_port, host, remote_port), limits, inbound, allow_inbound)
    run(config, vsock_config=parent_vsock_config(transport, vsock_dir))


def _cli_route(vsock_port, host, remote_port) -> Route | None:
    given = [value is not None for value in (vsock_port, host, remote_port)]
    if not any(given):
        return None
    if not all(given):
        raise click.UsageError("-l, -a and -p go together")
    return Route(vsock_port, host, remote_port)


def _inbound_route(text: str) -> InboundRoute:
    parts = text.rsplit(":", 3)
    if len(parts) == 3:
        parts.insert(0, "127.0.0.1")
    try:
        host, tcp_port, cid, vsock_port = parts[0], *map(int, parts[1:])
    except ValueError:
        raise ProxyConfigError(f"--inbound {text!r}: expected [HOST:]TCP_PORT:CID:VSOCK_PORT") from None
    return parse_config({"inbound": [{"listen_host": host, "tcp_port": tcp_port, "cid": cid,
                                      "vsock_port": vsock_port}]}, source="--inbound").inbound[0]


def _inbound_allow(text: str) -> InboundAllow:
    cid, separator, port = text.partition(":")
    if not separator or not cid.isdigit() or not port.isdigit():
        raise ProxyConfigError(f"--allow-inbound {text!r}: expected CID:PORT")
    return InboundAllow(int(cid), int(port))


def _proxy_config(config_path, route: Route | None, limits: dict, inbound: tuple[str, ...] = (),
                  allow_inbound: tuple[str, ...] = ()) -> ProxyConfig:
    """The file's configuration (if any) plus the command line's routes, inbound routes,
    inbound allowlist entries and limits (which win)."""
    overrides = {key: value for key, value in limits.items() if value is not None}
    base = load_config(config_path) if config_path is not None else None
    routes = (base.routes if base else ()) + ((route,) if route else ())
    inbound_routes = (base.inbound if base else ()) + tuple(_inbound_route(text) for text in inbound)
    allowlist = base.inbound_allowlist if base else None
    entries = tuple(_inbound_allow(text) for text in allow_inbound)
    if entries:
        allowlist = (allowlist or ()) + entries
    if base is None:
        return ProxyConfig(routes, inbound=inbound_routes, inbound_allowlist=allowlist, **overrides)
    return dataclasses.replace(base, routes=routes, inbound=inbound_routes, inbound_allowlist=allowlist, **overrides)
