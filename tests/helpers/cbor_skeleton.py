"""The CBOR skeleton of an attestation document: its structure with the values taken out.

What two documents of the same cloud share and what a dropped quirk changes: major types, the
width of every head's argument (0 = in the initial byte, 1/2/4/8 bytes, "indef"), string
lengths, array and map sizes, key order and map keys (with their widths).  Integer values and
string contents are left out, so documents from different keys and times compare equal.
"""

from __future__ import annotations

import cbor2

_WIDTHS = {24: 1, 25: 2, 26: 4, 27: 8}
_MAJOR = {0: "uint", 1: "nint", 2: "bytes", 3: "text", 4: "array", 5: "map", 6: "tag", 7: "simple"}


class _Walker:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def head(self) -> tuple[str, int | str, int | None]:
        initial = self.data[self.pos]
        self.pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return _MAJOR[major], 0, info
        if info == 31:
            return _MAJOR[major], "indef", None
        width = _WIDTHS[info]
        value = int.from_bytes(self.data[self.pos:self.pos + width], "big")
        self.pos += width
        return _MAJOR[major], width, value

    def item(self, *, keep_value: bool = False) -> tuple:
        kind, width, value = self.head()
        if kind in ("uint", "nint"):
            return (kind, width, value) if keep_value else (kind, width)
        if kind in ("bytes", "text"):
            raw = self.data[self.pos:self.pos + value]
            self.pos += value
            if keep_value:
                return kind, width, raw.decode() if kind == "text" else raw
            return kind, width, value
        if kind == "simple":
            return kind, {20: "false", 21: "true", 22: "null"}.get(value, value)
        if kind == "tag":
            return kind, width, value, self.item()
        items = []
        while self.more(value):
            if kind == "array":
                items.append(self.item())
            else:
                items.append((self.item(keep_value=True), self.item()))
            value = None if value is None else value - 1
        return kind, width, len(items), tuple(items)

    def more(self, remaining: int | None) -> bool:
        if remaining is not None:
            return remaining > 0
        if self.data[self.pos] == 0xFF:
            self.pos += 1
            return False
        return True


def skeleton(data: bytes) -> tuple:
    """The skeleton of one CBOR item filling ``data``."""
    walker = _Walker(bytes(data))
    result = walker.item()
    assert walker.pos == len(data), "trailing bytes"
    return result


def document_skeleton(document: bytes, *, certificate_lengths: bool = False) -> dict:
    """The skeletons of a COSE_Sign1 document's envelope, protected header and payload.

    Certificate DER lengths (leaf and bundle) depend on names and keys, not on the cloud's
    encoding: they are replaced by None (their heads' widths are kept) unless
    ``certificate_lengths``.
    """
    protected, _, payload, _ = cbor2.loads(document)
    envelope = skeleton(document)
    kind, width, count, items = envelope
    envelope = (kind, width, count, (*items[:2], items[2][:2] + (None,), items[3]))
    payload_skeleton = skeleton(payload)
    if not certificate_lengths:
        payload_skeleton = _without_certificate_lengths(payload_skeleton)
    return {"envelope": envelope, "protected": skeleton(protected), "protected_bytes": protected.hex(),
            "payload": payload_skeleton}


def _without_certificate_lengths(payload: tuple) -> tuple:
    kind, width, count, entries = payload
    cleaned = []
    for key, value in entries:
        name = key[2]
        if name == "certificate":
            value = value[:2] + (None,)
        elif name == "cabundle":
            value = value[:3] + (tuple(cert[:2] + (None,) for cert in value[3]),)
        cleaned.append((key, value))
    return kind, width, count, tuple(cleaned)
