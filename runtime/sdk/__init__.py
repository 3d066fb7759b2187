"""The enclave SDK: what code running *inside* an image needs, and nothing more.

Runs on Debian bookworm's own packages (python3 3.11, python3-cryptography 38, python3-cbor2
5.4) and imports nothing else of qtbuild: ``qtbuild sdk export DIR`` copies these modules plus
``runtime/vsock.py`` into ``DIR/qtbuild_sdk/`` (see README.md).

    Qtsm, QtsmError    the security module (/dev/qtsm, /dev/nsm): attestation, PCRs, random
    connect, listen    vsock stream sockets (native AF_VSOCK or qtbuild's emulation)
    RecipientKey       the RSA-2048 key pair for KMS recipient requests

Inside this package, import siblings relatively (``from .qtsm import …``) and vsock as
``from ..vsock import …``: the export rewrites exactly those forms (and absolute
``runtime.sdk.*`` / ``runtime.vsock``); any other qtbuild import makes the export fail.
"""

from __future__ import annotations

from ..vsock import connect, listen
from .qtsm import Qtsm, QtsmError
from .recipient import RecipientKey

__all__ = ["Qtsm", "QtsmError", "RecipientKey", "connect", "listen"]

# --- KMS (owned by the KMS engineer) --------------------------------------------------------------
# Add here:  from .kms_client import KmsClient  /  from .envelope import open_envelope
# and append "KmsClient", "open_envelope" to __all__.
# --- end KMS --------------------------------------------------------------------------------------
