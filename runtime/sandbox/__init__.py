"""Run an enclave image's application in a sandboxed Linux process.

Namespaces (user, mount, PID, network, IPC, UTS, cgroup — as root the user namespace maps a
subordinate id range, :mod:`.subids`, so root inside is an unprivileged host uid), a pivoted
root with fresh ``/proc``, ``/dev`` and ``/tmp``, cgroup limits (v2 or v1), no capabilities,
``no_new_privs`` and a seccomp deny list (``socket(AF_VSOCK)`` included), in the step
order of docs/sandbox.md (bubblewrap's).  Public API::

    spec = SandboxSpec(root="/path/to/rootfs", argv=["/app"], env=["PATH=/bin"], memory_bytes=256 << 20)
    sandbox = start_sandbox(spec)      # raises SandboxError naming any protection it cannot apply
    result = sandbox.wait()            # SandboxExit(code, signal, oom_killed)
    probe()                            # what this host supports

Modules: :mod:`.spec` (the dataclasses), :mod:`.host` (start/wait/kill), :mod:`.launch` (the
helper process: the straight-line setup), :mod:`.namespaces`, :mod:`.mounts`,
:mod:`.cgroups`, :mod:`.caps`, :mod:`.seccomp`, :mod:`.probe`, :mod:`.subids` (the id range),
:mod:`.proctitle` (PID 1's name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtbuild.runtime.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from .host import Sandbox, start_sandbox
    from .probe import probe
    from .spec import Bind, SandboxError, SandboxExit, SandboxSpec

#: Imported on first use (PEP 562): the helper (``python -m qtbuild.runtime.sandbox.helper``)
#: imports this package first and needs none of the host side; the enclave supervisor needs no probe.
_EXPORTS = {"Sandbox": "host", "start_sandbox": "host", "probe": "probe", "Bind": "spec", "SandboxError": "spec",
            "SandboxExit": "spec", "SandboxSpec": "spec"}

__all__ = ["Bind", "Sandbox", "SandboxError", "SandboxExit", "SandboxSpec", "probe", "start_sandbox"]


_resolve, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> object:  # a def, so type checkers still see the submodules
    return _resolve(name)
