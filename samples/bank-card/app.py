"""Bank-card enclave application (the seed workflow's step 3).

Inside the enclave there is no network: the only ways out are vsock connections to the parent
(CID 3), where qt-proxy forwards chosen ports to the KMS and the object store.  The parent hands
the job over vsock with the SDK's hand-off (``receive_job`` here, ``qtbuild handoff`` on the
parent): only after this enclave has attested, sealed to the key in its attestation document —
no secret is baked into the image:

    {"kms": {"vsock_port", "endpoint", "ca_pem" (optional), "protocol": "huawei" | "aws", "region" (aws),
             "access_key", "secret_key", "security_token", "project_id", "key_id"},
     "object_store": {"vsock_port"}, "download_url": presigned GET, "upload_url": presigned PUT}

The app downloads the ciphertext, decrypts it with decrypt-data carrying an attestation document
over a fresh RSA key (the KMS answers with an envelope only this enclave can open), validates and
masks each card number, encrypts the result with encrypt-data and uploads it, then replies with a
summary (never the card numbers) on the hand-off connection.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import sys
import urllib.parse

from qtbuild_sdk import Qtsm, connect, receive_job
from qtbuild_sdk.kms_client import Credentials, KmsClient, vsock_transport

JOB_PORT = 5000
MAX_OBJECT = 16 * 1024 * 1024


def luhn_valid(number: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    digits = [int(ch) for ch in number if ch.isdigit()]
    if len(digits) < 12 or len(digits) != len(number):
        return False
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def mask(number: str) -> str:
    """Keep the first 6 and last 4 digits (PCI DSS display rule)."""
    return number[:6] + "*" * max(len(number) - 10, 0) + number[-4:]


def process(records: str) -> list[dict]:
    """``name,card_number`` lines → [{"name", "card", "valid"}] with masked cards."""
    out = []
    for line in records.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, number = line.partition(",")
        number = number.strip().replace(" ", "")
        out.append({"name": name.strip(), "card": mask(number), "valid": luhn_valid(number)})
    return out


class _VsockHTTPConnection(http.client.HTTPConnection):
    """HTTP(S) to the object store through the parent's proxy (vsock port → TCP); https URLs are
    TLS end to end, verified against the URL's host name."""

    def __init__(self, host: str, vsock_port: int, *, tls: bool = False) -> None:
        super().__init__(host, timeout=30)
        self._vsock_port, self._tls = vsock_port, tls

    def connect(self) -> None:
        sock = connect(3, self._vsock_port, timeout=30)
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


def http_call(method: str, url: str, vsock_port: int, body: bytes | None = None) -> bytes:
    parts = urllib.parse.urlsplit(url)
    connection = _VsockHTTPConnection(parts.netloc, vsock_port, tls=parts.scheme == "https")
    try:
        target = parts.path + ("?" + parts.query if parts.query else "")
        connection.request(method, target, body=body, headers={"Content-Length": str(len(body or b""))})
        response = connection.getresponse()
        data = response.read(MAX_OBJECT + 1)
        if response.status >= 300 or len(data) > MAX_OBJECT:
            raise RuntimeError(f"{method} {parts.path}: HTTP {response.status}")
        return data
    finally:
        connection.close()


def run_job(job: dict) -> dict:
    """QingTian: Huawei KMS's decrypt-data / encrypt-data (``recipient`` → ``ciphertext_recipient``).
    Nitro (``"protocol": "aws"``): AWS KMS's Decrypt / Encrypt (SigV4, ``Recipient`` →
    ``CiphertextForRecipient``).  Both over HTTPS, verified against the endpoint's name."""
    kms_conf = job["kms"]
    store_port = int(job["object_store"]["vsock_port"])
    ciphertext = http_call("GET", job["download_url"], store_port).decode().strip()
    # The endpoint (or region: HTTPS at the regional endpoint) is configuration; the bytes always
    # go through the parent's proxy on the given vsock port.  Without a CA the system's are trusted.
    transport = vsock_transport(int(kms_conf["vsock_port"]))
    tls = ssl.create_default_context(cadata=kms_conf["ca_pem"]) if kms_conf.get("ca_pem") else None
    if kms_conf.get("protocol") == "aws":
        from qtbuild_sdk.aws_kms import AwsCredentials, AwsKmsClient  # only the Nitro profile needs it

        # temporary credentials: the session token goes with every request (X-Amz-Security-Token)
        aws_credentials = AwsCredentials(kms_conf["access_key"], kms_conf["secret_key"], kms_conf.get("security_token"))
        with AwsKmsClient(aws_credentials, kms_conf["region"], endpoint=kms_conf.get("endpoint"), transport=transport,
                          attestor=Qtsm(), ssl_context=tls) as aws:
            records = aws.decrypt(base64.b64decode(ciphertext)).decode("utf-8")
            results = process(records)
            sealed = base64.b64encode(aws.encrypt(kms_conf["key_id"], json.dumps(results, sort_keys=True).encode()))
    else:
        # temporary credentials: the security token goes with every request (X-Security-Token)
        credentials = Credentials(kms_conf["access_key"], kms_conf["secret_key"], kms_conf["project_id"],
                                  kms_conf.get("security_token"))
        with KmsClient.from_config(credentials, endpoint=kms_conf.get("endpoint"), region=kms_conf.get("region"),
                                   transport=transport, attestor=Qtsm(), ssl_context=tls) as kms:
            records = kms.decrypt_data(ciphertext).decode("utf-8")
            results = process(records)
            sealed = kms.encrypt_data(kms_conf["key_id"], json.dumps(results, sort_keys=True).encode()).encode()
    http_call("PUT", job["upload_url"], store_port, sealed)
    return {"status": "ok", "records": len(results), "valid": sum(r["valid"] for r in results)}


def main() -> int:
    print(f"bank-card enclave: waiting for a job on vsock port {JOB_PORT}", flush=True)
    with Qtsm() as qtsm, receive_job(JOB_PORT, attestor=qtsm) as job:
        try:
            summary = run_job(job.payload)
        except Exception as exc:  # reported to the parent; the enclave then exits non-zero
            summary = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        job.reply(summary)
    print(f"bank-card enclave: {summary['status']}", flush=True)
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
