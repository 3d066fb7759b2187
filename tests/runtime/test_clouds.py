"""Cloud profiles: local documents have the real documents' CBOR skeleton (the Nitro fixture, and
QingTian's measured shape), chains have the real depth, pathLen and lifetimes and renew
themselves, PCRs and module ids follow each cloud, and ``attest issue`` / ``verify --cloud``."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qtbuild.cli import attest as attest_cli
from qtbuild.formats.attestation import read_document
from qtbuild.formats.attestation_encoding import NITRO, QINGTIAN, identify
from qtbuild.formats.cose import verify1
from qtbuild.formats.errors import SignatureError
from qtbuild.formats.measure import ZERO_PCR, Measurements, extend
from qtbuild.runtime.qtsm.clouds import NITRO_PROFILE, PROFILES, QINGTIAN_PROFILE, profile
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.issue import IssueError, issue_document
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.verifier.attestation import verify_document

from helpers.cbor_skeleton import document_skeleton

FIXTURE = Path(__file__).parent.parent / "fixtures" / "nitro-attestation-2026-02.cose.b64"
NITRO_TIME = datetime(2026, 2, 6, 8, 24, 18, 452000, tzinfo=UTC)
IMAGE = Measurements(pcr0=b"\x10" * 48, pcr1=b"\x11" * 48, pcr2=b"\x12" * 48, pcr8=b"\x18" * 48)
ED25519_SPKI = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPki:
    return LocalPki.init(tmp_path_factory.mktemp("state"))


def fixture_document() -> bytes:
    return base64.b64decode(FIXTURE.read_text())


def qingtian_skeleton(*, nonce: int, public_key: int) -> dict:
    """The QingTian document shape as measured on a real document (docs/attestation-shapes.md)."""
    def text(value: str) -> tuple:
        return ("text", 0, value)

    pcr_map = ("map", 0, 16, tuple((("uint", 2, index), ("bytes", 1, 48)) for index in range(16)))
    entries = (
        (text("module_id"), ("text", 1, 57)),
        (text("timestamp"), ("uint", 8)),
        (text("digest"), ("text", 0, 6)),
        (text("pcrs"), pcr_map),
        (text("certificate"), ("bytes", 2, None)),
        (text("cabundle"), ("array", 0, 4, (("bytes", 2, None),) * 4)),
        (text("user_data"), ("bytes", 0, 0)),
        (text("nonce"), ("bytes", 0 if nonce < 24 else 1, nonce)),
        (text("public_key"), ("bytes", 0 if public_key < 24 else 1, public_key)),
    )
    return {
        "envelope": ("array", 0, 4, (("bytes", 0, 11), ("map", 0, 0, ()), ("bytes", 2, None), ("bytes", 1, 96))),
        "protected": ("map", 0, 1, ((("uint", 4, 1), ("nint", 4)),)),
        "protected_bytes": "a11a000000013a00000022",
        "payload": ("map", 0, 9, entries),
    }


def local_nitro_like_fixture(pki: LocalPki) -> bytes:
    """A local Nitro document with the fixture's field sizes (289-byte user_data, 32-byte nonce)."""
    pcrs = {index: bytes([index + 1]) * 48 for index in range(5)}
    return issue_document(pki, NITRO_PROFILE, pcrs=pcrs, user_data=b"u" * 289, nonce=b"n" * 32)


# --------------------------------------------------------------------------- document skeletons


def test_local_nitro_document_has_the_real_fixtures_skeleton(pki):
    assert document_skeleton(local_nitro_like_fixture(pki)) == document_skeleton(fixture_document())


def test_local_qingtian_document_has_the_measured_skeleton(pki):
    document = issue_document(pki, QINGTIAN_PROFILE, pcrs={0: b"\x01" * 48}, nonce=b"n" * 32,
                              public_key=ED25519_SPKI)
    assert len(ED25519_SPKI) == 44
    assert document_skeleton(document) == qingtian_skeleton(nonce=32, public_key=44)


