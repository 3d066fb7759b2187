"""The KMS's cache of verified attestation documents: an identical document is verified once,
until a time-dependent check (age, certificate validity) would fail; per verifier."""

from __future__ import annotations

import base64
import time

import pytest

import qtbuild.runtime.kms.recipient as recipient_module
from qtbuild.runtime.kms.errors import KmsError
from qtbuild.runtime.kms.recipient import RecipientVerifier
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.recipient import RecipientKey


def _recipient_field(pki, pcrs=None) -> dict:
    key = RecipientKey.generate()
    device = SecurityModule(pcrs or {index: bytes([index + 1]) * 48 for index in range(16)}, debug=False,
                            signer=pki.signer("cache"), module_id="i-0123456789abcdef0-enc0123456789abcdef")
    return {"attestation_document": base64.b64encode(device.attestation(public_key=key.public_key_der)).decode(),
            "key_encryption_algorithm": "RSAES_OAEP_SHA_256"}


def test_an_identical_document_is_verified_once_until_it_ages_out(tmp_path, monkeypatch):
    pki = LocalPki.init(tmp_path)
    calls = []
    original = recipient_module.verify_document
    monkeypatch.setattr(recipient_module, "verify_document", lambda *a, **k: calls.append(1) or original(*a, **k))
    verifier = RecipientVerifier(roots=(pki.root_certificate,), max_age=1.0)
    field = _recipient_field(pki)
    first, second = verifier.verify(field), verifier.verify(field)
    assert first is second and len(calls) == 1
    verifier.verify(_recipient_field(pki))                     # another document: verified
    assert len(calls) == 2
    time.sleep(1.2)                                             # past max_age: checked again, refused
    with pytest.raises(KmsError) as caught:
        verifier.verify(field)
    assert caught.value.code == "KMS.4006" and len(calls) == 3
    other_roots = RecipientVerifier(roots=(LocalPki.init(tmp_path / "other").root_certificate,))
    with pytest.raises(KmsError) as caught:                     # the cache belongs to one verifier
        other_roots.verify(_recipient_field(pki))
    assert caught.value.code == "KMS.4003"
