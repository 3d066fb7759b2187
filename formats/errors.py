"""The typed errors every reader in :mod:`formats` raises.

A reader given malformed input raises exactly one of these (never IndexError, struct.error,
MemoryError, ...).  Messages name the offending field and, where there is one, the byte offset.
"""


class FormatError(ValueError):
    """Base class: the input bytes do not follow the format."""


class CborError(FormatError):
    """Bytes that are not one well-formed CBOR data item within the reader's bounds and rules."""


class EifFormatError(FormatError):
    """A malformed enclave image file (header, section table or section headers)."""


class CpioFormatError(FormatError):
    """A malformed or unsafe cpio newc archive, or an entry the writer refuses."""


class CoseError(FormatError):
    """A malformed COSE_Sign1 structure, signature section or PCR payload."""


class SignatureError(Exception):
    """A well-formed signature that does not verify (wrong key, wrong PCR0, invalid certificate)."""
