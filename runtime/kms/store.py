"""The KMS's persistent state in one SQLite database: keys and their sealed material,
principals with sealed secrets and policies, and the audit log.

Durability: WAL journal, ``synchronous=FULL`` (every commit is fsynced before it returns), so a
write the service acknowledged survives ``kill -9`` and power loss; every write is one
``BEGIN IMMEDIATE`` transaction, so a crash leaves it whole or absent.  Connections come from a
small pool (one per concurrently running request); writers take turns on an in-process lock
(and SQLite's lock, ``busy_timeout`` 10 s, against other processes); WAL lets readers proceed
meanwhile.

Secrets arrive here already sealed (``qtbuild.runtime.kms.crypto.MasterKey``): the store never sees
plaintext key material.  Key states use Huawei's codes: "2" enabled, "3" disabled,
"4" pending deletion.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

ENABLED, DISABLED, PENDING_DELETION = "2", "3", "4"
_POOL_SIZE = 64

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    alias TEXT NOT NULL,
    description TEXT NOT NULL,
    key_spec TEXT NOT NULL,
    key_usage TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    deletion_ms INTEGER,
    version INTEGER NOT NULL,
    UNIQUE (project_id, alias)
);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id TEXT NOT NULL REFERENCES keys (key_id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    material BLOB NOT NULL,
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS principals (
    access_key TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret BLOB NOT NULL,
    admin INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    policy TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    remote TEXT,
    principal TEXT,
    api TEXT,
    key_id TEXT,
    decision TEXT NOT NULL,
    reason TEXT,
    status INTEGER NOT NULL,
    error_code TEXT,
    pcr0 TEXT,
    pcr8 TEXT
);
"""

#: Upgrades, each from the version before it to its key, run in order inside one transaction
#: when an older database is opened (a fresh one gets version 1 and every upgrade too).
_MIGRATIONS: dict[int, str] = {
    # 2: nonces of mutating admin requests, temporary credentials, tokens
    2: """
CREATE TABLE nonces (nonce TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL);
CREATE TABLE temporary_credentials (
    access_key TEXT PRIMARY KEY,
    principal TEXT NOT NULL REFERENCES principals (access_key) ON DELETE CASCADE,
    secret BLOB NOT NULL,
    token_sha256 TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE tokens (
    token_sha256 TEXT PRIMARY KEY,
    principal TEXT NOT NULL REFERENCES principals (access_key) ON DELETE CASCADE,
    expires_ms INTEGER NOT NULL
);
""",
    # 3: key aliases (create-alias / associate-alias / delete-alias / list-aliases)
    3: """
CREATE TABLE aliases (
    project_id TEXT NOT NULL,
    alias TEXT NOT NULL,
    key_id TEXT NOT NULL REFERENCES keys (key_id) ON DELETE CASCADE,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (project_id, alias)
);
CREATE INDEX aliases_by_key ON aliases (key_id)
""",
    # 4: which attestation document encoding verified an attested request (qingtian, nitro, generic)
    4: """
ALTER TABLE audit ADD COLUMN encoding TEXT
""",
}
SCHEMA_VERSION = max(_MIGRATIONS)


class StoreError(Exception):
    """The database cannot be used (wrong schema, not a KMS database)."""


