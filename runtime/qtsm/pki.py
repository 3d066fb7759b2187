"""The local attestation PKI: a pinned root, region → host intermediates, per-enclave leaves.

Shaped like the real chains (Nitro ``aws.nitro-enclaves`` → region → zone → instance → leaf;
QingTian root → region → grid → instance → leaf), all P-384 / ecdsa-with-SHA384::

    root    CN=qtbuild-local.qingtian-enclaves   30 years   CA, no pathLen   (verifiers pin it)
    region  CN=<16 hex>.local.qingtian-enclaves  10 years   CA, pathLen 1
    host    CN=<16 hex>.host.local.qingtian-...   1 year     CA, pathLen 0    (renewed < 30 days)
    leaf    CN=<enclave id>.local.qingtian-...   3 hours    not a CA, digitalSignature

Layout under ``<state dir>/pki`` (directories 0700, private keys 0600, written atomically)::

    root.key root.crt region.key region.crt host.key host.crt   PEM (PKCS#8 keys)
    leaves/<enclave id>.pem                                      key + certificate, one file

A leaf is reused while more than 30 minutes of its validity remain, then replaced.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.qtsm.device import Signer
from qtbuild.runtime.verifier.attestation import fingerprint

ROOT_VALIDITY = timedelta(days=30 * 365)
REGION_VALIDITY = timedelta(days=10 * 365)
HOST_VALIDITY = timedelta(days=365)
HOST_RENEW_BEFORE = timedelta(days=30)
LEAF_VALIDITY = timedelta(hours=3)
LEAF_RENEW_BEFORE = timedelta(minutes=30)
#: Certificates are back-dated this much against small clock differences.
BACKDATE = timedelta(minutes=5)
DOMAIN = "local.qingtian-enclaves"
ROOT_NAME = "qtbuild-local.qingtian-enclaves"
CA_LEVELS = ("root", "region", "host")
_ENCLAVE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PkiError(Exception):
    """The PKI state is missing, incomplete or inconsistent, or a request is invalid."""


def default_state_dir() -> Path:
    """``$QTBUILD_STATE_DIR``, else /var/lib/qtbuild for root, else ~/.local/share/qtbuild."""
    if os.environ.get("QTBUILD_STATE_DIR"):
        return Path(os.environ["QTBUILD_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/qtbuild")
    return Path.home() / ".local" / "share" / "qtbuild"


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


class LocalPki:
    """A loaded PKI.  Thread-safe; use :meth:`init` or :meth:`load` to obtain one."""

    def __init__(self, directory: Path, authorities: dict[str, _Authority]) -> None:
        self.directory = directory
        self._authorities = authorities
        self._leaves: dict[str, _Authority] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ construction

    @classmethod
    def init(cls, state_dir: str | os.PathLike | None = None, *, force: bool = False) -> LocalPki:
        """Create the root and intermediates, or load them when they already exist.

        Idempotent: an existing complete PKI is returned untouched unless ``force``, which
        replaces everything (invalidating pinned fingerprints).  PkiError for a partial one.
        """
        directory = _pki_dir(state_dir)
        present = [level for level in CA_LEVELS if (directory / f"{level}.key").exists()]
        if present and not force:
            if len(present) != len(CA_LEVELS):
                raise PkiError(f"{directory} holds an incomplete PKI; use --force to recreate it")
            return cls.load(state_dir)
        _make_private_dir(directory)
        _make_private_dir(directory / "leaves")
        for leaf in (directory / "leaves").glob("*.pem"):
            leaf.unlink()
        now = _now()
        root = _issue(_name(ROOT_NAME), None, now, ROOT_VALIDITY, path_length=None)
        region_name = _name(f"{secrets.token_hex(8)}.{DOMAIN}")
        region = _issue(region_name, root, now, REGION_VALIDITY, path_length=1)
        host = _issue(_host_name(), region, now, HOST_VALIDITY, path_length=0)
        authorities = {"root": root, "region": region, "host": host}
        for level, authority in authorities.items():
            _save_authority(directory, level, authority)
        return cls(directory, authorities)

    @staticmethod
    def is_initialised(state_dir: str | os.PathLike | None = None) -> bool:
        """Whether every CA key and certificate exists under ``state_dir``."""
        directory = _pki_dir(state_dir)
        return all(
            (directory / f"{level}.{suffix}").exists()
            for level in CA_LEVELS
            for suffix in ("key", "crt")
        )

    @classmethod
    def load(cls, state_dir: str | os.PathLike | None = None) -> LocalPki:
        """Load an initialised PKI; PkiError when missing or when a key does not match its cert."""
        directory = _pki_dir(state_dir)
        if not (directory / "root.crt").exists():
            raise PkiError(f"no attestation PKI in {directory}: run `qtbuild pki init`")
        authorities = {level: _load_authority(directory, level) for level in CA_LEVELS}
        return cls(directory, authorities)

    # ------------------------------------------------------------------ public API

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._authorities["root"].cert

    def root_fingerprint(self) -> str:
        """Lower-case hex SHA-256 of the root certificate's DER (what verifiers pin)."""
        return fingerprint(self.root_certificate)

    def cabundle(self) -> list[bytes]:
        """The DER chain a document carries, root first: [root, region, host]."""
        with self._lock:
            self._renew_host_if_due(_now())
            return [_der(self._authorities[level].cert) for level in CA_LEVELS]

    def issue_leaf(self, enclave_id: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """(key, certificate) of ``enclave_id``'s signing leaf, reused until < 30 min remain."""
        if not _ENCLAVE_ID.fullmatch(enclave_id or ""):
            raise PkiError(f"invalid enclave id {enclave_id!r} (letters, digits, . _ -; ≤ 128)")
        now = _now()
        with self._lock:
            self._renew_host_if_due(now)
            leaf = self._leaves.get(enclave_id)
            if leaf is None or _expiring(leaf.cert, now):
                leaf = self._load_leaf(enclave_id, now) or self._new_leaf(enclave_id, now)
                self._leaves[enclave_id] = leaf
            return leaf.key, leaf.cert

    def signer(self, enclave_id: str) -> Signer:
        """The ``signer`` callable a SecurityModule takes: () -> (key, certificate, cabundle)."""

        def sign() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, list[bytes]]:
            with self._lock:  # leaf and bundle from the same host CA, even across a renewal
                key, cert = self.issue_leaf(enclave_id)
                return key, cert, self.cabundle()

        return sign

    def forget_leaf(self, enclave_id: str) -> None:
        """Drop an enclave's leaf (memory and disk), e.g. when the enclave terminates."""
        with self._lock:
            self._leaves.pop(enclave_id, None)
            (self.directory / "leaves" / f"{enclave_id}.pem").unlink(missing_ok=True)

    # ------------------------------------------------------------------ internals

    def _new_leaf(self, enclave_id: str, now: datetime) -> _Authority:
        host = self._authorities["host"]
        leaf = _issue(_name(f"{enclave_id}.{DOMAIN}"), host, now, LEAF_VALIDITY, ca=False)
        path = self.directory / "leaves" / f"{enclave_id}.pem"
        write_atomically(path, _key_pem(leaf.key) + _cert_pem(leaf.cert), 0o600)
        return leaf

    def _load_leaf(self, enclave_id: str, now: datetime) -> _Authority | None:
        """The leaf saved on disk, if it is intact, current and issued by the current host."""
        path = self.directory / "leaves" / f"{enclave_id}.pem"
        try:
            data = path.read_bytes()
            leaf = _Authority(_load_ec_key(data), x509.load_pem_x509_certificate(data))
        except (OSError, ValueError, TypeError):
            return None  # missing or damaged: a new one is issued
        host = self._authorities["host"].cert
        usable = _matches(leaf) and not _expiring(leaf.cert, now) and _signed_by(leaf.cert, host)
        return leaf if usable else None

    def _renew_host_if_due(self, now: datetime) -> None:
        host = self._authorities["host"]
        if host.cert.not_valid_after_utc - now > HOST_RENEW_BEFORE:
            return
        host = _issue(_host_name(), self._authorities["region"], now, HOST_VALIDITY, path_length=0)
        _save_authority(self.directory, "host", host)
        self._authorities["host"] = host
        self._leaves.clear()


