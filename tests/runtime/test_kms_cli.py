"""``qtbuild kms``: serve as a real process, the seed workflow through the admin commands, restart,
and ``kill -9`` under write load losing no acknowledged key."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtbuild.cli import kms as kms_cli
from qtbuild.runtime.kms.state import read_credentials
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.kms_client import KmsClient, KmsClientError, tcp_transport

PCRS = {index: bytes([0x30 + index]) * 48 for index in range(16)}
MODULE = "i-0000000000000000a-enc0000000000000002"
SERVE = "from qtbuild.cli.kms import command; command(prog_name='qtbuild kms')"


class Served:
    """``qtbuild kms serve`` in a child process, on 127.0.0.1 and an ephemeral port."""

    def __init__(self, state_dir: Path, qtbuild_state: Path, *extra: str) -> None:
        env = {**os.environ, "QTBUILD_STATE_DIR": str(qtbuild_state)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", "--state-dir", str(state_dir),
             "--listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            cwd=Path(__file__).resolve().parents[2])
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        if not ready:
            self.process.kill()
            raise AssertionError("kms serve did not start")
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(self.process.stderr.read().decode())
        info = json.loads(line)
        self.endpoint, self.credentials_file = info["endpoint"], info["credentials"]
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def admin(self) -> KmsClient:
        _, credentials = read_credentials(self.credentials_file)
        return KmsClient(tcp_transport("127.0.0.1", self.port, timeout=10), credentials)

    def cli(self, *args: str, input: bytes | None = None) -> str:
        result = CliRunner().invoke(kms_cli.command, [*args, "--credentials",
                                                      self.credentials_file], input=input)
        assert result.exit_code == 0, result.output
        return result.stdout

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(20)
        finally:
            self.process.stdout.close()
            self.process.stderr.close()


@pytest.fixture()
def dirs(tmp_path):
    qtbuild_state = tmp_path / "qtbuild"
    pki = LocalPki.init(qtbuild_state)
    return tmp_path / "kms", qtbuild_state, pki


def test_seed_workflow_through_the_cli_and_a_restart(dirs, tmp_path):
    state_dir, qtbuild_state, pki = dirs
    served = Served(state_dir, qtbuild_state)
    try:
        assert (state_dir / "master.key").stat().st_mode & 0o777 == 0o600
        key_id = json.loads(served.cli("create-key", "--alias", "bank-cards"))["key_id"]
        secret = tmp_path / "card.txt"
        secret.write_bytes(b"6222 0000 1111 2222")
        served.cli("encrypt", "--key-id", key_id, "--in", str(secret), "--aad", "card",
                   "--out", str(tmp_path / "card.enc"))
        cipher_text = (tmp_path / "card.enc").read_text().strip()
        enclave_file = tmp_path / "enclave.json"
        created = json.loads(served.cli("principal", "create", "enclave", "--out",
                                        str(enclave_file)))
        policy = {"Version": "1.1", "Statement": [{
            "Effect": "Allow", "Action": ["kms:cmk:decrypt"],
            "Condition": {"StringEqualsIgnoreCase": {
                "kms:RecipientAttestation/PCR0": [PCRS[0].hex()]}}}]}
        (tmp_path / "policy.json").write_text(json.dumps(policy))
        served.cli("policy", "put", str(tmp_path / "policy.json"), "--name", "enclave")
        shown = json.loads(served.cli("policy", "get", "--access-key", created["access_key"]))
        assert shown["policy"] == policy

        _, enclave = read_credentials(enclave_file)
        device = SecurityModule(PCRS, debug=False, signer=pki.signer("seed"),
                                module_id="i-0000000000000000a-enc0000000000000001")
        client = KmsClient(tcp_transport("127.0.0.1", served.port), enclave, attestor=device)
        assert client.decrypt_data(cipher_text, aad=b"card") == b"6222 0000 1111 2222"
        audit = served.cli("audit", "--principal", "enclave")
        assert "decrypt-data" in audit and "allow" in audit and PCRS[0].hex()[:16] in audit
        assert served.stop() == 0
    finally:
        if served.process.poll() is None:
            served.process.kill()

    restarted = Served(state_dir, qtbuild_state)
    try:
        client = KmsClient(tcp_transport("127.0.0.1", restarted.port), enclave, attestor=device)
        assert client.decrypt_data(cipher_text, aad=b"card") == b"6222 0000 1111 2222"
        assert json.loads(restarted.cli("policy", "get", "--name", "enclave"))["policy"] == policy
    finally:
        restarted.stop()


def test_cli_reports_refusals_and_missing_credentials(dirs, tmp_path):
    state_dir, qtbuild_state, _ = dirs
    served = Served(state_dir, qtbuild_state)
    try:
        result = CliRunner().invoke(kms_cli.command, [
            "encrypt", "--key-id", "00000000-0000-4000-8000-000000000000", "--in", "-",
            "--credentials", served.credentials_file], input=b"data")
        assert result.exit_code == 1 and "KMS.0207" in result.output
        result = CliRunner().invoke(kms_cli.command, [
            "create-key", "--alias", "x", "--credentials", str(tmp_path / "missing.json")])
        assert result.exit_code == 2 and "no credentials" in result.output
        result = CliRunner().invoke(kms_cli.command, [
            "policy", "put", "-", "--name", "admin", "--credentials", served.credentials_file],
            input=b'{"Version": "9"}')
        assert result.exit_code == 1 and "KMS.0308" in result.output
    finally:
        served.stop()


def test_kill_9_under_write_load_loses_no_acknowledged_key(dirs):
    state_dir, qtbuild_state, _ = dirs
    served = Served(state_dir, qtbuild_state)
    acknowledged: list[tuple[str, str, bytes]] = []
    lock, started = threading.Lock(), threading.Event()

    def writer(worker: int) -> None:
        client = served.admin()
        for index in range(500):
            try:
                key_id = client.call("create-key", {"key_alias": f"w{worker}-{index}"}
                                     )["key_info"]["key_id"]
                plaintext = f"{worker}:{index}".encode()
                cipher_text = client.encrypt_data(key_id, plaintext)
            except (OSError, KmsClientError, http.client.HTTPException):
                return
            with lock:
                acknowledged.append((key_id, cipher_text, plaintext))
            started.set()

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    assert started.wait(30)
    time.sleep(1.0)
    served.stop(signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    with lock:
        acked = list(acknowledged)
    assert len(acked) > 10
    print(f"{len(acked)} keys acknowledged before kill -9")

    restarted = Served(state_dir, qtbuild_state)
    try:
        client = restarted.admin()
        for key_id, cipher_text, plaintext in acked:
            assert client.call("describe-key", {"key_id": key_id})["key_info"]["key_state"] == "2"
            assert client.decrypt_data(cipher_text) == plaintext
    finally:
        restarted.stop()


def test_generated_policy_check_and_credentials_from_the_environment(dirs, tmp_path, monkeypatch):
    state_dir, qtbuild_state, pki = dirs
    served = Served(state_dir, qtbuild_state)
    monkeypatch.setenv("QTBUILD_STATE_DIR", str(qtbuild_state))
    monkeypatch.setenv("QTBUILD_KMS_CREDENTIALS", served.credentials_file)

    def cli(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(kms_cli.command, list(args))
        return result.exit_code, result.output

    try:
        code, output = cli("create-key", "--alias", "app")  # no --credentials: the variable
        assert code == 0, output
        key_id = json.loads(output)["key_id"]
        assert set(json.loads(output)) == {"key_id", "domain_id", "region_id"}  # Huawei's key_info
        assert cli("principal", "create", "app")[0] == 0
        measurements = tmp_path / "measurements.json"
        measurements.write_text(json.dumps({"digest": "SHA384", "PCR0": PCRS[0].hex(),
                                            "PCR8": "00" * 48}))
        code, output = cli("policy", "put", "--principal", "app", "--allow", "decrypt-data",
                           "--key", key_id, "--pcr0-from", str(measurements))
        assert code == 0, output
        stored = json.loads(cli("policy", "get", "--name", "app")[1])["policy"]
        assert stored["Statement"][0]["Condition"] == {
            "StringEqualsIgnoreCase": {"kms:RecipientAttestation/PCR0": PCRS[0].hex()}}

        signer = pki.signer("check")
        good = tmp_path / "good.cose"
        good.write_bytes(SecurityModule(PCRS, debug=False, signer=signer, module_id=MODULE).attestation(
            public_key=_rsa_der()))
        code, output = cli("policy", "check", "--principal", "app", "--key", key_id,
                           "--document", str(good))
        assert code == 0 and output.startswith("ALLOWED: allowed by Statement[0]"), output
        assert f"document: kms:RecipientAttestation/PCR0 = {PCRS[0].hex()}" in output
        assert "PCR5" not in output  # only the PCRs that matter, in text; --json has all

        moved = tmp_path / "moved.cose"
        moved.write_bytes(SecurityModule({**PCRS, 0: b"\x99" * 48}, debug=False, signer=signer, module_id=MODULE)
                          .attestation(public_key=_rsa_der()))
        code, output = cli("policy", "check", "--principal", "app", "--key", key_id,
                           "--document", str(moved), "--json")
        report = json.loads(output)
        assert code == 1 and not report["allowed"]
        assert report["statements"][0]["outcome"] == "condition failed"
        assert PCRS[0].hex() in report["statements"][0]["detail"] and "99" * 48 in report["statements"][0]["detail"]

        code, output = cli("policy", "check", "--principal", "app", "--key", key_id)
        assert code == 1 and "no such key" in output

        debug = tmp_path / "debug.cose"
        debug.write_bytes(SecurityModule(PCRS, debug=True, signer=signer, module_id=MODULE)
                          .attestation(public_key=_rsa_der()))
        code, output = cli("policy", "check", "--principal", "app", "--key", key_id, "--document", str(debug))
        assert code == 1 and "KMS.4007" in output

        code, output = cli("policy", "put", "--principal", "app", "--allow", "decrypt-data", "--key", key_id)
        assert code == 2 and "--pcr0" in output
    finally:
        served.stop()


def _rsa_der() -> bytes:
    from qtbuild.runtime.sdk.recipient import RecipientKey

    return RecipientKey.generate().public_key_der


def test_sigterm_stops_promptly_and_says_so(dirs):
    state_dir, qtbuild_state, _ = dirs
    served = Served(state_dir, qtbuild_state)
    idle = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    idle.connect()  # a kept-alive client must not hold the stop
    begin = time.monotonic()
    try:
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(10) == 0
        elapsed = time.monotonic() - begin
        assert elapsed < 2, elapsed
        assert served.process.stderr.read().decode().rstrip().endswith("qtbuild kms: stopped")
    finally:
        idle.close()
        if served.process.poll() is None:
            served.process.kill()
