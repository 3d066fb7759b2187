"""Unauthenticated refusals: counted, and sampled into the audit log at a bounded rate.

Anyone who reaches the port can send unsigned or badly signed requests; recording each one as
an fsynced audit row would let them grow the store without bound and spend the disk's write
budget.  :class:`RefusalSampler` instead writes at most one row per ``interval`` seconds: the
latest refused request, whose ``reason`` ends with ``[sample of N unauthenticated refusals
since the previous sample]`` — so the total stays exact while the rows stay few.
:meth:`RefusalSampler.flush` writes the remainder (the server calls it when it stops).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from qtbuild.runtime.kms.store import AuditRecord

log = logging.getLogger("qtbuild.kms")

DEFAULT_INTERVAL = 1.0
SAMPLE_NOTE = " [sample of {count} unauthenticated refusals since the previous sample]"


class RefusalSampler:
    """Thread-safe; ``add`` costs an fsync at most once per ``interval`` seconds."""

    def __init__(self, write: Callable[[AuditRecord], None], *, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self._lock = threading.Lock()
        self._pending: AuditRecord | None = None
        self._count = 0
        self._last = -float("inf")
        self.total = 0

    def add(self, record: AuditRecord) -> None:
        with self._lock:
            self.total += 1
            self._pending, self._count = record, self._count + 1
            now = self.clock()
            if now - self._last < self.interval:
                return
            self._last = now
            sample = self._take()
        self._write(sample)

    def flush(self) -> None:
        with self._lock:
            sample = self._take()
        self._write(sample)

    def _take(self) -> AuditRecord | None:
        if self._pending is None:
            return None
        note = SAMPLE_NOTE.format(count=self._count)
        sample = dataclasses.replace(self._pending, reason=(self._pending.reason or "") + note)
        self._pending, self._count = None, 0
        return sample

    def _write(self, sample: AuditRecord | None) -> None:
        if sample is None:
            return
        try:
            self.write(sample)
        except Exception:  # the reply stands; the log says what the audit lost
            log.exception("audit sample lost: %s", sample)
