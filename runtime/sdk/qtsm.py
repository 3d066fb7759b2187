"""Client of the enclave's security module (QingTian QTSM / Nitro NSM), for code inside an image.

Depends only on the standard library and ``cbor2`` (``dumps``/``loads``, present in Debian
bookworm's 5.4 and in 6.x), so it runs in an image built from bookworm's own packages.

Device (``Qtsm(path=None)`` auto-detects, in this order; first match wins)
    1. ``/dev/qtsm`` is a character device: QingTian hardware.  When Huawei's ``libqtsm.so``
       can be loaded (``$QTBUILD_LIBQTSM`` or the loader's search path) it is driven through its
       published C API (:mod:`.libqtsm`: proven interface).  Otherwise the driver is called
       directly with the NSM-style message (request/response iovecs, response buffer 0x6000 =
       libqtsm's ``QTSM_RESPONSE_MAX_SIZE``) and ``QTSM_IOCTL_REQUEST`` — the message layout and
       ioctl number are *inferred* (not published), see the SDK README.
    2. ``/dev/nsm`` is a character device: Nitro hardware, the driver's one ioctl,
       ``NSM_IOCTL_REQUEST`` = ``_IOWR(0x0A, 0, struct nsm_message)`` with ``struct nsm_message {
       struct iovec request; struct iovec response; }`` (two ``{u64 addr; u64 len}``), the
       response buffer 0x3000 bytes; the driver shrinks ``response.len`` to the answer's size.
    3. ``/dev/qtsm`` or ``/dev/nsm`` is a Unix socket: the local emulation (qtbuild's runtime,
       ``runtime/qtsm/server.py``): each request on a fresh connection, both directions a
       4-byte big-endian length then CBOR.
    An explicit ``path`` is used as whichever it is.  Nothing found → FileNotFoundError naming
    every place looked at and what was there.

Contracts
    Requests are the NSM/QTSM CBOR schema (docs/attestation.md, "Device API").  A request
    whose encoding exceeds 4096 bytes is refused before sending: ``QtsmError("InputTooLarge")``.
    Responses over 0x3000 bytes, undecodable ones, or ones of the wrong shape →
    ``QtsmError("InvalidResponse")``; a device's ``{"Error": v}`` → ``QtsmError(v)``.  A failing
    ioctl → ``QtsmError("InputTooLarge")`` for EMSGSIZE, else ``QtsmError("InternalError")`` (the
    nsm-api driver's mapping).  Socket failures (no listener, timeouts) stay ``OSError``.
    Every method is safe to call from several threads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct

import cbor2

#: Largest request a device reads (NSM_REQUEST_MAX_SIZE).
MAX_REQUEST_SIZE = 0x1000
#: Largest response a device writes (NSM_RESPONSE_MAX_SIZE); also the ioctl response buffer.
MAX_RESPONSE_SIZE = 0x3000
#: libqtsm's response buffer (``QTSM_RESPONSE_MAX_SIZE``); QingTian documents are larger than Nitro's.
QTSM_RESPONSE_MAX_SIZE = 0x6000
#: The QingTian and Nitro device paths, probed by ``Qtsm()`` (see the module docstring).
DEFAULT_PATHS = ("/dev/qtsm", "/dev/nsm")
#: The ``{"Error": …}`` variants of the schema.
ERROR_VARIANTS = (
    "InvalidArgument", "InvalidIndex", "InvalidResponse", "ReadOnlyIndex",
    "InvalidOperation", "BufferTooSmall", "InputTooLarge", "InternalError",
)

_HEADER = struct.Struct(">I")
_NSM_MAGIC = 0x0A


class QtsmError(Exception):
    """The security module refused a request; ``variant`` is its error variant name."""

    def __init__(self, variant: str, detail: str = "") -> None:
        super().__init__(f"{variant}: {detail}" if detail else variant)
        self.variant, self.detail = variant, detail


# --------------------------------------------------------------------------- Nitro ioctl


class NsmIovec(ctypes.Structure):
    """``struct iovec`` as the NSM driver reads it (``struct nsm_iovec``: two u64)."""

    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class NsmMessage(ctypes.Structure):
    """``struct nsm_message { iovec request; iovec response; }`` — 32 bytes."""

    _fields_ = [("request", NsmIovec), ("response", NsmIovec)]


def _iowr(kind: int, number: int, size: int) -> int:
    """Linux ``_IOWR(kind, number, size)`` (asm-generic layout: dir 2 bits, size 14 bits)."""
    read_write = 3
    return (read_write << 30) | (size << 16) | (kind << 8) | number


#: ``_IOWR(0x0A, 0, struct nsm_message)`` = 0xC0200A00.
NSM_IOCTL_REQUEST = _iowr(_NSM_MAGIC, 0, ctypes.sizeof(NsmMessage))


def pack_message(request: ctypes.Array, response: ctypes.Array) -> NsmMessage:
    """An NsmMessage pointing at the two ctypes buffers (which must outlive the ioctl)."""
    message = NsmMessage()
    message.request.addr, message.request.len = ctypes.addressof(request), len(request)
    message.response.addr, message.response.len = ctypes.addressof(response), len(response)
    return message


#: Inferred: the QingTian driver's request ioctl, taken to be the NSM one (same message layout).
QTSM_IOCTL_REQUEST = NSM_IOCTL_REQUEST


class IoctlTransport:
    """Requests through a security-module driver's one ioctl on an open device descriptor.

    ``ioctl`` is ``fcntl.ioctl``-compatible (replaceable for tests).  Owns ``fd``: ``close``
    closes it.
    """

    name = "NSM"
    request_code = NSM_IOCTL_REQUEST
    response_size = MAX_RESPONSE_SIZE

    def __init__(self, fd: int, *, ioctl=fcntl.ioctl) -> None:
        self.fd, self._ioctl = fd, ioctl

    @classmethod
    def open(cls, path: str, *, ioctl=fcntl.ioctl):
        return cls(os.open(path, os.O_RDWR | os.O_CLOEXEC), ioctl=ioctl)

    def request(self, payload: bytes) -> bytes:
        """One request → its raw response bytes (at most ``response_size``)."""
        request = ctypes.create_string_buffer(payload, len(payload))
        response = ctypes.create_string_buffer(self.response_size)
        message = pack_message(request, response)
        try:
            self._ioctl(self.fd, self.request_code, message, True)
        except OSError as exc:
            variant = "InputTooLarge" if exc.errno == errno.EMSGSIZE else "InternalError"
            raise QtsmError(variant, f"{self.name} ioctl failed: {exc}") from exc
        length = message.response.len
        if length > self.response_size:
            raise QtsmError("InvalidResponse", f"driver reported {length} response bytes")
        return response.raw[:length]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NitroTransport(IoctlTransport):
    """``/dev/nsm``: the Nitro driver (published interface)."""


class QingTianTransport(IoctlTransport):
    """``/dev/qtsm`` without libqtsm: the NSM-style message, 0x6000-byte response (inferred)."""

    name = "QTSM"
    request_code = QTSM_IOCTL_REQUEST
    response_size = QTSM_RESPONSE_MAX_SIZE


# --------------------------------------------------------------------------- local socket


class SocketTransport:
    """Requests over the local device socket: one connection per request (4-byte BE length +
    CBOR each way), so a request is never retried or interleaved."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.path, self.timeout = path, timeout

    #: The local device may play either cloud: QingTian's responses go up to 0x6000 bytes.
    response_size = QTSM_RESPONSE_MAX_SIZE

    def request(self, payload: bytes) -> bytes:
        """One request → its raw response bytes (at most ``response_size``)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(self.timeout)
            connection.connect(self.path)
            connection.sendall(_HEADER.pack(len(payload)) + payload)
            (length,) = _HEADER.unpack(_recv_exact(connection, _HEADER.size))
            if length > self.response_size:
                raise QtsmError("InvalidResponse", f"response of {length} bytes")
            return _recv_exact(connection, length)

    def close(self) -> None:
        pass


def _recv_exact(connection: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = connection.recv(remaining)
        if not chunk:
            raise QtsmError("InvalidResponse", "connection closed mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def open_transport(path: str | os.PathLike | None = None, *, timeout: float = 10.0, ioctl=fcntl.ioctl,
                   load_library=None):
    """The transport for ``path``, or the first device found in the order of the module
    docstring.  ``ioctl`` and ``load_library`` (() -> a libqtsm handle or None; default
    :func:`.libqtsm.load`) are replaceable, so tests drive the hardware code path."""
    if load_library is None:
        from .libqtsm import load as load_library
    if path is not None:
        return _explicit(os.fspath(path), timeout, ioctl, load_library)
    qtsm_path, nsm_path = DEFAULT_PATHS
    kinds = {candidate: _kind(candidate) for candidate in DEFAULT_PATHS}
    if kinds[qtsm_path] == "character device":
        return _qingtian(qtsm_path, ioctl, load_library)
    if kinds[nsm_path] == "character device":
        return NitroTransport.open(nsm_path, ioctl=ioctl)
    for candidate in DEFAULT_PATHS:
        if kinds[candidate] == "socket":
            return SocketTransport(candidate, timeout=timeout)
    looked = "; ".join(f"{candidate}: {kind}" for candidate, kind in kinds.items())
    raise FileNotFoundError(
        errno.ENOENT,
        "no security module: looked for QingTian's character device /dev/qtsm, Nitro's /dev/nsm, "
        f"then the local emulation's socket at either ({looked})",
    )


def _kind(path: str) -> str:
    """What is at ``path``: "absent", "socket", "character device" or "another kind of file"."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "absent"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "character device" if stat.S_ISCHR(mode) else "another kind of file"


