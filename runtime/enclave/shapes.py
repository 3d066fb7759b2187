"""What the enclave commands print, in the selected cloud's tool's shapes (``--format``; the
enclave's ``--cloud`` by default), and their error codes.

qingtian (``qt enclave``)
    run/start  ``{"EnclaveID": 0, "EnclaveCID", "NumberOfCPUs", "MemoryMiB", "LaunchMode",
               "ProcessID", "Status"}``; query: that plus exit status, ``EifPath``, ``Cloud``,
               ``Measurements``; stop ``{"EnclaveID", "Terminated"}``.
nitro (``nitro-cli``, ``src/common/json_output.rs``)
    run-enclave        ``{"EnclaveName", "EnclaveID": "i-…-enc…", "ProcessID", "EnclaveCID",
                       "NumberOfCPUs", "CPUIDs", "MemoryMiB"}``
    describe-enclaves  ``[{"EnclaveName", "EnclaveID", "ProcessID", "EnclaveCID", "NumberOfCPUs",
                       "CPUIDs", "MemoryMiB", "State", "Flags", "Measurements"}]`` — State
                       ``RUNNING`` (or ``TERMINATED`` for a stopped local enclave, which nitro-cli
                       would no longer list), Flags ``DEBUG_MODE`` or ``NONE``
    terminate-enclave  ``{"EnclaveName", "EnclaveID", "Terminated": true}``

The nitro ``EnclaveID`` is the enclave's module id (``i-<17 hex>-enc<16 hex>``), as on Nitro.
``CPUIDs`` are the ``--cpu-ids`` given (the local runtime pins the enclave to them with a
cpuset), else empty.  Error codes: qt's numbers (``[E43]``), or for nitro the nitro-cli codes of
the same failures (:data:`NITRO_ERROR_CODES`), in the one ``[Exx]`` format.
"""

from __future__ import annotations

from .errors import E_CID_IN_USE, E_FILE, E_INVALID_ARGUMENT, E_MEMORY, E_NOT_DEBUG, E_NOT_RUNNING, EnclaveError
from .state import LIVE_STATUSES, EnclaveRecord

FORMATS = ("qingtian", "nitro")
#: qt error code → nitro-cli's code for the same failure (nitro-cli ``src/common/document_errors.rs``):
#: invalid argument E03, file operation failure E19, insufficient memory requested E26,
#: console connection failure E44 (not running / not in debug mode), ioctl failure E29 (CID in use,
#: reported by NE_START_ENCLAVE — inferred).
NITRO_ERROR_CODES = {E_INVALID_ARGUMENT: 3, E_FILE: 19, E_MEMORY: 26, E_NOT_RUNNING: 44, E_NOT_DEBUG: 44,
                     E_CID_IN_USE: 29}


def nitro_enclave_id(record: EnclaveRecord) -> str:
    """The nitro-cli ``EnclaveID`` of ``record``: its module id under the nitro profile."""
    # imported here: qt's shapes (the default) need no profile, and `run` prints one on its way to the console
    from qtbuild.runtime.qtsm.clouds import machine_seed
    from qtbuild.runtime.qtsm.clouds import profile as cloud_profile

    nitro = cloud_profile("nitro")
    return nitro.module_id(record.leaf_name or str(record.enclave_id), nitro.parent_id(record.instance_id,
                                                                                       machine_seed()))


def enclave_name(record: EnclaveRecord) -> str:
    return record.name or f"enclave-{record.enclave_id}"


def run_shape(record: EnclaveRecord, fmt: str, status: str | None = None) -> dict:
    """What ``run`` / ``enclave start`` print."""
    if fmt != "nitro":
        return record.summary(status)
    return {"EnclaveName": enclave_name(record), "EnclaveID": nitro_enclave_id(record),
            "ProcessID": record.process_id, "EnclaveCID": record.cid, "NumberOfCPUs": record.cpus,
            "CPUIDs": list(record.cpu_ids or []), "MemoryMiB": record.memory_mib}


def describe_shape(record: EnclaveRecord, fmt: str, status: str) -> dict:
    """One entry of ``enclave query`` (nitro: ``describe-enclaves``)."""
    if fmt != "nitro":
        return record.public(status)
    document = run_shape(record, fmt)
    document["State"] = "RUNNING" if status in LIVE_STATUSES else "TERMINATED"
    document["Flags"] = "DEBUG_MODE" if record.debug else "NONE"
    if record.measurements is not None:
        document["Measurements"] = record.measurements
    return document


def terminate_shape(record: EnclaveRecord, fmt: str) -> dict:
    """What ``enclave stop`` prints (nitro: ``terminate-enclave``)."""
    if fmt != "nitro":
        return {"EnclaveID": record.enclave_id, "Terminated": True}
    return {"EnclaveName": enclave_name(record), "EnclaveID": nitro_enclave_id(record), "Terminated": True}


def in_format(error: EnclaveError, fmt: str) -> EnclaveError:
    """``error`` with the selected tool's error code (the message is unchanged)."""
    if fmt != "nitro" or error.code is None:
        return error
    return EnclaveError(error.message, code=NITRO_ERROR_CODES.get(error.code, 0), check_failed=error.check_failed)
