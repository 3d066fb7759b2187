#!/usr/bin/env python3
"""Benchmark: KMS decrypt-data with an attested recipient — requests per second, p50 / p99
latency — at 1, 8 and 32 concurrent clients, side by side with a plain HTTP echo served by the
same server stack (runtime/kms/server.py with a service that answers the body back), so the
ratio shows what the KMS work itself costs.

Usage: python benchmarks/kms.py [--seconds 5] [--clients 1,8,32] [--client-processes 2]
                                [--fresh-documents] [--no-echo] [--serve-option=--threads=N] [--json]

Setup (throw-away, under a temporary directory): a local attestation PKI, ``qtbuild kms serve``
in its own process on 127.0.0.1, an AES-256 key, a 64-byte ciphertext with AAD, and an enclave
principal whose policy pins PCR0 and PCR8.  Each client is a thread with its own kept-alive
connection and RSA-2048 recipient key; clients are spread over ``--client-processes`` worker
processes.  Every request is the full server path: signature check, the KMS verifying the
document (chain, COSE signature, freshness; a document it has verified is cached until one of
those checks could change), evaluating the PCR policy, decrypting, writing the audit record
(fsynced before the reply), building the CMS envelope.

The clients share the CPUs with the server, so they do as little as a load generator can: a
client signs its request once per level and sends the same bytes again (SDK-HMAC-SHA256 allows
that within X-Sdk-Date's 15-minute window, as Huawei's gateway does; the KMS's replay check
covers mutating admin requests only), reads each reply over a raw kept-alive socket, checks its
status and that it carries an envelope, and opens the envelope (RSA-OAEP, AES-CBC) and checks
the plaintext for the first reply and every 100th.  By default each client reuses one document
(fresh for the KMS's 5-minute window) so the figures are the KMS's; ``--fresh-documents`` has
the client's security module sign a new one per request (and the request signed anew), as a
cautious enclave would.  The echo runs the same client loop.  CPU: the seconds of CPU the
server and the client processes used during the measured seconds, as a share of all CPUs.
The last line, ``ratios: {json}`` (KMS/echo requests per second per client count), is what the
regression check reads (tests/test_benchmarks.py, benchmarks/baseline.json).
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from qtbuild.runtime.kms.state import read_credentials
from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.sdk.envelope import open_envelope
from qtbuild.runtime.sdk.kms_client import API_PREFIX, Credentials, KmsClient, sign_request, tcp_transport
from qtbuild.runtime.sdk.recipient import RecipientKey

PCRS = {index: bytes([index + 7]) * 48 for index in range(16)}
PLAINTEXT = bytes(range(64))
AAD = b"benchmark"
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
CHECK_EVERY = 100       # replies whose envelope a client opens: the first and every CHECK_EVERY-th
SERVE = "from qtbuild.cli.kms import command; command(prog_name='qtbuild kms')"


def start_server(state: str, serve_options: list[str]) -> tuple[subprocess.Popen, int, str]:
    """``qtbuild kms serve`` on 127.0.0.1 (ephemeral port); (process, port, credentials file)."""
    process = subprocess.Popen(     # -P: the installed package, never a qtbuild/ in the working directory
        [sys.executable, "-P", "-c", SERVE, "serve", "--state-dir", os.path.join(state, "kms"),
         "--listen", "127.0.0.1:0", *serve_options],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
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


class RawConnection:
    """One kept-alive HTTP/1.1 connection that sends prepared request bytes and reads the reply
    with as little work as possible (status, Content-Length, body)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self.buffer += self._more()
        head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
        length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                      if line.lower().startswith("content-length:"))
        while len(self.buffer) < length:
            self.buffer += self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head[9:12]), body

    def _more(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def http_request(path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()),
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class DecryptRequests:
    """One client's decrypt-data requests: signed once and reused, or (fresh documents) a new
    document and signature each time."""

    def __init__(self, job: dict, device: SecurityModule) -> None:
        self.job, self.device = job, device
        self.key = RecipientKey.generate()
        self.path = API_PREFIX.format(project_id=job["credentials"][2]) + "decrypt-data"
        self.prepared = self._request()

    def next(self) -> bytes:
        return self._request() if self.job["fresh"] else self.prepared

    def _request(self) -> bytes:
        document = self.device.attestation(public_key=self.key.public_key_der)
        body = json.dumps({"cipher_text": self.job["cipher_text"], "additional_authenticated_data": AAD.decode(),
                           "recipient": {"attestation_document": base64.b64encode(document).decode(),
                                         "key_encryption_algorithm": "RSAES_OAEP_SHA_256"}},
                          separators=(",", ":")).encode()
        access_key, secret_key, _ = self.job["credentials"]
        headers = sign_request("POST", self.path, "", {"Host": "kms", "Content-Type": "application/json"}, body,
                               access_key, secret_key)
        return http_request(self.path, headers, body)

    def check(self, status: int, reply: bytes, count: int) -> None:
        """Status and envelope of every reply; the plaintext of the first and every CHECK_EVERY-th."""
        if status != 200 or b'"ciphertext_recipient":"' not in reply:
            raise AssertionError(f"decrypt-data failed: {status} {reply[:200]!r}")
        if count % CHECK_EVERY == 0:
            envelope = base64.b64decode(json.loads(reply)["ciphertext_recipient"])
            if open_envelope(envelope, self.key.private_key) != PLAINTEXT:
                raise AssertionError("wrong plaintext")


def worker(job: dict, results) -> None:
    """One process: ``job["threads"]`` clients until the deadline; puts (latencies, CPU seconds
    this process used from the start to the end of the measurement)."""
    pki = LocalPki.load(job["state"])
    latencies: list[float] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        device = SecurityModule(PCRS, debug=False, signer=pki.signer(f"bench-{index}"), module_id=MODULE_ID)
        requests = DecryptRequests(job, device)
        connection = RawConnection(job["port"])
        requests.check(*connection.exchange(requests.next()), 0)       # warm-up
        mine, count = [], 0
        while time.monotonic() < job["start"]:
            time.sleep(0.001)
        while (now := time.monotonic()) < job["end"]:
            requests.check(*connection.exchange(requests.next()), count)
            mine.append(time.monotonic() - now)
            count += 1
        connection.close()
        with lock:
            latencies.extend(mine)

    measure(job, client_loop, latencies, results)


def measure(job: dict, client_loop, latencies: list[float], results) -> None:
    """Run the client threads; put (latencies, CPU seconds of this process in the window)."""
    threads = [threading.Thread(target=client_loop, args=(job["first"] + index,))
               for index in range(job["threads"])]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, job["start"] - time.monotonic()))
    cpu = time.process_time()
    time.sleep(max(0.0, job["end"] - time.monotonic()))
    cpu = time.process_time() - cpu
    for thread in threads:
        thread.join()
    results.put((latencies, cpu))


