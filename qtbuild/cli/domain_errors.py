"""The one place where the project's typed errors become CLI errors (message and exit code).

Commands let domain errors propagate; :class:`qtbuild.cli.command.QtbuildCommand` hands them to
:func:`as_cli_error`.  An error not named here (nor an OSError) is a bug and keeps its traceback.

The table names each class by the module that defines it and looks it up in ``sys.modules``:
an exception whose class was never imported cannot exist, so mapping errors imports nothing
(``qtbuild --help`` stays cheap) and no command module depends on another's errors.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from typing import Any

from qtbuild.cli.errors import CheckFailed, CliError, InputError

ErrorMapping = tuple[str, str, Callable[[Any], CliError]]


def _input(exc: Exception) -> CliError:
    return InputError(str(exc))


def _enclave(exc: Any) -> CliError:
    """EnclaveError: exit 1 when the image or the enclave failed a check, else 2."""
    return (CheckFailed if exc.check_failed else InputError)(str(exc))


def _attestation(exc: Any) -> CliError:
    if exc.check == "input":
        return InputError(f"unreadable document: {exc.message}")
    return CheckFailed(f"invalid document: check '{exc.check}' failed: {exc.message}")


#: (module, class name, conversion); the first class the error is an instance of wins.
DOMAIN_ERRORS: tuple[ErrorMapping, ...] = (
    ("qtbuild.formats.errors", "FormatError", _input),
    ("qtbuild.formats.errors", "SignatureError", _input),
    ("qtbuild.errors", "ImageError", _input),
    ("qtbuild.convert.metadata", "MetadataError", _input),
    ("qtbuild.inspect.extract", "ExtractError", _input),
    ("qtbuild.runtime.enclave.errors", "EnclaveError", _enclave),
    ("qtbuild.runtime.qtsm.pki", "PkiError", _input),
    ("qtbuild.runtime.verifier.attestation", "AttestationError", _attestation),
    ("qtbuild.runtime.kms.crypto", "MasterKeyError", _input),
    ("qtbuild.runtime.kms.store", "StoreError", _input),
    ("qtbuild.runtime.sdk.kms_client", "KmsClientError", lambda exc: CheckFailed(f"kms: {exc}")),
    ("qtbuild.runtime.sdk.kms_client", "KmsProtocolError", lambda exc: CheckFailed(f"kms: unexpected reply: {exc}")),
    ("qtbuild.runtime.proxy", "ProxyConfigError", _input),
    ("qtbuild.runtime.sdk.vsock", "VsockConfigError", _input),
    ("qtbuild.cli.sdk", "ExportError", _input),
)


def as_cli_error(exc: BaseException) -> CliError | None:
    """The CLI error for ``exc``, or None when it is not an error the CLI reports (a bug)."""
    for module_name, class_name, convert in DOMAIN_ERRORS:
        error_class = getattr(sys.modules.get(module_name), class_name, None)
        if error_class is not None and isinstance(exc, error_class):
            return convert(exc)
    if isinstance(exc, OSError):
        return InputError(describe_os_error(exc))
    return None


def describe_os_error(exc: OSError) -> str:
    """``reason: path (hint)`` for a failed system call on a user's file."""
    where = f": {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno == errno.ENOENT:
        hint = " (check the path)"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = " (check permissions)"
    elif exc.errno == errno.ENOSPC:
        hint = " (free some disk space)"
    return f"{reason}{where}{hint}"
