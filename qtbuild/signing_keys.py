"""Signing keys for enclave images: load a key and certificate pair and sign PCR0 (PCR8).

:class:`Pcr0Signer` is what :func:`qtbuild.formats.eif_writer.write_eif` calls once PCR0 is known.
Loading checks everything that would otherwise surface only when the image is run: the key is an
EC key (P-256/P-384/P-521), it matches the certificate, and the certificate is valid now.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qtbuild.formats.bounded_input import read_bounded
from qtbuild.formats.eif_signature import check_certificate_validity, first_certificate, sign_pcr0
from qtbuild.formats.errors import SignatureError
from qtbuild.kms_keys import KmsPrivateKey, is_kms_uri, refuse_aws_kms_arn
from qtbuild.kms_keys import kms_credentials as kms_credentials_file
from qtbuild.pkcs11_keys import Pkcs11PrivateKey, is_pkcs11_uri

#: Key and certificate files larger than this are not what they claim to be.
MAX_PEM_FILE = 256 * 1024


class Pcr0Signer:
    """Signs an image's PCR0 with an EC key; implements :class:`qtbuild.formats.eif_writer.Signer`."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, certificate_pem: bytes) -> None:
        self.private_key = private_key
        self.certificate_pem = bytes(certificate_pem)
        self.certificate = first_certificate(self.certificate_pem)
        self.certificate_der = self.certificate.public_bytes(serialization.Encoding.DER)
        # Fail now, not after streaming gigabytes: sign_pcr0 checks key type and key/cert match.
        sign_pcr0(bytes(48), private_key, self.certificate_pem)

    def signature_section(self, pcr0: bytes) -> bytes:
        return sign_pcr0(pcr0, self.private_key, self.certificate_pem)


def load_signer(
    key_path: str | os.PathLike, certificate_path: str | os.PathLike, *, at: datetime | None = None,
    kms_credentials: str | None = None,
) -> Pcr0Signer:
    """Read a PEM private key and certificate file and return a checked signer.

    ``key_path`` may also be a ``pkcs11:`` URI (the key stays in the token,
    :mod:`qtbuild.pkcs11_keys`) or a ``kms://`` URI (the key stays in the KMS,
    :mod:`qtbuild.kms_keys`; ``kms_credentials`` is the file of request-signing keys, default
    the environment's).
    Raises SignatureError with a message naming the file and the fix for: an unreadable or
    encrypted key, a non-EC key, a key that does not match the certificate, a certificate that is
    expired or not yet valid at ``at`` (default now).  A certificate file holding several
    certificates is accepted; the first signs, and a note says so on stderr.
    """
    refuse_aws_kms_arn(key_path)
    certificate_pem = _read_pem(certificate_path, "signing certificate")
    if is_pkcs11_uri(key_path):
        return _checked(Pkcs11PrivateKey(str(key_path)), certificate_pem, certificate_path, at)
    if is_kms_uri(key_path):
        key = KmsPrivateKey(str(key_path), kms_credentials_file(kms_credentials))
        return _checked(key, certificate_pem, certificate_path, at)
    key_pem = _read_pem(key_path, "private key")
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SignatureError(
            f"{key_path}: the private key is encrypted; decrypt it first (openssl ec -in KEY -out PLAIN)"
        ) from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError or UnsupportedAlgorithm
        raise SignatureError(f"{key_path}: not a PEM private key ({exc})") from None
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise SignatureError(
            f"{key_path}: the signing key must be an EC key (P-256, P-384 or P-521), "
            f"not {type(private_key).__name__.lstrip('_')}; "
            "create one with: openssl ecparam -name secp384r1 -genkey -noout -out key.pem"
        )
    return _checked(private_key, certificate_pem, certificate_path, at)


def _checked(private_key: ec.EllipticCurvePrivateKey, certificate_pem: bytes, certificate_path, at) -> Pcr0Signer:
    if certificate_pem.count(b"-----BEGIN CERTIFICATE-----") > 1:
        print(f"qtbuild: note: {certificate_path} holds several certificates; the first one signs (PCR8 is its hash)",
              file=sys.stderr)
    signer = Pcr0Signer(private_key, certificate_pem)
    check_certificate_validity(signer.certificate, at)
    return signer


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    too_large = SignatureError(f"{path}: {what} file is larger than {MAX_PEM_FILE} bytes; is it the right file?")
    with open(path, "rb") as handle:
        data = read_bounded(handle, MAX_PEM_FILE, too_large)
    if b"-----BEGIN" not in data:
        raise SignatureError(f"{path}: not a PEM file (no -----BEGIN line); the {what} must be PEM-encoded")
    return data
