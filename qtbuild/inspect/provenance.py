"""`qtbuild verify EIF --provenance FILE`: does a provenance statement describe this very file?

Checks, each a :class:`~qtbuild.inspect.verify.Check`:

- ``provenance signature``: a DSSE envelope must verify with the given ``--signing-certificate``,
  else with the certificate the EIF is signed with; an unsigned statement fails when a certificate
  was given (the caller asked for a signed one) and is skipped otherwise.
- ``provenance statement``: an in-toto Statement v1 with a SLSA Provenance v1 predicate and one
  subject.
- ``provenance subject``: the subject's sha256 and sha384 are the file's (a tampered EIF or a
  statement for another image fails here).
- ``provenance PCRs``: the subject's PCR annotations are the PCRs recomputed from the file.
"""

from __future__ import annotations

import json
import os

from cryptography import x509

from qtbuild.convert.provenance import PCR_NAMES, PREDICATE_TYPE, STATEMENT_TYPE, file_digests
from qtbuild.formats.bounded_input import load_json_object
from qtbuild.formats.dsse import IN_TOTO_PAYLOAD_TYPE, is_envelope, parse_envelope, verify_envelope
from qtbuild.formats.errors import FormatError, SignatureError
from qtbuild.inspect.verify import Check

MAX_PROVENANCE_FILE = 4 << 20


def parse_provenance(raw: bytes, what: str) -> dict:
    """The decoded JSON of a provenance file read by the caller (at most MAX_PROVENANCE_FILE
    bytes); FormatError naming ``what`` when it is not a JSON object."""
    return load_json_object(raw, what=f"{what} (an in-toto statement or a DSSE envelope)", error=FormatError)


def check_provenance(eif_path: str | os.PathLike, document: dict, pcrs: dict[str, str], *,
                     certificate: x509.Certificate | None, image_certificate: x509.Certificate | None) -> list[Check]:
    """The provenance checks (see the module docstring) of ``document`` against the file at ``eif_path``."""
    checks = []
    if is_envelope(document):
        envelope = parse_envelope(document)
        checks.append(_signature_check(envelope, certificate, image_certificate))
        if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE:
            return [*checks, Check("provenance statement", False, f"payloadType {envelope.payload_type!r} is not "
                                                                     f"{IN_TOTO_PAYLOAD_TYPE}")]
        try:
            statement = json.loads(envelope.payload)
        except (ValueError, RecursionError) as exc:
            return [*checks, Check("provenance statement", False, f"the envelope's payload is not JSON ({exc})")]
    else:
        statement = document
        if certificate is not None:
            checks.append(Check("provenance signature", False,
                                "the statement is not signed (no DSSE envelope) but --signing-certificate was given"))
        else:
            checks.append(Check("provenance signature", None, "unsigned statement"))
    subject, problem = _subject(statement)
    if subject is None:
        return [*checks, Check("provenance statement", False, problem or "not a provenance statement")]
    checks.append(Check("provenance statement", True, f"{PREDICATE_TYPE} for {subject.get('name')!r}"))
    actual = file_digests(eif_path)
    claimed = _member_object(subject, "digest")
    wrong = [name for name in ("sha256", "sha384") if claimed.get(name) != actual[name]]
    detail = (f"the file's {', '.join(wrong)} differ from the statement's subject: another image or a modified file"
              if wrong else f"sha256 {actual['sha256']}")
    checks.append(Check("provenance subject", not wrong, detail))
    annotations = _member_object(subject, "annotations")
    moved = [name for name in PCR_NAMES
             if (name in annotations or name in pcrs) and annotations.get(name) != pcrs.get(name)]
    checks.append(Check("provenance PCRs", not moved,
                        f"{', '.join(moved)} recomputed from the file differ from the statement" if moved
                        else "PCRs recomputed from the file match the statement"))
    return checks


def _signature_check(envelope, certificate, image_certificate) -> Check:
    key_source = certificate or image_certificate
    if key_source is None:
        return Check("provenance signature", False,
                     "the statement is signed but there is no certificate to check it: give --signing-certificate")
    try:
        verify_envelope(envelope, key_source.public_key())
    except SignatureError as exc:
        return Check("provenance signature", False, str(exc))
    whose = "the given certificate" if certificate is not None else "the image's signing certificate"
    return Check("provenance signature", True, f"DSSE signature verifies with {whose}")


def _subject(statement: object) -> tuple[dict, None] | tuple[None, str]:
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        return None, f"not an in-toto statement (_type must be {STATEMENT_TYPE})"
    if statement.get("predicateType") != PREDICATE_TYPE:
        return None, f"predicateType {statement.get('predicateType')!r} is not {PREDICATE_TYPE}"
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        return None, "the statement must have exactly one subject (the EIF)"
    return subjects[0], None


def _member_object(document: dict, key: str) -> dict:
    value = document.get(key)
    return value if isinstance(value, dict) else {}
