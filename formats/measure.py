"""Enclave image measurements: the SHA-384 PCRs of an EIF and the shapes they are printed in.

Definitions (aws-nitro-enclaves-image-format ``get_pcrs``; QingTian uses the same):

    extend(d) = SHA384(48 zero bytes ‖ d)
    PCR0 = extend(SHA384(kernel ‖ cmdline ‖ ramdisk0 ‖ ramdisk1 ‖ …))   whole image
    PCR1 = extend(SHA384(kernel ‖ cmdline ‖ ramdisk0))                  kernel + bootstrap
    PCR2 = extend(SHA384(ramdisk1 ‖ ramdisk2 ‖ …))                      application
    PCR8 = extend(SHA384(DER(signing certificate)))                     signed images only

Only section *data* is hashed, in file order; section headers, the metadata section and the
signature section never are.  :class:`PcrHashers` consumes sections while they stream, so a
multi-gigabyte ramdisk is measured without being held in memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from qtbuild.formats.errors import FormatError

PCR_SIZE = 48
ZERO_PCR = bytes(PCR_SIZE)
HASH_ALGORITHM = "SHA384"
#: nitro-cli prints ``format!("{:?}", Sha384::new())`` as the algorithm name.
NITRO_HASH_ALGORITHM = "Sha384 { ... }"


def extend(digest: bytes, pcr: bytes = ZERO_PCR) -> bytes:
    """Return the PCR value after extending ``pcr`` with ``digest``: SHA384(pcr ‖ digest)."""
    return hashlib.sha384(pcr + digest).digest()


def measure_bytes(data: bytes) -> bytes:
    """extend(SHA384(data)) from a zero PCR: how a single blob is measured."""
    return extend(hashlib.sha384(data).digest())


#: PCR2 of an image with no customer ramdisk bytes: extend(SHA384(b"")).
EMPTY_PCR2 = measure_bytes(b"")


def pcr8_from_der(certificate_der: bytes) -> bytes:
    """PCR8 for a signing certificate given in DER form."""
    return measure_bytes(certificate_der)


@dataclass(frozen=True)
class Measurements:
    """PCR values of an image (48 raw bytes each); ``pcr8`` is None for unsigned images."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None

    def as_hex(self) -> dict[str, str]:
        """{"PCR0": hex, "PCR1": hex, "PCR2": hex[, "PCR8": hex]}."""
        out = {"PCR0": self.pcr0.hex(), "PCR1": self.pcr1.hex(), "PCR2": self.pcr2.hex()}
        if self.pcr8 is not None:
            out["PCR8"] = self.pcr8.hex()
        return out

    def nitro(self) -> dict:
        """nitro-cli build-enclave's shape: ``{"Measurements": {"HashAlgorithm", PCR0.. [PCR8]}}``."""
        return {"Measurements": {"HashAlgorithm": NITRO_HASH_ALGORITHM, **self.as_hex()}}

    def qingtian(self, *, with_pcr1_pcr2: bool = False) -> dict:
        """``qt enclave make-img``'s shape: ``{"digest", "PCR0"[, "PCR1", "PCR2"], "PCR8"}``.

        PCR8 is 96 zeros when the image is unsigned, as qt prints it.  ``with_pcr1_pcr2`` adds
        the bootstrap and application PCRs (``qtbuild convert`` prints them; pipelines compare
        them), in the order qt would print them.
        """
        hexes = self.as_hex()
        out = {"digest": HASH_ALGORITHM, "PCR0": hexes["PCR0"]}
        if with_pcr1_pcr2:
            out["PCR1"] = hexes["PCR1"]
            out["PCR2"] = hexes["PCR2"]
        out["PCR8"] = hexes.get("PCR8", ZERO_PCR.hex())
        return out


def format_json(document: dict, style: str) -> str:
    """Serialise an output document: ``nitro`` is 2-space pretty with sorted keys like nitro-cli."""
    if style == "nitro":
        return json.dumps(document, indent=2, sort_keys=True)
    return json.dumps(document, indent=2)


_HEX_DIGITS = frozenset("0123456789abcdef")


def parse_pcr_hex(value: str, name: str = "PCR") -> bytes:
    """Parse a 96-hex-digit PCR value, raising FormatError that names ``name`` when it is not one."""
    text = value.strip().lower()
    if len(text) != 2 * PCR_SIZE:
        raise FormatError(f"{name} must be {2 * PCR_SIZE} hex digits, got {len(text)}")
    # bytes.fromhex alone would skip blanks inside the value and read 96 characters as fewer bytes
    if not _HEX_DIGITS.issuperset(text):
        raise FormatError(f"{name} is not hexadecimal: {value[:100]!r}")
    return bytes.fromhex(text)


class PcrHashers:
    """Running SHA-384 states for PCR0/1/2 while an image's sections stream past in file order.

    Call :meth:`targets` once per section to learn which hash objects its data feeds, update
    them with every chunk, then :meth:`finish`.  Exposing the hash objects (instead of an
    ``update`` method) lets the EIF writer and reader spread the two SHA-384 passes a ramdisk
    needs over two threads; hashlib releases the GIL for large updates.
    """

    MEASURED = frozenset({"kernel", "cmdline", "ramdisk"})

    def __init__(self) -> None:
        self.image = hashlib.sha384()
        self.bootstrap = hashlib.sha384()
        self.application = hashlib.sha384()
        self._ramdisks_seen = 0

    def targets(self, kind: str) -> list:
        """Hash objects that the data of the next section of ``kind`` goes into, PCR0's first.

        ``kind`` is the section type name (kernel, cmdline, ramdisk, metadata, signature);
        unmeasured kinds return an empty list.
        """
        if kind in ("kernel", "cmdline"):
            return [self.image, self.bootstrap]
        if kind == "ramdisk":
            self._ramdisks_seen += 1
            second = self.bootstrap if self._ramdisks_seen == 1 else self.application
            return [self.image, second]
        return []

    def finish(self, certificate_der: bytes | None = None) -> Measurements:
        """Final PCR values; PCR8 is set when the signing certificate's DER is given."""
        return Measurements(
            pcr0=extend(self.image.digest()),
            pcr1=extend(self.bootstrap.digest()),
            pcr2=extend(self.application.digest()),
            pcr8=pcr8_from_der(certificate_der) if certificate_der is not None else None,
        )
