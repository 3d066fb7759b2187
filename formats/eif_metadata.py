"""The EIF v4 metadata section: compact JSON serialised exactly as nitro-cli does.

nitro-cli serialises ``EifIdentityInfo`` with serde_json: compact, outer keys in declaration
order (ImageName, ImageVersion, BuildMetadata, DockerInfo, CustomMetadata), BuildMetadata keys in
declaration order, and ``serde_json::Value`` objects (DockerInfo, CustomMetadata) with keys sorted
at every depth (serde_json's map is a BTreeMap), non-ASCII written as UTF-8, control characters
escaped as lower-case ``\\u00xx``, numbers in serde_json's own layout (``1.5e-7``, ``1e20``; see
:mod:`qtbuild.formats.serde_json_text`).  The section is never measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qtbuild.formats import serde_json_text
from qtbuild.formats.bounded_input import load_json_object
from qtbuild.formats.errors import EifFormatError

#: Parsing bound for a metadata section read from an untrusted file.
MAX_METADATA_SIZE = 1 << 20
#: Nesting bound while validating a decoded metadata document.
MAX_METADATA_DEPTH = 64

_COMPACT: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False, "allow_nan": False}


@dataclass(frozen=True)
class BuildInfo:
    """``BuildMetadata`` of the metadata section."""

    build_time: str
    build_tool: str
    build_tool_version: str
    operating_system: str
    kernel_version: str

    def as_json(self) -> dict:
        return {
            "BuildTime": self.build_time,
            "BuildTool": self.build_tool,
            "BuildToolVersion": self.build_tool_version,
            "OperatingSystem": self.operating_system,
            "KernelVersion": self.kernel_version,
        }


@dataclass(frozen=True)
class EifMetadata:
    """The identity information stored in the metadata section."""

    image_name: str
    image_version: str
    build: BuildInfo
    docker_info: object = field(default_factory=dict)
    custom: object = None

    def to_bytes(self) -> bytes:
        """Serialise byte-compatibly with nitro-cli (see the module docstring)."""
        parts = [
            '"ImageName":' + json.dumps(self.image_name, **_COMPACT),
            '"ImageVersion":' + json.dumps(self.image_version, **_COMPACT),
            '"BuildMetadata":' + json.dumps(self.build.as_json(), **_COMPACT),
            '"DockerInfo":' + serde_json_text.dumps(self.docker_info),
            '"CustomMetadata":' + serde_json_text.dumps(self.custom),
        ]
        return ("{" + ",".join(parts) + "}").encode("utf-8")


def parse_metadata(data: bytes) -> dict:
    """Decode a metadata section into a dict, bounded in size and depth.

    Raises :class:`EifFormatError` when it is not a JSON object of the expected shape.  Unknown
    extra keys are kept (a newer writer may add some).
    """
    document = load_json_object(data, what="metadata section", limit=MAX_METADATA_SIZE, error=EifFormatError)
    _check_depth(document, 0)
    for key in ("ImageName", "ImageVersion"):
        if key in document and not isinstance(document[key], str):
            raise EifFormatError(f"metadata field {key} is not a string")
    build = document.get("BuildMetadata")
    if build is not None and not isinstance(build, dict):
        raise EifFormatError("metadata field BuildMetadata is not an object")
    return document


def _check_depth(value: object, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise EifFormatError(f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, depth + 1)
