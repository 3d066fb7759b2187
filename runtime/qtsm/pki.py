"""The local attestation PKI: a pinned root and, per cloud profile, a chain shaped like the real one.

All P-384 / ecdsa-with-SHA384.  One root (verifiers and the KMS pin it) serves both clouds; below
it each profile (:mod:`qtbuild.runtime.qtsm.clouds`) has its own intermediates with the real
lifetimes and pathLen values, e.g. QingTian::

    root      CN=qtbuild-local.qingtian-enclaves           30 years   CA, no pathLen
    region    CN=<16 hex>.region.qingtian.<DOMAIN>         20 days    CA, pathLen 3
    grid      CN=<16 hex>.grid.qingtian.<DOMAIN>           6 days     CA, pathLen 2
    instance  CN=<16 hex>.instance.qingtian.<DOMAIN>       1 day      CA, pathLen 1
    leaf      CN=<enclave id>.qingtian.<DOMAIN>            3 hours    not a CA, digitalSignature

Re-issue: a CA is replaced (new key) when less than its child's full lifetime remains or its
issuer was replaced; a leaf when 30 minutes or less remain.  So a chain handed out is always
current, and the PKI never expires under a developer (only the 30-year root does).

Layout under ``<state dir>/pki`` (directories 0700, private keys 0600, written atomically)::

    root.key root.crt                                   PEM (PKCS#8 key)
    <cloud>/<level>.key <cloud>/<level>.crt             intermediates, issued on first use
    <cloud>/leaves/<enclave id>.pem                     key + certificate, one file

(``region.*`` / ``host.*`` next to the root are an older layout's intermediates: ignored.)
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qtbuild.runtime.files import write_atomically
from qtbuild.runtime.qtsm.clouds import DEFAULT_CLOUD, PROFILES, CloudProfile
from qtbuild.runtime.qtsm.device import Signer
from qtbuild.runtime.qtsm.pki_location import default_state_dir as default_state_dir  # callers import it from here
from qtbuild.runtime.qtsm.pki_location import is_initialised, pki_directory
from qtbuild.runtime.verifier.attestation import fingerprint

ROOT_VALIDITY = timedelta(days=30 * 365)
LEAF_RENEW_BEFORE = timedelta(minutes=30)
#: Certificates are back-dated this much against small clock differences.
BACKDATE = timedelta(minutes=5)
DOMAIN = "local.qingtian-enclaves"
ROOT_NAME = "qtbuild-local.qingtian-enclaves"
_ENCLAVE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PkiError(Exception):
    """The PKI state is missing, incomplete or inconsistent, or a request is invalid."""


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


class LocalPki:
    """A loaded PKI.  Thread-safe; use :meth:`init` or :meth:`load` to obtain one.

    ``clock`` (returning an aware UTC datetime) is the time certificates are issued and renewed
    against.
    """

    def __init__(self, directory: Path, root: _Authority, *, clock: Callable[[], datetime] | None = None) -> None:
        self.directory = directory
        self._root = root
        self._chains: dict[str, list[_Authority]] = {}
        self._leaves: dict[tuple[str, str], _Authority] = {}
        self._lock = threading.RLock()
        self._clock = clock

    # ------------------------------------------------------------------ construction

    @classmethod
    def init(cls, state_dir: str | os.PathLike | None = None, *, force: bool = False) -> LocalPki:
        """Create the root (intermediates follow on first use), or load an existing PKI.

        Idempotent: an existing PKI is returned untouched unless ``force``, which replaces
        everything (invalidating pinned fingerprints).  PkiError for a partial one.
        """
        directory = _pki_dir(state_dir)
        present = [name for name in ("root.key", "root.crt") if (directory / name).exists()]
        if present and not force:
            if len(present) != 2:
                raise PkiError(f"{directory} holds an incomplete PKI; use --force to recreate it")
            return cls.load(state_dir)
        _make_private_dir(directory)
        for cloud in PROFILES:
            _discard(directory / cloud)
        root = _issue(_name(ROOT_NAME), None, _now(), ROOT_VALIDITY, path_length=None)
        _save_authority(directory, "root", root)
        return cls(directory, root)

    @staticmethod
    def is_initialised(state_dir: str | os.PathLike | None = None) -> bool:
        """Whether the root key and certificate exist under ``state_dir``."""
        return is_initialised(state_dir)

    @classmethod
    def load(cls, state_dir: str | os.PathLike | None = None, *,
             clock: Callable[[], datetime] | None = None) -> LocalPki:
        """Load an initialised PKI; PkiError when missing or when a key does not match its cert."""
        directory = _pki_dir(state_dir)
        if not (directory / "root.crt").exists():
            raise PkiError(f"no attestation PKI in {directory}: run `qtbuild pki init`")
        return cls(directory, _load_authority(directory, "root"), clock=clock)

    # ------------------------------------------------------------------ public API

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root.cert

    def root_fingerprint(self) -> str:
        """Lower-case hex SHA-256 of the root certificate's DER (what verifiers pin)."""
        return fingerprint(self.root_certificate)

    def cabundle(self, cloud: str = DEFAULT_CLOUD) -> list[bytes]:
        """The DER chain a ``cloud`` document carries, root first: [root, *intermediates]."""
        with self._lock:
            return [_der(self._root.cert)] + [_der(ca.cert) for ca in self._chain(cloud, self._time())]

    def issue_leaf(
        self, enclave_id: str, cloud: str = DEFAULT_CLOUD
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """(key, certificate) of ``enclave_id``'s signing leaf under ``cloud``'s chain, reused
        until 30 minutes or less remain or its issuer is replaced."""
        if not _ENCLAVE_ID.fullmatch(enclave_id or ""):
            raise PkiError(f"invalid enclave id {enclave_id!r} (letters, digits, . _ -; ≤ 128)")
        spec = _profile(cloud)
        now = self._time()
        with self._lock:
            issuer = self._chain(cloud, now)[-1]
            leaf = self._leaves.get((cloud, enclave_id))
            if leaf is None or not _current(leaf, issuer, now, LEAF_RENEW_BEFORE):
                leaf = self._load_leaf(cloud, enclave_id, issuer, now) or self._new_leaf(spec, enclave_id, issuer, now)
                self._leaves[(cloud, enclave_id)] = leaf
            return leaf.key, leaf.cert

    def signer(self, enclave_id: str, cloud: str = DEFAULT_CLOUD) -> Signer:
        """The ``signer`` callable a SecurityModule takes: () -> (key, certificate, cabundle)."""

        def sign() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, list[bytes]]:
            with self._lock:  # leaf and bundle from the same chain, even across a renewal
                key, cert = self.issue_leaf(enclave_id, cloud)
                return key, cert, self.cabundle(cloud)

        return sign

    def forget_leaf(self, enclave_id: str) -> None:
        """Drop an enclave's leaves (memory and disk, every cloud), e.g. when it terminates."""
        with self._lock:
            for cloud in PROFILES:
                self._leaves.pop((cloud, enclave_id), None)
                (self.directory / cloud / "leaves" / f"{enclave_id}.pem").unlink(missing_ok=True)

    # ------------------------------------------------------------------ internals

    def _time(self) -> datetime:
        return (self._clock or _now)()

    def _chain(self, cloud: str, now: datetime) -> list[_Authority]:
        """``cloud``'s intermediates, each current: loaded, or re-issued top-down when due."""
        spec = _profile(cloud)
        directory = self.directory / cloud
        chain = self._chains.get(cloud) or []
        levels = spec.intermediates
        renewed: list[_Authority] = []
        issuer = self._root
        for position, level in enumerate(levels):
            child_life = levels[position + 1].validity if position + 1 < len(levels) else spec.leaf_validity
            authority = chain[position] if position < len(chain) else _try_load(directory, level.name)
            if authority is None or not _current(authority, issuer, now, child_life):
                if position == 0:
                    _make_private_dir(directory)
                authority = _issue(_ca_name(cloud, level.name), issuer, now, level.validity,
                                   path_length=level.path_length)
                _save_authority(directory, level.name, authority)
            renewed.append(authority)
            issuer = authority
        self._chains[cloud] = renewed
        return renewed

    def _new_leaf(self, spec: CloudProfile, enclave_id: str, issuer: _Authority, now: datetime) -> _Authority:
        leaf = _issue(_name(f"{enclave_id}.{spec.name}.{DOMAIN}"), issuer, now, spec.leaf_validity, ca=False,
                      key_identifiers=spec.leaf_authority_key_id)
        leaves = self.directory / spec.name / "leaves"
        _make_private_dir(leaves)
        write_atomically(leaves / f"{enclave_id}.pem", _key_pem(leaf.key) + _cert_pem(leaf.cert), 0o600)
        return leaf

    def _load_leaf(self, cloud: str, enclave_id: str, issuer: _Authority, now: datetime) -> _Authority | None:
        """The leaf saved on disk, if it is intact, current and issued by the current issuer."""
        path = self.directory / cloud / "leaves" / f"{enclave_id}.pem"
        try:
            data = path.read_bytes()
            leaf = _Authority(_load_ec_key(data), x509.load_pem_x509_certificate(data))
        except (OSError, ValueError, TypeError):
            return None  # missing or damaged: a new one is issued
        return leaf if _matches(leaf) and _current(leaf, issuer, now, LEAF_RENEW_BEFORE) else None


