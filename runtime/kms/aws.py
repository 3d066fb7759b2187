"""AWS KMS's JSON protocol on the same service (for ``--cloud nitro``): ``POST /`` with
``X-Amz-Target: TrentService.<Operation>``, SigV4-signed (``aws_sigv4``), answered in AWS's
shapes by translating to the Huawei-shaped operations (same keys, policies, audit).

Operations: Encrypt, Decrypt, GenerateDataKey, GenerateRandom (the last three with
``Recipient {AttestationDocument, KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256}`` → the reply's
``CiphertextForRecipient``, a CMS EnvelopedData), CreateKey (symmetric, RSA_2048/3072/4096,
ECC_NIST_P256/P384), DescribeKey, GetPublicKey, Sign, ListKeys, CreateAlias.  Key ids
may be ids, key ARNs or ``alias/…`` names.  ``EncryptionContext`` becomes the AAD (its
canonical JSON).  Policies may name AWS actions (``kms:Decrypt`` …) as well as Huawei's, and
AWS's condition keys (``kms:RecipientAttestation:ImageSha384``, ``:PCR<n>``).  Errors are
``{"__type", "message"}`` with AWS's exception names.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization

from qtbuild.runtime.kms import crypto
from qtbuild.runtime.kms.errors import KmsError, invalid
from qtbuild.runtime.kms.fields import Fields
from qtbuild.runtime.kms.operations import APIS, Call
from qtbuild.runtime.kms.store import KeyRecord

TARGET_PREFIX = "TrentService."
ACCOUNT = "000000000000"
_MAX_CONTEXT = 128

#: KmsError code → (AWS exception name, HTTP status)
_EXCEPTIONS = {
    "KMS.0101": ("KMSInternalException", 500), "KMS.0102": ("ThrottlingException", 400),
    "KMS.0207": ("NotFoundException", 400), "KMS.0209": ("DisabledException", 400),
    "KMS.0210": ("KMSInvalidStateException", 400), "KMS.2201": ("InvalidCiphertextException", 400),
    "KMS.0306": ("AccessDeniedException", 400), "KMS.0307": ("AccessDeniedException", 400),
    "KMS.0301": ("IncompleteSignatureException", 400), "KMS.0302": ("InvalidSignatureException", 400),
    "KMS.0303": ("InvalidSignatureException", 400), "KMS.0305": ("UnrecognizedClientException", 400),
    "KMS.1104": ("AlreadyExistsException", 400), "KMS.0201": ("UnknownOperationException", 400),
}


def is_aws(path: str, headers: dict[str, str]) -> bool:
    return path == "/" and headers.get("x-amz-target", "").startswith(TARGET_PREFIX)


def error_body(error: KmsError) -> tuple[int, dict]:
    name, status = _EXCEPTIONS.get(error.code, ("ValidationException", 400))
    if error.code.startswith("KMS.40"):
        name = "InvalidCiphertextException" if error.code == "KMS.4001" else "ValidationException"
    return status, {"__type": name, "message": error.message}


def arn(call: Call, key_id: str) -> str:
    return f"arn:aws:kms:{call.env.region}:{ACCOUNT}:key/{key_id}"


def _key_ref(call: Call, body: dict, name: str = "KeyId") -> str:
    """A key id from an id, a key ARN or an alias (name or ARN)."""
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise KmsError("KMS.0204", f"The request lacks a valid {name}.")
    if "alias/" in value:
        alias = value[value.index("alias/"):]
        found = call.env.store.aliases(call.project_id, key_id=None, offset=0, limit=10**6)
        for record in found:
            if record.alias == alias:
                return record.key_id
        raise KmsError("KMS.0207", f"Alias {alias} is not found.")
    return value.rsplit("key/", 1)[-1]


def _context(body: dict) -> str | None:
    context = body.get("EncryptionContext")
    if context is None:
        return None
    if not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values()):
        raise invalid("EncryptionContext", "a map of strings")
    text = json.dumps(context, sort_keys=True, separators=(",", ":"))
    if len(text) > _MAX_CONTEXT:
        raise invalid("EncryptionContext", f"at most {_MAX_CONTEXT} characters here")
    return text


def _recipient(body: dict) -> dict | None:
    recipient = body.get("Recipient")
    if recipient is None:
        return None
    if not isinstance(recipient, dict) or set(recipient) - {"AttestationDocument", "KeyEncryptionAlgorithm"}:
        raise invalid("Recipient", "AttestationDocument and KeyEncryptionAlgorithm")
    return {"attestation_document": recipient.get("AttestationDocument"),
            "key_encryption_algorithm": recipient.get("KeyEncryptionAlgorithm")}


def _run(call: Call, api: str, fields: dict, also: tuple[str, ...], verify_recipient) -> dict:
    call.fields = Fields({name: value for name, value in fields.items() if value is not None})
    call.also = also
    recipient = call.fields.raw("recipient")
    if recipient is not None:
        call.recipient = verify_recipient(recipient)
    return APIS[api].handler(call)


def _plaintext_or_envelope(reply: dict, plain: str, out: dict) -> dict:
    if "ciphertext_recipient" in reply:
        out["CiphertextForRecipient"] = reply["ciphertext_recipient"]
    else:
        out["Plaintext"] = plain
    return out


def encrypt(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    reply = _run(call, "encrypt-data", {"key_id": key_id, "plain_text_base64": body.get("Plaintext"),
                                        "additional_authenticated_data": _context(body)}, ("kms:Encrypt",), verify)
    return {"CiphertextBlob": reply["cipher_text"], "KeyId": arn(call, key_id),
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def _datakey_blob(body: dict) -> bytes | None:
    """The CiphertextBlob when it is a GenerateDataKey ciphertext (AWS's Decrypt takes both)."""
    text = body.get("CiphertextBlob")
    if not isinstance(text, str) or len(text) > 8192:
        return None
    try:
        blob = base64.b64decode(text, validate=True)
        crypto.parse(blob, crypto.KIND_DATAKEY)
    except (ValueError, KmsError):
        return None
    return blob


def decrypt(call: Call, body: dict, verify) -> dict:
    blob = _datakey_blob(body)
    if blob is not None:
        header = crypto.parse(blob, crypto.KIND_DATAKEY)
        reply = _run(call, "decrypt-datakey", {
            "key_id": header.key_id, "cipher_text": blob.hex(), "datakey_cipher_length": "64",
            "additional_authenticated_data": _context(body), "recipient": _recipient(body)}, ("kms:Decrypt",), verify)
        plain = base64.b64encode(bytes.fromhex(reply.get("data_key", ""))).decode("ascii")
        return _plaintext_or_envelope(reply, plain, {"KeyId": arn(call, header.key_id),
                                                     "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})
    fields = {"cipher_text": body.get("CiphertextBlob"), "additional_authenticated_data": _context(body),
              "recipient": _recipient(body)}
    if body.get("KeyId") is not None:
        fields["key_id"] = _key_ref(call, body)
    reply = _run(call, "decrypt-data", fields, ("kms:Decrypt",), verify)
    return _plaintext_or_envelope(reply, reply.get("plain_text_base64", ""), {
        "KeyId": arn(call, reply["key_id"]), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"})


def generate_data_key(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    spec, count = body.get("KeySpec"), body.get("NumberOfBytes")
    if (spec is None) == (count is None):
        raise invalid("KeySpec", "give KeySpec or NumberOfBytes")
    if spec is not None and spec not in ("AES_256", "AES_128"):
        raise invalid("KeySpec", "AES_256 or AES_128")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024):
        raise invalid("NumberOfBytes", "1..1024")
    bits = 8 * count if count is not None else (256 if spec == "AES_256" else 128)
    reply = _run(call, "create-datakey", {"key_id": key_id, "datakey_length": bits,
                                          "additional_authenticated_data": _context(body),
                                          "recipient": _recipient(body)}, ("kms:GenerateDataKey",), verify)
    blob = base64.b64encode(bytes.fromhex(reply["cipher_text"])).decode("ascii")
    plain = base64.b64encode(bytes.fromhex(reply.get("plain_text", ""))).decode("ascii")
    return _plaintext_or_envelope(reply, plain, {"CiphertextBlob": blob, "KeyId": arn(call, key_id)})


def generate_random(call: Call, body: dict, verify) -> dict:
    count = body.get("NumberOfBytes")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1024:
        raise invalid("NumberOfBytes", "1..1024")
    reply = _run(call, "gen-random", {"random_data_length": 8 * count, "recipient": _recipient(body)},
                 ("kms:GenerateRandom",), verify)
    plain = base64.b64encode(bytes.fromhex(reply.get("random_data", ""))).decode("ascii")
    return _plaintext_or_envelope(reply, plain, {})


#: AWS KeySpec → the Huawei key_spec of the same key
_KEY_SPECS = {"SYMMETRIC_DEFAULT": "AES_256", "RSA_2048": "RSA_2048", "RSA_3072": "RSA_3072",
              "RSA_4096": "RSA_4096", "ECC_NIST_P256": "EC_P256", "ECC_NIST_P384": "EC_P384"}
_AWS_SPECS = {huawei: aws_name for aws_name, huawei in _KEY_SPECS.items()}
_KEY_STATES = {"2": "Enabled", "3": "Disabled", "4": "PendingDeletion"}
#: AWS's signing algorithms per key spec (an ECC key signs with the hash of its curve's size)
_RSA_SIGNING = [f"{family}_SHA_{bits}" for family in ("RSASSA_PSS", "RSASSA_PKCS1_V1_5") for bits in (256, 384, 512)]
_SIGNING = {"RSA_2048": _RSA_SIGNING, "RSA_3072": _RSA_SIGNING, "RSA_4096": _RSA_SIGNING,
            "EC_P256": ["ECDSA_SHA_256"], "EC_P384": ["ECDSA_SHA_384"]}


def create_key(call: Call, body: dict, verify) -> dict:
    spec = body.get("KeySpec") or body.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"
    if not isinstance(spec, str) or spec not in _KEY_SPECS:
        raise invalid("KeySpec", f"one of {', '.join(_KEY_SPECS)}")
    usages = ("ENCRYPT_DECRYPT", "SIGN_VERIFY") if spec.startswith("RSA_") else \
        ("SIGN_VERIFY",) if spec.startswith("ECC_") else ("ENCRYPT_DECRYPT",)
    usage = body.get("KeyUsage") or usages[0]
    if not isinstance(usage, str) or usage not in usages:
        raise invalid("KeyUsage", f"a {spec} key is for {' or '.join(usages)}")
    description = body.get("Description") or ""
    alias = f"aws-{secrets.token_hex(10)}"      # Huawei-shaped keys need a name; AWS keys have none
    fields = {"key_alias": alias, "key_description": description if isinstance(description, str) else None,
              "key_spec": _KEY_SPECS[spec], "key_usage": usage}
    reply = _run(call, "create-key", fields, ("kms:CreateKey",), verify)
    return {"KeyMetadata": _metadata(call, call.key(reply["key_info"]["key_id"]))}


def describe_key(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    reply = _run(call, "describe-key", {"key_id": key_id}, ("kms:DescribeKey",), verify)
    return {"KeyMetadata": _metadata(call, call.key(reply["key_info"]["key_id"]))}


def get_public_key(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    reply = _run(call, "get-publickey", {"key_id": key_id}, ("kms:GetPublicKey",), verify)
    record = call.key(key_id)
    der = serialization.load_pem_public_key(reply["public_key"].encode("ascii")).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    metadata = _metadata(call, record)
    return {"KeyId": metadata["Arn"], "PublicKey": base64.b64encode(der).decode("ascii"),
            **{name: metadata[name] for name in ("CustomerMasterKeySpec", "KeySpec", "KeyUsage",
                                                 "SigningAlgorithms", "EncryptionAlgorithms") if name in metadata}}


def sign(call: Call, body: dict, verify) -> dict:
    key_id = _key_ref(call, body)
    algorithm, message_type = body.get("SigningAlgorithm"), body.get("MessageType") or "RAW"
    if not isinstance(algorithm, str) or algorithm not in {name for names in _SIGNING.values() for name in names}:
        raise invalid("SigningAlgorithm", "an AWS signing algorithm (RSASSA_PSS_SHA_256, ECDSA_SHA_256 …)")
    reply = _run(call, "sign", {"key_id": key_id, "message": body.get("Message"), "signing_algorithm": algorithm,
                                "message_type": message_type}, ("kms:Sign",), verify)
    spec = call.key(key_id).key_spec        # checked once authorized, as the Huawei API checks its own rules
    if algorithm not in _SIGNING.get(spec, ()):
        raise invalid("SigningAlgorithm", f"{algorithm} does not apply to a {_AWS_SPECS.get(spec, spec)} key")
    return {"KeyId": arn(call, key_id), "Signature": reply["signature"], "SigningAlgorithm": algorithm}


def _metadata(call: Call, record: KeyRecord) -> dict:
    """AWS's KeyMetadata of a key."""
    spec = _AWS_SPECS.get(record.key_spec, record.key_spec)
    metadata = {
        "AWSAccountId": ACCOUNT, "KeyId": record.key_id, "Arn": arn(call, record.key_id),
        "CreationDate": record.created_ms / 1000, "Enabled": record.state == "2",
        "Description": record.description, "KeyUsage": record.key_usage,
        "KeyState": _KEY_STATES.get(record.state, "Unavailable"), "Origin": "AWS_KMS", "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": spec, "KeySpec": spec, "MultiRegion": False}
    if record.deletion_ms is not None:
        metadata["DeletionDate"] = record.deletion_ms / 1000
    if record.key_usage == "SIGN_VERIFY":
        metadata["SigningAlgorithms"] = _SIGNING.get(record.key_spec, [])
    elif spec == "SYMMETRIC_DEFAULT":
        metadata["EncryptionAlgorithms"] = ["SYMMETRIC_DEFAULT"]
    else:
        metadata["EncryptionAlgorithms"] = ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]
    return metadata


def list_keys(call: Call, body: dict, verify) -> dict:
    fields = {"limit": body.get("Limit"), "marker": body.get("Marker")}
    reply = _run(call, "list-keys", fields, ("kms:ListKeys",), verify)
    out: dict = {"Keys": [{"KeyId": key_id, "KeyArn": arn(call, key_id)} for key_id in reply["keys"]],
                 "Truncated": reply["truncated"] == "true"}
    if reply["next_marker"]:
        out["NextMarker"] = reply["next_marker"]
    return out


def create_alias(call: Call, body: dict, verify) -> dict:
    name = body.get("AliasName")
    if not isinstance(name, str) or not name.startswith("alias/") or name.startswith("alias/aws/"):
        raise invalid("AliasName", "alias/<name>, not alias/aws/…")
    _run(call, "create-alias", {"key_id": _key_ref(call, body, "TargetKeyId"), "alias": name},
         ("kms:CreateAlias",), verify)
    return {}


OPERATIONS: dict[str, Callable] = {
    "Encrypt": encrypt, "Decrypt": decrypt, "GenerateDataKey": generate_data_key,
    "GenerateRandom": generate_random, "CreateKey": create_key, "ListKeys": list_keys,
    "CreateAlias": create_alias, "DescribeKey": describe_key, "GetPublicKey": get_public_key, "Sign": sign,
}

#: the Huawei API each operation runs (for the audit log)
API_NAMES = {"Encrypt": "encrypt-data", "Decrypt": "decrypt-data", "GenerateDataKey": "create-datakey",
             "GenerateRandom": "gen-random", "CreateKey": "create-key", "ListKeys": "list-keys",
             "CreateAlias": "create-alias", "DescribeKey": "describe-key", "GetPublicKey": "get-publickey",
             "Sign": "sign"}
