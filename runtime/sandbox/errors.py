"""The sandbox's error: a leaf module, so every sandbox module can raise it without importing another."""

from __future__ import annotations


class SandboxError(Exception):
    """A protection could not be applied, or the spec is unusable.  The message names the
    protection (or field) and, where there is one, the fix."""
