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
In the same run it measures the bare primitives with ``cryptography`` — one ES384 (P-384 ECDSA)
signature, one ES384 verification — and prints ``ratios: {json}`` (regression check, see
tests/test_benchmarks.py): issue / sign (one signature's worth of rate) and verify / raw verify
(five verifications' worth: chain of 4 + COSE), each the median of interleaved short windows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import tempfile
import time

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

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


def paired_ratio(function, reference, seconds: float, windows: int = 6) -> float:
    """Rate of ``function`` over rate of ``reference``: the median of ``windows`` interleaved pairs of
    short windows, so load that comes and goes on a shared machine hits both sides alike."""
    ratios = []
    for _ in range(windows):
        ratios.append(rate(function, seconds / windows)[0] / rate(reference, seconds / windows)[0])
    return statistics.median(ratios)


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

    key = ec.generate_private_key(ec.SECP384R1())
    signature = key.sign(document, ec.ECDSA(hashes.SHA384()))
    results["sign_per_second"], _ = rate(lambda: key.sign(document, ec.ECDSA(hashes.SHA384())), args.seconds)
    public = key.public_key()
    results["raw_verify_per_second"], _ = rate(
        lambda: public.verify(signature, document, ec.ECDSA(hashes.SHA384())), args.seconds)
    ratios = {
        "issue_over_sign": paired_ratio(lambda: device.handle(request),
                                        lambda: key.sign(document, ec.ECDSA(hashes.SHA384())), args.seconds),
        "verify_over_raw_verify": paired_ratio(lambda: verify_document(document, **options),
                                               lambda: public.verify(signature, document, ec.ECDSA(hashes.SHA384())),
                                               args.seconds)}

    if args.json:
        print(json.dumps({**results, "ratios": ratios}, indent=2))
        return
    print(f"document size          {results['document_bytes']} bytes")
    print(f"issued (in process)    {results['issue_per_second']:8.0f} documents/s")
    print(f"issued (Unix socket)   {results['issue_socket_per_second']:8.0f} documents/s")
    print(f"verified               {results['verify_per_second']:8.0f} documents/s")
    print(f"bare ES384 sign        {results['sign_per_second']:8.0f} /s   issue/sign {ratios['issue_over_sign']:.2f}")
    print(f"bare ES384 verify      {results['raw_verify_per_second']:8.0f} /s   "
          f"verify/raw {ratios['verify_over_raw_verify']:.3f} (5 verifications per document)")
    print("ratios: " + json.dumps(ratios, sort_keys=True))


if __name__ == "__main__":
    main()
