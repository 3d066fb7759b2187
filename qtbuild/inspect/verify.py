"""`qtbuild verify`: check an image's structure, CRC, signature and PCRs against expectations.

Expected values come from ``--pcrN`` options and/or an ``--expect`` file holding any of the
measurement documents the tools print: ``qtbuild convert``/``measure``/``qt enclave make-img``
(``{"digest": "SHA384", "PCR0": …, "PCR8": …}``; PCR8 of 96 zeros means "unsigned"),
``nitro-cli build-enclave`` / ``qtbuild convert --format nitro`` (``{"Measurements": {…}}``) and
``describe`` output (which also has ``Measurements``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qtbuild.formats.bounded_input import load_json, read_bounded
from qtbuild.formats.eif import EifReader
from qtbuild.formats.errors import FormatError
from qtbuild.formats.measure import ZERO_PCR, parse_pcr_hex
from qtbuild.inspect.describe import inspect_image

PCR_NAMES = ("PCR0", "PCR1", "PCR2", "PCR8")
MAX_EXPECT_FILE = 1 << 20


@dataclass(frozen=True)
class Check:
    """One verification step; ``ok`` is None when the step did not apply."""

    name: str
    ok: bool | None
    detail: str

    def as_json(self) -> dict:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=dict)
    #: Readable but worth fixing (e.g. a stale signature size entry; ``verify --repair`` fixes it).
    warnings: list[str] = field(default_factory=list)
    #: The certificate the image is signed with (None when unsigned or unreadable).
    signing_certificate: x509.Certificate | None = None

    @property
    def valid(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    def as_json(self) -> dict:
        checks = [check.as_json() for check in self.checks]
        document = {"Valid": self.valid, "Measurements": self.measurements, "Checks": checks}
        if self.warnings:
            document["Warnings"] = list(self.warnings)
        return document


def load_expected(path: str | os.PathLike) -> dict[str, bytes]:
    """Expected PCRs from a measurements document (see the module docstring)."""
    too_large = FormatError(f"{path}: larger than {MAX_EXPECT_FILE} bytes; not a measurements document")
    with open(path, "rb") as handle:
        raw = read_bounded(handle, MAX_EXPECT_FILE, too_large)
    document = load_json(raw, what=str(path))
    if isinstance(document, dict) and isinstance(document.get("Measurements"), dict):
        document = document["Measurements"]
    if not isinstance(document, dict):
        raise FormatError(f"{path}: not a measurements document (expected a JSON object with PCR0…)")
    expected = {name: parse_pcr_hex(document[name], f"{path}: {name}")
                for name in PCR_NAMES if isinstance(document.get(name), str)}
    if not expected:
        raise FormatError(f"{path}: no PCR0/PCR1/PCR2/PCR8 values found")
    return expected


def load_certificate(path: str | os.PathLike) -> x509.Certificate:
    """The first certificate of a PEM file (FormatError if there is none)."""
    from qtbuild.formats.eif_signature import first_certificate

    too_large = FormatError(f"{path}: larger than {MAX_EXPECT_FILE} bytes; not a PEM file")
    with open(path, "rb") as handle:
        data = read_bounded(handle, MAX_EXPECT_FILE, too_large)
    return first_certificate(data)


def verify_eif(
    reader: EifReader,
    *,
    expected: dict[str, bytes] | None = None,
    certificate: x509.Certificate | None = None,
    at: datetime | None = None,
) -> VerifyReport:
    """Run every check; the report says which held (a malformed image raises FormatError first)."""
    expected = expected or {}
    facts = inspect_image(reader, at=at)
    actual = facts.check.measurements
    report = VerifyReport(measurements=actual.as_hex(),
                          signing_certificate=facts.signature.certificate if facts.signature else None)
    structure = f"EIF v{reader.header.version}, {len(reader.sections)} sections"
    structure += "" if reader.contiguous else " (non-contiguous)"
    if reader.defects:
        report.checks.append(Check("structure", False, f"{structure}: {'; '.join(reader.defects)}"))
    else:
        report.checks.append(Check("structure", True, structure))
    if reader.stale_signature_size is not None:
        report.warnings.append(next(note for note in reader.notes if "is stale" in note))
    crc = facts.check
    report.checks.append(Check("crc", crc.crc_ok, f"header 0x{crc.header_crc:08x}, computed 0x{crc.computed_crc:08x}"))
    report.checks.append(_signature_check(reader, facts, certificate, expected))
    if certificate is not None:
        report.checks.append(_certificate_check(facts, certificate))
    for name in PCR_NAMES:
        if name in expected:
            report.checks.append(_pcr_check(name, expected[name], getattr(actual, name.lower())))
    return report


def _signature_check(reader, facts, certificate, expected) -> Check:
    if not reader.is_signed:
        wants_signature = certificate is not None or expected.get("PCR8", ZERO_PCR) != ZERO_PCR
        return Check("signature", False if wants_signature else None, "the image is not signed")
    if facts.signature_problem:
        return Check("signature", False, facts.signature_problem)
    return Check("signature", True, "COSE_Sign1 over PCR0 verifies; certificate valid")


def _certificate_check(facts, certificate: x509.Certificate) -> Check:
    if facts.signature is None:
        return Check("certificate", False, "no signing certificate in the image")
    given = certificate.public_bytes(serialization.Encoding.DER)
    stored = facts.signature.certificate.public_bytes(serialization.Encoding.DER)
    if given != stored:
        signer = facts.signature.certificate.subject.rfc4514_string()
        return Check("certificate", False, f"the image was signed by {signer}, "
                                           f"not by the given certificate {certificate.subject.rfc4514_string()}")
    return Check("certificate", True, "signed by the given certificate")


def _pcr_check(name: str, wanted: bytes, actual: bytes | None) -> Check:
    value = actual if actual is not None else ZERO_PCR
    if value == wanted:
        return Check(name, True, value.hex())
    return Check(name, False, f"expected {wanted.hex()}, image has {value.hex()}")
