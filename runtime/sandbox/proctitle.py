"""The sandbox's PID 1 under a neutral name: its command line is the helper's (the host's Python
and module paths), and ``/proc/1/cmdline`` is readable by the application.

Contract of :func:`set_title`: afterwards ``/proc/self/cmdline`` is ``title`` followed by NUL
bytes only (the original argument area, ``arg_start .. arg_end`` from ``/proc/self/stat``, is
overwritten in place, as setproctitle(3) does; needs no privilege) and ``comm`` is ``title``
(first 15 bytes).  The process's own ``sys.argv`` is a copy and is not affected.
"""

from __future__ import annotations

import ctypes

from .syscalls import prctl

__all__ = ["set_title"]

PR_SET_NAME = 15
_ARG_START_FIELD = 48  # /proc/<pid>/stat fields, 1-based (proc(5)); arg_end follows


def set_title(title: str) -> None:
    with open("/proc/self/stat", "rb") as handle:
        data = handle.read()
    fields = data[data.rindex(b")") + 2:].split()  # field 3 onwards: the name may hold spaces
    start = int(fields[_ARG_START_FIELD - 3])
    end = int(fields[_ARG_START_FIELD - 2])
    payload = title.encode()[:max(end - start - 1, 0)]
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, payload, len(payload))
    name = ctypes.create_string_buffer(title.encode()[:15])
    prctl(PR_SET_NAME, ctypes.addressof(name), what="naming the process")
