"""`qtbuild demo`: the samples end to end, with every role's step printed.

``hello``      build hello/, convert it, run it in debug mode, read its console, stop it.
``bank-card``  the seed workflow (``shared/seeds``): a data security administrator, a parent
               administrator and the enclave application, plus the refusals — a rebuilt image
               with one changed byte, the same image in debug mode, and an enclave without its
               proxy routes.

Everything runs on this machine with the real pieces: the Docker daemon builds the images,
``qtbuild convert`` makes signed EIFs, ``qtbuild kms serve`` is the KMS, moto's server mode is the
S3-compatible object store (OBS is S3-compatible; it belongs to the sample environment, not to
qtbuild), ``qtbuild proxy`` forwards vsock ports, and ``qtbuild run`` starts the enclave.  Each
demo works in its own directory with its own runtime and state directories, and stops everything
it started — also on failure or Ctrl-C.

This is sample code, not part of the qtbuild package: ``qtbuild demo`` loads it from the samples
directory (this file's grandparent: ``SAMPLES/demo/demo.py``), first asking :mod:`.preflight`
what is missing.  Images are built with ``SAMPLES/build.sh``; qtbuild itself is the installed
one, run as ``python -m qtbuild``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import click

SAMPLES = Path(__file__).resolve().parents[1]
QTBUILD = [sys.executable, "-m", "qtbuild"]
KMS_VSOCK_PORT = 8000
STORE_VSOCK_PORT = 8001
JOB_PORT = 5000
#: The enclave gets temporary credentials (AK/SK + security token), never a long-lived key: the
#: shortest lifetime the KMS issues (IAM's minimum), more than the whole demo needs.
ENCLAVE_CREDENTIALS_LIFETIME = "15m"
#: The region a --cloud nitro enclave signs for (SigV4 scope); the local KMS serves any region.
AWS_REGION = "us-east-1"


class DemoError(Exception):
    """A demo step failed; the message says which and why."""


def role(name: str, message: str) -> None:
    """One readable step line on stdout: ``[role] message``."""
    click.echo(f"[{name:>6}] {message}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Workspace:
    """The demo's directory, environment and the processes it started."""

    root: Path
    keep: bool = False
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict:
        runtime = self.root / "run"
        return {
            **os.environ,
            "QTBUILD_RUNTIME_DIR": str(runtime),
            "QTBUILD_STATE_DIR": str(self.root / "state"),
            "QTBUILD_VSOCK_DIR": str(runtime / "vsock"),
            "QTBUILD_VSOCK_TRANSPORT": "emulated",
        }

    def qtbuild(self, *args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run([*QTBUILD, *map(str, args)], capture_output=True, text=True, env=self.env,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise DemoError(f"qtbuild {' '.join(map(str, args[:3]))} failed: {result.stderr.strip()}")
        return result

    def start(self, args: list, *, log: str) -> subprocess.Popen:
        with open(self.root / log, "wb") as handle:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=handle, env=self.env,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qtbuild("enclave", "stop", "--all", check=False, timeout=60)
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        if not self.keep:
            from qtbuild.runtime.enclave.state import RuntimeDir

            with contextlib.suppress(OSError):
                RuntimeDir(self.root / "run").unmount()
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def workspace(keep: bool):
    space = Workspace(Path(tempfile.mkdtemp(prefix="qtbuild-demo-")), keep)
    try:
        yield space
    finally:
        space.close()
        if keep:
            role("demo", f"kept {space.root}")


def build_sample(name: str, *, tag: str = "latest", context_edit=None) -> str:
    """docker build of SAMPLES/NAME through SAMPLES/build.sh (optionally edited first)."""
    env = {**os.environ, "QTBUILD": " ".join(QTBUILD)}  # the SDK export: this qtbuild, wherever installed
    if context_edit is not None:
        env["SAMPLE_EDIT"] = context_edit
    result = subprocess.run(["bash", str(SAMPLES / "build.sh"), name, tag], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise DemoError(f"building {SAMPLES / name} failed: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


def make_signing_key(directory: Path) -> tuple[Path, Path]:
    """A P-384 key and self-signed certificate (the QingTian recipe), valid for a day."""
    from datetime import datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qtbuild demo signer")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA384()))
    key_path, cert_path = directory / "signing-key.pem", directory / "signing-cert.pem"
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# --------------------------------------------------------------------------- hello


def demo_hello(keep: bool = False, cloud: str = "qingtian") -> None:
    with workspace(keep) as space:
        image = build_sample("hello")
        role("admin", f"built {image} (FROM scratch + static busybox)")
        eif = space.root / "hello.eif"
        measurements = json.loads(space.qtbuild("convert", f"docker://{image}", "-o", eif, "-q").stdout)
        role("admin", f"converted to {eif.name}: PCR0 {measurements['PCR0'][:16]}…")
        started = json.loads(space.qtbuild("run", eif, "--debug-mode", "--mem", "256", "--cpus", "2", "--cloud", cloud,
                                           "--format", "qingtian").stdout)
        role("parent", f"started enclave {started['EnclaveID']} "
                       f"(CID {started['EnclaveCID']}, {started['LaunchMode']} mode)")
        console = subprocess.Popen([*QTBUILD, "enclave", "console", "--enclave-id", str(started["EnclaveID"])],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=space.env)
        lines = _read_lines(console, count=2, timeout=10)
        for line in lines:
            role("enclave", line)
        if not any("hello enclave!" in line for line in lines):
            raise DemoError("the enclave's console did not say 'hello enclave!'")
        space.qtbuild("enclave", "stop", "--enclave-id", started["EnclaveID"])
        role("parent", f"stopped enclave {started['EnclaveID']}")


def _read_lines(process: subprocess.Popen, *, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    stdout = process.stdout
    assert stdout is not None  # started with stdout=PIPE
    os.set_blocking(stdout.fileno(), False)
    buffer = ""
    try:
        while len(lines) < count and time.monotonic() < deadline:
            chunk = stdout.read()
            if chunk:
                buffer += chunk.decode("utf-8", "replace")
                *complete, buffer = buffer.split("\n")
                lines += [line for line in complete if line.strip()]
            else:
                time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(5)
    return lines[:count]


# --------------------------------------------------------------------------- bank-card


@dataclass
class BankCardEnv:
    """What the administrator set up: services, key, image and policy."""

    space: Workspace
    kms_endpoint: str
    admin_credentials: Path
    project_id: str
    store_endpoint: str
    key_id: str
    enclave_credentials: dict
    signing: tuple[Path, Path]
    tls_ca_pem: str
    cloud: str = "qingtian"


def _start_kms(space: Workspace) -> tuple[str, Path, str]:
    port = free_port()
    process = space.start(
        [*QTBUILD, "kms", "serve", "--state-dir", space.root / "kms", "--listen", f"127.0.0.1:{port}", "--tls"],
        log="kms.log")
    line = _first_line(process, 30, "the KMS")
    info = json.loads(line)
    return info["endpoint"], Path(info["credentials"]), info["project_id"]


def _start_object_store(space: Workspace) -> str:
    port = free_port()
    process = space.start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                          log="object-store.log")
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(endpoint, 30, "the object store (moto server)", process, space.root / "object-store.log")
    return endpoint


def _first_line(process: subprocess.Popen, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    stdout = process.stdout
    assert stdout is not None  # started with stdout=PIPE
    os.set_blocking(stdout.fileno(), False)
    data = b""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"{what} exited with status {process.returncode}")
        chunk = stdout.read()
        if chunk:
            data += chunk
            if b"\n" in data:
                return data.split(b"\n", 1)[0].decode()
        time.sleep(0.05)
    raise DemoError(f"{what} did not start within {timeout:.0f} s")


def _wait_http(url: str, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:  # say so now, not after the timeout
            raise DemoError(f"{what} exited with status {process.returncode}: {log.read_text()[-300:].strip()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except Exception:
            time.sleep(0.2)
    raise DemoError(f"{what} did not answer within {timeout:.0f} s")


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="cn-north-4", aws_access_key_id="demo",
                        aws_secret_access_key="demo-secret")


def _policy(key_id: str, pcr0: str, pcr8: str, cloud: str) -> dict:
    """Decrypt only from an enclave whose attested PCR0 and PCR8 are the recorded ones: in IAM's
    shape for QingTian, in AWS's (actions and condition keys) for Nitro."""
    if cloud == "nitro":
        return {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": [f"KMS:*:*:KeyId:{key_id}"],
                 "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": [pcr0],
                                                           "kms:RecipientAttestation:PCR8": [pcr8]}}},
                {"Effect": "Allow", "Action": ["kms:Encrypt"], "Resource": [f"KMS:*:*:KeyId:{key_id}"]},
            ],
        }
    return {
        "Version": "1.1",
        "Statement": [
            {"Effect": "Allow", "Action": ["kms:cmk:decrypt"], "Resource": [f"KMS:*:*:KeyId:{key_id}"],
             "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation/PCR0": [pcr0],
                                                       "kms:RecipientAttestation/PCR8": [pcr8]}}},
            {"Effect": "Allow", "Action": ["kms:cmk:encrypt"], "Resource": [f"KMS:*:*:KeyId:{key_id}"]},
        ],
    }