@pytest.mark.parametrize("field", ["protected", "key_order", "indefinite_map", "pcr_key_width", "empty_user_data"])
def test_dropping_a_quirk_changes_the_skeleton(pki, field):
    """Each quirk is visible to the skeleton tests: with one field of the other cloud's
    encoding, neither cloud's expected skeleton matches any more."""
    key, _, _ = pki.signer("quirk", "qingtian")()
    _, doc = read_document(issue_document(pki, QINGTIAN_PROFILE, nonce=b"n" * 32, public_key=ED25519_SPKI))
    doc = dataclasses.replace(doc, user_data=None)  # as requested: absent
    assert document_skeleton(QINGTIAN.sign(doc, key)) == qingtian_skeleton(nonce=32, public_key=44)
    broken = dataclasses.replace(QINGTIAN, **{field: getattr(NITRO, field)})
    assert document_skeleton(broken.sign(doc, key)) != qingtian_skeleton(nonce=32, public_key=44)
    _, nitro_doc = read_document(local_nitro_like_fixture(pki))
    key, _, _ = pki.signer("quirk", "nitro")()
    broken = dataclasses.replace(NITRO, **{field: getattr(QINGTIAN, field)})
    if field != "empty_user_data":  # the fixture has user_data, so the absent form cannot show
        assert document_skeleton(broken.sign(nitro_doc, key)) != document_skeleton(fixture_document())


def test_signature_byte_order_per_cloud(pki):
    for cloud, good, bad in (("qingtian", "little", "big"), ("nitro", "big", "little")):
        message, doc = read_document(issue_document(pki, profile(cloud), nonce=b"n"))
        leaf = x509.load_der_x509_certificate(doc.certificate).public_key()
        verify1(message, leaf, signature_encoding=good)
        with pytest.raises(SignatureError):
            verify1(message, leaf, signature_encoding=bad)


def test_absent_fields(pki):
    _, qingtian = read_document(issue_document(pki, QINGTIAN_PROFILE))
    _, nitro = read_document(issue_document(pki, NITRO_PROFILE))
    assert (qingtian.user_data, qingtian.nonce, qingtian.public_key) == (b"", None, None)
    assert (nitro.user_data, nitro.nonce, nitro.public_key) == (None, None, None)


def test_identify_names_the_shape(pki):
    assert identify(read_document(fixture_document())[0]) == "nitro"
    assert identify(read_document(issue_document(pki, QINGTIAN_PROFILE))[0]) == "qingtian"
    assert identify(read_document(issue_document(pki, NITRO_PROFILE))[0]) == "nitro"


# --------------------------------------------------------------------------- verification


def test_verifier_accepts_both_profiles_and_says_which_encoding(pki):
    pins = {"root_fingerprints": [pki.root_fingerprint()]}
    qingtian = verify_document(issue_document(pki, QINGTIAN_PROFILE, pcrs={0: b"\x01" * 48}), **pins)
    assert (qingtian.encoding, qingtian.signature_encoding) == ("qingtian", "little")
    nitro = verify_document(issue_document(pki, NITRO_PROFILE, pcrs={0: b"\x01" * 48},
                                           user_data=b"u" * 1024, nonce=b"n" * 1024), **pins)
    assert (nitro.encoding, nitro.signature_encoding) == ("nitro", "big")
    assert nitro.as_json()["encoding"] == "nitro"
    real = verify_document(fixture_document(), at=NITRO_TIME)
    assert (real.platform, real.encoding, real.signature_encoding) == ("nitro", "nitro", "big")


# --------------------------------------------------------------------------- chains


@pytest.mark.parametrize("cloud", ["qingtian", "nitro"])
def test_chain_depth_pathlen_and_lifetimes(pki, cloud):
    spec = PROFILES[cloud]
    chain = [x509.load_der_x509_certificate(der) for der in pki.cabundle(cloud)]
    assert len(chain) == 4 and chain[0] == pki.root_certificate
    lengths = [cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length for cert in chain]
    assert lengths == ([None, 3, 2, 1] if cloud == "qingtian" else [None, 2, 1, 0])
    lifetimes = [cert.not_valid_after_utc - cert.not_valid_before_utc for cert in chain]
    assert lifetimes[0] > timedelta(days=29 * 365)
    for lifetime, level in zip(lifetimes[1:], spec.intermediates, strict=True):
        assert level.validity <= lifetime <= level.validity + timedelta(minutes=5)
    assert [level.validity.days for level in spec.intermediates] == [20, 6, 1]
    for child, parent in zip(chain[1:], chain, strict=False):
        assert child.issuer == parent.subject
    _, leaf = pki.issue_leaf("enc-1", cloud)
    assert leaf.issuer == chain[-1].subject
    assert timedelta(hours=3) <= leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=3, minutes=5)
    has_aki = any(isinstance(ext.value, x509.AuthorityKeyIdentifier) for ext in leaf.extensions)
    assert has_aki == (cloud == "qingtian")


