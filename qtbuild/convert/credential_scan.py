"""Warn when an image looks like it carries credentials.

An EIF's bytes are public to anyone who holds the file, and so is everything the image put in
it: environment, labels, command line, files.  Secrets belong in the hand-off at run time
(``qtbuild handoff``), never in the image.  This scan is a heuristic safety net — it warns on
stderr and never fails a build; a warning names where it looked, never the value it found.

Looked at: the config's ``Env`` (names such as ``*_SECRET*``, ``*PASSWORD*``, ``*TOKEN*``,
``*ACCESS_KEY*``, ``SK``, or values shaped like access keys), ``Labels`` the same way, ``Cmd`` /
``Entrypoint`` arguments, and files at well-known credential paths (``.aws/credentials``,
``.huaweicloud/…``, ``id_rsa``, ``*.pem`` / ``*.key`` holding a private key, ``.env``) — a file's
first 64 KiB at most.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable

MAX_SCANNED = 64 * 1024
MAX_WARNINGS = 20

_SECRET_NAME = re.compile(
    r"(SECRET|PASSWORD|PASSWD|TOKEN|PRIVATE_?KEY|ACCESS_?KEY|CREDENTIAL|API_?KEY|^SK$|_SK$|^AK$|_AK$)", re.IGNORECASE)
# AWS access key ids have a recognisable prefix; Huawei Cloud's AKs (20 upper-case letters and
# digits) do not, so they are caught by the name they are stored under.
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z ]+ )?PRIVATE KEY-----")
_CREDENTIAL_FILES = re.compile(
    r"(^|/)(\.aws/credentials|\.huaweicloud/[^/]+|\.hcloud/[^/]+|\.ssh/id_[a-z0-9]+|\.env|"
    r"credentials\.json|[^/]*\.(pem|key|p12|pfx))$")
#: Every path _CREDENTIAL_FILES matches has a last component this finds, or a parent directory
#: named in CANDIDATE_DIRECTORIES: the tree offers the scan only those paths
#: (:meth:`~qtbuild.convert.flatten.FlatTree.find_paths`), not every path of the image.
CANDIDATE_NAMES = re.compile(rb"credentials|\.env|id_|\.(?:pem|key|p12|pfx)")
CANDIDATE_DIRECTORIES = frozenset({b".huaweicloud", b".hcloud"})
_ASSIGNED_SECRET = re.compile(r"^--?[a-z0-9_-]*(secret|password|token|access-?key|sk)[a-z0-9_-]*=.",
                              re.IGNORECASE)


def credential_warnings(config: dict, paths: Iterable[str], read: Callable[[str], bytes | None]) -> list[str]:
    """Warnings about credentials in the image ``config`` (OCI/Docker config JSON) and in the
    files at ``paths`` that ``read(path)`` returns the bytes of (None: not a regular file)."""
    inner = config.get("config") or config.get("Config") or {}
    warnings: list[str] = []
    for entry in inner.get("Env") or []:
        name, _, value = str(entry).partition("=")
        reason = _secret_pair(name, value)
        if reason:
            warnings.append(f"image config Env {name}: {reason}")
    for name, value in (inner.get("Labels") or {}).items():
        reason = _secret_pair(str(name), str(value))
        if reason:
            warnings.append(f"image config label {name}: {reason}")
    for field in ("Entrypoint", "Cmd"):
        for index, argument in enumerate(inner.get(field) or []):
            if _ASSIGNED_SECRET.match(str(argument)) or _AWS_KEY_ID.search(str(argument)):
                warnings.append(f"image config {field}[{index}]: an argument that looks like a credential")
    warnings.extend(_file_warnings(paths, read))
    return [f"{warning} — never bake secrets into an image: anyone with the EIF can read them; hand them "
            f"over at run time (qtbuild handoff)" for warning in _bounded(warnings)]


def _secret_pair(name: str, value: str) -> str | None:
    if not value.strip():
        return None
    if _AWS_KEY_ID.search(value):
        return "its value looks like an access key id"
    if _SECRET_NAME.search(name):
        return "its name suggests a secret and it has a value"
    return None


def _file_warnings(paths: Iterable[str], read: Callable[[str], bytes | None]) -> list[str]:
    warnings = []
    for path in paths:
        if not _CREDENTIAL_FILES.search(path):
            continue
        data = read(path)
        if data is None:
            continue
        head = data[:MAX_SCANNED]
        if posixpath.splitext(path)[1] in (".pem", ".key") and not _PRIVATE_KEY.search(head):
            continue  # certificates and public keys are fine
        kind = "holds a private key" if _PRIVATE_KEY.search(head) else "is a well-known credentials file"
        warnings.append(f"file /{path}: {kind}")
    return warnings


def _bounded(warnings: list[str]) -> list[str]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    return [*warnings[:MAX_WARNINGS], f"{len(warnings) - MAX_WARNINGS} more places that look like credentials"]
