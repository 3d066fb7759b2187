"""Resource limits for one sandbox: a cgroup named after it, on cgroup v2 or v1.

Placement:

* v2 (``<root>/cgroup.controllers`` exists): ``<root>/qtbuild/<name>``, after enabling the
  needed controllers in ``<root>`` and ``<root>/qtbuild`` (``cgroup.subtree_control``).  The
  hierarchy root is used because v2 forbids enabling controllers below a populated cgroup.
* v1 (hierarchies ``<root>/<controller>``): ``<hierarchy>/<caller's cgroup>/qtbuild/<name>``
  in each hierarchy needed — nested under the caller, so the sandbox stays accounted wherever
  the caller is.

Limits: ``memory.max``/``memory.limit_in_bytes`` with swap off (``memory.swap.max=0`` /
``memory.memsw.limit_in_bytes``), ``cpu.max``/``cpu.cfs_quota_us`` (``cpus`` × 100 ms per
100 ms), ``cpuset.cpus`` (the sandbox runs only on ``cpu_ids``, which it cannot widen as it could
its own affinity mask), ``pids.max``.  The ``pids`` controller is always used (it also tracks the
sandbox's processes), ``memory`` when ``memory_bytes`` is set, ``cpu`` when ``cpus`` is,
``cpuset`` when ``cpu_ids`` is.  On v1 a new cpuset starts empty, so each directory created
there first inherits its parent's ``cpuset.cpus`` and ``cpuset.mems``.

Contract: :func:`create` raises :class:`SandboxError` naming the controller or file and the
fix when it cannot apply a limit; :meth:`Cgroup.remove` kills what is left and removes the
cgroup directories, and the shared ``qtbuild`` parent when no other sandbox uses it (creation
retries if a concurrent removal takes the parent away); the sandbox joins by writing its pid
to every path of :meth:`Cgroup.procs_files` before it execs anything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass

from .spec import SandboxError

__all__ = ["PROC_SELF_CGROUP", "Cgroup", "Limits", "create", "detect", "own_cgroup", "v1_parent"]

#: Where the kernel lists the calling process's cgroups, a line per hierarchy.
PROC_SELF_CGROUP = "/proc/self/cgroup"

PARENT = "qtbuild"
_PERIOD_US = 100_000
_FIX = ("run as root, delegate a writable cgroup subtree to this user (systemd: Delegate=yes), "
        "or pass no_limits=True to run without memory/cpu/pids limits")


@dataclass
class Limits:
    memory_bytes: int | None
    cpus: int | None
    pids_max: int | None
    cpu_ids: tuple[int, ...] | None = None

    def controllers(self) -> list[str]:
        needed = ["pids"]
        if self.memory_bytes is not None:
            needed.append("memory")
        if self.cpus is not None:
            needed.append("cpu")
        if self.cpu_ids is not None:
            needed.append("cpuset")
        return needed


@dataclass
class Cgroup:
    """One sandbox's cgroup: ``paths`` maps each controller to its directory (on v2 they are
    all the same directory)."""

    version: int
    paths: dict[str, str]

    def directories(self) -> list[str]:
        return sorted(set(self.paths.values()))

    def procs_files(self) -> list[str]:
        return [os.path.join(path, "cgroup.procs") for path in self.directories()]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            try:
                with open(procs) as handle:
                    found.update(int(line) for line in handle if line.strip())
            except FileNotFoundError:
                pass
        return found

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 without a memory limit)."""
        if "memory" not in self.paths:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.paths["memory"], name)) as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except FileNotFoundError:
            pass
        return 0

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (``cgroup.kill`` on v2 where the kernel has it)."""
        kill_file = os.path.join(self.directories()[0], "cgroup.kill")
        if self.version == 2 and os.path.exists(kill_file):
            _write(kill_file, "1")
            return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left, then remove the directories (retrying while the kernel finishes
        reaping).  Idempotent."""
        deadline = time.monotonic() + timeout
        for path in self.directories():
            while os.path.isdir(path):
                try:
                    os.rmdir(path)
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise SandboxError(f"cgroup {path} could not be removed: {exc.strerror}") from exc
                    self.kill()
                    time.sleep(0.01)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(path))  # the shared parent, once no sandbox uses it


def detect(root: str) -> dict:
    """What ``root`` offers: ``{"version": 2|1|None, "controllers": [...], "hierarchies":
    {controller: path}}`` (hierarchies only on v1)."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        with open(os.path.join(root, "cgroup.controllers")) as handle:
            return {"version": 2, "controllers": sorted(handle.read().split()), "hierarchies": {}}
    hierarchies = {}
    for controller in ("memory", "cpu", "pids", "cpuset", "cpuacct", "freezer"):
        path = os.path.join(root, controller)
        if os.path.exists(os.path.join(path, "cgroup.procs")):
            hierarchies[controller] = path
    version = 1 if hierarchies else None
    return {"version": version, "controllers": sorted(hierarchies), "hierarchies": hierarchies}


def create(name: str, limits: Limits, root: str) -> Cgroup:
    """Create the sandbox's cgroup under ``root`` and apply ``limits``; see the module docstring."""
    found = detect(root)
    needed = limits.controllers()
    missing = [controller for controller in needed if controller not in found["controllers"]]
    if found["version"] is None:
        raise SandboxError(f"resource limits: no cgroup v1 or v2 hierarchy found under {root}; mount cgroups "
                           "there, or pass no_limits=True to run without memory/cpu/pids limits")
    if missing:
        raise SandboxError(f"resource limits: cgroup controller(s) {', '.join(missing)} not available under "
                           f"{root} (cgroup v{found['version']}); enable them, or pass no_limits=True")
    for attempt in range(3):
        try:
            if found["version"] == 2:
                cgroup = _create_v2(name, needed, root)
            else:
                cgroup = _create_v1(name, needed, found["hierarchies"])
            break
        except FileNotFoundError:  # another sandbox's cleanup removed the shared parent meanwhile
            if attempt == 2:
                raise SandboxError(f"resource limits: cgroup parent under {root} keeps disappearing") from None
    try:
        _apply(cgroup, limits)
    except BaseException:
        cgroup.remove()
        raise
    return cgroup


