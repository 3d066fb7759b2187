"""``qtbuild proxy -l VSOCK_PORT -a HOST -p PORT`` / ``qtbuild proxy --config proxy.toml``."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import click

from qtbuild.cli.command import QtbuildCommand
from qtbuild.runtime.enclave.state import RuntimeDir
from qtbuild.runtime.proxy import ProxyConfig, Route, load_config, run
from qtbuild.runtime.sdk import vsock


@click.command("proxy", cls=QtbuildCommand)
@click.option("-l", "--vsock-port", type=click.IntRange(0, vsock.VMADDR_PORT_ANY - 1),
              help="vsock port to listen on (qt_proxy -l).")
@click.option("-a", "--remote-addr", "host", help="Remote host to forward to (qt_proxy -a).")
@click.option("-p", "--remote-port", type=click.IntRange(1, 65535), help="Remote TCP port (qt_proxy -p).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML file: [[routes]], [allowlist], limits.")
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
@click.option("-v", "--verbose", is_flag=True, help="Log every connection.")
def command(vsock_port, host, remote_port, config_path, max_connections, idle_timeout, connect_timeout,
            drain_timeout, transport, vsock_dir, verbose) -> None:
    """Forward vsock connections from enclaves to TCP endpoints (runs on the parent, CID 3).

    qt_proxy style: one route from -l/-a/-p.  With --config: the file's routes (plus -l/-a/-p if
    given), its allowlist and limits; command-line limits win.  Stops on SIGTERM/SIGINT after
    draining open streams.  Logs go to stderr.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="qtbuild proxy: %(levelname)s: %(message)s")
    limits = {"max_connections": max_connections, "idle_timeout": idle_timeout,
              "connect_timeout": connect_timeout, "drain_timeout": drain_timeout}
    config = _proxy_config(config_path, _cli_route(vsock_port, host, remote_port), limits)
    run(config, vsock_config=_vsock_config(transport, vsock_dir))


def _cli_route(vsock_port, host, remote_port) -> Route | None:
    given = [value is not None for value in (vsock_port, host, remote_port)]
    if not any(given):
        return None
    if not all(given):
        raise click.UsageError("-l, -a and -p go together")
    return Route(vsock_port, host, remote_port)


def _proxy_config(config_path, route: Route | None, limits: dict) -> ProxyConfig:
    overrides = {key: value for key, value in limits.items() if value is not None}
    extra = (route,) if route else ()
    if config_path is None:
        return ProxyConfig(extra, **overrides)
    config = load_config(config_path)
    return dataclasses.replace(config, routes=config.routes + extra, **overrides)


def _vsock_config(transport, vsock_dir) -> vsock.VsockConfig:
    """From the options and environment.  With no vsock directory named: ``emulated`` means the
    local runtime's root (``<runtime dir>/vsock``, where ``qtbuild run`` puts enclaves; created
    when missing); no transport either means that root when it exists, so the proxy reaches
    local enclaves even on a host that also has a real /dev/vsock, else ``auto``."""
    environ = dict(os.environ)
    if transport:
        environ[vsock.ENV_TRANSPORT] = transport
    if vsock_dir:
        environ[vsock.ENV_DIR] = vsock_dir
    if vsock.ENV_DIR not in environ:
        requested = environ.get(vsock.ENV_TRANSPORT) or vsock.AUTO
        runtime = RuntimeDir.default()
        if requested == vsock.EMULATED:
            runtime.ensure()
            environ[vsock.ENV_DIR] = str(runtime.vsock_root)
        elif requested == vsock.AUTO and runtime.vsock_root.is_dir():
            environ[vsock.ENV_DIR] = str(runtime.vsock_root)
    return vsock.VsockConfig.from_env(environ)
