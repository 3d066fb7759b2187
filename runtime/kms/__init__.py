"""A local KMS speaking Huawei KMS's REST shapes, with the attested-recipient flow.

``errors``      the KmsError type and the code catalogue (Huawei ``KMS.xxxx`` codes)
``store``       SQLite persistence (keys, principals, policies, audit), WAL, fsynced commits
``crypto``      master key file, sealing at rest, the ciphertext format
``cms``         the CMS EnvelopedData sent to attested recipients
``recipient``   attestation-document checks and policy condition keys of a recipient
``policy``      IAM-like policy documents and their evaluation
``auth``        SDK-HMAC-SHA256 request authentication
``fields``      request-body field validation
``operations``  the APIs (create-key … gen-random, admin/*)
``service``     the request pipeline (route, authenticate, decode, authorize, audit)
``server``      the threaded HTTP/1.1 transport
``state``       the state directory, bootstrap and admin credentials
"""
