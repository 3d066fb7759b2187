"""``qtbuild attest verify DOC [--root CERT.pem | --root-fingerprint SHA256] [--cloud …]
[--expect-pcr N=HEX …] [--nonce HEX] [--public-key PEM] [--max-age 5m] [--at TIME]
[--allow-debug] [--json]`` and ``qtbuild attest issue --cloud qingtian|nitro [--pcr N=HEX …]
[--user-data F] [--nonce F] [--public-key F] [--debug] -o DOC``.

``verify --cloud`` was ``--platform`` (still accepted, hidden: ``--platform`` means an image's
os/arch elsewhere).  ``issue`` writes a document of the local PKI in the cloud's exact shape
without running an enclave (the PKI is created when missing, as ``run`` does).

DOC is a COSE document as raw CBOR or base64 text (``-`` reads stdin).  Exit 0 valid, 1 invalid
(the failing check is named), 2 unreadable (file, encoding or COSE structure) or bad options.
Without a pin the well-known Nitro and QingTian roots and the local PKI's root (when
initialised in the state directory) are trusted.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from datetime import UTC, datetime
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qtbuild.cli.command import QtbuildGroup
from qtbuild.cli.errors import InputError
from qtbuild.cli.inputs import read_bounded
from qtbuild.cli.output import emit_json, say
from qtbuild.formats.attestation import MAX_DOCUMENT_SIZE
from qtbuild.formats.measure import parse_pcr_hex
from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.qtsm.clouds import CLOUDS, DEFAULT_CLOUD
from qtbuild.runtime.qtsm.clouds import profile as cloud_profile
from qtbuild.runtime.qtsm.issue import IssueError, issue_document
from qtbuild.runtime.qtsm.pki import LocalPki, PkiError
from qtbuild.runtime.verifier.attestation import (
    KNOWN_ROOTS,
    PLATFORMS,
    AttestationError,
    VerifiedDocument,
    normalize_fingerprint,
    verify_document,
)

#: Base64 text of a maximal document, with line breaks.
MAX_INPUT_FILE = 2 * MAX_DOCUMENT_SIZE
MAX_KEY_FILE = 64 * 1024
#: user_data / nonce / public_key files: far above any cloud's limit, so the limit names the problem.
MAX_FIELD_FILE = 64 * 1024
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h|d)?")
_UNITS = {None: 1, "ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


@click.group("attest", cls=QtbuildGroup)
def command() -> None:
    """Attestation documents (AWS Nitro NSM, Huawei QingTian QTSM, local)."""


@command.command("verify")
@click.argument("document", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--root", "root_paths", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="Pin this root certificate (PEM or DER); repeatable.")
@click.option("--root-fingerprint", "root_fingerprints", multiple=True, metavar="SHA256",
              help="Pin the root with this SHA-256 fingerprint (hex, colons allowed); repeatable.")
@click.option("--cloud", type=click.Choice(PLATFORMS), default=None,
              help="Size limits and signature forms to accept  [default: auto, from the root].")
@click.option("--platform", "platform_alias", type=click.Choice(PLATFORMS), default=None, hidden=True)
@click.option("--expect-pcr", "expect_pcrs", multiple=True, metavar="N=HEX",
              help="Require PCR N to equal HEX (96 hex digits); repeatable.")
@click.option("--nonce", metavar="HEX", help="Require this nonce.")
@click.option("--public-key", "public_key_path", type=click.Path(exists=True, dir_okay=False),
              help="Require this public key (PEM or DER SubjectPublicKeyInfo).")
@click.option("--max-age", metavar="DURATION", help="Maximum age, e.g. 300, 90s, 5m, 2h.")
@click.option("--at", "at_text", metavar="TIME",
              help="Check time instead of now: ISO 8601 (naive = UTC) or Unix seconds.")
@click.option("--allow-debug", is_flag=True, help="Accept debug-mode documents (PCR0 zeros).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
def verify(document, root_paths, root_fingerprints, cloud, platform_alias, expect_pcrs, nonce,
           public_key_path, max_age, at_text, allow_debug, as_json) -> None:
    """Verify an attestation document: structure, chain to a pinned root, signature, policy."""
    if cloud and platform_alias and cloud != platform_alias:
        raise InputError("--cloud and its old spelling --platform disagree: give --cloud only")
    platform = cloud or platform_alias or "auto"
    options = {
        "roots": [_load_root(path) for path in root_paths] or None,
        "root_fingerprints": _fingerprints(root_fingerprints, pinned=bool(root_paths)),
        "platform": platform,
        "expect_pcrs": dict(_expected_pcr(text) for text in expect_pcrs),
        "nonce": _hex(nonce, "--nonce") if nonce is not None else None,
        "public_key": _public_key(public_key_path) if public_key_path else None,
        "max_age": parse_duration(max_age) if max_age is not None else None,
        "at": parse_time(at_text) if at_text is not None else None,
        "allow_debug": allow_debug,
    }
    data = read_document_file(document)
    try:
        verified = verify_document(data, **options)
    except AttestationError as error:  # reported (exit 1, or 2 for "input") by qtbuild.cli.domain_errors
        if as_json:
            emit_json({"valid": False, "check": error.check, "message": error.message})
        raise
    if as_json:
        emit_json(verified.as_json())
    else:
        _print_summary(verified)


def _print_summary(verified: VerifiedDocument) -> None:
    summary = verified.as_json()
    click.echo(f"valid {verified.platform} attestation document from {verified.module_id}")
    click.echo(f"  issued     {summary['timestamp']}")
    click.echo(f"  checked at {summary['checked_at']}")
    click.echo(f"  signature  ES384, {verified.signature_encoding}-endian r‖s"
               f"{' (tag 18)' if verified.tagged else ''}")
    click.echo(f"  encoding   {verified.encoding}")
    click.echo(f"  root       sha256 {verified.root_fingerprint}")
    click.echo(f"  debug      {'yes (PCR0 zeros)' if verified.is_debug else 'no'}")
    for index, value in sorted(verified.pcrs.items()):
        click.echo(f"  PCR{index:<2}      {value.hex()}")


# --------------------------------------------------------------------------- input parsing


def read_document_file(path: str) -> bytes:
    """The document bytes from ``path`` (``-``: stdin): raw CBOR, or base64 text of it."""
    data = read_bounded(path, MAX_INPUT_FILE, "not an attestation document")
    if data[:1] in (b"\x84", b"\xd2"):  # array(4) or tag 18: binary CBOR
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{path}: neither CBOR nor base64 text") from None


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit ms, s, m/min, h or d."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise InputError(f"--max-age: not a duration: {text!r} (e.g. 300, 90s, 5m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_time(text: str) -> datetime:
    """An aware UTC datetime from ISO 8601 (naive = UTC) or Unix seconds."""
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
            return datetime.fromtimestamp(float(text), tz=UTC)
        moment = datetime.fromisoformat(text.strip())
    except (ValueError, OverflowError, OSError):
        raise InputError(f"--at: not an ISO 8601 time or Unix seconds: {text!r}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _hex(text: str, option: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{option}: not hexadecimal: {text!r}") from None


def _expected_pcr(text: str) -> tuple[int, bytes]:
    index, separator, value = text.partition("=")
    if not separator or not index.strip().isdigit() or not 0 <= int(index) < 32:
        raise InputError(f"--expect-pcr: expected N=HEX with N in 0..31, got {text!r}")
    return int(index), parse_pcr_hex(value, f"--expect-pcr {index.strip()}")


def _fingerprints(values: tuple[str, ...], *, pinned: bool) -> list[str] | None:
    """The fingerprints to pin; the defaults (well-known roots, local root) when nothing is."""
    try:
        pins = [normalize_fingerprint(value) for value in values]
    except ValueError as exc:
        raise InputError(f"--root-fingerprint: {exc}") from None
    if pins or pinned:
        return pins or None
    defaults = list(KNOWN_ROOTS.values())
    with contextlib.suppress(PkiError):  # no local PKI here: only the hardware roots
        defaults.append(LocalPki.load().root_fingerprint())
    return defaults


def _read_small(path: str, what: str) -> bytes:
    return read_bounded(path, MAX_KEY_FILE, f"not a {what}")


def _load_root(path: str) -> x509.Certificate:
    data = _read_small(path, "certificate")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InputError(f"--root {path}: not a PEM or DER certificate ({exc})") from None


def _public_key(path: str) -> bytes:
    """The DER SubjectPublicKeyInfo in a PEM or DER public-key file (what documents carry)."""
    data = _read_small(path, "public key")
    try:
        key = (serialization.load_pem_public_key(data) if b"-----BEGIN" in data
               else serialization.load_der_public_key(data))
    except (ValueError, TypeError) as exc:
        raise InputError(f"--public-key {path}: not a PEM or DER public key ({exc})") from None
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)



# --------------------------------------------------------------------------- issue


@command.command("issue")
@click.option("--cloud", type=click.Choice(CLOUDS), default=DEFAULT_CLOUD, show_default=True,
              help="Whose document shape, chain and limits.")
@click.option("--pcr", "pcrs", multiple=True, metavar="N=HEX",
              help="PCR N (0..31) = HEX (96 hex digits); others 0..15 are zero. Repeatable.")
@click.option("--user-data", "user_data_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="File whose bytes are the user_data field.")
@click.option("--nonce", "nonce_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="File whose bytes are the nonce field.")
@click.option("--public-key", "public_key_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="File whose bytes are the public_key field (e.g. a DER SubjectPublicKeyInfo).")
@click.option("--instance-id", metavar="ID", help="Parent instance id in the module id (default: from this machine).")
@click.option("--debug", is_flag=True, help="A debug-mode document: PCRs 0..15 all zero.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Where to write the document (raw COSE bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON on stdout.")
def issue(cloud, pcrs, user_data_path, nonce_path, public_key_path, instance_id, debug, output, as_json) -> None:
    """Issue an attestation document from the local PKI without running an enclave."""
    given = dict(_pcr_value(text) for text in pcrs)
    user_data, nonce, public_key = (read_bounded(path, MAX_FIELD_FILE, f"too large for {name}") if path else None
                                    for name, path in (("user_data", user_data_path), ("nonce", nonce_path),
                                                       ("public_key", public_key_path)))
    profile = cloud_profile(cloud)
    try:
        pki = LocalPki.init()
        document = issue_document(pki, profile, pcrs=given, debug=debug, instance_id=instance_id,
                                  user_data=user_data, nonce=nonce, public_key=public_key)
    except (IssueError, PkiError) as exc:
        raise InputError(str(exc)) from None
    write_atomically(Path(output), document, 0o644)
    summary = {"document": output, "cloud": cloud, "bytes": len(document),
               "root_fingerprint": pki.root_fingerprint()}
    if as_json:
        emit_json(summary)
    else:
        say(f"wrote an attestation document in the {profile.title} shape ({len(document)} bytes) to {output}")


def _pcr_value(text: str) -> tuple[int, bytes]:
    index, separator, value = text.partition("=")
    if not separator or not index.strip().isdigit() or not 0 <= int(index) < 32:
        raise InputError(f"--pcr: expected N=HEX with N in 0..31, got {text!r}")
    return int(index), parse_pcr_hex(value, f"--pcr {index.strip()}")
