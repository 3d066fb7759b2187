#!/usr/bin/env python3
"""Benchmark: attestation documents issued per second and verified per second.

Usage: python benchmarks/attest.py [--seconds 3] [--json]

Sets up a throw-away local PKI and one security module, then measures, each for --seconds:
  issue         ``SecurityModule.handle`` of an Attestation request (64-byte nonce, 32-byte
                user data, a 294-byte public key): request decoding, PCR snapshot, payload
                encoding, ES384 signing, response encoding — what an enclave's request costs;
  issue-socket  the same request through the Unix-socket server (one persistent connection);
  verify        ``qtbuild.runtime.verifier.attestation.verify_document`` of one such document with every check
                (chain of 4 signatures, COSE signature, nonce, PCR0, age).
Every document issued is first checked once by the verifier, so the figures are of working code.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import tempfile
import time

import cbor2

from qtbuild.runtime.qtsm.device import SecurityModule
from qtbuild.runtime.qtsm.pki import LocalPki
from qtbuild.runtime.qtsm.server import serve_device
from qtbuild.runtime.verifier.attestation import verify_document

NONCE = b"\x07" * 64
PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}


def rate(function, seconds: float) -> tuple[float, int]:
    """Calls per second of ``function`` over about ``seconds`` (after one warm-up call)."""
    function()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        function()
        count += 1
    return count / elapsed, count


def socket_caller(path: str, request: bytes):
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(path)
    frame = struct.pack(">I", len(request)) + request

    def call() -> bytes:
        connection.sendall(frame)
        (length,) = struct.unpack(">I", connection.recv(4, socket.MSG_WAITALL))
        return connection.recv(length, socket.MSG_WAITALL)

    return call, connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        pki = LocalPki.init(state)
        device = SecurityModule(PCRS, debug=False, signer=pki.signer("bench"),
                                module_id="i-0123456789abcdef0-enc0123456789abcdef")
        request = cbor2.dumps({"Attestation": {"nonce": NONCE, "user_data": b"u" * 32,
                                               "public_key": b"k" * 294}})
        document = cbor2.loads(device.handle(request))["Attestation"]["document"]
        options = {"root_fingerprints": [pki.root_fingerprint()], "nonce": NONCE,
                   "expect_pcrs": {0: PCRS[0]}, "max_age": 3600}
        verify_document(document, **options)

        results = {"document_bytes": len(document)}
        results["issue_per_second"], _ = rate(lambda: device.handle(request), args.seconds)
        path = os.path.join(state, "qtsm.sock")
        with serve_device(device, path):
            call, connection = socket_caller(path, request)
            with connection:
                verify_document(cbor2.loads(call())["Attestation"]["document"], **options)
                results["issue_socket_per_second"], _ = rate(call, args.seconds)
        results["verify_per_second"], _ = rate(
            lambda: verify_document(document, **options), args.seconds
        )

    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"document size          {results['document_bytes']} bytes")
    print(f"issued (in process)    {results['issue_per_second']:8.0f} documents/s")
    print(f"issued (Unix socket)   {results['issue_socket_per_second']:8.0f} documents/s")
    print(f"verified               {results['verify_per_second']:8.0f} documents/s")


if __name__ == "__main__":
    main()
