"""Load an image from inside the enclave's memory cgroup, so what the unpacked image occupies —
file pages *and* the kernel's inodes and dentries — counts against ``--mem``.

The kernel charges a tmpfs page, inode or dentry to the memory cgroup of the process that
creates it, for as long as it exists.  Unpacked by the supervisor, an image of 300,000 empty
files cost the host ~300 MiB that no enclave limit saw.  :func:`load_charged` runs the load in
a forked child that first joins the enclave's cgroup (every hierarchy): the charges stay with
the enclave after the child has exited, and an image too large for ``--mem`` gets the child,
not the supervisor, OOM-killed.

Contract: the caller must be single-threaded (the child is forked, not exec'd) and in the mount
namespace the image is loaded into (the child shares it).  Returns ``load()``'s result; an
:class:`EnclaveError` raised by ``load`` is raised again here; a child killed by the OOM
killer becomes an ``E_MEMORY`` error; any other failure an :class:`EnclaveError` naming it.
``meanwhile()``, if given, runs in the caller while the child loads (start-up work that does not
depend on the image, on the other CPU); if it raises, the child is killed and waited for and the
exception propagates.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections.abc import Callable
from typing import TypeVar

from qtbuild.runtime.sandbox.cgroups import Cgroup

from .errors import E_MEMORY, EnclaveError

__all__ = ["load_charged"]

T = TypeVar("T")
_TOO_BIG = "the unpacked image does not fit in the enclave memory; give more --mem"


def load_charged(cgroup: Cgroup | None, load: Callable[[], T], meanwhile: Callable[[], None] | None = None) -> T:
    """``load()`` run in a child that joined ``cgroup`` (None: no cgroup, e.g. --no-limits)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(read_end)
        _child(cgroup, load, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        if meanwhile is not None:
            try:
                meanwhile()
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        data = handle.read()
    _, wait_status = os.waitpid(pid, 0)
    if data:
        kind, value = pickle.loads(data)  # our own child's answer
        if kind == "ok":
            return value
        if kind == "error":
            raise EnclaveError.from_message(value)
        raise EnclaveError(f"loading the image failed: {value}")
    if cgroup is not None and cgroup.oom_kills() > 0:
        raise EnclaveError(_TOO_BIG, code=E_MEMORY)
    raise EnclaveError(f"loading the image failed: the loader ended with status "
                       f"{os.waitstatus_to_exitcode(wait_status)}")


def _child(cgroup: Cgroup | None, load: Callable[[], T], write_end: int) -> None:
    """Join the cgroup, load, send ``(kind, value)`` and exit; never returns."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)  # the supervisor's stop handler is not ours
    answer: tuple[str, object]
    try:
        if cgroup is not None:
            for procs in cgroup.procs_files():
                with open(procs, "w") as handle:
                    handle.write(str(os.getpid()))
        answer = ("ok", load())
    except EnclaveError as exc:
        answer = ("error", exc.to_message())
    except MemoryError:
        answer = ("error", EnclaveError(_TOO_BIG, code=E_MEMORY).to_message())
    except BaseException as exc:
        answer = ("crash", f"{type(exc).__name__}: {exc}")
    try:
        with os.fdopen(write_end, "wb") as out:
            out.write(pickle.dumps(answer))
        code = 0
    except BaseException:
        code = 1
    os._exit(code)
