"""The one strict CBOR (RFC 8949) reader for untrusted bytes: well-formed and bounded, not canonical.

:func:`decode` accepts exactly one well-formed data item (RFC 8949 §3, Appendix C) filling the
input, and additionally

- bounds: at most ``max_size`` bytes and ``max_depth`` nested arrays, maps and tags; a declared
  string length or item count larger than the bytes left is refused before anything is allocated;
- indefinite lengths only for the major types named in ``indefinite`` (Nitro writes its
  attestation payload as an indefinite map; COSE structures use definite lengths only);
- map keys that are integers or text strings (COSE labels, attestation field names), each at
  most once per map;
- tags only where the caller allows them: none, ``top_tag`` on the outermost item, or any tag
  (``any_tag``; bignums, tags 2 and 3, then decode to ``int``);
- floats and simple values other than false/true/null only when ``floats_and_simple`` is set.

"Strict" is about well-formedness, not canonical form: integer and length heads wider than
necessary (``0x19 0x00 0x01`` for 1, as real QingTian documents write map keys) are accepted,
as RFC 8949 §4.2's preferred serialization is the encoder's duty, not a validity rule.

Values are built as Python objects: ``int``, ``bytes``, ``str``, ``list``, ``dict``, ``bool``,
``None``, ``float``, ``cbor2.CBORTag``, ``cbor2.CBORSimpleValue`` and ``cbor2.undefined``.
Malformed input raises the caller's ``error`` class (a :class:`~qtbuild.formats.errors.FormatError`)
with a message ``"<what>: <problem> at offset <n>"``; never anything else.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from enum import IntEnum

import cbor2

from qtbuild.formats.errors import CborError, FormatError


class Major(IntEnum):
    """The eight CBOR major types (RFC 8949 §3.1): the top three bits of an initial byte."""

    UNSIGNED = 0
    NEGATIVE = 1
    BYTES = 2
    TEXT = 3
    ARRAY = 4
    MAP = 5
    TAG = 6
    SIMPLE = 7  # simple values, floats and the "break" stop code


#: Additional-information values with a special meaning.
AI_UINT8, AI_FLOAT64, AI_INDEFINITE = 24, 27, 31
BREAK = 0xFF
#: ``indefinite`` presets: none (COSE), arrays and maps only (attestation payloads), all kinds.
DEFINITE_ONLY: frozenset[Major] = frozenset()
INDEFINITE_CONTAINERS = frozenset({Major.ARRAY, Major.MAP})
INDEFINITE_ANY = frozenset({Major.BYTES, Major.TEXT, Major.ARRAY, Major.MAP})

_MAJORS = tuple(Major)
_SIMPLE = {20: False, 21: True, 22: None}
_UNDEFINED = 23
_FLOAT_FORMATS = {25: ">e", 26: ">f", 27: ">d"}
_BIGNUM_TAGS = {2: 1, 3: -1}  # tag → sign: value = n, or -1 - n


def decode(
    data: bytes,
    *,
    what: str,
    max_size: int,
    max_depth: int = 16,
    indefinite: Collection[Major] = DEFINITE_ONLY,
    top_tag: int | None = None,
    any_tag: bool = False,
    floats_and_simple: bool = True,
    error: type[FormatError] = CborError,
) -> object:
    """The single data item in ``data`` (rules: module docstring); ``error`` naming ``what`` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"{what}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise error(f"{what}: {len(data)} bytes exceeds the limit of {max_size} bytes")
    reader = _Reader(data, what, error, max_depth, frozenset(indefinite), top_tag, any_tag, floats_and_simple)
    if not data:
        raise error(f"{what}: empty input")
    value = reader.item(0)
    if reader.pos != len(data):
        raise reader.fail("trailing bytes", reader.pos)
    return value


