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

from .host import Sandbox, start_sandbox
from .probe import probe
from .spec import Bind, SandboxError, SandboxExit, SandboxSpec

__all__ = ["Bind", "Sandbox", "SandboxError", "SandboxExit", "SandboxSpec", "probe", "start_sandbox"]
