"""Reading untrusted input whole but bounded: a stream up to a byte limit, and JSON documents.

Every reader of a small file, stdin, HTTP body or embedded document uses these two instead of
``read(limit + 1)``-and-compare and ``json.loads``-and-catch of its own, so each has one bound,
one UTF-8 rule and one set of caught exceptions.  Opening the file (or choosing stdin) is the
caller's business: :mod:`qtbuild.formats` works on file objects.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from qtbuild.formats.errors import FormatError


class Readable(Protocol):
    """Anything with ``read(n)`` returning bytes (files, pipes, HTTP bodies)."""

    def read(self, n: int = -1, /) -> bytes: ...


class InputTooLarge(FormatError):
    """More bytes than the reader's limit."""


def read_bounded(stream: Readable, limit: int, too_large: Exception | None = None) -> bytes:
    """Every byte of ``stream`` up to EOF, having read at most ``limit + 1`` of them.

    Raises ``too_large`` (by default an :class:`InputTooLarge` naming the limit) when the stream
    holds more than ``limit`` bytes; short reads (pipes, sockets, HTTP bodies) are retried.
    """
    parts: list[bytes] = []
    total = 0
    while total <= limit:
        chunk = stream.read(limit + 1 - total)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    if total > limit:
        raise too_large if too_large is not None else InputTooLarge(f"input is larger than {limit} bytes")
    return b"".join(parts)


def load_json(data: bytes, *, what: str, limit: int | None = None,
              error: type[Exception] = FormatError, **hooks: Any) -> object:
    """The JSON value in ``data`` (UTF-8, at most ``limit`` bytes when given).

    Raises ``error`` naming ``what`` for an oversized, non-UTF-8, malformed or too deeply nested
    document (RFC 8259 §8.1: JSON exchanged between systems is UTF-8; Go's encoding/json, which
    Docker and registries use, rejects anything else too).  ``hooks`` (``parse_float`` etc.) go
    to :func:`json.loads`; a ValueError they raise is reported like malformed JSON.
    """
    if limit is not None and len(data) > limit:
        raise error(f"{what} is {len(data)} bytes; refusing documents over {limit} bytes")
    try:
        return json.loads(bytes(data).decode("utf-8"), **hooks)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None


def load_json_object(data: bytes, *, what: str, limit: int | None = None,
                     error: type[Exception] = FormatError) -> dict:
    """Like :func:`load_json`, and ``error`` unless the document is a JSON object."""
    document = load_json(data, what=what, limit=limit, error=error)
    if not isinstance(document, dict):
        raise error(f"{what} is not a JSON object")
    return document
