"""The enclave side of the proxy (like QingTian qproxy's enclave mode): ``python -m
qtbuild_sdk.proxy [--inbound VSOCK_PORT:TCP_PORT …] [--outbound TCP_PORT:VSOCK_PORT …]
[--allow-peer CID …]``.  Standard library only.

* ``--inbound 5005:8080`` listens on vsock port 5005 and forwards each connection to the
  enclave's own ``127.0.0.1:8080`` — a server inside the enclave becomes reachable from the
  parent's ``qtbuild proxy --inbound TCP:CID:5005``.  Only peers whose CID is allowed
  (``--allow-peer``, default 3 = the parent) are forwarded; others are closed and logged.
* ``--outbound 8000:8000`` listens on ``127.0.0.1:8000`` inside the enclave and forwards each
  connection to the parent (CID 3) vsock port 8000, where ``qtbuild proxy`` continues to the
  internet — so unmodified TCP clients (HTTP libraries) work inside the enclave.  Only the
  configured vsock ports can be reached (the allowlist of this direction).

Stops on SIGTERM/SIGINT.  :class:`EnclaveProxy` is the same thing as a library.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from dataclasses import dataclass

from . import vsock
from .relay import CHUNK, hold, relay

log = logging.getLogger("qtbuild_sdk.proxy")
IDLE_TIMEOUT = 300.0


@dataclass(frozen=True)
class Mapping:
    """One forwarding: ``vsock_port`` of this enclave ↔ ``tcp_port`` on its loopback."""

    vsock_port: int
    tcp_port: int


class EnclaveProxy:
    """Forwarders for ``inbound`` (vsock → local TCP) and ``outbound`` (local TCP → parent vsock)
    mappings; ``await start()``, ``close()``."""

    def __init__(self, inbound=(), outbound=(), *, allowed_peers=(vsock.PARENT_CID,),
                 parent_cid: int = vsock.PARENT_CID, config: vsock.VsockConfig | None = None,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.inbound, self.outbound = tuple(inbound), tuple(outbound)
        self.allowed_peers = frozenset(allowed_peers)
        self.parent_cid, self.config, self.idle_timeout = parent_cid, config, idle_timeout
        self._servers: list[asyncio.Server] = []
        self._listeners: list[vsock.Listener] = []

    async def start(self) -> None:
        try:
            for mapping in self.inbound:
                listener = vsock.listen(mapping.vsock_port, config=self.config)
                self._listeners.append(listener)
                handler = functools.partial(self._inbound, mapping)
                self._servers.append(await vsock.start_server(handler, listener, limit=CHUNK))
                log.info("vsock port %d -> 127.0.0.1:%d", mapping.vsock_port, mapping.tcp_port)
            for mapping in self.outbound:
                handler = functools.partial(self._outbound, mapping)
                self._servers.append(await asyncio.start_server(handler, "127.0.0.1", mapping.tcp_port, limit=CHUNK))
                log.info("127.0.0.1:%d -> cid %d vsock port %d", mapping.tcp_port, self.parent_cid, mapping.vsock_port)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for listener in self._listeners:
            listener.close()

    async def _inbound(self, mapping: Mapping, reader, writer, peer) -> None:
        if peer[0] not in self.allowed_peers:
            log.warning("vsock port %d: peer cid %d refused (allowed: %s)", mapping.vsock_port, peer[0],
                        ", ".join(map(str, sorted(self.allowed_peers))))
            writer.close()
            return
        hold(writer)
        try:
            upstream = await asyncio.open_connection("127.0.0.1", mapping.tcp_port, limit=CHUNK)
        except OSError as exc:
            log.warning("vsock port %d: 127.0.0.1:%d unreachable (%s)", mapping.vsock_port, mapping.tcp_port, exc)
            writer.close()
            return
        await self._relay(reader, writer, *upstream)

    async def _outbound(self, mapping: Mapping, reader, writer) -> None:
        hold(writer)
        try:
            upstream = await vsock.open_connection(self.parent_cid, mapping.vsock_port, timeout=10,
                                                   config=self.config, limit=CHUNK)
        except (OSError, TimeoutError) as exc:
            log.warning("127.0.0.1:%d: parent vsock port %d unreachable (%s)", mapping.tcp_port, mapping.vsock_port,
                        exc or "timed out")
            writer.close()
            return
        await self._relay(reader, writer, *upstream)

    async def _relay(self, reader, writer, up_reader, up_writer) -> None:
        try:
            await relay(reader, writer, up_reader, up_writer, self.idle_timeout)
        finally:
            up_writer.close()
            writer.close()


def _mapping(text: str, order: str) -> Mapping:
    first, separator, second = text.partition(":")
    try:
        a, b = int(first), int(second)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {order.replace(',', ':')}, got {text!r}") from None
    mapping = Mapping(a, b) if order.startswith("VSOCK") else Mapping(b, a)
    if not separator or not (0 <= mapping.vsock_port < vsock.VMADDR_PORT_ANY and 1 <= mapping.tcp_port <= 65535):
        raise argparse.ArgumentTypeError(f"expected {order.replace(',', ':')} (TCP port 1..65535), got {text!r}")
    return mapping


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtbuild_sdk.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--inbound", action="append", default=[], metavar="VSOCK_PORT:TCP_PORT",
                        type=lambda text: _mapping(text, "VSOCK_PORT,TCP_PORT"),
                        help="forward vsock VSOCK_PORT to 127.0.0.1:TCP_PORT in the enclave")
    parser.add_argument("--outbound", action="append", default=[], metavar="TCP_PORT:VSOCK_PORT",
                        type=lambda text: _mapping(text, "TCP_PORT,VSOCK_PORT"),
                        help="forward 127.0.0.1:TCP_PORT to the parent's vsock VSOCK_PORT")
    parser.add_argument("--allow-peer", action="append", type=int, metavar="CID",
                        help="CIDs whose inbound connections are forwarded (default: 3, the parent)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.inbound and not args.outbound:
        parser.error("give at least one --inbound or --outbound")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="qtbuild_sdk.proxy: %(levelname)s: %(message)s")
    proxy = EnclaveProxy(args.inbound, args.outbound, allowed_peers=args.allow_peer or (vsock.PARENT_CID,))
    try:
        asyncio.run(_serve(proxy))
    except OSError as exc:
        print(f"qtbuild_sdk.proxy: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(proxy: EnclaveProxy) -> None:
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        proxy.close()


if __name__ == "__main__":
    sys.exit(main())
