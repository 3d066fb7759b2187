"""What the commands that judge an enclave by its attestation document (``kms serve``, ``kms
policy``, ``handoff``) make of their options: the roots to trust and the PCR values to expect.

Every function raises :class:`~qtbuild.cli.errors.InputError` (exit 2) with a one-line message
naming the option or file at fault.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from qtbuild.cli.attest import parse_duration
from qtbuild.cli.errors import InputError
from qtbuild.cli.output import say
from qtbuild.formats.errors import FormatError
from qtbuild.formats.measure import parse_pcr_hex
from qtbuild.runtime.kms.recipient import DEFAULT_MAX_AGE, RecipientVerifier
from qtbuild.runtime.qtsm.pki import LocalPki, PkiError
from qtbuild.runtime.verifier.attestation import KNOWN_ROOTS, normalize_fingerprint


def recipient_verifier(root_paths: Iterable[str], fingerprints: Iterable[str] = (), *, hardware: bool = False,
                       no_local: bool = False, max_age: str | None = None,
                       allow_debug: bool = False) -> RecipientVerifier:
    """A verifier trusting the PEM roots in ``root_paths``, the roots with the SHA-256
    ``fingerprints`` (``--attestation-root-fingerprint``), the AWS Nitro and Huawei QingTian roots
    when ``hardware``, and the local PKI's root unless ``no_local`` (a note on stderr when there
    is none); documents up to ``max_age`` old (a duration such as ``5m``; default
    :data:`DEFAULT_MAX_AGE`), debug-mode ones only when ``allow_debug``."""
    roots = [certificate for path in root_paths for certificate in _load_roots(path)]
    try:
        pins = [normalize_fingerprint(value) for value in fingerprints]
    except ValueError as exc:
        raise InputError(f"--attestation-root-fingerprint: {exc}") from None
    if hardware:
        pins.extend(KNOWN_ROOTS.values())
    if not no_local:
        try:
            roots.append(LocalPki.load().root_certificate)
        except PkiError:
            say("note: no local attestation PKI (qtbuild pki init): not trusting it")
    age = parse_duration(max_age) if max_age is not None else DEFAULT_MAX_AGE
    return RecipientVerifier(tuple(roots), tuple(pins), age, allow_debug)


def _load_roots(path: str) -> list[x509.Certificate]:
    data = Path(path).read_bytes()
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InputError(f"{path}: not a PEM certificate") from None


def pcr_hex(value: str, option: str) -> str:
    """``value`` as 96 lower-case hex digits (a SHA-384 PCR), surrounding blanks dropped;
    InputError naming ``option`` otherwise."""
    try:
        return parse_pcr_hex(value, option).hex()
    except FormatError:
        raise InputError(f"{option}: expected 96 hex digits (a SHA-384 PCR), got {value[:100]!r}") from None


def measured_pcrs(path: str) -> dict[int, bytes]:
    """PCR0, and PCR8 when the image is signed, from the measurements JSON ``convert`` printed."""
    from qtbuild.inspect.verify import load_expected

    try:
        expected = load_expected(path)
    except FormatError as exc:
        raise InputError(str(exc)) from None
    if "PCR0" not in expected:
        raise InputError(f"{path}: no PCR0 (expected the measurements JSON `qtbuild convert` prints)")
    pcrs = {0: expected["PCR0"]}
    if any(expected.get("PCR8", b"")):
        pcrs[8] = expected["PCR8"]
    return pcrs
