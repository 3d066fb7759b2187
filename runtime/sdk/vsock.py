"""vsock-style stream sockets: one API over native ``AF_VSOCK`` or emulated path-based Unix sockets.

Used by everything that talks between an enclave and its parent (proxy, security module, SDK,
samples).  Standard library only and no imports from this package, so the file can be copied
alone into images built on Debian bookworm's python3 (3.11).

API
    ``connect(cid, port, *, timeout=None, config=None) -> socket.socket``
    ``await open_connection(cid, port, *, timeout=None, config=None) -> (StreamReader, StreamWriter)``
    ``listen(port, *, backlog=..., header_timeout=..., config=None) -> Listener``
    ``Listener.accept(timeout=None) -> (socket.socket, (peer_cid, peer_port))``
    ``await start_server(callback, listener) -> asyncio.Server``; ``callback(reader, writer, (cid, port))``
    ``heartbeat_listen(timeout=..., listener=None)`` / ``send_heartbeat(timeout=...)``
    ``register_enclave(cid, pid)`` / ``unregister_enclave(cid)`` (peer authentication, see below)

Returned sockets are real ``socket.socket`` objects, so blocking code and asyncio both work.
``connect``'s timeout stays on the returned socket (like ``socket.create_connection``); accepted
sockets are blocking.  No listener → ``ConnectionRefusedError`` (emulated) or
``ConnectionResetError`` (native); both are ``ConnectionError``.  Timeouts raise ``TimeoutError``.

Configuration (environment, so code inside and outside the sandbox is identical)
    ``QTBUILD_VSOCK_TRANSPORT`` = ``auto`` (default) | ``emulated`` | ``native``.  ``auto`` picks
    native when ``socket.AF_VSOCK`` exists, ``/dev/vsock`` exists and ``QTBUILD_VSOCK_DIR`` is
    unset; emulated otherwise.
    ``QTBUILD_VSOCK_DIR``: the root of the emulated sockets visible to this process (required
    for the emulated transport).
    ``QTBUILD_VSOCK_CID``: this process's own CID (default 3, the parent).  Under the native
    transport the kernel assigns the CID; the variable (or the ``/dev/vsock`` ioctl) only
    fills ``Listener.cid``.
    ``VsockConfig`` carries the same three values explicitly (``config=`` on every call).

Emulated layout (after Firecracker's path-based convention)
    ``<root>/<cid>/<port>.sock`` is the listener of CID ``cid`` on port ``port``.  ``listen(p)``
    binds ``<root>/<own cid>/<p>.sock`` (creating the CID directory; the socket file is made
    mode 0666: vsock ports have no file permissions); ``connect(c, p)`` connects to
    ``<root>/<c>/<p>.sock`` without following links: the file must be a socket owned by its
    directory's owner or by the caller (a link planted there is refused, never followed).
    Inside an enclave the manager bind-mounts the parent's
    ``<root>/<enclave cid>/`` and ``<root>/3/`` at the same relative places under the enclave's
    own ``QTBUILD_VSOCK_DIR``: the enclave reaches only itself and its parent, never another
    enclave.  Host → enclave connections use the enclave's directory directly, so no
    ``CONNECT <port>`` handshake is needed.  Paths must fit ``sun_path`` (107 bytes).
    ``listen`` replaces a stale socket file (one nobody accepts on) and refuses a live one
    (``EADDRINUSE``) or a non-socket file (``FileExistsError``); ``Listener.close`` unlinks its
    file only if it is still the one it bound.

Source header (emulated only)
    Right after connecting, the client sends 12 bytes: ``b"QTv1"``, its CID and its ephemeral
    port, both big-endian u32.  ``accept`` reads it (waiting at most ``header_timeout``) and
    returns them as the peer address; connections with a short or malformed header (e.g. the
    liveness probe of ``listen``) are dropped silently.  Ephemeral ports mimic Linux vsock: a
    per-process counter starting at a random value in [1024, 2**32 - 2), so they are unique within
    a process and collide across processes only by (harmless) chance.

Peer identity (emulated)
    The header is self-declared.  The manager can make it checked: ``register_enclave(cid, pid)``
    records the network namespace of the enclave's processes in ``<root>/.enclaves/<cid>``
    (outside the directories mounted into enclaves).  While any enclave is registered, a listener
    under that root looks up the connecting process (``SO_PEERCRED`` pid →
    ``/proc/<pid>/ns/net``) and drops the connection if it claims a registered CID from another
    namespace, claims any CID from a registered enclave's namespace other than its own, or its
    namespace cannot be read (fail closed: run such listeners as root or as the manager's user).
    Register before the enclave's app runs.  Without registrations the header is trusted.  Either
    way, attestation — not vsock addressing — is the security boundary.  Native ``AF_VSOCK``
    addresses are set by the hypervisor.

Boot heartbeat
    An enclave's init connects to CID 3 port 9000 and sends ``0xB7``; the parent echoes it.
    ``send_heartbeat`` is the enclave side, ``heartbeat_listen`` the parent side (returns the CID
    that said hello).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import random
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    import asyncio  # imported where used: blocking users (the enclave supervisor) need not load it

ENV_DIR = "QTBUILD_VSOCK_DIR"
ENV_CID = "QTBUILD_VSOCK_CID"
ENV_TRANSPORT = "QTBUILD_VSOCK_TRANSPORT"

AUTO, EMULATED, NATIVE = "auto", "emulated", "native"
TRANSPORTS = (AUTO, EMULATED, NATIVE)

VMADDR_CID_LOCAL = 1
VMADDR_CID_HOST = 2
PARENT_CID = 3
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
FIRST_EPHEMERAL_PORT = 1024
#: Send buffer of an emulated socket, in payload bytes: a virtio-vsock socket's default buffer
#: (Linux ``VIRTIO_VSOCK_DEFAULT_BUF_SIZE``, 256 KiB; the kernel doubles SO_SNDBUF for overhead).
EMULATED_BUFFER = 256 * 1024

HEARTBEAT_PORT = 9000
HEARTBEAT_BYTE = b"\xb7"

HEADER_TIMEOUT = 5.0
_HEADER = struct.Struct("!4sII")
_MAGIC = b"QTv1"
_SUN_PATH_MAX = 107
_REGISTRY = ".enclaves"
_IOCTL_GET_LOCAL_CID = getattr(socket, "IOCTL_VM_SOCKETS_GET_LOCAL_CID", 0x7B9)

Address = tuple[int, int]


class VsockConfigError(ValueError):
    """The vsock configuration (environment or arguments) is unusable."""


# --- configuration -------------------------------------------------------------------------------

def choose_transport(requested: str, *, family_available: bool, device_present: bool, dir_set: bool) -> str:
    """The transport to use: ``requested`` unless it is ``auto``, then native iff the socket family
    and ``/dev/vsock`` exist and no emulation directory is configured."""
    if requested not in TRANSPORTS:
        raise VsockConfigError(f"{ENV_TRANSPORT} must be one of {', '.join(TRANSPORTS)}, not {requested!r}")
    if requested != AUTO:
        return requested
    return NATIVE if family_available and device_present and not dir_set else EMULATED


@dataclass(frozen=True)
class VsockConfig:
    """Which transport, this process's CID, and (emulated) the socket root directory."""

    transport: str
    cid: int = PARENT_CID
    root: str | None = None

    def __post_init__(self) -> None:
        if self.transport not in (EMULATED, NATIVE):
            raise VsockConfigError(f"transport must be {EMULATED!r} or {NATIVE!r}, not {self.transport!r}")
        _check_cid(self.cid)
        if self.transport == EMULATED and not self.root:
            raise VsockConfigError(f"the emulated vsock transport needs a socket directory (set {ENV_DIR})")
        if self.transport == NATIVE and not hasattr(socket, "AF_VSOCK"):
            raise VsockConfigError("the native vsock transport needs socket.AF_VSOCK (Linux)")

    @property
    def emulated_root(self) -> str:
        """``root`` of an emulated configuration (``__post_init__`` refuses one without)."""
        assert self.root is not None, "a native configuration has no socket directory"
        return self.root

    @classmethod
    def from_env(cls, environ=None) -> VsockConfig:
        """The configuration described by ``QTBUILD_VSOCK_*`` in ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        root = env.get(ENV_DIR) or None
        transport = choose_transport(
            env.get(ENV_TRANSPORT) or AUTO,
            family_available=hasattr(socket, "AF_VSOCK"),
            device_present=os.path.exists("/dev/vsock"),
            dir_set=root is not None,
        )
        cid_text = env.get(ENV_CID)
        native = transport == NATIVE
        cid = _parse_cid(cid_text) if cid_text else (local_cid() or PARENT_CID) if native else PARENT_CID
        return cls(transport, cid, root)


def _parse_cid(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise VsockConfigError(f"{ENV_CID} must be a decimal CID, not {text!r}") from None


def _check_cid(cid: int) -> None:
    if not isinstance(cid, int) or not 0 <= cid < VMADDR_CID_ANY:
        raise VsockConfigError(f"CID must be an integer in 0..{VMADDR_CID_ANY - 1}, not {cid!r}")


def _check_port(port: int, *, any_ok: bool = False) -> None:
    limit = VMADDR_PORT_ANY if any_ok else VMADDR_PORT_ANY - 1
    if not isinstance(port, int) or not 0 <= port <= limit:
        raise VsockConfigError(f"vsock port must be an integer in 0..{limit}, not {port!r}")


def local_cid() -> int | None:
    """This machine's CID from ``/dev/vsock`` (native), or None when it cannot be read."""
    try:
        import fcntl

        with open("/dev/vsock", "rb") as device:
            answer = fcntl.ioctl(device, _IOCTL_GET_LOCAL_CID, bytes(4))
    except (OSError, ImportError):
        return None
    return struct.unpack("I", answer)[0]


