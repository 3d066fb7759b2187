#!/usr/bin/env python3
"""Benchmark: KMS decrypt-data with an attested recipient — requests per second, p50 / p99
latency — at 1, 8 and 32 concurrent clients, side by side with a plain HTTP echo served by the
same server stack (runtime/kms/server.py with a service that answers the body back), so the
ratio shows what the KMS work itself costs.

Usage: python benchmarks/kms.py [--seconds 5] [--clients 1,8,32] [--client-processes 2]
                                [--fresh-documents] [--no-echo] [--json]

Setup (throw-away, under a temporary directory): a local attestation PKI, ``qtbuild kms serve``
in its own process on 127.0.0.1, an AES-256 key, a 64-byte ciphertext with AAD, and an enclave
principal whose policy pins PCR0 and PCR8.  Each client is a thread with its own kept-alive
connection and RSA-2048 recipient key; clients are spread over ``--client-processes`` worker
processes.  Every request is the full path: signed request, the KMS verifying the document
(chain, COSE signature, freshness), evaluating the PCR policy, decrypting, writing the audit
record (fsynced), building the CMS envelope — and the client opening that envelope (RSA-OAEP,
AES-CBC) and checking the plaintext.  By default each client reuses one document (fresh for
the KMS's 5-minute window) so the figures are the KMS's; ``--fresh-documents`` has the
client's security module sign a new one per request, as a cautious enclave would.
The last line, ``ratios: {json}`` (KMS/echo requests per second per client count), is what the
regression check reads (tests/test_benchmarks.py, benchmarks/baseline.json).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from qtbuild.runtime.kms.state import read_credentials
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.kms_client import Credentials, KmsClient, tcp_transport

PCRS = {index: bytes([index + 7]) * 48 for index in range(16)}
PLAINTEXT = bytes(range(64))
AAD = b"benchmark"
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
SERVE = "from qtbuild.cli.kms import command; command(prog_name='qtbuild kms')"


def start_server(state: str) -> tuple[subprocess.Popen, int, str]:
    """``qtbuild kms serve`` on 127.0.0.1 (ephemeral port); (process, port, credentials file)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "serve", "--state-dir", os.path.join(state, "kms"),
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=root,
        env={**os.environ, "QTBUILD_STATE_DIR": state})
    if not select.select([process.stdout], [], [], 30)[0]:
        process.kill()
        raise SystemExit("kms serve did not start")
    info = json.loads(process.stdout.readline())
    return process, int(info["endpoint"].rsplit(":", 1)[1]), info["credentials"]


def prepare(port: int, credentials_file: str) -> tuple[Credentials, str]:
    """Key, ciphertext and a PCR-pinned enclave principal; (its credentials, ciphertext)."""
    _, admin_credentials = read_credentials(credentials_file)
    admin = KmsClient(tcp_transport("127.0.0.1", port), admin_credentials)
    key_id = admin.call("create-key", {"key_alias": "bench"})["key_info"]["key_id"]
    cipher_text = admin.encrypt_data(key_id, PLAINTEXT, aad=AAD)
    reply = admin.call("admin/create-principal", {"name": "bench-enclave"})
    condition = {f"kms:RecipientAttestation/PCR{index}": PCRS[index].hex() for index in (0, 8)}
    admin.call("admin/put-policy", {"name": "bench-enclave", "policy": {
        "Version": "1.1", "Statement": [{"Effect": "Allow", "Action": ["kms:cmk:decrypt"],
                                         "Condition": {"StringEqualsIgnoreCase": condition}}]}})
    admin.close()
    return Credentials(reply["access_key"], reply["secret_key"], admin_credentials.project_id), \
        cipher_text


class OnceAttestor:
    """Signs one document per public key and reuses it (see the module docstring)."""

    def __init__(self, device: SecurityModule) -> None:
        self.device, self.cache = device, {}

    def attestation(self, user_data=None, nonce=None, public_key=None) -> bytes:
        if public_key not in self.cache:
            self.cache[public_key] = self.device.attestation(public_key=public_key)
        return self.cache[public_key]