def _administrator(space: Workspace, cloud: str) -> BankCardEnv:
    space.qtbuild("pki", "init")
    role("admin", "local attestation PKI initialised; the KMS pins its root")
    kms_endpoint, admin, project = _start_kms(space)
    tls_ca_pem = space.qtbuild("pki", "export-tls-ca").stdout
    role("admin", f"local KMS running at {kms_endpoint} (project {project}; TLS certificate from the local "
                  "TLS CA, which clients trust: qtbuild pki export-tls-ca)")
    store = _start_object_store(space)
    role("admin", f"object store (S3-compatible, moto) at {store}")
    created = space.qtbuild("kms", "create-key", "--alias", "bank-cards", "--credentials", admin)
    key_id = json.loads(created.stdout)["key_id"]
    role("admin", f"created customer master key {key_id}")
    ciphertext = space.root / "cards.ct"
    space.qtbuild("kms", "encrypt", "--key-id", key_id, "--in", SAMPLES / "bank-card" / "cards.csv",
                  "--out", ciphertext, "--credentials", admin)
    s3 = _s3(store)
    for bucket in ("bucket1", "bucket2"):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "cn-north-4"})
    s3.put_object(Bucket="bucket1", Key="cards.ct", Body=ciphertext.read_bytes())
    role("admin", "encrypted the bank card records with encrypt-data and uploaded the ciphertext to bucket1")
    principal = json.loads(
        space.qtbuild("kms", "principal", "create", "bank-card-enclave", "--credentials", admin).stdout)
    role("admin", f"created principal bank-card-enclave ({principal['access_key']}); its long-lived key stays here")
    temporary = json.loads(space.qtbuild("kms", "principal", "create", "bank-card-enclave", "--temporary",
                                         "--duration", ENCLAVE_CREDENTIALS_LIFETIME, "--credentials", admin).stdout)
    credential = temporary["credential"]
    role("admin", f"issued temporary credentials acting as bank-card-enclave ({credential['access']}, "
                  f"expire {credential['expires_at']}) for the enclave")
    enclave_credentials = {"access_key": credential["access"], "secret_key": credential["secret"],
                           "security_token": credential["securitytoken"]}
    return BankCardEnv(space, kms_endpoint, admin, project, store, key_id, enclave_credentials,
                       make_signing_key(space.root), tls_ca_pem, cloud)