def _config(config: VsockConfig | None) -> VsockConfig:
    return config if config is not None else VsockConfig.from_env()


# --- emulated addressing -------------------------------------------------------------------------

_ephemeral_counter = itertools.count(random.randrange(VMADDR_PORT_ANY - FIRST_EPHEMERAL_PORT))


def ephemeral_port() -> int:
    """The next source port for an emulated connection (≥ 1024, unique within this process)."""
    return FIRST_EPHEMERAL_PORT + next(_ephemeral_counter) % (VMADDR_PORT_ANY - FIRST_EPHEMERAL_PORT)


def socket_path(root: str, cid: int, port: int) -> str:
    """``<root>/<cid>/<port>.sock``, checked against the ``sun_path`` limit."""
    path = os.path.join(root, str(cid), f"{port}.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise VsockConfigError(f"vsock socket path too long for AF_UNIX ({path}); use a shorter {ENV_DIR}")
    return path


def _root(cfg: VsockConfig) -> str:
    """The emulated socket root (``VsockConfig`` requires one for the emulated transport)."""
    if cfg.root is None:
        raise VsockConfigError(f"the emulated vsock transport needs a socket directory (set {ENV_DIR})")
    return cfg.root


def _new_socket(cfg: VsockConfig) -> socket.socket:
    if cfg.transport == NATIVE:
        return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    return _sized(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))


