"""Store upgrades and backups: a database written by the schema-1 release (tests/fixtures/kms/
kms-v1.sql, dumped from a state made by that release's code, with its master key and what it
holds in kms-v1.json) opens, migrates in place and serves its keys; ``qtbuild kms backup`` /
``restore`` round-trip a live store through SQLite's backup API."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtbuild.cli import kms as kms_cli
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.kms.server import KmsHttpServer
from qtbuild.runtime.kms.service import KmsService
from qtbuild.runtime.kms.state import StatePaths, open_state
from qtbuild.runtime.kms.store import SCHEMA_VERSION, Store, StoreError
from qtbuild.runtime.sdk.kms_client import Credentials, KmsClient, tcp_transport

DATA = Path(__file__).parents[1] / "fixtures" / "kms"


def v1_state(directory: Path) -> dict:
    """A state directory as the schema-1 release left it."""
    expected = json.loads((DATA / "kms-v1.json").read_text())
    directory.mkdir(mode=0o700)
    master = directory / "master.key"
    master.write_bytes(bytes.fromhex(expected["master_key_hex"]))
    os.chmod(master, 0o600)
    db = sqlite3.connect(directory / "kms.sqlite")
    db.executescript((DATA / "kms-v1.sql").read_text())
    db.close()
    return expected


class Serving:
    def __init__(self, paths: StatePaths) -> None:
        self.state = open_state(paths)
        self.server = KmsHttpServer(("127.0.0.1", 0), KmsService(self.state.env, RecipientVerifier(roots=())))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def client(self, credentials: Credentials | None = None) -> KmsClient:
        return KmsClient(tcp_transport("127.0.0.1", self.server.server_address[1]), credentials or self.state.admin)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_schema_1_database_opens_migrates_and_serves_its_keys(tmp_path):
    expected = v1_state(tmp_path / "kms")
    assert sqlite3.connect(tmp_path / "kms" / "kms.sqlite").execute(
        "SELECT value FROM meta WHERE name = 'schema'").fetchone() == ("1",)
    serving = Serving(StatePaths.under(tmp_path / "kms"))
    try:
        assert serving.state.env.store.schema_version() == SCHEMA_VERSION > 1
        assert serving.state.project_id == expected["project_id"]
        assert serving.state.admin.access_key == expected["admin_access_key"]
        assert serving.state.admin.secret_key == expected["admin_secret_key"]     # sealed secret opens
        client = serving.client()
        info = client.call("describe-key", {"key_id": expected["key_id"]})["key_info"]
        assert (info["key_alias"], info["key_description"], info["key_state"]) == ("made-by-v1", "schema 1", "2")
        assert client.decrypt_data(expected["cipher_text"], aad=expected["aad"].encode()) == \
            expected["plaintext"].encode()
        back = client.call("decrypt-datakey", {"key_id": expected["key_id"], "datakey_cipher_length": "64",
                                               "cipher_text": expected["datakey_cipher_text"]})
        assert back["data_key"] == expected["datakey_plain_text"]
        # what schema 2 added works on the migrated database
        reply = client.call("admin/create-temporary-credentials", {"name": "enclave"})
        assert reply["credential"]["access"]
        assert client.call("admin/get-policy", {"name": "enclave"})["policy"]["Statement"][0]["Action"] == \
            ["kms:cmk:decrypt"]
    finally:
        serving.close()


def test_a_newer_or_foreign_database_is_refused(tmp_path):
    path = tmp_path / "kms.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE name = 'schema'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer"):
        Store(path)
    other = tmp_path / "other.sqlite"
    other.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable KMS database"):
        Store(other)


def test_backup_while_serving_and_restore(tmp_path):
    paths = StatePaths.under(tmp_path / "kms")
    serving = Serving(paths)
    backup_file = tmp_path / "backup.sqlite"
    try:
        client = serving.client()
        kept = client.call("create-key", {"key_alias": "kept"})["key_info"]["key_id"]
        sealed = client.encrypt_data(kept, b"before the backup")
        runner = CliRunner()
        result = runner.invoke(kms_cli.command, ["backup", str(backup_file), "--state-dir", str(tmp_path / "kms")])
        assert result.exit_code == 0, result.output
        later = client.call("create-key", {"key_alias": "later"})["key_info"]["key_id"]
        material = serving.state.env.store.key_material(kept, 1)
    finally:
        serving.close()
    copy = sqlite3.connect(backup_file)
    assert copy.execute("SELECT material FROM key_versions WHERE key_id = ?", (kept,)).fetchone()[0] == material
    copy.close()
    result = CliRunner().invoke(kms_cli.command, ["backup", str(backup_file), "--state-dir", str(tmp_path / "kms")])
    assert result.exit_code == 2 and "exists" in result.output
    result = CliRunner().invoke(kms_cli.command, ["restore", str(backup_file), "--state-dir", str(tmp_path / "kms")])
    assert result.exit_code == 0, result.output
    serving = Serving(paths)
    try:
        client = serving.client()
        assert client.decrypt_data(sealed) == b"before the backup"
        keys = client.call("list-keys", {})["keys"]
        assert kept in keys and later not in keys
    finally:
        serving.close()


def test_restore_refuses_a_backup_of_another_state(tmp_path):
    first, second = StatePaths.under(tmp_path / "one"), StatePaths.under(tmp_path / "two")
    open_state(first).env.store.close()
    open_state(second).env.store.close()
    result = CliRunner().invoke(kms_cli.command, ["backup", str(tmp_path / "one.sqlite"), "--state-dir",
                                                  str(first.directory)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(kms_cli.command, ["restore", str(tmp_path / "one.sqlite"), "--state-dir",
                                                  str(second.directory)])
    assert result.exit_code == 2 and "do not open" in result.output
    result = CliRunner().invoke(kms_cli.command, ["restore", str(tmp_path / "missing.sqlite"), "--state-dir",
                                                  str(second.directory)])
    assert result.exit_code == 2


def test_a_failed_backup_leaves_no_file_behind(tmp_path, monkeypatch):
    """Regression: the backup was written in place, so a failure (full disk, Ctrl-C) left a
    half-written database at the target; it is now renamed into place only when complete."""
    paths = StatePaths.under(tmp_path / "kms")
    store = open_state(paths).env.store
    try:
        store.backup_to(tmp_path / "good.sqlite")
        assert sorted(path.name for path in tmp_path.iterdir()) == ["good.sqlite", "kms"]

        class FullDisk:  # the live database as the backup API sees it, failing half-way
            def backup(self, target):
                target.execute("CREATE TABLE partial (x)")
                raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store, "_connection", lambda: contextlib.nullcontext(FullDisk()))
        with pytest.raises(StoreError, match="backup to .*bad.sqlite failed: database or disk is full"):
            store.backup_to(tmp_path / "bad.sqlite")
        assert sorted(path.name for path in tmp_path.iterdir()) == ["good.sqlite", "kms"]
    finally:
        store.close()
