"""Attestation documents from the local PKI without an enclave (``qtbuild attest issue``): for
verifier and policy development, and for tests.

A document is what the cloud's security module would return: PCRs 0–15 (zero unless given, all
zero in debug mode) plus any given PCR 16–31, the profile's module id, encoding and chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qtbuild.formats.attestation import MAX_PCRS
from qtbuild.formats.measure import PCR_SIZE, ZERO_PCR
from qtbuild.runtime.qtsm.clouds import CloudProfile, machine_seed
from qtbuild.runtime.qtsm.device import BOOT_PCRS, AttestationFields, sign_fields
from qtbuild.runtime.qtsm.pki import LocalPki

#: The leaf name documents issued outside an enclave are signed with.
ISSUER_NAME = "attest-issue"


class IssueError(ValueError):
    """An argument the document cannot carry (PCR index or size, field over the cloud's limit)."""


def issue_document(
    pki: LocalPki,
    cloud: CloudProfile,
    *,
    pcrs: dict[int, bytes] | None = None,
    user_data: bytes | None = None,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    debug: bool = False,
    instance_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> bytes:
    """A signed document in ``cloud``'s shape; IssueError for what the cloud would refuse."""
    given = dict(pcrs or {})
    for index, value in given.items():
        if not 0 <= index < MAX_PCRS or len(value) != PCR_SIZE:
            raise IssueError(f"PCR{index}: index must be 0..31 and the value {PCR_SIZE} bytes")
    if debug and any(index < BOOT_PCRS for index in given):
        raise IssueError("a debug-mode document has all-zero PCRs 0..15: drop --pcr 0..15 or --debug")
    document_pcrs = {index: ZERO_PCR for index in range(BOOT_PCRS)}
    document_pcrs.update(given)
    for name, field, maximum in (("user_data", user_data, cloud.limits.max_user_data),
                                 ("nonce", nonce, cloud.limits.max_nonce),
                                 ("public_key", public_key, cloud.limits.max_public_key)):
        if field is not None and len(field) > maximum:
            raise IssueError(f"{name}: {len(field)} bytes, over the {cloud.title} limit of {maximum} bytes")
    try:
        cloud.check_instance_id(instance_id)
    except ValueError as exc:
        raise IssueError(str(exc)) from None
    parent_id = cloud.parent_id(instance_id, machine_seed())
    module_id = cloud.module_id(f"{ISSUER_NAME}-{time.monotonic_ns()}", parent_id)
    fields = AttestationFields(module_id, int(clock() * 1000), document_pcrs, user_data, nonce, public_key)
    return sign_fields(cloud, pki.signer(ISSUER_NAME, cloud.name), fields)