def _qingtian(path: str, ioctl, load_library):
    library = load_library()
    if library is not None:
        from .libqtsm import LibQtsmTransport

        return LibQtsmTransport(library)
    return QingTianTransport.open(path, ioctl=ioctl)


def _explicit(path: str, timeout: float, ioctl, load_library):
    kind = _kind(path)
    if kind == "absent":
        raise FileNotFoundError(errno.ENOENT, "no security module device", path)
    if kind == "socket":
        return SocketTransport(path, timeout=timeout)
    if kind == "character device":
        if os.path.basename(path) == "qtsm":
            return _qingtian(path, ioctl, load_library)
        return NitroTransport.open(path, ioctl=ioctl)
    raise ValueError(f"{path} is neither a Unix socket nor a character device")


# --------------------------------------------------------------------------- the client


class Qtsm:
    """The security module: attestation, PCRs, random.  Usable as a context manager.

    ``Qtsm(path=None, *, timeout=10.0)`` opens the device (module docstring); ``transport=``
    supplies any object with ``request(bytes) -> bytes`` and ``close()`` instead.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = 10.0,
                 transport=None, ioctl=fcntl.ioctl, load_library=None) -> None:
        if transport is None:
            transport = open_transport(path, timeout=timeout, ioctl=ioctl, load_library=load_library)
        self.transport = transport

    def __enter__(self) -> Qtsm:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    # ------------------------------------------------------------------ operations

    def attestation(self, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes) over the locked PCRs.

        Each argument is bytes or None (null in the document); size limits are the device's
        (QingTian: 512 / 512 / 1024 bytes → InputTooLarge).
        """
        body = {"user_data": _optional_bytes(user_data, "user_data"),
                "nonce": _optional_bytes(nonce, "nonce"),
                "public_key": _optional_bytes(public_key, "public_key")}
        answer = self._call({"Attestation": body}, "Attestation")
        return _field(answer, "document", bytes)

    def describe_pcr(self, index: int) -> tuple[bool, bytes]:
        """(locked, value) of PCR ``index``."""
        answer = self._call({"DescribePCR": {"index": _index(index)}}, "DescribePCR")
        return _field(answer, "lock", bool), _field(answer, "data", bytes)

    def extend_pcr(self, index: int, data: bytes) -> bytes:
        """Extend PCR ``index`` with ``data`` (new = SHA384(old ‖ data)); return the new value."""
        request = {"ExtendPCR": {"index": _index(index), "data": _bytes(data, "data")}}
        return _field(self._call(request, "ExtendPCR"), "data", bytes)

    def lock_pcr(self, index: int) -> None:
        """Lock PCR ``index``; ReadOnlyIndex if it already is (0–15 always are)."""
        self._call({"LockPCR": {"index": _index(index)}}, "LockPCR", unit=True)

    def lock_pcrs(self, span) -> None:
        """Lock PCRs 0..span-1 (NSM's ``{"range": span}``; already-locked ones are fine).

        ``span`` may also be ``range(0, n)``, or another iterable of indexes, sent as the list
        form QingTian's ``qtsm_lock_pcrs`` uses (the local device accepts it; Nitro does not).
        """
        self._call({"LockPCRs": {"range": _span(span)}}, "LockPCRs", unit=True)

    def describe(self) -> dict:
        """The DescribeNSM fields: version_major/minor/patch, module_id, max_pcrs,
        locked_pcrs, digest."""
        answer = self._call("DescribeNSM", "DescribeNSM")
        _field(answer, "module_id", str)
        _field(answer, "max_pcrs", int)
        _field(answer, "locked_pcrs", list)
        _field(answer, "digest", str)
        return answer

    def get_random(self) -> bytes:
        """Random bytes from the device (256 on Nitro and the local device)."""
        return _field(self._call("GetRandom", "GetRandom"), "random", bytes)

    # ------------------------------------------------------------------ plumbing

    def _call(self, request: object, name: str, *, unit: bool = False):
        """Send ``request``; the body of the ``name`` response (None when ``unit``)."""
        payload = cbor2.dumps(request)
        if len(payload) > MAX_REQUEST_SIZE:
            raise QtsmError("InputTooLarge", f"request of {len(payload)} bytes")
        limit = getattr(self.transport, "response_size", MAX_RESPONSE_SIZE)
        return _unwrap(_decode(self.transport.request(payload), limit), name, unit)


