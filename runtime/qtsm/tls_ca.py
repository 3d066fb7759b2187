"""The local **TLS** certificate authority: server certificates for local services (``qtbuild kms
serve --tls``), so a local rehearsal speaks HTTPS and verifies the server as a client in the
cloud verifies the real endpoint.

It is deliberately *not* the attestation PKI (:mod:`qtbuild.runtime.qtsm.pki`): a root that vouches
for enclave attestation documents must not also vouch for TLS servers, and trusting one for TLS
must not make a client trust the other.  Clients trust it explicitly
(``qtbuild pki export-tls-ca``; the SDK's clients take an ``ssl.SSLContext`` built from it).

Layout under ``<state dir>/pki/tls`` (directory 0700, key 0600, written atomically)::

    ca.key ca.crt        P-256, CN=qtbuild local TLS CA, 10 years, CA with pathLen 0

Server certificates are issued fresh on every start (P-256, 90 days, serverAuth, the given DNS
names and IP addresses as subjectAltNames) and not stored here; the caller writes them where its
server reads them.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.qtsm.pki import PkiError, default_state_dir

CA_COMMON_NAME = "qtbuild local TLS CA"
CA_VALIDITY = timedelta(days=10 * 365)
SERVER_VALIDITY = timedelta(days=90)
BACKDATE = timedelta(minutes=5)


def local_tls_trust(state_dir: str | Path | None = None) -> ssl.SSLContext:
    """A client context trusting the system's CAs plus the local TLS CA (when it exists)."""
    context = ssl.create_default_context()
    cert_path = Path(state_dir if state_dir is not None else default_state_dir()) / "pki" / "tls" / "ca.crt"
    if cert_path.exists():
        context.load_verify_locations(cafile=str(cert_path))
    return context


@dataclass(frozen=True)
class ServerCertificate:
    """A TLS server's key and certificate chain (leaf, then the CA), PEM."""

    key_pem: bytes
    chain_pem: bytes


class LocalTlsCa:
    """``LocalTlsCa.open(state_dir)``: the CA, created on first use."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key, self.certificate = key, certificate

    @classmethod
    def open(cls, state_dir: str | Path | None = None) -> LocalTlsCa:
        """Load ``<state dir>/pki/tls``'s CA, creating it when absent; PkiError when unreadable."""
        directory = Path(state_dir if state_dir is not None else default_state_dir()) / "pki" / "tls"
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if not key_path.exists() and not cert_path.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            ca = cls._create()
            write_atomically(key_path, ca._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
            write_atomically(cert_path, ca.certificate_pem, 0o644)
            return ca
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise PkiError(f"cannot load the local TLS CA from {directory}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
            raise PkiError(f"{key_path} does not match {cert_path}")
        return cls(key, certificate)

    @classmethod
    def _create(cls) -> LocalTlsCa:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qtbuild"),
                          x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_server(self, names: list[str]) -> ServerCertificate:
        """A server certificate for ``names`` (DNS names or IP addresses; the first is the CN)."""
        if not names:
            raise ValueError("a server certificate needs at least one name")
        alt_names: list[x509.GeneralName] = []
        for name in dict.fromkeys(names):
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + SERVER_VALIDITY, self.certificate.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return ServerCertificate(key_pem, certificate.public_bytes(serialization.Encoding.PEM) + self.certificate_pem)
