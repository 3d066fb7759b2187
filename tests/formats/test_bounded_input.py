"""The one bounded stream reader and the one bounded JSON loader."""

from __future__ import annotations

import io

import pytest

from qtbuild.formats.bounded_input import InputTooLarge, load_json, load_json_object, read_bounded
from qtbuild.formats.errors import EifFormatError, FormatError
from qtbuild.formats.local_abi import LOCAL_MAGIC, parse_local_kernel

DEEP = b"[" * 3000 + b"]" * 3000  # deeper than the json module's recursion limit


class Trickle(io.RawIOBase):
    """An endless stream that returns one byte per read (as a pipe or socket may) and counts."""

    def __init__(self) -> None:
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        buffer[0] = 0x61
        self.consumed += 1
        return 1


def test_reads_up_to_the_limit_exactly():
    assert read_bounded(io.BytesIO(b"abcd"), 4) == b"abcd"
    assert read_bounded(io.BytesIO(b""), 4) == b""


def test_one_byte_over_the_limit_is_refused():
    with pytest.raises(InputTooLarge, match="input is larger than 4 bytes"):
        read_bounded(io.BytesIO(b"abcde"), 4)


def test_the_caller_chooses_the_error():
    with pytest.raises(ValueError, match="^key.pem: too big$"):
        read_bounded(io.BytesIO(b"abcde"), 4, ValueError("key.pem: too big"))


def test_short_reads_are_retried_and_at_most_limit_plus_one_bytes_are_read():
    stream = Trickle()
    with pytest.raises(InputTooLarge):
        read_bounded(stream, 10)  # type: ignore[arg-type]
    assert stream.consumed == 11


def test_load_json_values_and_objects():
    assert load_json(b'[1, "\xc3\xbc"]', what="doc") == [1, "ü"]
    assert load_json_object(b'{"a": 1}', what="doc") == {"a": 1}
    with pytest.raises(FormatError, match="^doc is not a JSON object$"):
        load_json_object(b"[]", what="doc")


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"{", "doc is not valid JSON"),
        (b"\xff{}", "doc is not valid JSON"),
        ('{"a": 1}'.encode("utf-16"), "doc is not valid JSON"),  # JSON between systems is UTF-8
        (DEEP, "doc is not valid JSON"),  # RecursionError is caught, never a traceback
        (b"[" + b" " * 7000 + b"]", "doc is 7002 bytes; refusing documents over 7000 bytes"),
    ],
)
def test_load_json_refuses_with_the_callers_error(data, problem):
    with pytest.raises(EifFormatError, match=problem):
        load_json(data, what="doc", limit=7000, error=EifFormatError)


def test_local_runtime_descriptor_parser_never_raises_on_deep_nesting():
    """Regression: parse_local_kernel promised never to raise, but let RecursionError through."""
    assert parse_local_kernel(LOCAL_MAGIC + b"[" * 2000 + b"]" * 2000) is None
