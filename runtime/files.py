"""The one atomic file writer: durable for PKI keys, KMS credentials and master key; atomic only for
enclave records (runtime state)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_ATTEMPTS = 100


def write_atomically(path: str | os.PathLike, data: bytes, mode: int = 0o600, *, exclusive: bool = False,
                     durable: bool = True) -> None:
    """Make ``path`` hold ``data``, atomically and durably.

    The bytes go to a new temporary file beside ``path``, created with ``mode`` — narrowed by the
    process umask as the kernel does for every new file, so 0600 stays 0600 and 0644 becomes
    0640 under umask 027; the umask itself is never changed — then fsynced and renamed over
    ``path`` (with ``exclusive``: linked to ``path``, FileExistsError if it exists), and the
    directory is fsynced.  A reader sees the old content or the new, never a mix or an empty
    file; nothing is left behind on error.  ``durable=False`` skips both fsyncs (still atomic for
    every reader): for state that means nothing after the machine restarts, such as an enclave's
    record, where each fsync costs milliseconds on a disk-backed runtime directory.
    """
    path = Path(path)
    descriptor, temporary = _create_beside(path, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)
            temporary.unlink()
        else:
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename or link in ``directory`` durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _create_beside(path: Path, mode: int) -> tuple[int, Path]:
    """A new, exclusively created file ``.<name>.<random>.tmp`` in ``path``'s directory."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_ATTEMPTS):
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(temporary, flags, mode), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")
