"""EC keys and self-signed X.509 certificates with chosen validity, for signing tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def make_key(curve: str = "P-384") -> ec.EllipticCurvePrivateKey:
    """A fresh EC private key on ``curve`` ("P-256", "P-384" or "P-521")."""
    return ec.generate_private_key(CURVES[curve]())


def make_certificate(
    key,
    *,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    common_name: str = "qtbuild test signer",
) -> x509.Certificate:
    """A certificate for ``key``'s public key, self-signed by ``key``.

    Validity defaults to [now - 1 day, now + 30 days]; pass aware UTC datetimes to choose it.
    """
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=30))
        .sign(key, hashes.SHA384())
    )


def to_pem(certificate: x509.Certificate) -> bytes:
    """The certificate as PEM bytes."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_signer(curve: str = "P-384", **validity) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """(private key, self-signed certificate PEM) — the QingTian/nitro-cli signing recipe."""
    key = make_key(curve)
    return key, to_pem(make_certificate(key, **validity))
