"""The audit log with a size bound: live records in the store, older ones in numbered archives.

Records are written to the store's ``audit`` table (fsynced before the reply is sent).  When
the live records exceed ``max_bytes`` (their JSON size, tracked as they are added), the oldest
ones move to an archive file ``<directory>/audit-<first id>-<last id>.jsonl`` — one JSON object
per line, the ``admin/list-audit`` record shape — written and fsynced before they are deleted
from the table (a crash in between leaves them in both places; readers skip ids already seen).
Only archives beyond the newest ``keep`` are deleted: nothing else is ever dropped.
:meth:`AuditLog.records` reads archives and the table alike, in id order.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.kms.store import AuditRecord, Store

log = logging.getLogger("qtbuild.kms")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 10
_ARCHIVE = re.compile(r"audit-(\d{12})-(\d{12})\.jsonl")


def _size(record: AuditRecord) -> int:
    return len(json.dumps(record.as_json(), separators=(",", ":"))) + 1


class AuditLog:
    """Thread-safe.  Without a ``directory`` it never rotates (the table grows)."""

    def __init__(self, store: Store, directory: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self.store, self.directory, self.max_bytes, self.keep = store, directory, max_bytes, keep
        self._lock = threading.Lock()
        self._rotating = threading.Lock()
        # group commit: records queued by concurrent requests are written in one transaction
        self._queue_lock = threading.Condition()
        self._queue: list[AuditRecord] = []
        self._queued = self._committed = 0
        self._writing = False
        self._failed: tuple[int, int, BaseException] | None = None   # (first, last, error) of a lost batch
        self._live_bytes = sum(_size(record) for record in self._table(0)) if directory else 0

    def add(self, record: AuditRecord) -> None:
        """Record durably (fsynced) before returning; rotate when the live records outgrow
        ``max_bytes``.  Concurrent callers share commits: whoever finds no write in progress
        writes every queued record in one transaction while the others wait for it."""
        self._commit(record)
        if self.directory is None:
            return
        with self._lock:
            self._live_bytes += _size(record)
            due = self._live_bytes > self.max_bytes
        if due and self._rotating.acquire(blocking=False):
            try:
                self.rotate()
            except OSError as error:    # the records stay in the table: nothing is lost
                log.error("audit rotation failed: %s", error)
            finally:
                self._rotating.release()

    def _commit(self, record: AuditRecord) -> None:
        with self._queue_lock:
            self._queue.append(record)
            self._queued += 1
            mine = self._queued
            while self._committed < mine:
                if self._writing:
                    self._queue_lock.wait()
                    continue
                batch, self._queue, last = self._queue, [], self._queued
                self._writing = True
                self._queue_lock.release()
                failure = None
                try:
                    self.store.add_audits(batch)
                except Exception as error:      # every caller of this batch learns it was lost
                    failure = error
                finally:
                    self._queue_lock.acquire()
                    self._writing = False
                    self._committed = last
                    self._failed = (last - len(batch) + 1, last, failure) if failure else self._failed
                    self._queue_lock.notify_all()
            if self._failed is not None and self._failed[0] <= mine <= self._failed[1]:
                raise OSError(f"audit record not written: {self._failed[2]}")

    def rotate(self) -> Path | None:
        """Move every live record into a new archive; the archive written (None if empty)."""
        assert self.directory is not None
        records = list(self._table(0))
        if not records:
            return None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"audit-{records[0].id:012d}-{records[-1].id:012d}.jsonl"
        data = "".join(json.dumps(record.as_json(), separators=(",", ":")) + "\n" for record in records)
        write_atomically(path, data.encode("utf-8"), 0o600)  # fsynced, the directory too
        last = records[-1].id
        assert last is not None  # records read back from the store carry their row id
        self.store.delete_audit_through(last)
        with self._lock:
            self._live_bytes = max(0, self._live_bytes - len(data))
        for old in self.archives()[:-self.keep] if self.keep else self.archives():
            old.unlink(missing_ok=True)
        return path

    def archives(self) -> list[Path]:
        """Archive files, oldest first."""
        if self.directory is None or not self.directory.is_dir():
            return []
        return sorted(path for path in self.directory.iterdir() if _ARCHIVE.fullmatch(path.name))

    def records(self, *, after: int = 0, limit: int = 100, principal: str | None = None,
                key_id: str | None = None, decision: str | None = None) -> list[AuditRecord]:
        """Records with id > ``after`` in id order (archives, then the table), filtered."""
        wanted = {"principal": principal, "key_id": key_id, "decision": decision}
        found: list[AuditRecord] = []
        last = after
        for record in self._all(after):
            if record.id is None or record.id <= last:
                continue
            last = record.id
            if all(value is None or getattr(record, name) == value for name, value in wanted.items()):
                found.append(record)
                if len(found) == limit:
                    break
        return found

    def _all(self, after: int) -> Iterator[AuditRecord]:
        for path in self.archives():
            match = _ARCHIVE.fullmatch(path.name)
            assert match is not None
            if int(match.group(2)) <= after:
                continue
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    yield AuditRecord(**json.loads(line))
        yield from self._table(after)

    def _table(self, after: int) -> Iterator[AuditRecord]:
        while True:
            page = self.store.audit(after=after, limit=1000)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1].id or after