def _create_v2(name: str, needed: list[str], root: str) -> Cgroup:
    parent = os.path.join(root, PARENT)
    _enable_controllers(root, needed)
    _mkdir(parent, exist_ok=True)
    _enable_controllers(parent, needed)
    path = os.path.join(parent, name)
    _mkdir(path, exist_ok=False)
    return Cgroup(2, {controller: path for controller in needed})


def _create_v1(name: str, needed: list[str], hierarchies: dict[str, str]) -> Cgroup:
    paths: dict[str, str] = {}
    try:
        for controller in needed:
            parent = v1_parent(hierarchies[controller], controller)
            _mkdir(parent, exist_ok=True, parents=True)
            paths[controller] = os.path.join(parent, name)
            _mkdir(paths[controller], exist_ok=False)
            if controller == "cpuset":
                _inherit_cpuset(parent)
                _inherit_cpuset(paths[controller])
    except BaseException:
        Cgroup(1, {c: p for c, p in paths.items() if os.path.isdir(p)}).remove()
        raise
    return Cgroup(1, paths)


def _apply(cgroup: Cgroup, limits: Limits) -> None:
    v2 = cgroup.version == 2
    if limits.memory_bytes is not None:
        memory = cgroup.paths["memory"]
        _write(os.path.join(memory, "memory.max" if v2 else "memory.limit_in_bytes"), str(limits.memory_bytes))
        swap = os.path.join(memory, "memory.swap.max" if v2 else "memory.memsw.limit_in_bytes")
        if os.path.exists(swap):  # absent when the kernel has no swap accounting
            _write(swap, "0" if v2 else str(limits.memory_bytes))
    if limits.cpus is not None:
        cpu = cgroup.paths["cpu"]
        if v2:
            _write(os.path.join(cpu, "cpu.max"), f"{limits.cpus * _PERIOD_US} {_PERIOD_US}")
        else:
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(_PERIOD_US))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(limits.cpus * _PERIOD_US))
    if limits.cpu_ids is not None:
        _write(os.path.join(cgroup.paths["cpuset"], "cpuset.cpus"), ",".join(map(str, sorted(limits.cpu_ids))))
    _write(os.path.join(cgroup.paths["pids"], "pids.max"), str(limits.pids_max) if limits.pids_max else "max")


def _inherit_cpuset(path: str) -> None:
    """Give an empty v1 cpuset its parent's CPUs and memory nodes (no task can join it before)."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not _read(os.path.join(path, name)):
            _write(os.path.join(path, name), _read(os.path.join(os.path.dirname(path), name)))


def _read(path: str) -> str:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError as exc:
        raise SandboxError(f"resource limits: cannot read {path}: {exc.strerror}; {_FIX}") from exc


def v1_parent(hierarchy: str, controller: str) -> str:
    """Where sandboxes' cgroups go in the v1 hierarchy of ``controller`` mounted at
    ``hierarchy``: ``<hierarchy>/<the caller's cgroup>/qtbuild`` (see the module docstring)."""
    return os.path.join(hierarchy, own_cgroup(controller).lstrip("/"), PARENT)


def own_cgroup(controller: str) -> str:
    """The caller's cgroup path in the v1 hierarchy of ``controller``, or with ``controller`` ``""``
    in the v2 (unified) hierarchy; ``/`` if that hierarchy is not listed.  OSError if
    :data:`PROC_SELF_CGROUP` cannot be read."""
    with open(PROC_SELF_CGROUP) as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    return "/"


def _enable_controllers(path: str, needed: list[str]) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    with open(control) as handle:
        enabled = set(handle.read().split())
    for controller in needed:
        if controller not in enabled:
            _write(control, f"+{controller}")


def _mkdir(path: str, *, exist_ok: bool, parents: bool = False) -> None:
    try:
        (os.makedirs if parents else os.mkdir)(path, 0o755)
    except FileExistsError:
        if exist_ok:
            return
        raise SandboxError(f"resource limits: cgroup {path} already exists (another sandbox with this name is "
                           "running, or a stale one was left behind: remove it with rmdir)") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SandboxError(f"resource limits: cannot create cgroup {path}: {exc.strerror}; {_FIX}") from exc


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except OSError as exc:
        raise SandboxError(f"resource limits: cannot write {value!r} to {path}: {exc.strerror}; {_FIX}") from exc
