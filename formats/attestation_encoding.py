"""The byte-level shape of each cloud's attestation documents: how a payload is written and signed.

Both clouds write an untagged COSE_Sign1 ``[bstr(protected), {}, bstr(payload), bstr(r ‖ s)]``
(ES384) over the same nine payload keys (:mod:`qtbuild.formats.attestation`), but with
different CBOR, measured on real documents (``docs/attestation-shapes.md``)::

                       QingTian                          Nitro
    protected header   a1 1a00000001 3a00000022          a1 01 38 22
                       ({1: -35}, 4-byte integer heads)  ({1: -35}, minimal)
    signature r ‖ s    each half 48 bytes little-endian  big-endian
    payload map        definite (0xa9)                   indefinite (0xbf … 0xff)
    key order          module_id timestamp digest pcrs   module_id digest timestamp pcrs
                       certificate cabundle user_data    certificate cabundle public_key
                       nonce public_key                  user_data nonce
    timestamp          8-byte uint (0x1b)                8-byte uint (0x1b)
    PCR map keys       2-byte uint heads (19 00 0N)      minimal
    absent user_data   empty byte string (0x40)          null
    absent nonce/key   null                              null

:data:`ENCODINGS` names them; :func:`identify` tells which shape a received document has (the
verifier reports it).  Everything here is pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from qtbuild.formats.attestation import NITRO_KEY_ORDER, PAYLOAD_KEYS, AttestationDocument
from qtbuild.formats.cose import CoseSign1, der_to_raw, sig_structure
from qtbuild.formats.errors import SignatureError

ES384_COMPONENT = 48
_BREAK = b"\xff"


@dataclass(frozen=True)
class DocumentEncoding:
    """How one cloud writes a document (see the module docstring for the two instances)."""

    name: str
    protected: bytes
    key_order: tuple[str, ...]
    indefinite_map: bool
    #: Bytes after the head of each PCR index: 0 = minimal, 2 = ``0x19 00 0N``.
    pcr_key_width: Literal[0, 2]
    #: Whether an absent user_data is written as an empty byte string (else null).
    empty_user_data: bool
    signature_byteorder: Literal["big", "little"]

    def encode_payload(self, doc: AttestationDocument) -> bytes:
        """The payload bytes of ``doc`` in this shape (``doc.key_order`` is ignored)."""
        if not 0 <= doc.timestamp < 1 << 64:
            raise ValueError(f"timestamp out of range: {doc.timestamp}")
        user_data = doc.user_data
        if user_data is None and self.empty_user_data:
            user_data = b""
        values = {
            "module_id": cbor2.dumps(doc.module_id),
            "timestamp": b"\x1b" + doc.timestamp.to_bytes(8, "big"),
            "digest": cbor2.dumps(doc.digest),
            "pcrs": self._pcrs(doc.pcrs),
            "certificate": cbor2.dumps(bytes(doc.certificate)),
            "cabundle": cbor2.dumps([bytes(cert) for cert in doc.cabundle]),
            "user_data": cbor2.dumps(user_data),
            "nonce": cbor2.dumps(doc.nonce),
            "public_key": cbor2.dumps(doc.public_key),
        }
        body = b"".join(cbor2.dumps(key) + values[key] for key in self.key_order)
        if self.indefinite_map:
            return b"\xbf" + body + _BREAK
        return bytes([0xA0 + len(self.key_order)]) + body

    def _pcrs(self, pcrs: dict[int, bytes]) -> bytes:
        entries = sorted(pcrs.items())
        return _head(5, len(entries)) + b"".join(
            _uint(index, self.pcr_key_width) + cbor2.dumps(bytes(value)) for index, value in entries
        )

    def sign(self, doc: AttestationDocument, private_key: object) -> bytes:
        """The untagged COSE_Sign1 of ``doc`` signed with a P-384 key, in this shape.

        SignatureError for any other kind of key.  ECDSA is randomized: two calls differ.
        """
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name != "secp384r1":
            raise SignatureError("attestation documents are signed with a P-384 (ES384) key")
        payload = self.encode_payload(doc)
        der = private_key.sign(sig_structure(self.protected, payload), ec.ECDSA(hashes.SHA384()))
        raw = der_to_raw(der, ES384_COMPONENT)
        if self.signature_byteorder == "little":
            raw = raw[:ES384_COMPONENT][::-1] + raw[ES384_COMPONENT:][::-1]
        return b"\x84" + cbor2.dumps(self.protected) + b"\xa0" + cbor2.dumps(payload) + cbor2.dumps(raw)


def _head(major: int, value: int) -> bytes:
    """The minimal CBOR head of ``major`` with argument ``value``."""
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 24:
            return bytes([major << 5 | value])
        if value < 1 << (8 * width):
            return bytes([major << 5 | info]) + value.to_bytes(width, "big")
    raise ValueError(f"CBOR argument out of range: {value}")


def _uint(value: int, width: int) -> bytes:
    """An unsigned integer: minimal for width 0, else with ``width`` argument bytes."""
    if width == 0:
        return _head(0, value)
    info = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([info]) + value.to_bytes(width, "big")


QINGTIAN = DocumentEncoding(
    name="qingtian",
    protected=bytes.fromhex("a11a000000013a00000022"),
    key_order=PAYLOAD_KEYS,
    indefinite_map=False,
    pcr_key_width=2,
    empty_user_data=True,
    signature_byteorder="little",
)
NITRO = DocumentEncoding(
    name="nitro",
    protected=bytes.fromhex("a1013822"),
    key_order=NITRO_KEY_ORDER,
    indefinite_map=True,
    pcr_key_width=0,
    empty_user_data=False,
    signature_byteorder="big",
)
ENCODINGS = {encoding.name: encoding for encoding in (QINGTIAN, NITRO)}


def identify(message: CoseSign1) -> str:
    """The cloud whose document shape ``message`` has ("qingtian", "nitro"), else "generic".

    Decided by the protected header's bytes and the payload map's head, which differ between
    the two; a document in neither shape (e.g. from an older local module) is "generic".
    """
    head = message.payload[:1]
    for encoding in ENCODINGS.values():
        expected_head = b"\xbf" if encoding.indefinite_map else bytes([0xA0 + len(encoding.key_order)])
        if message.protected == encoding.protected and head == expected_head:
            return encoding.name
    return "generic"
