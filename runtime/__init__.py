"""The run side: enclave manager, sandbox, vsock transport, security module, proxy, KMS, SDK."""