class _Reader:
    """Recursive descent over ``data``; depth is bounded, and every item consumes ≥ 1 byte."""

    def __init__(self, data: bytes, what: str, error: type[FormatError], max_depth: int,
                 indefinite: frozenset[Major], top_tag: int | None, any_tag: bool,
                 floats_and_simple: bool) -> None:
        self.data, self.what, self.error, self.max_depth = data, what, error, max_depth
        self.indefinite, self.top_tag, self.any_tag = indefinite, top_tag, any_tag
        self.floats_and_simple = floats_and_simple
        self.pos = 0

    def fail(self, problem: str, offset: int) -> FormatError:
        return self.error(f"{self.what}: {problem} at offset {offset}")

    # -- heads

    def head(self) -> tuple[Major, int, int | None]:
        """(major, additional info, argument) of the next head; argument None for AI 31."""
        start = self.pos
        if start >= len(self.data):
            raise self.fail("truncated input", start)
        initial = self.data[start]
        major, info = _MAJORS[initial >> 5], initial & 0x1F
        self.pos += 1
        if info < AI_UINT8:
            return major, info, info
        if info == AI_INDEFINITE:
            return major, info, None
        if info > AI_FLOAT64:
            raise self.fail(f"reserved initial byte 0x{initial:02x}", start)
        end = self.pos + (1 << (info - AI_UINT8))
        if end > len(self.data):
            raise self.fail("truncated input", start)
        argument = int.from_bytes(self.data[self.pos:end], "big")
        self.pos = end
        return major, info, argument

    def remaining(self) -> int:
        return len(self.data) - self.pos

    # -- items

    def item(self, depth: int) -> object:
        """Decode the item at ``pos``; ``depth`` is the number of containers around it."""
        start = self.pos
        major, info, argument = self.head()
        if argument is None:
            return self.indefinite_item(major, depth, start)
        if major is Major.UNSIGNED:
            return argument
        if major is Major.NEGATIVE:
            return -1 - argument
        if major in (Major.BYTES, Major.TEXT):
            return self.string(major, argument, start)
        if major is Major.SIMPLE:
            return self.simple(info, argument, start)
        if depth >= self.max_depth:
            raise self.fail(f"nesting deeper than {self.max_depth}", start)
        if major is Major.ARRAY:
            if argument > self.remaining():
                raise self.fail(f"truncated input: array of {argument} items overruns the input", start)
            return [self.item(depth + 1) for _ in range(argument)]
        if major is Major.MAP:
            if 2 * argument > self.remaining():
                raise self.fail(f"truncated input: map of {argument} pairs overruns the input", start)
            return self.map_items(argument, depth + 1)
        return self.tag(argument, depth, start)

    def string(self, major: Major, length: int, start: int) -> bytes | str:
        if length > self.remaining():
            raise self.fail(f"string of {length} bytes overruns the input", start)
        raw = self.data[self.pos:self.pos + length]
        self.pos += length
        if major is Major.BYTES:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("invalid CBOR: text string is not UTF-8", start) from None

    def simple(self, info: int, argument: int, start: int) -> object:
        if argument in _SIMPLE and info < AI_UINT8:
            return _SIMPLE[argument]
        if not self.floats_and_simple:
            raise self.fail(f"unsupported initial byte 0x{self.data[start]:02x} (float or simple value)", start)
        if info in _FLOAT_FORMATS:
            return struct.unpack(_FLOAT_FORMATS[info], self.data[start + 1:self.pos])[0]
        if info == AI_UINT8 and argument < 32:  # RFC 8949 §3.3: two-byte form only for 32..255
            raise self.fail(f"reserved two-byte simple value {argument}", start)
        return cbor2.undefined if argument == _UNDEFINED else cbor2.CBORSimpleValue(argument)

    def map_items(self, count: int | None, depth: int) -> dict:
        """``count`` key/value pairs (None: up to a break); keys are unique ints or texts."""
        result: dict = {}
        while not self.at_break() if count is None else len(result) < count:
            key_at = self.pos
            key = self.item(depth)
            if type(key) not in (int, str):
                raise self.fail("map key is not an integer or text string", key_at)
            if key in result:
                raise self.fail(f"duplicate map key {key!r}", key_at)
            if count is None and self.pos < len(self.data) and self.data[self.pos] == BREAK:
                raise self.fail("break in a map value position", self.pos)
            result[key] = self.item(depth)
        return result

    def tag(self, number: int, depth: int, start: int) -> object:
        if not (self.any_tag or (start == 0 and number == self.top_tag)):
            raise self.fail(f"unexpected tag {number}", start)
        value = self.item(depth + 1)
        if self.any_tag and number in _BIGNUM_TAGS and type(value) is bytes:
            magnitude = int.from_bytes(value, "big")
            return magnitude if number == 2 else -1 - magnitude
        return cbor2.CBORTag(number, value)

    # -- indefinite lengths

    def at_break(self) -> bool:
        """Whether a break ends the current indefinite item (consumed if so); truncation fails."""
        if self.pos >= len(self.data):
            raise self.fail("truncated input: missing break", self.pos)
        if self.data[self.pos] == BREAK:
            self.pos += 1
            return True
        return False

    def indefinite_item(self, major: Major, depth: int, start: int) -> object:
        if major is Major.SIMPLE:
            raise self.fail("break outside an indefinite-length item", start)
        if major not in self.indefinite:
            accepted = "not accepted" if major in INDEFINITE_ANY else "not defined"
            raise self.fail(f"unsupported initial byte 0x{self.data[start]:02x} "
                            f"(indefinite length {accepted})", start)
        if depth >= self.max_depth:
            raise self.fail(f"nesting deeper than {self.max_depth}", start)
        if major is Major.ARRAY:
            items = []
            while not self.at_break():
                items.append(self.item(depth + 1))
            return items
        if major is Major.MAP:
            return self.map_items(None, depth + 1)
        return self.chunks(major)

    def chunks(self, major: Major) -> bytes | str:
        """An indefinite byte or text string: definite chunks of the same major type, then break."""
        parts: list = []
        while not self.at_break():
            chunk_at = self.pos
            chunk_major, _, length = self.head()
            if chunk_major is not major or length is None:
                raise self.fail(f"indefinite-length {major.name.lower()} string holds a chunk that is "
                                "not a definite string of the same type", chunk_at)
            parts.append(self.string(major, length, chunk_at))
        return b"".join(parts) if major is Major.BYTES else "".join(parts)