def test_short_lived_certificates_are_reissued_so_the_pki_never_expires(tmp_path):
    start = datetime(2026, 1, 1, tzinfo=UTC)
    now = [start]
    LocalPki.init(tmp_path)
    pki = LocalPki.load(tmp_path, clock=lambda: now[0])
    first = pki.cabundle("qingtian")
    assert LocalPki.load(tmp_path, clock=lambda: now[0]).cabundle("qingtian") == first  # stored, reused
    now[0] = start + timedelta(days=5, hours=12)  # grid (6 d) has < 1 d (the instance's life) left
    second = pki.cabundle("qingtian")
    assert second[:2] == first[:2] and second[2] != first[2] and second[3] != first[3]
    now[0] = start + timedelta(days=15)  # region (20 d) has < 6 d left
    third = pki.cabundle("qingtian")
    assert third[0] == first[0] and all(a != b for a, b in zip(third[1:], second[1:], strict=True))
    for years in (1, 10, 29):
        now[0] = start + timedelta(days=365 * years)
        pins = {"root_fingerprints": [pki.root_fingerprint()]}
        for spec in PROFILES.values():
            document = issue_document(pki, spec, pcrs={0: b"\x01" * 48}, clock=lambda: now[0].timestamp())
            assert verify_document(document, at=now[0], **pins).encoding == spec.name


def test_leaf_is_replaced_near_its_end(tmp_path):
    start = datetime(2026, 1, 1, tzinfo=UTC)
    now = [start]
    LocalPki.init(tmp_path)
    pki = LocalPki.load(tmp_path, clock=lambda: now[0])
    _, leaf = pki.issue_leaf("enc-1", "nitro")
    now[0] = start + timedelta(hours=2)
    assert pki.issue_leaf("enc-1", "nitro")[1] == leaf
    now[0] = start + timedelta(hours=2, minutes=40)
    assert pki.issue_leaf("enc-1", "nitro")[1] != leaf


# --------------------------------------------------------------------------- PCRs, module ids, limits


def test_boot_pcrs_per_cloud():
    qingtian = QINGTIAN_PROFILE.boot_pcrs(IMAGE, parent_id="6c9c1a4e-0d3b-4c59-9f83-6f0b5d1b2a77")
    assert sorted(qingtian) == [0, 4, 8]  # PCR1/PCR2 stay zero on QingTian
    assert qingtian[4] == extend(b"6c9c1a4e-0d3b-4c59-9f83-6f0b5d1b2a77")
    nitro = NITRO_PROFILE.boot_pcrs(IMAGE, parent_id="i-0761a4cbcc7632aef", parent_role="arn:aws:iam::1:role/r")
    assert sorted(nitro) == [0, 1, 2, 3, 4, 8]
    assert (nitro[1], nitro[2], nitro[3]) == (IMAGE.pcr1, IMAGE.pcr2, extend(b"arn:aws:iam::1:role/r"))


def test_parent_and_module_ids():
    seed = b"machine"
    qingtian_parent = QINGTIAN_PROFILE.parent_id(None, seed)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", qingtian_parent)
    assert QINGTIAN_PROFILE.parent_id(None, seed) == qingtian_parent  # deterministic
    module_id = QINGTIAN_PROFILE.module_id("enclave-1-abc", qingtian_parent)
    assert len(module_id) == 57 and re.fullmatch(qingtian_parent + r"\.[a-z]{3}-[0-9a-f]{16}", module_id)
    given = "6C9C1A4E-0D3B-4C59-9F83-6F0B5D1B2A77"
    assert QINGTIAN_PROFILE.parent_id(given, seed) == given.lower()
    nitro_parent = NITRO_PROFILE.parent_id(None, seed)
    assert re.fullmatch(r"i-[0-9a-f]{17}", nitro_parent)
    assert NITRO_PROFILE.parent_id("i-0761a4cbcc7632aef", seed) == "i-0761a4cbcc7632aef"
    assert re.fullmatch(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}", NITRO_PROFILE.module_id("e", nitro_parent))
    QINGTIAN_PROFILE.check_instance_id(given)
    NITRO_PROFILE.check_instance_id("i-0761a4cbcc7632aef")
    for spec, wrong in ((QINGTIAN_PROFILE, "i-0761a4cbcc7632aef"), (NITRO_PROFILE, given), (NITRO_PROFILE, "i-12")):
        with pytest.raises(ValueError, match="parent instance ids are"):
            spec.check_instance_id(wrong)


