"""Validation of request bodies: each field's type, size and range, or a 400 naming the field.

``Fields(body)`` wraps one decoded JSON object; each accessor consumes a field and returns it
checked (or None when optional and absent); :meth:`Fields.done` then refuses any field no
accessor asked for.  Huawei sends many numbers as decimal strings ("256"), so
:meth:`Fields.integer` accepts both forms.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal, overload

from qtbuild.runtime.kms.errors import KmsError, invalid, missing

#: Huawei's optional 36-byte request ``sequence`` (accepted and ignored everywhere).
_SEQUENCE = re.compile(r"[A-Za-z0-9-]{1,36}")
_DECIMAL = re.compile(r"[0-9]{1,12}")


class Fields:
    """The fields of one request body (a dict decoded from JSON)."""

    def __init__(self, body: object) -> None:
        if not isinstance(body, dict):
            raise KmsError("KMS.0202", "The request body must be a JSON object.")
        self._body, self._used = body, set[str]()
        sequence = self.text("sequence", required=False, max_length=36, code="KMS.0206")
        if sequence is not None and not _SEQUENCE.fullmatch(sequence):
            raise KmsError("KMS.0206")

    def has(self, name: str) -> bool:
        return name in self._body

    def _take(self, name: str, required: bool):
        self._used.add(name)
        value = self._body.get(name)
        if value is None and required:
            raise missing(name)
        return value

    def raw(self, name: str) -> object:
        """The value as sent (None when absent), for callers that check it themselves."""
        return self._take(name, False)

    @overload
    def text(self, name: str, *, required: Literal[True] = True, max_length: int = 256,
             min_length: int = 0, pattern: re.Pattern | None = None, code: str | None = None) -> str: ...

    @overload
    def text(self, name: str, *, required: bool, max_length: int = 256,
             min_length: int = 0, pattern: re.Pattern | None = None, code: str | None = None) -> str | None: ...

    def text(self, name: str, *, required: bool = True, max_length: int = 256,
             min_length: int = 0, pattern: re.Pattern | None = None,
             code: str | None = None) -> str | None:
        """A string of ``min_length``..``max_length`` characters (matching ``pattern``)."""
        value = self._take(name, required)
        if value is None:
            return None
        problem = None
        if not isinstance(value, str):
            problem = "must be a string"
        elif not min_length <= len(value) <= max_length:
            problem = f"must be {min_length}..{max_length} characters"
        elif pattern is not None and not pattern.fullmatch(value):
            problem = "has an invalid format"
        if problem:
            raise KmsError(code, f"Invalid {name}: {problem}.") if code else invalid(name, problem)
        return value

    @overload
    def integer(self, name: str, *, required: Literal[True] = True, low: int, high: int,
                code: str | None = None) -> int: ...

    @overload
    def integer(self, name: str, *, required: bool, low: int, high: int,
                code: str | None = None) -> int | None: ...

    def integer(self, name: str, *, required: bool = True, low: int, high: int,
                code: str | None = None) -> int | None:
        """An integer in ``low..high``, given as a JSON number or a decimal string."""
        value = self._take(name, required)
        if value is None:
            return None
        if isinstance(value, str) and _DECIMAL.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            why = f"must be an integer in {low}..{high}"
            raise KmsError(code, f"Invalid {name}: {why}.") if code else invalid(name, why)
        return value

    @overload
    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = False, default: str) -> str: ...

    @overload
    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = False,
               default: None = None) -> str | None: ...

    def choice(self, name: str, choices: tuple[str, ...], *, required: bool = False,
               default: str | None = None) -> str | None:
        value = self.text(name, required=required, max_length=64)
        if value is None:
            return default
        if value not in choices:
            raise invalid(name, f"must be one of {', '.join(choices)}")
        return value

    def flag(self, name: str, *, default: bool = False) -> bool:
        value = self._take(name, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(name, "must be true or false")
        return value

    def hex(self, name: str, *, max_bytes: int, code: str) -> bytes:
        text = self.text(name, max_length=2 * max_bytes, min_length=2, code=code)
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise KmsError(code, f"Invalid {name}: not hexadecimal.") from None

    @overload
    def base64(self, name: str, *, max_bytes: int, required: Literal[True] = True,
               code: str | None = None) -> bytes: ...

    @overload
    def base64(self, name: str, *, max_bytes: int, required: bool,
               code: str | None = None) -> bytes | None: ...

    def base64(self, name: str, *, max_bytes: int, required: bool = True,
               code: str | None = None) -> bytes | None:
        text = self.text(name, required=required, max_length=4 * ((max_bytes + 2) // 3),
                         code=code)
        if text is None:
            return None
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise (KmsError(code, f"Invalid {name}: not base64.") if code
                   else invalid(name, "not base64")) from None

    def object(self, name: str, *, required: bool = False) -> dict | None:
        value = self._take(name, required)
        if value is not None and not isinstance(value, dict):
            raise invalid(name, "must be a JSON object")
        return value

    def done(self) -> None:
        """Refuse fields nobody asked for (typos must not pass silently)."""
        unknown = sorted(set(self._body) - self._used)
        if unknown:
            raise invalid(unknown[0][:64], "unknown parameter")