def _build_eif(env: BankCardEnv, name: str, *, edit: str | None = None) -> dict:
    image = build_sample("bank-card", tag=name, context_edit=edit)
    key, cert = env.signing
    eif = env.space.root / f"bank-card-{name}.eif"
    measurements = json.loads(env.space.qtbuild("convert", f"docker://{image}", "-o", eif, "--private-key", key,
                                                "--signing-certificate", cert, "-q").stdout)
    return {"eif": eif, **measurements}


def _put_policy(env: BankCardEnv, pcr0: str, pcr8: str) -> None:
    path = env.space.root / "policy.json"
    path.write_text(json.dumps(_policy(env.key_id, pcr0, pcr8, env.cloud), indent=2))
    env.space.qtbuild("kms", "policy", "put", path, "--name", "bank-card-enclave",
                      "--credentials", env.admin_credentials)
    pcr0_key = "kms:RecipientAttestation:ImageSha384" if env.cloud == "nitro" else "kms:RecipientAttestation/PCR0"
    role("admin", f"policy: decrypt only if {pcr0_key} = {pcr0[:16]}… and PCR8 = {pcr8[:16]}…")


def _start_proxy(env: BankCardEnv) -> subprocess.Popen:
    kms = env.kms_endpoint.split("//", 1)[1]
    store = env.store_endpoint.split("//", 1)[1]
    config = env.space.root / "proxy.toml"
    config.write_text(
        f'[[routes]]\nvsock_port = {KMS_VSOCK_PORT}\n'
        f'host = "{kms.rsplit(":", 1)[0]}"\nport = {kms.rsplit(":", 1)[1]}\n\n'
        f'[[routes]]\nvsock_port = {STORE_VSOCK_PORT}\n'
        f'host = "{store.rsplit(":", 1)[0]}"\nport = {store.rsplit(":", 1)[1]}\n'
    )
    process = env.space.start([*QTBUILD, "proxy", "--config", config], log="proxy.log")
    time.sleep(1.0)
    if process.poll() is not None:
        raise DemoError(f"qt-proxy exited: {(env.space.root / 'proxy.log').read_text()[-500:]}")
    role("parent", f"qt-proxy: vsock {KMS_VSOCK_PORT} → KMS {kms}, vsock {STORE_VSOCK_PORT} → object store {store}")
    return process


