"""Open the CMS envelope KMS returns to an attested recipient (``ciphertext_recipient`` /
``CiphertextForRecipient``), with only the standard library and ``cryptography`` ≥ 38.

The envelope is a DER or BER ``ContentInfo`` (RFC 5652) holding exactly this shape — anything
else is refused, so the parser stays small and every length is checked before it is used::

    ContentInfo SEQUENCE {
      contentType  OID id-envelopedData (1.2.840.113549.1.7.3)
      content [0] EXPLICIT EnvelopedData SEQUENCE {
        version INTEGER (0 or 2)
        recipientInfos SET { one KeyTransRecipientInfo SEQUENCE {
          version INTEGER (0 or 2)
          rid     issuerAndSerialNumber SEQUENCE | subjectKeyIdentifier [0] IMPLICIT OCTET STRING
          keyEncryptionAlgorithm SEQUENCE { OID rsaes-oaep (1.2.840.113549.1.1.7),
            RSAES-OAEP-params SEQUENCE { [0] sha-256, [1] mgf1(sha-256) } }  -- pSource absent
          encryptedKey OCTET STRING } }
        encryptedContentInfo SEQUENCE {
          contentType OID id-data (1.2.840.113549.1.7.1)
          contentEncryptionAlgorithm SEQUENCE { OID aes256-CBC (2.16.840.1.101.3.4.1.42),
                                                IV OCTET STRING (16 bytes) }
          encryptedContent [0] IMPLICIT OCTET STRING (primitive) } } }

No originatorInfo, no unprotectedAttrs, no trailing bytes; hash AlgorithmIdentifiers may carry
NULL parameters or none.  BER as AWS KMS writes it (aws-nitro-enclaves-sdk-c's test vector) is
accepted: indefinite lengths on constructed elements (closed by end-of-contents), non-minimal
definite lengths, and octet strings (encryptedKey, the IV, encryptedContent) in constructed
form, their segments concatenated; nesting is bounded.  The content key is
RSAES-OAEP (SHA-256, MGF1-SHA-256, empty label) encrypted and must be 32 bytes; the content is
AES-256-CBC with PKCS#7 padding.  Every failure raises :class:`EnvelopeError` (a ValueError).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Largest envelope accepted (the KMS's largest plaintext is 4096 bytes).
MAX_ENVELOPE_SIZE = 64 * 1024
CONTENT_KEY_SIZE = 32
IV_SIZE = 16

OID_ENVELOPED_DATA = "1.2.840.113549.1.7.3"
OID_DATA = "1.2.840.113549.1.7.1"
OID_RSAES_OAEP = "1.2.840.113549.1.1.7"
OID_MGF1 = "1.2.840.113549.1.1.8"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_AES256_CBC = "2.16.840.1.101.3.4.1.42"

SEQUENCE, SET, INTEGER, OCTET_STRING, OID, NULL = 0x30, 0x31, 0x02, 0x04, 0x06, 0x05
CONTEXT_0, CONTEXT_1 = 0xA0, 0xA1          # constructed, context-specific
IMPLICIT_0 = 0x80                          # primitive, context-specific [0]
CONSTRUCTED = 0x20
#: Deepest BER nesting followed (indefinite lengths, constructed strings); the shape needs 6.
MAX_NESTING = 16


class EnvelopeError(ValueError):
    """The envelope is malformed, of an unsupported shape, or does not open with this key."""


def open_envelope(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext of a KMS recipient envelope, decrypted with ``private_key``."""
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise TypeError("the recipient key must be an RSA private key")
    envelope = parse_envelope(data)
    content_key = _unwrap_key(envelope.encrypted_key, private_key)
    return _decrypt_content(content_key, envelope.iv, envelope.encrypted_content)


class Envelope:
    """The parts of a parsed envelope the opener needs."""

    __slots__ = ("encrypted_content", "encrypted_key", "iv", "recipient_id")

    def __init__(self, recipient_id: bytes, encrypted_key: bytes, iv: bytes,
                 encrypted_content: bytes) -> None:
        self.recipient_id = recipient_id
        self.encrypted_key = encrypted_key
        self.iv = iv
        self.encrypted_content = encrypted_content