def _sized(sock: socket.socket) -> socket.socket:
    """An emulated socket may have as many bytes in flight as a virtio-vsock one (see
    EMULATED_BUFFER); the Unix default (net.core.wmem_default, ~208 KiB including each
    buffer's overhead) made every large write wait for the reader several times."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, EMULATED_BUFFER)
    return sock


def _hello(cfg: VsockConfig) -> bytes:
    return _HEADER.pack(_MAGIC, cfg.cid, ephemeral_port()) if cfg.transport == EMULATED else b""


def decode_header(data: bytes) -> Address | None:
    """The (cid, port) announced by an emulated client, or None if ``data`` is not a header."""
    if len(data) != _HEADER.size:
        return None
    magic, cid, port = _HEADER.unpack(data)
    return (cid, port) if magic == _MAGIC else None


@contextlib.contextmanager
def _refused_if_missing(cid: int, port: int):
    try:
        yield
    except FileNotFoundError:
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"no vsock listener at cid {cid} port {port}") from None


# --- connecting ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _socket_file(path: str):
    """``/proc/self/fd/N`` for the socket file at ``path``, valid inside the ``with``.

    AF_UNIX ``connect`` follows symlinks, and the directory of an enclave's listeners is
    written by the enclave: a link ``<port>.sock -> /any/host.sock`` planted there must not
    make the parent connect to a host socket.  So the name is opened with
    ``O_PATH | O_NOFOLLOW`` relative to its directory (which the connecting side chose: the
    enclave cannot replace it), checked to be a socket owned by the directory's owner or by
    us, and the connection goes to that very inode.
    ``FileNotFoundError`` when missing, ``ConnectionRefusedError`` when refused."""
    directory, name = os.path.split(path)
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            found, owner = os.fstat(fd), os.fstat(dir_fd).st_uid
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISSOCK(found.st_mode):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "not a socket (links are not followed)", path)
        if found.st_uid not in (owner, os.geteuid()):
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"socket owned by uid {found.st_uid}, not by its "
                                         f"directory's owner ({owner})", path)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def connect(cid: int, port: int, *, timeout: float | None = None, config: VsockConfig | None = None) -> socket.socket:
    """A stream socket connected to (cid, port); ``timeout`` applies to connecting and stays set."""
    cfg = _config(config)
    _check_cid(cid)
    _check_port(port)
    sock = _new_socket(cfg)
    try:
        sock.settimeout(timeout)
        with _refused_if_missing(cid, port):
            if cfg.transport == NATIVE:
                sock.connect((cid, port))
            else:
                with _socket_file(socket_path(_root(cfg), cid, port)) as target:
                    sock.connect(target)
        sock.sendall(_hello(cfg))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_connection(cid: int, port: int, *, timeout: float | None = None,
                          config: VsockConfig | None = None, **kwargs):
    """asyncio ``(reader, writer)`` connected to (cid, port); ``timeout`` bounds connecting only.

    Extra keyword arguments go to ``asyncio.open_connection`` (e.g. ``limit``)."""
    import asyncio

    cfg = _config(config)
    _check_cid(cid)
    _check_port(port)
    loop = asyncio.get_running_loop()
    sock = _new_socket(cfg)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            with _refused_if_missing(cid, port):
                if cfg.transport == NATIVE:
                    await loop.sock_connect(sock, (cid, port))
                else:
                    with _socket_file(socket_path(_root(cfg), cid, port)) as target:
                        await loop.sock_connect(sock, target)
            await loop.sock_sendall(sock, _hello(cfg))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, **kwargs)


# --- listening -----------------------------------------------------------------------------------

def listen(port: int, *, backlog: int = socket.SOMAXCONN, header_timeout: float = HEADER_TIMEOUT,
           config: VsockConfig | None = None) -> Listener:
    """A listener on ``port`` of this process's CID (``VMADDR_PORT_ANY``: an ephemeral port).

    ``header_timeout`` bounds how long ``accept`` waits for an emulated client's source header."""
    cfg = _config(config)
    _check_port(port, any_ok=True)
    if cfg.transport == NATIVE:
        return _listen_native(cfg, port, backlog, header_timeout)
    if port != VMADDR_PORT_ANY:
        return _listen_emulated(cfg, port, backlog, header_timeout)
    for _ in range(64):
        try:
            return _listen_emulated(cfg, ephemeral_port(), backlog, header_timeout)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EEXIST):
                raise
    raise OSError(errno.EADDRINUSE, "no free ephemeral vsock port found")


