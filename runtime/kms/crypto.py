"""The KMS's symmetric cryptography: the master key file, sealing secrets at rest, and the
ciphertext format of encrypt-data / create-datakey.

Master key
    32 random bytes in a file of mode 0600, created (exclusively, fsynced) on first start;
    loading refuses a file readable by group or others, or of the wrong size.  Customer key
    material and principals' secret keys are stored sealed under it:
    ``nonce(12) ‖ AES-256-GCM(master, nonce, secret, aad = "qtbuild-kms/v1/" ‖ context)`` where
    the context names the row (``key:<id>:<version>``, ``principal:<access key>``), so sealed
    values cannot be swapped between rows.

Ciphertext (both APIs; base64 in encrypt-data, hex in the data-key APIs)::

    sealed  = AES-256-GCM(key material, nonce, plaintext, aad = trailer ‖ user AAD)
              (len(plaintext) + 16 bytes: the last 16 are the tag)
    trailer = 100 bytes: "QKMS" ‖ format 0x01 ‖ kind (0x01 data, 0x02 data key) ‖
              key id (36 ASCII, a UUID) ‖ key version (u32 BE) ‖ nonce (12) ‖ 42 zero bytes
    ciphertext = sealed ‖ trailer

The trailer is authenticated, so key id, version and kind cannot be changed; a data-key
ciphertext is refused by decrypt-data and vice versa.  ``len(sealed)`` is what Huawei's
decrypt-datakey calls ``datakey_cipher_length``.
"""

from __future__ import annotations

import os
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.kms.errors import KmsError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
TRAILER_SIZE = 100
MAGIC = b"QKMS"
FORMAT = 1
KIND_DATA, KIND_DATAKEY = 1, 2
_TRAILER = struct.Struct(">4sBB36sI12s42s")
_SEAL_AAD = b"qtbuild-kms/v1/"


class MasterKeyError(Exception):
    """The master key file is missing, unsafe or damaged."""


class MasterKey:
    """The key that seals everything secret in the store."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise MasterKeyError(f"a master key is {KEY_SIZE} bytes, not {len(key)}")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> tuple[MasterKey, bool]:
        """(key, created): the key in ``path``, created with mode 0600 when absent."""
        path = Path(path)
        key = os.urandom(KEY_SIZE)
        try:
            write_atomically(path, key, 0o600, exclusive=True)
        except FileExistsError:
            return cls(_read_private(path)), False
        return cls(key), True

    def seal(self, secret: bytes, context: str) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, secret, _SEAL_AAD + context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        """The sealed secret; MasterKeyError when it does not verify (wrong key or row)."""
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:],
                                      _SEAL_AAD + context.encode())
        except (InvalidTag, ValueError):
            raise MasterKeyError(f"sealed value for {context} does not open") from None


def _read_private(path: Path) -> bytes:
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(f"{path} is accessible by group or others: chmod 600 it")
    data = path.read_bytes()
    if len(data) != KEY_SIZE:
        raise MasterKeyError(f"{path} holds {len(data)} bytes, expected {KEY_SIZE}")
    return data


# --------------------------------------------------------------------------- ciphertexts


@dataclass(frozen=True)
class Header:
    """What a ciphertext's trailer says: kind, key id, key version and GCM nonce."""

    kind: int
    key_id: str
    version: int
    nonce: bytes

    def encode(self) -> bytes:
        return _TRAILER.pack(MAGIC, FORMAT, self.kind, self.key_id.encode("ascii"),
                             self.version, self.nonce, bytes(42))


def encrypt(kind: int, key_id: str, version: int, material: bytes, plaintext: bytes,
            aad: bytes = b"") -> bytes:
    """``sealed ‖ trailer`` of ``plaintext`` under one version of a customer key."""
    header = Header(kind, key_id, version, os.urandom(NONCE_SIZE))
    trailer = header.encode()
    return AESGCM(material).encrypt(header.nonce, plaintext, trailer + aad) + trailer


def parse(ciphertext: bytes, kind: int) -> Header:
    """The trailer of a ciphertext of ``kind``; KMS.2201 when it is not one."""
    if len(ciphertext) < TRAILER_SIZE + TAG_SIZE:
        raise _bad_ciphertext("too short")
    magic, version_format, found_kind, key_id, version, nonce, padding = _TRAILER.unpack(
        ciphertext[-TRAILER_SIZE:])
    if magic != MAGIC or version_format != FORMAT or any(padding):
        raise _bad_ciphertext("not a ciphertext of this KMS")
    if found_kind != kind:
        what = "a data key" if found_kind == KIND_DATAKEY else "not a data key"
        raise _bad_ciphertext(f"the ciphertext is of the wrong kind ({what})")
    return Header(kind, _key_id(key_id), version, nonce)


def decrypt(ciphertext: bytes, header: Header, material: bytes, aad: bytes = b"") -> bytes:
    """The plaintext; KMS.2201 when the tag does not verify (tampering or an AAD mismatch)."""
    trailer = ciphertext[-TRAILER_SIZE:]
    try:
        return AESGCM(material).decrypt(header.nonce, ciphertext[:-TRAILER_SIZE], trailer + aad)
    except InvalidTag:
        raise _bad_ciphertext(
            "it does not verify: wrong additional_authenticated_data, or damaged") from None


def sealed_length(ciphertext: bytes) -> int:
    """The length before the trailer (Huawei's ``datakey_cipher_length``)."""
    return len(ciphertext) - TRAILER_SIZE


def new_key_id() -> str:
    return str(uuid.uuid4())


def is_key_id(text: str) -> bool:
    """Whether ``text`` is a key id: a lower-case, hyphenated UUID."""
    try:
        return len(text) == 36 and str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _key_id(raw: bytes) -> str:
    text = raw.decode("ascii", "replace")
    if not is_key_id(text):
        raise _bad_ciphertext("the embedded key id is malformed")
    return text


def _bad_ciphertext(why: str) -> KmsError:
    return KmsError("KMS.2201", f"Invalid cipher_text: {why}.")
