"""The platform's rules for starting an enclave, with qt's error codes.

=====================  ==========================================================  =====
rule                   local runtime                                               code
=====================  ==========================================================  =====
CID                    4..4294967294; default the first free one from 4            02
CID in use             by a Starting/Running/Crashed enclave of this runtime       43
memory                 ≥ 128 MiB and ≥ 4 × the EIF's size                          10
CPUs                   even, ≥ 2, ≤ the CPUs this process may run on               02
enclaves               at most ``$QTBUILD_MAX_ENCLAVES`` (default 2, qt's limit)   02
console                only for debug-mode enclaves                                32
=====================  ==========================================================  =====

CPUs are not taken away from the parent as on hardware: each enclave gets a CFS quota of its
count (see :mod:`qtbuild.runtime.sandbox.cgroups`), so two 2-CPU enclaves fit on a 2-CPU parent.
Every check raises :class:`~qtbuild.runtime.enclave.errors.EnclaveError`; nothing here touches state.
"""

from __future__ import annotations

import os

from .errors import (
    E_CID_IN_USE,
    E_INVALID_ARGUMENT,
    E_MEMORY,
    E_NOT_DEBUG,
    EnclaveError,
)

__all__ = [
    "DEFAULT_CPUS", "DEFAULT_MEMORY_MIB", "ENV_MAX_ENCLAVES", "FIRST_CID", "MAX_CID", "MIN_MEMORY_MIB",
    "available_cpus", "check_capacity", "check_console", "check_resources", "choose_cid", "max_enclaves",
]

FIRST_CID, MAX_CID = 4, 4294967294
MIN_MEMORY_MIB = 128
IMAGE_MEMORY_FACTOR = 4
DEFAULT_CPUS, DEFAULT_MEMORY_MIB = 2, 1024
DEFAULT_MAX_ENCLAVES = 2
ENV_MAX_ENCLAVES = "QTBUILD_MAX_ENCLAVES"
_MIB = 1 << 20


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0))


def check_resources(cpus: int, memory_mib: int, eif_size: int, cpus_available: int) -> None:
    """Memory and CPU rules for an image of ``eif_size`` bytes."""
    needed_mib = max(MIN_MEMORY_MIB, -(-eif_size * IMAGE_MEMORY_FACTOR // _MIB))
    if memory_mib < needed_mib:
        raise EnclaveError(
            f"--mem {memory_mib} MiB is too small: an enclave needs at least {MIN_MEMORY_MIB} MiB and "
            f"{IMAGE_MEMORY_FACTOR} × the image size ({eif_size} bytes), so at least {needed_mib} MiB",
            code=E_MEMORY)
    if cpus < 2 or cpus % 2:
        raise EnclaveError(f"--cpus {cpus}: the CPU count must be an even number ≥ 2", code=E_INVALID_ARGUMENT)
    if cpus > cpus_available:
        raise EnclaveError(f"--cpus {cpus}: only {cpus_available} CPU(s) are available to this process",
                           code=E_INVALID_ARGUMENT)


def check_cpu_ids(cpu_ids: tuple[int, ...], allowed: set[int]) -> None:
    """``--cpu-ids`` must name distinct CPUs this process may run on (its affinity mask): the
    enclave is pinned to them."""
    duplicates = sorted({cpu for cpu in cpu_ids if cpu_ids.count(cpu) > 1})
    if duplicates:
        raise EnclaveError(f"--cpu-ids: CPU {duplicates[0]} is given twice", code=E_INVALID_ARGUMENT)
    missing = sorted(set(cpu_ids) - allowed)
    if missing:
        raise EnclaveError(f"--cpu-ids: CPU {missing[0]} is not available to this process (available: "
                           f"{','.join(map(str, sorted(allowed)))})", code=E_INVALID_ARGUMENT)


def check_cid_range(requested: int | None) -> None:
    """The range rule alone (no state needed), so bad input is refused before anything is set up."""
    if requested is not None and not FIRST_CID <= requested <= MAX_CID:
        raise EnclaveError(f"--cid {requested}: the enclave CID must be in {FIRST_CID}..{MAX_CID} "
                           "(0-2 are reserved, 3 is the parent)", code=E_INVALID_ARGUMENT)


def choose_cid(requested: int | None, used: dict[int, int]) -> int:
    """``requested`` if valid and free, else (None) the first free CID from 4.  ``used`` maps
    CIDs in use to the enclave ids holding them."""
    if requested is None:
        cid = FIRST_CID
        while cid in used:
            cid += 1
        return cid
    check_cid_range(requested)
    if requested in used:
        raise EnclaveError(f"CID {requested} is already used by enclave {used[requested]}", code=E_CID_IN_USE)
    return requested


def max_enclaves() -> int:
    """How many enclaves may run at once: ``$QTBUILD_MAX_ENCLAVES`` or 2."""
    text = os.environ.get(ENV_MAX_ENCLAVES, "").strip()
    if not text:
        return DEFAULT_MAX_ENCLAVES
    if not text.isdigit() or int(text) < 1:
        raise EnclaveError(f"{ENV_MAX_ENCLAVES}={text!r} must be a positive integer", code=E_INVALID_ARGUMENT)
    return int(text)


def check_capacity(active: list[int], limit: int) -> None:
    """Refuse another enclave when ``active`` (ids of enclaves holding resources) is full."""
    if len(active) >= limit:
        ids = ", ".join(map(str, active))
        raise EnclaveError(f"at most {limit} enclaves may run at once (running or crashed: {ids}); stop one "
                           f"first, or raise the local limit with {ENV_MAX_ENCLAVES}", code=E_INVALID_ARGUMENT)


def check_console(enclave_id: int, debug: bool) -> None:
    """The console exists only for debug-mode enclaves."""
    if not debug:
        raise EnclaveError(f"enclave {enclave_id} was not started in debug mode; its console is not available "
                           "(start it with --debug-mode)", code=E_NOT_DEBUG)
