"""Where the local attestation PKI lives, and whether it has been created.

Kept apart from :mod:`qtbuild.runtime.qtsm.pki` because it needs no cryptography: ``qtbuild run``
checks for the PKI on every start, and importing x509 for that would cost the CLI more than the
rest of its start-up (:class:`~qtbuild.runtime.qtsm.pki.LocalPki` is imported only to create one).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_state_dir", "is_initialised", "pki_directory"]


def default_state_dir() -> Path:
    """``$QTBUILD_STATE_DIR``, else /var/lib/qtbuild for root, else ~/.local/share/qtbuild."""
    if os.environ.get("QTBUILD_STATE_DIR"):
        return Path(os.environ["QTBUILD_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/qtbuild")
    return Path.home() / ".local" / "share" / "qtbuild"


def pki_directory(state_dir: str | os.PathLike | None) -> Path:
    """The PKI's directory under ``state_dir`` (None: :func:`default_state_dir`)."""
    return Path(state_dir if state_dir is not None else default_state_dir()) / "pki"


def is_initialised(state_dir: str | os.PathLike | None = None) -> bool:
    """Whether the root key and certificate exist under ``state_dir``."""
    directory = pki_directory(state_dir)
    return all((directory / f"root.{suffix}").exists() for suffix in ("key", "crt"))
