"""Local enclaves: run an EIF (local or hardware boot profile) as a sandboxed process, with its
own security module, emulated vsock and debug console — ``qtbuild run`` / ``qtbuild enclave``.

Modules, one concept each:

* :mod:`.manager`     start / query / stop / console: the API the CLI calls;
* :mod:`.supervisor`  the detached process that *is* one enclave (one per enclave);
* :mod:`.loader`      EIF → enclave memory: checks, PCRs of the loaded bytes, safe unpack;
* :mod:`.charged`     the load run from inside the enclave's memory cgroup (charged to ``--mem``);
* :mod:`.launch`      what the enclave runs (``launch.json`` / ``cmd`` / ``env``);
* :mod:`.plan`        the sandbox spec: root, binds (``/dev/qtsm``, ``/run/vsock``), env, limits;
* :mod:`.console`     bounded ring buffer and the one-reader console socket;
* :mod:`.resources`   what an enclave holds on the host and how it is released (also after a crash);
* :mod:`.state`       the runtime directory, enclave records and the supervisor's liveness lock;
* :mod:`.rules`       the platform's rules with qt's error codes;
* :mod:`.errors`      :class:`EnclaveError`.

The emulated vsock root of the host is ``<runtime dir>/vsock`` (:attr:`RuntimeDir.vsock_root`);
parent-side tools (``qtbuild proxy``) reach enclaves with ``QTBUILD_VSOCK_DIR`` set to it and
``QTBUILD_VSOCK_TRANSPORT=emulated``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtbuild.runtime.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .errors import EnclaveError
    from .manager import Manager, RunOptions, Started
    from .state import EnclaveRecord, RuntimeDir

#: Imported on first use (PEP 562): ``python -m qtbuild.runtime.enclave.supervisor`` imports
#: this package first, and the supervisor does not need the manager's imports.
_EXPORTS = {"EnclaveError": "errors", "Manager": "manager", "RunOptions": "manager", "Started": "manager",
            "EnclaveRecord": "state", "RuntimeDir": "state"}

__all__ = ["EnclaveError", "EnclaveRecord", "Manager", "RunOptions", "RuntimeDir", "Started"]


_resolve, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> object:  # a def, so type checkers still see the submodules
    return _resolve(name)