def worker(job: dict, results) -> None:
    """One process: ``job["threads"]`` clients until the deadline; puts its latencies."""
    pki = LocalPki.load(job["state"])
    credentials = Credentials(*job["credentials"])
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        device = SecurityModule(PCRS, debug=False, signer=pki.signer(f"bench-{index}"),
                                module_id=MODULE_ID)
        attestor = device if job["fresh"] else OnceAttestor(device)
        client = KmsClient(tcp_transport("127.0.0.1", job["port"]), credentials,
                           attestor=attestor)
        assert client.decrypt_data(job["cipher_text"], aad=AAD) == PLAINTEXT  # warm-up
        mine = []
        while time.monotonic() < job["start"]:
            time.sleep(0.001)
        while (now := time.monotonic()) < job["end"]:
            if client.decrypt_data(job["cipher_text"], aad=AAD) != PLAINTEXT:
                raise AssertionError("wrong plaintext")
            mine.append(time.monotonic() - now)
        client.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client_loop, args=(job["first"] + index,))
               for index in range(job["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(latencies)


class EchoService:
    """The transport's counterpart of a KMS that does nothing: answers the JSON body back."""

    def serve(self, request):
        from qtbuild.runtime.kms.service import Response
        return Response(200, json.loads(request.body), "echo")

    def count_refusal(self, error, remote) -> None:
        pass

    def flush(self) -> None:
        pass


def start_echo_server() -> tuple[multiprocessing.Process, int]:
    from qtbuild.runtime.kms.server import KmsHttpServer
    server = KmsHttpServer(("127.0.0.1", 0), EchoService())
    process = multiprocessing.get_context("fork").Process(target=server.serve_forever, daemon=True)
    process.start()
    port = server.server_address[1]
    server.socket.close()       # the child serves it
    return process, port


def echo_worker(job: dict, results) -> None:
    latencies: list[float] = []
    lock = threading.Lock()
    body = json.dumps({"cipher_text": "x" * 300, "recipient": {"attestation_document": "y" * 6000}},
                      separators=(",", ":")).encode()

    def client_loop() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", job["port"], timeout=30)
        mine = []
        while time.monotonic() < job["start"]:
            time.sleep(0.001)
        while (now := time.monotonic()) < job["end"]:
            connection.request("POST", "/echo", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200 or response.read() != body:
                raise AssertionError("echo failed")
            mine.append(time.monotonic() - now)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client_loop) for _ in range(job["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(latencies)


def run_level(clients: int, processes: int, seconds: float, base_job: dict, target=None) -> dict:
    processes = max(1, min(processes, clients))
    start = time.monotonic() + 2.0 + 0.1 * clients    # time for keys and warm-up
    results = multiprocessing.get_context("fork").Queue()
    workers, first = [], 0
    for index in range(processes):
        threads = clients // processes + (1 if index < clients % processes else 0)
        job = {**base_job, "threads": threads, "first": first, "start": start,
               "end": start + seconds}
        first += threads
        workers.append(multiprocessing.get_context("fork").Process(target=target or worker,
                                                                   args=(job, results)))
    for process in workers:
        process.start()
    latencies = [value for _ in workers for value in results.get(timeout=seconds + 120)]
    for process in workers:
        process.join()
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1,
                                             int(0.99 * len(latencies)))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--fresh-documents", action="store_true")
    parser.add_argument("--no-echo", action="store_true", help="Skip the plain HTTP echo.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        LocalPki.init(state)
        server, port, credentials_file = start_server(state)
        try:
            credentials, cipher_text = prepare(port, credentials_file)
            base_job = {"state": state, "port": port, "cipher_text": cipher_text,
                        "credentials": (credentials.access_key, credentials.secret_key,
                                        credentials.project_id),
                        "fresh": args.fresh_documents}
            levels = [run_level(int(count), args.client_processes, args.seconds, base_job)
                      for count in args.clients.split(",")]
        finally:
            server.terminate()
            server.wait(30)
    echo = []
    if not args.no_echo:
        echo_process, echo_port = start_echo_server()
        try:
            echo = [run_level(int(count), args.client_processes, args.seconds, {"port": echo_port},
                              target=echo_worker) for count in args.clients.split(",")]
        finally:
            echo_process.terminate()
            echo_process.join(30)
    report = {"cpus": os.cpu_count(), "seconds": args.seconds,
              "fresh_documents": args.fresh_documents, "levels": levels, "echo": echo}
    ratios = {f"kms_over_echo_{level['clients']}": kms["requests_per_second"] / level["requests_per_second"]
              for level, kms in zip(echo, levels, strict=True) if level["requests_per_second"]}
    if args.json:
        print(json.dumps({**report, "ratios": ratios}, indent=2))
        return
    print(f"decrypt-data with recipient, {os.cpu_count()} CPUs, {args.seconds:g} s per level, "
          f"{'fresh' if args.fresh_documents else 'reused'} documents")
    print(f"{'clients':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9}")
    for level in levels:
        print(f"{level['clients']:>8} {level['requests_per_second']:>9} {level['p50_ms']:>8} "
              f"{level['p99_ms']:>8} {level['requests']:>9}")
    if echo:
        print("plain HTTP echo on the same server stack (6 KB JSON body)")
        for level, kms in zip(echo, levels, strict=True):
            ratio = kms["requests_per_second"] / level["requests_per_second"] if level["requests_per_second"] else 0
            print(f"{level['clients']:>8} {level['requests_per_second']:>9} {level['p50_ms']:>8} "
                  f"{level['p99_ms']:>8} {level['requests']:>9}   KMS/echo {ratio:.2f}")
    print("ratios: " + json.dumps(ratios, sort_keys=True))


if __name__ == "__main__":
    main()
