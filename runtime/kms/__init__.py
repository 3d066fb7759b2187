"""A local KMS speaking Huawei KMS's REST shapes, with the attested-recipient flow.

``errors``      the KmsError type and the code catalogue (Huawei ``KMS.xxxx`` codes)
``store``       SQLite persistence (keys, aliases, principals, credentials, policies, audit, nonces),
                WAL, fsynced commits, in-place schema upgrades, online backup
``crypto``      master key file, sealing at rest, the ciphertext format
``cms``         the CMS EnvelopedData sent to attested recipients
``recipient``   attestation-document checks and policy condition keys of a recipient
``policy``      IAM-like policy documents and their evaluation
``auth``        SDK-HMAC-SHA256 request authentication
``credentials`` temporary credentials (X-Security-Token) and tokens (X-Auth-Token)
``asymmetric``  RSA / EC customer keys: sign, verify, RSA-OAEP, public keys
``audit_log``   the audit log's size bound: rotation into JSON-lines archives
``refusals``    counting and sampling unauthenticated refusals
``fields``      request-body field validation
``operations``  the APIs (create-key … gen-random, admin/*)
``service``     the request pipeline (route, authenticate, decode, authorize, audit)
``server``      the HTTP/1.1 transport (uvicorn + deadlines and per-client limits)
``state``       the state directory, bootstrap and admin credentials
"""