class Conflict(Exception):
    """A uniqueness rule was broken (an alias or principal name already exists)."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    project_id: str
    alias: str
    description: str
    key_spec: str
    key_usage: str
    state: str
    created_ms: int
    deletion_ms: int | None
    version: int


@dataclass(frozen=True)
class AliasRecord:
    alias: str
    key_id: str
    created_ms: int
    updated_ms: int


@dataclass(frozen=True)
class PrincipalRecord:
    access_key: str
    name: str
    secret: bytes           # sealed
    admin: bool
    created_ms: int
    policy: str | None      # JSON text, as stored


@dataclass(frozen=True)
class TemporaryCredential:
    """Short-lived AK/SK for a principal, usable only with its security token."""

    access_key: str
    principal: str          # the principal's (long-lived) access key
    secret: bytes           # sealed
    token_sha256: str       # of the security token
    expires_ms: int


@dataclass(frozen=True)
class AuditRecord:
    time_ms: int
    request_id: str
    remote: str | None
    principal: str | None
    api: str | None
    key_id: str | None
    decision: str           # "allow", "deny" or "error"
    reason: str | None
    status: int
    error_code: str | None
    pcr0: str | None
    pcr8: str | None
    encoding: str | None = None     # the attestation document's encoding that verified
    id: int | None = None

    def as_json(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Store:
    """The database at ``path`` (created on first use).  Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        # idle connections, most recently used last (deque append/pop are atomic: no lock needed)
        self._pool: collections.deque[sqlite3.Connection] = collections.deque()
        self._writer = threading.Lock()
        try:
            with self._write() as db:
                self._upgrade(db)
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path}: not a usable KMS database ({error})") from None

    def close(self) -> None:
        while True:
            try:
                self._pool.pop().close()
            except IndexError:
                return

    # ------------------------------------------------------------------ connections

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextlib.contextmanager
    def _connection(self):
        try:
            db = self._pool.pop()
        except IndexError:
            db = self._open()
        try:
            yield db
        finally:
            if len(self._pool) < _POOL_SIZE:
                self._pool.append(db)
            else:
                db.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction: committed when the block ends, rolled back if it raises.

        Writers of this process queue on a lock rather than in SQLite's busy handler, which
        sleeps in growing steps and turns contention into 100 ms latency spikes.
        """
        with self._writer, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._connection() as db:
            return db.execute(sql, args).fetchall()

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        """Create the schema, or bring an older one up to SCHEMA_VERSION in place (inside the
        caller's transaction: all upgrades or none); StoreError for a newer one."""
        _run_script(db, _SCHEMA_V1)     # IF NOT EXISTS throughout: a no-op on existing tables
        row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        version = 1 if row is None else int(row[0]) if row[0].isdigit() else -1
        if not 1 <= version <= SCHEMA_VERSION:
            raise StoreError(f"database schema {row[0] if row else '?'}, this version reads 1..{SCHEMA_VERSION}"
                             " (a newer qtbuild wrote it?)")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            _run_script(db, _MIGRATIONS[target])
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE name = 'schema'")[0][0])

    # ------------------------------------------------------------------ backup

    def backup_to(self, path: str | Path) -> None:
        """A consistent copy of the database at ``path`` (SQLite's online backup API: writers
        may go on meanwhile), written beside it and renamed into place.  Sealed material stays
        sealed: the master key is not in it."""
        final = Path(path)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")  # never a half-written backup
        try:
            target = sqlite3.connect(str(temporary))
            try:
                with self._connection() as db:
                    db.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()
            os.replace(temporary, final)
        except sqlite3.Error as exc:
            raise StoreError(f"backup to {final} failed: {exc}") from None
        finally:
            temporary.unlink(missing_ok=True)

    def restore_from(self, path: str | Path) -> None:
        """Replace this database's content with that of the KMS database at ``path`` (a
        checked, upgraded copy of a backup: see ``state.restore``) through the backup API, so
        other connections see the old content or the new one, whole."""
        source = sqlite3.connect(str(path))
        try:
            with self._writer, self._connection() as db:
                source.backup(db)
        finally:
            source.close()

    # ------------------------------------------------------------------ meta

    def meta(self, name: str, default_factory) -> str:
        """The value of ``name``; set to ``default_factory()`` the first time it is asked."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return row[0]
            value = default_factory()
            db.execute("INSERT INTO meta VALUES (?, ?)", (name, value))
            return value

    # ------------------------------------------------------------------ keys

    def create_key(self, record: KeyRecord, sealed_material: bytes) -> None:
        """Insert a key and its first version; Conflict when the alias is taken."""
        try:
            with self._write() as db:
                db.execute("INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,?,?)", _key_row(record))
                db.execute("INSERT INTO key_versions VALUES (?,?,?)",
                           (record.key_id, record.version, sealed_material))
        except sqlite3.IntegrityError:
            raise Conflict(f"alias {record.alias!r} exists") from None

    def key(self, project_id: str, key_id: str) -> KeyRecord | None:
        rows = self._read("SELECT * FROM keys WHERE key_id = ? AND project_id = ?",
                          (key_id, project_id))
        return KeyRecord(*rows[0]) if rows else None

    def key_material(self, key_id: str, version: int) -> bytes | None:
        rows = self._read("SELECT material FROM key_versions WHERE key_id = ? AND version = ?",
                          (key_id, version))
        return rows[0][0] if rows else None

    def list_keys(self, project_id: str, *, offset: int, limit: int,
                  state: str | None) -> tuple[list[KeyRecord], int]:
        """(one page of keys in creation order, total matching)."""
        where, args = "project_id = ?", [project_id]
        if state is not None:
            where, args = where + " AND state = ?", args + [state]
        total = self._read(f"SELECT count(*) FROM keys WHERE {where}", tuple(args))[0][0]
        rows = self._read(
            f"SELECT * FROM keys WHERE {where} ORDER BY created_ms, key_id LIMIT ? OFFSET ?",
            (*args, limit, offset))
        return [KeyRecord(*row) for row in rows], total

    def change_state(self, project_id: str, key_id: str, change) -> KeyRecord | None:
        """Apply ``change(record) -> (state, deletion_ms)`` atomically; the updated record.

        None when the key does not exist; whatever ``change`` raises aborts the transaction.
        """
        with self._write() as db:
            row = db.execute("SELECT * FROM keys WHERE key_id = ? AND project_id = ?",
                             (key_id, project_id)).fetchone()
            if row is None:
                return None
            current = KeyRecord(*row)
            state, deletion_ms = change(current)
            db.execute("UPDATE keys SET state = ?, deletion_ms = ? WHERE key_id = ?",
                       (state, deletion_ms, key_id))
            return dataclasses.replace(KeyRecord(*row), state=state, deletion_ms=deletion_ms)

    def purge_deleted(self, now_ms: int) -> int:
        """Delete keys whose scheduled deletion time has passed; how many."""
        with self._write() as db:
            cursor = db.execute("DELETE FROM keys WHERE state = ? AND deletion_ms <= ?",
                                (PENDING_DELETION, now_ms))
            return cursor.rowcount

    def set_key_alias(self, project_id: str, key_id: str, alias: str) -> bool:
        """Rename a key (its key_alias); False when no such key; Conflict when taken."""
        try:
            with self._write() as db:
                cursor = db.execute("UPDATE keys SET alias = ? WHERE key_id = ? AND project_id = ?",
                                    (alias, key_id, project_id))
                return cursor.rowcount == 1
        except sqlite3.IntegrityError:
            raise Conflict(f"alias {alias!r} exists") from None

    # ------------------------------------------------------------------ aliases

    def put_alias(self, project_id: str, alias: str, key_id: str, now_ms: int, *, create: bool) -> AliasRecord:
        """Create an alias (Conflict when it exists) or point an existing one at another key
        (KeyError when it does not exist); the record as stored."""
        with self._write() as db:
            row = db.execute("SELECT created_ms FROM aliases WHERE project_id = ? AND alias = ?",
                             (project_id, alias)).fetchone()
            if create and row is not None:
                raise Conflict(f"alias {alias!r} exists")
            if not create and row is None:
                raise KeyError(alias)
            created = now_ms if row is None else row[0]
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?,?,?,?,?)",
                       (project_id, alias, key_id, created, now_ms))
            return AliasRecord(alias, key_id, created, now_ms)

    def aliases(self, project_id: str, *, key_id: str | None, offset: int, limit: int) -> list[AliasRecord]:
        where, args = "project_id = ?", [project_id]
        if key_id is not None:
            where, args = where + " AND key_id = ?", args + [key_id]
        rows = self._read(f"SELECT alias, key_id, created_ms, updated_ms FROM aliases WHERE {where} "
                          "ORDER BY created_ms, alias LIMIT ? OFFSET ?", (*args, limit, offset))
        return [AliasRecord(*row) for row in rows]

    def delete_aliases(self, project_id: str, key_id: str, aliases: list[str]) -> list[str]:
        """Delete those of ``aliases`` that point at ``key_id``; the ones that did not (none
        deleted then: all or nothing)."""
        with self._write() as db:
            missing = [alias for alias in aliases if db.execute(
                "SELECT 1 FROM aliases WHERE project_id = ? AND alias = ? AND key_id = ?",
                (project_id, alias, key_id)).fetchone() is None]
            if not missing:
                db.executemany("DELETE FROM aliases WHERE project_id = ? AND alias = ?",
                               [(project_id, alias) for alias in aliases])
            return missing

    # ------------------------------------------------------------------ principals

    def create_principal(self, record: PrincipalRecord) -> None:
        """Insert a principal; Conflict when the name (or access key) is taken."""
        try:
            with self._write() as db:
                db.execute("INSERT INTO principals VALUES (?,?,?,?,?,?)", (
                    record.access_key, record.name, record.secret, int(record.admin),
                    record.created_ms, record.policy))
        except sqlite3.IntegrityError:
            raise Conflict(f"principal {record.name!r} exists") from None

    def principal(self, access_key: str) -> PrincipalRecord | None:
        rows = self._read("SELECT * FROM principals WHERE access_key = ?", (access_key,))
        return _principal(rows[0]) if rows else None

    def principal_named(self, name: str) -> PrincipalRecord | None:
        rows = self._read("SELECT * FROM principals WHERE name = ?", (name,))
        return _principal(rows[0]) if rows else None

    def principals(self) -> list[PrincipalRecord]:
        return [_principal(row) for row in
                self._read("SELECT * FROM principals ORDER BY created_ms, name")]

    def set_policy(self, access_key: str, policy: dict | None) -> bool:
        """Attach (or with None, detach) a policy; False when there is no such principal."""
        with self._write() as db:
            cursor = db.execute("UPDATE principals SET policy = ? WHERE access_key = ?",
                                (_policy_text(policy), access_key))
            return cursor.rowcount == 1

    # ------------------------------------------------------------------ temporary credentials, tokens

    def add_temporary_credential(self, record: TemporaryCredential, now_ms: int) -> None:
        """Insert one (dropping expired ones); Conflict when the access key is taken."""
        try:
            with self._write() as db:
                db.execute("DELETE FROM temporary_credentials WHERE expires_ms < ?", (now_ms,))
                db.execute("INSERT INTO temporary_credentials VALUES (?,?,?,?,?)", (
                    record.access_key, record.principal, record.secret, record.token_sha256,
                    record.expires_ms))
        except sqlite3.IntegrityError:
            raise Conflict(f"access key {record.access_key} exists") from None

    def temporary_credential(self, access_key: str) -> TemporaryCredential | None:
        rows = self._read("SELECT * FROM temporary_credentials WHERE access_key = ?", (access_key,))
        return TemporaryCredential(*rows[0]) if rows else None

    def add_token(self, token_sha256: str, principal: str, expires_ms: int, now_ms: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM tokens WHERE expires_ms < ?", (now_ms,))
            db.execute("INSERT INTO tokens VALUES (?,?,?)", (token_sha256, principal, expires_ms))

    def token(self, token_sha256: str) -> tuple[str, int] | None:
        """(principal access key, expiry in ms) of a token, by its SHA-256."""
        rows = self._read("SELECT principal, expires_ms FROM tokens WHERE token_sha256 = ?", (token_sha256,))
        return (rows[0][0], rows[0][1]) if rows else None

    # ------------------------------------------------------------------ nonces

    def claim_nonce(self, nonce: str, expires_ms: int, now_ms: int) -> bool:
        """Record ``nonce`` until ``expires_ms``; False when it is already recorded (a replay).

        Expired nonces are dropped in the same transaction; the table is shared by every
        process using the database."""
        with self._write() as db:
            db.execute("DELETE FROM nonces WHERE expires_ms < ?", (now_ms,))
            cursor = db.execute("INSERT OR IGNORE INTO nonces VALUES (?, ?)", (nonce, expires_ms))
            return cursor.rowcount == 1

    # ------------------------------------------------------------------ audit

    def add_audit(self, record: AuditRecord) -> int:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO audit (time_ms, request_id, remote, principal, api, key_id, "
                "decision, reason, status, error_code, pcr0, pcr8, encoding) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", _audit_row(record))
            return cursor.lastrowid

    def add_audits(self, records: list[AuditRecord]) -> None:
        """Several records in one transaction (one fsync): the audit log's group commit."""
        with self._write() as db:
            db.executemany(
                "INSERT INTO audit (time_ms, request_id, remote, principal, api, key_id, "
                "decision, reason, status, error_code, pcr0, pcr8, encoding) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", [_audit_row(record) for record in records])

    def delete_audit_through(self, last_id: int) -> None:
        """Delete the audit records with id <= ``last_id`` (they have been archived)."""
        with self._write() as db:
            db.execute("DELETE FROM audit WHERE id <= ?", (last_id,))

    def audit(self, *, after: int = 0, limit: int = 100, principal: str | None = None,
              key_id: str | None = None, decision: str | None = None) -> list[AuditRecord]:
        """Records with id > ``after`` in id order, optionally filtered."""
        where: list[str] = ["id > ?"]
        args: list[object] = [after]
        for column, value in (("principal", principal), ("key_id", key_id), ("decision", decision)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        rows = self._read(
            "SELECT time_ms, request_id, remote, principal, api, key_id, decision, reason, "
            f"status, error_code, pcr0, pcr8, encoding, id FROM audit WHERE {' AND '.join(where)} "
            "ORDER BY id LIMIT ?", (*args, limit))
        return [AuditRecord(*row) for row in rows]


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Each statement of ``script`` (no ``;`` inside literals) in the current transaction —
    ``executescript`` would commit it first."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _key_row(record: KeyRecord) -> tuple:
    return tuple(getattr(record, name) for name in KeyRecord.__dataclass_fields__)


def _audit_row(record: AuditRecord) -> tuple:
    return tuple(getattr(record, name) for name in AuditRecord.__dataclass_fields__
                 if name != "id")


def _policy_text(policy: dict | None) -> str | None:
    return None if policy is None else json.dumps(policy, sort_keys=True)


def _principal(row: tuple) -> PrincipalRecord:
    access_key, name, secret, admin, created_ms, policy = row
    return PrincipalRecord(access_key, name, secret, bool(admin), created_ms, policy)
