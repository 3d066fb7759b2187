"""What this host supports for sandboxes, for clear errors and ``qtbuild doctor``.

Contract of :func:`probe`: never raises for a missing feature; returns a JSON-able dict::

    {"rootless": bool, "euid": int,
     "userns": None | "why not",            # can this user create a user namespace
     "ids": None | {"uid", "gid", "count"} | "why not",   # as root: the subordinate range used
     "namespaces": None | "why not",        # can the sandbox's namespaces be created (as root:
                                            # with that range mapped)
     "cgroup": {"root", "version": 1|2|None, "controllers": [...], "writable": bool,
                "limits": None | "why limits cannot be applied"},
     "seccomp": {"filter": bool, "arch": str, "supported_arch": bool},
     "ok": bool}                             # a sandbox with limits can start here

``namespaces`` is tried in a throwaway helper process (the same interpreter and module the
sandbox uses), so the answer reflects this exact user and kernel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess

from . import seccomp
from .cgroups import PARENT, detect, v1_parent
from .host import command, helper_env
from .spec import DEFAULT_CGROUP_ROOT, SandboxError
from .subids import enclave_ids

__all__ = ["probe"]


def probe(cgroup_root: str = DEFAULT_CGROUP_ROOT) -> dict:
    rootless = os.geteuid() != 0
    ids: dict | str | None = None
    if not rootless:
        try:
            ids = dataclasses.asdict(enclave_ids())
        except SandboxError as exc:
            ids = str(exc)
    spaces = _probe_namespaces(ids if isinstance(ids, dict) else None)
    cgroup = _probe_cgroup(cgroup_root)
    filter_ok = _seccomp_filter_available()
    report = {
        "rootless": rootless,
        "euid": os.geteuid(),
        "userns": spaces.get("userns", "probe failed"),
        "ids": ids,
        "namespaces": spaces.get("namespaces", "probe failed"),
        "cgroup": cgroup,
        "seccomp": {"filter": filter_ok, "arch": platform.machine(), "supported_arch": seccomp.supported()},
    }
    report["ok"] = (report["namespaces"] is None and not isinstance(ids, str) and cgroup["limits"] is None and filter_ok
                    and seccomp.supported())
    return report


def _probe_namespaces(ids: dict | None) -> dict:
    arguments = [str(ids[key]) for key in ("uid", "gid", "count")] if ids else []
    try:
        done = subprocess.run(command("--probe", *arguments), env=helper_env(), cwd="/", capture_output=True,
                              timeout=30, check=False)
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return {"userns": f"probe failed: {exc}", "namespaces": f"probe failed: {exc}"}


def _probe_cgroup(root: str) -> dict:
    found = detect(root)
    result = {"root": root, "version": found["version"], "controllers": found["controllers"], "writable": False,
              "limits": None}
    if found["version"] is None:
        result["limits"] = f"no cgroup hierarchy under {root}"
        return result
    missing = [c for c in ("memory", "cpu", "pids") if c not in found["controllers"]]
    if found["version"] == 2:
        parents = [os.path.join(root, PARENT) if os.path.isdir(os.path.join(root, PARENT)) else root]
    else:
        parents = [_existing(v1_parent(found["hierarchies"][c], c))
                   for c in found["hierarchies"] if c in ("memory", "cpu", "pids")]
    result["writable"] = bool(parents) and all(os.access(p, os.W_OK) for p in parents)
    if missing:
        result["limits"] = f"controllers missing: {', '.join(missing)}"
    elif not result["writable"]:
        result["limits"] = "cgroup hierarchy not writable by this user (no delegation)"
    return result


def _existing(path: str) -> str:
    """``path`` or its nearest existing ancestor (where the cgroup would be created)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _seccomp_filter_available() -> bool:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as handle:
            actions = handle.read().split()
    except OSError:
        return False
    return "errno" in actions and "kill_process" in actions