def test_security_module_limits_per_cloud(pki):
    for spec, allowed in ((QINGTIAN_PROFILE, 512), (NITRO_PROFILE, 1024)):
        device = SecurityModule({0: b"\x01" * 48}, debug=False, signer=pki.signer("enc-2", spec.name),
                                module_id=spec.module_id("enc-2", spec.parent_id(None, b"m")), profile=spec)
        assert identify(read_document(device.attestation(user_data=b"u" * allowed, nonce=b"n" * allowed))[0]) \
            == spec.name
        response = cbor2.loads(device.handle(cbor2.dumps({"Attestation": {"user_data": b"u" * (allowed + 1)}})))
        assert response == {"Error": "InputTooLarge"}


def test_issue_refuses_what_the_cloud_would(pki):
    with pytest.raises(IssueError, match="user_data"):
        issue_document(pki, QINGTIAN_PROFILE, user_data=b"u" * 513)
    with pytest.raises(IssueError, match="--debug"):
        issue_document(pki, NITRO_PROFILE, pcrs={0: b"\x01" * 48}, debug=True)
    _, debug = read_document(issue_document(pki, NITRO_PROFILE, debug=True, pcrs={16: b"\x02" * 48}))
    assert all(debug.pcrs[index] == ZERO_PCR for index in range(16)) and debug.pcrs[16] == b"\x02" * 48


# --------------------------------------------------------------------------- CLI


def test_attest_issue_and_verify_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    (tmp_path / "nonce").write_bytes(b"n" * 16)
    pcr0 = "ab" * 48
    for cloud in ("qingtian", "nitro"):
        output = tmp_path / f"{cloud}.doc"
        result = runner.invoke(attest_cli.command, ["issue", "--cloud", cloud, "--pcr", f"0={pcr0}",
                                                    "--nonce", str(tmp_path / "nonce"), "-o", str(output), "--json"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(attest_cli.command, ["verify", str(output), "--cloud", cloud, "--json",
                                                    "--expect-pcr", f"0={pcr0}", "--nonce", "6e" * 16])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.output)
        assert summary["encoding"] == cloud and summary["platform"] == cloud
        old = runner.invoke(attest_cli.command, ["verify", str(output), "--platform", cloud])
        assert old.exit_code == 0, old.output
    clash = runner.invoke(attest_cli.command, ["verify", str(tmp_path / "nitro.doc"), "--cloud", "nitro",
                                               "--platform", "qingtian"])
    assert clash.exit_code == 2 and "--platform" in clash.output
    assert "--platform" not in runner.invoke(attest_cli.command, ["verify", "--help"]).output
    (tmp_path / "big").write_bytes(b"u" * 513)
    refused = runner.invoke(attest_cli.command, ["issue", "--user-data", str(tmp_path / "big"),
                                                 "-o", str(tmp_path / "x.doc")])
    assert refused.exit_code == 2 and "user_data" in refused.output and not (tmp_path / "x.doc").exists()


def test_response_size_limit_per_cloud(pki):
    """A response between Nitro's 0x3000 and libqtsm's 0x6000 bytes: QingTian returns it, Nitro
    answers BufferTooSmall (as NSM_RESPONSE_MAX_SIZE makes the real NSM do)."""
    key, _, _ = pki.signer("big", "nitro")()

    def bulky():
        return key, b"\x30" * 4000, [b"\x30" * 4000] * 3

    request = cbor2.dumps({"Attestation": {"user_data": b"u" * 512}})
    for spec, fits in ((QINGTIAN_PROFILE, True), (NITRO_PROFILE, False)):
        device = SecurityModule({0: b"\x01" * 48}, debug=False, signer=bulky, module_id="m", profile=spec)
        response = cbor2.loads(device.handle(request))
        if fits:
            assert 0x3000 < len(response["Attestation"]["document"]) <= 0x6000
        else:
            assert response == {"Error": "BufferTooSmall"}