def _profile(cloud: str) -> CloudProfile:
    try:
        return PROFILES[cloud]
    except KeyError:
        raise PkiError(f"unknown cloud {cloud!r}: choose {' or '.join(PROFILES)}") from None


def _current(authority: _Authority, issuer: _Authority, now: datetime, renew_before: timedelta) -> bool:
    """Whether a certificate may still be handed out: issued by ``issuer``'s current key and
    more than ``renew_before`` of validity left."""
    cert = authority.cert
    return cert.not_valid_after_utc - now > renew_before and cert.not_valid_before_utc <= now + BACKDATE \
        and _signed_by(cert, issuer.cert)


def _try_load(directory: Path, level: str) -> _Authority | None:
    try:
        return _load_authority(directory, level)
    except PkiError:
        return None  # missing or damaged: re-issued


def _discard(directory: Path) -> None:
    """Remove a cloud's intermediates and leaves (``init --force``)."""
    for path in sorted(directory.rglob("*"), reverse=True) if directory.exists() else ():
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()


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


def _ca_name(cloud: str, level: str) -> x509.Name:
    return _name(f"{secrets.token_hex(8)}.{level}.{cloud}.{DOMAIN}")


def _issue(
    subject: x509.Name,
    issuer: _Authority | None,
    now: datetime,
    validity: timedelta,
    *,
    path_length: int | None = None,
    ca: bool = True,
    key_identifiers: bool = True,
) -> _Authority:
    """A fresh P-384 key and its certificate, signed by ``issuer`` (self-signed when None).

    The validity never extends past the issuer's.  A leaf (``ca=False``) carries the authority
    key identifier only when ``key_identifiers`` (and never a subject key identifier).
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
    )
    if ca:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    if issuer is not None and (ca or key_identifiers):
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return _Authority(key, builder.sign(signing_key, hashes.SHA384()))


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``cert`` names ``issuer`` and carries a valid signature by its key."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- storage


def _pki_dir(state_dir: str | os.PathLike | None) -> Path:
    return pki_directory(state_dir)


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
