"""The metadata section qtbuild writes: identity, build tool and a build time that never comes
from the wall clock (``SOURCE_DATE_EPOCH``, else a time the caller derives from its input)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

from qtbuild import __version__
from qtbuild.formats.eif_metadata import BuildInfo, EifMetadata, parse_metadata
from qtbuild.formats.errors import EifFormatError

BUILD_TOOL = "qtbuild"
#: nitro-cli and ``qt enclave make-img`` cap the custom metadata file at this size.
MAX_CUSTOM_METADATA = 4096
#: Used when neither SOURCE_DATE_EPOCH nor the input provides a time.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MetadataError(ValueError):
    """A --metadata file or SOURCE_DATE_EPOCH value that cannot be used."""


def source_date_epoch() -> datetime | None:
    """``SOURCE_DATE_EPOCH`` as an aware UTC datetime, None when unset."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return None
    try:
        return datetime.fromtimestamp(int(raw.strip()), tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise MetadataError(f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds since 1970") from None


def build_time(fallback: datetime | None = None) -> str:
    """RFC 3339 build time: SOURCE_DATE_EPOCH, else ``fallback``, else 1970-01-01."""
    moment = source_date_epoch() or fallback or EPOCH
    return moment.astimezone(UTC).replace(microsecond=0).isoformat()


def load_custom_metadata(path: str | os.PathLike | None) -> object:
    """Parse a --metadata JSON file (at most 4096 bytes); None when no file is given."""
    if path is None:
        return None
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CUSTOM_METADATA + 1)
    if len(raw) > MAX_CUSTOM_METADATA:
        raise MetadataError(f"{path}: custom metadata is larger than {MAX_CUSTOM_METADATA} bytes; shorten it")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MetadataError(f"{path}: custom metadata is not valid JSON ({exc})") from None


def make_metadata(
    *,
    name: str,
    version: str,
    kernel_version: str,
    operating_system: str = "Linux",
    docker_info: object = None,
    custom: object = None,
    time_fallback: datetime | None = None,
) -> bytes:
    """The metadata section's bytes for an image qtbuild builds.

    Raises MetadataError when the section would be one ``describe``/``verify`` refuse to read
    (larger than 1 MiB, nested deeper than 64 levels): the image config is copied into
    DockerInfo, so a hostile or bloated config is refused here, at build time.
    """
    build = BuildInfo(build_time(time_fallback), BUILD_TOOL, __version__, operating_system, kernel_version)
    try:
        data = EifMetadata(name, version, build, docker_info if docker_info is not None else {}, custom).to_bytes()
        parse_metadata(data)
    except (EifFormatError, RecursionError) as exc:
        problem = str(exc) if isinstance(exc, EifFormatError) else "it nests too deeply"
        raise MetadataError(f"the EIF metadata section would not be readable ({problem}); it carries the image "
                            f"config (DockerInfo.Config: labels, env...) and --metadata: make them smaller or "
                            f"flatter") from None
    return data