def _run_job(env: BankCardEnv, build: dict, *, debug: bool = False, cloud: str = "qingtian") -> dict:
    """Start the enclave, hand it the job with `qtbuild handoff` (after it attests), return its
    summary; the enclave is stopped."""
    args = ["run", build["eif"], "--mem", "1024", "--cpus", "2", "--cloud", cloud, "--format", "qingtian"]
    args += ["--debug-mode"] if debug else []
    started = json.loads(env.space.qtbuild(*args).stdout)
    role("parent", f"started enclave {started['EnclaveID']} "
                   f"(CID {started['EnclaveCID']}, {started['LaunchMode']} mode)")
    try:
        s3 = _s3(env.store_endpoint)
        # the enclave trusts the local TLS CA for this rehearsal; in the cloud it uses the system's CAs
        protocol = {"protocol": "aws", "region": AWS_REGION} if env.cloud == "nitro" else {"protocol": "huawei"}
        job = {
            "kms": {"vsock_port": KMS_VSOCK_PORT, "endpoint": env.kms_endpoint, "ca_pem": env.tls_ca_pem,
                    **protocol, **env.enclave_credentials, "project_id": env.project_id, "key_id": env.key_id},
            "object_store": {"vsock_port": STORE_VSOCK_PORT},
            "download_url": s3.generate_presigned_url("get_object", Params={"Bucket": "bucket1", "Key": "cards.ct"},
                                                      ExpiresIn=300),
            "upload_url": s3.generate_presigned_url("put_object", Params={"Bucket": "bucket2", "Key": "result.ct"},
                                                    ExpiresIn=300),
        }
        return _hand_off(env, started["EnclaveCID"], job, build["PCR0"], debug=debug)
    finally:
        env.space.qtbuild("enclave", "stop", "--enclave-id", started["EnclaveID"], check=False)


def _hand_off(env: BankCardEnv, cid: int, job: dict, pcr0: str, *, debug: bool) -> dict:
    """`qtbuild handoff`: the job goes only to an enclave that attests with the built PCR0 (a
    debug-mode one attests zeros: let it through, to show the KMS refusing it)."""
    path = env.space.root / "job.json"
    path.touch(mode=0o600)
    path.write_text(json.dumps(job))
    check = ["--allow-debug"] if debug else ["--pcr0", pcr0]
    done = env.space.qtbuild("handoff", cid, "--job", path, "--port", JOB_PORT, "--timeout", "60", *check,
                             check=False)
    path.unlink()
    if done.returncode != 0:
        raise DemoError(f"the hand-off to enclave {cid} failed: {done.stderr.strip()}")
    role("parent", "handed over the job after the enclave attested: presigned URLs and temporary KMS "
                   "credentials, sealed to its key (nothing baked into the image)")
    return json.loads(done.stdout)