# --------------------------------------------------------------------------- certificates


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qtbuild"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "local attestation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _host_name() -> x509.Name:
    return _name(f"{secrets.token_hex(8)}.host.{DOMAIN}")


def _issue(
    subject: x509.Name,
    issuer: _Authority | None,
    now: datetime,
    validity: timedelta,
    *,
    path_length: int | None = None,
    ca: bool = True,
) -> _Authority:
    """A fresh P-384 key and its certificate, signed by ``issuer`` (self-signed when None).

    The validity never extends past the issuer's.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    signing_key = issuer.key if issuer else key
    not_after = now + validity
    if issuer is not None:
        not_after = min(not_after, issuer.cert.not_valid_after_utc)
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only"), False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **usage),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return _Authority(key, builder.sign(signing_key, hashes.SHA384()))


def _expiring(cert: x509.Certificate, now: datetime) -> bool:
    """Whether a leaf is due for renewal: 30 minutes or less of validity left."""
    return cert.not_valid_after_utc - now <= LEAF_RENEW_BEFORE


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``cert`` names ``issuer`` and carries a valid signature by its key."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- storage


def _pki_dir(state_dir: str | os.PathLike | None) -> Path:
    return Path(state_dir if state_dir is not None else default_state_dir()) / "pki"


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700; force ``path`` itself to 0700."""
    for directory in [*reversed(path.parents), path]:
        if not directory.exists():
            directory.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _save_authority(directory: Path, level: str, authority: _Authority) -> None:
    write_atomically(directory / f"{level}.key", _key_pem(authority.key), 0o600)
    write_atomically(directory / f"{level}.crt", _cert_pem(authority.cert), 0o644)


def _load_authority(directory: Path, level: str) -> _Authority:
    try:
        key = _load_ec_key((directory / f"{level}.key").read_bytes())
        cert = x509.load_pem_x509_certificate((directory / f"{level}.crt").read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot load the {level} CA from {directory}: {exc}") from None
    authority = _Authority(key, cert)
    if not _matches(authority):
        raise PkiError(f"{directory}/{level}.key does not match {level}.crt")
    return authority


def _load_ec_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The EC private key in ``pem``; ValueError for any other PEM, TypeError when encrypted."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"not an EC private key ({type(key).__name__.lstrip('_')})")
    return key


def _matches(authority: _Authority) -> bool:
    """Whether the certificate holds the public key of the authority's (EC) private key."""
    certified = authority.cert.public_key()
    return isinstance(certified, ec.EllipticCurvePublicKey) and (
        authority.key.public_key().public_numbers() == certified.public_numbers()
    )
