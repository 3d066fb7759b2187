"""qtbuild/cli/attestation_options.py: the trust and PCR options `kms` and `handoff` share turn
into a verifier and PCR values, or a one-line InputError naming the option or file."""

from __future__ import annotations

import json

import pytest

from qtbuild.cli.attestation_options import measured_pcrs, pcr_hex, recipient_verifier
from qtbuild.cli.errors import InputError
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.verifier.attestation import KNOWN_ROOTS

PCR = "Ab" * 48


def test_pcr_hex_is_lower_case_and_names_the_option_when_wrong():
    assert pcr_hex(f" {PCR}\n", "--pcr0") == PCR.lower()
    for bad in ("ab" * 47, "zz" * 48, "ab " * 32):
        with pytest.raises(InputError, match="^--pcr8: expected 96 hex digits"):
            pcr_hex(bad, "--pcr8")


def test_measured_pcrs_keeps_pcr8_only_when_the_image_is_signed(tmp_path):
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"Measurements": {"PCR0": PCR, "PCR8": "00" * 48}}))
    assert measured_pcrs(str(path)) == {0: bytes.fromhex(PCR)}
    path.write_text(json.dumps({"PCR0": PCR, "PCR8": "11" * 48}))
    assert measured_pcrs(str(path)) == {0: bytes.fromhex(PCR), 8: b"\x11" * 48}
    path.write_text(json.dumps({"PCR1": PCR}))
    with pytest.raises(InputError, match="no PCR0"):
        measured_pcrs(str(path))


def test_the_verifier_trusts_what_the_options_name(tmp_path, monkeypatch):
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(tmp_path / "state"))
    pki = LocalPki.init(tmp_path / "state")
    verifier = recipient_verifier([], ["AA:" * 31 + "AA"], hardware=True, max_age="2m", allow_debug=True)
    assert verifier.roots == (pki.root_certificate,)
    assert verifier.root_fingerprints == ("aa" * 32, *KNOWN_ROOTS.values())
    assert (verifier.max_age, verifier.allow_debug) == (120, True)
    assert recipient_verifier([], no_local=True).roots == ()


def test_bad_roots_are_input_errors_naming_them(tmp_path):
    not_pem = tmp_path / "root.pem"
    not_pem.write_text("hello")
    with pytest.raises(InputError, match=f"^{not_pem}: not a PEM certificate"):
        recipient_verifier([str(not_pem)], no_local=True)
    with pytest.raises(InputError, match="^--attestation-root-fingerprint: "):
        recipient_verifier([], ["abc"], no_local=True)


def test_without_a_local_pki_the_note_names_no_other_command(tmp_path, monkeypatch, capsys):
    # handoff shares this option handling: its note used to start "qtbuild kms:"
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(tmp_path / "empty"))
    verifier = recipient_verifier([], hardware=True)
    assert verifier.roots == ()
    assert capsys.readouterr().err.strip() == "note: no local attestation PKI (qtbuild pki init): not trusting it"