def _listen_native(cfg: VsockConfig, port: int, backlog: int, header_timeout: float) -> Listener:
    sock = _new_socket(cfg)
    try:
        sock.bind((VMADDR_CID_ANY, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, cfg, sock.getsockname()[1], None, header_timeout)


def _listen_emulated(cfg: VsockConfig, port: int, backlog: int, header_timeout: float) -> Listener:
    path = socket_path(cfg.emulated_root, cfg.cid, port)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sock = _new_socket(cfg)
    try:
        _bind_listening(sock, path, backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, cfg, port, path, header_timeout)


def _bind_listening(sock: socket.socket, path: str, backlog: int) -> None:
    """Make ``path`` a socket that already listens: bind a private name in the same directory,
    open it to all and listen, then hard-link it to ``path``.  Binding ``path`` itself would leave
    a moment where the file exists but refuses connections, so a client connecting then, or a
    second listener probing whether the port is stale, would take a live port for a dead one.
    ``path`` is first removed only if it is a socket file nobody accepts on."""
    private = _bind_private(sock, os.path.dirname(path))
    try:
        _open_to_all(private)
        sock.listen(backlog)
        try:
            os.link(private, path)
        except FileExistsError:
            if not _is_stale(path):
                raise OSError(errno.EADDRINUSE, "vsock port already in use", path) from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.link(private, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(private)


def _bind_private(sock: socket.socket, directory: str) -> str:
    """Bind a fresh ``.xxxx`` name in ``directory`` (no longer than the shortest port name, so
    it fits wherever ``<port>.sock`` does) and return it."""
    for _ in range(64):
        private = os.path.join(directory, f".{random.getrandbits(16):04x}")
        try:
            sock.bind(private)
            return private
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no free temporary name for the listening socket", directory)


def _open_to_all(path: str) -> None:
    """Mode 0666 on the socket file just bound: a vsock port has no file permissions (any peer
    that reaches the directory may connect), and an enclave's processes are other host uids
    than the parent's.  chmod goes through an ``O_PATH | O_NOFOLLOW`` fd of the socket, never
    through a name that could have been swapped for a link."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.EEXIST, "the listener's socket file was replaced", path)
        os.chmod(f"/proc/self/fd/{fd}", 0o666)
    finally:
        os.close(fd)


def _is_stale(path: str) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return True
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace it", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            with _socket_file(path) as target:
                probe.connect(target)
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


class Listener:
    """A listening vsock-style socket bound to (``cid``, ``port``).

    ``socket`` is the underlying listening socket (for selectors/asyncio); ``path`` is the
    emulated socket file (None for native).  Usable as a context manager; ``close`` is
    idempotent, wakes a blocked ``accept`` and unlinks the socket file if still ours."""

    def __init__(self, sock: socket.socket, cfg: VsockConfig, port: int, path: str | None, header_timeout: float):
        self.socket = sock
        self.config = cfg
        self.cid = cfg.cid
        self.port = port
        self.path = path
        self.header_timeout = header_timeout
        self._inode = os.lstat(path).st_ino if path else None
        self._closed = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, Address]:
        """The next connection and its peer (cid, port); ``TimeoutError`` after ``timeout`` seconds.

        Emulated: headers are read one connection at a time, so a silent client delays the next
        ones by up to ``header_timeout``; servers facing many clients should use ``start_server``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.socket.settimeout(_remaining(deadline))
            conn, address = self.socket.accept()
            if self.config.transport == EMULATED:
                _sized(conn)
            peer = self._identify(conn, address, deadline)
            if peer is not None:
                conn.settimeout(None)
                return conn, peer
            conn.close()

    def _identify(self, conn: socket.socket, address, deadline: float | None) -> Address | None:
        if self.config.transport == NATIVE:
            return tuple(address)
        wait = self.header_timeout
        if deadline is not None:
            wait = min(wait, max(deadline - time.monotonic(), 0.001))
        conn.settimeout(wait)
        try:
            data = _recv_exactly(conn, _HEADER.size)
        except OSError:
            return None
        return self.checked_peer(conn, decode_header(data))

    def checked_peer(self, conn: socket.socket, claimed: Address | None) -> Address | None:
        """``claimed`` if it passes the peer-identity check (see the module docstring), else None."""
        if claimed is None or self.config.transport == NATIVE:
            return claimed
        return claimed if _identity_ok(self.config.emulated_root, claimed[0], conn) else None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()
        with contextlib.suppress(FileNotFoundError):
            if self.path and os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vsock.Listener cid={self.cid} port={self.port} transport={self.config.transport}>"


@overload
def _remaining(deadline: float) -> float: ...
@overload
def _remaining(deadline: None) -> None: ...
def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out waiting for a vsock connection")
    return left


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:  # at most `size` iterations: each recv returns ≥ 1 byte or ends it
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


async def start_server(callback, listener: Listener, **kwargs) -> asyncio.Server:
    """An asyncio server on ``listener`` calling ``await callback(reader, writer, (cid, port))``
    per connection, after the source header (emulated) has been read and checked.

    The emulated header is read exactly (12 bytes, no more): what the client sends after it stays
    in the kernel until the callback's stream reads it, so a callback that pauses the stream's
    reading at once (``relay.hold``) gets every byte of it still unread — to be spliced, not
    copied.  Closing the returned server stops accepting; ``listener.close()`` also removes the
    socket file.  Extra keyword arguments go to ``asyncio.start_server`` (e.g. ``limit``)."""
    import asyncio

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Address) -> None:
        try:
            await callback(reader, writer, peer)
        except asyncio.CancelledError:
            # Cut (e.g. on shutdown).  Ending normally avoids Python 3.11 logging the cancelled
            # client task as "Exception in callback" (fixed in 3.12).
            writer.close()

    if listener.config.transport == NATIVE:
        def on_native(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            return on_connection(reader, writer, tuple(writer.get_extra_info("peername")))

        return await asyncio.start_server(on_native, sock=listener.socket, **kwargs)
    loop = asyncio.get_running_loop()
    limit = kwargs.pop("limit", 2 ** 16)  # asyncio's own default
    handshake = _handshake_protocol()
    return await loop.create_server(lambda: handshake(listener, on_connection, limit), sock=listener.socket, **kwargs)


@functools.cache
def _handshake_protocol():
    """The class of :func:`start_server`'s per-connection protocol (asyncio is imported lazily)."""
    import asyncio

    class Handshake(asyncio.BufferedProtocol):
        """Reads an emulated connection's source header into a buffer of exactly its size (the
        transport cannot read past it), checks it, then hands the transport over to an asyncio
        stream for ``on_connection``.  A connection that sends no valid header within the
        listener's ``header_timeout`` is closed silently."""

        def __init__(self, listener: Listener, on_connection, limit: int) -> None:
            self.listener, self.on_connection, self.limit = listener, on_connection, limit
            self.header, self.got = bytearray(_HEADER.size), 0
            self.transport: asyncio.Transport | None = None
            self.timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            self.transport = transport
            _sized(transport.get_extra_info("socket"))
            self.timer = asyncio.get_running_loop().call_later(self.listener.header_timeout, transport.close)

        def get_buffer(self, sizehint: int) -> memoryview:
            return memoryview(self.header)[self.got:]

        def buffer_updated(self, nbytes: int) -> None:
            self.got += nbytes
            if self.got < len(self.header) or self.transport is None:
                return
            transport, self.transport = self.transport, None
            self.connection_lost(None)
            peer = self.listener.checked_peer(transport.get_extra_info("socket"), decode_header(bytes(self.header)))
            if peer is None:
                transport.close()
                return
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=self.limit, loop=loop)
            streams = asyncio.StreamReaderProtocol(
                reader, lambda r, w: self.on_connection(r, w, peer), loop=loop)
            transport.set_protocol(streams)
            streams.connection_made(transport)

        def eof_received(self) -> bool:
            return False  # closed before its header: the transport closes

        def connection_lost(self, exc: Exception | None) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    return Handshake


# --- peer identity (emulated) --------------------------------------------------------------------

def register_enclave(cid: int, pid: int, *, config: VsockConfig | None = None) -> None:
    """Record that processes in ``pid``'s network namespace, and only they, speak for ``cid``."""
    cfg = _config(config)
    _check_cid(cid)
    if cfg.transport != EMULATED:
        raise VsockConfigError("enclave registration applies to the emulated transport only")
    namespace = _net_namespace(pid)
    if namespace is None:
        raise OSError(errno.ESRCH, f"cannot read the network namespace of pid {pid}")
    directory = os.path.join(cfg.emulated_root, _REGISTRY)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = os.path.join(directory, f".{cid}.{os.getpid()}")
    with open(temporary, "w", encoding="ascii") as handle:
        handle.write(namespace)
    os.replace(temporary, os.path.join(directory, str(cid)))


def unregister_enclave(cid: int, *, config: VsockConfig | None = None) -> None:
    """Forget ``cid``'s registration (no error if there is none)."""
    root = _config(config).root
    with contextlib.suppress(FileNotFoundError):
        if root:
            os.unlink(os.path.join(root, _REGISTRY, str(cid)))


def _registrations(root: str) -> dict[int, str]:
    directory = os.path.join(root, _REGISTRY)
    try:
        names = [name for name in os.listdir(directory) if name.isdigit()]
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        with contextlib.suppress(FileNotFoundError), open(os.path.join(directory, name), encoding="ascii") as handle:
            found[int(name)] = handle.read().strip()
    return found


def _identity_ok(root: str, claimed_cid: int, conn: socket.socket) -> bool:
    registered = _registrations(root)
    if not registered:
        return True
    namespace = _net_namespace(_peer_pid(conn))
    if namespace is None:
        return False
    if claimed_cid in registered:
        return registered[claimed_cid] == namespace
    return namespace not in registered.values()


def _peer_pid(conn: socket.socket) -> int:
    credentials = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", credentials)[0]


def _net_namespace(pid: int) -> str | None:
    if pid <= 0:
        return None
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


# --- boot heartbeat ------------------------------------------------------------------------------

def send_heartbeat(*, timeout: float = 10.0, config: VsockConfig | None = None) -> None:
    """Enclave side: send ``0xB7`` to CID 3 port 9000 and wait for the echo (``ConnectionError``
    if the reply differs, ``TimeoutError`` after ``timeout``)."""
    with connect(PARENT_CID, HEARTBEAT_PORT, timeout=timeout, config=config) as sock:
        sock.sendall(HEARTBEAT_BYTE)
        reply = sock.recv(1)
    if reply != HEARTBEAT_BYTE:
        raise ConnectionError(f"unexpected heartbeat reply {reply!r}")


def heartbeat_listen(*, timeout: float, listener: Listener | None = None, config: VsockConfig | None = None) -> int:
    """Parent side: wait for one valid heartbeat, echo it, return the CID that sent it.

    Pass a ``listener`` bound beforehand (``listen(HEARTBEAT_PORT)``) to avoid racing the
    enclave's boot; otherwise one is bound and closed here.  Connections that do not send
    ``0xB7`` are dropped and waiting goes on; ``TimeoutError`` after ``timeout`` seconds."""
    owned = listener is None
    listener = listener or listen(HEARTBEAT_PORT, config=config)
    deadline = time.monotonic() + timeout
    try:
        while True:
            conn, (cid, _port) = listener.accept(timeout=_remaining(deadline))
            with conn:
                if _echo_heartbeat(conn, min(_remaining(deadline), HEADER_TIMEOUT)):
                    return cid
    finally:
        if owned:
            listener.close()


def _echo_heartbeat(conn: socket.socket, timeout: float) -> bool:
    conn.settimeout(timeout)
    try:
        if conn.recv(1) != HEARTBEAT_BYTE:
            return False
        conn.sendall(HEARTBEAT_BYTE)
    except OSError:
        return False
    return True
