"""The audit log with a size bound: live records in the store, older ones in numbered archives.

Records are written to the store's ``audit`` table (fsynced before the reply is sent: the
service waits for :meth:`AuditLog.submit`'s future, or calls the blocking :meth:`AuditLog.add`).  When
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
from concurrent.futures import Future, wait
from pathlib import Path

from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.kms.store import AuditRecord, Store

log = logging.getLogger("qtbuild.kms")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_KEEP = 10
_IDLE = 10.0        # seconds the writer thread waits for records before it ends
_ARCHIVE = re.compile(r"audit-(\d{12})-(\d{12})\.jsonl")


def _size(record: AuditRecord) -> int:
    return len(json.dumps(record.as_json(), separators=(",", ":"))) + 1


class AuditLog:
    """Thread-safe.  Without a ``directory`` it never rotates (the table grows).

    Records are written by one writer thread (started on demand, gone after ``_IDLE`` seconds
    without records): it takes every record queued while it was committing the previous batch
    and commits them in one transaction, one fsync (group commit)."""

    def __init__(self, store: Store, directory: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        self.store, self.directory, self.max_bytes, self.keep = store, directory, max_bytes, keep
        self._queue_lock = threading.Condition()
        self._queue: list[tuple[AuditRecord, Future[None]]] = []
        self._writer: threading.Thread | None = None
        self._last: Future[None] | None = None
        self._live_bytes = sum(_size(record) for record in self._table(0)) if directory else 0

    def add(self, record: AuditRecord) -> None:
        """Record durably (fsynced) before returning — OSError when the commit failed; rotate
        when the live records outgrow ``max_bytes``."""
        self.submit(record).result()

    def submit(self, record: AuditRecord) -> Future[None]:
        """Queue ``record``; the future completes once it is durable (and any rotation it made
        due is done), or fails with OSError when its batch could not be committed."""
        future: Future[None] = Future()
        with self._queue_lock:
            self._queue.append((record, future))
            self._last = future
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_batches, name="kms-audit", daemon=True)
                self._writer.start()
            self._queue_lock.notify()
        return future

    def flush(self) -> None:
        """Wait until every record submitted so far is written (or its batch failed)."""
        with self._queue_lock:
            last = self._last
        if last is not None:
            wait([last])

    def _write_batches(self) -> None:
        while True:
            with self._queue_lock:
                while not self._queue:
                    if not self._queue_lock.wait(_IDLE) and not self._queue:
                        self._writer = None
                        return
                batch, self._queue = self._queue, []
            records = [record for record, _ in batch]
            try:
                self.store.add_audits(records)
            except Exception as error:      # every record of this batch learns it was lost
                for _, future in batch:
                    future.set_exception(OSError(f"audit record not written: {error}"))
                continue
            try:
                self._account(records)
            except Exception:       # the records stay in the table: nothing is lost
                log.exception("audit rotation failed")
            for _, future in batch:
                future.set_result(None)

    def _account(self, records: list[AuditRecord]) -> None:
        """Count the records' size; rotate when the live records outgrow ``max_bytes``."""
        if self.directory is None:
            return
        self._live_bytes += sum(_size(record) for record in records)
        if self._live_bytes > self.max_bytes:
            self.rotate()

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
