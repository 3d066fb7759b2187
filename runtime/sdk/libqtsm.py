"""QingTian's security module through Huawei's ``libqtsm.so`` (ctypes), behind the same CBOR
request/response interface as every other transport of :class:`~.qtsm.Qtsm`.

The C API is the one published in Huawei's QingTian enclave SDK (``qtsm_lib.h`` and
``qtsm_lib_comm.h``, Apache-2.0)::

    int  qtsm_lib_init(void);                       /* opens /dev/qtsm, returns its fd (< 0: error) */
    void qtsm_lib_exit(int fd);
    int  qtsm_describe_pcr(int fd, uint16_t index, bool *locked, uint8_t *data, uint32_t *data_len);
    int  qtsm_extend_pcr(int fd, uint16_t index, const uint8_t *data, uint32_t len,
                         uint8_t *pcr, uint32_t *pcr_len);
    int  qtsm_lock_pcr(int fd, uint16_t index, bool *locked);
    int  qtsm_lock_pcrs(int fd, uint32_t count, const uint16_t *indexes, bool *locked);
    int  qtsm_get_describe(int fd, describe_qtsm *description);
    int  qtsm_get_attestation(int fd, const uint8_t *user_data, uint32_t user_data_len,
                              const uint8_t *nonce, uint32_t nonce_len,
                              const uint8_t *pubkey, uint32_t pubkey_len,
                              uint8_t *document, uint32_t *document_len);

Each returns ``enum error_code`` (0 = NO_ERROR, 1 INVALID_INDEX … 9 INVALID_QTSM_CERT), mapped
to the CBOR schema's error variants.  The published header has no random-number call, so
``GetRandom`` answers ``InvalidOperation`` here.
"""

from __future__ import annotations

import ctypes
import os

import cbor2

#: ``qtsm_lib_comm.h`` sizes.
PCR_MAX_LENGTH = 64
MAX_PCR_COUNT = 32
MODULE_ID_MAX_SIZE = 128
#: libqtsm's ``QTSM_RESPONSE_MAX_SIZE``: the attestation document buffer.
DOCUMENT_BUFFER = 0x6000
ENV_LIBRARY = "QTBUILD_LIBQTSM"
_ERRORS = {
    1: "InvalidIndex", 2: "InvalidResponse", 3: "InvalidArgument", 4: "ReadOnlyIndex",
    5: "InvalidOperation", 6: "BufferTooSmall", 7: "InputTooLarge", 8: "InternalError",
    9: "InvalidQtsmCert",
}
_DIGESTS = {0: "SHA256", 1: "SHA384", 2: "SHA512"}


class DescribeQtsm(ctypes.Structure):
    """``struct describe_qtsm`` (natural C alignment, as the header declares it)."""

    _fields_ = [
        ("version_major", ctypes.c_uint16),
        ("version_minor", ctypes.c_uint16),
        ("version_patch", ctypes.c_uint16),
        ("module_id_len", ctypes.c_uint32),
        ("module_id", ctypes.c_char * MODULE_ID_MAX_SIZE),
        ("max_pcrs", ctypes.c_uint16),
        ("locked_pcrs_num", ctypes.c_uint32),
        ("locked_pcrs", ctypes.c_uint16 * MAX_PCR_COUNT),
        ("digest", ctypes.c_int),
    ]


def load(name: str | None = None):
    """The loaded ``libqtsm.so`` (``$QTBUILD_LIBQTSM`` or the loader's search), or None."""
    candidate = name or os.environ.get(ENV_LIBRARY) or "libqtsm.so"
    try:
        return ctypes.CDLL(candidate)
    except OSError:
        return None


