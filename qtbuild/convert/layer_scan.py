"""Scan one layer's tar stream on a worker thread, handing its members over in batches.

flatten applies layers to its tree strictly in order, on one thread; everything before that —
opening and inflating the layer, hashing it, parsing its tar headers, spilling its bytes — does
not depend on the layers below it.  A :class:`LayerScan` does that part on its own thread, so the
layers above the one being applied are already being read: the inflate and hash threads of the
next layers keep the second core busy while the tree is built (measured: one core and a third
busy on average when layers were handled one after another).

Contract
--------
* The worker opens the stream (``open_stream()``), scans it with a :class:`TarScanner`, drains it
  to EOF (so its digests are verified) and closes it.  :meth:`batches` yields, in stream order,
  ``(members, bytes_read)`` pairs, then returns once the stream was drained and verified; the
  worker's error (an :class:`~qtbuild.errors.ImageError`, a digest mismatch, …) is raised from
  :meth:`batches` after every member scanned before it was yielded.
* Memory is bounded: at most ``depth`` batches wait, each of at most :data:`BATCH_MEMBERS` members;
  the worker blocks when it has a full batch and the consumer is behind.  A batch is also handed
  over once :data:`BATCH_BYTES` stream bytes were read, so progress stays smooth over large files,
  but only if the queue has room: a layer of large files above the one being applied is read
  (inflated, hashed) to its end meanwhile, not stopped by its own progress reports.
* ``length``: for a scan without ``tee`` nor ``seek_over_data``, the tar stream's length up to its
  end marker, valid once :meth:`batches` is done (else 0).
* :meth:`close` stops the worker (at its next read of the stream or batch handed over, or while
  it waits to hand a batch over), waits for it and closes its stream; it is idempotent and safe
  from any state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from qtbuild.convert.handoff import Handoff
from qtbuild.convert.tarscan import BudgetShare, TarLimits, TarMember, TarScanner

__all__ = ["BATCH_BYTES", "BATCH_MEMBERS", "LayerScan"]

BATCH_MEMBERS = 512
BATCH_BYTES = 4 << 20
#: Batches a layer's worker may be ahead by: 16k members (a few MiB), so the layers above a large
#: bottom layer are read to their end (or nearly) while it is applied, not stopped after 4k members.
DEPTH = 32


class _Stopped(Exception):
    """The consumer closed the scan; the worker unwinds quietly."""


class LayerScan:
    """One layer's tar scan on a worker thread (see the module docstring)."""

    def __init__(self, open_stream: Callable[[], BinaryIO], *, limits: TarLimits, budget: BudgetShare,
                 tee: Callable[[bytes], object] | None = None, seek_over_data: bool = False,
                 depth: int = DEPTH, name: str = "layer-scan"):
        self._open_stream = open_stream
        self._limits = limits
        self._budget = budget
        self._tee = tee
        self._seek_over_data = seek_over_data
        self._handoff: Handoff[tuple[list[TarMember], int]] = Handoff(depth)
        self._batch: list[TarMember] = []  # members not handed over yet
        self._read = 0  # stream bytes read since the last batch was handed over
        self.length = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # -- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            try:
                stream = self._open_stream()
                try:
                    self._scan(stream)
                finally:
                    stream.close()
            except BaseException:
                self._budget.finish(read=False)  # higher layers waiting on this one's count go on
                raise
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer after the members before it
            error = exc
        with contextlib.suppress(_Stopped):
            if self._batch:
                self._hand_over()
            if error is None:
                self._handoff.end()
            else:
                self._handoff.fail(error)

    def _scan(self, stream: BinaryIO) -> None:
        tee = self._tee
        if tee is None and not self._seek_over_data:
            tee = self._count
        scanner = TarScanner(stream, limits=self._limits, tee=tee, budget=self._budget, progress=self._progress,
                             seek_over_data=self._seek_over_data)
        handoff = self._handoff
        batch = self._batch
        # Per member only the append: whether the consumer stopped is checked at every chunk read
        # (_progress) and every hand-over.
        for member in scanner:
            batch.append(member)
            if len(batch) >= BATCH_MEMBERS:
                self._hand_over()
                batch = self._batch
            elif self._read >= BATCH_BYTES:
                if handoff.offer((batch, self._read)):
                    batch = self._batch = []
                    self._read = 0
                elif handoff.stopped:
                    raise _Stopped
        scanner.drain()
        self._budget.finish(read=True)  # before the last batch: the layer may still be refused
        self._hand_over()

    def _count(self, chunk: bytes) -> None:
        self.length += len(chunk)

    def _progress(self, n: int) -> None:
        self._read += n
        if self._handoff.stopped:
            raise _Stopped

    def _hand_over(self) -> None:
        batch, self._batch = self._batch, []
        read, self._read = self._read, 0
        if not self._handoff.put((batch, read)):
            raise _Stopped

    # -- consumer ----------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[list[TarMember], int]]:
        """``(members, stream bytes read)`` in stream order; raises the worker's error."""
        while True:
            try:
                item = self._handoff.get()
            except BaseException:
                self._worker.join()
                raise
            if item is None:
                self._worker.join()
                return
            yield item

    def stop(self) -> None:
        """Ask the worker to stop, without waiting (see :meth:`close`)."""
        self._handoff.stop()  # a worker waiting to hand a batch over sees it within 0.1 s

    def close(self) -> None:
        """Stop the worker and wait for it (idempotent).  Stop every scan of an image before
        waiting for one: a layer's worker may wait for the byte counts of the layers below it."""
        self._handoff.stop()
        self._worker.join()
