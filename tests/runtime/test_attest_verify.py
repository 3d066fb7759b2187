"""The attestation verifier: local documents round-trip, each tampering fails the right check,
real documents of both platforms' shapes verify, and the ``attest`` / ``pki`` commands."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings

import qtbuild.runtime.qtsm.pki as pki_module
from qtbuild.cli import attest as attest_cli
from qtbuild.cli import pki as pki_cli
from qtbuild.formats.attestation import (
    AttestationDocument,
    encode_payload,
    sign_document,
)
from qtbuild.formats.cose import der_to_raw, sig_structure, sign1
from qtbuild.formats.measure import ZERO_PCR
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.verifier.attestation import AttestationError, fingerprint, verify_document

from helpers import mutated

FIXTURE = Path(__file__).parent.parent / "fixtures" / "nitro-attestation-2026-02.cose.b64"
NITRO_ROOT = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
NITRO_TIME = datetime(2026, 2, 6, 8, 24, 18, 452000, tzinfo=UTC)
PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> LocalPki:
    return LocalPki.init(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def pins(pki) -> dict:
    return {"root_fingerprints": [pki.root_fingerprint()]}


def make_doc(pki: LocalPki, **changes) -> AttestationDocument:
    _, leaf = pki.issue_leaf("enc-1")
    doc = AttestationDocument(
        module_id="i-0123456789abcdef0-enc0123456789abcdef",
        timestamp=int(time.time() * 1000),
        pcrs=PCRS,
        certificate=leaf.public_bytes(serialization.Encoding.DER),
        cabundle=tuple(pki.cabundle()),
        user_data=b"user",
        nonce=b"nonce",
        public_key=b"public key",
    )
    return dataclasses.replace(doc, **changes)


def issue(pki: LocalPki, **changes) -> bytes:
    return sign_document(make_doc(pki, **changes), pki.issue_leaf("enc-1")[0])


def fails(check: str, data: bytes, **options) -> AttestationError:
    with pytest.raises(AttestationError) as caught:
        verify_document(data, **options)
    assert caught.value.check == check, caught.value
    return caught.value


def fixture_document() -> bytes:
    return base64.b64decode(FIXTURE.read_text())


# --------------------------------------------------------------------------- round trip


def test_device_document_round_trips(pki, pins):
    device = SecurityModule(PCRS, debug=False, signer=pki.signer("enc-1"),
                            module_id="i-0123456789abcdef0-enc0123456789abcdef")
    document = device.attestation(user_data=b"u", nonce=b"n", public_key=b"k")
    verified = verify_document(document, **pins, expect_pcrs={0: PCRS[0], 8: PCRS[8]},
                               nonce=b"n", public_key=b"k", max_age=60)
    assert verified.platform == "local" and verified.signature_encoding == "little"  # QingTian profile
    assert verified.encoding == "qingtian"
    assert verified.module_id == device.module_id and verified.pcrs == PCRS
    assert (verified.user_data, verified.nonce, verified.public_key) == (b"u", b"n", b"k")
    assert not verified.is_debug and not verified.tagged
    assert verified.root_fingerprint == pki.root_fingerprint()
    assert verified.certificate == pki.issue_leaf("enc-1")[1]
    assert abs(verified.timestamp - datetime.now(UTC)) < timedelta(seconds=10)


def test_pinning_by_certificate_and_tag_18(pki):
    document = issue(pki)
    assert verify_document(document, roots=[pki.root_certificate]).module_id
    tagged = verify_document(b"\xd2" + document, roots=[pki.root_certificate])
    assert tagged.tagged


# --------------------------------------------------------------------------- tampering


def _replace_payload(document: bytes, payload: bytes) -> bytes:
    protected, unprotected, _, signature = cbor2.loads(document)
    return cbor2.dumps([protected, unprotected, payload, signature])


def test_payload_byte_changed(pki, pins):
    document = issue(pki)
    payload = bytearray(cbor2.loads(document)[2])
    payload[payload.index(PCRS[5])] ^= 0x01
    fails("signature", _replace_payload(document, bytes(payload)), **pins)


def test_signature_changed(pki, pins):
    document = bytearray(issue(pki))
    document[-1] ^= 0x80
    fails("signature", bytes(document), **pins)


def test_wrong_root(pki, tmp_path):
    other = LocalPki.init(tmp_path)
    error = fails("root", issue(pki), root_fingerprints=[other.root_fingerprint()])
    assert pki.root_fingerprint() in error.message
    fails("root", issue(pki), roots=[other.root_certificate])
    fails("root", issue(pki))  # by default only the Nitro and QingTian roots are pinned


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject, key, issuer, issuer_key, *, ca=True, path_length=None, key_cert_sign=True,
          digital_signature=True, hours=24, start=None):
    start = start or datetime.now(UTC) - timedelta(hours=1)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA384())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def look_alike(pki: LocalPki, *, keep_real_root: bool, **leaf_options) -> bytes:
    """A document from an attacker's chain whose names copy the real one's."""
    real = [x509.load_der_x509_certificate(der) for der in pki.cabundle()]
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(4)]
    root = _cert(real[0].subject, keys[0], real[0].subject, keys[0], hours=24 * 365)
    region = _cert(real[1].subject, keys[1], real[0].subject, keys[0], path_length=1)
    host = _cert(real[2].subject, keys[2], real[1].subject, keys[1], path_length=0)
    leaf = _cert(_name("enclave"), keys[3], real[2].subject, keys[2], ca=False,
                 key_cert_sign=False, **leaf_options)
    bundle = (pki.cabundle()[0] if keep_real_root else _der(root), _der(region), _der(host))
    return sign_document(make_doc(pki, certificate=_der(leaf), cabundle=bundle), keys[3])


def test_self_signed_look_alike_chain(pki, pins):
    fails("root", look_alike(pki, keep_real_root=False), **pins)
    error = fails("chain", look_alike(pki, keep_real_root=True), **pins)
    assert "is not issued by" in error.message


def _custom_chain(pki, *, root_options=None, leaf_options=None, intermediate_options=None):
    """A document under a fresh root → intermediate → leaf chain with chosen extensions."""
    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    root = _cert(_name("root"), keys[0], _name("root"), keys[0], **(root_options or {}))
    middle = _cert(_name("middle"), keys[1], _name("root"), keys[0],
                   **{"path_length": 0, **(intermediate_options or {})})
    leaf = _cert(_name("leaf"), keys[2], _name("middle"), keys[1],
                 **{"ca": False, "key_cert_sign": False, **(leaf_options or {})})
    doc = make_doc(pki, certificate=_der(leaf), cabundle=(_der(root), _der(middle)))
    return sign_document(doc, keys[2]), fingerprint(root)


@pytest.mark.parametrize(
    "options, problem",
    [
        ({}, None),
        ({"leaf_options": {"ca": True}}, "is a CA"),
        ({"leaf_options": {"digital_signature": False}}, "digitalSignature"),
        ({"intermediate_options": {"ca": False, "path_length": None}}, "not a CA"),
        ({"intermediate_options": {"key_cert_sign": False}}, "keyCertSign"),
        ({"root_options": {"path_length": 0}}, "pathLen 0"),
    ],
)
def test_chain_constraints(pki, options, problem):
    document, root = _custom_chain(pki, **options)
    if problem is None:
        assert verify_document(document, root_fingerprints=[root]).platform == "local"
    else:
        assert problem in fails("chain", document, root_fingerprints=[root]).message


def test_expired_leaf(pki, pins, monkeypatch):
    long_ago = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=5)
    monkeypatch.setattr(pki_module, "_now", lambda: long_ago)
    key, leaf = pki.issue_leaf("expired-enclave")
    monkeypatch.undo()
    doc = make_doc(pki, certificate=_der(leaf))
    error = fails("validity", sign_document(doc, key), **pins)
    assert "expired" in error.message


def test_future_and_past_check_times(pki, pins):
    document = issue(pki)
    now = datetime.now(UTC)
    assert "expired" in fails("validity", document, **pins, at=now + timedelta(hours=4)).message
    assert "not yet valid" in fails("validity", document, **pins,
                                    at=now - timedelta(days=1)).message
    assert verify_document(document, **pins, at=now + timedelta(hours=2)).module_id


def test_stale_and_future_timestamps(pki, pins):
    now_ms = int(time.time() * 1000)
    stale = issue(pki, timestamp=now_ms - 3_600_000)
    assert verify_document(stale, **pins).module_id  # no age limit asked
    fails("age", stale, **pins, max_age=300)
    assert verify_document(stale, **pins, max_age=7200).module_id
    ahead = issue(pki, timestamp=now_ms + 3_600_000)
    assert "future" in fails("age", ahead, **pins, max_age=300).message
    at = datetime.now(UTC) + timedelta(hours=1, minutes=1)
    assert verify_document(ahead, **pins, max_age=300, at=at).module_id  # age from --at


@pytest.mark.parametrize(
    "changes",
    [{"user_data": b"u" * 513}, {"nonce": b"n" * 513}, {"public_key": b"k" * 1025},
     {"pcrs": {**PCRS, 40: ZERO_PCR}}, {"digest": "SHA256"}],
)
def test_oversized_or_malformed_fields(pki, pins, changes):
    fails("syntax", issue(pki, **changes), **pins)


def test_nitro_limits_are_wider(pki, pins):
    document = issue(pki, user_data=b"u" * 1024)
    fails("syntax", document, **pins)
    assert verify_document(document, **pins, platform="nitro").user_data == b"u" * 1024


def test_wrong_alg(pki, pins):
    key = ec.generate_private_key(ec.SECP256R1())
    document = sign1(encode_payload(make_doc(pki)), key)
    assert "ES384" in fails("alg", document, **pins).message


def test_trailing_bytes_and_garbage(pki, pins):
    fails("input", issue(pki) + b"\x00", **pins)
    fails("input", b"", **pins)
    fails("input", b"\x84" + b"\x40" * 4, **pins)
    fails("input", b"\x00" * 40_000, **pins)
    fails("syntax", _replace_payload(issue(pki), b"\xff"), **pins)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated([fixture_document()]))
def test_mutations_only_raise_attestation_errors(data):
    with contextlib.suppress(AttestationError):
        verify_document(data, root_fingerprints=[NITRO_ROOT], at=NITRO_TIME)


# --------------------------------------------------------------------------- policy


def test_policy_checks(pki, pins):
    document = issue(pki)
    assert "PCR3" in fails("pcrs", document, **pins, expect_pcrs={3: ZERO_PCR}).message
    fails("pcrs", document, **pins, expect_pcrs={20: ZERO_PCR})
    fails("nonce", document, **pins, nonce=b"other")
    fails("nonce", issue(pki, nonce=None), **pins, nonce=b"nonce")
    fails("public_key", document, **pins, public_key=b"other")
    debug = issue(pki, pcrs={index: ZERO_PCR for index in range(16)})
    fails("debug", debug, **pins)
    assert verify_document(debug, **pins, allow_debug=True).is_debug


def test_bad_arguments_raise_value_error(pki):
    with pytest.raises(ValueError):
        verify_document(issue(pki), platform="sgx")
    with pytest.raises(ValueError):
        verify_document(issue(pki), root_fingerprints=["abc"])


# --------------------------------------------------------------------------- real documents


def test_nitro_fixture_verifies_at_its_own_time():
    verified = verify_document(fixture_document(), root_fingerprints=[NITRO_ROOT], at=NITRO_TIME)
    assert verified.platform == "nitro" and verified.signature_encoding == "big"
    assert verified.module_id == "i-0761a4cbcc7632aef-enc019c320cb32f6b7a"
    assert verified.timestamp == NITRO_TIME and not verified.is_debug
    assert verified.public_key is None and len(verified.nonce) == 32
    assert verify_document(fixture_document(), at=NITRO_TIME).platform == "nitro"  # default pins
    verify_document(fixture_document(), root_fingerprints=[NITRO_ROOT], at=NITRO_TIME,
                    max_age=60, expect_pcrs={0: verified.pcrs[0]})


def test_nitro_fixture_fails_today_and_under_other_pins(pki):
    error = fails("validity", fixture_document(), root_fingerprints=[NITRO_ROOT])
    assert "expired" in error.message
    fails("root", fixture_document(), root_fingerprints=[pki.root_fingerprint()], at=NITRO_TIME)
    fails("age", fixture_document(), root_fingerprints=[NITRO_ROOT],
          at=NITRO_TIME + timedelta(hours=1), max_age=300)


def qingtian_style(pki: LocalPki, doc: AttestationDocument) -> bytes:
    """A document as QingTian writes it: protected header {1: -35} with 4-byte integers and
    r, s stored little-endian."""
    key, _ = pki.issue_leaf("enc-1")
    protected = bytes.fromhex("a11a000000013a00000022")
    payload = encode_payload(doc)
    der = key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    raw = der_to_raw(der, 48)
    little = raw[:48][::-1] + raw[48:][::-1]
    return cbor2.dumps([protected, {}, payload, little])


def test_qingtian_little_endian_signatures(pki, pins):
    document = qingtian_style(pki, make_doc(pki))
    verified = verify_document(document, **pins, platform="qingtian")
    assert verified.signature_encoding == "little" and verified.platform == "qingtian"
    # auto → local: either form (the local QingTian profile writes little-endian)
    assert verify_document(document, **pins).signature_encoding == "little"
    error = fails("signature", document, **pins, platform="nitro")
    assert "big-endian" in error.message and "little" not in error.message
    big = verify_document(issue(pki), **pins, platform="qingtian")
    assert big.signature_encoding == "big"


# --------------------------------------------------------------------------- command line


def run(command, *args, input=None):
    result = CliRunner().invoke(command, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def doc_file(pki, tmp_path) -> Path:
    path = tmp_path / "doc.cbor"
    path.write_bytes(issue(pki))
    return path


def test_cli_verify_valid(pki, doc_file, tmp_path):
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(pki.root_certificate.public_bytes(serialization.Encoding.PEM))
    code, out, _ = run(attest_cli.command, "verify", str(doc_file), "--root", str(root_pem),
                       "--expect-pcr", f"1={PCRS[1].hex()}", "--nonce", b"nonce".hex(),
                       "--max-age", "5m")
    assert code == 0 and "valid local attestation document" in out
    code, out, _ = run(attest_cli.command, "verify", str(doc_file), "--json",
                       "--root-fingerprint", pki.root_fingerprint().upper())
    assert code == 0 and json.loads(out)["valid"] is True
    base64_file = tmp_path / "doc.b64"
    base64_file.write_text(base64.encodebytes(doc_file.read_bytes()).decode())
    code, _, _ = run(attest_cli.command, "verify", "-", "--root-fingerprint",
                     pki.root_fingerprint(), input=base64_file.read_bytes())
    assert code == 0


def test_cli_verify_public_key_option(pki, tmp_path):
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    spki = key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)
    document = tmp_path / "doc.cbor"
    document.write_bytes(issue(pki, public_key=spki))
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    pin = ["--root-fingerprint", pki.root_fingerprint()]
    assert run(attest_cli.command, "verify", str(document), *pin, "--public-key", str(pem))[0] == 0
    other = tmp_path / "other.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = run(attest_cli.command, "verify", str(document), *pin,
                       "--public-key", str(other))
    assert code == 1 and "'public_key'" in err


def test_cli_verify_invalid_and_unreadable(pki, doc_file, tmp_path):
    pin = ["--root-fingerprint", pki.root_fingerprint()]
    code, _, err = run(attest_cli.command, "verify", str(doc_file), *pin, "--nonce", "00")
    assert code == 1 and "check 'nonce' failed" in err
    code, out, _ = run(attest_cli.command, "verify", str(doc_file), *pin, "--at",
                       "2099-01-01T00:00:00Z", "--json")
    assert code == 1 and json.loads(out) | {"message": ""} == {
        "valid": False, "check": "validity", "message": ""}
    code, _, err = run(attest_cli.command, "verify", str(doc_file), "--root-fingerprint", "0" * 64)
    assert code == 1 and "'root'" in err
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x84\x01")
    assert run(attest_cli.command, "verify", str(garbage), *pin)[0] == 2
    garbage.write_text("not base64 !")
    assert run(attest_cli.command, "verify", str(garbage), *pin)[0] == 2
    assert run(attest_cli.command, "verify", str(tmp_path / "missing"), *pin)[0] == 2
    for option in (["--max-age", "soon"], ["--at", "yesterday"], ["--expect-pcr", "40=00"],
                   ["--nonce", "zz"], ["--root-fingerprint", "12"]):
        assert run(attest_cli.command, "verify", str(doc_file), *option)[0] == 2, option


def test_cli_nitro_fixture():
    code, out, _ = run(attest_cli.command, "verify", str(FIXTURE), "--root-fingerprint",
                       NITRO_ROOT, "--at", "2026-02-06T08:24:19Z", "--platform", "nitro")
    assert code == 0 and "valid nitro attestation document" in out
    code, _, err = run(attest_cli.command, "verify", str(FIXTURE), "--root-fingerprint", NITRO_ROOT)
    assert code == 1 and "check 'validity' failed" in err


def test_cli_default_pins_include_the_local_root(pki, doc_file, monkeypatch):
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(pki.directory.parent))
    assert run(attest_cli.command, "verify", str(doc_file))[0] == 0


def test_cli_pki(tmp_path):
    state = ["--state-dir", str(tmp_path)]
    code, _, err = run(pki_cli.command, "show", *state)
    assert code == 2 and "pki init" in err
    code, out, _ = run(pki_cli.command, "init", *state)
    fingerprint_line = out.strip()
    assert code == 0 and len(fingerprint_line) == 64
    code, out, err = run(pki_cli.command, "init", *state)
    assert code == 0 and out.strip() == fingerprint_line and "--force" in err
    code, out, _ = run(pki_cli.command, "show", *state)
    assert code == 0 and fingerprint_line in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["root", "region", "grid", "instance"]
    code, out, _ = run(pki_cli.command, "show", *state, "--cloud", "nitro")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["root", "region", "zone", "instance"]
    code, out, _ = run(pki_cli.command, "show", *state, "--json")
    assert json.loads(out)["root_fingerprint"] == fingerprint_line
    assert len(json.loads(out)["chain"]) == 4
    code, out, _ = run(pki_cli.command, "export-root", *state)
    assert fingerprint(x509.load_pem_x509_certificate(out.encode())) == fingerprint_line
    target = tmp_path / "root.der"
    assert run(pki_cli.command, "export-root", *state, "--der", "-o", str(target))[0] == 0
    assert fingerprint(x509.load_der_x509_certificate(target.read_bytes())) == fingerprint_line
    code, out, _ = run(pki_cli.command, "init", *state, "--force")
    assert code == 0 and out.strip() != fingerprint_line
