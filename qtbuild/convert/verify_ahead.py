"""Verify layers read in place on worker threads, while their tar headers are scanned.

A layer stored uncompressed in a local file (``Layer.range_opener()``) is read twice anyway: its
tar headers when the tree is built, its file data when the ramdisk is written.  Its verification
(size and SHA-256 of the blob, the diff_id, the bomb caps: everything
``Layer.open_uncompressed()`` checks when read to the end) needs every byte hashed, which on one
thread costs far more than parsing the headers.  :class:`VerifyAhead` runs those reads on a small
pool, several layers at once, so the scan only reads the blob and the hashing uses every core.

Contract: :meth:`result` waits for one layer's verification and re-raises its error (an
:class:`~qtbuild.errors.ImageError`); the tree built from a layer may only be used once its
:meth:`result` returned.  Layers are verified largest first.  :meth:`close` stops the workers
between chunks (on error paths) and waits for them; it is idempotent.

Inside :func:`~qtbuild.convert.verify_gate.deferred_verification` (created there, on the same
thread) the verification may outlast the tree: :meth:`result` raises only a failure already
known, and a ``with`` block that ends without error hands the running verifications to the
block's :class:`~qtbuild.convert.verify_gate.Deferral` instead of stopping them; the data of such
layers may then only go into output the deferral gates.  The pool then leaves one CPU to the tree
(the Python that builds it is the critical path; the hashes may finish during the write).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from qtbuild.convert.verify_gate import current_deferral
from qtbuild.sources.base import Layer

CHUNK = 1 << 20


def _size(layer: Layer) -> int:
    descriptor = getattr(layer, "descriptor", None)
    return getattr(descriptor, "size", 0) or 0


class VerifyAhead:
    """Reads ``layers`` (index → layer) to the end through ``open_uncompressed()`` on worker threads."""

    def __init__(self, layers: Mapping[int, Layer], *, workers: int | None = None):
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[int, Future[None]] = {}
        self._deferral = current_deferral()
        if layers:
            cpus = os.cpu_count() or 1
            # Under a deferral the tree need not wait for the hashes: leave it a CPU of its own.
            count = workers or min(len(layers), cpus if self._deferral is None else max(cpus - 1, 1), 4)
            self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="verify-layer")
            # Largest first: one layer's hash cannot be split, so the biggest bounds the wall time.
            largest_first = sorted(layers.items(), key=lambda item: -_size(item[1]))
            self._futures = {index: self._pool.submit(self._verify, layer) for index, layer in largest_first}
            if self._deferral is not None:
                for future in self._futures.values():
                    future.add_done_callback(self._signal_failure)

    def _signal_failure(self, future: Future[None]) -> None:
        if self._deferral is not None and not future.cancelled() and future.exception() is not None:
            self._deferral.failed.set()

    def _verify(self, layer: Layer) -> None:
        with layer.open_uncompressed() as stream:
            while not self._stop.is_set():
                if not stream.read(CHUNK):
                    return

    def __contains__(self, index: int) -> bool:
        return index in self._futures

    def result(self, index: int) -> None:
        """Wait for layer ``index``'s verification; re-raise its error.  Under a deferral: only
        re-raise an error already known (the deferral waits)."""
        future = self._futures[index]
        if self._deferral is None or future.done():
            future.result()

    def first_failure(self) -> BaseException | None:
        """Wait for every layer's verification; the error of the lowest layer that failed, else None.
        Not after :meth:`close`: a stopped verification proves nothing."""
        if self._stop.is_set():
            raise RuntimeError("layer verification was stopped; its result is unknown")
        for index in sorted(self._futures):
            failure = self._futures[index].exception()
            if failure is not None:
                return failure
        return None

    def failed(self, index: int) -> BaseException | None:
        """Layer ``index``'s verification error once it finished (waiting for it), else None."""
        return self._futures[index].exception() if index in self._futures else None

    def close(self) -> None:
        self._stop.set()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> VerifyAhead:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and self._deferral is not None:
            self._deferral.adopt(self)
        else:
            self.close()
