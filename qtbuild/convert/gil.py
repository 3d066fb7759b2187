"""A shorter GIL switch interval while an image is converted.

A convert runs a dozen threads: most spend their time in C with the GIL released (inflating,
hashing), a few in Python (tar headers, the tree, the archive's headers).  A thread back from
its C call needs the GIL again before it can hand its result over and start the next call, and
CPython makes a thread running Python give the GIL up only every switch interval (5 ms by
default) — so next to a busy Python thread, a thread hashing 1 MiB chunks (0.7 ms each) waits
up to 5 ms for each one: the second CPU idles while there is work for it.  At 0.5 ms the Python
thread pays a forced switch (some microseconds) every 0.5 ms, a few per cent, and the C threads
wait a tenth as long.

The interval is process-wide: :func:`short_gil_switches` sets it for the duration of a block and
then restores the previous one (never lengthening it: a caller's shorter choice is kept).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

__all__ = ["SWITCH_INTERVAL", "short_gil_switches"]

SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def short_gil_switches(interval: float = SWITCH_INTERVAL) -> Iterator[None]:
    """Run the block with a GIL switch interval of at most ``interval`` seconds."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(min(previous, interval))
    try:
        yield
    finally:
        sys.setswitchinterval(previous)
