"""``qtbuild pki init [--force] | show [--json] | export-root [-o FILE] [--der] | export-tls-ca [-o FILE]``.

The local attestation PKI (:mod:`qtbuild.runtime.qtsm.pki`) under ``--state-dir`` (default
``$QTBUILD_STATE_DIR``, else /var/lib/qtbuild as root, else ~/.local/share/qtbuild).  ``show``
prints the root's SHA-256 fingerprint: verifiers and the KMS pin it.
"""

from __future__ import annotations

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qtbuild.cli.command import QtbuildGroup
from qtbuild.cli.output import emit_json, say
from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.qtsm.clouds import CLOUDS, DEFAULT_CLOUD
from qtbuild.runtime.qtsm.clouds import profile as cloud_profile
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.qtsm.tls_ca import LocalTlsCa

_STATE_DIR = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help="State directory (default: $QTBUILD_STATE_DIR, /var/lib/qtbuild as root, "
         "else ~/.local/share/qtbuild).",
)


@click.group("pki", cls=QtbuildGroup)
def command() -> None:
    """The local attestation PKI: one root CA, each cloud's intermediates, per-enclave leaves."""


@command.command("init")
@_STATE_DIR
@click.option("--force", is_flag=True, help="Replace an existing PKI (pinned fingerprints change).")
def init(state_dir: str | None, force: bool) -> None:
    """Create the PKI (idempotent: an existing one is kept unless --force)."""
    existed = LocalPki.is_initialised(state_dir)
    pki = LocalPki.init(state_dir, force=force)
    if existed and not force:
        say(f"attestation PKI already initialised in {pki.directory} (use --force to replace it)")
    else:
        say(f"attestation PKI created in {pki.directory}")
    click.echo(pki.root_fingerprint())


@command.command("show")
@_STATE_DIR
@click.option("--cloud", type=click.Choice(CLOUDS), default=DEFAULT_CLOUD, show_default=True,
              help="Whose chain to show (each cloud has its own intermediates below the one root).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(state_dir: str | None, cloud: str, as_json: bool) -> None:
    """Print the root's SHA-256 fingerprint and the chain's subjects and validity (current
    intermediates: due ones are re-issued first)."""
    pki = LocalPki.load(state_dir)
    chain = [x509.load_der_x509_certificate(der) for der in pki.cabundle(cloud)]
    if as_json:
        emit_json({
            "directory": str(pki.directory),
            "root_fingerprint": pki.root_fingerprint(),
            "cloud": cloud,
            "chain": [_describe(cert) for cert in chain],
        })
        return
    click.echo(f"root fingerprint (SHA-256): {pki.root_fingerprint()}")
    levels = ("root", *(level.name for level in cloud_profile(cloud).intermediates))
    for level, cert in zip(levels, chain, strict=True):
        info = _describe(cert)
        click.echo(f"{level:<9}{info['subject']}  {info['not_before']} .. {info['not_after']}")


@command.command("export-root")
@_STATE_DIR
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write to this file instead of stdout.")
@click.option("--der", is_flag=True, help="DER instead of PEM.")
def export_root(state_dir: str | None, output: str | None, der: bool) -> None:
    """Write the root certificate (PEM by default) for verifiers to pin."""
    pki = LocalPki.load(state_dir)
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    data = pki.root_certificate.public_bytes(encoding)
    _emit(data, output, "root certificate")


@command.command("export-tls-ca")
@_STATE_DIR
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write to this file instead of stdout.")
def export_tls_ca(state_dir: str | None, output: str | None) -> None:
    """Write the local TLS CA's certificate (PEM; created on first use) for clients of local
    HTTPS services (`qtbuild kms serve --tls`) to trust.  Not the attestation root."""
    data = LocalTlsCa.open(state_dir).certificate_pem
    _emit(data, output, "TLS CA certificate")


def _emit(data: bytes, output: str | None, what: str) -> None:
    """``data`` on stdout, or written atomically to ``output``."""
    if output is None:
        click.echo(data, nl=False)  # click writes bytes to the binary stdout
        return
    write_atomically(output, data, 0o644)
    say(f"{what} written to {output}")


def _describe(cert: x509.Certificate) -> dict:
    return {
        "subject": cert.subject.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "not_after": cert.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
    }
