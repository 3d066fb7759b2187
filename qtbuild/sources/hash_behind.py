"""A hash updated on a worker thread, a few chunks behind the reader.

Reading a gzip layer hashes every byte twice (SHA-256 of the blob, SHA-256 of the tar for the
diff_id) besides inflating it; on one thread the hashes cost as much as the inflating.  hashlib
releases the GIL on large buffers, so :class:`HashBehind` queues each chunk for a worker and
returns at once: the next chunks are read and inflated while earlier ones are hashed.  The queue
holds up to ``depth`` chunks, so a worker that the scheduler leaves waiting for a moment (a busy
machine) does not stall the reader at every chunk.

Contract: ``update`` takes immutable ``bytes`` (the worker may still read a chunk after ``update``
returned); memory is at most ``depth`` chunks.  ``hexdigest`` waits for everything fed.
``close`` stops the worker (idempotent).  The worker starts only when a chunk of
:data:`THRESHOLD` bytes or more arrives, so small documents never start a thread; after that
every chunk goes through the queue, in order.
"""

from __future__ import annotations

import hashlib
import queue
import threading

#: Below this (until the worker runs) a chunk is hashed inline: handing it over costs more.
THRESHOLD = 256 * 1024
_END = None


class HashBehind:
    """A hashlib hash whose updates run on a worker thread (see the module docstring)."""

    def __init__(self, name: str = "sha256", *, depth: int = 4):
        self._hash = hashlib.new(name)
        self._depth = depth
        self._queue: queue.Queue[bytes | None] | None = None
        self._worker: threading.Thread | None = None

    def update(self, chunk: bytes) -> None:
        if self._queue is None:
            if len(chunk) < THRESHOLD:
                self._hash.update(chunk)
                return
            self._queue = queue.Queue(maxsize=self._depth)
            self._worker = threading.Thread(target=self._run, name="hash-behind", daemon=True)
            self._worker.start()
        self._queue.put(chunk)

    def _run(self) -> None:
        assert self._queue is not None
        while (chunk := self._queue.get()) is not _END:
            self._hash.update(chunk)

    def hexdigest(self) -> str:
        self.close()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Wait for the queued chunks and stop the worker (idempotent)."""
        worker, self._worker = self._worker, None
        if worker is not None and self._queue is not None:
            self._queue.put(_END)
            worker.join()