def parse_envelope(data: bytes) -> Envelope:
    """Check the structure above and return its parts (EnvelopeError otherwise)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"an envelope is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_ENVELOPE_SIZE:
        raise EnvelopeError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_SIZE}")
    content_info = _Reader(data).last(SEQUENCE, "ContentInfo")
    _expect_oid(content_info, OID_ENVELOPED_DATA, "ContentInfo.contentType")
    enveloped = content_info.last(CONTEXT_0, "ContentInfo.content").last(
        SEQUENCE, "EnvelopedData")
    _expect_version(enveloped, (0, 2), "EnvelopedData.version")
    recipients = enveloped.next(SET, "EnvelopedData.recipientInfos")
    recipient = recipients.last(SEQUENCE, "KeyTransRecipientInfo (exactly one)")
    content = enveloped.last(SEQUENCE, "EncryptedContentInfo")
    recipient_id, encrypted_key = _key_transport(recipient)
    iv, encrypted_content = _content(content)
    return Envelope(recipient_id, encrypted_key, iv, encrypted_content)


def _key_transport(info: _Reader) -> tuple[bytes, bytes]:
    _expect_version(info, (0, 2), "KeyTransRecipientInfo.version")
    tag, recipient_id = info.any(("KeyTransRecipientInfo.rid", (SEQUENCE, IMPLICIT_0, IMPLICIT_0 | CONSTRUCTED)))
    if tag == IMPLICIT_0 | CONSTRUCTED:
        recipient_id = _segments(recipient_id, "KeyTransRecipientInfo.rid", 0)
    algorithm = info.next(SEQUENCE, "keyEncryptionAlgorithm")
    _expect_oid(algorithm, OID_RSAES_OAEP, "keyEncryptionAlgorithm")
    _check_oaep_params(algorithm.last(SEQUENCE, "RSAES-OAEP-params"))
    encrypted_key = info.last_string(OCTET_STRING, "encryptedKey")
    return recipient_id, encrypted_key


def _check_oaep_params(params: _Reader) -> None:
    """[0] hashAlgorithm sha-256, [1] maskGenAlgorithm mgf1(sha-256), nothing else."""
    _expect_digest(params.next(CONTEXT_0, "hashAlgorithm").last(SEQUENCE, "hashAlgorithm"),
                   "hashAlgorithm")
    mask = params.last(CONTEXT_1, "maskGenAlgorithm").last(SEQUENCE, "maskGenAlgorithm")
    _expect_oid(mask, OID_MGF1, "maskGenAlgorithm")
    _expect_digest(mask.last(SEQUENCE, "MGF1 hash"), "MGF1 hash")


def _content(info: _Reader) -> tuple[bytes, bytes]:
    _expect_oid(info, OID_DATA, "EncryptedContentInfo.contentType")
    algorithm = info.next(SEQUENCE, "contentEncryptionAlgorithm")
    _expect_oid(algorithm, OID_AES256_CBC, "contentEncryptionAlgorithm")
    iv = algorithm.last_string(OCTET_STRING, "AES-CBC IV")
    if len(iv) != IV_SIZE:
        raise EnvelopeError(f"AES-CBC IV of {len(iv)} bytes, expected {IV_SIZE}")
    encrypted = info.last_string(IMPLICIT_0, "encryptedContent")
    if not encrypted or len(encrypted) % 16:
        raise EnvelopeError(f"encryptedContent of {len(encrypted)} bytes is not whole AES blocks")
    return iv, encrypted


def _expect_oid(reader: _Reader, expected: str, what: str) -> None:
    found = decode_oid(reader.next_value(OID, what))
    if found != expected:
        raise EnvelopeError(f"{what} is {found}, expected {expected}")


def _expect_digest(algorithm: _Reader, what: str) -> None:
    _expect_oid(algorithm, OID_SHA256, what)
    if not algorithm.at_end() and algorithm.last_value(NULL, f"{what} parameters") != b"":
        raise EnvelopeError(f"{what} parameters are not NULL")


def _expect_version(reader: _Reader, allowed: tuple[int, ...], what: str) -> None:
    raw = reader.next_value(INTEGER, what)
    if len(raw) != 1 or raw[0] not in allowed:
        raise EnvelopeError(f"{what} is not one of {allowed}")


def _unwrap_key(encrypted_key: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    oaep = asymmetric_padding.OAEP(
        mgf=asymmetric_padding.MGF1(algorithm=hashes.SHA256()),
        algorithm=hashes.SHA256(),
        label=None,
    )
    try:
        key = private_key.decrypt(encrypted_key, oaep)
    except ValueError:
        raise EnvelopeError("the content key does not decrypt with this private key") from None
    if len(key) != CONTENT_KEY_SIZE:
        raise EnvelopeError(f"content key of {len(key)} bytes, expected {CONTENT_KEY_SIZE}")
    return key


def _decrypt_content(key: bytes, iv: bytes, encrypted: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(encrypted) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise EnvelopeError("the content's padding is invalid") from None


# --------------------------------------------------------------------------- DER / BER reading


def _header(data: bytes, offset: int, what: str) -> tuple[int, int | None, int]:
    """(tag, content length or None for indefinite, content offset) of the element at ``offset``."""
    if len(data) - offset < 2:
        raise EnvelopeError(f"{what}: truncated")
    tag, first = data[offset], data[offset + 1]
    offset += 2
    if tag & 0x1F == 0x1F:
        raise EnvelopeError(f"{what}: multi-byte tags are not used here")
    if first < 0x80:
        return tag, first, offset
    count = first & 0x7F
    if count == 0:
        if not tag & CONSTRUCTED:
            raise EnvelopeError(f"{what}: indefinite length on a primitive element")
        return tag, None, offset
    if count > 4 or len(data) - offset < count:
        raise EnvelopeError(f"{what}: bad length")
    length = int.from_bytes(data[offset:offset + count], "big")
    offset += count
    if len(data) - offset < length:
        raise EnvelopeError(f"{what}: length {length} runs past the end")
    return tag, length, offset


def _element_end(data: bytes, offset: int, what: str, depth: int) -> tuple[int, int, int, int]:
    """(tag, content start, content end, next offset) of the element at ``offset``; an
    indefinite-length element ends at its matching end-of-contents (00 00)."""
    tag, length, start = _header(data, offset, what)
    if length is not None:
        return tag, start, start + length, start + length
    if depth >= MAX_NESTING:
        raise EnvelopeError(f"{what}: nested deeper than {MAX_NESTING}")
    position = start
    while True:
        if data[position:position + 2] == b"\x00\x00":
            return tag, start, position, position + 2
        if position >= len(data):
            raise EnvelopeError(f"{what}: indefinite length without end-of-contents")
        position = _element_end(data, position, what, depth + 1)[3]


def _segments(data: bytes, what: str, depth: int) -> bytes:
    """The concatenated OCTET STRING segments of a constructed string's contents."""
    if depth >= MAX_NESTING:
        raise EnvelopeError(f"{what}: nested deeper than {MAX_NESTING}")
    reader, parts = _Reader(data, depth + 1), []
    while not reader.at_end():
        tag, value = reader.any((what, (OCTET_STRING, OCTET_STRING | CONSTRUCTED)))
        parts.append(value if tag == OCTET_STRING else _segments(value, what, depth + 1))
    return b"".join(parts)


