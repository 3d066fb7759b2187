"""The attestation-document verifier (used by the KMS and ``qtbuild attest verify``)."""
