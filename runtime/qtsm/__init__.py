"""The per-enclave security module (NSM / QTSM) and the local attestation PKI behind it.

``pki``     the local root → region → host chain and per-enclave leaves (:class:`LocalPki`);
``device``  the security-module state machine (:class:`SecurityModule`);
``server``  the device served over a Unix socket, the transport behind ``/dev/qtsm``.
"""