class _Reader:
    """Sequential reader over the contents of one DER/BER element (strict, bounded).

    ``next*`` read the following element with the expected tag; ``last*`` also require it to
    be the final one, so on a fresh reader they accept exactly one element.
    """

    __slots__ = ("_data", "_depth", "_offset")

    def __init__(self, data: bytes, depth: int = 0) -> None:
        self._data, self._offset, self._depth = data, 0, depth

    def at_end(self) -> bool:
        return self._offset == len(self._data)

    def _element(self, what: str) -> tuple[int, bytes]:
        tag, start, end, after = _element_end(self._data, self._offset, what, self._depth)
        self._offset = after
        return tag, self._data[start:end]

    def any(self, spec: tuple[str, tuple[int, ...]]) -> tuple[int, bytes]:
        what, tags = spec
        tag, value = self._element(what)
        if tag not in tags:
            raise EnvelopeError(f"{what}: unexpected tag 0x{tag:02x}")
        return tag, value

    def next_value(self, tag: int, what: str) -> bytes:
        return self.any((what, (tag,)))[1]

    def next(self, tag: int, what: str) -> _Reader:
        return _Reader(self.next_value(tag, what), self._depth + 1)

    def last_value(self, tag: int, what: str) -> bytes:
        value = self.next_value(tag, what)
        if not self.at_end():
            raise EnvelopeError(f"unexpected data after {what}")
        return value

    def last(self, tag: int, what: str) -> _Reader:
        return _Reader(self.last_value(tag, what), self._depth + 1)

    def last_string(self, tag: int, what: str) -> bytes:
        """A final string element, primitive (``tag``) or constructed from segments (BER)."""
        found, value = self.any((what, (tag, tag | CONSTRUCTED)))
        if not self.at_end():
            raise EnvelopeError(f"unexpected data after {what}")
        return value if found == tag else _segments(value, what, self._depth)


def decode_oid(raw: bytes) -> str:
    """Dotted text of a DER OBJECT IDENTIFIER's contents (EnvelopeError when malformed)."""
    if not raw or len(raw) > 32 or raw[-1] & 0x80:
        raise EnvelopeError("malformed OBJECT IDENTIFIER")
    arcs, value = [], 0
    for index, byte in enumerate(raw):
        if value == 0 and byte == 0x80 and (index == 0 or not raw[index - 1] & 0x80):
            raise EnvelopeError("non-minimal OBJECT IDENTIFIER arc")
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(arc) for arc in (first, arcs[0] - 40 * first, *arcs[1:]))
