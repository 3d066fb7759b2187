"""The aws-nitro-enclaves-image-format crate's signer (``nitro-cli sign-eif``), re-done in Python
for tests, from the crate's ``src/utils/eif_signer.rs`` (``EifSigner::write_signature`` and
``update_crc``): independent of qtbuild's writer so that files it makes are what users have.

Replacing an existing signature rewrites the signature section in place (its 12-byte section header
gets the new size), moves later sections and shifts their offsets, but leaves the header's
``section_sizes`` entry for the signature untouched: files re-signed with a signature of another
size carry a stale entry.  The CRC is then recomputed by walking section headers from offset 548
to the end of the file, as the crate's reader does.
"""

from __future__ import annotations

import struct
import zlib

from qtbuild.formats.eif_signature import sign_pcr0

HEADER = struct.Struct(">4sHHQQHH32Q32QII")
SECTION = struct.Struct(">HHQ")
SIGNATURE_TYPE = 4


def crate_sign(path, pcr0: bytes, private_key, certificate_pem: bytes) -> None:
    """Sign the EIF at ``path`` in place as ``nitro-cli sign-eif`` does (PCR0 given by the caller)."""
    crate_write_signature(path, sign_pcr0(pcr0, private_key, certificate_pem))
    crate_update_crc(path)


def crate_write_signature(path, signature: bytes) -> None:
    with open(path, "r+b") as handle:
        data = bytearray(handle.read())
    fields = list(HEADER.unpack_from(data))
    count = fields[6]
    offsets, sizes = fields[7:39], fields[39:71]
    existing = None
    for index in range(count):
        kind, _, size = SECTION.unpack_from(data, offsets[index])
        if kind == SIGNATURE_TYPE:
            existing = (offsets[index], index, size)
            break
    if existing is not None:
        offset, index, old_size = existing
        old_end = offset + SECTION.size + old_size
        remaining = bytes(data[old_end:])
        shift = len(signature) - old_size
        for later in range(index + 1, count):
            offsets[later] += shift
    else:
        offset, remaining = len(data), b""
        offsets[count], sizes[count] = offset, len(signature)
        fields[6] = count + 1
    fields[7:39], fields[39:71] = offsets, sizes
    out = bytearray(data[:offset])
    out[:HEADER.size] = HEADER.pack(*fields)
    out += SECTION.pack(SIGNATURE_TYPE, 0, len(signature)) + signature + remaining
    with open(path, "wb") as handle:
        handle.write(out)


def crate_update_crc(path) -> None:
    with open(path, "r+b") as handle:
        data = handle.read()
        crc = zlib.crc32(data[:HEADER.size - 4])
        position = HEADER.size
        while position + SECTION.size <= len(data):
            _, _, size = SECTION.unpack_from(data, position)
            end = position + SECTION.size + size
            crc = zlib.crc32(data[position:end], crc)
            position = end
        handle.seek(HEADER.size - 4)
        handle.write(struct.pack(">I", crc))