def demo_bank_card(keep: bool = False, cloud: str = "qingtian") -> None:
    with workspace(keep) as space:
        click.echo("== 1. data security administrator")
        env = _administrator(space, cloud)
        release = _build_eif(env, "release")
        role("admin", f"built and signed the enclave image: PCR0 {release['PCR0'][:16]}…, PCR8 {release['PCR8'][:16]}…")
        _put_policy(env, release["PCR0"], release["PCR8"])

        click.echo("== 2. parent administrator + 3. enclave application")
        proxy = _start_proxy(env)
        role("parent", "the enclave calls the KMS with " + (
            "AWS KMS's protocol (SigV4, Recipient)" if cloud == "nitro" else "Huawei KMS's API"))
        role("parent", f"rehearsing for {cloud}: its security module, document shape and certificate chain")
        summary = _run_job(env, release, cloud=cloud)
        if summary.get("status") != "ok":
            raise DemoError(f"the enclave failed: {summary}")
        role("enclave", f"decrypted {summary['records']} records with an attested KMS call, {summary['valid']} valid, "
                        "masked them, re-encrypted and uploaded the result to bucket2")

        click.echo("== 4. administrator checks the result")
        result_ct = _s3(env.store_endpoint).get_object(Bucket="bucket2", Key="result.ct")["Body"].read()
        (space.root / "result.ct").write_bytes(result_ct)
        plain = _admin_decrypt(env, space.root / "result.ct")
        for record in json.loads(plain):
            role("admin", f"{record['name']:<12} {record['card']:<20} {'valid' if record['valid'] else 'INVALID'}")

        click.echo("== refusals")
        tampered = _build_eif(env, "tampered", edit="app.py")
        role("admin", f"rebuilt the image with one changed byte: PCR0 {tampered['PCR0'][:16]}… (PCR8 unchanged)")
        _expect_denied(_run_job(env, tampered, cloud=cloud), "KMS", "the changed image")
        _expect_denied(_run_job(env, release, debug=True, cloud=cloud), "KMS",
                       "the same image in debug mode (PCRs attested as zeros)")
        os.killpg(proxy.pid, signal.SIGTERM)
        proxy.wait(10)
        role("parent", "stopped qt-proxy")
        _expect_denied(_run_job(env, release, cloud=cloud), "",
                       "an enclave without proxy routes (no network, nothing to reach)")
        click.echo("== audit (qtbuild kms audit)")
        audit = space.qtbuild("kms", "audit", "--limit", "12", "--credentials", env.admin_credentials)
        click.echo(audit.stdout.rstrip())


def _admin_decrypt(env: BankCardEnv, path: Path) -> str:
    from urllib.parse import urlsplit

    from qtbuild.runtime.kms.state import read_credentials
    from qtbuild.runtime.qtsm.tls_ca import local_tls_trust
    from qtbuild.runtime.sdk.kms_client import KmsClient, tcp_transport

    endpoint, credentials = read_credentials(env.admin_credentials)
    url = urlsplit(endpoint)
    if url.hostname is None or url.port is None:
        raise DemoError(f"{env.admin_credentials}: the KMS endpoint {endpoint!r} has no host:port")
    with KmsClient(tcp_transport(url.hostname, url.port), credentials, host=url.netloc,
                   ssl_context=local_tls_trust(env.space.root / "state")) as client:
        return client.decrypt_data(path.read_text().strip()).decode()


def _expect_denied(summary: dict, needle: str, what: str) -> None:
    if summary.get("status") == "ok":
        raise DemoError(f"{what} was NOT refused: {summary}")
    error = summary.get("error", "")
    if needle and needle not in error.upper():     # KmsClientError: Huawei's "KMS.0306" or AWS's exception names
        raise DemoError(f"{what} failed, but not with a KMS refusal: {error}")
    role("KMS" if needle else "enclave", f"refused {what}: {error[:160]}")


DEMOS = {"hello": demo_hello, "bank-card": demo_bank_card}