def _decode(data: bytes, limit: int = MAX_RESPONSE_SIZE) -> object:
    if len(data) > limit:
        raise QtsmError("InvalidResponse", f"response of {len(data)} bytes")
    try:
        return cbor2.loads(data)
    except Exception as exc:  # noqa: BLE001 - cbor2 5.4 and 6 raise different types
        raise QtsmError("InvalidResponse", f"undecodable response: {exc}") from None


def _unwrap(value: object, name: str, unit: bool):
    if isinstance(value, dict) and len(value) == 1 and "Error" in value:
        variant = value["Error"]
        if isinstance(variant, str) and len(variant) <= 64:
            raise QtsmError(variant)
        raise QtsmError("InvalidResponse", "malformed error response")
    if unit and value == name:
        return None
    if not unit and isinstance(value, dict) and len(value) == 1 and name in value:
        body = value[name]
        if isinstance(body, dict):
            return body
    raise QtsmError("InvalidResponse", f"not a {name} response")


def _field(body: dict, key: str, kind: type):
    value = body.get(key)
    if type(value) is not kind:
        raise QtsmError("InvalidResponse", f"{key}: expected {kind.__name__}")
    return value


def _bytes(value, name: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _optional_bytes(value, name: str) -> bytes | None:
    return None if value is None else _bytes(value, name)


def _index(index) -> int:
    if type(index) is not int:
        raise TypeError(f"a PCR index is an int, not {type(index).__name__}")
    return index


def _span(span) -> int | list[int]:
    if type(span) is int:
        return span
    if isinstance(span, range) and span.start == 0 and span.step == 1:
        return max(span.stop, 0)
    return [_index(index) for index in span]
