"""KMS state at rest: the master key file, sealing, the SQLite store, reopening."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from qtbuild.runtime.kms import crypto
from qtbuild.runtime.kms.crypto import MasterKey, MasterKeyError
from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.kms.state import (
    StatePaths,
    open_state,
    read_credentials,
    write_credentials,
)
from qtbuild.runtime.kms.store import (
    ENABLED,
    PENDING_DELETION,
    AuditRecord,
    KeyRecord,
    Store,
    StoreError,
)


def test_master_key_is_created_private_and_reloaded(tmp_path):
    path = tmp_path / "master.key"
    first, created = MasterKey.load_or_create(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == 32
    again, created = MasterKey.load_or_create(path)
    assert not created
    assert again.open(first.seal(b"secret", "row"), "row") == b"secret"


def test_master_key_refuses_unsafe_or_damaged_files(tmp_path):
    path = tmp_path / "master.key"
    MasterKey.load_or_create(path)
    path.chmod(0o640)
    with pytest.raises(MasterKeyError, match="group or others"):
        MasterKey.load_or_create(path)
    path.chmod(0o600)
    path.write_bytes(b"short")
    with pytest.raises(MasterKeyError, match="holds 5 bytes"):
        MasterKey.load_or_create(path)


def test_sealed_values_are_bound_to_their_row(tmp_path):
    key, _ = MasterKey.load_or_create(tmp_path / "m")
    sealed = key.seal(b"material", "key:a:1")
    with pytest.raises(MasterKeyError):
        key.open(sealed, "key:b:1")
    other, _ = MasterKey.load_or_create(tmp_path / "other")
    with pytest.raises(MasterKeyError):
        other.open(sealed, "key:a:1")


def test_ciphertext_format():
    material, key_id = os.urandom(32), crypto.new_key_id()
    blob = crypto.encrypt(crypto.KIND_DATA, key_id, 7, material, b"hello", b"aad")
    assert len(blob) == 5 + 16 + crypto.TRAILER_SIZE
    header = crypto.parse(blob, crypto.KIND_DATA)
    assert (header.key_id, header.version) == (key_id, 7)
    assert crypto.decrypt(blob, header, material, b"aad") == b"hello"
    with pytest.raises(KmsError, match="KMS.2201"):
        crypto.decrypt(blob, header, material, b"other")
    with pytest.raises(KmsError, match="wrong kind"):
        crypto.parse(blob, crypto.KIND_DATAKEY)
    tampered = blob[:-crypto.TRAILER_SIZE] + blob[-crypto.TRAILER_SIZE:].replace(
        key_id.encode(), crypto.new_key_id().encode())
    with pytest.raises(KmsError, match="KMS.2201"):
        crypto.decrypt(tampered, crypto.parse(tampered, crypto.KIND_DATA), material, b"aad")
    for bad in (b"", b"x" * 200, blob[:-1] + b"\x01"):
        with pytest.raises(KmsError, match="KMS.2201"):
            crypto.parse(bad, crypto.KIND_DATA)


def test_sdk_knows_the_trailer_size():
    from qtbuild.runtime.sdk.kms_client import DATAKEY_TRAILER

    assert DATAKEY_TRAILER == crypto.TRAILER_SIZE


def record(alias="a", state=ENABLED, deletion_ms=None) -> KeyRecord:
    return KeyRecord(crypto.new_key_id(), "proj", alias, "", "AES_256", "ENCRYPT_DECRYPT",
                     state, 1000, deletion_ms, 1)


def test_store_is_wal_and_reopens(tmp_path):
    path = tmp_path / "kms.sqlite"
    store = Store(path)
    key = record()
    store.create_key(key, b"sealed")
    store.close()
    reopened = Store(path)
    assert reopened.key("proj", key.key_id) == key
    assert reopened.key("other-project", key.key_id) is None
    assert reopened.key_material(key.key_id, 1) == b"sealed"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_state_changes_are_atomic(tmp_path):
    store = Store(tmp_path / "kms.sqlite")
    key = record()
    store.create_key(key, b"sealed")

    def refuse(_):
        raise KmsError("KMS.1201")

    with pytest.raises(KmsError):
        store.change_state("proj", key.key_id, refuse)
    assert store.key("proj", key.key_id).state == ENABLED
    assert store.change_state("proj", "missing", refuse) is None


def test_purge_of_due_deletions(tmp_path):
    store = Store(tmp_path / "kms.sqlite")
    due, later = record("due", PENDING_DELETION, 5), record("later", PENDING_DELETION, 50)
    for key in (due, later):
        store.create_key(key, b"m")
    assert store.purge_deleted(10) == 1
    assert store.key("proj", due.key_id) is None and store.key_material(due.key_id, 1) is None
    assert store.key("proj", later.key_id) is not None


def test_schema_version_is_checked(tmp_path):
    path = tmp_path / "kms.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    with pytest.raises(StoreError, match="schema 99"):
        Store(path)


def test_audit_filters_and_paging(tmp_path):
    store = Store(tmp_path / "kms.sqlite")
    for index in range(5):
        store.add_audit(AuditRecord(index, f"r{index}", None, "p" if index % 2 else "q",
                                    "gen-random", None, "allow", None, 200, None, None, None))
    assert [r.request_id for r in store.audit(principal="p")] == ["r1", "r3"]
    page = store.audit(limit=2)
    assert [r.id for r in store.audit(after=page[-1].id, limit=2)] == [3, 4]


def test_open_state_bootstraps_once(tmp_path):
    paths = StatePaths.under(tmp_path / "kms")
    first = open_state(paths)
    assert first.created and stat.S_IMODE(paths.directory.stat().st_mode) == 0o700
    second = open_state(paths)
    assert not second.created
    assert (second.admin, second.project_id) == (first.admin, first.project_id)
    database = paths.database.read_bytes() + paths.database.with_name("kms.sqlite-wal") \
        .read_bytes()
    assert first.admin.secret_key.encode() not in database
    write_credentials(paths.credentials, "http://127.0.0.1:1", first.admin)
    assert stat.S_IMODE(paths.credentials.stat().st_mode) == 0o600
    assert read_credentials(paths.credentials) == ("http://127.0.0.1:1", first.admin)
    paths.credentials.write_text("{}")
    with pytest.raises(ValueError):
        read_credentials(paths.credentials)
