"""Items passed from one worker thread to one reader, a bounded number ahead, with the worker's end
and errors passed the same way.

The worker :meth:`Handoff.put`\\ s items (or :meth:`Handoff.offer`\\ s them: only if there is room),
then :meth:`Handoff.end` or :meth:`Handoff.fail`; the reader :meth:`Handoff.get`\\ s them: None
after the end, the worker's exception raised where it happened in the sequence (and again on every
later ``get``).  :meth:`Handoff.stop` (the reader gives up) makes the worker's blocked or later
``put`` return False, so it can wind up.
"""

from __future__ import annotations

import queue
import threading
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()


class Handoff(Generic[T]):
    """A bounded queue of ``depth`` items from a worker to a reader; see the module docstring."""

    def __init__(self, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def put(self, item: T) -> bool:
        """Queue ``item``, waiting for room; False (item dropped) once the reader stopped."""
        return self._put(item)

    def offer(self, item: T) -> bool:
        """Queue ``item`` only if there is room now (never waits); False when it was not queued."""
        if self._stop.is_set():
            return False
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def end(self) -> None:
        self._put(_END)

    def fail(self, error: BaseException) -> None:
        self._put(error)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> T | None:
        """The next item; None at the end; raises the worker's error."""
        if self._ended:
            return None
        item = self._queue.get()
        if item is _END:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._queue.put(item)  # the worker is done: there is room, and every later get fails alike
            raise item
        return item

    def stop(self) -> None:
        self._stop.set()
