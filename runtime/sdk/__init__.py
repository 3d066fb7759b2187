"""The enclave SDK: what code running *inside* an image needs, and nothing more.

Runs on Debian bookworm's own packages (python3 3.11, python3-cryptography 38, python3-cbor2
5.4) and imports nothing else of qtbuild: ``qtbuild sdk export DIR`` copies these modules
into ``DIR/qtbuild_sdk/`` as they are (see README.md).

    Qtsm, QtsmError    the security module (/dev/qtsm, /dev/nsm): attestation, PCRs, random
    connect, listen    vsock stream sockets (native AF_VSOCK or qtbuild's emulation)
    RecipientKey       the RSA-2048 key pair for KMS recipient requests
    KmsClient          signed KMS calls (decrypt-data, create-datakey, ...) with the recipient flow
    AwsKmsClient       AWS KMS (SigV4, Recipient) for the Nitro profile
    open_envelope      opens the KMS's CMS EnvelopedData answer with the recipient key
    parse_attestation  the fields of an attestation document (decoded, not verified)
    receive_job, Job   the hand-off: the parent's job and credentials, after attesting

Inside this package, import siblings relatively (``from .qtsm import …``): the export is a
plain copy, and an absolute qtbuild import makes it fail.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aws_kms import AwsCredentials, AwsKmsClient
    from .document import AttestationFields, DocumentError, parse_attestation
    from .envelope import open_envelope
    from .handoff import HandoffError, Job, receive_job
    from .kms_client import Credentials, KmsClient, tcp_transport, vsock_transport
    from .qtsm import Qtsm, QtsmError
    from .recipient import RecipientKey
    from .vsock import connect, listen

#: Each public name and the module defining it.  Imported on first use (PEP 562), so a process
#: that needs one module (the enclave supervisor needs only ``vsock``) does not pay for the
#: others' imports (http.client, asyncio, cryptography) at start-up.
_EXPORTS = {
    "AwsCredentials": "aws_kms", "AwsKmsClient": "aws_kms",
    "AttestationFields": "document", "DocumentError": "document", "parse_attestation": "document",
    "open_envelope": "envelope",
    "HandoffError": "handoff", "Job": "handoff", "receive_job": "handoff",
    "Credentials": "kms_client", "KmsClient": "kms_client", "tcp_transport": "kms_client",
    "vsock_transport": "kms_client",
    "Qtsm": "qtsm", "QtsmError": "qtsm",
    "RecipientKey": "recipient",
    "connect": "vsock", "listen": "vsock",
}
#: Modules that were attributes of the package once it was imported (when it imported them eagerly).
_MODULES = frozenset(_EXPORTS.values())

__all__ = [
    "AttestationFields", "AwsCredentials", "AwsKmsClient", "Credentials", "DocumentError", "HandoffError", "Job",
    "KmsClient", "Qtsm", "QtsmError", "RecipientKey", "connect", "listen", "open_envelope", "parse_attestation",
    "receive_job", "tcp_transport", "vsock_transport",
]


def __getattr__(name: str) -> object:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