class EchoService:
    """The transport's counterpart of a KMS that does nothing: answers the JSON body back, on
    the event loop like the KMS's data-plane APIs."""

    def runs_inline(self, request) -> bool:
        return True

    def handle(self, request):
        from qtbuild.runtime.kms.service import Response
        return Response(200, json.loads(request.body), "echo"), None

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
    request = http_request("/echo", {"Host": "kms", "Content-Type": "application/json"}, body)

    def client_loop(index: int) -> None:
        connection = RawConnection(job["port"])
        mine = []
        while time.monotonic() < job["start"]:
            time.sleep(0.001)
        while (now := time.monotonic()) < job["end"]:
            status, reply = connection.exchange(request)
            if status != 200 or reply != body:
                raise AssertionError("echo failed")
            mine.append(time.monotonic() - now)
        connection.close()
        with lock:
            latencies.extend(mine)

    measure(job, client_loop, latencies, results)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far, from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(clients: int, processes: int, seconds: float, base_job: dict, server_pid: int, target=None) -> dict:
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
    time.sleep(max(0.0, start - time.monotonic()))
    server_cpu = process_cpu_seconds(server_pid)
    time.sleep(max(0.0, start + seconds - time.monotonic()))
    server_cpu = process_cpu_seconds(server_pid) - server_cpu
    latencies, client_cpu = [], 0.0
    for _ in workers:
        mine, cpu = results.get(timeout=seconds + 120)
        latencies += mine
        client_cpu += cpu
    for process in workers:
        process.join()
    latencies.sort()
    capacity = seconds * (os.cpu_count() or 1)
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1,
                                             int(0.99 * len(latencies)))], 2),
        "server_cpu_share": round(server_cpu / capacity, 3),       # of all CPUs
        "client_cpu_share": round(client_cpu / capacity, 3),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(1, len(latencies)), 3),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(1, len(latencies)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--fresh-documents", action="store_true")
    parser.add_argument("--no-echo", action="store_true", help="Skip the plain HTTP echo.")
    parser.add_argument("--serve-option", action="append", default=[], metavar="OPTION",
                        help="An option for qtbuild kms serve (repeatable), e.g. --serve-option=--threads=4.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        LocalPki.init(state)
        server, port, credentials_file = start_server(state, args.serve_option)
        try:
            credentials, cipher_text = prepare(port, credentials_file)
            base_job = {"state": state, "port": port, "cipher_text": cipher_text,
                        "credentials": (credentials.access_key, credentials.secret_key,
                                        credentials.project_id),
                        "fresh": args.fresh_documents}
            levels = [run_level(int(count), args.client_processes, args.seconds, base_job, server.pid)
                      for count in args.clients.split(",")]
        finally:
            server.terminate()
            server.wait(30)
    echo = []
    if not args.no_echo:
        echo_process, echo_port = start_echo_server()
        try:
            echo = [run_level(int(count), args.client_processes, args.seconds, {"port": echo_port},
                              echo_process.pid, target=echo_worker) for count in args.clients.split(",")]
        finally:
            echo_process.terminate()
            echo_process.join(30)
    report = {"cpus": os.cpu_count(), "seconds": args.seconds,
              "fresh_documents": args.fresh_documents, "levels": levels, "echo": echo}
    ratios = {f"kms_over_echo_{level['clients']}": kms["requests_per_second"] / level["requests_per_second"]
              for level, kms in zip(echo, levels, strict=bool(echo)) if level["requests_per_second"]}
    if args.json:
        print(json.dumps({**report, "ratios": ratios}, indent=2))
        return
    print(f"decrypt-data with recipient, {os.cpu_count()} CPUs, {args.seconds:g} s per level, "
          f"{'fresh' if args.fresh_documents else 'reused'} documents")
    print(f"{'clients':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9}   CPU share: server clients "
          f"(ms/request)")
    for level in levels:
        print(_row(level))
    if echo:
        print("plain HTTP echo on the same server stack (6 KB JSON body)")
        for level, kms in zip(echo, levels, strict=True):
            ratio = kms["requests_per_second"] / level["requests_per_second"] if level["requests_per_second"] else 0
            print(f"{_row(level)}   KMS/echo {ratio:.2f}")
    print("ratios: " + json.dumps(ratios, sort_keys=True))


def _row(level: dict) -> str:
    server, client = (f"{100 * level[f'{side}_cpu_share']:5.1f}% ({level[f'{side}_cpu_ms_per_request']:.2f})"
                      for side in ("server", "client"))
    return (f"{level['clients']:>8} {level['requests_per_second']:>9} {level['p50_ms']:>8} {level['p99_ms']:>8} "
            f"{level['requests']:>9}   {server} {client}")


if __name__ == "__main__":
    main()
