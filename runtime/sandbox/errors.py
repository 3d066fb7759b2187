"""The sandbox's error and the helper that names a step in it: a leaf module, so every sandbox
module can raise it without importing another."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class SandboxError(Exception):
    """A protection could not be applied, or the spec is unusable.  The message names the
    protection (or field) and, where there is one, the fix."""


@contextmanager
def step(what: str) -> Iterator[None]:
    """Name the protection being applied (``what``) in a SandboxError for any OS error it raises."""
    try:
        yield
    except OSError as exc:
        raise SandboxError(f"{what} failed: {exc.strerror or exc}") from exc
