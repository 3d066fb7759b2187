"""What a sandbox is asked to be: :class:`SandboxSpec`, its :class:`Bind` mounts, the
:class:`SandboxExit` it ends with, and the single error type, :class:`SandboxError`.

Contract of :meth:`SandboxSpec.validate`: a spec that passes can be serialised for the helper
process (:meth:`SandboxSpec.to_plan`) and every path and id in it has the right shape; a spec
that does not raises :class:`SandboxError` naming the field.  Nothing is created or checked
on the host beyond the existence of ``root`` and the bind sources.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .errors import SandboxError, step

if TYPE_CHECKING:
    from .subids import IdRange

__all__ = ["DEFAULT_CGROUP_ROOT", "Bind", "SandboxError", "SandboxExit", "SandboxSpec", "step"]

DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_MAX_ID = 2**32 - 2


@dataclass
class Bind:
    """Bind the host path ``source`` (file, directory or unix socket) onto the absolute path
    ``target`` inside the sandbox root."""

    source: str
    target: str
    read_only: bool = True


@dataclass
class SandboxSpec:
    """Everything :func:`qtbuild.runtime.sandbox.start_sandbox` needs.

    ``stdin``/``stdout``/``stderr`` are host fds handed to the application as 0/1/2 (``None``
    means ``/dev/null``); they stay owned by the caller.  ``no_limits`` opts out of cgroups
    entirely (no memory/cpu/pids limits, no OOM accounting); without it a missing cgroup
    controller is a :class:`SandboxError`.  ``cgroup_root`` is where cgroup hierarchies are
    looked for (injectable for tests).  ``ids`` is the host id range the sandbox's ids
    ``0 .. count-1`` map to when it is started as root (default: :func:`.subids.enclave_ids`);
    rootless, the caller's own uid and gid are mapped to ``uid``/``gid`` and ``ids`` is unused.
    """

    root: str
    argv: list[str]
    env: list[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    hostname: str = "enclave"
    memory_bytes: int | None = None
    cpus: int | None = None
    cpu_ids: tuple[int, ...] | None = None
    pids_max: int | None = 1024
    binds: list[Bind] = field(default_factory=list)
    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    no_limits: bool = False
    name: str = "enclave"
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    ids: IdRange | None = None

    def validate(self) -> None:
        """Raise :class:`SandboxError` naming the first malformed field."""
        if not os.path.isabs(self.root) or not os.path.isdir(self.root):
            raise SandboxError(f"root: {self.root!r} is not an absolute path to a directory")
        if not self.argv or not self.argv[0] or any(not isinstance(a, str) or "\0" in a for a in self.argv):
            raise SandboxError("argv: the command must be a non-empty list of strings starting with a program")
        if any("=" not in entry or "\0" in entry for entry in self.env):
            raise SandboxError("env: every entry must look like NAME=value")
        _check_inside_path("cwd", self.cwd, allow_root=True)
        for label, value in (("uid", self.uid), ("gid", self.gid), *(("groups", g) for g in self.groups)):
            if not isinstance(value, int) or not 0 <= value <= _MAX_ID:
                raise SandboxError(f"{label}: {value!r} is not a valid id")
        if self.ids is not None:
            for field_name, number in (("uid", self.uid), ("gid", self.gid), *(("groups", g) for g in self.groups)):
                if not self.ids.contains(number):
                    raise SandboxError(f"{field_name}: {number} is outside the {self.ids.count} ids mapped into the "
                                       "sandbox (give the subordinate range more ids)")
        if not self.hostname or len(self.hostname) > 64 or "\0" in self.hostname:
            raise SandboxError(f"hostname: {self.hostname!r} must be 1-64 characters")
        limits: tuple[tuple[str, int | None], ...] = (
            ("memory_bytes", self.memory_bytes), ("cpus", self.cpus), ("pids_max", self.pids_max))
        for label, limit in limits:
            if limit is not None and (not isinstance(limit, int) or limit <= 0):
                raise SandboxError(f"{label}: {limit!r} must be a positive integer or None")
        if self.cpu_ids is not None and (not self.cpu_ids or any(
                not isinstance(cpu, int) or isinstance(cpu, bool) or cpu < 0 for cpu in self.cpu_ids)):
            raise SandboxError(f"cpu_ids: {self.cpu_ids!r} must be a non-empty list of CPU numbers or None")
        if not _NAME.fullmatch(self.name):
            raise SandboxError(f"name: {self.name!r} must be 1-64 of [A-Za-z0-9_.-], not starting with '.' or '-'")
        for bind in self.binds:
            if not os.path.exists(bind.source):
                raise SandboxError(f"binds: source {bind.source!r} does not exist on the host")
            _check_inside_path("binds target", bind.target, allow_root=False)

    def to_plan(self) -> dict:
        """The JSON-able part the helper process needs (host fds and cgroup settings stay here)."""
        plan = asdict(self)
        for key in ("stdin", "stdout", "stderr", "memory_bytes", "cpus", "cpu_ids", "pids_max", "no_limits", "name",
                    "cgroup_root"):
            del plan[key]
        return plan


@dataclass
class SandboxExit:
    """How the application (the sandbox's main process) ended: exactly one of ``code`` and
    ``signal`` is set.  ``oom_killed`` is true when the sandbox's memory cgroup recorded an
    OOM kill (the application or another process inside)."""

    code: int | None
    signal: int | None
    oom_killed: bool


def _check_inside_path(label: str, path: str, *, allow_root: bool) -> None:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise SandboxError(f"{label}: {path!r} must be an absolute path inside the sandbox")
    parts = [part for part in path.split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise SandboxError(f"{label}: {path!r} must be a normalised path without '.' or '..'")
    if not parts and not allow_root:
        raise SandboxError(f"{label}: cannot be '/'")
