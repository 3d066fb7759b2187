"""What every KMS handler works with: the store, the master key, the service's identity, the
clock and the audit log (its own module so handlers and helpers share it without a cycle)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from qtbuild.runtime.kms import crypto
from qtbuild.runtime.kms.audit_log import AuditLog
from qtbuild.runtime.kms.store import Store


@dataclass(frozen=True)
class Environment:
    """What the handlers work with."""

    store: Store
    master_key: crypto.MasterKey
    domain_id: str
    region: str = "local"
    clock: Callable[[], float] = time.time
    audit_log: AuditLog | None = None       # None: the store's table alone, never rotated

    def audit(self) -> AuditLog:
        return self.audit_log or AuditLog(self.store)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)
