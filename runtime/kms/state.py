"""The KMS's state directory and the admin credentials file.

Layout (directory 0700)::

    <state>/master.key           32 bytes, 0600, created on first start (qtbuild.runtime.kms.crypto)
    <state>/kms.sqlite           the store (WAL: plus -wal and -shm files)
    <state>/admin.json           0600: {"endpoint", "access_key", "secret_key", "project_id"}
    <state>/audit/               audit archives, audit-<first id>-<last id>.jsonl (audit_log)

On first start an admin principal ("admin", allowed ``kms:*`` on every key) is created; every
start (re)writes ``admin.json`` with the address the service listens on, so admin commands
find both.  The project id and domain id are random 32-hex-digit values chosen once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qtbuild.formats.bounded_input import load_json_object, read_bounded
from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.kms.audit_log import DEFAULT_KEEP, DEFAULT_MAX_BYTES, AuditLog
from qtbuild.runtime.kms.crypto import MasterKey, MasterKeyError
from qtbuild.runtime.kms.operations import Environment, new_principal, principal_context
from qtbuild.runtime.kms.store import Store, StoreError
from qtbuild.runtime.sdk.kms_client import Credentials

ADMIN_NAME = "admin"
ADMIN_POLICY = {"Version": "1.1", "Statement": [{"Effect": "Allow", "Action": ["kms:*"]}]}
MAX_CREDENTIALS_FILE = 4096


@dataclass(frozen=True)
class StatePaths:
    directory: Path
    database: Path
    master_key: Path
    credentials: Path
    audit: Path             # archives of the audit log

    @classmethod
    def under(cls, directory: str | os.PathLike, database: str | os.PathLike | None = None,
              ) -> StatePaths:
        directory = Path(directory)
        return cls(directory, Path(database) if database else directory / "kms.sqlite",
                   directory / "master.key", directory / "admin.json", directory / "audit")

    def create(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)


@dataclass(frozen=True)
class OpenedState:
    """A ready KMS environment, its project id and the admin's credentials."""

    env: Environment
    project_id: str
    admin: Credentials
    created: bool           # the master key (so the whole state) was created just now


def open_state(paths: StatePaths, *, clock=time.time, audit_max_bytes: int = DEFAULT_MAX_BYTES,
               audit_keep: int = DEFAULT_KEEP) -> OpenedState:
    """Create or load the state: master key, store, ids, admin principal; purge keys whose
    scheduled deletion has passed.  The audit log rotates into ``<state>/audit/`` past
    ``audit_max_bytes``, keeping ``audit_keep`` archives.  MasterKeyError / StoreError when
    unusable."""
    paths.create()
    master_key, created = MasterKey.load_or_create(paths.master_key)
    store = Store(paths.database)
    project_id = store.meta("project_id", lambda: secrets.token_hex(16))
    domain_id = store.meta("domain_id", lambda: secrets.token_hex(16))
    audit_log = AuditLog(store, paths.audit, max_bytes=audit_max_bytes, keep=audit_keep)
    env = Environment(store, master_key, domain_id, clock=clock, audit_log=audit_log)
    store.purge_deleted(env.now_ms())
    return OpenedState(env, project_id, admin_credentials(env, project_id), created)


def backup(paths: StatePaths, target: Path) -> None:
    """A consistent online copy of the store at ``target`` (the master key is not in it:
    keep ``master.key`` apart).  StoreError when the store cannot be read."""
    with contextlib.closing(Store(paths.database)) as store:
        store.backup_to(target)


def restore(paths: StatePaths, source: Path) -> None:
    """Replace the store with the backup at ``source`` (its schema upgraded if older), after
    checking that this state's master key opens its secrets.  StoreError / MasterKeyError."""
    if not paths.master_key.exists():
        raise StoreError(f"{paths.master_key} is missing: put the master key that belongs to the backup there first")
    master_key, _ = MasterKey.load_or_create(paths.master_key)
    with tempfile.TemporaryDirectory(dir=paths.directory) as scratch:
        copy = Path(scratch) / "restore.sqlite"
        shutil.copyfile(source, copy)
        # Store() refuses a non-KMS or newer database and upgrades an older one
        with contextlib.closing(Store(copy)) as checked:
            try:
                for record in checked.principals()[:1]:
                    master_key.open(record.secret, principal_context(record.access_key))
            except MasterKeyError:
                raise StoreError(f"{source}: its secrets do not open with {paths.master_key} "
                                 "(a backup of another KMS state?)") from None
        with contextlib.closing(Store(paths.database)) as store:
            store.restore_from(copy)


def admin_credentials(env: Environment, project_id: str) -> Credentials:
    """The admin's credentials, creating the admin principal on first start."""
    record = env.store.principal_named(ADMIN_NAME)
    if record is None:
        access_key, secret_key = new_principal(env, ADMIN_NAME, admin=True, policy=ADMIN_POLICY)
        return Credentials(access_key, secret_key, project_id)
    secret = env.master_key.open(record.secret, principal_context(record.access_key)).decode()
    return Credentials(record.access_key, secret, project_id)


def write_credentials(path: Path, endpoint: str, credentials: Credentials, *, expires_at: str | None = None) -> None:
    """Atomically replace ``path`` (mode 0600) with the endpoint and credentials (temporary ones
    with their security token and expiry, which :func:`read_credentials` keeps)."""
    document = {"endpoint": endpoint, "access_key": credentials.access_key, "secret_key": credentials.secret_key,
                "project_id": credentials.project_id}
    if credentials.security_token:
        document["security_token"] = credentials.security_token
    if expires_at:
        document["expires_at"] = expires_at
    write_atomically(path, json.dumps(document, indent=2).encode() + b"\n", 0o600)


def read_credentials(path: str | os.PathLike) -> tuple[str, Credentials]:
    """(endpoint, credentials) from a credentials file; ValueError when malformed."""
    with open(path, "rb") as handle:
        too_large = ValueError(f"{path}: larger than {MAX_CREDENTIALS_FILE} bytes")
        data = read_bounded(handle, MAX_CREDENTIALS_FILE, too_large)
    try:
        document = load_json_object(data, what=str(path), error=ValueError)
        fields = [document[name] for name in ("endpoint", "access_key", "secret_key",
                                              "project_id")]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a KMS credentials file") from None
    token = document.get("security_token")     # temporary credentials (kms principal create --temporary --out)
    if not all(isinstance(value, str) for value in fields) or not isinstance(token, str | None):
        raise ValueError(f"{path}: not a KMS credentials file")
    endpoint, access_key, secret_key, project_id = fields
    return endpoint, Credentials(access_key, secret_key, project_id, security_token=token)

