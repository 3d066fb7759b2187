"""A Dockerfile directory the daemon builds in a moment (``FROM scratch``, one script)."""

from __future__ import annotations

from pathlib import Path


def script_context(directory: Path) -> Path:
    """``directory``/context holding a Dockerfile that copies a shell script ``/app`` and runs it."""
    context = directory / "context"
    context.mkdir()
    (context / "app").write_text("#!/bin/sh\necho built\n")
    (context / "Dockerfile").write_text('FROM scratch\nCOPY app /app\nCMD ["/app"]\n')
    return context
