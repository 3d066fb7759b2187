"""The launch record in the customer ramdisk: what the enclave's first process is.

Written by ``qtbuild convert`` (:mod:`qtbuild.convert.ramdisk`) and read by the local runtime
(:mod:`qtbuild.runtime.enclave.launch_reader`).  Three files at the ramdisk's root:

    cmd          argv, one element per line, each followed by "\\n" (nitro-cli's init format)
    env          KEY=VALUE lines, each followed by "\\n" (nitro-cli's init format)
    launch.json  ``{"argv", "cwd", "env", "gid", "groups", "uid", "user", "version"}``: compact
                 JSON with sorted keys and a final newline; qtbuild's record of the resolved
                 command, working directory and identity (nitro's init ignores it)

``version`` is the launch layout version: how an image config is turned into these files.  A
change to that rule changes the customer ramdisk's bytes, hence PCR0 and PCR2, for an unchanged
image; the version lets ``convert --check`` and ``diff`` say so (CHANGELOG.md lists each one):

    1  (no ``version`` field) qtbuild up to 0.1: no HOME; ``USER name:group`` kept the
       user's supplementary groups
    2  HOME from the image's passwd (``/`` for a user without an entry) unless Env sets it;
       supplementary groups only for ``USER name`` / ``USER uid`` (runc's rule)

Elements containing a newline or NUL cannot be represented in ``cmd``/``env`` and are refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from qtbuild.formats.bounded_input import load_json_object
from qtbuild.formats.errors import FormatError

MAX_LAUNCH_FILE = 1 << 20
#: Largest uid/gid a process can take: uid_t is 32 bits and (uid_t)-1 means "unchanged" to setuid(2).
MAX_ID = 2**32 - 2
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The launch layout version qtbuild writes (see the module docstring).
LAUNCH_LAYOUT_VERSION = 2
#: What a launch.json without a ``version`` field was written by.
FIRST_LAYOUT_VERSION = 1


class LaunchFormatError(FormatError):
    """A launch record that cannot be written or read; the message names the field."""


@dataclass(frozen=True)
class Launch:
    """The resolved process to start inside the enclave."""

    argv: list[str]
    env: list[str]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    user: str = ""
    version: int = LAUNCH_LAYOUT_VERSION

    def __post_init__(self) -> None:
        """Refuse what cmd/env cannot carry and what no process can be started with, so that a
        record ``convert`` writes is one the runtime accepts."""
        for item in self.argv + self.env:
            if "\n" in item or "\0" in item:
                raise LaunchFormatError(f"command/env element {item[:200]!r} contains a newline or NUL, "
                                        f"which cmd/env files cannot represent")
        if self.argv and not self.argv[0]:
            raise LaunchFormatError("command: the program (first element) is empty")
        for item in self.env:
            if "=" not in item or item.startswith("="):
                raise LaunchFormatError(f"env element {item[:200]!r} is not NAME=value")
        _check_cwd(self.cwd)
        for label, value in (("uid", self.uid), ("gid", self.gid), *(("groups", g) for g in self.groups)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ID:
                raise LaunchFormatError(f"{label} {value!r} is outside 0..{MAX_ID}")

    def cmd_file(self) -> bytes:
        return "".join(item + "\n" for item in self.argv).encode()

    def env_file(self) -> bytes:
        return "".join(item + "\n" for item in self.env).encode()

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def _check_cwd(cwd: object) -> None:
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        raise LaunchFormatError(f"working directory {str(cwd)[:200]!r} is not an absolute path without NUL")
    if any(part in (".", "..") for part in cwd.split("/")):
        raise LaunchFormatError(f"working directory {cwd[:200]!r} is not normalised (has '.' or '..')")
    if len(cwd.encode("utf-8", "surrogatepass")) > 4095:
        raise LaunchFormatError("working directory is longer than 4095 bytes (PATH_MAX)")


def with_default_path(env: list[str]) -> list[str]:
    """``env`` with ``PATH`` set to :data:`DEFAULT_PATH` when it has none (docker's default)."""
    return env if any(item.startswith("PATH=") for item in env) else [f"PATH={DEFAULT_PATH}", *env]


def parse_launch_json(data: bytes) -> Launch:
    """Decode ``launch.json``; LaunchFormatError for anything of the wrong shape."""
    document = load_json_object(data, what="launch.json", limit=MAX_LAUNCH_FILE, error=LaunchFormatError)
    launch = Launch(
        argv=_typed(document, "argv", list, str), env=_typed(document, "env", list, str),
        cwd=_typed(document, "cwd", str), uid=_typed(document, "uid", int), gid=_typed(document, "gid", int),
        groups=_typed(document, "groups", list, int),
        user=document.get("user", "") if isinstance(document.get("user", ""), str) else "",
        version=_layout_version(document),
    )
    if not launch.argv:
        raise LaunchFormatError("launch.json has an empty argv: nothing to run")
    return launch


def _layout_version(document: dict) -> int:
    if "version" not in document:
        return FIRST_LAYOUT_VERSION
    version = _typed(document, "version", int)
    if not FIRST_LAYOUT_VERSION <= version <= LAUNCH_LAYOUT_VERSION:
        raise LaunchFormatError(
            f"launch.json has layout version {version}; this qtbuild reads versions {FIRST_LAYOUT_VERSION}.."
            f"{LAUNCH_LAYOUT_VERSION} (upgrade qtbuild)"
        )
    return version


def parse_cmd_env(cmd: bytes, env: bytes) -> Launch:
    """A launch from nitro's ``cmd``/``env`` files alone (cwd ``/``, root, default PATH)."""
    argv = _lines(cmd, "cmd")
    if not argv:
        raise LaunchFormatError("cmd is empty: nothing to run")
    return Launch(argv, with_default_path(_lines(env, "env")))


def _lines(data: bytes, name: str) -> list[str]:
    if len(data) > MAX_LAUNCH_FILE:
        raise LaunchFormatError(f"{name} is larger than {MAX_LAUNCH_FILE} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise LaunchFormatError(f"the {name} file is not UTF-8") from None
    return [line for line in text.split("\n") if line]


def _typed(document: dict, key: str, kind: type, item: type | None = None):
    value: Any = document.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and item is not None:
        ok = all(isinstance(element, item) and not isinstance(element, bool) for element in value)
    if not ok:
        expected = f"a list of {item.__name__}" if item else kind.__name__
        raise LaunchFormatError(f"launch.json: {key!r} must be {expected}")
    return value
