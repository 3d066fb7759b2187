"""The metadata section qtbuild writes: identity, build tool and a build time that never comes
from the wall clock (``SOURCE_DATE_EPOCH``, else a time the caller derives from its input)."""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime

from qtbuild import __version__
from qtbuild.formats.bounded_input import load_json, read_bounded
from qtbuild.formats.eif_metadata import BuildInfo, EifMetadata, parse_metadata
from qtbuild.formats.errors import EifFormatError

BUILD_TOOL = "qtbuild"
#: nitro-cli and ``qt enclave make-img`` cap the custom metadata file at this size.
MAX_CUSTOM_METADATA = 4096
#: cpio newc stores mtimes as 8 hex digits: SOURCE_DATE_EPOCH must fit.
MAX_SOURCE_DATE_EPOCH = (1 << 32) - 1
#: Used when neither SOURCE_DATE_EPOCH nor the input provides a time.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class MetadataError(ValueError):
    """A --metadata file or SOURCE_DATE_EPOCH value that cannot be used."""


def source_date_epoch() -> datetime | None:
    """``SOURCE_DATE_EPOCH`` as an aware UTC datetime, None when unset.

    The value must fit the 32-bit unsigned mtime field of the cpio archives it clamps
    (0..2**32-1); anything else is a MetadataError naming the range."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return None
    try:
        seconds = int(raw.strip())
    except ValueError:
        raise MetadataError(f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds since 1970") from None
    if not 0 <= seconds <= MAX_SOURCE_DATE_EPOCH:
        raise MetadataError(f"SOURCE_DATE_EPOCH={raw.strip()} is out of range: use 0..{MAX_SOURCE_DATE_EPOCH} "
                            "(seconds since 1970, the range of a cpio mtime)")
    return datetime.fromtimestamp(seconds, tz=UTC)


def build_time(fallback: datetime | None = None) -> str:
    """RFC 3339 build time: SOURCE_DATE_EPOCH, else ``fallback``, else 1970-01-01."""
    moment = source_date_epoch() or fallback or EPOCH
    return moment.astimezone(UTC).replace(microsecond=0).isoformat()


def load_custom_metadata(path: str | os.PathLike | None) -> object:
    """Parse a --metadata JSON file (at most 4096 bytes); None when no file is given."""
    if path is None:
        return None
    too_large = MetadataError(f"{path}: custom metadata is larger than {MAX_CUSTOM_METADATA} bytes; shorten it")
    with open(path, "rb") as handle:
        raw = read_bounded(handle, MAX_CUSTOM_METADATA, too_large)
    return load_json(raw, what=f"{path}: custom metadata", error=MetadataError,
                     parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_serde_int)


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text} is out of range")  # serde_json refuses it too
    return number


def _serde_int(text: str) -> int:
    number = int(text)
    if not -(1 << 63) <= number < (1 << 64):  # serde_json holds it as an f64: it must fit one
        _finite_float(text)
    return number


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
    """The metadata section's bytes for an image qtbuild builds (``docker_info`` None is written
    ``null``, as eif_build does for images not built from a container).

    Raises MetadataError when the section would be one ``describe``/``verify`` refuse to read
    (larger than 1 MiB, nested deeper than 64 levels): the image config is copied into
    DockerInfo, so a hostile or bloated config is refused here, at build time.
    """
    build = BuildInfo(build_time(time_fallback), BUILD_TOOL, __version__, operating_system, kernel_version)
    try:
        data = EifMetadata(name, version, build, docker_info, custom).to_bytes()
        parse_metadata(data)
    except (EifFormatError, RecursionError) as exc:
        problem = str(exc) if isinstance(exc, EifFormatError) else "it nests too deeply"
        raise MetadataError(f"the EIF metadata section would not be readable ({problem}); it carries the image "
                            f"config (DockerInfo.Config: labels, env...) and --metadata: make them smaller or "
                            f"flatter") from None
    return data
