"""`qtbuild describe`: what an EIF contains, in nitro-cli ``describe-eif``'s shape.

Every measurement is recomputed from the section bytes in one streaming pass; nothing is taken
from the metadata section.  Keys nitro-cli prints come first and keep its names; qtbuild adds
``Architecture``, ``Sections`` (type, offset, size, SHA-384 of each) and, when there is
something to say, ``Defects`` (what makes ``verify`` fail: trailing data, a wrong
``num_sections``), ``Notes`` and ``SignatureError``/``MetadataError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qtbuild.formats.eif import MAX_SIGNATURE_SIZE, EifReader, SectionType, StreamCheck
from qtbuild.formats.eif_metadata import MAX_METADATA_SIZE, parse_metadata
from qtbuild.formats.eif_signature import SignatureInfo, load_signature, verify_signature
from qtbuild.formats.errors import FormatError, SignatureError
from qtbuild.formats.local_abi import MAX_DESCRIPTOR, RUNS_ONLY_LOCALLY, parse_local_kernel


@dataclass(frozen=True)
class ImageFacts:
    """Everything `describe` (and later `verify`) learns from one pass over an image."""

    check: StreamCheck
    signature: SignatureInfo | None
    signature_problem: str | None
    metadata: dict | None
    metadata_problem: str | None


def inspect_image(reader: EifReader, *, at: datetime | None = None) -> ImageFacts:
    """Decode signature and metadata, recompute PCRs/CRC, and check the signature at ``at``."""
    signature, signature_problem = _load_signature(reader)
    certificate_der = (
        signature.certificate.public_bytes(serialization.Encoding.DER) if signature is not None else None
    )
    check = reader.check_stream(certificate_der=certificate_der)
    if signature is not None:
        try:
            verify_signature(signature, check.measurements.pcr0, at=at)
        except SignatureError as exc:
            signature_problem = str(exc)
    metadata, metadata_problem = _load_metadata(reader)
    return ImageFacts(check, signature, signature_problem, metadata, metadata_problem)


def _load_signature(reader: EifReader) -> tuple[SignatureInfo | None, str | None]:
    section = reader.signature_section
    if section is None:
        return None, None
    try:
        return load_signature(reader.read_section(section, max_size=MAX_SIGNATURE_SIZE)), None
    except FormatError as exc:
        return None, f"signature section is malformed: {exc}"


def _load_metadata(reader: EifReader) -> tuple[dict | None, str | None]:
    section = reader.metadata_section
    if section is None:
        return None, None
    try:
        return parse_metadata(reader.read_section(section, max_size=MAX_METADATA_SIZE)), None
    except FormatError as exc:
        return None, str(exc)


def describe_eif(reader: EifReader, *, at: datetime | None = None) -> dict:
    """The ``describe`` document for an open image."""
    facts = inspect_image(reader, at=at)
    document: dict = {
        "EifVersion": reader.header.version,
        "Measurements": facts.check.measurements.nitro()["Measurements"],
        "IsSigned": reader.is_signed,
    }
    if facts.signature is not None:
        document["SigningCertificate"] = certificate_info(facts.signature.certificate)
    document["CheckCRC"] = facts.check.crc_ok
    if reader.is_signed:
        document["SignatureCheck"] = facts.signature_problem is None
    if facts.signature_problem:
        document["SignatureError"] = facts.signature_problem
    if facts.metadata is not None:
        document.update(_metadata_fields(facts.metadata))
    if facts.metadata_problem:
        document["MetadataError"] = facts.metadata_problem
    document["Architecture"] = reader.arch
    document["BootProfile"] = boot_profile(reader)
    document["Sections"] = [
        {"Index": s.index, "Type": s.type.label, "Offset": s.offset, "Size": s.size, "Sha384": digest.hex()}
        for s, digest in zip(reader.sections, facts.check.section_sha384, strict=True)
    ]
    if reader.defects:
        document["Defects"] = list(reader.defects)
    notes = list(reader.notes)
    if document["BootProfile"] == "local":
        notes.insert(0, RUNS_ONLY_LOCALLY)
    if notes:
        document["Notes"] = notes
    return document


#: The keys ``nitro-cli describe-eif`` prints (its ``EifDescribeInfo``), in its order.
NITRO_DESCRIBE_KEYS = ("EifVersion", "Measurements", "IsSigned", "SigningCertificate", "CheckCRC", "SignatureCheck",
                       "ImageName", "ImageVersion", "Metadata")


def nitro_describe(document: dict) -> dict:
    """Exactly nitro-cli describe-eif's document: ``describe_eif``'s without qtbuild's additions."""
    return {key: document[key] for key in NITRO_DESCRIBE_KEYS if key in document}


def boot_profile(reader: EifReader) -> str:
    """``local`` when the kernel section is the local-runtime descriptor, else ``kernel``."""
    kernel = reader.sections_of(SectionType.KERNEL)[0]
    if kernel.size > MAX_DESCRIPTOR:
        return "kernel"
    return "local" if parse_local_kernel(reader.read_section(kernel, max_size=MAX_DESCRIPTOR)) else "kernel"


def qingtian_measurements(reader: EifReader) -> dict:
    """``{"digest": "SHA384", "PCR0", "PCR8"}`` as QingTian tools print it (PCR8 zeros unsigned)."""
    facts = inspect_image(reader)
    return facts.check.measurements.qingtian()


def _metadata_fields(metadata: dict) -> dict:
    """ImageName, ImageVersion and Metadata as nitro-cli prints them (custom keys flattened)."""
    fields: dict = {}
    for key in ("ImageName", "ImageVersion"):
        if key in metadata:
            fields[key] = metadata[key]
    build = metadata.get("BuildMetadata") or {}
    keys = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")
    described = {key: build[key] for key in keys if key in build}
    described["DockerInfo"] = metadata.get("DockerInfo")
    custom = metadata.get("CustomMetadata")
    if isinstance(custom, dict):
        described.update(custom)
    elif custom is not None:
        described["CustomMetadata"] = custom
    fields["Metadata"] = described
    return fields


def certificate_info(certificate: x509.Certificate) -> dict:
    """nitro-cli's ``SigningCertificate``: issuer (OpenSSL long names), algorithm, validity, signature."""
    issuer = {}
    for attribute in certificate.issuer:
        name = getattr(attribute.oid, "_name", None) or attribute.oid.dotted_string
        issuer[name] = attribute.value if isinstance(attribute.value, str) else attribute.value.hex()
    oid = certificate.signature_algorithm_oid
    algorithm = getattr(oid, "_name", None) or oid.dotted_string
    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": algorithm,
        "NotBefore": _openssl_time(_not_before(certificate)),
        "NotAfter": _openssl_time(_not_after(certificate)),
        "Signature": ":".join(f"{byte:02X}" for byte in certificate.signature),
    }


def _not_before(certificate: x509.Certificate) -> datetime:
    value = getattr(certificate, "not_valid_before_utc", None)
    return value if value is not None else certificate.not_valid_before.replace(tzinfo=UTC)


def _not_after(certificate: x509.Certificate) -> datetime:
    value = getattr(certificate, "not_valid_after_utc", None)
    return value if value is not None else certificate.not_valid_after.replace(tzinfo=UTC)


def _openssl_time(moment: datetime) -> str:
    """OpenSSL's ASN1_TIME_print format, e.g. ``Mar  1 12:00:00 2024 GMT``."""
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    return f"{months[moment.month - 1]} {moment.day:2d} {moment:%H:%M:%S} {moment.year} GMT"
