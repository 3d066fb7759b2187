"""Compact JSON text exactly as Rust's serde_json writes a ``serde_json::Value``.

nitro-cli and eif_build serialise the metadata section with serde_json, so qtbuild must produce
the same bytes for the same document.  Python's ``json`` differs in numbers only:

- serde_json (without its ``arbitrary_precision`` feature) holds an integer outside
  ``i64``/``u64`` as an ``f64``: ``100000000000000000000`` is written back as ``1e20``;
- floats are written with the ``ryu`` crate's shortest round-trip digits in its own layout:
  ``1.5e-7`` and ``1e100`` (no ``+``, no leading exponent zero) where Python writes ``1.5e-07``
  and ``1e+100``; decimal notation while the decimal point falls within 16 digits of the first
  digit (``1000000000000000.0``, ``0.0001``), scientific otherwise;
- serde_json never writes NaN or an infinity (it refuses to parse them too).

Objects have their keys sorted at every depth (serde_json's default map is a BTreeMap); strings
are escaped as Python's ``json`` does with ``ensure_ascii=False`` (the same escapes).
"""

from __future__ import annotations

import json
import math

_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1
#: ryu writes decimal notation while the decimal point is at most this many digits in.
_MAX_DECIMAL_DIGITS = 16


class NotSerdeJsonError(ValueError):
    """A value serde_json cannot represent (NaN, an infinity, a non-JSON type)."""


def dumps(value: object) -> str:
    """``value`` as serde_json's ``to_string`` writes it (compact, keys sorted)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value) if _I64_MIN <= value <= _U64_MAX else format_f64(float(value))
    if isinstance(value, float):
        return format_f64(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(item) for item in value) + "]"
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise NotSerdeJsonError("JSON object keys must be strings")
        members = (json.dumps(key, ensure_ascii=False) + ":" + dumps(value[key]) for key in sorted(value))
        return "{" + ",".join(members) + "}"
    raise NotSerdeJsonError(f"{type(value).__name__} is not a JSON value")


def format_f64(number: float) -> str:
    """A finite float in ryu's layout (what serde_json writes for an ``f64``)."""
    if not math.isfinite(number):
        raise NotSerdeJsonError(f"{number} is not a JSON number (serde_json writes no NaN or infinity)")
    sign = "-" if math.copysign(1.0, number) < 0 else ""
    if number == 0:
        return sign + "0.0"
    digits, exponent = _shortest_digits(abs(number))
    point = len(digits) + exponent  # position of the decimal point relative to the first digit
    if exponent >= 0 and point <= _MAX_DECIMAL_DIGITS:
        text = digits + "0" * exponent + ".0"
    elif 0 < point <= _MAX_DECIMAL_DIGITS:
        text = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    elif len(digits) == 1:
        text = f"{digits}e{point - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + text


def _shortest_digits(number: float) -> tuple[str, int]:
    """The shortest round-trip decimal digits of a positive float and their power of ten:
    ``number == int(digits) * 10**exponent`` (Python's repr uses the same shortest digits as ryu)."""
    mantissa, _, exponent_text = repr(number).partition("e")
    exponent = int(exponent_text) if exponent_text else 0
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    exponent -= len(fraction)
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    return stripped, exponent