class LibQtsmTransport:
    """Answers CBOR requests by calling libqtsm; owns the descriptor ``qtsm_lib_init`` opened."""

    response_size = DOCUMENT_BUFFER + 64

    def __init__(self, library) -> None:
        self.lib = library
        self.fd = library.qtsm_lib_init()
        if self.fd < 0:
            raise OSError(f"qtsm_lib_init failed ({self.fd}): /dev/qtsm could not be opened")

    def close(self) -> None:
        if self.fd >= 0:
            self.lib.qtsm_lib_exit(self.fd)
            self.fd = -1

    def request(self, payload: bytes) -> bytes:
        """One CBOR request → the CBOR response the schema defines (errors as ``{"Error": …}``)."""
        try:
            request = cbor2.loads(payload)
            body: object
            if isinstance(request, str):
                name, body = request, {}
            elif isinstance(request, dict) and len(request) == 1:
                ((name, body),) = request.items()
            else:
                return cbor2.dumps({"Error": "InvalidOperation"})
            handler = getattr(self, f"_op_{name}", None)
            if handler is None or not isinstance(body, dict):
                return cbor2.dumps({"Error": "InvalidOperation"})
            return cbor2.dumps(handler(body))
        except _Status as status:
            return cbor2.dumps({"Error": _ERRORS.get(status.code, "InternalError")})
        except (TypeError, ValueError, KeyError, OverflowError):
            return cbor2.dumps({"Error": "InvalidArgument"})

    # ------------------------------------------------------------------ operations

    def _op_Attestation(self, body: dict) -> dict:
        fields = [body.get(key) for key in ("user_data", "nonce", "public_key")]
        buffer = ctypes.create_string_buffer(DOCUMENT_BUFFER)
        length = ctypes.c_uint32(DOCUMENT_BUFFER)
        arguments = []
        for value in fields:
            data = bytes(value) if value is not None else b""
            arguments += [data if value is not None else None, ctypes.c_uint32(len(data))]
        _check(self.lib.qtsm_get_attestation(self.fd, *arguments, buffer, ctypes.byref(length)))
        return {"Attestation": {"document": buffer.raw[: min(length.value, DOCUMENT_BUFFER)]}}

    def _op_DescribePCR(self, body: dict) -> dict:
        locked = ctypes.c_bool()
        data = ctypes.create_string_buffer(PCR_MAX_LENGTH)
        length = ctypes.c_uint32(PCR_MAX_LENGTH)
        _check(self.lib.qtsm_describe_pcr(self.fd, _u16(body["index"]), ctypes.byref(locked), data,
                                          ctypes.byref(length)))
        return {"DescribePCR": {"lock": bool(locked.value), "data": data.raw[: min(length.value, PCR_MAX_LENGTH)]}}

    def _op_ExtendPCR(self, body: dict) -> dict:
        data = bytes(body["data"])
        out = ctypes.create_string_buffer(PCR_MAX_LENGTH)
        length = ctypes.c_uint32(PCR_MAX_LENGTH)
        _check(self.lib.qtsm_extend_pcr(self.fd, _u16(body["index"]), data, ctypes.c_uint32(len(data)),
                                        out, ctypes.byref(length)))
        return {"ExtendPCR": {"data": out.raw[: min(length.value, PCR_MAX_LENGTH)]}}

    def _op_LockPCR(self, body: dict) -> str:
        locked = ctypes.c_bool()
        _check(self.lib.qtsm_lock_pcr(self.fd, _u16(body["index"]), ctypes.byref(locked)))
        return "LockPCR"

    def _op_LockPCRs(self, body: dict) -> str:
        span = body["range"]
        indexes = list(range(span)) if isinstance(span, int) else [int(index) for index in span]
        array = (ctypes.c_uint16 * max(len(indexes), 1))(*indexes)
        locked = ctypes.c_bool()
        _check(self.lib.qtsm_lock_pcrs(self.fd, ctypes.c_uint32(len(indexes)), array, ctypes.byref(locked)))
        return "LockPCRs"

    def _op_DescribeNSM(self, body: dict) -> dict:
        description = DescribeQtsm()
        _check(self.lib.qtsm_get_describe(self.fd, ctypes.byref(description)))
        module_id = description.module_id[: min(description.module_id_len, MODULE_ID_MAX_SIZE)]
        count = min(description.locked_pcrs_num, MAX_PCR_COUNT)
        return {"DescribeNSM": {
            "version_major": description.version_major, "version_minor": description.version_minor,
            "version_patch": description.version_patch, "module_id": module_id.decode("utf-8", "replace"),
            "max_pcrs": description.max_pcrs, "locked_pcrs": list(description.locked_pcrs[:count]),
            "digest": _DIGESTS.get(description.digest, str(description.digest)),
        }}

    def _op_GetRandom(self, body: dict) -> dict:
        raise _Status(5)  # not in libqtsm's published API


class _Status(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _check(status: int) -> None:
    if status != 0:
        raise _Status(status)


def _u16(value) -> ctypes.c_uint16:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise ValueError("index must be a u16")
    return ctypes.c_uint16(value)
