"""A hash updated on a worker thread, one chunk behind the reader.

Reading a gzip layer hashes every byte twice (SHA-256 of the blob, SHA-256 of the tar for the
diff_id) besides inflating it; on one thread the hashes cost as much as the inflating.  hashlib
releases the GIL on large buffers, so :class:`HashBehind` hands each large chunk to a worker and
returns at once: the next chunk is read and inflated while the previous one is hashed.

Contract: ``update`` takes immutable ``bytes`` (the worker may still read a chunk after ``update``
returned); at most one chunk is in flight (``update`` first waits for the previous one), so memory
is one chunk.  ``hexdigest`` waits for everything fed.  ``close`` stops the worker (idempotent);
the worker is started only when a chunk of :data:`THRESHOLD` bytes or more arrives, so small
documents never start a thread.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor

#: Below this a chunk is hashed inline: handing it over costs more than it saves.
THRESHOLD = 256 * 1024


class HashBehind:
    """A hashlib hash whose large updates run on a worker thread (see the module docstring)."""

    def __init__(self, name: str = "sha256"):
        self._hash = hashlib.new(name)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def update(self, chunk: bytes) -> None:
        self._wait()
        if len(chunk) < THRESHOLD:
            self._hash.update(chunk)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash-behind")
        self._pending = self._pool.submit(self._hash.update, chunk)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def hexdigest(self) -> str:
        self._wait()
        return self._hash.hexdigest()

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._pending = None
