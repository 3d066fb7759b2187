"""The audit log's size bound: live records rotate into numbered JSON-lines archives that
``qtbuild kms audit`` still reads; only archives beyond --audit-keep are deleted."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

from click.testing import CliRunner

from qtbuild.cli import kms as kms_cli
from qtbuild.runtime.kms.audit_log import AuditLog
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state, write_credentials
from qtbuild.runtime.kms.store import AuditRecord, Store
from qtbuild.runtime.sdk.kms_client import KmsClient, tcp_transport


def record(index: int) -> AuditRecord:
    return AuditRecord(time_ms=index, request_id=f"r{index}", remote=None, principal="p", api="list-keys",
                       key_id=None, decision="allow", reason=None, status=200, error_code=None, pcr0=None,
                       pcr8=None)


def test_rotation_keeps_every_record_readable_until_its_archive_is_deleted(tmp_path, monkeypatch):
    store = Store(tmp_path / "kms.sqlite")
    audit = AuditLog(store, tmp_path / "audit", max_bytes=2000, keep=3)
    for index in range(60):
        audit.add(record(index))
    archives = audit.archives()
    assert len(archives) == 3                                        # older ones deleted
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in archives)
    lines = [json.loads(line) for line in archives[0].read_text().splitlines()]
    assert lines[0]["request_id"].startswith("r") and set(lines[0]) == set(AuditRecord.__dataclass_fields__)
    first_kept = lines[0]["id"]
    everything = audit.records(limit=1000)
    assert [item.id for item in everything] == list(range(first_kept, 61))     # no gap, no duplicate
    assert [item.id for item in audit.records(after=first_kept + 3, limit=2)] == [first_kept + 4, first_kept + 5]
    # a crash between writing an archive and deleting its rows leaves both: each is read once
    store.add_audit(record(99))
    monkeypatch.setattr(store, "delete_audit_through", lambda last_id: None)
    audit.rotate()
    assert store.audit(after=60, limit=10)[0].request_id == "r99"          # still in the table
    again = AuditLog(Store(tmp_path / "kms.sqlite"), tmp_path / "audit").records(limit=1000)
    assert [item.id for item in again] == list(range(again[0].id, 62))


def test_cli_audit_reads_the_archives(tmp_path):
    state = open_state(StatePaths.under(tmp_path / "kms"), audit_max_bytes=4096, audit_keep=2)
    server = KmsHttpServer(("127.0.0.1", 0), KmsService(state.env, RecipientVerifier(roots=())))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        admin_file = tmp_path / "admin.json"
        write_credentials(admin_file, f"http://127.0.0.1:{port}", state.admin)
        client = KmsClient(tcp_transport("127.0.0.1", port), state.admin)
        for _ in range(80):
            client.call("list-keys", {})
        archives = sorted((tmp_path / "kms" / "audit").glob("audit-*.jsonl"))
        assert len(archives) == 2
        result = CliRunner().invoke(kms_cli.command, ["audit", "--json", "--limit", "1000", "--credentials",
                                                      str(admin_file)])
        assert result.exit_code == 0, result.output
        ids = [item["id"] for item in json.loads(result.stdout)["records"]]
        first = json.loads(archives[0].read_text().splitlines()[0])["id"]
        assert ids[0] == first and ids == list(range(first, ids[-1] + 1)) and len(ids) > 20
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_records_share_commits_and_all_arrive(tmp_path, monkeypatch):
    store = Store(tmp_path / "kms.sqlite")
    audit = AuditLog(store)
    commits = []
    original = store.add_audits

    def slow_commit(records):
        commits.append(len(records))
        time.sleep(0.02)                      # an fsync on a busy disk
        original(records)

    monkeypatch.setattr(store, "add_audits", slow_commit)
    threads = [threading.Thread(target=lambda base=base: [audit.add(record(base + i)) for i in range(10)])
               for base in range(0, 160, 10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(item.time_ms for item in audit.records(limit=1000)) == list(range(160))
    assert sum(commits) == 160 and len(commits) < 80            # batched: far fewer fsyncs than records


def test_a_failed_commit_reaches_every_caller_in_its_batch(tmp_path, monkeypatch):
    store = Store(tmp_path / "kms.sqlite")
    audit = AuditLog(store)

    def broken(records):
        time.sleep(0.05)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "add_audits", broken)
    failures = []

    def add(index):
        try:
            audit.add(record(index))
        except OSError as error:
            failures.append(str(error))

    threads = [threading.Thread(target=add, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) == 6 and all("disk I/O error" in failure for failure in failures)


def test_a_failed_rotation_loses_nothing_and_blocks_no_caller(tmp_path, monkeypatch, caplog):
    store = Store(tmp_path / "kms.sqlite")
    audit = AuditLog(store, tmp_path / "audit", max_bytes=500, keep=3)

    def broken(last_id):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "delete_audit_through", broken)
    for index in range(20):
        audit.submit(record(index)).result(timeout=10)      # done although every rotation fails
    assert "audit rotation failed" in caplog.text
    assert [item.time_ms for item in store.audit(limit=100)] == list(range(20))     # all still in the table
